"""Sequence packing (THD): the rows of a micro-batch back to back in one [1, T] row, as NeMo-RL, veRL and slime do.

    packed = pack_batch(batch, **packing_multiples(tp=2, sequence_parallel=True))   # AVSDBatch -> AVSDBatch
    model(mb.student.tokens, mb.student.position_ids, None, packed_seq_params=packed_seq_params(mb.student))

Padded layout (`batch.py`): R rows of length L, [R, L] tokens, sequence-first hidden states [L, R, H]. Packed layout:
the same R rows as consecutive segments of one row of T tokens,

    tokens   [1, T] = [row_0 | pad | row_1 | pad | ... | row_{R-1} | pad]
    segment r = [cu_seqlens_padded[r], cu_seqlens_padded[r + 1]);   real tokens: the first row_lengths[r] of it

* `cu_seqlens` [R + 1] int32 cumulates the real row lengths (prompt + completion); `cu_seqlens_padded` [R + 1] int32
  cumulates each length rounded up to `segment_multiple`, the last segment extended to the pack length T, so
  `cu_seqlens_padded[-1] == T`. T is common to all micro-batches of a batch and a multiple of `total_multiple`:
  pipeline stages exchange fixed [T, 1, H] activations (pipeline_parallel/schedules.py:2110-2116 builds the p2p
  shape from seq_length and micro_batch_size, = (T, 1) here).
* The model sees the padded segments: `packed_seq_params` sets cu_seqlens_q/kv and their `_padded` twins all to
  `cu_seqlens_padded`, as veRL's `preprocess_packed_seqs` does. A segment's pads follow its real tokens, so under the
  causal mask they never reach a real token, exactly as the right padding of the padded layout; TE therefore needs no
  pad-between-sequences handling (its `pad_between_seqs`), and the pads' outputs are never read.
* Positions restart at 0 in every segment. Megatron's RoPE does not read `position_ids` (GPTModel._preprocess,
  models/gpt/gpt_model.py:402-411, builds the rotary table from `max_seqlen`); with packed_seq_params the attention
  applies it per segment of `cu_seqlens_q_padded` (transformer/attention.py:1483-1491 -> rope_utils.py:271
  `apply_rotary_pos_emb(cu_seqlens=...)`: TE's fused `fused_apply_rotary_pos_emb_thd`, or the unfused
  `_apply_rotary_pos_emb_thd`, rope_utils.py:189, which restarts at 0 per segment when the table is not T long,
  :253-268). `position_ids` [1, T] restart per segment too, so they say the same thing (and are what a learned
  absolute position embedding would read).
* Gather indices: padded index `position * R + row` into [L * R] becomes `cu_seqlens_padded[row] + position` into
  [T] (hidden states [T, 1, H].reshape(T, H)), in the same order, so the N (or M * N) gathered rows, and with them
  the per-token log-probs and the loss, come out exactly as in the padded layout.
* Only Transformer Engine's attention runs THD: the local spec's `DotProductAttention` asserts
  `packed_seq_params is None` (transformer/dot_product_attention.py:153); TE's takes cu_seqlens as int32 on the device
  (extensions/transformer_engine.py:2012-2045 forwards the PackedSeqParams fields, and turns the causal mask into
  padding_causal for thd, :2036-2042).

Alignment (`packing_multiples`, Megatron's rule in models/multimodal/context_parallel.py:53-62 and veRL's): with
sequence parallelism the packed hidden states are scattered over TP along T, so T % tp == 0; with context
parallelism TE splits every sequence into 2 * cp chunks, so each segment is a multiple of 2 * cp (times tp with SP).
AVSDStep refuses context parallelism today; the rule is here so the layout is right when it comes.

Pure torch except `packed_seq_params` (imports megatron-core).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from avsd_megatron.hook.batch import AVSDBatch, AVSDMicroBatch, StreamInputs

__all__ = [
    "PackedLayout",
    "pack_batch",
    "pack_rows",
    "pack_stream",
    "packed_gather_index",
    "packed_seq_params",
    "packed_to_padded",
    "packing_multiples",
    "unpack_rows",
]


@dataclass(frozen=True)
class PackedLayout:
    """Where the R rows of a stream sit in its [1, T] pack.

    Attributes:
        cu_seqlens: [R + 1] int32, cumulative real row lengths (prompt + completion), from 0.
        cu_seqlens_padded: [R + 1] int32, cumulative segment lengths (each row length rounded up to the segment
            multiple, the last segment extended to T), from 0 to T; what the model is given.
        max_seqlen: the longest segment (padded), an int (TE and the rotary table need it without a device sync).
    """

    cu_seqlens: torch.Tensor
    cu_seqlens_padded: torch.Tensor
    max_seqlen: int

    @property
    def num_rows(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def total_length(self) -> int:
        """T, the pack length (= cu_seqlens_padded[-1])."""
        return int(self.cu_seqlens_padded[-1])

    @property
    def row_lengths(self) -> torch.Tensor:
        """[R] int64 real row lengths."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    @property
    def row_starts(self) -> torch.Tensor:
        """[R] int64 first packed position of each row."""
        return self.cu_seqlens_padded[:-1].long()

    def to(self, device: torch.device | str) -> PackedLayout:
        return PackedLayout(self.cu_seqlens.to(device), self.cu_seqlens_padded.to(device), self.max_seqlen)


def packing_multiples(*, tp: int = 1, cp: int = 1, sequence_parallel: bool = False) -> dict[str, int]:
    """The `pack_batch` alignment Transformer Engine and Megatron need (module docstring).

    Returns:
        {"segment_multiple": each row's segment is a multiple of it, "total_multiple": T is a multiple of it}:
        cp > 1: 2 * cp * (tp if sequence_parallel else 1) for both; else segment 1 and total tp with sequence
        parallelism, 1 without.
    """
    for name, value in (("tp", tp), ("cp", cp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    if cp > 1:
        multiple = 2 * cp * (tp if sequence_parallel else 1)
        return {"segment_multiple": multiple, "total_multiple": multiple}
    return {"segment_multiple": 1, "total_multiple": tp if sequence_parallel else 1}


def _layout(row_lengths: torch.Tensor, segment_multiple: int, total_length: int) -> PackedLayout:
    lengths = row_lengths.long()
    padded = -(-lengths // segment_multiple) * segment_multiple  # [R]
    padded[-1] += total_length - int(padded.sum())  # the pack's tail belongs to the last segment
    zero = torch.zeros(1, dtype=torch.int32)
    return PackedLayout(
        cu_seqlens=torch.cat([zero, lengths.cumsum(0).to(torch.int32)]),
        cu_seqlens_padded=torch.cat([zero, padded.cumsum(0).to(torch.int32)]),
        max_seqlen=int(padded.max()),
    )


def _segments_length(row_lengths: torch.Tensor, segment_multiple: int) -> int:
    return int((-(-row_lengths.long() // segment_multiple) * segment_multiple).sum())


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def packed_gather_index(gather_index: torch.Tensor, num_rows: int, layout: PackedLayout) -> torch.Tensor:
    """Padded flat indices `position * R + row` into [L * R] -> packed indices `row_start + position` into [T].

    Args:
        gather_index: [K] int64 (`StreamInputs.gather_index` of the padded stream).
        num_rows: R of the padded stream.
        layout: the stream's PackedLayout.
    Returns:
        [K] int64, same order.
    """
    row, position = gather_index % num_rows, gather_index // num_rows
    return layout.row_starts.to(gather_index.device)[row] + position


def pack_rows(rows: torch.Tensor, layout: PackedLayout, fill: Any = 0) -> torch.Tensor:
    """Padded rows [R, L, ...] -> packed [T, ...]: the first row_lengths[r] entries of row r at its segment.

    Pads of the pack (segment tails) get `fill`.
    """
    num_rows, length = rows.shape[:2]
    lengths = layout.row_lengths.tolist()
    if num_rows != layout.num_rows or max(lengths) > length:
        raise ValueError(f"rows of shape {tuple(rows.shape)} do not fit a layout of {layout.num_rows} rows with "
                         f"lengths up to {max(lengths)}")
    out = rows.new_full((layout.total_length, *rows.shape[2:]), fill)
    for r, (start, n) in enumerate(zip(layout.row_starts.tolist(), lengths)):
        out[start : start + n] = rows[r, :n]
    return out


def unpack_rows(packed: torch.Tensor, layout: PackedLayout) -> list[torch.Tensor]:
    """Packed [T, ...] -> the R rows' real entries, [row_lengths[r], ...] each (views, no copy)."""
    if packed.shape[0] != layout.total_length:
        raise ValueError(f"packed has {packed.shape[0]} entries, the layout {layout.total_length}")
    return [packed[start : start + n] for start, n in zip(layout.row_starts.tolist(), layout.row_lengths.tolist())]


def packed_to_padded(packed: torch.Tensor, layout: PackedLayout, length: int, fill: Any = 0) -> torch.Tensor:
    """Packed [T, ...] -> padded rows [R, length, ...] (real entries in place, `fill` after them)."""
    out = packed.new_full((layout.num_rows, length, *packed.shape[1:]), fill)
    for r, row in enumerate(unpack_rows(packed, layout)):
        out[r, : row.shape[0]] = row
    return out


def pack_stream(
    stream: StreamInputs, *, pad_id: int, total_length: int, segment_multiple: int = 1
) -> StreamInputs:
    """The packed twin of a padded stream: tokens / position_ids [1, T], gather_index into [T], `packing` set.

    Args:
        stream: padded StreamInputs with `row_lengths` (from `build_avsd_batch`).
        pad_id: token id of the pack's pads.
        total_length: T (>= the summed segment lengths).
        segment_multiple: each row's segment is rounded up to a multiple of it.
    """
    if stream.packing is not None:
        raise ValueError("the stream is packed already")
    if stream.row_lengths is None:
        raise ValueError("the stream has no row_lengths (build it with build_avsd_batch)")
    needed = _segments_length(stream.row_lengths, segment_multiple)
    if total_length < needed:
        raise ValueError(f"total_length={total_length} < {needed}, the stream's summed segment lengths")
    layout = _layout(stream.row_lengths, segment_multiple, total_length)
    tokens = pack_rows(stream.tokens, layout, fill=pad_id)  # [T]
    starts = torch.repeat_interleave(layout.row_starts, (layout.cu_seqlens_padded[1:] - layout.cu_seqlens_padded[:-1]
                                                         ).long())  # [T] start of each position's segment
    positions = torch.arange(layout.total_length, dtype=torch.long) - starts  # restart at 0 per segment
    return StreamInputs(
        tokens=tokens.unsqueeze(0),  # [1, T]
        position_ids=positions.unsqueeze(0),  # [1, T]
        gather_index=packed_gather_index(stream.gather_index, stream.num_rows, layout),
        row_lengths=stream.row_lengths,
        packing=layout,
    )


def pack_batch(batch: AVSDBatch, *, segment_multiple: int = 1, total_multiple: int = 1) -> AVSDBatch:
    """Pack every micro-batch's student rows and teacher rows (each stream its own [1, T] pack).

    T_s (T_t) is the longest micro-batch's summed student (teacher) segments rounded up to `total_multiple`, the
    same for every micro-batch (pipeline stages exchange fixed shapes). Token ids, loss masks and completion
    lengths are unchanged; the gather indices are those of `packed_gather_index` (same order).

    Args:
        batch: a padded AVSDBatch (`build_avsd_batch`).
        segment_multiple, total_multiple: the alignment, normally `packing_multiples(...)`; total_multiple must be a
            multiple of segment_multiple, so every segment (the last one with the pack's tail too) is one.
    Returns:
        AVSDBatch with `packed=True`, `student_seq_length = T_s`, `teacher_seq_length = T_t` (0 without teachers).
    """
    if batch.packed:
        raise ValueError("the batch is packed already")
    for name, value in (("segment_multiple", segment_multiple), ("total_multiple", total_multiple)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    if total_multiple % segment_multiple:
        raise ValueError(f"total_multiple={total_multiple} must be a multiple of segment_multiple={segment_multiple} "
                         "(the last segment takes the pack's tail and must stay a multiple too)")
    if batch.pad_id is None:
        raise ValueError("the batch records no pad_id (build it with build_avsd_batch)")
    pad_id = batch.pad_id

    def pack_length(streams: list[StreamInputs]) -> int:
        if any(s.row_lengths is None for s in streams):
            raise ValueError("the batch's streams have no row_lengths (build it with build_avsd_batch)")
        longest = max(_segments_length(s.row_lengths, segment_multiple) for s in streams)
        return _round_up(longest, total_multiple)

    student_len = pack_length([mb.student for mb in batch.micro_batches])
    has_teacher = batch.micro_batches[0].teacher is not None
    teacher_len = pack_length([mb.teacher for mb in batch.micro_batches]) if has_teacher else 0

    def pack_micro_batch(mb: AVSDMicroBatch) -> AVSDMicroBatch:
        return replace(
            mb,
            student=pack_stream(mb.student, pad_id=pad_id, total_length=student_len,
                                segment_multiple=segment_multiple),
            teacher=None if mb.teacher is None else pack_stream(
                mb.teacher, pad_id=pad_id, total_length=teacher_len, segment_multiple=segment_multiple),
        )

    return replace(
        batch,
        micro_batches=tuple(pack_micro_batch(mb) for mb in batch.micro_batches),
        student_seq_length=student_len,
        teacher_seq_length=teacher_len,
        packed=True,
    )


def packed_seq_params(stream: StreamInputs) -> Any:
    """Megatron's `PackedSeqParams` (qkv_format='thd') of a packed stream; None for a padded one.

    Every cu_seqlens field is the padded one (module docstring), int32 on the stream's device, max_seqlen_q/kv the
    longest segment (packed_seq_params.py:10-28; the rotary table length, rotary_pos_embedding.py:238-241).
    """
    layout = stream.packing
    if layout is None:
        return None
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = layout.cu_seqlens_padded.to(device=stream.tokens.device, dtype=torch.int32)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu,
        cu_seqlens_kv_padded=cu,
        max_seqlen_q=layout.max_seqlen,
        max_seqlen_kv=layout.max_seqlen,
    )
