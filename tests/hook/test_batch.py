"""Tests for avsd_megatron.hook.batch: the student / teacher row layout and its gather indices.

Run: .venv/bin/python -m pytest -q tests/hook/test_batch.py        (seconds, no Megatron)

The alignment tests check, for every completion token of every stream, that the gathered flat index points at the
row's position P - 1 + j (the token *before* y_j in that row, so its output predicts y_j) and that the next token
of that row is y_j, with different prompt lengths per view and per example. The end-to-end check through a real
model (padded scoring pass == each sequence run alone) is in tests/hook/test_avsd_step.py.
"""

from __future__ import annotations

import pytest
import torch

from avsd_megatron.hook.batch import build_avsd_batch

VIEWS = ("full_solution", "partial_solution", "answer_only")


def _examples():
    """4 examples, 3 views; prompt lengths differ between the student and across views, completions differ too."""
    student = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
    teacher = [
        [[20], [21, 22, 23, 24], [25, 26]],
        [[30, 31, 32, 33, 34, 35], [36], [37, 38, 39]],
        [[40, 41], [42, 43, 44], [45]],
        [[50, 51, 52], [53, 54], [55, 56, 57, 58, 59, 60, 61]],
    ]
    completions = [[100, 101, 102], [103], [104, 105], [106, 107, 108, 109]]
    return student, teacher, completions


def _build(**overrides):
    student, teacher, completions = _examples()
    kwargs = dict(view_names=VIEWS, micro_batch_size=2, pad_id=0, vocab_size=200)
    kwargs.update(overrides)
    return build_avsd_batch(student, teacher, completions, **kwargs)


def _check_stream(stream, prompts, completions):
    """Every gathered position is P - 1 + j of its row, and the row's next token is y_j."""
    rows = stream.num_rows
    flat_tokens = stream.tokens.t().reshape(-1)  # [L * R], sequence-first like Megatron's hidden states
    expected_index = []
    for row, (prompt, comp) in enumerate(zip(prompts, completions)):
        expected_index += [(len(prompt) - 1 + j) * rows + row for j in range(len(comp))]
        assert stream.tokens[row, : len(prompt)].tolist() == prompt
        assert stream.tokens[row, len(prompt) : len(prompt) + len(comp)].tolist() == comp
    assert stream.gather_index.tolist() == expected_index
    next_tokens = flat_tokens[stream.gather_index + rows]  # position + 1, same row
    assert next_tokens.tolist() == [t for comp in completions for t in comp]
    assert torch.equal(stream.position_ids, torch.arange(stream.seq_length).expand(rows, -1))


def test_build_avsd_batch_aligns_student_and_views_with_different_prompt_lengths():
    student, teacher, completions = _examples()
    batch = _build()
    assert batch.num_microbatches == 2 and batch.num_views == 3 and batch.view_names == VIEWS
    assert batch.student_seq_length == max(len(p) + len(c) for p, c in zip(student, completions))
    assert batch.teacher_seq_length == max(len(v) + len(c) for vs, c in zip(teacher, completions) for v in vs)
    for i, mb in enumerate(batch.micro_batches):
        examples = [2 * i, 2 * i + 1]
        comps = [completions[e] for e in examples]
        assert mb.token_ids.tolist() == [t for c in comps for t in c]
        assert mb.loss_mask.all() and mb.loss_mask.shape == mb.token_ids.shape
        assert mb.completion_lengths.tolist() == [len(c) for c in comps]
        _check_stream(mb.student, [student[e] for e in examples], comps)
        # teacher row m * B + b carries view m of example b; gather order is views first, then the student's order
        _check_stream(mb.teacher, [teacher[e][m] for m in range(3) for e in examples], comps * 3)
        assert mb.teacher.gather_index.numel() == 3 * mb.num_tokens


def test_build_avsd_batch_pads_after_completion_with_common_lengths():
    batch = _build(pad_id=7, pad_to_multiple_of=8)
    assert batch.student_seq_length == 8 and batch.teacher_seq_length == 16
    for mb in batch.micro_batches:
        assert mb.student.tokens.shape == (2, 8) and mb.teacher.tokens.shape == (6, 16)
        row, prompt_and_completion = 1, 1 + 1  # micro-batch 0 row 1: student prompt [4] + completion [103]
        if mb is batch.micro_batches[0]:
            assert mb.student.tokens[row, prompt_and_completion:].tolist() == [7] * (8 - prompt_and_completion)


def test_build_avsd_batch_completion_masks():
    student, teacher, completions = _examples()
    masks = [[True, False, True], [False], [True, True], [True, True, True, False]]
    batch = build_avsd_batch(
        student, teacher, completions, view_names=VIEWS, micro_batch_size=4, pad_id=0, completion_masks=masks
    )
    assert batch.micro_batches[0].loss_mask.tolist() == [m for ms in masks for m in ms]


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(completions=[[1], [2]]), ValueError, r"len\(completions\)=2 != len\(student_prompts\)=4"),
        (dict(teacher_drop_view=1), ValueError, r"teacher_prompts\[1\] has 2 views, expected M=3"),
        (dict(student_empty=2), ValueError, r"student_prompts\[2\] is empty"),
        (dict(completion_empty=3), ValueError, r"completions\[3\] is empty"),
        (dict(teacher_bad_id=(0, 2)), ValueError, r"teacher_prompts\[0\]\[2\] \(view 'answer_only'\)\[1\]=999 is "
                                                  r"outside the vocabulary \[0, 200\)"),
        (dict(completion_float=0), TypeError, r"completions\[0\] must hold integer token ids"),
        (dict(micro_batch_size=3), ValueError, r"len\(student_prompts\)=4 is not a multiple of micro_batch_size=3"),
        (dict(micro_batch_size=0), ValueError, r"micro_batch_size=0 must be an int >= 1"),
        (dict(view_names=("a", "a", "b")), ValueError, r"view_names=\('a', 'a', 'b'\) has duplicates"),
        (dict(view_names=()), ValueError, r"view_names is empty"),
        (dict(pad_id=200), ValueError, r"pad_id=200 is outside the vocabulary \[0, 200\)"),
        (dict(max_seq_length=5), ValueError, r"longest student row .* has 7 tokens > max_seq_length=5"),
        (dict(mask_length=1), ValueError, r"completion_masks\[1\] has shape \(2,\), expected \(1,\)"),
        (dict(nested_ids=0), ValueError, r"student_prompts\[0\] must be a flat sequence of token ids"),
    ],
)
def test_build_avsd_batch_rejects_bad_inputs_naming_them(change, error, match):
    student, teacher, completions = _examples()
    kwargs = dict(view_names=VIEWS, micro_batch_size=2, pad_id=0, vocab_size=200)
    if "completions" in change:
        completions = change["completions"]
    if "teacher_drop_view" in change:
        teacher[change["teacher_drop_view"]] = teacher[change["teacher_drop_view"]][:2]
    if "student_empty" in change:
        student[change["student_empty"]] = []
    if "completion_empty" in change:
        completions[change["completion_empty"]] = []
    if "teacher_bad_id" in change:
        e, m = change["teacher_bad_id"]
        teacher[e][m] = [45, 999]
    if "completion_float" in change:
        completions[change["completion_float"]] = [1.0, 2.5]
    if "nested_ids" in change:
        student[0] = [[1, 2], [3, 4]]
    if "mask_length" in change:
        kwargs["completion_masks"] = [[True] * len(c) for c in completions]
        kwargs["completion_masks"][1] = [True, True]
    for key in ("micro_batch_size", "view_names", "pad_id", "max_seq_length"):
        if key in change:
            kwargs[key] = change[key]
    with pytest.raises(error, match=match):
        build_avsd_batch(student, teacher, completions, **kwargs)


def test_avsd_batch_to_moves_every_tensor():
    batch = _build().to("cpu")
    mb = batch.micro_batches[0]
    assert mb.student.tokens.device.type == "cpu" and mb.teacher.gather_index.device.type == "cpu"
    assert batch.num_tokens == sum(len(c) for c in _examples()[2])
