"""Output-layer work at completion positions only: the `GPTModel.forward(output_processor=...)` helpers.

megatron-core >= 0.19 lets a caller replace `GPTModel._postprocess`'s output layer + loss with its own callable: on
the last pipeline stage `output_processor(hidden_states=[S, R, H], output_layer=..., output_weight=..., context=...,
scale_logits=..., ...)` receives the decoder's final hidden states (after the final norm) and its return value is
the model's output. AVSD needs logits only where a completion token is predicted (`AVSDMicroBatch` gather
indices), so both the student pass and the teacher scoring pass select those N (or M * N) rows before the output
layer: [N, V/tp] instead of [S * R, V/tp] logits.

Tensor parallelism of the selection:
* without sequence parallelism every TP rank holds all S positions: select rows, then call the model's own
  `output_layer` (a `ColumnParallelLinear`; its backward all-reduces the input gradient over TP as usual);
* with sequence parallelism rank r holds positions [r S/tp, (r+1) S/tp): all-gather the sequence first
  (`gather_from_sequence_parallel_region`, backward = reduce-scatter of the per-rank partial input gradients),
  select, and multiply by the local weight shard directly (calling the layer would all-gather its input again).
  Checked on CPU against the non-SP branch with a real `ColumnParallelLinear` (tests/hook/test_avsd_step.py); a whole
  model with sequence parallelism needs Apex or TE norms, so it has not run end to end here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "CompletionLogits",
    "completion_hidden_states",
    "completion_logits",
    "output_weight_of",
    "project_to_logits",
]


@dataclass(frozen=True)
class CompletionLogits:
    """The student pass's model output on the last stage: logits at the completion-predicting positions.

    Wrapped in a dataclass so that `Float16Module` (bf16 training) hands it through unchanged instead of upcasting
    the [N, V/tp] tensor to fp32 (it converts bare tensors only); the loss upcasts chunk by chunk itself.

    Attributes:
        logits: [N, V/tp] model dtype, vocab-sharded, with grad.
    """

    logits: torch.Tensor


def output_weight_of(output_layer: torch.nn.Module, output_weight: torch.Tensor | None) -> torch.Tensor:
    """The [V/tp, H] output weight shard: the tied embedding weight if Megatron passed one, else the layer's."""
    return output_weight if output_weight is not None else output_layer.weight


def completion_hidden_states(
    hidden_states: torch.Tensor, gather_index: torch.Tensor, *, sequence_parallel: bool, tp_group: Any
) -> torch.Tensor:
    """Rows of the final hidden states at the completion-predicting positions.

    Args:
        hidden_states: [S, R, H] (or [S/tp, R, H] under sequence parallelism) final hidden states.
        gather_index: [K] int64 flat indices `position * R + row` (`StreamInputs.gather_index`).
        sequence_parallel: the output layer's `sequence_parallel` flag.
        tp_group: tensor-parallel group (used only under sequence parallelism).
    Returns:
        [K, H] in the hidden states' dtype, differentiable.
    Collectives:
        sequence parallel only: one all-gather of [S, R, H] over `tp_group` (backward: one reduce-scatter).
    """
    if sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        hidden_states = gather_from_sequence_parallel_region(
            hidden_states, tensor_parallel_output_grad=True, group=tp_group
        )  # [S, R, H]
    seq, rows, hidden = hidden_states.shape
    index = gather_index.to(hidden_states.device)  # out-of-range indices raise in index_select
    return hidden_states.reshape(seq * rows, hidden).index_select(0, index)  # [K, H]


def project_to_logits(
    selected: torch.Tensor,
    output_layer: torch.nn.Module,
    output_weight: torch.Tensor | None,
    *,
    scale_logits: Any = None,
) -> torch.Tensor:
    """Vocab-sharded logits of already selected hidden rows (from `completion_hidden_states`).

    Args:
        selected: [K, H] final hidden states at completion-predicting positions.
        output_layer: the model's `ColumnParallelLinear` output layer (vocab-parallel, no bias).
        output_weight: the tied embedding weight Megatron passes with shared embeddings, else None.
        scale_logits: Megatron's `_scale_logits` (MuP output scaling; identity otherwise), or None.
    Returns:
        [K, V/tp] logits in the model dtype, differentiable w.r.t. `selected` and the weight.
    Collectives:
        forward none; backward: without sequence parallelism the layer all-reduces the input gradient over TP
        (Megatron's `ColumnParallelLinear`); with it, the reduce-scatter of `completion_hidden_states` does.
    """
    if getattr(output_layer, "sequence_parallel", False):
        logits = torch.matmul(selected, output_weight_of(output_layer, output_weight).t())  # [K, V/tp]
    else:
        logits, _ = output_layer(selected.unsqueeze(1), weight=output_weight, runtime_gather_output=False)
        logits = logits.squeeze(1)  # [K, 1, V/tp] -> [K, V/tp]
    if scale_logits is not None:
        logits = scale_logits(logits)
    return logits


def completion_logits(
    hidden_states: torch.Tensor,
    output_layer: torch.nn.Module,
    output_weight: torch.Tensor | None,
    gather_index: torch.Tensor,
    *,
    tp_group: Any,
    scale_logits: Any = None,
) -> torch.Tensor:
    """Vocab-sharded logits at the completion-predicting positions only: select, then project.

    Args:
        hidden_states, gather_index, tp_group: as in `completion_hidden_states`.
        output_layer, output_weight, scale_logits: as in `project_to_logits`.
    Returns:
        [K, V/tp] logits in the model dtype, differentiable w.r.t. hidden states and the weight.
    """
    selected = completion_hidden_states(
        hidden_states,
        gather_index,
        sequence_parallel=bool(getattr(output_layer, "sequence_parallel", False)),
        tp_group=tp_group,
    )  # [K, H]
    return project_to_logits(selected, output_layer, output_weight, scale_logits=scale_logits)
