"""Live export of a TP/PP-sharded Megatron Qwen3 model as HF tensors: `export_hf_weights`, for rollout-engine refits.

It walks the same table, in the same order, as the file export (`convert_megatron_to_hf`), so a rollout engine that
loads `export_hf_weights(model, ...)` gets exactly the tensors an HF directory written from the same weights holds.

Collectives (all on the groups passed in; `None` means that dimension has one rank and nothing is communicated):

    =========================  =================================================  ==================================
    op                         tensor                                             group
    =========================  =================================================  ==================================
    all_gather_object (once)   which (key, layer) each stage holds, with dtypes   pp_group
    all_gather (per tensor)    this rank's TP shard of each non-replicated param  tp_group
    broadcast (per HF tensor)  the HF tensor, from the stage that holds it        pp_group
    =========================  =================================================  ==================================
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from avsd_megatron.convert.dist_ckpt import unwrap_model
from avsd_megatron.convert.mapping import (
    GLOBAL_MAPPINGS,
    LAYER_MAPPINGS,
    LOCAL_SPEC_NAMES,
    ParamMapping,
    expected_hf_shapes,
    gather_tp_shards,
    hf_names,
    model_mappings,
    to_hf,
)
from avsd_megatron.convert.qwen3_config import Qwen3Dims

__all__ = ["export_hf_weights", "local_megatron_params"]

Slot = tuple[str, int | None]  # (Megatron name of the mapping, global layer index or None)


def _layer_param(layer: torch.nn.Module, name: str) -> Tensor:
    """A layer's parameter by TE / checkpoint name, falling back to the local-spec name of the fused norms."""
    for candidate in (name, LOCAL_SPEC_NAMES.get(name)):
        if candidate is None:
            continue
        try:
            return layer.get_parameter(candidate)
        except AttributeError:
            pass
    raise KeyError(
        f"{type(layer).__name__} (layer_number={getattr(layer, 'layer_number', '?')}) has no parameter {name!r}"
        + (f" nor {LOCAL_SPEC_NAMES[name]!r}" if name in LOCAL_SPEC_NAMES else "")
    )


def local_megatron_params(
    model: torch.nn.Module | Sequence[torch.nn.Module], tie_word_embeddings: bool
) -> dict[Slot, Tensor]:
    """This rank's parameters (its TP shards) by (mapping name, global layer): works for TE and local layer specs.

    Global layer indices come from each layer's `layer_number` (1-based, PP/VPP offsets included).
    """
    chunks = [unwrap_model(c) for c in (model if isinstance(model, Sequence) else [model])]
    params: dict[Slot, Tensor] = {}
    embedding, final_norm, output = GLOBAL_MAPPINGS
    for chunk in chunks:
        if getattr(chunk, "pre_process", False):
            params[(embedding.megatron, None)] = chunk.embedding.word_embeddings.weight
        for layer in chunk.decoder.layers:
            index = layer.layer_number - 1
            for mapping in LAYER_MAPPINGS:
                params[(mapping.megatron, index)] = _layer_param(layer, mapping.megatron)
        if getattr(chunk, "post_process", False):
            params[(final_norm.megatron, None)] = chunk.decoder.final_layernorm.weight
            if not tie_word_embeddings:
                params[(output.megatron, None)] = chunk.output_layer.weight
    return params


def _group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _gather_tp(mapping: ParamMapping, local: Tensor, tp_group: dist.ProcessGroup | None) -> Tensor:
    """The global Megatron tensor from every TP rank's shard (one all_gather on tp_group; none if replicated)."""
    size = _group_size(tp_group)
    if size == 1 or mapping.rule == "replicate":
        return local.detach()
    local = local.detach().contiguous()
    shards = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(shards, local, group=tp_group)
    return gather_tp_shards(mapping, shards)


def _owners(params: Mapping[Slot, Tensor], pp_group: dist.ProcessGroup | None) -> dict[Slot, tuple[int, torch.dtype]]:
    """Slot -> (pp rank holding it, its dtype), agreed by all stages (one all_gather_object on pp_group)."""
    mine = {slot: str(p.dtype).removeprefix("torch.") for slot, p in params.items()}
    if _group_size(pp_group) == 1:
        gathered = [mine]
    else:
        gathered = [None] * _group_size(pp_group)
        dist.all_gather_object(gathered, mine, group=pp_group)
    owners: dict[Slot, tuple[int, torch.dtype]] = {}
    for rank, held in enumerate(gathered):
        for slot, dtype in held.items():
            owners.setdefault(slot, (rank, getattr(torch, dtype)))
    return owners


def export_hf_weights(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    hf_config: Mapping[str, Any] | Any,
    *,
    tp_group: dist.ProcessGroup | None,
    pp_group: dist.ProcessGroup | None,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Yield (HF name, full tensor) for the whole model on every rank of the TP x PP grid, in HF file order.

    Collective: every rank of `tp_group` x `pp_group` must iterate the generator to the end together (module table).
    Each data-parallel replica can export independently with its own groups.

    Args:
        model: this rank's `GPTModel` (wrappers with `.module` are fine) or its list of virtual-pipeline chunks;
            TE or local layer spec.
        hf_config: the HF config.json the model was built from (V before padding, head layout, tying).
        tp_group / pp_group: the model's tensor / pipeline parallel groups; None for size 1.
        dtype: cast every tensor to it (default: the parameter dtype).
    Yields:
        (name, tensor): tensor shaped as in the HF checkpoint (vocab padding stripped), on the parameters' device,
        detached; tied models yield no `lm_head.weight`, as HF files of tied models have none.
    Raises:
        RuntimeError: a tensor of the config is held by no pipeline stage (model and config disagree).
    """
    dims = Qwen3Dims.from_hf_config(hf_config)
    params = local_megatron_params(model, dims.tie_word_embeddings)
    owners = _owners(params, pp_group)
    device = next(iter(params.values())).device if params else torch.device("cpu")
    pp_rank = 0 if pp_group is None else dist.get_rank(pp_group)
    shapes = expected_hf_shapes(dims)
    for mapping, layer in model_mappings(dims):
        slot = (mapping.megatron, layer)
        if slot not in owners:
            raise RuntimeError(
                f"no pipeline stage holds {mapping.megatron}" + (f" of layer {layer}" if layer is not None else "")
                + f"; does the model match the HF config (num_hidden_layers={dims.num_layers}, "
                f"tie_word_embeddings={dims.tie_word_embeddings})?"
            )
        owner, param_dtype = owners[slot]
        names = hf_names(mapping, layer)
        if owner == pp_rank:
            full = _gather_tp(mapping, params[slot], tp_group)
            tensors = [t.contiguous() for t in to_hf(mapping, full, dims)]
        else:
            tensors = [torch.empty(shapes[name], dtype=param_dtype, device=device) for name in names]
        for name, tensor in zip(names, tensors):
            if _group_size(pp_group) > 1:
                dist.broadcast(tensor, group=pp_group, group_src=owner)
            yield name, tensor if dtype is None else tensor.to(dtype)
