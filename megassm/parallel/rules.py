"""A config's parallel degrees against the model and the launch, checked by the config gate
(``megassm/run_config.py``) before any process group or model exists: ``ParallelDims``' own rules."""

from __future__ import annotations

from megassm.config.schema import ParallelConfig, RunConfig
from megassm.config.validate import ConfigError
from megassm.parallel.mesh import MeshError, ParallelDims


def check_world(p: ParallelConfig, world: int) -> None:
    """tp x cp x pp must divide the world size (dp = world / (tp x cp x pp)); ``ParallelDims``'s own rule."""
    try:
        ParallelDims(world=world, tp=p.tp, cp=p.cp, pp=p.pp)
    except MeshError as e:
        raise ConfigError(f"parallel.tp={p.tp} cp={p.cp} pp={p.pp} on {world} processes: {e}") from None


def check_parallel_model(cfg: RunConfig) -> None:
    """The model sizes that tp / cp must divide, and the procedural data's tokens over cp, before any process
    group or model exists (the same checks ``parallelize_hth`` makes)."""
    p = cfg.parallel
    try:
        ParallelDims(world=p.tp * p.cp * p.pp, tp=p.tp, cp=p.cp, pp=p.pp).check_model(cfg.model)
    except MeshError as e:
        raise ConfigError(str(e)) from None
    if cfg.data.kind == "procedural" and p.cp * p.tp > 1 and not cfg.data.buckets:  # buckets: data/config_checks.py
        pt, ph, pw = cfg.model.patch_size
        tokens = max(1, cfg.data.frames // pt) * (cfg.data.image_size // ph) * (cfg.data.image_size // pw)
        if tokens % (p.cp * p.tp):
            raise ConfigError(f"data.image_size={cfg.data.image_size}, data.frames={cfg.data.frames}: {tokens} tokens "
                              f"per sample do not split over parallel.cp x tp = {p.cp * p.tp} ranks")
        halo = cfg.model.d_conv // 2
        if p.cp > 1 and p.cp_impl != "ulysses" and tokens // p.cp < halo:
            raise ConfigError(f"parallel.cp_impl={p.cp_impl} with parallel.cp={p.cp}: {tokens // p.cp} tokens per CP "
                              f"rank, fewer than the conv halo (model.d_conv - 1) / 2 = {halo} that state passing "
                              "takes from each neighbour; use parallel.cp_impl=ulysses, a smaller cp or larger images")
