"""Run configuration: the schema (``schema``), loading with overrides and located errors (``loading``),
and where each key was written (``origin``). The names below are the package's public surface."""

from aligner.config.loading import (
    SECRET_KEYS,
    apply_override,
    dump_config,
    load_config,
    located_option_problems,
    read_config_source,
    resolve_config_path,
    validate_located,
    validate_plugin_options,
    validation_error,
)
from aligner.config.origin import ConfigOrigin, format_loc, key_where
from aligner.config.schema import (
    DataConfig,
    EvalConfig,
    GenerationEvalConfig,
    HubConfig,
    LossChoice,
    ModelConfig,
    PluginChoice,
    RunConfig,
    SourceConfig,
    StageConfig,
    Strict,
    TensorBoardConfig,
    TinyModelConfig,
    TrainConfig,
    WandbConfig,
)

__all__ = [
    "SECRET_KEYS", "ConfigOrigin", "DataConfig", "EvalConfig", "GenerationEvalConfig", "HubConfig", "LossChoice",
    "ModelConfig", "PluginChoice", "RunConfig", "SourceConfig", "StageConfig", "Strict", "TensorBoardConfig",
    "TinyModelConfig", "TrainConfig", "WandbConfig", "apply_override", "dump_config", "format_loc", "key_where",
    "load_config", "located_option_problems", "read_config_source", "resolve_config_path", "validate_located", "validate_plugin_options",
    "validation_error",
]
