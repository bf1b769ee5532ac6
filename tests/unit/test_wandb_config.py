"""logging.wandb at config load: on with defaults, bad values named, a missing extra explained. The run itself
(offline files, the run id across a resume) is in tests/integration/test_observability.py."""

import sys

import pytest

from megassm.config import ConfigError, to_dict
from megassm.run_config import from_dict, load_config


@pytest.fixture
def no_wandb(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails, as without the extra


def test_off_by_default_and_on_with_defaults():
    assert load_config(None).logging.wandb is None
    w = load_config(None, ["logging.wandb={}"]).logging.wandb
    assert (w.project, w.entity, w.mode, w.tags) == ("megassm", None, "online", [])
    w = load_config(None, ["logging.wandb.mode=offline", "logging.wandb.tags=[a,b]"]).logging.wandb
    assert (w.mode, w.tags) == ("offline", ["a", "b"])


def test_missing_extra_says_how_to_install(no_wandb):
    with pytest.raises(ConfigError, match=r"logging.wandb is set.*pip install megassm\[wandb\]"):
        load_config(None, ["logging.wandb.project=x"])
    load_config(None)  # not asked for: no need for the package


def test_a_stored_config_reads_back_without_the_extra(no_wandb):
    # sampling or converting a checkpoint of a W&B-logged run must not need wandb
    stored = to_dict(load_config(None))
    stored["logging"]["wandb"] = {"project": "x", "entity": None, "mode": "offline", "tags": []}
    assert from_dict(stored).logging.wandb.project == "x"


@pytest.mark.parametrize("override, message", [
    ("logging.wandb.mode=shared", r"logging.wandb.mode='shared' is not valid; choose one of \['online', 'offline'"),
    ("logging.wandb.project=''", r"logging.wandb.project must be a non-empty"),
    ("logging.wandb.mod=offline", r"unknown config key 'logging.wandb.mod'. Did you mean 'logging.wandb.mode'"),
])
def test_bad_wandb_config_fails_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
