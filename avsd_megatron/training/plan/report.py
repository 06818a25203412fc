"""The planner's entry point for callers (CLI, recipes, trainer): `plan_run(cfg, ...)` and `format_table(est)`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from avsd_megatron.training.config import ConfigError, TrainConfig
from avsd_megatron.training.plan.estimate import (
    PHASES,
    TIME_PHASES,
    Estimate,
    estimate,
    scaling_rows,
)
from avsd_megatron.training.plan.hardware import GPUS, Assumptions, gpu_for_device
from avsd_megatron.training.plan.shapes import model_dims

__all__ = ["format_table", "parse_time_limit", "plan_run", "scaling_markdown", "write_plan"]

DEFAULT_GPU = "h100-80gb"
PLAN_TEXT, PLAN_JSON = "plan.txt", "plan.json"


def parse_time_limit(text: str | None) -> float | None:
    """Slurm's [D-]HH:MM:SS (or MM:SS) as seconds; None stays None. ValueError names the value."""
    if not text:
        return None
    days, _, clock = text.rpartition("-")
    try:
        parts = [int(p) for p in clock.split(":")]
        if not 1 <= len(parts) <= 3:
            raise ValueError
        while len(parts) < 3:
            parts.insert(0, 0)
        return ((int(days) if days else 0) * 24 + parts[0]) * 3600 + parts[1] * 60 + parts[2]
    except ValueError:
        raise ValueError(f"time limit {text!r} is not [D-]HH:MM:SS") from None


def plan_run(cfg: TrainConfig, *, nodes: int = 1, gpus_per_node: int = 8, gpu: str = "h100-80gb",
             model: str | None = None, assumptions: Assumptions | None = None, time_limit: str | None = None,
             scaling: bool = True) -> Estimate:
    """Plan `cfg` (shapes from `model` if given, else `model.hf_path`'s config.json or the Qwen3 size it names).

    Raises:
        ConfigError: unknown GPU, shapes not found, or a layout that does not divide (names the field).
    """
    if gpu not in GPUS:
        raise ConfigError(f"gpu={gpu!r} is not one of {sorted(GPUS)}")
    try:
        source = model_dims(model if model else cfg.model.hf_path)
    except ValueError as err:
        raise ConfigError(f"model.hf_path: {err}") from None
    spec = GPUS[gpu]
    est = estimate(cfg, source, spec, nodes=nodes, gpus_per_node=gpus_per_node, assumptions=assumptions,
                   time_limit_s=parse_time_limit(time_limit))
    if scaling:
        est = type(est)(**{**est.__dict__, "scaling": scaling_rows(cfg, source, spec, gpus_per_node=gpus_per_node,
                                                                   assumptions=assumptions)})
    return est


def _num(value: float) -> str:
    """GiB / seconds: two decimals, or two significant digits below 0.1 (tiny models)."""
    return f"{value:.2f}" if value >= 0.1 or value == 0 else f"{value:.2g}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def scaling_markdown(rows: list[dict]) -> str:
    """The scaling rows (`estimate.scaling_rows`) as a markdown table (the CLI's and the README's)."""
    lines = [_row(["mode", "nodes", "DP", "prompts/step", "micro-batch", "peak GiB", "step (s)", "prompts/h",
                   "efficiency", "limited by"]), _row(["---"] * 10)]
    for row in rows:
        if not row["feasible"]:
            lines.append(_row([row["mode"], str(row["nodes"]), str(row.get("dp", "")), str(row["prompts_per_step"]),
                               "-", "-", "-", "-", "-", row["reason"]]))
            continue
        lines.append(_row([row["mode"], str(row["nodes"]), str(row["dp"]), str(row["prompts_per_step"]),
                           str(row["micro_batch_size"]),
                           f"{row['peak_gib']:.1f}" + ("" if row["fits"] else " (no fit)"),
                           f"{row['step_s']:.1f}", f"{row['prompts_per_hour']:.0f}", f"{row['efficiency']:.0%}",
                           row["limiting_phase"]]))
    return "\n".join(lines)


def format_table(est: Estimate) -> str:
    """The human-readable plan: layout, GPU memory per phase and component, host, disk, time, scaling."""
    p = est.params
    lines = [
        f"plan: {est.source.name} ({est.source.origin}; {_count(p['parameters'])} parameters, "
        f"{_count(p['parameters_per_rank'])} per rank) on {est.nodes} x {est.gpus_per_node} {est.gpu.name}: "
        f"TP {est.tp} PP {est.pp} DP {est.dp}, micro-batch {est.micro_batch_size} x {est.num_microbatches} "
        f"per step, {est.prompts_per_step} prompts/step",
        f"verdict: {'fits' if est.fits else 'DOES NOT FIT'}" + "".join(f"\n  - {f}" for f in est.failures()),
        "",
        f"GPU memory per rank (GiB, worst pipeline stage; capacity {est.gpu.memory_gib}):",
        _row(["component", *PHASES]),
        _row(["---"] * (len(PHASES) + 1)),
    ]
    names = list(dict.fromkeys(k for ph in est.phases.values() for k in ph.components))
    for name in names:
        values = [est.phases[ph].components.get(name) for ph in PHASES]
        if all(not v for v in values):
            continue
        lines.append(_row([name, *("" if v is None else _num(v) for v in values)]))
    lines.append(_row(["**total**", *(f"{est.phases[ph].total_gib:.1f}" for ph in PHASES)]))
    lines.append(_row(["resident / transient", *(f"{est.phases[ph].resident_gib:.1f} / "
                                                 f"{est.phases[ph].transient_gib:.1f}" for ph in PHASES)]))
    lines.append(_row(["verdict (margin)", *(("fits" if est.phases[ph].fits else "NO") +
                                             f" ({est.phases[ph].margin_gib:+.1f})" for ph in PHASES)]))
    r = est.rollout_info
    if est.vllm:
        lines.append(
            f"vLLM KV cache per rank: {r['kv_cache_gib']:.1f} GiB = {r['kv_cache_tokens']:,.0f} tokens; decode batch "
        f"{r['decode_batch']:.0f} x {r['decode_waves']:.0f} waves, {r['decode_step_ms']:.1f} ms per decode step "
            f"({'HBM' if r['decode_hbm_bound'] else 'compute'}-bound)")
    lines += [
        "",
        f"host memory per node: {est.host['total_gib']:.0f} GiB of {est.host['capacity_gib']:.0f} "
        f"(processes {est.host['process_gib']:.0f}, pinned teacher {est.host['pinned_teacher_gib']:.1f}, "
        f"checkpoint staging "
        f"{est.host['checkpoint_staging_gib']:.1f})",
        f"checkpoint disk: {est.checkpoint['per_checkpoint_gib']:.1f} GiB each, {est.checkpoint['kept']} kept = "
        f"{est.checkpoint['keep_last_gib']:.1f} GiB ({est.checkpoint['saves']} saves)",
        "",
        "time per step (s, modelled):",
        _row([*TIME_PHASES, "total"]),
        _row(["---"] * (len(TIME_PHASES) + 1)),
        _row([_num(est.step_seconds[ph]) for ph in (*TIME_PHASES, "total")]),
    ]
    run = est.run
    limit = ""
    if run["time_limit_s"] is not None:
        limit = (f"; time limit {run['time_limit_s'] / 3600:.2f} h: "
                 f"{'fits' if run['fits_time_limit'] else 'DOES NOT FIT'}")
    lines.append(f"run: {run['max_steps']} steps = {run['hours']:.1f} h (with start-up){limit}")
    if est.scaling:
        lines += ["", f"scaling at TP {est.tp} PP {est.pp} ({est.gpus_per_node} GPUs per node; strong: prompts/step "
                      "fixed, weak: prompts/step x nodes):", scaling_markdown(est.scaling)]
    lines += ["", "Modelled, not measured: hardware figures and efficiencies are inputs (plan --assume NAME=VALUE; "
                  "avsd_megatron/training/plan/hardware.py)."]
    return "\n".join(lines)


def write_plan(cfg: TrainConfig, out_dir: str | Path, *, world_size: int) -> str:
    """The trainer's start-up plan (rank 0): this run's layout on this machine's GPU type, written as plan.txt and
    plan.json into `out_dir` (next to config.yaml); returns the text to print.

    GPUs per node: torchrun's LOCAL_WORLD_SIZE (else the world); the GPU type: the CUDA device when `GPUS` knows it,
    else h100-80gb, said in the first line. Planning is informational here (the run is already placed): an error
    is written and returned as the plan's text instead of stopping the run.
    """
    import torch

    gpu, where = DEFAULT_GPU, "no CUDA device: planned as on h100-80gb"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        known = gpu_for_device(props.name, props.total_memory / 2**30)
        gpu, where = (known, f"device {props.name}") if known else (DEFAULT_GPU, f"unknown device {props.name}: "
                                                                    "planned as on h100-80gb")
    gpus_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    out = Path(out_dir)
    try:
        est = plan_run(cfg, nodes=max(1, world_size // gpus_per_node), gpus_per_node=gpus_per_node, gpu=gpu)
    except (ConfigError, ValueError) as err:
        text = f"plan: not available for this run ({where}): {err}"
        (out / PLAN_TEXT).write_text(text + "\n", encoding="utf-8")
        return text
    text = f"[{where}]\n{format_table(est)}"
    (out / PLAN_TEXT).write_text(text + "\n", encoding="utf-8")
    (out / PLAN_JSON).write_text(json.dumps(est.to_json(), indent=1) + "\n", encoding="utf-8")
    return text
