"""Memory, time and disk of one AVSD run layout, phase by phase: `estimate(cfg, ...)` -> `Estimate`.

Everything is per rank of the worst pipeline stage unless said otherwise; GiB = 2^30 bytes. The formulas, in the
order the phases run (trainer.py's `train_step`); P = this rank's parameters (`shapes.rank_parameters`), b = bytes
of `model.dtype`, L = prompts.max_prompt_tokens + rollout.max_new_tokens (memory: the caps, the worst micro-batch),
C = rollout.max_new_tokens, R = micro_batch_size * rollout.n rows per micro-batch, M = number of views.

Resident in every phase: weights P*b; Megatron DDP's grad buffer P*4 (`grad_reduce_in_fp32=True`; both buffers
with the distributed optimizer's alignment padding, `shapes.ddp_buffer_elements`); Adam: fp32 master + two moments
(12 bytes, or 8 when the params are fp32 and serve as master), / DP with the distributed optimizer; the teacher
copy with `avsd.teacher_storage: device` (frozen: θ₀ + swap buffer, 2*P*b; EMA: P*4 + P*b; without the swap buffer's
P*b when θ is restored from the fp32 master, `TrainConfig.teacher_restores_from_master`);
CUDA context + NCCL; a sleeping vLLM's residue (or, with rollout.sync_every > 1, the awake engine's whole
`gpu_memory_utilization` share: it never sleeps); an `engine: hf` rollout model (the whole model, no TP).

Transient, per phase:
* rollout: vLLM's `gpu_memory_utilization * memory` (weights / TP + KV cache + its activations; vLLM refuses to
  start unless that much is free next to the training state). KV capacity = that share - weights - activations;
  it must hold max_model_len tokens. `engine: hf`: the KV cache of the rank's batch.
* teacher_scoring: forward only over M*R rows of L tokens: one layer's input/output and largest intermediate at a
  time (nothing kept across layers), and on the last stage the [M*R*C, V/tp] bf16 completion logits of a whole
  micro-batch (`teacher_chunk_tokens` = None in training) plus the kernels' fp32 chunk, and the teacher outputs of
  every micro-batch of the step, kept for the update (sampled loss: [M, N] fp32; candidate: the top-k union's ids
  and M log-probs per candidate; full_vocab: [M, N, H] hidden states).
* student_update: stored activations of R rows * L tokens per layer, times the micro-batches in flight on this
  stage (1F1B: min(micro-batches, PP - stage)). recompute=full keeps only each layer's input (2H bytes/token) plus
  one layer recomputed with its gradients; none/selective keep per layer and token 2 bytes x (4H + [(Q + 2K) +
  (Q + K) + 2Q + 3F] / TP) (norm inputs, QKV before/after QK-norm and RoPE, attention output, SwiGLU input and
  output; flash attention keeps no S^2 scores, so selective = none here). Last stage: [R*C, V/tp] bf16 logits and
  their gradient plus the fp32 chunk, and the step's teacher outputs.
* weight_sync: the woken vLLM weights (whole model / TP) plus the largest tensor gathered over TP for export.
* checkpoint: nothing on the GPU (dist_checkpointing copies to host); host staging of the rank's shard.
An allocator-slack share is added on the tensors (not on vLLM's own pool).

Host per node: ranks/node x (process overhead + the pinned teacher copies: copy and swap buffer (no swap buffer
when θ is restored from the master), exactly their bytes: each is one flat buffer per dtype page-locked in place
with cudaHostRegister (`hook.teacher_kinds._SwappingTeacher`), so torch's pinned CachingHostAllocator and its
power-of-two rounding (ATen/core/CachingHostAllocator.h `c10::llvm::PowerOf2Ceil(size)`) are not involved), plus
the checkpoint staging of the node's shards.

Checkpoint disk: the model's tensors in model.dtype (padded vocab) + the optimizer state: with the distributed
optimizer ('dp_reshardable') fp32 master and both moments of the padded DDP bucket (12 bytes per element, the master
saved even for fp32 params), else fp32 copies + moments (12 bytes; 8 for fp32 params); x the checkpoints kept
(keep_last, or all when null: max_steps / save_every, + 1 for a final save off the cadence). Not counted: the
pickled objects (optimizer settings, layers' extra state; < 1 MiB) and hf_assets (the tokenizer files).

Time per step (seconds; each rank of a DP replica runs the same work; replicas in parallel):
* rollout: per engine (TP ranks, R_e = prompts per DP rank * n sequences, in waves of min(max_num_seqs, KV
  capacity / L)): prefill = forward FLOPs of the prompts / (TP * peak * mfu_prefill); each decode step = max(HBM
  read of weights / TP + the batch's KV / TP over hbm_efficiency, 2 * params * batch FLOPs at mfu_decode) + 2 TP
  all-reduce latencies per layer.
* teacher_scoring: forward FLOPs (shapes.forward_flops) / (TP * PP * peak * mfu_scoring) * the pipeline bubble
  (1 + (PP - 1) / micro-batches), plus the teacher swap (3 copies of the rank's weights: PCIe, or HBM on device;
  restored from the master: 1 copy plus the parameter all-gather over DP, like the optimizer step's).
* student_update: 3 x forward FLOPs (4 x with recompute=full) at mfu_update, same bubble; the optimizer step
  reads and writes its shard (HBM).
* grad_sync: reduce-scatter of the fp32 grads and all-gather of the params over DP (all-reduce without the
  distributed optimizer), ring cost (DP - 1) / DP x bytes / bandwidth; NVLink when the DP group stays in one node,
  the per-GPU InfiniBand link otherwise.
* weight_sync: TP all-gather of the weights + the copy into vLLM (HBM) + a fixed overhead, / rollout.sync_every.
* checkpoint: the node's shards / checkpoint_write_gbps, / save_every (save_every 0: once per run).

Not modelled: sequence / context parallelism and virtual pipeline stages (the trainer has no switch for them), the
code task's sandbox runs (`views` phase), and student prompts shorter than the teacher prompts (both rows are taken
at prompts.max_prompt_tokens: an upper bound for the student row).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from avsd_megatron.convert.qwen3_config import padded_vocab_size
from avsd_megatron.training.config import ConfigError, TrainConfig
from avsd_megatron.training.plan.hardware import Assumptions, GPUSpec
from avsd_megatron.training.plan.shapes import (
    ModelSource,
    ddp_buffer_elements,
    forward_flops,
    rank_parameters,
    total_parameters,
)

__all__ = ["PHASES", "TIME_PHASES", "Estimate", "PhaseMemory", "compute_seconds", "estimate", "optimizer_seconds",
           "scaling_rows", "swap_seconds"]

GIB = float(2**30)
PHASES = ("rollout", "teacher_scoring", "student_update", "weight_sync", "checkpoint")
TIME_PHASES = ("rollout", "teacher_scoring", "student_update", "grad_sync", "weight_sync", "checkpoint")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
LOGPROB_CHUNK_ELEMENTS = 1 << 22  # vocab_parallel.logprob.DEFAULT_CHUNK_ELEMENTS: the fp32 rows upcast at a time
RESIDENT = ("weights", "grad_buffer", "optimizer", "teacher_copy", "context_nccl", "vllm_asleep", "hf_engine")


@dataclass(frozen=True)
class PhaseMemory:
    """GPU memory of one rank in one phase (GiB per component; resident ones are held across phases)."""

    components: dict[str, float]
    total_gib: float
    capacity_gib: float
    stage: int
    """The pipeline stage this worst case is on."""
    note: str = ""

    @property
    def resident_gib(self) -> float:
        return sum(v for k, v in self.components.items() if k in RESIDENT)

    @property
    def transient_gib(self) -> float:
        return self.total_gib - self.resident_gib

    @property
    def margin_gib(self) -> float:
        return self.capacity_gib - self.total_gib

    @property
    def fits(self) -> bool:
        return self.margin_gib >= 0 and not self.note


@dataclass(frozen=True)
class Estimate:
    """The planner's answer for one config on one layout (module docstring; `to_json` for scripts)."""

    source: ModelSource
    gpu: GPUSpec
    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    num_microbatches: int
    prompts_per_step: int
    assumptions: Assumptions
    phases: dict[str, PhaseMemory]
    host: dict[str, float]
    checkpoint: dict[str, float]
    step_seconds: dict[str, float]
    run: dict[str, Any]
    params: dict[str, int]
    rollout_info: dict[str, float]
    vllm: bool
    """rollout.engine == 'vllm'."""
    scaling: list[dict[str, Any]] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.phases.values()) and self.host["fits"]

    @property
    def peak_gib(self) -> float:
        return max(p.total_gib for p in self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: self.phases[k].total_gib)

    def failures(self) -> list[str]:
        """One line per phase (or host memory) that does not fit, with the numbers."""
        out = []
        for name, p in self.phases.items():
            if not p.fits:
                why = p.note or f"needs {p.total_gib:.1f} GiB of {p.capacity_gib:.1f} GiB (short {-p.margin_gib:.1f})"
                out.append(f"{name}: {why}")
        if not self.host["fits"]:
            out.append(f"host memory: needs {self.host['total_gib']:.0f} GiB per node of "
                       f"{self.host['capacity_gib']:.0f} GiB")
        return out

    def to_json(self) -> dict[str, Any]:
        r = lambda x: round(x, 3)
        return {
            "model": {"name": self.source.name, "origin": self.source.origin, **self.params},
            "gpu": dataclasses.asdict(self.gpu),
            "layout": {"nodes": self.nodes, "gpus_per_node": self.gpus_per_node, "tp": self.tp, "pp": self.pp,
                       "dp": self.dp, "micro_batch_size": self.micro_batch_size,
                       "num_microbatches": self.num_microbatches, "prompts_per_step": self.prompts_per_step},
            "assumptions": dataclasses.asdict(self.assumptions),
            "fits": self.fits,
            "failures": self.failures(),
            "phases": {
                name: {"gpu_gib": r(p.total_gib), "fits": p.fits, "margin_gib": r(p.margin_gib),
                       "resident_gib": r(p.resident_gib), "transient_gib": r(p.transient_gib), "stage": p.stage,
                       "note": p.note, "components": {k: r(v) for k, v in p.components.items()}}
                for name, p in self.phases.items()
            },
            "peak_gib": r(self.peak_gib),
            "host_gib_per_node": r(self.host["total_gib"]),
            "host": {k: (r(v) if isinstance(v, float) else v) for k, v in self.host.items()},
            "checkpoint_gib": r(self.checkpoint["per_checkpoint_gib"]),
            "checkpoint": {k: (r(v) if isinstance(v, float) else v) for k, v in self.checkpoint.items()},
            "rollout": {k: r(v) for k, v in self.rollout_info.items()},
            "step_seconds": {k: r(v) for k, v in self.step_seconds.items()},
            "run": self.run,
            "scaling": self.scaling,
        }


def _gib(nbytes: float) -> float:
    return nbytes / GIB


def compute_seconds(flops: float, gpus: int, gpu: GPUSpec, mfu: float, *, pp: int = 1, micro: int = 1) -> float:
    """FLOPs of one DP replica spread over its `gpus` at `mfu` of peak, times the 1F1B bubble (1 + (PP-1)/m)."""
    return flops / (gpus * gpu.bf16_tflops * 1e12 * mfu) * (1 + (pp - 1) / micro)


def swap_seconds(rank_param_bytes: float, gpu: GPUSpec, a: Assumptions, *, teacher: str, storage: str,
                 restore_seconds: float | None = None) -> float:
    """The teacher swap of one scoring pass: θ -> swap buffer, teacher -> θ, swap buffer -> θ (3 copies of the
    rank's weights; `hook.teacher_kinds`), over PCIe (storage cpu) or HBM read + write (device); 0 for live.
    `restore_seconds` (θ restored from the fp32 master, `hook.master_restore`): only teacher -> θ, plus that time."""
    if teacher == "live":
        return 0.0
    copies, extra = (3, 0.0) if restore_seconds is None else (1, restore_seconds)
    if storage == "cpu":
        return copies * rank_param_bytes / (gpu.pcie_gbps * 1e9 * a.pcie_efficiency) + extra
    return 2 * copies * rank_param_bytes / (gpu.hbm_gbps * 1e9 * a.hbm_efficiency) + extra


def master_restore_seconds(rank_params: float, param_bytes: int, dp: int, gpu: GPUSpec, a: Assumptions, *,
                           dp_in_node: bool) -> float:
    """θ restored from the fp32 master (`hook.master_restore`): this rank's 1/DP shard read in fp32 and written in
    the param dtype (HBM), then the param all-gather over DP (ring, NVLink inside a node, else InfiniBand)."""
    dp_bw = (gpu.nvlink_gbps if dp_in_node else gpu.ib_gbps) * 1e9 * a.collective_efficiency
    hbm = (4 + param_bytes) * rank_params / dp / (gpu.hbm_gbps * 1e9 * a.hbm_efficiency)
    return hbm + (dp - 1) / dp * rank_params * param_bytes / dp_bw


def optimizer_seconds(shard_params: float, param_bytes: int, state_bytes: int, gpu: GPUSpec, a: Assumptions
                      ) -> float:
    """Adam over this rank's shard, HBM-bound: master + moments read and written, the fp32 grad read, the param
    written."""
    return shard_params * (2 * state_bytes + 4 + param_bytes) / (gpu.hbm_gbps * 1e9 * a.hbm_efficiency)


def estimate(cfg: TrainConfig, source: ModelSource, gpu: GPUSpec, *, nodes: int = 1, gpus_per_node: int = 8,
             assumptions: Assumptions | None = None, time_limit_s: float | None = None) -> Estimate:
    """Plan `cfg` on `nodes` x `gpus_per_node` GPUs of type `gpu` (module docstring). No scaling rows: see
    `scaling_rows`.

    Raises:
        ConfigError: the layout does not divide the world or the batch, TP exceeds a node, or the model does not
            split over TP / PP (the message names the field).
    """
    a = assumptions or Assumptions()
    dims = source.dims
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"nodes={nodes} and gpus_per_node={gpus_per_node} must be >= 1")
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    world = nodes * gpus_per_node
    if tp > gpus_per_node:
        raise ConfigError(f"parallel.tp={tp} exceeds the {gpus_per_node} GPUs of a node (TP stays on NVLink)")
    try:
        dp = cfg.parallel.data_parallel_size(world)
        micro = cfg.num_microbatches(world)
    except ConfigError as err:
        raise ConfigError(f"{err} (world = {nodes} nodes x {gpus_per_node} GPUs per node)") from None
    try:
        dims.check_parallel(tp, pp)
    except ValueError as err:
        raise ConfigError(f"parallel: {err}") from None

    b = DTYPE_BYTES[cfg.model.dtype]
    h, d, layers = dims.hidden_size, dims.head_dim, dims.num_layers
    q, kv, f = dims.num_attention_heads * d, dims.num_query_groups * d, dims.ffn_hidden_size
    vocab_local = padded_vocab_size(dims.vocab_size, tp) // tp
    n = cfg.rollout.n
    views = len(cfg.avsd.views)
    cap_len = cfg.prompts.max_prompt_tokens + cfg.rollout.max_new_tokens
    completion = cfg.rollout.max_new_tokens
    rows = cfg.micro_batch_size * n
    stages = [rank_parameters(dims, tp, pp, s) for s in range(pp)]
    model_bytes_full = total_parameters(dims, padded_for_tp=tp) * b
    largest_full_tensor = max(vocab_local * tp * h, 2 * f * h, (q + 2 * kv) * h) * b
    vllm = cfg.rollout.engine == "vllm"
    vllm_awake_always = vllm and cfg.rollout.sync_every > 1
    vllm_share = cfg.rollout.vllm.gpu_memory_utilization * gpu.memory_gib
    vllm_weights_gib = _gib(model_bytes_full / tp)
    asleep = a.vllm_asleep_gib * (0.3 if cfg.rollout.vllm.enforce_eager else 1.0)

    # vLLM KV cache (per engine rank) and what it means for the rollout batch
    kv_per_token = layers * 2 * kv * b / tp
    kv_budget_gib = vllm_share - vllm_weights_gib - a.vllm_activation_gib
    kv_tokens = max(0.0, kv_budget_gib) * GIB / kv_per_token
    rollout_info = {"kv_cache_gib": max(0.0, kv_budget_gib), "kv_cache_tokens": kv_tokens,
                    "sequences_per_engine": cfg.prompts_per_step // dp * n}

    per_stage: dict[str, list[PhaseMemory]] = {p: [] for p in PHASES}
    from_master = cfg.teacher_restores_from_master()  # the teacher then keeps no swap buffer (hook.master_restore)
    swap_b = 0 if from_master else b
    for s, rank in enumerate(stages):
        params = rank.count
        buffer = ddp_buffer_elements(rank, dp, distributed_optimizer=cfg.optim.distributed_optimizer)
        last, inflight = s == pp - 1, min(micro, pp - s)
        opt_bytes = (8 if b == 4 else 12) * (buffer / dp if cfg.optim.distributed_optimizer else params)
        teacher_dev = 0.0
        if cfg.avsd.teacher != "live" and cfg.avsd.teacher_storage == "device":
            teacher_dev = params * (swap_b + (4 if cfg.avsd.teacher == "ema" else b))
        base = {
            "weights": _gib(buffer * b),
            "grad_buffer": _gib(buffer * 4),
            "optimizer": _gib(opt_bytes),
            "teacher_copy": _gib(teacher_dev),
            "context_nccl": a.cuda_context_gib + a.nccl_gib,
            "vllm_asleep": (vllm_share if vllm_awake_always else asleep) if vllm else 0.0,
            "hf_engine": 0.0 if vllm else _gib(total_parameters(dims) * b),
        }
        transient: dict[str, dict[str, float]] = {p: {} for p in PHASES}
        if vllm:
            if not vllm_awake_always:
                transient["rollout"]["vllm_engine"] = vllm_share - asleep
        else:
            seqs = cfg.prompts_per_step // dp * n
            transient["rollout"]["hf_kv_cache"] = _gib(seqs * cap_len * layers * 2 * kv * b)
        # teacher scoring: forward only, one layer at a time
        t_tokens = views * rows * cap_len
        transient["teacher_scoring"]["activations"] = _gib(t_tokens * b * (2 * h + max(q + 2 * kv, 3 * f) / tp))
        def chunk(tokens: int) -> float:  # the kernels' fp32 working rows: upcast logits, exp, gradient
            return _gib(3 * 4 * min(LOGPROB_CHUNK_ELEMENTS, tokens * vocab_local))

        # what the scoring pass hands to the update, for every micro-batch of the step (last stage)
        tokens_step = micro * rows * completion
        if cfg.avsd.loss == "sampled":
            outputs = tokens_step * views * 4  # [M, N] fp32 view log-probs
        elif cfg.avsd.loss == "candidate":
            union = views * cfg.avsd.topk + 1  # ids [N, Kc] int64 + mask + [M, N, Kc] fp32 log-probs
            outputs = tokens_step * union * (8 + 1 + 4 * views)
        else:
            outputs = tokens_step * views * h * b  # final hidden states [M, N, H]
        if last:
            transient["teacher_scoring"]["teacher_outputs"] = _gib(outputs)
            transient["student_update"]["teacher_outputs"] = _gib(outputs)
            t_out = views * rows * completion
            transient["teacher_scoring"]["logits"] = _gib(t_out * vocab_local * b) + chunk(t_out)
        # student update
        s_tokens = rows * cap_len
        layer_bytes = 2 * (4 * h + ((q + 2 * kv) + (q + kv) + 2 * q + 3 * f) / tp)
        layers_here = layers // pp
        if cfg.model.recompute == "full":
            stored = inflight * layers_here * s_tokens * 2 * h + 2 * s_tokens * layer_bytes
        else:
            stored = inflight * layers_here * s_tokens * layer_bytes + s_tokens * layer_bytes
        transient["student_update"]["activations"] = _gib(stored)
        if last:
            transient["student_update"]["logits"] = (_gib(2 * rows * completion * vocab_local * b)
                                                     + chunk(rows * completion))
        if vllm:
            transient["weight_sync"]["vllm_weights"] = 0.0 if vllm_awake_always else vllm_weights_gib
        transient["weight_sync"]["export_gather"] = _gib(largest_full_tensor)
        for phase in PHASES:
            comps = dict(base, **transient[phase])
            tensors = sum(v for k, v in comps.items() if k not in ("context_nccl", "vllm_asleep", "vllm_engine"))
            comps["allocator_slack"] = a.allocator_slack * tensors
            note = ""
            if phase == "rollout" and vllm and kv_tokens < cfg.rollout.vllm.max_model_len:
                note = (f"vLLM's KV cache holds {kv_tokens:,.0f} tokens < rollout.vllm.max_model_len="
                        f"{cfg.rollout.vllm.max_model_len} (gpu_memory_utilization "
                        f"{cfg.rollout.vllm.gpu_memory_utilization} x {gpu.memory_gib} GiB - weights "
                        f"{vllm_weights_gib:.1f} GiB - activations {a.vllm_activation_gib} GiB)")
            per_stage[phase].append(PhaseMemory(comps, sum(comps.values()), gpu.memory_gib, s, note))
    phases = {p: max(per_stage[p], key=lambda m: m.total_gib) for p in PHASES}

    # host memory per node
    worst = max(stages, key=lambda r: r.count)
    pinned = 0
    if cfg.avsd.teacher != "live" and cfg.avsd.teacher_storage == "cpu":
        copy_bytes = 4 if cfg.avsd.teacher == "ema" else b
        pinned = worst.count * (copy_bytes + swap_b)  # the flat teacher (and swap) buffers, no rounding
    ranks_here = min(gpus_per_node, world)
    opt_full = 8 if b == 4 else 12
    # On disk: the model once (DP replicas write it once) + the optimizer state. The distributed optimizer
    # ('dp_reshardable') saves the fp32 master ('param', even when it is the fp32 parameter itself) and both moments
    # of the whole padded bucket; the plain optimizer its fp32 copies (bf16) and moments.
    opt_disk = [12 * ddp_buffer_elements(r, dp, distributed_optimizer=True) if cfg.optim.distributed_optimizer
                else opt_full * r.count for r in stages]
    ckpt_total = tp * sum(r.count * b + o for r, o in zip(stages, opt_disk, strict=True))
    # written in parallel by the DP ranks
    ckpt_rank = max(r.count * b + o for r, o in zip(stages, opt_disk, strict=True)) / dp
    host_total = ranks_here * (a.host_process_gib + _gib(pinned)) + _gib(ranks_here * ckpt_rank)
    host = {"process_gib": ranks_here * a.host_process_gib, "pinned_teacher_gib": _gib(ranks_here * pinned),
            "checkpoint_staging_gib": _gib(ranks_here * ckpt_rank), "total_gib": host_total,
            "capacity_gib": gpu.host_gib_per_node, "fits": host_total <= gpu.host_gib_per_node}
    save_every = cfg.checkpoint.save_every
    saves = (cfg.max_steps // save_every if save_every else 0) + (0 if save_every and not cfg.max_steps % save_every
                                                                    else 1)
    kept = min(cfg.checkpoint.keep_last, saves) if cfg.checkpoint.keep_last else saves
    checkpoint = {"per_checkpoint_gib": _gib(ckpt_total), "per_checkpoint_bytes": int(ckpt_total), "kept": kept,
                  "keep_last_gib": _gib(ckpt_total) * kept,
                  "saves": saves}

    # time per step
    peak = gpu.bf16_tflops * 1e12
    prompt_t = cfg.prompts.max_prompt_tokens * a.prompt_fill
    compl_t = completion * a.completion_fill
    len_t = prompt_t + compl_t
    seqs = cfg.prompts_per_step // dp * n
    total_params = total_parameters(dims)
    steps: dict[str, float] = {}
    if vllm:
        batch = max(1, min(cfg.rollout.vllm.max_num_seqs, seqs, int(kv_tokens // max(1, len_t)) or 1))
    else:
        batch = seqs
    waves = math.ceil(seqs / batch)
    prefill = forward_flops(dims, seqs, round(prompt_t), seqs) / (tp * peak * a.mfu_prefill)
    kv_read = batch * (prompt_t + compl_t / 2) * layers * 2 * kv * b / tp
    weight_read = (model_bytes_full if vllm else total_params * b) / (tp if vllm else 1)
    decode_mem = (weight_read + kv_read) / (gpu.hbm_gbps * 1e9 * a.hbm_efficiency)
    decode_flops = 2 * total_params * batch / ((tp if vllm else 1) * peak * a.mfu_decode)
    latency = 2 * layers * a.tp_allreduce_latency_us * 1e-6 if (vllm and tp > 1) else 0.0
    decode_step = max(decode_mem, decode_flops) + latency
    steps["rollout"] = prefill + waves * compl_t * decode_step
    rollout_info.update(decode_batch=batch, decode_waves=waves, decode_step_ms=decode_step * 1e3,
                        decode_hbm_bound=float(decode_mem >= decode_flops))
    gpus_replica = tp * pp
    rows_t, len_int, compl_int = views * rows, round(len_t), round(compl_t)
    score_flops = micro * forward_flops(dims, rows_t, len_int, rows_t * compl_int)
    dp_in_node = tp * pp * dp <= gpus_per_node
    dp_bw = (gpu.nvlink_gbps if dp_in_node else gpu.ib_gbps) * 1e9 * a.collective_efficiency
    ring = (dp - 1) / dp
    restore = master_restore_seconds(worst.count, b, dp, gpu, a, dp_in_node=dp_in_node) if from_master else None
    swap = swap_seconds(worst.count * b, gpu, a, teacher=cfg.avsd.teacher, storage=cfg.avsd.teacher_storage,
                        restore_seconds=restore)
    steps["teacher_scoring"] = compute_seconds(score_flops, gpus_replica, gpu, a.mfu_scoring, pp=pp, micro=micro) + swap
    passes = 4 if cfg.model.recompute == "full" else 3
    update_flops = micro * passes * forward_flops(dims, rows, len_int, rows * compl_int)
    shard = worst.count / (dp if cfg.optim.distributed_optimizer else 1)
    steps["student_update"] = (compute_seconds(update_flops, gpus_replica, gpu, a.mfu_update, pp=pp, micro=micro)
                               + optimizer_seconds(shard, b, opt_full, gpu, a))
    if cfg.optim.distributed_optimizer:
        grad_sync = ring * worst.count * (4 + b) / dp_bw
    else:
        grad_sync = 2 * ring * worst.count * 4 / dp_bw
    steps["grad_sync"] = grad_sync
    nvlink = gpu.nvlink_gbps * 1e9 * a.collective_efficiency
    refit = ((tp - 1) / tp * model_bytes_full / nvlink if tp > 1 else 0.0) + \
        2 * model_bytes_full / tp / (gpu.hbm_gbps * 1e9 * a.hbm_efficiency) + a.refit_overhead_s
    steps["weight_sync"] = refit / cfg.rollout.sync_every
    ckpt_write = ranks_here * ckpt_rank / (a.checkpoint_write_gbps * 1e9)
    steps["checkpoint"] = ckpt_write * saves / cfg.max_steps
    steps["total"] = sum(steps[p] for p in TIME_PHASES)
    run_s = cfg.max_steps * steps["total"] + a.startup_s
    run = {"max_steps": cfg.max_steps, "seconds": round(run_s, 1), "hours": round(run_s / 3600, 2),
           "checkpoint_write_s": round(ckpt_write, 1), "time_limit_s": time_limit_s,
           "fits_time_limit": None if time_limit_s is None else run_s <= time_limit_s}
    params = {"parameters": total_params, "parameters_per_rank": worst.count,
              "padded_vocab": padded_vocab_size(dims.vocab_size, tp)}
    return Estimate(source, gpu, nodes, gpus_per_node, tp, pp, dp, cfg.micro_batch_size, micro,
                    cfg.prompts_per_step, a, phases, host, checkpoint, steps, run, params, rollout_info, vllm)


SCALING_NODES = (1, 2, 4, 8)


def _micro_batch_for(prompts: int, dp: int, wanted: int) -> int | None:
    """The largest micro-batch <= `wanted` that divides this DP rank's prompts; None if DP > prompts."""
    if prompts % dp:
        return None
    per_rank = prompts // dp
    return max(m for m in range(1, min(wanted, per_rank) + 1) if per_rank % m == 0)


def scaling_rows(cfg: TrainConfig, source: ModelSource, gpu: GPUSpec, *, gpus_per_node: int = 8,
                 assumptions: Assumptions | None = None, nodes: tuple[int, ...] = SCALING_NODES
                 ) -> list[dict[str, Any]]:
    """Strong (prompts_per_step fixed) and weak (prompts_per_step x nodes) scaling at cfg's TP / PP: one row per
    mode and node count with the step time, the efficiency against one node and the phase that takes longest."""
    out = []
    for mode in ("strong", "weak"):
        base = None
        for count in nodes:
            prompts = cfg.prompts_per_step * (count if mode == "weak" else 1)
            world = count * gpus_per_node
            row: dict[str, Any] = {"mode": mode, "nodes": count, "gpus": world, "prompts_per_step": prompts}
            if world % (cfg.parallel.tp * cfg.parallel.pp):
                out.append(dict(row, feasible=False, reason="world not divisible by TP x PP"))
                continue
            dp = world // (cfg.parallel.tp * cfg.parallel.pp)
            mbs = _micro_batch_for(prompts, dp, cfg.micro_batch_size)
            if mbs is None:
                out.append(dict(row, dp=dp, feasible=False, reason=f"{prompts} prompts do not split over DP {dp}"))
                continue
            run_cfg = dataclasses.replace(cfg, prompts_per_step=prompts, micro_batch_size=mbs)
            est = estimate(run_cfg, source, gpu, nodes=count, gpus_per_node=gpus_per_node, assumptions=assumptions)
            step = est.step_seconds["total"]
            if base is None:
                base = (count, step)
            speed = base[1] / step
            efficiency = speed * base[0] / count if mode == "strong" else speed
            limit = max(TIME_PHASES, key=lambda p: est.step_seconds[p])
            out.append(dict(row, dp=dp, micro_batch_size=mbs, feasible=True, fits=est.fits,
                            peak_gib=round(est.peak_gib, 1), step_s=round(step, 1),
                            prompts_per_hour=round(prompts * 3600 / step, 1), efficiency=round(efficiency, 3),
                            limiting_phase=limit))
    return out
