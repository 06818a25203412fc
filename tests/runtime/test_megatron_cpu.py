"""Tests for avsd_megatron.testing: real Megatron-Core on CPU (gloo), the rank launcher, the tiny Qwen3 model.

Run: .venv/bin/python -m pytest -q tests/runtime/test_megatron_cpu.py                       (all, ~1 min)
     .venv/bin/python -m pytest -q tests/runtime/test_megatron_cpu.py -m "not integration"  (in-process only, seconds)

Unit tests check that the CPU patches are explicit (importing the package patches nothing) and reversible, and that
the CPU RNG tracker keeps Megatron's fork contract. Integration tests launch gloo ranks with `run_on_ranks`, one
launch per parallel layout: TP1PP1 (the reference), TP2, PP2 and TP2xPP2 each build the tiny Qwen3 `GPTModel`
with the reference's full weights (`load_full_state_into`), run `get_forward_backward_func()` forward + backward over
2 micro-batches with a per-token-sum CE loss (`calculate_per_token_loss=True`), and must reproduce the reference loss
(atol 1e-5 on the per-token mean) and gradients (`gather_full_state(grads=True)`). A TP2xDP2 launch trains with
Megatron's DDP + distributed optimizer and round-trips a `dist_checkpointing` save/load.
"""

from __future__ import annotations

import functools
import pathlib
import subprocess
import sys
import time

import pytest
import torch

from avsd_megatron.runtime import megatron_on_cpu
from avsd_megatron.testing import (
    RankError,
    build_tiny_gpt_model,
    gather_full_state,
    init_megatron,
    load_full_state_into,
    run_on_ranks,
    tiny_qwen3_config,
)

V = 250  # embedding rows; deliberately not a multiple of 128 (divisible by TP=2)
S = 8  # sequence length
MBS = 2  # micro-batch size
NUM_MICROBATCHES = 2
SEED = 1234
LOSS_ATOL = 1e-5  # on the per-token mean CE (~5.5 nats)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)
# Full parameters whose gradients need no finalize_model_grads reduction (see gather_full_state), covering the
# stride-2 SwiGLU fc1, the GQA-grouped qkv, row-parallel proj/fc2, vocab-parallel embedding/output and a norm.
GRAD_KEYS = (
    "embedding.word_embeddings.weight",
    "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.0.mlp.linear_fc1.weight",
    "decoder.layers.1.self_attention.linear_proj.weight",
    "decoder.layers.1.mlp.linear_fc2.weight",
    "decoder.final_layernorm.weight",
    "output_layer.weight",
)
LAYOUTS = [(2, 1), (1, 2), (2, 2)]


# ----------------------------------------------------------------------------------------------------------------
# Rank functions (module level: launched ranks import them by name)
# ----------------------------------------------------------------------------------------------------------------


def _batches(seed: int) -> list[dict[str, torch.Tensor]]:
    """NUM_MICROBATCHES micro-batches of random tokens; the first 3 positions of row 0 are masked out."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(NUM_MICROBATCHES):
        tokens = torch.randint(0, V, (MBS, S + 1), generator=gen)  # [B, T+1]
        loss_mask = torch.ones(MBS, S)
        loss_mask[0, :3] = 0.0
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": loss_mask})
    return out


def _forward_step(data_iterator, model):
    """Megatron forward_step_func: per-token CE from GPTModel, loss_func returns (loss_sum, num_tokens, metrics)."""
    batch = next(data_iterator)
    position_ids = torch.arange(S).unsqueeze(0).expand(MBS, S)  # [B, T]
    per_token_ce = model(batch["tokens"], position_ids, None, labels=batch["labels"])  # [B, T] on the last stage

    def loss_func(output):
        loss_sum = (output.float() * batch["loss_mask"]).sum()
        num_tokens = batch["loss_mask"].sum().to(torch.int)
        return loss_sum, num_tokens, {"loss_sum": loss_sum.detach().clone(), "num_tokens": num_tokens.clone()}

    return per_token_ce, loss_func


def fwd_bwd_rank(tp: int, pp: int, full_state: dict | None, tied: bool) -> dict:
    """One rank: build the tiny model (optionally load `full_state`), run forward+backward, gather results."""
    init_megatron(tp, pp, seed=SEED)
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = tiny_qwen3_config(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model = build_tiny_gpt_model(config, V, S, seed=SEED, share_embeddings_and_output_weights=tied)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    initial_state = gather_full_state(model, tp_group=tp_group, pp_group=pp_group)
    if full_state is not None:
        load_full_state_into(model, full_state, tp_group=tp_group)
    loaded_state = gather_full_state(model, tp_group=tp_group, pp_group=pp_group)

    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(_batches(SEED)),
        model=[model],
        num_microbatches=NUM_MICROBATCHES,
        seq_length=S,
        micro_batch_size=MBS,
        forward_only=False,
    )  # one metrics dict per micro-batch on the last stage, [] elsewhere
    qk_norm_grads = {n: p.grad.clone() for n, p in model.named_parameters() if "q_layernorm" in n}  # local, unreduced
    return {
        "is_last_stage": parallel_state.is_pipeline_last_stage(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "loss_sums": [float(m["loss_sum"]) for m in losses],
        "num_tokens": [int(m["num_tokens"]) for m in losses],
        "initial_state": initial_state,
        "loaded_state": loaded_state,
        "grads": gather_full_state(model, tp_group=tp_group, pp_group=pp_group, grads=True),
        "qk_norm_grads": qk_norm_grads,
    }


def _ddp_model_and_optimizer(tp: int):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = tiny_qwen3_config(tensor_model_parallel_size=tp)
    config.finalize_model_grads_func = finalize_model_grads  # DP/TP grad reductions + 1/num_tokens scaling
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    model = DistributedDataParallel(config, ddp_config, build_tiny_gpt_model(config, V, S, seed=SEED))
    opt_config = OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True, clip_grad=1.0)
    optimizer = get_megatron_optimizer(opt_config, [model], use_gloo_process_groups=False)
    return model, optimizer


def _train_step(model, optimizer, data_seed: int) -> tuple[bool, float, list[float]]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(_batches(data_seed)),
        model=[model],
        num_microbatches=NUM_MICROBATCHES,
        seq_length=S,
        micro_batch_size=MBS,
        forward_only=False,
    )
    update_successful, grad_norm, _ = optimizer.step()
    return update_successful, float(grad_norm), [float(m["loss_sum"]) for m in losses]


def _adam_moments(optimizer) -> list[torch.Tensor]:
    inner = optimizer.chained_optimizers[0].optimizer  # ChainedOptimizer -> DistributedOptimizer -> torch Adam
    return [state[k].clone() for state in inner.state.values() for k in ("exp_avg", "exp_avg_sq")]


def ddp_checkpoint_rank(tp: int, ckpt_dir: str) -> dict:
    """One rank: 2 DDP + distributed-optimizer steps, dist_checkpointing save, load into a fresh model/optimizer."""
    init_megatron(tp, 1, seed=SEED)
    from megatron.core import dist_checkpointing, parallel_state

    metadata = {"distrib_optim_sharding_type": "dp_reshardable"}  # the 0.19 default format rejects flattened ranges
    dp_rank = parallel_state.get_data_parallel_rank()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    model, optimizer = _ddp_model_and_optimizer(tp)
    steps = [_train_step(model, optimizer, data_seed=100 * step + dp_rank) for step in range(2)]
    model_sd = model.module.sharded_state_dict()
    optimizer_sd = optimizer.sharded_state_dict(model_sd, metadata=metadata)
    dist_checkpointing.save({"model": model_sd, "optimizer": optimizer_sd}, ckpt_dir)

    fresh_model, fresh_optimizer = _ddp_model_and_optimizer(tp)
    # torch Adam (the no-TE/Apex fallback) has no state until it steps, and DistributedOptimizer.state_dict() needs
    # one; a zero-gradient step creates it. Known Megatron 0.19 quirk: the loaded per-param Adam `step` keeps this
    # fresh value, so only params and moments are compared below.
    fresh_model.zero_grad_buffer()
    fresh_optimizer.step()
    fresh_sd = fresh_model.module.sharded_state_dict()
    fresh_optimizer_sd = fresh_optimizer.sharded_state_dict(fresh_sd, is_loading=True, metadata=metadata)
    loaded = dist_checkpointing.load({"model": fresh_sd, "optimizer": fresh_optimizer_sd}, ckpt_dir)
    fresh_model.module.load_state_dict(loaded["model"])
    with torch.no_grad():  # fp32 main params are views of the model's params; Megatron copies into them in place
        fresh_optimizer.load_state_dict(loaded["optimizer"])
    return {
        "steps": steps,
        "trained": gather_full_state(model, tp_group=tp_group),
        "restored": gather_full_state(fresh_model, tp_group=tp_group),
        "moments": _adam_moments(optimizer),
        "restored_moments": _adam_moments(fresh_optimizer),
    }


def rank_identity(tag: str) -> tuple[str, int, int]:
    import torch.distributed as dist

    return tag, dist.get_rank(), dist.get_world_size()


def fail_on_rank_one() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank one")
    dist.barrier()  # rank 0 blocks here until the launcher kills it


def hang_on_rank_zero() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        time.sleep(600)


# ----------------------------------------------------------------------------------------------------------------
# Unit tests (in process)
# ----------------------------------------------------------------------------------------------------------------

_PATCHED_CUDA_NAMES = ("current_device", "Stream", "stream", "current_stream", "synchronize", "is_available")


def test_import_testing_patches_nothing():
    """A fresh interpreter importing avsd_megatron.testing and .runtime keeps torch.cuda intact, loads no Megatron."""
    code = (
        "import sys, torch\n"
        f"names = {_PATCHED_CUDA_NAMES!r}\n"
        "before = {n: getattr(torch.cuda, n) for n in names}\n"
        "import avsd_megatron.runtime, avsd_megatron.testing\n"
        "assert all(getattr(torch.cuda, n) is before[n] for n in names), 'torch.cuda patched on import'\n"
        "assert not avsd_megatron.runtime.is_installed()\n"
        "assert not any(m.startswith('megatron') for m in sys.modules), 'megatron imported'\n"
        "from torch.overrides import _get_current_function_mode_stack\n"
        "assert not _get_current_function_mode_stack(), 'a TorchFunctionMode is active'\n"
    )
    repo_root = pathlib.Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_megatron_on_cpu_redirects_and_restores():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker
    from torch.overrides import _get_current_function_mode_stack

    before = {n: getattr(torch.cuda, n) for n in _PATCHED_CUDA_NAMES}
    tracker_before = (CudaRNGStatesTracker.__dict__["add"], CudaRNGStatesTracker.__dict__["fork"])
    modes_before = len(_get_current_function_mode_stack())
    with megatron_on_cpu():
        assert torch.cuda.current_device() == "cpu"
        assert not torch.cuda.is_available()
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.empty(1, device=torch.device("cuda", 0)).device.type == "cpu"
        x = torch.ones(3)
        assert x.cuda() is x
        assert x.type() == "torch.cuda.FloatTensor"
        assert x.type(torch.float64).dtype == torch.float64  # conversions are untouched
        torch.cuda.current_stream().wait_stream(torch.cuda.Stream())
        with torch.cuda.stream(torch.cuda.Stream()):
            torch.cuda.synchronize()
        with megatron_on_cpu():  # nested: a no-op, the outer block owns the patches
            assert torch.cuda.current_device() == "cpu"
        assert torch.cuda.current_device() == "cpu"
    assert all(getattr(torch.cuda, n) is before[n] for n in _PATCHED_CUDA_NAMES)
    assert (CudaRNGStatesTracker.__dict__["add"], CudaRNGStatesTracker.__dict__["fork"]) == tracker_before
    assert len(_get_current_function_mode_stack()) == modes_before
    assert torch.ones(1).type() == "torch.FloatTensor"
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError)):  # no driver / CPU-only build: CUDA is real again
            torch.zeros(1, device="cuda")


def test_cpu_rng_fork_keeps_default_stream_and_advances_tracked_one():
    """Megatron's fork contract: the block draws from the named state, which advances; the default state is restored."""
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    with megatron_on_cpu():
        tracker = CudaRNGStatesTracker()
        tracker.add("model-parallel-rng", 7)
        default_before = torch.get_rng_state()
        with tracker.fork():
            first = torch.rand(4)
        assert torch.equal(torch.get_rng_state(), default_before)
        with tracker.fork():
            second = torch.rand(4)
    gen = torch.Generator().manual_seed(7)
    assert torch.equal(first, torch.rand(4, generator=gen))
    assert torch.equal(second, torch.rand(4, generator=gen))


def test_run_on_ranks_rejects_nested_function():
    def nested():
        return 0

    with pytest.raises(TypeError, match="module-level function"):
        run_on_ranks(nested, 2)


def test_init_megatron_refuses_outside_launched_rank():
    with pytest.raises(RuntimeError, match="run_on_ranks"):
        init_megatron(1, 1)


# ----------------------------------------------------------------------------------------------------------------
# Integration tests (gloo ranks)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_run_on_ranks_returns_results_in_rank_order():
    assert run_on_ranks(rank_identity, 3, "x", timeout=120) == [("x", 0, 3), ("x", 1, 3), ("x", 2, 3)]


@pytest.mark.integration
def test_run_on_ranks_names_failing_rank_and_kills_peers():
    start = time.monotonic()
    with pytest.raises(RankError, match=r"rank 1/2 failed in tests\.runtime\.test_megatron_cpu\.fail_on_rank_one") as info:
        run_on_ranks(fail_on_rank_one, 2, timeout=120)
    assert "ValueError: deliberate failure on rank one" in str(info.value)
    assert time.monotonic() - start < 60, "the blocked peer should be killed after a short grace, not at timeout"


@pytest.mark.integration
def test_run_on_ranks_times_out_and_names_missing_rank():
    # Rank 1 reports at once; under heavy load start-up alone may exceed the timeout, so rank 1 may be listed too.
    with pytest.raises(TimeoutError, match=r"ranks \[0(, 1)?\] of 2 did not report within timeout=8"):
        run_on_ranks(hang_on_rank_zero, 2, timeout=8)


@functools.cache
def _launch(tp: int, pp: int, tied: bool = False) -> list[dict]:
    """One launch per layout, shared by the tests below; non-reference layouts load the TP1PP1 weights."""
    full_state = None if (tp, pp) == (1, 1) else _launch(1, 1, tied)[0]["initial_state"]
    return run_on_ranks(fwd_bwd_rank, tp * pp, tp, pp, full_state, tied, timeout=240)


def _last_stage(results: list[dict]) -> dict:
    return next(r for r in results if r["is_last_stage"])


def _mean_loss(result: dict) -> float:
    return sum(result["loss_sums"]) / sum(result["num_tokens"])


@pytest.mark.integration
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{tp}pp{pp}" for tp, pp in LAYOUTS])
def test_fwd_bwd_loss_matches_tp1pp1(tp, pp):
    ref, got = _last_stage(_launch(1, 1)), _last_stage(_launch(tp, pp))
    assert got["num_tokens"] == ref["num_tokens"] == [MBS * S - 3] * NUM_MICROBATCHES
    assert abs(_mean_loss(got) - _mean_loss(ref)) <= LOSS_ATOL, (_mean_loss(got), _mean_loss(ref))
    for got_sum, ref_sum, n in zip(got["loss_sums"], ref["loss_sums"], got["num_tokens"]):
        assert abs(got_sum / n - ref_sum / n) <= LOSS_ATOL, (got["loss_sums"], ref["loss_sums"])


@pytest.mark.integration
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{tp}pp{pp}" for tp, pp in LAYOUTS])
def test_fwd_bwd_grads_match_tp1pp1(tp, pp):
    ref = _launch(1, 1)[0]["grads"]
    for result in _launch(tp, pp):  # the gathered gradients are the same on every rank
        for key in GRAD_KEYS:
            torch.testing.assert_close(result["grads"][key], ref[key], **GRAD_TOL, msg=lambda m: f"{key}: {m}")


@pytest.mark.integration
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{tp}pp{pp}" for tp, pp in LAYOUTS])
def test_load_then_gather_full_state_roundtrips(tp, pp):
    ref = _launch(1, 1)[0]["initial_state"]
    for result in _launch(tp, pp):
        assert result["loaded_state"].keys() == ref.keys()
        for key in ref:
            assert torch.equal(result["loaded_state"][key], ref[key]), key


@pytest.mark.integration
def test_cpu_initialization_gives_same_logical_weights_across_tp():
    """use_cpu_initialization draws full master weights, so TP2 with the same seed equals TP1 before any loading."""
    ref = _launch(1, 1)[0]["initial_state"]
    got = _launch(2, 1)[0]["initial_state"]
    assert got.keys() == ref.keys()
    for key in ref:
        assert torch.equal(got[key], ref[key]), key


@pytest.mark.integration
def test_qk_layernorm_grads_are_per_rank_partial_sums_under_tp():
    """QK-norm weights are replicated but each TP rank only sees its heads: the full gradient is the sum over TP
    (what finalize_model_grads all-reduces), so a training step needs it."""
    ref = _launch(1, 1)[0]["qk_norm_grads"]
    results = _launch(2, 1)
    for name, ref_grad in ref.items():
        summed = sum(r["qk_norm_grads"][name] for r in results)
        torch.testing.assert_close(summed, ref_grad, **GRAD_TOL)


@pytest.mark.integration
def test_tied_embeddings_tp2pp2_loss_matches_tp1pp1():
    """Tied output layer: the last PP stage's output_layer copy is loaded from the embedding."""
    ref, got = _last_stage(_launch(1, 1, True)), _last_stage(_launch(2, 2, True))
    assert "output_layer.weight" not in _launch(1, 1, True)[0]["initial_state"]
    assert abs(_mean_loss(got) - _mean_loss(ref)) <= LOSS_ATOL, (_mean_loss(got), _mean_loss(ref))


@pytest.mark.integration
def test_ddp_distributed_optimizer_checkpoint_roundtrip_tp2dp2(tmp_path):
    results = run_on_ranks(ddp_checkpoint_rank, 4, 2, str(tmp_path), timeout=300)  # save needs an existing, empty dir
    for result in results:
        for update_successful, grad_norm, loss_sums in result["steps"]:
            assert update_successful and torch.isfinite(torch.tensor(grad_norm))
            assert len(loss_sums) == NUM_MICROBATCHES and all(torch.isfinite(torch.tensor(loss_sums)))
        assert result["steps"][0][1] == results[0]["steps"][0][1], "grad norm must agree across ranks"
        assert result["trained"].keys() == result["restored"].keys()
        for key in result["trained"]:
            assert torch.equal(result["trained"][key], result["restored"][key]), key
        for moment, restored in zip(result["moments"], result["restored_moments"], strict=True):
            assert torch.equal(moment, restored)
    initial = _launch(1, 1)[0]["initial_state"]
    assert any(not torch.equal(results[0]["trained"][k], initial[k]) for k in initial), "training changed nothing"
