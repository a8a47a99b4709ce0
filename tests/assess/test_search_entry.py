"""A method found by a search joins the study: its search runs on held-out training examples, the
found config is the run's, and the report says what was searched and chosen; `peftlab search` writes
the found config, which `peftlab train --config` trains. A test-only searched method stands in for
AutoPEFT, S3Delta-M and S4 (registered for the test only)."""
from __future__ import annotations

import dataclasses
import json
import time

import pytest

from peftlab.cli import main
from peftlab.core import registry
from peftlab.core.config import PeftConfig
from peftlab.core.search import SearchResult, pareto_front
from peftlab.methods.reparameterized import lora

from .conftest import write_glue


@dataclasses.dataclass(frozen=True)
class RankSearchConfig(PeftConfig):
    targets: tuple[str, ...] | str | None = ("@query", "@value")
    r: int = 8
    candidates: tuple[int, ...] = (1, 2, 4)


def _attach(model, name, config, host):
    lora.SPEC.attach(model, name, lora.LoraConfig(targets=config.targets, r=config.r), host)


CALLS: list[tuple[int, int | None]] = []


def _search(context, budget, config):
    started, trials = time.perf_counter(), []
    for r in config.candidates[:budget.trials]:
        trial, _ = context.fit(config.replace(r=r), steps=budget.steps)
        CALLS.append((r, budget.steps))
        trials.append(trial)
    front = pareto_front([(t.score, t.trainable) for t in trials])
    return SearchResult("rank_search", trials[front[-1]].config, trials, budget, time.perf_counter() - started, front)


@pytest.fixture()
def rank_search(monkeypatch):
    spec = registry.MethodSpec(name="rank_search", family="hybrid", subcategory="automatic combination",
                               config_cls=RankSearchConfig, trains="LoRA of a searched rank", attach=_attach,
                               search=_search, default_lr=1e-3)
    registry._load_builtin_methods()
    monkeypatch.setitem(registry._REGISTRY, "rank_search", spec)
    RankSearchConfig.method = "rank_search"
    CALLS.clear()
    yield spec


def test_the_study_runs_the_search_then_trains_the_found_config(tmp_path, tiny_model, rank_search, capsys):
    data = write_glue(tmp_path / "glue", tasks=("SST-2",), n_train=20)
    out = tmp_path / "out"
    args = ["assess", "--suite", "glue", "--tasks", "sst2", "--methods", "rank_search", "--max-steps", "4",
            "--batch-size", "4", "--no-progress", "--workers", "1", "--seeds", "0", "--no-plots", "--model", str(tiny_model),
            "--data-dir", str(data), "--out", str(out)]
    assert main(args) == 0
    run = next(r for r in json.loads((out / "results.json").read_text())["runs"] if r["method"] == "rank_search")
    assert run["status"] == "ok", run.get("error")
    # 6 trials by default, 3 candidates here; a quarter of the run's 4 steps each
    assert CALLS == [(1, 1), (2, 1), (4, 1)]
    assert len(run["search"]["trials"]) == 3 and run["search"]["config"]["r"] in (1, 2, 4)
    assert run["settings"]["search"] == {"trials": 6, "steps": None, "minutes": None}
    lora_params = 2 * 2 * run["search"]["config"]["r"] * 64  # query+value of 2 layers, width 32
    assert run["trainable_params"] == lora_params + 32 * 2 + 2  # the found config trained, head included
    assert "rank_search on SST-2 (seed 0): searched 3 candidate(s)" in (out / "report.md").read_text()


def test_search_command_writes_the_config_that_train_reads(tmp_path, tiny_model, rank_search, capsys):
    data = write_glue(tmp_path / "glue", tasks=("SST-2",), n_train=20)
    found = tmp_path / "found"
    common = ["--model", str(tiny_model), "--task", "sst2", "--data-dir", str(data), "--batch-size", "4"]
    assert main(["search", *common, "--method", "rank_search", "--trials", "2", "--steps", "1",
                 "--out", str(found)]) == 0
    assert "searched 2 candidate(s)" in capsys.readouterr().out and CALLS == [(1, 1), (2, 1)]
    saved = json.loads((found / "search.json").read_text())
    assert len(saved["trials"]) == 2 and saved["budget"] == {"trials": 2, "steps": 1, "minutes": None}
    assert (found / "front.png").stat().st_size > 1000 and "chosen" in (found / "front.md").read_text()
    assert main(["train", *common, "--config", str(found / "config.json"), "--epochs", "0.2", "--out",
                 str(tmp_path / "trained")]) == 0
    adapter = json.loads((tmp_path / "trained" / "adapter_config.json").read_text())
    assert adapter["method"] == "rank_search" and adapter["r"] == saved["config"]["r"]


def test_search_command_refuses_a_method_without_search(tmp_path, tiny_model, capsys):
    assert main(["search", "--model", str(tiny_model), "--task", "sst2", "--data-dir", str(tmp_path),
                 "--method", "lora", "--out", str(tmp_path / "o")]) == 2
    assert "lora has no search" in capsys.readouterr().err
