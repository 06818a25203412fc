"""Command line: train AVSD from a YAML config, as one process or under torchrun.

    python -m avsd_megatron tiny checkpoint outputs/tiny_cpu/hf_init            # the tiny config's start weights
    python -m avsd_megatron train --config examples/configs/tiny_cpu.yaml --set max_steps=2 rollout.max_new_tokens=8
    torchrun --nproc-per-node 2 -m avsd_megatron train --config examples/configs/tiny_cpu.yaml --set parallel.tp=2

`--set key=value` overrides a dotted config field; the value is parsed as YAML (`--set avsd.views=[answer_only]`),
then the whole config is validated as if it came from the file; `--help` lists every key with its default
(generated from the config dataclasses). Without torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR) the process
initialises a one-rank group itself, on an in-process store (no port). On a machine without CUDA, Megatron runs on
CPU through the reversible patches of `avsd_megatron.runtime.megatron_cpu` (gloo backend, `model.layer_spec: local`).

`dist_checkpointing.save` starts a helper process with the spawn method, which re-imports `__main__`: this module
keeps everything behind the `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from avsd_megatron.training.config import TrainConfig, apply_overrides, load_config, to_dict

__all__ = ["apply_overrides", "config_keys", "main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m avsd_megatron train",
        description="AVSD (Adaptive-View Self-Distillation) training on Megatron-Core.",
        epilog="config keys for --set (default; field docs in avsd_megatron/training/config.py):\n" + "\n".join(
            f"  {key} = {value!r}" for key, value in config_keys()
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # -- config ---------------------------------------------------------------------------------------------------
    parser.add_argument("--config", required=True, help="YAML run config (see avsd_megatron/training/config.py sections)")
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="override dotted config fields, values parsed as YAML (e.g. --set max_steps=2 parallel.tp=2); "
        "may repeat, later ones win",
    )
    # -- run ------------------------------------------------------------------------------------------------------
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar on rank 0")
    return parser.parse_args(argv)


def config_keys(node: Any = None, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, default) of every TrainConfig field, generated from the dataclass defaults."""
    node = TrainConfig() if node is None else node
    keys = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            keys += config_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append((f"{prefix}{f.name}", to_dict(value)))
    return keys


def _init_distributed() -> None:
    """torchrun (env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or, without RANK, a one-rank group on an
    in-process store (no port: concurrent single-process runs cannot collide)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" in os.environ:
        dist.init_process_group(backend, init_method="env://")
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def finished_checkpoint(cfg: TrainConfig) -> Path | None:
    """With checkpoint.resume='auto': the newest checkpoint if it is exactly at max_steps (nothing left to train),
    else None. A chained Slurm training job after the run finished then exits at once instead of building the
    model, the optimizer and vLLM only to stop. A checkpoint past max_steps is not "finished": the trainer refuses it
    (a lowered max_steps is an error, `Trainer._plan_resume`)."""
    from avsd_megatron.training.checkpointing import find_latest

    if cfg.checkpoint.resume != "auto":
        return None
    latest = find_latest(cfg.checkpoint_dir)
    if latest is None or int(latest.name.rpartition("_")[2]) != cfg.max_steps:
        return None
    return latest


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = apply_overrides(load_config(args.config), args.overrides)
    done = finished_checkpoint(cfg)
    if done is not None:
        print(f"train: {done} is at max_steps={cfg.max_steps}: nothing to train (checkpoint.resume=auto)")
        return
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        from avsd_megatron.runtime.megatron_cpu import install

        install()  # for the rest of this process
    _init_distributed()
    from avsd_megatron.training.trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(cfg, progress=not args.no_progress)
        trainer.train()
    finally:
        from megatron.core import parallel_state

        if trainer is not None:
            trainer.close()  # the engine first: vLLM's shutdown needs the process group (and may destroy it)
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
