"""Exact rematerialization optimum of a node-link graph under a fixed topological order:
Checkmate's MILP (Jain et al., MLSys 2020, section 4), solved with OR-tools CP-SAT.

    python bench/remat_exact.py --n 100 --fractions 0.9 0.8 --time-limit 300 \
        --out tests/fixtures/remat_layered_100.json

Stage t computes node t of the order (R[t,t] = 1) after recomputing any earlier nodes it needs
(R[t,i], i < t); S[t,i] says node i's output is retained from stage t-1 into stage t. FREE[t,i,k]
frees i right after node k of stage t when k runs, i is not retained into stage t+1 and no later
reader of i runs in stage t; U[t,k] is the memory after node k of stage t computes, before the
frees that follow it, and stays within the budget. The objective is the total compute cost,
sum R[t,i] * cost_cpu[i]. Sinks (outputs) are kept from their stage to the end, as tierplan and
the accounting in tierplan.formats.random_graphs keep them.

The fixture it writes holds the graph, its generator spec, per budget the solver status, the
optimal (or best) cost, the bound and gap, and the schedule, which tests replay with the
independent checker (:func:`tierplan.formats.random_graphs.replay`).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ortools.sat.python import cp_model  # noqa: E402

from tierplan.formats.random_graphs import (  # noqa: E402
    Instance,
    instance,
    keep_all_cost,
    keep_all_peak,
    layered_graph,
    replay,
    standard_spec,
)


@dataclass
class ExactResult:
    status: str  # OPTIMAL, FEASIBLE, INFEASIBLE, UNKNOWN
    cost: float | None
    bound: float
    gap: float | None
    solve_s: float
    schedule: list[list[Any]] | None


@dataclass
class _Model:
    model: cp_model.CpModel
    R: dict[tuple[int, int], cp_model.IntVar]
    S: dict[tuple[int, int], cp_model.IntVar]
    FREE: dict[tuple[int, int, int], cp_model.IntVar]


def build_model(inst: Instance, budget: int) -> _Model:
    """Checkmate's MILP over positions 0..n-1 of ``inst.order``; memory in units of the gcd of the
    sizes (the same model, smaller numbers for the solver)."""
    n = len(inst.order)
    pos = {node: i for i, node in enumerate(inst.order)}
    unit = math.gcd(*(inst.ram[v] for v in inst.order)) or 1
    mem = [inst.ram[v] // unit for v in inst.order]
    cap = budget // unit
    preds = [[pos[p] for p in inst.preds[v]] for v in inst.order]
    succs = [[pos[s] for s in inst.succs[v]] for v in inst.order]
    sinks = {i for i in range(n) if not succs[i]}
    # Costs must be integers for CP-SAT; scale by 1000 when a benchmark's costs are fractional.
    cpu = [inst.cpu[v] for v in inst.order]
    scale = 1 if all(float(c).is_integer() for c in cpu) else 1000
    cost = [int(round(c * scale)) for c in cpu]

    m = cp_model.CpModel()
    R: dict[tuple[int, int], Any] = {}
    S: dict[tuple[int, int], Any] = {}
    for t in range(n):
        for i in range(t + 1):
            R[t, i] = m.NewBoolVar(f"R{t}_{i}")
        for i in range(t):
            S[t, i] = m.NewBoolVar(f"S{t}_{i}")
    for t in range(n):
        m.Add(R[t, t] == 1)
        for i in range(t):
            # Recomputing a retained output only costs: it is never both (tightening, exact).
            m.AddBoolOr([R[t, i].Not(), S[t, i].Not()])
            if i in sinks:  # outputs stay from their stage to the end
                m.Add(S[t, i] == 1)
        for j in range(t + 1):
            for p in preds[j]:
                m.AddBoolOr([R[t, j].Not(), R[t, p], S[t, p]] if p < t else [R[t, j].Not(), R[t, p]])
        if t + 1 < n:
            for i in range(t + 1):
                have = [R[t, i]] + ([S[t, i]] if i < t else [])
                m.AddBoolOr([S[t + 1, i].Not(), *have])
        # Valid cuts (they only remove waste, so the optimum is unchanged): an earlier node is
        # recomputed, or retained into stage t, only if a reader of it runs in stage t or it is
        # retained into stage t+1. They cut the LP's fractional garbage a lot.
        for i in range(t):
            if i in sinks:
                continue
            used = [R[t, j] for j in succs[i] if j <= t]
            if t + 1 < n:
                used.append(S[t + 1, i])
            m.AddBoolOr([R[t, i].Not(), *used])
            m.AddBoolOr([S[t, i].Not(), *used])

    FREE: dict[tuple[int, int, int], Any] = {}
    for t in range(n):
        for k in range(t + 1):
            for i in set(preds[k]) | {k}:
                if i in sinks:
                    continue
                hazards = [R[t, k].Not()]
                if t + 1 < n:
                    hazards.append(S[t + 1, i])
                hazards += [R[t, j] for j in succs[i] if k < j <= t]
                f = m.NewBoolVar(f"F{t}_{i}_{k}")
                FREE[t, i, k] = f
                for h in hazards:
                    m.AddImplication(f, h.Not())
                m.AddBoolOr([*hazards, f])
    for t in range(n):
        previous = None
        for k in range(t + 1):
            u = m.NewIntVar(0, cap, f"U{t}_{k}")
            if k == 0:
                m.Add(u == sum(mem[i] * S[t, i] for i in range(t)) + mem[0] * R[t, 0])
            else:
                freed = [mem[i] * FREE[t, i, k - 1] for i in set(preds[k - 1]) | {k - 1} if (t, i, k - 1) in FREE]
                m.Add(u == previous - sum(freed) + mem[k] * R[t, k])
            previous = u
    m.Minimize(sum(cost[i] * R[t, i] for (t, i) in R))
    m._cost_scale = scale  # noqa: SLF001 (read back by solve_exact)
    return _Model(m, R, S, FREE)


def build_mip(inst: Instance, budget: int, backend: str) -> tuple[Any, _Model]:
    """The same MILP for an LP-based solver (SCIP or HiGHS through pywraplp): FREE linearised as
    Checkmate does (FREE <= each "no hazard", FREE >= 1 - hazards)."""
    from ortools.linear_solver import pywraplp

    solver = pywraplp.Solver.CreateSolver(backend)
    if solver is None:
        raise SystemExit(f"OR-tools has no {backend} backend here")
    n = len(inst.order)
    pos = {node: i for i, node in enumerate(inst.order)}
    unit = math.gcd(*(inst.ram[v] for v in inst.order)) or 1
    mem = [inst.ram[v] // unit for v in inst.order]
    cap = budget // unit
    preds = [[pos[p] for p in inst.preds[v]] for v in inst.order]
    succs = [[pos[s] for s in inst.succs[v]] for v in inst.order]
    sinks = {i for i in range(n) if not succs[i]}
    cost = [float(inst.cpu[v]) for v in inst.order]
    R = {(t, i): solver.BoolVar(f"R{t}_{i}") for t in range(n) for i in range(t + 1)}
    S = {(t, i): solver.BoolVar(f"S{t}_{i}") for t in range(n) for i in range(t)}
    for t in range(n):
        solver.Add(R[t, t] == 1)
        for i in range(t):
            solver.Add(R[t, i] + S[t, i] <= 1)
            if i in sinks:
                solver.Add(S[t, i] == 1)
        for j in range(t + 1):
            for p in preds[j]:
                solver.Add(R[t, j] <= R[t, p] + S[t, p])
        if t + 1 < n:
            for i in range(t + 1):
                solver.Add(S[t + 1, i] <= R[t, i] + (S[t, i] if i < t else 0))
        for i in range(t):
            if i in sinks:
                continue
            used = [R[t, j] for j in succs[i] if j <= t] + ([S[t + 1, i]] if t + 1 < n else [])
            solver.Add(R[t, i] <= sum(used))
            solver.Add(S[t, i] <= sum(used))
    FREE = {}
    for t in range(n):
        for k in range(t + 1):
            for i in set(preds[k]) | {k}:
                if i in sinks:
                    continue
                later = [R[t, j] for j in succs[i] if k < j <= t]
                keep = [S[t + 1, i]] if t + 1 < n else []
                f = solver.BoolVar(f"F{t}_{i}_{k}")
                FREE[t, i, k] = f
                solver.Add(f <= R[t, k])
                for h in keep + later:
                    solver.Add(f <= 1 - h)
                solver.Add(f >= R[t, k] - sum(keep + later))
    for t in range(n):
        u = sum(mem[i] * S[t, i] for i in range(t)) + mem[0] * R[t, 0]
        solver.Add(u <= cap)
        for k in range(1, t + 1):
            freed = [mem[i] * FREE[t, i, k - 1] for i in set(preds[k - 1]) | {k - 1} if (t, i, k - 1) in FREE]
            v = solver.NumVar(0, cap, f"U{t}_{k}")
            solver.Add(v == u - sum(freed) + mem[k] * R[t, k])
            u = v
    solver.Minimize(sum(cost[i] * R[t, i] for (t, i) in R))
    return solver, _Model(None, R, S, FREE)


class _MipValues:
    """Reads pywraplp solution values through the CpSolver interface extract_schedule uses."""

    @staticmethod
    def Value(var: Any) -> int:  # noqa: N802 (CpSolver's name)
        return int(round(var.solution_value()))


def stages_of(inst: Instance, schedule: list[list[Any]]) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """(R, S) of a replayable schedule in Checkmate's stage form: stage t ends with the first
    compute of node t; S[t, i] when i is resident as stage t begins. Used to warm-start the MILP
    from another planner's schedule."""
    pos = {node: i for i, node in enumerate(inst.order)}
    R: set[tuple[int, int]] = set()
    S: set[tuple[int, int]] = set()
    resident: set[int] = set()
    stage, begun = 0, True
    for kind, node in schedule:
        i = pos[node]
        if kind == "free":
            resident.discard(i)
            continue
        if not begun:  # the frees after node t-1 belong to stage t-1: S is what survives them
            S.update((stage, j) for j in resident)
            begun = True
        R.add((stage, i))
        resident.add(i)
        if i == stage:
            stage, begun = stage + 1, False
    # A schedule may free a retained output a little late (not at its last reader): drop such
    # retentions, last stage first, so the hint meets the MILP's "retained only if used" cuts.
    sinks = {pos[v] for v in inst.sinks}
    for t in range(len(inst.order) - 1, -1, -1):
        for i in [i for (u, i) in S if u == t and i not in sinks]:
            if not any((t, pos[j]) in R and pos[j] <= t for j in inst.succs[inst.order[i]]) and (t + 1, i) not in S:
                S.discard((t, i))
    return R, S


def tierplan_schedule(data: dict[str, Any], budget: int, time_limit_s: float) -> list[list[Any]] | None:
    """tierplan's own plan at ``budget`` (the function ``tierplan remat`` calls), or None."""
    from tierplan.cli.remat import plan_abstract, schedule_of
    from tierplan.formats.node_link import graph_from_node_link

    try:
        graph, times, ids = graph_from_node_link(json.loads(json.dumps(data)))
        return schedule_of(plan_abstract(graph, times, budget, time_limit_s), ids)
    except Exception as exc:  # noqa: BLE001 (a warm start is optional)
        print(f"  (no tierplan warm start: {type(exc).__name__}: {exc})")
        return None


def solve_mip(data: dict[str, Any], budget: int, *, time_limit_s: float, backend: str = "SCIP",
              log: bool = False, warm: list[list[Any]] | None = None) -> ExactResult:
    from ortools.linear_solver import pywraplp

    inst = instance(data)
    started = time.perf_counter()
    solver, built = build_mip(inst, budget, backend)
    solver.SetTimeLimit(int(time_limit_s * 1000))
    if warm is not None:
        r_on, s_on = stages_of(inst, warm)
        values = [1.0 if k in r_on else 0.0 for k in built.R] + [1.0 if k in s_on else 0.0 for k in built.S]
        solver.SetHint([built.R[k] for k in built.R] + [built.S[k] for k in built.S], values)
    if log:
        solver.EnableOutput()
    status = solver.Solve()
    solve_s = time.perf_counter() - started
    names = {pywraplp.Solver.OPTIMAL: "OPTIMAL", pywraplp.Solver.FEASIBLE: "FEASIBLE",
             pywraplp.Solver.INFEASIBLE: "INFEASIBLE"}
    name = names.get(status, "UNKNOWN")
    bound = solver.Objective().BestBound()
    if name not in ("OPTIMAL", "FEASIBLE"):
        return ExactResult(name, None, bound, None, solve_s, None)
    cost = solver.Objective().Value()
    schedule = extract_schedule(inst, built, _MipValues())
    checked = replay(inst, schedule, budget)
    if abs(checked.cost - cost) > 1e-6 * max(1.0, cost):
        raise AssertionError(f"replayed cost {checked.cost} != MILP objective {cost}")
    return ExactResult(name, cost, bound, (cost - bound) / cost if cost else 0.0, solve_s, schedule)


def extract_schedule(inst: Instance, built: _Model, solver: cp_model.CpSolver) -> list[list[Any]]:
    """Stage by stage: the R nodes in order, each followed by the FREEs after it; outputs retained
    into a stage but neither used nor retained further are freed at the stage's end."""
    n = len(inst.order)
    order = inst.order
    preds = {i: [order.index(p) for p in inst.preds[v]] for i, v in enumerate(order)}
    sinks = {i for i, v in enumerate(order) if not inst.succs[v]}
    schedule: list[list[Any]] = []
    resident: set[int] = set()
    for t in range(n):
        for k in range(t + 1):
            if not solver.Value(built.R[t, k]):
                continue
            schedule.append(["compute", order[k]])
            resident.add(k)
            for i in sorted(set(preds[k]) | {k}):
                key = (t, i, k)
                if key in built.FREE and solver.Value(built.FREE[key]):
                    schedule.append(["free", order[i]])
                    resident.discard(i)
        keep = {i for i in range(t + 1) if (t + 1, i) in built.S and solver.Value(built.S[t + 1, i])}
        for i in sorted(resident - keep - sinks):
            schedule.append(["free", order[i]])
            resident.discard(i)
    return schedule


def solve_exact(data: dict[str, Any], budget: int, *, time_limit_s: float, workers: int = 2,
                log: bool = False, linearization: int = 2) -> ExactResult:
    inst = instance(data)
    started = time.perf_counter()
    built = build_model(inst, budget)
    scale = built.model._cost_scale  # noqa: SLF001
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = workers
    solver.parameters.log_search_progress = log
    solver.parameters.linearization_level = linearization
    status = solver.Solve(built.model)
    solve_s = time.perf_counter() - started
    name = solver.StatusName(status)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return ExactResult(name, None, solver.BestObjectiveBound() / scale, None, solve_s, None)
    cost = solver.ObjectiveValue() / scale
    bound = solver.BestObjectiveBound() / scale
    schedule = extract_schedule(inst, built, solver)
    checked = replay(inst, schedule, budget)  # the MILP's schedule must pass the independent replay
    if abs(checked.cost - cost) > 1e-6 * max(1.0, cost):
        raise AssertionError(f"replayed cost {checked.cost} != MILP objective {cost}")
    gap = (cost - bound) / cost if cost else 0.0
    return ExactResult(name, cost, bound, gap, solve_s, schedule)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.9, 0.8])
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per budget")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--log", action="store_true")
    parser.add_argument("--solver", choices=["cpsat", "scip", "highs"], default="scip")
    parser.add_argument("--warm-tierplan", action="store_true",
                        help="warm-start SCIP/HiGHS from tierplan's own plan at the budget")
    parser.add_argument("--out", type=Path, default=None, help="fixture to write")
    args = parser.parse_args(argv)

    spec = standard_spec(args.n, args.seed)
    data = layered_graph(spec)
    peak = keep_all_peak(data)
    base = keep_all_cost(data)
    print(f"layered n={args.n} seed={args.seed}: {len(data['links'])} links, keep-all peak {peak} bytes, "
          f"keep-all cost {base:g}")
    results = []
    for fraction in args.fractions:
        budget = int(peak * fraction)
        if args.solver == "cpsat":
            r = solve_exact(data, budget, time_limit_s=args.time_limit, workers=args.workers, log=args.log)
        else:
            warm = tierplan_schedule(data, budget, 30.0) if args.warm_tierplan else None
            r = solve_mip(data, budget, time_limit_s=args.time_limit, backend=args.solver.upper(), log=args.log,
                          warm=warm)
        overhead = f"{r.cost / base - 1:+.4%}" if r.cost is not None else "-"
        print(f"  {fraction:.2f} ({budget} B): {r.status} cost {r.cost} bound {r.bound:g} gap {r.gap} "
              f"overhead {overhead} in {r.solve_s:.1f} s")
        results.append({"fraction": fraction, "budget_bytes": budget, "status": r.status,
                        "optimal_cost": r.cost if r.status == "OPTIMAL" else None, "best_cost": r.cost,
                        "bound": r.bound, "gap": r.gap, "solve_s": round(r.solve_s, 2),
                        "schedule": r.schedule})
    if args.out:
        fixture = {
            "about": "Exact rematerialization optimum (Checkmate's MILP, CP-SAT) of a random layered "
                     "forward-only graph under its graph.order; written by bench/remat_exact.py",
            "solver": f"ortools CP-SAT, {args.workers} workers, {args.time_limit:g} s limit per budget",
            "spec": spec.to_json(),
            "keep_all_peak_bytes": peak,
            "keep_all_cost": base,
            "budgets": results,
            "graph": data,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(fixture, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
