"""Config loading: composition, overrides, and the promised error messages."""

from pathlib import Path

import pytest

from megassm.config import ConfigError, to_dict
from megassm.run_config import from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_smoke_builds_on_model_file_and_overrides_apply():
    cfg = load_config(CONFIGS / "smoke.yaml", ["train.steps=7", "model.d_model=96", "optim.betas=[0.8,0.9]"])
    assert cfg.model.name == "hth-tiny" and cfg.model.d_model == 96 and cfg.train.steps == 7
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.run_dir == "runs/smoke"  # from the file; ${stage} interpolation resolved elsewhere
    assert from_dict(to_dict(cfg)) == cfg


def test_interpolation_in_run_dir():
    cfg = load_config(None, ["stage=abc"])
    assert cfg.run_dir == "runs/abc"


def test_unknown_key_names_key_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stesp'.*Did you mean 'train.steps'"):
        load_config(CONFIGS / "smoke.yaml", ["train.stesp=3"])
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  d_modle: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.d_modle'.*Valid keys under 'model'"):
        load_config(f)
    with pytest.raises(ConfigError, match="unknown config key 'optimizer'"):
        load_config(None, ["optimizer.lr=1"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"wrong type for 'train.steps'"):
        load_config(CONFIGS / "smoke.yaml", ["train.steps=many"])


def test_save_optimizer_state_is_a_checked_bool(tmp_path):
    assert load_config(CONFIGS / "smoke.yaml").train.save_optimizer_state is True
    assert load_config(CONFIGS / "smoke.yaml", ["train.save_optimizer_state=false"]).train.save_optimizer_state is False
    with pytest.raises(ConfigError, match=r"wrong type for 'train.save_optimizer_state': 'sometimes' is not true or "
                                          r"false \(e.g. train.save_optimizer_state=true, the default\)"):
        load_config(CONFIGS / "smoke.yaml", ["train.save_optimizer_state=sometimes"])
    f = tmp_path / "bad.yaml"
    f.write_text("base: [%s]\ntrain:\n  save_optimizer_state: [false]\n" % (CONFIGS / "smoke.yaml"))
    with pytest.raises(ConfigError, match=r"bad.yaml: wrong type for 'train.save_optimizer_state'"):
        load_config(f)


@pytest.mark.parametrize("override,message", [
    ("parallel.pp=2", "regimes"),  # pp with ZeRO-3
    ("model.pattern=hxA", "unknown symbols"),
    ("model.num_heads=3", "not divisible by model.num_heads"),
    ("model.d_conv=4", "must be odd"),
    ("data.kind=lmdb", "choose one of"),
    ("data.kind=shards", "needs data.paths"),
    ("train.precision=fp8", "choose one of"),
    ("parallel.offload_params=true", "zero_stage=3"),
    ("diffusion.caption_dropout=1.5", "caption_dropout"),
])
def test_bad_values_and_combinations(override, message):
    extra = ["parallel.zero_stage=1"] if override == "parallel.offload_params=true" else []
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "smoke.yaml", [override, *extra])


@pytest.mark.parametrize("overrides,message", [
    (["parallel.pp=2", "parallel.zero_stage=0"], r"parallel.pp=2 with parallel.zero_stage=0"),
    (["parallel.pp=2", "parallel.zero_stage=1", "train.grad_accum=2"], r"train.grad_accum=2 with parallel.pp=2"),
    (["parallel.pp=2", "parallel.zero_stage=1", "parallel.virtual_stages=2", "parallel.micro_batches=3"],
     r"multiple of parallel.pp"),
    (["parallel.virtual_stages=2"], r"needs parallel.pp > 1"),
    (["parallel.pp=2", "parallel.zero_stage=1", "parallel.virtual_stages=4", "parallel.micro_batches=4"],
     r"exceed the number of blocks"),
    (["parallel.tp=3"], r"parallel.tp=3 does not divide"),
    (["parallel.cp=3"], r"parallel.cp=3 does not divide"),
    (["parallel.cp=2", "data.image_size=6"], r"do not split over parallel.cp"),
    (["parallel.cp=32", "parallel.cp_impl=state_passing", "model.pattern=h", "model.headdim=4"],
     r"parallel.cp_impl=state_passing with parallel.cp=32: 2 tokens per CP rank, fewer than the conv halo"),
    (["parallel.cp_impl=ring"], r"parallel.cp_impl='ring' is not valid; choose one of \['ulysses', 'state_passing', "
                                r"'auto'\]"),
])
def test_parallel_rules_fail_at_load_naming_the_key(overrides, message):
    """Rules that used to fail only after dist init and a model build (PP engine, mesh checks)."""
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "smoke.yaml", overrides)


def test_world_size_rule_fails_at_load_before_dist_init():
    """``megassm train`` passes the launcher's world size to load_config: degrees that do not divide it fail
    there, as a ConfigError naming them and the valid products, before any process group exists."""
    with pytest.raises(ConfigError, match=r"parallel.tp=2 cp=1 pp=2 on 6 processes: world size 6 is not divisible "
                                          r"by tp\*cp\*pp = 2\*1\*2 = 4.*divide 6: \[1, 2, 3, 6\]"):
        load_config(CONFIGS / "smoke.yaml", ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"], world=6)
    assert load_config(CONFIGS / "smoke.yaml", ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"],
                       world=8).parallel.tp == 2


def test_pp_with_zero1_is_accepted():
    cfg = load_config(CONFIGS / "smoke.yaml", ["parallel.pp=2", "parallel.zero_stage=1"])
    assert cfg.parallel.pp == 2


def test_override_syntax_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(CONFIGS / "smoke.yaml", ["train.steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    f = tmp_path / "loop.yaml"
    f.write_text("base: [loop.yaml]\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(f)
    g = tmp_path / "list.yaml"
    g.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(g)


def test_every_shipped_config_loads():
    for f in sorted(CONFIGS.rglob("*.yaml")):
        load_config(f)


@pytest.mark.parametrize("overrides, message", [
    (["train.preview_prompts=[]"], r"train.preview_prompts=\[\] is empty"),
    (["train.preview_prompts=[a cat,' ']"], r"train.preview_prompts\[1\] is blank"),
    (["train.preview_prompts_file=/nonexistent/prompts.txt"], r"train.preview_prompts_file='/nonexistent/prompts.txt'"
                                                               r": no such file"),
    (["train.preview_prompts=[a]", "train.preview_prompts_file=p.txt"], "are both set"),
    (["train.preview_latent_shape=[1,8]"], r"train.preview_latent_shape=\[1, 8\] must be three positive ints"),
    (["train.preview_latent_shape=[1,8,7]"], r"multiple of model.patch_size=\[1, 2, 2\]"),
    (["data.kind=shards", "data.paths=[/d]", "train.sample_every=10"], r"train.sample_every=10 with data.kind=shards "
                                                                        "needs train.preview_prompts"),
])
def test_bad_preview_settings_fail_at_load_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "smoke.yaml", overrides)


def test_preview_prompts_file_without_prompts_fails_at_load(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("# nothing yet\n\n")
    with pytest.raises(ConfigError, match=r"train.preview_prompts_file=.*empty.txt' holds no prompts"):
        load_config(CONFIGS / "smoke.yaml", [f"train.preview_prompts_file={f}"])
    # a checkpoint's stored config does not need the file any more
    good = tmp_path / "p.txt"
    good.write_text("a cat\n")
    stored = to_dict(load_config(CONFIGS / "smoke.yaml", [f"train.preview_prompts_file={good}"]))
    good.unlink()
    assert from_dict(stored).train.preview_prompts_file == str(good)


def test_type_errors_say_the_value_and_the_type_without_omegaconf_internals(tmp_path):
    with pytest.raises(ConfigError, match=r"wrong type for 'optim.lr': 'fast' is not a number \(e.g. optim.lr=0.0001"
                                          r", the default\)$"):
        load_config(CONFIGS / "smoke.yaml", ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"'data.paths': '/dir' is not a list; write a list, e.g. "
                                          r"data.paths=\[/dir\]"):
        load_config(CONFIGS / "smoke.yaml", ["data.paths=/dir"])
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  progress_bar: maybe\n")
    with pytest.raises(ConfigError, match=r"c.yaml: wrong type for 'train.progress_bar': 'maybe' is not true or false"):
        load_config(f)


def test_flags_where_overrides_go_get_the_key_value_spelling(capsys):
    from megassm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "configs/smoke.yaml", "--steps", "10"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "hint: config values are overrides written key=value: train.steps=10" in err
    with pytest.raises(SystemExit):
        main(["train", "configs/smoke.yaml", "--resume"])
    assert "resuming is automatic" in capsys.readouterr().err
