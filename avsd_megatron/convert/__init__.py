"""HF Qwen3 <-> Megatron-Core checkpoint conversion and live HF-weight export, built on one parameter table.

| module           | what it gives                                                                                 |
|------------------|-----------------------------------------------------------------------------------------------|
| `qwen3_config`   | `qwen3_config_to_transformer_config`, `qwen3_gpt_model_kwargs`, `Qwen3Dims`, `padded_vocab_size` |
| `mapping`        | the HF <-> Megatron name table (`LAYER_MAPPINGS`, `GLOBAL_MAPPINGS`) and its layout rules        |
| `safetensors_io` | per-tensor reader (`safe_open`), shard writer (hub's plan, `save_file`), tokenizer/config copy |
| `dist_ckpt`      | streaming `torch_dist` writer, region reader, `load_megatron_checkpoint` (the trainer's load)  |
| `convert`        | `convert_hf_to_megatron`, `convert_megatron_to_hf` (files, atomic output directories)          |
| `fingerprint`    | `hf_fingerprint`: what a conversion was made from (recorded in hf_conversion.json)             |
| `export`         | `export_hf_weights(model, hf_config, tp_group=, pp_group=)` (in-memory, for rollout refits)    |

The CLI is `tools/convert_checkpoint.py`. Importing this package does not import Megatron.
"""

from avsd_megatron.convert.convert import (
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    iter_hf_weights_from_checkpoint,
)
from avsd_megatron.convert.dist_ckpt import (
    TorchDistReader,
    load_megatron_checkpoint,
    read_conversion_metadata,
    write_conversion_metadata,
)
from avsd_megatron.convert.export import export_hf_weights
from avsd_megatron.convert.fingerprint import hf_fingerprint
from avsd_megatron.convert.qwen3_config import (
    Qwen3Dims,
    padded_vocab_size,
    qwen3_config_to_transformer_config,
    qwen3_gpt_model_kwargs,
    read_hf_config,
)

__all__ = [
    "Qwen3Dims",
    "TorchDistReader",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "export_hf_weights",
    "hf_fingerprint",
    "iter_hf_weights_from_checkpoint",
    "load_megatron_checkpoint",
    "padded_vocab_size",
    "qwen3_config_to_transformer_config",
    "qwen3_gpt_model_kwargs",
    "read_conversion_metadata",
    "read_hf_config",
    "write_conversion_metadata",
]
