"""Turning task examples into padded batches (transformers' data collators do the padding)."""
from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

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


class LengthGroupedBatches(Sampler[list[int]]):
    """Shuffled batches of rows of similar length, so little of each padded batch is padding.

    Each epoch: the rows in a random order, cut into pools of ``pool`` batches; each pool sorted by
    length and cut into batches; then every batch in a random order. Each row is seen once per
    epoch, as with plain shuffling, and the batches come in random order. transformers'
    ``LengthGroupedSampler`` is not used: within each of its megabatches the batches run from the
    longest rows to the shortest, an order that follows length rather than chance.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, generator: torch.Generator, pool: int = 16) -> None:
        self.lengths, self.batch_size, self.generator, self.pool = list(lengths), batch_size, generator, pool

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        span = self.pool * self.batch_size
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i]

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


def _loader(rows: list[dict[str, Any]], collate: Any, batch_size: int, shuffle: bool, seed: int,
            group_by_length: bool = False) -> DataLoader:
    # The loader's own generator shuffles: the order depends on the seed alone, and a resumed run
    # (see peftlab.train.loop) draws it again from the generator's saved state.
    generator = torch.Generator().manual_seed(seed)
    if shuffle and group_by_length and not all("input_ids" in r for r in rows):
        warnings.warn("group_by_length: rows without 'input_ids' have no length to group by; batches are plainly "
                      "shuffled instead", stacklevel=3)
    elif shuffle and group_by_length:
        batches = LengthGroupedBatches([len(r["input_ids"]) for r in rows], batch_size, generator)
        return DataLoader(rows, batch_sampler=batches, collate_fn=collate, generator=generator)
    return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)


def make_loader(rows: list[dict[str, Any]], tokenizer: Any, batch_size: int, shuffle: bool, seed: int = 0,
                group_by_length: bool = False) -> DataLoader:
    """A loader that pads each batch to its own longest row; labels (class ids, or floats for
    regression) become a long or float tensor. ``group_by_length`` (with ``shuffle``): batches of rows
    of similar length (:class:`LengthGroupedBatches`), far less padding on text of varied length."""
    from transformers import DataCollatorWithPadding

    return _loader(rows, DataCollatorWithPadding(tokenizer), batch_size, shuffle, seed, group_by_length)


def make_scoring_loader(rows: list[dict[str, Any]], tokenizer: Any, batch_size: int = 128) -> DataLoader:
    """Batches for scoring, rows sorted by length (little padding). Predictions come in that order,
    labels with them: for metrics over the whole split, which do not depend on the order."""
    return make_loader(sorted(rows, key=lambda r: len(r["input_ids"])), tokenizer, batch_size, shuffle=False)


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
