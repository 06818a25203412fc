"""The HF Qwen3 <-> Megatron-Core parameter table and its layout rules; every conversion path uses these.

Names. Megatron names below are the distributed-checkpoint keys, which are also the Transformer-Engine module
names (TE fuses the pre-attention / pre-MLP RMSNorm into `linear_qkv` / `linear_fc1`). The local layer spec
(`get_gpt_layer_local_spec`, used on CPU) keeps those norms as separate modules; `LOCAL_SPEC_NAMES` gives its names,
and Megatron's own `sharded_state_dict_keys_map` maps them to the same checkpoint keys. Per-layer entries are
relative to `decoder.layers.<i>.` (Megatron) and `model.layers.<i>.` (HF); a dist checkpoint stacks the layers of a
key into one global tensor [L, ...] (one chunk per layer).

Rules (how one Megatron tensor is made of HF tensors, and how it is split over TP ranks):

    =========  ======================================================  ============================================
    rule       Megatron tensor (global, unsharded)                     TP sharding of the Megatron tensor
    =========  ======================================================  ============================================
    replicate  = the HF tensor (RMSNorm weights)                        replicated
    row        = the HF tensor [H, in]                                  dim 1 (row-parallel: o_proj, down_proj)
    vocab      = the HF tensor, zero rows appended up to padded V       dim 0 (vocab-parallel)
    gate_up    = cat([gate, up], dim 0): [2F, H]                        dim 0 of gate and of up separately: rank r
                                                                        holds [gate_r; up_r]
    qkv        per query group g: [q heads of g; k_g; v_g], stacked     dim 0, whole query groups per rank
               over groups: [ng * (nh/ng + 2) * d, H]
    =========  ======================================================  ============================================
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from avsd_megatron.convert.qwen3_config import Qwen3Dims

__all__ = [
    "GLOBAL_MAPPINGS",
    "LAYER_MAPPINGS",
    "LOCAL_SPEC_NAMES",
    "LINEAR_MODULES",
    "ParamMapping",
    "expected_hf_shapes",
    "gather_tp_shards",
    "hf_names",
    "hf_tensor_order",
    "is_per_layer",
    "megatron_key",
    "megatron_shape",
    "model_mappings",
    "split_tp_shard",
    "to_hf",
    "to_megatron",
]

Rule = Literal["replicate", "row", "vocab", "gate_up", "qkv"]


@dataclass(frozen=True)
class ParamMapping:
    """One Megatron tensor and the HF tensor(s) it is made of."""

    megatron: str
    """Dist-checkpoint key / TE parameter name; relative to `decoder.layers.<i>.` for per-layer entries."""
    hf: tuple[str, ...]
    """HF names, in the order the rule concatenates them; relative to `model.layers.<i>.` for per-layer entries."""
    rule: Rule
    """Layout rule (module table)."""


GLOBAL_MAPPINGS: tuple[ParamMapping, ...] = (
    ParamMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    ParamMapping("decoder.final_layernorm.weight", ("model.norm.weight",), "replicate"),
    ParamMapping("output_layer.weight", ("lm_head.weight",), "vocab"),  # untied models only
)
LAYER_MAPPINGS: tuple[ParamMapping, ...] = (
    ParamMapping("self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",), "replicate"),
    ParamMapping(
        "self_attention.linear_qkv.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "qkv",
    ),
    ParamMapping("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), "replicate"),
    ParamMapping("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), "replicate"),
    ParamMapping("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "row"),
    ParamMapping("mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",), "replicate"),
    ParamMapping("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    ParamMapping("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "row"),
)
LOCAL_SPEC_NAMES: dict[str, str] = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
"""TE / checkpoint name -> parameter name in a layer built with the local spec (the only two that differ)."""
LINEAR_MODULES: tuple[str, ...] = (
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
"""Per-layer modules whose (empty, non-fp8) `_extra_state` Megatron stores as a ShardedObject."""

_LAYER_PREFIX_MEGATRON = "decoder.layers."
_LAYER_PREFIX_HF = "model.layers."


def is_per_layer(mapping: ParamMapping) -> bool:
    """True for the entries of `LAYER_MAPPINGS` (one tensor per transformer layer)."""
    return mapping in LAYER_MAPPINGS


def megatron_key(mapping: ParamMapping) -> str:
    """Full dist-checkpoint key; per-layer keys carry no layer index (the layer is axis 0 of the global tensor)."""
    return _LAYER_PREFIX_MEGATRON + mapping.megatron if is_per_layer(mapping) else mapping.megatron


def hf_names(mapping: ParamMapping, layer: int | None = None) -> tuple[str, ...]:
    """Full HF names of `mapping` (for layer `layer` when per-layer)."""
    if is_per_layer(mapping):
        if layer is None:
            raise ValueError(f"{mapping.megatron} is a per-layer tensor: pass its layer index")
        return tuple(f"{_LAYER_PREFIX_HF}{layer}.{name}" for name in mapping.hf)
    return mapping.hf


def model_mappings(dims: Qwen3Dims) -> Iterator[tuple[ParamMapping, int | None]]:
    """(mapping, layer) for every Megatron tensor of the model, in HF file order: embedding, layers, norm, head."""
    yield GLOBAL_MAPPINGS[0], None
    for layer in range(dims.num_layers):
        for mapping in LAYER_MAPPINGS:
            yield mapping, layer
    yield GLOBAL_MAPPINGS[1], None
    if not dims.tie_word_embeddings:
        yield GLOBAL_MAPPINGS[2], None


def hf_tensor_order(dims: Qwen3Dims) -> list[str]:
    """Every HF tensor name of the model in the order all exports emit them."""
    return [name for mapping, layer in model_mappings(dims) for name in hf_names(mapping, layer)]


def expected_hf_shapes(dims: Qwen3Dims) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for this config (lm_head only when untied)."""
    H, F, d = dims.hidden_size, dims.ffn_hidden_size, dims.head_dim
    q_rows, kv_rows = dims.num_attention_heads * d, dims.num_query_groups * d
    per_layer = {
        "input_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (q_rows, H),
        "self_attn.k_proj.weight": (kv_rows, H),
        "self_attn.v_proj.weight": (kv_rows, H),
        "self_attn.q_norm.weight": (d,),
        "self_attn.k_norm.weight": (d,),
        "self_attn.o_proj.weight": (H, q_rows),
        "post_attention_layernorm.weight": (H,),
        "mlp.gate_proj.weight": (F, H),
        "mlp.up_proj.weight": (F, H),
        "mlp.down_proj.weight": (H, F),
    }
    shapes = {"model.embed_tokens.weight": (dims.vocab_size, H), "model.norm.weight": (H,)}
    if not dims.tie_word_embeddings:
        shapes["lm_head.weight"] = (dims.vocab_size, H)
    for layer in range(dims.num_layers):
        for name, shape in per_layer.items():
            shapes[f"{_LAYER_PREFIX_HF}{layer}.{name}"] = shape
    return shapes


def megatron_shape(mapping: ParamMapping, dims: Qwen3Dims, padded_vocab: int) -> tuple[int, ...]:
    """Shape of one (unsharded) Megatron tensor; per-layer tensors without the stacked layer axis."""
    H, F, d = dims.hidden_size, dims.ffn_hidden_size, dims.head_dim
    if mapping.rule == "vocab":
        return (padded_vocab, H)
    if mapping.rule == "qkv":
        return ((dims.num_attention_heads + 2 * dims.num_query_groups) * d, H)
    if mapping.rule == "gate_up":
        return (2 * F, H)
    return expected_hf_shapes(dims)[hf_names(mapping, 0 if is_per_layer(mapping) else None)[0]]


# ----------------------------------------------------------------------------------------------------------------
# Layout rules: HF tensors <-> one global Megatron tensor


def to_megatron(mapping: ParamMapping, hf_tensors: Sequence[Tensor], dims: Qwen3Dims, padded_vocab: int) -> Tensor:
    """The global Megatron tensor made of `hf_tensors` (ordered as `mapping.hf`), shapes as in `expected_hf_shapes`."""
    if len(hf_tensors) != len(mapping.hf):
        raise ValueError(f"{mapping.megatron}: expected {len(mapping.hf)} HF tensors, got {len(hf_tensors)}")
    if mapping.rule in ("replicate", "row"):
        return hf_tensors[0]
    if mapping.rule == "vocab":
        (weight,) = hf_tensors  # [V, H]
        if padded_vocab == weight.shape[0]:
            return weight
        padded = weight.new_zeros((padded_vocab, weight.shape[1]))  # [Vp, H], padding rows stay zero
        padded[: weight.shape[0]] = weight
        return padded
    if mapping.rule == "gate_up":
        return torch.cat(list(hf_tensors), dim=0)  # [2F, H]
    q, k, v = hf_tensors
    ng, d, H = dims.num_query_groups, dims.head_dim, dims.hidden_size
    fused = torch.cat(
        [q.reshape(ng, dims.heads_per_group * d, H), k.reshape(ng, d, H), v.reshape(ng, d, H)], dim=1
    )  # [ng, (nh/ng + 2) * d, H]
    return fused.reshape(-1, H)


def to_hf(mapping: ParamMapping, megatron: Tensor, dims: Qwen3Dims) -> tuple[Tensor, ...]:
    """Inverse of `to_megatron`: the HF tensors (views where possible) of one global Megatron tensor."""
    if mapping.rule in ("replicate", "row"):
        return (megatron,)
    if mapping.rule == "vocab":
        if megatron.shape[0] < dims.vocab_size:
            raise ValueError(
                f"{mapping.megatron}: {megatron.shape[0]} rows < config vocab_size={dims.vocab_size}"
            )
        return (megatron[: dims.vocab_size],)  # strip Megatron's padding rows
    if mapping.rule == "gate_up":
        gate, up = megatron.chunk(2, dim=0)  # [F, H] each
        return gate, up
    ng, d, H = dims.num_query_groups, dims.head_dim, dims.hidden_size
    grouped = megatron.reshape(ng, (dims.heads_per_group + 2) * d, H)
    q, k, v = grouped.split([dims.heads_per_group * d, d, d], dim=1)
    return q.reshape(-1, H), k.reshape(-1, H), v.reshape(-1, H)


def split_tp_shard(mapping: ParamMapping, megatron: Tensor, tp_rank: int, tp_size: int) -> Tensor:
    """TP rank `tp_rank`'s shard of a global Megatron tensor (module table); replicated tensors come back whole."""
    if mapping.rule == "replicate":
        return megatron
    if mapping.rule == "row":
        return megatron.chunk(tp_size, dim=1)[tp_rank]
    if mapping.rule == "gate_up":
        gate, up = megatron.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    return megatron.chunk(tp_size, dim=0)[tp_rank]  # vocab, qkv (whole query groups per rank)


def gather_tp_shards(mapping: ParamMapping, shards: Sequence[Tensor]) -> Tensor:
    """Inverse of `split_tp_shard`: the global Megatron tensor from every TP rank's shard, in rank order."""
    if mapping.rule == "replicate":
        return shards[0]
    if mapping.rule == "row":
        return torch.cat(list(shards), dim=1)
    if mapping.rule == "gate_up":
        halves = [shard.chunk(2, dim=0) for shard in shards]  # rank r: ([F/tp, H], [F/tp, H])
        return torch.cat([gate for gate, _ in halves] + [up for _, up in halves], dim=0)
    return torch.cat(list(shards), dim=0)
