"""Task adapters held apart from their heads: building one model from several, heads per task,
mixed-task batches, and the refusal of adapters from another base model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peftlab.apps.multitask import (TaskAdapter, TaskHeads, build, check_same_base, close_extra_outputs, joint_rows,
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


def test_joint_rows_carry_each_examples_task_and_keep_its_label(adapters):
    model_path, _ = adapters
    _, tokenizer = load_classifier(str(model_path), 3)
    examples = {"sst2": [Example("good", None, 1), Example("bad", None, 0)],
                "mnli": [Example("a", "b", 2)], "rte": [Example("c", "d", 1)]}
    rows = joint_rows(examples, tokenizer, 16)
    assert [(r["task_ids"], r["labels"]) for r in rows] == [(0, 1), (0, 0), (1, 2), (2, 1)]


def test_task_heads_give_each_example_its_own_tasks_head_and_width():
    torch.manual_seed(0)
    heads = TaskHeads(4, [2, 3], init_std=0.5)
    x = torch.randn(5, 4)
    heads.task_ids = torch.tensor([0, 1, 1, 0, 1])
    mixed = heads(x)
    for row, task in enumerate(heads.task_ids.tolist()):  # the same as that task's head alone
        own = x[row] @ heads.weight[task].T + heads.bias[task]
        assert torch.allclose(mixed[row, :2], own[:2], atol=1e-6)
        assert (mixed[row, 2] < -1e3) == (task == 0)  # a 2-class task's third output is closed
    heads.task_ids = torch.tensor(1)  # one id for the whole batch
    assert torch.allclose(heads(x), x @ heads.weight[1].T + heads.bias[1], atol=1e-6)
    heads.task_ids = torch.tensor([0, 0, 0, 0, 0])
    torch.nn.functional.cross_entropy(heads(x), torch.tensor([0, 1, 0, 1, 0])).backward()
    assert heads.weight.grad[1].abs().sum() == 0 and heads.weight.grad[0].abs().sum() > 0  # task 1's head untouched
    heads.task_ids = None
    with pytest.raises(PeftlabError, match="no task ids"):
        heads(x)


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
