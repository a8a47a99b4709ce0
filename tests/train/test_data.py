import torch

from peftlab.train.data import LengthGroupedBatches


def _batches(lengths, batch_size=4, pool=3, seed=0):
    return list(LengthGroupedBatches(lengths, batch_size, torch.Generator().manual_seed(seed), pool=pool))


def test_every_row_once_per_epoch_in_batches_of_similar_length():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 60, (50,), generator=g).tolist()
    batches = _batches(lengths)
    assert len(batches) == len(LengthGroupedBatches(lengths, 4, torch.Generator())) == 13
    assert sorted(i for b in batches for i in b) == list(range(50))
    assert sum(len(b) < 4 for b in batches) == 1  # only the last pool's last batch is short
    # padding: each batch is padded to its longest row; grouping wastes far less than plain batches
    def padded(bs):
        return sum(max(lengths[i] for i in b) * len(b) for b in bs)
    plain = [list(range(i, min(i + 4, 50))) for i in range(0, 50, 4)]
    assert padded(batches) < 0.85 * padded(plain)


def test_rows_are_sorted_within_pools_and_batches_come_in_random_order():
    lengths = list(range(48))  # row i has length i
    batches = _batches(lengths, pool=3)
    for b in batches:  # a batch holds neighbours of its pool's sorted order
        assert b == sorted(b, key=lengths.__getitem__)
    firsts = [lengths[b[0]] for b in batches]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)  # not a length sweep
    assert _batches(lengths, pool=3, seed=0) == batches  # the seed alone fixes the order
    assert _batches(lengths, pool=3, seed=1) != batches
    # a second epoch from the same generator draws new pools and a new order
    sampler = LengthGroupedBatches(lengths, 4, torch.Generator().manual_seed(0), pool=3)
    assert list(sampler) != list(sampler)


def test_rows_without_lengths_fall_back_to_plain_shuffling_with_a_notice():
    import pytest

    from peftlab.train.data import _loader

    rows = [{"features": [i], "labels": i % 2} for i in range(10)]
    with pytest.warns(UserWarning, match="no length to group by"):
        loader = _loader(rows, lambda b: b, 4, shuffle=True, seed=0, group_by_length=True)
    assert sorted(r["labels"] for b in loader for r in b) == sorted(r["labels"] for r in rows)
