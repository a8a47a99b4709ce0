"""End to end: `peftlab assess --suite glue` on a tiny GLUE folder (MRPC, STS-B, QNLI, QQP) with a
tiny BERT, two methods and a few steps; the official metrics of each task reach the report; runs
are stored per run and reused on restart."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from peftlab.assess.jobs import Jobs
from peftlab.assess.report import method_title
from peftlab.cli import main

ARGS = ["assess", "--suite", "glue", "--methods", "lora", "--max-steps", "2", "--batch-size", "4",
        "--no-progress", "--workers", "1", "--seeds", "0"]


def _assess(tmp_path: Path, model: Path, data: Path, *extra: str) -> int:
    return main(ARGS + ["--model", str(model), "--data-dir", str(data), "--out", str(tmp_path / "out"), *extra])


def test_glue_suite_reports_official_metrics_and_resumes(tmp_path, tiny_model, glue_dir, capsys):
    assert _assess(tmp_path, tiny_model, glue_dir) == 0
    out = tmp_path / "out"
    first = capsys.readouterr().out
    assert "8 run(s) done, 0 reused" in first

    results = json.loads((out / "results.json").read_text())
    runs = {(r["task"], r["method"]): r for r in results["runs"]}
    assert set(runs) == {(t, m) for t in ("mrpc", "stsb", "qnli", "qqp") for m in ("lora", "full")}
    assert all(r["status"] == "ok" for r in runs.values()), [r.get("error") for r in runs.values()]
    official = {"mrpc": {"f1", "accuracy"}, "stsb": {"pearson", "spearman"}, "qnli": {"accuracy"},
                "qqp": {"f1", "accuracy"}}
    for (task, method), run in runs.items():
        assert official[task] <= set(run["metrics"]), (task, run["metrics"])
        assert run["score_metric"] == {"mrpc": "accuracy", "stsb": "pearson", "qnli": "accuracy", "qqp": "accuracy"}[task]
        # measured alike for every method
        assert run["trainable_params"] > 0 and 0 < run["trainable_percent"] <= 100
        assert run["peak_memory_bytes"] > run["held_memory_bytes"] > 0
        assert run["median_step_s"] > 0 and run["steps"] == 2
        # the frozen floor, timed in the run's own process over the run's own first steps
        floor = run["floor"]
        assert floor["steps"] == 2 and floor["median_step_s"] > 0
        assert floor["timed_s"] > 0 and floor["run_timed_s"] > 0
        assert 0 < floor["peak_memory_bytes"] < run["peak_memory_bytes"] * 1.5
    assert runs[("stsb", "full")]["trainable_percent"] == 100.0
    # full fine-tuning holds gradients and AdamW state for every weight: far above the frozen floor
    assert runs[("stsb", "full")]["peak_memory_bytes"] > 1.2 * runs[("stsb", "full")]["floor"]["peak_memory_bytes"]
    assert runs[("qqp", "lora")]["trainable_percent"] < 100.0

    report = (out / "report.md").read_text()
    for column in ("MRPC f1", "MRPC accuracy", "STS-B pearson", "STS-B spearman", "QNLI accuracy", "QQP f1",
                   "QQP accuracy", "STS-B (pearson)", "Trainable %", "peak MB", "peak × floor", "step × floor"):
        assert column in report, column
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 8 and {"metric:f1", "metric:pearson", "metric:spearman"} <= set(rows[0])
    for plot in ("score_vs_trainable.png", "peak_memory.png", "step_time.png"):
        assert (out / "plots" / plot).stat().st_size > 1000
    stored = sorted(p.relative_to(out / "runs") for p in (out / "runs").rglob("*.json"))
    assert len(stored) == 8 and all(p.name == "seed0.json" for p in stored)

    # a restart reuses every stored run ...
    assert _assess(tmp_path, tiny_model, glue_dir, "--no-plots") == 0
    assert "0 run(s) done, 8 reused" in capsys.readouterr().out
    # ... and runs again only what is missing
    (next((out / "runs").rglob("qnli/lora/seed0.json"))).unlink()
    assert _assess(tmp_path, tiny_model, glue_dir, "--no-plots") == 0
    assert "1 run(s) done, 7 reused" in capsys.readouterr().out
    # a changed budget changes the fingerprint: the run is done again, not reused
    assert _assess(tmp_path, tiny_model, glue_dir, "--no-plots", "--tasks", "qnli", "--max-steps", "1") == 0
    assert "2 run(s) done, 0 reused" in capsys.readouterr().out
    # ... and so does another thread count: a resumed suite does not mix runs made with 1 and 2
    # threads (their scores may differ by the reduction order); the record names machine and threads
    budget = ["--no-plots", "--tasks", "qnli", "--max-steps", "1"]
    assert _assess(tmp_path, tiny_model, glue_dir, *budget, "--threads", "1") == 0
    assert _assess(tmp_path, tiny_model, glue_dir, *budget, "--threads", "1") == 0
    assert "0 run(s) done, 2 reused" in capsys.readouterr().out
    assert _assess(tmp_path, tiny_model, glue_dir, *budget, "--threads", "2") == 0
    assert "2 run(s) done, 0 reused" in capsys.readouterr().out
    stored = json.loads(next((out / "runs").rglob("qnli/lora/seed0.json")).read_text())["settings"]
    assert stored["threads"] == 2 and " x" in stored["machine"]


def test_interrupted_suite_keeps_finished_runs(tmp_path, tiny_model, monkeypatch, capsys):
    from tests.assess.conftest import write_glue

    data = write_glue(tmp_path / "glue", tasks=("MRPC", "QNLI"))
    real_run = Jobs.run
    calls = {"n": 0}

    def stop_on_third(self, task, method, seed):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_run(self, task, method, seed)

    monkeypatch.setattr(Jobs, "run", stop_on_third)
    assert _assess(tmp_path, tiny_model, data) == 130
    assert "Run the same command again to resume" in capsys.readouterr().err
    assert len(list((tmp_path / "out" / "runs").rglob("*.json"))) == 2
    # the partial tables were written after each finished run
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())["runs"]) == 2

    monkeypatch.setattr(Jobs, "run", real_run)
    assert _assess(tmp_path, tiny_model, data) == 0
    assert "2 run(s) done, 2 reused" in capsys.readouterr().out


def test_no_tmp_files_left_behind(tmp_path, tiny_model):
    from tests.assess.conftest import write_glue

    data = write_glue(tmp_path / "glue", tasks=("QNLI",))
    assert _assess(tmp_path, tiny_model, data) == 0
    assert not [p for p in (tmp_path / "out").rglob("*.tmp")]


def test_majority_baseline_gets_a_note(tmp_path, tiny_model):
    from tests.assess.conftest import write_glue

    data = write_glue(tmp_path / "glue", tasks=("QNLI",))
    assert _assess(tmp_path, tiny_model, data, "--max-steps", "1") == 0
    report = (tmp_path / "out" / "report.md").read_text()
    # two steps of a random tiny model cannot beat the majority class: each such row is explained
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    at_baseline = [r for r in results["runs"] if r["score"] <= r["baseline"] + 0.01]
    assert at_baseline
    for run in at_baseline:
        assert f"{method_title(run['method'])} on QNLI" in report
    assert "majority-class" in report


def test_worker_processes_give_the_results_of_one_process(tmp_path, tiny_model, capsys):
    from tests.assess.conftest import write_glue

    data = write_glue(tmp_path / "glue", tasks=("MRPC", "QNLI"))
    common = ["--tasks", "mrpc,qnli", "--no-plots", "--threads", "1"]
    assert _assess(tmp_path / "one", tiny_model, data, *common) == 0
    assert main([a for a in ARGS if a not in ("--workers", "1")] + [
        "--model", str(tiny_model), "--data-dir", str(data), "--out", str(tmp_path / "two" / "out"),
        "--workers", "2", *common]) == 0
    assert "4 run(s) done, 0 reused" in capsys.readouterr().out
    one, two = (json.loads((tmp_path / d / "out" / "results.json").read_text()) for d in ("one", "two"))
    assert two["totals"]["workers"] == 2 and two["totals"]["threads"] == 1
    key = lambda r: (r["task"], r["method"])  # noqa: E731
    assert [key(r) for r in one["runs"]] == [key(r) for r in two["runs"]]  # the plan's order, not finishing order
    for a, b in zip(one["runs"], two["runs"]):
        assert b["status"] == "ok" and b["threads"] == 1, b.get("error")
        assert abs(a["score"] - b["score"]) < 1e-6 and abs(a["final_loss"] - b["final_loss"]) < 1e-4
        assert a["peak_memory_bytes"] == b["peak_memory_bytes"]
        assert b["baseline"] is not None and a["baseline"] == b["baseline"]  # the majority-class notes need it
