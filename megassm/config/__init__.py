from megassm.config.load import ConfigError, from_dict, load_config, to_dict, to_yaml, validate
from megassm.config.schema import (
    DataConfig,
    DiffusionConfig,
    EncoderConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "ConfigError", "load_config", "to_yaml", "to_dict", "from_dict", "validate",
    "RunConfig", "ModelConfig", "DataConfig", "DiffusionConfig", "EncoderConfig", "OptimConfig",
    "ParallelConfig", "TrainConfig",
]
