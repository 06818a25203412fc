"""`python -m avsd_megatron COMMAND [ARGS]`: the project's command lines, one word each.

    train       AVSD training from a YAML config (`training.train`; one process or under torchrun)
    plan        memory / time / disk per phase and scaling of a run, before submitting (`training.plan`)
    evaluate    math Avg@k / code pass@k of an HF checkpoint (`pipelines.evaluate`)
    main-job    the CPU pipeline on the bundled tiny model: SFT -> AVSD -> held-out table (`pipelines.main_job`)
    plot        training curves of run directories' metrics.jsonl, overlaid, as a PNG (`pipelines.plot`)
    tiny        bundled tiny assets: `tiny checkpoint DIR` writes a random-init tiny Qwen3 (`data.tiny`)
    tiny-code   rebuild the bundled tiny code set (`data.tiny_code`)

`python -m avsd_megatron COMMAND --help` shows a command's flags. The checkpoint converter is
`tools/convert_checkpoint.py`; the NeMo-Run recipes are `examples/avsd_*.py` and `nemorun avsd ...`.

User errors (a bad config value, a bad data row, a missing or unreadable file, a checkpoint that cannot be
resumed: `ValueError` and its subclasses `ConfigError`, `BadRowError`, `CheckpointError`, and `OSError`s such as
`FileNotFoundError`) print as one `error: ...` line on stderr and exit 2, before the expensive part where the
command can tell; under torchrun only global rank 0 prints it (every rank exits 2). Anything else is a bug and keeps
its traceback; `AVSD_TRACEBACK=1` shows the traceback of a user error too.

`dist_checkpointing.save` starts a helper process with the spawn method, which re-imports `__main__`: everything
here stays behind the `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

COMMANDS = {
    "train": ("avsd_megatron.training.train", "AVSD training from a YAML config (one process or under torchrun)"),
    "plan": ("avsd_megatron.training.plan.cli", "memory, time and disk of a run per phase, and its scaling"),
    "evaluate": ("avsd_megatron.pipelines.evaluate", "math Avg@k / code pass@k of an HF checkpoint"),
    "main-job": ("avsd_megatron.pipelines.main_job", "the CPU pipeline on the bundled tiny model"),
    "plot": ("avsd_megatron.pipelines.plot", "training curves of runs' metrics.jsonl, overlaid, as a PNG"),
    "tiny": ("avsd_megatron.data.tiny", "bundled tiny assets; `tiny checkpoint DIR` writes the tiny Qwen3"),
    "tiny-code": ("avsd_megatron.data.tiny_code", "rebuild the bundled tiny code set"),
}


def usage() -> str:
    lines = ["usage: python -m avsd_megatron COMMAND [ARGS ...]", "", "commands:"]
    lines += [f"  {name:<10}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "python -m avsd_megatron COMMAND --help shows a command's flags."]
    return "\n".join(lines)


USER_ERRORS = (ValueError, OSError)
"""What a command line reports as `error: ...` + exit 2 (module docstring); the project's own user errors
(ConfigError, BadRowError, CheckpointError) are ValueErrors."""
EXIT_USER_ERROR = 2


def run_command(command: Callable[[list[str]], Any], argv: Sequence[str]) -> int:
    """Run a command's `main(argv)`; a user error becomes one `error: ...` line (rank 0 only) and exit 2."""
    try:
        command(list(argv))
    except USER_ERRORS as exc:
        if os.environ.get("AVSD_TRACEBACK", "") not in ("", "0"):
            raise
        if os.environ.get("RANK", "0") == "0":
            message = " ".join(str(exc).split()) or type(exc).__name__
            print(f"error: {message}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    if args[0] not in COMMANDS:
        print(f"error: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[args[0]][0])
    return run_command(module.main, args[1:])


if __name__ == "__main__":
    sys.exit(main())
