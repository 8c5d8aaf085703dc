"""Configuration: typed dataclasses for every knob (`schema`), the strict YAML loader with `key.sub=value`
overrides (`load`), the start-up checks, one function per section (`checks`), and the names
`lora.target_modules` accepts (`lora_targets`).

    from opsd_megatron.config import load_config, ConfigError
    cfg = load_config("examples/qwen3_1.7b_opsd.yaml", ["train.steps=10"])

Importing this package needs neither torch nor Megatron: the CLIs check a config before anything heavy loads.
"""

from opsd_megatron.config.checks import validate, validate_context, validate_model, validate_world
from opsd_megatron.config.load import apply_overrides, config_from_dict, load_config
from opsd_megatron.config.schema import (
    GPU_MEMORY_UTILIZATION,
    Algorithm,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DType,
    EngineKind,
    EvalConfig,
    LoggingConfig,
    LogLevel,
    LoraConfig,
    LoraLayout,
    LossConfig,
    LossKind,
    LrDecayStyle,
    ModelConfig,
    MoeConfig,
    OnBadRow,
    OPSDConfig,
    OptimizerConfig,
    ParallelConfig,
    PromptConfig,
    RolloutConfig,
    SFTConfig,
    SftFormat,
    TeacherConfig,
    TeacherMode,
    TrainConfig,
    UseTE,
    choices,
    literal_fields,
)

__all__ = [
    "GPU_MEMORY_UTILIZATION",
    "Algorithm",
    "CheckpointConfig",
    "ConfigError",
    "DType",
    "DataConfig",
    "EngineKind",
    "EvalConfig",
    "LogLevel",
    "LoggingConfig",
    "LoraConfig",
    "LoraLayout",
    "LossConfig",
    "LossKind",
    "LrDecayStyle",
    "ModelConfig",
    "MoeConfig",
    "OPSDConfig",
    "OnBadRow",
    "OptimizerConfig",
    "ParallelConfig",
    "PromptConfig",
    "RolloutConfig",
    "SFTConfig",
    "SftFormat",
    "TeacherConfig",
    "TeacherMode",
    "TrainConfig",
    "UseTE",
    "apply_overrides",
    "choices",
    "config_from_dict",
    "literal_fields",
    "load_config",
    "validate",
    "validate_context",
    "validate_model",
    "validate_world",
]
