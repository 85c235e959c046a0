r"""Exact rematerialization optimum of a node-link graph under a fixed topological order:
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

The whole 100-node MILP does not close in minutes (SCIP's bound moved from 535 to 537 in 240 s at
0.9). Its lower bounds come from :func:`window_lower_bound` instead: a few windows of stages, each
solved on its own (their sum, plus the compute cost of the stages no window covers, bounds every
schedule; see there), on the strengthened model of :func:`build_mip`. This regenerates them in
place, keeping the graph and the stored best schedules (single-threaded, about 11 minutes):

    OMP_NUM_THREADS=1 python bench/remat_exact.py --update tests/fixtures/remat_layered_100.json \
        --bound-windows 0.9=0:40 0.8=0:45,68:82 --time-limit 600

The windows may also be solved on a smaller relaxation of the same MILP, memory checked only at
each node's first compute and at each recompute (:func:`build_moment_model`), which closes windows
the MILP leaves open; a stored bound that is higher stands:

    OMP_NUM_THREADS=1 python bench/remat_exact.py --update tests/fixtures/remat_layered_100.json \
        --bound-windows 0.8=0:45,68:82 --bound-model moment --time-limit 1200

(window 0..45 closes at 295 in 529 s on SCIP, one thread; HiGHS closes the same window at 295 in
644 s). That raised the 0.8 bound from 565 to 591.

The stored best schedules are checked for local optimality by re-solving windows of stages with
the rest of the schedule fixed (:func:`solve_window_fixed`; an improvement found replaces the
schedule), recorded per budget as ``local_check``:

    python bench/remat_exact.py --update tests/fixtures/remat_layered_100.json --local 21:10 --time-limit 60

The windows sit where the budgets bind: at 0.9 keep-all exceeds the budget only at nodes 13, 21
and 22 of the order, at 0.8 from 12 to 45 and at 74; a window ends a few stages after the last
reader its dropped outputs have, and its tail term charges what it leaves for later stages.
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


@dataclass(frozen=True)
class _Indexed:
    """An instance by position in its order, memory in units of the gcd of the sizes (the
    linear models' rows stay integral)."""

    n: int
    mem: list[int]
    cap: int  # the budget in those units
    preds: list[list[int]]
    succs: list[list[int]]
    sinks: set[int]
    cost: list[float]

    @staticmethod
    def of(inst: Instance, budget: int) -> "_Indexed":
        pos = {node: i for i, node in enumerate(inst.order)}
        unit = math.gcd(*(inst.ram[v] for v in inst.order)) or 1
        succs = [[pos[s] for s in inst.succs[v]] for v in inst.order]
        return _Indexed(len(inst.order), [inst.ram[v] // unit for v in inst.order], budget // unit,
                        [[pos[p] for p in inst.preds[v]] for v in inst.order], succs,
                        {i for i, out in enumerate(succs) if not out}, [float(inst.cpu[v]) for v in inst.order])


def _linear_solver(backend: str) -> Any:
    from ortools.linear_solver import pywraplp

    solver = pywraplp.Solver.CreateSolver(backend)
    if solver is None:
        raise SystemExit(f"OR-tools has no {backend} backend here")
    return solver


def build_model(inst: Instance, budget: int) -> _Model:
    """Checkmate's MILP over positions 0..n-1 of ``inst.order``; memory in units of the gcd of the
    sizes (the same model, smaller numbers for the solver)."""
    g = _Indexed.of(inst, budget)
    n, mem, cap, preds, succs, sinks, cpu = g.n, g.mem, g.cap, g.preds, g.succs, g.sinks, g.cost
    # Costs must be integers for CP-SAT; scale by 1000 when a benchmark's costs are fractional.
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


@dataclass(frozen=True)
class Window:
    """Stages ``first..last`` (inclusive) of the MILP, solved on their own for a lower bound: the
    stages before ``first`` and after ``last`` are dropped, so what is resident as stage ``first``
    begins is free (S[first, .] unconstrained) and so is what is retained out of stage ``last``
    (S[last+1, .]). ``tail_until``: the next window's first stage (n when none); see
    :func:`build_mip` for the tail term it bounds."""

    first: int
    last: int
    tail_until: int


def build_mip(inst: Instance, budget: int, backend: str, window: Window | None = None) -> tuple[Any, _Model]:
    """The same MILP for an LP-based solver (SCIP or HiGHS through pywraplp): FREE linearised as
    Checkmate does (FREE <= each "no hazard", FREE >= 1 - hazards).

    Two additions to build_model, both satisfied by every schedule that meets the "only if used"
    cuts (which keep an optimum, see build_model), so the optimum is unchanged:

    - conservation: sum_k FREE[t,i,k] + S[t+1,i] = R[t,i] + S[t,i] for every non-sink i <= t. A
      resident i is, in its stage, either retained into the next one or freed exactly once (after
      its last reader, or right after itself), and an absent one is never freed. The LP otherwise
      frees fractions of one output at several readers and so undercounts memory; the root bound
      of the 0.8 budget's first 41 stages rises from 223 to 231 (SCIP's, before its cuts).
    - with ``window``, only its stages (see :class:`Window`), plus a tail: Z[i] in [0, 1] with
      Z[i] >= 1 - S[last+1,i] when i has a reader j in last < j < tail_until, and
      Z[p] >= Z[i] - S[last+1,p] for each input p of i, adding sum cost[i] * Z[i] to the
      objective. An output not retained out of the window but read before tail_until must be
      computed again in some stage s in (last, tail_until) (its reader needs it resident; it can
      only get there by a compute after the window), and computing it needs each input resident
      at s, so an input not retained out of the window must be computed there too. Those are
      recomputes (i <= last < s), each node counted once, in stages no window covers.
    """
    solver = _linear_solver(backend)
    g = _Indexed.of(inst, budget)
    n, mem, cap, preds, succs, sinks, cost = g.n, g.mem, g.cap, g.preds, g.succs, g.sinks, g.cost
    first, last = (window.first, window.last) if window else (0, n - 1)
    stages = range(first, last + 1)
    R = {(t, i): solver.BoolVar(f"R{t}_{i}") for t in stages for i in range(t + 1)}
    # S of stage last+1 too: what the window's last stage retains (free, as stage first's S is).
    S = {(t, i): solver.BoolVar(f"S{t}_{i}") for t in range(first, min(last + 2, n)) for i in range(t)}
    for (t, i), s in S.items():
        if i in sinks:  # outputs stay from their stage to the end
            solver.Add(s == 1)
    for t in stages:
        solver.Add(R[t, t] == 1)
        for i in range(t):
            solver.Add(R[t, i] + S[t, i] <= 1)
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
    for t in stages:
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
        for i in range(t + 1):  # conservation (see the docstring)
            if i in sinks:
                continue
            freed = [FREE[t, i, k] for k in range(t + 1) if (t, i, k) in FREE]
            solver.Add(sum(freed) + (S[t + 1, i] if t + 1 < n else 0) == R[t, i] + (S[t, i] if i < t else 0))
    for t in stages:
        u = sum(mem[i] * S[t, i] for i in range(t)) + mem[0] * R[t, 0]
        solver.Add(u <= cap)
        for k in range(1, t + 1):
            freed = [mem[i] * FREE[t, i, k - 1] for i in set(preds[k - 1]) | {k - 1} if (t, i, k - 1) in FREE]
            v = solver.NumVar(0, cap, f"U{t}_{k}")
            solver.Add(v == u - sum(freed) + mem[k] * R[t, k])
            u = v
    objective = sum(cost[i] * R[t, i] for (t, i) in R)
    if window is not None and last + 1 < n:
        Z = {i: solver.NumVar(0, 1, f"Z{i}") for i in range(last + 1) if i not in sinks}
        for i in Z:
            if any(last < j < window.tail_until for j in succs[i]):
                solver.Add(Z[i] >= 1 - S[last + 1, i])
            for p in preds[i]:
                solver.Add(Z[p] >= Z[i] - S[last + 1, p])
        objective += sum(cost[i] * Z[i] for i in Z)
    solver.Minimize(objective)
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


@dataclass
class WindowBound:
    window: Window
    status: str  # SCIP's: OPTIMAL when the window itself was solved to optimality
    value: float | None  # the window's best objective found (its stages' cost plus the tail)
    bound: float  # the window's proven lower bound, rounded up (the objective is an integer)
    solve_s: float


@dataclass
class LowerBound:
    bound: float  # sum of the windows' bounds + the cost of each stage no window covers
    windows: list[WindowBound]
    uncovered: float  # sum of cost[t] over the stages no window covers
    solve_s: float


def window_lower_bound(data: dict[str, Any], budget: int, spans: list[tuple[int, int]], *, time_limit_s: float,
                       backend: str = "SCIP", warm: list[list[Any]] | None = None,
                       log: bool = False, model: str = "checkmate") -> LowerBound:
    """A proven lower bound on the MILP's optimum from disjoint windows of stages ``spans``
    (``[(first, last), ...]``, increasing), each solved on its own with :func:`build_mip`.

    The objective is a sum over stages, sum_t sum_i cost[i] R[t,i]. Take any schedule that meets
    the "only if used" cuts (an optimal one does). Restricted to a window's stages (and the S it
    retains out of the window's last stage) it is feasible for the window's model, whose
    constraints are a subset of the full model's; the window's tail counts recomputes in stages
    up to the next window that no window counts (see build_mip). Every other stage t costs at
    least cost[t] (R[t,t] = 1), and no recompute the tails count is an R[t,t]. So the schedule
    costs at least sum over windows of (the window's optimum) + sum of cost[t] over uncovered
    stages, and a solver's proven bound on each window may stand in for its optimum. Windows are
    far smaller than the whole (the stages before the last window's end, the memory pressure of
    these budgets being in the first half), so SCIP closes them where it cannot close the whole.

    ``model="moment"`` solves each window on build_moment_model instead, a relaxation of the
    window's MILP (so still a bound) that closes windows the MILP leaves open.
    """
    from ortools.linear_solver import pywraplp

    inst = instance(data)
    n = len(inst.order)
    cost = [float(inst.cpu[v]) for v in inst.order]
    integral = all(c.is_integer() for c in cost)
    started = time.perf_counter()
    if model not in ("checkmate", "moment"):
        raise ValueError(f"model must be 'checkmate' or 'moment', not {model!r}")
    hint = None
    if warm is not None:
        hint = stages_of(inst, warm) if model == "checkmate" else moments_of(inst, warm)
    results: list[WindowBound] = []
    previous = -1
    for w, (first, last) in enumerate(spans):
        tail_until = spans[w + 1][0] if w + 1 < len(spans) else n
        if not (previous < first <= last < tail_until <= n):
            raise ValueError(f"windows must be disjoint, increasing and within 0..{n - 1}: {spans}")
        previous = last
        window = Window(first, last, tail_until)
        t0 = time.perf_counter()
        if model == "checkmate":
            solver, built = build_mip(inst, budget, backend, window)
            hinted = {**{("R", k): v for k, v in built.R.items()}, **{("S", k): v for k, v in built.S.items()}}
        else:
            solver, moments = build_moment_model(inst, budget, backend, window)
            hinted = {**{("a", k): v for k, v in moments.a.items() if not isinstance(v, int)},
                      **{("r", k): v for k, v in moments.r.items()}}
        solver.SetNumThreads(1)
        solver.SetTimeLimit(int(time_limit_s * 1000))
        if hint is not None:
            on = {("R" if model == "checkmate" else "a", k) for k in hint[0]}
            on |= {("S" if model == "checkmate" else "r", k) for k in hint[1]}
            solver.SetHint(list(hinted.values()), [1.0 if key in on else 0.0 for key in hinted])
        if log:
            solver.EnableOutput()
        status = solver.Solve()
        name = {pywraplp.Solver.OPTIMAL: "OPTIMAL", pywraplp.Solver.FEASIBLE: "FEASIBLE",
                pywraplp.Solver.INFEASIBLE: "INFEASIBLE"}.get(status, "UNKNOWN")
        if name == "INFEASIBLE":  # no schedule fits the window, so none fits the whole
            raise ValueError(f"window {window} is infeasible at {budget} B")
        raw = solver.Objective().Value() if name == "OPTIMAL" else solver.Objective().BestBound()
        bound = math.ceil(raw - 1e-6) if integral else raw
        value = solver.Objective().Value() if name in ("OPTIMAL", "FEASIBLE") else None
        results.append(WindowBound(window, name, value, bound, time.perf_counter() - t0))
        print(f"    window {first}..{last} (tail to {tail_until}): {name} best {value} bound {bound:g} "
              f"in {results[-1].solve_s:.1f} s", flush=True)
    covered = {t for first, last in spans for t in range(first, last + 1)}
    uncovered = sum(cost[t] for t in range(n) if t not in covered)
    total = sum(r.bound for r in results) + uncovered
    return LowerBound(total, results, uncovered, time.perf_counter() - started)


@dataclass
class _Moments:
    a: dict[tuple[int, int], Any]  # a[i, t]: i resident as node t is first computed (1 for i == t)
    r: dict[tuple[int, int], Any]  # r[i, t]: i computed again in stage t, before node t


def build_moment_model(inst: Instance, budget: int, backend: str = "SCIP",
                       window: Window | None = None) -> tuple[Any, _Moments]:
    """A relaxation of Checkmate's MILP that keeps memory only where it binds hardest: at the
    moment each node t is first computed (Checkmate's U[t,t]), and at each recompute.

    a[i,t] = 1 when output i is resident right after node t computes, r[i,t] = 1 when stage t
    computes i again before node t. Every schedule of build_model (meeting its "only if used"
    cuts, as an optimal one can) maps onto a point of this model at the same cost, so its optimum
    bounds Checkmate's from below:

    - node t's inputs and the sinks are resident at its moment; the moment's memory,
      sum_i mem[i] a[i,t] + mem[t], is Checkmate's U[t,t] <= budget;
    - i is resident at moment t only if it was at moment t-1 or stage t computed it again:
      a[i,t] <= a[i,t-1] + r[i,t]; computing i needs each input p resident then, which it is only
      if p was at moment t-1 (retained into stage t) or was itself computed again in the stage:
      r[i,t] <= a[p,t-1] + r[p,t];
    - at a recompute of i, its inputs and output are resident and so is every j resident at both
      moments t-1 and t that stage t did not compute again (it was never freed in between):
      b[j,t] >= a[j,t-1] + a[j,t] - 1 - r[j,t], and every j < i the stage computed again and
      still holds at moment t (a stage runs in index order): c[j,t] >= r[j,t] + a[j,t] - 1;
      sum_{j not i or an input} mem[j] (b[j,t] + c[j,t] [j < i]) + mem(i and its inputs) <=
      budget when r[i,t] = 1 (a j is never both: b needs r[j,t] = 0, c needs r[j,t] = 1);
    - the cuts Checkmate's own "only if used" cuts imply: a recompute is read in its stage or
      resident at the moment; a resident at moment t is an input of t, resident at t+1, or read
      by a recompute in stage t+1.

    What it drops: the memory between recomputes other than at their own moments, and which
    outputs a recompute chain holds together beyond one node's inputs. Objective: every node's
    cost once plus sum cost[i] r[i,t]. It has O(n^2) binaries against the MILP's O(n^3) FREE
    (its recompute rows hold O(n^3) terms). On the fixture at 0.8 the whole model does not close
    (SCIP's bound 571.5 after 28 minutes); its windows do, and prove 591.

    With ``window``, only the moments of its stages, as build_mip's windows: what is resident at
    the moment before the first is free (a[i, first-1] unconstrained), the objective is its
    stages' costs plus a tail, Z[i] >= 1 - a[i,last] when i has a reader j in last < j <
    tail_until and Z[p] >= Z[i] - a[p,last] for each input p of i (an output not resident at the
    window's last moment is not retained out of it, so a reader after it needs a recompute after
    it, whose inputs must be resident then).
    """
    solver = _linear_solver(backend)
    g = _Indexed.of(inst, budget)
    n, mem, cap, preds, succs, sinks, cost = g.n, g.mem, g.cap, g.preds, g.succs, g.sinks, g.cost
    first, last = (window.first, window.last) if window else (0, n - 1)
    moments = range(first, last + 1)
    a: dict[tuple[int, int], Any] = {}
    r: dict[tuple[int, int], Any] = {}
    for t in moments:
        for i in range(t):
            a[i, t] = solver.BoolVar(f"a{i}_{t}")
            r[i, t] = solver.BoolVar(f"r{i}_{t}")
        a[t, t] = 1
    if first > 0:  # the window's entry: whatever is resident at the moment before it is free
        a.update({(i, first - 1): solver.BoolVar(f"a{i}_{first - 1}") for i in range(first - 1)})
        a[first - 1, first - 1] = 1
    for t in moments:
        for i in range(t):
            if i in preds[t] or i in sinks:
                solver.Add(a[i, t] == 1)
            solver.Add(a[i, t] <= a[i, t - 1] + r[i, t])
            for p in preds[i]:
                solver.Add(r[i, t] <= a[p, t - 1] + r[p, t])
            solver.Add(r[i, t] <= a[i, t] + sum(r[j, t] for j in succs[i] if j < t))
            if i not in preds[t] and i not in sinks and t < last:
                solver.Add(a[i, t] <= a[i, t + 1] + sum(r[j, t + 1] for j in succs[i] if j < t + 1))
        solver.Add(sum(mem[i] * a[i, t] for i in range(t)) + mem[t] <= cap)
        if t == 0:
            continue
        through, again = {}, {}
        for j in range(t):
            through[j] = solver.NumVar(0, 1, f"b{j}_{t}")
            solver.Add(through[j] >= a[j, t - 1] + a[j, t] - 1 - r[j, t])
            again[j] = solver.NumVar(0, 1, f"c{j}_{t}")
            solver.Add(again[j] >= r[j, t] + a[j, t] - 1)
        for i in range(t):
            busy = set(preds[i]) | {i}
            held = sum(mem[k] for k in busy)
            others = [j for j in range(t) if j not in busy]
            room = sum(mem[j] for j in others) + held - cap
            if room > 0:  # else the row holds whatever is resident
                solver.Add(sum(mem[j] * through[j] for j in others)
                           + sum(mem[j] * again[j] for j in others if j < i)
                           + held <= cap + room * (1 - r[i, t]))
    objective = sum(cost[t] for t in moments) + sum(cost[i] * r[i, t] for (i, t) in r)
    if window is not None and last + 1 < n:
        tail = {i: solver.NumVar(0, 1, f"z{i}") for i in range(last + 1) if i not in sinks}
        for i, z in tail.items():
            if any(last < j < window.tail_until for j in succs[i]):
                solver.Add(z >= 1 - a[i, last])
            for p in preds[i]:
                solver.Add(tail[p] >= z - a[p, last])
        objective += sum(cost[i] * z for i, z in tail.items())
    solver.Minimize(objective)
    return solver, _Moments(a, r)


def moments_of(inst: Instance, schedule: list[list[Any]]) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """(a, r) of a replayable schedule, as build_moment_model reads them: a[i, t] when i is
    resident right after the first compute of node t, r[i, t] for a compute of i (not its first)
    before it."""
    pos = {node: i for i, node in enumerate(inst.order)}
    a: set[tuple[int, int]] = set()
    r: set[tuple[int, int]] = set()
    resident: set[int] = set()
    done = 0  # nodes first computed so far: the next is node `done` of the order
    for kind, node in schedule:
        i = pos[node]
        if kind == "free":
            resident.discard(i)
            continue
        resident.add(i)
        if i == done:
            a.update((j, i) for j in resident if j != i)
            done += 1
        else:
            r.add((i, done))
    return a, r


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


@dataclass
class LocalWindow:
    first: int
    last: int
    status: str  # CP-SAT's on the window: OPTIMAL when no cheaper schedule shares its boundaries
    cost: float  # the whole schedule's cost after the window (lower when the window improved it)
    solve_s: float


def solve_window_fixed(data: dict[str, Any], budget: int, schedule: list[list[Any]], first: int, last: int, *,
                       time_limit_s: float, workers: int = 2) -> tuple[LocalWindow, list[list[Any]]]:
    """The cheapest schedule that agrees with ``schedule`` outside stages ``first..last``: the
    MILP of :func:`build_model` with every R outside the window, and S as stage ``first`` begins
    and after stage ``last`` ends (the residents the window inherits and hands on), fixed to the
    schedule's, started from the schedule itself. Unlike a window bound this is no relaxation:
    its answer is a whole schedule (replayed before it is returned). OPTIMAL with the schedule's
    own cost says no schedule that differs from it only inside the window is cheaper."""
    inst = instance(data)
    started = time.perf_counter()
    built = build_model(inst, budget)
    r_on, s_on = stages_of(inst, schedule)
    for (t, i), var in built.R.items():
        if t < first or t > last:
            built.model.Add(var == int((t, i) in r_on))
        else:
            built.model.AddHint(var, int((t, i) in r_on))
    for (t, i), var in built.S.items():
        if t <= first or t > last:
            built.model.Add(var == int((t, i) in s_on))
        else:
            built.model.AddHint(var, int((t, i) in s_on))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = workers
    status = solver.Solve(built.model)
    name = solver.StatusName(status)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        # The schedule itself is an answer: none in the time means the solver did not get to it.
        cost = replay(inst, schedule, budget).cost
        return LocalWindow(first, last, name, cost, time.perf_counter() - started), schedule
    found = extract_schedule(inst, built, solver)
    cost, own = replay(inst, found, budget).cost, replay(inst, schedule, budget).cost
    if cost > own:  # the hint was not taken up in the time: the schedule stands
        return LocalWindow(first, last, name, own, time.perf_counter() - started), schedule
    return LocalWindow(first, last, name, cost, time.perf_counter() - started), found


def check_local(path: Path, width: int, stride: int, time_limit_s: float) -> None:
    """Re-solve every window of ``width`` stages (starting every ``stride``) of each stored best
    schedule of the fixture at ``path`` with the rest of the schedule fixed, keep any cheaper
    schedule found, and record per budget what each window showed."""
    fx = json.loads(path.read_text())
    n = len(fx["graph"]["nodes"])
    firsts = sorted({min(a, max(0, n - width)) for a in range(0, n, stride)})
    for entry in fx["budgets"]:
        schedule, budget = entry["schedule"], entry["budget_bytes"]
        windows = []
        print(f"  {entry['fraction']:.2f}, best {entry['best_cost']:g}:", flush=True)
        for first in firsts:
            window, schedule = solve_window_fixed(fx["graph"], budget, schedule, first, first + width - 1,
                                                  time_limit_s=time_limit_s)
            windows.append(window)
            print(f"    stages {window.first}..{window.last}: {window.status}, cost {window.cost:g} "
                  f"in {window.solve_s:.1f} s", flush=True)
        if windows[-1].cost < entry["best_cost"]:
            best = windows[-1].cost
            entry.update({"schedule": schedule, "best_cost": best, "gap": max(0.0, (best - entry["bound"]) / best),
                          "within_1_percent": entry["bound"] >= best / 1.01})
            if entry["bound"] >= best - 1e-9:
                entry.update({"status": "OPTIMAL", "optimal_cost": best, "bound": best})
        entry["local_check"] = {
            "how": "solve_window_fixed in bench/remat_exact.py: each window of stages re-solved (Checkmate's "
                   "MILP, CP-SAT) with the schedule fixed outside it, boundary residents included",
            "solver": f"ortools {ortools_version()} CP-SAT, 2 workers, {time_limit_s:g} s limit per window",
            "width": width, "stride": stride,
            "windows": [{"first": w.first, "last": w.last, "status": w.status, "cost": w.cost,
                         "solve_s": round(w.solve_s, 1)} for w in windows],
        }
    path.write_text(json.dumps(fx, indent=1) + "\n")
    print(f"updated {path}")


def parse_windows(specs: list[str]) -> dict[float, list[tuple[int, int]]]:
    """``["0.9=0:40", "0.8=0:45,68:82"]`` -> {0.9: [(0, 40)], 0.8: [(0, 45), (68, 82)]}."""
    out: dict[float, list[tuple[int, int]]] = {}
    for spec in specs:
        fraction, spans = spec.split("=")
        out[float(fraction)] = [(int(a), int(b)) for a, b in (span.split(":") for span in spans.split(","))]
    return out


def _record_bound(entry: dict[str, Any], bound: float) -> None:
    """Take a newly proven lower bound into a fixture entry."""
    best = entry["best_cost"]
    optimal = bound >= best - 1e-9
    entry.update({
        "status": "OPTIMAL" if optimal else "FEASIBLE (lower bound proven apart)",
        "optimal_cost": best if optimal else None,
        "bound": min(bound, best),
        "gap": max(0.0, (best - bound) / best),
        "within_1_percent": bound >= best / 1.01,
    })


def update_bounds(path: Path, specs: list[str], time_limit_s: float, log: bool, model: str = "checkmate") -> None:
    """Prove a lower bound per budget of the fixture at ``path`` with window_lower_bound on
    ``model`` and record it (status OPTIMAL where it meets the stored best cost; a stored bound
    that is higher stands)."""
    fx = json.loads(path.read_text())
    windows = parse_windows(specs)
    inst = instance(fx["graph"])
    for entry in fx["budgets"]:
        spans = windows.get(entry["fraction"])
        if not spans:
            continue
        best = entry["best_cost"]
        # The stored schedule must still replay at its cost before it is trusted as the incumbent.
        assert replay(inst, entry["schedule"], entry["budget_bytes"]).cost == best
        print(f"  {entry['fraction']:.2f} ({entry['budget_bytes']} B), best {best:g}:", flush=True)
        lb = window_lower_bound(fx["graph"], entry["budget_bytes"], spans, time_limit_s=time_limit_s,
                                warm=entry["schedule"], log=log, model=model)
        if lb.bound < entry["bound"]:  # the stored bound, and the record of how, stand
            print(f"  -> bound {lb.bound:g} below the stored {entry['bound']:g}: kept", flush=True)
            continue
        _record_bound(entry, lb.bound)
        solved_on = ("Checkmate's MILP over the window's stages, conservation rows" if model == "checkmate" else
                     "build_moment_model over the window's stages, a relaxation of Checkmate's MILP")
        entry["bound_method"] = {
            "how": f"window_lower_bound in bench/remat_exact.py: sum of proven window bounds ({solved_on}, "
                   "recompute tail) + own cost of the stages no window covers",
            "solver": f"ortools {ortools_version()} pywraplp SCIP, 1 thread, {time_limit_s:g} s limit "
                      "per window, warm-started from the stored best schedule; OMP_NUM_THREADS=1",
            "windows": [{"first": r.window.first, "last": r.window.last, "tail_until": r.window.tail_until,
                         "status": r.status, "best": r.value, "bound": r.bound, "solve_s": round(r.solve_s, 1)}
                        for r in lb.windows],
            "uncovered_stage_cost": lb.uncovered,
            "bound": lb.bound,
            "wall_s": round(lb.solve_s, 1),
        }
        print(f"  -> bound {entry['bound']:g}, gap {entry['gap']:.4%}, {entry['status']} in {lb.solve_s:.1f} s",
              flush=True)
    path.write_text(json.dumps(fx, indent=1) + "\n")
    print(f"updated {path}")


def ortools_version() -> str:
    import ortools

    return ortools.__version__


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
    parser.add_argument("--bound-windows", nargs="+", default=None, metavar="FRACTION=A:B[,A:B]",
                        help="with --update: the windows of stages whose bounds prove the lower bound")
    parser.add_argument("--update", type=Path, default=None,
                        help="fixture to update in place: per budget in --bound-windows, the proven "
                             "lower bound (window_lower_bound, SCIP 1 thread, --time-limit s per window, "
                             "warm-started from the stored best schedule); graph and schedules kept")
    parser.add_argument("--bound-model", choices=["checkmate", "moment"], default="checkmate",
                        help="with --bound-windows: solve each window on Checkmate's MILP (build_mip) or "
                             "on its moment relaxation (build_moment_model)")
    parser.add_argument("--local", default=None, metavar="WIDTH:STRIDE",
                        help="with --update: re-solve windows of WIDTH stages every STRIDE stages of each "
                             "stored schedule with the rest fixed (check_local; --time-limit s per window)")
    args = parser.parse_args(argv)
    if args.update and args.local:
        width, stride = (int(x) for x in args.local.split(":"))
        check_local(args.update, width, stride, args.time_limit)
        return
    if args.update:
        update_bounds(args.update, args.bound_windows or [], args.time_limit, args.log, args.bound_model)
        return

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
