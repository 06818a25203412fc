"""Tests for the planner (`avsd_megatron.training.plan`): its figures against real objects where they exist here.

Run: .venv/bin/python -m pytest -q tests/training/test_plan.py                        (all; three 2-rank launches)
     .venv/bin/python -m pytest -q tests/training/test_plan.py -m "not integration"   (in-process only, seconds)

Calibration (integration, 2 gloo ranks each, real Megatron-Core on CPU through the trainer's own builders):
* TP2 and PP2: every rank's parameter tensors (names and sizes, tied and untied embeddings; at PP2 the last stage
  holds its own output weight even when tied) equal `rank_parameters`.
* DP2 with the distributed optimizer, fp32 and bf16 params: DDP's param and grad buffers equal
  `ddp_buffer_elements` times the dtype, the optimizer's own bytes after one Adam step (fp32 master shards +
  moments) are what the plan's `optimizer` component says, and a TP1 forward counted by torch's FLOP counter has
  the dense FLOPs of `forward_flops` (the counter sees non-causal attention matmuls; the difference is exactly the
  causal half the formula leaves out).
In process: the Qwen3 sizes reproduce the published parameter counts; `forward_flops` equals
`benchmarks/gpu_step.py`'s formula; the shipped configs plan with and without --json, and Qwen3-8B at TP1 on
h100-80gb without offload is reported as not fitting, naming the phases and numbers. The checkpoint size on disk is
checked against a real trainer checkpoint in tests/training/test_trainer.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from avsd_megatron.testing import run_on_ranks
from avsd_megatron.training.config import ConfigError, from_dict, load_config, to_dict
from avsd_megatron.training.plan import (
    GPUS,
    PHASES,
    QWEN3_SIZES,
    Assumptions,
    ddp_buffer_elements,
    estimate,
    forward_flops,
    model_dims,
    parse_time_limit,
    plan_run,
    rank_parameters,
    total_parameters,
)
from avsd_megatron.training.plan.cli import main as plan_main

ROOT = Path(__file__).resolve().parents[2]
QWEN3_8B_YAML = ROOT / "examples" / "configs" / "qwen3_8b.yaml"
TINY_YAML = ROOT / "examples" / "configs" / "tiny_cpu.yaml"


# ----------------------------------------------------------------------------------------------------------------
# Shapes and FLOPs (in process)

# HF model cards of Qwen/Qwen3-*: "Number of Parameters" and "(Non-Embedding)", as printed there (billions).
PUBLISHED = {"Qwen3-0.6B": (0.6, 0.44), "Qwen3-1.7B": (1.7, 1.4), "Qwen3-4B": (4.0, 3.6), "Qwen3-8B": (8.2, 6.95),
             "Qwen3-14B": (14.8, 13.2), "Qwen3-32B": (32.8, 31.2)}


@pytest.mark.parametrize("name", sorted(QWEN3_SIZES))
def test_qwen3_sizes_reproduce_the_published_parameter_counts(name):
    dims = model_dims(name).dims
    total = total_parameters(dims)
    embedding = dims.vocab_size * dims.hidden_size * (1 if dims.tie_word_embeddings else 2)
    published_total, published_non_embedding = PUBLISHED[name]
    digits = len(str(published_non_embedding).split(".")[1])
    assert round(total / 1e9, 1) == published_total
    assert round((total - embedding) / 1e9, digits) == published_non_embedding


def test_model_dims_resolves_hub_ids_directories_and_refuses_unknown(tmp_path):
    assert model_dims("Qwen/Qwen3-8B").name == "Qwen3-8B"
    config = dict(QWEN3_SIZES["Qwen3-4B"], num_hidden_layers=2)
    (tmp_path / "Qwen3-4B").mkdir()
    (tmp_path / "Qwen3-4B" / "config.json").write_text(json.dumps(config))
    assert model_dims(str(tmp_path / "Qwen3-4B")).dims.num_layers == 2  # a local config.json wins over the name
    assert model_dims(str(tmp_path / "Qwen3-4B"), prefer_named=True).dims.num_layers == 36
    with pytest.raises(ValueError, match="not a Qwen3 size"):
        model_dims(str(tmp_path / "elsewhere"))


def _gpu_step():
    spec = importlib.util.spec_from_file_location("gpu_step", ROOT / "benchmarks" / "gpu_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("rows", "length", "outputs", "layers"), [(4, 1280, 4096, 4), (12, 2048, 3 * 4096, 36),
                                                                  (1, 1, 1, 1)])
def test_forward_flops_equals_gpu_step_formula(rows, length, outputs, layers):
    gpu_step = _gpu_step()
    dims = model_dims("Qwen3-8B").dims
    assert forward_flops(dims, rows, length, outputs, num_layers=layers) == gpu_step.forward_flops(
        gpu_step.QWEN3_8B, rows, length, outputs, layers)


def test_gpu_for_device_maps_cuda_names():
    from avsd_megatron.training.plan import gpu_for_device

    assert gpu_for_device("NVIDIA H100 80GB HBM3", 79.2) == "h100-80gb"
    assert gpu_for_device("NVIDIA H200", 139.8) == "h200-141gb"
    assert gpu_for_device("NVIDIA A100-SXM4-80GB", 79.1) == "a100-80gb"
    assert gpu_for_device("Tesla V100-SXM2-32GB", 31.7) is None


def test_ddp_buffer_padding_follows_megatron_rule():
    rank = rank_parameters(model_dims("tiny").dims, 1, 1)
    assert ddp_buffer_elements(rank, 2, distributed_optimizer=False) == rank.count
    padded = ddp_buffer_elements(rank, 3, distributed_optimizer=True)
    assert padded % math.lcm(3, 128) == 0 and rank.count <= padded <= rank.count + 64 * len(rank.tensors) + 384


# ----------------------------------------------------------------------------------------------------------------
# Calibration against real Megatron objects (2 gloo ranks)


def _tiny_hf_config(tied: bool) -> dict:
    path = ROOT / "avsd_megatron" / "data" / "assets" / "tiny_qwen3" / "config.json"
    return dict(json.loads(path.read_text()), tie_word_embeddings=tied)


def _tiny_cfg(tp: int, dtype: str, pp: int = 1) -> dict:
    data = to_dict(load_config(TINY_YAML))
    data["parallel"].update(tp=tp, pp=pp)
    data["model"].update(dtype=dtype, layer_spec="local", recompute="none")
    data["optim"]["distributed_optimizer"] = True
    return data


def sharding_rank(tp: int, dtypes: tuple[str, ...], pp: int = 1) -> dict:
    """Build the trainer's GPTModel / DDP / optimizer for each (tied, dtype) and report what was allocated."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from avsd_megatron.testing import init_megatron
    from avsd_megatron.training.checkpointing import _torch_optimizers
    from avsd_megatron.training.megatron_model import (
        build_gpt_model,
        build_optimizer,
        wrap_ddp,
    )

    init_megatron(tp, pp)
    out: dict = {}
    for tied in (True, False):
        for dtype in dtypes:
            cfg = from_dict(_tiny_cfg(tp, dtype, pp))
            gpt = build_gpt_model(cfg, _tiny_hf_config(tied), on_cpu=True)
            key = f"{'tied' if tied else 'untied'}-{dtype}"
            record: dict = {"params": [(n, p.numel()) for n, p in gpt.named_parameters()]}
            if pp > 1:
                out[key] = record  # stage shapes only: no DDP / optimizer across stages here
                continue
            if tp == 1 and tied and dtype == "float32":
                tokens = torch.randint(0, 512, (2, 40))
                positions = torch.arange(40).expand(2, 40)
                with torch.no_grad(), FlopCounterMode(display=False) as counter:
                    gpt(tokens, positions, None)
                record["flops"] = counter.get_total_flops()
            model = wrap_ddp(gpt, cfg)
            optimizer = build_optimizer(model, cfg)
            record["param_buffer_bytes"] = sum(b.param_data.numel() * b.param_data.element_size()
                                               for b in model.buffers)
            record["grad_buffer_bytes"] = sum(b.grad_data.numel() * b.grad_data.element_size() for b in model.buffers)
            optimizer.step()  # zero grads: Adam creates its moments
            buffers = {b.param_data.untyped_storage().data_ptr() for b in model.buffers}
            own = 0
            for opt in _torch_optimizers(optimizer):
                for group in opt.param_groups:
                    own += sum(p.numel() * p.element_size() for p in group["params"]
                               if p.untyped_storage().data_ptr() not in buffers)  # fp32 masters; not buffer views
                own += sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values()
                           if torch.is_tensor(t) and t.dim() > 0)
            record["optimizer_bytes"] = own
            out[key] = record
    return out


@pytest.mark.integration
def test_rank_parameters_equal_real_gpt_model_at_tp2_and_pp2():
    tp2 = run_on_ranks(sharding_rank, 2, 2, ("float32",), timeout=300)
    pp2 = run_on_ranks(sharding_rank, 2, 1, ("float32",), 2, timeout=300)
    for tied in (True, False):
        dims = dataclasses.replace(model_dims("tiny").dims, tie_word_embeddings=tied)
        key = f"{'tied' if tied else 'untied'}-float32"
        for rank in tp2:
            assert rank[key]["params"] == list(rank_parameters(dims, 2, 1).tensors)
        for stage, rank in enumerate(pp2):  # the last stage's own output weight also when tied
            assert rank[key]["params"] == list(rank_parameters(dims, 1, 2, stage).tensors)


def test_pipeline_stages_partition_the_model():
    for name in ("Qwen3-8B", "Qwen3-4B"):
        dims = model_dims(name).dims
        stages = sum(rank_parameters(dims, 1, 4, s).count for s in range(4))
        extra = dims.vocab_size * dims.hidden_size if dims.tie_word_embeddings else 0  # the last stage's copy
        assert stages == total_parameters(dims, padded_for_tp=1) + extra


@pytest.mark.integration
def test_buffers_optimizer_and_flops_equal_real_objects_at_dp2():
    results = run_on_ranks(sharding_rank, 2, 1, ("float32", "bfloat16"), timeout=300)
    for tied in (True, False):
        dims = dataclasses.replace(model_dims("tiny").dims, tie_word_embeddings=tied)
        rank = rank_parameters(dims, 1, 1)
        for dtype, width in (("float32", 4), ("bfloat16", 2)):
            buffer = ddp_buffer_elements(rank, 2, distributed_optimizer=True)
            cfg = from_dict(_tiny_cfg(1, dtype))
            source = dataclasses.replace(model_dims("tiny"), dims=dims)
            est = estimate(cfg, source, GPUS["h100-80gb"], nodes=1, gpus_per_node=2)
            for measured in (r[f"{'tied' if tied else 'untied'}-{dtype}"] for r in results):
                assert measured["params"] == list(rank.tensors)
                assert measured["param_buffer_bytes"] == buffer * width
                assert measured["grad_buffer_bytes"] == buffer * 4
                assert est.phases["rollout"].components["weights"] * 2**30 == pytest.approx(buffer * width)
                # the shard excludes the alignment padding: planned (buffer / DP) is an upper bound within it
                planned = est.phases["rollout"].components["optimizer"] * 2**30
                padding = (buffer - rank.count) / 2 * (12 if width == 2 else 8)
                assert planned - padding - 1 <= measured["optimizer_bytes"] <= planned
    flops = results[0]["tied-float32"]["flops"]
    dims = model_dims("tiny").dims
    rows, length = 2, 40
    q = dims.num_attention_heads * dims.head_dim
    causal = forward_flops(dims, rows, length, rows * length)
    full_attention = dims.num_layers * rows * 4 * q * length * length  # QK^T and AV over every (i, j)
    causal_attention = dims.num_layers * rows * 4 * q * length * (length + 1) / 2
    assert flops == causal - causal_attention + full_attention


# ----------------------------------------------------------------------------------------------------------------
# The plan of the shipped configs


def test_plan_cli_on_shipped_configs_with_and_without_json(capsys):
    assert plan_main(["--config", str(QWEN3_8B_YAML)]) == 0
    text = capsys.readouterr().out
    assert "verdict: fits" in text and "student_update" in text and "scaling at TP 2" in text
    assert plan_main(["--config", str(QWEN3_8B_YAML), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["phases"]) == set(PHASES) and all(out["phases"][p]["fits"] for p in PHASES)
    assert {"host_gib_per_node", "checkpoint_gib", "step_seconds", "scaling"} <= set(out)
    assert out["step_seconds"]["total"] == pytest.approx(sum(v for k, v in out["step_seconds"].items()
                                                            if k != "total"), abs=0.01)
    assert [(r["mode"], r["nodes"]) for r in out["scaling"]] == [(m, n) for m in ("strong", "weak")
                                                                 for n in (1, 2, 4, 8)]
    # the 4B recipe: the same YAML with the 4B weights at TP1
    assert plan_main(["--config", str(QWEN3_8B_YAML), "--set", "model.hf_path=models/Qwen3-4B", "parallel.tp=1",
                      "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["name"] == "Qwen3-4B"
    assert plan_main(["--config", str(TINY_YAML), "--model", "tiny", "--gpus-per-node", "2"]) == 0
    assert "tiny" in capsys.readouterr().out


def test_qwen3_8b_at_tp1_on_h100_is_reported_as_not_fitting_with_phase_and_numbers(capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan_main(["--config", str(QWEN3_8B_YAML), "--set", "parallel.tp=1", "--gpu", "h100-80gb", "--json"])
    assert exit_info.value.code == 1
    out = json.loads(capsys.readouterr().out)
    assert not out["fits"] and not out["phases"]["student_update"]["fits"]
    update = out["phases"]["student_update"]
    assert update["gpu_gib"] > 79.6 and update["margin_gib"] == pytest.approx(79.6 - update["gpu_gib"], abs=1e-2)
    # resident alone: bf16 weights + fp32 grads of all 8.19B parameters, Adam / DP 8
    resident = 8.19e9 * (2 + 4 + 12 / 8) / 2**30
    assert update["resident_gib"] == pytest.approx(resident + 1.6 + 1.0, rel=0.01)
    assert any(line.startswith("student_update: needs") for line in out["failures"])
    with pytest.raises(SystemExit):
        plan_main(["--config", str(QWEN3_8B_YAML), "--set", "parallel.tp=1"])
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "student_update: needs" in text and "GiB of 79.6 GiB" in text


def test_plan_refuses_bad_arguments_naming_them(capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan_main(["--config", str(TINY_YAML)])  # outputs/tiny_cpu/hf_init need not exist; 8 GPUs do not divide
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        plan_main(["--config", str(QWEN3_8B_YAML), "--assume", "mfu_update=2"])
    assert "assumptions.mfu_update=2.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plan_main(["--config", str(QWEN3_8B_YAML), "--set", "parallel.tp=16"])
    assert "parallel.tp=16 exceeds the 8 GPUs" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="world = 1 nodes x 8 GPUs"):
        plan_run(load_config(TINY_YAML), model="tiny")
    with pytest.raises(ValueError, match="HH:MM:SS"):
        parse_time_limit("four hours")
    assert parse_time_limit("1-02:00:30") == 26 * 3600 + 30


def test_time_model_follows_its_assumptions_and_the_time_limit():
    cfg = load_config(QWEN3_8B_YAML)
    base = plan_run(cfg, scaling=False, time_limit="04:00:00")
    slower = plan_run(cfg, scaling=False, assumptions=Assumptions(mfu_update=0.35 / 2))
    update = base.step_seconds["student_update"]
    assert slower.step_seconds["student_update"] > 1.9 * update  # FLOP time doubles; the optimizer step does not
    assert slower.step_seconds["rollout"] == base.step_seconds["rollout"]
    assert base.run["fits_time_limit"] is (base.run["seconds"] <= 4 * 3600)
    # two nodes, DP over InfiniBand: the gradient sync gets slower, everything per replica shrinks
    two = plan_run(cfg, nodes=2, scaling=False)
    assert two.dp == 8 and two.step_seconds["grad_sync"] > base.step_seconds["grad_sync"]
    assert two.step_seconds["rollout"] < base.step_seconds["rollout"]


def test_memory_model_responds_to_each_switch():
    cfg = load_config(QWEN3_8B_YAML)
    base = plan_run(cfg, scaling=False)
    device = plan_run(dataclasses.replace(cfg, avsd=dataclasses.replace(cfg.avsd, teacher_storage="device")),
                      scaling=False)
    weights = base.phases["rollout"].components["weights"]
    assert cfg.teacher_restores_from_master()  # bf16 + the distributed optimizer: θ₀ only, no swap buffer
    assert device.phases["rollout"].components["teacher_copy"] == pytest.approx(weights, rel=1e-3)
    assert device.host["pinned_teacher_gib"] == 0 < base.host["pinned_teacher_gib"]
    swap_cfg = dataclasses.replace(cfg, avsd=dataclasses.replace(cfg.avsd, teacher_restore="swap"))
    swap = plan_run(swap_cfg, scaling=False)
    swap_device = plan_run(dataclasses.replace(swap_cfg, avsd=dataclasses.replace(swap_cfg.avsd,
                                                                                  teacher_storage="device")),
                           scaling=False)
    assert swap_device.phases["rollout"].components["teacher_copy"] == pytest.approx(2 * weights, rel=1e-3)
    # the swap buffer doubles the pinned host copies; its two extra PCIe copies cost more than the restore
    assert swap.host["pinned_teacher_gib"] == pytest.approx(2 * base.host["pinned_teacher_gib"])
    assert swap.step_seconds["teacher_scoring"] > base.step_seconds["teacher_scoring"]
    no_recompute = plan_run(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, recompute="none")),
                            scaling=False)
    assert (no_recompute.phases["student_update"].components["activations"]
            > 3 * base.phases["student_update"].components["activations"])
    awake = plan_run(dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, sync_every=2)), scaling=False)
    share = cfg.rollout.vllm.gpu_memory_utilization * GPUS["h100-80gb"].memory_gib
    assert awake.phases["student_update"].components["vllm_asleep"] == pytest.approx(share)
    plain = plan_run(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, distributed_optimizer=False)),
                     scaling=False)
    assert plain.phases["rollout"].components["optimizer"] == pytest.approx(
        4 * base.phases["rollout"].components["optimizer"], rel=1e-3)  # DP 4 no longer shards it
    h200 = plan_run(cfg, gpu="h200-141gb", scaling=False)
    assert h200.phases["rollout"].components["vllm_engine"] > base.phases["rollout"].components["vllm_engine"]


def _readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"<!-- {marker}")
    start = text.index("-->", start) + 3
    return text[start:text.index("<!-- /", start)].strip()


@pytest.mark.parametrize(("marker", "overrides"), [
    ("plan:scaling qwen3_8b", ()),
    ("plan:scaling qwen3_4b", ("model.hf_path=Qwen3-4B", "parallel.tp=1")),
])
def test_readme_scaling_tables_are_the_planners(marker, overrides):
    from avsd_megatron.training.config import apply_overrides
    from avsd_megatron.training.plan import scaling_markdown

    expected = scaling_markdown(plan_run(apply_overrides(load_config(QWEN3_8B_YAML), overrides)).scaling)
    assert _readme_block(marker) == expected, f"README block {marker!r} is stale; it should read:\n{expected}"


def test_pinned_teacher_host_memory_is_the_real_teachers_flat_buffers():
    """The planner's pinned host memory per rank = the bytes of the flat buffers a real FrozenTeacher allocates
    over this rank's parameter tensors (one per dtype, page-locked in place: no power-of-two rounding)."""
    from avsd_megatron.hook.teacher_kinds import FrozenTeacher

    cfg = load_config(QWEN3_8B_YAML)
    swap_cfg = dataclasses.replace(cfg, avsd=dataclasses.replace(cfg.avsd, teacher_restore="swap"))
    tiny = model_dims("tiny").dims
    for config, with_swap in ((cfg, False), (swap_cfg, True)):
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, hf_path="tiny"),
                                     parallel=dataclasses.replace(config.parallel, tp=1, pp=1))
        est = plan_run(config, nodes=1, gpus_per_node=1, scaling=False)
        params = [torch.nn.Parameter(torch.zeros(numel, dtype=torch.bfloat16))
                  for _, numel in rank_parameters(tiny, 1, 1).tensors]
        teacher = FrozenTeacher(params, storage="cpu")
        flats = teacher.flat_buffers if with_swap else teacher.flat_buffers[: len(teacher.flat_buffers) // 2]
        real = sum(f.numel() * f.element_size() for f in flats)
        assert est.host["pinned_teacher_gib"] * 2**30 == pytest.approx(real, rel=1e-9)
