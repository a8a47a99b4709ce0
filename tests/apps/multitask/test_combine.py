"""Task adapters held apart from their heads: building one model from several, heads per task,
mixed-task batches, and the refusal of adapters from another base model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peftlab.apps.multitask import (TaskAdapter, build, check_same_base, close_extra_outputs, joint_rows,
                                    mixed_batch_throughput, put_head, score)
from peftlab.core.config import config_from_options
from peftlab.core.errors import PeftlabError
from peftlab.tasks.glue import Example, get_glue_task
from peftlab.train.glue_job import HEADS, classify, fit_classifier, load_classifier
from peftlab.train.loop import TrainArgs
from tests.assess.conftest import write_tiny_model

WORDS = ["red", "blue", "cat", "dog"]


def _examples(offset: int) -> list[Example]:
    return [Example(f"the {w} sat on the mat", None, (i + offset) % 2) for i, w in enumerate(WORDS * 4)]


def _fit(model: Path, method: str, offset: int, width: int = 3, seed: int = 0) -> TaskAdapter:
    config = config_from_options(method, {}).replace(modules_to_save=HEADS)
    fitted = fit_classifier(str(model), width, config, _examples(offset), TrainArgs(epochs=2, lr=5e-2, seed=seed,
                                                                                   progress=False), 16, 8)
    return TaskAdapter.from_fitted(f"task{offset}", fitted, str(model))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> tuple[Path, dict[str, TaskAdapter]]:
    model = write_tiny_model(tmp_path_factory.mktemp("tiny"))
    return model, {"a": _fit(model, "lora", 0), "b": _fit(model, "lora", 1, seed=1)}


def test_a_built_model_with_heads_reproduces_each_trained_adapter(adapters):
    model_path, found = adapters
    model, tokenizer = build(str(model_path), 3, found, heads=True)
    for name, adapter in found.items():
        model.set_adapter(name)
        fresh, _ = build(str(model_path), 3, {name: adapter}, heads=True)
        logits, _ = classify(model, tokenizer, _examples(0), 16)
        alone, _ = classify(fresh, tokenizer, _examples(0), 16)
        assert torch.allclose(torch.from_numpy(logits), torch.from_numpy(alone), atol=1e-6)
    model.set_adapter("a")
    a, _ = classify(model, tokenizer, _examples(0), 16)
    model.set_adapter("b")
    b, _ = classify(model, tokenizer, _examples(0), 16)
    assert not torch.allclose(torch.from_numpy(a), torch.from_numpy(b))  # the adapters differ: the check can fail


def test_put_head_swaps_only_the_head_and_a_headless_body_with_its_head_is_the_adapter(adapters):
    model_path, found = adapters
    with_heads, tokenizer = build(str(model_path), 3, {"a": found["a"]}, heads=True)
    headless, _ = build(str(model_path), 3, {"a": found["a"]}, heads=False)
    put_head(headless, found["a"].head)
    want, _ = classify(with_heads, tokenizer, _examples(0), 16)
    got, _ = classify(headless, tokenizer, _examples(0), 16)
    assert torch.allclose(torch.from_numpy(want), torch.from_numpy(got), atol=1e-6)
    put_head(headless, found["b"].head)
    other, _ = classify(headless, tokenizer, _examples(0), 16)
    assert not torch.allclose(torch.from_numpy(want), torch.from_numpy(other))
    with pytest.raises(PeftlabError, match="base classifier"):
        put_head(with_heads, found["a"].head)


def test_the_body_leaves_out_the_head(adapters):
    _, found = adapters
    body = found["a"].body()
    assert body and all("lora_" in k for k in body)
    assert set(found["a"].state) - set(body) and all("classifier" in k for k in set(found["a"].state) - set(body))


def test_a_task_is_scored_on_its_own_classes_logits(adapters):
    model_path, found = adapters
    model, tokenizer = build(str(model_path), 3, {"a": found["a"]}, heads=False)
    head = next(iter(found["a"].head.values()))
    # The third output dominates every example; a 2-class task must not see it.
    put_head(model, {path: {"weight": torch.zeros_like(head["weight"]),
                            "bias": torch.tensor([0.0, 1.0, 100.0])} for path in found["a"].head})
    examples = [Example("the red cat", None, 1), Example("the blue dog", None, 0)]
    assert score(model, tokenizer, get_glue_task("sst2"), examples, 16) == 50.0  # always class 1, never class 2


def test_a_task_in_a_shared_head_is_scored_on_its_own_outputs(adapters):
    model_path, found = adapters
    model, tokenizer = build(str(model_path), 5, {"a": found["a"]}, heads=False)
    head = next(iter(found["a"].head))
    # outputs 0-1: one task's classes (class 0 wins), outputs 3-4: another's (class 1 wins)
    put_head(model, {head: {"weight": torch.zeros(5, found["a"].head[head]["weight"].shape[1]),
                            "bias": torch.tensor([100.0, 0.0, 50.0, 0.0, 5.0])}})
    positive = [Example("the red cat", None, 1), Example("the blue dog", None, 1)]
    sst2 = get_glue_task("sst2")
    assert score(model, tokenizer, sst2, positive, 16, offset=3) == 100.0
    assert score(model, tokenizer, sst2, positive, 16, offset=0) == 0.0


def test_joint_rows_move_each_label_to_its_tasks_outputs_and_carry_the_task(adapters):
    model_path, _ = adapters
    _, tokenizer = load_classifier(str(model_path), 3)
    examples = {"sst2": [Example("good", None, 1), Example("bad", None, 0)],
                "mnli": [Example("a", "b", 2)], "rte": [Example("c", "d", 1)]}
    rows = joint_rows(examples, tokenizer, 16, {"sst2": 0, "mnli": 2, "rte": 5})
    assert [(r["task_ids"], r["labels"]) for r in rows] == [(0, 1), (0, 0), (1, 4), (2, 6)]
    assert examples["mnli"][0].label == 2  # the examples themselves are left as they were


def test_mixed_batches_give_each_row_its_own_adapter_and_head(adapters):
    model_path, found = adapters
    model, tokenizer = build(str(model_path), 3, found, heads=True)
    examples = {"a": _examples(0)[:5], "b": _examples(1)[:7]}
    result = mixed_batch_throughput(model, tokenizer, examples, 16, batch_size=4, repeats=1)
    assert result["examples"] == 12 and result["max_logit_difference"] < 1e-5
    assert result["mixed_examples_per_s"] > 0 and result["per_task_examples_per_s"] > 0
    assert model.active_adapters == ["a"]  # restored


def test_adapters_from_another_base_model_are_refused_by_name(adapters, tmp_path):
    model_path, found = adapters
    other = write_tiny_model(tmp_path / "other")
    stranger = _fit(other, "lora", 0)
    with pytest.raises(PeftlabError, match=r"\['c'\] were trained on .*other.*train every adapter on one base"):
        check_same_base({"a": found["a"], "c": stranger}, str(model_path))
    with pytest.raises(PeftlabError, match="trained on"):
        build(str(model_path), 3, {"a": found["a"], "c": stranger}, heads=False)


def test_closed_extra_outputs_train_as_a_head_of_the_tasks_own_width(tmp_path):
    from peftlab.core.model import get_peft_model

    model_path = write_tiny_model(tmp_path / "m")
    base, tokenizer = load_classifier(str(model_path), 3)
    model = get_peft_model(base, config_from_options("lora", {}).replace(modules_to_save=HEADS))
    close_extra_outputs(model, "default", 2)
    batch = dict(tokenizer(["the cat", "a dog ran"], padding=True, return_tensors="pt"), labels=torch.tensor([0, 1]))
    out = model(**batch)
    assert torch.all(out.logits[:, 2] == -1e4)
    two_way = torch.nn.functional.cross_entropy(out.logits[:, :2], batch["labels"])
    torch.testing.assert_close(out.loss, two_way)  # the closed output takes no probability
    out.loss.backward()
    head = next(m.copies["default"] for m in model.modules() if hasattr(m, "copies") and "default" in m.copies)
    assert head.bias.grad[2] == 0 and torch.all(head.weight.grad[2] == 0)
    assert head.bias.grad[:2].abs().sum() > 0
    with pytest.raises(PeftlabError, match="no head of its own"):
        close_extra_outputs(model, "other", 2)
