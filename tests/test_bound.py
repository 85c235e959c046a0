"""The proven lower bound (``planner/bound.py``): below every plan of the space, checked against
an exhaustive search of small graphs, the planner's plans, the baselines and torch's plan; and
with teeth (positive whenever keep-all does not fit and nothing can hide the cost)."""
from __future__ import annotations

import itertools
import math

import pytest

from planner_graphs import MB, channels, random_layered, transformer
from tierplan.planner.baselines import baseline_plans
from tierplan.planner.bound import overhead_lower_bound
from tierplan.planner.candidates import analyze
from tierplan.planner.keep_all import keep_all_plan
from tierplan.planner.plan import InfeasibleBudget, PlanError
from tierplan.planner.remat_swap import solve
from tierplan.planner.timeline import build_schedule, initial_tiers, simulate

HOST = 10**12


def _keep_all(graph, times):
    return keep_all_plan(graph, capacities={"device": 10**15}, channels=[], op_time_s=times,
                         hardware="test", training=True)


def _exhaustive_best(graph, times, budget, chans) -> float:
    """The fastest fitting plan over every combination of every unit's options (inf if none)."""
    caps = {"device": budget, "host": HOST} if chans else {"device": budget}
    problem = analyze(graph, op_time_s=times, capacities=caps, channels=chans,
                      offer_streams=False)
    menus = [u.options() for u in problem.units]
    assert math.prod(len(m) for m in menus) <= 20_000, "graph too large to enumerate"
    best = math.inf
    for combo in itertools.product(*menus):
        fates = dict(enumerate(combo))
        try:
            figures = simulate(graph, build_schedule(problem, fates), capacities=caps, channels=chans,
                               op_time_s=times, initial_tiers=initial_tiers(problem, fates))
        except PlanError:
            continue  # a recompute whose inputs are gone: not a plan
        if all(figures.peak_bytes.get(t, 0) <= c for t, c in caps.items()):
            best = min(best, figures.time_s)
    return best


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
@pytest.mark.parametrize("with_host", [False, True])
@pytest.mark.parametrize("fraction", [0.55, 0.75])
def test_bound_is_below_the_exhaustive_optimum(seed, with_host, fraction) -> None:
    graph, times = random_layered(6, seed=seed)
    ka = _keep_all(graph, times)
    budget = int(ka.keep_all_peak_bytes * fraction)
    chans = channels(bandwidth=2e9) if with_host else []
    bound = overhead_lower_bound(graph, budget=budget, channels=chans, op_time_s=times)
    best = _exhaustive_best(graph, times, budget, chans)
    assert ka.predicted_time_s + bound.overhead_s <= best * (1 + 1e-9)
    if not with_host:
        # Remat only, keep-all over the budget: something must be re-run, at a cost.
        assert bound.overhead_s > 0


def test_bound_with_teeth_on_a_stack_and_below_the_planner_and_baselines() -> None:
    graph, times = transformer(6)
    ka = _keep_all(graph, times)
    for fraction in (0.4, 0.6):
        budget = int(ka.keep_all_peak_bytes * fraction)
        for chans in ([], channels(bandwidth=5e9)):
            caps = {"device": budget, "host": HOST} if chans else {"device": budget}
            bound = overhead_lower_bound(graph, budget=budget, channels=chans, op_time_s=times)
            floor = ka.predicted_time_s + bound.overhead_s
            plan = solve(graph, capacities=caps, channels=chans, op_time_s=times, hardware="test",
                         training=True, time_limit_s=3)
            assert floor <= plan.predicted_time_s * (1 + 1e-9)
            for base in baseline_plans(graph, capacities=caps, channels=chans, op_time_s=times,
                                       hardware="test", training=True).values():
                if base.peak_bytes["device"] <= budget:
                    assert floor <= base.predicted_time_s * (1 + 1e-9)
            if not chans:
                # Within 25% of the planner's overhead here: a bound that says something.
                assert bound.overhead_s >= 0.75 * (plan.predicted_time_s - ka.predicted_time_s)


def test_bound_is_infinite_below_what_the_device_must_hold() -> None:
    graph, times = transformer(2, hidden=4 * MB)
    # mm1's input, weight and 4x output are on the device while it runs: 5.5 hidden + params.
    budget = 4 * MB
    bound = overhead_lower_bound(graph, budget=budget, channels=[], op_time_s=times)
    assert bound.overhead_s == math.inf and bound.forced_bytes > budget
    with pytest.raises(InfeasibleBudget):
        solve(graph, capacities={"device": budget}, channels=[], op_time_s=times, hardware="test",
              training=True, time_limit_s=1)


def test_bound_is_zero_when_keep_all_fits() -> None:
    graph, times = transformer(3)
    ka = _keep_all(graph, times)
    bound = overhead_lower_bound(graph, budget=ka.keep_all_peak_bytes, channels=[], op_time_s=times)
    assert bound.overhead_s == 0.0
