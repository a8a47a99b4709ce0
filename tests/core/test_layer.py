"""core/layer.py helpers."""
from __future__ import annotations

import torch
from torch import nn

from peftlab.core.layer import built_once_without_grad


def test_a_weight_built_without_grad_is_reused_until_its_sources_change():
    owner, source = nn.Module(), nn.Parameter(torch.ones(3))
    calls = []

    def build():
        calls.append(1)
        return source * 2

    with torch.no_grad():
        first = built_once_without_grad(owner, "w", (source,), build)
        assert built_once_without_grad(owner, "w", (source,), build) is first and len(calls) == 1
        source.add_(1.0)  # an optimizer step is in place: the version moves
        assert torch.equal(built_once_without_grad(owner, "w", (source,), build), torch.full((3,), 4.0))
        source.data = torch.zeros(3)  # new storage (a load, a device move)
        assert torch.equal(built_once_without_grad(owner, "w", (source,), build), torch.zeros(3))
    with torch.inference_mode():
        built_once_without_grad(owner, "w", (source,), build)
    assert len(calls) == 3
    out = built_once_without_grad(owner, "w", (source,), build)  # with gradients: built every call
    assert out.requires_grad and len(calls) == 4
