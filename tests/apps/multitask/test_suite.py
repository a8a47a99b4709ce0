"""The multi-task suite end to end on a tiny BERT, and its bad-input errors."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from peftlab.apps import app_suite
from peftlab.apps.multitask import MultitaskSuite, run_multitask
from peftlab.cli import main
from peftlab.core.errors import PeftlabError
from tests.assess.conftest import write_glue

TASKS = ("sst2", "qnli", "mrpc")


def _suite(tiny_model: Path, glue: Path, **changes) -> MultitaskSuite:
    base = MultitaskSuite(model=str(tiny_model), data_dir=str(glue), tasks=TASKS, train_limit=24, eval_limit=12,
                          max_length=32, batch_size=8, target="mrpc", spot_source="qnli", target_shots=16,
                          target_epochs=2, lorahub_steps=3, mixed_examples=5, mixed_repeats=1)
    return dataclasses.replace(base, **changes)


@pytest.fixture
def glue(tmp_path) -> Path:
    return write_glue(tmp_path / "glue", tasks=("SST-2", "QNLI", "MRPC"), n_train=40, n_dev=12)


def test_the_suite_runs_every_stage_and_reports_them(tmp_path, tiny_model, glue):
    lines: list[str] = []
    results = run_multitask(_suite(tiny_model, glue), tmp_path / "out", echo=lines.append)
    assert {(r["method"], r["task"]) for r in results["single"]} == {
        *((m, t) for m in ("lora", "sequential_adapter") for t in TASKS), ("prompt_tuning", "sst2"),
        ("prompt_tuning", "qnli")}  # prompts on the sources only
    assert [r["kind"] for r in results["combined"]] == ["linear", "ties", "dare_linear", "fusion", "joint"]
    assert all(set(r["scores"]) == set(TASKS) for r in results["combined"])
    joint = results["combined"][-1]
    assert "routed by its task id" in joint["combination"] and joint["trainable"] > 0
    kinds = [r["kind"] for r in results["transfer"]]
    assert kinds == ["alone", "alone", "alone", "from_source", "from_source", "lorahub", "fusion", "mixture"]
    hub = next(r for r in results["transfer"] if r["kind"] == "lorahub")
    assert set(hub["weights"]) == {"sst2", "qnli"}  # the sources: every task but the target
    assert results["mixed"]["examples"] == 15 and results["mixed"]["max_logit_difference"] < 1e-4
    report = (tmp_path / "out" / "report.md").read_text()
    for heading in ("## 1. One adapter per task", "## 2. Combinations", "## 3. Transfer", "## 4. Mixed-task"):
        assert heading in report
    for plot in ("multitask_combinations.png", "multitask_transfer.png"):
        assert (tmp_path / "out" / plot).stat().st_size > 1000
    assert json.loads((tmp_path / "out" / "results.json").read_text())["wall_s"] > 0
    assert any(line.startswith("[mixed]") for line in lines)


@pytest.mark.parametrize("changes, message", [
    ({"tasks": ("sst2",)}, r"tasks=\['sst2'\]: a multi-task suite needs at least two different tasks"),
    ({"tasks": ("sst2", "sst2")}, "at least two different tasks"),
    ({"tasks": ("sst2", "stsb")}, "'stsb' is a regression task"),
    ({"target": "cola"}, r"target='cola' is not one of the tasks"),
    ({"spot_source": "mrpc"}, "spot_source='mrpc' is the target itself"),
    ({"target_shots": 0}, "target_shots=0: expected a positive whole number"),
    ({"target_epochs": -1}, "target_epochs=-1: expected a positive number"),
    ({"merge_weights": {"svd": 1.0}}, "merge_weights="),
])
def test_bad_settings_are_refused_by_name(tmp_path, changes, message):
    with pytest.raises(PeftlabError, match=message):
        _suite(tmp_path, tmp_path, **changes)


def test_preflight_refuses_before_training(tmp_path, tiny_model, glue):
    with pytest.raises(PeftlabError, match=r"cannot merge adapters by \['nope'\]"):
        run_multitask(_suite(tiny_model, glue, merge_types=("nope",), merge_options={}, merge_weights={}),
                      tmp_path / "a")
    with pytest.raises(PeftlabError, match="target_shots=100 but mrpc has 24"):
        run_multitask(_suite(tiny_model, glue, target_shots=100), tmp_path / "b")
    with pytest.raises(PeftlabError, match="joint_method 'lora' cannot route examples by task"):
        run_multitask(_suite(tiny_model, glue, joint_method="lora"), tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_the_yaml_and_the_command_line_reach_the_suite(tmp_path, tiny_model, glue):
    suite = app_suite("multitask", {"tasks": ["sst2", "mrpc"], "target": "mrpc", "spot_source": "sst2"}, "x.yaml")
    assert suite.tasks == ("sst2", "mrpc")
    with pytest.raises(PeftlabError, match="x.yaml: .*'shares'.* are not settings of the multitask suite"):
        app_suite("multitask", {"shares": [0.1]}, "x.yaml")
    config = tmp_path / "mt.yaml"
    config.write_text("suite: multitask\ntasks: [sst2]\n")
    assert main(["assess", "--config", str(config), "--out", str(tmp_path / "o")]) != 0
