"""Turning task examples into padded batches (transformers' data collators do the padding)."""
from __future__ import annotations

import copy
import math
from typing import Any, Mapping, Sequence

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


# What one more forward and backward pass costs, in padded tokens per CPU thread: a part of a batch
# pays this times torch's thread count on top of its tokens (a token costs less time with more threads;
# a call's fixed cost does not shrink). Measured on LoRA training of the MiniLM on SST-2 (40 steps):
# 1 thread: 17.7 / 16.8 / 19.5 / 22.3 s at 32 / 64 / 128 / 256 per thread x 1; whole batches 34.3 s.
# 2 threads: 13.0-13.7 / 11.5-12.3 / 12.6 s at 64 / 128 / 256 in all; whole batches 22.9 s.
PART_COST_TOKENS_PER_THREAD = 64


def length_parts(lengths: Sequence[int], part_cost: float) -> list[tuple[int, int]]:
    """Cut ``lengths`` (sorted ascending) into runs ``[start, end)`` that minimise the padded work:
    each run costs ``part_cost`` plus its rows times its longest row. Exact (dynamic programming
    over the cut points; a batch has few rows)."""
    n = len(lengths)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end):
            cost = best[start] + part_cost + (end - start) * lengths[end - 1]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    runs, end = [], n
    while end:
        runs.append((cut[end], end))
        end = cut[end]
    return runs[::-1]


def split_by_length(batch: Mapping[str, Any], part_cost: float | None = None
                    ) -> tuple[list[tuple[dict[str, Any], float]] | None, str]:
    """The batch's rows sorted by length and cut into parts (:func:`length_parts`), each trimmed to
    its own longest row, with each part's share of the rows: ``sum(share * part loss)`` is the whole
    batch's loss when the loss averages over all the batch's examples (classification, regression;
    not when some rows' labels are ignored), so the gradient is the whole batch's, with less padding
    computed. Returns ``(parts, "")``, or
    ``(None, why)`` when the batch cannot be split that way. ``part_cost``: default
    :data:`PART_COST_TOKENS_PER_THREAD` times torch's thread count."""
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None, "the batch has no 2-d attention_mask to read row lengths from"
    rows, width = mask.shape
    lengths = mask.sum(1)
    if not torch.equal(mask.bool(), torch.arange(width, device=mask.device) < lengths[:, None]):
        return None, "the batch is not right-padded (each row's attention_mask must be ones, then zeros)"
    sequence = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != rows:
            return None, f"batch[{key!r}] is not one entry per example"
        sequence[key] = value.dim() >= 2 and tuple(value.shape[:2]) == (rows, width)
    if sequence.get("labels"):
        return None, "its labels are per token (a loss averaged over tokens, not examples, cannot be split by rows)"
    order = torch.argsort(lengths, stable=True)
    sorted_lengths = lengths[order].tolist()
    parts = []
    if part_cost is None:
        part_cost = PART_COST_TOKENS_PER_THREAD * torch.get_num_threads()
    for start, end in length_parts(sorted_lengths, part_cost):
        rows_in, longest = order[start:end], sorted_lengths[end - 1]
        parts.append(({key: value[rows_in][:, :longest] if sequence[key] else value[rows_in]
                       for key, value in batch.items()}, (end - start) / rows))
    return parts, ""


def _loader(rows: list[dict[str, Any]], collate: Any, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    # The loader's own generator shuffles: the order depends on the seed alone, and a resumed run
    # (see peftlab.train.loop) draws it again from the generator's saved state.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)


def make_loader(rows: list[dict[str, Any]], tokenizer: Any, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A loader that pads each batch to its own longest row; labels (class ids, or floats for
    regression) become a long or float tensor. Batches are drawn as plain shuffling draws them;
    ``TrainArgs.split_by_length`` cuts the padding of each one in training (:func:`split_by_length`)."""
    from transformers import DataCollatorWithPadding

    return _loader(rows, DataCollatorWithPadding(tokenizer), batch_size, shuffle, seed)


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
