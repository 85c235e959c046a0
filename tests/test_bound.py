"""The proven lower bound (``placement/bound.py``): below every plan of the space, checked against
an exhaustive search of small graphs, the planner's plans, the baselines and torch's plan; and
with teeth (positive whenever keep-all does not fit and nothing can hide the cost)."""
from __future__ import annotations

import itertools
import math

import numpy as np

import pytest

from planner_graphs import MB, _Builder, channels, param_heavy, random_layered, transformer
from tierplan.ir import Phase, TensorKind
from tierplan.placement.baselines import baseline_plans
from tierplan.placement.bound import overhead_lower_bound
from tierplan.placement.candidates import analyze
from tierplan.placement.keep_all import keep_all_plan
from tierplan.plans.plan import InfeasibleBudget, PlanError, Pricing
from tierplan.placement.solve import solve
from tierplan.placement.schedule import build_schedule, initial_tiers
from tierplan.placement.simulate import simulate

HOST = 10**12


def _keep_all(graph, times):
    return keep_all_plan(graph, Pricing(capacities={"device": 10**15}, channels=[],
                                        op_time_s=times, hardware="test", training=True))


def _exhaustive_best(graph, times, budget, chans) -> float:
    """The fastest fitting plan over every combination of every unit's options (inf if none)."""
    caps = {"device": budget, "host": HOST} if chans else {"device": budget}
    problem = analyze(graph, Pricing(capacities=caps, channels=chans,
                                     op_time_s=times, hardware="test", training=True),
                      offer_streams=False)
    menus = [u.options() for u in problem.units]
    assert math.prod(len(m) for m in menus) <= 20_000, "graph too large to enumerate"
    best = math.inf
    for combo in itertools.product(*menus):
        fates = dict(enumerate(combo))
        try:
            figures = simulate(graph, build_schedule(problem, fates), problem.pricing,
                               initial_tiers=initial_tiers(problem, fates))
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
    bound = overhead_lower_bound(graph, Pricing(capacities={"device": budget}, channels=chans,
                                                op_time_s=times, hardware="test", training=True))
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
            bound = overhead_lower_bound(graph, Pricing(capacities={"device": budget}, channels=chans,
                                                        op_time_s=times, hardware="test", training=True))
            floor = ka.predicted_time_s + bound.overhead_s
            plan = solve(graph, Pricing(capacities=caps, channels=chans,
                                        op_time_s=times, hardware="test", training=True), time_limit_s=3)
            assert floor <= plan.predicted_time_s * (1 + 1e-9)
            for base in baseline_plans(graph, Pricing(capacities=caps, channels=chans,
                                                      op_time_s=times, hardware="test", training=True)).values():
                if base.peak_bytes["device"] <= budget:
                    assert floor <= base.predicted_time_s * (1 + 1e-9)
            if not chans:
                # Within 25% of the planner's overhead here: a bound that says something.
                assert bound.overhead_s >= 0.75 * (plan.predicted_time_s - ka.predicted_time_s)


def test_bound_is_infinite_below_what_the_device_must_hold() -> None:
    graph, times = transformer(2, hidden=4 * MB)
    # mm1's input, weight and 4x output are on the device while it runs: 5.5 hidden + params.
    budget = 4 * MB
    bound = overhead_lower_bound(graph, Pricing(capacities={"device": budget}, channels=[],
                                                op_time_s=times, hardware="test", training=True))
    assert bound.overhead_s == math.inf and bound.forced_bytes > budget
    with pytest.raises(InfeasibleBudget):
        solve(graph, Pricing(capacities={"device": budget}, channels=[],
                             op_time_s=times, hardware="test", training=True), time_limit_s=1)


def test_bound_is_zero_when_keep_all_fits() -> None:
    graph, times = transformer(3)
    ka = _keep_all(graph, times)
    bound = overhead_lower_bound(graph, Pricing(capacities={"device": ka.keep_all_peak_bytes}, channels=[],
                                                op_time_s=times, hardware="test", training=True))
    assert bound.overhead_s == 0.0


def test_copies_out_get_no_slack_from_recompute_that_runs_after_the_step() -> None:
    # f1 -> A -> f2 -> B -> f3 -> C -> loss; the backward reads C, then B, then A. At g1 (C, its
    # gradient and x0 on the device) a budget of 21 MB, what f2 needs, leaves no room for A or B.
    # The cheapest way out: re-run f1 (1 ms) after g1 and copy B (1.5 ms each way). B's copy out
    # has only f3 and f4 (1.001 ms) to hide behind: 0.499 ms exposed. Its copy back has no compute
    # before g2 but the re-run (1 ms): 0.5 ms. 1.999 ms in all; 1.5 ms if the re-run of f1, which
    # runs after g1, were also counted as time the copy out can hide behind.
    b = _Builder()
    b.tensor("x0", MB, TensorKind.INPUT)
    b.tensor("dloss", 4, TensorKind.INPUT)
    for name in ("A", "B", "C"):
        b.tensor(name, 10 * MB, TensorKind.ACTIVATION)
    for name in ("dC", "dB", "dA"):
        b.tensor(name, MB, TensorKind.TEMPORARY)
    b.tensor("loss", 4, TensorKind.OUTPUT)
    b.op("f1", ["x0"], ["A"], 1e-3)
    b.op("f2", ["A"], ["B"], 3e-3)
    b.op("f3", ["B"], ["C"], 1e-3)
    b.op("f4", ["C"], ["loss"], 1e-6)
    b.op("g1", ["C", "dloss"], ["dC"], 1e-3, Phase.BACKWARD)
    b.op("g2", ["B", "dC"], ["dB"], 1e-3, Phase.BACKWARD)
    b.op("g3", ["A", "dB"], ["dA"], 1e-3, Phase.BACKWARD)
    graph = b.graph("copy-slack", ["x0", "dloss"], ["loss"])
    chans = channels(bandwidth=10 * MB / 1.5e-3, latency_s=0.0)
    budget = 21 * MB + 8
    bound = overhead_lower_bound(graph, Pricing(capacities={"device": budget}, channels=chans,
                                                op_time_s=b.times, hardware="test", training=True))
    # The alternatives cost more: re-run both 4 ms, copy both 2.499 ms, copy A and re-run B 3 ms.
    assert bound.overhead_s == pytest.approx(1e-3 + 0.499e-3 + 0.5e-3, rel=1e-3)
    ka = _keep_all(graph, b.times)
    best = _exhaustive_best(graph, b.times, budget, chans)
    assert best < math.inf and ka.predicted_time_s + bound.overhead_s <= best * (1 + 1e-9)


@pytest.mark.parametrize("budget_mb", [100, 110])
def test_weight_heavy_bound_looks_at_the_activation_peak_and_stays_below_the_plan(budget_mb) -> None:
    # Weights dwarf activations: the fullest keep-all steps are at the end of the backward, where
    # weights and gradients pile up; the activations peak at the loss. Both kinds of step are tried.
    from tierplan.passes.liveness import lifetimes, live_bytes
    from tierplan.placement.bound import _peaks
    from tierplan.plans.plan import Channel

    graph, times = param_heavy(4, weight=16 * MB, act=8 * MB)
    order = [op.name for op in graph.ops]
    base = np.asarray(live_bytes(graph, order))
    picked = _peaks(graph, base, lifetimes(graph, order), 2)
    fullest = sorted(range(len(order)), key=lambda i: -base[i])[:2]
    assert order[picked[0]] == order[fullest[0]] == "mm_bwd_w_0"
    assert order[picked[1]] == "loss" and picked[1] not in fullest
    # Sound with weights streamed over a slow link and gradients offloaded over a fast one.
    chans = [Channel("device", "host", 100e9, 0.0, "d2h"), Channel("host", "device", 1e9, 0.0, "h2d")]
    budget = budget_mb * MB
    bound = overhead_lower_bound(graph, Pricing(capacities={"device": budget}, channels=chans,
                                                op_time_s=times, hardware="test", training=True))
    plan = solve(graph, Pricing(capacities={"device": budget, "host": HOST}, channels=chans,
                                op_time_s=times, hardware="test", training=True), time_limit_s=3)
    assert _keep_all(graph, times).predicted_time_s + bound.overhead_s <= plan.predicted_time_s * (1 + 1e-9)
    assert bound.overhead_s > 0
