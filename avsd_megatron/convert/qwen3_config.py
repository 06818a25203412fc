"""HF Qwen3 `config.json` -> Megatron-Core `TransformerConfig` + `GPTModel` arguments: the one place that maps them.

The converter, the trainer and the tests all build a Qwen3 model from an HF config through these functions:

    dims = Qwen3Dims.from_hf_config(hf_config)            # validated shapes, no Megatron import
    config = qwen3_config_to_transformer_config(hf_config, tensor_model_parallel_size=tp, ...)
    model = GPTModel(config, layer_spec, **qwen3_gpt_model_kwargs(hf_config, tensor_model_parallel_size=tp))

Field mapping (HF `Qwen3Config` -> Megatron):

    ===========================  ===============================================  ==================================
    HF config.json               Megatron                                         note
    ===========================  ===============================================  ==================================
    num_hidden_layers            TransformerConfig.num_layers
    hidden_size                  hidden_size
    intermediate_size            ffn_hidden_size                                  SwiGLU: fc1 is [gate; up]
    num_attention_heads          num_attention_heads
    num_key_value_heads          num_query_groups                                 GQA; None -> num_attention_heads
    head_dim                     kv_channels                                      != hidden/heads for 0.6B, 4B
    rms_norm_eps                 layernorm_epsilon, normalization="RMSNorm"
    (always, Qwen3)              qk_layernorm=True, gated_linear_unit=True,       q_norm/k_norm, silu(gate) * up
                                 activation_func=silu, add_bias_linear=False,
                                 add_qkv_bias=False
    rope_parameters.rope_theta   GPTModel(rotary_base=...)                        transformers 5; older configs keep
      or rope_theta                                                               `rope_theta` at the top level
    max_position_embeddings      GPTModel(max_sequence_length=...)
    vocab_size                   GPTModel(vocab_size=padded)                      padded, see `padded_vocab_size`
    tie_word_embeddings          GPTModel(share_embeddings_and_output_weights)    tied: 0.6B/1.7B/4B
    ===========================  ===============================================  ==================================

Anything the mapping cannot represent (another architecture, attention biases, sliding windows, RoPE scaling, a
non-silu activation) raises `ValueError` naming the `config.json` field and value.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "QWEN3_ARCHITECTURE",
    "Qwen3Dims",
    "padded_vocab_size",
    "qwen3_config_to_transformer_config",
    "qwen3_gpt_model_kwargs",
    "read_hf_config",
]

QWEN3_ARCHITECTURE = "Qwen3ForCausalLM"
"""The only HF architecture this mapping accepts (dense Qwen3, 0.6B ... 32B)."""
QWEN3_MODEL_TYPE = "qwen3"
DEFAULT_VOCAB_DIVISIBLE_BY = 128
"""Megatron-LM's `--make-vocab-size-divisible-by` default; the padded vocab is a multiple of this times TP."""


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """Read `<hf_dir>/config.json` as a dict; `FileNotFoundError` names the path."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a local HF checkpoint directory needs a config.json (hub ids are "
                                "not downloaded)")
    with open(path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _as_dict(hf_config: Mapping[str, Any] | Any) -> Mapping[str, Any]:
    """Accept a config.json dict or a `transformers.PretrainedConfig` (anything with `to_dict()`)."""
    if isinstance(hf_config, Mapping):
        return hf_config
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(f"hf_config must be a config.json dict or a PretrainedConfig, got {type(hf_config).__name__}")


def _require(cfg: Mapping[str, Any], field: str) -> Any:
    if field not in cfg or cfg[field] is None:
        raise ValueError(f"config.json: required field {field!r} is missing")
    return cfg[field]


def _typed(cfg: Mapping[str, Any], field: str, kind: type, *, required: bool = True) -> Any:
    """cfg[field] checked to be a JSON integer (kind=int), number (float) or boolean (bool); a bool is no number
    and a float is no integer, so `"four"`, `4.5` or `true` for num_hidden_layers name the field instead of being
    cast silently or failing in int()."""
    value = _require(cfg, field) if required else cfg.get(field)
    if value is None:
        return None
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok:
        names = {int: "an integer", float: "a number", bool: "true or false"}
        raise ValueError(f"config.json: {field}={value!r} must be {names[kind]}")
    return kind(value)


def _rope_theta(cfg: Mapping[str, Any]) -> float:
    """RoPE base from `rope_parameters.rope_theta` (transformers 5) or top-level `rope_theta` (older files)."""
    top = cfg.get("rope_theta")
    params = cfg.get("rope_parameters")
    nested = None
    if params is not None:
        if not isinstance(params, Mapping):
            raise ValueError(f"config.json: rope_parameters={params!r} must be an object")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"config.json: rope_parameters.rope_type={rope_type!r} is not supported; only 'default' RoPE "
                "(no YaRN/linear/dynamic scaling) maps to Megatron's rotary_base"
            )
        nested = params.get("rope_theta")
    scaling = cfg.get("rope_scaling")
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ValueError(f"config.json: rope_scaling={scaling!r} is not supported; only 'default' RoPE maps")
    if top is not None and nested is not None and float(top) != float(nested):
        raise ValueError(
            f"config.json: rope_theta={top} and rope_parameters.rope_theta={nested} disagree; keep one of them"
        )
    theta = nested if nested is not None else top
    if theta is None:
        raise ValueError("config.json: no RoPE base: set rope_parameters.rope_theta (or rope_theta)")
    return float(theta)


@dataclass(frozen=True)
class Qwen3Dims:
    """The shapes and constants of one dense Qwen3 model, validated from its HF config.json."""

    num_layers: int
    """L, `num_hidden_layers`."""
    hidden_size: int
    """H."""
    ffn_hidden_size: int
    """F, `intermediate_size` (gate and up are each [F, H])."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """KV heads, `num_key_value_heads`; each group serves num_attention_heads / num_query_groups query heads."""
    head_dim: int
    """d, `head_dim` (Megatron `kv_channels`); need not equal H / heads."""
    vocab_size: int
    """V, the HF vocab (rows of embed_tokens / lm_head), before Megatron's padding."""
    tie_word_embeddings: bool
    """lm_head shares the embedding (no `lm_head.weight` tensor in the HF files, no `output_layer` in Megatron)."""
    rms_norm_eps: float
    """RMSNorm epsilon (all norms, QK-norm included)."""
    rope_theta: float
    """RoPE base."""
    max_position_embeddings: int
    """Longest sequence the model is configured for."""

    @classmethod
    def from_hf_config(cls, hf_config: Mapping[str, Any] | Any) -> "Qwen3Dims":
        """Validate a Qwen3 config.json (dict or `PretrainedConfig`) and return its dims.

        Raises:
            ValueError: not a dense Qwen3 (`architectures`/`model_type`), a required field missing, or a feature
                the Megatron mapping cannot represent; the message names the field and its value.
        """
        cfg = _as_dict(hf_config)
        archs = cfg.get("architectures")
        model_type = cfg.get("model_type")
        if (
            (archs is None and model_type is None)
            or (archs is not None and QWEN3_ARCHITECTURE not in archs)
            or (model_type is not None and model_type != QWEN3_MODEL_TYPE)
        ):
            raise ValueError(
                f"config.json: architectures={archs} (model_type={model_type!r}) is not supported; "
                f"this converter handles {QWEN3_ARCHITECTURE} (model_type={QWEN3_MODEL_TYPE!r}, dense Qwen3) only"
            )
        fixed = (("hidden_act", ("silu",)), ("attention_bias", (False,)), ("use_sliding_window", (False,)))
        for field, allowed in fixed:
            if field in cfg and cfg[field] not in allowed:
                raise ValueError(f"config.json: {field}={cfg[field]!r} is not supported; Qwen3 uses {allowed[0]!r}")
        heads = _typed(cfg, "num_attention_heads", int)
        hidden = _typed(cfg, "hidden_size", int)
        groups = _typed(cfg, "num_key_value_heads", int, required=False)
        head_dim = _typed(cfg, "head_dim", int, required=False)
        if heads < 1:
            raise ValueError(f"config.json: num_attention_heads={heads} must be >= 1")
        dims = cls(
            num_layers=_typed(cfg, "num_hidden_layers", int),
            hidden_size=hidden,
            ffn_hidden_size=_typed(cfg, "intermediate_size", int),
            num_attention_heads=heads,
            num_query_groups=groups if groups is not None else heads,
            head_dim=head_dim if head_dim is not None else hidden // heads,
            vocab_size=_typed(cfg, "vocab_size", int),
            tie_word_embeddings=_typed(cfg, "tie_word_embeddings", bool),
            rms_norm_eps=_typed(cfg, "rms_norm_eps", float),
            rope_theta=_rope_theta(cfg),
            max_position_embeddings=_typed(cfg, "max_position_embeddings", int),
        )
        for field in dataclasses.fields(dims):
            value = getattr(dims, field.name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise ValueError(f"config.json: {field.name}={value} must be >= 1")
        if heads % dims.num_query_groups != 0:
            raise ValueError(
                f"config.json: num_attention_heads={heads} is not a multiple of "
                f"num_key_value_heads={dims.num_query_groups}"
            )
        return dims

    @property
    def heads_per_group(self) -> int:
        """Query heads sharing one KV head."""
        return self.num_attention_heads // self.num_query_groups

    def check_parallel(self, tensor_model_parallel_size: int, pipeline_model_parallel_size: int) -> None:
        """Raise `ValueError` unless this model splits evenly over TP (heads, groups, F) and PP (layers)."""
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise ValueError(f"tensor_model_parallel_size={tp} and pipeline_model_parallel_size={pp} must be >= 1")
        for name, value in (
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_query_groups),
            ("intermediate_size", self.ffn_hidden_size),
        ):
            if value % tp != 0:
                raise ValueError(f"config.json: {name}={value} is not divisible by tensor_model_parallel_size={tp}")
        if self.num_layers % pp != 0:
            raise ValueError(
                f"config.json: num_hidden_layers={self.num_layers} is not divisible by "
                f"pipeline_model_parallel_size={pp}"
            )


def padded_vocab_size(
    vocab_size: int, tensor_model_parallel_size: int, divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY
) -> int:
    """Megatron-LM's rule: round V up to a multiple of `divisible_by * tp` (the embedding rows Megatron allocates).

    The padding rows are zeros in converted checkpoints and are stripped on export. A dist checkpoint stores the
    embedding with `allow_shape_mismatch`, so a model padded for another TP still loads it.
    """
    if vocab_size < 1 or tensor_model_parallel_size < 1 or divisible_by < 1:
        raise ValueError(
            f"vocab_size={vocab_size}, tensor_model_parallel_size={tensor_model_parallel_size} and "
            f"divisible_by={divisible_by} must all be >= 1"
        )
    multiple = divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def qwen3_config_to_transformer_config(
    hf_config: Mapping[str, Any] | Any,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    params_dtype: torch.dtype = torch.float32,
    overrides: Mapping[str, Any] | None = None,
):
    """The Megatron `TransformerConfig` of an HF Qwen3 config.json (see the module table).

    Args:
        hf_config: config.json dict or `transformers.PretrainedConfig`.
        tensor_model_parallel_size / pipeline_model_parallel_size: the run's TP / PP (checked for divisibility).
        params_dtype: parameter dtype; bf16 also sets `bf16=True`. `pipeline_dtype` follows it.
        overrides: further `TransformerConfig` fields set by the caller (sequence parallelism, recompute, CPU
            switches such as `use_cpu_initialization`); they replace the mapped values, so they must not touch the
            model shape (checked).
    Returns:
        `megatron.core.transformer.TransformerConfig`.
    Raises:
        ValueError: see `Qwen3Dims.from_hf_config`; TP/PP do not divide the model; an override changes a shape field.
    """
    from megatron.core.transformer import TransformerConfig

    dims = Qwen3Dims.from_hf_config(hf_config)
    dims.check_parallel(tensor_model_parallel_size, pipeline_model_parallel_size)
    fields: dict[str, Any] = dict(
        num_layers=dims.num_layers,
        hidden_size=dims.hidden_size,
        ffn_hidden_size=dims.ffn_hidden_size,
        num_attention_heads=dims.num_attention_heads,
        num_query_groups=dims.num_query_groups,
        kv_channels=dims.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=dims.rms_norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
    )
    free = {"params_dtype", "pipeline_dtype", "bf16", "fp16", "hidden_dropout", "attention_dropout"}
    shape_fields = set(fields) - free
    for key, value in (overrides or {}).items():
        if key in shape_fields and value != fields[key]:
            raise ValueError(
                f"overrides[{key!r}]={value!r} contradicts config.json ({fields[key]!r}); the model shape comes "
                "from the HF config only"
            )
        fields[key] = value
    return TransformerConfig(**fields)


def qwen3_gpt_model_kwargs(
    hf_config: Mapping[str, Any] | Any,
    *,
    tensor_model_parallel_size: int = 1,
    make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY,
) -> dict[str, Any]:
    """Keyword arguments for `GPTModel(config, layer_spec, **kwargs)` besides pre/post_process and parallel_output.

    Returns:
        dict with `vocab_size` (padded, see `padded_vocab_size`), `max_sequence_length`, `position_embedding_type`
        ("rope"), `rotary_percent` (1.0), `rotary_base` and `share_embeddings_and_output_weights`.
    """
    dims = Qwen3Dims.from_hf_config(hf_config)
    theta = dims.rope_theta
    return dict(
        vocab_size=padded_vocab_size(dims.vocab_size, tensor_model_parallel_size, make_vocab_size_divisible_by),
        max_sequence_length=dims.max_position_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(theta) if math.isclose(theta, round(theta)) else theta,
        share_embeddings_and_output_weights=dims.tie_word_embeddings,
    )
