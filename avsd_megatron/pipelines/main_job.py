"""The main job on CPU: tiny random-init Qwen3 -> SFT warm start -> AVSD (3 math views) and the single-view baseline
on Megatron-Core -> HF -> held-out Avg@k before and after, in one table.

    python -m avsd_megatron main-job --out runs/tiny_cpu                  # the embedded default (2 CPU cores)
    python -m avsd_megatron main-job --out /tmp/mini --sft-steps 2 --steps 1 --heldout 4 --k 1 --probe 2  # plumbing
    python -m avsd_megatron main-job --out runs/views_disagree --experiment views-disagree --plot   # issue 18 item 3

Phases (wall time of each goes to summary.json):
1. `init`: `tiny.make_tiny_hf_checkpoint(<out>/hf_init, seed)` (bundled config and tokenizer, random weights).
2. `sft`: `warm_start.warm_start` on the bundled train split's worked solutions -> `<out>/hf_warm` (plain torch /
   transformers on the HF model, `--sft-threads` threads). Half the examples use a teacher prompt, so that the
   model learns to read a privileged view. 30% carry one wrong step, continued consistently (masked), so that
   after a student's mistake the teacher follows the student instead of copying the reference; `warm_start`
   explains both.
3. `probe`: `warm_start.view_probe` on the first `--probe` held-out problems: greedy accuracy with the student
   prompt and with each view's teacher prompt. AVSD can only help if the views score far above the student.
4. `convert`: `convert.convert_hf_to_megatron(hf_warm)` -> `<out>/megatron_warm` (fp32); both runs start from it.
5. `train`: one `python -m avsd_megatron train --config <out>/<run>/config.yaml` process per run, `--parallel-runs`
   at once (one rank each, gloo, Megatron on CPU, `--threads` threads), the trainer of `trainer.py`. The default
   runs (`--runs`, `RUNS`): `avsd`, avsd.mode=avsd with the views full_solution, partial_solution and answer_only;
   `single`, the baseline avsd.mode=single with full_solution; `grpo`, algorithm=grpo (rewards from math-verify,
   --grpo-n completions of --prompts-per-step / n prompts per step, so it samples as many completions per step as
   the others; no teacher). Same warm start, loss, data order, rollout seeds, lr and steps. Metrics go to
   `<out>/<run>/metrics.jsonl`, each run's own output (its plan, library notices) to `<out>/<run>/train.log`.
6. `export`: the last checkpoint of each run -> `<out>/hf_<run>` (`convert.convert_megatron_to_hf`).
7. `eval`: `evaluate.evaluate_hf_dir` of hf_warm and every run's model on the first `--heldout` problems of the
   bundled held-out split (disjoint from train), k samples each at the rollout temperature, same seeds
   -> `<out>/eval_<name>.json` (every sample), `<out>/summary.json` and `<out>/run_stats.json` (each run's per-step
   gate / advantage / reward statistics, `STAT_KEYS`; `--plot` draws them into `<out>/run_stats.png`).
8. `<out>/summary.png` (`plot.plot_summary`): held-out Avg@k with standard-error bars per model, then each run's
   training curves (loss, mean gate, advantage, Jensen gap, sampled-token log-prob of the views vs the student).

Each phase prints its start and its duration with the job's elapsed time; the warm start, the probe, the
conversions and the evaluations show tqdm bars, and training one bar over all runs' steps (read from their
metrics.jsonl while they run).

The experiment where views disagree (`--experiment views-disagree`; issue 18 item 3). Design, fixed before any
result was seen:
* Question: when the privileged views carry view-specific signal that conflicts, does the gated consensus (AVSD)
  beat each single view, the ungated consensus and the arithmetic mixture, and GRPO?
* Data: the training references (not the SFT data, not the held-out set) are the bundled train split with
  `data.tiny.wrong_intermediate_references(share=--wrong-step-share, default 0.5, seed=--seed)`: in that share of
  the rows one `a op b = c` step prints a wrong c (off by 1-3) and nothing else changes, so the final boxed answer
  is right. full_solution then shows the wrong value; partial_solution shows it when the step falls in the kept
  first half; answer_only never does. Several valid solution paths (the issue's other option) are not generated.
* Runs (all from the one warm start, same seeds, lr, steps, loss, sampled completions per step): avsd, single
  (full_solution), single_partial, single_answer, consensus, arithmetic, grpo.
* Outcome: held-out Avg@k on the clean held-out split, each run's delta vs the warm start and vs AVSD with paired
  standard errors (same problems, same sampling seeds); per-step gate and advantage statistics per run.
* Prediction of the paper's argument: AVSD >= each single view and >= consensus / arithmetic by more than 2 paired
  s.e., with AVSD's gate lower than under the default data. Any other outcome is reported as measured.
* Limits: a 4-layer random-init model warm-started by SFT on 3000 synthetic problems; one seed; 2-core CPU.
  tests/pipelines/test_main_job.py runs its plumbing at miniature size (numbers there mean nothing).
* Measured (2026-12-01, 2446 s on 2 shared cores): README "An experiment where views disagree" has the table and
  its reading. In short: every distillation run improved on the warm start; AVSD tied the single full_solution view
  (+0.50 ± 0.71 for the view) and the ungated consensus (-0.12 ± 0.45) and led partial_solution, answer_only and the
  arithmetic mixture by 1.0-1.6 paired s.e.: the prediction (> 2 s.e. against each) was not confirmed.

The loss is `--loss candidate --token-clip 0`: the generalized JSD against the AVSD target over the views' top-k
union (spec 2.3), without the reference's per-token clamp at 0.05. Clamping from above zeroes the gradient of
every token whose JSD exceeds 0.05, which here means the student's wrong digits. Both are named config fields
(`avsd.loss`, `avsd.token_clip`). Measured from one warm start (21.88% Avg@4, 120 AVSD steps; an earlier build of
the bundled tokenizer, same data): the paper's sampled-token loss at lr 1e-4 and 2e-4 gave +2.25 and -0.12 points;
the candidate loss with the clamp gave -0.25 (lr 1e-4); without the clamp it gave +3.88, +4.88 and +3.88 at lr 1e-4,
2e-4 and 3e-4. The paired s.e. is 1.5 where it was recorded (the last two).

Measured with the defaults (`make main-job` on a fresh clone; 2 CPU cores, 2026-12-01; Avg@4 on the 200 held-out
problems, T=0.7; s.e. over problems, deltas with the paired s.e.), 864 s in all (SFT 455 s, the three runs 320 s,
four evaluations 83 s), on a machine without bubblewrap; the same numbers as the runs of 2026-11-30 and of the
earlier 937 s run. The warm start's greedy probe on 40 held-out problems: student prompt 35.0%, full_solution
97.5%, partial_solution 92.5%, answer_only 87.5%.

| model                                         | Avg@4 (%)    | Pass@4 (%) | delta vs warm start |
|-----------------------------------------------|--------------|------------|---------------------|
| warm start (SFT, 1200 steps)                  | 36.38 ± 2.82 | 55.5       |                     |
| AVSD, 3 views, 100 steps                      | 42.25 ± 2.89 | 62.5       | +5.88 ± 1.75        |
| single view (full_solution), 100 steps        | 42.38 ± 2.85 | 64.5       | +6.00 ± 1.66        |
| GRPO (math-verify rewards), 100 steps         | 30.12 ± 2.75 | 47.0       | -6.25 ± 2.23        |

AVSD improves held-out accuracy over its warm start (3.4 paired s.e.). It does not beat the single full_solution
view here: the tiny teacher copies that view almost perfectly (97.5% greedy), so the other two add nothing it
lacks. The paper's comparison between views needs teachers whose views disagree, which this toy does not have.
GRPO with the same lr (2e-4) and 4 completions per prompt lowered accuracy (-12.12 ± 2.38 vs AVSD); neither was
tuned for it (the OPSD repository's GRPO: lr 2e-5, 8 generations).

summary.json: heldout_accuracy_before / heldout_accuracy_after / heldout_accuracy_single_after /
heldout_accuracy_grpo_after (Avg@k, %; None for a run not made), their standard errors (`evaluate` docstring),
heldout_delta (AVSD - warm start), heldout_delta_single and heldout_delta_grpo with paired standard errors
(`_paired_stderr`: same problems and seeds), `runs` (per run: Avg@k, s.e., deltas vs the warm start and vs AVSD
with paired s.e.), `run_stats` (mean / first / last of each STAT_KEYS series), `experiment`, the warm start's view
probe, pass@k and format rate per model, steps, settings and seconds per phase.

Threads: training and evaluation processes use `--threads` intra-op threads (default 1: two busy threads on a shared
2-core machine were measured over 100x slower per small forward than one, 0.31 s vs 1.3 ms); the SFT's larger
batches use `--sft-threads` (default 2, 1.7x faster than one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.elastic.utils.distributed import get_free_port

from avsd_megatron.data.tiny import (
    TINY_HELDOUT_PATH,
    TINY_TRAIN_PATH,
    make_tiny_hf_checkpoint,
    read_jsonl,
    wrong_intermediate_references,
)
from avsd_megatron.data.views import MATH_VIEWS
from avsd_megatron.pipelines.evaluate import EvalConfig, evaluate_hf_dir
from avsd_megatron.pipelines.warm_start import SFTConfig, view_probe, warm_start
from avsd_megatron.training.config import TrainConfig, dump_config, from_dict, to_dict

__all__ = ["RUNS", "main", "parse_args", "run_config"]


@dataclass(frozen=True)
class RunSpec:
    """One training run of the job: the algorithm and, for AVSD, its target mode and views."""

    label: str
    algorithm: str = "avsd"
    mode: str = "avsd"
    views: tuple[str, ...] = MATH_VIEWS


RUNS = {
    "avsd": RunSpec("AVSD (full_solution, partial_solution, answer_only)"),
    "single": RunSpec("single view (full_solution)", mode="single", views=("full_solution",)),
    "single_partial": RunSpec("single view (partial_solution)", mode="single", views=("partial_solution",)),
    "single_answer": RunSpec("single view (answer_only)", mode="single", views=("answer_only",)),
    "consensus": RunSpec("consensus only (3 views)", mode="consensus"),
    "arithmetic": RunSpec("arithmetic only (3 views)", mode="arithmetic"),
    "grpo": RunSpec("GRPO (rewards: math-verify)", algorithm="grpo"),
}
"""run name -> what it trains. The default job runs DEFAULT_RUNS; --experiment views-disagree runs all of them."""
DEFAULT_RUNS = ("avsd", "single", "grpo")
EXPERIMENTS = ("none", "views-disagree")
STAT_KEYS = ("mv_gate_mean", "mv_gate_open_frac", "mv_avsd_mean", "mv_jensen_gap_mean", "mv_jsd_mean",
             "mv_tinker_advantage_mean", "mv_consensus_adv_abs_mean", "pg_advantage_mean", "grpo/advantage_abs_mean",
             "reward/mean", "grpo/zero_variance_frac")
"""Per-step training metrics the job summarises (and plots with --plot) per run, where a run logs them."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m avsd_megatron main-job", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/tiny_cpu", help="run directory (must not hold a summary.json)")
    p.add_argument("--seed", type=int, default=0, help="init weights, SFT order, optim and rollout seeds")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of each training / eval process")
    p.add_argument("--sft-threads", type=int, default=2, help="torch intra-op threads of the warm start")
    # -- warm start -----------------------------------------------------------------------------------------------
    p.add_argument("--sft-steps", type=int, default=1200, help="SFT optimizer steps")
    p.add_argument("--sft-batch", type=int, default=16, help="SFT examples per step")
    p.add_argument("--sft-lr", type=float, default=3e-3, help="SFT peak learning rate")
    p.add_argument("--sft-teacher-share", type=float, default=0.5, help="share of SFT rows in teacher layout")
    p.add_argument("--sft-error-share", type=float, default=0.3,
                   help="share of SFT rows with one wrong step, continued consistently (warm_start.corrupt_solution)")
    p.add_argument("--probe", type=int, default=40, help="held-out problems of the greedy view probe (0: skip)")
    # -- AVSD -----------------------------------------------------------------------------------------------------
    p.add_argument("--steps", type=int, default=100, help="AVSD optimizer steps (each run)")
    p.add_argument("--prompts-per-step", type=int, default=8, help="prompts per AVSD step")
    p.add_argument("--lr", type=float, default=2e-4, help="AVSD learning rate (linear decay to 0)")
    p.add_argument("--loss", choices=("sampled", "candidate", "full_vocab"), default="candidate",
                   help="avsd.loss of both runs (module docstring: why candidate)")
    p.add_argument("--token-clip", type=float, default=0.0,
                   help="avsd.token_clip of the candidate / full_vocab loss (reference 0.05; module docstring)")
    p.add_argument("--temperature", type=float, default=0.7, help="rollout and evaluation temperature")
    p.add_argument("--max-new-tokens", type=int, default=96, help="rollout and evaluation completion cap")
    p.add_argument("--skip-single", action="store_true", help="no single-view baseline run")
    p.add_argument("--runs", default=None,
                   help=f"comma-separated runs from {', '.join(RUNS)} (must include avsd); default "
                        f"{','.join(DEFAULT_RUNS)}, or all of them with --experiment views-disagree")
    p.add_argument("--grpo-n", type=int, default=4,
                   help="GRPO completions per prompt; its prompts per step are --prompts-per-step / n, so every run "
                        "samples the same number of completions per step")
    p.add_argument("--parallel-runs", type=int, default=2, help="training processes at once (2 cores: 2)")
    # -- the experiment where views disagree ------------------------------------------------------------------------
    p.add_argument("--experiment", choices=EXPERIMENTS, default="none",
                   help="views-disagree: train (not SFT) on references with a wrong intermediate step (module "
                        "docstring); every run of RUNS unless --runs")
    p.add_argument("--wrong-step-share", type=float, default=0.5,
                   help="views-disagree: share of training references whose one intermediate result is wrong")
    p.add_argument("--plot", action="store_true",
                   help="write <out>/run_stats.png of the per-step gate / advantage statistics (needs matplotlib)")
    # -- evaluation -----------------------------------------------------------------------------------------------
    p.add_argument("--heldout", type=int, default=200, help="held-out problems evaluated (bundled: 200)")
    p.add_argument("--k", type=int, default=4, help="samples per held-out problem")
    return p.parse_args(argv)


def run_config(args: argparse.Namespace, run_dir: Path, hf_warm: Path, megatron_warm: Path, spec: RunSpec,
               train_path: Path = TINY_TRAIN_PATH) -> TrainConfig:
    """The trainer config of one run (tiny_cpu.yaml's settings, the job's sizes). GRPO samples --grpo-n completions
    of --prompts-per-step / n prompts per step (the same completions per step as the AVSD runs' n = 1)."""
    grpo = spec.algorithm == "grpo"
    prompts = max(1, args.prompts_per_step // args.grpo_n) if grpo else args.prompts_per_step
    return from_dict({
        "output_dir": str(run_dir),
        "prompts_per_step": prompts,
        "micro_batch_size": min(prompts, 4) if prompts % min(prompts, 4) == 0 else 1,
        "max_steps": args.steps,
        "algorithm": spec.algorithm,
        "model": {"hf_path": str(hf_warm), "megatron_checkpoint": str(megatron_warm), "dtype": "float32",
                  "layer_spec": "local", "recompute": "none"},
        "rollout": {"engine": "hf", "temperature": args.temperature, "top_p": 0.95, "top_k": 20,
                    "max_new_tokens": args.max_new_tokens, "seed": args.seed, "n": args.grpo_n if grpo else 1},
        "avsd": {"views": list(spec.views), "mode": spec.mode, "loss": args.loss, "token_clip": args.token_clip},
        "optim": {"lr": args.lr, "distributed_optimizer": False, "seed": args.seed},
        "data": {"sources": [str(train_path)], "task": "math"},
        "prompts": {"max_prompt_tokens": 512},
        "logging": {"log_every": 1, "generations_every": 10},
        "checkpoint": {"save_every": 0, "keep_last": 1, "resume": None},
    }, source=f"main_job:{run_dir.name}")


def _steps_logged(metrics_files: Sequence[Path]) -> int:
    """Records written so far to these metrics.jsonl files (one per step with logging.log_every = 1)."""
    total = 0
    for path in metrics_files:
        if path.is_file():
            with open(path, "rb") as f:
                total += sum(1 for line in f if line.strip())
    return total


def _train(cfg_paths: dict[str, Path], threads: int, steps: int, parallel: int = 2, *, poll_s: float = 2.0) -> None:
    """One `python -m avsd_megatron train` process per run, `parallel` at a time (each its own process group on a free
    port, `threads` intra-op threads; the runs are independent, and two one-thread runs use both cores of a 2-core
    machine).

    The runs have no bars of their own (two processes would garble one terminal line); one tqdm bar here counts the
    steps all runs have logged (`steps` each; their metrics.jsonl, next to each config), with rate and ETA. Each
    run's own output (its plan, library notices, its log lines) goes to `train.log` next to its config, not to the
    job's terminal; a failed run's error quotes the end of that log."""
    from tqdm import tqdm

    failed = []
    items = list(cfg_paths.items())
    metrics = [path.parent / "metrics.jsonl" for path in cfg_paths.values()]
    with tqdm(total=steps * len(items), desc="train (" + " + ".join(cfg_paths) + ")", unit="step",
              dynamic_ncols=True) as bar:
        for lo in range(0, len(items), max(1, parallel)):
            procs = {}
            for name, cfg_path in items[lo : lo + max(1, parallel)]:
                env = os.environ | {"OMP_NUM_THREADS": str(threads), "MASTER_ADDR": "127.0.0.1",
                                    "MASTER_PORT": str(get_free_port()), "RANK": "0", "WORLD_SIZE": "1"}
                cmd = [sys.executable, "-m", "avsd_megatron", "train", "--config", str(cfg_path), "--no-progress"]
                log_path = cfg_path.parent / "train.log"
                with open(log_path, "ab") as log:  # the child holds its own descriptor
                    procs[name] = (cmd, log_path, subprocess.Popen(cmd, env=env, stdout=log,
                                                                   stderr=subprocess.STDOUT))
            while any(proc.poll() is None for _, _, proc in procs.values()):
                time.sleep(poll_s)
                if (done := _steps_logged(metrics)) > bar.n:
                    bar.update(done - bar.n)
            failed += [f"run {name!r} exit {rc}: {' '.join(cmd)}; the end of {log_path}:\n{_tail(log_path)}"
                       for name, (cmd, log_path, proc) in procs.items() if (rc := proc.wait()) != 0]
        bar.update(_steps_logged(metrics) - bar.n)
    if failed:
        raise RuntimeError("training failed: " + "\n".join(failed))


def _tail(path: Path, lines: int = 30) -> str:
    """The last `lines` non-empty lines of a log (progress-bar carriage returns count as line breaks)."""
    text = path.read_bytes()[-64_000:].decode("utf-8", errors="replace").replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def _verdict(delta: float, stderr: float) -> str:
    """The 2-s.e. rule; a delta of exactly 0 with s.e. 0 is no change (not 'got worse')."""
    if delta > 2 * stderr:
        return "improved"
    return "no significant change" if delta >= -2 * stderr else "got worse"


def _selected_runs(args: argparse.Namespace) -> list[str]:
    """The runs of this job (checked before any work)."""
    if args.runs is not None:
        names = [n.strip() for n in args.runs.split(",") if n.strip()]
    elif args.experiment == "views-disagree":
        names = list(RUNS)
    else:
        names = list(DEFAULT_RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise ValueError(f"--runs: unknown run(s) {unknown}; choose from {list(RUNS)}")
    if "avsd" not in names:
        raise ValueError("--runs must include avsd (the job reports every run against it and the warm start)")
    if args.skip_single:
        names = [n for n in names if n != "single"]
    if "grpo" in names and args.grpo_n < 2:
        raise ValueError(f"--grpo-n={args.grpo_n} must be >= 2 (group-normalised advantages)")
    return list(dict.fromkeys(names))


def _run_stats(metrics_path: Path) -> dict[str, list[float]]:
    """STAT_KEYS -> the per-step values a run logged (keys it never logged are left out)."""
    records = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {key: [float(r[key]) for r in records if key in r] for key in STAT_KEYS
            if any(key in r for r in records)}


def _plot(stats: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """One panel per statistic, one line per run, x = optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in STAT_KEYS if any(k in s for s in stats.values())]
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.2 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        for run, series in stats.items():
            if key in series:
                ax.plot(range(1, len(series[key]) + 1), series[key], label=run)
        ax.set_title(key, fontsize=9)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _paired_stderr(before: dict[str, Any], after: dict[str, Any]) -> float:
    """Standard error (points) of Avg@k(after) - Avg@k(before) over the same problems: 100 * std_i(d_i) / sqrt(P) with
    d_i the difference of problem i's hit rates (ddof 1). The two models share problems and sampling seeds, so the
    per-problem difficulty cancels; the independent-sample `math.hypot` of the two s.e. overstates the noise."""
    rates = [[statistics.mean(c["correct"] for c in s["completions"]) for s in result["samples"]]
             for result in (before, after)]
    diffs = [a - b for b, a in zip(*rates, strict=True)]
    return 100.0 * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0


def _table(rows: list[tuple[str, dict[str, Any], int | str]], k: int) -> str:
    head = f"| model | steps | held-out Avg@{k} (%) | ± s.e. | Pass@{k} (%) | format (%) | mean tokens |"
    lines = [head, "|" + "---|" * 7]
    for name, s, steps in rows:
        lines.append(f"| {name} | {steps} | {s[f'avg@{k}']:.2f} | {s[f'avg@{k}_stderr']:.2f} | "
                     f"{s[f'pass@{k}']:.1f} | {s['format_rate']:.1f} | {s['mean_completion_tokens']:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from avsd_megatron.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from avsd_megatron.pipelines.plot import plot_summary
    from avsd_megatron.training.checkpointing import find_latest

    args = parse_args(argv)
    names = _selected_runs(args)
    try:  # summary.png (and --plot) need it: fail before the work, not after
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError('the main job draws summary.png with matplotlib: pip install -e ".[plot]"') from err
    if not 0.0 <= args.wrong_step_share <= 1.0:
        raise ValueError(f"--wrong-step-share={args.wrong_step_share} must be in [0, 1]")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if (out / "summary.json").exists():
        raise FileExistsError(f"{out}/summary.json exists: pick a new --out")
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    def begin(name: str) -> float:
        print(f"[main_job] {name} ... (job at {time.perf_counter() - t0:.0f} s)", flush=True)
        return time.perf_counter()

    def phase(name: str, start: float) -> None:
        seconds[name] = round(time.perf_counter() - start, 1)
        print(f"[main_job] {name}: {seconds[name]:.1f} s (job at {time.perf_counter() - t0:.0f} s)", flush=True)

    train_path, changed_references = TINY_TRAIN_PATH, 0
    if args.experiment == "views-disagree":  # the training references only; the warm start stays on clean ones
        rows, changed_references = wrong_intermediate_references(
            read_jsonl(TINY_TRAIN_PATH), share=args.wrong_step_share, seed=args.seed
        )
        train_path = out / "train_views_disagree.jsonl"
        train_path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"[main_job] views-disagree: {changed_references} of {len(rows)} training references show one wrong "
              "intermediate result", flush=True)

    start = begin("init")
    hf_init, hf_warm, megatron_warm = out / "hf_init", out / "hf_warm", out / "megatron_warm"
    make_tiny_hf_checkpoint(hf_init, seed=args.seed)
    phase("init", start)

    start = begin("sft")
    sft_cfg = SFTConfig(steps=args.sft_steps, batch_size=args.sft_batch, lr=args.sft_lr,
                        teacher_share=args.sft_teacher_share, error_share=args.sft_error_share, seed=args.seed)
    torch.set_num_threads(args.sft_threads)
    sft = warm_start(hf_init, hf_warm, read_jsonl(TINY_TRAIN_PATH), sft_cfg)
    torch.set_num_threads(args.threads)
    phase("sft", start)

    probe: dict[str, float] = {}
    if args.probe:
        start = begin("probe")
        probe = view_probe(hf_warm, read_jsonl(TINY_HELDOUT_PATH)[: args.probe], MATH_VIEWS)
        print("[main_job] greedy accuracy (%) of the warm start by prompt: " + json.dumps(probe), flush=True)
        phase("probe", start)

    start = begin("convert")
    convert_hf_to_megatron(hf_warm, megatron_warm, dtype=torch.float32, progress=True)
    phase("convert", start)

    start = begin("train")
    configs = {}
    for name in names:
        run_dir = out / name
        configs[name] = run_config(args, run_dir, hf_warm, megatron_warm, RUNS[name], train_path)
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(configs[name], run_dir / "config.yaml")
    _train({name: out / name / "config.yaml" for name in names}, args.threads, args.steps, args.parallel_runs)
    phase("train", start)
    for name, cfg in configs.items():
        start = begin(f"export_{name}")
        ckpt = find_latest(cfg.checkpoint_dir)
        if ckpt is None:
            raise RuntimeError(f"run {name!r} left no checkpoint under {cfg.checkpoint_dir}")
        convert_megatron_to_hf(ckpt, out / f"hf_{name}", dtype=torch.float32, progress=True)
        phase(f"export_{name}", start)

    eval_cfg = EvalConfig(k=args.k, temperature=args.temperature, top_p=0.95, top_k=-1,
                          max_new_tokens=args.max_new_tokens, thinking=False, seed=args.seed)
    scores: dict[str, dict[str, Any]] = {}
    results: dict[str, dict[str, Any]] = {}
    for name in ["warm", *names]:
        start = begin(f"eval_{name}")
        results[name] = evaluate_hf_dir(out / f"hf_{name}", TINY_HELDOUT_PATH, eval_cfg, limit=args.heldout)
        (out / f"eval_{name}.json").write_text(json.dumps(results[name], indent=1) + "\n", encoding="utf-8")
        scores[name] = results[name]["summary"]
        phase(f"eval_{name}", start)

    k = args.k
    avg = {name: scores[name][f"avg@{k}"] for name in scores}
    per_run = {
        name: {
            "avg": avg[name], "stderr": scores[name][f"avg@{k}_stderr"],
            "delta_vs_warm": avg[name] - avg["warm"], "delta_vs_warm_stderr": _paired_stderr(results["warm"],
                                                                                             results[name]),
            "delta_vs_avsd": avg[name] - avg["avsd"], "delta_vs_avsd_stderr": _paired_stderr(results["avsd"],
                                                                                             results[name]),
            "label": RUNS[name].label,
        }
        for name in names
    }
    stats = {name: _run_stats(out / name / "metrics.jsonl") for name in names}

    def optional(name: str, field: str) -> float | None:
        return per_run[name][field] if name in per_run else None

    summary: dict[str, Any] = {
        "heldout_accuracy_before": avg["warm"],
        "heldout_accuracy_after": avg["avsd"],
        "heldout_accuracy_single_after": optional("single", "avg"),
        "heldout_accuracy_grpo_after": optional("grpo", "avg"),
        "heldout_stderr_before": scores["warm"][f"avg@{k}_stderr"],
        "heldout_stderr_after": scores["avsd"][f"avg@{k}_stderr"],
        "heldout_stderr_single_after": optional("single", "stderr"),
        "heldout_stderr_grpo_after": optional("grpo", "stderr"),
        "heldout_delta": per_run["avsd"]["delta_vs_warm"],
        "heldout_delta_stderr": per_run["avsd"]["delta_vs_warm_stderr"],
        "heldout_delta_single": optional("single", "delta_vs_warm"),
        "heldout_delta_single_stderr": optional("single", "delta_vs_warm_stderr"),
        "heldout_delta_grpo": optional("grpo", "delta_vs_warm"),
        "heldout_delta_grpo_stderr": optional("grpo", "delta_vs_warm_stderr"),
        "runs": per_run,
        "run_stats": {name: {key: {"mean": statistics.fmean(v), "first": v[0], "last": v[-1]}
                             for key, v in series.items() if v} for name, series in stats.items()},
        "experiment": {"name": args.experiment, "wrong_step_share": args.wrong_step_share,
                       "changed_references": changed_references, "train_data": str(train_path)},
        "warm_start_view_probe": probe,
        "metric": f"avg@{k} (%) on the first {args.heldout} bundled held-out problems, T={args.temperature}",
        "steps": args.steps,
        "sft": sft,
        "scores": scores,
        "settings": vars(args),
        "train_config_avsd": to_dict(configs["avsd"]),
        "seconds": seconds,
    }
    if args.plot:
        summary["plot"] = str(_plot(stats, out / "run_stats.png"))
    summary["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    (out / "run_stats.json").write_text(json.dumps(stats) + "\n", encoding="utf-8")
    bar_labels = {"warm": "warm start", **{name: name for name in names}}  # short: the bars sit side by side
    plot_summary(summary, bar_labels, {name: out / name for name in names}, out / "summary.png")
    rows = [("warm start (SFT)", scores["warm"], 0)] + [(RUNS[n].label, scores[n], args.steps) for n in names]
    print(_table(rows, k))
    delta, se = summary["heldout_delta"], summary["heldout_delta_stderr"]
    verdict = _verdict(delta, se)
    print(f"AVSD - warm start: {delta:+.2f} ± {se:.2f} points ({verdict}; paired s.e. over problems, 2 s.e. rule)")
    for name in (n for n in names if n != "avsd"):
        r = per_run[name]
        print(f"{name} - warm start: {r['delta_vs_warm']:+.2f} ± {r['delta_vs_warm_stderr']:.2f}; "
              f"{name} - AVSD: {r['delta_vs_avsd']:+.2f} ± {r['delta_vs_avsd_stderr']:.2f} points")
    print(f"wall time {summary['seconds']['total']:.0f} s; per phase: {json.dumps(seconds)}")
    print(f"summary: {out / 'summary.json'}, {out / 'summary.png'}")
    return summary


if __name__ == "__main__":
    main()
