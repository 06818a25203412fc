"""Full-vocabulary log-probability of the sampled token from vocab-sharded logits (spec 7, first three rows).

ell(y) = z_y / tau - lse(z / tau), lse over the whole real vocabulary. Each rank reduces its shard to three fp32
numbers per row -- the shard max m_r, the shard sum-exp s_r = sum_v exp(z_v / tau - m_r) and z_y / tau if it owns y
(else 0) -- and one all-gather of these triples lets every rank combine them locally:
    lse = max_r m_r + log sum_r s_r * exp(m_r - max_r m_r),   z_y / tau = sum_r (z_y / tau)_r.
Backward is analytic and local to the shard: d ell / d z_v = (onehot_y(v) - softmax(z / tau)_v) / tau.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from avsd_megatron.vocab_parallel.checks import (
    check_logits,
    check_temperature,
    expand_token_ids,
    raise_if_invalid,
)
from avsd_megatron.vocab_parallel.collectives import VocabShard, all_gather_stacked, vocab_shard

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "chunk_rows",
    "combine_lse",
    "combine_softmax_stats",
    "local_softmax_stats",
    "sampled_token_logprobs",
]

DEFAULT_CHUNK_ELEMENTS = 1 << 22
"""Default fp32 working set per chunk: 2**22 elements = 16 MiB, cache-friendly (rows = max(1, 2**22 // V_loc))."""


def chunk_rows(local_width: int, chunk_size: int | None) -> int:
    """Rows per chunk: `chunk_size` if given, else DEFAULT_CHUNK_ELEMENTS // V_loc (at least 1)."""
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1 (rows per chunk) or None")
        return int(chunk_size)
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(local_width, 1))


def local_softmax_stats(
    logits2d: torch.Tensor,
    shard: VocabShard,
    tau: float,
    token_ids: torch.Tensor | None,
    rows_per_chunk: int,
) -> torch.Tensor:
    """Per-row shard statistics of z / tau over this shard's real columns, computed in fp32 chunk by chunk.

    Args:
        logits2d: [R, V/tp] bf16/fp32 local logits (rows = flattened views x tokens).
        shard: layout of this rank's columns.
        tau: temperature.
        token_ids: int64 [R] global ids (z_y is read where this shard owns y), or None (row 2 is then 0).
        rows_per_chunk: rows upcast to fp32 at a time; peak extra memory is one fp32 [rows_per_chunk, V/tp] buffer.
    Returns:
        [3, R] fp32: (m_r, s_r, z_y / tau or 0). A shard with no real column gives (-inf, 0, 0).
    """
    num_rows = logits2d.shape[0]
    stats = torch.zeros(3, num_rows, dtype=torch.float32, device=logits2d.device)
    if shard.num_real == 0:
        stats[0].fill_(float("-inf"))
        return stats
    if token_ids is not None:
        owned, local_ids = shard.owned(token_ids)
    # One fp32 buffer reused by every chunk: no per-chunk allocation (and page faults) of V/tp-wide rows.
    buf = torch.empty(min(rows_per_chunk, num_rows), shard.num_real, dtype=torch.float32, device=logits2d.device)
    for lo in range(0, num_rows, rows_per_chunk):
        hi = min(lo + rows_per_chunk, num_rows)
        x = buf[: hi - lo]
        x.copy_(logits2d[lo:hi, : shard.num_real])  # [c, V_real_loc] fp32 z
        if token_ids is not None:
            z_y = x.gather(1, local_ids[lo:hi, None]).squeeze(1) / tau
            stats[2, lo:hi] = torch.where(owned[lo:hi], z_y, 0.0)
        row_max = x.amax(dim=1) / tau  # tau > 0 keeps the argmax
        stats[0, lo:hi] = row_max
        # exp(-inf - -inf) would be NaN for an all -inf row; shifting by 0 there keeps s_r = 0.
        shift = torch.where(torch.isfinite(row_max), row_max, 0.0)
        torch.add(-shift[:, None], x, alpha=1.0 / tau, out=x)  # z / tau - m_r in one pass, in place
        stats[1, lo:hi] = x.exp_().sum(dim=1)
    return stats


def combine_lse(shard_max: torch.Tensor, shard_sum: torch.Tensor) -> torch.Tensor:
    """lse = max_r m_r + log sum_r s_r exp(m_r - max_r m_r) from per-shard (max, sum-exp) of shape [tp, ...].

    Returns [...] fp32; -inf where every shard is empty (all m_r = -inf), NaN/+inf where a shard saw NaN/+inf.
    """
    global_max = shard_max.amax(dim=0)
    safe_max = torch.where(torch.isfinite(global_max), global_max, 0.0)
    total = (shard_sum * torch.exp(shard_max - safe_max)).sum(dim=0)
    return torch.where(torch.isnan(global_max) | (global_max == float("inf")), global_max, safe_max + torch.log(total))


def combine_softmax_stats(gathered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine all-gathered shard statistics into the full-vocabulary normaliser.

    Args:
        gathered: [tp, 3, R] fp32 (m_r, s_r, z_r) per rank.
    Returns:
        lse: [R] fp32, logsumexp of z / tau over the real vocabulary.
        z_y: [R] fp32, sum over ranks of the third statistic (z_y / tau: exactly one owner, zeros elsewhere).
        bad_rows: [R] bool, True where lse is not finite or z_y is NaN (NaN/+inf logits).
    """
    shard_max, shard_sum, shard_z = gathered.unbind(1)  # each [tp, R]
    lse = combine_lse(shard_max, shard_sum)
    z_y = shard_z.sum(dim=0)
    bad_rows = ~torch.isfinite(lse) | torch.isnan(z_y)
    return lse, z_y, bad_rows


class _SampledTokenLogprob(torch.autograd.Function):
    """ell = z_y / tau - lse over vocab-sharded rows; analytic, chunked, collective-free backward."""

    @staticmethod
    def forward(ctx, logits2d, token_ids, shard, tau, group, rows_per_chunk, names):
        stats = local_softmax_stats(logits2d, shard, tau, token_ids, rows_per_chunk)  # [3, R]
        lse, z_y, bad_rows = combine_softmax_stats(all_gather_stacked(stats, group))  # the one collective
        ids_name, logits_name, lead = names
        raise_if_invalid(
            token_ids, shard.vocab_size, bad_rows, ids_name=ids_name, logits_name=logits_name, lead_shape=lead
        )
        ctx.save_for_backward(logits2d, token_ids, lse)  # logits are the caller's tensor: no fp32 copy kept
        ctx.shard, ctx.tau, ctx.rows_per_chunk = shard, tau, rows_per_chunk
        return z_y - lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ell):
        logits2d, token_ids, lse = ctx.saved_tensors
        shard, tau, rows = ctx.shard, ctx.tau, ctx.rows_per_chunk
        grad = torch.empty_like(logits2d)  # [R, V/tp] in the logits dtype
        grad[:, shard.num_real :].zero_()  # padding columns are not tokens
        if shard.num_real:
            owned, local_ids = shard.owned(token_ids)
            scale = grad_ell.reshape(-1).to(torch.float32) / tau  # [R]
            buf = torch.empty(min(rows, logits2d.shape[0]), shard.num_real, dtype=torch.float32, device=grad.device)
            for lo in range(0, logits2d.shape[0], rows):
                hi = min(lo + rows, logits2d.shape[0])
                p = buf[: hi - lo]
                p.copy_(logits2d[lo:hi, : shard.num_real])
                torch.add(-lse[lo:hi, None], p, alpha=1.0 / tau, out=p).exp_()  # softmax(z / tau) on this shard
                p.mul_(-scale[lo:hi, None])
                p.scatter_add_(1, local_ids[lo:hi, None], torch.where(owned[lo:hi], scale[lo:hi], 0.0)[:, None])
                grad[lo:hi, : shard.num_real] = p
        return grad, None, None, None, None, None, None


def sampled_token_logprobs(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Full-vocabulary-normalised log-probability of each row's token from vocab-sharded logits.

    ell = log softmax(z / tau)[y], exactly as if all V columns were on one device (spec 2.1, 7).

    Args:
        logits: [..., N, V/tp] bf16/fp16/fp32 local shard, e.g. student [N, V/tp] or views [M, N, V/tp]
            (any leading dims; Megatron's [S, B, V/tp] works as is).
        token_ids: integer [..., N], the logits' leading shape or a suffix of it ([N] is shared by all views).
        temperature: tau > 0; logits are divided by it before the softmax.
        group: tensor-parallel group holding the vocab shards; None = one rank holds the whole vocabulary.
        vocab_size: real vocabulary size V; local columns with global id >= V (Megatron padding) are ignored.
            None = V/tp * tp.
        chunk_size: rows (views x tokens) upcast to fp32 at a time; None = max(1, 2**22 // (V/tp)) (16 MiB).
    Returns:
        [...] fp32 (the logits' leading shape), differentiable w.r.t. `logits`.
    Collectives:
        forward: one `all_gather_into_tensor` of [3, R] fp32 (R = rows = prod of leading dims) over `group`,
        whatever M and N; backward: none.
    Memory:
        forward: one fp32 [chunk, V/tp] buffer plus O(R) statistics; nothing of size V is saved besides a reference
        to `logits` itself. backward: the gradient [..., V/tp] (logits dtype) plus one fp32 [chunk, V/tp] buffer.
    Raises:
        TypeError/ValueError: bad dtype/shape, temperature <= 0, vocab_size > V/tp * tp, a token id outside
        [0, V), or NaN/+inf logits in a row (on every rank alike).
    """
    check_logits("logits", logits)
    tau = check_temperature(temperature)
    lead = tuple(logits.shape[:-1])
    ids = expand_token_ids(token_ids, lead)
    shard = vocab_shard(logits.shape[-1], group, vocab_size)
    logits2d = logits.reshape(-1, logits.shape[-1])  # [R, V/tp], a view for contiguous logits
    rows = chunk_rows(shard.local_width, chunk_size)
    ell = _SampledTokenLogprob.apply(logits2d, ids, shard, tau, group, rows, ("token_ids", "logits", lead))
    return ell.view(lead)
