"""Training checkpoints: Megatron-Core distributed checkpoints of model + optimizer, saved atomically, keep-last-K,
resumed with the trainer's step, data position and RNG.

Layout under the checkpoint root (`TrainConfig.checkpoint_dir`):

    step_00000010/              a complete checkpoint (only complete ones carry this name)
        <dist_checkpointing files>   {"model": GPTModel.sharded_state_dict(), "optimizer": ...}
        rank_state/rank_00000.pt     per global rank: RNG states and the rank's extra tensors (EMA teacher)
        hf_conversion.json, hf_assets/   the HF config + tokenizer (the trainer's `describe`), for megatron-to-hf
        trainer_state.json           step, data cursor, Adam step count, the run config (written last)
    step_00000020.tmp/          a save in progress (or interrupted): never read, removed by the next save
    latest                      text: the name of the newest complete checkpoint (replaced atomically)

Atomic save: rank 0 makes `step_K.tmp`, every rank writes its shards and rank state into it, rank 0 writes
`trainer_state.json`, renames the directory to `step_K` (one `rename`, atomic on POSIX), then replaces `latest` via a
temporary file and `os.replace`. A kill at any point leaves either the previous `latest` or the new one, both
complete; `find_latest` also ignores a `latest` that names a missing or incomplete directory and falls back to the
newest complete `step_*`.

Megatron-Core 0.19 gotchas handled here (measured on CPU/gloo, see tests/training/test_trainer.py):
- the distributed optimizer's default sharding format fails on save: both save and load pass
  `metadata={"distrib_optim_sharding_type": "dp_reshardable"}` (loading needs the same layout: same TP, PP, DP);
- a fresh optimizer cannot build its load-time state dict before it has state: `load` takes a model whose
  optimizer has stepped once with zero gradients (`prime_optimizer`);
- after loading, torch Adam's per-parameter `step` keeps the fresh value (1): `load` sets it to the saved count, so
  the bias correction of the next update matches an uninterrupted run;
- the model state dict comes from the unwrapped `GPTModel` (not DDP / Float16Module);
- `dist_checkpointing.save` starts a helper process with the spawn method: entry scripts need a `__main__` guard.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "CheckpointManager",
    "SHARDING_METADATA",
    "adam_step_count",
    "find_latest",
    "prime_optimizer",
    "set_adam_step_count",
]

SHARDING_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
STATE_FILE = "trainer_state.json"
RANK_STATE_DIR = "rank_state"
LATEST_FILE = "latest"
TMP_SUFFIX = ".tmp"
_PREFIX = "step_"


def step_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def is_complete(path: Path) -> bool:
    """A checkpoint directory whose save finished (trainer_state.json is written last, before the rename)."""
    return path.is_dir() and not path.name.endswith(TMP_SUFFIX) and (path / STATE_FILE).is_file()


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete `step_*` directories under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint: what `latest` names if that is complete, else the newest complete step_*."""
    root = Path(root)
    latest = root / LATEST_FILE
    if latest.is_file():
        named = root / latest.read_text(encoding="utf-8").strip()
        if named.name and is_complete(named):
            return named
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a Megatron (Chained) optimizer."""
    chained = getattr(optimizer, "chained_optimizers", None)
    inner = chained if chained is not None else [optimizer]
    return [o.optimizer for o in inner]


def adam_step_count(optimizer: Any) -> int:
    """Adam's per-parameter `step` (equal for every parameter this rank updates); 0 before the first step."""
    steps = [int(s["step"]) for o in _torch_optimizers(optimizer) for s in o.state.values() if "step" in s]
    return max(steps, default=0)


def set_adam_step_count(optimizer: Any, count: int) -> None:
    """Set every parameter's Adam `step` to `count`, keeping its tensor type and device."""
    for opt in _torch_optimizers(optimizer):
        for state in opt.state.values():
            if "step" in state:
                step = state["step"]
                state["step"] = torch.full_like(step, count) if torch.is_tensor(step) else count


def prime_optimizer(model: Any, optimizer: Any) -> None:
    """One optimizer step with zero gradients, so that torch Adam creates its state (needed to build the load-time
    sharded state dict). Params move only by weight decay; `CheckpointManager.load` overwrites them."""
    model.zero_grad_buffer()  # DDP: the optimizer reads the (zeroed) main_grad buffers
    optimizer.step()


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


class CheckpointManager:
    """Save / find / load training checkpoints under one root (module docstring).

    Args:
        root: checkpoint directory (created by rank 0 on the first save).
        keep_last: keep the newest k complete checkpoints (None = all).
        group: process group over which save/load are collective (None = the default group: every rank).
    """

    def __init__(self, root: str | Path, *, keep_last: int | None, group: Any = None) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"checkpoint.keep_last={keep_last!r} must be >= 1 or None")
        self.root = Path(root)
        self.keep_last = keep_last
        self.group = group

    def resolve(self, resume: str | None) -> Path | None:
        """The checkpoint to resume from: None = none; 'auto' = `find_latest` (None if there is none); a path must be
        a complete checkpoint (or a root with one). Raises FileNotFoundError naming `checkpoint.resume`."""
        if resume is None:
            return None
        if resume == "auto":
            return find_latest(self.root)
        path = Path(resume)
        if is_complete(path):
            return path
        latest = find_latest(path)
        if latest is None:
            raise FileNotFoundError(
                f"checkpoint.resume={resume!r} is neither a complete checkpoint (a step_* directory with "
                f"{STATE_FILE}) nor a directory containing one"
            )
        return latest

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: Any,
        state: Mapping[str, Any],
        rank_state: Mapping[str, Any],
        describe: Callable[[Path], None] | None = None,
    ) -> Path:
        """Collective: write checkpoint `step` atomically; returns its final path.

        Args:
            state: JSON-safe trainer state (rank 0's is written).
            rank_state: this rank's torch-saveable extras (RNG states, teacher tensors).
            describe: called by rank 0 with the temporary directory before trainer_state.json is written, to add
                files (the trainer writes `hf_conversion.json` + `hf_assets/` so `megatron-to-hf` needs no reference).
        """
        from megatron.core import dist_checkpointing

        rank = dist.get_rank()
        final = self.root / step_dir_name(step)
        tmp = final.with_name(final.name + TMP_SUFFIX)
        if rank == 0:
            self._remove_stale_tmp()
            tmp.mkdir(parents=True)  # empty: Megatron's save treats a non-empty directory as a corrupt checkpoint
        dist.barrier(group=self.group)
        model_sd = _unwrap(model).sharded_state_dict()
        optimizer_sd = optimizer.sharded_state_dict(model_sd, metadata=SHARDING_METADATA)
        dist_checkpointing.save({"model": model_sd, "optimizer": optimizer_sd}, str(tmp))
        write_rank_state(tmp, rank, rank_state)
        dist.barrier(group=self.group)
        if rank == 0:
            if describe is not None:
                describe(tmp)
            (tmp / STATE_FILE).write_text(json.dumps(dict(state), indent=1), encoding="utf-8")
            if final.exists():  # the same step saved again (e.g. a re-run): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
            latest_tmp = self.root / (LATEST_FILE + TMP_SUFFIX)
            latest_tmp.write_text(final.name + "\n", encoding="utf-8")
            os.replace(latest_tmp, self.root / LATEST_FILE)
            self._prune()
        dist.barrier(group=self.group)
        return final

    def load(self, path: str | Path, model: torch.nn.Module, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Collective: load model and optimizer from checkpoint `path` into the given (primed) ones.

        The optimizer must have state (`prime_optimizer`). Adam's step count is restored from the trainer state's
        "adam_step". Returns (trainer state, this rank's rank state).
        """
        from megatron.core import dist_checkpointing

        from avsd_megatron.convert.dist_ckpt import quiet_load_notices

        path = Path(path)
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        model_sd = _unwrap(model).sharded_state_dict()
        optimizer_sd = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=SHARDING_METADATA)
        with quiet_load_notices():  # torch's per-load notices about megatron-core's calls (dist_ckpt.py)
            loaded = dist_checkpointing.load({"model": model_sd, "optimizer": optimizer_sd}, str(path))
        _unwrap(model).load_state_dict(loaded["model"])
        with torch.no_grad():  # fp32 main params may be views of the model's params; Megatron copies in place
            optimizer.load_state_dict(loaded["optimizer"])
        set_adam_step_count(optimizer, int(state["adam_step"]))
        rank_file = path / RANK_STATE_DIR / f"rank_{dist.get_rank():05d}.pt"
        if not rank_file.is_file():
            raise FileNotFoundError(
                f"{rank_file} is missing: the checkpoint was saved with a different world size (resume needs the "
                "same TP x PP x DP layout)"
            )
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
        return state, rank_state

    def _remove_stale_tmp(self) -> None:
        if self.root.is_dir():
            for path in self.root.iterdir():
                if path.name.startswith(_PREFIX) and path.name.endswith(TMP_SUFFIX):
                    shutil.rmtree(path)

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        for path in complete_checkpoints(self.root)[: -self.keep_last]:
            shutil.rmtree(path)


def write_rank_state(ckpt_dir: Path, rank: int, rank_state: Mapping[str, Any]) -> None:
    """torch.save this rank's extras into `<ckpt_dir>/rank_state/rank_<r>.pt`."""
    (ckpt_dir / RANK_STATE_DIR).mkdir(exist_ok=True)
    torch.save(dict(rank_state), ckpt_dir / RANK_STATE_DIR / f"rank_{rank:05d}.pt")
