"""E2E NLG: meaning representation -> restaurant description, with BLEU and ROUGE-L.

Reads the E2E challenge CSVs (columns ``mr``, ``ref``; several rows share one MR). Rows are
grouped by MR, in order of first appearance, into one example holding all its references,
which is what multi-reference scoring needs. Scores are on the 0-100 scale E2E papers use.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from peftlab.tasks.errors import TaskDataError, describe_folder
from peftlab.tasks.translation import bleu

__all__ = ["E2EExample", "E2E_SPLITS", "load_e2e", "rouge_l", "e2e_metrics"]

E2E_SPLITS = {"train": "trainset.csv", "dev": "devset.csv", "validation": "devset.csv",
              "test": "testset_w_refs.csv"}  # fmt: skip


@dataclass(frozen=True)
class E2EExample:
    """One meaning representation with every human reference written for it."""

    mr: str
    references: tuple[str, ...]


def load_e2e(root: str | Path, split: str = "dev", limit: int | None = None) -> list[E2EExample]:
    """Load an E2E split ("train", "dev", "test" = testset_w_refs.csv), refs grouped per MR.

    ``root`` is the folder holding the CSVs, or a CSV file itself. ``limit`` counts MRs.

    Raises:
        TaskDataError: missing folder/file, missing ``mr``/``ref`` column or a malformed row
            (file and 1-based line named).
    """
    path = Path(root)
    if path.is_dir():
        if split not in E2E_SPLITS:
            raise TaskDataError(f"unknown E2E split {split!r}; use one of {sorted(E2E_SPLITS)}")
        path = path / E2E_SPLITS[split]
    if not path.is_file():
        raise TaskDataError(
            f"E2E file not found: {path} ({describe_folder(path.parent)}); download the E2E "
            "dataset (github.com/tuetschek/e2e-dataset) and pass the folder holding devset.csv"
        )
    grouped: dict[str, list[str]] = {}
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)  # standard quoting: MRs contain commas inside quotes
        header = [h.strip().lower() for h in next(reader, [])]
        if "mr" not in header or "ref" not in header:
            raise TaskDataError(
                f"{path}:1: header must have columns 'mr' and 'ref' (references are needed for "
                f"scoring; testset.csv has none, use testset_w_refs.csv); got: {', '.join(header) or '(empty)'}"
            )
        i_mr, i_ref = header.index("mr"), header.index("ref")
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                # line_num is the line where the row ended (quoted fields may span lines).
                raise TaskDataError(
                    f"{path}:{reader.line_num}: malformed row with {len(row)} columns; "
                    f"expected {len(header)} ({', '.join(header)})"
                )
            mr = row[i_mr].strip()
            if mr not in grouped:
                if limit is not None and len(grouped) >= limit:
                    continue  # keep reading: a kept MR's later references must not be lost
                grouped[mr] = []
            grouped[mr].append(row[i_ref].strip())
    return [E2EExample(mr, tuple(refs)) for mr, refs in grouped.items()]


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over examples of the best ROUGE-L F1 against that example's references (0-100).

    Uses the ``rouge-score`` package without stemming (E2E's official scorer does not stem).
    """
    from rouge_score import rouge_scorer  # local: optional-looking heavy import

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("cannot compute ROUGE-L of an empty corpus")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    total = 0.0
    for hyp, refs in zip(hypotheses, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError("every hypothesis needs at least one reference")
        total += max(scorer.score(ref, hyp)["rougeL"].fmeasure for ref in refs)
    return 100.0 * total / len(hypotheses)


def e2e_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU (sacreBLEU, multi-reference) and ROUGE-L, both 0-100: ``{"bleu", "rouge_l"}``."""
    return {"bleu": bleu(hypotheses, references), "rouge_l": rouge_l(hypotheses, references)}
