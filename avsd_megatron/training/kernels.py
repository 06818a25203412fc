"""Which of Megatron's fused kernels this machine can run, and the TransformerConfig switches that follow.

    providers = detect_providers()                    # e.g. {"cuda", "triton", "transformer_engine"}
    switches = resolve_fusions(cfg.model, providers)  # {"apply_rope_fusion": True, ...}; raises if one asked is absent

Each `model.<fusion>` field is None (on exactly where its providers are present), True (required: a missing provider
is a ConfigError naming the field and the provider) or False (off). Detection imports the provider modules the way
megatron-core does (a failing import = absent), so a broken install counts as missing, not as present.

| TransformerConfig switch     | providers (layer spec)                           | megatron-core 0.19 gate          |
|------------------------------|--------------------------------------------------|----------------------------------|
| bias_activation_fusion       | cuda, triton (torch.compile)                     | jit.py:21, transformer/mlp.py:276 |
| apply_rope_fusion            | cuda, transformer_engine                         | transformer_config.py:2183       |
| masked_softmax_fusion        | cuda + transformer_engine (te) / Apex (local)    | dot_product_attention.py:104     |
| gradient_accumulation_fusion | cuda, fused_weight_gradient_mlp_cuda (+ TE, te)  | tensor_parallel/layers.py:1070   |

`check_sequence_packing` refuses `parallel.sequence_packing` without CUDA and Transformer Engine (THD attention).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection

import torch

from avsd_megatron.training.config import ConfigError, ModelConfig, ParallelConfig

__all__ = [
    "FUSIONS", "PACKING_PROVIDERS", "PROVIDER_MODULES", "check_sequence_packing", "detect_providers",
    "fusion_requirements", "resolve_fusions",
]

PROVIDER_MODULES = {
    "triton": "triton",  # torch.compile's GPU code generator
    "transformer_engine": "transformer_engine",
    "fused_weight_gradient_mlp_cuda": "fused_weight_gradient_mlp_cuda",  # Apex --cuda_ext
    "apex_masked_softmax": "scaled_upper_triang_masked_softmax_cuda",  # Apex / Megatron fused kernels (causal)
}
"""Provider name -> the module megatron-core imports for it ('cuda' is torch.cuda.is_available())."""
FUSIONS = ("bias_activation_fusion", "apply_rope_fusion", "masked_softmax_fusion", "gradient_accumulation_fusion")
PACKING_PROVIDERS = ("cuda", "transformer_engine")
"""What packed (THD) rows need: TE's fused attention with cu_seqlens (extensions/transformer_engine.py:2012-2045)."""


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # an extension that fails to load (ABI, driver) is as absent as a missing one
        return False
    return True


def detect_providers(importable: Callable[[str], bool] = _importable,
                     cuda_available: Callable[[], bool] = torch.cuda.is_available) -> frozenset[str]:
    """The providers present here: 'cuda' and the keys of PROVIDER_MODULES whose module imports."""
    found = {name for name, module in PROVIDER_MODULES.items() if importable(module)}
    return frozenset(found | ({"cuda"} if cuda_available() else set()))


def fusion_requirements(layer_spec: str) -> dict[str, tuple[str, ...]]:
    """Providers each fusion needs with `layer_spec` ('te' or 'local')."""
    te = ("transformer_engine",) if layer_spec == "te" else ()
    return {
        "bias_activation_fusion": ("cuda", "triton"),
        "apply_rope_fusion": ("cuda", "transformer_engine"),
        "masked_softmax_fusion": ("cuda", "transformer_engine" if layer_spec == "te" else "apex_masked_softmax"),
        "gradient_accumulation_fusion": ("cuda", "fused_weight_gradient_mlp_cuda", *te),
    }


def resolve_fusions(model: ModelConfig, providers: Collection[str]) -> dict[str, bool]:
    """TransformerConfig fusion switches for `model`'s fields on a machine with `providers`.

    Raises:
        ConfigError: a field set to True whose providers are not all present (names the field and what is missing).
    """
    switches = {}
    for name, needs in fusion_requirements(model.layer_spec).items():
        wanted = getattr(model, name)
        missing = [p for p in needs if p not in providers]
        if wanted and missing:
            what = ", ".join(f"{p} (import {PROVIDER_MODULES[p]})" if p in PROVIDER_MODULES else "a CUDA device"
                             for p in missing)
            raise ConfigError(f"model.{name}=True needs {what}, which is not available here; set model.{name} to "
                              "null (on where available) or false")
        switches[name] = not missing if wanted is None else bool(wanted)
    return switches


def check_sequence_packing(parallel: ParallelConfig, providers: Collection[str]) -> None:
    """Refuse `parallel.sequence_packing=True` on a machine without PACKING_PROVIDERS (no silent fallback to padding).

    Raises:
        ConfigError: naming parallel.sequence_packing and what is missing.
    """
    missing = [p for p in PACKING_PROVIDERS if p not in providers]
    if parallel.sequence_packing and missing:
        what = ", ".join(f"{p} (import {PROVIDER_MODULES[p]})" if p in PROVIDER_MODULES else "a CUDA device"
                         for p in missing)
        raise ConfigError(f"parallel.sequence_packing=True needs {what}, which is not available here: packed (THD) "
                          "rows run only in Transformer Engine's attention; set parallel.sequence_packing=false")
