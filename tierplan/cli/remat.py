"""What ``tierplan remat GRAPH.json --budget B`` prints: an abstract (Checkmate / Moccasin format)
graph planned within a byte budget, with the schedule in the benchmark's own ids."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tierplan.formats.node_link import load_abstract
from tierplan.ir import Graph
from tierplan.placement.keep_all import keep_all_plan
from tierplan.placement.reorder import plan_in_orders
from tierplan.placement.solve import solve
from tierplan.plans.plan import DEVICE, Plan, PlanError, Pricing, StepKind
from tierplan.plans.validate import validate


def abstract_pricing(times: dict[str, float], budget: int) -> Pricing:
    """An abstract graph has one tier (the device) and the benchmark's own op costs."""
    return Pricing(capacities={DEVICE: budget}, channels=(), op_time_s=times, hardware="abstract", training=True)


def plan_abstract(graph: Graph, times: dict[str, float], budget: int, time_limit_s: float | None,
                  *, reorder: bool = False) -> Plan:
    """The plan of ``graph`` in its own order, or with ``reorder`` in the best of several orders
    (``placement.reorder``)."""
    pricing = abstract_pricing(times, budget)

    def plan_in(ordered: Graph, seconds: float | None) -> Plan:
        # ``tierplan remat`` has no --tiers: an infeasible budget's message must not suggest it.
        return solve(ordered, pricing, time_limit_s=seconds, suggest_tiers=False)

    plan = (plan_in_orders(graph, plan_in, budget=budget, time_limit_s=time_limit_s) if reorder
            else plan_in(graph, time_limit_s))
    validate(plan)
    return plan


def schedule_of(plan: Plan, ids: dict[str, Any]) -> list[list[Any]]:
    """[["compute", id] | ["free", id], ...]: a recompute is a compute of the same id."""
    out: list[list[Any]] = []
    for step in plan.schedule:
        if step.kind in (StepKind.COMPUTE, StepKind.RECOMPUTE):
            out.append(["compute", ids[step.op]])
        elif step.kind == StepKind.FREE:
            out.append(["free", ids[step.tensor]])
        else:
            raise PlanError(f"abstract plans have no transfers, found {step.describe()}")
    return out


def remat_command(path: str | Path, budget: int, time_limit: float | None = None,
                  json_out: str | Path | None = None, reorder: bool = False) -> str:
    """Plan ``path`` within ``budget`` bytes; return the text to print (and write ``json_out``)."""
    started = time.perf_counter()
    graph, times, ids = load_abstract(path)
    reference = keep_all_plan(graph, abstract_pricing(times, budget))
    plan = plan_abstract(graph, times, budget, time_limit, reorder=reorder)
    solve_s = time.perf_counter() - started
    recomputed = sum(1 for s in plan.schedule if s.kind == StepKind.RECOMPUTE)
    result = {
        "schedule": schedule_of(plan, ids),
        "peak_bytes": plan.peak_bytes[DEVICE],
        "cost": plan.predicted_time_s,
        "keep_all_cost": reference.predicted_time_s,
        "solve_s": solve_s,
        "gap": float(plan.solver.gap or 0.0) if plan.solver else 0.0,
    }
    if json_out is not None:
        Path(json_out).write_text(json.dumps(result))
    overhead = plan.predicted_time_s / reference.predicted_time_s - 1 if reference.predicted_time_s else 0.0
    lines = [
        f"{graph.name}: {len(graph.ops)} nodes, budget {budget} bytes, keep-all peak "
        f"{reference.peak_bytes[DEVICE]} bytes",
        f"  plan: peak {result['peak_bytes']} bytes, cost {result['cost']:.6g} "
        f"(keep-all {result['keep_all_cost']:.6g}, +{overhead * 100:.2f}%), {recomputed} recomputes",
        f"  method {plan.method}; solver {plan.solver.status if plan.solver else None}, gap {result['gap']:.4f}, "
        f"solved in {solve_s:.2f} s",
    ]
    if json_out is not None:
        lines.append(f"  schedule written to {json_out}")
    return "\n".join(lines)
