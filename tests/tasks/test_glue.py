"""GLUE loaders (synthetic standard layout + real shared data), metrics and error messages."""

from __future__ import annotations

import re
import sys
import types
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from peftlab.tasks import (
    GLUE_TASKS,
    Example,
    TaskDataError,
    accuracy,
    f1_binary,
    get_glue_task,
    glue_metrics,
    load_glue,
    matthews_corrcoef,
    pearson,
    spearman,
)

SHARED_GLUE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "glue"

MNLI_TRAIN_HEADER = [
    "index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
    "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label",
]  # fmt: skip
# GLUE's MNLI dev files carry five annotator labels before gold_label.
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]


def _write(path: Path, rows: list[list[str]], bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join("\t".join(r) + "\n" for r in rows)
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")


def _mnli_row(i: int, s1: str, s2: str, label: str, dev: bool) -> list[str]:
    labels = [label] * (5 if dev else 1)
    return [str(i), "1", "1e", "fiction", "( a )", "( b )", "(ROOT a)", "(ROOT b)", s1, s2, *labels, label]


def make_glue(root: Path) -> Path:
    """Write every GLUE task in its real column layout (a few rows each)."""
    for split in ("train", "dev"):
        # CoLA: no header; source, label, original-label (blank for 1), sentence.
        _write(root / "CoLA" / f"{split}.tsv", [
            ["gj04", "1", "", "The sailors rode the breeze clear of the rocks."],
            ["gj04", "0", "*", "The more books I ask to whom he will give, the more he reads."],
            ["cj99", "1", "", 'He said "hello to me.'],  # stray quote: needs QUOTE_NONE
        ])  # fmt: skip
        _write(root / "SST-2" / f"{split}.tsv", [
            ["sentence", "label"],
            ["it 's a charming and often affecting journey . ", "1"],
            ["unflinchingly bleak and desperate ", "0"],
        ])  # fmt: skip
        _write(root / "MRPC" / f"{split}.tsv", [
            ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
            ["1", "702876", "702977", "Amrozi accused his brother .", "Referring to him , Amrozi accused ."],
            ["0", "2108705", "2108831", "Yucaipa owned Dominick 's .", "Yucaipa bought Dominick 's ."],
        ], bom=True)  # fmt: skip  -- MRPC descends from a BOM-prefixed release
        _write(root / "STS-B" / f"{split}.tsv", [
            ["index", "genre", "filename", "year", "old_index", "source1", "source2",
             "sentence1", "sentence2", "score"],
            ["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none",
             "A plane is taking off.", "An air plane is taking off.", "5.000"],
            ["1", "main-captions", "MSRvid", "2012test", "0004", "none", "none",
             "A man is playing a flute.", "A man is playing a bamboo flute.", "3.800"],
            ["2", "main-news", "headlines", "2013", "0010", "none", "none",
             "Cat sleeps.", "Stocks fall.", "0"],
        ])  # fmt: skip
        _write(root / "QQP" / f"{split}.tsv", [
            ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            ["133273", "213221", "213222", "How is the life of a math student?", "Which level of prepration is enough?", "0"],
            ["402555", "536040", "536041", "How do I control my horny emotions?", "How do you control your horniness?", "1"],
        ])  # fmt: skip
        _write(root / "QNLI" / f"{split}.tsv", [
            ["index", "question", "sentence", "label"],
            ["0", "What came into force after the new constitution?", "The Constitution came first.", "entailment"],
            ["1", "What is the first major city?", "Lake Tahoe is big.", "not_entailment"],
        ])  # fmt: skip
        for task, labels in (("RTE", ("not_entailment", "entailment")), ("WNLI", ("1", "0"))):
            _write(root / task / f"{split}.tsv", [
                ["index", "sentence1", "sentence2", "label"],
                ["0", "No Weapons Found in Iraq Yet.", "Weapons Found in Iraq.", labels[0]],
                ["1", "Pope Benedict XVI is installed.", "Benedict is the new Pope.", labels[1]],
            ])  # fmt: skip
    _write(root / "MNLI" / "train.tsv", [MNLI_TRAIN_HEADER,
        _mnli_row(0, "That's all right.", "That's fine.", "entailment", False),
        _mnli_row(1, "He ran.", "He slept.", "contradiction", False)])  # fmt: skip
    _write(root / "MNLI" / "dev_matched.tsv", [MNLI_DEV_HEADER,
        _mnli_row(0, "m premise", "m hypothesis", "neutral", True)])  # fmt: skip
    _write(root / "MNLI" / "dev_mismatched.tsv", [MNLI_DEV_HEADER,
        _mnli_row(0, "mm premise one", "mm hypothesis one", "contradiction", True),
        _mnli_row(1, "mm premise two", "mm hypothesis two", "entailment", True)])  # fmt: skip
    return root


@pytest.fixture
def glue_root(tmp_path: Path) -> Path:
    return make_glue(tmp_path / "glue_data")


# ------------------------------------------------------------------ synthetic standard layout


def test_registry_has_all_nine_tasks() -> None:
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    assert GLUE_TASKS["stsb"].num_labels == 1 and GLUE_TASKS["stsb"].is_regression
    assert GLUE_TASKS["mnli"].num_labels == 3
    assert GLUE_TASKS["mnli"].eval_splits == ("dev", "dev_mismatched")
    for spec in GLUE_TASKS.values():
        assert len(spec.label_names) == spec.num_labels


@pytest.mark.parametrize(
    "task, expected",
    [
        ("cola", [Example("The sailors rode the breeze clear of the rocks.", None, 1),
                  Example("The more books I ask to whom he will give, the more he reads.", None, 0),
                  Example('He said "hello to me.', None, 1)]),
        ("sst2", [Example("it 's a charming and often affecting journey . ", None, 1),
                  Example("unflinchingly bleak and desperate ", None, 0)]),
        ("mrpc", [Example("Amrozi accused his brother .", "Referring to him , Amrozi accused .", 1),
                  Example("Yucaipa owned Dominick 's .", "Yucaipa bought Dominick 's .", 0)]),
        ("stsb", [Example("A plane is taking off.", "An air plane is taking off.", 5.0),
                  Example("A man is playing a flute.", "A man is playing a bamboo flute.", 3.8),
                  Example("Cat sleeps.", "Stocks fall.", 0.0)]),
        ("qqp", [Example("How is the life of a math student?", "Which level of prepration is enough?", 0),
                 Example("How do I control my horny emotions?", "How do you control your horniness?", 1)]),
        ("qnli", [Example("What came into force after the new constitution?", "The Constitution came first.", 0),
                  Example("What is the first major city?", "Lake Tahoe is big.", 1)]),
        ("rte", [Example("No Weapons Found in Iraq Yet.", "Weapons Found in Iraq.", 1),
                 Example("Pope Benedict XVI is installed.", "Benedict is the new Pope.", 0)]),
        ("wnli", [Example("No Weapons Found in Iraq Yet.", "Weapons Found in Iraq.", 1),
                  Example("Pope Benedict XVI is installed.", "Benedict is the new Pope.", 0)]),
        ("mnli", [Example("That's all right.", "That's fine.", 0), Example("He ran.", "He slept.", 2)]),
    ],
)  # fmt: skip
def test_every_task_reads_standard_layout(glue_root: Path, task: str, expected: list[Example]) -> None:
    assert load_glue(task, glue_root, "train") == expected
    if task != "mnli":
        assert load_glue(task, glue_root, "dev") == expected


def test_stsb_labels_are_floats(glue_root: Path) -> None:
    labels = [ex.label for ex in load_glue("stsb", glue_root, "dev")]
    assert labels == [5.0, 3.8, 0.0] and all(isinstance(x, float) for x in labels)


def test_mnli_matched_and_mismatched(glue_root: Path) -> None:
    matched = load_glue("mnli", glue_root, "dev")
    assert matched == [Example("m premise", "m hypothesis", 1)]
    assert load_glue("mnli", glue_root, "dev_matched") == matched
    assert load_glue("mnli", glue_root, "validation_matched") == matched
    mism = load_glue("mnli", glue_root, "dev_mismatched")
    assert mism == [Example("mm premise one", "mm hypothesis one", 2), Example("mm premise two", "mm hypothesis two", 0)]


def test_names_are_case_insensitive_with_aliases(glue_root: Path) -> None:
    (glue_root / "SST-2").rename(glue_root / "sst-2")  # folder spelled differently on disk
    for name in ("sst2", "SST-2", "Sst_2"):
        assert len(load_glue(name, glue_root, "dev")) == 2
    assert get_glue_task("STS-B") is get_glue_task("stsb") is GLUE_TASKS["stsb"]
    with pytest.raises(ValueError, match="unknown GLUE task 'squad'.*CoLA"):
        get_glue_task("squad")


def test_root_may_be_the_task_folder_and_limit_stops_early(glue_root: Path) -> None:
    assert len(load_glue("cola", glue_root / "CoLA", "train")) == 3
    assert len(load_glue("cola", glue_root, "train", limit=2)) == 2
    assert load_glue("cola", glue_root, "train", limit=0) == []


def test_task_named_explicitly_reads_a_folder_of_any_name(glue_root: Path) -> None:
    # `--task sst2 --data-dir SST-2-small`: the folder's name need not be the task's.
    copy = (glue_root / "SST-2").rename(glue_root / "SST-2-small")
    assert len(load_glue("sst2", copy, "train")) == 2
    with pytest.raises(TaskDataError, match="header has no column 'sentence1' needed for RTE"):
        load_glue("rte", copy, "train")  # another task's files: refused by their header


def test_unknown_task_and_split_are_task_data_errors() -> None:
    # TaskDataError (a ValueError): the CLI prints it as one line.
    with pytest.raises(TaskDataError, match="unknown GLUE task 'squad'"):
        get_glue_task("squad")
    with pytest.raises(TaskDataError, match="unknown split 'test'"):
        load_glue("rte", None, "test")


def test_blank_trailing_line_is_tolerated(glue_root: Path) -> None:
    path = glue_root / "RTE" / "dev.tsv"
    path.write_text(path.read_text() + "\n")
    assert len(load_glue("rte", glue_root, "dev")) == 2


def test_unknown_split(glue_root: Path) -> None:
    with pytest.raises(ValueError, match="unlabelled"):
        load_glue("rte", glue_root, "test")
    with pytest.raises(ValueError, match="use one of: train, dev$"):
        load_glue("rte", glue_root, "dev_mismatched")  # only MNLI has it


# ------------------------------------------------------------------ error paths


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError) as err:
        load_glue("rte", tmp_path / "nope", "train")
    msg = str(err.value)
    assert str(tmp_path / "nope") in msg and "does not exist" in msg and "--data-dir" in msg


def test_missing_task_folder_lists_contents(glue_root: Path) -> None:
    import shutil

    shutil.rmtree(glue_root / "RTE")
    with pytest.raises(TaskDataError) as err:
        load_glue("rte", glue_root, "train")
    msg = str(err.value)
    assert str(glue_root / "RTE") in msg  # names the expected path
    assert "CoLA/" in msg and "SST-2/" in msg  # lists what is there
    assert "download_glue_data.py" in msg and "--data-dir" in msg  # says how to fix


def test_missing_split_file(glue_root: Path) -> None:
    (glue_root / "MNLI" / "dev_mismatched.tsv").unlink()
    with pytest.raises(TaskDataError) as err:
        load_glue("mnli", glue_root, "dev_mismatched")
    msg = str(err.value)
    assert str(glue_root / "MNLI" / "dev_mismatched.tsv") in msg
    assert "dev_matched.tsv" in msg and "train.tsv" in msg


def test_malformed_row_names_file_line_and_columns(glue_root: Path) -> None:
    path = glue_root / "RTE" / "dev.tsv"
    _write(path, [["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "entailment"], ["1", "only one sentence", "entailment"]])
    with pytest.raises(TaskDataError) as err:
        load_glue("rte", glue_root, "dev")
    msg = str(err.value)
    assert f"{path}:3" in msg and "3 columns" in msg and "index, sentence1, sentence2, label" in msg


def test_malformed_headerless_cola_row(glue_root: Path) -> None:
    path = glue_root / "CoLA" / "train.tsv"
    _write(path, [["gj04", "1", "", "ok."], ["gj04", "1", "", "ok."], ["gj04", "1", "no original label column"]])
    with pytest.raises(TaskDataError, match=rf"{re.escape(str(path))}:3: .*expected 4 .*source, label, original-label, sentence"):
        load_glue("cola", glue_root, "train")


def test_header_missing_column(glue_root: Path) -> None:
    path = glue_root / "QNLI" / "train.tsv"
    _write(path, [["index", "question", "text", "label"], ["0", "q", "s", "entailment"]])
    with pytest.raises(TaskDataError) as err:
        load_glue("qnli", glue_root, "train")
    msg = str(err.value)
    assert f"{path}:1" in msg and "'sentence'" in msg and "index, question, sentence, label" in msg


def test_bad_label_names_file_line_label_and_allowed_set(glue_root: Path) -> None:
    path = glue_root / "RTE" / "train.tsv"
    _write(path, [["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "maybe"]])
    with pytest.raises(TaskDataError) as err:
        load_glue("rte", glue_root, "train")
    msg = str(err.value)
    assert f"{path}:2" in msg and "'maybe'" in msg and "{entailment, not_entailment}" in msg


@pytest.mark.parametrize("raw", ["7.5", "abc", "nan", "-1"])
def test_bad_stsb_score(glue_root: Path, raw: str) -> None:
    path = glue_root / "STS-B" / "dev.tsv"
    rows = [["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"],
            ["0", "g", "f", "y", "o", "s", "s", "a", "b", raw]]  # fmt: skip
    _write(path, rows)
    with pytest.raises(TaskDataError, match=rf"{re.escape(str(path))}:2: label '{raw}'.*\[0, 5\]"):
        load_glue("stsb", glue_root, "dev")


# ------------------------------------------------------------------ MNLI pcp_subset variant


def test_mnli_pcp_subset_used_when_standard_files_absent(tmp_path: Path) -> None:
    pcp = tmp_path / "MNLI" / "pcp_subset"
    pcp.mkdir(parents=True)
    (pcp / "train.json").write_text(
        '{"1": {"text_a": "b", "text_b": "bb", "label": "neutral"},'
        ' "0": {"text_a": "a", "text_b": "aa", "label": "entailment"}}'
    )
    (pcp / "dev.json").write_text('{"0": {"text_a": "c", "text_b": "cc", "label": "unknown"}}')
    with pytest.warns(UserWarning, match="pcp_subset"):
        ex = load_glue("mnli", tmp_path, "train")
    assert ex == [Example("a", "aa", 0), Example("b", "bb", 1)]  # numeric key order
    with pytest.warns(UserWarning), pytest.raises(TaskDataError, match=r"dev\.json:record '0': label 'unknown'"):
        load_glue("mnli", tmp_path, "dev")
    with pytest.raises(TaskDataError, match="no mismatched split"):
        load_glue("mnli", tmp_path, "dev_mismatched")


# ------------------------------------------------------------------ HF hub path (faked)


def test_hub_loader_uses_datasets_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(path: str, name: str, split: str) -> list[dict]:
        calls.append((path, name, split))
        return [{"premise": "p", "hypothesis": "h", "label": 2, "idx": 0}] * 3

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_glue("mnli", None, "dev_mismatched", limit=2) == [Example("p", "h", 2)] * 2
    assert calls == [("glue", "mnli", "validation_mismatched")]


def test_hub_errors_are_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*_a: object, **_k: object) -> None:
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(TaskDataError, match="no route to host.*--data-dir"):
        load_glue("rte", None, "train")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(TaskDataError, match="pip install datasets"):
        load_glue("rte", None, "train")


# ------------------------------------------------------------------ metrics vs hand-computed values and the libraries

P5, R5 = [1, 1, 0, 1, 0], [1, 0, 0, 1, 1]  # tp=2 tn=1 fp=1 fn=1


def test_accuracy_f1_matthews_by_hand() -> None:
    assert accuracy(P5, R5) == pytest.approx(3 / 5)
    assert f1_binary(P5, R5) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (2 - 1) / sqrt(3*3*2*2)
    assert matthews_corrcoef(P5, R5) == pytest.approx(1 / 6)
    assert matthews_corrcoef([1, 1, 1], [0, 1, 1]) == 0.0  # undefined -> 0, like sklearn
    assert f1_binary([0, 0], [1, 0]) == 0.0
    assert f1_binary([1, 1, 0, 1, 0], [1, 0, 0, 1, 1], positive=0) == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))


def test_matthews_multiclass_by_hand() -> None:
    # confusion rows (true): [1,1,0],[0,2,0],[1,0,1]; t=[2,2,2], p=[2,3,1], correct=4, n=6
    # (4*6 - 12) / sqrt((36 - 12) * (36 - 14)) = 12 / sqrt(528)
    assert matthews_corrcoef([0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2]) == pytest.approx(12 / np.sqrt(528))


def test_pearson_and_tie_aware_spearman_by_hand() -> None:
    # dx=[-1.5,-.5,.5,1.5], dy=[-3,-1,0,4]: sum dxdy=11, sum dx^2=5, sum dy^2=26
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / np.sqrt(130))
    # ranks x=[1,2.5,2.5,4], y=[1,3,2,4] -> 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / np.sqrt(22.5))
    assert spearman([1, 10, 100, 1000], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(1.0)  # monotone, not linear
    assert pearson([3, 3, 3], [1, 2, 3]) == 0.0


@pytest.mark.filterwarnings("ignore:A single label was found")  # sklearn's own call, on a one-class draw
def test_metrics_agree_with_scikit_learn_and_scipy() -> None:
    import sklearn.metrics as sk
    from scipy import stats

    rng = np.random.default_rng(0)
    for n in (2, 7, 50):
        p, r = rng.integers(0, 2, n), rng.integers(0, 2, n)
        assert accuracy(p, r) == pytest.approx(sk.accuracy_score(r, p))
        assert f1_binary(p, r) == pytest.approx(sk.f1_score(r, p, zero_division=0))
        assert matthews_corrcoef(p, r) == pytest.approx(sk.matthews_corrcoef(r, p))
        p3, r3 = rng.integers(0, 3, n), rng.integers(0, 3, n)
        assert matthews_corrcoef(p3, r3) == pytest.approx(sk.matthews_corrcoef(r3, p3))
        x, y = rng.normal(size=n), rng.normal(size=n).round(1)  # rounding makes ties for spearman
        assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
    # the hand-computed cases above, as the libraries score them
    assert matthews_corrcoef([0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2]) == pytest.approx(
        sk.matthews_corrcoef([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]))
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(stats.spearmanr([1, 2, 2, 3], [1, 3, 2, 4])[0])


def test_undefined_metrics_are_zero_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's ConstantInputWarning or sklearn's single-label one would fail
        assert matthews_corrcoef([1, 1, 1], [1, 1, 1]) == 0.0  # one class on both sides
        assert matthews_corrcoef([0, 0, 0], [0, 1, 1]) == 0.0
        assert f1_binary([0, 0], [0, 0]) == 0.0
        for fn in (pearson, spearman):
            assert fn([2.5, 2.5, 2.5], [1.0, 2.0, 4.0]) == 0.0  # constant predictions
            assert fn([1.0, 2.0, 4.0], [3.0, 3.0, 3.0]) == 0.0  # constant references
            assert fn([1.0], [2.0]) == 0.0  # one pair: constant too
        stsb = glue_metrics("stsb", [2.0, 2.0, 2.0], [1.0, 2.0, 4.0])
        assert stsb == {"pearson": 0.0, "spearman": 0.0, "score": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(pearson([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0]))  # NaN in stays NaN
        assert np.isnan(spearman([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0]))


def test_glue_metrics_per_task() -> None:
    assert glue_metrics("mrpc", P5, R5) == pytest.approx({"f1": 2 / 3, "accuracy": 0.6, "score": (2 / 3 + 0.6) / 2})
    assert glue_metrics("qqp", P5, R5)["score"] == pytest.approx((2 / 3 + 0.6) / 2)
    assert glue_metrics("cola", P5, R5) == pytest.approx({"matthews_corr": 1 / 6, "score": 1 / 6})
    for task in ("sst2", "qnli", "rte", "wnli", "mnli"):
        assert glue_metrics(task, P5, R5) == pytest.approx({"accuracy": 0.6, "score": 0.6})
    stsb = glue_metrics("stsb", [1, 2, 3, 4], [2, 4, 5, 9])
    assert stsb["pearson"] == pytest.approx(11 / np.sqrt(130)) and stsb["spearman"] == pytest.approx(1.0)
    assert stsb["score"] == pytest.approx((11 / np.sqrt(130) + 1) / 2)


def test_glue_metrics_accepts_logits_and_validates() -> None:
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 3.0]])
    assert glue_metrics("sst2", logits, [1, 0, 0])["accuracy"] == pytest.approx(2 / 3)
    assert glue_metrics("stsb", np.array([[1.0], [2.0], [3.0]]), [1.0, 2.0, 3.0])["pearson"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 predictions but 3 references"):
        glue_metrics("rte", [0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="prediction 2 is not a label id in 0..1"):
        glue_metrics("rte", [0, 2], [0, 1])


# ------------------------------------------------------------------ real shared data


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared GLUE data not found at {path} (expected ../shared/data/glue next to the repo)")
    return path


@pytest.mark.parametrize(
    "task, n_train, n_dev, pair",
    [("sst2", 67349, 872, False), ("cola", 8551, 1043, False), ("rte", 2490, 277, True), ("wnli", 635, 71, True)],
)
def test_real_glue_files(task: str, n_train: int, n_dev: int, pair: bool) -> None:
    root = _need(SHARED_GLUE)
    train = load_glue(task, root, "train")
    dev = load_glue(task, root, "dev")
    assert (len(train), len(dev)) == (n_train, n_dev)
    assert {ex.label for ex in dev} == {0, 1}
    assert all((ex.text_b is not None) == pair and ex.text_a for ex in dev)


def test_real_mnli_pcp_subset_and_kshot() -> None:
    root = _need(SHARED_GLUE / "MNLI")
    with pytest.warns(UserWarning, match="pcp_subset"):
        train = load_glue("mnli", root.parent, "train")
    with pytest.warns(UserWarning, match="pcp_subset"):
        dev = load_glue("mnli", root.parent, "dev")
    assert (len(train), len(dev)) == (8999, 1000)
    assert {ex.label for ex in dev} == {0, 1, 2}
    kshot = _need(root / "kshot-16-42")
    for split in ("train", "dev"):  # standard MNLI columns, 16 per class
        assert Counter(ex.label for ex in load_glue("mnli", kshot, split)) == {0: 16, 1: 16, 2: 16}
