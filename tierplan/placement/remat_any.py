"""Any op recomputed at any later point: Moccasin's retention intervals in CP-SAT.

Moccasin (Bartan et al., ICML 2023, "Moccasin: Efficient Tensor Rematerialization for Neural
Networks") searches Checkmate's space (any node re-run at any later stage, as often as pays) with
a few optional retention intervals per node instead of Checkmate's T x T grid. Here:

- The order is fixed: stage t re-runs the nodes it recomputes (in op order, a topological order),
  frees what only those re-runs read, runs op t (its first compute), then frees what nothing
  later in the interval reads. Each stage has two time slots: 2t (the re-runs) and 2t + 1 (op t),
  so that a recompute chain's inputs need not be counted while op t runs.
- Node i (one op; its bytes are its non-view output storages) has up to C intervals [s, e] of
  slots. The first starts at 2i + 1 and is always there; the others are optional, each starting
  at a recompute of i (cost: op i's time) at an even slot 2t, t > i.
- A compute of j in slot s (the first, or a recompute) needs every node it reads held in s: one
  of that node's intervals covers s. Graph outputs are held from their compute to the end.
- Device bytes: a cumulative constraint over all intervals (demand: the node's bytes) within the
  budget less the graph inputs. All intervals covering a slot are counted at once, which bounds
  Checkmate's accounting (an output occupies memory from the step computing it to the step
  freeing it; inputs and output are resident while a node computes) from above, so the schedule
  read back always replays within the budget.

Objective: the recompute time (the first computes are a constant). The model is built in
``solve_remat_any`` and read back in ``_read``.

The start: the budget is soft in the model (each byte over it costs more than all recomputes
together), so any schedule, keep-all included, is a solution to start from: CP-SAT drives the
overshoot to zero, then the recompute time down. ``plan_remat_any`` walks the budget down from
keep-all's peak in a few steps, each answer the next one's start (a lazy-recompute greedy was
tried first: its re-creation chains outgrew the budget on layered graphs with skip links). An
answer still over the budget is no plan. CP-SAT's bound covers this model's plans only (C
intervals per node, slot accounting): the solve reports it as the model's bound, never the proven
one (docs/cost-model.md, "Recompute anywhere (Moccasin)").

Which ops may be re-run: forward-phase ops whose outputs are all fresh storages (no views, so
re-running never writes into another op's storage) and neither caller-owned nor graph outputs.
Views cost no bytes: reading one needs its base's storage, i.e. the base's producer.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Mapping

from ortools.sat.python import cp_model

from tierplan.ir import PERSISTENT_KINDS, Graph, Phase
from tierplan.placement.simulate import Figures, simulate
from tierplan.plans.plan import DEVICE, Decision, Plan, Pricing, SolverReport, Step, compute, free, recompute
from tierplan.units import format_bytes

Spans = list[list[tuple[int, int]]]  # node -> its intervals [(first slot, last slot)], in order

REMAT_ANY_CPSAT = "remat-any-cpsat"  # marks a solver report as this model's (its bound is the model's)
# Retention intervals per node (the first compute's included). Measured on random layered graphs
# (2 shared cores, 55 s): at 100 nodes and 0.8 of keep-all's peak only 3 finds a plan; at 250
# nodes 3 is worse than 2 at 0.9 (+3.13% against +2.66%): the larger model improves slower.
DEFAULT_INTERVALS = 2
SMALL_GRAPH_INTERVALS = 3
SMALL_GRAPH_NODES = 150
_OVER_STEPS = 10_000  # the overshoot's resolution in the objective: this many steps up to keep-all's peak
_TIME_UNITS = 1_000_000  # the keep-all step time in the model's integer time units


@dataclass(frozen=True)
class Node:
    """One op of the order, as the interval model sees it."""

    op: str
    index: int
    nbytes: int  # its non-view output storages (freed together)
    storages: tuple[str, ...]
    reads: tuple[int, ...]  # nodes whose storages it reads (a view's base: its producer)
    recomputable: bool
    to_end: bool  # held to the end of the step (a graph output or caller-owned)
    last: int  # the last stage any compute can read it (its horizon)


@dataclass(frozen=True)
class RematProblem:
    graph: Graph
    nodes: tuple[Node, ...]
    room: int  # the budget less the bytes resident throughout (graph inputs)
    fixed_bytes: int
    seconds: tuple[float, ...]  # each node's op time

    @property
    def n(self) -> int:
        return len(self.nodes)

    def floor(self) -> int:
        """No plan peaks below this: an op with what it reads and the outputs made before it."""
        made = 0
        floor = 0
        for nd in self.nodes:
            floor = max(floor, made + nd.nbytes + sum(self.nodes[i].nbytes for i in nd.reads
                                                      if not self.nodes[i].to_end))
            made += nd.nbytes if nd.to_end else 0
        return floor


def remat_problem(graph: Graph, budget: int, op_time_s: Mapping[str, float]) -> RematProblem:
    """The nodes of ``graph`` in its op order (its capture or file order)."""
    tensors = graph.tensors
    fixed = {tensors[n].storage for n in graph.inputs}
    outputs = {tensors[n].storage for n in graph.outputs}
    producer = {}
    for index, op in enumerate(graph.ops):
        for name in op.outputs:
            if not tensors[name].is_view:
                producer[name] = index
    raw: list[tuple[str, int, tuple[str, ...], tuple[int, ...], bool, bool]] = []
    for index, op in enumerate(graph.ops):
        storages = tuple(o for o in op.outputs if not tensors[o].is_view and o not in fixed)
        needed = {tensors[n].storage for n in op.inputs}
        needed |= {tensors[o].storage for o in op.outputs if tensors[o].is_view}  # a view needs its base
        reads = tuple(sorted({producer[s] for s in needed if s in producer and s not in fixed
                              and producer[s] != index}))
        to_end = any(s in outputs or tensors[s].kind in PERSISTENT_KINDS for s in storages)
        fresh = all(not tensors[o].is_view for o in op.outputs)
        recomputable = bool(storages) and fresh and not to_end and op.phase == Phase.FORWARD
        raw.append((op.name, sum(tensors[s].nbytes for s in storages), storages, reads, recomputable, to_end))
    n = len(raw)
    readers: list[list[int]] = [[] for _ in range(n)]
    for j, item in enumerate(raw):
        for i in item[3]:
            readers[i].append(j)
    last = [0] * n
    for i in reversed(range(n)):
        _, _, _, _, _, to_end = raw[i]
        # A recomputable reader may re-run up to its own horizon and read i again there.
        last[i] = n - 1 if to_end else max([i] + [last[j] if raw[j][4] else j for j in readers[i]])
    nodes = tuple(Node(name, i, nbytes, storages, reads, rec, to_end, last[i])
                  for i, (name, nbytes, storages, reads, rec, to_end) in enumerate(raw))
    fixed_bytes = sum(tensors[s].nbytes for s in fixed)
    return RematProblem(graph, nodes, budget - fixed_bytes, fixed_bytes,
                        tuple(float(op_time_s[nd.op]) for nd in nodes))


def keep_all_spans(problem: RematProblem) -> Spans:
    """Every node held from its compute to its last reader's (keep-all)."""
    last = [2 * nd.index + 1 for nd in problem.nodes]
    for nd in problem.nodes:
        for i in nd.reads:
            last[i] = max(last[i], 2 * nd.index + 1)
    return [[(2 * nd.index + 1, 2 * problem.n - 1 if nd.to_end else last[nd.index])] for nd in problem.nodes]


def spans_peak(problem: RematProblem, spans: Spans) -> int:
    """The model's own accounting: the fullest slot's bytes held (graph inputs excluded)."""
    delta = [0] * (2 * problem.n + 1)
    for nd, mine in zip(problem.nodes, spans):
        for s, e in mine:
            delta[s] += nd.nbytes
            delta[e + 1] -= nd.nbytes
    peak = used = 0
    for d in delta[:-1]:
        used += d
        peak = max(peak, used)
    return peak


# -- the CP-SAT model: built in solve_remat_any, read back in _read ----------------------------

@dataclass
class RematSolved:
    spans: Spans | None
    status: str
    objective_s: float | None  # recompute seconds of the model's answer
    bound_s: float | None  # CP-SAT's bound on the recompute seconds of the model's plans
    solve_s: float
    fits: bool = True  # within the room (else only a start for another solve)


def solve_remat_any(problem: RematProblem, *, deadline: float, hint: Spans | None = None,
                    intervals: int = DEFAULT_INTERVALS, workers: int = 2) -> RematSolved:
    """Minimize recompute time over the interval model within ``problem.room``, from ``hint``
    (keep-all when None)."""
    started = time.perf_counter()
    nodes, n = problem.nodes, problem.n
    if problem.room < problem.floor():
        return RematSolved(None, "INFEASIBLE", None, None, time.perf_counter() - started, fits=False)
    unit_s = max(sum(problem.seconds), 1e-12) / _TIME_UNITS
    cost = [round(c / unit_s) for c in problem.seconds]
    hint = hint if hint is not None else keep_all_spans(problem)
    model = cp_model.CpModel()
    # A node nothing can read after its own stage keeps one interval (no recompute can pay).
    count = [intervals if nd.recomputable and nd.last > nd.index else 1 for nd in nodes]
    start: list[list] = []
    end: list[list] = []
    active: list[list] = []
    spans: list = []
    demands: list[int] = []
    for nd in nodes:
        i, hi = nd.index, 2 * nd.last + 1
        s_i: list = []
        e_i: list = []
        a_i: list = []
        for k in range(count[i]):
            if k == 0:
                s = model.NewConstant(2 * i + 1)
                e = model.NewConstant(2 * n - 1) if nd.to_end else model.NewIntVar(2 * i + 1, hi, f"e{i}_0")
                a = model.NewConstant(1)
            else:
                stage = model.NewIntVar(i + 1, nd.last, f"t{i}_{k}")
                s = model.NewIntVar(2 * i + 2, 2 * nd.last, f"s{i}_{k}")
                model.Add(s == 2 * stage)  # a recompute runs in a stage's first slot
                e = model.NewIntVar(2 * i + 2, hi, f"e{i}_{k}")
                a = model.NewBoolVar(f"a{i}_{k}")
                model.Add(e >= s)
                # Intervals in order, the used ones first; an unused one sits at its earliest.
                model.AddImplication(a, a_i[k - 1])
                model.Add(s >= e_i[k - 1] + 1).OnlyEnforceIf(a)
                model.Add(s == 2 * i + 2).OnlyEnforceIf(a.Not())
                model.Add(e == 2 * i + 2).OnlyEnforceIf(a.Not())
            s_i.append(s)
            e_i.append(e)
            a_i.append(a)
            if nd.nbytes:
                size = model.NewIntVar(1, 2 * n, f"z{i}_{k}")
                model.Add(size == e - s + 1)
                after = model.NewIntVar(2 * i + 2, 2 * n, f"x{i}_{k}")
                model.Add(after == e + 1)
                if k == 0:
                    spans.append(model.NewIntervalVar(s, size, after, f"I{i}_{k}"))
                else:
                    spans.append(model.NewOptionalIntervalVar(s, size, after, a, f"I{i}_{k}"))
                demands.append(nd.nbytes)
        start.append(s_i)
        end.append(e_i)
        active.append(a_i)
    # Every compute of j (first or again) reads each of its inputs held then: one of the input's
    # intervals covers that slot.
    for nd in nodes:
        j = nd.index
        for a in range(count[j]):
            for i in nd.reads:
                covers = []
                for b in range(count[i]):
                    z = model.NewBoolVar(f"c{i}_{b}>{j}_{a}")
                    model.AddImplication(z, active[i][b])
                    model.Add(start[i][b] <= start[j][a]).OnlyEnforceIf(z)
                    model.Add(end[i][b] >= start[j][a]).OnlyEnforceIf(z)
                    covers.append(z)
                if a == 0:
                    model.AddBoolOr(covers)
                else:
                    model.AddBoolOr(covers).OnlyEnforceIf(active[j][a])
    # The budget, soft: the capacity may exceed the room (up to the start's peak), each step of
    # overshoot costing more than all recomputes together.
    top = max(problem.room, spans_peak(problem, hint))
    step = max(1, -(-(top - problem.room) // _OVER_STEPS))
    over = model.NewIntVar(0, -(-(top - problem.room) // step), "over")
    capacity = model.NewIntVar(problem.room, top, "capacity")
    model.Add(capacity <= problem.room + step * over)
    model.AddCumulative(spans, demands, capacity)
    again = [(active[i][k], cost[i]) for i in range(n) for k in range(1, count[i])]
    penalty = sum(c for _, c in again) + 1
    model.Minimize(cp_model.LinearExpr.WeightedSum([v for v, _ in again] + [over],
                                                   [c for _, c in again] + [penalty]))
    for i in range(n):
        mine = hint[i]
        if len(mine) > count[i]:
            continue  # the start needs more intervals here than the model has: no hint
        if not nodes[i].to_end:
            model.AddHint(end[i][0], mine[0][1])
        for k in range(1, count[i]):
            used = k < len(mine)
            model.AddHint(active[i][k], used)
            model.AddHint(start[i][k], mine[k][0] if used else 2 * i + 2)
            model.AddHint(end[i][k], mine[k][1] if used else 2 * i + 2)
    limit = deadline - time.perf_counter()
    if limit <= 0.05:
        return RematSolved(None, "NOT_BUILT", None, None, time.perf_counter() - started, fits=False)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = limit
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = 0
    status = solver.Solve(model)
    return _read(solver, status, start, end, active, over, unit_s, time.perf_counter() - started)


def _read(solver: cp_model.CpSolver, status: int, start: list, end: list, active: list, over: cp_model.IntVar,
          unit_s: float, elapsed: float) -> RematSolved:
    """The answer's intervals and recompute seconds. CP-SAT's bound on the combined objective
    bounds the recompute time of every plan of the model within the budget (they overshoot by 0)."""
    name = solver.StatusName(status)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return RematSolved(None, name, None, None, elapsed, fits=False)
    spans: Spans = []
    for s_i, e_i, a_i in zip(start, end, active):
        spans.append([(solver.Value(s), solver.Value(e)) for s, e, a in zip(s_i, e_i, a_i) if solver.Value(a)])
    if solver.Value(over) > 0:
        # Over the budget: no plan, but a start for another solve.
        return RematSolved(spans, "INFEASIBLE" if status == cp_model.OPTIMAL else "OVER_BUDGET", None, None,
                           elapsed, fits=False)
    return RematSolved(spans, name, solver.ObjectiveValue() * unit_s, solver.BestObjectiveBound() * unit_s,
                       elapsed)


def search_remat_any(problem: RematProblem, keep_all_peak: int, *, deadline: float, steps: int = 3,
                     intervals: int | None = None, workers: int = 2) -> RematSolved:
    """The model at ``problem.room``, started from its answers at a few budgets between keep-all's
    peak and it (each a quarter of the time left): from keep-all, a budget far below its peak
    leaves CP-SAT a long way to a first plan; a step down from a plan is a short one."""
    if intervals is None:
        intervals = SMALL_GRAPH_INTERVALS if problem.n <= SMALL_GRAPH_NODES else DEFAULT_INTERVALS
    room = problem.room
    ka_room = keep_all_peak - problem.fixed_bytes
    hint: Spans | None = None
    for k in range(1, steps):
        mid = dataclasses.replace(problem, room=int(ka_room - (ka_room - room) * k / steps))
        now = time.perf_counter()
        found = solve_remat_any(mid, deadline=now + 0.25 * (deadline - now), hint=hint, intervals=intervals,
                                workers=workers)
        if found.spans is not None:
            hint = found.spans
    found = solve_remat_any(problem, deadline=deadline, hint=hint, intervals=intervals, workers=workers)
    if found.status == "INFEASIBLE" and found.spans is not None and deadline - time.perf_counter() > 1.0:
        # Proven over the budget with this many intervals per node: one more may fit it.
        found = solve_remat_any(problem, deadline=deadline, hint=found.spans, intervals=intervals + 1,
                                workers=workers)
    return found


# -- spans to a Plan --------------------------------------------------------------------------

def spans_schedule(problem: RematProblem, spans: Spans) -> list[Step]:
    """Stage t: the recomputes starting in slot 2t (in op order), the frees of intervals ending
    there, op t, the frees of intervals ending in slot 2t + 1 (never those of graph outputs)."""
    n = problem.n
    again: list[list[int]] = [[] for _ in range(n)]
    frees: list[list[int]] = [[] for _ in range(2 * n)]
    for i, mine in enumerate(spans):
        for k, (s, e) in enumerate(mine):
            if k:
                again[s // 2].append(i)
            if not problem.nodes[i].to_end:
                frees[e].append(i)
    schedule: list[Step] = []
    for t, nd in enumerate(problem.nodes):
        schedule.extend(recompute(problem.nodes[i].op) for i in sorted(again[t]))
        for i in sorted(frees[2 * t]):
            schedule.extend(free(s, DEVICE) for s in problem.nodes[i].storages)
        schedule.append(compute(nd.op))
        for i in sorted(frees[2 * t + 1]):
            schedule.extend(free(s, DEVICE) for s in problem.nodes[i].storages)
    return schedule


def spans_plan(problem: RematProblem, spans: Spans, pricing: Pricing, reference: Plan, *, method: str,
               solver: SolverReport | None = None) -> tuple[Plan, Figures]:
    """The plan of ``spans``, measured by the planner's simulator (the validator's rules)."""
    graph = problem.graph
    schedule = spans_schedule(problem, spans)
    initial = {graph.tensors[name].storage: DEVICE for name in graph.inputs}
    figures = simulate(graph, schedule, pricing, initial_tiers=initial)
    plan = Plan(
        graph=graph, schedule=schedule, capacities=dict(pricing.capacities), channels=list(pricing.channels),
        op_time_s=dict(pricing.op_time_s), initial_tiers=initial, hardware=pricing.hardware,
        training=pricing.training, peak_bytes=dict(figures.peak_bytes), predicted_time_s=figures.time_s,
        compute_time_s=figures.compute_time_s, recompute_time_s=figures.recompute_time_s,
        exposed_transfer_s=figures.exposed_transfer_s, keep_all_time_s=reference.predicted_time_s,
        keep_all_peak_bytes=reference.keep_all_peak_bytes, method=method, solver=solver,
        decisions=_decisions(problem, spans, reference),
    )
    return plan, figures


def _decisions(problem: RematProblem, spans: Spans, reference: Plan) -> dict[str, Decision]:
    out = dict(reference.decisions)
    order = problem.nodes
    for i, mine in enumerate(spans):
        if len(mine) < 2:
            continue
        held = ", ".join(f"{order[s // 2].op}..{order[e // 2].op}" for s, e in mine)
        for storage in order[i].storages:
            out[storage] = Decision("recompute", DEVICE, (
                f"computed {len(mine)} times ({len(mine) - 1} recompute(s)), held over {held}: "
                f"{format_bytes(problem.graph.tensors[storage].nbytes)} off the device in between"))
    return out
