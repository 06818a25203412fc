"""Input validation shared by the vocab-parallel kernels: errors name the argument, its value and what is allowed.

Checks that need data (token ids inside the vocabulary, finite logits) cost one host sync per kernel call; they are
evaluated on tensors that are replicated over the tensor-parallel group (token ids, gathered softmax statistics), so
every rank raises the same error at the same point and no rank is left waiting in a collective.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "FLOAT_DTYPES",
    "check_logits",
    "check_temperature",
    "check_mask",
    "expand_token_ids",
    "raise_if_invalid",
]

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def check_logits(name: str, logits: torch.Tensor, *, ndim: int | None = None, min_ndim: int = 1) -> None:
    """Raise TypeError/ValueError unless `logits` is a floating tensor of the given rank with a non-empty last dim."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be bf16/fp16/fp32/fp64 logits, got dtype {logits.dtype}")
    if ndim is not None and logits.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(logits.shape)}")
    if logits.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims [..., V/tp], got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocab dimension: shape {tuple(logits.shape)}")


def check_temperature(temperature: float) -> float:
    """Return `temperature` as a float; raise ValueError unless it is finite and > 0."""
    tau = float(temperature)
    if not (math.isfinite(tau) and tau > 0.0):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0")
    return tau


def check_mask(name: str, mask: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> None:
    """Raise unless `mask` is a bool tensor of exactly `shape`."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")


def expand_token_ids(token_ids: torch.Tensor, lead_shape: torch.Size | tuple[int, ...], *, name: str = "token_ids"):
    """Broadcast token ids over the logits' leading dimensions and flatten them.

    `token_ids` must be an integer tensor whose shape is a suffix of `lead_shape` (e.g. [N] for logits
    [M, N, V/tp]: the same sampled token for every view). Returns int64 [prod(lead_shape)].
    """
    if not isinstance(token_ids, torch.Tensor) or token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
        got = getattr(token_ids, "dtype", type(token_ids).__name__)
        raise TypeError(f"{name} must be an integer tensor, got {got}")
    lead = tuple(lead_shape)
    if token_ids.ndim > len(lead) or tuple(token_ids.shape) != lead[len(lead) - token_ids.ndim :]:
        raise ValueError(
            f"{name} shape {tuple(token_ids.shape)} must equal the logits' leading shape {lead} or a suffix of it"
        )
    return token_ids.to(torch.long).expand(lead).reshape(-1)


def raise_if_invalid(
    token_ids: torch.Tensor | None,
    vocab_size: int,
    bad_rows: torch.Tensor | None,
    *,
    ids_name: str = "token_ids",
    logits_name: str = "logits",
    lead_shape: tuple[int, ...] = (),
) -> None:
    """One host sync: raise if a token id is outside [0, vocab_size) or a row's softmax statistics are not finite.

    Args:
        token_ids: int64 [R] flattened ids (replicated over TP), or None.
        vocab_size: real vocabulary size V.
        bad_rows: bool [R], True where the row's logits contain NaN/+inf (non-finite lse or NaN z_y), or None.
        lead_shape: the logits' leading shape, used to report the offending position unflattened.
    Raises:
        ValueError: naming the first offending id (value and position) or logits row.
    """
    flags = []
    if token_ids is not None and token_ids.numel():
        bad_ids = (token_ids < 0) | (token_ids >= vocab_size)
        flags.append(bad_ids.any())
    if bad_rows is not None and bad_rows.numel():
        flags.append(bad_rows.any())
    if not flags or not bool(torch.stack(flags).any()):
        return
    if token_ids is not None and token_ids.numel() and bool(bad_ids.any()):
        row = int(bad_ids.nonzero()[0, 0])
        raise ValueError(
            f"{ids_name} contains id {int(token_ids[row])} at position {_unravel(row, lead_shape)}, outside the "
            f"vocabulary [0, {vocab_size}) (ids >= vocab_size are Megatron padding columns, not tokens)"
        )
    row = int(bad_rows.nonzero()[0, 0])
    raise ValueError(
        f"{logits_name} contain NaN or +inf at row {_unravel(row, lead_shape)} (over the real vocabulary); "
        "refusing to return a NaN loss"
    )


def _unravel(flat_index: int, shape: tuple[int, ...]) -> tuple[int, ...] | int:
    if not shape:
        return flat_index
    out = []
    for size in reversed(shape):
        out.append(flat_index % size)
        flat_index //= size
    return tuple(reversed(out))
