"""File conversion HF Qwen3 <-> Megatron dist checkpoint, streaming, in one process, all-or-nothing.

    convert_hf_to_megatron(hf_dir, out_dir, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    convert_megatron_to_hf(megatron_dir, out_dir, hf_reference_dir=None)

hf -> megatron: every HF tensor name and shape is checked against config.json from the safetensors headers before
anything is written; then each Megatron chunk (one layer of one key) is built from its HF tensors when the DCP
writer reaches it and written at once. The result is a global-tensor `torch_dist` checkpoint that Megatron loads at
any TP/PP (`load_megatron_checkpoint`); `--tp/--pp` only pick the vocab padding and are checked to divide the model.

megatron -> hf: the checkpoint's keys and global shapes are checked against the HF config, then each layer is read
(whatever TP/PP wrote it), turned into HF tensors and handed to a shard writer that flushes every ~`max_shard_bytes`.

Both write into a temporary sibling directory `.<name>.partial-<pid>-<random>` and rename it to `out_dir` only on
success, so a failed conversion leaves no partial output; one killed with SIGKILL leaves its partial directory,
which the next conversion into the same `out_dir` removes (when the process that made it is gone). The output
gets the usual permissions (0777 minus the umask), not mkdtemp's 0700, so it is readable on shared storage.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from avsd_megatron.convert.dist_ckpt import (
    ChunkEntry,
    TorchDistReader,
    read_conversion_metadata,
    sharded_object_key,
    write_conversion_metadata,
    write_torch_dist,
)
from avsd_megatron.convert.fingerprint import hf_fingerprint
from avsd_megatron.convert.mapping import (
    GLOBAL_MAPPINGS,
    LAYER_MAPPINGS,
    LINEAR_MODULES,
    ParamMapping,
    expected_hf_shapes,
    hf_names,
    hf_tensor_order,
    is_per_layer,
    megatron_key,
    megatron_shape,
    model_mappings,
    to_hf,
    to_megatron,
)
from avsd_megatron.convert.qwen3_config import DEFAULT_VOCAB_DIVISIBLE_BY, Qwen3Dims, padded_vocab_size, read_hf_config
from avsd_megatron.convert.safetensors_io import (
    SafetensorsReader,
    SafetensorsShardWriter,
    copy_hf_assets,
    write_json,
)

__all__ = ["HF_ASSETS_DIR", "convert_hf_to_megatron", "convert_megatron_to_hf", "iter_hf_weights_from_checkpoint"]

HF_ASSETS_DIR = "hf_assets"
"""Subdirectory of a converted Megatron checkpoint holding the HF tokenizer / generation-config files."""
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
"""HF's default `max_shard_size` ("5GB")."""
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""CLI spellings of the storage dtypes."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_partials(out_dir: Path) -> list[Path]:
    """Delete the `.<name>.partial-<pid>-*` siblings of `out_dir` whose process is gone (killed conversions);
    returns them. Partials of a live process (a conversion running now) are kept."""
    removed = []
    for path in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        pid = path.name.removeprefix(f".{out_dir.name}.partial-").split("-")[0]
        if not pid.isdigit() or not _pid_alive(int(pid)):  # no pid: the older naming (mkdtemp only)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextmanager
def _atomic_output_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `out_dir`; rename it to `out_dir` on success, delete it on any error."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        raise FileExistsError(f"output directory {out_dir} already exists; remove it or choose another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the renamed output should be like any other directory
    try:
        yield tmp
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _progress_bar(total_bytes: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar over the bytes converted (rate in B/s, ETA); a no-op when not `enabled`."""
    from tqdm import tqdm

    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                dynamic_ncols=True)


def _counted(entry: ChunkEntry, bar: Any) -> ChunkEntry:
    """`entry` whose tensor, when produced, advances `bar` by its bytes (objects pass unchanged)."""
    if entry.global_shape is None:
        return entry
    nbytes = math.prod(entry.sizes) * entry.dtype.itemsize

    def produce() -> Tensor:
        tensor = entry.produce()
        bar.update(nbytes)
        return tensor

    return dataclasses.replace(entry, produce=produce)


def _check_hf_tensors(reader: SafetensorsReader, dims: Qwen3Dims) -> None:
    """Every expected HF tensor is present with the config's shape; nothing unexpected (tied lm_head is tolerated)."""
    expected = expected_hf_shapes(dims)
    missing = [name for name in expected if name not in reader.tensors]
    if missing:
        raise ValueError(
            f"HF checkpoint {reader.hf_dir} lacks {len(missing)} tensor(s) that config.json implies, "
            f"e.g. {missing[:3]} (num_hidden_layers={dims.num_layers}, tie_word_embeddings={dims.tie_word_embeddings})"
        )
    tolerated = {"lm_head.weight"} if dims.tie_word_embeddings else set()
    unexpected = [name for name in reader.tensors if name not in expected and name not in tolerated]
    if unexpected:
        info = reader.tensors[unexpected[0]]
        raise ValueError(
            f"HF checkpoint {reader.hf_dir} has {len(unexpected)} tensor(s) a dense Qwen3 with this config.json does "
            f"not have, e.g. {unexpected[0]!r} in {info.file.name} (all: {unexpected[:5]})"
        )
    for name, shape in expected.items():
        info = reader.tensors[name]
        if info.shape != shape:
            raise ValueError(
                f"tensor {name!r} in {info.file.name} has shape {list(info.shape)}, but config.json implies "
                f"{list(shape)} (hidden_size={dims.hidden_size}, intermediate_size={dims.ffn_hidden_size}, "
                f"num_attention_heads={dims.num_attention_heads}, num_key_value_heads={dims.num_query_groups}, "
                f"head_dim={dims.head_dim}, vocab_size={dims.vocab_size})"
            )
        if not info.dtype.is_floating_point:
            raise ValueError(f"tensor {name!r} in {info.file.name} has non-float dtype {info.dtype}")


def _megatron_entries(
    reader: SafetensorsReader, dims: Qwen3Dims, padded_vocab: int, dtype: torch.dtype
) -> list[ChunkEntry]:
    """Every chunk of the dist checkpoint, layer by layer, each producing itself from the HF files on demand."""
    entries = []
    for mapping, layer in model_mappings(dims):
        shape = megatron_shape(mapping, dims, padded_vocab)

        def produce(mapping: ParamMapping = mapping, layer: int | None = layer) -> Tensor:
            hf = [reader.read(name) for name in hf_names(mapping, layer)]
            tensor = to_megatron(mapping, hf, dims, padded_vocab)
            return tensor.unsqueeze(0) if layer is not None else tensor  # [1, ...]: one layer of the [L, ...] key

        if layer is None:
            entries.append(ChunkEntry(megatron_key(mapping), produce, shape, (0,) * len(shape), shape, dtype))
        else:
            global_shape = (dims.num_layers, *shape)
            offsets = (layer,) + (0,) * len(shape)
            entries.append(ChunkEntry(megatron_key(mapping), produce, global_shape, offsets, (1, *shape), dtype))
            if mapping is LAYER_MAPPINGS[-1]:  # the linear layers' (empty) `_extra_state`, as Megatron saves it
                for module in LINEAR_MODULES:
                    key = sharded_object_key(f"decoder.layers.{module}._extra_state", (layer,), (dims.num_layers,))
                    entries.append(ChunkEntry(key, lambda: None))
    return entries


def convert_hf_to_megatron(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY,
    progress: bool = False,
) -> Path:
    """Convert an HF Qwen3 checkpoint directory into a Megatron-Core dist checkpoint at `out_dir`.

    Args:
        hf_dir: config.json + safetensors (single file or index + shards) + tokenizer files.
        out_dir: must not exist; gets the `torch_dist` checkpoint, `hf_conversion.json` and `hf_assets/`.
        tensor_model_parallel_size / pipeline_model_parallel_size: the intended training layout: checked to divide
            the model, and TP sets the vocab padding (`padded_vocab_size`). The checkpoint loads at any TP/PP.
        dtype: storage dtype of every tensor.
        make_vocab_size_divisible_by: Megatron-LM's padding multiple (per TP rank).
        progress: show a tqdm bar over the bytes written (rate, ETA) on stderr.
    Returns:
        `out_dir`.
    Raises:
        ValueError: not a dense Qwen3 config, TP/PP do not divide it, or tensors missing / unexpected / misshapen
            (the message names the tensor and its file).
        FileNotFoundError: no config.json or safetensors files; FileExistsError: `out_dir` exists.
    """
    hf_config = read_hf_config(hf_dir)
    dims = Qwen3Dims.from_hf_config(hf_config)
    dims.check_parallel(tensor_model_parallel_size, pipeline_model_parallel_size)
    reader = SafetensorsReader(hf_dir)
    _check_hf_tensors(reader, dims)
    padded_vocab = padded_vocab_size(dims.vocab_size, tensor_model_parallel_size, make_vocab_size_divisible_by)
    entries = _megatron_entries(reader, dims, padded_vocab, dtype)
    total = sum(math.prod(e.sizes) * e.dtype.itemsize for e in entries if e.global_shape is not None)
    with _atomic_output_dir(out_dir) as tmp, _progress_bar(total, "hf->megatron", progress) as bar:
        write_torch_dist(tmp, [_counted(entry, bar) for entry in entries])
        write_conversion_metadata(
            tmp, hf_config, dtype=dtype, padded_vocab_size=padded_vocab, source=str(Path(hf_dir).absolute()),
            source_fingerprint=hf_fingerprint(hf_dir),
        )
        (tmp / HF_ASSETS_DIR).mkdir()
        copy_hf_assets(hf_dir, tmp / HF_ASSETS_DIR)
    return Path(out_dir)


# ----------------------------------------------------------------------------------------------------------------
# Megatron -> HF


def _check_megatron_tensors(reader: TorchDistReader, dims: Qwen3Dims) -> None:
    """The checkpoint has every key the HF config implies, with matching global shapes, and no unknown model key."""
    stored = reader.tensors()
    expected = {megatron_key(m) for m, _ in model_mappings(dims)}
    for mapping, layer in model_mappings(dims):
        if layer not in (None, 0):
            continue
        key = megatron_key(mapping)
        if key not in stored:
            raise ValueError(
                f"Megatron checkpoint {reader.ckpt_dir} lacks tensor {key!r} "
                f"(tie_word_embeddings={dims.tie_word_embeddings} in the HF config)"
            )
        shape = tuple(stored[key].size)
        want = megatron_shape(mapping, dims, padded_vocab=shape[0] if mapping.rule == "vocab" else 0)
        if is_per_layer(mapping):
            want = (dims.num_layers, *want)
        if shape != want or (mapping.rule == "vocab" and shape[0] < dims.vocab_size):
            raise ValueError(
                f"Megatron checkpoint tensor {key!r} has global shape {list(shape)}, but the HF config implies "
                f"{list(want)} (num_hidden_layers={dims.num_layers}, vocab_size={dims.vocab_size} before padding)"
            )
    model_prefixes = ("embedding.", "decoder.", "output_layer.")
    unexpected = sorted(k for k in stored if k.startswith(model_prefixes) and k not in expected)
    if unexpected:
        raise ValueError(
            f"Megatron checkpoint {reader.ckpt_dir} has model tensor(s) a dense Qwen3 with this config does not have: "
            f"{unexpected[:5]} (tied embeddings checkpoint exported with an untied config, or another architecture?)"
        )


def iter_hf_weights_from_checkpoint(
    reader: TorchDistReader, dims: Qwen3Dims, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, Tensor]]:
    """(HF name, tensor) for the whole model, reading one layer at a time; same order as `export_hf_weights`."""
    stored = reader.tensors()
    current_layer, layer_tensors = None, {}
    for mapping, layer in model_mappings(dims):
        key = megatron_key(mapping)
        if layer is None:
            (tensor,) = reader.read([(key, (0,) * len(stored[key].size), tuple(stored[key].size))])
        else:
            if layer != current_layer:  # one read pass per layer
                requests = []
                for m in LAYER_MAPPINGS:
                    full = tuple(stored[megatron_key(m)].size)
                    requests.append((megatron_key(m), (layer,) + (0,) * (len(full) - 1), (1, *full[1:])))
                layer_tensors = dict(zip([r[0] for r in requests], reader.read(requests)))
                current_layer = layer
            tensor = layer_tensors.pop(key)[0]
        for name, hf_tensor in zip(hf_names(mapping, layer), to_hf(mapping, tensor, dims)):
            yield name, hf_tensor if dtype is None else hf_tensor.to(dtype)


def _resolve_hf_config(
    megatron_dir: Path, hf_reference_dir: str | Path | None
) -> tuple[dict[str, Any], Path | None]:
    """HF config from `hf_conversion.json`, else from the reference; both present -> shapes must agree."""
    meta = read_conversion_metadata(megatron_dir)
    reference = read_hf_config(hf_reference_dir) if hf_reference_dir is not None else None
    if meta is None and reference is None:
        raise ValueError(
            f"{megatron_dir} has no hf_conversion.json (not made by hf-to-megatron); pass --hf-reference DIR with the "
            "original HF config.json and tokenizer"
        )
    if meta is not None and reference is not None:
        ours, theirs = Qwen3Dims.from_hf_config(meta["hf_config"]), Qwen3Dims.from_hf_config(reference)
        if ours != theirs:
            fields = [f for f in ours.__dataclass_fields__ if getattr(ours, f) != getattr(theirs, f)]
            diff = {f: (getattr(ours, f), getattr(theirs, f)) for f in fields}
            raise ValueError(f"--hf-reference config.json disagrees with {megatron_dir}/hf_conversion.json: {diff}")
    config = dict(reference if reference is not None else meta["hf_config"])
    assets = Path(hf_reference_dir) if hf_reference_dir is not None else megatron_dir / HF_ASSETS_DIR
    return config, assets if assets.is_dir() else None


def convert_megatron_to_hf(
    megatron_dir: str | Path,
    out_dir: str | Path,
    *,
    hf_reference_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = False,
) -> Path:
    """Convert a Megatron dist checkpoint (converted, or saved by the trainer at any TP/PP) into an HF directory.

    Args:
        megatron_dir: dist-checkpoint dir, a Megatron-LM save dir (its latest iteration is used) or the trainer's
            checkpoint root (the step its `latest` file names).
        out_dir: must not exist; gets safetensors shards (+ index), config.json, generation config and tokenizer.
        hf_reference_dir: HF directory supplying config.json and tokenizer files; needed when the checkpoint has no
            `hf_conversion.json`.
        dtype: output dtype; default: config.json's `dtype` / `torch_dtype`, else as stored.
        max_shard_bytes: safetensors shard size cap.
        progress: show a tqdm bar over the bytes written (rate, ETA) on stderr.
    Returns:
        `out_dir`.
    Raises:
        ValueError: no HF config available, keys missing / unexpected / misshapen vs the config.
        FileExistsError: `out_dir` exists.
    """
    reader = TorchDistReader(megatron_dir)
    hf_config, assets = _resolve_hf_config(reader.ckpt_dir, hf_reference_dir)
    dims = Qwen3Dims.from_hf_config(hf_config)
    _check_megatron_tensors(reader, dims)
    if dtype is None:
        named = hf_config.get("dtype") or hf_config.get("torch_dtype")
        dtype = getattr(torch, named) if isinstance(named, str) and hasattr(torch, named) else None
    out_dtype = dtype or reader.tensors()[megatron_key(GLOBAL_MAPPINGS[0])].properties.dtype  # the embedding's
    element = torch.empty((), dtype=out_dtype).element_size()
    shapes = expected_hf_shapes(dims)
    planned = [(name, element * math.prod(shapes[name])) for name in hf_tensor_order(dims)]
    with _atomic_output_dir(out_dir) as tmp:
        writer = SafetensorsShardWriter(tmp, planned, max_shard_bytes)
        with _progress_bar(writer.total_size, "megatron->hf", progress) as bar:
            for name, tensor in iter_hf_weights_from_checkpoint(reader, dims, out_dtype):
                writer.add(name, tensor)
                bar.update(tensor.nbytes)
        writer.finish()
        config = dict(hf_config)
        dtype_field = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"  # < / >= tf 5
        config[dtype_field] = str(out_dtype).removeprefix("torch.")
        write_json(tmp / "config.json", config)
        if assets is not None:
            copy_hf_assets(assets, tmp)
    return Path(out_dir)

