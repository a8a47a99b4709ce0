"""Peak memory on CPU: the dispatch-mode tracker counts what operators allocate, frees what dies,
ignores storages that existed before, and the probe adds what training holds."""
from __future__ import annotations

import contextlib

import torch

from peftlab.assess.measure import LiveTensorBytes, MemoryProbe, held_tensors, measure_peak, storage_bytes
from peftlab.train.loop import TrainResult


def test_peak_of_known_allocations():
    x = torch.randn(64, 64)  # 16 KiB, exists before: not counted
    block = 64 * 64 * 4

    def fn():
        y = x @ x            # +16 KiB
        z = torch.relu(y)    # +16 KiB -> 32 KiB live
        del y                # -16 KiB
        w = z * 2            # +16 KiB -> 32 KiB live again
        return w.sum()

    assert measure_peak(fn) == 2 * block + 4  # the 4-byte scalar from sum() is still alive at the end


def test_views_of_existing_storage_and_frees():
    x = torch.randn(256)
    with LiveTensorBytes(known=[x]) as mode:
        v = x.view(16, 16).t()  # a view of a known storage costs nothing
        assert mode.level == 0
        y = torch.exp(x)
        assert mode.level == 256 * 4
        del y
        assert mode.level == 0
        assert v.shape == (16, 16)
    assert mode.peak == 256 * 4


def test_storage_bytes_counts_shared_storage_once():
    a = torch.zeros(10)
    assert storage_bytes([a, a[2:], a.view(2, 5)]) == 40
    assert storage_bytes([a, torch.zeros(5), None, 3]) == 60


def test_probe_on_a_training_step_adds_held_tensors():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x, y = torch.randn(8, 32), torch.randint(0, 2, (8,))
    probe = MemoryProbe(steps=(1,))
    weights = sum(p.numel() for p in net.parameters()) * 4
    for step in range(3):
        context = probe(step, net, opt)
        assert (context is None) == (step != 1)
        with context or contextlib.nullcontext():
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    # at step 1 the weights and both AdamW moments are held; gradients and activations come on top
    assert probe.held_bytes >= 3 * weights
    assert probe.peak_bytes >= probe.held_bytes + weights  # the gradients alone are one more copy
    assert probe.method and "TorchDispatchMode" in probe.method
    assert storage_bytes(held_tensors(net, opt)) >= 3 * weights


def test_frozen_model_needs_less_than_full_training():
    torch.manual_seed(0)

    def peak(trainable: bool) -> int:
        net = torch.nn.Sequential(*[torch.nn.Linear(128, 128) for _ in range(4)])
        net.requires_grad_(trainable)
        net[-1].requires_grad_(True)
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
        probe = MemoryProbe(steps=(1,))
        for step in range(2):
            with probe(step, net, opt) or contextlib.nullcontext():
                net(torch.randn(4, 128)).sum().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        return probe.peak_bytes

    assert peak(False) < peak(True)


def test_probed_steps_leave_step_time_and_throughput():
    result = TrainResult(steps=6, final_loss=0.0, step_times=[9.0, 5.0, 5.0, 1.0, 1.0, 1.0, 1.0],
                         step_tokens=[10] * 7, tokens=70, wall_s=23.0, probed_steps=[1, 2])
    # unprobed steps: 0, 3, 4, 5, 6 -> skip the first three -> 1.0
    assert result.median_step_s == 1.0
    assert result.tokens_per_s == (70 - 20) / (23.0 - 10.0)
