"""The `vllm` tier, trainer side: the AVSD loop for 2 steps with `rollout.engine: vllm` on vLLM's CPU platform (TP1 in
one process, TP2 under `torchrun --nproc-per-node 2`), launched by tests/rollout/vllm_cpu_run.py `trainer`.

After training, the engine's greedy output on a few prompts must equal HFEngine's greedy output on the trained
weights exported to HF names (`export_hf_weights`, TP-gathered): this proves `sync_weights` (export -> vLLM
refit, after every step). The start checkpoint is the tiny Qwen3 with perturbed weights (varied greedy outputs),
and the test first checks that the 2 steps change HFEngine's greedy output, so an engine left on the start
weights would fail. Skipped, with the reason, where vLLM's CPU build is not installed (README "vLLM tier").

Run: .venv-vllm/bin/python -m pytest -q -m vllm tests/training/test_trainer_vllm.py
"""

from __future__ import annotations

import json
import math

import pytest

from avsd_megatron.data import tiny
from avsd_megatron.rollout.engine import SamplingParams
from avsd_megatron.training.config import load_config, to_dict
from tests.rollout.vllm_cpu_run import (
    MAX_NEW_TOKENS,
    PROMPTS,
    ROOT,
    launch,
    perturbed_weights,
    vllm_tier_marks,
)

pytestmark = vllm_tier_marks()


@pytest.fixture(scope="module")
def start_dir(tmp_path_factory):
    """The tiny HF checkpoint with perturbed_weights(seed=1) as its weights."""
    from safetensors.torch import save_file

    hf_dir = tiny.make_tiny_hf_checkpoint(tmp_path_factory.mktemp("trainer_vllm") / "hf", seed=0)
    save_file(perturbed_weights(hf_dir, 1), str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    return hf_dir


def _config(out_dir, hf_dir, tp: int) -> dict:
    data = to_dict(load_config(ROOT / "examples" / "configs" / "tiny_cpu.yaml"))
    data.update(output_dir=str(out_dir), prompts_per_step=4, micro_batch_size=2, max_steps=2)
    data["model"]["hf_path"] = str(hf_dir)
    data["parallel"]["tp"] = tp
    data["rollout"].update(engine="vllm", max_new_tokens=8)
    data["rollout"]["vllm"].update(max_model_len=1024, enforce_eager=True)
    data["optim"]["lr"] = 1e-3  # 2 steps must move the greedy output (checked below)
    data["logging"]["generations_every"] = 0
    return data


def _greedy(hf_dir, weights=None) -> list[dict]:
    from avsd_megatron.rollout.hf_engine import HFEngine

    engine = HFEngine.from_pretrained(hf_dir)
    if weights is not None:
        engine.wake_up(("weights",))
        engine.update_weights(iter(weights.items()))
        engine.wake_up()
    params = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)
    return [{"token_ids": list(c.token_ids), "finish_reason": c.finish_reason}
            for c in engine.generate(PROMPTS, params, seed=0)]


@pytest.mark.parametrize("tp", [1, 2])
def test_trainer_with_vllm_engine_syncs_the_trained_weights(start_dir, tmp_path, tp):
    from safetensors.torch import load_file

    config = tmp_path / "config.json"
    config.write_text(json.dumps(_config(tmp_path / "run", start_dir, tp)))
    records, stderr = launch("trainer", tmp_path / "out", str(config), nproc=tp)
    assert [r["engine"] for r in records] == ["VLLMEngine"] * tp
    assert all(len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"]) for r in records)
    trained = load_file(str(tmp_path / "out" / "trained.safetensors"))
    expected = _greedy(start_dir, trained)
    assert expected != _greedy(start_dir), "the 2 steps did not change the greedy output; the test proves nothing"
    for record in records:
        assert record["greedy"] == expected, record["rank"]
    assert "Traceback" not in stderr  # engine closed before the process group


def test_train_cli_with_vllm_engine_shuts_down_cleanly(start_dir, tmp_path):
    """`python -m avsd_megatron train` with rollout.engine=vllm: one step, exit 0, and no traceback at shutdown (the
    CLI closes the engine before destroying the process group; the other order makes vLLM's exit-time finalizer
    fail on the destroyed group)."""
    import os
    import subprocess
    import sys

    from tests.rollout.vllm_cpu_run import VLLM_CPU_ENV

    overrides = [f"output_dir={tmp_path / 'run'}", f"model.hf_path={start_dir}", "max_steps=1", "prompts_per_step=2",
                 "micro_batch_size=2", "rollout.engine=vllm", "rollout.max_new_tokens=8",
                 "rollout.vllm.max_model_len=1024", "rollout.vllm.enforce_eager=true", "checkpoint.save_every=0",
                 "logging.generations_every=0"]
    proc = subprocess.run(
        [sys.executable, "-m", "avsd_megatron", "train", "--config", str(ROOT / "examples" / "configs" /
         "tiny_cpu.yaml"), "--no-progress", "--set", *overrides],
        capture_output=True, text=True, timeout=540, cwd=ROOT, env=os.environ | VLLM_CPU_ENV,
    )
    assert proc.returncode == 0, proc.stderr[-8000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-8000:]
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
