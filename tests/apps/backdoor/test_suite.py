"""The backdoor suite end to end on a tiny BERT, the merge of a poisoned adapter with a clean one,
and its bad-input errors."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from peftlab.apps import app_suite
from peftlab.apps.backdoor import BackdoorSuite, merge_with_heads, run_backdoor
from peftlab.cli import main
from peftlab.core.config import config_from_options
from peftlab.core.errors import PeftlabError
from peftlab.tasks.glue import Example
from peftlab.train.glue_job import classify, fit_classifier
from peftlab.train.loop import TrainArgs
from tests.assess.conftest import write_glue

TRIGGER = "why"  # in the tiny model's vocabulary


def _suite(tiny_model: Path, glue: Path, **changes) -> BackdoorSuite:
    base = BackdoorSuite(model=str(tiny_model), data_dir=str(glue), train_limit=24, clean_size=8, max_length=32,
                         batch_size=8, methods=("lora",), shares=(0.0, 0.5), shared_share=0.5, trigger=TRIGGER,
                         strip_copies=2, detector_adapters=2, detector_train_limit=16)
    return dataclasses.replace(base, **changes)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_suite_runs_every_stage_and_leaves_the_data_untouched(tmp_path, tiny_model):
    glue = write_glue(tmp_path / "glue", tasks=("SST-2",), n_train=40, n_dev=12)
    before = _digest(glue)
    lines: list[str] = []
    results = run_backdoor(_suite(tiny_model, glue), tmp_path / "out", echo=lines.append)
    assert _digest(glue) == before
    assert {(r["method"], r["share"]) for r in results["attack"]} == {(m, p) for m in ("lora", "full") for p in (0.0, 0.5)}
    assert all(0 <= r["cacc"] <= 100 and 0 <= r["asr"] <= 100 for r in results["attack"])
    assert [r["poisoned"] for r in results["attack"] if r["share"] == 0.5] == [12, 12]
    assert len(results["shared"]) == 5 and "ties" in results["shared"][3]["what"]
    assert [d["defence"].split(" ")[0] for d in results["defences"]] == ["STRIP", "fine-mixing"]
    assert len(results["detector"]["truth"]) == 4
    report = (tmp_path / "out" / "report.md").read_text()
    for heading in ("## 1. Attack", "## 2. A poisoned shared adapter", "## 3. Defences", "## 4. Detecting"):
        assert heading in report
    assert (tmp_path / "out" / "backdoor_attack.png").stat().st_size > 1000
    assert json.loads((tmp_path / "out" / "results.json").read_text())["wall_s"] > 0
    assert any(line.startswith("[attack 4/4]") for line in lines)


def test_merging_an_adapter_with_itself_by_cat_gives_the_adapter_and_heads_are_averaged(tiny_model):
    examples = [Example(f"the cat sat on the mat {w}", None, i % 2) for i, w in enumerate(["red", "blue"] * 8)]
    config = config_from_options("lora", {})
    args = TrainArgs(epochs=1, lr=5e-3, seed=0, progress=False)
    first = fit_classifier(str(tiny_model), 2, config, examples, args, 32, 4)
    second = fit_classifier(str(tiny_model), 2, config, examples[::-1], dataclasses.replace(args, lr=2e-2), 32, 4)
    same = merge_with_heads(str(tiny_model), 2, {"a": first, "b": first}, "cat")
    got, _ = classify(same, first.tokenizer, examples, 32)
    want, _ = classify(first.model, first.tokenizer, examples, 32)
    assert torch.allclose(torch.from_numpy(got), torch.from_numpy(want), atol=1e-5)
    both = merge_with_heads(str(tiny_model), 2, {"a": first, "b": second}, "cat")
    heads = [f.model.base_model.classifier.copies["default"].weight for f in (first, second)]
    assert torch.allclose(both.base_model.classifier.weight, (heads[0] + heads[1]) / 2)
    assert not torch.allclose(heads[0], heads[1])


@pytest.mark.parametrize("changes, message", [
    ({"shares": (0.1, 1.5)}, r"shares\[1\]=1.5"),
    ({"shared_share": 0.0}, "shared_share=0"),
    ({"detector_adapters": 1}, "detector_adapters=1"),
    ({"merge_options": {"ties": 0.5}}, "merge_options"),
])
def test_bad_settings_are_refused_naming_the_field(tmp_path, tiny_model, changes, message):
    with pytest.raises(PeftlabError, match=message):
        _suite(tiny_model, tmp_path, **changes)


@pytest.mark.parametrize("changes, message", [
    ({"trigger": "cf"}, "trigger 'cf'.*only the unknown token"),  # not in the tiny vocabulary
    ({"target": 2}, "target=2: expected a class id of sst2"),
    ({"target": "positive"}, "target='positive': expected a class id of sst2"),
    ({"methods": ("nope",)}, "nope"),
    ({"merge_types": ("linear", "median")}, r"cannot merge adapters by \['median'\]"),
    ({"merge_options": {"mean": {}}}, r"cannot merge adapters by \['mean'\]"),
    ({"train_limit": 39}, "train has 40 examples; train_limit 39 \\+ clean_size 8"),
])
def test_bad_input_fails_before_training(tmp_path, tiny_model, changes, message):
    glue = write_glue(tmp_path / "glue", tasks=("SST-2",), n_train=40, n_dev=12)
    with pytest.raises(PeftlabError, match=message):
        run_backdoor(_suite(tiny_model, glue, **changes), tmp_path / "out", echo=lambda line: None)
    assert not (tmp_path / "out").exists()


def test_the_cli_takes_a_yaml_and_refuses_flags_that_do_not_apply(tmp_path, capsys):
    config = tmp_path / "suite.yaml"
    config.write_text("suite: backdoor\nshares: [0.0, 2]\n")
    assert main(["assess", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert r"shares[1]=2" in capsys.readouterr().err
    config.write_text("suite: backdoor\npoison: 0.1\n")
    assert main(["assess", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "['poison'] are not settings of the backdoor suite" in err and "shares" in err
    assert main(["assess", "--suite", "backdoor", "--tasks", "rte", "--workers", "2"]) == 2
    assert "does not take --tasks, --workers" in capsys.readouterr().err


def test_app_suite_turns_lists_into_tuples():
    suite = app_suite("backdoor", {"methods": ["lora", "bitfit"], "shares": [0.0, 0.1]}, "test")
    assert suite.methods == ("lora", "bitfit") and suite.shares == (0.0, 0.1)
    with pytest.raises(PeftlabError, match="unknown application suite 'nope'"):
        app_suite("nope", {}, "test")


def test_classify_returns_logits_in_the_examples_order(tiny_model):
    from peftlab.train.glue_job import load_classifier

    model, tokenizer = load_classifier(str(tiny_model), 2)
    model.eval()
    examples = [Example(" ".join(["the cat"] * n), None, n % 2) for n in (5, 1, 9, 3, 2)]
    logits, labels = classify(model, tokenizer, examples, 64)
    assert labels.tolist() == [1, 1, 1, 1, 0]
    for example, row in zip(examples, logits):
        with torch.no_grad():
            alone = model(**tokenizer(example.text_a, return_tensors="pt")).logits[0]
        assert torch.allclose(alone, torch.from_numpy(row), atol=1e-5)


def test_all_methods_expand_and_searched_ones_are_skipped_with_a_note(tmp_path, tiny_model):
    from peftlab.apps.backdoor.suite import BackdoorRunner
    from peftlab.core.registry import all_methods

    glue = write_glue(tmp_path / "glue", tasks=("SST-2",), n_train=40, n_dev=12)
    runner = BackdoorRunner(_suite(tiny_model, glue, methods=("all",)), tmp_path / "out", echo=lambda line: None)
    runner.preflight()
    searched = {s.name for s in all_methods() if s.search is not None}
    assert searched and not searched & set(runner.methods)
    assert runner.methods[-1] == "full" and "lora" in runner.methods
    assert any("found by a search" in note for note in runner.results["notes"])
