"""The job benchmark (HF Trainer + peft against peftlab's GLUE job) on a tiny model and a few
examples: both jobs run in their own processes and the page is written. Correctness only: no
assertion looks at a time."""
from __future__ import annotations

import json

from benchmarks.job import _summary, main

from ..assess.conftest import write_glue, write_tiny_model


def test_both_jobs_run_and_the_page_is_written(tmp_path):
    model = write_tiny_model(tmp_path / "model")
    data = write_glue(tmp_path / "glue", tasks=("SST-2",), n_train=24, n_dev=8)
    out = tmp_path / "job"
    result = main(["--model", str(model), "--data-dir", str(data), "--train-limit", "24", "--batch-size", "8",
                   "--repeats", "1", "--seeds", "0", "--threads", "1", "--methods", "lora,bitfit", "--out", str(out)])
    assert [(r["method"], r["side"]) for r in result["runs"]] == [("lora", "hf"), ("lora", "peftlab"), ("bitfit", "hf"), ("bitfit", "peftlab")]
    assert result["summary"]["lora"]["hf"]["impl"] == "HF peft" and "peftlab" in result["summary"]["bitfit"]["hf"]["impl"]
    for run in result["runs"]:
        # the same examples, so the same real-token count on both sides; a score and a peak were read
        assert run["tokens"] == result["runs"][0]["tokens"] > 0
        assert 0.0 <= run["accuracy"] <= 1.0 and run["peak_rss_mb"] > 0 and run["train_s"] > 0
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["train_limit"] == 24
    assert "| lora | HF peft |" in out.with_suffix(".md").read_text()


def test_accuracy_is_averaged_over_seeds_and_times_over_runs():
    def run(seed: int, accuracy: float, wall: float) -> dict:
        return {"seed": seed, "accuracy": accuracy, "wall_s": wall, "tokens": 100, "train_s": 1.0, "peak_rss_mb": 1.0,
                "impl": "x"}

    # two rounds of seed 0 (the same score: each job is deterministic) and one of seed 1
    found = _summary([run(0, 0.80, 10.0), run(1, 0.70, 30.0), run(0, 0.80, 20.0)])
    assert found["accuracy"] == 0.75 and abs(found["accuracy_std"] - 0.0707) < 1e-4  # over seeds, not runs
    assert found["wall_s"] == 20.0 and found["by_seed"] == {0: 0.80, 1: 0.70}
    assert _summary([run(0, 0.8, 1.0)])["accuracy_std"] is None
