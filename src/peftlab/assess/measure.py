"""Peak training memory, measured the same way for every method.

GPU: ``torch.cuda.max_memory_allocated`` over the probed steps (the caching allocator's own count
of bytes handed out to tensors, reset before the first probed step).

CPU: PyTorch has no allocator counter on CPU, so :class:`LiveTensorBytes` watches every operator
call through a ``TorchDispatchMode``: each tensor an operator returns is traced to its storage,
the storage's bytes are added to a running level, and a weak reference on the storage subtracts
them again when the storage is freed. The peak of a probed step is

    bytes held when the step starts (weights, buffers, gradients, optimizer state; one count per
    storage, so tied weights count once) + the highest rise of the level during the step
    (activations kept for backward, gradients, optimizer state created on the first step,
    temporaries of the optimizer and of gradient clipping).

What it misses is written in docs/assessment.md: memory that no operator returns as a tensor
(scratch space inside a kernel, oneDNN/MKL work buffers), the allocator's slack and
fragmentation, Python objects, and the process's code and libraries. It is therefore a floor of
what ``ps`` would show, but it is the same floor for every method, which is what a side-by-side
table needs.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CPU_METHOD = "live tensor storage bytes (TorchDispatchMode), held + peak rise"
CUDA_METHOD = "torch.cuda.max_memory_allocated"


def storage_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and tied weights count once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def held_tensors(model: nn.Module, optimizer: Any = None) -> list[torch.Tensor]:
    """What training keeps between steps: parameters, buffers, gradients, optimizer state."""
    params = list(model.parameters())
    out: list[torch.Tensor] = params + list(model.buffers()) + [p.grad for p in params if p.grad is not None]
    state = getattr(optimizer, "state", None) or {}
    for entry in state.values():
        out += [v for v in entry.values() if isinstance(v, torch.Tensor)]
    return out


class LiveTensorBytes(TorchDispatchMode):
    """Running total (and peak) of bytes in storages that operators create while the mode is on.

    Storages that exist before (``known``) are never counted, so a view of a weight costs nothing.
    """

    def __init__(self, known: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._known = {t.untyped_storage().data_ptr() for t in known if isinstance(t, torch.Tensor)}
        self._live: dict[int, tuple[int, weakref.ref]] = {}
        self.level = 0
        self.peak = 0

    def _forget(self, key: int) -> Any:
        def callback(_: Any) -> None:
            entry = self._live.pop(key, None)
            if entry is not None:
                self.level -= entry[0]
        return callback

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self._known or key in self._live:
            return
        nbytes = storage.nbytes()
        self._live[key] = (nbytes, weakref.ref(storage, self._forget(key)))
        self.level += nbytes
        self.peak = max(self.peak, self.level)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out


class MemoryProbe:
    """A :data:`peftlab.train.loop.StepProbe` that measures peak memory of the steps in ``steps``.

    After training, ``peak_bytes`` is the highest peak over the probed steps (``None`` if no
    step was probed) and ``method`` says how it was measured.
    """

    def __init__(self, steps: Iterable[int] = (1, 2)) -> None:
        self.steps = frozenset(steps)
        self.peak_bytes: int | None = None
        self.method: str | None = None
        self.held_bytes: int | None = None

    def __call__(self, step: int, model: nn.Module, optimizer: Any) -> Any:
        if step not in self.steps:
            return None
        device = next(model.parameters()).device
        return self._cuda(device) if device.type == "cuda" else self._cpu(model, optimizer)

    def _record(self, peak: int, held: int, method: str) -> None:
        self.peak_bytes = max(self.peak_bytes or 0, peak)
        self.held_bytes = max(self.held_bytes or 0, held)
        self.method = method

    @contextlib.contextmanager
    def _cuda(self, device: torch.device) -> Iterator[None]:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize(device)
        self._record(torch.cuda.max_memory_allocated(device), held, CUDA_METHOD)

    @contextlib.contextmanager
    def _cpu(self, model: nn.Module, optimizer: Any) -> Iterator[None]:
        held = held_tensors(model, optimizer)
        held_bytes = storage_bytes(held)
        mode = LiveTensorBytes(known=held)
        with mode:
            yield
        self._record(held_bytes + mode.peak, held_bytes, CPU_METHOD)


def measure_peak(fn: Any, known: Iterable[torch.Tensor] = ()) -> int:
    """Peak rise of live tensor bytes while ``fn()`` runs on CPU (for tests and one-off checks)."""
    with LiveTensorBytes(known=known) as mode:
        fn()
    return mode.peak
