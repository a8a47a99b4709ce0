"""The benchmark runner, on a tiny model with one round: it runs end to end and writes what it
promises. Correctness only: no assertion here looks at a time."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import measure
from benchmarks.models import MODELS
from benchmarks.run import TARGETS, clone_model, main
from peftlab.core.registry import all_methods

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "benchmarks"
    argv = ["--quick", "--model", "tiny-bert", "--repeats", "1", "--infer-repeats", "1", "--threads", "1", "--out", str(out)]
    threads = torch.get_num_threads()
    try:
        data = main(argv)
    finally:
        torch.set_num_threads(threads)
    return data, out


def test_every_registered_method_is_measured_or_explained(quick_run):
    data, _ = quick_run
    result = data["models"]["tiny-bert"]
    train = {r["label"]: r for r in result["train"]}
    assert {"floor", "full FT"} <= set(train)
    measured = {r["method"] for r in result["train"]}  # a method may be measured only in a variant row
    explained = {e["case"].split(" (")[0] for e in result["errors"]}
    for spec in (s for s in all_methods() if not s.internal):
        assert spec.name in measured or spec.name in explained, f"{spec.name} neither measured nor reported"
    for row in result["train"]:
        assert row["step_ms"] > 0 and row["peak_mb"] > 0
        assert len(row["times_s"]) == 1 or row["label"] == "floor"  # the reference runs between the others
        assert row["own_floor"] in train and (row["own_floor"] != "floor" or row["x_own_floor"] == row["x_floor"])
    assert train["floor"]["trainable"] == 0 and train["floor"]["x_floor"] == 1.0
    assert train["full FT"]["trainable"] == sum(p.numel() for p in MODELS["tiny-bert"].build().parameters())


def test_peft_rows_train_the_same_parameters(quick_run):
    pytest.importorskip("peft")
    data, _ = quick_run
    train = {r["label"]: r for r in data["models"]["tiny-bert"]["train"]}
    assert "peft lora" in train and "peft lora (dropout=0.1)" in train
    for label, row in train.items():
        if row["impl"] == "peft":
            assert row["trainable"] == train[label.removeprefix("peft ")]["trainable"], label
    assert train["lora"]["x_peft"] is not None


def test_inference_merged_and_mixed_batches(quick_run):
    data, _ = quick_run
    result = data["models"]["tiny-bert"]
    inference = {r["label"] for r in result["inference"]}
    assert {"base", "lora", "lora merged"} <= inference
    mixed = [r for r in result["mixed"] if r["impl"] == "peftlab" and r["method"] == "lora"]
    assert sorted(r["k"] for r in mixed) == [0, 1, 2, 4, 8]
    if any(r["impl"] == "peft" for r in result["mixed"]):
        # the same 8 adapters in peft give the same logits as peftlab's batched gather
        assert mixed[0]["max_abs_diff_vs_peft"] < 1e-4


def test_writes_json_and_generated_markdown(quick_run):
    data, out = quick_run
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["models"]["tiny-bert"]["meta"]["torch"] == torch.__version__
    md = out.with_suffix(".md").read_text()
    assert "python -m benchmarks.run --quick" in md and f"torch {torch.__version__}" in md
    assert "| floor | floor |" in md and "### Targets" in md and "### Mixed-adapter batches" in md
    assert [t["target"] for t in saved["models"]["tiny-bert"]["targets"]][:len(TARGETS)] == [t[0] for t in TARGETS]


def test_script_entry_point():
    done = subprocess.run([sys.executable, "benchmarks/run.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "--quick" in done.stdout


def test_clone_shares_weights_but_not_parameters():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    model[0].weight.requires_grad_(False)
    twin = clone_model(model, share=True)
    assert twin[0].weight is not model[0].weight
    assert twin[0].weight.data_ptr() == model[0].weight.data_ptr()
    twin[0].weight.requires_grad_(True)
    assert not model[0].weight.requires_grad
    copy = clone_model(model, share=False)
    assert copy[0].weight.data_ptr() != model[0].weight.data_ptr()


def test_peak_memory_sees_a_temporary_tensor():
    def step():
        big = torch.ones(1 << 20)  # 4 MiB, freed before the end
        return float(big.sum())

    assert measure.peak_rise_bytes(step, "cpu") >= 4 << 20
    assert measure.storage_bytes([torch.zeros(10), torch.zeros(10)]) == 80


def test_prompt_tuning_is_also_compared_with_a_floor_at_its_own_length(quick_run):
    data, _ = quick_run
    result = data["models"]["tiny-bert"]
    train = {r["label"]: r for r in result["train"]}
    seq = result["meta"]["seq"]
    prompt = train["prompt_tuning"]
    assert prompt["own_floor"] == f"floor ({seq + 20} tokens)" and prompt["x_own_floor"] is not None
    assert train[prompt["own_floor"]]["trainable"] == 0
    assert train["lora"]["own_floor"] == "floor"
    targets = {t["target"]: t for t in result["targets"]}
    assert f"prompt_tuning training step / floor at its own length ({seq + 20} tokens)" in targets
    if "peft lora" in train:
        assert targets["lora peak training memory / peft's"]["value"] == train["lora"]["peak_mb"] / train["peft lora"]["peak_mb"]


def test_report_only_rewrites_the_markdown_from_the_json(quick_run):
    _, out = quick_run
    md = out.with_suffix(".md")
    before = md.read_text()
    md.unlink()
    main(["--report-only", "--out", str(out)])
    assert md.read_text() == before


def test_interleaving_takes_turns_around_a_reference():
    calls = []
    timings = measure.interleaved_times({k: (lambda k=k: calls.append(k)) for k in "rabc"}, 2, 1, "cpu", every=2)
    assert calls == list("rabc") + list("rabrcr") + list("rcbrar")
    assert timings.reference == "r" and len(timings.wall["a"]) == len(timings.cpu["c"]) == 2
    assert len(timings.wall["r"]) == 6


def test_ratios_divide_by_the_local_reference():
    # The machine slows down 2x half way through a round: b (measured then) is really as fast as a.
    t = measure.Timings(wall={"r": [1, 1, 2, 2], "a": [1.5], "b": [3.0]}, cpu={}, local_wall={"a": [1.0], "b": [2.0]},
                        local_cpu={}, reference="r")
    assert t.ratio("a", "r") == 1.5 and t.ratio("b", "r") == 1.5
    assert t.ratio("b", "a") == 1.0 and t.ratio("r", "a") == 1 / 1.5


def test_a_peft_row_training_other_parameters_is_not_compared():
    from benchmarks.run import check_targets

    def row(label, impl, trainable, peak):
        return {"label": label, "impl": impl, "method": "ia3", "trainable": trainable, "peak_mb": peak,
                "own_floor": "floor", "x_own_floor": 1.0, "x_own_floor_cpu": 1.0, "x_peft": 0.9, "x_peft_cpu": 0.9}

    same = check_targets({"train": [row("ia3", "peftlab", 10, 5.0), row("peft ia3", "peft", 10, 4.0)]})
    other = check_targets({"train": [row("ia3", "peftlab", 10, 5.0), row("peft ia3", "peft", 12, 4.0)]})
    memory = {t["target"]: t for t in same}["ia3 peak training memory / peft's"]
    assert memory["ok"] is False and memory["value"] == 1.25
    memory = {t["target"]: t for t in other}["ia3 peak training memory / peft's"]
    assert memory["ok"] is None and "peft trains 12 parameters, peftlab 10" in memory["unlike"]


def test_the_quantized_base_benchmark_runs_and_writes_its_ratios(tmp_path):
    pytest.importorskip("bitsandbytes")
    from benchmarks import quant as bench_quant

    threads = torch.get_num_threads()
    try:
        bench_quant.main(["--models", "tiny-bert", "--repeats", "1", "--threads", "1", "--out", str(tmp_path / "q")])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "q.json").read_text())
    rows = {r["case"]: r for r in data["models"][0]["rows"]}
    assert set(rows) == set(bench_quant.CASES)
    assert rows[bench_quant.REFERENCE]["peak_x"] == 1.0
    four_bit = [r for label, r in rows.items() if label.startswith("QLoRA")]
    assert four_bit and all(r["linear_x"] < 0.5 for r in four_bit)  # packed 4-bit codes and their scales
    assert "| case |" in (tmp_path / "q.md").read_text()
