"""Which weights score the views: the frozen initial policy, the live student, or an EMA of the student (spec 3.2).

All three are the *same* network as the student (AVSD is self-distillation); a kind only decides which parameter
values sit in the model during the teacher scoring pass:

| kind     | weights during scoring                                     | extra memory (this rank's shard)    |
|----------|------------------------------------------------------------|-------------------------------------|
| `frozen` | θ₀, copied at construction (paper default, `--fixed_teacher`) | θ₀ (+ a swap buffer), param dtype |
| `live`   | the current student weights θ (no swap)                    | none                                |
| `ema`    | ē ← d·ē + (1 − d)·θ after each step (d = 0.999, `--use_ema_teacher`) | ē in fp32 (+ a swap buffer) |

How θ comes back after the pass (`restore`, chosen once at construction):

| restore  | before the pass                | after the pass                              | when (restore='auto')     |
|----------|--------------------------------|---------------------------------------------|---------------------------|
| `swap`   | θ -> swap buffer; teacher -> θ | swap buffer -> θ                            | any other optimizer       |
| `master` | teacher -> θ (no swap buffer)  | θ := bf16(fp32 master), DP param all-gather | distributed optimizer,    |
|          |                                | (`master_restore`: megatron-core's own      | bf16 / fp16 parameters    |
|          |                                | post-step copy)                             |                           |

Swapping (slime's in-place pattern): `scoring_weights()` copies θ into a swap buffer, copies the teacher values into
the model's parameters in place (so DDP's contiguous param buffers and the distributed optimizer's views stay valid),
yields, and copies θ back. Copies are exact, so θ after the pass is bit-identical to θ before and θ₀ never drifts
(the reference's bf16 LoRA merge/unmerge does drift, spec 6 item 3). The EMA is kept in fp32: with d = 0.999 a bf16
EMA would not move. It starts at θ₀ (the reference initialises lazily at the first optimizer step [inferred]).

Restoring from the master (restore='master'): with megatron-core's distributed optimizer and bf16 / fp16 parameters,
θ between steps is exactly bf16 of the optimizer's fp32 master shard, so the pass only copies the teacher into the
parameters and afterwards re-runs the optimizer's own master -> parameter copy and parameter all-gather: no swap
buffer, one teacher -> device copy per pass instead of three copies (with storage='cpu': 1 host->device instead of
device->host + 2 host->device), plus one all-gather of the rank's parameters over DP (what every optimizer step
already does). θ after the pass is bit-identical to the swap's (tests/hook/test_master_restore.py, TP2 and DP2).
fp32 parameters cannot do this (their "master" is the parameter itself, which the teacher overwrites): there 'auto'
keeps the swap and a forced restore='master' is refused. The EMA teacher works the same way: its update reads θ
after the optimizer step, when no teacher value is in the parameters.

`storage="cpu"` keeps θ₀ / ē and the swap buffer in host memory (pinned when CUDA is available): three
host<->device copies of the rank's parameters per scoring pass with the swap, one with restore='master'. Each is one
flat buffer per dtype with a view per parameter, page-locked in place (no rounding; `_SwappingTeacher`). Host memory
per rank for the frozen teacher: 2 x (parameters of the rank's shard) x (bytes per element) with the swap, e.g.
Qwen3-8B bf16 at TP2: 2 x 4.1e9 x 2 B ≈ 15 GiB, ≈ 122 GiB per 8-GPU node; half that (θ₀ only) with
restore='master'. Slurm jobs therefore ask for the node's memory (`mem=0`). `storage="device"` keeps them next to
the parameters: faster, at the cost of that memory on the accelerator.

Choose once at construction (`build_teacher(TeacherConfig(kind=...), params, model, optimizer)`); the step only
calls `scoring_weights()` and `after_optimizer_step()`.

Not supported: DDP's `overlap_param_gather=True` (an asynchronous parameter all-gather in flight would race with
the swap); `build_teacher` refuses such a model.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from avsd_megatron.hook.master_restore import MasterRestore

__all__ = [
    "EMATeacher",
    "FrozenTeacher",
    "LiveTeacher",
    "RESTORES",
    "TEACHER_KINDS",
    "Teacher",
    "TeacherConfig",
    "build_teacher",
]

TEACHER_KINDS = ("frozen", "live", "ema")
STORAGES = ("cpu", "device")
RESTORES = ("auto", "swap", "master")


@dataclass(frozen=True)
class TeacherConfig:
    """Teacher weights for the scoring pass."""

    kind: Literal["frozen", "live", "ema"] = "frozen"
    """frozen: θ₀ (the paper's default); live: the current student; ema: EMA of the student."""
    ema_decay: float = 0.999
    """d in ē ← d·ē + (1 − d)·θ (spec 2.5 `ema_decay`); only read by kind='ema'."""
    storage: Literal["cpu", "device"] = "cpu"
    """Where θ₀ / ē and the swap buffer live: host memory or next to the parameters."""
    restore: Literal["auto", "swap", "master"] = "auto"
    """How θ comes back after the pass (module docstring): swap = a saved copy of θ; master = the distributed
    optimizer's fp32 master (no swap buffer; refused where impossible); auto = master where possible, else swap."""

    def __post_init__(self) -> None:
        if self.kind not in TEACHER_KINDS:
            raise ValueError(f"teacher.kind={self.kind!r} is not one of {TEACHER_KINDS}")
        if self.storage not in STORAGES:
            raise ValueError(f"teacher.storage={self.storage!r} is not one of {STORAGES}")
        if self.restore not in RESTORES:
            raise ValueError(f"teacher.restore={self.restore!r} is not one of {RESTORES}")
        if not (math.isfinite(self.ema_decay) and 0.0 <= self.ema_decay < 1.0):
            raise ValueError(f"teacher.ema_decay={self.ema_decay!r} must be in [0, 1)")


class Teacher(Protocol):
    """What the scoring pass and the training step need from a teacher kind."""

    kind: str

    def scoring_weights(self) -> contextlib.AbstractContextManager[None]:
        """Context in which the model's parameters hold the teacher's weights; restores θ exactly on exit."""

    def after_optimizer_step(self) -> None:
        """Called once after every optimizer step (the EMA update; a no-op for the other kinds)."""


class LiveTeacher:
    """The current student weights score the views: nothing to swap or store."""

    kind = "live"

    def __init__(self, params: Iterable[torch.nn.Parameter]) -> None:
        del params

    def scoring_weights(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def after_optimizer_step(self) -> None:
        pass


class _SwappingTeacher:
    """Holds a teacher copy of every parameter and swaps it in for the scoring pass.

    θ comes back from a swap buffer (`master=None`) or from the optimizer's fp32 master (`master`: no swap buffer).
    The teacher values and the swap buffer are each one flat tensor per dtype (views per parameter), not one
    allocation per parameter. With storage='cpu' and CUDA, each flat buffer is ordinary host memory page-locked
    in place with cudaHostRegister (`torch.cuda._pin_memory_utils.pin_memory`, as torch's own checkpoint stager
    does), not `Tensor.pin_memory()`: torch's pinned caching allocator rounds every block up to a power of two
    (ATen/core/CachingHostAllocator.h: `c10::llvm::PowerOf2Ceil(size)` below `pinned_max_round_threshold`, which
    defaults to SIZE_MAX), ≈ 1.37x over Qwen3-8B's per-parameter blocks and up to 2x for one big block.
    """

    kind = ""

    def __init__(self, params: Iterable[torch.nn.Parameter], storage: str, dtype: torch.dtype | None,
                 master: MasterRestore | None = None) -> None:
        self._params = list(params)
        if not self._params:
            raise ValueError("the model has no parameters to build a teacher from")
        self._master = master
        self.restore = "swap" if master is None else "master"
        """How θ comes back after the pass: 'swap' (the swap buffer) or 'master' (the optimizer's fp32 master)."""
        with torch.no_grad():
            self._teacher, teacher_flats = _flat_views(self._params, storage, dtype)  # θ₀ or ē
            for stored, param in zip(self._teacher, self._params):
                stored.copy_(param.detach())  # exact: same dtype, or an upcast for the EMA
            self._swap, swap_flats = _flat_views(self._params, storage, None) if master is None else ([], [])
        self.flat_buffers = teacher_flats + swap_flats
        """The flat allocations behind the teacher and swap views (one per dtype each; no swap with 'master')."""
        if storage == "cpu" and torch.cuda.is_available():
            for flat in self.flat_buffers:
                _pin_host(flat)
            # unregistered when the teacher goes, before the memory is freed (the finalizer holds the buffers)
            weakref.finalize(self, _unpin_host, self.flat_buffers).atexit = False

    def matches_master(self) -> bool:
        """restore='master': whether this rank's θ is exactly bf16 of the optimizer's fp32 master now
        (`MasterRestore.matches_params`; check it after loading a checkpoint). True for restore='swap'."""
        return self._master is None or self._master.matches_params()

    @property
    def teacher_tensors(self) -> list[torch.Tensor]:
        """The stored teacher values (θ₀ or ē), in `model.parameters()` order; read-only by convention."""
        return self._teacher

    @contextlib.contextmanager
    def scoring_weights(self) -> Iterator[None]:
        with torch.no_grad():
            for param, swap in zip(self._params, self._swap):  # empty with restore='master'
                swap.copy_(param)  # θ -> swap buffer
            for param, teacher in zip(self._params, self._teacher):
                param.copy_(teacher)  # teacher -> model, in place (cast to the param dtype for the EMA)
        try:
            yield
        finally:
            with torch.no_grad():
                if self._master is not None:
                    self._master.restore()  # θ := bf16(master), all-gathered over DP: θ bit for bit
                for param, swap in zip(self._params, self._swap):
                    param.copy_(swap)  # exact: θ is back bit for bit

    def after_optimizer_step(self) -> None:
        pass


class FrozenTeacher(_SwappingTeacher):
    """θ₀, copied at construction (exactly, in the parameters' dtype), swapped in for every scoring pass."""

    kind = "frozen"

    def __init__(self, params: Iterable[torch.nn.Parameter], *, storage: str = "cpu",
                 master: MasterRestore | None = None) -> None:
        super().__init__(params, storage, dtype=None, master=master)


class EMATeacher(_SwappingTeacher):
    """ē (fp32), initialised to θ₀ and updated after each optimizer step: ē ← d·ē + (1 − d)·θ."""

    kind = "ema"

    def __init__(self, params: Iterable[torch.nn.Parameter], *, decay: float = 0.999, storage: str = "cpu",
                 master: MasterRestore | None = None) -> None:
        super().__init__(params, storage, dtype=torch.float32, master=master)
        self.decay = float(decay)

    def after_optimizer_step(self) -> None:
        with torch.no_grad():
            for param, ema in zip(self._params, self._teacher):
                ema.mul_(self.decay).add_(param.to(ema.device, torch.float32), alpha=1.0 - self.decay)


def build_teacher(config: TeacherConfig, params: Iterable[torch.nn.Parameter], model: object = None,
                  optimizer: object = None) -> Teacher:
    """The teacher of `config.kind` over `params` (this rank's parameters, e.g. `model.parameters()`).

    Build it before the first optimizer step: frozen / ema copy the current values as θ₀.

    Args:
        config: TeacherConfig.
        params: the model's parameters, in a fixed order.
        model: the (DDP-wrapped) model, only to refuse `overlap_param_gather=True`; None skips the check.
        optimizer: the Megatron optimizer over `model`, for restore='master' / 'auto' (None: the swap).
    Raises:
        ValueError: a swapping kind on a DDP model with overlap_param_gather=True; restore='master' where θ cannot
            be restored from the optimizer's master (`MasterRestore.why_not` gives the reason).
    """
    params = list(params)
    ddp_config = getattr(model, "ddp_config", None)
    if config.kind != "live" and ddp_config is not None and getattr(ddp_config, "overlap_param_gather", False):
        raise ValueError(
            f"teacher.kind={config.kind!r} swaps weights in place, which races with DDP's asynchronous parameter "
            "all-gather; set DistributedDataParallelConfig(overlap_param_gather=False) or use teacher.kind='live'"
        )
    if config.kind == "live":
        return LiveTeacher(params)
    master = None
    if config.restore != "swap":
        reason = MasterRestore.why_not(optimizer, params)
        if reason is None:
            master = MasterRestore(optimizer, params)
        elif config.restore == "master":
            raise ValueError(f"teacher.restore='master' cannot restore θ from the optimizer: {reason}; use "
                             "teacher.restore='swap' (or 'auto')")
    if config.kind == "frozen":
        return FrozenTeacher(params, storage=config.storage, master=master)
    return EMATeacher(params, decay=config.ema_decay, storage=config.storage, master=master)


def _flat_views(params: list[torch.nn.Parameter], storage: str,
                dtype: torch.dtype | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(one uninitialised tensor per parameter, shaped like it, in `dtype` (None: the parameter's), the flat buffers
    they are views of: one per dtype), in host memory or on the parameters' device."""
    devices = {p.device for p in params}
    if storage == "device" and len(devices) > 1:
        raise ValueError(f"teacher.storage='device' needs the rank's parameters on one device, found {devices}")
    device = torch.device("cpu") if storage == "cpu" else next(iter(devices))
    dtypes = [dtype or p.dtype for p in params]
    totals: dict[torch.dtype, int] = {}
    for d, p in zip(dtypes, params):
        totals[d] = totals.get(d, 0) + p.numel()
    flats = {d: torch.empty(n, dtype=d, device=device) for d, n in totals.items()}
    offsets = dict.fromkeys(totals, 0)
    views = []
    for d, p in zip(dtypes, params):
        views.append(flats[d][offsets[d] : offsets[d] + p.numel()].view(p.shape))
        offsets[d] += p.numel()
    return views, list(flats.values())


def _pin_host(flat: torch.Tensor) -> None:
    """Page-lock `flat`'s host memory in place (cudaHostRegister; no power-of-two rounding)."""
    from torch.cuda import _pin_memory_utils

    _pin_memory_utils.pin_memory(flat.data_ptr(), flat.numel() * flat.element_size())


def _unpin_host(flats: list[torch.Tensor]) -> None:
    from torch.cuda import _pin_memory_utils

    for flat in flats:
        _pin_memory_utils.unpin_memory(flat.data_ptr())
