"""Rematerialization on random layered (inference-like, forward-only) graphs: tierplan against
simple baselines, all priced by the same independent replay of Checkmate's accounting.

    python bench/remat.py [--quick] [--time-limit S]

Graphs: :func:`tierplan.formats.random_graphs.standard_spec` at 100, 250, 500 and 1,000 nodes
(``--quick``: 100 and 250). Budgets: 0.9 and 0.8 of the keep-all peak under the graph's order,
and "min", the smallest peak any baseline here reaches (so it is feasible by construction; the
node-wise lower bound, max over nodes of inputs + output, is printed beside it). Methods:

- tierplan: ``plan_abstract``, the library function ``tierplan remat`` calls;
- tierplan --reorder: the same with ``reorder=True``, when the function takes that keyword;
- checkpoint-all: recompute everything that can be; every non-sink output is freed as soon as the
  next step does not read it and recomputed (with whatever it needs) before each later use;
- greedy: from keep-all, repeatedly drop the retained tensor at the peak with the most bytes per
  unit of recompute cost (freed after its previous use, recomputed before its next), keeping a
  drop only when it lowers the peak, until the budget is met or no drop helps.

On these forward-only graphs both baselines are weak, and the table says so: checkpoint-all
re-runs each input's whole ancestor cone, which peaks like keep-all over the same prefix; greedy
stalls after a drop or two, because a dropped tensor's recompute needs inputs that were freed long
before, and that cone raises the peak elsewhere.

Every schedule, tierplan's included, is replayed by :func:`tierplan.formats.random_graphs.replay`
against the budget before it is printed. Overhead = total compute / keep-all compute - 1. "gap"
is the planner's own gap to its bound; "vs LB" the cost over the exact MILP's proven lower bound
(the optimum where it was proven) recorded in tests/fixtures/remat_layered_100.json, for the
instance and budgets it covers.
"""
from __future__ import annotations

import argparse
import bisect
import inspect
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tierplan.formats.random_graphs import (  # noqa: E402
    STANDARD_SIZES,
    Instance,
    ScheduleError,
    instance,
    keep_all_cost,
    keep_all_peak,
    layered_graph,
    lower_bound_peak,
    replay,
    standard_spec,
)

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "remat_layered_100.json"
MIB = 2**20


# -- a schedule from a set of dropped (tensor, next reader) gaps --------------------------------


@dataclass
class Simulated:
    schedule: list[list[Any]]
    peak: int
    peak_count: int  # how many computes reach the peak: a drop that lowers it is progress too
    peak_step: int  # position in the order of the step during which the peak is first reached
    peak_node: Any
    peak_resident: frozenset[Any]


class _Readers:
    """Reader positions of each node, for "next use after step t"."""

    def __init__(self, inst: Instance) -> None:
        self.pos = {n: i for i, n in enumerate(inst.order)}
        self.readers = {n: sorted(self.pos[s] for s in inst.succs[n]) for n in inst.order}

    def next_use(self, node: Any, t: int) -> int | None:
        """Position of the first reader of ``node`` at or after step ``t``."""
        rs = self.readers[node]
        k = bisect.bisect_left(rs, t)
        return rs[k] if k < len(rs) else None


def simulate(inst: Instance, dropped: set[tuple[Any, Any]], readers: _Readers | None = None) -> Simulated:
    """Run the order; before each step recompute its missing inputs (and what they need, in
    order); after it, free every non-sink output whose next reader's gap is dropped or that has no
    reader left. A dropped gap ``(v, r)`` means v is not held into reader r: it is freed after its
    previous use and recomputed before r."""
    readers = readers or _Readers(inst)
    order, preds, ram, sinks = inst.order, inst.preds, inst.ram, inst.sinks
    pos = readers.pos
    resident: set[Any] = set()
    schedule: list[list[Any]] = []
    used = peak = peak_count = 0
    peak_step, peak_node, peak_resident = 0, order[0], frozenset()

    def held_past(v: Any, t: int) -> bool:
        """Is v kept once step t is done?"""
        if v in sinks:
            return True
        nu = readers.next_use(v, t + 1)
        return nu is not None and (v, order[nu]) not in dropped

    def compute(v: Any, t: int) -> None:
        nonlocal used, peak, peak_count, peak_step, peak_node, peak_resident
        schedule.append(["compute", v])
        resident.add(v)
        used += ram[v]
        if used > peak:
            peak, peak_count, peak_step, peak_node, peak_resident = used, 1, t, v, frozenset(resident)
        elif used == peak:
            peak_count += 1

    def release(v: Any) -> None:
        nonlocal used
        schedule.append(["free", v])
        resident.discard(v)
        used -= ram[v]

    for t, x in enumerate(order):
        need = _missing_ancestors(x, preds, resident)
        if need:
            cone = sorted(need, key=pos.__getitem__)
            wanted = set(preds[x])
            remaining: dict[Any, int] = {}  # readers of each node still to run in this cone
            for c in cone:
                for p in preds[c]:
                    remaining[p] = remaining.get(p, 0) + 1
            for c in cone:
                compute(c, t)
                for p in preds[c]:
                    remaining[p] -= 1
                    if remaining[p] == 0 and p not in wanted and not held_past(p, t):
                        release(p)
        compute(x, t)
        for v in [v for v in resident if not held_past(v, t)]:
            release(v)
    return Simulated(schedule, peak, peak_count, peak_step, peak_node, peak_resident)


def _missing_ancestors(x: Any, preds: dict[Any, list[Any]], resident: set[Any]) -> set[Any]:
    need: set[Any] = set()
    stack = [p for p in preds[x] if p not in resident]
    while stack:
        v = stack.pop()
        if v in need:
            continue
        need.add(v)
        stack.extend(p for p in preds[v] if p not in resident and p not in need)
    return need


def all_gaps(inst: Instance) -> set[tuple[Any, Any]]:
    return {(v, r) for v in inst.order for r in inst.succs[v]}


def checkpoint_all(inst: Instance) -> Simulated:
    """Recompute everything that can be: every gap dropped."""
    return simulate(inst, all_gaps(inst))


@dataclass
class GreedyRun:
    """One greedy descent from keep-all to its floor, with the first state under each budget."""

    floor: Simulated
    reached: dict[int, Simulated] = field(default_factory=dict)
    seconds: float = 0.0
    drops: int = 0
    stopped: str = ""


def greedy(inst: Instance, budgets: list[int], *, time_limit_s: float = 60.0, tries: int = 16) -> GreedyRun:
    """Drop, at each round, of the ``tries`` best-scoring gaps held across the peak (bytes /
    recompute cost), the one that lowers (peak, number of computes at the peak) most; stop when
    nothing helps or at the time limit. Runs to the floor; ``reached[b]`` is the first state with peak <= b."""
    started = time.perf_counter()
    readers = _Readers(inst)
    dropped: set[tuple[Any, Any]] = set()
    current = simulate(inst, dropped, readers)
    run = GreedyRun(floor=current)
    pending = sorted(budgets, reverse=True)
    while True:
        while pending and current.peak <= pending[0]:
            run.reached[pending.pop(0)] = current
        if time.perf_counter() - started > time_limit_s:
            run.stopped = f"time limit {time_limit_s:g} s"
            break
        candidates = _candidates(inst, readers, current, dropped)
        improved = None
        for gap in candidates[:tries]:
            trial = simulate(inst, dropped | {gap}, readers)
            if (trial.peak, trial.peak_count) < (current.peak, current.peak_count) and (
                    improved is None or (trial.peak, trial.peak_count) < (improved[1].peak, improved[1].peak_count)):
                improved = (gap, trial)
        if improved is None:
            run.stopped = "no drop lowers the peak"
            break
        dropped.add(improved[0])
        current = improved[1]
        run.drops += 1
        run.floor = current  # each accepted drop lowers (peak, count): the latest is the lowest
    run.seconds = time.perf_counter() - started
    return run


def _candidates(inst: Instance, readers: _Readers, at: Simulated, dropped: set[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Gaps held across the peak, best bytes per recompute cost first."""
    busy = set(inst.preds[at.peak_node]) | {at.peak_node}
    out = []
    for v in at.peak_resident:
        if v in busy or v in inst.sinks:
            continue
        nu = readers.next_use(v, at.peak_step)
        if nu is None:
            continue
        gap = (v, inst.order[nu])
        if gap not in dropped:
            out.append((inst.ram[v] / max(float(inst.cpu[v]), 1e-12), repr(v), gap))
    out.sort(key=lambda item: (-item[0], item[1]))
    return [gap for _, _, gap in out]


# -- tierplan ---------------------------------------------------------------------------------


@dataclass
class Row:
    graph: str
    budget_label: str
    budget: int
    method: str
    status: str  # ok | infeasible | n/a | error | INVALID
    cost: float | None = None
    peak: int | None = None
    seconds: float | None = None
    gap: float | None = None
    note: str = ""


def tierplan_row(data: dict[str, Any], inst: Instance, budget: int, *, reorder: bool, time_limit_s: float,
                 label: str, budget_label: str) -> Row:
    from tierplan.cli import remat as remat_cli
    from tierplan.formats.node_link import graph_from_node_link
    from tierplan.plans.plan import InfeasibleBudget, PlanError

    method = "tierplan --reorder" if reorder else "tierplan"
    plan_fn: Callable[..., Any] = remat_cli.plan_abstract
    params = inspect.signature(plan_fn).parameters
    if reorder and "reorder" not in params:
        return Row(label, budget_label, budget, method, "n/a", note="n/a (not built)")
    kwargs: dict[str, Any] = {"reorder": True} if reorder else {}
    started = time.perf_counter()
    try:
        graph, times, ids = graph_from_node_link(json.loads(json.dumps(data)), name=label)
        plan = plan_fn(graph, times, budget, time_limit_s, **kwargs)
    except InfeasibleBudget as exc:
        low = f", planner's min {exc.min_feasible_bytes / MIB:.1f} MiB" if exc.min_feasible_bytes else ""
        closest = getattr(exc, "closest_bytes", None)  # (a planner of another version may not say)
        low += f", closest {closest / MIB:.1f} MiB" if closest else ""
        return Row(label, budget_label, budget, method, "infeasible", seconds=time.perf_counter() - started,
                   note=f"infeasible{low}")
    except PlanError as exc:
        return Row(label, budget_label, budget, method, "error", seconds=time.perf_counter() - started,
                   note=f"error: {str(exc).splitlines()[0][:60]}")
    except Exception as exc:  # noqa: BLE001 (the planner is being extended: report, keep benching)
        return Row(label, budget_label, budget, method, "error", seconds=time.perf_counter() - started,
                   note=f"planner crashed: {type(exc).__name__}: {str(exc).splitlines()[0][:50]}")
    seconds = time.perf_counter() - started
    schedule = remat_cli.schedule_of(plan, ids)
    gap = float(plan.solver.gap) if plan.solver and plan.solver.gap is not None else None
    # With --reorder the first computes may follow another order: replay against that order.
    checked_inst = inst if not reorder else _reordered(inst, schedule)
    try:
        replayed = replay(checked_inst, schedule, budget)
    except ScheduleError as exc:
        return Row(label, budget_label, budget, method, "INVALID", seconds=seconds, note=str(exc)[:70])
    return Row(label, budget_label, budget, method, "ok", replayed.cost, replayed.peak, seconds, gap)


def _reordered(inst: Instance, schedule: list[list[Any]]) -> Instance:
    seen: dict[Any, None] = {}
    for kind, node in schedule:
        if kind == "compute":
            seen.setdefault(node, None)
    order = list(seen) + [n for n in inst.order if n not in seen]
    return Instance(order, inst.ram, inst.cpu, inst.preds, inst.succs)


def baseline_row(inst: Instance, sim: Simulated | None, budget: int, *, method: str, label: str,
                 budget_label: str, seconds: float, note: str = "") -> Row:
    if sim is None or sim.peak > budget:
        floor = f" (floor {sim.peak / MIB:.1f} MiB)" if sim is not None else ""
        return Row(label, budget_label, budget, method, "infeasible", seconds=seconds,
                   note=(note or "infeasible") + floor)
    try:
        replayed = replay(inst, sim.schedule, budget)
    except ScheduleError as exc:
        return Row(label, budget_label, budget, method, "INVALID", seconds=seconds, note=str(exc)[:70])
    return Row(label, budget_label, budget, method, "ok", replayed.cost, replayed.peak, seconds, note=note)


# -- the table --------------------------------------------------------------------------------


def exact_bounds() -> dict[tuple[str, int], float]:
    """(spec json, budget) -> the exact MILP's proven lower bound on the cost (the optimum when
    it was proven), from the fixture when present."""
    if not FIXTURE.exists():
        return {}
    fx = json.loads(FIXTURE.read_text())
    spec = json.dumps(fx["spec"], sort_keys=True)
    return {(spec, b["budget_bytes"]): b["optimal_cost"] or b["bound"] for b in fx["budgets"] if b.get("bound")}


def run(sizes: tuple[int, ...], *, time_limit_s: float, greedy_limit_s: float, seed: int = 0,
        out: Callable[[str], None] = print) -> list[Row]:
    optima = exact_bounds()
    rows: list[Row] = []
    header = (f"{'graph':<10} {'budget':<16} {'method':<20} {'overhead':>10} {'peak MiB':>9} "
              f"{'solve s':>8} {'gap':>7} {'vs LB':>8}  note")
    out(header)
    out("-" * len(header))
    for n in sizes:
        spec = standard_spec(n, seed)
        data = layered_graph(spec)
        inst = instance(data)
        base_cost = keep_all_cost(data)
        ka_peak = keep_all_peak(data)
        label = f"layer{n}"
        started = time.perf_counter()
        ckpt = checkpoint_all(inst)
        ckpt_s = time.perf_counter() - started
        budgets = {"0.9": int(0.9 * ka_peak), "0.8": int(0.8 * ka_peak)}
        descent = greedy(inst, list(budgets.values()), time_limit_s=greedy_limit_s)
        low = min(ckpt.peak, descent.floor.peak)
        budgets["min"] = low
        if low not in descent.reached and descent.floor.peak <= low:
            descent.reached[low] = descent.floor
        out(f"{label}: {n} nodes, {len(data['links'])} links, keep-all peak {ka_peak / MIB:.1f} MiB, cost "
            f"{base_cost:g}; node-wise lower bound {lower_bound_peak(inst) / MIB:.1f} MiB; min = "
            f"{'checkpoint-all' if ckpt.peak <= descent.floor.peak else 'greedy'} peak; greedy: "
            f"{descent.drops} drops in {descent.seconds:.1f} s, stopped: {descent.stopped}")
        spec_key = json.dumps(spec.to_json(), sort_keys=True)
        for blabel, budget in budgets.items():
            blab = f"{blabel} ({budget / MIB:.1f} MiB)"
            group = [
                tierplan_row(data, inst, budget, reorder=False, time_limit_s=time_limit_s, label=label,
                             budget_label=blab),
                tierplan_row(data, inst, budget, reorder=True, time_limit_s=time_limit_s, label=label,
                             budget_label=blab),
                baseline_row(inst, ckpt, budget, method="checkpoint-all", label=label, budget_label=blab,
                             seconds=ckpt_s),
                baseline_row(inst, descent.reached.get(budget, descent.floor), budget, method="greedy",
                             label=label, budget_label=blab, seconds=descent.seconds),
            ]
            best = optima.get((spec_key, budget))
            for row in group:
                out(_format(row, base_cost, best))
            rows.extend(group)
    return rows


def _format(row: Row, base_cost: float, best: float | None) -> str:
    if row.status != "ok":
        return (f"{row.graph:<10} {row.budget_label:<16} {row.method:<20} {row.status:>10} {'-':>9} "
                f"{_num(row.seconds, '.2f'):>8} {'-':>7} {'-':>8}  {row.note}")
    overhead = row.cost / base_cost - 1
    vs = f"{(row.cost / best - 1) * 100:+.1f}%" if best else "-"
    return (f"{row.graph:<10} {row.budget_label:<16} {row.method:<20} {overhead * 100:>9.2f}% "
            f"{row.peak / MIB:>9.1f} {_num(row.seconds, '.2f'):>8} {_num(row.gap, '.4f'):>7} {vs:>8}  {row.note}")


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the 100- and 250-node graphs")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--time-limit", type=float, default=15.0, help="tierplan's solver limit per run, s")
    parser.add_argument("--greedy-limit", type=float, default=30.0, help="greedy's limit per graph, s")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = tuple(args.sizes) if args.sizes else (STANDARD_SIZES[:2] if args.quick else STANDARD_SIZES)
    started = time.perf_counter()
    run(sizes, time_limit_s=args.time_limit, greedy_limit_s=args.greedy_limit, seed=args.seed)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
