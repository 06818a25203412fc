"""Run configuration (avsd_megatron/training/config.py): paper defaults, every shipped YAML validates, YAML errors name the
file and the dotted field, dump/load round trip, the loss/teacher configs it builds, the LR schedule.

Run: python -m pytest -q tests/training/test_config.py
"""

import dataclasses
from pathlib import Path

import pytest
import torch

from avsd_megatron.hook.loss import AVSDLossConfig
from avsd_megatron.hook.teacher_kinds import TeacherConfig
from avsd_megatron.rollout.config import RolloutConfig
from avsd_megatron.signals.sampled import GateParams
from avsd_megatron.training.config import (
    AVSDConfig,
    ConfigError,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    dump_config,
    from_dict,
    load_config,
    to_dict,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_config_defaults_are_the_papers():
    cfg = TrainConfig()
    assert (cfg.prompts_per_step, cfg.micro_batch_size, cfg.max_steps) == (32, 4, 500)
    assert cfg.model.hf_path == "Qwen/Qwen3-8B" and cfg.model.dtype == "bfloat16"
    r = cfg.rollout
    assert (r.engine, r.temperature, r.top_p, r.top_k, r.max_new_tokens, r.n, r.sync_every) == (
        "vllm", 0.7, 0.95, 20, 4096, 1, 1
    )
    assert (r.vllm.gpu_memory_utilization, r.vllm.max_model_len, r.vllm.max_num_seqs) == (0.4, 16384, 8)
    a = cfg.avsd
    assert a.views == ("full_solution", "partial_solution", "answer_only") and a.partial_solution_ratio == 0.5
    assert (a.mode, a.gate, a.teacher, a.loss, a.normalization) == (
        "avsd", "avsd", "frozen", "sampled", "microbatch_token_mean"
    )
    assert (a.topk, a.beta, a.token_clip, a.ema_decay, a.epistemic_tau) == (64, 0.5, 0.05, 0.999, 0.0)
    assert a.gate_params == GateParams()
    o = cfg.optim
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.max_grad_norm, o.lr_decay, o.warmup_steps, o.min_lr, o.seed) == (
        5e-6, (0.9, 0.999), 1e-8, 0.0, 0.1, "linear", 0, 0.0, 42
    )
    assert cfg.data.sources == ("siyanzhao/Openthoughts_math_30k_opsd",) and cfg.data.task == "math"
    assert (cfg.prompts.student_thinking, cfg.prompts.teacher_thinking, cfg.prompts.max_prompt_tokens) == (
        False, True, 12288
    )
    assert (cfg.logging.log_every, cfg.logging.generations_every) == (2, 5)
    assert (cfg.checkpoint.save_every, cfg.checkpoint.keep_last) == (10, 3)  # the reference keeps all (null)
    assert cfg.num_microbatches(world_size=4) == 2  # 4 prompts x GA 2 x 4 ranks
    sb = cfg.sandbox  # spec 3.4 limits; bubblewrap, where the reference trained with an unsandboxed subprocess
    assert (sb.unsafe_subprocess, sb.wall_time_s, sb.memory_mb, sb.cpu_time_s, sb.max_output_chars) == (
        False, 2.0, 512, 30, 4000
    )


def test_config_every_section_field_has_a_default():
    """NeMo-Run's run.Config(...) may set any subset of fields (data.DataConfig is the one exception)."""
    cfg = TrainConfig()
    for section in [cfg] + [getattr(cfg, f.name) for f in dataclasses.fields(cfg)]:
        if not dataclasses.is_dataclass(section) or type(section).__name__ == "DataConfig":
            continue
        for f in dataclasses.fields(section):
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda p: p.name)
def test_config_every_example_yaml_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    assert load_config(dump_config(cfg, tmp_path / "dumped.yaml")) == cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_config_examples_include_tiny_cpu_and_qwen3_8b():
    assert {p.name for p in EXAMPLE_CONFIGS} >= {"tiny_cpu.yaml", "qwen3_8b.yaml"}
    tiny = load_config(ROOT / "examples" / "configs" / "tiny_cpu.yaml")
    assert (tiny.rollout.engine, tiny.model.layer_spec, tiny.model.dtype) == ("hf", "local", "float32")
    assert Path(ROOT / tiny.data.sources[0]).is_file()


def test_config_qwen3_8b_yaml_is_the_default_with_its_layout():
    cfg = load_config(ROOT / "examples" / "configs" / "qwen3_8b.yaml")
    expected = dataclasses.replace(
        TrainConfig(),
        output_dir="outputs/avsd/qwen3_8b",
        parallel=ParallelConfig(tp=2),
        logging=dataclasses.replace(TrainConfig().logging, tensorboard=True),
    )
    assert cfg == expected
    assert cfg.num_microbatches(world_size=8) == 2


def test_config_yaml_reads_floats_without_a_dot(tmp_path):
    cfg = load_config(_write(tmp_path, "optim:\n  lr: 5e-6\n  eps: 1e-8\n  betas: [0.9, 0.95]\n"))
    assert (cfg.optim.lr, cfg.optim.eps, cfg.optim.betas) == (5e-6, 1e-8, (0.9, 0.95))


def test_config_empty_yaml_is_the_default(tmp_path):
    assert load_config(_write(tmp_path, "")) == TrainConfig()


@pytest.mark.parametrize(
    "text, match",
    [
        ("max_stepz: 3\n", r"unknown key 'max_stepz'; TrainConfig fields: output_dir"),
        ("avsd:\n  gatee: avsd\n", r"unknown key 'avsd.gatee'"),
        ("rollout:\n  vllm:\n    util: 0.5\n", r"unknown key 'rollout.vllm.util'"),
        ("avsd:\n  gate_params:\n    alfa: 1\n", r"unknown key 'avsd.gate_params.alfa'"),
    ],
)
def test_config_unknown_key_names_the_key_and_the_file(tmp_path, text, match):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")


def test_config_bad_choice_names_the_dotted_field(tmp_path):
    path = _write(tmp_path, "avsd:\n  gate: sigmod\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: avsd.gate='sigmod' is not one of ('avsd', 'sigmoid', 'consistency_exp')"
    with pytest.raises(ConfigError) as err:
        AVSDConfig(gate="sigmod")
    assert str(err.value) == "avsd.gate='sigmod' is not one of ('avsd', 'sigmoid', 'consistency_exp')"


@pytest.mark.parametrize(
    "text, match",
    [
        ("rollout:\n  engine: tgi\n", r"rollout.engine='tgi' is not one of \('vllm', 'hf'\)"),
        ("avsd:\n  loss: sampled_token\n", r"avsd.loss='sampled_token' is not one of \('sampled', 'candidate'"),
        ("avsd:\n  normalization: seq_mean\n", r"avsd.normalization='seq_mean' is not one of"),
        ("avsd:\n  teacher: ref\n", r"avsd.teacher='ref' is not one of \('frozen', 'live', 'ema'\)"),
        ("model:\n  layer_spec: apex\n", r"model.layer_spec='apex' is not one of \('local', 'te'\)"),
        ("optim:\n  lr: fast\n", r"optim.lr must be a number, got str 'fast'"),
        ("max_steps: 1.5\n", r"max_steps must be an integer, got float 1.5"),
        ("logging:\n  tensorboard: 'yes'\n", r"logging.tensorboard must be true or false"),
        ("optim:\n  betas: [0.9]\n", r"optim.betas must have 2 items, got 1"),
        ("avsd:\n  views: full_solution\n", r"avsd.views must be a list"),
        ("rollout:\n  top_k: null\n", r"rollout.top_k must not be null"),
        ("rollout: 3\n", r"rollout must be a mapping of RolloutConfig fields"),
        ("rollout:\n  top_p: 0\n", r"rollout.top_p=0.0 must be in \(0, 1\]"),
        ("rollout:\n  temperature: 0\n", r"rollout.temperature=0.0 must be > 0 for training"),
        ("rollout:\n  vllm:\n    gpu_memory_utilization: 1.0\n", r"rollout.vllm.gpu_memory_utilization=1.0"),
        ("rollout:\n  max_new_tokens: 8192\n", r"rollout.vllm.max_model_len=16384 < prompts.max_prompt_tokens"),
        ("avsd:\n  partial_solution_ratio: 1.0\n", r"avsd.partial_solution_ratio=1.0 must be in \(0, 1\)"),
        ("avsd:\n  mode: single\n", r"avsd.mode='single' needs exactly one view"),
        ("avsd:\n  mode: consensus\n  epistemic_tau: 0.01\n", r"avsd.epistemic_tau=0.01 needs avsd.mode='avsd'"),
        ("avsd:\n  views: [full_solution, hint]\n", r"avsd.views=.* mixes math views"),
        ("avsd:\n  views: [reference, hint]\n", r"avsd.views=\('reference', 'hint'\) do not fit data.task='math'"),
        ("avsd:\n  views: [answer]\n", r"avsd.views: 'answer' is not one of"),
        ("avsd:\n  ema_decay: 1.0\n", r"avsd.ema_decay=1.0 must be in \[0, 1\)"),
        ("avsd:\n  gate_params:\n    var_coef: -1\n", r"GateParams.var_coef=-1.0 must be >= 0"),
        ("avsd:\n  loss: full_vocab\n  epistemic_tau: 0.01\n", r"avsd.epistemic_tau is not implemented for"),
        ("prompts_per_step: 30\n", r"prompts_per_step=30 is not a multiple of micro_batch_size=4"),
        ("optim:\n  min_lr: 1.0e-5\n", r"optim.min_lr=1e-05 must be <= optim.lr=5e-06"),
        ("data:\n  sources: [a.jsonl]\n", r"data: DataConfig.__init__\(\) missing 1 required positional argument"),
        ("data:\n  sources: [a.jsonl]\n  task: proof\n", r"data.task='proof' is not one of"),
        ("prompts:\n  overlong: cut\n", r"prompts.overlong='cut' is not one of"),
        ("checkpoint:\n  keep_last: 0\n", r"checkpoint.keep_last=0 must be >= 1"),
        ("sandbox:\n  wall_time_s: 0\n", r"sandbox.wall_time_s=0.0 must be > 0"),
        ("sandbox:\n  unsafe_subprocess: 1\n", r"sandbox.unsafe_subprocess must be true or false"),
        ("- a\n- b\n", r"the top level must be a mapping of TrainConfig fields"),
        ("rollout:\n  vllm:\n    engine_args: [a]\n", r"rollout.vllm.engine_args must be a mapping, got list"),
        ("rollout:\n  vllm:\n    engine_args: {1: a}\n", r"rollout.vllm.engine_args keys must be strings"),
        ("rollout:\n  vllm:\n    engine_args: {c: {2: a}}\n", r"rollout.vllm.engine_args.c keys must be strings"),
        ("rollout:\n  vllm:\n    engine_args: {seed: 3}\n", r"rollout.vllm.engine_args.seed is set by the adapter"),
        ("rollout:\n  vllm:\n    engine_args: {enable_prefix_caching: false}\n",
         r"rollout.vllm.engine_args.enable_prefix_caching has its own field: set rollout.vllm.enable_prefix_caching"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(tmp_path, text, match):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")


def test_config_dict_field_takes_nested_plain_data_and_round_trips(tmp_path):
    """dict[str, Any] fields (rollout.vllm.engine_args): nested mappings, lists and nulls pass through as plain data
    and survive dump -> load."""
    engine_args = {
        "speculative_config": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4},
        "kv_cache_dtype": "fp8", "override_generation_config": None, "served_model_name": ["a", "b"],
    }
    cfg = from_dict({"rollout": {"vllm": {"engine_args": engine_args}}})
    assert cfg.rollout.vllm.engine_args == engine_args
    assert RolloutConfig().vllm.engine_args == {}
    assert load_config(dump_config(cfg, tmp_path / "c.yaml")) == cfg
    with pytest.raises(ConfigError, match=r"rollout.vllm.engine_args.x\[0\] must be plain data .* got object"):
        from_dict({"rollout": {"vllm": {"engine_args": {"x": [object()]}}}})


def test_config_code_task_with_code_views(tmp_path):
    text = "avsd:\n  views: [reference, hint, feedback, hint]\ndata:\n  sources: [c.jsonl]\n  task: code\n"
    cfg = load_config(_write(tmp_path, text))
    assert cfg.avsd.views == ("reference", "hint", "feedback")


def test_config_sandbox_section_builds_the_sandbox_config():
    safe = TrainConfig().sandbox.sandbox_config()
    assert (safe.kind, safe.wall_time_s, safe.memory_mb, safe.cpu_time_s) == ("bwrap", 2.0, 512, 30)
    unsafe = from_dict({"sandbox": {"unsafe_subprocess": True, "wall_time_s": 1.5}}).sandbox
    with pytest.warns(RuntimeWarning, match="WITHOUT a sandbox"):
        built = unsafe.sandbox_config()
    assert (built.kind, built.wall_time_s) == ("subprocess", 1.5)
    whole = from_dict({"sandbox": {"max_processes": 8, "cgroup": "require"}}).sandbox.sandbox_config()
    assert (whole.max_processes, whole.cgroup) == (8, "require")  # issue 16.9: whole-sandbox limits reach it
    with pytest.raises(ConfigError, match="sandbox.cgroup='maybe' is not one of"):
        from_dict({"sandbox": {"cgroup": "maybe"}})


def test_config_builds_the_loss_and_teacher_configs():
    avsd = AVSDConfig(loss="candidate", topk=8, beta=0.25, token_clip=0.0, teacher="ema", ema_decay=0.99,
                      teacher_chunk_tokens=256)
    loss = avsd.loss_config(temperature=0.7, vocab_size=151_669)
    assert loss == AVSDLossConfig(
        temperature=0.7,
        vocab_size=151_669,
        loss="candidate",
        normalization="microbatch_token_mean",
        mode="avsd",
        gate="avsd",
        gate_params=GateParams(),
        epistemic_tau=0.0,
        topk=8,
        beta=0.25,
        token_clip=0.0,
        weight_mode="uniform",
        eta=5.0,
        detach_target=True,
        teacher_chunk_tokens=256,
    )
    assert avsd.teacher_config() == TeacherConfig(kind="ema", ema_decay=0.99, storage="cpu")
    shared = {f.name for f in dataclasses.fields(AVSDLossConfig)} & {f.name for f in dataclasses.fields(AVSDConfig)}
    assert all(getattr(loss, name) == getattr(avsd, name) for name in shared)
    overridden = avsd.loss_config(temperature=0.7, teacher_chunk_tokens=None, logprob_chunk_size=8)
    assert (overridden.teacher_chunk_tokens, overridden.logprob_chunk_size) == (None, 8)


def test_config_teacher_restore_reaches_the_teacher_and_is_checked_before_anything_is_built():
    assert AVSDConfig().teacher_restore == "auto"
    assert AVSDConfig(teacher_restore="master").teacher_config().restore == "master"
    with pytest.raises(ConfigError, match=r"avsd.teacher_restore='mastr' is not one of \('auto', 'swap', 'master'\)"):
        AVSDConfig(teacher_restore="mastr")
    with pytest.raises(ConfigError, match=r"avsd.teacher_restore='master' needs optim.distributed_optimizer=True"):
        from_dict({"avsd": {"teacher_restore": "master"}, "optim": {"distributed_optimizer": False}})
    with pytest.raises(ConfigError, match=r"avsd.teacher_restore='master' needs model.dtype bfloat16 or float16"):
        from_dict({"avsd": {"teacher_restore": "master"}, "model": {"dtype": "float32"}})
    # live / GRPO do not swap, so nothing is restored and nothing is refused
    from_dict({"avsd": {"teacher_restore": "master", "teacher": "live"}, "model": {"dtype": "float32"}})
    # what the planner assumes = what build_teacher picks: master with the distributed optimizer over bf16 / fp16
    assert TrainConfig().teacher_restores_from_master()
    assert from_dict({"model": {"dtype": "float16"}}).teacher_restores_from_master()
    for changes in ({"model": {"dtype": "float32"}}, {"optim": {"distributed_optimizer": False}},
                    {"avsd": {"teacher_restore": "swap"}}, {"avsd": {"teacher": "live"}}):
        assert not from_dict(changes).teacher_restores_from_master(), changes


def test_config_teacher_chunk_tokens_is_bounded_by_default_and_checked():
    assert AVSDConfig().teacher_chunk_tokens == 1024
    assert AVSDConfig().loss_config(temperature=0.7).teacher_chunk_tokens == 1024
    assert from_dict({"avsd": {"teacher_chunk_tokens": None}}).avsd.teacher_chunk_tokens is None
    with pytest.raises(ConfigError, match=r"avsd.teacher_chunk_tokens=0 must be >= 1"):
        from_dict({"avsd": {"teacher_chunk_tokens": 0}})


class _RecordingOutputLayer(torch.nn.Module):
    """A vocab-parallel output layer at TP 1 (ColumnParallelLinear's call signature); records the rows per call."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.rows_per_call: list[int] = []

    def forward(self, x, weight=None, runtime_gather_output=None):
        self.rows_per_call.append(x.shape[0])
        return x @ (self.weight if weight is None else weight).t(), None


@pytest.mark.parametrize("loss", ["sampled", "candidate"])
def test_config_teacher_chunk_tokens_reaches_the_scoring_pass_and_chunked_equals_unchunked(loss):
    """avsd.teacher_chunk_tokens -> loss_config -> TeacherScoringStep: the output layer runs on [M * c] rows per
    call, and the teacher outputs equal the one-piece pass (the kernels' own chunk invariance is tested in
    tests/hook/test_avsd_step.py::test_scoring_pass_chunked_output_layer_equals_unchunked on Megatron)."""
    from avsd_megatron.hook.batch import build_avsd_batch
    from avsd_megatron.hook.scoring import TeacherScoringStep

    vocab, hidden, views = 50, 8, 3
    gen = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(1, vocab, (n,), generator=gen).tolist()
    batch = build_avsd_batch([rand(3), rand(2)], [[rand(4), rand(5), rand(2)], [rand(3), rand(6), rand(4)]],
                             [rand(5), rand(4)], view_names=["a", "b", "c"], micro_batch_size=2, pad_id=0,
                             vocab_size=vocab)
    micro_batch = batch.micro_batches[0]  # N = 9 completion tokens
    seq, rows = micro_batch.teacher.tokens.shape[1], micro_batch.teacher.tokens.shape[0]
    hidden_states = torch.randn(seq, rows, hidden, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64)

    def outputs(chunk):
        avsd = AVSDConfig(loss=loss, topk=4, teacher_chunk_tokens=chunk)
        layer = _RecordingOutputLayer(weight.clone())
        step = TeacherScoringStep(avsd.loss_config(temperature=0.7, vocab_size=vocab), tp_group=None,
                                  copy_output_weight=False)
        out = step._process(hidden_states=hidden_states, output_layer=layer, output_weight=None,
                            context=micro_batch, scale_logits=None)
        return out, layer.rows_per_call

    whole, whole_calls = outputs(None)
    chunked, chunked_calls = outputs(4)
    assert micro_batch.num_tokens == 9
    assert whole_calls == [views * 9] and chunked_calls == [views * 4, views * 4, views * 1]
    if loss == "sampled":
        torch.testing.assert_close(chunked.view_logprobs, whole.view_logprobs, rtol=0, atol=1e-12)
    else:
        a, b = chunked.candidates, whole.candidates
        assert torch.equal(a.ids, b.ids) and torch.equal(a.mask, b.mask)
        torch.testing.assert_close(a.view_logprobs, b.view_logprobs, rtol=0, atol=1e-12)


def test_config_parallel_sizes():
    assert ParallelConfig(tp=2, pp=2).data_parallel_size(8) == 2
    with pytest.raises(ConfigError, match=r"world size 6 is not a multiple of parallel.tp \* parallel.pp = 2 \* 2"):
        ParallelConfig(tp=2, pp=2).data_parallel_size(6)
    with pytest.raises(ConfigError, match=r"micro_batch_size \* dp = 4 \* 16"):
        TrainConfig().num_microbatches(16)


def test_config_checkpoint_dir_defaults_under_output_dir(tmp_path):
    assert TrainConfig(output_dir="runs/x").checkpoint_dir == Path("runs/x/checkpoints")
    assert load_config(_write(tmp_path, "checkpoint:\n  dir: /ckpt\n")).checkpoint_dir == Path("/ckpt")


@pytest.mark.parametrize("warmup", [0, 5])
def test_optim_lr_at_matches_hf_linear_schedule(warmup):
    transformers = pytest.importorskip("transformers")
    max_steps = 20
    optim = OptimConfig(lr=1e-3, warmup_steps=warmup)
    torch_optim = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr)
    schedule = transformers.get_linear_schedule_with_warmup(torch_optim, warmup, max_steps)
    for step in range(max_steps):
        assert optim.lr_at(step, max_steps) == pytest.approx(torch_optim.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        torch_optim.step()
        schedule.step()


def test_optim_lr_at_constant_and_cosine_end_points():
    assert OptimConfig(lr=1.0, lr_decay="constant").lr_at(9, 10) == 1.0
    cosine = OptimConfig(lr=1.0, lr_decay="cosine", min_lr=0.1)
    assert cosine.lr_at(0, 10) == 1.0 and cosine.lr_at(5, 10) == pytest.approx(0.55)


def test_config_rollout_allows_greedy_outside_training():
    assert RolloutConfig(temperature=0.0).temperature == 0.0  # evaluation may decode greedily
