"""EAFTStats: float64 sums that add over micro-batches and ranks, and the per-token means logged from them."""

import torch

from eaft_plugins.stats import EAFTStats, StatsAccumulator

FIELDS = ("ce_sum", "weight_sum", "entropy_sum", "conflict_count", "tokens", "raw_weight_sum")


def stats(*values):
    return EAFTStats.from_vector(torch.tensor(values, dtype=torch.float64))


def test_vector_round_trip_and_addition():
    a, b = stats(1, 2, 3, 4, 10, 5), stats(0.5, 0.5, 0.5, 1, 2, 1)
    assert a.to_vector().tolist() == [1, 2, 3, 4, 10, 5]
    assert (a + b).to_vector().tolist() == [1.5, 2.5, 3.5, 5, 12, 6]
    assert EAFTStats.zeros().to_vector().tolist() == [0.0] * len(FIELDS)
    assert [f for f in EAFTStats.__dataclass_fields__] == list(FIELDS)


def test_means_are_per_supervised_token():
    means = stats(10, 5, 2.5, 1, 10, 6).means("eaft/")
    assert means == {"eaft/ce": 1.0, "eaft/weight": 0.5, "eaft/entropy": 0.25, "eaft/conflict_frac": 0.1,
                     "eaft/tokens": 10.0}
    assert stats(0, 0, 0, 0, 0, 0).means("e/")["e/ce"] == 0.0  # no division by zero


def test_raw_mean_weight_is_what_weight_norm_mean_divides_by():
    assert stats(1, 2, 3, 0, 8, 4).raw_mean_weight == 0.5
    assert stats(0, 0, 0, 0, 0, 0).raw_mean_weight is None  # nothing supervised: no divisor
    assert stats(1, 0, 0, 0, 4, 0).raw_mean_weight is None  # all weights zero: dividing would blow up


def test_accumulator_adds_between_pops_and_resets():
    acc = StatsAccumulator()
    assert acc.empty and acc.pop(reduce=False).to_vector().tolist() == [0.0] * 6
    acc.add(stats(1, 1, 1, 0, 2, 1))
    acc.add(stats(2, 1, 1, 1, 3, 1))
    assert not acc.empty
    assert acc.pop(reduce=False).to_vector().tolist() == [3, 2, 2, 1, 5, 2]
    assert acc.empty


def test_all_reduce_without_a_process_group_is_the_identity():
    s = stats(1, 2, 3, 4, 5, 6)
    assert s.all_reduce().to_vector().tolist() == s.to_vector().tolist()
