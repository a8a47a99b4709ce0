"""Every registered method's layers trace under ``torch.compile`` without a graph break.

``fullgraph=True`` turns any graph break into an error; the ``eager`` backend runs the captured
graph as is, so the test needs no C++ compiler and checks tracing only. Training mode with
gradients, as a training step runs it, plus the forward of eval mode.
"""
from __future__ import annotations

import pytest
import torch

from peftlab import PeftlabError, get_peft_model
from peftlab.core.registry import all_methods

from ..conftest import TINY_MODELS, apply_method, begin_training, main_output, model_inputs

CASES = [(spec, kind) for spec in all_methods() for kind in ("bert", "llama")]


@pytest.mark.parametrize("spec,kind", CASES, ids=[f"{s.name}-{k}" for s, k in CASES])
def test_traces_without_graph_breaks(spec, kind):
    torch._dynamo.reset()
    try:
        model, _ = apply_method(spec, TINY_MODELS[kind]())
    except PeftlabError as err:
        pytest.skip(f"{spec.name} does not apply to {kind}: {err}")
    inputs = model_inputs(kind)
    begin_training(model, kind)
    with torch.no_grad():  # after the data pass: a method may train in it (diff pruning's stage 1)
        expected = main_output(model.eval()(**inputs))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for train in (True, False):
        model.train(train)
        torch.manual_seed(0)  # dropout draws, if any, are not compared: train mode checks tracing only
        out = main_output(compiled(**inputs))
        if train:
            out.float().sum().backward()
            assert any(p.grad is not None for p in model.parameters() if p.requires_grad)
        else:
            torch.testing.assert_close(out, expected)
