"""One markdown table from the device check's results (`benchmarks/device_check.sh`): DIR/device_check.md.

    python benchmarks/device_report.py DIR

Reads DIR/gpu_step.json, DIR/pinned_memory.json and DIR/trainer.json (each optional: a missing one becomes a row
saying so) and writes one row per gpu_step variant, one for the pinned-memory measurement and one for the tiny
trainer's save/resume run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def rows(out: Path) -> list[str]:
    table = ["| part | item | step (s) | MFU | peak (GiB) | notes |", "|---|---|---|---|---|---|"]
    gpu = _load(out / "gpu_step.json")
    if gpu is None:
        table.append("| gpu_step | - | - | - | - | no result (see device_check.log) |")
    else:
        for name, r in gpu["results"].items():
            phases = ", ".join(f"{k} {v:.3f}" for k, v in r["phases"].items())
            restore = (f"; restore {r['restore']}, teacher buffers {r['teacher_buffers_gib']:.2f} GiB"
                       if r.get("restore") else "")  # swap-old vs swap-new: the swap time and the buffers
            notes = (f"{phases}; swap {_fmt(r['swap_s'], '.3f')} s{restore}; offload frees "
                     f"{_fmt(r['freed_gib'], '.2f')} GiB; loss - base {_fmt(r['loss_minus_base'], '.3g')}")
            check = r.get("packed_check")
            if check:  # avsd/packed: packed = padded on the same weights (gpu_step.PACKED_TOLERANCES)
                figures = ", ".join(f"{k} {v:.3g}" for k, v in check.items() if k != "pass")
                notes += f"; packed = padded {'PASS' if check['pass'] else 'FAIL'} ({figures})"
            peak = _fmt(r["peak_gib"], ".1f")
            table.append(f"| gpu_step | {name} | {r['step_s']:.3f} | {r['mfu']:.1%} | {peak} | {notes} |")
    pinned = _load(out / "pinned_memory.json")
    if pinned is None:
        table.append("| pinned memory | - | - | - | - | no result |")
    else:
        gib = 2**30
        table.append(
            f"| pinned memory | Qwen3-8B TP{pinned['tp']} shards | - | - | - | requested "
            f"{pinned['requested'] / gib:.2f} GiB, reserved {pinned['reserved'] / gib:.2f} GiB; full teacher (θ₀ + swap) "
            f"{pinned['qwen3_8b_requested'] / gib:.1f} -> {pinned['qwen3_8b_reserved'] / gib:.1f} GiB per rank |"
        )
    trainer = _load(out / "trainer.json")
    if trainer is None or "skipped" in (trainer or {}):
        why = "no result" if trainer is None else trainer["skipped"]
        table.append(f"| tiny trainer | 4 steps + resume | - | - | - | skipped: {why} |")
    else:
        verdict = "PASS" if trainer["ok"] else "FAIL"
        diff = _fmt(trainer["resume_max_loss_diff"], ".2g")
        table.append(
            f"| tiny trainer | 4 steps + resume | - | - | - | {verdict}: rc {trainer['rc']}, steps "
            f"{trainer['steps_a']} then {trainer['steps_b']}, max loss diff after resume {diff} |"
        )
    return table


def main() -> None:
    out = Path(sys.argv[1])
    text = "\n".join(rows(out)) + "\n"
    (out / "device_check.md").write_text(text, encoding="utf-8")
    print(text, end="")


if __name__ == "__main__":
    main()
