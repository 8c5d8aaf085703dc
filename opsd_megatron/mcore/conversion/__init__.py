"""HF <-> Megatron conversion: declarative name maps + named transforms, streamed both ways.

load_hf_weights(chunks, hf_dir)                         # HF safetensors -> this rank's shards
for name, t in export_hf_weights(chunks, shard_hook=None): ...   # full HF tensors on every rank
save_hf_checkpoint(chunks, out_dir, tokenizer_dir=hf_dir)       # loadable by transformers
save_megatron_checkpoint(chunks, ckpt_dir) / load_megatron_checkpoint(chunks, ckpt_dir)
param_maps(chunks) -> list[ParamMap]                    # Megatron param -> (hf names, transform)
"""

from opsd_megatron.mcore.conversion.export import export_hf_weights
from opsd_megatron.mcore.conversion.hf_checkpoint import save_hf_checkpoint
from opsd_megatron.mcore.conversion.load import SafetensorsReader, load_hf_weights
from opsd_megatron.mcore.conversion.mapping import NAME_MAPS, TP_DIM, ParamMap, hf_shape, map_name, param_maps
from opsd_megatron.mcore.conversion.megatron_checkpoint import (
    check_compatible,
    load_megatron_checkpoint,
    model_sharded_state_dict,
    read_checkpoint_metadata,
    save_megatron_checkpoint,
)
from opsd_megatron.mcore.conversion.transforms import hf_to_shard, shards_to_hf

__all__ = [
    "NAME_MAPS",
    "TP_DIM",
    "ParamMap",
    "SafetensorsReader",
    "check_compatible",
    "export_hf_weights",
    "hf_shape",
    "hf_to_shard",
    "load_hf_weights",
    "load_megatron_checkpoint",
    "map_name",
    "model_sharded_state_dict",
    "param_maps",
    "read_checkpoint_metadata",
    "save_hf_checkpoint",
    "save_megatron_checkpoint",
    "shards_to_hf",
]
