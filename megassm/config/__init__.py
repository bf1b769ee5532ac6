"""Run configs: the schema, YAML loading and the rules of their values. (The gate that checks a config
against every package's rules too: ``megassm.run_config.load_config`` / ``from_dict``.)"""

from megassm.config.load import to_dict, to_yaml
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
from megassm.config.validate import ConfigError, check_extras

__all__ = [
    "ConfigError", "to_yaml", "to_dict", "check_extras",
    "RunConfig", "ModelConfig", "DataConfig", "DiffusionConfig", "EncoderConfig", "OptimConfig",
    "ParallelConfig", "TrainConfig", "ProfileConfig", "LoggingConfig", "WandbConfig",
]
