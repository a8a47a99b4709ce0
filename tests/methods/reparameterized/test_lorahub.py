"""LoRAHub: a gradient-free search over weights of trained LoRA adapters, written as a LoRA adapter."""
import pytest
import torch

from peftlab import LoraConfig, PeftlabError, get_peft_model
from peftlab.methods.reparameterized.lora import LoraLayer
from peftlab.methods.reparameterized.lorahub import few_shot_loss, lorahub

from ...conftest import tiny_bert

pytest.importorskip("nevergrad", reason="LoRAHub needs nevergrad (a dependency): pip install -e .")

TARGETS = ("query", "value", "classifier")


def _task(rule: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Random sequences whose label is read from one position: task 1 from position 1 (token 10 or 11),
    task 2 from position 2 (token 20 or 21). Every sequence carries both cues, so the tasks differ
    only in which cue the model must read."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(30, 100, (n, 8), generator=g)
    ids[:, 1] = 10 + torch.randint(0, 2, (n,), generator=g)
    ids[:, 2] = 20 + torch.randint(0, 2, (n,), generator=g)
    labels = (ids[:, 1] == 10) if rule == 1 else (ids[:, 2] == 20)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels.long()}


@pytest.fixture(scope="module")
def hub():
    """A tiny BERT with two LoRA adapters, each trained a few steps on its own labeling."""
    pm = get_peft_model(tiny_bert(), LoraConfig(r=4, alpha=8, targets=TARGETS), "task1")
    pm.add_adapter("task2", LoraConfig(r=4, alpha=8, targets=TARGETS))
    for name, rule in (("task1", 1), ("task2", 2)):
        torch.manual_seed(0)
        pm.set_adapter(name)
        pm.train()
        opt = torch.optim.Adam(pm.adapter_parameters(name), lr=2e-2)
        batch = _task(rule, 64, rule)
        for _ in range(25):
            pm(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    pm.set_adapter("task1")
    return pm


def _factors(layer, name):
    return (layer.lora_A[name].weight, layer.lora_B[name].weight)


def test_search_beats_uniform_weights_and_writes_the_linear_combination(hub):
    few = _task(1, 16, 99)  # a few examples of a task equal to task 1
    hub.add_weighted_adapter(["task1", "task2"], [0.5, 0.5], "uniform", "linear")
    hub.set_adapter("uniform")
    uniform = few_shot_loss(hub, few)
    hub.set_adapter("task1")
    before = {n: p.clone() for n, p in hub.named_parameters()}

    result = lorahub(hub, ["task1", "task2"], few, "found", seed=0)

    # The model is as it was, plus the new (inactive) adapter; the scratch adapter is gone.
    assert sorted(hub.peft_configs) == ["found", "task1", "task2", "uniform"]
    assert hub.active_adapters == ["task1"] and hub.training
    assert all(torch.equal(p, before[n]) for n, p in hub.named_parameters() if n in before)
    # The new adapter is A = sum w_i A_i, B = sum w_i B_i with the weights found.
    w = result.weights
    assert len(w) == 2 and all(-1.5 <= x <= 1.5 for x in w)
    layers = [m for _, m in hub.named_modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 5
    for layer in layers:
        (a1, b1), (a2, b2), (a, b) = (_factors(layer, n) for n in ("task1", "task2", "found"))
        assert torch.allclose(a, w[0] * a1 + w[1] * a2, atol=1e-6)
        assert torch.allclose(b, w[0] * b1 + w[1] * b2, atol=1e-6)
    assert hub.peft_configs["found"].scaling == hub.peft_configs["task1"].scaling
    # The search lowered the few-shot loss well below uniform weights, leaning on task 1's adapter.
    hub.set_adapter("found")
    found = few_shot_loss(hub, few)
    hub.set_adapter("task1")
    assert found == pytest.approx(result.loss, abs=1e-5)
    assert result.objective == pytest.approx(result.loss + 0.05 * (abs(w[0]) + abs(w[1])))
    assert found < 0.5 * uniform, (found, uniform, w)
    assert abs(w[0]) > abs(w[1])


def test_fixed_seed_reproduces_the_search(hub):
    few = [_task(1, 8, 7), _task(1, 8, 8)]  # a list of batches works too
    first = lorahub(hub, ["task1", "task2"], few, "run1", steps=12, seed=3)
    second = lorahub(hub, ["task1", "task2"], few, "run2", steps=12, seed=3)
    assert first == second
    for layer in (m for _, m in hub.named_modules() if isinstance(m, LoraLayer)):
        assert torch.equal(layer.delta_weight("run1"), layer.delta_weight("run2"))
    hub.delete_adapter("run1")
    hub.delete_adapter("run2")


def test_custom_loss_fn(hub):
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        logits = model(input_ids=batch["input_ids"]).logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"])

    result = lorahub(hub, ["task1", "task2"], _task(1, 8, 5), "custom", steps=5, loss_fn=loss_fn)
    assert len(calls) == 5 and result.loss >= 0
    hub.delete_adapter("custom")


@pytest.mark.parametrize("kwargs,match", [
    ({"new_name": "task1"}, "already exists"),
    ({"adapters": ["task1"]}, "at least two"),
    ({"steps": 0}, "steps"),
    ({"l1": -1.0}, "l1"),
    ({"bound": 0}, "bound"),
    ({"optimizer": "Gradient"}, "nevergrad optimizer"),
    ({"examples": {"input_ids": torch.randint(30, 100, (2, 8))}}, "no loss"),
    ({"examples": []}, "examples"),
    ({"adapters": ["task1", "r2"]}, "equal ranks"),
])
def test_bad_requests_raise_and_leave_the_model_as_it_was(hub, kwargs, match):
    if "r2" not in hub.peft_configs:
        hub.add_adapter("r2", LoraConfig(r=2, targets=TARGETS))
    call = {"adapters": ["task1", "task2"], "examples": _task(1, 4, 1), "new_name": "new", "steps": 3} | kwargs
    names, active = sorted(hub.peft_configs), hub.active_adapters
    with pytest.raises(PeftlabError, match=match):
        lorahub(hub, call.pop("adapters"), call.pop("examples"), call.pop("new_name"), **call)
    assert sorted(hub.peft_configs) == names and hub.active_adapters == active
