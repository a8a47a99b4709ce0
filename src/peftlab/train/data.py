"""Turning task examples into padded batches (transformers' data collators do the padding)."""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

from .generation import IGNORE_INDEX


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


def _loader(rows: list[dict[str, Any]], collate: Any, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    # The loader's own generator shuffles: the order depends on the seed alone, and a resumed run
    # (see peftlab.train.loop) draws it again from the generator's saved state.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)


def make_loader(rows: list[dict[str, Any]], tokenizer: Any, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A loader that pads each batch to its own longest row (no wasted compute on padding); labels
    (class ids, or floats for regression) become a long or float tensor."""
    from transformers import DataCollatorWithPadding

    return _loader(rows, DataCollatorWithPadding(tokenizer), batch_size, shuffle, seed)


def make_seq2seq_loader(rows: list[dict[str, list[int]]], tokenizer: Any, batch_size: int, shuffle: bool,
                        seed: int = 0) -> DataLoader:
    """Batches of ``{"input_ids", "labels"}`` rows, right-padded to the batch's longest: ``input_ids``
    with the pad token (and an ``attention_mask``), ``labels`` with -100, so padding is out of the loss.

    Seq2seq rows carry the target as ``labels`` (the model shifts it into the decoder input);
    causal rows carry ``labels`` as long as ``input_ids``, -100 on the prompt.
    """
    from transformers import DataCollatorForSeq2Seq

    # Training pads on the right whatever side the tokenizer pads on for generation; a copy, so
    # the caller's tokenizer keeps its side.
    right = copy.copy(tokenizer)
    right.padding_side = "right"
    return _loader(rows, DataCollatorForSeq2Seq(right, label_pad_token_id=IGNORE_INDEX), batch_size, shuffle, seed)
