"""Candidate sets from vocab-sharded logits (spec 2.3 steps 1-3, spec 7 rows "per-view top-k" to "candidate gather").

* `distributed_topk`: top-k of z^m / tau over the whole real vocabulary for all M views in one all-gather.
* `candidate_union`: the ordered union K_t (view order, then rank; y_t appended if absent; padded to Kc = M*k + 1
  with filler y_t and mask False), built with sort/scatter for all N tokens at once (no Python loop over tokens).
* `gather_candidate_logits`: z / tau at K_t for the student and every view in one all-reduce; the student's
  gradient scatters back into the ids this shard owns (no backward collective).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from avsd_megatron.vocab_parallel.checks import check_logits, check_temperature, raise_if_invalid
from avsd_megatron.vocab_parallel.collectives import all_gather_stacked, all_reduce_sum, vocab_shard

__all__ = ["TopK", "distributed_topk", "candidate_union", "gather_candidate_logits"]


@dataclass(frozen=True)
class TopK:
    """Per-view top-k over the full real vocabulary.

    Attributes:
        values: [M, N, k] fp32, z^m / tau of the selected tokens, descending along k.
        ids: [M, N, k] int64 global token ids (rank order: ids[..., 0] is the view's argmax).
    """

    values: torch.Tensor
    ids: torch.Tensor


def distributed_topk(
    view_logits: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    group: dist.ProcessGroup | None,
    vocab_size: int | None = None,
) -> TopK:
    """Top-k tokens of every view over the whole real vocabulary from vocab-sharded logits (no grad).

    Each rank takes a local top-k over its real columns; the (value, global id) pairs of all views are packed into
    one fp64 tensor (ids < 2**53 are exact) and all-gathered; every rank re-selects the top k of the tp * k
    candidates. Ties at the k-th value are broken as `torch.topk` breaks them (not necessarily by lowest id).

    Args:
        view_logits: [M, N, V/tp] bf16/fp32 teacher logits shard (any leading dims are allowed: [..., V/tp]).
        k: candidates per view, 1 <= k <= vocab_size.
        temperature: tau (does not change the ranking; `values` are z / tau).
        group: tensor-parallel group, None = single rank.
        vocab_size: real vocabulary size; padding columns are never selected.
    Returns:
        TopK with values/ids of shape [..., k].
    Collectives:
        one `all_gather_into_tensor` of [2, ..., k] fp64 over `group` for all views together; no backward.
    """
    check_logits("view_logits", view_logits)
    tau = check_temperature(temperature)
    shard = vocab_shard(view_logits.shape[-1], group, vocab_size)
    if not 1 <= int(k) <= shard.vocab_size:
        raise ValueError(f"k={k} must be in [1, vocab_size={shard.vocab_size}]")
    k = int(k)
    lead = tuple(view_logits.shape[:-1])
    local_k = min(k, shard.num_real)
    packed = torch.empty((2, *lead, k), dtype=torch.float64, device=view_logits.device)
    packed[0].fill_(float("-inf"))  # a shard with fewer than k real columns pads with -inf / id -1
    packed[1].fill_(-1.0)
    if local_k:
        with torch.no_grad():
            values, local_ids = view_logits[..., : shard.num_real].topk(local_k, dim=-1)
        # A real -inf logit must still beat the -inf padding of short shards: lift it to the lowest finite fp64.
        packed[0, ..., :local_k] = values.to(torch.float64).clamp_(min=-torch.finfo(torch.float64).max)
        packed[1, ..., :local_k] = (local_ids + shard.start).to(torch.float64)
    gathered = all_gather_stacked(packed, group)  # [tp, 2, ..., k] -- the one collective
    values = gathered[:, 0].movedim(0, -2).reshape(*lead, shard.world * k)  # [..., tp*k]
    ids = gathered[:, 1].movedim(0, -2).reshape(*lead, shard.world * k)
    top_values, pick = values.topk(k, dim=-1)  # [..., k]
    top_ids = ids.gather(-1, pick).to(torch.long)
    bad_rows = (torch.isnan(top_values) | (top_values == float("inf"))).any(-1)  # NaN ranks first in topk
    raise_if_invalid(None, shard.vocab_size, bad_rows.reshape(-1), logits_name="view_logits", lead_shape=lead)
    top_values = top_values.masked_fill(top_values == -torch.finfo(torch.float64).max, float("-inf"))
    return TopK(values=(top_values / tau).to(torch.float32), ids=top_ids)


def candidate_union(
    topk_ids: torch.Tensor, token_ids: torch.Tensor, *, vocab_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ordered candidate union K_t per token (spec 2.3 step 2), vectorised over tokens.

    Order: view 0's ids by rank, then view 1's new ids, ..., then y_t if not already present; each row is padded
    to Kc = M * k + 1 with filler y_t and mask False. All rows at once, no host sync: one stable 1-D sort of the
    keys row * V + id (the first occurrence of an id in a row sorts first), a cumulative sum for the compacted
    slots and one scatter -- O(N Kc log(N Kc)).

    Args:
        topk_ids: [M, N, k] int per-view top-k ids in [0, V) (from `distributed_topk`, replicated on TP ranks).
        token_ids: [N] int sampled tokens y_t in [0, V).
        vocab_size: V, optional: when N * V < 2**31 the sort runs on int32 keys (about 2x faster on CPU);
            None = int64 keys (ids must then be < 2**31).
    Returns:
        candidate_ids: [N, Kc] int64, Kc = M * k + 1.
        candidate_mask: [N, Kc] bool, True on the first |K_t| entries.
    Collectives: none.
    """
    if topk_ids.ndim != 3 or topk_ids.dtype.is_floating_point:
        raise ValueError(f"topk_ids must be an integer [M, N, k] tensor, got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    num_views, num_tokens, k = topk_ids.shape
    if token_ids.ndim != 1 or token_ids.shape[0] != num_tokens:
        raise ValueError(f"token_ids must be [N={num_tokens}], got shape {tuple(token_ids.shape)}")
    y = token_ids.to(torch.long)
    seq = torch.cat([topk_ids.permute(1, 0, 2).reshape(num_tokens, num_views * k).long(), y[:, None]], dim=1)  # [N, Kc]
    width = seq.shape[1]
    small = vocab_size is not None and num_tokens * int(vocab_size) < 2**31
    stride = int(vocab_size) if small else 2**31
    key_dtype = torch.int32 if small else torch.long
    rows = torch.arange(num_tokens, device=seq.device, dtype=key_dtype) * stride
    key = (seq.to(key_dtype) + rows[:, None]).reshape(-1)  # [N * Kc], rows never mix
    sorted_key, order = key.sort(stable=True)  # equal (row, id) keep their sequence order
    first_sorted = torch.ones_like(sorted_key, dtype=torch.bool)
    first_sorted[1:] = sorted_key[1:] != sorted_key[:-1]
    keep = torch.empty_like(first_sorted).scatter_(0, order, first_sorted).view(num_tokens, width)  # first occurrences
    position = keep.cumsum(dim=1, dtype=torch.int32).sub_(1).long()  # compacted slot of each kept id
    position = position.masked_fill_(~keep, width)  # dropped duplicates go to a trash column
    out = y[:, None].expand(num_tokens, width + 1).clone()  # filler = y_t
    out.scatter_(1, position, seq)
    candidate_ids = out[:, :width]
    candidate_mask = torch.arange(width, device=seq.device)[None, :] < keep.sum(dim=1, keepdim=True)
    return candidate_ids, candidate_mask


class _GatherCandidateLogits(torch.autograd.Function):
    """z / tau at candidate ids for several logits shards in one all-reduce; local scatter backward."""

    @staticmethod
    def forward(ctx, candidate_ids, shard, tau, group, *logits_list):
        owned, local_ids = shard.owned(candidate_ids)  # [N, Kc]
        pieces = []
        for logits in logits_list:
            index = local_ids.expand(*logits.shape[:-1], local_ids.shape[-1]) if logits.ndim > 2 else local_ids
            picked = logits.gather(-1, index).to(torch.float32)  # [..., N, Kc]
            pieces.append(torch.where(owned, picked, 0.0).reshape(-1))
        flat = all_reduce_sum(torch.cat(pieces), group)  # the one collective, all streams together
        if tau != 1.0:
            flat = flat / tau
        ctx.save_for_backward(owned, local_ids)
        ctx.tau = tau
        ctx.meta = [(t.shape, t.dtype, ctx.needs_input_grad[4 + i]) for i, t in enumerate(logits_list)]
        outs = []
        offset = 0
        for logits in logits_list:
            shape = (*logits.shape[:-1], candidate_ids.shape[-1])
            numel = torch.Size(shape).numel()
            outs.append(flat[offset : offset + numel].view(shape))
            offset += numel
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outs):
        owned, local_ids = ctx.saved_tensors
        grads = []
        for (shape, dtype, needs_grad), grad_out in zip(ctx.meta, grad_outs):
            if not needs_grad or grad_out is None:
                grads.append(None)
                continue
            # Every rank computes the same loss from the same gathered values, so grad_out is already the full
            # gradient; each shard keeps the part for the ids it owns.
            g = torch.where(owned, grad_out.to(torch.float32) / ctx.tau, 0.0)
            index = local_ids.expand(*shape[:-1], local_ids.shape[-1]) if len(shape) > 2 else local_ids
            grads.append(torch.zeros(shape, dtype=dtype, device=g.device).scatter_add_(-1, index, g.to(dtype)))
        return (None, None, None, None, *grads)


def gather_candidate_logits(
    logits: Sequence[torch.Tensor],
    candidate_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    group: dist.ProcessGroup | None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """z / tau at the candidate ids, for several vocab-sharded logits tensors, in one reduction.

    Args:
        logits: shards sharing the vocab layout, each [N, V/tp] (student) or [M, N, V/tp] (views); any that
            requires grad receives a gradient (scattered into the columns this rank owns).
        candidate_ids: [N, Kc] int64 global ids (from `candidate_union`), replicated on all TP ranks.
        temperature: tau.
        group: tensor-parallel group, None = single rank.
        vocab_size: real vocabulary size; every candidate id must be < vocab_size.
    Returns:
        one fp32 tensor per input, [..., N, Kc], replicated on all TP ranks.
    Collectives:
        forward: one `all_reduce(SUM)` of sum_i numel(out_i) fp32 over `group` (student + views together);
        backward: none.
    """
    if not logits:
        raise ValueError("gather_candidate_logits needs at least one logits tensor")
    tau = check_temperature(temperature)
    if candidate_ids.ndim != 2 or candidate_ids.dtype.is_floating_point:
        raise ValueError(
            f"candidate_ids must be an integer [N, Kc] tensor, got {candidate_ids.dtype} {tuple(candidate_ids.shape)}"
        )
    width = logits[0].shape[-1]
    for i, t in enumerate(logits):
        check_logits(f"logits[{i}]", t, min_ndim=2)
        if t.shape[-1] != width or t.shape[-2] != candidate_ids.shape[0] or t.ndim > 3:
            raise ValueError(
                f"logits[{i}] shape {tuple(t.shape)} must be [N, V/tp] or [M, N, V/tp] with N={candidate_ids.shape[0]} "
                f"and V/tp={width}"
            )
    shard = vocab_shard(width, group, vocab_size)
    ids = candidate_ids.to(torch.long)
    raise_if_invalid(ids.reshape(-1), shard.vocab_size, None, ids_name="candidate_ids", lead_shape=tuple(ids.shape))
    return _GatherCandidateLogits.apply(ids, shard, tau, group, *logits)
