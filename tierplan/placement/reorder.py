"""Planning in several op orders (``reorder=True``): the order is chosen by the plans it allows.

The op order decides which tensors are live together, so it decides the budget below which
recompute and copies start to cost. COSMA and OLLA choose the order inside one model together
with the memory decisions; tierplan chooses it by an outer search over orders, each planned by the
full planner (keep / recompute / swap / stream, ``solve``):

- The candidates are the capture order and the distinct orders of ``passes.ordering`` (inductor's
  LPMF, BFS and DFS sorts, the free-first greedy, and each of them improved by hill climbing).
  Every one is a topological order that keeps the phases and the order of random draws and
  in-place writes, so the program it becomes computes what eager does.
- An order is planned only when it holds fewer bytes above the device budget than the capture
  order, summed over the steps (what a plan has to recompute or move away), or the same and a
  lower peak; the fewest first, at most ``MAX_ORDERS`` orders in all.
- The capture order is planned first, with half the time, so that ``reorder=True`` keeps the plan
  the capture order finds alone wherever half the time finds it; the others then get an equal
  share each of the time left when they start. The fastest measured plan wins, the lower peak on
  a tie; a plan with no overhead over keep-all ends the search.

The proven bound of a plan (``placement.bound``) covers the plans of its own order: the reported
gap is a gap within that order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

from tierplan.ir import Graph
from tierplan.passes.liveness import live_bytes
from tierplan.passes.ordering import (
    dependencies, improve, order_bfs, order_dfs, order_free_first, order_lpmf, reorder_graph,
)
from tierplan.placement.solve import DEFAULT_TIME_LIMIT_S
from tierplan.plans.plan import DEVICE, InfeasibleBudget, Plan

MAX_ORDERS = 4  # orders planned, the capture order included
CLIMB_S = 1.0  # hill climbing on the best order (passes.ordering.improve)
CAPTURE = "capture"


@dataclass(frozen=True)
class CandidateOrder:
    method: str  # how it was made: "capture", "lpmf", "free-first+climb", ...
    ops: tuple[str, ...]
    keep_all_peak: int  # live bytes at the worst step when every op runs once in this order


def candidate_orders(graph: Graph, *, budget: int | None = None, max_orders: int = MAX_ORDERS,
                     climb_s: float = CLIMB_S) -> list[CandidateOrder]:
    """The capture order, then up to ``max_orders - 1`` distinct orders that hold fewer bytes,
    fewest first. With a device ``budget``, "fewer" is the bytes above it summed over the steps
    (what a plan has to recompute or move away), then the peak; without one, the peak, then the
    bytes summed over the steps."""
    deps = dependencies(graph)
    capture = tuple(op.name for op in graph.ops)
    made = {
        "lpmf": order_lpmf(graph, deps),
        "bfs": order_bfs(graph, deps),
        "dfs": order_dfs(graph, deps),
        "free-first": order_free_first(graph, deps),
    }

    def score(ops: Sequence[str]) -> tuple[int, int]:
        live = live_bytes(graph, list(ops))
        if budget is None:
            return max(live, default=0), sum(live)
        return sum(max(0, b - budget) for b in live), max(live, default=0)

    # Hill climbing lowers the peak (then the bytes over time) from every start: the start with
    # the fewest bytes above the budget is not always the one that climbs lowest.
    for name in list(made):
        made[f"{name}+climb"] = improve(graph, made[name], deps, climb_s / len(made))
    scores = {name: score(ops) for name, ops in made.items()}
    capture_score = score(capture)
    seen = {capture}
    others: list[CandidateOrder] = []
    for name in sorted(made, key=lambda n: (scores[n], n)):
        key = tuple(made[name])
        if key in seen or scores[name] >= capture_score:
            continue
        seen.add(key)
        others.append(CandidateOrder(name, key, max(live_bytes(graph, list(key)), default=0)))
    return [CandidateOrder(CAPTURE, capture, max(live_bytes(graph, list(capture)), default=0)),
            *others[: max(0, max_orders - 1)]]


def plan_in_orders(graph: Graph, plan_in: Callable[[Graph, float], Plan], *, budget: int | None = None,
                   time_limit_s: float | None = None, max_orders: int = MAX_ORDERS) -> Plan:
    """The best of ``plan_in(graph in order, seconds)`` over ``candidate_orders(graph)``: the
    fastest whole step, then the lower device peak. ``plan_in`` raises InfeasibleBudget where an
    order has no plan; when every order does, the one with the smallest feasible budget is raised.
    ``budget``: the device bytes the plans get, which ranks the orders (``candidate_orders``).
    The plan's graph runs its ops in the chosen order (``graph.meta["op_order"]``)."""
    started = time.perf_counter()
    limit = DEFAULT_TIME_LIMIT_S if time_limit_s is None else float(time_limit_s)
    candidates = candidate_orders(graph, budget=budget, max_orders=max_orders)
    # The capture order first, with half the time: --reorder must never lose the plan the capture
    # order alone finds (planned last with an equal share, it had none at 500 nodes and 0.9 of
    # keep-all's peak, where alone it needs 7 s). The other orders share the rest.
    first_share = 0.5 if len(candidates) > 1 else 1.0
    best: Plan | None = None
    refused: list[InfeasibleBudget] = []
    tried: list[str] = []
    skipped: list[str] = []  # not planned once a plan without overhead was found
    for k, candidate in enumerate(candidates):
        if best is not None and best.update is None and best.predicted_time_s <= best.keep_all_time_s:
            skipped.append(candidate.method)
            continue
        # An equal share of what is left, so an order that stops early leaves its time to the rest.
        left = limit - (time.perf_counter() - started)
        share = max(first_share * limit if k == 0 else left / (len(candidates) - k), 0.1)
        ordered = graph if candidate.method == CAPTURE else reorder_graph(graph, candidate.ops, candidate.method)
        try:
            plan = plan_in(ordered, share)
        except InfeasibleBudget as exc:
            refused.append(exc)
            tried.append(f"{candidate.method} (no plan)")
            continue
        tried.append(f"{candidate.method} ({plan.step_time_s:.6g} s)")
        if best is None or (plan.step_time_s, plan.peak_bytes[DEVICE]) < (best.step_time_s, best.peak_bytes[DEVICE]):
            best = plan
    if best is None:
        # The order with the smallest budget sure to be met; among equals, the one that came closest.
        raise min(refused, key=lambda e: (2**63 if e.min_feasible_bytes is None else e.min_feasible_bytes,
                                          2**63 if e.closest_bytes is None else e.closest_bytes))
    chosen = best.graph.meta.get("op_order", CAPTURE)
    rest = f"; not planned, no overhead left to remove: {', '.join(skipped)}" if skipped else ""
    best.method = (f"{best.method}; op order {chosen} (orders planned: {', '.join(tried)}{rest}; the "
                   f"bound and gap are within this order)")
    return best
