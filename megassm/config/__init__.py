from megassm.config.load import ConfigError, check_extras, from_dict, load_config, to_dict, to_yaml, validate
from megassm.config.schema import (
    DataConfig,
    DiffusionConfig,
    EncoderConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    ProfileConfig,
    RunConfig,
    TrainConfig,
    WandbConfig,
)

__all__ = [
    "ConfigError", "load_config", "to_yaml", "to_dict", "from_dict", "validate", "check_extras",
    "RunConfig", "ModelConfig", "DataConfig", "DiffusionConfig", "EncoderConfig", "OptimConfig",
    "ParallelConfig", "TrainConfig", "ProfileConfig", "LoggingConfig", "WandbConfig",
]
