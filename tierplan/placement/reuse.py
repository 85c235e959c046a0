"""Plan a graph by the decisions an earlier plan made for the same model at another shape.

``tierplan.compile(..., dynamic=True)`` plans a model once at its largest shape and runs smaller
shapes (the last, shorter batch; shorter sequences) under the same decisions: the graph of a
smaller shape has the same ops under the same names, every tensor is no larger, so the tensors
kept, recomputed, swapped or streamed there give a plan that fits the same budget without a new
search. The plan is rebuilt and priced for the new shapes by the usual simulator, and the
caller searches afresh where it does not fit.
"""
from __future__ import annotations

from typing import Mapping

from tierplan.ir import Graph
from tierplan.passes.liveness import Liveness
from tierplan.placement.assemble import build_plan
from tierplan.placement.candidates import KEEP, Option, Problem, Unit, analyze
from tierplan.plans.plan import Decision, Plan, Pricing


def plan_by_decisions(
    graph: Graph, pricing: Pricing, decisions: Mapping[str, Decision], *, source: str,
    live: Liveness | None = None,
) -> Plan | None:
    """The plan of ``graph`` that decides every tensor as ``decisions`` (by storage name) does,
    or None when it exceeds ``pricing.budget``. Tensors the decisions do not name, or whose
    option the new graph does not offer, are kept."""
    problem = analyze(graph, pricing, live=live, offer_streams=True)
    fates = _fates(problem, decisions)
    built = build_plan(problem, fates, method=f"the decisions of {source}, re-timed for these shapes")
    return built.plan if built.fits else None


def _fates(problem: Problem, decisions: Mapping[str, Decision]) -> dict[object, Option]:
    fates: dict[object, Option] = {}
    for index, unit in enumerate(problem.units):
        decision = decisions.get(unit.storages[0])
        option = _unit_option(unit, decision) if decision is not None else None
        if option is not None and option != KEEP:
            fates[index] = option
    for i, stream in enumerate(problem.streams):
        decision = decisions.get(stream.storage)
        if decision is not None and decision.fate == "stream" and decision.tier == stream.tier:
            fates[("stream", i)] = stream.option
    for i, offload in enumerate(problem.offloads):
        decision = decisions.get(offload.storage)
        if decision is not None and decision.fate == "offload" and decision.tier == offload.tier:
            fates[("offload", i)] = offload.option
    return fates


def _unit_option(unit: Unit, decision: Decision) -> Option | None:
    """The option of ``unit`` that does what ``decision`` says, at its own first backward use
    (the smallest ``earlier`` offered): where it lands early is re-decided by the re-timing."""
    if decision.fate == "recompute":
        matching = [o for o in unit.options() if o.is_recompute]
    elif decision.fate == "swap":
        matching = [o for o in unit.options() if o.is_swap and o.tier == decision.tier]
    else:
        return None
    return min(matching, key=lambda o: o.earlier, default=None)


__all__ = ["plan_by_decisions"]
