"""Data of the cross-lingual suite: a reader of XNLI's dev TSVs, the split of those translated
examples into an unlabelled half (the language adapters' text) and an evaluation half, and the
masked-language-modelling batches (BERT's 15 % masking, 80/10/10).

XNLI dev (Conneau et al., 2018, "XNLI: Evaluating Cross-lingual Sentence Representations") holds the
same 2,490 premise/hypothesis pairs translated into each language, in the same order; the files
read here are ``dev-<code>.tsv``: premise, hypothesis, label word, tab-separated, no header.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from ...core.errors import PeftlabError
from ...tasks.glue import Example

# The label ids of XNLI's words: the same as GLUE MNLI's (entailment, neutral, contradiction), so a
# classifier trained on MNLI scores XNLI directly.
XNLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}
_FILE = re.compile(r"^dev-([A-Za-z_-]+)\.tsv$")


def xnli_languages(folder: str | Path) -> list[str]:
    """The language codes of the ``dev-<code>.tsv`` files in ``folder``, sorted."""
    path = Path(folder)
    if not path.is_dir():
        raise PeftlabError(f"XNLI folder {path} does not exist; expected a folder of dev-<language>.tsv files "
                           "(premise, hypothesis, label word); set xnli_dir")
    return sorted(m.group(1) for p in path.iterdir() if (m := _FILE.match(p.name)))


def read_xnli(path: str | Path) -> list[Example]:
    """The examples of one XNLI TSV, in file order; a bad row is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise PeftlabError(f"XNLI file {path} does not exist")
    examples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line:
                continue
            cells = line.split("\t")
            if len(cells) != 3:
                raise PeftlabError(f"{path} line {number}: {len(cells)} tab-separated fields; expected 3 (premise, "
                                   f"hypothesis, label word)")
            premise, hypothesis, word = cells
            if word not in XNLI_LABELS:
                raise PeftlabError(f"{path} line {number}: label {word!r}; expected one of {', '.join(XNLI_LABELS)}")
            if not premise.strip() or not hypothesis.strip():
                raise PeftlabError(f"{path} line {number}: an empty premise or hypothesis")
            examples.append(Example(premise, hypothesis, XNLI_LABELS[word]))
    if not examples:
        raise PeftlabError(f"XNLI file {path} has no rows")
    return examples


def split_halves(examples: Sequence[Example]) -> tuple[list[Example], list[Example]]:
    """(even indices, odd indices): the unlabelled half and the evaluation half. Every language's file
    holds the same examples in the same order, so no evaluation pair is ever seen as adapter text."""
    return list(examples[0::2]), list(examples[1::2])


def unlabelled_text(examples: Sequence[Example]) -> list[str]:
    """The distinct sentences (premises and hypotheses) of ``examples``, first-seen order; labels unused.
    Each XNLI premise comes with three hypotheses, so premises repeat: kept once."""
    return list(dict.fromkeys(s for e in examples for s in (e.text_a, e.text_b) if s))


def mask_tokens(input_ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab_size: int,
                probability: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking (Devlin et al., 2019): each token that is not special (nor padding: ``special``
    True) is chosen with ``probability``; a chosen token becomes ``mask_id`` with probability 0.8, a
    uniformly drawn vocabulary id with 0.1, and stays as it is with 0.1. Returns (inputs, labels):
    labels hold the original id at the chosen positions and -100 (ignored) elsewhere.
    ``input_ids``, ``special``: (batch, length)."""
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & ~special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    draw = torch.rand(input_ids.shape, generator=generator)
    inputs = input_ids.clone()
    inputs[chosen & (draw < 0.8)] = mask_id
    swap = chosen & (draw >= 0.8) & (draw < 0.9)
    inputs[swap] = torch.randint(vocab_size, input_ids.shape, generator=generator)[swap]
    return inputs, labels


def mlm_batches(texts: Sequence[str], tokenizer: Any, steps: int, batch_size: int, max_length: int,
                probability: float, seed: int) -> list[dict[str, torch.Tensor]]:
    """``steps`` batches of ``batch_size`` sentences drawn from ``texts`` (passes over a fixed
    shuffle, reshuffled per pass), padded per batch and masked: ``input_ids``, ``attention_mask``,
    ``mlm_labels``. Deterministic for a seed. A batch with no chosen token gets one (its first real
    token), so no step has an empty loss."""
    if not texts:
        raise PeftlabError("masked language modelling needs at least one sentence of unlabelled text")
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order: list[int] = []
    batches = []
    for _ in range(steps):
        picked = []
        while len(picked) < batch_size:
            if not order:
                order = rng.sample(range(len(encoded)), len(encoded))
            picked.append(order.pop())
        rows = [encoded[i] for i in picked]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        special = torch.ones((len(rows), width), dtype=torch.bool)
        for j, row in enumerate(rows):
            ids[j, :len(row)] = torch.tensor(row)
            attention[j, :len(row)] = 1
            special[j, :len(row)] = torch.tensor(tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True),
                                                 dtype=torch.bool)
        inputs, labels = mask_tokens(ids, special, tokenizer.mask_token_id, len(tokenizer), probability, generator)
        if (labels == -100).all():
            j, k = next((j, k) for j in range(len(rows)) for k in range(width) if not special[j, k])
            labels[j, k], inputs[j, k] = ids[j, k], tokenizer.mask_token_id
        batches.append({"input_ids": inputs, "attention_mask": attention, "mlm_labels": labels})
    return batches
