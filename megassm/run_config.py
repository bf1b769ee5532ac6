"""The gate of a run's config: ``load_config`` (a YAML file + overrides) and ``from_dict`` (a stored config)
build a ``RunConfig`` (``config/load.py``) and check it against every rule before any process group, model or
run directory exists.

    config/validate.py          the rules of the config's own values, in order; at their place the rules that
                                need a package's knowledge (``PackageRules``), passed from here:
    models/rules.py             ModelConfig's rules (the mixer registry's)
    parallel/rules.py           the model sizes the degrees divide; the degrees against the world size
    data/remote.py, data/config_checks.py   data locations, buckets, and (``load_config``) what the config
                                must agree with in its datasets (model widths, encoders, checkpoints)

config/ imports none of those packages; they import config/ (its schema and ``ConfigError``). Every error is
a ``ConfigError`` naming the key and what would be valid.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from megassm.config import validate as rules_of_values
from megassm.config.load import compose, structured
from megassm.config.schema import RunConfig
from megassm.config.validate import PackageRules, check_run
from megassm.data.config_checks import apply_datasets, check_buckets
from megassm.data.remote import check_location
from megassm.models.rules import validate_model
from megassm.parallel.rules import check_parallel_model, check_world

log = logging.getLogger("megassm.config")

RULES = PackageRules(model=validate_model, data_location=check_location, parallel_model=check_parallel_model,
                     buckets=check_buckets, world=check_world)


def validate(cfg: RunConfig) -> None:
    """Every rule of a stored config (``config/validate.py``'s order, the packages' rules at their place)."""
    rules_of_values.validate(cfg, RULES)


def from_dict(data: dict) -> RunConfig:
    """Rebuild a RunConfig from ``to_dict`` output (e.g. a checkpoint's config.json), checked."""
    run = structured(data)
    validate(run)
    return run


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), world: int | None = None,
                quiet: bool = False, training: bool = False) -> RunConfig:
    """Build a validated ``RunConfig`` from a YAML file (with its bases) and overrides; ``world``: the world
    size of the launch that will run it, if known (``megassm train`` passes it, before dist init). The model's
    input widths come from the local datasets where the config leaves them out (logged unless ``quiet``);
    ``training`` (``megassm train``): also what a run reads must exist and agree (data/config_checks.py)."""
    run, explicit = compose(path, overrides)
    validate(run)
    notes, warnings = apply_datasets(run, explicit, training)
    check_run(run, world, RULES)
    for note in notes if not quiet else ():
        log.info(note)
    for warning in warnings if not quiet else ():
        log.warning(warning)
    return run
