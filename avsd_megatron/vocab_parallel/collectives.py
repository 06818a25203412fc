"""Every tensor-parallel collective AVSD issues, and the vocab-shard layout they assume.

The kernels in this package call `torch.distributed` only through the two functions below, so a reader (or a test
that patches `torch.distributed`) sees every collective here. Both take the process group explicitly:
`group=None` means one rank holding the whole vocabulary, and no collective is issued. There is never a fallback
to a global group (in particular not to Megatron's `parallel_state`, which this package never imports).

Layout (Megatron's `VocabParallelEmbedding` / `ColumnParallelLinear` output layer): the padded vocabulary
V_pad = tp * V_loc is split into contiguous blocks, rank r of `group` holding columns [r * V_loc, (r + 1) * V_loc).
Megatron pads V to a multiple of 128 * tp; columns >= `vocab_size` (the real vocabulary) are not tokens and are
ignored by every kernel. A shard may hold zero real columns (e.g. V = 300 at tp = 4: V_loc = 128, rank 3 holds
[384, 512)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["VocabShard", "vocab_shard", "all_gather_stacked", "all_reduce_sum", "group_size", "group_rank"]


def group_size(group: dist.ProcessGroup | None) -> int:
    """Number of ranks in `group`; 1 for `group=None` (single rank, no collectives)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    """This process's rank inside `group`; 0 for `group=None`."""
    return 0 if group is None else dist.get_rank(group)


@dataclass(frozen=True)
class VocabShard:
    """Which global vocabulary columns this rank's logits hold.

    Attributes:
        rank: rank inside the tensor-parallel group.
        world: tensor-parallel size tp.
        start: global id of local column 0 (= rank * local_width).
        local_width: V_loc = V_pad / tp, the last dimension of the local logits.
        num_real: number of local columns that are real tokens, min(max(vocab_size - start, 0), V_loc);
            local columns [num_real, V_loc) are Megatron padding and are ignored.
        vocab_size: the real (unpadded) vocabulary size V.
    """

    rank: int
    world: int
    start: int
    local_width: int
    num_real: int
    vocab_size: int

    def owned(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(owned, local_index) for global ids: owned = id is a real token held by this shard;
        local_index = id - start clamped into [0, num_real) (safe to gather from the real columns; mask the result
        by `owned`)."""
        local = token_ids - self.start
        owned = (local >= 0) & (local < self.num_real)
        return owned, local.clamp(0, max(self.num_real - 1, 0))


def vocab_shard(local_width: int, group: dist.ProcessGroup | None, vocab_size: int | None) -> VocabShard:
    """The shard layout of logits whose last dimension is `local_width` on this rank of `group`.

    Args:
        local_width: V_loc, the last dimension of the local logits shard.
        group: tensor-parallel group, or None for a single rank.
        vocab_size: real vocabulary size V (columns >= V are padding); None = V_loc * tp (no padding).
    Raises:
        ValueError: vocab_size outside [1, V_loc * tp].
    """
    world = group_size(group)
    rank = group_rank(group)
    padded = local_width * world
    if vocab_size is None:
        vocab_size = padded
    if not 1 <= vocab_size <= padded:
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, V_loc * tp] = [1, {padded}] "
            f"(logits last dim V_loc={local_width}, tp={world})"
        )
    start = rank * local_width
    num_real = min(max(vocab_size - start, 0), local_width)
    return VocabShard(rank, world, start, local_width, num_real, vocab_size)


def all_gather_stacked(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather `tensor` from every rank of `group` into a new [tp, *tensor.shape] tensor (rank order).

    Collective: one `all_gather_into_tensor` of tensor.numel() elements per rank over `group` (none if group is None).
    The input is gathered flat, which both NCCL and gloo accept.
    """
    if group is None:
        return tensor.unsqueeze(0)
    world = dist.get_world_size(group)
    flat = tensor.contiguous().reshape(-1)
    out = flat.new_empty(world * flat.numel())
    dist.all_gather_into_tensor(out, flat, group=group)
    return out.view(world, *tensor.shape)


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum `tensor` over every rank of `group`; returns the sum (reduced in place when `tensor` is contiguous).

    Collective: one `all_reduce(SUM)` of tensor.shape over `group` (none if group is None).
    """
    if group is None:
        return tensor
    tensor = tensor.contiguous()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor
