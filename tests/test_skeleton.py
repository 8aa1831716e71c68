"""The training skeleton's rules, the same in every stage: the held-out split and the global batch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rlhflab.train.distributed import shard
from rlhflab.train.skeleton import batch_order, held_out_split


@pytest.mark.parametrize("rows,fraction,held", [(1, 0.5, 0), (12, 0.0, 0), (12, 0.05, 1), (40, 0.05, 2), (40, 0.5, 20)])
def test_the_split_holds_out_at_least_one_row_of_two_or_more(rows, fraction, held):
    train, held_out = held_out_split(list(range(rows)), fraction, seed=0)
    assert len(held_out) == held and sorted(train + held_out) == list(range(rows))


def test_keeping_the_order_holds_out_the_same_rows():
    rows = list(range(30))
    train, held_out = held_out_split(rows, 0.2, seed=3)
    kept_train, kept_held = held_out_split(rows, 0.2, seed=3, keep_order=True)
    assert sorted(held_out) == kept_held and sorted(train) == kept_train
    assert held_out_split(rows, 0.2, seed=4)[1] != held_out


def test_the_batch_is_global_and_each_process_takes_its_share():
    config = SimpleNamespace(batch_size=5, seed=0, group_by_length=False)
    batch = batch_order(config, [1] * 23).next()
    assert len(batch) == 5
    shares = [shard(batch, SimpleNamespace(num_processes=2, process_index=rank)) for rank in (0, 1)]
    assert sorted(shares[0] + shares[1]) == sorted(batch) and [len(s) for s in shares] == [3, 2]
    assert shard(batch, SimpleNamespace(num_processes=1, process_index=0)) == batch
