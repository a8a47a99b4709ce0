"""Turning task examples into padded batches."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader


def encode_pairs(examples: Sequence[Any], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """Tokenize (text_a, text_b, label) examples once; padding happens per batch."""
    if not examples:  # tokenizers fail on an empty batch (IndexError); there is nothing to encode
        return []
    firsts = [e.text_a for e in examples]
    seconds = [e.text_b for e in examples] if examples and examples[0].text_b is not None else None
    enc = tokenizer(firsts, seconds, truncation=True, max_length=max_length)
    rows = []
    for i, example in enumerate(examples):
        row = {k: v[i] for k, v in enc.items()}
        row["labels"] = example.label
        rows.append(row)
    return rows


def make_loader(rows: list[dict[str, Any]], tokenizer: Any, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A loader that pads each batch to its own longest row (no wasted compute on padding)."""
    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = [r["labels"] for r in batch]
        padded = tokenizer.pad([{k: v for k, v in r.items() if k != "labels"} for r in batch], return_tensors="pt")
        dtype = torch.float32 if isinstance(labels[0], float) else torch.long
        padded["labels"] = torch.tensor(labels, dtype=dtype)
        return dict(padded)

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)
