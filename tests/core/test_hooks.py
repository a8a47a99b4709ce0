"""Training hooks run the same way in peftlab's loop, the HF Trainer and a plain PyTorch loop.

A probe method, registered for these tests only, records every hook call; each driver must
produce the same record: one data pass over the training batches, a loss term in every training
loss, the before/after-step hooks around every optimizer step with gradients present, and the
method's parameter group at its own learning rate.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest
import torch
from torch import nn

from peftlab import PeftlabError, get_peft_model
from peftlab.core import registry
from peftlab.core.config import PeftConfig
from peftlab.core.hooks import TrainingHookError, TrainingHooks
from peftlab.core.inject import wrap
from peftlab.core.layer import BufferDict, DeltaModule
from peftlab.core.targets import resolve_targets

from ..conftest import tiny_bert

STEPS = 4


@dataclasses.dataclass(frozen=True)
class ProbeConfig(PeftConfig):
    targets: tuple[str, ...] | str | None = ("classifier",)
    fail_at: int | None = None


class ProbeLayer(DeltaModule):
    """out = gain * base(x); a frozen counter of forward passes beside the trained gain."""

    adapter_attrs = ("gain",)
    frozen_attrs = ("seen",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.gain = nn.ParameterDict()
        self.seen = BufferDict()

    def add(self, name: str, config: ProbeConfig) -> None:
        self.gain[name] = nn.Parameter(torch.ones(()))
        self.seen[name] = torch.zeros((), dtype=torch.long)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        for name in self.live_adapters():
            self.seen[name] += 1
            out = out * self.gain[name]
        return out


LOG: list[tuple[Any, ...]] = []


def _layer(model, name) -> ProbeLayer:
    return next(m for _, m in model._delta_modules() if isinstance(m, ProbeLayer))


def _data_pass(model, name, data):
    LOG.append(("data", sum(1 for _ in data)))


def _loss(model, name):
    return 0.5 * (_layer(model, name).gain[name] - 1).pow(2) + 1.0  # +1: visible in the loss


def _before(model, name, state):
    if model.peft_configs[name].fail_at == state.step:
        raise RuntimeError("probe failure")
    LOG.append(("before", state.step, state.total_steps, _layer(model, name).gain[name].grad is not None))


def _after(model, name, state):
    LOG.append(("after", state.step))


def _end(model, name, data):
    LOG.append(("end", sum(1 for _ in data), model.training_state.step))


def _groups(model, name, lr, weight_decay):
    return [{"params": [_layer(model, name).gain[name]], "lr": lr * 10, "weight_decay": 0.0}]


def _attach(model, name, config, host=None):
    for path in resolve_targets(model, config.targets):
        wrap(model, path, ProbeLayer).add(name, config)


@pytest.fixture
def probe():
    spec = registry.register(registry.MethodSpec(
        name="hook_probe", family="additive", subcategory="test", config_cls=ProbeConfig, trains="a gain",
        attach=_attach, hooks=TrainingHooks(before_training=_data_pass, loss=_loss, before_step=_before,
                                            after_step=_after, param_groups=_groups,
                                            after_training=_end)))
    LOG.clear()
    yield spec
    registry._REGISTRY.pop("hook_probe")


def _batches():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (STEPS * 2, 8), generator=g)
    return [{"input_ids": ids[i:i + 2], "attention_mask": torch.ones(2, 8, dtype=torch.long),
             "labels": (ids[i:i + 2, 0] > 50).long()} for i in range(0, STEPS * 2, 2)]


EXPECTED = ([("data", STEPS)] + [e for s in range(STEPS) for e in (("before", s, STEPS, True), ("after", s))]
            + [("end", STEPS, STEPS)])


def test_plain_loop_with_one_call_per_step(probe):
    pm = get_peft_model(tiny_bert(), ProbeConfig())
    pm.train()
    groups = pm.param_groups(lr=1e-3)
    assert [g["lr"] for g in groups] == [1e-2]  # only the gain trains; its group at 10x
    optimizer = torch.optim.AdamW(groups)
    pm.begin_training(_batches(), STEPS)
    for batch in _batches():
        torch.manual_seed(0)  # the same dropout draws in both calls
        out = pm(**batch)
        torch.manual_seed(0)
        with torch.no_grad():  # no loss term outside a training forward with gradients
            task = pm(**batch).loss
        assert out.loss.item() == pytest.approx(task.item() + 1.0 + 0.5 * (_layer(pm, "default").gain["default"].item() - 1) ** 2, abs=1e-5)
        out.loss.backward()
        pm.optimizer_step(optimizer)
        optimizer.zero_grad()
    pm.end_training(_batches())
    assert LOG == EXPECTED
    assert pm.training_state.step == STEPS


def test_peftlab_train_loop(probe):
    from peftlab.train.loop import TrainArgs, train

    pm = get_peft_model(tiny_bert(), ProbeConfig())
    train(pm, _batches(), TrainArgs(epochs=1, lr=1e-3, progress=False, warmup_ratio=0.0))
    assert LOG == EXPECTED


def test_hf_trainer_with_the_callback(probe, tmp_path):
    from transformers import Trainer, TrainingArguments

    from peftlab.train.hf import PeftlabCallback

    class Rows(torch.utils.data.Dataset):
        def __init__(self):
            self.rows = [{k: v[i] for k, v in b.items()} for b in _batches() for i in range(2)]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    pm = get_peft_model(tiny_bert(), ProbeConfig())
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=1,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=pm, args=args, train_dataset=Rows(), callbacks=[PeftlabCallback()]).train()
    assert LOG == EXPECTED


def test_training_before_begin_is_refused_and_a_failing_hook_names_method_and_step(probe):
    pm = get_peft_model(tiny_bert(), ProbeConfig(fail_at=2))
    pm.base_model.train()
    with pytest.raises(PeftlabError, match="hook_probe acts during training.*begin_training"):
        pm(**_batches()[0])
    with pytest.raises(PeftlabError, match="before begin_training"):
        pm.before_optimizer_step()
    with torch.no_grad():  # evaluation needs no hooks
        pm(**_batches()[0])
    optimizer = torch.optim.SGD(pm.param_groups(lr=1e-3))
    pm.begin_training(_batches(), STEPS)
    with pytest.raises(TrainingHookError, match="hook_probe: training hook 'before_step' failed at step 2 of 4"):
        for batch in _batches():
            pm(**batch).loss.backward()
            pm.optimizer_step(optimizer)


def test_frozen_state_is_saved_loaded_and_never_trained(probe, tmp_path):
    from peftlab import PeftModel

    pm = get_peft_model(tiny_bert(), ProbeConfig())
    layer = _layer(pm, "default")
    assert [p for p in pm.parameters() if p.requires_grad] == [layer.gain["default"]]
    with torch.no_grad():
        pm(**_batches()[0])
        pm(**_batches()[1])
    assert int(layer.seen["default"]) == 2
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    assert int(_layer(loaded, "default").seen["default"]) == 2
    assert not any(b.requires_grad for b in loaded.buffers())
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "adapter_model.safetensors")
    state.pop(next(k for k in state if k.endswith("seen")))
    save_file(state, tmp_path / "adapter_model.safetensors")
    with pytest.raises(PeftlabError, match="missing key .*seen"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


# -- methods that run the forward themselves (around_forward, forward_kwargs) ---------------------

def _scaled(host, name, forward, args, kwargs, extra):
    """Multiply the logits by ``scale=`` (default 1); record what the hook saw."""
    LOG.append(("around", name, sorted(kwargs), extra.get("scale")))
    out = forward(*args, **kwargs)
    out["logits"] = out.logits * extra.get("scale", 1.0)
    return out


@pytest.fixture
def scaler():
    spec = registry.register(registry.MethodSpec(
        name="forward_probe", family="additive", subcategory="test", config_cls=ProbeConfig, trains="a gain",
        attach=_attach, around_forward=_scaled, forward_kwargs=("scale",)))
    LOG.clear()
    yield spec
    registry._REGISTRY.pop("forward_probe")


def test_around_forward_wraps_the_call_and_takes_its_keyword(scaler):
    pm = get_peft_model(tiny_bert(), ProbeConfig()).eval()
    batch = {k: v for k, v in _batches()[0].items() if k != "labels"}
    with torch.no_grad():
        plain = pm(**batch).logits
        scaled = pm(**batch, scale=3.0).logits
        with pm.disable_adapter():
            base = pm(**batch).logits
            # Nothing reads the keyword while the adapter is off: refused, not silently dropped.
            with pytest.raises(PeftlabError, match=r"scale= but no active, unmerged, enabled adapter reads it"):
                pm(**batch, scale=3.0)
    torch.testing.assert_close(scaled, 3.0 * plain)
    # The forward's signature names the keyword, so the HF Trainer's column filter keeps it.
    assert "scale" in inspect.signature(pm.forward).parameters
    torch.testing.assert_close(plain, base)  # the gain starts at 1
    # The base model never saw ``scale``; the hook ran once per call with the adapter active.
    assert LOG == [("around", "default", ["attention_mask", "input_ids"], None),
                   ("around", "default", ["attention_mask", "input_ids"], 3.0)]


def test_around_forward_hooks_nest_in_active_order(scaler):
    pm = get_peft_model(tiny_bert(), ProbeConfig())
    pm.add_adapter("second", ProbeConfig())
    pm.set_adapter(["default", "second"])
    pm.eval()
    batch = {k: v for k, v in _batches()[0].items() if k != "labels"}
    with torch.no_grad():
        plain = pm.base_model(**batch).logits
        out = pm(**batch, scale=2.0).logits
    torch.testing.assert_close(out, 4.0 * plain)  # each active adapter applied its hook once
    assert [entry[1] for entry in LOG] == ["default", "second"]  # the first active outermost
