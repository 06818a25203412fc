"""Tests for avsd_megatron.vocab_parallel: vocab-sharded AVSD equals the unsharded signals math (spec 2, 7).

Run: .venv/bin/python -m pytest -q tests/vocab_parallel/test_vocab_parallel.py          (unit + integration, ~1 min)
     .venv/bin/python -m pytest -q tests/vocab_parallel/test_vocab_parallel.py -m "not integration"   (unit only, seconds)

Unit tests run one process with group=None and compare each kernel to a plain composition of
`torch.log_softmax` + `avsd_megatron.signals` (autograd for the gradients). Integration tests
launch TP = 1, 2, 4 gloo ranks (`avsd_megatron.testing.run_on_ranks`, one launch per TP size for all checks) on a
vocabulary of 300 real tokens padded to a multiple of 128 * tp (so at TP = 4 one shard holds 44 real columns and
one holds none; padding columns carry large garbage logits). Each rank records every torch.distributed call per
kernel call (op, payload size, whether the explicit group was passed) by patching the collectives in the child.
"""

from __future__ import annotations

import ast
import math
import pathlib
import re
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist

from avsd_megatron.signals.candidate import (
    candidate_epistemic_terms,
    candidate_targets,
    generalized_jsd,
    masked_log_softmax,
)
from avsd_megatron.signals.sampled import epistemic_sampled_token_term, sampled_token_targets
from avsd_megatron.vocab_parallel import (
    avsd_candidate_loss,
    avsd_candidate_loss_from_teacher,
    avsd_full_vocab_loss,
    avsd_sampled_token_loss,
    candidate_union,
    distributed_topk,
    gather_candidate_logits,
    sampled_token_logprobs,
    teacher_candidates,
)

V_REAL, M, N, K, TAU, HIDDEN = 300, 3, 12, 4, 0.7, 16
PAD_LOGIT = 30.0  # padding columns get a logit that would dominate any softmax if it were not ignored
FP32 = dict(rtol=1e-5, atol=1e-5)
BF16_GRAD = dict(rtol=1e-2, atol=2e-3)  # our gradient is rounded to bf16 once; the reference stays fp32
FULL_CHUNK = 5  # tokens per chunk in the full-vocab runs: 3 chunks for N = 12

SAMPLED_CONFIGS = {
    "avsd-avsd": dict(mode="avsd", gate="avsd"),
    "avsd-sigmoid": dict(mode="avsd", gate="sigmoid"),
    "avsd-consistency_exp": dict(mode="avsd", gate="consistency_exp"),
    "consensus-avsd": dict(mode="consensus", gate="avsd"),
    "arithmetic-sigmoid": dict(mode="arithmetic", gate="sigmoid"),
    "avsd-avsd-epistemic": dict(mode="avsd", gate="avsd", epistemic_tau=0.01),
    "avsd-sigmoid-epistemic-detached-gate": dict(mode="avsd", gate="sigmoid", epistemic_tau=0.01, detach_gate=True),
}
CANDIDATE_CONFIGS = {
    "avsd-avsd": dict(mode="avsd", gate="avsd", beta=0.5, token_clip=0.05),
    "avsd-sigmoid-centrality-grad-through-target": dict(
        mode="avsd", gate="sigmoid", beta=0.0, token_clip=0.0, weight_mode="agreement_centrality", detach_target=False
    ),
    "consensus-consistency_exp": dict(mode="consensus", gate="consistency_exp", beta=1.0, token_clip=0.0),
    "arithmetic-avsd-epistemic": dict(mode="arithmetic", gate="avsd", beta=0.3, token_clip=0.0, epistemic_tau=0.01),
}
FULL_CONFIGS = {
    "avsd-avsd": dict(mode="avsd", gate="avsd", beta=0.5, token_clip=0.05),
    "avsd-sigmoid-centrality": dict(
        mode="avsd", gate="sigmoid", beta=0.0, token_clip=0.0, weight_mode="agreement_centrality"
    ),
    "consensus-consistency_exp": dict(mode="consensus", gate="consistency_exp", beta=1.0, token_clip=0.0),
    "arithmetic-avsd": dict(mode="arithmetic", gate="avsd", beta=0.3, token_clip=0.0),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------------
# Data: real-vocabulary tensors, padded and sharded like Megatron's vocab-parallel output layer


def make_case(dtype: torch.dtype, seed: int = 1234) -> dict[str, torch.Tensor]:
    """Student [N, V], views [M, N, V] (teachers correlated with the student), sampled y [N], mask [N] (some False),
    and a hidden-state teacher (hidden [M, N, H], weight [V, H]); logits in `dtype`, everything on the real vocab."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(N, V_REAL, generator=g) * 2.0
    views = 0.8 * student + 1.5 * torch.randn(M, N, V_REAL, generator=g)
    # Replace each view row by its ranks / 32: same ordering, distinct values exact in bf16 (no top-k ties, which
    # torch.topk would break arbitrarily), logits in about [-4.7, 4.7].
    views = (views.argsort(dim=-1).argsort(dim=-1).float() - V_REAL / 2) / 32
    y = torch.multinomial(torch.softmax(student / TAU, dim=-1), 1, generator=g).squeeze(-1)
    mask = torch.rand(N, generator=g) > 0.25
    mask[0], mask[1] = False, True
    hidden = torch.randn(M, N, HIDDEN, generator=g)
    weight = torch.randn(V_REAL, HIDDEN, generator=g) * 0.5
    return dict(student=student.to(dtype), views=views.to(dtype), y=y, mask=mask, hidden=hidden, weight=weight)


def padded_width(tp: int) -> int:
    """Megatron pads the vocabulary to a multiple of 128 * tp."""
    multiple = 128 * tp
    return math.ceil(V_REAL / multiple) * multiple


def pad_vocab(x: torch.Tensor, width: int, fill: float = PAD_LOGIT) -> torch.Tensor:
    return torch.cat([x, x.new_full((*x.shape[:-1], width - x.shape[-1]), fill)], dim=-1)


def shard(x: torch.Tensor, tp: int, rank: int, fill: float = PAD_LOGIT) -> torch.Tensor:
    """Rank `rank`'s contiguous slice of the padded last dimension."""
    return pad_vocab(x, padded_width(tp), fill).chunk(tp, dim=-1)[rank].contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Unsharded references: torch.log_softmax over the real vocabulary + the signals functions, autograd gradients


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A fresh fp32 leaf copy that requires grad (never flags the caller's tensor)."""
    return t.detach().float().clone().requires_grad_()


def ref_logprobs(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(logits.float() / TAU, dim=-1)
    return lp.gather(-1, y.expand(lp.shape[:-1]).unsqueeze(-1)).squeeze(-1)


def ref_sampled(case, view_logprobs, cfg):
    s = leaf(case["student"])
    ell_s = ref_logprobs(s, case["y"])
    detach_gate = cfg.get("detach_gate", False)  # the kernel's default is the reference: g keeps its gradient
    t = sampled_token_targets(ell_s.detach() if detach_gate else ell_s, view_logprobs, mask=case["mask"],
                              mode=cfg["mode"], gate=cfg["gate"])
    loss = -(t.advantage.detach() * torch.where(t.valid, ell_s, 0.0)).sum()
    if cfg.get("epistemic_tau"):
        loss = loss + epistemic_sampled_token_term(ell_s, t.gate, t.valid, cfg["epistemic_tau"],
                                                   detach_gate=detach_gate).sum()
    loss.backward()
    return loss.detach(), s.grad


def ref_candidate(case, cfg):
    cfg = dict(cfg)
    beta, clip, tau_e = cfg.pop("beta"), cfg.pop("token_clip"), cfg.pop("epistemic_tau", 0.0)
    detach_gate = cfg.pop("detach_gate", False)
    s = leaf(case["student"])
    views = case["views"].float()
    top = views.topk(K, dim=-1).indices
    ids, cm = _python_union(top, case["y"])
    log_p_s = masked_log_softmax(s.gather(-1, ids) / TAU, cm)
    log_p_m = masked_log_softmax(views.gather(-1, ids.expand(M, -1, -1)) / TAU, cm.expand(M, -1, -1))
    t = candidate_targets(log_p_s, log_p_m, cm, **cfg)
    jsd = generalized_jsd(log_p_s, t.log_q_T, cm, beta=beta, token_clip=clip)
    loss = torch.where(case["mask"], jsd, 0.0).sum()
    if tau_e:
        epistemic = candidate_epistemic_terms(log_p_s, t.gate, cm, tau_e=tau_e, detach_gate=detach_gate).loss
        loss = loss + torch.where(case["mask"], epistemic, 0.0).sum()
    loss.backward()
    return loss.detach(), s.grad


def ref_full(case, cfg, views=None):
    cfg = dict(cfg)
    beta, clip = cfg.pop("beta"), cfg.pop("token_clip")
    s = leaf(case["student"])
    views = case["views"].float() if views is None else views
    support = torch.ones(N, V_REAL, dtype=torch.bool)
    log_p_s = torch.log_softmax(s / TAU, dim=-1)
    log_p_m = torch.log_softmax(views / TAU, dim=-1)
    t = candidate_targets(log_p_s, log_p_m, support, q_a_floor=0.0, **cfg)
    jsd = generalized_jsd(log_p_s, t.log_q_T, support, beta=beta, token_clip=clip)
    loss = torch.where(case["mask"], jsd, 0.0).sum()
    loss.backward()
    return loss.detach(), s.grad


def _python_union(topk_ids: torch.Tensor, y: torch.Tensor):
    """The reference's per-token Python loop (spec 2.3 step 2), as the oracle for `candidate_union`."""
    num_views, num_tokens, k = topk_ids.shape
    width = num_views * k + 1
    ids, mask = [], []
    for n in range(num_tokens):
        union: list[int] = []
        for m in range(num_views):
            for v in topk_ids[m, n].tolist():
                if v not in union:
                    union.append(v)
        if int(y[n]) not in union:
            union.append(int(y[n]))
        ids.append(union + [int(y[n])] * (width - len(union)))
        mask.append([True] * len(union) + [False] * (width - len(union)))
    return torch.tensor(ids), torch.tensor(mask)


# ----------------------------------------------------------------------------------------------------------------
# Collective recording


COLLECTIVES = (
    "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast", "reduce_scatter_tensor", "reduce_scatter",
    "all_to_all_single", "all_to_all", "reduce", "gather", "scatter", "barrier", "all_gather_object",
    "broadcast_object_list", "send", "recv", "isend", "irecv",
)


@contextmanager
def record_collectives(expected_group):
    """Patch every torch.distributed collective; yield a list of (op, numel of the input, group passed is
    `expected_group`) appended to on each call. Restores the originals on exit."""
    calls: list[tuple[str, int, bool]] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def wrap(name, fn):
        def recorder(*args, **kwargs):
            tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if name == "all_gather_into_tensor" and len(args) > 1:
                tensor = args[1]
            group = kwargs.get("group", None)
            calls.append((name, -1 if tensor is None else tensor.numel(), group is expected_group))
            return fn(*args, **kwargs)

        return recorder

    try:
        for name, fn in originals.items():
            setattr(dist, name, wrap(name, fn))
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


# ----------------------------------------------------------------------------------------------------------------
# The rank function: every sharded check of one TP size in one launch


def _result(loss, num, metrics, grad, fwd, bwd) -> dict:
    return dict(
        loss=float(loss.detach()), num=int(num), metrics={k: v.tolist() for k, v in metrics.items()},
        grad=None if grad is None else grad.float(), fwd=list(fwd), bwd=list(bwd),
    )


def _run_loss(fn, student, group, **kwargs) -> dict:
    s = student.clone().requires_grad_()
    with record_collectives(group) as fwd:
        loss, num, metrics = fn(s, group=group, **kwargs)
    with record_collectives(group) as bwd:
        loss.backward()
    return _result(loss, num, metrics, s.grad, fwd, bwd)


def sharded_rank_run() -> dict:
    """On each of tp gloo ranks: run every kernel on this rank's shards; return values, gradient shards and the
    collectives each call issued."""
    rank, tp = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(tp)))  # an explicit group, distinct from the default one
    out: dict = {}
    for dname, dtype in DTYPES.items():
        case = make_case(dtype)
        s_shard, v_shard = shard(case["student"], tp, rank), shard(case["views"], tp, rank)
        y, mask = case["y"], case["mask"]
        common = dict(temperature=TAU, vocab_size=V_REAL)

        v = v_shard.clone().requires_grad_()
        with record_collectives(group) as fwd:
            ell_m = sampled_token_logprobs(v, y, group=group, **common)  # [M, N], all views in one call
        grad_out = torch.linspace(-1.0, 1.0, M * N).view(M, N)
        with record_collectives(group) as bwd:
            (ell_m * grad_out).sum().backward()
        out[(dname, "logprobs")] = dict(value=ell_m.detach(), grad=v.grad.float(), fwd=fwd, bwd=bwd)

        for name, cfg in SAMPLED_CONFIGS.items():
            out[(dname, "sampled", name)] = _run_loss(
                avsd_sampled_token_loss, s_shard, group, token_ids=y, view_logprobs=ell_m.detach(), loss_mask=mask,
                **common, **cfg,
            )
        for name, cfg in CANDIDATE_CONFIGS.items():
            out[(dname, "candidate", name)] = _run_loss(
                avsd_candidate_loss, s_shard, group, token_ids=y, view_logits=v_shard, loss_mask=mask, k=K,
                **common, **cfg,
            )
        with record_collectives(group) as teacher_calls:
            cands = teacher_candidates(v_shard, y, k=K, group=group, **common)
        split = _run_loss(
            avsd_candidate_loss_from_teacher, s_shard, group, candidates=cands, loss_mask=mask, **common,
            **CANDIDATE_CONFIGS["avsd-avsd"],
        )
        split["teacher_fwd"] = list(teacher_calls)
        out[(dname, "candidate-split", "avsd-avsd")] = split
        for name, cfg in FULL_CONFIGS.items():
            out[(dname, "full", name)] = _run_loss(
                avsd_full_vocab_loss, s_shard, group, view_logits=v_shard, loss_mask=mask, chunk_size=FULL_CHUNK,
                **common, **cfg,
            )
    case = make_case(torch.float32)  # teacher given as final hidden states + its output-layer weight shard
    w_shard = shard(case["weight"].t(), tp, rank, fill=1.0).t().contiguous()  # [V/tp, H]
    out[("fp32", "full-hidden", "avsd-avsd")] = _run_loss(
        avsd_full_vocab_loss, shard(case["student"], tp, rank), group, view_hidden=case["hidden"],
        view_output_weight=w_shard, loss_mask=case["mask"], chunk_size=FULL_CHUNK, temperature=TAU,
        vocab_size=V_REAL, **FULL_CONFIGS["avsd-avsd"],
    )
    return out


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda tp: f"tp{tp}")
def sharded(request):
    """(tp, [rank results]) from one launch of `sharded_rank_run` on tp gloo ranks."""
    from avsd_megatron.testing.launcher import run_on_ranks

    tp = request.param
    return tp, run_on_ranks(sharded_rank_run, tp, timeout=240)


def _full_grad(results: list[dict], key) -> torch.Tensor:
    """Concatenate the ranks' gradient shards back into [.., V_pad]."""
    return torch.cat([r[key]["grad"] for r in results], dim=-1)


def _check_grad(full_grad, ref_grad, dname):
    torch.testing.assert_close(full_grad[..., :V_REAL], ref_grad, **(FP32 if dname == "fp32" else BF16_GRAD))
    assert torch.count_nonzero(full_grad[..., V_REAL:]) == 0, "padding columns must get zero gradient"


def _check_replicated(results, key):
    """Loss, token count and metrics are identical on every TP rank."""
    first = results[0][key]
    for r in results[1:]:
        assert (r[key]["loss"], r[key]["num"], r[key]["metrics"]) == (first["loss"], first["num"], first["metrics"])


def _unsharded_metrics(fn, case, **kwargs) -> dict:
    _, _, metrics = fn(leaf(case["student"]), group=None, **kwargs)
    return {k: v.tolist() for k, v in metrics.items()}


def _check_metrics(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(torch.tensor(got[name]), torch.tensor(expected[name]), **FP32, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Integration: TP = 1, 2, 4 equal the unsharded computation


@pytest.mark.integration
@pytest.mark.parametrize("dname", list(DTYPES))
def test_sampled_token_logprobs_tp_matches_unsharded(sharded, dname):
    tp, results = sharded
    case = make_case(DTYPES[dname])
    views = leaf(case["views"])
    ref = ref_logprobs(views, case["y"])
    (ref * torch.linspace(-1.0, 1.0, M * N).view(M, N)).sum().backward()
    for r in results:
        torch.testing.assert_close(r[(dname, "logprobs")]["value"], ref.detach(), **FP32)
    _check_grad(_full_grad(results, (dname, "logprobs")), views.grad, dname)


@pytest.mark.integration
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("name", list(SAMPLED_CONFIGS))
def test_sampled_token_loss_tp_matches_unsharded(sharded, dname, name):
    tp, results = sharded
    case = make_case(DTYPES[dname])
    view_logprobs = ref_logprobs(case["views"], case["y"])
    key = (dname, "sampled", name)
    ref_loss, ref_grad = ref_sampled(case, view_logprobs, SAMPLED_CONFIGS[name])
    _check_replicated(results, key)
    torch.testing.assert_close(torch.tensor(results[0][key]["loss"]), ref_loss, **FP32)
    _check_grad(_full_grad(results, key), ref_grad, dname)
    assert results[0][key]["num"] == int(case["mask"].sum())
    expected = _unsharded_metrics(
        avsd_sampled_token_loss, case, token_ids=case["y"], view_logprobs=view_logprobs, loss_mask=case["mask"],
        temperature=TAU, **SAMPLED_CONFIGS[name],
    )
    _check_metrics(results[0][key]["metrics"], expected)


@pytest.mark.integration
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("name", list(CANDIDATE_CONFIGS))
def test_candidate_loss_tp_matches_unsharded(sharded, dname, name):
    tp, results = sharded
    case = make_case(DTYPES[dname])
    _assert_no_topk_ties(case["views"])
    key = (dname, "candidate", name)
    ref_loss, ref_grad = ref_candidate(case, CANDIDATE_CONFIGS[name])
    _check_replicated(results, key)
    torch.testing.assert_close(torch.tensor(results[0][key]["loss"]), ref_loss, **FP32)
    _check_grad(_full_grad(results, key), ref_grad, dname)
    expected = _unsharded_metrics(
        avsd_candidate_loss, case, token_ids=case["y"], view_logits=case["views"], loss_mask=case["mask"], k=K,
        temperature=TAU, **CANDIDATE_CONFIGS[name],
    )
    _check_metrics(results[0][key]["metrics"], expected)


@pytest.mark.integration
@pytest.mark.parametrize("dname", list(DTYPES))
def test_candidate_loss_split_teacher_pass_matches_one_call(sharded, dname):
    tp, results = sharded
    one, split = results[0][(dname, "candidate", "avsd-avsd")], results[0][(dname, "candidate-split", "avsd-avsd")]
    torch.testing.assert_close(torch.tensor(split["loss"]), torch.tensor(one["loss"]), **FP32)
    for r in results:
        key_one, key_split = (dname, "candidate", "avsd-avsd"), (dname, "candidate-split", "avsd-avsd")
        torch.testing.assert_close(r[key_split]["grad"], r[key_one]["grad"], **FP32)


@pytest.mark.integration
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("name", list(FULL_CONFIGS))
def test_full_vocab_loss_tp_matches_unsharded(sharded, dname, name):
    tp, results = sharded
    case = make_case(DTYPES[dname])
    key = (dname, "full", name)
    ref_loss, ref_grad = ref_full(case, FULL_CONFIGS[name])
    _check_replicated(results, key)
    torch.testing.assert_close(torch.tensor(results[0][key]["loss"]), ref_loss, **FP32)
    _check_grad(_full_grad(results, key), ref_grad, dname)
    expected = _unsharded_metrics(
        avsd_full_vocab_loss, case, view_logits=case["views"], loss_mask=case["mask"], temperature=TAU,
        **FULL_CONFIGS[name],
    )
    _check_metrics(results[0][key]["metrics"], expected)


@pytest.mark.integration
def test_full_vocab_loss_from_hidden_states_tp_matches_unsharded(sharded):
    tp, results = sharded
    case = make_case(torch.float32)
    key = ("fp32", "full-hidden", "avsd-avsd")
    ref_loss, ref_grad = ref_full(case, FULL_CONFIGS["avsd-avsd"], views=case["hidden"] @ case["weight"].t())
    _check_replicated(results, key)
    torch.testing.assert_close(torch.tensor(results[0][key]["loss"]), ref_loss, **FP32)
    _check_grad(_full_grad(results, key), ref_grad, "fp32")


@pytest.mark.integration
def test_collectives_per_call_tp(sharded):
    """The number, kind, payload and group of every collective, per kernel call (spec 7 counts)."""
    tp, results = sharded
    rows = M * N
    kc = M * K + 1
    chunks = math.ceil(N / FULL_CHUNK)
    for r in results:
        for dname in DTYPES:
            lp = r[(dname, "logprobs")]
            assert lp["fwd"] == [("all_gather_into_tensor", 3 * rows, True)], "one gather for all M views"
            assert lp["bwd"] == []
            for name in SAMPLED_CONFIGS:
                res = r[(dname, "sampled", name)]
                assert res["fwd"] == [("all_gather_into_tensor", 3 * N, True)] and res["bwd"] == []
            for name in CANDIDATE_CONFIGS:
                res = r[(dname, "candidate", name)]
                assert res["fwd"] == [
                    ("all_gather_into_tensor", 2 * M * N * K, True),  # top-k of all views
                    ("all_reduce", (M + 1) * N * kc, True),  # student + view candidate logits together
                ]
                assert res["bwd"] == []
            split = r[(dname, "candidate-split", "avsd-avsd")]
            assert split["teacher_fwd"] == [
                ("all_gather_into_tensor", 2 * M * N * K, True),
                ("all_reduce", M * N * kc, True),
            ]
            assert split["fwd"] == [("all_reduce", N * kc, True)] and split["bwd"] == []
            for name, cfg in FULL_CONFIGS.items():
                res = r[(dname, "full", name)]
                per_chunk = 5 if cfg.get("weight_mode") == "agreement_centrality" else 4
                assert len(res["fwd"]) == per_chunk * chunks and res["bwd"] == []
                assert all(ok for _, _, ok in res["fwd"]), "every collective gets the explicit group"
                ops = [op for op, _, _ in res["fwd"][:per_chunk]]
                assert ops.count("all_gather_into_tensor") == 3 and ops[-1] == "all_reduce"


def _assert_no_topk_ties(views: torch.Tensor):
    """Precondition of the candidate comparison: no tie at the k-th value (torch.topk breaks ties arbitrarily)."""
    top = views.float().topk(K + 1, dim=-1).values
    assert bool((top[..., :-1] > top[..., 1:]).all()), "test data has a top-k tie; change the seed"


# ----------------------------------------------------------------------------------------------------------------
# Unit tests, one process, group=None


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("lead", [(N,), (M, N), (2, 3, 4)])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_sampled_token_logprobs_matches_log_softmax(dname, lead, chunk_size):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(*lead, V_REAL, generator=g) * 3).to(DTYPES[dname])
    y = torch.randint(0, V_REAL, lead[-1:], generator=g)
    padded = pad_vocab(logits, 384).requires_grad_()
    ell = sampled_token_logprobs(padded, y, temperature=TAU, vocab_size=V_REAL, chunk_size=chunk_size)
    assert ell.dtype == torch.float32 and ell.shape == lead
    grad_out = torch.randn(lead, generator=g)
    (ell * grad_out).sum().backward()
    ref_in = leaf(logits)
    ref = ref_logprobs(ref_in, y)
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(ell, ref.detach(), **FP32)
    assert padded.grad.dtype == padded.dtype
    _check_grad(padded.grad.float(), ref_in.grad, dname)


def test_sampled_token_logprobs_keeps_no_fp32_copy_of_logits():
    logits = torch.randn(N, 384, dtype=torch.bfloat16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ell = sampled_token_logprobs(logits, torch.randint(0, 384, (N,)), temperature=TAU)
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert big and all(t.dtype == torch.bfloat16 and t.data_ptr() == logits.data_ptr() for t in big)
    ell.sum().backward()


def test_sampled_token_logprobs_ignores_nan_in_padding_columns():
    logits = pad_vocab(torch.randn(N, V_REAL), 384, fill=float("nan"))
    y = torch.randint(0, V_REAL, (N,))
    torch.testing.assert_close(
        sampled_token_logprobs(logits, y, vocab_size=V_REAL, temperature=TAU), ref_logprobs(logits[:, :V_REAL], y)
    )


@pytest.mark.parametrize("bad_id", [-1, V_REAL, 383, 384])
def test_sampled_token_logprobs_rejects_token_outside_vocab(bad_id):
    y = torch.zeros(N, dtype=torch.long)
    y[5] = bad_id
    pattern = rf"token_ids contains id {bad_id} at position \(5,\), outside the vocabulary \[0, {V_REAL}\)"
    with pytest.raises(ValueError, match=pattern):
        sampled_token_logprobs(torch.randn(N, 384), y, vocab_size=V_REAL)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sampled_token_logprobs_rejects_nonfinite_logits(bad):
    logits = torch.randn(M, N, 384)
    logits[1, 4, 7] = bad
    with pytest.raises(ValueError, match=r"logits contain NaN or \+inf at row \(1, 4\)"):
        sampled_token_logprobs(logits, torch.zeros(N, dtype=torch.long))


def test_sampled_token_logprobs_allows_minus_inf_logits():
    logits = torch.randn(N, 384)
    logits[:, 10:20] = -float("inf")
    y = torch.full((N,), 12)
    assert torch.isneginf(sampled_token_logprobs(logits, y)).all()


@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        (dict(token_ids=torch.zeros(N)), TypeError, "token_ids must be an integer tensor"),
        (dict(token_ids=torch.zeros(N + 1, dtype=torch.long)), ValueError, r"token_ids shape \(13,\)"),
        (dict(logits=torch.zeros(N, 384, dtype=torch.long)), TypeError, "logits must be bf16/fp16/fp32/fp64"),
        (dict(temperature=0.0), ValueError, "temperature=0.0"),
        (dict(vocab_size=385), ValueError, "vocab_size=385"),
        (dict(chunk_size=0), ValueError, "chunk_size=0"),
    ],
)
def test_sampled_token_logprobs_rejects_bad_inputs(overrides, error, pattern):
    kwargs = dict(logits=torch.randn(N, 384), token_ids=torch.zeros(N, dtype=torch.long)) | overrides
    with pytest.raises(error, match=pattern):
        sampled_token_logprobs(**kwargs)


@pytest.mark.parametrize("vocab_size", [None, 100])  # int64 / int32 sort keys
@pytest.mark.parametrize("seed", range(5))
def test_candidate_union_matches_python_loop(seed, vocab_size):
    g = torch.Generator().manual_seed(seed)
    topk_ids = torch.randint(0, 6 + 10 * seed, (M, 40, K), generator=g)  # many duplicates at small seeds
    y = torch.randint(0, 8 + 10 * seed, (40,), generator=g)
    ids, mask = candidate_union(topk_ids, y, vocab_size=vocab_size)
    ref_ids, ref_mask = _python_union(topk_ids, y)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)


def test_distributed_topk_single_rank_matches_torch_topk_and_skips_padding():
    case = make_case(torch.float32)
    top = distributed_topk(pad_vocab(case["views"], 384), K, temperature=TAU, group=None, vocab_size=V_REAL)
    ref = case["views"].topk(K, dim=-1)
    assert torch.equal(top.ids, ref.indices)
    torch.testing.assert_close(top.values, ref.values / TAU)


def test_gather_candidate_logits_rejects_padding_ids():
    ids = torch.full((N, 2), V_REAL + 3)
    with pytest.raises(ValueError, match=rf"candidate_ids contains id {V_REAL + 3}"):
        gather_candidate_logits([torch.randn(N, 384)], ids, group=None, vocab_size=V_REAL)


@pytest.mark.parametrize("loss", ["sampled", "candidate", "full"])
def test_losses_with_empty_mask_are_zero(loss):
    case = make_case(torch.float32)
    mask = torch.zeros(N, dtype=torch.bool)
    s = leaf(case["student"])
    if loss == "sampled":
        out = avsd_sampled_token_loss(
            s, case["y"], ref_logprobs(case["views"], case["y"]), mask, temperature=TAU, mode="avsd", gate="avsd",
            group=None,
        )
    elif loss == "candidate":
        out = avsd_candidate_loss(
            s, case["y"], case["views"], mask, k=K, temperature=TAU, mode="avsd", gate="avsd", beta=0.5,
            token_clip=0.05, group=None,
        )
    else:
        out = avsd_full_vocab_loss(
            s, mask, view_logits=case["views"], temperature=TAU, mode="avsd", gate="avsd", beta=0.5, token_clip=0.05,
            group=None,
        )
    loss_sum, num_tokens, metrics = out
    loss_sum.backward()
    assert float(loss_sum.detach()) == 0.0 and int(num_tokens) == 0 and torch.count_nonzero(s.grad) == 0
    assert all(v.shape == (2,) and not v.requires_grad for v in metrics.values())


def test_sampled_loss_metrics_are_sum_count_pairs():
    case = make_case(torch.float32)
    view_logprobs = ref_logprobs(case["views"], case["y"])
    loss, num, metrics = avsd_sampled_token_loss(
        leaf(case["student"]), case["y"], view_logprobs, case["mask"], temperature=TAU, mode="avsd",
        gate="avsd", group=None, view_names=["full_solution", "partial_solution", "answer_only"],
    )
    t = sampled_token_targets(ref_logprobs(case["student"], case["y"]), view_logprobs, mask=case["mask"])
    count = float(case["mask"].sum())
    assert num.dtype == torch.int32 and int(num) == count
    torch.testing.assert_close(metrics["mv_gate_mean"], torch.tensor([float(t.gate.sum()), count]), **FP32)
    torch.testing.assert_close(
        metrics["mv_gate_open_frac"], torch.tensor([float(((t.gate > 0.5) & t.valid).sum()), count])
    )
    expected_view = torch.where(case["mask"], view_logprobs[2], 0.0).sum()
    torch.testing.assert_close(
        metrics["mv_tinker_view_logprob_answer_only"], torch.stack([expected_view, torch.tensor(count)])
    )
    assert all(not v.requires_grad for v in metrics.values())


def test_sampled_loss_rejects_view_count_mismatch():
    case = make_case(torch.float32)
    view_logprobs = ref_logprobs(case["views"], case["y"])
    common = dict(temperature=TAU, mode="avsd", gate="avsd", group=None)
    student, y, mask = case["student"], case["y"], case["mask"]
    with pytest.raises(ValueError, match=r"view_names has 2 names .* but view_logprobs has M=3 views"):
        avsd_sampled_token_loss(student, y, view_logprobs, mask, view_names=["a", "b"], **common)
    with pytest.raises(ValueError, match=r"view_logprobs must be \[M, N=12\]"):
        avsd_sampled_token_loss(student, y, view_logprobs[:, :5], mask, **common)
    with pytest.raises(ValueError, match="view_logprobs contains NaN"):
        avsd_sampled_token_loss(student, y, view_logprobs.clone().fill_(float("nan")), mask, **common)
    with pytest.raises(TypeError, match="loss_mask must be a bool tensor"):
        avsd_sampled_token_loss(student, y, view_logprobs, mask.float(), **common)


def test_full_vocab_loss_rejects_teacher_input_combinations():
    case = make_case(torch.float32)
    common = dict(temperature=TAU, mode="avsd", gate="avsd", beta=0.5, token_clip=0.0, group=None)
    with pytest.raises(ValueError, match="exactly one of view_logits"):
        avsd_full_vocab_loss(case["student"], case["mask"], **common)
    with pytest.raises(ValueError, match="needs view_output_weight"):
        avsd_full_vocab_loss(case["student"], case["mask"], view_hidden=case["hidden"], **common)
    with pytest.raises(ValueError, match=r"view_logits shape \(3, 12, 299\)"):
        avsd_full_vocab_loss(case["student"], case["mask"], view_logits=case["views"][..., :-1], **common)
    with pytest.raises(ValueError, match="weight_mode='agreement_centrality' is not allowed"):
        avsd_full_vocab_loss(
            case["student"], case["mask"], view_logits=case["views"], weight_mode="agreement_centrality", **common
        )
    with pytest.raises(ValueError, match=r"student/view logits contain NaN or \+inf at row \(3,\)"):
        views = case["views"].clone()
        views[1, 3, 5] = float("nan")
        avsd_full_vocab_loss(case["student"], case["mask"], view_logits=views, **common)


@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_full_vocab_loss_is_chunk_invariant(chunk_size):
    case = make_case(torch.float32)
    cfg = FULL_CONFIGS["avsd-avsd"]
    ref_loss, ref_grad = ref_full(case, cfg)
    s = leaf(case["student"])
    loss, _, _ = avsd_full_vocab_loss(
        s, case["mask"], view_logits=case["views"], temperature=TAU, group=None, chunk_size=chunk_size, **cfg
    )
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss, **FP32)
    torch.testing.assert_close(s.grad, ref_grad, **FP32)


def test_group_none_issues_no_collectives():
    case = make_case(torch.float32)
    with record_collectives(expected_group=None) as calls:
        s = leaf(case["student"])
        ell_m = sampled_token_logprobs(case["views"], case["y"], temperature=TAU)
        avsd_sampled_token_loss(
            s, case["y"], ell_m, case["mask"], temperature=TAU, mode="avsd", gate="avsd", group=None
        )[0].backward()
        avsd_candidate_loss(
            s, case["y"], case["views"], case["mask"], k=K, temperature=TAU, mode="avsd", gate="avsd", beta=0.5,
            token_clip=0.05, group=None,
        )[0].backward()
        avsd_full_vocab_loss(
            s, case["mask"], view_logits=case["views"], temperature=TAU, mode="avsd", gate="sigmoid", beta=0.5,
            token_clip=0.0, weight_mode="agreement_centrality", group=None,
        )[0].backward()
    assert calls == []


def test_vocab_parallel_never_imports_megatron():
    """Layering (style 3.1): vocab_parallel imports torch, torch.distributed, the stdlib and avsd_megatron.signals
    only -- never Megatron's parallel_state (or anything else from Megatron)."""
    package = pathlib.Path(__file__).resolve().parents[2] / "avsd_megatron" / "vocab_parallel"
    allowed = re.compile(
        r"^(__future__|math|dataclasses|typing|torch|torch\.distributed|avsd_megatron\.signals(\.\w+)?|"
        r"avsd_megatron\.vocab_parallel(\.\w+)?)$"
    )
    files = sorted(package.glob("*.py"))
    assert files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.name}: use absolute imports"
                names = [node.module]
            else:
                continue
            for name in names:
                assert allowed.match(name), f"{path.name} imports {name!r}"
