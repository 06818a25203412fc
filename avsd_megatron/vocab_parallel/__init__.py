"""Tensor-parallel (vocab-sharded) AVSD kernels: every TP collective of the project lives in this package.

Megatron's output layer is vocab-parallel: TP rank r holds logits for columns [r * V/tp, (r + 1) * V/tp) of the
padded vocabulary (columns >= the real `vocab_size` are padding and ignored). Each kernel computes AVSD exactly as
if the full vocabulary were on one device, with the per-token math from `avsd_megatron.signals.sampled` /
`avsd_megatron.signals.candidate` and only the normalisers / gathers done here. Every function that communicates
takes `group` explicitly; `group=None` means one rank holding the whole vocabulary (no collective), never a
fallback to a global group. This package imports torch, torch.distributed and `avsd_megatron.signals.sampled` /
`signals.candidate` only -- never Megatron (`parallel_state`).

Collectives per call (forward; every backward is collective-free):

| function                            | collectives over `group`                                                   |
|-------------------------------------|----------------------------------------------------------------------------|
| `sampled_token_logprobs`            | 1 all-gather [3, R] fp32 (max, sum-exp, z_y), R = rows, whatever M and N    |
| `avsd_sampled_token_loss`           | 1 (the student's `sampled_token_logprobs`)                                 |
| `distributed_topk`                  | 1 all-gather [2, M, N, k] fp64 (values, ids), all views together           |
| `candidate_union`                   | 0                                                                          |
| `gather_candidate_logits`           | 1 all-reduce SUM of all streams' [.., N, Kc] fp32 together                 |
| `teacher_candidates`                | 2 (top-k, view candidate logits)                                           |
| `avsd_candidate_loss`               | 2 (top-k, student + view candidate logits in one all-reduce)               |
| `avsd_candidate_loss_from_teacher`  | 1 (student candidate logits)                                               |
| `avsd_full_vocab_loss`              | 4 per token chunk (3 all-gathers of (max, sum-exp), 1 all-reduce of sums), |
|                                     | 5 with weight_mode='agreement_centrality'                                  |

| module            | what it holds                                                                        |
|-------------------|--------------------------------------------------------------------------------------|
| `collectives`     | the two collective wrappers (all-gather, all-reduce) and the vocab-shard layout       |
| `checks`          | input validation (errors name the argument and value)                                |
| `logprob`         | `sampled_token_logprobs`: sharded log p(y), analytic chunked backward                 |
| `sampled_loss`    | `avsd_sampled_token_loss`: the default AVSD loss in Megatron's per-token form;        |
|                   | `policy_gradient_loss`: the same loss with given advantages (GRPO)                   |
| `candidates`      | distributed top-k, vectorised candidate union, candidate-logit gather                 |
| `candidate_loss`  | candidate-set AVSD loss (generalized JSD on K_t)                                      |
| `full_vocab`      | full-vocabulary AVSD loss, chunked, teacher logits or hidden states                   |
"""

from avsd_megatron.vocab_parallel.candidate_loss import (
    CandidateSet,
    avsd_candidate_loss,
    avsd_candidate_loss_from_teacher,
    teacher_candidates,
)
from avsd_megatron.vocab_parallel.candidates import TopK, candidate_union, distributed_topk, gather_candidate_logits
from avsd_megatron.vocab_parallel.collectives import VocabShard, vocab_shard
from avsd_megatron.vocab_parallel.full_vocab import avsd_full_vocab_loss
from avsd_megatron.vocab_parallel.logprob import sampled_token_logprobs
from avsd_megatron.vocab_parallel.sampled_loss import avsd_sampled_token_loss, policy_gradient_loss

__all__ = [
    "CandidateSet",
    "TopK",
    "VocabShard",
    "avsd_candidate_loss",
    "avsd_candidate_loss_from_teacher",
    "avsd_full_vocab_loss",
    "avsd_sampled_token_loss",
    "candidate_union",
    "distributed_topk",
    "gather_candidate_logits",
    "policy_gradient_loss",
    "sampled_token_logprobs",
    "teacher_candidates",
    "vocab_shard",
]
