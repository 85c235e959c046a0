"""The lower bounds recorded in tests/fixtures/remat_layered_100.json: bench/remat_exact.py's
window bound (window_lower_bound, on build_mip's strengthened model) checked on the fixture's
20-node instance, whose optimum CP-SAT proved on the plain model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench_modules import load_bench
from tierplan.formats.random_graphs import instance, replay

pytest.importorskip("ortools.linear_solver.pywraplp")

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "remat_layered_100.json"


def _exact():
    return load_bench("remat_exact")


def test_recorded_bounds_are_consistent() -> None:
    fx = json.loads(FIXTURE.read_text())
    inst = instance(fx["graph"])
    for entry in fx["budgets"]:
        best = replay(inst, entry["schedule"], entry["budget_bytes"]).cost
        assert best == pytest.approx(entry["best_cost"])
        assert fx["keep_all_cost"] <= entry["bound"] <= best
        assert entry["gap"] == pytest.approx((best - entry["bound"]) / best)
        assert (entry["status"] == "OPTIMAL") == (entry["bound"] >= best)
        assert entry.get("within_1_percent", entry["bound"] >= best / 1.01) == (entry["bound"] >= best / 1.01)
        method = entry.get("bound_method")
        if method:  # the bound is the sum the method describes
            windows = sum(w["bound"] for w in method["windows"])
            assert method["bound"] == pytest.approx(windows + method["uncovered_stage_cost"])
            assert entry["bound"] >= min(method["bound"], best)


@pytest.mark.parametrize("index", [0, 1])
def test_window_bounds_on_the_small_optimum(index) -> None:
    """The strengthened model keeps the 20-node optimum, and windows bound it from below (tightly
    with a window over every stage)."""
    exact = _exact()
    small = json.loads(FIXTURE.read_text())["small_optimal"]
    entry = small["budgets"][index]
    graph, budget, optimum = small["graph"], entry["budget_bytes"], entry["optimal_cost"]
    whole = exact.window_lower_bound(graph, budget, [(0, 19)], time_limit_s=60)
    assert whole.bound == optimum and whole.windows[0].status == "OPTIMAL"
    for spans in ([(0, 9)], [(0, 7), (11, 16)], [(3, 12)]):
        assert exact.window_lower_bound(graph, budget, spans, time_limit_s=60).bound <= optimum
    # the stored optimal schedule is feasible, at its cost, in the strengthened whole model
    inst = instance(graph)
    solver, built = exact.build_mip(inst, budget, "SCIP")
    r_on, s_on = exact.stages_of(inst, entry["schedule"])
    for key, var in built.R.items():
        var.SetBounds(float(key in r_on), float(key in r_on))
    for key, var in built.S.items():
        var.SetBounds(float(key in s_on), float(key in s_on))
    solver.SetNumThreads(1)
    assert solver.Solve() == 0  # pywraplp.Solver.OPTIMAL
    assert solver.Objective().Value() == pytest.approx(optimum)
