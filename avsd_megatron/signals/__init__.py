"""The AVSD per-token math (spec 2.2, 2.3): view log-probs ℓ_m -> consensus, residual, gate, target; no communication.

| module      | what it holds                                                                                  |
|-------------|------------------------------------------------------------------------------------------------|
| `sampled`   | sampled-token targets (2.2): log q_G, log q_A, J, δ̄, C, g, T and A = T - ℓ_s for every mode/gate |
| `candidate` | candidate-set / full-distribution targets (2.3), view weights, generalized JSD_β, epistemic terms |
| `grpo`      | GRPO's group-normalised advantages (the paper's RL baseline)                                     |

Plain torch on whole tensors: never `torch.distributed`, never Megatron (`tests/test_layering.py`). The
vocab-sharded versions of these quantities are `avsd_megatron.vocab_parallel`.
"""

from avsd_megatron.signals.candidate import (
    WEIGHT_MODES,
    CandidateTargets,
    EpistemicTerms,
    agreement_centrality_weights,
    candidate_epistemic_terms,
    candidate_targets,
    generalized_jsd,
    generalized_jsd_elementwise,
)
from avsd_megatron.signals.grpo import REWARD_SCALES, GroupAdvantages, group_advantages
from avsd_megatron.signals.sampled import (
    GATE_MODES,
    MODES,
    GateParams,
    SampledTokenTargets,
    ViewStatistics,
    agreement,
    arithmetic_logprobs,
    epistemic_sampled_token_term,
    gate_avsd,
    gate_consistency_exp,
    gate_sigmoid,
    geometric_logits,
    jensen_gap,
    sampled_token_targets,
    select_gate,
    view_advantages,
    view_statistics,
)

__all__ = [
    "GATE_MODES",
    "MODES",
    "REWARD_SCALES",
    "WEIGHT_MODES",
    "CandidateTargets",
    "EpistemicTerms",
    "GateParams",
    "GroupAdvantages",
    "SampledTokenTargets",
    "ViewStatistics",
    "agreement",
    "agreement_centrality_weights",
    "arithmetic_logprobs",
    "candidate_epistemic_terms",
    "candidate_targets",
    "epistemic_sampled_token_term",
    "gate_avsd",
    "gate_consistency_exp",
    "gate_sigmoid",
    "generalized_jsd",
    "generalized_jsd_elementwise",
    "geometric_logits",
    "group_advantages",
    "jensen_gap",
    "sampled_token_targets",
    "select_gate",
    "view_advantages",
    "view_statistics",
]
