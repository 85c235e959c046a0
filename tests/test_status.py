"""Honest status: both gaps to the proven bound, OPTIMAL only at the bound, a bound above a plan
is a bug, the keep-all figures are checked by the validator, and old plan files still load."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from planner_graphs import MB, transformer
from tierplan.placement import bound as B
from tierplan.placement.assemble import build_plan
from tierplan.placement.bound import LowerBound
from tierplan.placement.candidates import RECOMPUTE, analyze
from tierplan.placement.keep_all import keep_all_plan
from tierplan.placement.solve import CP_SAT_MODEL, _finish
from tierplan.plans.plan import (
    BOUND_KIND_UNRECORDED, BOUND_REL_TOL, InternalError, Plan, PlanError, Pricing, SolverReport,
)
from tierplan.plans.validate import validate
from tierplan.report.text import plan_report

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cost-model.md"


def _pricing(graph, times, budget: int = 10_000 * MB) -> Pricing:
    return Pricing(capacities={"device": budget}, channels=(), op_time_s=times, hardware="test", training=True)


@pytest.fixture(scope="module")
def setting():
    """A two-layer stack, its keep-all plan and a plan that re-runs every unit it can (so it has
    an overhead over keep-all); both priced with room to spare (the budget does not matter here)."""
    graph, times = transformer(2)
    pricing = _pricing(graph, times)
    keep_all = keep_all_plan(graph, pricing)
    problem = analyze(graph, pricing, keep_all=keep_all)
    fates = {i: RECOMPUTE for i, unit in enumerate(problem.units) if unit.segment is not None}
    assert fates, "the graph must offer something to re-run"
    return graph, keep_all, fates, problem


def _recomputing_plan(setting) -> Plan:
    """A fresh copy each time: _finish writes the plan's solver report and method."""
    _, _, fates, problem = setting
    return build_plan(problem, fates, method="cp-sat (test)").plan


def _bound(overhead_s: float, step: int = 3, exact: bool = True) -> LowerBound:
    return LowerBound(overhead_s=overhead_s, step=step, forced_bytes=0, exact=exact)


def test_a_plan_at_its_bound_is_optimal_and_shows_both_gaps(setting) -> None:
    graph, keep_all, _, _ = setting
    plan = _recomputing_plan(setting)
    assert plan.overhead_s > 0
    done = _finish(plan, None, _bound(plan.overhead_s), graph, keep_all.predicted_time_s, 0.5)
    report = done.solver
    assert report.status == "OPTIMAL"
    assert report.bound_kind == B.STEP_MIP and report.bound_step == graph.ops[3].name
    assert report.gap == pytest.approx(0.0, abs=1e-12) and report.overhead_gap == pytest.approx(0.0, abs=1e-9)
    text = plan_report(done)
    assert "OPTIMAL" in text
    assert "0.0% of the step time, 0.0% of the overhead over keep-all" in text
    assert "kind step-mip at " + graph.ops[3].name in text


def test_keep_all_at_its_bound_has_no_overhead_to_share(setting) -> None:
    _, keep_all, _, _ = setting
    ka = keep_all.predicted_time_s
    plan = dataclasses.replace(keep_all, solver=SolverReport.of("KEEP_ALL_FITS", ka, ka, 0.1, keep_all_s=ka,
                                                                bound_kind=B.KEEP_ALL))
    assert plan.solver.gap == 0.0 and plan.solver.overhead_gap == 0.0
    assert "0.0% of the step time, no overhead over keep-all" in plan_report(plan)


def test_a_plan_short_of_its_bound_is_feasible_with_unclipped_gaps(setting) -> None:
    graph, keep_all, _, _ = setting
    plan = _recomputing_plan(setting)
    ka, total = keep_all.predicted_time_s, plan.predicted_time_s
    done = _finish(plan, None, _bound(plan.overhead_s / 4, exact=False), graph, ka, 0.5)
    report = done.solver
    assert report.status == "FEASIBLE" and report.bound_kind == B.STEP_MIP_LP
    unproven = total - (ka + (total - ka) / 4)
    assert report.gap == pytest.approx(unproven / total)
    assert report.overhead_gap == pytest.approx(0.75)
    text = plan_report(done)
    assert f"{100 * unproven / total:.1f}% of the step time, 75.0% of the overhead over keep-all" in text
    # The report's own arithmetic does not clip either: a bound above its objective gives a negative gap.
    odd = SolverReport.of("X", 1.0, 1.1, 0.0, keep_all_s=0.5, bound_kind=CP_SAT_MODEL)
    assert odd.gap == pytest.approx(-0.1) and odd.overhead_gap == pytest.approx(-0.2)


def test_a_bound_above_the_plan_is_an_internal_error(setting) -> None:
    graph, keep_all, _, _ = setting
    plan = _recomputing_plan(setting)
    above = plan.overhead_s + 1e-3  # 1 ms over a plan of ~10 ms: far beyond round-off
    with pytest.raises(InternalError, match=r"bug in tierplan") as caught:
        _finish(plan, None, _bound(above), graph, keep_all.predicted_time_s, 0.5)
    message = str(caught.value)
    assert f"{plan.predicted_time_s:.9g} s" in message  # the plan's figure
    assert f"{keep_all.predicted_time_s + above:.9g} s" in message  # the bound's figure
    assert not isinstance(caught.value, PlanError)  # the CLI must not print it as the user's mistake
    # Within the stated tolerance above the plan is round-off: the plan meets its bound.
    within = plan.overhead_s + 0.5 * BOUND_REL_TOL * plan.predicted_time_s
    done = _finish(_recomputing_plan(setting), None, _bound(within), graph, keep_all.predicted_time_s, 0.5)
    assert done.solver.status == "OPTIMAL"


def test_validate_rejects_wrong_keep_all_figures(setting) -> None:
    plan = _recomputing_plan(setting)
    validate(plan)  # the right figures pass
    with pytest.raises(PlanError, match=r"keep_all_peak_bytes is \d+ bytes.* measures \d+ bytes"):
        validate(dataclasses.replace(plan, keep_all_peak_bytes=plan.keep_all_peak_bytes - 1))
    with pytest.raises(PlanError, match=r"keep_all_time_s is .* measures"):
        validate(dataclasses.replace(plan, keep_all_time_s=plan.keep_all_time_s * 1.001))
    # Round-off in the figure (the same op times summed in another order) must not fail it.
    validate(dataclasses.replace(plan, keep_all_time_s=plan.keep_all_time_s * (1 + 1e-13)))


def test_validate_checks_keep_all_above_the_budget() -> None:
    """A plan under a budget keep-all exceeds: the keep-all replay is not held to the budget."""
    graph, times = transformer(2)
    roomy = keep_all_plan(graph, _pricing(graph, times))
    problem = analyze(graph, _pricing(graph, times, budget=roomy.keep_all_peak_bytes - 1))
    fates = {i: RECOMPUTE for i, unit in enumerate(problem.units) if unit.segment is not None}
    built = build_plan(problem, fates, method="test")
    assert built.fits and built.plan.peak_bytes["device"] < built.plan.keep_all_peak_bytes
    validate(built.plan)


def test_old_plan_json_without_the_bound_kind_loads(setting, tmp_path) -> None:
    graph, keep_all, _, _ = setting
    plan = _finish(_recomputing_plan(setting), None, _bound(0.0, step=-1), graph, keep_all.predicted_time_s, 0.5)
    assert plan.solver.bound_kind == B.KEEP_ALL
    data = plan.to_dict()
    assert data["solver"]["bound_kind"] == "keep-all"  # the code, not its explanation
    for field in ("bound_kind", "overhead_gap"):
        del data["solver"][field]  # as a plan saved before this version
    old = Plan.from_dict(data)
    assert old.solver.bound_kind == BOUND_KIND_UNRECORDED
    assert old.solver.overhead_gap == pytest.approx(1.0)  # (plan - keep-all) / (plan - keep-all)
    assert "kind unrecorded" in plan_report(old)
    validate(old)
    path = tmp_path / "plan.json"
    plan.to_json(path)
    assert Plan.from_json(path).solver == plan.solver


def test_every_bound_kind_is_explained_in_the_docs() -> None:
    assert _bound(0.0, step=-1).kind == B.KEEP_ALL
    assert _bound(1.0, exact=True).kind == B.STEP_MIP
    assert _bound(1.0, exact=False).kind == B.STEP_MIP_LP
    table = set(re.findall(r"^\| `([a-z-]+)` \|", DOCS.read_text(), flags=re.M))
    assert {B.KEEP_ALL, B.STEP_MIP, B.STEP_MIP_LP, CP_SAT_MODEL, BOUND_KIND_UNRECORDED} <= table
