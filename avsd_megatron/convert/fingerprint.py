"""A content fingerprint of an HF checkpoint directory: what a converted Megatron checkpoint was made from.

    fingerprint = hf_fingerprint("Qwen3-8B/")      # 'sha256:...'; recorded in hf_conversion.json as source_fingerprint

Hashed, in order: config.json, model.safetensors.index.json (when there is one), and for every `*.safetensors` file
(sorted by name) its name, its size, its first and its last `SAMPLE_BYTES` bytes. The first bytes hold the
safetensors header (names, dtypes, shapes, offsets: a few hundred KB at 8B) and the first tensors' data, so another
architecture, another sharding or retrained weights change the fingerprint, while an 8B checkpoint costs a few MB
of reads instead of 16 GB. A change confined to the middle of a shard (neither its first nor last MiB) is not seen:
the fingerprint guards against a stale conversion of another checkpoint, not against tampering.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["SAMPLE_BYTES", "hf_fingerprint"]

SAMPLE_BYTES = 1 << 20
_META_FILES = ("config.json", "model.safetensors.index.json")


def hf_fingerprint(hf_dir: str | Path) -> str:
    """'sha256:<hex>' of `hf_dir`'s config, weight index and weight files (module docstring).

    Raises:
        FileNotFoundError: `hf_dir` has no config.json.
    """
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir / 'config.json'} does not exist (model.hf_path must be an HF directory)")
    digest = hashlib.sha256()
    for name in _META_FILES:
        path = hf_dir / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    for path in sorted(hf_dir.glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            digest.update(f.read(SAMPLE_BYTES))
            if size > SAMPLE_BYTES:
                f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
                digest.update(f.read(SAMPLE_BYTES))
    return "sha256:" + digest.hexdigest()
