#!/usr/bin/env bash
# The prepared GPU device check (benchmarks/README.md "Device check"): on one GPU machine with a CUDA torch and no
# network, install megatron-core (and the trainer's small deps) from a wheel folder into a throwaway venv that sees
# the system torch, then run, each under its own time limit (under 8 minutes in all on one H200):
#   1. benchmarks/gpu_step.py at 8 Qwen3-8B-shaped layers: every variant this machine can run (fused kernels on/off,
#      recompute none/selective/full, overlap_grad_reduce on/off, teacher chunking, grad-buffer and optimizer
#      offload on/off, the teacher swap old vs new: avsd/swap-old = swap buffer, avsd/swap-new = θ restored from the
#      fp32 master; THD packing, avsd/packed, where Transformer Engine is present), with step time split into phases
#      (and the swap timed on its own), MFU, peak memory, offload savings, the teacher's buffers, the loss difference
#      (swap-new vs swap-old must be 0) and packing's packed = padded check;
#   2. benchmarks/pinned_memory.py: pinned host memory reserved vs requested for the teacher's per-tensor pins;
#   3. the tiny trainer on CUDA: 4 steps saving at step 2, then a resume from step 2 that must reproduce the losses
#      of steps 3 and 4 (skipped, and said so, when the trainer's deps are neither installed nor in the wheel folder);
#   4. benchmarks/device_report.py: one table of all of it, DIR/device_check.md (also printed).
# Usage: benchmarks/device_check.sh WHEELS_DIR [OUT_DIR]     (run from the repository root; OUT_DIR default $OUT or
#        ./device_check_out). Prepare WHEELS_DIR with `python benchmarks/device_wheels.py WHEELS_DIR`.
set -uo pipefail
WHEELS=${1:?usage: benchmarks/device_check.sh WHEELS_DIR [OUT_DIR]}
RESULTS=${2:-${OUT:-device_check_out}}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
LOG="$RESULTS/device_check.log"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD
start=$(date +%s)
say() { echo "[device_check +$(( $(date +%s) - start ))s] $*" | tee -a "$LOG"; }

TORCH_INFO='import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.device_count())'
say "torch: $($PY -c "$TORCH_INFO" 2>&1)"
if ! $PY -c 'import megatron.core' 2>/dev/null; then
    VENV="$RESULTS/venv"
    $PY -m venv --system-site-packages "$VENV" >>"$LOG" 2>&1 || { say "FAIL: python -m venv"; exit 1; }
    PY="$VENV/bin/python"
    say "installing megatron-core from $WHEELS"
    $PY -m pip install -q --no-index --find-links "$WHEELS" "megatron-core==0.19.*" >>"$LOG" 2>&1 \
        || { say "FAIL: megatron-core install (see $LOG)"; exit 1; }
    $PY -m pip install -q --no-index --find-links "$WHEELS" transformers safetensors datasets psutil pyyaml tqdm \
        >>"$LOG" 2>&1 || say "trainer deps not installable from $WHEELS (core tier?): the trainer check will skip"
fi
PROVIDERS='from avsd_megatron.training.kernels import detect_providers; print(sorted(detect_providers()))'
say "providers: $($PY -c "$PROVIDERS" 2>&1 | tail -1)"

say "1/3 gpu_step.py (limit 300 s)"
timeout 300 $PY benchmarks/gpu_step.py --layers 8 --warmup 1 --steps 3 --json "$RESULTS/gpu_step.json" \
    >"$RESULTS/gpu_step.md" 2>>"$LOG"; say "gpu_step rc=$?"

say "2/3 pinned_memory.py (limit 60 s)"
timeout 60 $PY benchmarks/pinned_memory.py --tp 2 --json "$RESULTS/pinned_memory.json" \
    >"$RESULTS/pinned_memory.md" 2>>"$LOG"; say "pinned_memory rc=$?"

say "3/3 tiny trainer on CUDA: 4 steps with a save at 2, then resume from 2 (limit 150 s)"
if $PY -c 'import transformers, datasets, yaml, safetensors, psutil' 2>/dev/null; then
    TINY="$RESULTS/tiny"
    rm -rf "$TINY"
    common=(--config examples/configs/tiny_cpu.yaml --no-progress --set "model.hf_path=$TINY/hf_init"
            max_steps=4 prompts_per_step=4 rollout.max_new_tokens=8 logging.log_every=1 logging.generations_every=0
            checkpoint.keep_last=null optim.distributed_optimizer=true)
    timeout 150 bash -c '
        set -e
        "$0" -m avsd_megatron tiny checkpoint "$1/hf_init"
        shift_args=("${@:2}")
        "$0" -m avsd_megatron train "${shift_args[@]}" "output_dir=$1/a" checkpoint.save_every=2 checkpoint.resume=null
        "$0" -m avsd_megatron train "${shift_args[@]}" "output_dir=$1/b" checkpoint.save_every=0 \
            "checkpoint.resume=$1/a/checkpoints/step_00000002"
    ' "$PY" "$TINY" "${common[@]}" >>"$LOG" 2>&1
    rc=$?
    $PY - "$TINY" "$rc" >"$RESULTS/trainer.json" <<'PYEOF'
import json, math, sys
from pathlib import Path
tiny, rc = Path(sys.argv[1]), int(sys.argv[2])
def records(run):
    path = tiny / run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
a, b = records("a"), records("b")
first = {r["step"]: r for r in a}
diffs = [abs(r["loss"] - first[r["step"]]["loss"]) for r in b if r["step"] in first]
ok = rc == 0 and [r["step"] for r in a] == [1, 2, 3, 4] and [r["step"] for r in b] == [3, 4] and max(diffs) <= 1e-6
print(json.dumps({"rc": rc, "steps_a": [r["step"] for r in a], "steps_b": [r["step"] for r in b],
                  "losses_a": [r["loss"] for r in a], "resume_max_loss_diff": max(diffs) if diffs else None,
                  "ok": bool(ok)}))
PYEOF
    say "trainer rc=$rc: $(cat "$RESULTS/trainer.json")"
else
    echo '{"skipped": "transformers / datasets / yaml / safetensors / psutil not importable"}' >"$RESULTS/trainer.json"
    say "trainer check skipped: its deps are missing"
fi

$PY benchmarks/device_report.py "$RESULTS" | tee -a "$LOG"
say "done"
