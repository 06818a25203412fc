"""vLLM adapter (avsd_megatron/rollout/vllm_engine.py) without a GPU: the clear error without vllm, the version pin, the
LLM kwargs and their checks, and the call sequence against a fake `vllm` module (vllm-rollouts.md §5). The real
engine runs only in the GPU smoke test at the end (skipped without CUDA and vLLM).

Run: python -m pytest -q tests/rollout/test_rollout_vllm.py
"""

import dataclasses
import importlib.util
import os
import random
import sys
import types

import pytest
import torch

from avsd_megatron.convert.mapping import expected_hf_shapes
from avsd_megatron.convert.qwen3_config import Qwen3Dims, read_hf_config
from avsd_megatron.data import tiny
from avsd_megatron.rollout.config import (
    ADAPTER_ENGINE_ARGS,
    FIELD_ENGINE_ARGS,
    RolloutConfig,
    VLLMConfig,
)
from avsd_megatron.rollout.engine import Completion, SamplingParams, request_seed
from avsd_megatron.rollout.vllm_engine import (
    SUPPORTED_VLLM,
    StandaloneVLLMEngine,
    VLLMEngine,
    check_engine_args,
    import_vllm,
    standalone_engine_kwargs,
    vllm_engine_kwargs,
)

ENGINE_ARGS = dict(tensor_parallel_size=1, rank=0, world_size=1, max_prompt_tokens=512)


def _weights(dims: Qwen3Dims, skip: str = ""):
    return ((n, torch.zeros(shape)) for n, shape in expected_hf_shapes(dims).items() if not skip or skip not in n)


def test_vllm_engine_without_vllm_raises_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    with pytest.raises(ImportError, match=r"VLLMEngine needs vLLM 0\.32\.x or 0\.33\.x .*rollout.engine='hf'"):
        VLLMEngine(tiny.TINY_CONFIG_DIR, RolloutConfig(), **ENGINE_ARGS)


def test_import_vllm_accepts_the_checked_minors_only(monkeypatch):
    assert SUPPORTED_VLLM == ("0.32", "0.33")  # the versions whose LLM / reload API was read (vllm_engine docstring)
    for version in ("0.25.1", "0.31.0", "0.34.0", "1.0.0"):
        monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__=version))
        with pytest.raises(RuntimeError, match=rf"written against vLLM 0\.32\.x or 0\.33\.x .* found vLLM {version}"):
            import_vllm()
    for version in ("0.33.2+cu129", "0.32.0+cpu", "0.32.0"):
        monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__=version))
        assert import_vllm().__version__ == version


def test_vllm_engine_kwargs_sleep_mode_follows_the_platform():
    kwargs = vllm_engine_kwargs("/ckpt", RolloutConfig(), **ENGINE_ARGS, enable_sleep_mode=False)
    assert kwargs["enable_sleep_mode"] is False
    assert vllm_engine_kwargs("/ckpt", RolloutConfig(), **ENGINE_ARGS)["enable_sleep_mode"] is True  # default: CUDA


def test_vllm_engine_kwargs_are_the_colocated_setup():
    cfg = RolloutConfig(max_new_tokens=4096, vllm=VLLMConfig(max_num_batched_tokens=4096))
    kwargs = vllm_engine_kwargs(
        "/ckpt", cfg, tensor_parallel_size=2, rank=5, world_size=8, max_prompt_tokens=12288, gpus_per_node=8
    )
    assert kwargs == dict(
        model="/ckpt",
        tokenizer="/ckpt",
        dtype="bfloat16",
        load_format="dummy",
        tensor_parallel_size=2,
        pipeline_parallel_size=1,
        distributed_executor_backend="external_launcher",
        enable_sleep_mode=True,
        gpu_memory_utilization=0.4,
        max_model_len=16384,
        max_num_seqs=8,
        enable_prefix_caching=True,
        enforce_eager=False,
        disable_custom_all_reduce=True,
        seed=2,  # engine index rank // tp, the same on both ranks of the engine
        max_num_batched_tokens=4096,
    )


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(tensor_parallel_size=3, world_size=8), r"tensor_parallel_size=3 must be >= 1 and divide the world size"),
        (dict(tensor_parallel_size=4, world_size=8, gpus_per_node=2), r"exceeds the 2 GPUs of a node"),
        (dict(rank=8, world_size=8), r"rank=8 must be in \[0, world_size=8\)"),
        (dict(max_prompt_tokens=12289), r"rollout.vllm.max_model_len=16384 < max_prompt_tokens \+ rollout.max_new"),
    ],
)
def test_vllm_engine_kwargs_reject_sizes_that_do_not_fit(args, match):
    full = dict(tensor_parallel_size=1, rank=0, world_size=8, max_prompt_tokens=12288) | args
    with pytest.raises(ValueError, match=match):
        vllm_engine_kwargs("/ckpt", RolloutConfig(), **full)


@dataclasses.dataclass
class _FakeEngineArgs:
    """A stand-in for vllm.EngineArgs (a dataclass; its init fields are the accepted keywords)."""

    model: str = ""
    tokenizer: str | None = None
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    speculative_config: dict | None = None
    async_scheduling: bool | None = None
    internal: int = dataclasses.field(default=0, init=False)


def test_vllm_engine_args_pass_through_after_the_adapters_keywords():
    extra = {"speculative_config": {"method": "ngram", "num_speculative_tokens": 4}, "kv_cache_dtype": "fp8"}
    cfg = RolloutConfig(max_new_tokens=4096, vllm=VLLMConfig(engine_args=extra))
    sizes = ENGINE_ARGS | dict(max_prompt_tokens=12288)
    kwargs = vllm_engine_kwargs("/ckpt", cfg, **sizes, engine_args_class=_FakeEngineArgs)
    plain = vllm_engine_kwargs("/ckpt", RolloutConfig(max_new_tokens=4096), **sizes)
    assert kwargs == plain | extra and list(kwargs)[-2:] == list(extra)


def test_vllm_engine_args_refused_keys_are_the_keys_the_adapter_sets():
    """ADAPTER_ENGINE_ARGS + the section's own fields = what vllm_engine_kwargs sets, plus data_parallel_size (the
    one refused key the adapter leaves at vLLM's default of 1)."""
    cfg = RolloutConfig(vllm=VLLMConfig(max_num_batched_tokens=8192))
    kwargs = vllm_engine_kwargs("/ckpt", cfg, tensor_parallel_size=1, rank=0, world_size=1, max_prompt_tokens=12)
    assert set(ADAPTER_ENGINE_ARGS) | set(FIELD_ENGINE_ARGS) == set(kwargs) | {"data_parallel_size"}
    for key in ADAPTER_ENGINE_ARGS:
        with pytest.raises(ValueError, match=rf"^rollout.vllm.engine_args.{key} is set by the adapter: "):
            VLLMConfig(engine_args={key: 1})
    for key in FIELD_ENGINE_ARGS:
        with pytest.raises(ValueError, match=rf"^rollout.vllm.engine_args.{key} has its own field: set "
                                             rf"rollout.vllm.{key}$"):
            VLLMConfig(engine_args={key: 1})


def test_vllm_engine_args_unknown_to_engine_args_are_refused_with_a_suggestion():
    with pytest.raises(ValueError, match=r"^rollout.vllm.engine_args.kv_cache_dtyp is not a vLLM EngineArgs field; "
                                         r"did you mean kv_cache_dtype\?$"):
        check_engine_args({"kv_cache_dtyp": "fp8"}, _FakeEngineArgs)
    with pytest.raises(ValueError, match=r"engine_args.internal is not a vLLM EngineArgs field"):  # init=False
        check_engine_args({"internal": 1}, _FakeEngineArgs)
    check_engine_args({"async_scheduling": True}, _FakeEngineArgs)
    cfg = RolloutConfig(vllm=VLLMConfig(engine_args={"zzz": 1}))
    with pytest.raises(ValueError, match=r"rollout.vllm.engine_args.zzz is not a vLLM EngineArgs field$"):
        vllm_engine_kwargs("/ckpt", cfg, **ENGINE_ARGS, engine_args_class=_FakeEngineArgs)
    assert vllm_engine_kwargs("/ckpt", cfg, **ENGINE_ARGS)["zzz"] == 1  # no class given: no field check


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_engine_args_real_engine_args_has_the_adapters_keywords():
    from vllm.engine.arg_utils import EngineArgs

    kwargs = vllm_engine_kwargs("/ckpt", RolloutConfig(vllm=VLLMConfig(max_num_batched_tokens=64)), **ENGINE_ARGS)
    check_engine_args({**kwargs, "speculative_config": None, "data_parallel_size": 1}, EngineArgs)


# ----------------------------------------------------------------------------------------------------------------
# Fake vllm: records calls, checks argument shapes, returns deterministic outputs


class _FakeLLM:
    calls: list = []

    def __init__(self, **kwargs):
        self.calls.clear()
        self.calls.append(("LLM", kwargs))
        type(self).launcher_env = (os.environ.get("RANK"), os.environ.get("LOCAL_RANK"))  # what vLLM would read
        random.seed(0)  # vLLM reseeds the global RNGs and sets the matmul precision at start-up
        torch.manual_seed(0)
        torch.set_float32_matmul_precision("medium")
        self.finish_reason = "stop"

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))

    def collective_rpc(self, method, kwargs=None):
        names = [name for name, _ in kwargs["weights_iterator"]]  # the worker consumes the stream in-process
        self.calls.append(("collective_rpc", method, kwargs["is_checkpoint_format"], len(names)))
        return [None]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def apply_model(self, func):
        self.calls.append(("apply_model", func.__name__))
        return [None]

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append(("generate", prompts, sampling_params, use_tqdm))
        return [
            types.SimpleNamespace(
                outputs=[
                    types.SimpleNamespace(
                        token_ids=[sp.seed % 100, k, 509], text=f"{i}.{k}", finish_reason=self.finish_reason
                    )
                    for k in range(sp.n)
                ]
            )
            for i, (prompt, sp) in enumerate(zip(prompts, sampling_params))
        ]


class _FakePlatform:
    """vllm.platforms.current_platform: CUDA (sleep mode available) or CPU (not)."""

    def __init__(self, cpu: bool):
        self.cpu = cpu

    def is_cpu(self):
        return self.cpu

    def is_sleep_mode_available(self):
        return not self.cpu


def _install_fake_vllm(monkeypatch, *, cpu: bool):
    module = types.SimpleNamespace(
        __version__=f"{SUPPORTED_VLLM[-1]}.0", LLM=_FakeLLM, SamplingParams=lambda **kw: types.SimpleNamespace(**kw),
        EngineArgs=_FakeEngineArgs,
    )
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.platforms", types.SimpleNamespace(current_platform=_FakePlatform(cpu)))
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: not cpu)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0 if cpu else 1)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    module.emptied = emptied
    return module


@pytest.fixture
def fake_vllm(monkeypatch):
    return _install_fake_vllm(monkeypatch, cpu=False)


@pytest.fixture
def fake_vllm_cpu(monkeypatch):
    return _install_fake_vllm(monkeypatch, cpu=True)


def test_vllm_engine_call_sequence(fake_vllm):
    rng, python_rng, precision = torch.get_rng_state(), random.getstate(), torch.get_float32_matmul_precision()
    engine = VLLMEngine(tiny.TINY_CONFIG_DIR, RolloutConfig(max_new_tokens=64), **ENGINE_ARGS)
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == python_rng
    assert torch.get_float32_matmul_precision() == precision
    calls = _FakeLLM.calls
    assert calls[0][0] == "LLM" and calls[0][1]["distributed_executor_backend"] == "external_launcher"
    assert calls[0][1]["enable_sleep_mode"] is True  # CUDA: sleep mode, as before the CPU platform was added
    assert calls[1:] == [("sleep", 2)] and fake_vllm.emptied == [1]
    params = SamplingParams(temperature=0.7, top_p=0.95, top_k=0, max_new_tokens=64, n=2, stop_token_ids=(7,))
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate([[1, 2]], params, seed=3)
    dims = Qwen3Dims.from_hf_config(read_hf_config(tiny.TINY_CONFIG_DIR))
    with pytest.raises(RuntimeError, match="update_weights while the weights are asleep"):
        engine.update_weights(_weights(dims))
    engine.wake_up(("weights",))
    engine.update_weights(_weights(dims))
    engine.wake_up()  # only kv_cache is still asleep
    out = engine.generate([[1, 2], [3]], params, seed=3)
    assert calls[2:6] == [
        ("wake_up", ("weights",)),
        ("collective_rpc", "reload_weights", True, len(expected_hf_shapes(dims))),
        ("reset_prefix_cache",),
        ("wake_up", ("kv_cache",)),
    ]
    _, prompts, sampling, use_tqdm = calls[6]
    assert prompts == [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]}] and use_tqdm is False
    for i, sp in enumerate(sampling):
        assert vars(sp) == dict(
            n=2, temperature=0.7, top_p=0.95, top_k=-1, min_p=0.0, max_tokens=64, seed=request_seed(3, i),
            stop_token_ids=[7], skip_special_tokens=True,
        )  # fmt: skip
    assert out[1] == Completion((request_seed(3, 0) % 100, 1, 509), "0.1", "stop") and len(out) == 4
    engine.sleep()
    assert calls[-1] == ("sleep", 2)
    engine.wake_up()
    with pytest.raises(RuntimeError, match="discarded"):
        engine.generate([[1]], params, seed=0)


def test_vllm_engine_checks_engine_args_against_vllms_engine_args_before_building(fake_vllm):
    _FakeLLM.calls.clear()
    bad = RolloutConfig(max_new_tokens=64, vllm=VLLMConfig(engine_args={"kv_cache_dtyp": "fp8"}))
    with pytest.raises(ValueError, match=r"rollout.vllm.engine_args.kv_cache_dtyp is not a vLLM EngineArgs field"):
        VLLMEngine(tiny.TINY_CONFIG_DIR, bad, **ENGINE_ARGS)
    assert _FakeLLM.calls == []  # refused before the LLM was built
    good = RolloutConfig(max_new_tokens=64, vllm=VLLMConfig(engine_args={"kv_cache_dtype": "fp8"}))
    VLLMEngine(tiny.TINY_CONFIG_DIR, good, **ENGINE_ARGS)
    assert _FakeLLM.calls[0][1]["kv_cache_dtype"] == "fp8"


def test_vllm_engine_on_the_cpu_platform(fake_vllm_cpu, monkeypatch):
    """vLLM's CPU platform: no CUDA needed, sleep mode off, no device limit on TP, no CUDA cache calls, and the tied
    lm_head re-packed after each refit (`_repack_tied_lm_head` through apply_model) before the prefix-cache reset."""
    monkeypatch.setenv("RANK", "0")  # rank 0 of a torchrun world of 4
    monkeypatch.setenv("LOCAL_RANK", "0")
    engine = VLLMEngine(tiny.TINY_CONFIG_DIR, RolloutConfig(max_new_tokens=64), tensor_parallel_size=4, rank=0,
                        world_size=4, max_prompt_tokens=512)
    kwargs = _FakeLLM.calls[0][1]
    assert kwargs["enable_sleep_mode"] is False and kwargs["tensor_parallel_size"] == 4
    engine.wake_up(("weights",))
    engine.update_weights(_weights(Qwen3Dims.from_hf_config(read_hf_config(tiny.TINY_CONFIG_DIR))))
    assert _FakeLLM.calls[-3:] == [
        ("collective_rpc", "reload_weights", True, 46),
        ("apply_model", "_repack_tied_lm_head"),
        ("reset_prefix_cache",),
    ]
    engine.sleep()
    assert fake_vllm_cpu.emptied == []  # no torch.cuda.empty_cache on CPU


def test_vllm_engine_sets_torchruns_rank_variables_for_one_process_only(fake_vllm, monkeypatch):
    """vLLM's external_launcher reads RANK / LOCAL_RANK (torchrun's); a one-process run without torchrun gets 0 for
    the construction, and the environment is left as it was. Missing in a multi-process world: a clear error."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    VLLMEngine(tiny.TINY_CONFIG_DIR, RolloutConfig(), **ENGINE_ARGS)
    assert _FakeLLM.launcher_env == ("0", "0")
    assert "RANK" not in os.environ and "LOCAL_RANK" not in os.environ
    with pytest.raises(RuntimeError, match=r"\['RANK', 'LOCAL_RANK'\] not set on rank 1 of 2; launch with torchrun"):
        VLLMEngine(tiny.TINY_CONFIG_DIR, RolloutConfig(), **(ENGINE_ARGS | dict(rank=1, world_size=2)))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    VLLMEngine(tiny.TINY_CONFIG_DIR, RolloutConfig(), **(ENGINE_ARGS | dict(rank=3, world_size=4)))
    assert _FakeLLM.launcher_env == ("3", "1")  # torchrun's values are used as they are


def test_vllm_engine_without_cuda_on_a_gpu_platform_is_refused(fake_vllm, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device is visible and vLLM's platform is not CPU"):
        VLLMEngine(tiny.TINY_CONFIG_DIR, RolloutConfig(), **ENGINE_ARGS)


def test_vllm_engine_weight_stream_is_checked(fake_vllm):
    engine = VLLMEngine(tiny.TINY_CONFIG_DIR, RolloutConfig(max_new_tokens=64), **ENGINE_ARGS)
    engine.wake_up()
    dims = Qwen3Dims.from_hf_config(read_hf_config(tiny.TINY_CONFIG_DIR))
    with pytest.raises(ValueError, match=r"3 of 46 tensors were not sent: 'model.layers.0.mlp"):
        engine.update_weights(_weights(dims, skip="layers.0.mlp"))
    assert _FakeLLM.calls[-1][0] == "collective_rpc"  # no prefix-cache reset: the engine stays unusable
    with pytest.raises(RuntimeError, match="last update_weights failed"):
        engine.generate([[1]], SamplingParams(max_new_tokens=4), seed=0)
    bad = [("lm_head.weight", torch.zeros(512, 128)), *_weights(dims)]
    with pytest.raises(ValueError, match="'lm_head.weight' is tied to 'model.embed_tokens.weight'"):
        engine.update_weights(iter(bad))


def test_vllm_engine_rejects_an_aborted_request(fake_vllm):
    engine = VLLMEngine(tiny.TINY_CONFIG_DIR, RolloutConfig(max_new_tokens=64), **ENGINE_ARGS)
    engine.wake_up()
    engine.update_weights(_weights(Qwen3Dims.from_hf_config(read_hf_config(tiny.TINY_CONFIG_DIR))))
    engine.llm.finish_reason = "abort"
    with pytest.raises(RuntimeError, match="reason 'abort'"):
        engine.generate([[1]], SamplingParams(max_new_tokens=4), seed=0)


def test_vllm_engine_keep_weights_sleep_is_level_1_and_needs_no_reload(fake_vllm):
    engine = VLLMEngine(tiny.TINY_CONFIG_DIR, RolloutConfig(max_new_tokens=64), **ENGINE_ARGS)
    engine.wake_up()
    engine.update_weights(_weights(Qwen3Dims.from_hf_config(read_hf_config(tiny.TINY_CONFIG_DIR))))
    params = SamplingParams(max_new_tokens=4)
    engine.generate([[1]], params, seed=0)
    engine.sleep(keep_weights=True)
    assert _FakeLLM.calls[-1] == ("sleep", 1)
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate([[1]], params, seed=0)
    engine.wake_up()
    assert _FakeLLM.calls[-1] == ("wake_up", ("weights", "kv_cache"))
    engine.generate([[1]], params, seed=0)  # the weights survived: no update_weights needed
    engine.sleep()
    assert _FakeLLM.calls[-1] == ("sleep", 2)


def test_vllm_engine_first_index_shifts_the_request_seeds(fake_vllm):
    engine = VLLMEngine(tiny.TINY_CONFIG_DIR, RolloutConfig(max_new_tokens=64), **ENGINE_ARGS)
    engine.wake_up()
    engine.update_weights(_weights(Qwen3Dims.from_hf_config(read_hf_config(tiny.TINY_CONFIG_DIR))))
    engine.generate([[1], [2], [3]], SamplingParams(max_new_tokens=4), seed=9, first_index=5)
    _, _, sampling, _ = _FakeLLM.calls[-1]
    assert [sp.seed for sp in sampling] == [request_seed(9, 5 + i) for i in range(3)]


def test_standalone_engine_loads_the_checkpoint_itself_without_a_process_group(fake_vllm, monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    kwargs = standalone_engine_kwargs("/ckpt", max_model_len=40000, seed=4, gpu_memory_utilization=0.9)
    assert kwargs == dict(model="/ckpt", tokenizer="/ckpt", dtype="bfloat16", tensor_parallel_size=1,
                          pipeline_parallel_size=1, gpu_memory_utilization=0.9, max_model_len=40000,
                          max_num_seqs=256, enable_prefix_caching=True, seed=4)
    assert "load_format" not in kwargs and "distributed_executor_backend" not in kwargs
    engine = StandaloneVLLMEngine(**kwargs)
    assert _FakeLLM.calls == [("LLM", kwargs)]  # no sleep, no weight stream: vLLM reads the HF files
    out = engine.generate([[1, 2]], SamplingParams(max_new_tokens=4, n=2), seed=3)
    assert [c.token_ids[0] for c in out] == [request_seed(3, 0) % 100] * 2
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        standalone_engine_kwargs("/ckpt", max_model_len=10, seed=0, gpu_memory_utilization=1.0)


def _changed_for_greedy(weights: dict) -> dict:
    """The checkpoint with its final norm negated: every logit changes sign, so the greedy argmax must move. (Scaling
    the norm by a positive factor scales every logit alike and leaves the argmax where it was.)"""
    return {**weights, "model.norm.weight": -weights["model.norm.weight"]}


def test_the_gpu_tests_weight_change_moves_greedy_output_on_cpu(tmp_path):
    """The GPU test's perturbation, checked with HFEngine: it changes the greedy tokens; the old one (x25) did not."""
    from safetensors.torch import load_file

    from avsd_megatron.rollout.hf_engine import HFEngine

    hf_dir = tiny.make_tiny_hf_checkpoint(tmp_path / "hf", seed=0)
    weights = load_file(hf_dir / "model.safetensors")
    engine = HFEngine.from_pretrained(hf_dir)
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    prompts = [[1, 2, 3, 4], [100, 200, 300]]

    def greedy(named):
        engine.sleep()
        engine.wake_up()
        engine.update_weights(iter(named.items()))
        return [c.token_ids for c in engine.generate(prompts, params, seed=0)]

    base = greedy(weights)
    assert greedy({**weights, "model.norm.weight": weights["model.norm.weight"] * 25.0}) == base
    assert greedy(_changed_for_greedy(weights)) != base


# ----------------------------------------------------------------------------------------------------------------
# GPU smoke test (vllm-rollouts.md §5 item 5); never runs on CPU machines


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (the rollout extra)")
def test_vllm_engine_greedy_equals_transformers_and_follows_weight_updates(tmp_path, monkeypatch):
    """Tiny Qwen3, TP 1, one process: sleep(2) -> wake -> reload from the HF stream; greedy output equals HFEngine's
    fp32 greedy output; changed weights change the output."""
    from safetensors.torch import load_file

    from avsd_megatron.rollout.hf_engine import HFEngine

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", os.environ.get("MASTER_PORT", "29517"))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl")
    hf_dir = tiny.make_tiny_hf_checkpoint(tmp_path / "hf", seed=0)
    cfg = RolloutConfig(max_new_tokens=16, vllm=VLLMConfig(gpu_memory_utilization=0.2, max_model_len=1024))
    engine = VLLMEngine(hf_dir, cfg, **ENGINE_ARGS, dtype="float32")
    weights = load_file(hf_dir / "model.safetensors", device="cuda")
    engine.wake_up(("weights",))
    engine.update_weights(iter(weights.items()))
    engine.wake_up(("kv_cache",))
    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    prompts = [[1, 2, 3, 4], [100, 200, 300]]
    got = engine.generate(prompts, params, seed=0)
    reference = HFEngine.from_pretrained(hf_dir, device="cuda").generate(prompts, params, seed=0)
    assert [c.token_ids for c in got] == [c.token_ids for c in reference]
    engine.sleep()
    engine.wake_up(("weights",))
    engine.update_weights(iter(_changed_for_greedy(weights).items()))
    engine.wake_up(("kv_cache",))
    assert [c.token_ids for c in engine.generate(prompts, params, seed=0)] != [c.token_ids for c in got]
