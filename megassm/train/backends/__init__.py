"""Training backends: the library that shards, reduces and updates, behind ``TrainBackend`` (base.py).

A new backend (say FSDP2) is one module here implementing ``TrainBackend`` and ``LocalShards``, plus a case
in ``build_backend``; base.py's docstring lists what each method would do under FSDP2."""

from __future__ import annotations

from megassm.train.backends.base import LocalShards, PlainShards, StepResult, TrainBackend


def build_backend(mesh, cfg, device) -> TrainBackend:
    """The backend of a run (``cfg``: the RunConfig's parallel / train / optim sections are read)."""
    from megassm.train.backends.deepspeed import DeepSpeedBackend

    return DeepSpeedBackend(mesh, cfg.parallel, cfg.train, cfg.optim, device)


__all__ = ["LocalShards", "PlainShards", "StepResult", "TrainBackend", "build_backend"]
