"""The policy as Megatron-Core sees it: `GPTModel` from an HF Qwen3 config.json, initial weights, DDP, optimizer.

    gpt = build_gpt_model(cfg, read_hf_config(cfg.model.hf_path), on_cpu=True)   # this rank's TP/PP shard
    load_megatron_checkpoint(gpt, initial_checkpoint(cfg))                         # rank 0 converts HF once
    model = wrap_ddp(gpt, cfg)                # Float16Module for bf16/fp16, Megatron DDP (grads reduced in fp32)
    optimizer = build_optimizer(model, cfg)   # Megatron Adam (optionally the distributed optimizer)

Modes come from `TrainConfig` fields, each read once here: `model.dtype`, `model.layer_spec` ('local' on CPU, 'te'
on GPU), `model.recompute`, the `model.*_fusion` switches (`kernels.resolve_fusions`: on where their provider is
detected), `parallel.sequence_parallel`, `parallel.sequence_packing` (only checked here: it needs CUDA and TE; the
trainer packs the batches), the DDP fields of `parallel` (overlap_grad_reduce, overlap_param_gather,
grad_reduce_in_fp32, ddp_bucket_size) and `optim.distributed_optimizer`. `calculate_per_token_loss=True` and
`finalize_model_grads_func` are always set (AVSDStep requires both). `on_cpu` adds the TransformerConfig switches
CPU runs need (no fused kernels, CPU init, plain p2p; see `runtime.megatron_cpu` for the runtime patches).
"""

from __future__ import annotations

import shutil
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from avsd_megatron.convert import (
    convert_hf_to_megatron,
    qwen3_config_to_transformer_config,
    qwen3_gpt_model_kwargs,
    read_conversion_metadata,
)
from avsd_megatron.convert.fingerprint import hf_fingerprint
from avsd_megatron.training.config import TrainConfig
from avsd_megatron.training.kernels import check_sequence_packing, detect_providers, resolve_fusions
from avsd_megatron.training.notices import notice

__all__ = [
    "DTYPES", "build_gpt_model", "build_optimizer", "ddp_config", "initial_checkpoint", "stale_init_reason",
    "transformer_overrides", "wrap_ddp",
]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
INIT_DIR = "megatron_init"
CONVERT_TIMEOUT = timedelta(hours=2)
"""How long the other ranks wait for rank 0's in-job HF -> Megatron conversion (`initial_checkpoint`)."""
# TransformerConfig switches for CPU runs (see testing.megatron_cpu for the runtime patches); the tests' tiny models
# use the same dict.
CPU_OVERRIDES = dict(
    use_cpu_initialization=True,  # master-weight init then scatter: same logical weights at any TP
    gradient_accumulation_fusion=False,  # the fused wgrad kernel needs TE/apex on CUDA
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    apply_rope_fusion=False,
    persist_layer_norm=False,
    batch_p2p_comm=False,  # batched P2P calls torch.cuda.synchronize(); gloo takes the isend/irecv path
)
RECOMPUTE = {
    "none": {},
    "selective": dict(recompute_granularity="selective"),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}


def transformer_overrides(cfg: TrainConfig, *, on_cpu: bool, providers: frozenset[str] | None = None) -> dict:
    """The TransformerConfig switches of `cfg` on this machine (`providers`: `kernels.detect_providers()`).

    Raises:
        ConfigError: a model.*_fusion field set to True whose provider is absent (on CPU: every one), or
            parallel.sequence_packing without CUDA and Transformer Engine.
    """
    providers = detect_providers() if providers is None else providers
    check_sequence_packing(cfg.parallel, providers)  # THD rows need TE's attention on CUDA
    overrides = dict(calculate_per_token_loss=True, **RECOMPUTE[cfg.model.recompute])
    overrides |= resolve_fusions(cfg.model, providers)
    overrides["sequence_parallel"] = cfg.parallel.sequence_parallel
    if on_cpu:
        from megatron.core.transformer.enums import AttnBackend

        overrides |= CPU_OVERRIDES | {"attention_backend": AttnBackend.local}
    return overrides


def build_gpt_model(cfg: TrainConfig, hf_config: dict, *, on_cpu: bool, providers: frozenset[str] | None = None) -> Any:
    """This rank's `GPTModel` (random init; load weights next) for `hf_config` at `cfg.parallel`'s TP/PP."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.models.gpt import GPTModel

    overrides = transformer_overrides(cfg, on_cpu=on_cpu, providers=providers)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    config = qwen3_config_to_transformer_config(
        hf_config, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        params_dtype=DTYPES[cfg.model.dtype], overrides=overrides,
    )
    config.finalize_model_grads_func = finalize_model_grads
    model = GPTModel(
        config,
        _layer_spec(cfg.model.layer_spec),
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
        parallel_output=True,
        **qwen3_gpt_model_kwargs(hf_config, tensor_model_parallel_size=tp),
    )
    return model if on_cpu else model.cuda()


def _layer_spec(name: str) -> Any:
    from megatron.core.models.gpt import gpt_layer_specs

    if name == "te":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")


def ddp_config(cfg: TrainConfig) -> Any:
    """Megatron's `DistributedDataParallelConfig` from `parallel`'s DDP fields and `optim.distributed_optimizer`."""
    from megatron.core.distributed import DistributedDataParallelConfig

    p = cfg.parallel
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=p.grad_reduce_in_fp32,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        bucket_size=p.ddp_bucket_size,
        use_distributed_optimizer=cfg.optim.distributed_optimizer,
    )


def wrap_ddp(gpt: Any, cfg: TrainConfig) -> Any:
    """Float16Module (bf16/fp16) + Megatron DDP. With overlap_grad_reduce the schedule gets `model.no_sync`, as
    Megatron-LM's training loop wires it, so only the last micro-batch's backward hooks count towards launching a
    bucket's reduction (distributed/param_and_grad_buffer.py:870). Without it every micro-batch counts, which is
    only right while the number of micro-batches never changes from the first step's (its counts become the
    "golden" ones, :292). The parameter all-gather of overlap_param_gather runs from DDP's forward pre-hooks
    (distributed/distributed_data_parallel.py:394)."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    module = gpt if cfg.model.dtype == "float32" else Float16Module(gpt.config, gpt)
    model = DistributedDataParallel(gpt.config, ddp_config(cfg), module)
    if cfg.parallel.overlap_grad_reduce:
        gpt.config.no_sync_func = model.no_sync
    return model


def build_optimizer(model: Any, cfg: TrainConfig) -> Any:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = cfg.optim
    opt_config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0],
        adam_beta2=o.betas[1], adam_eps=o.eps, clip_grad=o.max_grad_norm,
        bf16=cfg.model.dtype == "bfloat16", fp16=cfg.model.dtype == "float16",
        params_dtype=DTYPES[cfg.model.dtype], use_distributed_optimizer=o.distributed_optimizer,
    )
    with warnings.catch_warnings():
        # megatron/core/optimizer/__init__.py:1019 imports megatron.core.models.mimo to check for a MimoModel, and
        # mimo/config/base_configs.py:37 warns at class definition, i.e. on that import; we build no Mimo model
        warnings.filterwarnings("ignore", message=r"MimoModelConfig is experimental", category=UserWarning)
        return get_megatron_optimizer(opt_config, [model], use_gloo_process_groups=False)


def stale_init_reason(init_dir: Path, hf_path: str | Path) -> str | None:
    """Why the converted `init_dir` is not a conversion of `hf_path` as it is now (None = it is): no
    hf_conversion.json, no recorded fingerprint (an older conversion), or another `convert.hf_fingerprint`."""
    meta = read_conversion_metadata(init_dir) if (init_dir / "metadata.json").is_file() else None
    if meta is None:
        return f"{init_dir} is not a complete conversion (no metadata.json / hf_conversion.json)"
    recorded = meta.get("source_fingerprint")
    if recorded is None:
        return f"{init_dir}/hf_conversion.json records no source fingerprint (converted by an older version)"
    current = hf_fingerprint(hf_path)
    if recorded != current:
        return (f"{init_dir} was converted from {meta.get('source')} ({recorded[:19]}...), but model.hf_path="
                f"{str(hf_path)!r} now has another config / weights ({current[:19]}...)")
    return None


def initial_checkpoint(cfg: TrainConfig) -> Path:
    """model.megatron_checkpoint (taken as given: it may hold weights trained past hf_path's), or
    <output_dir>/megatron_init converted from model.hf_path by rank 0. An existing megatron_init is reused only when
    its recorded source fingerprint (`convert.hf_fingerprint`: config.json, weight index, safetensors headers and
    edges) matches model.hf_path's now; otherwise it is deleted and converted again, with a notice saying why.

    While rank 0 converts, the other ranks wait in a barrier of a gloo group made for it with CONVERT_TIMEOUT: the
    default group's NCCL barrier would hit its collective timeout (10 min by default) during an 8B conversion. The
    recipes convert in a separate job (`convert_in`) and pass model.megatron_checkpoint, so this is for small runs.
    """
    if cfg.model.megatron_checkpoint:
        return Path(cfg.model.megatron_checkpoint)
    out = Path(cfg.output_dir) / INIT_DIR
    wait_group = dist.new_group(backend="gloo", timeout=CONVERT_TIMEOUT) if dist.get_world_size() > 1 else None
    try:
        if dist.get_rank() == 0 and out.exists():
            reason = stale_init_reason(out, cfg.model.hf_path)
            if reason is not None:
                notice(f"converting {cfg.model.hf_path} again into {out}: {reason}", warning=True)
                shutil.rmtree(out)
        if dist.get_rank() == 0 and not out.exists():  # a failed conversion leaves no directory
            out.parent.mkdir(parents=True, exist_ok=True)
            convert_hf_to_megatron(cfg.model.hf_path, out, tensor_model_parallel_size=cfg.parallel.tp,
                                   pipeline_model_parallel_size=cfg.parallel.pp, dtype=DTYPES[cfg.model.dtype])
    finally:
        if wait_group is not None:
            dist.barrier(group=wait_group)
            dist.destroy_process_group(wait_group)
    return out
