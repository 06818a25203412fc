"""Run configuration: one frozen dataclass per concern, composed into `TrainConfig`, loaded from / dumped to YAML.

Defaults are the paper's released math setting (spec §1, `scripts/math/train_avsd_qwen3_8b.sh`); a default that
differs from the reference says so in its field docstring, and so does every flag that switches a deviation on.
Deviations that are not switchable (for the record, spec §6): full-parameter training instead of LoRA r=64 (the
frozen teacher is a copy of θ₀, `teacher_kinds`), fp32 log-probs instead of bf16, packed sequences with contiguous
positions instead of right padding, rollouts seeded per request instead of by process rank, NaN or +inf logits
and log-probs raise an error naming the tensor and index (the reference drops such tokens silently from the loss),
and the candidate loss ranks each view's top-k on the logits z as the model emits them (the reference ranks
bf16(z / τ), whose rounding can merge or reorder near-ties and so change the candidate set). The pad-id mask, the
gradient through the epistemic gate, the single-view clip and arithmetic mode's token drop follow the reference by
default (avsd.train_pad_tokens, avsd.detach_gate, avsd.single_view_clip; `signals.sampled_token_targets`).

| section      | dataclass          | concern                                                       |
|--------------|--------------------|---------------------------------------------------------------|
| `model`      | `ModelConfig`      | weights, dtype, layer spec, recompute, fused kernels          |
| `parallel`   | `ParallelConfig`   | TP, PP, SP (DP is derived from the world size), DDP overlap   |
| `rollout`    | `rollout.config.RolloutConfig` | engine, sampling, weight sync; `rollout.vllm`: `VLLMConfig` |
| `avsd`       | `AVSDConfig`       | views, target mode, gate, teacher kind, loss and normaliser   |
| `grpo`       | `GRPOConfig`       | rewards and advantage scaling of the GRPO baseline (`algorithm: grpo`) |
| `optim`      | `OptimConfig`      | AdamW, clipping, LR schedule, seed                            |
| `memory`     | `MemoryConfig`     | what training frees while the rollout engine generates        |
| `data`       | `data.DataConfig`  | training rows                                                 |
| `prompts`    | `prompts.PromptConfig` | thinking on/off per side, prompt length cap               |
| `sandbox`    | `CodeSandboxConfig` | how student code runs for the code feedback view (data.task=code) |
| `logging`    | `LoggingConfig`    | jsonl / TensorBoard, cadences                                 |
| `checkpoint` | `CheckpointConfig` | where and how often to save, how many to keep, resume         |

YAML: `load_config(path)` builds a `TrainConfig` from a mapping of these sections (every key optional, defaults
fill the rest); an unknown key, a value of the wrong type or a failed check raises `ConfigError` naming the file
and the dotted field. `to_dict(cfg)` gives plain dicts/lists back (`dump_config` writes them), and
`load_config(dump_config(cfg))` == cfg. `apply_overrides(cfg, ['optim.lr=1e-5'])` is the `--set` of `train`, `plan`
and the recipes (values parsed as YAML, then the whole config re-validated). The dataclasses are plain, with
defaults, so NeMo-Run can wrap them (`run.Config(TrainConfig, optim=run.Config(OptimConfig, lr=1e-5))`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from avsd_megatron.data.examples import DataConfig
from avsd_megatron.data.prompts import PromptConfig
from avsd_megatron.data.views import CODE_VIEWS, MATH_VIEWS, normalize_views
from avsd_megatron.hook.loss import AVSD_LOSS_KINDS, NORMALIZATIONS, AVSDLossConfig
from avsd_megatron.hook.teacher_kinds import RESTORES, STORAGES, TEACHER_KINDS, TeacherConfig
from avsd_megatron.rollout.config import RolloutConfig
from avsd_megatron.signals.candidate import WEIGHT_MODES
from avsd_megatron.signals.grpo import REWARD_SCALES
from avsd_megatron.signals.sampled import GATE_MODES, MODES, GateParams
from avsd_megatron.verify.sandbox import SandboxConfig
from avsd_megatron.vocab_parallel.full_vocab import CLIP_SCOPES

__all__ = [
    "AVSDConfig",
    "CheckpointConfig",
    "CodeSandboxConfig",
    "ConfigError",
    "GRPOConfig",
    "LoggingConfig",
    "MemoryConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "TrainConfig",
    "apply_overrides",
    "dump_config",
    "from_dict",
    "load_config",
    "to_dict",
]

DTYPES = ("bfloat16", "float16", "float32")
LAYER_SPECS = ("local", "te")
RECOMPUTE = ("none", "selective", "full")
LR_DECAYS = ("linear", "constant", "cosine")
SWAPPING_TEACHERS = ("frozen", "ema")  # teacher kinds whose weights are copied into the model for scoring
PAPER_MODEL = "Qwen/Qwen3-8B"
PAPER_DATASET = "siyanzhao/Openthoughts_math_30k_opsd"


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message names the file (if any) and the dotted field."""


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {choices}")


def _at_least(name: str, value: Any, low: float) -> None:
    if value < low:
        raise ConfigError(f"{name}={value!r} must be >= {low}")


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be finite")


# ----------------------------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class ModelConfig:
    """The policy network (student = teacher)."""

    hf_path: str = PAPER_MODEL
    """Local HF checkpoint directory (config.json, tokenizer, safetensors); hub ids are not downloaded (fetch one
    first, e.g. `huggingface-cli download Qwen/Qwen3-8B --local-dir Qwen3-8B`). The default names the paper's
    model and is meant to be overridden. The architecture and tokenizer always come from here; so do the initial weights unless megatron_checkpoint is
    set. The rollout engine is built from it too."""
    megatron_checkpoint: str | None = None
    """Initial weights from a Megatron dist checkpoint (`convert.convert_hf_to_megatron` output) instead of the
    HF safetensors; it must have been converted from hf_path's architecture."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Parameter / activation dtype (the reference: bf16). Log-probs are fp32 regardless (spec §6 item 2)."""
    layer_spec: Literal["local", "te"] = "te"
    """Megatron layer spec: 'te' (Transformer Engine, GPU) or 'local' (plain PyTorch; CPU and tests)."""
    recompute: Literal["none", "selective", "full"] = "full"
    """Activation recomputation: 'full' recomputes every layer (uniform, 1 layer per checkpoint), 'selective'
    only the attention core (Megatron's default selective set), 'none' keeps every activation. The default DEVIATES
    from Megatron-Bridge's Qwen3 recipes (recompute_granularity=None, i.e. 'none', in
    recipes/qwen/qwen3.py qwen3_8b_pretrain_config), which train without a colocated rollout engine; AVSD keeps the
    reference's HF gradient checkpointing ('full') because vLLM holds rollout.vllm.gpu_memory_utilization of the
    GPU next to training. `benchmarks/gpu_step.py --recompute` measures the three."""
    bias_activation_fusion: bool | None = None
    """Megatron's fused SwiGLU (`fusions/fused_bias_swiglu.py`, torch.compile'd: megatron/core/jit.py:21; used by
    transformer/mlp.py:276). None = on where CUDA and triton are present (Megatron-Bridge's Qwen provider turns it
    on); True = required (an error names what is missing); False = off. Off on CPU."""
    apply_rope_fusion: bool | None = None
    """Transformer Engine's fused RoPE (models/common/embeddings/rope_utils.py:21,316; TransformerConfig refuses
    it without TE, transformer_config.py:2183). None = on where CUDA and TE are present (Megatron-Bridge's Qwen
    provider turns it on); True = required; False = off."""
    masked_softmax_fusion: bool | None = None
    """Fused causal softmax. Read only by the local spec's attention (transformer/dot_product_attention.py:104 ->
    fusions/fused_softmax.py, Apex's `scaled_upper_triang_masked_softmax_cuda`; Megatron itself falls back to torch
    softmax outside the kernel's shapes, fused_softmax.py:238); the TE spec's attention is TE's fused attention,
    which this flag does not change. None = on where its provider is present (TE for the TE spec, the Apex
    extension for the local spec; Megatron-Bridge's Qwen3Bridge sets masked_softmax_fusion=True); True = required;
    False = off."""
    gradient_accumulation_fusion: bool | None = None
    """Weight-gradient GEMM accumulating straight into DDP's fp32 main_grad. TE's linears take it natively
    (extensions/transformer_engine.py:1037), but the output layer is Megatron's ColumnParallelLinear, which needs
    Apex's `fused_weight_gradient_mlp_cuda` and raises without it (tensor_parallel/layers.py:49,1070). None = on
    where CUDA, that extension (and TE, for the TE spec) are present; True = required; False = off.
    persist_layer_norm is not a field: it selects Apex's persistent LayerNorm kernel (fusions/fused_layer_norm.py:99)
    and Qwen3 uses RMSNorm (TE's, or torch's, which refuses the flag: transformer/torch_norm.py:48)."""

    def __post_init__(self) -> None:
        if not self.hf_path:
            raise ConfigError("model.hf_path must name a local HF checkpoint directory")
        _choice("model.dtype", self.dtype, DTYPES)
        _choice("model.layer_spec", self.layer_spec, LAYER_SPECS)
        _choice("model.recompute", self.recompute, RECOMPUTE)


@dataclass(frozen=True)
class ParallelConfig:
    """Megatron model parallelism. Data parallelism takes the remaining ranks (`data_parallel_size`)."""

    tp: int = 1
    """Tensor-parallel size (also the vLLM engine's TP: one engine per Megatron TP group)."""
    pp: int = 1
    """Pipeline-parallel size."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1 and model.layer_spec='te': the torch norms of the local spec
    refuse it, transformer/torch_norm.py:50): norms and dropout run on S/tp positions, TP all-reduces become
    reduce-scatter + all-gather; the trainer pads every row to a multiple of tp (`build_avsd_batch`'s
    pad_to_multiple_of). Default off, as in Megatron-Bridge's Qwen3-8B recipe (sequence_parallel=False at TP4,
    recipes/qwen/qwen3.py)."""
    sequence_packing: bool = False
    """Pack each micro-batch's rows back to back (THD: `hook/packing.py`, one [1, T] row per stream with
    PackedSeqParams cu_seqlens, positions restarting per row) instead of padding every row to the longest, for the
    student and the M view rows, as NeMo-RL, veRL and slime do. Needs Transformer Engine's attention (the local
    spec's refuses packed input, megatron/core/transformer/dot_product_attention.py:153), so model.layer_spec='te',
    a CUDA device and an importable transformer_engine; refused otherwise, naming this field. Off by default until
    its GPU equivalence check (`benchmarks/gpu_step.py --variants avsd,avsd/packed --ragged`, run by the gpu test of
    tests/hook/test_packing.py) has passed on a device; then it is meant to be on where TE is present. On CPU the
    packing is tested around the attention, and the model with THD-semantics local attention (same file)."""
    overlap_grad_reduce: bool = True
    """DDP: start each gradient bucket's all-reduce / reduce-scatter during the backward pass (the trainer then
    hands Megatron's schedule `model.no_sync`, so only the last micro-batch's backward launches it). On, as in
    Megatron-Bridge's recipes (recipes/common.py _pretrain_common ddp). It does not race with the teacher swap:
    the swap touches parameters, the overlap grad buffers, and `finalize_model_grads` waits for every bucket
    before the optimizer step."""
    overlap_param_gather: bool = False
    """DDP + distributed optimizer: defer the post-step parameter all-gather into the next forward pass (Bridge
    turns it on). Refused with a swapping teacher (avsd.teacher='frozen' / 'ema'): the swap would save and
    restore parameters whose all-gather has not happened yet. Needs optim.distributed_optimizer."""
    grad_reduce_in_fp32: bool = True
    """DDP: keep and reduce gradients in fp32 (Megatron-Bridge's default, recipes/common.py; megatron-core's own
    default is False, distributed_data_parallel_config.py:15)."""
    ddp_bucket_size: int | None = None
    """DDP: parameters per communication bucket; None = megatron-core's default max(40M, 1M * dp)
    (distributed_data_parallel_config.py:48), which Megatron-Bridge's recipes keep."""

    def __post_init__(self) -> None:
        _at_least("parallel.tp", self.tp, 1)
        _at_least("parallel.pp", self.pp, 1)
        if self.sequence_parallel and self.tp < 2:
            raise ConfigError(f"parallel.sequence_parallel=True needs parallel.tp > 1 (parallel.tp={self.tp})")
        if self.ddp_bucket_size is not None:
            _at_least("parallel.ddp_bucket_size", self.ddp_bucket_size, 1)

    def data_parallel_size(self, world_size: int) -> int:
        """dp = world_size / (tp * pp) (derived; there is no dp field to set)."""
        if world_size < 1 or world_size % (self.tp * self.pp):
            raise ConfigError(
                f"world size {world_size} is not a multiple of parallel.tp * parallel.pp = {self.tp} * {self.pp}"
            )
        return world_size // (self.tp * self.pp)


@dataclass(frozen=True)
class AVSDConfig:
    """The AVSD objective: views, target, gate, teacher weights, loss and normaliser (spec 2, 3.2, 3.3).

    Field names and choices are those of `loss.AVSDLossConfig` and `teacher_kinds.TeacherConfig`, which
    `loss_config()` / `teacher_config()` build; the reference's flag names are given per field.
    """

    views: tuple[str, ...] = MATH_VIEWS
    """Privileged views in order (`--pi_views`); math: full_solution, partial_solution, answer_only; code:
    reference, hint, feedback. Duplicates are dropped."""
    partial_solution_ratio: float = 0.5
    """Share of solution segments the partial_solution view keeps (`--partial_solution_ratio`), in (0, 1)."""
    mode: Literal["avsd", "consensus", "arithmetic", "single"] = "avsd"
    """Target (`--multi_view_mode`): avsd = log q_G + g·J; consensus = log q_G; arithmetic = log q_A; single =
    the one view's ℓ (needs exactly one view)."""
    gate: Literal["avsd", "sigmoid", "consistency_exp"] = "avsd"
    """Gate g (`--avsd_gate_mode`); read by mode='avsd' only."""
    gate_params: GateParams = field(default_factory=GateParams)
    """Constants of the sigmoid / consistency_exp gates (spec 2.5)."""
    teacher: Literal["frozen", "live", "ema"] = "frozen"
    """Teacher weights (spec 3.2): frozen θ₀ (`--fixed_teacher`, the paper), the live student, or an EMA."""
    ema_decay: float = 0.999
    """EMA decay d (`--ema_decay`); read by teacher='ema' only."""
    teacher_storage: Literal["cpu", "device"] = "cpu"
    """Where θ₀ / the EMA and the swap buffer live (`teacher_kinds`); no reference counterpart."""
    teacher_restore: Literal["auto", "swap", "master"] = "auto"
    """How θ comes back after the teacher scoring pass (frozen / ema; `teacher_kinds`, `master_restore`). 'master':
    from the distributed optimizer's fp32 master (megatron-core's own master -> param copy + the DP param
    all-gather): no swap buffer, one teacher -> device copy per step instead of three (at Qwen3-8B TP2 bf16: 7.6 GiB
    of PCIe traffic instead of 23 GiB, and 7.6 GiB less pinned host memory per rank); needs
    optim.distributed_optimizer=True and model.dtype bfloat16 / float16 (an fp32 parameter is its own master, which
    the teacher overwrites). 'swap': a saved copy of θ (the only way otherwise). 'auto': 'master' where possible,
    else 'swap'. Bit-identical results either way. No reference counterpart."""
    loss: Literal["sampled", "candidate", "full_vocab"] = "sampled"
    """sampled: the sampled-token loss (spec 2.2, `--use_tinker_loss`, the paper); candidate: generalized JSD on
    the views' top-k union (2.3); full_vocab: generalized JSD over the whole vocabulary (not in the reference)."""
    normalization: Literal["microbatch_token_mean", "global_token_mean"] = "microbatch_token_mean"
    """microbatch_token_mean (the reference, spec 2.6): mean over micro-batches x DP ranks of per-micro-batch token
    means; global_token_mean DEVIATES: one token mean over the whole step."""
    topk: int = 64
    """Per-view top-k of the candidate loss (`--multi_view_teacher_topk`)."""
    beta: float = 0.5
    """Generalized-JSD β of the candidate / full_vocab losses (`--beta`)."""
    token_clip: float = 0.05
    """Per-token JSD clamp from above of the candidate / full_vocab losses (`--jsd_token_clip`; 0 = off)."""
    weight_mode: Literal["uniform", "agreement_centrality"] = "uniform"
    """View weights of the candidate / full_vocab targets (`--view_weight_mode`)."""
    eta: float = 5.0
    """Agreement-centrality η (`--view_agreement_eta`)."""
    detach_target: bool = True
    """Candidate loss: hold the target constant. True DEVIATES from the reference, whose target is not detached so
    gradient flows through the gate (spec §6 item 4); False reproduces it."""
    epistemic_tau: float = 0.0
    """τ_e of the epistemic-preservation term (`--epistemic_tau` with `--use_epistemic_preservation`); 0 = off,
    as in every released script. Needs mode='avsd'."""
    detach_gate: bool = False
    """Epistemic term of the sampled and candidate losses: False (the reference, spec 2.2 step 10, 2.3 step 11) lets
    gradient flow through the gate g, which depends on the student; True holds g constant (spec §6 item 4 calls the
    leak a weak point). Read only when epistemic_tau > 0."""
    single_view_clip: Literal["entry", "token"] = "entry"
    """How token_clip applies with mode='single', loss='full_vocab': 'entry' (the reference, spec 2.4 and §6 item 5)
    clamps each (token, vocabulary entry) JSD term; 'token' DEVIATES: it clamps each token's JSD like the
    candidate path (spec 2.3 step 10), which zeroes the gradient of every clipped token."""
    train_pad_tokens: bool = False
    """Keep completion tokens equal to the tokenizer's pad id in the loss. False is the reference (spec 3.5: valid =
    completion tokens != pad id; Qwen3's pad <|endoftext|> is also a stop token, so a completion can end with it);
    True DEVIATES."""
    teacher_chunk_tokens: int | None = 1024
    """Scoring pass: completion tokens c per teacher output-layer chunk (`AVSDLossConfig.teacher_chunk_tokens`).
    The pass holds the teacher logits of one chunk at a time, [M, c, V/tp] in the model dtype: at Qwen3-8B, TP2
    (V/tp = 75,968), M = 3, bf16 that is 3 * 1024 * 75,968 * 2 B = 0.43 GiB per chunk, where one piece for a
    micro-batch of N = 16k completion tokens would be [M, N, V/tp] = 7 GiB. Each chunk costs one TP collective
    (two for loss='candidate'); results do not depend on it. None = the whole micro-batch at once. No reference
    counterpart (the reference materialises full logits per view)."""

    def __post_init__(self) -> None:
        if isinstance(self.views, str) or not isinstance(self.views, (tuple, list)):
            raise ConfigError(f"avsd.views={self.views!r} must be a list of view names")
        try:
            views = normalize_views(self.views, MATH_VIEWS + CODE_VIEWS, name="avsd.views")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if set(views) & set(MATH_VIEWS) and set(views) & set(CODE_VIEWS):
            raise ConfigError(f"avsd.views={views!r} mixes math views {MATH_VIEWS} and code views {CODE_VIEWS}")
        object.__setattr__(self, "views", views)
        _choice("avsd.mode", self.mode, MODES)
        _choice("avsd.gate", self.gate, GATE_MODES)
        _choice("avsd.teacher", self.teacher, TEACHER_KINDS)
        _choice("avsd.teacher_storage", self.teacher_storage, STORAGES)
        _choice("avsd.teacher_restore", self.teacher_restore, RESTORES)
        _choice("avsd.loss", self.loss, AVSD_LOSS_KINDS)
        _choice("avsd.normalization", self.normalization, NORMALIZATIONS)
        _choice("avsd.weight_mode", self.weight_mode, WEIGHT_MODES)
        _choice("avsd.single_view_clip", self.single_view_clip, CLIP_SCOPES)
        if not isinstance(self.gate_params, GateParams):
            raise ConfigError(f"avsd.gate_params must be a GateParams, got {type(self.gate_params).__name__}")
        if not (0.0 < self.partial_solution_ratio < 1.0):
            raise ConfigError(f"avsd.partial_solution_ratio={self.partial_solution_ratio!r} must be in (0, 1)")
        if not (math.isfinite(self.ema_decay) and 0.0 <= self.ema_decay < 1.0):
            raise ConfigError(f"avsd.ema_decay={self.ema_decay!r} must be in [0, 1)")
        if not (0.0 <= self.beta <= 1.0):
            raise ConfigError(f"avsd.beta={self.beta!r} must be in [0, 1]")
        for name in ("token_clip", "eta", "epistemic_tau"):
            _finite(f"avsd.{name}", getattr(self, name))
            _at_least(f"avsd.{name}", getattr(self, name), 0.0)
        _at_least("avsd.topk", self.topk, 1)
        if self.teacher_chunk_tokens is not None:
            _at_least("avsd.teacher_chunk_tokens", self.teacher_chunk_tokens, 1)
        if self.mode == "single" and len(views) != 1:
            raise ConfigError(f"avsd.mode='single' needs exactly one view, avsd.views={views!r}")
        if self.epistemic_tau and self.mode != "avsd":
            raise ConfigError(f"avsd.epistemic_tau={self.epistemic_tau!r} needs avsd.mode='avsd' (spec §4)")
        if self.gate == "avsd" and self.mode == "avsd" and self.weight_mode != "uniform" and self.loss != "sampled":
            raise ConfigError(
                "avsd.gate='avsd' is defined for uniform view weights only (spec 2.3 step 8): set "
                "avsd.weight_mode='uniform' or choose another avsd.gate"
            )
        try:
            self.loss_config(temperature=1.0)  # the loss's own cross-field checks
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def loss_config(self, temperature: float, vocab_size: int | None = None, **overrides: Any) -> AVSDLossConfig:
        """The `loss.AVSDLossConfig` of this objective; temperature = rollout.temperature (τ), vocab_size = the
        real (unpadded) vocabulary. `overrides` set the loss's other execution knobs (logprob_chunk_size) or
        replace this section's (teacher_chunk_tokens)."""
        fields: dict[str, Any] = dict(
            temperature=temperature,
            vocab_size=vocab_size,
            loss=self.loss,
            normalization=self.normalization,
            mode=self.mode,
            gate=self.gate,
            gate_params=self.gate_params,
            epistemic_tau=self.epistemic_tau,
            topk=self.topk,
            beta=self.beta,
            token_clip=self.token_clip,
            weight_mode=self.weight_mode,
            eta=self.eta,
            detach_target=self.detach_target,
            detach_gate=self.detach_gate,
            single_view_clip=self.single_view_clip,
            teacher_chunk_tokens=self.teacher_chunk_tokens,
        )
        return AVSDLossConfig(**(fields | overrides))

    def teacher_config(self) -> TeacherConfig:
        """The `teacher_kinds.TeacherConfig` of this objective."""
        return TeacherConfig(kind=self.teacher, ema_decay=self.ema_decay, storage=self.teacher_storage,
                             restore=self.teacher_restore)


ALGORITHMS = ("avsd", "grpo")


@dataclass(frozen=True)
class GRPOConfig:
    """The GRPO baseline (`algorithm: grpo`; the paper compares AVSD against it, spec §4). Read only then.

    Per prompt the rollout.n completions are graded by the task's grader (math: math-verify on the last \\boxed{}
    answer against the final answer of the reference solution; code: the extracted program on the example's public
    tests in the sandbox, the tests the feedback view uses); advantages are group-normalised
    (`signals.grpo.group_advantages`) and every token of a completion carries its completion's advantage in the
    sampled-token policy-gradient loss (`vocab_parallel.policy_gradient_loss`). No teacher scoring pass runs. With
    one optimizer step per rollout the importance ratio is 1, so PPO-style clipping never acts and is not
    implemented; there is no KL term to a reference model (the OPSD repository's GRPO runs β = 0, spec §4).
    The OPSD settings otherwise: lr 2e-5, 8 generations, temperature 1.2, 16000 completion tokens, scale_rewards
    group (set optim.lr, rollout.n, rollout.temperature, rollout.max_new_tokens accordingly).
    The loss normaliser is avsd.normalization (token means, as TRL's default 'dapo'/'bnpo' loss types).
    """

    scale_rewards: Literal["group", "none"] = "group"
    """'group' (TRL / OPSD default): A = (r − mean_group) / (std_group + std_eps); 'none': A = r − mean_group."""
    std_eps: float = 1e-4
    """Added to the group std before dividing (TRL's 1e-4)."""
    correct_reward: float = 1.0
    """Reward of a correct answer (math) or a program passing every public test (code)."""
    wrong_reward: float = 0.0
    """Reward of a parseable but wrong answer / a program that runs and fails a test."""
    failure_reward: float = 0.0
    """Reward of a completion with no parseable answer: no closed \\boxed{} (math), no extractable program
    (code). Such a completion never earns correct_reward, whatever else its text says (reward-hacking guard)."""

    def __post_init__(self) -> None:
        _choice("grpo.scale_rewards", self.scale_rewards, REWARD_SCALES)
        for name in ("std_eps", "correct_reward", "wrong_reward", "failure_reward"):
            _finite(f"grpo.{name}", getattr(self, name))
        if self.std_eps <= 0:
            raise ConfigError(f"grpo.std_eps={self.std_eps!r} must be > 0")
        if not self.correct_reward > max(self.wrong_reward, self.failure_reward):
            raise ConfigError(
                f"grpo.correct_reward={self.correct_reward!r} must exceed grpo.wrong_reward={self.wrong_reward!r} "
                f"and grpo.failure_reward={self.failure_reward!r}"
            )


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and the LR schedule (the reference: HF Trainer defaults plus lr 5e-6, max_grad_norm 0.1)."""

    lr: float = 5e-6
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (β1, β2)."""
    eps: float = 1e-8
    """AdamW eps."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    max_grad_norm: float = 0.1
    """Global gradient-norm clip (0 = off)."""
    lr_decay: Literal["linear", "constant", "cosine"] = "linear"
    """Schedule after warmup: linear to min_lr at max_steps (the reference, HF default), constant, or cosine."""
    warmup_steps: int = 0
    """Linear warmup from 0 (the reference: none)."""
    min_lr: float = 0.0
    """LR at the last step (the reference: 0)."""
    distributed_optimizer: bool = True
    """Shard optimizer state over DP (Megatron's ZeRO-1-like optimizer; the reference: ZeRO-2 with CPU offload)."""
    seed: int = 42
    """Seed of model init and data order (the reference: HF default 42)."""

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas!r} must be two numbers in [0, 1)")
        for name in ("lr", "eps", "weight_decay", "max_grad_norm", "min_lr"):
            _finite(f"optim.{name}", getattr(self, name))
            _at_least(f"optim.{name}", getattr(self, name), 0.0)
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr!r} must be > 0")
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr!r} must be <= optim.lr={self.lr!r}")
        _choice("optim.lr_decay", self.lr_decay, LR_DECAYS)
        _at_least("optim.warmup_steps", self.warmup_steps, 0)

    def lr_at(self, step: int, max_steps: int) -> float:
        """LR used by optimizer step `step` (0-based) of `max_steps` (HF's `get_linear_schedule_with_warmup`
        for lr_decay='linear', min_lr = 0: lr · (max_steps − step) / (max_steps − warmup) after warmup)."""
        if not (0 <= step < max_steps):
            raise ValueError(f"step={step} must be in [0, max_steps={max_steps})")
        if step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if self.lr_decay == "constant":
            return self.lr
        progress = (step - self.warmup_steps) / max(1, max_steps - self.warmup_steps)
        if self.lr_decay == "linear":
            return self.min_lr + (self.lr - self.min_lr) * (1.0 - progress)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class MemoryConfig:
    """Training memory handed to the colocated rollout engine while it generates (`rollout_memory`)."""

    offload_grad_buffers: bool = True
    """Free DDP's gradient buffers during the rollout (megatron-core's `offload_grad_buffers` /
    `restore_grad_buffers`; 15 GiB per rank at Qwen3-8B / TP2 in fp32). Costs one reallocation and the zeroing
    the next step does anyway; results are unchanged. The engine is also built with the buffers (and, with
    offload_optimizer_states, the main params) offloaded: vLLM refuses to start unless the free memory covers
    rollout.vllm.gpu_memory_utilization x the GPU (vllm/v1/worker/utils.py:716 `request_memory` in 0.33.0), so
    what is freed here is what a higher gpu_memory_utilization can count on."""
    offload_optimizer_states: bool = False
    """Also move the optimizer's fp32 main parameters and Adam moments to host memory during the rollout
    (megatron-core's `offload_to_cpu` / `restore_from_cpu`): 12 B per parameter shard, two PCIe copies per step.
    Results are unchanged."""


@dataclass(frozen=True)
class CodeSandboxConfig:
    """Execution of the student's code on the public tests for the code feedback view (data.task='code', spec 3.4).
    Read only by code runs; the limits are the reference's."""

    unsafe_subprocess: bool = False
    """Run student programs in a plain subprocess: the same resource limits, NO filesystem or network isolation
    (`sandbox.SandboxConfig(kind='subprocess')`, which warns). True reproduces the reference's training default
    (`unsafe_subprocess_sandbox=True`, spec 3.4 and §6 item 9); the default False DEVIATES from it: every program
    runs in bubblewrap (`bwrap` must be installed; a missing or unusable one is an error at construction)."""
    wall_time_s: float = 2.0
    """Wall-clock limit per test run; past it the run is killed and the status is timeout."""
    memory_mb: int = 512
    """Memory of a program, MiB: RLIMIT_AS of each process and, with a per-run cgroup, of all of them together."""
    cpu_time_s: int = 30
    """RLIMIT_CPU of a program, seconds."""
    max_processes: int = 64
    """Processes of one program run, all together (cgroup pids.max; else RLIMIT_NPROC, see verify/sandbox.py)."""
    cgroup: Literal["auto", "require", "off"] = "auto"
    """Per-run cgroup for the whole-sandbox limits: 'auto' (when this machine allows one; else a stated weaker
    guarantee and a warning), 'require' (an error without one), 'off'."""
    max_output_chars: int = 4000
    """Reported stdout / stderr are cut to this many characters (the judge compares the whole stdout)."""
    bwrap_path: str | None = None
    """bwrap executable; None = `bwrap` on PATH."""
    workers: int = 1
    """Programs run at once per rank (threads driving sandbox processes). Results do not depend on it; the
    reference runs them one after another."""

    def __post_init__(self) -> None:
        for name in ("wall_time_s", "memory_mb", "cpu_time_s", "max_output_chars", "workers", "max_processes"):
            _finite(f"sandbox.{name}", getattr(self, name))
            if not getattr(self, name) > 0:
                raise ConfigError(f"sandbox.{name}={getattr(self, name)!r} must be > 0")
        _choice("sandbox.cgroup", self.cgroup, ("auto", "require", "off"))

    def sandbox_config(self) -> SandboxConfig:
        """The `sandbox.SandboxConfig` these settings describe (kind 'subprocess' only with unsafe_subprocess)."""
        return SandboxConfig(
            kind="subprocess" if self.unsafe_subprocess else "bwrap",
            wall_time_s=self.wall_time_s,
            memory_mb=self.memory_mb,
            cpu_time_s=self.cpu_time_s,
            max_output_chars=self.max_output_chars,
            bwrap_path=self.bwrap_path,
            max_processes=self.max_processes,
            cgroup=self.cgroup,
        )


@dataclass(frozen=True)
class LoggingConfig:
    """Metric and sample logging (rank 0 writes, after reducing metrics over DP)."""

    jsonl: bool = True
    """Append one JSON object per logged step to <output_dir>/metrics.jsonl."""
    tensorboard: bool = False
    """Also write TensorBoard scalars under <output_dir>/tensorboard (needs the tensorboard package)."""
    log_every: int = 2
    """Log metrics every k optimizer steps (the reference: 2)."""
    generations_every: int = 5
    """Write the step's prompts and completions to <output_dir>/generations/ every k steps (the reference: 5);
    0 = never."""

    def __post_init__(self) -> None:
        _at_least("logging.log_every", self.log_every, 1)
        _at_least("logging.generations_every", self.generations_every, 0)


@dataclass(frozen=True)
class CheckpointConfig:
    """Saving and resuming."""

    dir: str | None = None
    """Checkpoint directory; None = <output_dir>/checkpoints."""
    save_every: int = 10
    """Save every k optimizer steps (the reference: 10); 0 = only at the end."""
    keep_last: int | None = 3
    """Keep the newest k checkpoints; None = keep all. The reference keeps all (no save_total_limit), which at 8B
    is 50 x ≈ 115 GB (bf16 weights + fp32 master + Adam moments) = 5.7 TB for 500 steps; 3 keeps ≈ 345 GB."""
    resume: str | None = "auto"
    """'auto' = continue from the newest valid checkpoint in dir if there is one (a newer one that fails
    verification is skipped with a warning); a path = continue from it (error if missing or invalid); None = always
    start from model.hf_path / model.megatron_checkpoint."""
    overwrite: bool = False
    """A run that resumes nothing refuses to start when dir already holds checkpoints (another run's: keep-last
    would prune both together and `latest` would mix them). True = delete them first."""

    def __post_init__(self) -> None:
        _at_least("checkpoint.save_every", self.save_every, 0)
        if self.keep_last is not None:
            _at_least("checkpoint.keep_last", self.keep_last, 1)
        if self.resume is not None and not self.resume.strip():
            raise ConfigError("checkpoint.resume='' must be 'auto', a checkpoint path, or null")


@dataclass(frozen=True)
class TrainConfig:
    """One AVSD run. Per optimizer step: prompts_per_step prompts over all DP ranks, rollout.n completions each,
    micro-batches of micro_batch_size prompts per rank, one gradient step per rollout (strictly on-policy)."""

    output_dir: str = "outputs/avsd"
    """Metrics, generations and (by default) checkpoints go here."""
    prompts_per_step: int = 32
    """Prompts per optimizer step over all DP ranks (the reference: 4 per device x GA 2 x 4 GPUs)."""
    micro_batch_size: int = 4
    """Prompts per micro-batch per DP rank (the reference: per-device batch 4); the rest is accumulation."""
    max_steps: int = 500
    """Optimizer steps (the reference: 500, about 0.53 epoch of the 30k rows)."""
    algorithm: Literal["avsd", "grpo"] = "avsd"
    """avsd: the method (or a baseline of the `avsd` section: single view, consensus, arithmetic); grpo: the RL
    baseline of the `grpo` section, on the same rollouts, model, parallelism and checkpoints (needs rollout.n >= 2;
    the avsd section's mode, gate, teacher and loss are then unused; its views still decide which teacher prompts
    the task encodes, and so which prompts prompts.overlong='skip' passes over, the same prompts as an AVSD run)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    avsd: AVSDConfig = field(default_factory=AVSDConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(sources=(PAPER_DATASET,), task="math"))
    """Training rows (the reference: the OPSD OpenThoughts math 30k set, train split)."""
    prompts: PromptConfig = field(default_factory=PromptConfig)
    """Student thinking off / teachers on, prompt cap 12288 (spec §1). Its overlong='skip' default DEVIATES from
    the reference's truncation (see prompts.PromptConfig)."""
    sandbox: CodeSandboxConfig = field(default_factory=CodeSandboxConfig)
    """Where the code task's student programs run (bubblewrap by default; see its unsafe_subprocess field)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir must be a directory path")
        _at_least("prompts_per_step", self.prompts_per_step, 1)
        _at_least("micro_batch_size", self.micro_batch_size, 1)
        _at_least("max_steps", self.max_steps, 1)
        _choice("algorithm", self.algorithm, ALGORITHMS)
        if self.algorithm == "grpo" and self.rollout.n < 2:
            raise ConfigError(
                f"algorithm='grpo' needs rollout.n >= 2 completions per prompt (group-normalised advantages), got "
                f"rollout.n={self.rollout.n}"
            )
        if self.prompts_per_step % self.micro_batch_size:
            raise ConfigError(
                f"prompts_per_step={self.prompts_per_step} is not a multiple of micro_batch_size="
                f"{self.micro_batch_size}"
            )
        if self.parallel.overlap_param_gather:
            if not self.optim.distributed_optimizer:
                raise ConfigError("parallel.overlap_param_gather=True needs optim.distributed_optimizer=True")
            if self.avsd.teacher in SWAPPING_TEACHERS:
                raise ConfigError(
                    f"parallel.overlap_param_gather=True races with avsd.teacher={self.avsd.teacher!r}: the teacher "
                    "swap would save and restore parameters whose deferred all-gather has not run yet; set "
                    "parallel.overlap_param_gather=false (overlap_grad_reduce is safe)"
                )
        swapping = self.algorithm == "avsd" and self.avsd.teacher in SWAPPING_TEACHERS
        if swapping and self.avsd.teacher_restore == "master":
            if not self.optim.distributed_optimizer:
                raise ConfigError(
                    "avsd.teacher_restore='master' needs optim.distributed_optimizer=True (θ is restored from the "
                    "distributed optimizer's fp32 master); set avsd.teacher_restore='auto' or 'swap'"
                )
            if self.model.dtype == "float32":
                raise ConfigError(
                    "avsd.teacher_restore='master' needs model.dtype bfloat16 or float16: with fp32 parameters the "
                    "distributed optimizer's master is the parameter itself, which the teacher overwrites; set "
                    "avsd.teacher_restore='auto' or 'swap'"
                )
        if self.parallel.sequence_packing and self.model.layer_spec != "te":
            raise ConfigError(
                "parallel.sequence_packing=True needs model.layer_spec='te': only Transformer Engine's attention runs "
                "packed (THD) rows; the local spec's refuses them (megatron/core/transformer/"
                "dot_product_attention.py:153)"
            )
        if self.parallel.sequence_parallel and self.model.layer_spec != "te":
            raise ConfigError(
                "parallel.sequence_parallel=True needs model.layer_spec='te' (the local spec's torch norms refuse "
                "it: megatron/core/transformer/torch_norm.py:50)"
            )
        allowed = MATH_VIEWS if self.data.task == "math" else CODE_VIEWS
        if not set(self.avsd.views) <= set(allowed):
            raise ConfigError(
                f"avsd.views={self.avsd.views!r} do not fit data.task={self.data.task!r}: choose from {allowed}"
            )
        if self.rollout.temperature <= 0:
            raise ConfigError(
                f"rollout.temperature={self.rollout.temperature!r} must be > 0 for training: it is τ, the divisor of "
                "student and teacher logits (spec 2.1)"
            )
        if self.rollout.engine == "vllm":
            need = self.prompts.max_prompt_tokens + self.rollout.max_new_tokens
            if need > self.rollout.vllm.max_model_len:
                raise ConfigError(
                    f"rollout.vllm.max_model_len={self.rollout.vllm.max_model_len} < prompts.max_prompt_tokens + "
                    f"rollout.max_new_tokens = {self.prompts.max_prompt_tokens} + {self.rollout.max_new_tokens}"
                )

    def loss_config(self, vocab_size: int | None = None, **overrides: Any) -> AVSDLossConfig:
        """The loss of the run: the avsd section's (`AVSDConfig.loss_config`), or GRPO's policy-gradient loss with
        avsd.normalization; τ = rollout.temperature."""
        tau = self.rollout.temperature
        if self.algorithm == "grpo":
            return AVSDLossConfig(temperature=tau, vocab_size=vocab_size, loss="policy_gradient",
                                  normalization=self.avsd.normalization, **overrides)
        return self.avsd.loss_config(tau, vocab_size, **overrides)

    def teacher_restores_from_master(self) -> bool:
        """Whether the teacher will restore θ from the optimizer's fp32 master (no swap buffer): a swapping
        avsd.teacher, avsd.teacher_restore 'auto' / 'master', the distributed optimizer and bf16 / fp16 parameters
        (what `teacher_kinds.build_teacher` decides from the built optimizer). For the planner and the preflight."""
        return (self.algorithm == "avsd" and self.avsd.teacher in SWAPPING_TEACHERS
                and self.avsd.teacher_restore != "swap" and self.optim.distributed_optimizer
                and self.model.dtype != "float32" and not self.parallel.overlap_param_gather)

    def teacher_config(self) -> TeacherConfig:
        """avsd.teacher_config(); GRPO has no teacher, so it gets the live one (no copy of θ₀ is made)."""
        if self.algorithm == "grpo":
            return TeacherConfig(kind="live", storage=self.avsd.teacher_storage)
        return self.avsd.teacher_config()

    def num_microbatches(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step: prompts_per_step / (micro_batch_size · dp)."""
        dp = self.parallel.data_parallel_size(world_size)
        if self.prompts_per_step % (self.micro_batch_size * dp):
            raise ConfigError(
                f"prompts_per_step={self.prompts_per_step} is not a multiple of micro_batch_size * dp = "
                f"{self.micro_batch_size} * {dp}"
            )
        return self.prompts_per_step // (self.micro_batch_size * dp)

    @property
    def checkpoint_dir(self) -> Path:
        """checkpoint.dir, or <output_dir>/checkpoints."""
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.output_dir) / "checkpoints"


# ----------------------------------------------------------------------------------------------------------------
# YAML


def load_config(path: str | Path) -> TrainConfig:
    """Build and validate a TrainConfig from a YAML file of sections (module docstring).

    Raises:
        FileNotFoundError: no such file.
        ConfigError: unknown key, wrong type, failed check, or not a mapping; the message names file and field.
    """
    import yaml

    path = Path(path)
    with path.open(encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return from_dict(data if data is not None else {}, source=str(path))


def from_dict(data: Mapping[str, Any], source: str = "<dict>") -> TrainConfig:
    """Build and validate a TrainConfig from nested plain data (what `to_dict` returns)."""
    return _build(TrainConfig, data, "", source)


def to_dict(cfg: Any) -> Any:
    """A config dataclass as nested dicts / lists / scalars (YAML- and JSON-safe); inverse of `from_dict`."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """`cfg` with each 'a.b.c=value' set (value parsed as YAML), re-validated. Raises ConfigError on a bad item.

    The trainer's `--set` (`python -m avsd_megatron train`), also used by `plan` and the NeMo-Run recipes.
    """
    import yaml

    data: dict[str, Any] = to_dict(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-5")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a config section")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"--set {item!r}: unknown key {key!r}")
        node[leaf] = yaml.safe_load(raw)
    return from_dict(data, source="--set")


def dump_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write `to_dict(cfg)` as YAML (sections in field order); returns the path."""
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _build(cls: type, data: Any, where: str, source: str) -> Any:
    label = where or "the top level"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {label} must be a mapping of {cls.__name__} fields, got {_kind(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"{source}: unknown key {dotted!r}; {cls.__name__} fields: {', '.join(names)}")
        kwargs[key] = _convert(hints[key], value, dotted, source)
    try:
        return cls(**kwargs)
    except ValueError as err:  # every section's checks name their dotted field
        raise ConfigError(f"{source}: {err}") from None
    except TypeError as err:  # a required field without a default is missing (data.sources, data.task)
        raise ConfigError(f"{source}: {label}: {err}") from None


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _plain(value: Any, where: str, source: str) -> Any:
    """A copy of `value` as plain YAML data (None, bool, int, float, str, lists, string-keyed mappings)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise ConfigError(f"{source}: {where} keys must be strings, got {_kind(key)}")
        return {key: _plain(item, f"{where}.{key}", source) for key, item in value.items()}
    raise ConfigError(f"{source}: {where} must be plain data (null, bool, number, string, list, mapping), "
                      f"got {_kind(value)}")


def _convert(tp: Any, value: Any, where: str, source: str) -> Any:
    """Check / convert one YAML value against a field's type hint."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:  # free-form values (rollout.vllm.engine_args): plain YAML data, checked by their consumer
        return _plain(value, where, source)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{source}: {where} must not be null")
        (inner,) = [a for a in args if a is not type(None)]  # every union here is `X | None`
        return _convert(inner, value, where, source)
    if value is None:
        raise ConfigError(f"{source}: {where} must not be null")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {where}={value!r} is not one of {args}")
        return value
    if origin is dict:  # dict[str, X]: a mapping of string keys; each value converted as X
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {where} must be a mapping, got {_kind(value)}")
        key_type, value_type = args
        if key_type is not str:
            raise TypeError(f"config field {where} has an unsupported key type {key_type!r}")  # a bug here
        for key in value:
            if not isinstance(key, str):
                raise ConfigError(f"{source}: {where} keys must be strings, got {_kind(key)}")
        return {key: _convert(value_type, item, f"{where}.{key}", source) for key, item in value.items()}
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {where} must be a list, got {_kind(value)}")
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise ConfigError(f"{source}: {where} must have {len(items)} items, got {len(value)}")
        return tuple(_convert(t, v, f"{where}[{i}]", source) for i, (t, v) in enumerate(zip(items, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {where} must be true or false, got {_kind(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {where} must be an integer, got {_kind(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {where} must be a number, got {_kind(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {where} must be a string, got {_kind(value)}")
        return value
    raise TypeError(f"config field {where} has an unsupported type {tp!r}")  # a bug in this module
