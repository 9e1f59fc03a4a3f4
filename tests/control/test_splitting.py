"""Choosing parts per run: fewest that fit, and a lower floor than offloading alone."""

import pytest
from nets import build

from vmem import BudgetTooSmall
from vmem.control import make_plan
from vmem.control.splitting import choose_splits
from vmem.feedforward.split_runs import Splits, find_runs
from vmem.preprocessing import profile_network

SHAPE = (4, 3, 64, 64)


def _search(budget: int, max_parts: int = 8):
    model = build("vgg16")
    profiled = []

    def profile_of(choices):
        profiled.append(choices)
        with Splits(model, choices):
            return profile_network(model, SHAPE)

    def plan_of(profile):
        return make_plan(profile, budget=budget, policy="auto")

    unsplit = profile_network(model, SHAPE)
    runs = find_runs(model)
    return choose_splits(runs, profile_of, plan_of, unsplit, SHAPE[0], max_parts), \
        unsplit, profiled


def _offload_minimum(unsplit) -> int:
    with pytest.raises(BudgetTooSmall) as info:
        make_plan(unsplit, budget=1, policy="auto")
    return info.value.minimum


def test_splits_fit_where_offloading_cannot():
    unsplit = profile_network(build("vgg16"), SHAPE)
    budget = int(_offload_minimum(unsplit) * 0.9)
    (plan, choices, _), _, profiled = _search(budget)
    assert plan.predicted_peak <= plan.target
    assert plan.splits and all(s.memmax_after < s.memmax_before for s in plan.splits)
    assert all(s.parts == choices[r][0] for s, r in zip(plan.splits, choices, strict=False))
    assert profiled[0] == {r: (2, 0) for r in choices}  # uniform first, batch axis
    assert "runs split or recomputed, exact" in plan.table()


def test_budget_too_small_even_split_names_a_lower_minimum():
    unsplit = profile_network(build("vgg16"), SHAPE)
    offload_only = _offload_minimum(unsplit)
    with pytest.raises(BudgetTooSmall) as info:
        _search(budget=1, max_parts=4)
    assert info.value.minimum < offload_only
    assert "vmem_split" in info.value.layer or "features" in info.value.layer


def test_no_runs_is_a_clear_error():
    with pytest.raises(ValueError, match="no run"):
        choose_splits([], None, None, None, 1)
    with pytest.raises(ValueError, match="max_parts=1"):
        choose_splits([object()], None, None, None, 1, max_parts=1)
