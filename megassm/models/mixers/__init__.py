"""The registry of token-mixer kinds (``spec.py``) and the built-in kinds: Hydra, self-attention."""

# registration order is the order of reports and checks: attention ('A'), then Hydra ('h', 'v', 't')
from megassm.models.mixers import attention as _attention  # noqa: F401
from megassm.models.mixers import hydra as _hydra  # noqa: F401
from megassm.models.mixers.spec import (
    MixerSpec,
    ShardSpec,
    is_mixer_symbol,
    kinds_in,
    mixer_for_symbol,
    mixer_kinds,
    pattern_errors,
    pattern_symbols,
    register_mixer,
    scan_order_of,
    spec_errors,
    unregister_mixer,
)

__all__ = ["MixerSpec", "ShardSpec", "is_mixer_symbol", "kinds_in", "mixer_for_symbol", "mixer_kinds",
           "pattern_errors", "pattern_symbols", "register_mixer", "scan_order_of", "spec_errors", "unregister_mixer"]
