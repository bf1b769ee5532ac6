"""The Euler flow sampler keeps its state and timesteps in float32 under a bf16 model."""

import torch

from megassm.diffusion.flow import euler_sample, shift_t


class _Bf16Velocity:
    """A 'bf16 model': v = -x (the ODE dx/dt = -x), computed and returned in bf16; records its inputs' dtypes."""

    def __init__(self):
        self.x_dtypes, self.t_dtypes = set(), set()

    def __call__(self, x, t, text, mask):
        self.x_dtypes.add(x.dtype)
        self.t_dtypes.add(t.dtype)
        return -x.to(torch.bfloat16)


def _fp32_reference(noise, steps, shift):
    ts = shift_t(torch.linspace(1.0, 0.0, steps + 1), shift).tolist()
    x = noise.clone()
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * (-x.to(torch.bfloat16)).float()  # the same bf16 velocity, fp32 accumulation
    return x


def test_state_stays_fp32_and_only_the_model_input_is_bf16():
    # noise handed over in the model's dtype, as sampling used to pass it
    noise = (torch.randn(2, 3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 100 + 1000).bfloat16()
    text, mask = torch.zeros(2, 5, 8, dtype=torch.bfloat16), torch.ones(2, 5, dtype=torch.bool)
    model = _Bf16Velocity()
    x = euler_sample(model, noise, text, mask, steps=50, cfg_scale=1.0, shift=3.0)
    assert x.dtype == torch.float32
    assert model.x_dtypes == {torch.bfloat16} and model.t_dtypes == {torch.float32}
    # bf16 has 8 significant bits: at |x| ~ 1000 a bf16 state drops or rounds every update (~4 per step);
    # the fp32 state matches an fp32 integration of the same bf16 velocities to fp32 rounding
    torch.testing.assert_close(x, _fp32_reference(noise.float(), 50, 3.0), rtol=1e-5, atol=1e-3)


def test_cfg_branches_share_the_fp32_state():
    noise = torch.randn(1, 2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    text, mask = torch.ones(1, 3, 4, dtype=torch.bfloat16), torch.ones(1, 3, dtype=torch.bool)
    model = _Bf16Velocity()
    x = euler_sample(model, noise, text, mask, steps=4, cfg_scale=3.0, shift=1.0)
    # both branches give the same velocity here, so guidance changes nothing
    torch.testing.assert_close(x, _fp32_reference(noise, 4, 1.0))
    assert x.dtype == torch.float32 and model.x_dtypes == {torch.bfloat16}
