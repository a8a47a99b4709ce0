"""The cross-lingual suite end to end on a tiny BERT and tiny XNLI/MNLI files, and its bad-input errors."""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from peftlab.apps import app_suite
from peftlab.apps.crosslingual import CrossLingualSuite, run_crosslingual
from peftlab.cli import main
from peftlab.core.errors import PeftlabError
from tests.apps.crosslingual.conftest import LABELS, write_xnli
from tests.assess.conftest import WORDS

MNLI_HEADER = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
               "sentence2_parse sentence1 sentence2 label1 gold_label").split()


def write_mnli(root: Path, n: int = 24) -> Path:
    rng = random.Random(1)
    folder = root / "MNLI"
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(MNLI_HEADER)]
    for i in range(n):
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))
        b = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        lines.append("\t".join([str(i), str(i), f"{i}e", "fiction", "", "", "", "", a, b, LABELS[i % 3], LABELS[i % 3]]))
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    return root


def _suite(tiny_model: Path, tmp_path: Path, **changes) -> CrossLingualSuite:
    glue = write_mnli(tmp_path / "glue")
    xnli = tmp_path / "xnli" if (tmp_path / "xnli").is_dir() else write_xnli(tmp_path / "xnli")
    base = CrossLingualSuite(model=str(tiny_model), data_dir=str(glue), xnli_dir=str(xnli), languages=("en", "de", "ar"),
                             train_limit=16, eval_limit=8, max_length=32, batch_size=8, mlm_steps=3, mlm_batch_size=4,
                             mlm_max_length=16)
    return dataclasses.replace(base, **changes)


def test_the_suite_runs_every_method_and_writes_the_report(tmp_path, tiny_model):
    lines: list[str] = []
    results = run_crosslingual(_suite(tiny_model, tmp_path), tmp_path / "out", echo=lines.append)
    cells = {(r["method"], r["language"]) for r in results["accuracy"]}
    assert cells == {(m, c) for m in ("full", "adapter", "madx", "lt_sft") for c in ("en", "de", "ar")}
    assert all(0 <= r["accuracy"] <= 100 and r["n"] == 8 for r in results["accuracy"])
    stages = [(r["method"], r["stage"].split(" ")[0], r["language"]) for r in results["stages"]]
    assert stages == [("full", "task", "en"), ("adapter", "task", "en"),
                      ("madx", "language", "en"), ("madx", "language", "de"), ("madx", "language", "ar"),
                      ("madx", "task", "en"),
                      ("lt_sft", "language", "en"), ("lt_sft", "language", "de"), ("lt_sft", "language", "ar"),
                      ("lt_sft", "task", "en")]
    mlm = [r for r in results["stages"] if r["stage"].startswith("language")]
    assert all(r["steps"] == 3 for r in mlm)
    trainable = {r["method"]: r["trainable"] for r in results["stages"] if r["stage"].startswith("task")}
    assert trainable["full"] > trainable["lt_sft"] > 0 and trainable["full"] > trainable["madx"] > 0
    for row in results["summary"]:  # the gap is en minus the mean of the others
        others = [v for c, v in row["scores"].items() if c != "en"]
        assert row["gap"] == pytest.approx(row["scores"]["en"] - sum(others) / len(others))
    report = (tmp_path / "out" / "report.md").read_text()
    for text in ("## Accuracy on XNLI", "Gap (en − others)", "## Stages", "even-indexed", "odd-indexed",
                 "crosslingual_accuracy.png", "MAD-X", "LT-SFT"):
        assert text in report
    assert (tmp_path / "out" / "crosslingual_accuracy.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["wall_s"] > 0 and saved["data"]["unlabelled_sentences"]["en"] > 0
    assert saved["data"]["evaluation"] == {"en": 8, "de": 8, "ar": 8}
    assert any(line.startswith("[lt_sft] XNLI ar") for line in lines)


def test_a_subset_of_methods_runs_only_those(tmp_path, tiny_model):
    results = run_crosslingual(_suite(tiny_model, tmp_path, methods=("adapter",), languages=("en",)),
                               tmp_path / "out", echo=lambda line: None)
    assert [(r["method"], r["language"]) for r in results["accuracy"]] == [("adapter", "en")]
    assert results["summary"][0]["gap"] is None
    assert "| Task adapter |" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("changes, message", [
    ({"languages": ("de", "ar")}, "languages=\\['de', 'ar'\\] lacks 'en'"),
    ({"languages": ("en", "de", "en")}, "names a language twice"),
    ({"languages": ()}, "expected a list of XNLI language codes"),
    ({"methods": ("full", "madx2")}, "unknown: \\['madx2'\\]"),
    ({"train_limit": 0}, "train_limit=0: expected a positive whole number"),
    ({"eval_limit": -1}, "eval_limit=-1"),
    ({"mlm_probability": 1.5}, "mlm_probability=1.5: expected a share in \\(0, 1\\]"),
    ({"sft_keep_ratio": 0}, "sft_keep_ratio=0"),
    ({"adapter_lr": -1e-3}, "adapter_lr=-0.001: expected a number above 0"),
    ({"language_l1_reg": -0.1}, "language_l1_reg=-0.1"),
    ({"mlm_max_length": 4}, "mlm_max_length=4: expected at least 8"),
])
def test_bad_settings_are_refused_naming_the_field(tmp_path, tiny_model, changes, message):
    with pytest.raises(PeftlabError, match=message):
        _suite(tiny_model, tmp_path, **changes)


def test_an_unknown_language_names_it_and_lists_the_codes_found(tmp_path, tiny_model):
    suite = _suite(tiny_model, tmp_path, languages=("en", "xx"))
    with pytest.raises(PeftlabError, match=r"languages \['xx'\] have no XNLI file in .*xnli; the codes found "
                                           r"there: ar, de, en"):
        run_crosslingual(suite, tmp_path / "out", echo=lambda line: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("problem, message", [
    ("bad_label", r"dev-de.tsv line 3: label 'maybe'; expected one of entailment, neutral, contradiction"),
    ("short", r"dev-de.tsv line 3: 2 tab-separated fields; expected 3"),
    ("fewer", r"different numbers of examples"),
    ("train_limit", r"MNLI train in .* has 24 examples; train_limit is 30"),
    ("no_folder", r"XNLI folder .*missing does not exist"),
])
def test_bad_data_fails_before_training(tmp_path, tiny_model, problem, message):
    xnli = write_xnli(tmp_path / "xnli")
    path = xnli / "dev-de.tsv"
    rows = path.read_text().splitlines()
    changes = {}
    if problem == "bad_label":
        rows[2] = rows[2].rsplit("\t", 1)[0] + "\tmaybe"
    elif problem == "short":
        rows[2] = rows[2].rsplit("\t", 1)[0]
    elif problem == "fewer":
        rows = rows[:-1]
    elif problem == "train_limit":
        changes = {"train_limit": 30}
    elif problem == "no_folder":
        changes = {"xnli_dir": str(tmp_path / "missing")}
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(PeftlabError, match=message):
        run_crosslingual(_suite(tiny_model, tmp_path, **changes), tmp_path / "out", echo=lambda line: None)
    assert not (tmp_path / "out").exists()


def test_a_model_that_cannot_be_found_is_named(tmp_path, tiny_model):
    with pytest.raises(PeftlabError, match="cannot load the tokenizer of model .*nowhere"):
        run_crosslingual(_suite(tiny_model, tmp_path, model=str(tmp_path / "nowhere")), tmp_path / "out",
                         echo=lambda line: None)


def test_the_cli_takes_a_yaml_and_names_bad_fields(tmp_path, capsys):
    config = tmp_path / "suite.yaml"
    config.write_text("suite: crosslingual\nlanguages: [de, zh]\n")
    assert main(["assess", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "lacks 'en'" in capsys.readouterr().err
    config.write_text("suite: crosslingual\nlanguage: [en]\n")
    assert main(["assess", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "['language'] are not settings of the crosslingual suite" in err and "languages" in err
    suite = app_suite("crosslingual", {"languages": ["en", "fr"], "methods": ["madx"]}, "test")
    assert suite.languages == ("en", "fr") and suite.methods == ("madx",)


def test_the_default_model_is_built_once_into_the_cache_by_the_shared_builder(tmp_path, monkeypatch):
    from peftlab.apps.crosslingual import default_suite, ensure_model

    shared = tmp_path / "shared"
    builder = shared / "models" / "multilingual-e5-small" / "build.py"
    builder.parent.mkdir(parents=True)
    # A stand-in builder: records each call and writes the folder's config.json, as the real one does.
    builder.write_text("import sys, pathlib\nout = pathlib.Path(sys.argv[1])\nout.mkdir(parents=True, exist_ok=True)\n"
                       "(out / 'config.json').write_text('{}')\n"
                       "log = out.parent / 'calls'\nlog.write_text(log.read_text() + 'x' if log.exists() else 'x')\n")
    monkeypatch.setenv("PEFTLAB_SHARED", str(shared))
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    suite = default_suite()
    assert suite.model == str(tmp_path / "cache" / "multilingual-e5-small")
    assert suite.xnli_dir == str(shared / "data" / "xling" / "xnli")
    assert ensure_model(suite.model, echo=lambda line: None) == suite.model
    assert ensure_model(suite.model, echo=lambda line: None) == suite.model  # complete: not built again
    assert (tmp_path / "cache" / "calls").read_text() == "x"
    assert ensure_model("some/hub-id") == "some/hub-id"  # any other model is used as given
    builder.unlink()
    (tmp_path / "cache" / "multilingual-e5-small" / "config.json").unlink()  # incomplete again, no builder
    with pytest.raises(PeftlabError, match="not built yet and its builder .*build.py does not exist"):
        ensure_model(suite.model, echo=lambda line: None)


def test_the_shared_xnli_files_hold_the_same_examples_in_every_language():
    from peftlab.apps.crosslingual import read_xnli, xnli_languages
    from peftlab.assess.suites import shared_dir

    folder = shared_dir() / "data" / "xling" / "xnli"
    if not folder.is_dir():
        pytest.skip(f"the shared XNLI dev files are not at {folder} (set PEFTLAB_SHARED)")
    languages = xnli_languages(folder)
    assert languages == ["ar", "de", "en", "es", "fr", "ru", "zh"]
    labels = {code: [e.label for e in read_xnli(folder / f"dev-{code}.tsv")] for code in languages}
    assert all(len(v) == 2490 for v in labels.values())
    assert all(v == labels["en"] for v in labels.values())  # aligned: the same label at each index
