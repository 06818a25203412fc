"""Throughput and MFU of one AVSD step (teacher scoring + student update) vs a plain cross-entropy step, on GPUs.

Run (one GPU; Qwen3-8B-shaped layers, 4 of its 36 layers, full vocabulary):
    python benchmarks/gpu_step.py
    python benchmarks/gpu_step.py --layers 8 --micro-batches 4 --teacher-storage device
Several GPUs (TP x PP x DP = number of processes):
    torchrun --nproc-per-node 8 benchmarks/gpu_step.py --tp 2 --pp 2 --layers 8
Needs CUDA, megatron-core 0.19 and, for the intended numbers, Transformer Engine (the NGC PyTorch container); without
TE it falls back to Megatron's local layer spec and says so. On a machine without CUDA it exits with a message.

What is measured, on one model (bf16, DDP + distributed optimizer, Adam) in one run:
* AVSD: `AVSDStep`'s phases timed one by one -- zero grads, `score_teachers` (frozen teacher swapped in from
  `--teacher-storage`, one forward-only schedule over the M * B teacher rows, output layer at the M * N
  completion positions only), `update_student` (forward + backward, output layer at the N completion positions),
  `optimizer.step()`. Sampled-token loss, M = 3 views.
* CE: the same student rows, Megatron's own `GPTModel(labels=...)` per-token cross-entropy (output layer at every
  position), summed over the same completion tokens, same optimizer.
Synthetic rows without padding: student prompt `--student-prompt` tokens, teacher prompts `--teacher-prompt` tokens
(the privileged view makes them longer), completions `--completion` tokens; B = `--micro-batch-size` prompts per
micro-batch, `--micro-batches` per step per DP rank.

Reported per variant: step time (median of `--steps` after `--warmup`), trained completion tokens/s (the N tokens
both variants learn from, summed over DP ranks), processed tokens/s (every row position, teacher rows included),
model TFLOP/s per GPU and MFU against `--peak-tflops` (H100/H200 SXM dense bf16: 989), peak memory. FLOPs are
counted analytically, dense matmuls only: per layer and token 2H(Q + 2K) + 2QH + 6HF (qkv, proj, SwiGLU MLP) plus
causal attention 4Q * (position + 1), plus 2HV per position that runs the output layer; training = 3 x forward
(no recomputation counted), scoring = 1 x forward. Embedding lookups, norms, softmax and the AVSD kernels are not
counted. The planner (`avsd_megatron.training.plan`, `forward_flops`) uses the same count; tests/training/test_plan.py
checks that the two agree.

Next to the measurement the script prints the planner's modelled times for the same shape (`--gpu` picks the GPU type
of its hardware model); `--predict` prints only those, without a GPU (`--dp` = the data-parallel size to assume).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, for avsd_megatron

QWEN3_8B = dict(hidden=4096, ffn=12288, heads=32, kv_heads=8, head_dim=128, vocab=151_936, rope_theta=1_000_000)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # model
    parser.add_argument("--layers", type=int, default=4, help="transformer layers (Qwen3-8B has 36)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (must divide --layers)")
    parser.add_argument("--sequence-parallel", action="store_true", help="Megatron sequence parallelism (TP > 1)")
    parser.add_argument("--local-spec", action="store_true", help="force Megatron's local layer spec (no TE)")
    # batch
    parser.add_argument("--micro-batch-size", type=int, default=2, help="B prompts per micro-batch")
    parser.add_argument("--micro-batches", type=int, default=2, help="micro-batches per step per DP rank")
    parser.add_argument("--student-prompt", type=int, default=256, help="student prompt tokens")
    parser.add_argument("--teacher-prompt", type=int, default=1024, help="teacher prompt tokens (with the view)")
    parser.add_argument("--completion", type=int, default=1024, help="sampled completion tokens")
    parser.add_argument("--views", type=int, default=3, help="M privileged views")
    # AVSD
    parser.add_argument("--teacher-storage", choices=("cpu", "device"), default="cpu", help="where θ₀ lives")
    parser.add_argument("--temperature", type=float, default=0.7, help="rollout temperature τ")
    # timing
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of one GPU, TFLOP/s")
    parser.add_argument("--seed", type=int, default=1234)
    # the planner's prediction
    parser.add_argument("--gpu", default="h100-80gb", help="GPU type of the planner's hardware model")
    parser.add_argument("--predict", action="store_true", help="print the planner's modelled phase times and exit")
    parser.add_argument("--dp", type=int, default=1, help="--predict: data-parallel size to assume")
    return parser.parse_args()


def predicted(args: argparse.Namespace, dp: int) -> dict[str, float]:
    """The planner's time model (`training.plan.estimate`) for this benchmark's shape: seconds per phase."""
    import dataclasses

    from avsd_megatron.training.plan import GPUS, Assumptions, model_dims, rank_parameters
    from avsd_megatron.training.plan import forward_flops as plan_flops
    from avsd_megatron.training.plan.estimate import compute_seconds, optimizer_seconds, swap_seconds

    a, gpu = Assumptions(), GPUS[args.gpu]
    dims = dataclasses.replace(model_dims("Qwen3-8B").dims, num_layers=args.layers)
    gpus, rows, micro = args.tp * args.pp, args.micro_batch_size, args.micro_batches
    n = rows * args.completion
    rank = max(rank_parameters(dims, args.tp, args.pp, s).count for s in range(args.pp))
    score = plan_flops(dims, args.views * rows, args.teacher_prompt + args.completion, args.views * n)
    update = 3 * plan_flops(dims, rows, args.student_prompt + args.completion, n)
    return {
        "score_teachers": compute_seconds(micro * score, gpus, gpu, a.mfu_scoring, pp=args.pp, micro=micro)
        + swap_seconds(2 * rank, gpu, a, teacher="frozen", storage=args.teacher_storage),
        "update_student": compute_seconds(micro * update, gpus, gpu, a.mfu_update, pp=args.pp, micro=micro),
        "optimizer": optimizer_seconds(rank / dp, 2, 12, gpu, a),
    }


def _predicted_line(args: argparse.Namespace, dp: int) -> str:
    times = predicted(args, dp)
    return (f"planner (modelled, {args.gpu}, DP {dp}): " + ", ".join(f"{k} {v:.3f}" for k, v in times.items())
            + f"; AVSD step {sum(times.values()):.3f} s")


def init_distributed(args: argparse.Namespace):
    """NCCL process group (torchrun's env, or a 1-process group) and Megatron's parallel_state."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if "RANK" not in os.environ:  # plain `python benchmarks/gpu_step.py`: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp
    )
    model_parallel_cuda_manual_seed(args.seed)
    torch.manual_seed(args.seed)


def build(args: argparse.Namespace):
    """Qwen3-8B-shaped GPTModel (bf16) in Float16Module + DDP, with Megatron's distributed Adam."""
    import torch.nn.functional as F
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    try:
        import transformer_engine  # noqa: F401

        have_te = not args.local_spec
    except ImportError:
        have_te = False
    try:  # Megatron's fused wgrad accumulation (output layer) needs APEX's extension, shipped in NGC containers
        import fused_weight_gradient_mlp_cuda  # noqa: F401

        grad_accum_fusion = have_te
    except ImportError:
        grad_accum_fusion = False
    if have_te:
        layer_spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    else:
        layer_spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    shape = QWEN3_8B
    config = TransformerConfig(
        num_layers=args.layers,
        hidden_size=shape["hidden"],
        ffn_hidden_size=shape["ffn"],
        num_attention_heads=shape["heads"],
        num_query_groups=shape["kv_heads"],
        kv_channels=shape["head_dim"],
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=True,
        params_dtype=torch.bfloat16,
        pipeline_dtype=torch.bfloat16,
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        sequence_parallel=args.sequence_parallel,
        gradient_accumulation_fusion=grad_accum_fusion,
        calculate_per_token_loss=True,
    )
    config.finalize_model_grads_func = finalize_model_grads
    from megatron.core import parallel_state

    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=shape["vocab"],  # 151,936 = 128 * 1187: divisible by TP 1, 2, 4, 8 without padding
        max_sequence_length=args.teacher_prompt + args.completion,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=shape["rope_theta"],
    ).cuda()
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    model = DistributedDataParallel(config, ddp_config, Float16Module(config, gpt))
    opt_config = OptimizerConfig(optimizer="adam", lr=1e-6, bf16=True, use_distributed_optimizer=True, clip_grad=1.0)
    optimizer = get_megatron_optimizer(opt_config, [model])
    return model, optimizer, config, have_te


def synthetic_batch(args: argparse.Namespace, dp_rank: int):
    """This DP rank's AVSDBatch of fixed-length random rows (no padding)."""
    from avsd_megatron.hook.batch import build_avsd_batch

    gen = torch.Generator().manual_seed(args.seed + dp_rank)
    vocab = QWEN3_8B["vocab"]

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    num = args.micro_batch_size * args.micro_batches
    return build_avsd_batch(
        [ids(args.student_prompt) for _ in range(num)],
        [[ids(args.teacher_prompt) for _ in range(args.views)] for _ in range(num)],
        [ids(args.completion) for _ in range(num)],
        view_names=[f"view{m}" for m in range(args.views)],
        micro_batch_size=args.micro_batch_size,
        pad_id=0,
        vocab_size=vocab,
        pad_to_multiple_of=args.tp if args.sequence_parallel else 1,
    ).to(torch.cuda.current_device())


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


def forward_flops(rows: int, length: int, output_positions: int, num_layers: int) -> float:
    """Dense forward FLOPs of `rows` causal rows of `length` tokens; the output layer at `output_positions`."""
    s = QWEN3_8B
    h, q, kv, f = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"], s["ffn"]
    per_token = 2 * h * (q + 2 * kv) + 2 * q * h + 6 * h * f
    attention = 4 * q * length * (length + 1) / 2  # sum over positions of 4 Q (position + 1)
    return num_layers * rows * (length * per_token + attention) + output_positions * 2 * h * s["vocab"]


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> None:
    """Build, run both variants, print the table on rank 0 (after `init_distributed`)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from avsd_megatron.hook.loss import AVSDLossConfig
    from avsd_megatron.hook.step import AVSDStep, MegatronGroups
    from avsd_megatron.hook.teacher_kinds import TeacherConfig, build_teacher

    model, optimizer, config, have_te = build(args)
    dp_size = parallel_state.get_data_parallel_world_size()
    batch = synthetic_batch(args, parallel_state.get_data_parallel_rank())
    teacher = build_teacher(TeacherConfig(kind="frozen", storage=args.teacher_storage), model.parameters(), model)
    avsd = AVSDStep(
        model, optimizer, AVSDLossConfig(temperature=args.temperature), teacher,
        groups=MegatronGroups.from_parallel_state(),
    )
    schedule = get_forward_backward_func()

    def avsd_phases() -> dict[str, float]:
        times = {"zero": timed(avsd.zero_grads)}
        box = {}
        times["score_teachers"] = timed(lambda: box.update(out=avsd.score_teachers(batch)))
        times["update_student"] = timed(lambda: avsd.update_student(batch, box["out"]))
        times["optimizer"] = timed(optimizer.step)
        return times

    def ce_phases() -> dict[str, float]:
        times = {"zero": timed(avsd.zero_grads)}
        times["update_student"] = timed(lambda: schedule(
            forward_step_func=ce_forward_step, data_iterator=iter(batch.micro_batches), model=[model],
            num_microbatches=batch.num_microbatches, seq_length=batch.student_seq_length,
            micro_batch_size=batch.micro_batch_size, forward_only=False,
        ))
        times["optimizer"] = timed(optimizer.step)
        return times

    rows_s, rows_t = args.micro_batch_size, args.views * args.micro_batch_size
    len_s, len_t = batch.student_seq_length, batch.teacher_seq_length
    n = args.micro_batch_size * args.completion  # completion tokens per micro-batch
    student_fwd = forward_flops(rows_s, len_s, n, args.layers)
    flops = {  # whole model, one DP replica, one step
        "avsd": batch.num_microbatches * (forward_flops(rows_t, len_t, args.views * n, args.layers) + 3 * student_fwd),
        "ce": batch.num_microbatches * 3 * forward_flops(rows_s, len_s, rows_s * len_s, args.layers),
    }
    processed = {
        "avsd": batch.num_microbatches * (rows_t * len_t + rows_s * len_s),
        "ce": batch.num_microbatches * rows_s * len_s,
    }
    trained = batch.num_microbatches * n
    world = dist.get_world_size()

    results = {}
    for name, phases in (("ce", ce_phases), ("avsd", avsd_phases)):
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            phases()
        runs = [phases() for _ in range(args.steps)]
        step_s = statistics.median(sum(r.values()) for r in runs)
        results[name] = dict(
            step_s=step_s,
            breakdown={k: statistics.median(r[k] for r in runs) for k in runs[0]},
            trained_tps=trained * dp_size / step_s,
            processed_tps=processed[name] * dp_size / step_s,
            tflops_per_gpu=flops[name] * dp_size / step_s / world / 1e12,
            peak_gib=torch.cuda.max_memory_allocated() / 2**30,
        )

    if dist.get_rank() != 0:
        return
    print(f"# AVSD step vs CE step: Qwen3-8B layers x {args.layers}, V = {QWEN3_8B['vocab']}, "
          f"TP {args.tp} PP {args.pp} DP {dp_size}{' SP' if args.sequence_parallel else ''}, "
          f"{'TE' if have_te else 'local (no TE)'} spec, {torch.cuda.get_device_name()}")
    print(f"# per DP rank and step: {batch.num_microbatches} micro-batches x B = {args.micro_batch_size}; "
          f"student rows {len_s} tokens, {args.views} teacher rows per prompt of {len_t} tokens, "
          f"{args.completion} completion tokens; teacher storage {args.teacher_storage}")
    print("| step | time (s) | trained tok/s | processed tok/s | TFLOP/s/GPU | MFU | peak mem (GiB) | phases (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        phases = ", ".join(f"{k} {v:.3f}" for k, v in r["breakdown"].items())
        print(f"| {name} | {r['step_s']:.3f} | {r['trained_tps']:,.0f} | {r['processed_tps']:,.0f} | "
              f"{r['tflops_per_gpu']:.1f} | {r['tflops_per_gpu'] / args.peak_tflops:.1%} | "
              f"{r['peak_gib']:.1f} | {phases} |")
    print(_predicted_line(args, dp_size))
    ratio = results["avsd"]["step_s"] / results["ce"]["step_s"]
    print(f"AVSD step / CE step time: {ratio:.2f}x (same trained tokens; AVSD adds the M-view scoring pass)")


def main() -> None:
    args = parse_args()  # first, so that --help works anywhere
    if args.predict:
        print(_predicted_line(args, args.dp))
        return
    if not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks/gpu_step.py measures GPU throughput and needs CUDA; none is available here. "
            "The CPU tests (tests/hook/test_avsd_step.py) check the same step for correctness."
        )
    init_distributed(args)
    measure(args)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
