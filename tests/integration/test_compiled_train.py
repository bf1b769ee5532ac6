"""`megassm train` with ``model.compile: blocks`` through the real CLI on CPU: Inductor compiles every block
(C++ code for the glue; the fused Hydra mixer's Triton kernels in the interpreter as custom ops inside the graph),
DeepSpeed ZeRO-3 on one gloo rank with the compiled blocks as leaves. Its losses must equal the eager run's.

Inductor is what the GPU runs and it asserts each custom op's output strides; the CPU tests that compile through
a recording or aot_eager backend do not, and a stride fault in the fused backward reached an H100 that way.
Tolerance: the same fp32 arithmetic reassociated by Inductor's fusions: 1e-5 relative on the loss.
"""

import pytest

from tests.conftest import SMOKE, TINY_OVERRIDES, losses_by_step, run_train

pytest.importorskip("triton")
pytestmark = pytest.mark.slow

COMMON = [*TINY_OVERRIDES, "train.steps=3", "model.hydra_path=fused"]


def test_compiled_blocks_train_as_eager_through_the_cli(tmp_path):
    env = {"TRITON_INTERPRET": "1"}
    eager = run_train(SMOKE, *COMMON, f"run_dir={tmp_path / 'eager'}", env=env)
    comp = run_train(SMOKE, *COMMON, f"run_dir={tmp_path / 'compiled'}", "model.compile=blocks", env=env)
    for proc in (eager, comp):
        assert "Hydra mixers: 3 fused, 0 reference path" in proc.stderr + proc.stdout
    assert "compile: 4 blocks" in comp.stderr + comp.stdout
    a, b = losses_by_step(tmp_path / "compiled"), losses_by_step(tmp_path / "eager")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in b:
        assert a[step] == pytest.approx(b[step], rel=1e-5), (step, a[step], b[step])
