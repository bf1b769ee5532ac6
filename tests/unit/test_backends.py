"""The backend seam (megassm/train/backends/): the DeepSpeed backend and the plain shards implement every
method of the protocols the Trainer, the step strategies and the EMA call."""

import inspect

from megassm.train.backends.base import LocalShards, PlainShards, TrainBackend
from megassm.train.backends.deepspeed import DeepSpeedBackend, DeepSpeedShards


def _members(protocol) -> set[str]:
    return {n for n, _ in inspect.getmembers(protocol) if not n.startswith("_") or n == "__call__"} - set(dir(object)) \
        | set(getattr(protocol, "__annotations__", {}))


def test_implementations_cover_their_protocols():
    for impl, protocol in ((DeepSpeedBackend, TrainBackend), (DeepSpeedShards, LocalShards),
                           (PlainShards, LocalShards)):
        missing = sorted(n for n in _members(protocol) if not hasattr(impl, n))
        assert not missing, f"{impl.__name__} lacks {missing} of {protocol.__name__}"
    # teeth: the protocol's own members are seen (methods and annotated attributes)
    assert {"step", "skip", "backward", "shards", "module", "__call__"} <= _members(TrainBackend)
