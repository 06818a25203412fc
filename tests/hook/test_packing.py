"""Sequence packing (THD, `avsd_megatron/hook/packing.py`) on CPU: everything around the attention kernel.

Run: python -m pytest -q tests/hook/test_packing.py                        (~1 min on 2 cores)
     python -m pytest -q tests/hook/test_packing.py -m "not integration"   (in-process only, seconds)

In process (property tests over random batches): packing / unpacking round trips, positions restarting per
segment, cu_seqlens against the raw lengths, the alignment rule, the gather indices picking the same tokens as the
padded layout, and the loss (with its gradients) computed from hidden states laid out both ways equal bit for bit
(the pack's pads hold NaN: never read). Integration: the tiny Qwen3 GPTModel (local spec) whose core attention is
Megatron's own `DotProductAttention` given a block-diagonal causal mask for packed input (the THD semantics of TE's
attention, `testing/thd_attention.py`); everything else of the packed forward is Megatron's code, RoPE's per-segment
THD path included. Packed = padded for the teacher view log-probs, the loss and every gradient, at TP1, PP2, TP2.
GPU (marker `gpu`, skipped without CUDA and Transformer Engine): the same with TE's attention, bf16, through
`benchmarks/gpu_step.py --variants avsd,avsd/packed --ragged` (its packed_check, tolerances PACKED_TOLERANCES).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from avsd_megatron.hook.batch import build_avsd_batch
from avsd_megatron.hook.packing import (
    pack_batch,
    pack_rows,
    packed_seq_params,
    packed_to_padded,
    packing_multiples,
    unpack_rows,
)

V = 50
PAD = 0


@st.composite
def batches(draw):
    """(raw examples, AVSDBatch) with random lengths: E = B * micro-batches examples, M views."""
    b = draw(st.integers(1, 3))
    e = b * draw(st.integers(1, 3))
    m = draw(st.integers(0, 3))  # 0: no teacher rows (GRPO)
    ids = st.lists(st.integers(0, V - 1), min_size=1, max_size=7)
    student = [draw(ids) for _ in range(e)]
    teacher = [[draw(ids) for _ in range(m)] for _ in range(e)] if m else None
    completions = [draw(ids) for _ in range(e)]
    batch = build_avsd_batch(student, teacher, completions, view_names=tuple(f"v{i}" for i in range(m)),
                             micro_batch_size=b, pad_id=PAD, vocab_size=V)
    return (student, teacher, completions), batch


def _streams(mb):
    return [mb.student] + ([mb.teacher] if mb.teacher is not None else [])


MULTIPLES = st.sampled_from([(1, 1), (1, 2), (1, 3), (2, 2), (2, 4), (4, 8), (3, 6)])


@settings(max_examples=60, deadline=None)
@given(batches(), MULTIPLES)
def test_packing_round_trips_and_keeps_each_row_in_its_own_segment(example, multiples):
    (student, teacher, completions), batch = example
    segment, total = multiples
    packed = pack_batch(batch, segment_multiple=segment, total_multiple=total)
    assert packed.packed and packed.num_microbatches == batch.num_microbatches
    b = batch.micro_batch_size
    for i, (mb, pmb) in enumerate(zip(batch.micro_batches, packed.micro_batches)):
        examples = range(i * b, (i + 1) * b)
        lengths = {"student": [len(student[e]) + len(completions[e]) for e in examples]}
        if teacher is not None:
            lengths["teacher"] = [len(teacher[e][v]) + len(completions[e]) for v in range(batch.num_views)
                                  for e in examples]
        assert torch.equal(pmb.token_ids, mb.token_ids) and torch.equal(pmb.loss_mask, mb.loss_mask)
        for name, padded, pk in zip(lengths, _streams(mb), _streams(pmb)):
            layout = pk.packing
            assert pk.tokens.shape == pk.position_ids.shape == (1, layout.total_length)
            assert pk.num_rows == padded.num_rows and layout.num_rows == padded.num_rows
            # cu_seqlens against the raw lengths; segments aligned; T common, aligned and minimal
            assert layout.cu_seqlens.dtype == layout.cu_seqlens_padded.dtype == torch.int32
            assert (layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]).tolist() == lengths[name]
            seg = (layout.cu_seqlens_padded[1:] - layout.cu_seqlens_padded[:-1]).tolist()
            assert all(s >= n and s % segment == 0 for s, n in zip(seg, lengths[name]))
            assert all(s - n < segment for s, n in zip(seg[:-1], lengths[name][:-1]))  # no needless padding
            assert layout.max_seqlen == max(seg) and layout.cu_seqlens_padded[0] == 0
            seq_length, rows = packed.schedule_shape(name)
            assert (seq_length, rows) == (layout.total_length, 1) and seq_length % total == 0
            longest = max(sum(-(-n // segment) * segment for n in s.row_lengths.tolist())
                          for s in (m.student if name == "student" else m.teacher for m in batch.micro_batches))
            assert longest <= seq_length < longest + total
            # tokens: unpack gives each row's real tokens; back to padded gives the padded rows exactly
            for r, row in enumerate(unpack_rows(pk.tokens[0], layout)):
                assert torch.equal(row, padded.tokens[r, : lengths[name][r]])
            assert torch.equal(packed_to_padded(pk.tokens[0], layout, padded.seq_length, fill=PAD), padded.tokens)
            assert torch.equal(pack_rows(padded.tokens, layout, fill=PAD), pk.tokens[0])
            # positions restart at 0 in every segment (pads included) and equal the padded positions on real tokens
            for r, start in enumerate(layout.cu_seqlens_padded[:-1].tolist()):
                assert pk.position_ids[0, start : start + seg[r]].tolist() == list(range(seg[r]))
            assert torch.equal(packed_to_padded(pk.position_ids[0], layout, padded.seq_length)[padded.tokens != PAD],
                               padded.position_ids[padded.tokens != PAD])
            # gather indices: the same tokens as the padded layout, in the same order, each followed by y_j
            flat_padded = padded.tokens.t().reshape(-1)  # sequence-first [L * R]
            assert torch.equal(pk.tokens[0][pk.gather_index], flat_padded[padded.gather_index])
            targets = mb.token_ids.repeat(padded.num_rows // mb.num_prompts)  # views first for the teacher
            assert torch.equal(pk.tokens[0][pk.gather_index + 1], targets)
            assert torch.equal(pk.row_lengths, padded.row_lengths)


@pytest.mark.parametrize("kwargs,expected", [
    (dict(), (1, 1)),
    (dict(tp=4), (1, 1)),  # no sequence parallelism: TP shards heads, not positions
    (dict(tp=4, sequence_parallel=True), (1, 4)),  # T scattered over TP
    (dict(tp=1, cp=2), (4, 4)),  # each sequence in 2 * cp chunks
    (dict(tp=2, cp=2, sequence_parallel=True), (8, 8)),
    (dict(tp=2, cp=3), (6, 6)),
])
def test_packing_multiples_follow_megatrons_padding_rule(kwargs, expected):
    got = packing_multiples(**kwargs)
    assert (got["segment_multiple"], got["total_multiple"]) == expected


def _example_batch(micro_batch_size: int = 2):
    gen = torch.Generator().manual_seed(3)

    def ids(lo, hi):
        return torch.randint(1, V, (int(torch.randint(lo, hi + 1, (1,), generator=gen)),), generator=gen).tolist()

    e, m = 2 * micro_batch_size, 3
    return build_avsd_batch([ids(1, 6) for _ in range(e)], [[ids(1, 9) for _ in range(m)] for _ in range(e)],
                            [ids(1, 5) for _ in range(e)], view_names=("a", "b", "c"),
                            micro_batch_size=micro_batch_size, pad_id=PAD, vocab_size=V)


def test_pack_batch_refuses_what_it_cannot_pack():
    batch = _example_batch()
    packed = pack_batch(batch)
    with pytest.raises(ValueError, match="packed already"):
        pack_batch(packed)
    with pytest.raises(ValueError, match="total_multiple=3 must be a multiple of segment_multiple=2"):
        pack_batch(batch, segment_multiple=2, total_multiple=3)
    with pytest.raises(ValueError, match="segment_multiple=0"):
        pack_batch(batch, segment_multiple=0)
    with pytest.raises(ValueError, match="tp=0"):
        packing_multiples(tp=0)


def test_packed_seq_params_is_thd_with_int32_padded_cu_seqlens():
    batch = _example_batch()
    assert packed_seq_params(batch.micro_batches[0].student) is None  # padded: no THD
    stream = pack_batch(batch, segment_multiple=2, total_multiple=4).micro_batches[0].teacher
    params = packed_seq_params(stream)
    assert params.qkv_format == "thd"
    for name in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
        value = getattr(params, name)
        assert value.dtype == torch.int32 and torch.equal(value, stream.packing.cu_seqlens_padded), name
    assert params.max_seqlen_q == params.max_seqlen_kv == stream.packing.max_seqlen
    assert int(params.cu_seqlens_q[-1]) == stream.tokens.shape[1]


def test_loss_and_gradients_from_packed_hidden_states_equal_the_padded_ones_bit_for_bit():
    """Same per-position hidden states laid out both ways (pack pads = NaN) -> the hook's selection, the output
    layer, the teacher log-probs and the AVSD loss: equal bit for bit, and so are the hidden-state gradients."""
    from avsd_megatron.hook.completion_output import completion_hidden_states
    from avsd_megatron.hook.loss import AVSDLossConfig, TeacherOutputs, avsd_microbatch_loss
    from avsd_megatron.vocab_parallel import sampled_token_logprobs

    batch = _example_batch()
    packed = pack_batch(batch, **packing_multiples(tp=2, sequence_parallel=True))
    hidden_size, tau = 8, 0.7
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(V, hidden_size, generator=gen, dtype=torch.float64).float()
    config = AVSDLossConfig(temperature=tau)
    for mb, pmb in zip(batch.micro_batches, packed.micro_batches):
        results = {}
        rows_s, rows_t = mb.student.num_rows, mb.teacher.num_rows
        student_rows = torch.randn(rows_s, mb.student.seq_length, hidden_size, generator=gen)  # [R, L, H]
        teacher_rows = torch.randn(rows_t, mb.teacher.seq_length, hidden_size, generator=gen)
        layouts = {
            "padded": (student_rows.transpose(0, 1).contiguous(), teacher_rows.transpose(0, 1).contiguous(), mb),
            "packed": (pack_rows(student_rows, pmb.student.packing, fill=float("nan")).unsqueeze(1),  # [T, 1, H]
                       pack_rows(teacher_rows, pmb.teacher.packing, fill=float("nan")).unsqueeze(1), pmb),
        }
        for name, (student_hidden, teacher_hidden, micro_batch) in layouts.items():
            student_hidden = student_hidden.clone().requires_grad_(True)
            selected_t = completion_hidden_states(teacher_hidden, micro_batch.teacher.gather_index,
                                                  sequence_parallel=False, tp_group=None)  # [M * N, H]
            teacher_logits = (selected_t @ weight.t()).view(mb.num_views, mb.num_tokens, V)
            view_logprobs = sampled_token_logprobs(teacher_logits, micro_batch.token_ids, temperature=tau, group=None)
            selected_s = completion_hidden_states(student_hidden, micro_batch.student.gather_index,
                                                  sequence_parallel=False, tp_group=None)  # [N, H]
            loss, count, metrics = avsd_microbatch_loss(selected_s @ weight.t(), micro_batch,
                                                        TeacherOutputs(view_logprobs=view_logprobs), config,
                                                        tp_group=None)
            loss.backward()
            grad = student_hidden.grad
            grad_rows = (grad.transpose(0, 1) if name == "padded"
                         else packed_to_padded(grad[:, 0], pmb.student.packing, mb.student.seq_length))
            results[name] = (view_logprobs, loss.detach(), count, metrics, grad_rows)
        (lp_a, loss_a, count_a, metrics_a, grad_a), (lp_b, loss_b, count_b, metrics_b, grad_b) = results.values()
        assert torch.isfinite(loss_a) and torch.equal(lp_a, lp_b)
        assert torch.equal(loss_a, loss_b) and torch.equal(count_a, count_b)
        assert metrics_a.keys() == metrics_b.keys() and all(torch.equal(metrics_a[k], metrics_b[k]) for k in metrics_a)
        real = torch.arange(mb.student.seq_length)[None, :] < mb.student.row_lengths[:, None]  # [R, L]
        assert torch.equal(grad_a[real], grad_b[real]) and bool(grad_a.abs().sum() > 0)
        assert not bool(grad_a[~real].any())  # pads get no gradient in the padded layout either


def test_step_hands_packed_streams_to_the_schedules_as_one_row_of_t_tokens():
    import types

    from avsd_megatron.hook.scoring import score_teachers
    from avsd_megatron.hook.step import AVSDStep, MegatronGroups
    from avsd_megatron.hook.loss import AVSDLossConfig
    from avsd_megatron.hook.teacher_kinds import LiveTeacher

    class Recording:
        def __init__(self):
            self.calls = []

        def __call__(self, **kwargs):
            self.calls.append(kwargs)
            list(kwargs["data_iterator"])
            return ["out"] * kwargs["num_microbatches"] if kwargs["forward_only"] else []

    packed = pack_batch(_example_batch(), total_multiple=2)
    schedule = Recording()
    model = torch.nn.Linear(2, 2)
    model.config = types.SimpleNamespace(calculate_per_token_loss=True, finalize_model_grads_func=print,
                                         context_parallel_size=1)
    score_teachers(model, packed, AVSDLossConfig(temperature=0.7), teacher=LiveTeacher([]), tp_group=None,
                   is_last_stage=True, forward_backward_func=schedule)
    step = AVSDStep(model, None, AVSDLossConfig(temperature=0.7), None, groups=MegatronGroups(None, None, True),
                    forward_backward_func=schedule)
    step.update_student(packed, ["t"] * packed.num_microbatches)
    teacher_call, student_call = schedule.calls
    assert (teacher_call["seq_length"], teacher_call["micro_batch_size"]) == (packed.teacher_seq_length, 1)
    assert (student_call["seq_length"], student_call["micro_batch_size"]) == (packed.student_seq_length, 1)


# ----------------------------------------------------------------------------------------------------------------
# Model level on CPU: the tiny GPTModel, packed = padded (integration, gloo ranks)
# ----------------------------------------------------------------------------------------------------------------

MODEL_SEED = 1234
MAX_SEQ = 64
LOGPROB_ATOL = 1e-5
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def packed_vs_padded_rank(tp: int, pp: int) -> dict:
    """One rank: the same DDP(GPTModel) scores the teachers and runs the student forward-backward on a batch and on
    its packed twin; returns the view log-probs, the per-micro-batch losses and the finalized gradients of both."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from avsd_megatron.hook.loss import AVSDLossConfig
    from avsd_megatron.hook.step import AVSDStep, MegatronGroups
    from avsd_megatron.hook.teacher_kinds import LiveTeacher
    from avsd_megatron.testing import build_tiny_gpt_model, init_megatron, tiny_qwen3_config
    from avsd_megatron.testing.thd_attention import THDDotProductAttention

    init_megatron(tp, pp)
    config = tiny_qwen3_config(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    config.finalize_model_grads_func = finalize_model_grads
    gpt = build_tiny_gpt_model(config, V, MAX_SEQ, seed=MODEL_SEED, core_attention=THDDotProductAttention)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), gpt)
    groups = MegatronGroups.from_parallel_state()
    step = AVSDStep(model, None, AVSDLossConfig(temperature=0.7), LiveTeacher([]), groups=groups)
    batch = _example_batch()
    results = {}
    for name, b in (("padded", batch), ("packed", pack_batch(batch, **packing_multiples(tp=tp)))):
        model.zero_grad_buffer()
        outputs = step.score_teachers(b)
        per_microbatch = step.update_student(b, outputs)
        grads = {n: p.main_grad.detach().clone() for n, p in gpt.named_parameters()}
        results[name] = dict(
            view_logprobs=[o.view_logprobs for o in outputs] if groups.is_last_stage else None,
            losses=[m["avsd_loss"].clone() for m in per_microbatch] if groups.is_last_stage else None,
            grads=grads,
        )
    results["is_last_stage"] = groups.is_last_stage
    results["tp_rank"] = parallel_state.get_tensor_model_parallel_rank()
    return results


@pytest.mark.integration
@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2), (2, 1)], ids=["tp1pp1", "tp1pp2", "tp2pp1"])
def test_packed_forward_backward_equals_padded_with_thd_semantics_attention(tp, pp):
    from avsd_megatron.testing import run_on_ranks

    for rank in run_on_ranks(packed_vs_padded_rank, tp * pp, tp, pp, timeout=300):
        padded, packed = rank["padded"], rank["packed"]
        if rank["is_last_stage"]:
            for a, b in zip(padded["view_logprobs"], packed["view_logprobs"]):
                assert a.shape == b.shape and bool(torch.isfinite(a).all())
                torch.testing.assert_close(b, a, rtol=0, atol=LOGPROB_ATOL)
            for a, b in zip(padded["losses"], packed["losses"]):
                torch.testing.assert_close(b, a, rtol=0, atol=LOGPROB_ATOL)
        assert padded["grads"].keys() == packed["grads"].keys()
        for name, grad in padded["grads"].items():
            assert bool(grad.abs().sum() > 0), name
            torch.testing.assert_close(packed["grads"][name], grad, **GRAD_TOL, msg=name)



# ----------------------------------------------------------------------------------------------------------------
# GPU: Transformer Engine's THD attention (never runs on CPU machines)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                    reason="needs Transformer Engine (THD attention)")
def test_packed_equals_padded_with_transformer_engine_on_gpu(tmp_path):
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "packed.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(root), MASTER_PORT=str(port))
    env.pop("RANK", None)
    cmd = [sys.executable, "benchmarks/gpu_step.py", "--variants", "avsd,avsd/packed", "--ragged", "--layers", "2",
           "--micro-batches", "2", "--student-prompt", "128", "--teacher-prompt", "256", "--completion", "256",
           "--warmup", "1", "--steps", "2", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check = json.loads(out.read_text())["results"]["avsd/packed"]["packed_check"]
    assert check["pass"], check
