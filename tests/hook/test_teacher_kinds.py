"""Teacher kinds' storage (avsd_megatron/hook/teacher_kinds.py): the flat buffers behind θ₀ / ē and the swap buffer.

Run: python -m pytest -q tests/hook/test_teacher_kinds.py

- the frozen and EMA teachers swap exactly what the per-parameter implementation they replace swapped (that
  implementation is re-stated here as the reference), bit for bit, over a model of mixed dtypes and shapes;
- every teacher tensor is a view of one flat buffer per dtype (one host allocation, not one per parameter);
- with CUDA, each flat buffer is page-locked once, in place, with its exact byte size, and released with the teacher.
"""

from __future__ import annotations

import gc

import pytest
import torch

from avsd_megatron.hook import teacher_kinds
from avsd_megatron.hook.teacher_kinds import TeacherConfig, build_teacher


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(37, 12), torch.nn.Linear(12, 7), torch.nn.LayerNorm(7))
    model[0].to(torch.bfloat16)  # mixed dtypes, as a model with fp32 norms beside bf16 weights would have
    return model


def _perturb(model: torch.nn.Module, scale: float, seed: int) -> None:
    """A stand-in optimizer step: the same noise for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype))


class PerParameterReference:
    """The implementation before the flat buffers: one stored copy and one swap tensor per parameter."""

    def __init__(self, params, dtype, decay=0.0):
        self.params = list(params)
        self.teacher = [p.detach().to(dtype=dtype or p.dtype, copy=True) for p in self.params]
        self.swap = [torch.empty_like(p) for p in self.params]
        self.decay = decay

    def swapped_in(self) -> list[torch.Tensor]:
        with torch.no_grad():
            for param, swap, teacher in zip(self.params, self.swap, self.teacher):
                swap.copy_(param)
                param.copy_(teacher)
        seen = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for param, swap in zip(self.params, self.swap):
                param.copy_(swap)
        return seen

    def ema_step(self) -> None:
        with torch.no_grad():
            for param, ema in zip(self.params, self.teacher):
                ema.mul_(self.decay).add_(param.to(ema.device, torch.float32), alpha=1.0 - self.decay)


def _bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Same dtypes, shapes and bytes (torch.equal on the raw bytes: NaN payloads and -0.0 count too)."""
    return all(x.dtype == y.dtype and x.shape == y.shape
               and torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))
               for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("kind", ["frozen", "ema"])
def test_flat_teacher_swaps_exactly_what_the_per_parameter_teacher_swapped(kind):
    model, twin = _model(), _model()
    decay = 0.75
    teacher = build_teacher(TeacherConfig(kind=kind, ema_decay=decay), model.parameters())
    reference = PerParameterReference(twin.parameters(), torch.float32 if kind == "ema" else None, decay)
    for step in range(3):
        _perturb(model, 0.1, step)
        _perturb(twin, 0.1, step)
        assert _bitwise_equal(list(model.parameters()), list(twin.parameters()))
        theta = [p.detach().clone() for p in model.parameters()]
        with teacher.scoring_weights():
            seen = [p.detach().clone() for p in model.parameters()]
        assert _bitwise_equal(seen, reference.swapped_in()), step
        assert _bitwise_equal([p.detach() for p in model.parameters()], theta)  # θ restored bit for bit
        teacher.after_optimizer_step()
        if kind == "ema":
            reference.ema_step()
        assert _bitwise_equal(teacher.teacher_tensors, reference.teacher)
    if kind == "frozen":
        assert not _bitwise_equal(seen, [p.detach() for p in model.parameters()])  # θ₀ really differs from θ


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("kind", ["frozen", "ema"])
def test_teacher_and_swap_are_views_of_one_flat_buffer_per_dtype(kind):
    model = _model()
    params = list(model.parameters())
    teacher = build_teacher(TeacherConfig(kind=kind), params)
    stored_dtypes = {torch.float32} if kind == "ema" else {p.dtype for p in params}
    assert len(stored_dtypes) == (1 if kind == "ema" else 2)
    assert len({_storage_ptr(t) for t in teacher.teacher_tensors}) == len(stored_dtypes)
    assert len({_storage_ptr(t) for t in teacher._swap}) == len({p.dtype for p in params})
    assert len(teacher.flat_buffers) == len(stored_dtypes) + len({p.dtype for p in params})
    for t, p in zip(teacher.teacher_tensors, params):
        assert t.shape == p.shape and _storage_ptr(t) != _storage_ptr(p)
    total = sum(f.numel() * f.element_size() for f in teacher.flat_buffers)
    want = sum(p.numel() * (4 if kind == "ema" else p.element_size()) for p in params)
    assert total == want + sum(p.numel() * p.element_size() for p in params)  # nothing rounded up or duplicated


def test_cuda_host_buffers_are_pinned_once_in_place_and_released_with_the_teacher(monkeypatch):
    pinned, unpinned = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(teacher_kinds, "_pin_host", lambda flat: pinned.append((flat.data_ptr(), flat.nbytes)))
    monkeypatch.setattr(teacher_kinds, "_unpin_host", lambda flats: unpinned.extend(f.data_ptr() for f in flats))
    model = _model()
    teacher = build_teacher(TeacherConfig(kind="frozen", storage="cpu"), model.parameters())
    flats = [(f.data_ptr(), f.nbytes) for f in teacher.flat_buffers]
    assert pinned == flats and len(flats) == 4  # θ₀ and swap, bf16 and fp32: one registration each
    assert not unpinned
    del teacher
    gc.collect()
    assert sorted(unpinned) == sorted(ptr for ptr, _ in flats)


def test_live_teacher_allocates_nothing():
    teacher = build_teacher(TeacherConfig(kind="live"), _model().parameters())
    assert not hasattr(teacher, "flat_buffers")
