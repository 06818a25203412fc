"""What a run writes besides checkpoints: per-step metrics (JSONL), sampled generations, a progress bar, phase timers.

    timer = PhaseTimer()
    with timer("rollout"):
        ...
    log = MetricsLog.for_rank(rank, output_dir, jsonl=True, tensorboard=False, total_steps=500, first_step=0)
    log.step(step, {"loss": 0.3, **timer.pop()})       # one JSON object per line in <output_dir>/metrics.jsonl
                                                       # (and scalars under <output_dir>/tensorboard if asked)
    log.generations(step, [{"prompt": ..., "completion": ...}])   # <output_dir>/generations/step_<k>.jsonl
    log.close()

Only global rank 0 writes (`MetricsLog.for_rank` gives the other ranks a `NullLog` with the same methods, chosen once,
so the training loop has no rank checks). Values are written as given; non-finite floats are written as JSON
`NaN`/`Infinity` (Python's json default) so that a diverging run is visible rather than dropped.

A resumed run appends to the same metrics.jsonl: steps that were logged after the checkpoint it resumes from appear
twice, and the later record is the one that belongs to the continued run.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "NullLog", "PhaseTimer", "read_jsonl_metrics"]

METRICS_FILE = "metrics.jsonl"
GENERATIONS_DIR = "generations"
TENSORBOARD_DIR = "tensorboard"


class PhaseTimer:
    """Wall-clock seconds per named phase, accumulated until `pop()`.

    Args:
        synchronize: called before each clock read (e.g. `torch.cuda.synchronize` on GPU, so that asynchronous
            kernels are charged to the phase that launched them); None = nothing.
    """

    def __init__(self, synchronize: Callable[[], None] | None = None) -> None:
        self._sync = synchronize or (lambda: None)
        self._totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self._totals[name] = self._totals.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """{"time/<phase>": seconds} since the last pop, plus "time/total"; resets the totals."""
        out = {f"time/{name}": seconds for name, seconds in self._totals.items()}
        out["time/total"] = sum(self._totals.values())
        self._totals = {}
        return out


class NullLog:
    """The log of ranks that do not write: every method does nothing."""

    def step(self, step: int, metrics: Mapping[str, Any]) -> None:
        pass

    def generations(self, step: int, records: Sequence[Mapping[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsLog(NullLog):
    """Rank 0's writer: metrics.jsonl (append), generations/step_<k>.jsonl, a tqdm bar.

    Args:
        output_dir: the run directory (created if missing).
        jsonl: write metrics.jsonl (logging.jsonl); False keeps only the progress bar.
        tensorboard: also write every numeric metric as a TensorBoard scalar under <output_dir>/tensorboard
            (logging.tensorboard; needs the `tensorboard` package, part of the `train` extra).
        total_steps: the bar's total (max_steps).
        first_step: steps already done (resumed runs start the bar there).
        progress: show the tqdm bar.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        jsonl: bool,
        total_steps: int,
        first_step: int = 0,
        progress: bool = True,
        tensorboard: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = (self.output_dir / METRICS_FILE).open("a", encoding="utf-8") if jsonl else None
        self._tensorboard = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # torch raises ImportError when the tensorboard package is missing
                raise ImportError(
                    "logging.tensorboard=true needs the tensorboard package: pip install -e '.[train]' "
                    "(or set logging.tensorboard=false)"
                ) from err
            self._tensorboard = SummaryWriter(log_dir=str(self.output_dir / TENSORBOARD_DIR))
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=first_step, desc="avsd", dynamic_ncols=True)

    @staticmethod
    def for_rank(rank: int, output_dir: str | Path, **kwargs: Any) -> NullLog:
        """A `MetricsLog` on rank 0, a `NullLog` elsewhere."""
        return MetricsLog(output_dir, **kwargs) if rank == 0 else NullLog()

    def step(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append {"step": step, **metrics} as one line (flushed) and advance the bar to `step`."""
        if self._metrics is not None:
            self._metrics.write(json.dumps({"step": step, **metrics}) + "\n")
            self._metrics.flush()
        if self._tensorboard is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(name, value, global_step=step)
            self._tensorboard.flush()
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            shown = {k: metrics[k] for k in ("loss", "grad_norm", "lr") if isinstance(metrics.get(k), float)}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def generations(self, step: int, records: Sequence[Mapping[str, Any]]) -> None:
        """Write `records` (prompt, completion, ...) to generations/step_<step>.jsonl, replacing an older file."""
        out_dir = self.output_dir / GENERATIONS_DIR
        out_dir.mkdir(exist_ok=True)
        tmp = out_dir / f"step_{step}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        tmp.replace(out_dir / f"step_{step}.jsonl")

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def read_jsonl_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The metrics.jsonl records of a run, in order (for tests and analysis)."""
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
