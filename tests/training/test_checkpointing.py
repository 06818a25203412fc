"""Tests for resume verification and the one-run-per-root rule of `training.checkpointing`, in one process.

Run: .venv/bin/python -m pytest -q tests/training/test_checkpointing.py      (seconds)

A trainer-format checkpoint is built from a real `torch_dist` checkpoint (the converter's output for the tiny Qwen3:
real `.metadata` and `.distcp` files) plus what the trainer adds (rank_state/, trainer_state.json with the file
manifest and world size, written by the same helpers `CheckpointManager.save` uses). Each corruption the issue
reports (a missing `.distcp`, a truncated one, a missing rank file, another world size) must be named by file, a
newer corrupt checkpoint must be passed over for the newest valid one with a message naming the bad file, and none
valid must be an error naming each. The whole trainer path (CLI, warnings, "resumed from step N") is in
test_trainer.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from avsd_megatron.training.checkpointing import (
    LATEST_FILE,
    STATE_FILE,
    CheckpointError,
    CheckpointManager,
    check_fresh_run,
    file_manifest,
    step_dir_name,
    verify_checkpoint,
    write_rank_state,
)


@pytest.fixture(scope="module")
def dist_ckpt(tmp_path_factory) -> Path:
    from avsd_megatron.convert import convert_hf_to_megatron
    from avsd_megatron.data.tiny import make_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("dist")
    hf = make_tiny_hf_checkpoint(root / "hf")
    return convert_hf_to_megatron(hf, root / "mcore", dtype=torch.float32)


def _trainer_checkpoint(dist_ckpt: Path, root: Path, step: int, world_size: int = 2) -> Path:
    """`root/step_K` as CheckpointManager.save leaves it (the model/optimizer shards are the converter's)."""
    path = root / step_dir_name(step)
    shutil.copytree(dist_ckpt, path)
    for rank in range(world_size):
        write_rank_state(path, rank, {"rng": None, "teacher": None})
    state = {"step": step, "config": {"max_steps": 10}, "world_size": world_size, "files": file_manifest(path)}
    (path / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
    (root / LATEST_FILE).write_text(path.name + "\n", encoding="utf-8")
    return path


def _largest_distcp(path: Path) -> Path:
    return max(path.glob("*.distcp"), key=lambda p: p.stat().st_size)


def test_valid_checkpoint_has_no_problems(dist_ckpt, tmp_path):
    assert verify_checkpoint(_trainer_checkpoint(dist_ckpt, tmp_path, 1), world_size=2) == []


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "dcp-metadata-only"])
def test_missing_and_truncated_distcp_are_named(dist_ckpt, tmp_path, manifest):
    """With the manifest, and for a checkpoint without one (only `.metadata`'s byte ranges to go by)."""
    path = _trainer_checkpoint(dist_ckpt, tmp_path, 1)
    if not manifest:
        state = json.loads((path / STATE_FILE).read_text())
        del state["files"], state["world_size"]
        (path / STATE_FILE).write_text(json.dumps(state))
    missing, truncated = sorted(path.glob("*.distcp"))[0], _largest_distcp(path)
    missing.unlink()
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    problems = verify_checkpoint(path, world_size=2)
    assert any(str(missing) in p and "missing" in p for p in problems), problems
    assert any(str(truncated) in p and ("truncated" in p or "recorded" in p) for p in problems), problems


def test_missing_rank_file_and_other_world_size_are_named(dist_ckpt, tmp_path):
    path = _trainer_checkpoint(dist_ckpt, tmp_path, 1)
    assert any("was saved with world size 2, this run has 4" in p for p in verify_checkpoint(path, world_size=4))
    rank_file = path / "rank_state" / "rank_00001.pt"
    rank_file.unlink()
    problems = verify_checkpoint(path, world_size=2)
    assert problems and all("different world size" not in p for p in problems)
    assert any(str(rank_file) in p for p in problems), problems


def test_unreadable_metadata_is_named(dist_ckpt, tmp_path):
    path = _trainer_checkpoint(dist_ckpt, tmp_path, 1)
    (path / ".metadata").write_bytes(b"\x80\x04garbage")
    assert any(".metadata" in p for p in verify_checkpoint(path, world_size=2))


def test_auto_resume_falls_back_to_newest_valid_and_names_the_bad_file(dist_ckpt, tmp_path):
    _trainer_checkpoint(dist_ckpt, tmp_path, 10)
    newest = _trainer_checkpoint(dist_ckpt, tmp_path, 20)  # `latest` names it
    bad = _largest_distcp(newest)
    with open(bad, "r+b") as f:
        f.truncate(10)
    manager = CheckpointManager(tmp_path, keep_last=None)
    path, skipped = manager.resolve("auto", world_size=2)
    assert path == tmp_path / step_dir_name(10)
    assert len(skipped) == 1 and str(newest) in skipped[0] and str(bad) in skipped[0]
    # the root given as checkpoint.resume behaves the same; the corrupt step itself is refused, naming the file
    assert manager.resolve(str(tmp_path), world_size=2)[0] == path
    with pytest.raises(CheckpointError, match=str(bad)):
        manager.resolve(str(newest), world_size=2)


def test_no_valid_checkpoint_is_an_error_naming_each(dist_ckpt, tmp_path):
    first, second = _trainer_checkpoint(dist_ckpt, tmp_path, 1), _trainer_checkpoint(dist_ckpt, tmp_path, 2)
    (first / "rank_state" / "rank_00000.pt").unlink()
    (second / ".metadata").unlink()
    with pytest.raises(CheckpointError) as info:
        CheckpointManager(tmp_path, keep_last=None).resolve("auto", world_size=2)
    assert "rank_00000.pt" in str(info.value) and str(second / ".metadata") in str(info.value)


def test_auto_resume_on_an_empty_root_is_a_fresh_run(tmp_path):
    assert CheckpointManager(tmp_path / "none", keep_last=None).resolve("auto", world_size=1) == (None, [])


def test_fresh_run_refuses_a_root_with_another_runs_checkpoints(dist_ckpt, tmp_path):
    _trainer_checkpoint(dist_ckpt, tmp_path, 5)
    with pytest.raises(CheckpointError) as info:
        check_fresh_run(tmp_path, overwrite=False)
    message = str(info.value)
    assert str(tmp_path) in message and "step_00000005" in message
    assert "checkpoint.resume=auto" in message and "output_dir" in message and "checkpoint.overwrite=true" in message
    doomed = check_fresh_run(tmp_path, overwrite=True)
    assert sorted(p.name for p in doomed) == ["latest", "step_00000005"]


def test_fresh_run_accepts_an_empty_root_or_an_interrupted_first_save(tmp_path):
    assert check_fresh_run(tmp_path / "missing", overwrite=False) == []
    (tmp_path / "step_00000001.tmp").mkdir()  # killed during its first save: no complete checkpoint to protect
    assert check_fresh_run(tmp_path, overwrite=False) == []
