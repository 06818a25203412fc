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

Verified resume: `trainer_state.json` carries a manifest (`files`: relative path -> size of every other file of the
checkpoint) and the world size. Before loading, `verify_checkpoint` checks every manifest file and every file that
torch.distributed.checkpoint's `.metadata` lists (present, at least as long as the last byte range it stores there),
and the rank-state file of every rank. `CheckpointManager.resolve('auto')` walks the complete checkpoints newest
first and returns the first valid one with what was wrong with each newer one (the trainer prints those as
warnings); when none is valid the error names the bad file of each. A checkpoint that is disk-complete but saved
with another world size is refused with both sizes named.

One run per checkpoint root: `check_fresh_run` refuses to start a fresh run (nothing resumed) into a root that holds
another run's checkpoints (keep-last would prune both runs together and `latest` would mix them); the error names
the root and the ways out (resume, another output_dir / checkpoint.dir, checkpoint.overwrite=true, which deletes
them first).

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
    "CheckpointError",
    "CheckpointManager",
    "SHARDING_METADATA",
    "adam_step_count",
    "check_fresh_run",
    "find_latest",
    "prime_optimizer",
    "read_trainer_state",
    "remove_checkpoints",
    "set_adam_step_count",
    "verify_checkpoint",
]


class CheckpointError(ValueError):
    """A checkpoint (or checkpoint root) that cannot be resumed from or written into; the message names the file."""


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


def rank_state_file(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / RANK_STATE_DIR / f"rank_{rank:05d}.pt"


def file_manifest(ckpt_dir: Path) -> dict[str, int]:
    """relative path -> size in bytes of every file under `ckpt_dir` except trainer_state.json."""
    return {
        str(path.relative_to(ckpt_dir)): path.stat().st_size
        for path in sorted(ckpt_dir.rglob("*"))
        if path.is_file() and path.name != STATE_FILE
    }


def _dcp_problems(ckpt_dir: Path) -> dict[Path, str]:
    """file -> what is wrong with it, among the files torch.distributed.checkpoint's `.metadata` lists."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata_file = ckpt_dir / ".metadata"
    if not metadata_file.is_file():
        return {metadata_file: f"{metadata_file} is missing"}
    try:
        # torch/distributed/checkpoint/filesystem.py FileSystemReader.read_metadata: a pickled Metadata whose
        # storage_data maps each stored item to _StorageInfo(relative_path, offset, length)
        metadata = FileSystemReader(str(ckpt_dir)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - a truncated or garbled pickle raises anything (EOFError, Unpickling...)
        return {metadata_file: f"{metadata_file} is unreadable ({type(exc).__name__}: {exc})"}
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    problems = {}
    for name, end in sorted(needed.items()):
        path = ckpt_dir / name
        if not path.is_file():
            problems[path] = f"{path} is missing (listed in {metadata_file})"
        elif path.stat().st_size < end:
            problems[path] = f"{path} is truncated: {path.stat().st_size} bytes, .metadata stores data up to byte {end}"
    return problems


def verify_checkpoint(ckpt_dir: str | Path, world_size: int | None = None) -> list[str]:
    """Problems that would make resuming from `ckpt_dir` fail (empty = it looks loadable), each naming its file:
    trainer_state.json unreadable; a manifest file missing or of another size; a file that the dist checkpoint's
    `.metadata` lists missing or shorter than its data; a rank-state file missing; another world size."""
    ckpt_dir = Path(ckpt_dir)
    state_file = ckpt_dir / STATE_FILE
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("no 'step' field")
    except (OSError, ValueError) as exc:
        return [f"{state_file} is unreadable ({exc})"]
    saved_world = state.get("world_size")
    if world_size is not None and saved_world is not None and int(saved_world) != world_size:
        return [f"{ckpt_dir} was saved with world size {saved_world}, this run has {world_size} (resume needs the "
                "same TP x PP x DP layout)"]
    problems: dict[Path, str] = {}  # one problem per file, the first found
    for name, size in sorted(state.get("files", {}).items()):
        path = ckpt_dir / name
        if not path.is_file():
            problems[path] = f"{path} is missing (listed in {state_file})"
        elif path.stat().st_size != size:
            problems[path] = f"{path} has {path.stat().st_size} bytes, {state_file} recorded {size}"
    problems = _dcp_problems(ckpt_dir) | problems
    saved_ranks = int(saved_world) if saved_world is not None else world_size
    for rank in range(saved_ranks or 0):
        path = rank_state_file(ckpt_dir, rank)
        if not path.is_file():
            problems.setdefault(path, f"{path} is missing")
    return [problems[path] for path in sorted(problems)]


def read_trainer_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """The checkpoint's trainer_state.json (step, data cursor, Adam step, the run config, world size, manifest)."""
    return json.loads((Path(ckpt_dir) / STATE_FILE).read_text(encoding="utf-8"))


def check_fresh_run(root: str | Path, *, overwrite: bool, resumed_from: Path | None = None) -> list[Path]:
    """For a run that resumes nothing (or `resumed_from`, a checkpoint of another root): the existing checkpoints
    under `root` it will delete (overwrite=True), else []. Raises CheckpointError naming `root` and the ways out when
    it holds another run's checkpoints."""
    root = Path(root)
    if not root.is_dir():
        return []
    existing = sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX) or p.name == LATEST_FILE)
    complete = complete_checkpoints(root)  # an interrupted first save (step_*.tmp only) is no run to protect
    if not complete or overwrite:
        return existing if complete else []
    names = ", ".join(p.name for p in complete[:3]) + (", ..." if len(complete) > 3 else "")
    what = ("resumes nothing (checkpoint.resume=null, or 'auto' found none)" if resumed_from is None else
            f"resumes {resumed_from}, which is not one of them")
    raise CheckpointError(
        f"checkpoint directory {root} already holds another run's checkpoints ({names}) and this run {what}: "
        "continue that run with checkpoint.resume=auto, start this one in a new output_dir (or checkpoint.dir), or "
        "set checkpoint.overwrite=true to delete them first"
    )


def remove_checkpoints(paths: list[Path]) -> None:
    """Delete checkpoint directories and the `latest` file (check_fresh_run's list)."""
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


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

    def resolve(self, resume: str | None, world_size: int | None = None) -> tuple[Path | None, list[str]]:
        """The checkpoint to resume from, and what was wrong with each newer one that was passed over.

        None = none; 'auto' = the newest complete checkpoint under the root that `verify_checkpoint` passes (None if
        the root has none); a path = that checkpoint (it must verify), or a root: its newest valid one.

        Raises:
            FileNotFoundError: `checkpoint.resume` names neither a complete checkpoint nor a root holding one.
            CheckpointError: no candidate verifies; the message names each one's bad file.
        """
        if resume is None:
            return None, []
        if resume != "auto":
            path = Path(resume)
            if is_complete(path):
                problems = verify_checkpoint(path, world_size)
                if problems:
                    raise CheckpointError(f"checkpoint.resume={resume!r} cannot be resumed: " + "; ".join(problems))
                return path, []
            if find_latest(path) is None:
                raise FileNotFoundError(
                    f"checkpoint.resume={resume!r} is neither a complete checkpoint (a step_* directory with "
                    f"{STATE_FILE}) nor a directory containing one"
                )
            return self._newest_valid(path, world_size)
        if find_latest(self.root) is None:
            return None, []
        return self._newest_valid(self.root, world_size)

    @staticmethod
    def _newest_valid(root: Path, world_size: int | None) -> tuple[Path, list[str]]:
        candidates = complete_checkpoints(root)[::-1]
        latest = find_latest(root)  # `latest` first when it names a complete checkpoint (it is the newest save)
        if latest in candidates:
            candidates.remove(latest)
            candidates.insert(0, latest)
        skipped = []
        for path in candidates:
            problems = verify_checkpoint(path, world_size)
            if not problems:
                return path, skipped
            skipped.append(f"skipped checkpoint {path}: " + "; ".join(problems))
        raise CheckpointError(f"no valid checkpoint under {root} to resume from: " + " | ".join(skipped))

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
            state = {**state, "world_size": dist.get_world_size(), "files": file_manifest(tmp)}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
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
        rank_file = rank_state_file(path, dist.get_rank())
        if not rank_file.is_file():  # resolve() verified it; a checkpoint of an older format has no world size
            raise CheckpointError(f"{rank_file} is missing (saved with world size "
                                  f"{state.get('world_size', 'unknown')}, this run has {dist.get_world_size()})")
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
    torch.save(dict(rank_state), rank_state_file(ckpt_dir, rank))
