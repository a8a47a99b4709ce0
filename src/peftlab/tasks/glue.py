"""GLUE: the nine tasks, read from the standard GLUE folder layout, with their official metrics.

Layout read (as distributed by the GLUE benchmark's download script)::

    <root>/CoLA/{train,dev}.tsv          no header: source, label, original-label, sentence
    <root>/SST-2/{train,dev}.tsv         sentence, label
    <root>/MRPC/{train,dev}.tsv          Quality, #1 ID, #2 ID, #1 String, #2 String
    <root>/STS-B/{train,dev}.tsv         index ... sentence1, sentence2, score (float 0-5)
    <root>/QQP/{train,dev}.tsv           id, qid1, qid2, question1, question2, is_duplicate
    <root>/MNLI/train.tsv, dev_matched.tsv, dev_mismatched.tsv   ... sentence1, sentence2, ..., gold_label
    <root>/QNLI/{train,dev}.tsv          index, question, sentence, label
    <root>/RTE/{train,dev}.tsv           index, sentence1, sentence2, label
    <root>/WNLI/{train,dev}.tsv          index, sentence1, sentence2, label

Decisions worth knowing:

* Task folders are matched case-insensitively, ignoring ``-``/``_`` ("sst2", "SST-2", "sts_b").
  ``root`` may also be a task folder itself, or a sub-folder of one (e.g. ``MNLI/kshot-16-42``,
  which keeps the MNLI column layout), so few-shot splits load without copying.
* MNLI ``pcp_subset``: when ``MNLI/`` lacks the standard TSV for a split but has
  ``pcp_subset/{train,dev}.json`` (``{"i": {"text_a", "text_b", "label"}}``), that JSON is
  read instead, with a warning: its "dev" was sampled from MNLI *train*, so scores on it are
  not MNLI-m numbers, and it has no mismatched split.
* Labels are ids in the order the Hugging Face ``glue`` dataset uses, so local and hub data
  agree (e.g. MNLI entailment=0, neutral=1, contradiction=2; WNLI/MRPC/QQP/SST-2/CoLA 1 = positive).
* Metrics are fractions (accuracy 0-1, correlations -1..1), as the HF ``evaluate`` GLUE metric
  reports them; ``"score"`` is the mean of a task's metrics, as the GLUE leaderboard averages
  multi-metric tasks. MNLI is scored once per eval split (``GlueTask.eval_splits``).
  They are scikit-learn's and scipy's, as in ``evaluate``; where those are undefined the score is
  0.0: Matthews on a constant side (scikit-learn's own value), Pearson/Spearman on a constant side
  (scipy gives NaN), so a model predicting one class or one score ranks last instead of NaN.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peftlab.tasks.errors import TaskDataError, describe_folder

__all__ = [
    "Example",
    "GlueTask",
    "GLUE_TASKS",
    "get_glue_task",
    "load_glue",
    "glue_metrics",
    "accuracy",
    "f1_binary",
    "matthews_corrcoef",
    "pearson",
    "spearman",
]

_GET_GLUE_HINT = (
    "Download GLUE with the GLUE baseline's download_glue_data.py "
    "(`python download_glue_data.py --data_dir glue_data --tasks all`) or "
    "`datasets.load_dataset('glue', <task>)`, then pass the folder that holds the task "
    "folders (CoLA/, SST-2/, ...) as --data-dir / root."
)


@dataclass(frozen=True)
class Example:
    """One GLUE example; ``text_b`` is None for single-sentence tasks (CoLA, SST-2)."""

    text_a: str
    text_b: str | None
    label: int | float


@dataclass(frozen=True)
class GlueTask:
    """Static description of a GLUE task.

    ``main_metric`` is the number papers usually quote for the task (e.g. LoRA's tables:
    Matthews for CoLA, Pearson for STS-B, accuracy elsewhere); ``"score"`` from
    :func:`glue_metrics` is GLUE's own per-task average of ``metrics``.
    """

    name: str  # canonical key, e.g. "sst2"
    dir_name: str  # folder name in the GLUE distribution, e.g. "SST-2"
    hub_name: str  # config name of the HF `glue` dataset
    num_labels: int  # 1 for the regression task STS-B
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    is_regression: bool
    is_pair: bool  # whether examples carry text_b
    eval_splits: tuple[str, ...] = ("dev",)


@dataclass(frozen=True)
class _Layout:
    """Where a task's columns sit in its TSV files (private: a reading detail)."""

    header: tuple[str, ...] | None  # expected header; None = no header row (CoLA)
    text_a: str | int  # column name (header files) or 0-based index (no header)
    text_b: str | int | None
    label: str | int
    raw_labels: tuple[str, ...] = ()  # raw label strings, in label-id order; () = float label
    num_columns: int | None = None  # only for header-less files


_BINARY_RAW = ("0", "1")
_MNLI_HEADER = (
    "index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
    "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label",
)  # fmt: skip

GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", "CoLA", "cola", 2, ("unacceptable", "acceptable"),
                     ("matthews_corr",), "matthews_corr", False, False),
    "sst2": GlueTask("sst2", "SST-2", "sst2", 2, ("negative", "positive"),
                     ("accuracy",), "accuracy", False, False),
    "mrpc": GlueTask("mrpc", "MRPC", "mrpc", 2, ("not_equivalent", "equivalent"),
                     ("f1", "accuracy"), "accuracy", False, True),
    "stsb": GlueTask("stsb", "STS-B", "stsb", 1, ("similarity",),
                     ("pearson", "spearman"), "pearson", True, True),
    "qqp": GlueTask("qqp", "QQP", "qqp", 2, ("not_duplicate", "duplicate"),
                    ("f1", "accuracy"), "accuracy", False, True),
    "mnli": GlueTask("mnli", "MNLI", "mnli", 3, ("entailment", "neutral", "contradiction"),
                     ("accuracy",), "accuracy", False, True, ("dev", "dev_mismatched")),
    "qnli": GlueTask("qnli", "QNLI", "qnli", 2, ("entailment", "not_entailment"),
                     ("accuracy",), "accuracy", False, True),
    "rte": GlueTask("rte", "RTE", "rte", 2, ("entailment", "not_entailment"),
                    ("accuracy",), "accuracy", False, True),
    "wnli": GlueTask("wnli", "WNLI", "wnli", 2, ("not_entailment", "entailment"),
                     ("accuracy",), "accuracy", False, True),
}  # fmt: skip

_LAYOUTS: dict[str, _Layout] = {
    "cola": _Layout(None, 3, None, 1, _BINARY_RAW, num_columns=4),
    "sst2": _Layout(("sentence", "label"), "sentence", None, "label", _BINARY_RAW),
    "mrpc": _Layout(("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
                    "#1 String", "#2 String", "Quality", _BINARY_RAW),
    "stsb": _Layout(("index", "genre", "filename", "year", "old_index", "source1", "source2",
                     "sentence1", "sentence2", "score"), "sentence1", "sentence2", "score"),
    "qqp": _Layout(("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
                   "question1", "question2", "is_duplicate", _BINARY_RAW),
    "mnli": _Layout(_MNLI_HEADER, "sentence1", "sentence2", "gold_label",
                    ("entailment", "neutral", "contradiction")),
    "qnli": _Layout(("index", "question", "sentence", "label"), "question", "sentence", "label",
                    ("entailment", "not_entailment")),
    "rte": _Layout(("index", "sentence1", "sentence2", "label"), "sentence1", "sentence2",
                   "label", ("entailment", "not_entailment")),
    "wnli": _Layout(("index", "sentence1", "sentence2", "label"), "sentence1", "sentence2",
                    "label", _BINARY_RAW),
}  # fmt: skip

# Field names in the HF hub `glue` dataset, per task.
_HUB_FIELDS: dict[str, tuple[str, str | None]] = {
    "cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"), "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
}  # fmt: skip

# Split names accepted, mapped to a canonical name; HF-style names are accepted too.
_SPLIT_ALIASES = {
    "train": "train",
    "dev": "dev", "validation": "dev", "val": "dev",
    "dev_matched": "dev", "validation_matched": "dev", "matched": "dev",
    "dev_mismatched": "dev_mismatched", "validation_mismatched": "dev_mismatched",
    "mismatched": "dev_mismatched",
}  # fmt: skip

_STSB_RANGE = (0.0, 5.0)


def _norm(name: str) -> str:
    """Normalise a task/folder name: 'SST-2', 'sst_2', 'sst2' all become 'sst2'."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def get_glue_task(name: str | GlueTask) -> GlueTask:
    """Look a task up by name, case-insensitively and ignoring '-'/'_' ("SST-2", "sts_b")."""
    if isinstance(name, GlueTask):
        return name
    key = _norm(name)
    if key in GLUE_TASKS:
        return GLUE_TASKS[key]
    # TaskDataError (a ValueError): a wrong task name is the user's to fix, like a wrong folder.
    raise TaskDataError(
        f"unknown GLUE task {name!r}; known tasks: "
        + ", ".join(t.dir_name for t in GLUE_TASKS.values())
    )


def _canonical_split(task: GlueTask, split: str) -> str:
    canon = _SPLIT_ALIASES.get(split.lower())
    if canon == "dev_mismatched" and task.name != "mnli":
        canon = None  # only MNLI has a mismatched dev set
    if canon is None:
        allowed = "train, dev" + (", dev_mismatched" if task.name == "mnli" else "")
        test_note = " (GLUE test files are unlabelled, so no 'test' split)" if "test" in split else ""
        raise TaskDataError(f"unknown split {split!r} for {task.dir_name}; use one of: {allowed}{test_note}")
    return canon


def _split_file(task: GlueTask, split: str) -> str:
    if task.name == "mnli" and split != "train":
        return "dev_matched.tsv" if split == "dev" else "dev_mismatched.tsv"
    return f"{split}.tsv"


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def load_glue(
    task: str | GlueTask,
    root: str | Path | None,
    split: str = "train",
    limit: int | None = None,
) -> list[Example]:
    """Load one split of a GLUE task.

    Args:
        task: task name ("cola", "SST-2", "stsb", ...) or a :class:`GlueTask`.
        root: folder holding the task folders (``<root>/<TASK>/train.tsv``), or a task folder
            itself; ``None`` loads from the Hugging Face hub via ``datasets`` (optional).
        split: "train", "dev" (MNLI: matched) or, for MNLI, "dev_mismatched". HF names
            ("validation", "validation_matched", ...) are accepted too.
        limit: keep only the first ``limit`` examples (reading stops there, so it is cheap).

    Raises:
        TaskDataError: missing folder/file, malformed row or label outside the task's set;
            the message names the path (and 1-based line) and how to fix it.
    """
    spec = get_glue_task(task)
    canon = _canonical_split(spec, split)
    if limit is not None and limit < 0:
        raise TaskDataError(f"limit must be >= 0, got {limit}")
    if root is None:
        return _load_from_hub(spec, canon, limit)

    task_dir = _find_task_dir(spec, Path(root))
    path = task_dir / _split_file(spec, canon)
    if not path.is_file():
        pcp = task_dir / "pcp_subset"
        if spec.name == "mnli" and pcp.is_dir():
            return _load_mnli_pcp(pcp, canon, limit)
        raise TaskDataError(
            f"GLUE {spec.dir_name} {canon} file not found: expected {path} "
            f"({describe_folder(task_dir)}). {_GET_GLUE_HINT}"
        )
    return list(_read_tsv(path, spec, limit))


def _find_task_dir(spec: GlueTask, root: Path) -> Path:
    """Resolve ``<root>/<TASK>`` (case-insensitively), or accept root as the task folder."""
    if not root.is_dir():
        raise TaskDataError(
            f"GLUE data folder {root} does not exist or is not a folder "
            f"({describe_folder(root.parent)}). {_GET_GLUE_HINT}"
        )
    matches = sorted(p for p in root.iterdir() if p.is_dir() and _norm(p.name) == spec.name)
    if matches:
        return matches[0]
    # Why: let callers point straight at a task folder or a variant inside one
    # (e.g. MNLI/kshot-16-42, which keeps the standard MNLI columns).
    if _norm(root.name) == spec.name or _norm(root.parent.name) == spec.name:
        return root
    # Why: the task was named explicitly, so a folder of any name that holds its files is its
    # folder (e.g. a copy named SST-2-small, passed as `--task sst2 --data-dir SST-2-small`).
    if any((root / _split_file(spec, split)).is_file() for split in ("train", "dev")):
        return root
    raise TaskDataError(
        f"GLUE task folder for {spec.dir_name} not found: expected {root / spec.dir_name} "
        f"({describe_folder(root)}). {_GET_GLUE_HINT}"
    )


def _read_tsv(path: Path, spec: GlueTask, limit: int | None) -> Iterator[Example]:
    """Yield examples from a GLUE TSV, validating every row against the task's layout."""
    layout = _LAYOUTS[spec.name]
    if limit == 0:
        return
    count = 0
    # utf-8-sig: MRPC's files descend from a Microsoft release that starts with a BOM.
    with path.open(encoding="utf-8-sig", newline="") as fh:
        # QUOTE_NONE: GLUE text holds unbalanced quotes that a quoting reader would merge
        # across lines; GLUE files never quote fields, so each line is exactly one row.
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        if layout.header is None:
            assert layout.num_columns is not None
            width = layout.num_columns
            cols = {"a": layout.text_a, "b": layout.text_b, "label": layout.label}
            expected = f"{width} tab-separated columns (no header): source, label, original-label, sentence"
        else:
            header = next(reader, None)
            if header is None:
                raise TaskDataError(f"{path} is empty; expected a header row: {', '.join(layout.header)}")
            width = len(header)
            expected = "columns " + ", ".join(header)
            cols = {}
            for key, name in (("a", layout.text_a), ("b", layout.text_b), ("label", layout.label)):
                if name is None:
                    cols[key] = None
                    continue
                if name not in header:
                    raise TaskDataError(
                        f"{path}:1: header has no column {name!r} needed for {spec.dir_name}; "
                        f"expected header like: {', '.join(layout.header)}; "
                        f"got: {', '.join(header)}"
                    )
                cols[key] = header.index(name)
        for row in reader:
            line = reader.line_num
            if not row or row == [""]:
                continue  # tolerate blank lines (e.g. a trailing one)
            if len(row) != width:
                raise TaskDataError(
                    f"{path}:{line}: malformed {spec.dir_name} row with {len(row)} columns; "
                    f"expected {width} ({expected})"
                )
            label = _parse_label(row[cols["label"]], spec, layout, path, line)
            text_b = row[cols["b"]] if cols["b"] is not None else None
            yield Example(text_a=row[cols["a"]], text_b=text_b, label=label)
            count += 1
            if limit is not None and count >= limit:
                return


def _parse_label(raw: str, spec: GlueTask, layout: _Layout, path: Path | str, line: int | str) -> int | float:
    """Map a raw label string to its id (or float for STS-B), or raise naming file and line."""
    where = f"{path}:{line}"
    if spec.is_regression:
        lo, hi = _STSB_RANGE
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (lo <= value <= hi):  # also rejects NaN
            raise TaskDataError(
                f"{where}: label {raw!r} is not a {spec.dir_name} score; allowed: a number in [{lo:g}, {hi:g}]"
            )
        return value
    raw_labels = layout.raw_labels
    if raw in raw_labels:
        return raw_labels.index(raw)
    raise TaskDataError(
        f"{where}: label {raw!r} is not a {spec.dir_name} label; allowed: {{{', '.join(raw_labels)}}}"
    )


def _load_mnli_pcp(pcp: Path, split: str, limit: int | None) -> list[Example]:
    """Read the MNLI ``pcp_subset`` JSON variant (used only when standard TSVs are absent)."""
    if split == "dev_mismatched":
        raise TaskDataError(
            f"MNLI dev_mismatched.tsv not found in {pcp.parent} and the pcp_subset variant in {pcp} "
            f"has no mismatched split (only train.json/dev.json). {_GET_GLUE_HINT}"
        )
    path = pcp / ("train.json" if split == "train" else "dev.json")
    if not path.is_file():
        raise TaskDataError(f"MNLI pcp_subset file not found: expected {path} ({describe_folder(pcp)})")
    warnings.warn(
        f"MNLI standard TSVs absent in {pcp.parent}; reading the pcp_subset JSON variant {path}. "
        "Its dev split was sampled from MNLI train, so scores are not MNLI-m results.",
        stacklevel=3,
    )
    spec, layout = GLUE_TASKS["mnli"], _LAYOUTS["mnli"]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TaskDataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise TaskDataError(f"{path}: expected a JSON object {{\"0\": {{text_a, text_b, label}}, ...}}")

    def order(key: str) -> tuple[int, int | str]:
        # Keys are "0", "1", ...; sort numerically so the file's order is kept.
        return (0, int(key)) if key.isdigit() else (1, key)

    out: list[Example] = []
    for key in sorted(data, key=order):
        if limit is not None and len(out) >= limit:
            break
        rec = data[key]
        where = f"record {key!r}"
        if not isinstance(rec, dict) or any(k not in rec for k in ("text_a", "text_b", "label")):
            raise TaskDataError(f"{path}: {where} is malformed; expected keys text_a, text_b, label")
        label = _parse_label(str(rec["label"]), spec, layout, path, where)
        out.append(Example(str(rec["text_a"]), str(rec["text_b"]), label))
    return out


def _load_from_hub(spec: GlueTask, split: str, limit: int | None) -> list[Example]:
    """Load from the HF hub (``datasets.load_dataset('glue', task)``); ``datasets`` is optional."""
    try:
        import datasets  # lazy: optional dependency, slow to import
    except ImportError as exc:
        raise TaskDataError(
            "no GLUE folder given and the optional `datasets` package is not installed; "
            "`pip install datasets`, or pass a local GLUE folder (--data-dir). " + _GET_GLUE_HINT
        ) from exc
    hub_split = {"train": "train", "dev": "validation", "dev_mismatched": "validation_mismatched"}[split]
    if spec.name == "mnli" and split == "dev":
        hub_split = "validation_matched"
    try:
        ds: Any = datasets.load_dataset("glue", spec.hub_name, split=hub_split)
    except Exception as exc:  # noqa: BLE001 - any hub/network failure gets the same advice
        raise TaskDataError(
            f"could not load GLUE {spec.hub_name}/{hub_split} from the Hugging Face hub "
            f"({type(exc).__name__}: {exc}). If offline, pass a local GLUE folder (--data-dir). "
            + _GET_GLUE_HINT
        ) from exc
    field_a, field_b = _HUB_FIELDS[spec.name]
    out: list[Example] = []
    for i, row in enumerate(ds):
        if limit is not None and len(out) >= limit:
            break
        raw = row["label"]
        if spec.is_regression:
            label: int | float = float(raw)
        else:
            label = int(raw)
            if not 0 <= label < spec.num_labels:
                raise TaskDataError(
                    f"hub glue/{spec.hub_name}/{hub_split} row {i}: label {raw!r} outside "
                    f"{{0..{spec.num_labels - 1}}}"
                )
        out.append(Example(str(row[field_a]), str(row[field_b]) if field_b else None, label))
    return out


# ---------------------------------------------------------------------------------------
# Metrics: scikit-learn and scipy, as the HF `evaluate` GLUE metric computes them
# ---------------------------------------------------------------------------------------


_ArrayLike = Sequence[Any] | np.ndarray


def _pair_arrays(predictions: _ArrayLike, references: _ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, r = np.asarray(predictions), np.asarray(references)
    if p.shape[0] != r.shape[0]:
        raise ValueError(f"{p.shape[0]} predictions but {r.shape[0]} references")
    if r.shape[0] == 0:
        raise ValueError("cannot score an empty set of predictions")
    return p, r


def _sklearn_metrics() -> Any:
    # Imported on first use: sklearn.metrics takes over a second to import, which every
    # `import peftlab.tasks` would otherwise pay, scoring or not.
    import sklearn.metrics

    return sklearn.metrics


def accuracy(predictions: Sequence[int] | np.ndarray, references: Sequence[int] | np.ndarray) -> float:
    """Fraction of exact matches."""
    p, r = _pair_arrays(predictions, references)
    return float(_sklearn_metrics().accuracy_score(r, p))


def f1_binary(
    predictions: Sequence[int] | np.ndarray, references: Sequence[int] | np.ndarray, positive: int = 1
) -> float:
    """F1 of the positive class (GLUE's MRPC/QQP F1); 0.0 when there are no true positives."""
    p, r = _pair_arrays(predictions, references)
    return float(_sklearn_metrics().f1_score(r, p, pos_label=positive, zero_division=0))


def matthews_corrcoef(predictions: Sequence[int] | np.ndarray, references: Sequence[int] | np.ndarray) -> float:
    """Matthews correlation (multi-class form, equal to the binary one for 2 classes).

    0.0 when undefined (a constant prediction or reference), as scikit-learn gives it; a CoLA
    model that predicts one class is then scored 0, not NaN.
    """
    p, r = _pair_arrays(predictions, references)
    with warnings.catch_warnings():
        # Why: one label in both sides is the undefined case above, already scored 0.
        warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
        return float(_sklearn_metrics().matthews_corrcoef(r, p))


def _correlation(name: str, predictions: _ArrayLike, references: _ArrayLike) -> float:
    p, r = _pair_arrays(predictions, references)
    p, r = p.astype(np.float64), r.astype(np.float64)
    # Why 0.0 and not scipy's NaN (with a warning): a constant side (e.g. an STS-B model that
    # predicts one score, or the constant baseline) has no correlation, and a NaN would poison
    # the mean "score" and the suite's tables. NaN in still gives NaN (ptp is NaN, not 0).
    if np.ptp(p) == 0 or np.ptp(r) == 0:
        return 0.0
    from scipy import stats  # on first use, like scikit-learn above

    return float(getattr(stats, name)(p, r).statistic)


def pearson(predictions: Sequence[float] | np.ndarray, references: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation (scipy); 0.0 when either side is constant (undefined), NaN in gives NaN."""
    return _correlation("pearsonr", predictions, references)


def spearman(predictions: Sequence[float] | np.ndarray, references: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (scipy, ties get their average rank); 0.0 on constant input."""
    return _correlation("spearmanr", predictions, references)


_METRIC_FNS = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews_corr": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def glue_metrics(
    task: str | GlueTask,
    predictions: Sequence[int] | Sequence[float] | np.ndarray,
    references: Sequence[int] | Sequence[float] | np.ndarray,
) -> dict[str, float]:
    """Compute a task's official GLUE metrics plus ``"score"`` (their mean).

    ``predictions`` are label ids (or floats for STS-B); a 2-D array of logits is accepted
    too and reduced with argmax (classification) or squeezed (STS-B, shape ``(n, 1)``).
    For MNLI call once per eval split (matched, mismatched).
    """
    spec = get_glue_task(task)
    p = np.asarray(predictions)
    r = np.asarray(references)
    if p.ndim == 2:
        # Why: trainers hand over raw logits; reducing here avoids a common caller bug.
        if spec.is_regression:
            if p.shape[1] != 1:
                raise ValueError(f"STS-B predictions must be (n,) or (n, 1), got {p.shape}")
            p = p[:, 0]
        else:
            p = p.argmax(axis=1)
    if p.ndim != 1 or r.ndim != 1:
        raise ValueError(f"predictions/references must be 1-D, got shapes {p.shape} and {r.shape}")
    if not spec.is_regression:
        for name, arr in (("prediction", p), ("reference", r)):
            bad = arr[(arr < 0) | (arr >= spec.num_labels) | (arr != np.round(arr))] if arr.size else arr
            if bad.size:
                raise ValueError(
                    f"{spec.dir_name} {name} {bad[0].item()!r} is not a label id in 0..{spec.num_labels - 1}"
                )
        p, r = p.astype(np.int64), r.astype(np.int64)
    out = {name: _METRIC_FNS[name](p, r) for name in spec.metrics}
    out["score"] = float(np.mean([out[name] for name in spec.metrics]))
    return out
