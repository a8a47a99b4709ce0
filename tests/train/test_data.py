"""Batches split by length: the parts minimise padded work, and their weighted losses give the whole
batch's gradient (the mechanism that lets training skip padding without changing the batches)."""
import itertools
import random

import pytest
import torch

from peftlab.train.data import length_parts, split_by_length
from tests.train import ddp_worker


def _cost(lengths, runs, part_cost):
    return sum(part_cost + (end - start) * lengths[end - 1] for start, end in runs)


def _all_cuts(n):
    for k in range(n):
        for cuts in itertools.combinations(range(1, n), k):
            bounds = (0, *cuts, n)
            yield list(zip(bounds, bounds[1:]))


@pytest.mark.parametrize("seed", range(5))
def test_length_parts_find_the_cheapest_cut(seed):
    rng = random.Random(seed)
    lengths = sorted(rng.randint(2, 40) for _ in range(7))
    runs = length_parts(lengths, part_cost=20)
    assert runs[0][0] == 0 and runs[-1][1] == 7 and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
    best = min(_cost(lengths, cut, 20) for cut in _all_cuts(7))
    assert _cost(lengths, runs, 20) == best


def test_length_parts_keep_even_batches_whole_and_cut_uneven_ones():
    assert length_parts([10] * 32, part_cost=128) == [(0, 32)]
    assert length_parts([4] * 31 + [64], part_cost=16) == [(0, 31), (31, 32)]
    assert length_parts([4] * 31 + [64], part_cost=10_000) == [(0, 32)]  # a part costing more than padding


def _batch():
    return torch.utils.data.default_collate(ddp_worker.rows()[:11])  # lengths 6..10 (three 6s), padded to 12


def test_parts_hold_every_row_once_trimmed_to_their_longest_with_row_shares():
    batch = _batch()
    batch["task_ids"] = torch.arange(11)  # a per-example extra travels with its rows
    parts, why = split_by_length(batch, part_cost=1)
    assert why == "" and len(parts) > 1
    assert sorted(int(i) for part, _ in parts for i in part["task_ids"]) == list(range(11))
    for part, share in parts:
        lengths = part["attention_mask"].sum(1)
        assert part["input_ids"].shape[1] == int(lengths.max())  # padded to its own longest row
        assert share == pytest.approx(len(lengths) / 11)
        for row, i in enumerate(part["task_ids"]):  # rows keep their own tokens and label
            n = int(lengths[row])
            assert torch.equal(part["input_ids"][row, :n], batch["input_ids"][i, :n])
            assert part["labels"][row] == batch["labels"][i]
    assert sum(share for _, share in parts) == pytest.approx(1.0)


def _grads(model, batches):
    model.zero_grad(set_to_none=True)
    for part, share in batches:
        (model(**part).loss * share).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_split_batch_gives_the_whole_batch_gradient():
    model = ddp_worker.model()  # LoRA on a tiny BERT, no dropout
    batch = _batch()
    parts, _ = split_by_length(batch, part_cost=1)
    assert len({len(p["labels"]) for p, _ in parts}) > 1  # parts of unequal size: the shares matter
    whole = _grads(model, [(batch, 1.0)])
    split = _grads(model, parts)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-6, rtol=1e-5, msg=name)
    # Weighting the parts equally (a plain mean of their losses) is not the batch's gradient.
    equal = _grads(model, [(p, 1 / len(parts)) for p, _ in parts])
    assert any(not torch.allclose(equal[n], whole[n], atol=1e-6) for n in whole)


def test_batches_that_cannot_be_split_exactly_say_why():
    batch = _batch()
    left = {k: v.flip(1) if v.dim() == 2 else v for k, v in batch.items()}  # left-padded
    assert split_by_length(left)[0] is None and "right-padded" in split_by_length(left)[1]
    tokens = {**batch, "labels": batch["input_ids"].clone()}  # a loss over tokens
    assert split_by_length(tokens)[0] is None and "per token" in split_by_length(tokens)[1]
    shared = {**batch, "scale": torch.tensor(2.0)}
    assert split_by_length(shared)[0] is None and "'scale'" in split_by_length(shared)[1]
    no_mask = {k: v for k, v in batch.items() if k != "attention_mask"}
    assert split_by_length(no_mask)[0] is None and "attention_mask" in split_by_length(no_mask)[1]
