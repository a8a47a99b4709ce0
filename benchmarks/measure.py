"""Timing and memory measurement.

Timing: every case runs the same number of warm-up calls, then the cases take turns (A, B, C,
..., then C, B, A, ...) with a reference case (the floor, the base model) run between every few
of them, so each measurement has a reference measured moments before and after it. A ratio is
the median over rounds of the per-round ratio of reference-normalized times: load on the
machine that changes within a round cancels, not only drift between rounds.

Memory: the peak bytes of live tensors during one step, counted as the tensors the case holds
before the step (parameters, buffers, gradients, optimizer state; each storage once) plus the
largest rise during the step. On CUDA the rise is the caching allocator's peak
(``torch.cuda.max_memory_allocated``). On CPU it is the running sum of the allocation and free
events that ``torch.profiler`` (``profile_memory=True``) records from PyTorch's CPU allocator.
That sees every tensor PyTorch allocates, including activations autograd saves in C++; it
misses memory allocated outside PyTorch's allocator (oneDNN/MKL scratch space, Python objects),
allocator fragmentation and the process's code and libraries.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Timings:
    """Seconds per call (wall and process CPU), one entry per round for every case, plus each
    measurement's *local reference*: the mean of the reference case's calls just before and just
    after it. Ratios divide by that local reference first, so a change of machine load within a
    round cancels as well as drift between rounds."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    local_wall: dict[str, list[float]]
    local_cpu: dict[str, list[float]]
    reference: str

    def ratio(self, key: str, ref: str, cpu: bool = False) -> float:
        """Median over rounds of ``key``'s time over ``ref``'s, each first normalized by its local
        reference (for ``ref == reference`` that is simply the key's time over the local reference)."""
        if key == ref:
            return 1.0
        times, local = (self.cpu, self.local_cpu) if cpu else (self.wall, self.local_wall)

        def norm(k: str) -> Iterable[float]:
            if k == self.reference:  # each of its runs, divided by itself
                return itertools.repeat(1.0)
            return (t / r for t, r in zip(times[k], local[k]))

        return statistics.median(a / b for a, b in zip(norm(key), norm(ref)))


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: str,
                      reference: str | None = None, every: int = 4) -> Timings:
    """Time every function ``repeats`` rounds, taking turns (order reversed on odd rounds), with the
    ``reference`` function (default: the first) run before every ``every`` others and at the end of
    each round.

    CPU time is the less noisy of the two on a shared machine: time spent descheduled does not
    count, although OpenMP threads spinning at a barrier for a descheduled sibling still do.
    """
    reference = reference or next(iter(fns))
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    order = [k for k in fns if k != reference]
    seq: list[tuple[str, float, float]] = []
    gc.collect()
    gc.disable()  # a collection inside one timed call would land on whichever case triggered it
    try:
        for r in range(repeats):
            keys = order if r % 2 == 0 else order[::-1]
            plan = [k for i, key in enumerate(keys) for k in ((reference, key) if i % every == 0 else (key,))]
            for key in plan + [reference]:
                sync(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                fns[key]()
                sync(device)
                seq.append((key, time.perf_counter() - start, time.process_time() - start_cpu))
    finally:
        gc.enable()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    local_wall: dict[str, list[float]] = {k: [] for k in fns}
    local_cpu: dict[str, list[float]] = {k: [] for k in fns}
    refs = [i for i, (k, _, _) in enumerate(seq) if k == reference]
    for i, (key, w, c) in enumerate(seq):
        wall[key].append(w)
        cpu[key].append(c)
        if key != reference:
            before = max(j for j in refs if j < i)
            after = min(j for j in refs if j > i)
            local_wall[key].append(0.5 * (seq[before][1] + seq[after][1]))
            local_cpu[key].append(0.5 * (seq[before][2] + seq[after][2]))
    return Timings(wall, cpu, local_wall, local_cpu, reference)


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared and tied tensors count once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def held_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """What a training case keeps between steps: weights, buffers, gradients, optimizer state."""
    out: list[torch.Tensor] = list(model.parameters()) + list(model.buffers())
    out += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        for state in optimizer.state.values():
            out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's start/stop lines, which its C++ side writes straight to fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_rise_bytes(fn: Callable[[], object], device: str) -> int:
    """Largest rise of live tensor bytes above the level at the start, while ``fn`` runs."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - start)
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    events.sort(key=lambda e: e[0])
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def parallel_speedup(threads: int) -> float:
    """How much faster a 1024x1024 matmul runs on ``threads`` threads than on one.

    Close to ``threads`` on an idle machine. Much less means other processes hold the cores:
    every parallel region then waits for a descheduled thread, which penalizes a case in
    proportion to how many operators it launches, not how much work it does.
    """
    a = torch.randn(1024, 1024)
    previous = torch.get_num_threads()

    def best(n: int) -> float:
        torch.set_num_threads(n)
        a @ a
        times = []
        for _ in range(5):
            start = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - start)
        return min(times)

    try:
        return best(1) / best(threads)
    finally:
        torch.set_num_threads(previous)
