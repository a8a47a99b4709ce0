"""The efficiency suite: no training to convergence; trainable share, peak memory and step time per
method on models built from configs, and sizes that do not fit are skipped with the reason."""
from __future__ import annotations

import json

from peftlab.assess.efficiency import SIZES, count_parameters, fit_notes
from peftlab.cli import main


def test_efficiency_suite_measures_and_skips_what_does_not_fit(tmp_path, capsys):
    small, big = SIZES["tiny-roberta"], SIZES["tiny-llama"]
    limit = (count_parameters(small) + count_parameters(big)) // 2
    assert count_parameters(small) < limit < count_parameters(big)
    out = tmp_path / "eff"
    code = main(["assess", "--suite", "efficiency", "--tasks", "tiny-roberta,tiny-llama", "--methods", "lora",
                 "--max-params", str(limit), "--device", "cpu", "--no-progress", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == {"lora", "full"} and all(r["task"] == "tiny-roberta" for r in runs.values())
    for run in runs.values():
        assert run["status"] == "ok" and run["score"] is None
        assert run["peak_memory_bytes"] > run["held_memory_bytes"] > 0 and run["median_step_s"] > 0
    assert runs["lora"]["trainable_percent"] < 5 < runs["full"]["trainable_percent"] == 100.0
    assert runs["lora"]["peak_memory_bytes"] < runs["full"]["peak_memory_bytes"]
    skipped = [n for n in results["notes"] if n.startswith("tiny-llama")]
    assert skipped and "max_params" in skipped[0] and "skipped" in skipped[0]
    report = (out / "report.md").read_text()
    assert "tiny-llama" in report and "× full" in report and (out / "plots" / "peak_memory.png").exists()


def test_the_review_sizes_are_counted_without_allocating():
    # LLaMA-7B is built on the meta device: the count is exact and costs no memory
    assert 6.5e9 < count_parameters(SIZES["llama-7b"]) < 7e9
    assert 1.2e8 < count_parameters(SIZES["roberta-base"]) < 1.3e8
    run_peft, run_full, note = fit_notes(SIZES["llama-7b"], int(6.7e9), "cpu", max_params=300_000_000)
    assert not run_peft and not run_full and "llama-7b" in note and "GPU" in note
