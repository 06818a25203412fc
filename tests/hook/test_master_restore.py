"""Restoring θ from the distributed optimizer's fp32 master (avsd_megatron/hook/master_restore.py) = today's swap.

Run: python -m pytest -q tests/hook/test_master_restore.py     (three 2-rank launches, ~25 s on 2 busy cores)

Each launch (TP2; DP2, the distributed optimizer sharding the master over both ranks; PP2) builds twin tiny Qwen3
models with bf16 parameters (Float16Module, fp32 master), one per restore path, for each swapping teacher kind
(frozen, ema), and runs on both: one AVSD step (θ moves away from θ₀ and the master is updated), the scoring pass,
then a second step. Restore-from-master must equal the swap bit for bit: the teacher scores, the weights after the
scoring pass (and both = θ before it), the second step's loss, gradient norm and weights. It allocates no swap
buffer. Controls that show why the conditions are there: at DP2 the master -> parameter copy without the all-gather
leaves the other rank's shard at the teacher's values; with fp32 parameters the "master" is the parameter itself,
so the same library calls leave θ₀ in the model; both are what `restore='master'` refuses or does.
In process: the auto choice keeps the swap without a distributed optimizer (bf16 `Float16OptimizerWithFloat16Params`
and fp32 params) and a forced restore='master' there raises naming the reason.
"""

from __future__ import annotations

import functools

import pytest
import torch

from avsd_megatron.hook.loss import AVSDLossConfig
from avsd_megatron.hook.teacher_kinds import TeacherConfig
from avsd_megatron.testing import build_tiny_gpt_model, init_megatron, run_on_ranks, tiny_qwen3_config

V = 128  # vocabulary, divisible by TP=2
VIEWS = ("full_solution", "answer_only")
NUM_EXAMPLES = 4
MBS = 2
MAX_SEQ = 24
SEED = 4321
ADAM = dict(lr=1e-2, adam_eps=1e-8)  # large enough that one step moves bf16 weights
LAYOUTS = {"tp2": (2, 1), "dp2": (1, 1), "pp2": (1, 2)}  # (tp, pp) over 2 ranks; dp2 shards the master over both


def _batch(dp_rank: int, dp_size: int):
    from avsd_megatron.hook.batch import build_avsd_batch

    gen = torch.Generator().manual_seed(11)

    def ids(lo: int, hi: int) -> list[int]:
        n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        return torch.randint(1, V, (n,), generator=gen).tolist()

    student = [ids(2, 6) for _ in range(NUM_EXAMPLES)]
    teacher = [[ids(1, 8) for _ in VIEWS] for _ in range(NUM_EXAMPLES)]
    completions = [ids(2, 5) for _ in range(NUM_EXAMPLES)]
    per_rank = NUM_EXAMPLES // dp_size
    part = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    return build_avsd_batch(student[part], teacher[part], completions[part], view_names=VIEWS,
                            micro_batch_size=MBS, pad_id=0, vocab_size=V, max_seq_length=MAX_SEQ)


def _model_and_optimizer(tp: int, pp: int = 1, *, bf16: bool = True, distributed: bool = True):
    """DDP([Float16Module](GPTModel)) + a Megatron optimizer (the distributed one unless `distributed=False`)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    dtype = torch.bfloat16 if bf16 else torch.float32
    config = tiny_qwen3_config(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, bf16=bf16,
                               params_dtype=dtype, pipeline_dtype=dtype)
    config.finalize_model_grads_func = finalize_model_grads
    gpt = build_tiny_gpt_model(config, V, MAX_SEQ, seed=SEED)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed)
    model = DistributedDataParallel(config, ddp_config, Float16Module(config, gpt) if bf16 else gpt)
    opt_config = OptimizerConfig(optimizer="adam", bf16=bf16, use_distributed_optimizer=distributed, clip_grad=0.0,
                                 **ADAM)
    return model, get_megatron_optimizer(opt_config, [model], use_gloo_process_groups=False)


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Bit for bit: same dtypes, shapes and bytes."""
    return all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(torch.uint8), y.view(torch.uint8))
               for x, y in zip(a, b, strict=True))


def restore_rank(tp: int, pp: int) -> dict:
    """One rank of a 2-rank TPxPP launch (DP = 2 / (tp * pp)): swap vs restore-from-master, and the two controls."""
    init_megatron(tp, pp, seed=SEED)
    from megatron.core import parallel_state

    from avsd_megatron.hook.master_restore import MasterRestore
    from avsd_megatron.hook.step import AVSDStep, MegatronGroups
    from avsd_megatron.hook.teacher_kinds import build_teacher

    groups = MegatronGroups.from_parallel_state()
    dp_size = parallel_state.get_data_parallel_world_size()
    batch = _batch(parallel_state.get_data_parallel_rank(), dp_size)
    loss_config = AVSDLossConfig(temperature=0.7)
    out: dict = {"dp": dp_size}

    for kind in ("frozen", "ema"):
        runs = {}
        for restore in ("swap", "auto"):
            model, optimizer = _model_and_optimizer(tp, pp)
            theta0 = _params(model)
            teacher = build_teacher(TeacherConfig(kind=kind, ema_decay=0.5, restore=restore), model.parameters(),
                                    model, optimizer)
            step = AVSDStep(model, optimizer, loss_config, teacher, groups=groups)
            first = step(batch)
            before = _params(model)
            scores = [s.view_logprobs.clone() for s in step.score_teachers(batch) if s is not None]  # last stage
            after = _params(model)
            second = step(batch)
            runs[restore] = dict(
                chosen=teacher.restore, theta0=theta0, before=before, scores=scores, after=after,
                first_loss=first.loss, loss=second.loss, grad_norm=second.grad_norm, stepped=_params(model),
                flat_bytes=sum(f.numel() * f.element_size() for f in teacher.flat_buffers),
                teacher_bytes=sum(t.numel() * t.element_size() for t in teacher.teacher_tensors),
                swap_tensors=len(teacher._swap),
                param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
            )
        out[kind] = runs

    # control 1 (the all-gather matters): teacher values in, master -> parameters on this rank's shard only
    model, optimizer = _model_and_optimizer(tp, pp)
    step = AVSDStep(model, optimizer, loss_config, build_teacher(TeacherConfig(kind="live"), model.parameters()),
                    groups=groups)
    step(batch)
    theta = _params(model)
    master = MasterRestore(optimizer, model.parameters())
    out["matches"] = [master.matches_params()]  # after a step: θ = bf16(master)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)  # a stand-in teacher value that no weight holds
    out["matches"].append(master.matches_params())
    with torch.no_grad():
        for inner in optimizer.chained_optimizers:  # get_megatron_optimizer returns a ChainedOptimizer
            inner._copy_main_params_to_model_params()
    out["copy_without_gather_restores"] = _same(_params(model), theta)
    master.restore()
    out["copy_with_gather_restores"] = _same(_params(model), theta)
    out["matches"].append(master.matches_params())

    # control 2 (fp32 params have no separate master): the same library calls leave the teacher's values in place
    model, optimizer = _model_and_optimizer(tp, pp, bf16=False)
    out["fp32_why_not"] = MasterRestore.why_not(optimizer, model.parameters())
    step = AVSDStep(model, optimizer, loss_config, build_teacher(TeacherConfig(kind="live"), model.parameters()),
                    groups=groups)
    step(batch)
    theta = _params(model)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
        for inner in optimizer.chained_optimizers:  # what MasterRestore.restore() calls
            inner._copy_main_params_to_model_params()
            inner.start_param_sync_for_bucket_group_subset()
    out["fp32_calls_restore"] = _same(_params(model), theta)
    out["fp32_auto"] = build_teacher(TeacherConfig(kind="frozen"), model.parameters(), model, optimizer).restore
    return out


@functools.cache
def _launch(layout: str) -> list[dict]:
    return run_on_ranks(restore_rank, 2, *LAYOUTS[layout], timeout=300)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["frozen", "ema"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_restore_from_master_equals_the_swap_bit_for_bit(layout, kind):
    for rank, result in enumerate(_launch(layout)):
        assert result["dp"] == (2 if layout == "dp2" else 1)
        swap, master = result[kind]["swap"], result[kind]["auto"]
        assert (swap["chosen"], master["chosen"]) == ("swap", "master"), rank  # auto picks the master
        assert _same(swap["theta0"], master["theta0"]) and swap["first_loss"] == master["first_loss"]
        assert not _same(master["before"], master["theta0"]), "the first step moved θ (else the test proves nothing)"
        assert _same(master["scores"], swap["scores"]), rank  # the teacher's values were in the model
        assert _same(master["after"], master["before"]), rank  # θ back bit for bit ...
        assert _same(master["after"], swap["after"]), rank  # ... exactly as the swap put it back
        assert master["loss"] == swap["loss"] and master["grad_norm"] == swap["grad_norm"], rank
        assert _same(master["stepped"], swap["stepped"]), rank


@pytest.mark.integration
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_restore_from_master_allocates_no_swap_buffer(layout):
    for result in _launch(layout):
        for kind in ("frozen", "ema"):
            swap, master = result[kind]["swap"], result[kind]["auto"]
            assert master["swap_tensors"] == 0 and master["flat_bytes"] == master["teacher_bytes"]
            assert swap["flat_bytes"] == swap["teacher_bytes"] + swap["param_bytes"]  # today: + one swap buffer
        assert result["frozen"]["auto"]["teacher_bytes"] == result["frozen"]["auto"]["param_bytes"]  # θ₀ in bf16


@pytest.mark.integration
def test_the_param_all_gather_is_part_of_the_restore_at_dp2():
    for result in _launch("dp2"):
        assert not result["copy_without_gather_restores"]  # the other rank's shard still holds the stand-in
        assert result["copy_with_gather_restores"]


@pytest.mark.integration
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_params_tells_whether_theta_is_bf16_of_the_master(layout):
    for result in _launch(layout):
        assert result["matches"] == [True, False, True]  # after a step; teacher values in; restored


@pytest.mark.integration
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp32_params_have_no_separate_master_and_keep_the_swap(layout):
    for result in _launch(layout):
        assert not result["fp32_calls_restore"]  # the optimizer's fp32 "master" was overwritten with the params
        assert "fp32" in result["fp32_why_not"] and "distrib_optimizer.py" in result["fp32_why_not"]
        assert result["fp32_auto"] == "swap"


# ----------------------------------------------------------------------------------------------------------------
# In process (one rank, no launch)


def without_distributed_optimizer_rank() -> dict:
    init_megatron(1, 1, seed=SEED)
    from avsd_megatron.hook.teacher_kinds import build_teacher

    out = {}
    for name, bf16 in (("bf16", True), ("fp32", False)):
        model, optimizer = _model_and_optimizer(1, bf16=bf16, distributed=False)
        teacher = build_teacher(TeacherConfig(kind="frozen"), model.parameters(), model, optimizer)
        inner = [type(o).__name__ for o in getattr(optimizer, "chained_optimizers", [optimizer])]
        out[name] = dict(chosen=teacher.restore, optimizers=inner, swap_tensors=len(teacher._swap))
        try:
            build_teacher(TeacherConfig(kind="frozen", restore="master"), model.parameters(), model, optimizer)
            out[name]["forced"] = None
        except ValueError as err:
            out[name]["forced"] = str(err)
    return out


@pytest.mark.integration
def test_without_the_distributed_optimizer_the_swap_stays():
    result = run_on_ranks(without_distributed_optimizer_rank, 1, timeout=300)[0]
    assert result["bf16"]["optimizers"] == ["Float16OptimizerWithFloat16Params"]
    assert result["fp32"]["optimizers"] == ["FP32Optimizer"]
    for name in ("bf16", "fp32"):
        assert result[name]["chosen"] == "swap" and result[name]["swap_tensors"] > 0
        assert "teacher.restore='master'" in result[name]["forced"]
        assert "optim.distributed_optimizer=True" in result[name]["forced"]


def test_no_optimizer_keeps_the_swap_and_a_forced_master_is_refused():
    from avsd_megatron.hook.teacher_kinds import build_teacher

    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    assert build_teacher(TeacherConfig(kind="frozen"), model.parameters()).restore == "swap"
    with pytest.raises(ValueError, match=r"teacher.restore='master' cannot restore θ .*no optimizer"):
        build_teacher(TeacherConfig(kind="ema", restore="master"), model.parameters())
    with pytest.raises(ValueError, match=r"teacher.restore='mastr' is not one of \('auto', 'swap', 'master'\)"):
        TeacherConfig(restore="mastr")
