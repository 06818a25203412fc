"""Full logical parameters <-> one rank's TP/PP shard of a Megatron `GPTModel`.

`load_full_state_into` scatters a full state into a rank-local model; `gather_full_state` assembles it back.

A *full state* is `{name: tensor}` keyed by the parameter names of the same model built at TP=1, PP=1
(`embedding.word_embeddings.weight`, `decoder.layers.{i}.self_attention.linear_qkv.weight`, ...). Parameters only:
no buffers, no `_extra_state`. Use it to give every parallel layout the same weights (the reference run gathers,
the others load) and to compare parameters or gradients across layouts.

Sharding rules come from the attributes Megatron sets on each parameter (`tensor_parallel/layers.py`,
`set_tensor_model_parallel_attributes`), not from a name table:
- `tensor_model_parallel=False`: replicated (norms, QK-norms).
- `tensor_model_parallel=True, partition_dim=d, partition_stride=s`: the full tensor is cut along `d` into
  `tp * s` equal chunks and rank r holds chunks `r, r + tp, ..., r + (s-1) tp`, concatenated. s=1 for the embedding,
  `linear_qkv` (whose rows are already grouped per KV group, so a contiguous slice is whole groups), `output_layer`,
  `linear_proj`/`linear_fc2` (d=1); s=2 for the SwiGLU `linear_fc1` = [gate; up], so each rank gets
  [gate_r; up_r] - exactly `MLP`'s `fc1_stride = 2` and `_initialize_affine_weight_cpu`'s split.
- PP: a stage's `decoder.layers.{j}` is global layer `layer.layer_number - 1` (Megatron's offset, 1-based).
- Tied embeddings (`share_embeddings_and_output_weights`) with PP > 1: the last stage's `output_layer.weight` is a copy
  of `embedding.word_embeddings.weight`; it is loaded from that key and skipped when gathering.

Collectives (`gather_full_state` only): one `all_gather` per TP-sharded tensor on `tp_group`, then one
`all_gather_object` of the stage's dict on `pp_group`. `None` for a group means that dimension has one rank.
Meant for tiny test models: the whole model ends up on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["gather_full_state", "load_full_state_into"]

_TIED_OUTPUT = "output_layer.weight"
_EMBEDDING = "embedding.word_embeddings.weight"


def load_full_state_into(model: torch.nn.Module, full_state: dict[str, Tensor], *, tp_group=None) -> None:
    """Copy this rank's shard of every parameter of `model` (GPTModel, or DDP/Float16Module-wrapped) from `full_state`.

    Load before building a Megatron optimizer: with bf16/fp16 params its fp32 main params are copies made at
    construction (`optimizer.reload_model_params()` refreshes them); with fp32 params they are views and follow.

    Args:
        model: the rank-local model; its parameters are overwritten in place (under `torch.no_grad`).
        full_state: TP1PP1 names -> full tensors; keys of other pipeline stages are ignored.
        tp_group: the tensor-parallel group (rank and size are read from it); None for TP=1.
    Raises:
        KeyError: a parameter of `model` has no entry in `full_state` (the message names both names).
        ValueError: a full tensor's shape does not match the parameter's shape times the TP split.
    """
    tp_rank, tp_size = _rank_and_size(tp_group)
    gpt = _unwrap(model)
    with torch.no_grad():
        for local_name, param in gpt.named_parameters():
            name = _full_name(gpt, local_name)
            if name is None:
                name = _EMBEDDING  # tied output copy on the last PP stage
            if name not in full_state:
                raise KeyError(f"full_state has no {name!r} (for this rank's parameter {local_name!r})")
            shard = _shard(full_state[name], param, tp_rank, tp_size)
            if shard.shape != param.shape:
                raise ValueError(
                    f"full_state[{name!r}] has shape {tuple(full_state[name].shape)}; its TP shard "
                    f"{tuple(shard.shape)} (rank {tp_rank} of {tp_size}) does not match {local_name!r} "
                    f"{tuple(param.shape)}"
                )
            param.copy_(shard)


def gather_full_state(
    model: torch.nn.Module, *, tp_group=None, pp_group=None, grads: bool = False
) -> dict[str, Tensor]:
    """Assemble the full logical parameters (or their gradients) of a TP/PP-sharded model on every rank.

    Args:
        model: the rank-local model (GPTModel, or DDP/Float16Module-wrapped).
        tp_group / pp_group: tensor- and pipeline-parallel groups of this rank; None for size 1.
        grads: gather `param.main_grad` (DDP) or `param.grad` instead of the values; a parameter without a gradient
            is left out. Gradients are taken as they are: anything Megatron reduces in `finalize_model_grads`
            (QK-norm grads summed over TP, tied-embedding grads summed over first/last stage) is only complete
            after it has run.
    Returns:
        {TP1PP1 name: full tensor}, detached CPU tensors, identical on every rank of the TP x PP grid.
    """
    gpt = _unwrap(model)
    stage: dict[str, Tensor] = {}
    for local_name, param in gpt.named_parameters():
        name = _full_name(gpt, local_name)
        if name is None:
            continue  # tied output copy: the first stage's embedding is the full tensor
        value = param
        if grads:
            value = getattr(param, "main_grad", None)
            if value is None:
                value = param.grad
            if value is None:
                continue
        stage[name] = _unshard(value.detach(), param, tp_group).cpu()
    if pp_group is None or dist.get_world_size(pp_group) == 1:
        return stage
    stages: list[dict[str, Tensor] | None] = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(stages, stage, group=pp_group)
    full: dict[str, Tensor] = {}
    for part in stages:
        full.update(part)
    return full


def _rank_and_size(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    from megatron.core.utils import unwrap_model

    return unwrap_model(model)


def _full_name(gpt: torch.nn.Module, local_name: str) -> str | None:
    """TP1PP1 name of a local parameter; None for the tied output-layer copy on the last PP stage."""
    if local_name == _TIED_OUTPUT and getattr(gpt, "share_embeddings_and_output_weights", False):
        return None
    prefix = "decoder.layers."
    if not local_name.startswith(prefix):
        return local_name
    local_index, rest = local_name[len(prefix) :].split(".", 1)
    global_index = gpt.decoder.layers[int(local_index)].layer_number - 1  # layer_number is global and 1-based
    return f"{prefix}{global_index}.{rest}"


def _split_spec(param: Tensor) -> tuple[int, int] | None:
    """(partition_dim, stride) of a TP-sharded parameter, None if replicated."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return param.partition_dim, getattr(param, "partition_stride", 1)


def _shard(full: Tensor, param: Tensor, tp_rank: int, tp_size: int) -> Tensor:
    """Rank `tp_rank`'s shard of `full`: chunks tp_rank, tp_rank + tp, ... of tp*stride along partition_dim."""
    spec = _split_spec(param)
    if spec is None or tp_size == 1:
        return full
    dim, stride = spec
    if full.shape[dim] % (tp_size * stride) != 0:
        raise ValueError(
            f"full tensor of shape {tuple(full.shape)} cannot be cut into tp*stride={tp_size}*{stride} chunks "
            f"along dim {dim}"
        )
    chunks = torch.chunk(full, tp_size * stride, dim=dim)
    return torch.cat(chunks[tp_rank::tp_size], dim=dim)


def _unshard(local: Tensor, param: Tensor, tp_group) -> Tensor:
    """Inverse of `_shard`: all_gather the TP shards and put the stride chunks back in order."""
    spec = _split_spec(param)
    _, tp_size = _rank_and_size(tp_group)
    if spec is None or tp_size == 1:
        return local
    dim, stride = spec
    shards = [torch.empty_like(local) for _ in range(tp_size)]
    dist.all_gather(shards, local.contiguous(), group=tp_group)
    per_rank = [torch.chunk(shard, stride, dim=dim) for shard in shards]  # [tp][stride]
    ordered = [per_rank[k % tp_size][k // tp_size] for k in range(tp_size * stride)]
    return torch.cat(ordered, dim=dim)
