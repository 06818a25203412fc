"""Pictures of runs: training curves from `metrics.jsonl` (several runs overlaid) and the main job's summary.png.

    python -m avsd_megatron plot RUN_DIR [RUN_DIR ...] [--out FILE]      # default FILE: <first RUN_DIR>/curves.png

Curves, one panel each, x = optimizer step, one colour per run (the run directory's name):
  loss                      `loss`, the optimized objective (for the candidate loss: the JSD, >= 0)
  mean gate g               `mv_gate_mean` (spec 2.2: g = C |δ̄| / (|δ̄| + J); candidate loss: per candidate entry)
  advantage                 `mv_tinker_advantage_mean`, target − student log-prob of the sampled token
  Jensen gap J              `mv_jensen_gap_mean`
  sampled-token log-prob    `mv_tinker_student_logprob_mean` (solid) and each view's `mv_tinker_view_logprob_<view>`
                            (dashed, one marker per view): the teachers' log-prob of the student's token vs its own

The sampled-token and candidate losses (`avsd.loss: sampled | candidate`) log all five (the candidate loss at
y_t renormalised over the candidate set K_t, `vocab_parallel/candidate_loss.py`); the full-vocabulary loss logs no
sampled-token advantage or view log-probs, and GRPO no gate, so a panel whose metric is in none of the runs says so
instead of drawing nothing. A resumed run's repeated steps keep the
later record (`training/metrics_log.py`). The main job's summary.png adds a first panel: held-out Avg@k per model
with standard-error bars (`summary.json`'s scores).

Needs matplotlib (`pip install -e ".[plot]"`); drawn on a `matplotlib.figure.Figure` (no pyplot, no GUI backend).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avsd_megatron.training.metrics_log import METRICS_FILE, read_jsonl_metrics

__all__ = ["CURVES", "load_runs", "main", "plot_runs", "plot_summary"]

VIEW_LOGPROB_PREFIX = "mv_tinker_view_logprob_"
STUDENT_LOGPROB = "mv_tinker_student_logprob_mean"


@dataclass(frozen=True)
class Curve:
    """One panel: its title, y label and the metric it draws (`None`: the per-view log-prob panel)."""

    title: str
    ylabel: str
    metric: str | None


CURVES: tuple[Curve, ...] = (
    Curve("loss", "loss", "loss"),
    Curve("mean gate g", "g", "mv_gate_mean"),
    Curve("advantage (target − student log-prob)", "A", "mv_tinker_advantage_mean"),
    Curve("Jensen gap J", "J", "mv_jensen_gap_mean"),
    Curve("sampled-token log-prob: views vs student", "log p", None),
)
"""The panels of `plot_runs`, in order (module docstring)."""

_VIEW_STYLES = ("--", ":", "-.", (0, (5, 1)), (0, (1, 3)))


def load_runs(run_dirs: Sequence[str | Path]) -> dict[str, list[dict[str, Any]]]:
    """run label -> its metrics records by step (a repeated step keeps the later record).

    Labels are the directory names, or the paths as given where two names coincide.

    Raises:
        FileNotFoundError: a directory has no metrics.jsonl (the message names it).
        ValueError: no run given, or a metrics.jsonl without records.
    """
    if not run_dirs:
        raise ValueError("plot: give at least one run directory")
    names = [Path(d).name for d in run_dirs]
    runs: dict[str, list[dict[str, Any]]] = {}
    for run_dir, name in zip(run_dirs, names, strict=True):
        path = Path(run_dir) / METRICS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a training run directory")
        by_step = {record["step"]: record for record in read_jsonl_metrics(run_dir)}
        if not by_step:
            raise ValueError(f"{path} has no records")
        runs[name if names.count(name) == 1 else str(run_dir)] = [by_step[s] for s in sorted(by_step)]
    return runs


def _figure(panels: int) -> tuple[Any, list[Any]]:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError('plotting needs matplotlib: pip install -e ".[plot]"') from err
    cols = 3
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(5.0 * cols, 3.6 * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols).flat)
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _series(records: list[dict[str, Any]], metric: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[metric]) for r in records if isinstance(r.get(metric), (int, float))]
    return [s for s, _ in points], [float(v) for _, v in points]


def _absent(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"{what}\nis not in these runs' metrics.jsonl\n(the sampled-token loss logs it)",
            ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4")


def draw_curves(runs: Mapping[str, list[dict[str, Any]]], axes: Sequence[Any]) -> None:
    """Draw `CURVES` for every run onto `axes` (one per curve), a colour per run."""
    colours = {name: f"C{i % 10}" for i, name in enumerate(runs)}
    for curve, ax in zip(CURVES, axes, strict=True):
        ax.set_title(curve.title)
        ax.set_xlabel("step")
        ax.set_ylabel(curve.ylabel)
        drawn = False
        for name, records in runs.items():
            if curve.metric is not None:
                steps, values = _series(records, curve.metric)
                if steps:
                    ax.plot(steps, values, color=colours[name], marker=".", label=name)
                    drawn = True
                continue
            steps, values = _series(records, STUDENT_LOGPROB)
            if steps:
                ax.plot(steps, values, color=colours[name], marker=".", label=f"{name}: student")
                drawn = True
            views = sorted({k.removeprefix(VIEW_LOGPROB_PREFIX) for r in records for k in r
                            if k.startswith(VIEW_LOGPROB_PREFIX)})
            for i, view in enumerate(views):
                steps, values = _series(records, VIEW_LOGPROB_PREFIX + view)
                ax.plot(steps, values, color=colours[name], linestyle=_VIEW_STYLES[i % len(_VIEW_STYLES)],
                        label=f"{name}: {view}")
                drawn = True
        if drawn:
            ax.legend(fontsize=7, loc="upper right")  # "best" searches the data: slow and warns on long runs
        else:
            _absent(ax, curve.metric or f"{STUDENT_LOGPROB} / {VIEW_LOGPROB_PREFIX}<view>")


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path) -> Any:
    """Save the `CURVES` of `run_dirs` overlaid as a PNG at `out`; returns the matplotlib Figure."""
    runs = load_runs(run_dirs)
    fig, axes = _figure(len(CURVES))
    draw_curves(runs, axes)
    fig.suptitle("training curves: " + ", ".join(runs))
    fig.savefig(out, dpi=80)
    return fig


def plot_summary(summary: Mapping[str, Any], labels: Mapping[str, str], run_dirs: Mapping[str, str | Path],
                 out: str | Path) -> Any:
    """The main job's summary.png: held-out Avg@k ± s.e. per model (`summary["scores"]`, keyed like `labels`),
    then the `CURVES` of the training runs `run_dirs` (run name -> directory). Returns the Figure."""
    k = summary["settings"]["k"]
    fig, axes = _figure(1 + len(CURVES))
    ax = axes[0]
    names = [name for name in labels if name in summary["scores"]]
    means = [summary["scores"][n][f"avg@{k}"] for n in names]
    errors = [summary["scores"][n][f"avg@{k}_stderr"] for n in names]
    crowded = len(names) > 4  # e.g. the views-disagree experiment's 8 models: slanted names, values on two lines
    bars = ax.bar(range(len(names)), means, yerr=errors, capsize=6, color=[f"C{i}" for i in range(len(names))])
    ax.bar_label(bars, labels=[f"{m:.1f}{chr(10) if crowded else ' '}± {e:.1f}" for m, e in zip(means, errors)],
                 padding=3, fontsize=7 if crowded else 8)
    ax.set_xticks(range(len(names)), [labels[n] for n in names], fontsize=8, rotation=30 if crowded else 0,
                  ha="right" if crowded else "center")
    ax.set_ylabel(f"Avg@{k} (%)")
    ax.set_title(f"held-out Avg@{k} ± s.e. ({summary['settings']['heldout']} problems)")
    ax.set_ylim(0, max([m + e for m, e in zip(means, errors)] + [1.0]) * 1.25)
    draw_curves(load_runs(list(run_dirs.values())), axes[1:])
    fig.suptitle(f"main job: {summary['steps']} AVSD steps per run, "
                 f"{summary['seconds'].get('total', float('nan')):.0f} s")
    fig.savefig(out, dpi=80)
    return fig


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m avsd_megatron plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training run directories (metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: <first RUN_DIR>/curves.png)")
    args = parser.parse_args(argv)
    out = args.out or Path(args.run_dirs[0]) / "curves.png"
    try:
        plot_runs(args.run_dirs, out)
    except (FileNotFoundError, ValueError) as exc:
        parser.exit(2, f"plot: error: {exc}\n")
    print(f"plot: wrote {out}")
    return out
