"""Tests for `training.megatron_model.initial_checkpoint`: a stale <output_dir>/megatron_init is never reused.

Run: .venv/bin/python -m pytest -q tests/training/test_megatron_model.py      (about 15 s)

Issue 16.2: the trainer converted model.hf_path into <output_dir>/megatron_init once and then only checked that the
directory existed, so a run whose hf_path changed trained from the old weights. The conversion now records the HF
directory's fingerprint (`convert.hf_fingerprint`); a mismatch (another checkpoint, retrained weights, or a
conversion without a fingerprint) is converted again. The conversion is compared with the HF weights it must hold
(read back through the converter's own reader, an independent path from the writer).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from avsd_megatron.testing import run_on_ranks
from avsd_megatron.training.config import from_dict, load_config, to_dict

ROOT = Path(__file__).resolve().parents[2]
MARKER = "test_marker"
"""A file the test puts into megatron_init: it survives a reuse, not a reconversion."""


def _cfg_data(out_dir: Path, hf_dir: Path) -> dict:
    data = to_dict(load_config(ROOT / "examples" / "configs" / "tiny_cpu.yaml"))
    data["output_dir"] = str(out_dir)
    data["model"]["hf_path"] = str(hf_dir)
    return data


def init_rank(cfg_data: dict) -> dict:
    """initial_checkpoint(cfg) on one rank; its hf_conversion.json and the embedding it holds."""
    from avsd_megatron.convert import TorchDistReader
    from avsd_megatron.training.megatron_model import initial_checkpoint

    path = initial_checkpoint(from_dict(cfg_data))
    reader = TorchDistReader(path)
    key = "embedding.word_embeddings.weight"
    (embedding,) = reader.read([(key, (0, 0), tuple(reader.tensors()[key].size))])
    return {"path": str(path), "meta": json.loads((path / "hf_conversion.json").read_text()),
            "embedding": embedding, "marked": (path / MARKER).exists()}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> tuple[Path, Path]:
    from avsd_megatron.data.tiny import make_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("hf")
    return make_tiny_hf_checkpoint(root / "a", seed=0), make_tiny_hf_checkpoint(root / "b", seed=1)


def _hf_embedding(hf_dir: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(hf_dir / "model.safetensors")["model.embed_tokens.weight"]


def test_fingerprint_follows_content_not_location(hf_dirs, tmp_path):
    from avsd_megatron.convert import hf_fingerprint

    a, b = hf_dirs
    assert hf_fingerprint(a) != hf_fingerprint(b)  # same config and header, other weights
    assert hf_fingerprint(shutil.copytree(a, tmp_path / "copy")) == hf_fingerprint(a)
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_fingerprint(tmp_path / "nope")


def test_megatron_init_is_reconverted_when_hf_path_changes(hf_dirs, tmp_path):
    a, b = hf_dirs
    first = run_on_ranks(init_rank, 1, _cfg_data(tmp_path, a), timeout=120)[0]
    vocab = _hf_embedding(a).shape[0]
    assert torch.equal(first["embedding"][:vocab], _hf_embedding(a).to(first["embedding"].dtype))
    (Path(first["path"]) / MARKER).touch()
    again = run_on_ranks(init_rank, 1, _cfg_data(tmp_path, a), timeout=120)[0]
    assert again["marked"]  # unchanged source: reused, not converted again

    changed = run_on_ranks(init_rank, 1, _cfg_data(tmp_path, b), timeout=120)[0]
    assert not changed["marked"] and changed["meta"]["source"] == str(b.absolute())
    assert torch.equal(changed["embedding"][:vocab], _hf_embedding(b).to(changed["embedding"].dtype))


def test_megatron_init_without_a_fingerprint_is_reconverted(hf_dirs, tmp_path):
    a, _ = hf_dirs
    first = run_on_ranks(init_rank, 1, _cfg_data(tmp_path, a), timeout=120)[0]
    meta_file = Path(first["path"]) / "hf_conversion.json"
    meta = json.loads(meta_file.read_text())
    meta.pop("source_fingerprint")  # as written before the fingerprint existed
    meta_file.write_text(json.dumps(meta))
    (Path(first["path"]) / MARKER).touch()
    again = run_on_ranks(init_rank, 1, _cfg_data(tmp_path, a), timeout=120)[0]
    assert again["meta"]["source_fingerprint"] is not None and not again["marked"]
