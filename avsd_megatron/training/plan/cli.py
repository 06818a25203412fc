"""`python -m avsd_megatron plan --config FILE [--nodes N] [--gpus-per-node 8] [--gpu h100-80gb] [--set k=v ...]
[--model Qwen3-8B] [--assume NAME=VALUE ...] [--time-limit HH:MM:SS] [--json]`: the plan of a run, before submitting.

`--set` is the trainer's (`training.config.apply_overrides`). Exit status 0 when every phase fits, 1 when one does not
(the table says which, with the numbers), 2 on a bad argument or config.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from avsd_megatron.training.config import ConfigError, apply_overrides, load_config
from avsd_megatron.training.plan.hardware import GPUS, parse_assumptions
from avsd_megatron.training.plan.report import format_table, plan_run
from avsd_megatron.training.plan.shapes import QWEN3_SIZES, TINY

__all__ = ["main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m avsd_megatron plan",
        description="Memory, time and disk of an AVSD run per phase, and its scaling over nodes (modelled).",
        epilog="The model and its assumptions: avsd_megatron/training/plan/ (module docstrings) and README 'Plan'.",
    )
    parser.add_argument("--config", required=True, help="the training YAML")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="the trainer's config overrides (e.g. --set parallel.tp=1)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS), help="GPU type (default h100-80gb)")
    parser.add_argument("--model", default=None, choices=[*QWEN3_SIZES, TINY],
                        help="plan with these shapes instead of model.hf_path's config.json")
    parser.add_argument("--assume", nargs="+", action="extend", default=[], metavar="NAME=VALUE",
                        help="change a modelled assumption (hardware.Assumptions), e.g. mfu_update=0.3")
    parser.add_argument("--time-limit", default=None, help="Slurm time limit [D-]HH:MM:SS to check the run against")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = apply_overrides(load_config(args.config), args.overrides)
        est = plan_run(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu=args.gpu, model=args.model,
                       assumptions=parse_assumptions(args.assume), time_limit=args.time_limit)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(est.to_json(), indent=1) if args.json else format_table(est))
    if not est.fits:
        raise SystemExit(1)
    return 0


if __name__ == "__main__":
    main()
