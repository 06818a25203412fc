"""The main job on CPU: tiny random-init Qwen3 -> SFT warm start -> AVSD (3 math views) and the single-view baseline
on Megatron-Core -> HF -> held-out Avg@k before and after, in one table.

    python -m avsd_megatron.main_job --out runs/tiny_cpu                  # the embedded default (2 CPU cores)
    python -m avsd_megatron.main_job --out /tmp/mini --sft-steps 2 --steps 1 --heldout 4 --k 1   # plumbing check

Phases (wall time of each goes to summary.json):
1. `init`: `tiny.make_tiny_hf_checkpoint(<out>/hf_init, seed)` (bundled config and tokenizer, random weights).
2. `sft`: `warm_start.warm_start` on the bundled train split's worked solutions -> `<out>/hf_warm` (plain torch /
   transformers on the HF model; see that module for why a share of the examples use the teacher prompt layout).
3. `convert`: `convert.convert_hf_to_megatron(hf_warm)` -> `<out>/megatron_warm` (fp32); both runs start from it.
4. `avsd` / `single`: `python -m avsd_megatron.train --config <out>/<run>/config.yaml` as a subprocess (one rank, gloo,
   Megatron on CPU), the trainer of `trainer.py`: avsd.mode=avsd with views full_solution, partial_solution,
   answer_only; and the baseline avsd.mode=single with view full_solution. Same warm start, data order, rollout
   seeds, lr and steps. Metrics: `<out>/<run>/metrics.jsonl`.
5. `export`: the last checkpoint of each run -> `<out>/hf_<run>` (`convert.convert_megatron_to_hf`).
6. `eval`: `evaluate.evaluate_hf_dir` of hf_warm, hf_avsd and hf_single on the first `--heldout` problems of the
   bundled held-out split (disjoint from train), k samples each at the rollout temperature, same seeds
   -> `<out>/eval_<name>.json` (every sample) and `<out>/summary.json`.

Measured (2 shared CPU cores, 2026-11-30; Avg@4 on 200 held-out problems, T=0.7, ± s.e. over problems):

| run                                      | warm start   | AVSD (3 views) | single view  | wall time |
|------------------------------------------|--------------|----------------|--------------|-----------|
| defaults (SFT 200 steps, 40 AVSD steps)  | 5.25 ± 1.03  | 3.62 ± 0.65    | 3.62 ± 0.84  | 520 s     |
| --sft-steps 300 --sft-teacher-share 0.6 --steps 60 --lr 3e-4 | 3.62 ± 0.91 | 3.88 ± 0.83 | 3.50 ± 0.69 | 644 s |

AVSD does NOT improve held-out accuracy at this scale. The metrics say why: the views' teacher log-probs of the
sampled tokens are no higher than the student's (mv_tinker_view_logprob_* <= mv_tinker_student_logprob_mean at every
step), so the warm start has not learned to read a reference in its context and the AVSD target carries no
information about the answer. A warm start that copies from the reference (far longer SFT, or a pretrained model)
is the missing piece; the job is a plumbing run of the real pipeline, not evidence for or against AVSD.

summary.json: heldout_accuracy_before / heldout_accuracy_after / heldout_accuracy_single_after (Avg@k, %), their
standard errors (`evaluate` docstring), heldout_delta (AVSD - warm start) and its s.e. (independent-sample
approximation), pass@k and format rate per model, steps, settings and seconds per phase.

Threads: every torch process of the job uses `--threads` intra-op threads (default 1; two busy threads on a shared
2-core machine were measured over 100x slower per small forward than one: 0.31 s vs 1.3 ms).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from avsd_megatron.config import TrainConfig, dump_config, from_dict, to_dict
from avsd_megatron.evaluate import EvalConfig, evaluate_hf_dir
from avsd_megatron.tiny import TINY_HELDOUT_PATH, TINY_TRAIN_PATH, make_tiny_hf_checkpoint, read_jsonl
from avsd_megatron.views import MATH_VIEWS
from avsd_megatron.warm_start import SFTConfig, warm_start

__all__ = ["main", "parse_args", "run_config"]

RUNS = {"avsd": ("avsd", MATH_VIEWS), "single": ("single", ("full_solution",))}
"""run name -> (avsd.mode, avsd.views)."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m avsd_megatron.main_job", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/tiny_cpu", help="run directory (must not hold a summary.json)")
    p.add_argument("--seed", type=int, default=0, help="init weights, SFT order, optim and rollout seeds")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of every process")
    # -- warm start -----------------------------------------------------------------------------------------------
    p.add_argument("--sft-steps", type=int, default=200, help="SFT optimizer steps")
    p.add_argument("--sft-batch", type=int, default=16, help="SFT examples per step")
    p.add_argument("--sft-lr", type=float, default=3e-3, help="SFT peak learning rate")
    p.add_argument("--sft-teacher-share", type=float, default=0.3, help="share of SFT rows in teacher layout")
    # -- AVSD -----------------------------------------------------------------------------------------------------
    p.add_argument("--steps", type=int, default=40, help="AVSD optimizer steps (each run)")
    p.add_argument("--prompts-per-step", type=int, default=8, help="prompts per AVSD step")
    p.add_argument("--lr", type=float, default=1e-4, help="AVSD learning rate (linear decay to 0)")
    p.add_argument("--temperature", type=float, default=0.7, help="rollout and evaluation temperature")
    p.add_argument("--max-new-tokens", type=int, default=96, help="rollout and evaluation completion cap")
    p.add_argument("--skip-single", action="store_true", help="no single-view baseline run")
    # -- evaluation -----------------------------------------------------------------------------------------------
    p.add_argument("--heldout", type=int, default=200, help="held-out problems evaluated (bundled: 200)")
    p.add_argument("--k", type=int, default=4, help="samples per held-out problem")
    return p.parse_args(argv)


def run_config(args: argparse.Namespace, run_dir: Path, hf_warm: Path, megatron_warm: Path, mode: str,
               views: Sequence[str]) -> TrainConfig:
    """The trainer config of one run (tiny_cpu.yaml's settings, the job's sizes)."""
    return from_dict({
        "output_dir": str(run_dir),
        "prompts_per_step": args.prompts_per_step,
        "micro_batch_size": min(args.prompts_per_step, 4),
        "max_steps": args.steps,
        "model": {"hf_path": str(hf_warm), "megatron_checkpoint": str(megatron_warm), "dtype": "float32",
                  "layer_spec": "local", "recompute": "none"},
        "rollout": {"engine": "hf", "temperature": args.temperature, "top_p": 0.95, "top_k": 20,
                    "max_new_tokens": args.max_new_tokens, "seed": args.seed},
        "avsd": {"views": list(views), "mode": mode},
        "optim": {"lr": args.lr, "distributed_optimizer": False, "seed": args.seed},
        "data": {"sources": [str(TINY_TRAIN_PATH)], "task": "math"},
        "prompts": {"max_prompt_tokens": 512},
        "logging": {"log_every": 1, "generations_every": 10},
        "checkpoint": {"save_every": 0, "keep_last": 1, "resume": None},
    }, source=f"main_job:{run_dir.name}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(cfg_path: Path, threads: int) -> None:
    """One `avsd_megatron.train` process (its own process group on a free port)."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                        "RANK": "0", "WORLD_SIZE": "1"}
    cmd = [sys.executable, "-m", "avsd_megatron.train", "--config", str(cfg_path), "--no-progress"]
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"training failed (exit {done.returncode}): {' '.join(cmd)}")


def _table(rows: list[tuple[str, dict[str, Any], int | str]], k: int) -> str:
    head = f"| model | AVSD steps | held-out Avg@{k} (%) | ± s.e. | Pass@{k} (%) | format (%) | mean tokens |"
    lines = [head, "|" + "---|" * 7]
    for name, s, steps in rows:
        lines.append(f"| {name} | {steps} | {s[f'avg@{k}']:.2f} | {s[f'avg@{k}_stderr']:.2f} | "
                     f"{s[f'pass@{k}']:.1f} | {s['format_rate']:.1f} | {s['mean_completion_tokens']:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from avsd_megatron.checkpointing import find_latest
    from avsd_megatron.convert import convert_hf_to_megatron, convert_megatron_to_hf

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if (out / "summary.json").exists():
        raise FileExistsError(f"{out}/summary.json exists: pick a new --out")
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    def phase(name: str, start: float) -> None:
        seconds[name] = round(time.perf_counter() - start, 1)
        print(f"[main_job] {name}: {seconds[name]:.1f} s", flush=True)

    start = time.perf_counter()
    hf_init, hf_warm, megatron_warm = out / "hf_init", out / "hf_warm", out / "megatron_warm"
    make_tiny_hf_checkpoint(hf_init, seed=args.seed)
    phase("init", start)

    start = time.perf_counter()
    sft_cfg = SFTConfig(steps=args.sft_steps, batch_size=args.sft_batch, lr=args.sft_lr,
                        teacher_share=args.sft_teacher_share, seed=args.seed)
    sft = warm_start(hf_init, hf_warm, read_jsonl(TINY_TRAIN_PATH), sft_cfg)
    phase("sft", start)

    start = time.perf_counter()
    convert_hf_to_megatron(hf_warm, megatron_warm, dtype=torch.float32)
    phase("convert", start)

    runs = {name: spec for name, spec in RUNS.items() if not (args.skip_single and name == "single")}
    for name, (mode, views) in runs.items():
        start = time.perf_counter()
        run_dir = out / name
        cfg = run_config(args, run_dir, hf_warm, megatron_warm, mode, views)
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
        _train(run_dir / "config.yaml", args.threads)
        phase(f"train_{name}", start)
        start = time.perf_counter()
        ckpt = find_latest(cfg.checkpoint_dir)
        if ckpt is None:
            raise RuntimeError(f"run {name!r} left no checkpoint under {cfg.checkpoint_dir}")
        convert_megatron_to_hf(ckpt, out / f"hf_{name}", dtype=torch.float32)
        phase(f"export_{name}", start)

    eval_cfg = EvalConfig(k=args.k, temperature=args.temperature, top_p=0.95, top_k=-1,
                          max_new_tokens=args.max_new_tokens, thinking=False, seed=args.seed)
    scores: dict[str, dict[str, Any]] = {}
    for name in ["warm", *runs]:
        start = time.perf_counter()
        result = evaluate_hf_dir(out / f"hf_{name}", TINY_HELDOUT_PATH, eval_cfg, limit=args.heldout)
        (out / f"eval_{name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        scores[name] = result["summary"]
        phase(f"eval_{name}", start)

    k = args.k
    summary: dict[str, Any] = {
        "heldout_accuracy_before": scores["warm"][f"avg@{k}"],
        "heldout_accuracy_after": scores["avsd"][f"avg@{k}"],
        "heldout_accuracy_single_after": scores["single"][f"avg@{k}"] if "single" in scores else None,
        "heldout_stderr_before": scores["warm"][f"avg@{k}_stderr"],
        "heldout_stderr_after": scores["avsd"][f"avg@{k}_stderr"],
        "heldout_stderr_single_after": scores["single"][f"avg@{k}_stderr"] if "single" in scores else None,
        "heldout_delta": scores["avsd"][f"avg@{k}"] - scores["warm"][f"avg@{k}"],
        "heldout_delta_stderr": math.hypot(scores["avsd"][f"avg@{k}_stderr"], scores["warm"][f"avg@{k}_stderr"]),
        "metric": f"avg@{k} (%) on the first {args.heldout} bundled held-out problems, T={args.temperature}",
        "steps": args.steps,
        "sft": sft,
        "scores": scores,
        "settings": vars(args),
        "train_config_avsd": to_dict(run_config(args, out / "avsd", hf_warm, megatron_warm, *RUNS["avsd"])),
        "seconds": seconds,
    }
    summary["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    labels = {"avsd": f"AVSD ({', '.join(RUNS['avsd'][1])})", "single": "single view (full_solution)"}
    rows = [("warm start (SFT)", scores["warm"], 0)] + [(labels[n], scores[n], args.steps) for n in runs]
    print(_table(rows, k))
    delta, se = summary["heldout_delta"], summary["heldout_delta_stderr"]
    verdict = "improved" if delta > 2 * se else "no significant change" if delta > -2 * se else "got worse"
    print(f"AVSD - warm start: {delta:+.2f} ± {se:.2f} points ({verdict}, 2 s.e. rule)")
    print(f"wall time {summary['seconds']['total']:.0f} s; per phase: {json.dumps(seconds)}")
    print(f"summary: {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
