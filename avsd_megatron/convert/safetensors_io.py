"""HF checkpoint files: read safetensors one tensor at a time, write size-capped shards + index, copy tokenizer files.

Reading parses each shard's JSON header once and then `readinto`s one tensor's bytes: no mmap, so the process keeps
only the tensors it is converting (an mmap'd shard would count every touched page in the resident set until the
file is closed). Writing collects tensors until the next one would overflow `max_shard_bytes`, then writes that
shard; shard assignment is planned up front from the tensor sizes so names follow HF's
`model-0000i-of-0000n.safetensors` scheme, with `model.safetensors` and no index when everything fits in one file.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "HF_ASSET_PATTERNS",
    "SafetensorsShardWriter",
    "SafetensorsReader",
    "TensorInfo",
    "copy_hf_assets",
]

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
HF_ASSET_PATTERNS: tuple[str, ...] = (
    "generation_config.json",
    "tokenizer*",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template*",
)
"""Top-level files carried over between HF and Megatron directories (generation config, tokenizer, chat template)."""

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    """Absolute byte offset of the data in `file`."""
    nbytes: int


def _read_header(path: Path) -> dict[str, TensorInfo]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: unreadable safetensors header ({exc})") from exc
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']!r}, not one of {sorted(_DTYPES)}")
        begin, end = entry["data_offsets"]
        start = 8 + header_len + begin  # data follow the length prefix and the header
        infos[name] = TensorInfo(path, _DTYPES[entry["dtype"]], tuple(entry["shape"]), start, end - begin)
    return infos


class SafetensorsReader:
    """The tensors of an HF checkpoint directory (`model.safetensors`, or an index and its shards)."""

    def __init__(self, hf_dir: str | Path) -> None:
        """Parse the index (if any) and every shard header.

        Raises:
            FileNotFoundError: no safetensors weights in `hf_dir` (pytorch_model.bin is not read), or the index names
                a missing shard.
            ValueError: a tensor the index lists is not in the shard it names.
        """
        self.hf_dir = Path(hf_dir)
        index_path = self.hf_dir / SAFE_INDEX
        self.tensors: dict[str, TensorInfo] = {}
        if index_path.is_file():
            with open(index_path, encoding="utf-8") as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            headers: dict[str, dict[str, TensorInfo]] = {}
            for file_name in sorted(set(weight_map.values())):
                shard = self.hf_dir / file_name
                if not shard.is_file():
                    raise FileNotFoundError(f"{index_path} names shard {file_name!r}, which is not in {self.hf_dir}")
                headers[file_name] = _read_header(shard)
            for name, file_name in weight_map.items():
                if name not in headers[file_name]:
                    raise ValueError(f"{index_path} maps tensor {name!r} to {file_name!r}, but that shard lacks it")
                self.tensors[name] = headers[file_name][name]
        else:
            files = sorted(self.hf_dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(
                    f"no safetensors weights in {self.hf_dir} (looked for {SAFE_INDEX} and *.safetensors; "
                    "pytorch_model.bin checkpoints are not supported: re-save with safe_serialization=True)"
                )
            for path in files:
                for name, info in _read_header(path).items():
                    if name in self.tensors:
                        raise ValueError(f"tensor {name!r} is in both {self.tensors[name].file} and {path}")
                    self.tensors[name] = info

    def read(self, name: str) -> Tensor:
        """Tensor `name`, freshly read from its file (CPU, the file's dtype and shape)."""
        if name not in self.tensors:
            raise KeyError(f"tensor {name!r} is not in the HF checkpoint {self.hf_dir}")
        info = self.tensors[name]
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            if f.readinto(memoryview(buffer.numpy())) != info.nbytes:
                raise ValueError(f"{info.file}: truncated data for tensor {name!r}")
        return buffer.view(info.dtype).reshape(info.shape)


class SafetensorsShardWriter:
    """Write named tensors, in a planned order, into HF-style safetensors shards plus the index."""

    def __init__(self, out_dir: str | Path, planned: Iterable[tuple[str, int]], max_shard_bytes: int) -> None:
        """Plan the shards.

        Args:
            out_dir: existing directory to write into.
            planned: (name, nbytes) of every tensor, in the order `add` will receive them.
            max_shard_bytes: cap per shard (a single larger tensor gets a shard of its own).
        """
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes={max_shard_bytes} must be >= 1")
        self.out_dir = Path(out_dir)
        shards: list[list[str]] = [[]]
        size = 0
        self.total_size = 0
        for name, nbytes in planned:
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
            self.total_size += nbytes
        count = len(shards)
        self.file_of: dict[str, str] = {}
        for i, names in enumerate(shards):
            file_name = SAFE_SINGLE if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            self.file_of.update({name: file_name for name in names})
        self._shard_names = [list(names) for names in shards]
        self._shard = 0
        self._pending: dict[str, Tensor] = {}

    def add(self, name: str, tensor: Tensor) -> None:
        """Add the next tensor; writes the current shard once its last planned tensor arrived."""
        expected = self._shard_names[self._shard][len(self._pending)] if self._shard < len(self._shard_names) else None
        if name != expected:
            raise RuntimeError(f"tensor {name!r} arrived out of plan order (expected {expected!r})")
        if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone(memory_format=torch.contiguous_format)  # own storage: no shared or oversized buffers
        self._pending[name] = tensor
        if len(self._pending) == len(self._shard_names[self._shard]):
            from safetensors.torch import save_file

            save_file(self._pending, str(self.out_dir / self.file_of[name]), metadata={"format": "pt"})
            self._pending = {}
            self._shard += 1

    def finish(self) -> None:
        """Check every planned tensor arrived; write `model.safetensors.index.json` when there are several shards."""
        if self._shard != len(self._shard_names):
            missing = self._shard_names[self._shard][len(self._pending) :]
            raise RuntimeError(f"export ended before tensors {missing[:3]} (+{max(0, len(missing) - 3)} more)")
        if len(self._shard_names) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.file_of}
            with open(self.out_dir / SAFE_INDEX, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)


def copy_hf_assets(src_dir: str | Path, dst_dir: str | Path, patterns: Iterable[str] = HF_ASSET_PATTERNS) -> list[str]:
    """Copy the top-level files of `src_dir` matching `patterns` into `dst_dir`; return the copied names."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    copied = []
    for path in sorted(src_dir.iterdir()):
        if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns):
            shutil.copy2(path, dst_dir / path.name)
            copied.append(path.name)
    return copied


def write_json(path: str | Path, obj: Mapping) -> None:
    """Write `obj` as indented JSON (sorted keys stay as given)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
