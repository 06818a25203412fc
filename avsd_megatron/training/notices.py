"""One-line messages from the trainer to the person running it (rank 0 only, stderr, flushed).

    notice("resumed from step 20 (outputs/run/checkpoints/step_00000020)")
    notice("skipped checkpoint ...: ... is truncated", warning=True)      # 'avsd: warning: ...'

The metrics go to metrics.jsonl / TensorBoard (`metrics_log`); these are the events a person must see once: what
was resumed, what was skipped or reconverted and why, a changed LR schedule. Under torchrun every rank would print
the same line, so only global rank 0 (or a process without torch.distributed) prints.
"""

from __future__ import annotations

import sys

import torch.distributed as dist

__all__ = ["notice"]


def notice(message: str, *, warning: bool = False) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    print(f"avsd: {'warning: ' if warning else ''}{message}", file=sys.stderr, flush=True)
