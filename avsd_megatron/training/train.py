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
from typing import Any

from avsd_megatron.training.config import ConfigError, TrainConfig, from_dict, load_config, to_dict

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


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """`cfg` with each 'a.b.c=value' set (value parsed as YAML), re-validated. Raises ConfigError on a bad item."""
    import yaml

    data: dict[str, Any] = to_dict(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-5")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a config section")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"--set {item!r}: unknown key {key!r}")
        node[leaf] = yaml.safe_load(raw)
    return from_dict(data, source="--set")


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


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = apply_overrides(load_config(args.config), args.overrides)
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
