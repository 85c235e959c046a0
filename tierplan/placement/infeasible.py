"""When no plan fits: the smallest budget the planner can meet, and what dominates it."""
from __future__ import annotations

import time
from typing import Any

from tierplan.ir import PERSISTENT_KINDS, TensorKind
from tierplan.placement.assemble import Built
from tierplan.placement.candidates import KEEP, RECOMPUTE, Problem
from tierplan.placement.cpsat import solve_model
from tierplan.placement.linear_model import Linear
from tierplan.plans.plan import DEVICE, InfeasibleBudget, PlanError
from tierplan.units import format_bytes


def infeasible(problem: Problem, linear: Linear, budget: int, search: Any, *,
               suggest_tiers: bool = True) -> InfeasibleBudget | Built:
    """The smallest budget a plan of this planner meets (measured), and what dominates it; or the
    smallest-peak plan itself when it fits after all (the stages' budget-constrained models can
    miss a plan that the min-peak model finds).

    The budget reported is one that planning again at it meets: the smallest peak of the plans
    found the same way whatever the budget and the clock (the min-peak model on one worker,
    which is deterministic when it finishes, and freeing everything). The stages' plans are
    budget- and time-dependent; they count only when those two find nothing. ``suggest_tiers``:
    the command has a ``--tiers`` option the message may suggest (``tierplan remat`` has none)."""
    tried = list(search.tried)
    reproducible: list[Built] = []
    min_solved = solve_model(linear, None, hint=None, workers=1,
                              deadline=time.perf_counter() + min(10.0, max(search.limit, 1.0)))
    if min_solved.choice is not None:
        reproducible.append(search.build(linear.fates(min_solved.choice), "min-peak"))
    everything: dict = {}
    for index, unit in enumerate(problem.units):
        opts = unit.options()
        everything[index] = RECOMPUTE if RECOMPUTE in opts else (opts[-1] if len(opts) > 1 else KEEP)
    moved: set[str] = set()  # one tier per storage (a storage has a stream per reachable tier)
    for i, st in enumerate(problem.streams):
        if st.storage not in moved:
            everything[("stream", i)] = st.option
            moved.add(st.storage)
    moved.clear()
    for i, off in enumerate(problem.offloads):
        if off.storage not in moved:
            everything[("offload", i)] = off.option
            moved.add(off.storage)
    try:
        reproducible.append(search.build(everything, "free-everything"))
    except PlanError:  # a probe only; the other candidates stand
        pass

    def lowest(candidates: list[Built]) -> Built | None:
        usable = [b for b in candidates if all(
            b.figures.peak_bytes.get(t, 0) <= cap for t, cap in problem.capacities.items() if t != DEVICE)]
        return min(usable, key=lambda b: b.figures.peak_bytes[DEVICE], default=None)

    fitting = [b for b in [*tried, *reproducible] if b.fits]
    if fitting:
        return min(fitting, key=lambda b: b.plan.predicted_time_s)
    best = lowest(reproducible) or lowest(tried) or min([*tried, *reproducible], key=lambda b: b.figures.peak_bytes[DEVICE])
    smallest = best.figures.peak_bytes[DEVICE]
    graph = problem.graph
    at_peak = best.figures.device_at_peak
    owned = sum(graph.tensors[s].nbytes for s in at_peak
                if graph.tensors[s].kind in PERSISTENT_KINDS or s in graph.inputs)
    step = best.plan.schedule[best.figures.peak_step] if best.figures.peak_step >= 0 else None
    working = 0
    where = "before the first step"
    if step is not None and step.op is not None:
        op = graph.op(step.op)
        mine = {graph.tensors[t].storage for t in op.inputs + op.outputs}
        working = sum(graph.tensors[s].nbytes for s in mine if s in at_peak) - sum(
            graph.tensors[s].nbytes for s in mine if s in at_peak and (
                graph.tensors[s].kind in PERSISTENT_KINDS or s in graph.inputs))
        where = f"at {step.describe()}"
    other = smallest - owned - working
    message = (
        f"device budget {format_bytes(budget)} ({budget} bytes) is below the smallest peak tierplan "
        f"can reach, {format_bytes(smallest)} ({smallest} bytes; keep-all needs "
        f"{format_bytes(int(linear.base.max()))}); that peak is {where}: caller-owned tensors "
        f"(parameters, buffers, inputs, optimizer state) {format_bytes(owned)}, the op's own inputs "
        f"and outputs {format_bytes(working)}, other live tensors {format_bytes(other)}"
    )
    message += _dominant(problem, budget, smallest, suggest_tiers)
    return InfeasibleBudget(message, budget_bytes=budget, min_feasible_bytes=smallest)


def _dominant(problem: Problem, budget: int, smallest: int, suggest_tiers: bool = True) -> str:
    """One sentence on what dominates the budget: the parameters, optimizer state, the inputs."""
    graph = problem.graph
    slower = [t for t in problem.capacities if t != DEVICE]
    inputs = {graph.tensors[n].storage for n in graph.inputs}
    parts = []
    for kind, label in ((TensorKind.PARAMETER, "parameters"), (TensorKind.OPTIMIZER_STATE, "optimizer state")):
        total = sum(t.nbytes for t in graph.tensors_of_kind(kind) if not t.is_view)
        if not total:
            continue
        streamable = sum(st.nbytes for st in problem.streams if graph.tensors[st.storage].kind == kind)
        if total > budget:
            if not slower:
                parts.append(f"{label} alone are {format_bytes(total)} > budget {format_bytes(budget)}"
                             + ("; with --tiers host they can be streamed from host memory" if suggest_tiers else ""))
            elif streamable < total:
                parts.append(f"{label} alone are {format_bytes(total)} > budget; only "
                             f"{format_bytes(streamable)} of them can be streamed (the rest are written "
                             f"in the step or never read)")
            else:
                parts.append(f"{label} are {format_bytes(total)} > budget and are streamed from "
                             f"{slower[0]}; what remains is the working set of the op at the peak and the fetches in flight")
    batch = sum(graph.tensors[s].nbytes for s in inputs
                if graph.tensors[s].kind not in (TensorKind.PARAMETER, TensorKind.OPTIMIZER_STATE,
                                                 TensorKind.BUFFER))
    if batch > budget:
        parts.append(f"the inputs alone are {format_bytes(batch)} > budget")
    if not parts and not slower:
        parts.append("no slower tier is given: only recompute can free memory" + (
            "; with --tiers host activations and parameters can also be moved to host memory"
            if suggest_tiers else ""))
    return ("; " + "; ".join(parts)) if parts else ""
