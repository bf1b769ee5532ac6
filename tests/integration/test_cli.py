"""The command line: --help for every command, config errors as messages (not tracebacks)."""

import pytest

from megassm.cli import build_parser, main


@pytest.mark.parametrize("argv", [[], ["train"], ["sample"], ["eval"], ["inspect"], ["inspect", "model"],
                                  ["convert", "to-diffusers"], ["convert", "merge-lora"]])
def test_help_for_every_command(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: megassm" in out


def test_optional_commands_are_registered(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    for cmd in ("train", "sample", "eval", "inspect"):
        assert cmd in out


def test_config_error_is_a_message_not_a_traceback(capsys):
    code = main(["train", "configs/smoke.yaml", "train.stesp=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert "config error: " in err and "Did you mean 'train.steps'" in err and "Traceback" not in err


def test_inspect_model_prints_counts(capsys):
    assert main(["inspect", "model", "configs/model/hth-5b.yaml", "--seq-len", "16384"]) == 0
    out = capsys.readouterr().out
    assert "hth-5b" in out and "total" in out and "forward FLOPs" in out


def test_python_dash_m_works(cli):
    proc = cli("--help")
    assert "train" in proc.stdout


def test_eval_names_a_missing_model_path(tmp_path, capsys):
    # the paths are checked before the checkpoint loads
    code = main(["eval", str(tmp_path / "no_run"), "--inception", str(tmp_path / "inception.pth")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and f"eval.inception='{tmp_path / 'inception.pth'}'" in err
