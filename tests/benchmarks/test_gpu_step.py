"""benchmarks/gpu_step.py's CPU smoke mode (toy shape, gloo, one step per variant) and the device check's report:
the GPU benchmark's code paths (the trainer's model builders, teacher scoring, student update, optimizer, the
rollout offload) must keep running, so CI catches breakage before a GPU run does. Timings are not checked.
The avsd/packed variant's packed = padded check (`gpu_step.packed_check`) runs here on the tiny model whose local
attention is given THD semantics (`testing/thd_attention.py`): it passes, and it fails when the attention ignores
the segment boundaries of the pack.

Run: python -m pytest -q tests/benchmarks/test_gpu_step.py
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_gpu_step_cpu_smoke_runs_every_cpu_variant(tmp_path):
    out = tmp_path / "smoke.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), MASTER_PORT=str(_free_port()))
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "benchmarks/gpu_step.py", "--cpu-smoke", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_step
    finally:
        sys.path.pop(0)
    results = json.loads(out.read_text())["results"]
    assert list(results) == list(gpu_step.CPU_VARIANTS)
    for name, r in results.items():
        assert math.isfinite(r["step_s"]) and r["step_s"] > 0, name
        if name != "ce":
            assert {"score_teachers", "update_student", "optimizer"} <= set(r["phases"]), name
            assert math.isfinite(r["last_loss"]), name
            if name != "avsd/swap-old":  # bf16, no bf16 base on CPU; swap-new is compared with it
                assert r["loss_minus_base"] == 0.0, (name, r["loss_minus_base"])  # same weights and rows, one step
    assert "offload" in results["avsd/offload-all"]["phases"]
    old, new = results["avsd/swap-old"], results["avsd/swap-new"]
    assert (old["restore"], new["restore"], results["avsd"]["restore"]) == ("swap", "master", "swap")  # fp32 base
    assert old["dtype"] == new["dtype"] == "bfloat16" and old["loss_minus_base"] is None
    assert new["teacher_buffers_gib"] == pytest.approx(old["teacher_buffers_gib"] / 2)  # θ₀ only, no swap buffer
    assert new["swap_s"] > 0 and old["swap_s"] > 0
    assert "| avsd/offload-grads |" in proc.stdout  # the markdown table
    assert "avsd/packed not in the CPU smoke" in proc.stdout  # said, not silently dropped


def _gpu_step_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_step
    finally:
        sys.path.pop(0)
    return gpu_step


def packed_check_rank(broken: bool) -> dict:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from avsd_megatron.hook.batch import build_avsd_batch
    from avsd_megatron.hook.loss import AVSDLossConfig
    from avsd_megatron.hook.packing import pack_batch
    from avsd_megatron.hook.step import AVSDStep, MegatronGroups
    from avsd_megatron.hook.teacher_kinds import LiveTeacher
    from avsd_megatron.testing import build_tiny_gpt_model, init_megatron, tiny_qwen3_config
    from avsd_megatron.testing.thd_attention import THDDotProductAttention

    class PackBlindAttention(THDDotProductAttention):
        """A broken THD attention: the whole pack as one causal sequence (segment boundaries ignored)."""

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            if packed_seq_params is None:
                return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
            return super(THDDotProductAttention, self).forward(
                query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), None, attn_mask_type=attn_mask_type)

    init_megatron(1, 1)
    config = tiny_qwen3_config()
    config.finalize_model_grads_func = finalize_model_grads
    attention = PackBlindAttention if broken else THDDotProductAttention
    gpt = build_tiny_gpt_model(config, 64, 64, seed=5, core_attention=attention)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), gpt)
    no_optimizer = types.SimpleNamespace(zero_grad=lambda: None)  # the check runs no optimizer step
    avsd = AVSDStep(model, no_optimizer, AVSDLossConfig(temperature=0.7), LiveTeacher([]),
                    groups=MegatronGroups.from_parallel_state())
    gen = torch.Generator().manual_seed(11)

    def ids():
        return torch.randint(1, 64, (int(torch.randint(2, 9, (1,), generator=gen)),), generator=gen).tolist()

    padded = build_avsd_batch([ids() for _ in range(4)], [[ids(), ids()] for _ in range(4)],
                              [ids() for _ in range(4)], view_names=("a", "b"), micro_batch_size=2, pad_id=0)
    return _gpu_step_module().packed_check(model, avsd, padded, pack_batch(padded))


@pytest.mark.integration
def test_packed_check_passes_for_thd_attention_and_fails_when_it_ignores_the_segments():
    from avsd_megatron.testing import run_on_ranks

    good = run_on_ranks(packed_check_rank, 1, False, timeout=300)[0]
    tolerances = _gpu_step_module().PACKED_TOLERANCES
    assert good["pass"] and set(tolerances) <= set(good)
    assert good["logits_rel"] < 1e-5 and good["view_logprob_abs"] < 1e-5 and good["grad_cosine"] > 1 - 1e-6
    bad = run_on_ranks(packed_check_rank, 1, True, timeout=300)[0]
    assert not bad["pass"] and bad["view_logprob_abs"] > tolerances["view_logprob_abs"]


def test_device_report_writes_one_table_and_names_missing_parts(tmp_path):
    avsd = {"phases": {"score_teachers": 1.0}, "swap_s": 0.5, "freed_gib": None, "loss_minus_base": 0.0,
            "step_s": 2.0, "mfu": 0.4, "peak_gib": 50.0}
    swap_new = dict(avsd, phases={"score_teachers": 0.9}, swap_s=0.2, step_s=1.9, mfu=0.42, restore="master",
                    teacher_buffers_gib=7.6)
    packed = dict(avsd, step_s=1.5, packed_check={"view_logprob_abs": 0.01, "grad_cosine": 0.999, "pass": True})
    gpu = {"results": {"avsd": avsd, "avsd/swap-new": swap_new, "avsd/packed": packed}}
    (tmp_path / "gpu_step.json").write_text(json.dumps(gpu))
    (tmp_path / "trainer.json").write_text(json.dumps({"rc": 0, "steps_a": [1, 2, 3, 4], "steps_b": [3, 4],
                                                       "resume_max_loss_diff": 0.0, "ok": True}))
    subprocess.run([sys.executable, "benchmarks/device_report.py", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True)
    table = (tmp_path / "device_check.md").read_text().splitlines()
    assert table[0].startswith("| part | item |") and len(table) == 7
    assert table[2].startswith("| gpu_step | avsd | 2.000 | 40.0% | 50.0 |") and "packed" not in table[2]
    assert table[3].startswith("| gpu_step | avsd/swap-new | 1.900 |")
    assert "swap 0.200 s; restore master, teacher buffers 7.60 GiB" in table[3]
    assert table[4].startswith("| gpu_step | avsd/packed | 1.500 |")
    assert "packed = padded PASS (view_logprob_abs 0.01, grad_cosine 0.999)" in table[4]
    assert table[5] == "| pinned memory | - | - | - | - | no result |"
    assert "PASS" in table[6] and "[1, 2, 3, 4] then [3, 4]" in table[6]


@pytest.mark.parametrize("argv", [[], ["--layers", "8", "--teacher-storage", "device"],
                                  ["--tp", "2", "--pp", "2", "--layers", "8", "--dp", "2"]])
def test_predict_runs_without_a_gpu_and_matches_the_readme_table(argv):
    gpu_step = _gpu_step_module()
    out = gpu_step.main(["--predict", *argv])
    times = out["predicted"]
    # update_student from gpu_step's own FLOP formula (3 x forward at the N completion positions), the planner's MFU
    args = gpu_step.parse_args(["--predict", *argv])
    n = args.micro_batch_size * args.completion
    flops = args.micro_batches * 3 * gpu_step.forward_flops(
        gpu_step.QWEN3_8B, args.micro_batch_size, args.student_prompt + args.completion, n, args.layers)
    bubble = 1 + (args.pp - 1) / args.micro_batches
    assert times["update_student"] == pytest.approx(flops / (args.tp * args.pp * 989e12 * 0.35) * bubble, rel=1e-3)
    # benchmarks/README.md's "planner against GPU runs" table shows these figures
    row = {(): "(defaults", ("--layers", "8", "--teacher-storage", "device"): "`--layers 8 --teacher-storage device`",
           ("--tp", "2", "--pp", "2", "--layers", "8", "--dp", "2"): "`--tp 2 --pp 2 --layers 8`"}[tuple(argv)]
    line = next(r for r in (ROOT / "benchmarks" / "README.md").read_text().splitlines() if r.startswith("| " + row))
    step = times["score_teachers"] + times["update_student"] + times["optimizer"]
    cells = [c.strip() for c in line.split("|")[2:7]]
    assert cells == [f"{times['score_teachers']:.3f}", f"{times['update_student']:.3f}", f"{times['optimizer']:.3f}",
                     f"{step:.3f}", f"{times['swap']:.3f} / {times['swap_old']:.3f}"]
    assert times["swap"] < times["swap_old"]  # one copy in + the restore vs three copies


@pytest.mark.parametrize("argv, message", [(["--gpu", "h900"], "--gpu 'h900' is not one of"),
                                           (["--dp", "0"], "--dp 0 must be >= 1")])
def test_predict_rejects_a_bad_gpu_or_dp(argv, message):
    with pytest.raises(SystemExit, match=message):
        _gpu_step_module().main(["--predict", *argv])
