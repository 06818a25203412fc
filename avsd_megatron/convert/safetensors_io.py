"""HF checkpoint files: read safetensors one tensor at a time, write size-capped shards + index, copy tokenizer files.

Reading is `safetensors.safe_open`: the header is parsed and validated by the library (a corrupt or truncated file
raises here, naming the file, before anything is converted), and `get_tensor` returns the tensor as a view of the
file's private mmap. Those pages are file-backed and reclaimable: they count in RSS (VmRSS, VmHWM) but not in the
anonymous memory that bounds a conversion. `benchmarks/convert_memory.py` measured both against the hand-written
`readinto` reader this replaced: peak anonymous memory of hf-to-megatron 59 vs 184 MiB (12-layer 1.3 GB model),
76 vs 147 MiB (24 layers), RSS within noise; no hand-written part is left. Shards are planned by
`huggingface_hub.split_torch_state_dict_into_shards` (transformers' own plan and `model-0000i-of-0000n.safetensors`
names; `model.safetensors` and no index when everything fits) on meta tensors of the planned sizes, and each shard
is written by `safetensors.torch.save_file` as soon as its last tensor arrives, so only the shards still being
filled are held.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
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
"""Header dtype names of the checkpoints we convert (safetensors' own table, safetensors/torch.py `_TYPES`, is
private); only read from headers, to check dtypes before converting."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, from its header."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


def _safetensors_error(path: Path, exc: Exception) -> ValueError:
    return ValueError(f"{path}: not a readable safetensors file ({exc})")


def _read_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor's dtype and shape; ValueError naming `path` for a corrupt, truncated or non-safetensors file."""
    from safetensors import SafetensorError, safe_open

    infos = {}
    try:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                header = f.get_slice(name)  # header only: no tensor data is read
                dtype = header.get_dtype()
                if dtype not in _DTYPES:
                    raise ValueError(f"{path}: tensor {name!r} has dtype {dtype!r}, not one of {sorted(_DTYPES)}")
                infos[name] = TensorInfo(path, _DTYPES[dtype], tuple(header.get_shape()))
    except SafetensorError as exc:
        raise _safetensors_error(path, exc) from exc
    return infos


class SafetensorsReader:
    """The tensors of an HF checkpoint directory (`model.safetensors`, or an index and its shards)."""

    def __init__(self, hf_dir: str | Path) -> None:
        """Parse the index (if any) and every shard header.

        Raises:
            FileNotFoundError: no safetensors weights in `hf_dir` (pytorch_model.bin is not read), or the index names
                a missing shard.
            ValueError: a shard is corrupt or truncated (the message names it), or a tensor the index lists is not in
                the shard it names.
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
        """Tensor `name` (CPU, the file's dtype and shape), backed by the file's pages (copy-on-write)."""
        from safetensors import SafetensorError, safe_open

        if name not in self.tensors:
            raise KeyError(f"tensor {name!r} is not in the HF checkpoint {self.hf_dir}")
        path = self.tensors[name].file
        try:  # re-opened per tensor: the header parse is microseconds next to the data, and no handle outlives it
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(name)
        except SafetensorError as exc:  # the file changed after the header was read
            raise _safetensors_error(path, exc) from exc


class SafetensorsShardWriter:
    """Write named tensors, in a planned order, into HF-style safetensors shards plus the index."""

    def __init__(self, out_dir: str | Path, planned: Iterable[tuple[str, int]], max_shard_bytes: int) -> None:
        """Plan the shards (`huggingface_hub.split_torch_state_dict_into_shards`).

        Args:
            out_dir: existing directory to write into.
            planned: (name, nbytes) of every tensor, in the order `add` will receive them.
            max_shard_bytes: cap per shard (a single larger tensor gets a shard of its own).
        """
        from huggingface_hub import split_torch_state_dict_into_shards

        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes={max_shard_bytes} must be >= 1")
        self.out_dir = Path(out_dir)
        self._order = [name for name, _ in planned]
        # Meta tensors: sizes without memory; they get no storage id (huggingface_hub/serialization/_torch.py:889),
        # so the planner groups none of them as aliases of one another.
        sizes = {name: torch.empty(nbytes, dtype=torch.uint8, device="meta") for name, nbytes in planned}
        if len(sizes) != len(self._order):
            raise ValueError(f"planned tensor names repeat ({len(self._order) - len(sizes)} duplicates)")
        self._split = split_torch_state_dict_into_shards(sizes, max_shard_size=max_shard_bytes)
        self.file_of: dict[str, str] = dict(self._split.tensor_to_filename)
        self.total_size: int = self._split.metadata["total_size"]
        self._received = 0
        self._pending: dict[str, dict[str, Tensor]] = {}  # file -> its tensors so far; a tensor larger than the
        # cap gets its own shard while the current one is still filling (hub's plan), so two can be open at once

    def add(self, name: str, tensor: Tensor) -> None:
        """Add the next tensor; writes its shard once the shard's last planned tensor arrived."""
        from safetensors.torch import save_file

        expected = self._order[self._received] if self._received < len(self._order) else None
        if name != expected:
            raise RuntimeError(f"tensor {name!r} arrived out of plan order (expected {expected!r})")
        self._received += 1
        if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes:
            # own storage: save_file refuses shared (safetensors/torch.py:559) or non-contiguous (:577) tensors
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        file_name = self.file_of[name]
        shard = self._pending.setdefault(file_name, {})
        shard[name] = tensor
        if len(shard) == len(self._split.filename_to_tensors[file_name]):
            save_file(self._pending.pop(file_name), str(self.out_dir / file_name), metadata={"format": "pt"})

    def finish(self) -> None:
        """Check every planned tensor arrived; write `model.safetensors.index.json` when there are several shards."""
        if self._received != len(self._order):
            missing = self._order[self._received :]
            raise RuntimeError(f"export ended before tensors {missing[:3]} (+{max(0, len(missing) - 3)} more)")
        if self._split.is_sharded:
            index = {"metadata": self._split.metadata, "weight_map": self._split.tensor_to_filename}
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
