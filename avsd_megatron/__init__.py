"""avsd-megatron: Adaptive-View Self-Distillation (AVSD, arXiv 2605.20643) on Megatron-Core.

Layers depend one way:
    signals (pure per-token math) <- vocab_parallel (TP-sharded kernels) <- loss / teacher (Megatron hook)
    <- trainer (rollout -> score -> update -> sync) <- examples/ recipes.
"""

__version__ = "0.1.0"
