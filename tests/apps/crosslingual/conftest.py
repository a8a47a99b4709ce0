"""Fixtures of the cross-lingual tests: the tiny BERT of the assessment tests and a tiny XNLI folder."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.assess.conftest import WORDS, tiny_model  # noqa: F401 - the tiny BERT model folder fixture

LABELS = ("entailment", "neutral", "contradiction")
__all__ = ["LABELS", "WORDS", "tiny_model", "write_xnli", "xnli_dir"]


def write_xnli(folder: Path, languages: tuple[str, ...] = ("en", "de", "ar"), pairs: int = 24) -> Path:
    """dev-<code>.tsv per language: the same ``pairs`` examples (words of the tiny vocabulary, each
    language its own word order), premise, hypothesis, label word, no header."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, code in enumerate(languages):
        rng = random.Random(0)
        lines = []
        for i in range(pairs):
            premise = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
            hypothesis = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
            if k:  # a "translation": the same words, reordered per language
                premise, hypothesis = premise[k:] + premise[:k], hypothesis[::-1]
            lines.append(f"{' '.join(premise)}\t{' '.join(hypothesis)}\t{LABELS[i % 3]}")
        (folder / f"dev-{code}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture()
def xnli_dir(tmp_path: Path) -> Path:
    return write_xnli(tmp_path / "xnli")
