from megassm.config.load import from_dict, load_config, to_dict, to_yaml
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
from megassm.config.validate import ConfigError, check_extras, validate

__all__ = [
    "ConfigError", "load_config", "to_yaml", "to_dict", "from_dict", "validate", "check_extras",
    "RunConfig", "ModelConfig", "DataConfig", "DiffusionConfig", "EncoderConfig", "OptimConfig",
    "ParallelConfig", "TrainConfig", "ProfileConfig", "LoggingConfig", "WandbConfig",
]
