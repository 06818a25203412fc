"""Full-vocabulary AVSD loss on vocab-sharded logits (spec 7, rows "full-vocab ..."): the candidate-set math of
spec 2.3 with the support = the whole real vocabulary, chunked over tokens.

Per token chunk (c tokens), with x = z / tau in fp32 on this shard's real columns:
    R1  all-gather (max, sum-exp) of the student and the M views      -> ell_s(v), ell_m(v) = x - lse
   (R1b all-reduce of the pairwise JSD_1/2 partial sums               -> agreement-centrality weights, if chosen)
    R2  all-gather (max, sum-exp) of G(v) = sum_m w_m ell_m(v)        -> log q_G = G - log Z_G
        log q_A = logsumexp_m(log w_m + ell_m) (normalised by construction: no collective, not renormalised),
        J = max(0, log q_A - log q_G), delta_m, view statistics, gate g(v): all elementwise on the shard
    R3  all-gather (max, sum-exp) of the pre-target log q_G + g J     -> log q_T
    R4  all-reduce of per-token partial sums [6, c]: JSD terms, sum_v a_v, entropy H, sum_v p_s g, sum_v p_s J,
        clipped entries
Every elementwise step is a function of `avsd_megatron.signals`; only the normalisers and the
sums over the vocabulary are assembled here.

Gradient (the target q_T is a constant, spec 6 item 4 default): with a_v = d(JSD terms)/d log p_s(v) (taken by
autograd on the elementwise `generalized_jsd_elementwise`, no collective) and sum_v a_v from R4,
    d loss_t / d z_v = (a_v - p_s(v) * sum_u a_u) / tau      (0 for clipped or masked tokens),
computed during the forward pass chunk by chunk (like a fused cross-entropy) and stored in the logits dtype, so the
backward is a multiply with no collective and no recomputation of the teacher projection.

Teacher input: either view logits [M, N, V/tp], or the views' final hidden states [M, N, H] plus the (shared, frozen)
output-layer weight shard [V/tp, H], projected per chunk -- exact, and H/V of the memory of keeping logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from avsd_megatron.signals.candidate import (
    WEIGHT_MODES,
    agreement_centrality_weights,
    epistemic_partial_sums,
    generalized_jsd_elementwise,
    pairwise_jsd_half,
)
from avsd_megatron.signals.sampled import (
    MODES,
    GateParams,
    arithmetic_logprobs,
    check_choice,
    geometric_logits,
    jensen_gap,
    select_gate,
    view_advantages,
    view_statistics,
)
from avsd_megatron.vocab_parallel.checks import check_logits, check_mask, check_temperature, raise_if_invalid
from avsd_megatron.vocab_parallel.collectives import VocabShard, all_gather_stacked, all_reduce_sum, vocab_shard
from avsd_megatron.vocab_parallel.logprob import combine_lse
from avsd_megatron.vocab_parallel.sampled_loss import metric

__all__ = ["avsd_full_vocab_loss", "DEFAULT_FULL_VOCAB_CHUNK_ELEMENTS"]

DEFAULT_FULL_VOCAB_CHUNK_ELEMENTS = 1 << 22
"""Default tokens per chunk = max(1, 2**22 // V_real_loc): each fp32 [c, V/tp] buffer is <= 16 MiB."""

_SUMS = ("jsd", "sum_a", "entropy", "mean_gate", "mean_gap", "clipped")  # rows of the R4 all-reduce
CLIP_SCOPES = ("token", "entry")
"""Where token_clip clamps: each token's JSD (spec 2.3 step 10, the candidate path) or each (token, vocabulary
entry) term before the sum over the vocabulary (spec 2.4, the reference's single-view full-vocabulary loss)."""


@dataclass(frozen=True)
class _Config:
    shard: VocabShard
    group: dist.ProcessGroup | None
    tau: float
    mode: str
    gate: str
    gate_params: GateParams
    weight_mode: str
    eta: float
    beta: float
    token_clip: float
    clip_scope: str
    q_a_floor: float
    eps: float
    tokens_per_chunk: int


def _clips_tokens(cfg: _Config) -> bool:
    return cfg.clip_scope == "token" and cfg.token_clip > 0


def _local_max_sumexp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, sum exp(x - max)) over the last axis of fp32 x; (-inf, 0) for an empty or all -inf row."""
    if x.shape[-1] == 0:
        return x.new_full(x.shape[:-1], -math.inf), x.new_zeros(x.shape[:-1])
    row_max = x.amax(dim=-1)
    shift = torch.where(torch.isfinite(row_max), row_max, 0.0)
    return row_max, torch.exp(x - shift.unsqueeze(-1)).sum(dim=-1)


def _gather_lse(parts: list[torch.Tensor], group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """Full-vocabulary logsumexp of each fp32 [..., c, V_real_loc] part; all parts in ONE all-gather of [2, total]."""
    stats = [_local_max_sumexp(p) for p in parts]
    packed = torch.stack([torch.cat([m.reshape(-1) for m, _ in stats]), torch.cat([s.reshape(-1) for _, s in stats])])
    gathered = all_gather_stacked(packed, group)  # [tp, 2, total]
    lse = combine_lse(gathered[:, 0], gathered[:, 1])
    out, offset = [], 0
    for p in parts:
        n = math.prod(p.shape[:-1])
        out.append(lse[offset : offset + n].view(p.shape[:-1]))
        offset += n
    return out


def _view_weights(ell_m: torch.Tensor, cfg: _Config) -> torch.Tensor:
    """[c, M] per-token view weights: uniform, or agreement centrality from all-reduced pairwise JSD (R1b)."""
    num_views, c = ell_m.shape[0], ell_m.shape[1]
    if cfg.weight_mode == "uniform" or num_views == 1:
        return torch.full((c, num_views), 1.0 / num_views, dtype=ell_m.dtype, device=ell_m.device)
    support = torch.ones(ell_m.shape[1:], dtype=torch.bool, device=ell_m.device)
    pair_jsd = all_reduce_sum(pairwise_jsd_half(ell_m, support), cfg.group)  # [c, P]
    return agreement_centrality_weights(pair_jsd, num_views, eta=cfg.eta, eps=cfg.eps)


def _chunk(x_s: torch.Tensor, x_m: torch.Tensor, cfg: _Config, need_grad: bool):
    """AVSD on one token chunk. x_s: [c, Vr] fp32 z_s / tau (consumed), x_m: [M, c, Vr] fp32 z_m / tau (consumed).

    Returns (sums [5, c] all-reduced, a [c, Vr] or None, p_s [c, Vr] or None, bad [c] bool)."""
    lse_s, lse_m = _gather_lse([x_s, x_m], cfg.group)  # R1
    ell_s = x_s.sub_(lse_s.unsqueeze(-1))  # [c, Vr] in place: x_s is ours
    ell_m = x_m.sub_(lse_m.unsqueeze(-1))  # [M, c, Vr]
    bad = ~torch.isfinite(lse_s) | ~torch.isfinite(lse_m).all(dim=0)
    views_finite = torch.isfinite(ell_m).all(dim=0)
    entry_valid = views_finite & torch.isfinite(ell_s)
    weights = _view_weights(ell_m, cfg)  # [c, M]

    ell_m0 = torch.where(views_finite, ell_m, 0.0)
    ell_s0 = torch.where(entry_valid, ell_s, 0.0)
    g_logits = torch.where(views_finite, geometric_logits(ell_m0, weights), -math.inf)
    (log_z_g,) = _gather_lse([g_logits], cfg.group)  # R2
    log_q_g = g_logits - log_z_g.unsqueeze(-1)
    del g_logits
    any_view = torch.isfinite(ell_m).any(dim=0)
    log_q_a = torch.where(any_view, arithmetic_logprobs(torch.where(any_view, ell_m, 0.0), weights), -math.inf)
    if cfg.q_a_floor > 0:
        log_q_a = log_q_a.clamp_min(math.log(cfg.q_a_floor))
    gap = jensen_gap(torch.where(views_finite, log_q_a, 0.0), torch.where(views_finite, log_q_g, 0.0))
    stats = view_statistics(view_advantages(ell_m0, ell_s0), weights)
    del ell_m0, ell_m, x_m
    gate = torch.where(entry_valid, select_gate(cfg.gate)(stats, gap, cfg.gate_params, cfg.eps), 0.0)
    del stats
    if cfg.mode == "avsd":
        pre = log_q_g + gate * gap
    elif cfg.mode == "arithmetic":
        pre = log_q_a
    else:  # consensus; single (M = 1: q_G is the view)
        pre = log_q_g
    pre = torch.where(torch.isfinite(pre), pre, -math.inf)
    (log_z_t,) = _gather_lse([pre], cfg.group)  # R3
    log_q_t = pre - log_z_t.unsqueeze(-1)
    del pre, log_q_g, log_q_a
    bad |= ~torch.isfinite(log_z_g) | ~torch.isfinite(log_z_t)

    support = torch.ones((1, 1), dtype=torch.bool, device=ell_s.device).expand_as(ell_s)
    with torch.enable_grad():
        leaf = ell_s.detach().requires_grad_(need_grad)
        terms = generalized_jsd_elementwise(leaf, log_q_t, support, beta=cfg.beta)
        clipped = torch.zeros_like(terms)
        if cfg.clip_scope == "entry" and cfg.token_clip > 0:  # torch.clamp: no gradient where an entry is clipped
            clipped = (terms > cfg.token_clip).to(terms.dtype)
            terms = terms.clamp_max(cfg.token_clip)
        a = torch.autograd.grad(terms.sum(), leaf)[0] if need_grad else None  # d terms / d log p_s, elementwise
    entropy, mean_gate = epistemic_partial_sums(ell_s, gate, support)
    p_s = torch.where(torch.isfinite(ell_s), ell_s.exp(), 0.0)
    sums = torch.stack(
        [
            terms.detach().sum(dim=-1),
            a.sum(dim=-1) if need_grad else torch.zeros_like(entropy),
            entropy,
            mean_gate,
            (p_s * gap).sum(dim=-1),
            clipped.sum(dim=-1),
        ]
    )
    sums = all_reduce_sum(sums, cfg.group)  # R4
    return sums, a, p_s, bad


class _FullVocabAVSD(torch.autograd.Function):
    """Chunked full-vocabulary AVSD JSD; the student gradient is formed during forward (see module docstring)."""

    @staticmethod
    def forward(ctx, student_logits, loss_mask, view_logits, view_hidden, view_weight, cfg):
        shard, vr = cfg.shard, cfg.shard.num_real
        num_tokens = student_logits.shape[0]
        need_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(student_logits) if need_grad else None  # padding columns / masked tokens stay 0
        per_token = torch.zeros(len(_SUMS), num_tokens, dtype=torch.float32, device=student_logits.device)
        bad = torch.zeros(num_tokens, dtype=torch.bool, device=student_logits.device)
        for lo in range(0, num_tokens, cfg.tokens_per_chunk):
            hi = min(lo + cfg.tokens_per_chunk, num_tokens)
            x_s = student_logits[lo:hi, :vr].to(torch.float32, copy=True).div_(cfg.tau)  # [c, Vr]
            if view_logits is not None:
                x_m = view_logits[:, lo:hi, :vr].to(torch.float32, copy=True)  # [M, c, Vr]
            else:  # re-project the teacher's final hidden states with its output-layer shard
                x_m = torch.matmul(view_hidden[:, lo:hi], view_weight[:vr].t()).to(torch.float32)
            x_m.div_(cfg.tau)
            sums, a, p_s, bad[lo:hi] = _chunk(x_s, x_m, cfg, need_grad)
            per_token[:, lo:hi] = sums
            if need_grad:
                jsd = sums[0]
                live = loss_mask[lo:hi] & (jsd <= cfg.token_clip) if _clips_tokens(cfg) else loss_mask[lo:hi]
                scale = live.to(torch.float32) / cfg.tau  # hard clamp: clipped tokens get no gradient
                g = a.sub_(p_s * sums[1].unsqueeze(-1)).mul_(scale.unsqueeze(-1))
                grad[lo:hi, :vr] = g.to(grad.dtype)
        raise_if_invalid(None, shard.vocab_size, bad, logits_name="student/view logits", lead_shape=(num_tokens,))
        jsd = per_token[0].clamp_max(cfg.token_clip) if _clips_tokens(cfg) else per_token[0]
        loss_sum = torch.where(loss_mask, jsd, 0.0).sum()
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(per_token)
        return loss_sum, per_token

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_per_token):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None


def avsd_full_vocab_loss(
    student_logits: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    temperature: float,
    mode: str,
    gate: str,
    beta: float,
    token_clip: float,
    group: dist.ProcessGroup | None,
    clip_scope: str = "token",
    view_logits: torch.Tensor | None = None,
    view_hidden: torch.Tensor | None = None,
    view_output_weight: torch.Tensor | None = None,
    vocab_size: int | None = None,
    gate_params: GateParams | None = None,
    weight_mode: str = "uniform",
    eta: float = 5.0,
    q_a_floor: float = 0.0,
    eps: float = 1e-8,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Full-vocabulary AVSD loss: per token, generalized JSD_beta(p_s, q_T) over all V real tokens (spec 2.3 math,
    support = vocabulary; spec 7), summed over valid tokens.

    Args:
        student_logits: [N, V/tp] bf16/fp32 student logits shard, with grad.
        loss_mask: [N] bool valid completion tokens.
        temperature: tau.
        mode: 'avsd' | 'consensus' | 'arithmetic' | 'single' (M = 1).
        gate: 'avsd' | 'sigmoid' | 'consistency_exp'.
        beta: generalized-JSD beta in [0, 1].
        token_clip: clamp from above (hard: no gradient for what is clipped); 0 disables.
        clip_scope: 'token' clamps each token's JSD; 'entry' clamps each (token, vocabulary entry) term before the
            sum, as the reference's single-view full-vocabulary loss does (spec 2.4, §6 item 5).
        group: tensor-parallel group; None = one rank.
        view_logits: [M, N, V/tp] view logits shard; or instead
        view_hidden: [M, N, H] the views' final hidden states (after the final norm) and
        view_output_weight: [V/tp, H] the teacher's output-layer weight shard (logits = hidden @ weight.T per chunk).
        vocab_size: real vocabulary size; padding columns are ignored.
        gate_params: sigmoid / consistency_exp constants.
        weight_mode: 'uniform' | 'agreement_centrality' (one more all-reduce per chunk; not with gate 'avsd' or
            mode 'arithmetic').
        eta: agreement-centrality eta.
        q_a_floor: clamp q_A from below (the candidate path's 1e-8); default 0: q_A is a normalised mixture over
            the full vocabulary, computed in log space, and needs no floor (it would lift the tail's J).
        eps: gate denominators.
        chunk_size: tokens per chunk; None = max(1, 2**22 // V_real_loc).
    Returns:
        loss_sum: [] fp32, sum over loss_mask of the (clipped) per-token JSD; differentiable w.r.t. student_logits
            with q_T held constant.
        num_tokens: [] int32 = loss_mask.sum().
        metrics: detached fp32 [2] (sum, num_tokens): mv_jsd_mean, mv_jsd_clipped_frac (tokens whose JSD, or with
            clip_scope='entry' at least one of whose entries, was clipped), mv_student_entropy_mean,
            mv_gate_mean (lambda_t = sum_v p_s(v) g(v)), mv_gate_open_frac (lambda_t > 0.5),
            mv_jensen_gap_mean (sum_v p_s(v) J(v)).
    Collectives (per chunk of tokens): forward 3 `all_gather_into_tensor` ([2, (M+1) c], [2, c], [2, c] fp32) and
        1 `all_reduce(SUM)` ([6, c] fp32), plus 1 `all_reduce(SUM)` of [c, M(M-1)/2] with agreement_centrality;
        backward: none.
    Memory: the gradient [N, V/tp] (logits dtype) exists from the forward on; per chunk about (4M + 16) fp32
        [c, V/tp] temporaries (plus [M, c, V/tp] logits in the weight dtype on the hidden-state path).
    Raises:
        ValueError/TypeError: both or neither teacher inputs, shape/dtype mismatches, unknown mode/gate/
            weight_mode, forbidden combinations, NaN/+inf logits.
    """
    check_logits("student_logits", student_logits, ndim=2)
    num_tokens, local_width = student_logits.shape
    check_mask("loss_mask", loss_mask, (num_tokens,))
    tau = check_temperature(temperature)
    num_views = _check_teacher(view_logits, view_hidden, view_output_weight, num_tokens, local_width)
    check_choice("mode", mode, MODES)
    check_choice("weight_mode", weight_mode, WEIGHT_MODES)
    check_choice("clip_scope", clip_scope, CLIP_SCOPES)
    select_gate(gate)
    if mode == "single" and num_views != 1:
        raise ValueError(f"mode='single' needs exactly one view, got M={num_views}")
    if weight_mode == "agreement_centrality" and (mode == "arithmetic" or (gate == "avsd" and num_views > 1)):
        raise ValueError(
            f"weight_mode='agreement_centrality' is not allowed with mode={mode!r}, gate={gate!r} (spec 2.3: "
            "arithmetic uses uniform weights; the avsd gate requires them); use weight_mode='uniform'"
        )
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta!r} must be in [0, 1]")
    if not (math.isfinite(token_clip) and token_clip >= 0):
        raise ValueError(f"token_clip={token_clip!r} must be finite and >= 0 (0 disables)")
    if not 0.0 <= q_a_floor < 1.0:
        raise ValueError(f"q_a_floor={q_a_floor!r} must be in [0, 1)")
    shard = vocab_shard(local_width, group, vocab_size)
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (tokens per chunk) or None")
    default_tokens = max(1, DEFAULT_FULL_VOCAB_CHUNK_ELEMENTS // max(shard.num_real, 1))
    tokens = int(chunk_size) if chunk_size is not None else default_tokens
    cfg = _Config(
        shard, group, tau, mode, gate, GateParams() if gate_params is None else gate_params, weight_mode, float(eta),
        float(beta), float(token_clip), clip_scope, float(q_a_floor), float(eps), tokens,
    )
    teacher = [t.detach() if t is not None else None for t in (view_logits, view_hidden, view_output_weight)]
    loss_sum, per_token = _FullVocabAVSD.apply(student_logits, loss_mask, *teacher, cfg)

    count = loss_mask.sum()

    def token_sum(x: torch.Tensor) -> torch.Tensor:
        return torch.where(loss_mask, x.to(torch.float32), 0.0).sum()

    jsd, _, entropy, mean_gate, mean_gap, clipped_entries = per_token
    if not _clips_tokens(cfg):
        clipped = clipped_entries > 0
    else:
        clipped, jsd = jsd >= token_clip, jsd.clamp_max(token_clip)
    metrics = {
        "mv_jsd_mean": metric(token_sum(jsd), count),
        "mv_jsd_clipped_frac": metric(token_sum(clipped), count),
        "mv_student_entropy_mean": metric(token_sum(entropy), count),
        "mv_gate_mean": metric(token_sum(mean_gate), count),
        "mv_gate_open_frac": metric(token_sum(mean_gate > 0.5), count),
        "mv_jensen_gap_mean": metric(token_sum(mean_gap), count),
    }
    return loss_sum, count.to(torch.int32), metrics


def _check_teacher(view_logits, view_hidden, view_output_weight, num_tokens: int, local_width: int) -> int:
    """Exactly one teacher input form; returns M."""
    if (view_logits is None) == (view_hidden is None):
        raise ValueError("pass exactly one of view_logits [M, N, V/tp] or view_hidden [M, N, H] (+ view_output_weight)")
    if view_logits is not None:
        if view_output_weight is not None:
            raise ValueError("view_output_weight is only used with view_hidden, not with view_logits")
        check_logits("view_logits", view_logits, ndim=3)
        if tuple(view_logits.shape[1:]) != (num_tokens, local_width):
            raise ValueError(
                f"view_logits shape {tuple(view_logits.shape)} must be [M, N={num_tokens}, V/tp={local_width}]"
            )
        return view_logits.shape[0]
    if view_output_weight is None:
        raise ValueError("view_hidden needs view_output_weight [V/tp, H], the teacher's output-layer weight shard")
    check_logits("view_hidden", view_hidden, ndim=3)
    check_logits("view_output_weight", view_output_weight, ndim=2)
    hidden = view_hidden.shape[-1]
    if view_hidden.shape[1] != num_tokens or tuple(view_output_weight.shape) != (local_width, hidden):
        raise ValueError(
            f"view_hidden {tuple(view_hidden.shape)} / view_output_weight {tuple(view_output_weight.shape)} must be "
            f"[M, N={num_tokens}, H] / [V/tp={local_width}, H]"
        )
    if view_hidden.dtype != view_output_weight.dtype:
        raise TypeError(f"view_hidden dtype {view_hidden.dtype} != view_output_weight dtype {view_output_weight.dtype}")
    return view_hidden.shape[0]
