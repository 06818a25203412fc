"""Fused-kernel detection and resolution (avsd_megatron/training/kernels.py) and the TransformerConfig / DDP switches
the model builder derives from the config (training/megatron_model.py), with fake provider sets standing in for a GPU
machine's Transformer Engine / Apex; and the trainer's batch padding under sequence parallelism.

Run: python -m pytest -q tests/training/test_kernels.py
"""

import dataclasses
import types

import pytest

from avsd_megatron.training.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig, from_dict
from avsd_megatron.training.kernels import (
    FUSIONS,
    PROVIDER_MODULES,
    check_sequence_packing,
    detect_providers,
    resolve_fusions,
)
from avsd_megatron.training.megatron_model import CPU_OVERRIDES, ddp_config, transformer_overrides

NGC = frozenset({"cuda", "triton", "transformer_engine", "fused_weight_gradient_mlp_cuda", "apex_masked_softmax"})
"""What an NGC PyTorch container provides."""


def test_detect_providers_reports_importable_modules_and_cuda():
    assert detect_providers(importable=lambda m: False, cuda_available=lambda: False) == frozenset()
    found = detect_providers(importable=lambda m: m in ("transformer_engine", "triton"), cuda_available=lambda: True)
    assert found == {"cuda", "transformer_engine", "triton"}
    assert detect_providers(importable=lambda m: True, cuda_available=lambda: True) == {"cuda", *PROVIDER_MODULES}


def test_detect_providers_counts_a_module_that_fails_to_import_as_absent(monkeypatch):
    import importlib

    real = importlib.import_module

    def broken(name, *args):
        if name == "transformer_engine":
            raise OSError("libcudnn.so.9: cannot open shared object file")  # what a broken TE install raises
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", broken)
    assert "transformer_engine" not in detect_providers(cuda_available=lambda: True)


def test_resolve_fusions_auto_turns_on_exactly_what_is_present():
    te = ModelConfig(layer_spec="te")
    assert resolve_fusions(te, NGC) == dict.fromkeys(FUSIONS, True)
    assert resolve_fusions(te, frozenset()) == dict.fromkeys(FUSIONS, False)  # CPU
    # TE without Apex (a pip-installed TE): no fused wgrad (the output layer needs Apex), the rest on
    assert resolve_fusions(te, NGC - {"fused_weight_gradient_mlp_cuda"}) == {
        "bias_activation_fusion": True, "apply_rope_fusion": True, "masked_softmax_fusion": True,
        "gradient_accumulation_fusion": False,
    }
    # CUDA torch only (no TE, no Apex), local spec: only Megatron's torch.compile'd SwiGLU
    local = ModelConfig(layer_spec="local")
    assert resolve_fusions(local, frozenset({"cuda", "triton"})) == {
        "bias_activation_fusion": True, "apply_rope_fusion": False, "masked_softmax_fusion": False,
        "gradient_accumulation_fusion": False,
    }
    # the local spec's softmax fusion is Apex's kernel, not TE's
    assert resolve_fusions(local, frozenset({"cuda", "transformer_engine"}))["masked_softmax_fusion"] is False
    assert resolve_fusions(local, frozenset({"cuda", "apex_masked_softmax"}))["masked_softmax_fusion"] is True


@pytest.mark.parametrize(
    "field, providers, match",
    [
        ("apply_rope_fusion", NGC - {"transformer_engine"}, r"model.apply_rope_fusion=True needs transformer_engine "
                                                            r"\(import transformer_engine\), which is not available"),
        ("gradient_accumulation_fusion", NGC - {"fused_weight_gradient_mlp_cuda"},
         r"model.gradient_accumulation_fusion=True needs fused_weight_gradient_mlp_cuda"),
        ("bias_activation_fusion", frozenset(), r"model.bias_activation_fusion=True needs a CUDA device, triton"),
    ],
)
def test_resolve_fusions_refuses_a_required_fusion_whose_provider_is_absent(field, providers, match):
    with pytest.raises(ConfigError, match=match):
        resolve_fusions(ModelConfig(**{field: True}), providers)


def test_resolve_fusions_false_is_off_even_where_available():
    cfg = ModelConfig(apply_rope_fusion=False, gradient_accumulation_fusion=False)
    got = resolve_fusions(cfg, NGC)
    assert (got["apply_rope_fusion"], got["gradient_accumulation_fusion"]) == (False, False)
    assert got["bias_activation_fusion"] and got["masked_softmax_fusion"]


def test_transformer_overrides_gpu_and_cpu():
    cfg = TrainConfig(parallel=ParallelConfig(tp=2, sequence_parallel=True))
    gpu = transformer_overrides(cfg, on_cpu=False, providers=NGC)
    assert {k: gpu[k] for k in FUSIONS} == dict.fromkeys(FUSIONS, True)
    assert gpu["sequence_parallel"] is True and gpu["calculate_per_token_loss"] is True
    assert (gpu["recompute_granularity"], gpu["recompute_method"]) == ("full", "uniform")  # model.recompute='full'
    assert "use_cpu_initialization" not in gpu
    cpu_cfg = TrainConfig(model=ModelConfig(layer_spec="local", recompute="selective"))
    cpu = transformer_overrides(cpu_cfg, on_cpu=True, providers=frozenset())
    assert {k: cpu[k] for k in CPU_OVERRIDES} == CPU_OVERRIDES and cpu["sequence_parallel"] is False
    assert cpu["recompute_granularity"] == "selective"
    with pytest.raises(ConfigError, match=r"model.apply_rope_fusion=True needs a CUDA device"):
        transformer_overrides(TrainConfig(model=ModelConfig(apply_rope_fusion=True)), on_cpu=True,
                              providers=frozenset())


def test_sequence_packing_is_refused_without_cuda_and_transformer_engine():
    packing = ParallelConfig(sequence_packing=True)
    check_sequence_packing(packing, NGC)  # TE on CUDA: fine
    check_sequence_packing(ParallelConfig(), frozenset())  # off: nothing is needed
    with pytest.raises(ConfigError, match=r"parallel.sequence_packing=True needs a CUDA device, transformer_engine "
                                          r"\(import transformer_engine\)"):
        check_sequence_packing(packing, frozenset())
    with pytest.raises(ConfigError, match=r"parallel.sequence_packing=True needs transformer_engine .*THD"):
        check_sequence_packing(packing, frozenset({"cuda", "triton"}))
    cfg = TrainConfig(parallel=packing)  # the model builder checks before it builds anything
    with pytest.raises(ConfigError, match=r"parallel.sequence_packing=True needs a CUDA device"):
        transformer_overrides(cfg, on_cpu=True, providers=frozenset())
    assert transformer_overrides(cfg, on_cpu=False, providers=NGC)["calculate_per_token_loss"] is True


def test_ddp_config_follows_the_parallel_section():
    default = ddp_config(TrainConfig())
    flags = (default.overlap_grad_reduce, default.overlap_param_gather, default.grad_reduce_in_fp32)
    assert flags == (True, False, True)
    assert default.bucket_size is None and default.use_distributed_optimizer is True
    cfg = TrainConfig(parallel=ParallelConfig(overlap_grad_reduce=False, grad_reduce_in_fp32=False,
                                              ddp_bucket_size=10_000_000))
    custom = ddp_config(cfg)
    assert (custom.overlap_grad_reduce, custom.grad_reduce_in_fp32, custom.bucket_size) == (False, False, 10_000_000)
    live = ddp_config(from_dict({"avsd": {"teacher": "live"}, "parallel": {"overlap_param_gather": True}}))
    assert live.overlap_param_gather is True


@pytest.mark.parametrize(
    "data, match",
    [
        ({"parallel": {"overlap_param_gather": True}},
         r"parallel.overlap_param_gather=True races with avsd.teacher='frozen'"),
        ({"parallel": {"overlap_param_gather": True}, "avsd": {"teacher": "ema"}},
         r"parallel.overlap_param_gather=True races with avsd.teacher='ema'"),
        ({"parallel": {"overlap_param_gather": True}, "avsd": {"teacher": "live"},
          "optim": {"distributed_optimizer": False}}, r"overlap_param_gather=True needs optim.distributed_optimizer"),
        ({"parallel": {"sequence_parallel": True}}, r"parallel.sequence_parallel=True needs parallel.tp > 1"),
        ({"parallel": {"tp": 2, "sequence_parallel": True}, "model": {"layer_spec": "local"}},
         r"parallel.sequence_parallel=True needs model.layer_spec='te'"),
        ({"parallel": {"sequence_packing": True}, "model": {"layer_spec": "local"}},
         r"parallel.sequence_packing=True needs model.layer_spec='te'"),
        ({"parallel": {"ddp_bucket_size": 0}}, r"parallel.ddp_bucket_size=0 must be >= 1"),
        ({"model": {"apply_rope_fusion": "yes"}}, r"model.apply_rope_fusion must be true or false"),
    ],
)
def test_config_refuses_parallel_and_kernel_settings_that_cannot_work(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(data)


def test_config_gpu_defaults_and_yaml_nulls():
    cfg = TrainConfig()
    assert dataclasses.asdict(cfg.parallel) == dict(
        tp=1, pp=1, sequence_parallel=False, sequence_packing=False, overlap_grad_reduce=True,
        overlap_param_gather=False, grad_reduce_in_fp32=True, ddp_bucket_size=None,
    )
    assert all(getattr(cfg.model, name) is None for name in FUSIONS)
    loaded = from_dict({"model": {"apply_rope_fusion": None, "gradient_accumulation_fusion": False}})
    assert loaded.model.apply_rope_fusion is None and loaded.model.gradient_accumulation_fusion is False


def test_trainer_pads_rows_to_a_multiple_of_tp_under_sequence_parallelism():
    from avsd_megatron.data.prompts import EncodedPrompts
    from avsd_megatron.rollout.engine import Completion
    from avsd_megatron.training.tasks import TeacherRows
    from avsd_megatron.training.trainer import Rollout, Trainer

    def batch(parallel: ParallelConfig):
        cfg = TrainConfig(prompts_per_step=2, micro_batch_size=2, parallel=parallel,
                          avsd=from_dict({"avsd": {"views": ["answer_only"], "mode": "single"}}).avsd)
        prompts = [EncodedPrompts("", [1, 2, 3], {}, {}), EncodedPrompts("", [4, 5], {}, {})]
        rollout = Rollout([None, None], prompts, [Completion((6, 7), "", "stop"), Completion((8,), "", "stop")])
        rows = TeacherRows(ids=[[[9, 9, 9, 9]], [[9, 9]]])
        owner = types.SimpleNamespace(cfg=cfg, tokenizer=types.SimpleNamespace(pad_token_id=0), vocab_size=16)
        return Trainer.build_batch(owner, rollout, rows)

    plain = batch(ParallelConfig(tp=4))
    assert (plain.student_seq_length, plain.teacher_seq_length) == (5, 6)
    sp = batch(ParallelConfig(tp=4, sequence_parallel=True))
    assert (sp.student_seq_length, sp.teacher_seq_length) == (8, 8)
    assert not plain.packed and not sp.packed
    # parallel.sequence_packing: rows back to back, student 5 + 3 and teacher 6 + 3 tokens (SP: T a multiple of tp)
    packed = batch(ParallelConfig(tp=4, sequence_packing=True))
    assert packed.packed and (packed.student_seq_length, packed.teacher_seq_length) == (8, 9)
    assert packed.micro_batches[0].student.tokens.tolist() == [[1, 2, 3, 6, 7, 4, 5, 8]]
    assert packed.micro_batches[0].student.packing.cu_seqlens.tolist() == [0, 5, 8]
    packed_sp = batch(ParallelConfig(tp=4, sequence_parallel=True, sequence_packing=True))
    assert (packed_sp.student_seq_length, packed_sp.teacher_seq_length) == (8, 12)
    assert packed_sp.micro_batches[0].teacher.packing.cu_seqlens_padded.tolist() == [0, 6, 12]
