"""Suites are data: built-ins, YAML files and flags compose; every registered method takes part with
its own defaults and learning rate, and full fine-tuning is always a row."""
from __future__ import annotations

import dataclasses

import pytest

from peftlab.assess.jobs import constant_baseline
from peftlab.assess.report import (aggregate, baseline_notes, drift_notes, floor_drift_notes, markdown,
                                   published_section, spread_notes, summary_text)
from peftlab.assess.store import RunStore, fingerprint, slug
from peftlab.assess.suites import FULL, REVIEW_METHODS, SUITE_NAMES, builtin_suites, get_suite, load_suite_file
from peftlab.cli import _assess_suite, build_parser
from peftlab.core.errors import PeftlabError
from peftlab.core.registry import all_methods
from peftlab.tasks.glue import get_glue_task


def test_builtin_suites_exist_and_quick_is_the_review_set():
    suites = builtin_suites()
    assert set(SUITE_NAMES) == set(suites)
    quick = suites["quick"]
    methods, notes = quick.method_plan()
    registered = {s.name for s in all_methods()}
    assert methods[-1] == FULL
    assert set(methods[:-1]) == set(REVIEW_METHODS) & registered
    assert len(notes) == len(set(REVIEW_METHODS) - registered)
    assert [t.name for t in quick.tasks] == ["sst2"]  # RTE is at chance for every method with the MiniLM
    training = [s for s in suites.values() if s.kind != "efficiency"]
    assert all(len(s.seeds) >= 3 for s in training), "every built-in training suite reports a spread over seeds"


def test_all_means_every_registered_method_with_its_own_config_and_lr():
    suite = get_suite("quick").replace(methods=("all",), lr_scale=3.0)
    methods, _ = suite.method_plan()
    # the others build on trained adapters, or are a search's internal stage
    specs = [s for s in all_methods() if s.example is None and not s.internal]
    assert methods == [s.name for s in specs] + [FULL]
    for spec in specs:
        assert suite.learning_rate(spec.name) == pytest.approx(spec.default_lr * 3.0)
        assert suite.method_config(spec.name) == spec.config_cls()
    assert suite.learning_rate(FULL) == suite.full_lr and suite.method_config(FULL) is None


def test_unknown_method_from_the_user_is_an_error():
    suite = get_suite("quick").replace(methods=("nope",), explicit_methods=True)
    with pytest.raises(PeftlabError, match="unknown method 'nope'"):
        suite.method_plan()


def test_yaml_file_and_flags_compose(tmp_path):
    # a numeric option of some registered method, set to its own default (any method would do)
    spec, field = next((s, f) for s in all_methods() for f in dataclasses.fields(s.config_cls)
                       if type(f.default) in (int, float))
    options = {spec.name: {field.name: field.default}}
    config = tmp_path / "s.yaml"
    config.write_text(
        "suite: glue\n"
        f"methods: [{spec.name}]\n"
        "seeds: [1, 2]\n"
        "tasks:\n  - mrpc\n  - {name: stsb, train_limit: 50, max_length: 32}\n"
        f"method_options: {options!r}\n".replace("'", '"'))
    suite = load_suite_file(config)
    assert suite.name == "glue" and suite.seeds == (1, 2) and suite.methods == (spec.name,)
    assert suite.tasks[1].train_limit == 50 and suite.tasks[1].max_length == 32
    assert suite.tasks[0].train_limit == get_suite("glue").tasks[0].train_limit  # a bare name keeps the budget
    assert getattr(suite.method_config(spec.name), field.name) == field.default

    args = build_parser().parse_args(["assess", "--config", str(config), "--seeds", "3", "--train-limit", "all",
                                      "--max-length", "16", "--lr-scale", "0.5"])
    suite = _assess_suite(args)
    assert suite.seeds == (3,) and suite.lr_scale == 0.5
    assert all(t.train_limit is None and t.max_length == 16 for t in suite.tasks)


def test_fingerprint_changes_with_the_budget_and_slug_is_safe(tmp_path):
    a = fingerprint({"task": {"train_limit": 10}, "lr": 1e-3})
    assert a == fingerprint({"lr": 1e-3, "task": {"train_limit": 10}})
    assert a != fingerprint({"task": {"train_limit": 11}, "lr": 1e-3})
    assert slug("../shared/models/all-MiniLM-L6-v2") == "models_all-MiniLM-L6-v2"
    assert slug("random:t5-small") == "random-t5-small"
    store = RunStore(tmp_path)
    record = {"model": "m", "task": "t", "method": "lora", "seed": 0, "status": "ok", "fingerprint": a}
    store.save(record)
    assert store.finished("m", "t", "lora", 0, a) == record
    assert store.finished("m", "t", "lora", 0, "other") is None
    store.path("m", "t", "lora", 0).write_text("{broken")
    assert store.load("m", "t", "lora", 0) is None


def test_constant_baseline_is_the_majority_share_or_zero_correlation():
    assert constant_baseline(get_glue_task("rte"), [0, 0, 1]) == pytest.approx(2 / 3)
    assert constant_baseline(get_glue_task("cola"), [0, 1, 1, 1]) == 0.0
    assert constant_baseline(get_glue_task("stsb"), [0.5, 1.0, 4.0]) == 0.0


def _record(method, score, loss, task="rte", seed=0):
    return {"task": task, "method": method, "family": "x", "kind": "glue", "seed": seed, "status": "ok",
            "score": score, "score_metric": "accuracy", "baseline": 0.53, "trainable_params": 10, "total_params": 100,
            "trainable_percent": 10.0, "peak_memory_bytes": 2 ** 20, "median_step_s": 0.1, "tokens_per_s": 5.0,
            "final_loss": loss, "steps": 30, "lr": 1e-3, "metrics": {"accuracy": score}}


def test_baseline_notes_say_why():
    rows = aggregate([_record("lora", 0.53, 0.69), _record("ia3", 0.535, 0.30), _record(FULL, 0.70, 0.2),
                      _record("bitfit", 0.60, 0.5), _record("bitfit", 0.70, 0.5, seed=1)])
    notes = baseline_notes(rows, get_suite("quick"))
    assert len(notes) == 2
    lora = next(n for n in notes if n.startswith("LoRA"))  # the name as the review writes it
    assert "chance level ln 2" in lora and "did not fit the training data" in lora
    ia3 = next(n for n in notes if n.startswith("(IA)³"))
    assert "fell to 0.300" in ia3
    bitfit = next(r for r in rows if r["method"] == "bitfit")
    assert bitfit["seeds"] == 2 and bitfit["score"] == pytest.approx(65.0) and bitfit["score_std"] > 0
    text = summary_text(rows)
    assert len(text.splitlines()) == 2 + 4 and max(map(len, text.splitlines())) <= 100
    assert text.splitlines()[2].startswith("full fine-tuning")


def test_method_options_are_checked_like_opt_and_take_peft_names(tmp_path):
    config = tmp_path / "s.yaml"
    config.write_text("suite: quick\nmethod_options: {lora: {r: 4, lora_alpha: 8, targets: [query, value]}}\n")
    lora = load_suite_file(config).method_config("lora")  # HF peft's name lora_alpha is the config's too
    assert (lora.r, lora.alpha, lora.targets) == (4, 8, ("query", "value"))
    with pytest.raises(PeftlabError, match=r"suite 'quick': method_options.lora: LoraConfig has no option \['rr'\]"):
        get_suite("quick").replace(method_options={"lora": {"rr": 8}})  # the API is checked too


def test_seeds_that_disagree_and_a_drifting_reference_get_notes():
    rows = aggregate([_record("lora", 0.80, 0.3), _record("lora", 0.60, 0.3, seed=1),
                      _record("ia3", 0.80, 0.3), _record("ia3", 0.81, 0.3, seed=1)])
    notes = spread_notes(rows)
    assert len(notes) == 1 and notes[0].startswith("LoRA") and "std 14.1" in notes[0]

    def full(task, seed, step_s, length=64):
        rec = _record(FULL, 0.8, 0.2, seed=seed)
        rec.update(task=task, median_step_s=step_s, settings={"task": {"max_length": length}, "batch_size": 32})
        return rec

    # another task is not drift, even at the same length limit: its sentences fill it differently
    steady = [full("sst2", 0, 1.40), full("sst2", 1, 1.45), full("rte", 0, 3.9), full("rte", 1, 3.8)]
    assert drift_notes(steady) == []
    drifted = drift_notes(steady + [full("sst2", 2, 3.86)])
    assert len(drifted) == 1 and "2.76x" in drifted[0] and "SST-2 (max length 64" in drifted[0]


def test_a_random_model_report_says_its_scores_mean_nothing():
    from peftlab.assess.report import markdown

    rows = aggregate([_record("lora", 0.2, 3.0, task="wmt16")])
    mt = get_suite("mt").replace(model="random:t5-small")
    assert "say nothing about PEFT" in markdown(mt, rows, [], {}, [])
    assert "say nothing about PEFT" not in markdown(get_suite("quick"), rows, [], {}, [])


def test_the_taxonomy_suite_plans_every_registered_method_and_names_its_subcategory():
    from peftlab.assess.report import score_table
    from peftlab.core.registry import all_methods

    methods, notes = get_suite("taxonomy").method_plan()
    taxonomy = [s for s in all_methods() if not s.internal]  # not a search's internal stage
    standalone = [s.name for s in taxonomy if s.example is None]
    assert methods == standalone + [FULL]
    assert len(notes) == len(taxonomy) - len(standalone)  # the ones built on other adapters, said why
    record = _record("lora", 0.8, 0.3)
    record["subcategory"] = "low-rank decomposition"
    assert "| x: low-rank decomposition |" in score_table(aggregate([record]))


def test_a_method_whose_optional_dependency_is_missing_is_skipped_with_a_note_or_refused_when_asked_for(monkeypatch):
    import importlib.util

    from peftlab.core.registry import all_methods

    needing = [s for s in all_methods() if s.requires]
    if not needing:
        pytest.skip("no registered method declares an optional dependency")
    module = needing[0].requires[0]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    suite = get_suite("taxonomy")
    methods, notes = suite.method_plan()
    assert needing[0].name not in methods
    assert any(needing[0].name in n and f"peftlab[{needing[0].requires[1]}]" in n for n in notes)
    with pytest.raises(PeftlabError, match=r"pip install 'peftlab\["):
        suite.replace(methods=(needing[0].name,), explicit_methods=True).method_plan()


def test_an_encoder_only_method_is_left_out_of_decoder_and_seq2seq_runs_by_its_declaration():
    from peftlab.assess.jobs import jobs_for
    from peftlab.core.registry import all_methods

    encoder_only = [s.name for s in all_methods() if s.encoder_only and s.example is None]
    if not encoder_only:
        pytest.skip("no registered method declares encoder_only")
    name = encoder_only[0]
    assert name in get_suite("taxonomy").method_plan()[0]  # GLUE runs an encoder: it takes part
    for suite in ("mt", "nlg"):
        methods, notes = get_suite(suite).replace(methods=("all",)).method_plan()
        assert name not in methods and any(name in n and "encoder models only" in n for n in notes)
        with pytest.raises(PeftlabError, match=rf"{name!r} applies to encoder models only.*drop it"):
            get_suite(suite).replace(methods=(name,), explicit_methods=True).method_plan()
    efficiency = get_suite("efficiency").replace(methods=(name, "lora"))
    jobs = jobs_for(efficiency, progress=False)
    by_size = {t.name: jobs.methods_for(t, [name, "lora", FULL]) for t in efficiency.tasks}
    assert by_size["roberta-base"] == [name, "lora", FULL]
    assert by_size["t5-base"] == by_size["llama-7b"] == ["lora", FULL]


def _floored(method, score, step_s, floor_s, peak, floor_peak, seed=0, task="sst2"):
    rec = _record(method, score, 0.3, task=task, seed=seed)
    rec.update(peak_memory_bytes=peak, floor={"steps": 12, "median_step_s": floor_s, "timed_s": 5 * floor_s,
                                              "run_timed_s": 5 * step_s, "peak_memory_bytes": floor_peak})
    return rec


def test_costs_are_ratios_to_the_floor_of_the_same_run_not_across_runs():
    # the machine got twice as slow between the two seeds: absolute times doubled, the ratios did not
    rows = aggregate([_floored("lora", 0.8, 0.11, 0.10, 300, 200), _floored("lora", 0.8, 0.22, 0.20, 300, 200, seed=1),
                      _floored(FULL, 0.85, 0.30, 0.10, 900, 200), _floored(FULL, 0.85, 0.60, 0.20, 900, 200, seed=1)])
    lora = next(r for r in rows if r["method"] == "lora")
    assert lora["step_x_floor"] == pytest.approx(1.1) and lora["memory_x_floor"] == pytest.approx(1.5)
    report = markdown(get_suite("quick"), rows, [], {}, [])
    assert "step × floor" in report and "| 1.10 |" in report and "The methods side by side" in report
    assert "Sub-category" in report  # the taxonomy layout: family and sub-category per method
    assert "mean step x floor" in summary_text(rows)
    # where the run stored summed times of the same steps, the ratio is theirs (identical work)
    summed = _floored("lora", 0.8, 0.11, 0.10, 300, 200)
    summed["floor"].update(timed_s=2.0, run_timed_s=2.5)
    assert aggregate([summed])[0]["step_x_floor"] == pytest.approx(1.25)
    # the floor of one seed trains the same batches in every run: its drift is the machine's
    drift = floor_drift_notes([_floored("lora", 0.8, 0.11, 0.10, 1, 1), _floored(FULL, 0.8, 0.3, 0.14, 1, 1)])
    assert len(drift) == 1 and "1.40x" in drift[0] and "seed 0" in drift[0]
    assert floor_drift_notes([_floored("lora", 0.8, 0.11, 0.10, 1, 1), _floored(FULL, 0.8, 0.3, 0.2, 1, 1, seed=1)]) == []


def test_published_figures_stand_beside_the_measured_ones_with_the_rank_agreement():
    measured = {FULL: 0.90, "bitfit": 0.85, "lora": 0.88}
    rows = aggregate([_record(m, s, 0.3, task="sst2") for m, s in measured.items()])
    text = "\n".join(published_section(rows))
    assert "Hu et al. 2022" in text and "not measured here" in text and "RoBERTa-base" in text
    assert "| LoRA | 0.3M | 95.1 | 88.0 |" in text  # published, then measured
    assert "AdptD (0.3M)" in text and "not run" in text  # a published method the suite did not run
    # published SST-2 order LoRA > FT > BitFit; measured FT > LoRA > BitFit: rho = 0.5
    assert "Spearman's rho 0.50" in text
    # a task no published table has: no section
    assert published_section(aggregate([_record("lora", 0.8, 0.3, task="wnli")])) == []


def test_progress_names_each_run_and_estimates_from_each_methods_own_time():
    from peftlab.assess.runner import _Eta
    from peftlab.assess.suites import TaskSpec

    sst2 = TaskSpec("sst2")
    plan = [(sst2, m, s) for s in (0, 1) for m in ("lora", FULL)]
    eta = _Eta(plan, list(range(4)))
    done = {}
    assert "known after the first run" in eta.postfix(done, 2)
    done[0] = {}
    line = eta.finished(0, {"status": "ok", "kind": "glue", "score": 0.812, "score_metric": "accuracy",
                            "wall_s": 40.0, "steps": 79}, 2)
    assert line == "[1/4] sst2 lora seed 0: accuracy 81.2 in 40 s (79 steps)"
    done[1] = {}
    eta.finished(1, {"status": "ok", "kind": "glue", "score": 0.8, "wall_s": 100.0, "steps": 79}, 2)
    # what is left: one LoRA run (40 s) and one full run (100 s), on two workers
    assert eta.left_s(done, 2) == pytest.approx(70.0)
    assert eta.postfix(done, 2).startswith("running sst2/lora/seed1, sst2/full/seed1; about 70 s left")


def test_the_mt_suite_runs_pretrained_t5_when_it_can_be_loaded_and_says_when_it_cannot(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub out of reach (as here): t5-small not loadable
    mt = get_suite("mt")
    assert mt.model == "t5-small" and mt.model_fallback == "random:t5-small"
    ran, note = mt.with_reachable_model()
    assert ran.model == "random:t5-small" and "could not be loaded" in note and "--model" in note
    # a model the user names has no stand-in: it loads or the suite stops with its error
    mine = mt.replace(model="my/t5")
    assert mine.model_fallback is None and mine.with_reachable_model() == (mine, None)
