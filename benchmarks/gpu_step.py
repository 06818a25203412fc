"""Throughput, MFU and memory of one AVSD step (teacher scoring + student update) per GPU-path switch, vs a plain
cross-entropy step, on GPUs; a tiny CPU smoke mode runs the same code paths so CI catches breakage (no timing).

Run (one GPU; Qwen3-8B-shaped layers, 4 of its 36 layers, full vocabulary):
    python benchmarks/gpu_step.py
    python benchmarks/gpu_step.py --layers 8 --micro-batches 4 --teacher-storage device --json out.json
    python benchmarks/gpu_step.py --variants avsd,avsd/offload-all
    python benchmarks/gpu_step.py --variants avsd,avsd/packed --ragged     # THD packing vs padding (needs TE)
Several GPUs (TP x PP x DP = number of processes; the avsd/sp variant needs TP > 1):
    torchrun --nproc-per-node 8 benchmarks/gpu_step.py --tp 2 --pp 2 --layers 8
CPU smoke (2-layer toy shape, gloo, Megatron's local spec, the CPU-runnable variants, 1 step each):
    python benchmarks/gpu_step.py --cpu-smoke
Needs megatron-core 0.19; for the intended numbers also Transformer Engine and Apex (the NGC PyTorch container).
Without CUDA (and without --cpu-smoke or --predict) it exits with a message.
The planner's modelled phase times for the same shape (`avsd_megatron.training.plan`; `--gpu` picks its GPU type)
are printed under the table; `--predict` prints only them, without a GPU (`--dp`: the data-parallel size to assume):
    python benchmarks/gpu_step.py --predict --layers 8 --teacher-storage device

The model, DDP and optimizer are built by the trainer's own builders (`avsd_megatron.training.megatron_model`) from a
`TrainConfig`, so every variant measures exactly what the trainer would run with those config fields:

| variant              | config change from the base                                                            |
|----------------------|----------------------------------------------------------------------------------------|
| ce                   | the base model, Megatron's per-token CE on the student rows (output layer everywhere)    |
| avsd                 | base: model.*_fusion auto (on where TE / Apex / triton are detected), model.recompute =  |
|                      | --recompute, parallel.overlap_grad_reduce on, no offload, avsd.teacher_chunk_tokens 1024 |
| avsd/no-fusions      | every model.*_fusion false                                                             |
| avsd/recompute-*     | model.recompute selective / full                                                       |
| avsd/no-overlap      | parallel.overlap_grad_reduce false                                                     |
| avsd/sp              | parallel.sequence_parallel true (TP > 1 and the TE spec only)                          |
| avsd/chunk-none      | avsd.teacher_chunk_tokens null (teacher logits [M, N, V/tp] in one piece)              |
| avsd/offload-grads   | memory.offload_grad_buffers: DDP grad buffers freed across a stand-in rollout           |
| avsd/offload-all     | also memory.offload_optimizer_states (main params + Adam moments to host and back)     |
| avsd/swap-old        | avsd.teacher_restore swap: θ saved to a swap buffer and copied back (3 copies per pass) |
| avsd/swap-new        | avsd.teacher_restore master: θ restored from the fp32 master + the param all-gather    |
|                      | (1 copy per pass, no swap buffer); the base's auto picks it on GPU (bf16, dist. opt.)  |
| avsd/packed          | parallel.sequence_packing true: THD rows with PackedSeqParams (needs TE; skipped, and  |
|                      | said so, without it and in --cpu-smoke: the local spec has no THD attention)           |

The two swap variants pin model.dtype bfloat16 (the GPU base's dtype already; on --cpu-smoke, whose base is fp32,
it makes restore-from-master possible at all: an fp32 parameter is its own master). swap-new's loss is compared to
swap-old's (must be 0: the same weights, restored bit for bit), the other variants' to `avsd`'s; swap-old on
--cpu-smoke has no same-dtype base (its difference is not reported).

Per AVSD step, phases timed one by one: zero grads, `score_teachers` (frozen teacher swapped in from
`--teacher-storage`, one forward-only schedule over the M * B teacher rows, output layer at the M * N completion
positions), `update_student` (forward + backward at the N completion positions), `optimizer.step()`, and for the
offload variants `offload` (the `RolloutOffload` context entered and left around an empty stand-in rollout: what
the rollout gap costs). `swap` is the teacher swap (`teacher.scoring_weights()` entered and left) timed once more
on its own (with restore master: the teacher copied in, then θ from the master and the all-gather); it is also
inside score_teachers. `teacher buffers` is the teacher's flat allocations (θ₀ + the swap buffer, or θ₀ alone):
host memory with --teacher-storage cpu. Sampled-token loss, M = 3 views. Synthetic rows without padding:
student prompt `--student-prompt` tokens, teacher prompts `--teacher-prompt`, completions `--completion`;
B = `--micro-batch-size` prompts per micro-batch, `--micro-batches` per step per DP rank. `--ragged` draws every
prompt and completion length uniformly from [n / 4, n] instead (the same rows for every variant), so that padding
costs what it costs in training and packing has something to save.

Packed = padded (`avsd/packed`, before its timed steps, on its fresh model = the base weights): the same rows
padded and packed through score_teachers and update_student, and (PP = 1) the student logits at the completion
positions; reported as `packed_check` with the tolerances PACKED_TOLERANCES (bf16: different attention kernels,
sbhd vs THD varlen, round differently, ~ 2^-8 relative per op, accumulated over the layers) and `pass`.

Reported per variant: step time (median of `--steps` after `--warmup`; the offload phase included), trained
completion tokens/s (summed over DP ranks), model TFLOP/s per GPU and MFU against `--peak-tflops` (H100/H200 SXM
dense bf16: 989), peak memory, memory the offload frees (allocated before minus during), the teacher's restore path
and buffers, the last step's loss and its difference to the variant's base (`avsd`; swap-old for swap-new; 0 =
bit-identical: the offload and swap variants must give 0 where the kernels are deterministic). FLOPs are counted
analytically, dense matmuls only, on the real rows (pads are not useful work: padded and packed variants are charged
the same FLOPs): per layer and token 2H(Q + 2K) + 2QH + 6HF (qkv, proj, SwiGLU MLP) plus causal attention
4Q * (position + 1) within the row, plus 2HV per position that runs the output layer; training = 3 x forward
(recomputation not counted), scoring = 1 x forward.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, for avsd_megatron

QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, vocab_size=151_936, rope_theta=1_000_000.0)
TOY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
           vocab_size=256, rope_theta=1_000_000.0)
FUSION_FIELDS = ("bias_activation_fusion", "apply_rope_fusion", "masked_softmax_fusion",
                 "gradient_accumulation_fusion")
VARIANTS = {
    "ce": {},
    "avsd": {},
    "avsd/no-fusions": {"model": dict.fromkeys(FUSION_FIELDS, False)},
    "avsd/recompute-selective": {"model": {"recompute": "selective"}},
    "avsd/recompute-full": {"model": {"recompute": "full"}},
    "avsd/no-overlap": {"parallel": {"overlap_grad_reduce": False}},
    "avsd/sp": {"parallel": {"sequence_parallel": True}},
    "avsd/chunk-none": {"avsd": {"teacher_chunk_tokens": None}},
    "avsd/offload-grads": {"memory": {"offload_grad_buffers": True}},
    "avsd/offload-all": {"memory": {"offload_grad_buffers": True, "offload_optimizer_states": True}},
    "avsd/swap-old": {"avsd": {"teacher_restore": "swap"}, "model": {"dtype": "bfloat16"}},
    "avsd/swap-new": {"avsd": {"teacher_restore": "master"}, "model": {"dtype": "bfloat16"}},
    "avsd/packed": {"parallel": {"sequence_packing": True}},
}
LOSS_BASE = {"avsd/swap-new": "avsd/swap-old"}
"""The variant whose last loss a variant's is compared with (default: avsd)."""
PACKED_TOLERANCES = dict(logits_rel=2e-2, view_logprob_abs=5e-2, loss_rel=1e-2, grad_cosine=0.99)
"""avsd/packed vs padded, bf16: max |Δ student logit| / max |logit|, max |Δ ℓ_m| (nats), |Δ loss| / |loss|, and the
cosine of the two gradients (all parameters of this rank) must be within these."""
CPU_VARIANTS = ("ce", "avsd", "avsd/no-overlap", "avsd/chunk-none", "avsd/offload-grads", "avsd/offload-all",
                "avsd/swap-old", "avsd/swap-new")
"""What runs on CPU: no fused kernels (no CUDA), no sequence parallelism (the local spec's norms refuse it), no
recomputation (Megatron's checkpoint saves the CUDA RNG state, tensor_parallel/random.py:528)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # model
    parser.add_argument("--layers", type=int, default=4, help="transformer layers (Qwen3-8B has 36)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (must divide --layers)")
    parser.add_argument("--local-spec", action="store_true", help="Megatron's local layer spec instead of TE's")
    parser.add_argument("--recompute", choices=("none", "selective", "full"), default="none",
                        help="model.recompute of the base variant (Megatron-Bridge's Qwen3 recipes: none)")
    # batch
    parser.add_argument("--micro-batch-size", type=int, default=2, help="B prompts per micro-batch")
    parser.add_argument("--micro-batches", type=int, default=2, help="micro-batches per step per DP rank")
    parser.add_argument("--student-prompt", type=int, default=256, help="student prompt tokens")
    parser.add_argument("--teacher-prompt", type=int, default=1024, help="teacher prompt tokens (with the view)")
    parser.add_argument("--completion", type=int, default=1024, help="sampled completion tokens")
    parser.add_argument("--views", type=int, default=3, help="M privileged views")
    parser.add_argument("--ragged", action="store_true",
                        help="draw each prompt / completion length uniformly from [n/4, n] (what packing saves)")
    # AVSD
    parser.add_argument("--teacher-storage", choices=("cpu", "device"), default="cpu", help="where θ₀ lives")
    parser.add_argument("--temperature", type=float, default=0.7, help="rollout temperature τ")
    # what to run
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated subset of {', '.join(VARIANTS)}; default: every one that can run")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="toy shape on CPU with gloo: run the CPU-runnable variants once (no timing claims)")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this path")
    # timing
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of one GPU, TFLOP/s")
    parser.add_argument("--seed", type=int, default=1234)
    # -- the planner's prediction (avsd_megatron.training.plan), printed under the table or alone
    parser.add_argument("--gpu", default="h100-80gb", help="GPU type of the planner's hardware model")
    parser.add_argument("--predict", action="store_true",
                        help="print the planner's modelled phase times for this shape and exit (no GPU needed)")
    parser.add_argument("--dp", type=int, default=1, help="--predict: data-parallel size to assume")
    args = parser.parse_args(argv)
    if args.cpu_smoke:  # toy sizes; keep whatever the caller set explicitly for the counts
        args.layers, args.student_prompt, args.teacher_prompt, args.completion = 2, 8, 12, 8
        args.warmup, args.steps = 0, 1
    return args


def init_distributed(args: argparse.Namespace) -> None:
    """NCCL (GPU) or gloo (--cpu-smoke) process group from torchrun's env, or a 1-process group; parallel_state."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if "RANK" not in os.environ:  # plain `python benchmarks/gpu_step.py`: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
    if args.cpu_smoke:
        from avsd_megatron.runtime import install

        install()  # Megatron's CUDA-assuming calls -> CPU (avsd_megatron.runtime.megatron_cpu)
        dist.init_process_group("gloo")
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)


def hf_config(args: argparse.Namespace) -> dict:
    """A Qwen3 config.json dict: Qwen3-8B's layer shape (or the toy one) with --layers layers, untied."""
    shape = TOY if args.cpu_smoke else QWEN3_8B
    return dict(shape, model_type="qwen3", architectures=["Qwen3ForCausalLM"], num_hidden_layers=args.layers,
                hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=args.teacher_prompt + args.completion,
                tie_word_embeddings=False, attention_bias=False, rope_scaling=None)


def train_config(args: argparse.Namespace, changes: dict):
    """The TrainConfig of the base variant with `changes` ({section: {field: value}}) applied."""
    from avsd_megatron.training.config import from_dict

    sections = {
        "model": {"hf_path": "gpu_step", "dtype": "float32" if args.cpu_smoke else "bfloat16",
                  "layer_spec": "local" if args.cpu_smoke or args.local_spec else "te",
                  "recompute": args.recompute},
        "parallel": {"tp": args.tp, "pp": args.pp, "overlap_grad_reduce": True},
        "memory": {"offload_grad_buffers": False, "offload_optimizer_states": False},
        "avsd": {"teacher_chunk_tokens": 1024, "teacher_storage": args.teacher_storage},
        "optim": {"lr": 1e-6, "max_grad_norm": 1.0, "seed": args.seed},
        "rollout": {"temperature": args.temperature},
    }
    for section, values in changes.items():
        sections[section] = sections[section] | values
    return from_dict(sections)


def build(args: argparse.Namespace, cfg):
    """GPTModel -> Float16Module -> DDP and the Megatron optimizer, as the trainer builds them; same seed each time."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from avsd_megatron.training.kernels import detect_providers
    from avsd_megatron.training.megatron_model import build_gpt_model, build_optimizer, wrap_ddp

    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)
    providers = detect_providers()
    gpt = build_gpt_model(cfg, hf_config(args), on_cpu=args.cpu_smoke, providers=providers)
    model = wrap_ddp(gpt, cfg)
    return model, build_optimizer(model, cfg), providers


def synthetic_batch(args: argparse.Namespace, cfg, dp_rank: int):
    """This DP rank's padded AVSDBatch of random rows: fixed lengths (no padding but the SP multiple) or, with
    --ragged, lengths uniform in [n / 4, n]."""
    from avsd_megatron.hook.batch import build_avsd_batch

    gen = torch.Generator().manual_seed(args.seed + dp_rank)
    vocab = hf_config(args)["vocab_size"]

    def ids(n: int) -> list[int]:
        if args.ragged:
            n = int(torch.randint(max(1, n // 4), n + 1, (1,), generator=gen))
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    num = args.micro_batch_size * args.micro_batches
    batch = build_avsd_batch(
        [ids(args.student_prompt) for _ in range(num)],
        [[ids(args.teacher_prompt) for _ in range(args.views)] for _ in range(num)],
        [ids(args.completion) for _ in range(num)],
        view_names=[f"view{m}" for m in range(args.views)],
        micro_batch_size=args.micro_batch_size,
        pad_id=0,
        vocab_size=vocab,
        pad_to_multiple_of=args.tp if cfg.parallel.sequence_parallel else 1,
    )
    return batch if args.cpu_smoke else batch.to(torch.cuda.current_device())


def packed_batch(args: argparse.Namespace, cfg, batch):
    """The packed twin of `batch` as the trainer makes it (`Trainer.build_batch`)."""
    from avsd_megatron.hook.packing import pack_batch, packing_multiples

    return pack_batch(batch, **packing_multiples(tp=args.tp, sequence_parallel=cfg.parallel.sequence_parallel))


def packed_check(model, avsd, padded, packed) -> dict:
    """Packed = padded on the same weights: student logits (PP = 1), view log-probs, loss, gradients (module doc).

    Runs score_teachers + update_student on each layout (no optimizer step) and leaves the gradients zeroed."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from avsd_megatron.hook.loss import AVSDForwardStep

    last = avsd.groups.is_last_stage
    out: dict = {}
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        step = AVSDForwardStep(avsd.loss_config, tp_group=avsd.groups.tp)
        worst, scale = 0.0, 0.0
        with torch.no_grad():
            for mb_a, mb_b in zip(padded.micro_batches, packed.micro_batches):
                a = step(iter([(mb_a, None)]), model)[0].logits.float()
                b = step(iter([(mb_b, None)]), model)[0].logits.float()
                worst, scale = max(worst, float((a - b).abs().max())), max(scale, float(a.abs().max()))
        out["logits_rel"] = worst / max(scale, 1e-30)
    runs = []
    for batch in (padded, packed):
        avsd.zero_grads()
        teacher = avsd.score_teachers(batch)
        per_microbatch = avsd.update_student(batch, teacher)
        grads = [p.main_grad.detach().float().clone() if hasattr(p, "main_grad") else p.grad.detach().float().clone()
                 for p in model.parameters() if p.requires_grad]
        runs.append((teacher, _loss(per_microbatch), grads))
    avsd.zero_grads()
    (teacher_a, loss_a, grads_a), (teacher_b, loss_b, grads_b) = runs
    if last:
        out["view_logprob_abs"] = max(float((a.view_logprobs - b.view_logprobs).abs().max())
                                      for a, b in zip(teacher_a, teacher_b))
        out["loss_rel"] = abs(loss_a - loss_b) / max(abs(loss_a), 1e-30)
    dot = torch.stack([(a * b).sum() for a, b in zip(grads_a, grads_b)]).sum()
    norms = torch.stack([torch.stack([(a * a).sum(), (b * b).sum()]) for a, b in zip(grads_a, grads_b)]).sum(0)
    totals = torch.cat([dot.view(1), norms])
    dist.all_reduce(totals, group=parallel_state.get_model_parallel_group())  # the whole model's gradient
    out["grad_cosine"] = float(totals[0] / (totals[1].sqrt() * totals[2].sqrt()).clamp(min=1e-30))
    out["pass"] = all(out[k] >= v if k == "grad_cosine" else out[k] <= v
                      for k, v in PACKED_TOLERANCES.items() if k in out)
    return out


def ce_forward_step(data_iterator, model):
    """Plain CE on the student rows: Megatron's per-token CE, summed over the completion-predicting positions."""
    micro_batch = next(data_iterator)
    tokens = micro_batch.student.tokens  # [B, L_s]
    labels = torch.roll(tokens, shifts=-1, dims=1)  # position s predicts token s + 1
    mask = torch.zeros(tokens.numel(), dtype=torch.float32, device=tokens.device)
    mask[micro_batch.student.gather_index] = 1.0  # flat index s * B + b (sequence-first)
    mask = mask.view(tokens.shape[1], tokens.shape[0]).t()  # [B, L_s]
    per_token = model(tokens, micro_batch.student.position_ids, None, labels=labels)  # [B, L_s] fp32

    def loss_func(output):
        loss_sum = (output.float() * mask).sum()
        count = mask.sum().to(torch.int)
        return loss_sum, count, {"ce": torch.stack([loss_sum.detach(), count.float()])}

    return per_token, loss_func


def forward_flops(shape: dict, rows: int, length: int, output_positions: int, num_layers: int) -> float:
    """Dense forward FLOPs of `rows` causal rows of `length` tokens; the output layer at `output_positions`."""
    h, f = shape["hidden_size"], shape["intermediate_size"]
    q, kv = shape["num_attention_heads"] * shape["head_dim"], shape["num_key_value_heads"] * shape["head_dim"]
    per_token = 2 * h * (q + 2 * kv) + 2 * q * h + 6 * h * f
    attention = 4 * q * length * (length + 1) / 2  # sum over positions of 4 Q (position + 1)
    return num_layers * rows * (length * per_token + attention) + output_positions * 2 * h * shape["vocab_size"]


def predicted(args: argparse.Namespace, dp: int) -> dict[str, float]:
    """The planner's time model (`training.plan.estimate`) for this benchmark's shape and the base `avsd` variant
    (bf16, distributed optimizer: θ restored from the fp32 master): seconds per phase of one step. `swap` is the
    teacher's copy in plus the restore (also inside score_teachers); `swap_old` the 3-copy swap of avsd/swap-old."""
    import dataclasses

    from avsd_megatron.training.plan import GPUS, Assumptions, model_dims, rank_parameters
    from avsd_megatron.training.plan import forward_flops as plan_flops
    from avsd_megatron.training.plan.estimate import (
        compute_seconds,
        master_restore_seconds,
        optimizer_seconds,
        swap_seconds,
    )

    if args.gpu not in GPUS:
        raise SystemExit(f"--gpu {args.gpu!r} is not one of {sorted(GPUS)}")
    if dp < 1:
        raise SystemExit(f"--dp {dp} must be >= 1 (the data-parallel size the planner assumes)")
    a, gpu = Assumptions(), GPUS[args.gpu]
    dims = dataclasses.replace(model_dims("Qwen3-8B").dims, num_layers=args.layers)
    gpus, rows, micro = args.tp * args.pp, args.micro_batch_size, args.micro_batches
    n = rows * args.completion
    rank = max(rank_parameters(dims, args.tp, args.pp, s).count for s in range(args.pp))  # the slowest stage
    score = plan_flops(dims, args.views * rows, args.teacher_prompt + args.completion, args.views * n)
    update = 3 * plan_flops(dims, rows, args.student_prompt + args.completion, n)
    restore = master_restore_seconds(rank, 2, dp, gpu, a, dp_in_node=gpus * dp <= 8)  # bf16 weights
    swap = swap_seconds(2 * rank, gpu, a, teacher="frozen", storage=args.teacher_storage, restore_seconds=restore)
    return {
        "score_teachers": compute_seconds(micro * score, gpus, gpu, a.mfu_scoring, pp=args.pp, micro=micro) + swap,
        "update_student": compute_seconds(micro * update, gpus, gpu, a.mfu_update, pp=args.pp, micro=micro),
        "optimizer": optimizer_seconds(rank / dp, 2, 12, gpu, a),  # bf16 params; fp32 master + 2 Adam moments
        "swap": swap,
        "swap_old": swap_seconds(2 * rank, gpu, a, teacher="frozen", storage=args.teacher_storage),
    }


def predicted_line(args: argparse.Namespace, dp: int) -> str:
    """One line: the planner's phase times and the step they add up to (swap counted once, inside scoring)."""
    times = predicted(args, dp)
    step = times["score_teachers"] + times["update_student"] + times["optimizer"]
    return (f"planner (modelled, {args.gpu}, TP {args.tp} PP {args.pp} DP {dp}, Qwen3-8B x {args.layers} layers, "
            f"teacher storage {args.teacher_storage}): " + ", ".join(f"{k} {v:.3f}" for k, v in times.items())
            + f"; AVSD step {step:.3f} s")


def _sync(args: argparse.Namespace) -> None:
    if not args.cpu_smoke:
        torch.cuda.synchronize()


def _allocated(args: argparse.Namespace) -> int:
    return 0 if args.cpu_smoke else torch.cuda.memory_allocated()


def runnable(args: argparse.Namespace, providers: frozenset[str]) -> list[str]:
    """The variants this machine and layout can run (--variants, else all of them)."""
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = sorted(set(wanted) - set(VARIANTS))
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
        if "avsd/packed" in wanted and (args.cpu_smoke or args.local_spec or "transformer_engine" not in providers):
            raise SystemExit("--variants avsd/packed needs Transformer Engine on CUDA (THD attention); the local spec "
                             "and --cpu-smoke cannot run it")
        return wanted
    names = list(CPU_VARIANTS if args.cpu_smoke else VARIANTS)
    if (args.tp < 2 or args.local_spec) and "avsd/sp" in names:
        names.remove("avsd/sp")
    if "avsd/packed" in names and (args.local_spec or "transformer_engine" not in providers):
        names.remove("avsd/packed")
        print("# avsd/packed skipped: packed (THD) rows need Transformer Engine's attention "
              "(parallel.sequence_packing)")
    if args.cpu_smoke:
        print("# avsd/packed not in the CPU smoke: the local spec has no THD attention "
              "(tests/hook/test_packing.py checks packing on CPU)")
    return names


def run_variant(args: argparse.Namespace, name: str) -> dict:
    """Build the variant's model, run warmup + timed steps; its measurements (rank-local)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from avsd_megatron.hook.step import AVSDStep, MegatronGroups
    from avsd_megatron.hook.teacher_kinds import build_teacher
    from avsd_megatron.training.rollout_memory import RolloutOffload

    cfg = train_config(args, VARIANTS[name])
    model, optimizer, _ = build(args, cfg)
    padded = synthetic_batch(args, cfg, parallel_state.get_data_parallel_rank())
    batch = packed_batch(args, cfg, padded) if cfg.parallel.sequence_packing else padded
    teacher = build_teacher(cfg.avsd.teacher_config(), model.parameters(), model, optimizer)
    groups = MegatronGroups.from_parallel_state()
    vocab = hf_config(args)["vocab_size"]
    avsd = AVSDStep(model, optimizer, cfg.avsd.loss_config(args.temperature, vocab), teacher, groups=groups)
    offload = RolloutOffload(model, optimizer, grad_buffers=cfg.memory.offload_grad_buffers,
                             optimizer_states=cfg.memory.offload_optimizer_states, on_cpu=args.cpu_smoke)
    offloads = cfg.memory.offload_grad_buffers or cfg.memory.offload_optimizer_states
    schedule = get_forward_backward_func()
    freed: list[int] = []

    def timed(fn) -> float:
        _sync(args)
        start = time.perf_counter()
        fn()
        _sync(args)
        return time.perf_counter() - start

    def stand_in_rollout() -> None:
        before = _allocated(args)
        with offload():
            _sync(args)
            freed.append(before - _allocated(args))

    def avsd_phases() -> tuple[dict[str, float], float | None]:
        times = {}
        if offloads:
            times["offload"] = timed(stand_in_rollout)
        times["zero"] = timed(avsd.zero_grads)
        box = {}
        times["score_teachers"] = timed(lambda: box.update(out=avsd.score_teachers(batch)))
        times["update_student"] = timed(lambda: box.update(res=avsd.update_student(batch, box["out"])))
        times["optimizer"] = timed(optimizer.step)
        return times, _loss(box["res"])

    def ce_phases() -> tuple[dict[str, float], float | None]:
        times = {"zero": timed(avsd.zero_grads)}
        box = {}
        times["update_student"] = timed(lambda: box.update(res=schedule(
            forward_step_func=ce_forward_step, data_iterator=iter(batch.micro_batches), model=[model],
            num_microbatches=batch.num_microbatches, seq_length=batch.student_seq_length,
            micro_batch_size=batch.micro_batch_size, forward_only=False,
        )))
        times["optimizer"] = timed(optimizer.step)
        return times, None

    phases = ce_phases if name == "ce" else avsd_phases
    check = packed_check(model, avsd, padded, batch) if batch.packed else None
    if not args.cpu_smoke:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        phases()
    runs, losses = [], []
    for _ in range(args.steps):
        times, loss = phases()
        runs.append(times)
        losses.append(loss)
    swap_s = None if name == "ce" else _swap_time(args, teacher)
    result = dict(
        step_s=statistics.median(sum(r.values()) for r in runs),
        phases={k: statistics.median(r[k] for r in runs) for k in runs[0]},
        swap_s=swap_s,
        restore=None if name == "ce" else getattr(teacher, "restore", None),
        teacher_buffers_gib=sum(f.numel() * f.element_size() for f in getattr(teacher, "flat_buffers", [])) / 2**30,
        dtype=cfg.model.dtype,
        peak_gib=None if args.cpu_smoke else torch.cuda.max_memory_allocated() / 2**30,
        freed_gib=(statistics.median(freed) / 2**30) if freed and not args.cpu_smoke else None,
        last_loss=losses[-1],
        num_microbatches=batch.num_microbatches,
        seq=(batch.student_seq_length, batch.teacher_seq_length),
        row_lengths=[(mb.student.row_lengths.tolist(), mb.teacher.row_lengths.tolist())
                     for mb in padded.micro_batches],
        completion_tokens=padded.num_tokens,
        packed_check=check,
    )
    return result  # the model, optimizer and teacher die with this frame; measure() collects them


def _swap_time(args: argparse.Namespace, teacher) -> float:
    """Seconds to swap the teacher's weights in and the student's back (`teacher.scoring_weights()`)."""
    _sync(args)
    start = time.perf_counter()
    with teacher.scoring_weights():
        _sync(args)
    _sync(args)
    return time.perf_counter() - start


def _loss(per_microbatch) -> float | None:
    """Sum of this rank's AVSD loss numerators over micro-batches (last stage; None elsewhere)."""
    if not per_microbatch:
        return None
    total = 0.0
    for item in per_microbatch:
        value = item.get("avsd_loss") if isinstance(item, dict) else None
        if value is None:
            return None
        total += float(value[0])
    return total


def measure(args: argparse.Namespace) -> dict:
    """Run every variant; on rank 0 print the table (and write --json). Returns rank 0's results."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from avsd_megatron.training.kernels import detect_providers

    providers = detect_providers()
    if "transformer_engine" not in providers and not args.local_spec:
        args.local_spec = True  # the TE spec needs TE; the table's header says "local spec"
        if dist.get_rank() == 0:
            print("# Transformer Engine not found: Megatron's local layer spec is measured instead")
    names = runnable(args, providers)
    results = {}
    for name in names:
        results[name] = run_variant(args, name)
        gc.collect()  # the closures of run_variant hold the variant's model in reference cycles
        if not args.cpu_smoke:
            torch.cuda.empty_cache()
    dp_size = parallel_state.get_data_parallel_world_size()
    shape = TOY if args.cpu_smoke else QWEN3_8B
    world = dist.get_world_size()
    for name, r in results.items():
        n = r["completion_tokens"]  # this rank's completion tokens over its micro-batches

        def rows_flops(lengths, output_positions=0):
            return sum(forward_flops(shape, 1, length, 0, args.layers) for length in lengths) + \
                forward_flops(shape, 0, 0, output_positions, args.layers)

        student = [length for s, _ in r["row_lengths"] for length in s]
        teacher = [length for _, t in r["row_lengths"] for length in t]
        if name == "ce":
            flops = 3 * rows_flops(student, sum(student))
        else:
            flops = rows_flops(teacher, args.views * n) + 3 * rows_flops(student, n)
        r["trained_tps"] = n * dp_size / r["step_s"]
        r["tflops_per_gpu"] = flops * dp_size / r["step_s"] / world / 1e12
        r["mfu"] = r["tflops_per_gpu"] / args.peak_tflops
        base = results.get(LOSS_BASE.get(name, "avsd"), {})
        base_loss = base.get("last_loss") if base.get("dtype") == r["dtype"] else None  # fp32 vs bf16: meaningless
        r["loss_minus_base"] = (None if r["last_loss"] is None or base_loss is None
                                else r["last_loss"] - base_loss)
        r.pop("row_lengths")
    if dist.get_rank() == 0:
        print_table(args, results, providers, dp_size)
        if not args.cpu_smoke:  # the planner models Qwen3-8B's layer shape on a GPU type, not the toy on CPU
            print(predicted_line(args, dp_size))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"args": vars(args), "providers": sorted(providers), "results": results}, f, indent=1)
    return results


def print_table(args: argparse.Namespace, results: dict, providers: frozenset[str], dp_size: int) -> None:
    device = "CPU (smoke: timings mean nothing)" if args.cpu_smoke else torch.cuda.get_device_name()
    spec = "local" if args.cpu_smoke or args.local_spec else "TE"
    print(f"# gpu_step: {'toy' if args.cpu_smoke else 'Qwen3-8B'} layers x {args.layers}, TP {args.tp} PP {args.pp} "
          f"DP {dp_size}, {spec} spec, base recompute {args.recompute}, {device}; providers: "
          f"{', '.join(sorted(providers)) or 'none'}")
    print(f"# per DP rank and step: {args.micro_batches} micro-batches x B = {args.micro_batch_size}; student "
          f"prompt {args.student_prompt}, {args.views} teacher prompts {args.teacher_prompt}, completion "
          f"{args.completion} tokens; teacher storage {args.teacher_storage}")
    print("| variant | step (s) | trained tok/s | TFLOP/s/GPU | MFU | peak (GiB) | offload frees (GiB) | swap (s) | "
          "restore, teacher buffers (GiB) | loss - base | phases (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def fmt(value, spec_: str) -> str:
        return "-" if value is None else format(value, spec_)

    for name, r in results.items():
        phases = ", ".join(f"{k} {v:.3f}" for k, v in r["phases"].items())
        check = r.get("packed_check")
        if check is not None:  # rank 0's view (the loss and view log-probs are the last stage's)
            parts = ", ".join(f"{k} {v:.3g}" for k, v in check.items() if k != "pass")
            phases += f"; packed = padded: {'PASS' if check['pass'] else 'FAIL'} ({parts})"
        print(f"| {name} | {r['step_s']:.3f} | {r['trained_tps']:,.0f} | {r['tflops_per_gpu']:.1f} | "
              f"{r['mfu']:.1%} | {fmt(r['peak_gib'], '.1f')} | {fmt(r['freed_gib'], '.2f')} | "
              f"{fmt(r['swap_s'], '.3f')} | {r['restore'] or '-'}, {r['teacher_buffers_gib']:.2f} | "
              f"{fmt(r['loss_minus_base'], '.3g')} | {phases} |")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)  # first, so that --help works anywhere
    if args.predict:
        line = predicted_line(args, args.dp)
        print(line)
        return {"predicted": predicted(args, args.dp), "line": line}
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks/gpu_step.py measures GPU throughput and needs CUDA; none is available here "
            "(--cpu-smoke runs the CPU-runnable variants at a toy size)."
        )
    init_distributed(args)
    try:
        return measure(args)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
