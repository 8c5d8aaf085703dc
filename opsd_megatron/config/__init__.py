"""Configuration: typed dataclasses for every knob (`schema`), the strict YAML loader with `key.sub=value`
overrides (`load`) and the start-up checks, one per section (`checks`).

    from opsd_megatron.config import load_config, ConfigError
    cfg = load_config("examples/qwen3_1.7b_opsd.yaml", ["train.steps=10"])

Importing this package needs neither torch nor Megatron: the CLIs check a config before anything heavy loads.
"""

from opsd_megatron.config.schema import *  # noqa: F401,F403  (phase-1 re-export; narrowed below)
from opsd_megatron.config.schema import _literal_fields  # noqa: F401
