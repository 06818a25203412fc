"""Megatron-Core `torch_dist` checkpoints without a Megatron model: stream-write, region-read, and the trainer's load.

Format (what `megatron.core.dist_checkpointing.save` writes with the default `torch_dist` backend, megatron-core
0.19): a PyTorch Distributed Checkpoint directory (`.metadata` + `__*_*.distcp`) whose entries are *global* tensors
keyed by ShardedTensor key (per-layer keys stack the layers into axis 0), `ShardedObject`s stored as bytes under
`<key>/shard_<offset>_<shape>` (the `_extra_state` of linear layers, and `common_state/shard_0_1` holding the
non-tensor part of the state dict), and Megatron's `metadata.json` naming the backend. Because the tensors are
global, a model at any TP/PP loads it: each rank asks for its own slices.

`write_torch_dist` writes such a checkpoint from one process, one chunk at a time (a DCP `SavePlanner` whose
`resolve_data` produces each chunk when the writer reaches it, one `.distcp` file per chunk), so memory stays at
about one chunk; no process group, no Megatron model. `TorchDistReader` reads any region of any key (e.g. one
layer), whatever TP/PP wrote the checkpoint. `load_megatron_checkpoint` is the trainer side: rank-local Megatron
model(s) <- checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

__all__ = [
    "CONVERSION_METADATA",
    "ChunkEntry",
    "TorchDistReader",
    "load_megatron_checkpoint",
    "read_conversion_metadata",
    "resolve_checkpoint_dir",
    "sharded_object_key",
    "unwrap_model",
    "write_conversion_metadata",
    "write_torch_dist",
]

MEGATRON_METADATA = "metadata.json"
"""Megatron's checkpoint config file (`dist_checkpointing.core.save_config` of a `CheckpointingConfig`)."""
MEGATRON_TORCH_DIST_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
"""Its content for the torch_dist backend, written here directly so that file conversion never imports Megatron."""
CONVERSION_METADATA = "hf_conversion.json"
"""Our file next to it: the HF config.json (to rebuild the model) and how the checkpoint was produced."""
CONVERSION_FORMAT = "avsd-megatron/qwen3-dist-ckpt"
COMMON_STATE_KEY = "common_state"


KNOWN_LOAD_NOTICES: tuple[tuple[type[Warning], str], ...] = (
    # torch/distributed/checkpoint/utils.py:468: megatron-core's torch_dist strategy calls dcp.load(state_dict,
    # reader) positionally, once per load and process
    (UserWarning, r"The argument order of load has been changed\. "),
    # torch/distributed/_shard/_utils.py:7 (api.py:833): megatron-core's loader still builds ShardedTensors
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor\."),
)
"""Library notices that every `dist_checkpointing.load` raises and that tell a user nothing (exact messages)."""


@contextlib.contextmanager
def quiet_load_notices() -> Iterator[None]:
    """Silence `KNOWN_LOAD_NOTICES` (only those) around a `dist_checkpointing.load` call."""
    with warnings.catch_warnings():
        for category, message in KNOWN_LOAD_NOTICES:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def sharded_object_key(key: str, global_offset: Sequence[int], global_shape: Sequence[int]) -> str:
    """Storage key of a Megatron `ShardedObject` (its `unique_key`): `<key>/shard_<offset>_<shape>`."""
    return f"{key}/shard_{'.'.join(map(str, global_offset))}_{'.'.join(map(str, global_shape))}"


@dataclass(frozen=True)
class ChunkEntry:
    """One item of a checkpoint being written: a tensor chunk of a global tensor, or a pickled object."""

    key: str
    """ShardedTensor key, or the full storage key of an object (`sharded_object_key`)."""
    produce: Callable[[], Any]
    """Called once, when the writer reaches this item: the chunk tensor (shape `sizes`) or the object."""
    global_shape: tuple[int, ...] | None = None
    """Shape of the whole tensor; None for an object."""
    offsets: tuple[int, ...] = ()
    """Where the chunk starts in the global tensor."""
    sizes: tuple[int, ...] = ()
    """Chunk shape."""
    dtype: torch.dtype | None = None
    """Stored dtype (the produced tensor is cast to it)."""


class _StreamingSavePlanner(DefaultSavePlanner):
    """DCP save planner over `ChunkEntry`s: the plan is built from shapes alone, data is produced on demand."""

    def __init__(self, entries: Sequence[ChunkEntry]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._entries = {}
        self._items = []
        self.error: BaseException | None = None  # first exception raised by a `produce`, re-raised by the caller
        for entry in entries:
            if entry.global_shape is None:
                index = MetadataIndex(entry.key)
                item = WriteItem(index=index, type=WriteItemType.BYTE_IO)
            else:
                index = MetadataIndex(entry.key, torch.Size(entry.offsets))
                item = WriteItem(
                    index=index,
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=torch.Size(entry.offsets), sizes=torch.Size(entry.sizes)),
                        properties=TensorProperties(dtype=entry.dtype),
                        size=torch.Size(entry.global_shape),
                    ),
                )
            self._entries[(entry.key, tuple(entry.offsets) if entry.global_shape is not None else None)] = entry
            self._items.append(item)

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        self.state_dict, self.is_coordinator = {}, is_coordinator

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self._items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        offsets = tuple(write_item.index.offset) if write_item.type != WriteItemType.BYTE_IO else None
        entry = self._entries[(write_item.index.fqn, offsets)]
        try:
            value = entry.produce()
        except BaseException as exc:
            self.error = self.error or exc
            raise
        if entry.global_shape is None:
            buffer = io.BytesIO()
            torch.save([value], buffer)  # Megatron stores a ShardedObject as a one-element list
            buffer.seek(0)
            return buffer
        if tuple(value.shape) != tuple(entry.sizes):
            raise RuntimeError(f"{entry.key} at {entry.offsets}: produced shape {tuple(value.shape)} != {entry.sizes}")
        return value.detach().to(device="cpu", dtype=entry.dtype).contiguous()


def write_torch_dist(
    out_dir: str | Path, entries: Sequence[ChunkEntry], common_state: Mapping[str, Any] | None = None
) -> None:
    """Write a Megatron `torch_dist` checkpoint into the empty directory `out_dir`, producing chunks in order.

    Args:
        out_dir: existing empty directory.
        entries: every tensor chunk and object. The chunks of each key must tile its global shape exactly (DCP
            checks: a missing or overlapping chunk raises `ValueError`).
        common_state: the non-sharded part of the state dict (Megatron's `common_state` object); default {}.
    """
    common = ChunkEntry(sharded_object_key(COMMON_STATE_KEY, (0,), (1,)), lambda: dict(common_state or {}))
    planner = _StreamingSavePlanner([*entries, common])
    # One file per chunk: torch's FileSystemWriter keeps every tensor written to a file referenced (by key) until
    # that file is closed, so a single file would hold the embedding, the output layer and a layer of each key.
    writer = dcp.FileSystemWriter(str(out_dir), single_file_per_rank=False, thread_count=1, overwrite=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
        except BaseException:  # DCP's CheckpointException derives from BaseException
            if planner.error is not None:  # it wraps the producer's error as text; surface the error itself
                raise planner.error from None
            raise
    with open(Path(out_dir) / MEGATRON_METADATA, "w", encoding="utf-8") as f:
        json.dump(MEGATRON_TORCH_DIST_CONFIG, f)


# ----------------------------------------------------------------------------------------------------------------
# Reading


class _RegionLoadPlanner(LoadPlanner):
    """Copies stored chunks into caller-owned destination tensors, one per requested (key, offsets) region."""

    def __init__(self, destinations: Mapping[tuple[str, tuple[int, ...]], Tensor]) -> None:
        self._destinations = destinations

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        pass

    def create_local_plan(self) -> LoadPlan:
        raise NotImplementedError("plans are built by TorchDistReader")

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise NotImplementedError("TorchDistReader reads tensors only")

    def resolve_tensor(self, read_item: ReadItem) -> Tensor:
        target = self._destinations[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, read_item: ReadItem, tensor: Tensor) -> None:
        pass


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The dist-checkpoint directory of `path`: `path` itself, the latest `iter_*` of a Megatron-LM save dir, or the
    step directory that the `latest` file of this project's trainer checkpoint root names."""
    path = Path(path)
    if (path / MEGATRON_METADATA).is_file():
        return path
    trainer_latest = path / "latest"  # training/checkpointing.py LATEST_FILE (training is a higher layer)
    if trainer_latest.is_file():
        candidate = path / trainer_latest.read_text(encoding="utf-8").strip()
        if candidate != path and (candidate / MEGATRON_METADATA).is_file():
            return candidate
        raise FileNotFoundError(f"{trainer_latest} names {candidate}, which has no {MEGATRON_METADATA}")
    tracker = path / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        iteration = tracker.read_text().strip()
        candidate = path / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")
        if (candidate / MEGATRON_METADATA).is_file():
            return candidate
        raise FileNotFoundError(f"{tracker} points at {candidate}, which has no {MEGATRON_METADATA}")
    raise FileNotFoundError(
        f"{path} is not a Megatron dist checkpoint: no {MEGATRON_METADATA} (nor latest_checkpointed_iteration.txt)"
    )


class TorchDistReader:
    """Read regions of the global tensors of a `torch_dist` checkpoint written at any TP/PP."""

    def __init__(self, ckpt_dir: str | Path) -> None:
        """Open `ckpt_dir` (see `resolve_checkpoint_dir`) and read its DCP metadata.

        Raises:
            FileNotFoundError: not a dist checkpoint.
            ValueError: a backend other than `torch_dist` (e.g. legacy `zarr`).
        """
        self.ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
        with open(self.ckpt_dir / MEGATRON_METADATA, encoding="utf-8") as f:
            backend = json.load(f).get("sharded_backend")
        if backend != "torch_dist":
            raise ValueError(
                f"{self.ckpt_dir / MEGATRON_METADATA}: sharded_backend={backend!r}; only 'torch_dist' is read"
            )
        self._reader = dcp.FileSystemReader(str(self.ckpt_dir))
        self.metadata: Metadata = self._reader.read_metadata()
        self._reader.set_up_storage_reader(self.metadata, is_coordinator=True)

    def tensors(self) -> dict[str, TensorStorageMetadata]:
        """Stored tensor key -> metadata (`.size` global shape, `.properties.dtype`)."""
        return {k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    def read(self, requests: Iterable[tuple[str, Sequence[int], Sequence[int]]]) -> list[Tensor]:
        """Read several regions in one pass: each request is (key, offsets, sizes) -> a tensor of shape `sizes`."""
        requests = [(key, tuple(offsets), tuple(sizes)) for key, offsets, sizes in requests]
        stored = self.tensors()
        destinations: dict[tuple[str, tuple[int, ...]], Tensor] = {}
        items: list[ReadItem] = []
        for key, offsets, sizes in requests:
            if key not in stored:
                raise KeyError(f"tensor {key!r} is not in the checkpoint {self.ckpt_dir}")
            meta = stored[key]
            destinations[(key, offsets)] = torch.empty(sizes, dtype=meta.properties.dtype)
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
            items += create_read_items_for_chunk_list(key, meta, [chunk])
        self._reader.read_data(LoadPlan(items), _RegionLoadPlanner(destinations)).wait()
        return [destinations[(key, offsets)] for key, offsets, _ in requests]


# ----------------------------------------------------------------------------------------------------------------
# Conversion metadata and the trainer-side load


def write_conversion_metadata(
    ckpt_dir: str | Path, hf_config: Mapping[str, Any], *, dtype: torch.dtype, padded_vocab_size: int, source: str,
    source_fingerprint: str | None = None,
) -> None:
    """Write `hf_conversion.json`: the HF config the model is rebuilt from, plus provenance (`source`: the HF
    directory; `source_fingerprint`: its `fingerprint.hf_fingerprint`, so a stale conversion is recognised). Trainers
    that save checkpoints meant for `megatron-to-hf` call this too (then `--hf-reference` is not needed)."""
    from avsd_megatron.convert.safetensors_io import write_json

    write_json(
        Path(ckpt_dir) / CONVERSION_METADATA,
        {
            "format": CONVERSION_FORMAT,
            "format_version": 1,
            "source": source,
            "source_fingerprint": source_fingerprint,
            "dtype": str(dtype).removeprefix("torch."),
            "padded_vocab_size": padded_vocab_size,
            "hf_config": dict(hf_config),
        },
    )


def read_conversion_metadata(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The `hf_conversion.json` of a dist checkpoint, or None when it has none."""
    path = resolve_checkpoint_dir(ckpt_dir) / CONVERSION_METADATA
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != CONVERSION_FORMAT or "hf_config" not in meta:
        raise ValueError(f"{path}: not an {CONVERSION_FORMAT} file (format={meta.get('format')!r})")
    return meta


def load_megatron_checkpoint(model: torch.nn.Module | Sequence[torch.nn.Module], ckpt_dir: str | Path) -> None:
    """Load a dist checkpoint (converted, or saved by Megatron at any TP/PP) into this rank's model chunk(s).

    Collective: every rank of the model's TP x PP x DP grid calls it (Megatron validates the shard coverage with
    the default process group). Tensors are matched strictly: a model tensor missing from the checkpoint raises
    (Megatron's `CheckpointingException`/`KeyError` names the key). Linear-layer `_extra_state` (fp8 metadata) the
    checkpoint lacks, e.g. TE's `core_attention._extra_state` after converting with the local spec, is skipped.

    Args:
        model: the rank-local `GPTModel`, possibly wrapped (`.module`), or the list of virtual-pipeline chunks.
        ckpt_dir: dist-checkpoint directory (or a Megatron-LM save dir with latest_checkpointed_iteration.txt).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
    chunks = list(model) if isinstance(model, Sequence) else [model]
    stored = set(TorchDistReader(ckpt_dir).metadata.state_dict_metadata)
    request: dict[str, dict[str, Any]] = {}
    skipped: dict[str, set[str]] = {}
    for i, chunk in enumerate(chunks):
        sharded = unwrap_model(chunk).sharded_state_dict()
        keep = {}
        for name, value in sharded.items():
            if isinstance(value, ShardedObject) and name.endswith("_extra_state") and value.unique_key not in stored:
                skipped.setdefault(f"model{i}", set()).add(name)
                continue
            keep[name] = value
        request[f"model{i}"] = keep
    with quiet_load_notices():
        loaded = dist_checkpointing.load(request, str(ckpt_dir))
    for i, chunk in enumerate(chunks):
        result = unwrap_model(chunk).load_state_dict(loaded[f"model{i}"], strict=False)
        missing = [k for k in result.missing_keys if k not in skipped.get(f"model{i}", set())]
        unexpected = list(result.unexpected_keys)
        if missing or unexpected:
            raise RuntimeError(
                f"loading {ckpt_dir} into model chunk {i}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )


def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers (`.module`)."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module
