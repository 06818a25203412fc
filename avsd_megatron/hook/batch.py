"""AVSD batch layout: per prompt one student sequence and M teacher sequences that share the sampled completion.

Each micro-batch of B prompts is laid out as two forward-pass inputs, one per stream (padding; `packing.pack_batch`
turns a batch into its packed THD twin, each stream's rows back to back in one [1, T] row):

    student  B rows      row b         = [student prompt_b      | completion_b | pad ...]   length L_s
    teacher  M * B rows  row m * B + b = [teacher prompt_{m, b} | completion_b | pad ...]   length L_t

* Every row starts at position 0 and its positions are contiguous: `position_ids[r] = 0 .. L - 1`. There is no gap
  between prompt and completion (the reference right-pads prompts and puts the pads *between* prompt and completion,
  shifting RoPE positions and predicting y_1 from a pad slot, spec 6 item 1). Megatron's RoPE uses the sequence
  index, which equals `position_ids` in this layout. Right padding after the completion cannot reach real tokens
  under the causal mask, so no attention mask is needed and the pads' outputs are never read.
* The logit that predicts completion token j of a row whose prompt has P tokens comes from that row's own position
  P - 1 + j. The gather indices below point at exactly these positions.
* Token order: the N completion tokens of a micro-batch are ordered prompt-major, `(b, j)` for b = 0..B-1,
  j = 0..T_b-1, N = sum_b T_b. The teacher stream uses the same order inside each view, views first: [M, N].
  `token_ids`, `loss_mask`, the student's N gathered logits and every view's N gathered logits line up.
* Gather indices are flat indices into Megatron's sequence-first hidden states `[S, R, H].reshape(S * R, H)`:
  `index = position * R + row` (R = rows of the stream).
* L_s and L_t are the same for every micro-batch of one `AVSDBatch` (pipeline stages exchange fixed-shape
  [L, rows, H] activations), rounded up to `pad_to_multiple_of` (e.g. the TP size for sequence parallelism).

Symbols: B prompts per micro-batch, M views, N completion tokens of a micro-batch, L_s / L_t row lengths.
Pure torch: no Megatron, no torch.distributed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # packing.py imports this module
    from avsd_megatron.hook.packing import PackedLayout

__all__ = ["AVSDBatch", "AVSDMicroBatch", "StreamInputs", "build_avsd_batch"]


@dataclass(frozen=True)
class StreamInputs:
    """Inputs of one forward pass (the student's B rows or the teachers' M * B rows) of one micro-batch.

    Attributes:
        tokens: [R, L] int64 token ids, right-padded with `pad_id`; packed: [1, T] (`packing.pack_stream`).
        position_ids: [R, L] int64, 0 .. L - 1 in every row; packed: [1, T], restarting at 0 in every segment.
        gather_index: [K] int64 flat indices `position * R + row` into [L * R] (sequence-first) of the positions
            whose output predicts a completion token; K = N for the student, K = M * N (views first) for the
            teachers. Packed: `row_start + position` into [T], same order.
        row_lengths: [R] int64 real row lengths (prompt + completion); None if the stream was built by hand.
        packing: the `packing.PackedLayout` of a packed stream (cu_seqlens); None = padded.
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    gather_index: torch.Tensor
    row_lengths: torch.Tensor | None = None
    packing: PackedLayout | None = None

    @property
    def num_rows(self) -> int:
        """R, the rows of the stream (also when they are packed into one)."""
        return self.tokens.shape[0] if self.packing is None else self.packing.num_rows

    @property
    def seq_length(self) -> int:
        """L (padded) or T (packed)."""
        return self.tokens.shape[1]

    def to(self, device: torch.device | str) -> StreamInputs:
        """A copy with every tensor on `device`."""
        return StreamInputs(
            self.tokens.to(device),
            self.position_ids.to(device),
            self.gather_index.to(device),
            None if self.row_lengths is None else self.row_lengths.to(device),
            None if self.packing is None else self.packing.to(device),
        )


@dataclass(frozen=True)
class AVSDMicroBatch:
    """One micro-batch: B prompts, their student rows, their M * B teacher rows and the shared completion tokens.

    Attributes:
        student: StreamInputs with R = B rows, gather_index [N].
        teacher: StreamInputs with R = M * B rows (row m * B + b), gather_index [M * N] (view m's N tokens at
            m * N .. (m + 1) * N - 1); None when the batch was built without teacher prompts (GRPO: M = 0).
        token_ids: [N] int64 sampled completion tokens y_t, prompt-major order.
        loss_mask: [N] bool valid completion tokens: `completion_masks` (all True if None) and, unless
            `train_pad_tokens`, token != pad_id.
        completion_lengths: [B] int64 T_b (N = sum).
    """

    student: StreamInputs
    teacher: StreamInputs | None
    token_ids: torch.Tensor
    loss_mask: torch.Tensor
    completion_lengths: torch.Tensor

    @property
    def num_prompts(self) -> int:
        return self.student.num_rows

    @property
    def num_views(self) -> int:
        return 0 if self.teacher is None else self.teacher.num_rows // self.student.num_rows

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    def to(self, device: torch.device | str) -> AVSDMicroBatch:
        """A copy with every tensor on `device`."""
        return AVSDMicroBatch(
            student=self.student.to(device),
            teacher=None if self.teacher is None else self.teacher.to(device),
            token_ids=self.token_ids.to(device),
            loss_mask=self.loss_mask.to(device),
            completion_lengths=self.completion_lengths.to(device),
        )


@dataclass(frozen=True)
class AVSDBatch:
    """This data-parallel rank's share of an optimizer step: micro-batches with common row lengths.

    Attributes:
        micro_batches: the micro-batches, in the order the schedules consume them.
        view_names: the M view names (teacher row m * B + b carries view m).
        micro_batch_size: B prompts per micro-batch.
        student_seq_length: L_s, row length of every student row; packed: T_s, the student pack's length.
        teacher_seq_length: L_t, row length of every teacher row (0 without teacher rows); packed: T_t.
        pad_id: the pad token id the rows were built with (None if unknown).
        packed: whether every stream is packed (`packing.pack_batch`): one [1, T] row per stream and micro-batch.
    """

    micro_batches: tuple[AVSDMicroBatch, ...]
    view_names: tuple[str, ...]
    micro_batch_size: int
    student_seq_length: int
    teacher_seq_length: int
    pad_id: int | None = None
    packed: bool = False

    def schedule_shape(self, stream: str) -> tuple[int, int]:
        """(seq_length, micro_batch_size) for Megatron's schedule of the 'student' or 'teacher' stream: (L, rows)
        padded, (T, 1) packed (the p2p shape of pipeline_parallel/schedules.py:2110-2116)."""
        if stream == "student":
            length, rows = self.student_seq_length, self.micro_batch_size
        elif stream == "teacher":
            length, rows = self.teacher_seq_length, self.num_views * self.micro_batch_size
        else:
            raise ValueError(f"stream={stream!r} is not 'student' or 'teacher'")
        return (length, 1) if self.packed else (length, rows)

    @property
    def num_microbatches(self) -> int:
        return len(self.micro_batches)

    @property
    def num_views(self) -> int:
        return len(self.view_names)

    @property
    def num_tokens(self) -> int:
        """Completion tokens of all micro-batches (valid or not)."""
        return sum(mb.num_tokens for mb in self.micro_batches)

    def to(self, device: torch.device | str) -> AVSDBatch:
        """A copy with every tensor on `device`."""
        return AVSDBatch(
            tuple(mb.to(device) for mb in self.micro_batches),
            self.view_names,
            self.micro_batch_size,
            self.student_seq_length,
            self.teacher_seq_length,
            self.pad_id,
            self.packed,
        )


def build_avsd_batch(
    student_prompts: Sequence[Sequence[int]],
    teacher_prompts: Sequence[Sequence[Sequence[int]]] | None,
    completions: Sequence[Sequence[int]],
    *,
    view_names: Sequence[str],
    micro_batch_size: int,
    pad_id: int,
    vocab_size: int | None = None,
    completion_masks: Sequence[Sequence[bool]] | None = None,
    pad_to_multiple_of: int = 1,
    max_seq_length: int | None = None,
    train_pad_tokens: bool = False,
) -> AVSDBatch:
    """Lay out E examples (prompts x one sampled completion) as an `AVSDBatch` (module docstring).

    Args:
        student_prompts: E token-id sequences, the student prompt x of each example (>= 1 token).
        teacher_prompts: E sequences of M token-id sequences: example e's teacher prompt carrying view m (>= 1 token);
            None = no teacher rows (view_names must be empty; the micro-batches' `teacher` is None), for an
            objective without a teacher (GRPO).
        completions: E token-id sequences, the sampled completion y of each example (>= 1 token), shared by the
            student and all views.
        view_names: the M view names, unique, in the order of `teacher_prompts[e]`.
        micro_batch_size: B prompts per micro-batch; E must be a multiple of B.
        pad_id: token id written after each row's end (never read by the loss). A completion token equal to it is
            excluded from the loss unless train_pad_tokens (the reference: valid = completion tokens != pad id,
            spec 3.5; for Qwen3 pad = <|endoftext|>, which is also a stop token of generation).
        vocab_size: real vocabulary size V; every id (pad_id included) must be in [0, V). None skips the check.
        completion_masks: E bool sequences as long as the completions: False excludes a token from the loss.
            None = every completion token is valid.
        pad_to_multiple_of: round L_s and L_t up to a multiple of this (sequence parallelism needs the TP size).
        max_seq_length: if given, raise when L_s or L_t (after rounding) exceeds it.
        train_pad_tokens: keep pad-id tokens inside completions in the loss (DEVIATES from the reference).
    Returns:
        AVSDBatch with E / B micro-batches.
    Raises:
        TypeError: a sequence holds something other than integers (or bools for completion_masks).
        ValueError: naming the argument and index: mismatched example counts, a wrong number of views, an empty
            prompt or completion, an id outside [0, vocab_size), E not a multiple of B, bad view names, a row
            longer than max_seq_length.
    """
    no_teacher = teacher_prompts is None
    if no_teacher and tuple(view_names):
        raise ValueError(f"teacher_prompts=None needs view_names=(), got {tuple(view_names)}")
    names = () if no_teacher else _check_view_names(view_names)
    num_views = len(names)
    num_examples = len(student_prompts)
    for arg, value in (("teacher_prompts", teacher_prompts), ("completions", completions)):
        if value is None:
            continue
        if len(value) != num_examples:
            raise ValueError(f"len({arg})={len(value)} != len(student_prompts)={num_examples}")
    if completion_masks is not None and len(completion_masks) != num_examples:
        raise ValueError(f"len(completion_masks)={len(completion_masks)} != len(student_prompts)={num_examples}")
    if num_examples == 0:
        raise ValueError("student_prompts is empty: an AVSDBatch needs at least one example")
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size!r} must be an int >= 1")
    if num_examples % micro_batch_size != 0:
        raise ValueError(
            f"len(student_prompts)={num_examples} is not a multiple of micro_batch_size={micro_batch_size}; "
            "every micro-batch must have the same number of prompts (pipeline stages exchange fixed shapes)"
        )
    if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of!r} must be an int >= 1")
    if vocab_size is not None and not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad_id={pad_id} is outside the vocabulary [0, {vocab_size})")

    student = [_ids(f"student_prompts[{e}]", p, vocab_size) for e, p in enumerate(student_prompts)]
    completion = [_ids(f"completions[{e}]", c, vocab_size) for e, c in enumerate(completions)]
    teacher = []
    for e, views in enumerate(teacher_prompts or ()):
        if isinstance(views, (str, bytes)) or len(views) != num_views:
            got = len(views) if not isinstance(views, (str, bytes)) else type(views).__name__
            raise ValueError(f"teacher_prompts[{e}] has {got} views, expected M={num_views} (view_names={names})")
        teacher.append([_ids(f"teacher_prompts[{e}][{m}] (view {names[m]!r})", v, vocab_size)
                        for m, v in enumerate(views)])
    if completion_masks is None:
        masks = [torch.ones(len(c), dtype=torch.bool) for c in completion]
    else:
        masks = [_mask(e, completion_masks[e], len(completion[e])) for e in range(num_examples)]
    if not train_pad_tokens:
        masks = [m & (c != pad_id) for m, c in zip(masks, completion)]

    student_len = _round_up(max(len(p) + len(c) for p, c in zip(student, completion)), pad_to_multiple_of)
    teacher_len = 0 if no_teacher else _round_up(
        max(len(v) + len(c) for views, c in zip(teacher, completion) for v in views), pad_to_multiple_of
    )
    if max_seq_length is not None:
        for what, length in (("student", student_len), ("teacher", teacher_len)):
            if length > max_seq_length:
                raise ValueError(
                    f"the longest {what} row (prompt + completion, padded) has {length} tokens > "
                    f"max_seq_length={max_seq_length}"
                )

    micro_batches = []
    for lo in range(0, num_examples, micro_batch_size):
        examples = range(lo, lo + micro_batch_size)
        comps = [completion[e] for e in examples]
        student_rows = [student[e] for e in examples]
        teacher_rows = [teacher[e][m] for m in range(num_views) for e in examples]  # row m * B + b
        micro_batches.append(
            AVSDMicroBatch(
                student=_stream(student_rows, comps, student_len, pad_id),
                teacher=None if no_teacher else _stream(teacher_rows, comps * num_views, teacher_len, pad_id),
                token_ids=torch.cat(comps),  # [N]
                loss_mask=torch.cat([masks[e] for e in examples]),  # [N]
                completion_lengths=torch.tensor([len(c) for c in comps], dtype=torch.long),  # [B]
            )
        )
    return AVSDBatch(tuple(micro_batches), names, micro_batch_size, student_len, teacher_len, pad_id)


def _stream(prompts: list[torch.Tensor], completions: list[torch.Tensor], length: int, pad_id: int) -> StreamInputs:
    """Rows [prompt_r | completion_r | pad], positions 0..L-1, and the flat gather index in row order."""
    num_rows = len(prompts)
    tokens = torch.full((num_rows, length), pad_id, dtype=torch.long)  # [R, L]
    index, lengths = [], []
    for row, (prompt, comp) in enumerate(zip(prompts, completions)):
        p, t = len(prompt), len(comp)
        tokens[row, :p] = prompt
        tokens[row, p : p + t] = comp
        predicting = torch.arange(p - 1, p - 1 + t, dtype=torch.long)  # position P - 1 + j predicts y_j
        index.append(predicting * num_rows + row)  # flat index into [L * R] (sequence-first)
        lengths.append(p + t)
    position_ids = torch.arange(length, dtype=torch.long).expand(num_rows, length).contiguous()  # [R, L]
    return StreamInputs(tokens, position_ids, torch.cat(index), torch.tensor(lengths, dtype=torch.long))


def _ids(name: str, seq: Sequence[int], vocab_size: int | None) -> torch.Tensor:
    """A non-empty int64 [n] tensor of `seq`; raise naming `name` for non-integers, emptiness or bad ids."""
    if isinstance(seq, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of token ids, got {type(seq).__name__}")
    try:
        ids = torch.as_tensor(seq)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a flat sequence of integer token ids: {exc}") from None
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty; prompts and completions need at least one token")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of token ids, got shape {tuple(ids.shape)}")
    ids = ids.to(torch.long)
    if vocab_size is not None:
        bad = (ids < 0) | (ids >= vocab_size)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}[{i}]={int(ids[i])} is outside the vocabulary [0, {vocab_size})")
    return ids


def _mask(example: int, seq: Sequence[bool], length: int) -> torch.Tensor:
    mask = torch.as_tensor(seq)
    if mask.dtype != torch.bool:
        raise TypeError(f"completion_masks[{example}] must hold bools, got dtype {mask.dtype}")
    if tuple(mask.shape) != (length,):
        raise ValueError(
            f"completion_masks[{example}] has shape {tuple(mask.shape)}, expected ({length},) like "
            f"completions[{example}]"
        )
    return mask


def _check_view_names(view_names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(view_names, str):
        raise TypeError(f"view_names must be a sequence of names, got the string {view_names!r}")
    names = tuple(view_names)
    if not names:
        raise ValueError("view_names is empty; AVSD needs M >= 1 views")
    for m, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise ValueError(f"view_names[{m}]={name!r} must be a non-empty string")
    if len(set(names)) != len(names):
        raise ValueError(f"view_names={names} has duplicates; each view needs its own name")
    return names


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
