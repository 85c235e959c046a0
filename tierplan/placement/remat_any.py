"""Any op recomputed at any later point: Moccasin's retention intervals in CP-SAT.

Moccasin (Bartan et al., ICML 2023, "Moccasin: Efficient Tensor Rematerialization for Neural
Networks") searches Checkmate's space (any node re-run at any later stage, as often as pays) with
a few optional retention intervals per node instead of Checkmate's T x T grid. Here:

- The order is fixed: stage t re-runs the nodes it recomputes (in op order, a topological order),
  frees what only those re-runs read, runs op t (its first compute), then frees what nothing
  later in the interval reads. Each stage has two time slots: 2t (the re-runs) and 2t + 1 (op t),
  so that a recompute chain's inputs need not be counted while op t runs.
- A node is a group of op u's non-view output storages that the same ops read (one node for
  most ops; train-mode batch norm has two: its output, read by the next op, and its saved
  statistics, read by the backward), so each output dies at its own last read. Node i has up to
  C intervals [s, e] of slots. The first starts at 2u + 1 and is always there; the others are
  optional, each starting at a recompute of i (cost: op u's time) at an even slot 2t, t > u. A
  re-run makes op u's other outputs too: they take scratch bytes in its slot (the schedule's
  recompute discards them; a sibling re-run in the same slot is counted there twice, bytes the
  model over-counts), and two nodes of one op re-run in one slot are one recompute: a node's
  re-run in the slot of a re-run of its op's first node costs nothing more.
- A compute of j in slot s (the first, or a recompute) needs every node it reads held in s: one
  of that node's intervals covers s. Graph outputs are held from their compute to the end.
- With a slower tier (``remat_problem(channels=)``: the nearest one), an interval after a node's
  first may be a load instead of a re-run: the node is copied to the tier after its first
  compute (once) and copied back at the interval's start; a load reads nothing, so forward
  nodes no re-run can bring back (an op with view outputs) may leave this way too. Backward
  nodes stay (the proven bound holds them on the device). A load costs its copy back, whole
  (the model does not see what hides it; the plan's simulator does), and the copy out costs
  nothing unless copies run on the compute stream (a CPU device).
- Device bytes: a cumulative constraint over all intervals (demand: the node's bytes) and the
  re-runs' scratch, within the budget less the graph inputs. All intervals covering a slot are
  counted at once, which bounds Checkmate's accounting (an output occupies memory from the step
  computing it to the step freeing it; inputs and output are resident while a node computes)
  from above, so the schedule read back always replays within the budget.

Objective: the recompute time and the loads' copy time (the first computes are a constant).
The model is built in ``solve_remat_any`` and read back in ``_read``.

The start: the budget is soft in the model (each byte over it costs more than all recomputes
together), so any schedule, keep-all included, is a solution to start from. But the overshoot
is one maximum over the order: while one place stays over, an LNS move that clears another
gains nothing, and from keep-all CP-SAT stalls a few MiB over a tight budget with the overshoot
in a dozen places (250 nodes at 0.8 of keep-all's peak: 84 MiB against 82.4 after 49 s). So
``search_remat_any`` starts CP-SAT from spans within the budget: a greedy sweep's (``_Sweep``:
slot by slot, free a held node and re-run it before its next use, its inputs held on or re-run
too), else those of a ladder of budgets walked down from keep-all's peak in small steps, each
step repaired by the sweep when it can and else solved for the overshoot alone (CP-SAT stops as
soon as it is zero). The last solve then spends what is left on the recompute time. An answer
still over the budget is no plan; the sweep's own spans are the answer when CP-SAT has none
within it. CP-SAT's bound covers this model's plans only (C intervals per node, slot
accounting): the solve reports it as the model's bound, never the proven one
(docs/cost-model.md, "Recompute anywhere (Moccasin)").

Which ops may be re-run: forward-phase ops whose outputs are all fresh storages (no views, so
re-running never writes into another op's storage) and neither caller-owned nor graph outputs.
Views cost no bytes: reading one needs its base's storage, i.e. the base's producer.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from typing import Mapping, cast

from ortools.sat.python import cp_model

from tierplan.ir import PERSISTENT_KINDS, Graph, Phase
from tierplan.placement.simulate import Figures, simulate
from tierplan.plans.plan import (
    DEVICE, Channel, Decision, Plan, Pricing, SolverReport, Step, compute, free, recompute, start_transfer,
    wait_transfer,
)
from tierplan.units import format_bytes

Spans = list[list[tuple[int, int]]]  # node -> its intervals [(first slot, last slot)], in order

REMAT_ANY_CPSAT = "remat-any-cpsat"  # marks a solver report as this model's (its bound is the model's)
# Retention intervals per node (the first compute's included). Measured on random layered graphs
# (2 shared cores, 55 s): at 100 nodes and 0.8 of keep-all's peak only 3 finds a plan; at 250
# nodes 3 is worse than 2 at 0.9 (+3.13% against +2.66%): the larger model improves slower.
DEFAULT_INTERVALS = 2
SMALL_GRAPH_INTERVALS = 3
SMALL_GRAPH_NODES = 150

_LADDER_STEP = 0.015  # of keep-all's peak: the ladder's step down
_LADDER_ROUNDS = 20  # solves per ladder step, at most
_ROUND_S = 6.0  # the longest one of them
_LADDER_SHARE = 0.8  # of the time left, spread over the ladder's steps left (the rest: the last solve)
_SWEEP_SHARE = 0.1  # of a ladder step's time, at most, for its repair by the sweep
# The first sweep (from keep-all) may take more: it is the likeliest start within the budget and
# ends when it fits or gets stuck (500 nodes at 0.9: 2 s, which 0.1 of a 17 s limit cut short).
_FIRST_SWEEP_SHARE = 0.4
GREEDY = "GREEDY"  # the status of the sweep's answer, when CP-SAT has none within the budget
FIRST_FIT = "FIRST_FIT"  # the ladder's answer (its last step's), when the last solve has none
_OVER_STEPS = 10_000  # the overshoot's resolution in the objective: this many steps up to keep-all's peak
_TIME_UNITS = 1_000_000  # the keep-all step time in the model's integer time units


@dataclass(frozen=True)
class Node:
    """A group of an op's output storages that the same ops read, as the interval model sees it:
    each group has its own intervals, so an op's outputs die at their own last reads (train-mode
    batch norm: its normalized output at the next op, its saved statistics in the backward)."""

    op: str
    index: int  # in RematProblem.nodes (in op order)
    stage: int  # its op's place in the order: first computed in slot 2 * stage + 1
    nbytes: int  # its storages' bytes
    storages: tuple[str, ...]  # non-view outputs of the op (none: an op that makes no storage)
    reads: tuple[int, ...]  # nodes its op reads (a view's base: its producer's)
    recomputable: bool
    to_end: bool  # held to the end of the step (a graph output or caller-owned)
    last: int  # the last stage any compute can read it (its horizon)
    # Bytes of the op's other outputs: a re-run of this node makes them too, scratch for that
    # slot (the schedule's recompute discards them).
    siblings: int = 0


@dataclass(frozen=True)
class RematProblem:
    graph: Graph
    nodes: tuple[Node, ...]
    room: int  # the budget less the bytes resident throughout (graph inputs)
    fixed_bytes: int
    seconds: tuple[float, ...]  # each node's op time
    # The slower tier a node may be copied to after its first compute and loaded back from, in
    # place of a re-run; per node the copy's seconds each way (``remat_problem(channels=)``).
    tier: str | None = None
    out_s: tuple[float, ...] = ()
    in_s: tuple[float, ...] = ()
    inline_copies: bool = False  # the copies run on the compute stream (nothing hides them)

    @property
    def n(self) -> int:
        return len(self.nodes)

    def can_load(self, i: int) -> bool:
        """Whether node i may be copied to the tier and loaded back: a forward op's output not held
        to the end. (The proven bound, ``placement.bound``, lets forward-made storages leave the
        device and holds the backward's: a plan that moved a backward output could beat it.)"""
        nd = self.nodes[i]
        return (self.tier is not None and nd.nbytes > 0 and not nd.to_end
                and self.graph.ops[nd.stage].phase == Phase.FORWARD)

    @property
    def stages(self) -> int:
        """Ops in the order: the model has two slots per stage."""
        return len(self.graph.ops)

    @functools.cached_property
    def stage_nodes(self) -> tuple[tuple[int, ...], ...]:
        """The nodes of each stage's op, in order."""
        of_stage: list[list[int]] = [[] for _ in range(self.stages)]
        for nd in self.nodes:
            of_stage[nd.stage].append(nd.index)
        return tuple(map(tuple, of_stage))

    @functools.cached_property
    def first_sibling(self) -> tuple[int | None, ...]:
        """Per node, the first node of its op when that is another node (None for the first and
        for an op's only node): a re-run of both in one slot is one recompute of the op."""
        firsts = [self.stage_nodes[nd.stage][0] for nd in self.nodes]
        return tuple(None if first == i else first for i, first in enumerate(firsts))

    @functools.cached_property
    def stage_reads(self) -> tuple[tuple[int, ...], ...]:
        """The nodes each stage's op reads."""
        reads: list[tuple[int, ...]] = [() for _ in range(self.stages)]
        for nd in self.nodes:
            reads[nd.stage] = nd.reads
        return tuple(reads)

    def floor(self) -> int:
        """No plan peaks below this: an op with what it reads and the outputs made before it."""
        made = [0] * self.stages
        out = [0] * self.stages
        for nd in self.nodes:
            out[nd.stage] += nd.nbytes
            made[nd.stage] += nd.nbytes if nd.to_end else 0
        floor = 0
        before = 0
        for t in range(self.stages):
            floor = max(floor, before + out[t] + sum(self.nodes[i].nbytes for i in self.stage_reads[t]
                                                     if not self.nodes[i].to_end))
            before += made[t]
        return floor

    def to_end_held(self) -> list[int]:
        """The bytes of the nodes held to the end, by slot."""
        held = [0] * (2 * self.stages)
        for nd in self.nodes:
            if nd.to_end:
                held[2 * nd.stage + 1] += nd.nbytes
        for slot in range(1, len(held)):
            held[slot] += held[slot - 1]
        return held


def remat_problem(graph: Graph, budget: int, op_time_s: Mapping[str, float], *,
                  channels: tuple[Channel, Channel] | None = None) -> RematProblem:
    """The nodes of ``graph`` in its op order (its capture or file order): per op, one node per
    group of its output storages read by the same ops (one node with no bytes when it makes no
    storage). ``channels``: the copies to a slower tier and back (device -> tier, tier ->
    device), which a node may take instead of a re-run."""
    tensors = graph.tensors
    fixed = {tensors[n].storage for n in graph.inputs}
    outputs = {tensors[n].storage for n in graph.outputs}
    made_by: dict[str, int] = {}  # storage -> the stage making it
    for t, op in enumerate(graph.ops):
        for name in op.outputs:
            if not tensors[name].is_view and name not in fixed:
                made_by[name] = t
    needs: list[set[str]] = []  # per stage: the storages its op reads (made by earlier ops)
    read_by: dict[str, set[int]] = {s: set() for s in made_by}
    for t, op in enumerate(graph.ops):
        needed = {tensors[n].storage for n in op.inputs}
        needed |= {tensors[o].storage for o in op.outputs if tensors[o].is_view}  # a view needs its base
        needed = {s for s in needed if s in made_by and made_by[s] != t}
        needs.append(needed)
        for s in needed:
            read_by[s].add(t)
    producer: dict[str, int] = {}  # storage -> its node
    raw: list[tuple[int, tuple[str, ...], bool, bool]] = []  # (stage, storages, recomputable, to_end)
    for t, op in enumerate(graph.ops):
        storages = [o for o in op.outputs if o in made_by]
        persistent = {s for s in storages if s in outputs or tensors[s].kind in PERSISTENT_KINDS}
        fresh = all(not tensors[o].is_view for o in op.outputs)
        recomputable = bool(storages) and fresh and not persistent and op.phase == Phase.FORWARD
        groups: dict[tuple[bool, frozenset[int]], list[str]] = {}
        for s in storages:
            groups.setdefault((s in persistent, frozenset(read_by[s])), []).append(s)
        for (to_end, _), members in groups.items() if groups else [((False, frozenset()), [])]:
            for s in members:
                producer[s] = len(raw)
            raw.append((t, tuple(members), recomputable, to_end))
    stage_bytes = [0] * len(graph.ops)
    for t, members, _, _ in raw:
        stage_bytes[t] += sum(tensors[s].nbytes for s in members)
    n = len(raw)
    reads = [tuple(sorted({producer[s] for s in needs[t]})) for t, _, _, _ in raw]
    readers: list[list[int]] = [[] for _ in range(n)]
    for j in range(n):
        for i in reads[j]:
            readers[i].append(j)
    stages = len(graph.ops)
    last = [0] * n
    for i in reversed(range(n)):
        t, _, _, to_end = raw[i]
        # A recomputable reader may re-run up to its own horizon and read i again there.
        last[i] = stages - 1 if to_end else max([t] + [last[j] if raw[j][2] else raw[j][0] for j in readers[i]])
    nodes = []
    for i, (t, members, recomputable, to_end) in enumerate(raw):
        nbytes = sum(tensors[s].nbytes for s in members)
        nodes.append(Node(graph.ops[t].name, i, t, nbytes, members, reads[i], recomputable, to_end, last[i],
                          stage_bytes[t] - nbytes))
    fixed_bytes = sum(tensors[s].nbytes for s in fixed)
    copies: dict = {}
    if channels is not None:
        out, back = channels
        copies = dict(tier=out.dst, out_s=tuple(out.seconds(nd.nbytes) for nd in nodes),
                      in_s=tuple(back.seconds(nd.nbytes) for nd in nodes), inline_copies=out.inline or back.inline)
    return RematProblem(graph, tuple(nodes), budget - fixed_bytes, fixed_bytes,
                        tuple(float(op_time_s[nd.op]) for nd in nodes), **copies)


def keep_all_spans(problem: RematProblem) -> Spans:
    """Every node held from its compute to its last reader's (keep-all)."""
    last = [2 * nd.stage + 1 for nd in problem.nodes]
    for nd in problem.nodes:
        for i in nd.reads:
            last[i] = max(last[i], 2 * nd.stage + 1)
    return [[(2 * nd.stage + 1, 2 * problem.stages - 1 if nd.to_end else last[nd.index])] for nd in problem.nodes]


def spans_peak(problem: RematProblem, spans: Spans, reloads: frozenset[tuple[int, int]] = frozenset()) -> int:
    """The model's own accounting: the fullest slot's bytes held (graph inputs excluded)."""
    return max(spans_held(problem, spans, reloads), default=0)


def spans_recompute_s(problem: RematProblem, spans: Spans, reloads: frozenset[tuple[int, int]] = frozenset()) -> float:
    """The seconds the recomputes of ``spans`` take (each interval after a node's first that is
    no load; a node re-run in the slot of its op's first node's re-run is that one recompute)."""
    def rerun_slots(i: int) -> set[int]:
        return {spans[i][k][0] for k in range(1, len(spans[i])) if (i, k) not in reloads}

    total = 0.0
    for i in range(len(spans)):
        slots = rerun_slots(i)
        first = problem.first_sibling[i]
        if first is not None:
            slots -= rerun_slots(first)
        total += problem.seconds[i] * len(slots)
    return total


def spans_held(problem: RematProblem, spans: Spans, reloads: frozenset[tuple[int, int]] = frozenset()) -> list[int]:
    """The bytes held in each slot, in the model's accounting (graph inputs excluded)."""
    delta = [0] * (2 * problem.stages + 1)
    for nd, mine in zip(problem.nodes, spans):
        for k, (s, e) in enumerate(mine):
            delta[s] += nd.nbytes
            delta[e + 1] -= nd.nbytes
            if k and (nd.index, k) not in reloads:  # a re-run makes the op's other outputs too, for its slot
                delta[s] += nd.siblings
                delta[s + 1] -= nd.siblings
    held = []
    used = 0
    for d in delta[:-1]:
        used += d
        held.append(used)
    return held


# -- the CP-SAT model: built in solve_remat_any, read back in _read ----------------------------

@dataclass
class RematSolved:
    spans: Spans | None  # with fits False: the lowest-peak spans seen, over the room (or None)
    status: str
    objective_s: float | None  # recompute (and exposed copy) seconds of the model's answer
    bound_s: float | None  # CP-SAT's bound on the same, over the model's plans
    solve_s: float
    fits: bool = True  # within the room (else only a start for another solve)
    reloads: frozenset[tuple[int, int]] = frozenset()  # (node, interval): loaded from the tier, not re-run


@dataclass
class _Intervals:
    """The model's variables per node and interval (k = 0: the first compute)."""

    start: list[list] = dataclasses.field(default_factory=list)
    end: list[list] = dataclasses.field(default_factory=list)
    active: list[list] = dataclasses.field(default_factory=list)
    load: list[list] = dataclasses.field(default_factory=list)  # None where the interval cannot be a load
    rerun: list[list] = dataclasses.field(default_factory=list)  # None where it cannot be a re-run


def solve_remat_any(problem: RematProblem, *, deadline: float, hint: Spans | None = None,
                    intervals: int = DEFAULT_INTERVALS, workers: int = 2, first_fit: bool = False,
                    seed: int = 0, loads: bool = True) -> RematSolved:
    """Minimize recompute time (and, with a tier, exposed copy time) over the interval model
    within ``problem.room``, from ``hint`` (keep-all when None); ``first_fit``: minimize the
    overshoot alone (a start for another solve). ``loads``: intervals may be loads from
    ``problem.tier`` (when it has one)."""
    started = time.perf_counter()
    nodes, stages = problem.nodes, problem.stages
    if problem.room < problem.floor():
        return RematSolved(None, "INFEASIBLE", None, None, time.perf_counter() - started, fits=False)
    unit_s = max(sum(problem.seconds), 1e-12) / _TIME_UNITS
    cost = [round(c / unit_s) for c in problem.seconds]
    hint = hint if hint is not None else keep_all_spans(problem)
    model = cp_model.CpModel()
    count = interval_counts(problem, intervals)
    v = _Intervals()
    spans: list = []
    demands: list[int] = []
    again: list[tuple[cp_model.IntVar, int]] = []  # (literal, cost) of every re-run or exposed copy
    shared: list[tuple[cp_model.IntVar, int]] = []  # (literal, cost given back) of a sibling's re-run
    for nd in nodes:
        i, first, hi = nd.index, 2 * nd.stage + 1, 2 * nd.last + 1
        loadable = loads and problem.can_load(i)
        s_i: list = []
        e_i: list = []
        a_i: list = []
        l_i: list = []
        r_i: list = []
        for k in range(count[i]):
            load = rerun = None
            if k == 0:
                s = model.NewConstant(first)
                e = model.NewConstant(2 * stages - 1) if nd.to_end else model.NewIntVar(first, hi, f"e{i}_0")
                a = model.NewConstant(1)
            else:
                stage = model.NewIntVar(nd.stage + 1, nd.last, f"t{i}_{k}")
                s = model.NewIntVar(first + 1, 2 * nd.last, f"s{i}_{k}")
                model.Add(s == 2 * stage)  # a recompute (or load) starts in a stage's first slot
                e = model.NewIntVar(first + 1, hi, f"e{i}_{k}")
                a = model.NewBoolVar(f"a{i}_{k}")
                model.Add(e >= s)
                # Intervals in order, the used ones first; an unused one sits at its earliest.
                model.AddImplication(a, a_i[k - 1])
                model.Add(s >= e_i[k - 1] + 1).OnlyEnforceIf(a)
                model.Add(s == first + 1).OnlyEnforceIf(a.Not())
                model.Add(e == first + 1).OnlyEnforceIf(a.Not())
                rerun = a
                if loadable:
                    load = model.NewBoolVar(f"l{i}_{k}")
                    rerun = model.NewBoolVar(f"r{i}_{k}") if nd.recomputable else None
                    if rerun is None:
                        model.Add(load == a)
                    else:
                        model.Add(load + rerun == a)
                if rerun is not None:
                    again.append((rerun, cost[i]))
                    if nd.siblings:  # the op's other outputs, made again with it: scratch for the slot
                        spans.append(model.NewOptionalIntervalVar(s, 1, s + 1, rerun, f"X{i}_{k}"))
                        demands.append(nd.siblings)
            s_i.append(s)
            e_i.append(e)
            a_i.append(a)
            l_i.append(load)
            r_i.append(rerun)
            if nd.nbytes:
                size = model.NewIntVar(1, 2 * stages, f"z{i}_{k}")
                model.Add(size == e - s + 1)
                after = model.NewIntVar(first + 1, 2 * stages, f"x{i}_{k}")
                model.Add(after == e + 1)
                if k == 0:
                    spans.append(model.NewIntervalVar(s, size, after, f"I{i}_{k}"))
                else:
                    spans.append(model.NewOptionalIntervalVar(s, size, after, a, f"I{i}_{k}"))
                demands.append(nd.nbytes)
        v.start.append(s_i)
        v.end.append(e_i)
        v.active.append(a_i)
        v.load.append(l_i)
        v.rerun.append(r_i)
    # Every compute of j (first or again) reads each of its inputs held then: one of the input's
    # intervals covers that slot (an op's first compute once, for the first of its nodes).
    for nd in nodes:
        j = nd.index
        for a in range(count[j]):
            if a == 0 and problem.first_sibling[j] is not None:
                continue
            if a and v.load[j][a] is not None and not nd.recomputable:
                continue  # only ever loaded: it reads nothing
            for i in nd.reads:
                covers = []
                for b in range(count[i]):
                    z = model.NewBoolVar(f"c{i}_{b}>{j}_{a}")
                    model.AddImplication(z, v.active[i][b])
                    model.Add(v.start[i][b] <= v.start[j][a]).OnlyEnforceIf(z)
                    model.Add(v.end[i][b] >= v.start[j][a]).OnlyEnforceIf(z)
                    covers.append(z)
                if a == 0:
                    model.AddBoolOr(covers)
                elif v.load[j][a] is None:
                    model.AddBoolOr(covers).OnlyEnforceIf(v.active[j][a])
                else:  # a re-run reads its inputs; a load does not
                    model.AddBoolOr(covers + [v.load[j][a]]).OnlyEnforceIf(v.active[j][a])
    # Two nodes of one op re-run in one slot are one recompute: a node's re-run in the slot of a
    # re-run of its op's first node gives its cost back.
    for j, f in enumerate(problem.first_sibling):
        if f is None:
            continue
        for k, r_jk in enumerate(v.rerun[j]):
            for m, r_fm in enumerate(v.rerun[f]):
                if r_jk is None or r_fm is None:  # a first compute, or an interval only ever loaded
                    continue
                both = model.NewBoolVar(f"one{j}_{k}={f}_{m}")
                model.AddImplication(both, r_jk)
                model.AddImplication(both, r_fm)
                model.Add(v.start[j][k] == v.start[f][m]).OnlyEnforceIf(both)
                shared.append((both, cost[j]))
    # A load costs its copy back, whole: the model does not see what hides it (the plan's
    # simulator does). The copy to the tier, after the node's first compute, is on another
    # queue than the compute, except where copies run on the compute stream.
    copies: list[cp_model.IntVar] = []
    for i, l_i in enumerate(v.load):
        loads_i = [x for x in l_i if x is not None]
        if not loads_i:
            continue
        again.extend((x, max(1, round(problem.in_s[i] / unit_s))) for x in loads_i)
        copied = model.NewBoolVar(f"out{i}")
        for x in loads_i:
            model.AddImplication(x, copied)
        copies.append(copied)
        if problem.inline_copies:
            again.append((copied, max(1, round(problem.out_s[i] / unit_s))))
    # The budget, soft: the capacity may exceed the room (up to the start's peak), each step of
    # overshoot costing more than all recomputes together.
    top = max(problem.room, spans_peak(problem, hint))
    step = max(1, -(-(top - problem.room) // _OVER_STEPS))
    over = model.NewIntVar(0, -(-(top - problem.room) // step), "over")
    capacity = model.NewIntVar(problem.room, top, "capacity")
    model.Add(capacity <= problem.room + step * over)
    model.AddCumulative(spans, demands, capacity)
    penalty = sum(c for _, c in again) + 1
    if first_fit:
        # The overshoot alone: CP-SAT stops at the first answer within the room (proven optimal),
        # and no LNS move is spent on recompute time while over (with both, a ladder step at
        # 250 nodes and 0.8 stalled 1 MiB over for 20 s; alone it reached the room in 3 s).
        model.Minimize(over)
    else:
        model.Minimize(cp_model.LinearExpr.WeightedSum([x for x, _ in again + shared] + [over],
                                                       [c for _, c in again] + [-c for _, c in shared] + [penalty]))
    for i in range(problem.n):
        mine = hint[i]
        if len(mine) > count[i]:
            continue  # the start needs more intervals here than the model has: no hint
        if not nodes[i].to_end:
            model.AddHint(v.end[i][0], mine[0][1])
        for k in range(1, count[i]):
            used = k < len(mine)
            model.AddHint(v.active[i][k], used)
            model.AddHint(v.start[i][k], mine[k][0] if used else 2 * nodes[i].stage + 2)
            model.AddHint(v.end[i][k], mine[k][1] if used else 2 * nodes[i].stage + 2)
            if v.load[i][k] is not None:  # the start re-runs (the sweep and the ladder never load)
                model.AddHint(v.load[i][k], False)
                if v.rerun[i][k] is not None:
                    model.AddHint(v.rerun[i][k], used)
    for copied in copies:
        model.AddHint(copied, False)
    limit = deadline - time.perf_counter()
    if limit <= 0.05:
        return RematSolved(None, "NOT_BUILT", None, None, time.perf_counter() - started, fits=False)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = limit
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    if first_fit:
        # No LP: it only bounds the recompute time, which a step's first answer does not need
        # (measured: from a ladder step at 85.6 MiB of 250 nodes' 0.8, 82 MiB in 21 s against
        # none in 30 s with it).
        solver.parameters.linearization_level = 0
    status = solver.Solve(model)
    return _read(solver, status, v, over, unit_s, time.perf_counter() - started)


def _read(solver: cp_model.CpSolver, status: int, v: _Intervals, over: cp_model.IntVar, unit_s: float,
          elapsed: float) -> RematSolved:
    """The answer's intervals, its loads and its objective seconds. CP-SAT's bound on the
    combined objective bounds that of every plan of the model within the budget (they overshoot
    by 0)."""
    name = solver.StatusName(status)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return RematSolved(None, name, None, None, elapsed, fits=False)
    spans: Spans = []
    reloads: set[tuple[int, int]] = set()
    for i, (s_i, e_i, a_i, l_i) in enumerate(zip(v.start, v.end, v.active, v.load)):
        mine = []
        for s, e, a, load in zip(s_i, e_i, a_i, l_i):
            if solver.Value(a):
                if load is not None and solver.Value(load):
                    reloads.add((i, len(mine)))
                mine.append((solver.Value(s), solver.Value(e)))
        spans.append(mine)
    if solver.Value(over) > 0:
        # Over the budget: no plan, but a start for another solve.
        return RematSolved(spans, "INFEASIBLE" if status == cp_model.OPTIMAL else "OVER_BUDGET", None, None,
                           elapsed, fits=False, reloads=frozenset(reloads))
    return RematSolved(spans, name, solver.ObjectiveValue() * unit_s, solver.BestObjectiveBound() * unit_s,
                       elapsed, reloads=frozenset(reloads))


def search_remat_any(problem: RematProblem, keep_all_peak: int, *, deadline: float,
                     intervals: int | None = None, workers: int = 2) -> RematSolved:
    """The model at ``problem.room``, started from spans within it: the greedy sweep's, else the
    first answers of a ladder of budgets from keep-all's peak down to it. From spans over the
    budget, CP-SAT may spend the whole limit on the overshoot (its soft budget is one maximum:
    while one place stays over, clearing another gains nothing); from spans within it, the time
    goes to the recompute time. When the last solve ends with nothing within the budget, the start
    is the answer when it is within it (the sweep's, or the ladder's last step: a hint CP-SAT did
    not complete in the time left; 250 nodes at 0.8 of the peak lost its ladder answer so in one
    run of three). With nothing within the budget (``fits`` False), the answer's spans are the
    lowest-peak ones seen, over the budget: the caller reports how close the search came."""
    if intervals is None:
        intervals = SMALL_GRAPH_INTERVALS if problem.n <= SMALL_GRAPH_NODES else DEFAULT_INTERVALS
    now = time.perf_counter()
    greedy = greedy_spans(problem, intervals, deadline=now + _FIRST_SWEEP_SHARE * (deadline - now))
    hint = greedy if greedy is not None else _ladder(problem, keep_all_peak, deadline, intervals, workers)
    found = solve_remat_any(problem, deadline=deadline, hint=hint, intervals=intervals, workers=workers)
    if found.status == "INFEASIBLE" and found.spans is not None and deadline - time.perf_counter() > 1.0:
        # Proven over the budget with this many intervals per node: one more may fit it.
        found = solve_remat_any(problem, deadline=deadline, hint=found.spans, intervals=intervals + 1,
                                workers=workers)
    if found.fits or hint is None or spans_faults(problem, hint):
        return found
    # (The sweep and the ladder re-run; they never load.)
    if spans_peak(problem, hint) <= problem.room:
        status = GREEDY if hint is greedy else FIRST_FIT
        return RematSolved(hint, status, spans_recompute_s(problem, hint), None, found.solve_s)
    if found.spans is None or spans_peak(problem, hint) < spans_peak(problem, found.spans, found.reloads):
        # Nothing within the budget: the answer carries the lowest spans seen (the ladder's last
        # step may peak lower than the last solve's answer), to say how close the search came.
        return dataclasses.replace(found, spans=hint, reloads=frozenset())
    return found


def _ladder(problem: RematProblem, keep_all_peak: int, deadline: float, intervals: int,
            workers: int) -> Spans | None:
    """Spans for ``problem.room`` (within it when the walk gets there): the room walked down from
    keep-all's peak in steps of _LADDER_STEP of it, each step started from the last one's
    spans, repaired by the sweep when it can, else solved for the overshoot alone until it is
    zero (a step from spans within the last one is short; the optimum at a step is not needed)."""
    ka_room = keep_all_peak - problem.fixed_bytes
    steps = max(1, math.ceil((ka_room - problem.room) / (_LADDER_STEP * keep_all_peak)))
    hint: Spans | None = None
    for k in range(1, steps + 1):
        room = problem.room if k == steps else int(ka_room - (ka_room - problem.room) * k / steps)
        step = dataclasses.replace(problem, room=room)
        # The last step gets most of what is left: a plan within the budget comes first.
        step_end = time.perf_counter() + _LADDER_SHARE * (deadline - time.perf_counter()) / (steps - k + 1)
        for attempt in range(_LADDER_ROUNDS):
            now = time.perf_counter()
            if hint is not None:
                repaired = greedy_spans(step, intervals, start=hint, deadline=now + _SWEEP_SHARE * (step_end - now))
                if repaired is not None:
                    hint = repaired
                    break
            if step_end - time.perf_counter() < 0.1:
                break
            # Rounds of at most _ROUND_S, each from the last answer with a fresh seed: another
            # chance for the sweep in between, and a restart for an LNS stuck over the room.
            found = solve_remat_any(step, deadline=min(step_end, now + _ROUND_S), hint=hint, intervals=intervals,
                                    workers=workers, first_fit=True, seed=attempt, loads=False)
            if found.spans is not None:
                # The overshoot alone leaves holds past their last use and re-runs nothing
                # reads: trimmed, they leave the next step room.
                hint = tidy_spans(step, found.spans)
            if found.fits:
                break
    return hint


# -- a constructive start: the greedy sweep ----------------------------------------------------

SPLIT, MOVE, TRIM, EXTEND, PULL, ADD = "split", "move", "trim", "extend", "pull", "add"
_RERUNS = (SPLIT, MOVE, PULL, ADD)  # the changes that compute a node in their slot
_SWEEP_SLOTS = 24  # re-run slots the sweep tries per cut, from the next use back
_SWEEP_BANS = 2_000  # the sweep's step-backs before it gives up
_SWEEP_DEPTHS = (0, 1, 1_000_000)  # levels of inputs re-run (rather than held on) that a cut tries
_RIDERS = -1  # the depth of a cut that only holds on inputs already held at its slot


@dataclass(frozen=True)
class _Change:
    """One edit of node ``node``'s interval ``k``: SPLIT (held to ``end``, re-run at ``slot``),
    MOVE (its re-run, unread before, goes to ``slot``), TRIM (held to ``slot`` only), EXTEND (held
    on to ``slot``), PULL (its later re-run moves up to ``slot``), ADD (a re-run held in ``slot``
    alone)."""

    kind: str
    node: int
    k: int
    slot: int
    end: int = -1


@dataclass
class _Cut:
    """The changes that free nodes at a slot x, and what they cost."""

    changes: list[_Change] = dataclasses.field(default_factory=list)
    seconds: float = 0.0  # re-run
    freed: int = 0  # bytes of the nodes freed at x
    at_x: int = 0  # bytes of inputs held on over x instead
    behind: dict[int, int] = dataclasses.field(default_factory=dict)  # bytes it adds (frees: < 0) before x
    had: set[tuple[int, int]] = dataclasses.field(default_factory=set)  # (input, slot) held or re-run there
    reach: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)  # (node, k) -> held to
    added: dict[int, int] = dataclasses.field(default_factory=dict)  # node -> its intervals added

    def copy(self) -> _Cut:
        return _Cut(list(self.changes), self.seconds, self.freed, self.at_x, dict(self.behind), set(self.had),
                    dict(self.reach), dict(self.added))

    def shift(self, first: int, x: int, nbytes: int) -> None:
        """Count ``nbytes`` more in the slots from ``first`` up to x (not included)."""
        for slot in range(first, x):
            self.behind[slot] = self.behind.get(slot, 0) + nbytes

    def score(self) -> tuple[float, int]:
        """Bytes freed at x per second re-run; among equals, the latest re-run (freed longest)."""
        net = self.freed - self.at_x
        return (net / self.seconds if self.seconds > 0 else math.inf * net, self.changes[0].slot)


def interval_counts(problem: RematProblem, intervals: int) -> list[int]:
    """Intervals per node in the model: one for a node nothing can read after its own stage (no
    recompute can pay)."""
    return [intervals if (nd.recomputable or problem.can_load(nd.index)) and nd.last > nd.stage else 1
            for nd in problem.nodes]


def greedy_spans(problem: RematProblem, intervals: int = DEFAULT_INTERVALS, *, start: Spans | None = None,
                 deadline: float | None = None) -> Spans | None:
    """Spans within ``problem.room`` (the model's accounting) and ``intervals`` per node, built by
    a sweep from ``start`` (keep-all when None), or None when the sweep gets stuck."""
    if problem.room < problem.floor():
        return None
    start = keep_all_spans(problem) if start is None else start
    counts = [max(c, len(mine)) for c, mine in zip(interval_counts(problem, intervals), start)]
    sweep = _Sweep(problem, start, counts)
    if not sweep.fit(problem.room, math.inf if deadline is None else deadline):
        return None
    spans = sweep.tidy()
    return spans if spans_peak(problem, spans) <= problem.room and not spans_faults(problem, spans) else None


def tidy_spans(problem: RematProblem, spans: Spans) -> Spans:
    """``spans`` without re-runs nothing reads and with each interval held only to its last use."""
    return _Sweep(problem, spans, [len(mine) for mine in spans]).tidy()


def spans_faults(problem: RematProblem, spans: Spans, reloads: frozenset[tuple[int, int]] = frozenset()) -> list[str]:
    """What makes ``spans`` (with ``reloads``, its intervals that are loads) no answer of the
    model (any interval count): a misplaced interval, or a compute whose input is not held in its
    slot."""
    faults = []
    for nd, mine in zip(problem.nodes, spans):
        i = nd.index
        if not mine or mine[0][0] != 2 * nd.stage + 1 or (nd.to_end and mine[0][1] != 2 * problem.stages - 1):
            faults.append(f"node {i}: first interval {mine[:1]}")
        for k, (s, e) in enumerate(mine):
            load = (i, k) in reloads
            if e < s or e > 2 * nd.last + 1 or (k and (s % 2 or s <= mine[k - 1][1])) \
                    or (k and not (problem.can_load(i) if load else nd.recomputable)):
                faults.append(f"node {i}: interval {k} {(s, e)}")
            if load:
                continue  # a load reads nothing
            for p in nd.reads:
                if not _covers(spans[p], s):
                    faults.append(f"node {i} computes in slot {s} without node {p}")
    return faults


def _covers(mine: list[tuple[int, int]], slot: int) -> bool:
    return any(s <= slot <= e for s, e in mine)


class _Sweep:
    """Spans cut down to the room slot by slot, the model's bytes per slot kept in ``used``.

    At a slot x over the room, a cut frees a held node after its last use before x and re-runs it
    before its next use, where its inputs are had: held on when they are held at x anyway (bytes
    after x only), else held on from their last use (bytes at x: a cut of a big node that reads
    small ones) or re-run there too (a few levels deep). Nodes that then need nothing more are
    freed with it (two big nodes reading one small one). The cut with the most bytes freed at x
    per second re-run is made. Every change lands after x, or before it only within the room, so
    the slots behind stay within it. Stuck (nothing left to free at x), the sweep goes back to the
    latest cut that added bytes at x and bans its choice.
    """

    def __init__(self, problem: RematProblem, spans: Spans, counts: list[int]) -> None:
        self.problem = problem
        self.nodes = problem.nodes
        self.counts = counts
        self.readers: list[list[int]] = [[] for _ in range(problem.n)]
        for nd in self.nodes:
            for i in nd.reads:
                self.readers[i].append(nd.index)
        self.to_end = problem.to_end_held()  # bytes of the nodes held to the end, by slot
        self.reset(spans)

    def reset(self, spans: Spans) -> None:
        self.spans = [list(mine) for mine in spans]
        self.used = [0] * (2 * self.problem.stages)
        self.starts: list[set[int]] = [set() for _ in self.used]  # the nodes computed in each slot
        for i, mine in enumerate(self.spans):
            for s, e in mine:
                self._hold(i, s, e, 1)

    def _hold(self, i: int, s: int, e: int, sign: int) -> None:
        for slot in range(s, e + 1):
            self.used[slot] += sign * self.nodes[i].nbytes
        if s % 2 == 0:  # a re-run (first computes are in odd slots) makes the op's other outputs too
            self.used[s] += sign * self.nodes[i].siblings
        if sign > 0:
            self.starts[s].add(i)
        else:
            self.starts[s].discard(i)

    def covering(self, i: int, slot: int) -> int | None:
        return next((k for k, (s, e) in enumerate(self.spans[i]) if s <= slot <= e), None)

    def uses(self, i: int) -> list[int]:
        """The slots at which a compute of a reader (first or again) reads node i, in order."""
        return sorted(s for j in self.readers[i] for s, _ in self.spans[j])

    def busy(self, slot: int, also: set[int] = frozenset()) -> set[int]:
        """What no cut frees at ``slot``: the nodes computed there (and ``also``) and their inputs."""
        computed = self.starts[slot] | also
        return computed | {i for j in computed for i in self.nodes[j].reads}

    def floor(self, r: int, also: set[int]) -> int:
        """The bytes no cut frees at re-run slot r (with ``also`` re-run there too): the busy
        nodes, the inputs of the op in the next slot, the outputs held to the end, the scratch of
        the re-runs there (their ops' other outputs)."""
        held = self.busy(r, also) | set(self.problem.stage_reads[r // 2])
        scratch = sum(self.nodes[j].siblings for j in self.starts[r] | also)
        return sum(self.nodes[j].nbytes for j in held if not self.nodes[j].to_end) + scratch + self.to_end[r]

    def fit(self, room: int, deadline: float) -> bool:
        trail: list[tuple[int, _Cut, Spans]] = []  # (slot, cut made there, the spans before it)
        bans: set[tuple[int, int, int]] = set()  # (slot, node cut, re-run slot) not to choose again
        x = 0
        while x < len(self.used):
            if self.used[x] <= room:
                x += 1
                continue
            if time.perf_counter() > deadline:
                return False
            cut = self.best_cut(x, room, bans)
            if cut is not None:
                trail.append((x, cut, [list(mine) for mine in self.spans]))
                self.apply(cut)
                continue
            if len(bans) >= _SWEEP_BANS:
                return False
            after = self.spans
            for j in reversed(range(len(trail))):
                slot, culprit, before = trail[j]
                if any(_covers(after[c.node], x) and not _covers(before[c.node], x) for c in culprit.changes):
                    break
                after = before
            else:
                return False  # over the room with no cut's doing
            first = culprit.changes[0]
            bans.add((slot, first.node, first.slot))
            del trail[j:]
            self.reset(before)
            x = slot
        return True

    def best_cut(self, x: int, room: int, bans: set[tuple[int, int, int]]) -> _Cut | None:
        busy = self.busy(x)
        best: _Cut | None = None
        for nd in self.nodes:
            if nd.index in busy or not nd.nbytes or nd.to_end or self.covering(nd.index, x) is None:
                continue
            for depth in _SWEEP_DEPTHS:
                cut = self.free(_Cut(), nd.index, x, room, bans, depth)
                if cut is not None and depth == 0 and cut.at_x:
                    cut = self.riders(cut, nd.index, x, room, bans, busy)
                    if any(self.used[slot] + more > room for slot, more in cut.behind.items() if more > 0):
                        cut = None
                if cut is not None and cut.freed > cut.at_x and (best is None or cut.score() > best.score()):
                    best = cut
                if cut is not None and cut.changes[0].kind == TRIM:
                    break
        return best

    def riders(self, cut: _Cut, i: int, x: int, room: int, bans: set[tuple[int, int, int]],
               busy: set[int]) -> _Cut:
        """``cut`` with the other nodes held at x freed too whose inputs it holds on anyway."""
        held = {c.node for c in cut.changes if c.kind == EXTEND}
        for j in sorted({j for p in held for j in self.readers[p]} - busy - {i}):
            if self.nodes[j].nbytes and not self.nodes[j].to_end and self.covering(j, x) is not None:
                cut = self.free(cut, j, x, room, bans, _RIDERS) or cut
        return cut

    def free(self, cut: _Cut, i: int, x: int, room: int, bans: set[tuple[int, int, int]],
             depth: int) -> _Cut | None:
        """``cut`` with node i freed at slot x too: trimmed when nothing reads it later in its
        interval, else re-run before its next use (the latest slot where its inputs cost the
        least: it holds i the shortest), its inputs had there ``depth`` levels deep."""
        k = self.covering(i, x)
        assert k is not None
        s, e = self.spans[i][k]
        uses = self.uses(i)
        before = [u for u in uses if s <= u < x]
        after = [u for u in uses if x < u <= e]
        if not after:
            out = cut.copy()
            out.changes.append(_Change(TRIM, i, k, before[-1] if before else s))
            out.freed += self.nodes[i].nbytes
            out.shift(before[-1] + 1 if before else s + 1, x, -self.nodes[i].nbytes)
            return out
        split = bool(before) or k == 0  # else a re-run nothing read before x: it moves
        if not self.nodes[i].recomputable or (split and len(self.spans[i]) >= self.counts[i]):
            return None
        latest = after[0] - after[0] % 2  # a re-run happens in a stage's first slot
        best: _Cut | None = None
        for r in range(latest, x, -2)[:_SWEEP_SLOTS]:
            if (x, i, r) in bans:
                continue
            trial = cut.copy()
            trial.changes.append(_Change(SPLIT, i, k, r, before[-1] if before else s) if split
                                 else _Change(MOVE, i, k, r))
            trial.seconds += self.problem.seconds[i] if split else 0.0
            trial.freed += self.nodes[i].nbytes
            trial.shift(before[-1] + 1 if before else s + int(split), x, -self.nodes[i].nbytes)
            if not self.cone(i, r, x, room, trial, depth):
                continue
            if best is not None and (trial.seconds, trial.at_x) >= (best.seconds, best.at_x):
                continue
            # A re-run whose slot could never fit would only move the overshoot there.
            if self.floor(r, {c.node for c in trial.changes if c.kind in _RERUNS and c.slot == r}) > room:
                continue
            best = trial
            if (best.seconds, best.at_x) == (cut.seconds + (self.problem.seconds[i] if split else 0.0), cut.at_x):
                break  # nothing cheaper at an earlier slot
        return best

    def cone(self, i: int, r: int, x: int, room: int, cut: _Cut, depth: int) -> bool:
        """Have node i's inputs held at slot r, where it re-runs, adding to ``cut``: an input held
        at x is held on (bytes after x only); else, ``depth`` levels down from the cut's node, it
        is re-run there too (and its inputs had), below that held on from its last use (bytes at
        and behind x, where they must fit); either way round when the first cannot be. False
        when an input cannot be had."""
        for p in self.nodes[i].reads:
            if (p, r) in cut.had or self.covering(p, r) is not None:
                continue
            cut.had.add((p, r))
            mine = self.spans[p]
            prev = max(k for k, (s, _) in enumerate(mine) if s <= r)  # its first compute is before i's
            if cut.reach.get((p, prev), -1) >= r:
                continue
            if (p, prev) in cut.reach or mine[prev][1] >= x:
                cut.changes.append(_Change(EXTEND, p, prev, r))
                cut.reach[(p, prev)] = r
                continue
            if depth == _RIDERS:
                return False
            ways = (self._rerun, self._hold_on) if depth > 0 else (self._hold_on, self._rerun)
            if not any(way(p, prev, r, x, room, cut, depth) for way in ways):
                return False
        return True

    def _hold_on(self, p: int, prev: int, r: int, x: int, room: int, cut: _Cut, depth: int) -> bool:
        end = self.spans[p][prev][1]
        nbytes = self.nodes[p].nbytes
        # At depth 0 the nodes freed with this one (riders) may make room behind x: the whole
        # cut is checked once they are in.
        if depth and any(self.used[slot] + cut.behind.get(slot, 0) + nbytes > room for slot in range(end + 1, x)):
            return False
        cut.shift(end + 1, x, nbytes)
        cut.at_x += nbytes
        cut.changes.append(_Change(EXTEND, p, prev, r))
        cut.reach[(p, prev)] = r
        return True

    def _rerun(self, p: int, prev: int, r: int, x: int, room: int, cut: _Cut, depth: int) -> bool:
        mine = self.spans[p]
        if not self.nodes[p].recomputable:
            return False
        later = next((k for k, (s, _) in enumerate(mine) if s > r), None)
        if later is not None:
            change = _Change(PULL, p, later, r)  # its re-run, earlier
        elif len(mine) + cut.added.get(p, 0) < self.counts[p]:
            change = _Change(ADD, p, len(mine), r)
        else:
            return False
        trial = cut.copy()
        trial.changes.append(change)
        if change.kind == ADD:
            trial.seconds += self.problem.seconds[p]
            trial.added[p] = trial.added.get(p, 0) + 1
        if not self.cone(p, r, x, room, trial, depth - 1):
            return False
        cut.__dict__.update(trial.__dict__)
        return True

    def apply(self, cut: _Cut) -> None:
        for change in cut.changes:
            i, k, slot, mine = change.node, change.k, change.slot, self.spans[change.node]
            if change.kind == ADD:
                mine.append((slot, slot))
                mine.sort()
                self._hold(i, slot, slot, 1)
                continue
            s, e = mine[k]
            self._hold(i, s, e, -1)
            if change.kind == SPLIT:
                mine[k:k + 1] = [(s, change.end), (slot, e)]
            elif change.kind in (MOVE, PULL):
                mine[k] = (slot, e)
            elif change.kind == EXTEND:
                mine[k] = (s, max(e, slot))
            else:  # TRIM
                mine[k] = (s, slot)
            for a, b in mine[k:k + 2] if change.kind == SPLIT else mine[k:k + 1]:
                self._hold(i, a, b, 1)

    def tidy(self) -> Spans:
        """Drop re-runs nothing reads (a re-run moved later leaves its inputs' re-runs behind) and
        hold each interval only to its last use, until nothing changes: both only free bytes."""
        changed = True
        while changed:
            changed = False
            for i, mine in enumerate(self.spans):
                if self.nodes[i].to_end:
                    continue
                uses = self.uses(i)
                for k in reversed(range(len(mine))):
                    s, e = mine[k]
                    last = max((u for u in uses if s <= u <= e), default=None)
                    if last is None and k:
                        self._hold(i, s, e, -1)
                        del mine[k]
                        changed = True
                    elif (s if last is None else last) < e:
                        end = s if last is None else last
                        self._hold(i, s, e, -1)
                        mine[k] = (s, end)
                        self._hold(i, s, end, 1)
                        changed = True
        return [list(mine) for mine in self.spans]


# -- spans to a Plan --------------------------------------------------------------------------

def spans_schedule(problem: RematProblem, spans: Spans,
                   reloads: frozenset[tuple[int, int]] = frozenset()) -> list[Step]:
    """Stage t: the loads starting in slot 2t (copies from the tier issued), the recomputes
    starting there (in op order; one per op, discarding the outputs of its nodes not re-run
    there), the frees of intervals ending there, op t, the copies to the tier of its nodes that
    are loaded later, the frees of intervals ending in slot 2t + 1 (never those of graph
    outputs). A compute waits for a load it reads right before it; a free waits for its copy to
    the tier; the tier's copy is freed when the node's last load has landed."""
    stages, nodes = problem.stages, problem.nodes
    again: list[dict[int, set[int]]] = [{} for _ in range(stages)]  # stage -> op's stage -> nodes re-run
    loads: list[list[tuple[int, int]]] = [[] for _ in range(stages)]
    frees: list[list[int]] = [[] for _ in range(2 * stages)]
    copied = {i for i, _ in reloads}
    last_load = {i: max(k for j, k in reloads if j == i) for i in copied}
    for nd, mine in zip(nodes, spans):
        for k, (s, e) in enumerate(mine):
            if (nd.index, k) in reloads:
                loads[s // 2].append((nd.index, k))
            elif k:
                again[s // 2].setdefault(nd.stage, set()).add(nd.index)
            if not nd.to_end:
                frees[e].append(nd.index)
    ops, tier = problem.graph.ops, problem.tier
    schedule: list[Step] = []
    landing: dict[str, bool] = {}  # loads not yet waited for -> whether it is the node's last load
    leaving: set[str] = set()  # copies to the tier not yet waited for

    def landed(storage: str) -> None:
        schedule.append(wait_transfer(storage, DEVICE))
        if landing.pop(storage):
            schedule.append(free(storage, cast(str, tier)))

    def ready(u: int) -> None:
        for i in problem.stage_reads[u]:
            for storage in nodes[i].storages:
                if storage in landing:
                    landed(storage)

    def release(i: int) -> None:
        for storage in nodes[i].storages:
            if storage in leaving:
                schedule.append(wait_transfer(storage, cast(str, tier)))
                leaving.discard(storage)
            if storage in landing:
                landed(storage)
            schedule.append(free(storage, DEVICE))

    for t in range(stages):
        for i, k in loads[t]:
            schedule.extend(start_transfer(storage, cast(str, tier), DEVICE) for storage in nodes[i].storages)
            landing.update((storage, k == last_load[i]) for storage in nodes[i].storages)
        for u, rerun in sorted(again[t].items()):
            ready(u)
            discard = tuple(s for i in problem.stage_nodes[u] if i not in rerun for s in nodes[i].storages)
            schedule.append(recompute(ops[u].name, discard))
        for i in sorted(frees[2 * t]):
            release(i)
        ready(t)
        schedule.append(compute(ops[t].name))
        for i in problem.stage_nodes[t]:
            if i in copied:
                schedule.extend(start_transfer(storage, DEVICE, cast(str, tier)) for storage in nodes[i].storages)
                leaving.update(nodes[i].storages)
        for i in sorted(frees[2 * t + 1]):
            release(i)
    return schedule


def spans_plan(problem: RematProblem, spans: Spans, pricing: Pricing, reference: Plan, *, method: str,
               solver: SolverReport | None = None,
               reloads: frozenset[tuple[int, int]] = frozenset()) -> tuple[Plan, Figures]:
    """The plan of ``spans`` (``reloads``: its intervals that are loads from the tier), measured
    by the planner's simulator (the validator's rules)."""
    graph = problem.graph
    schedule = spans_schedule(problem, spans, reloads)
    initial = {graph.tensors[name].storage: DEVICE for name in graph.inputs}
    figures = simulate(graph, schedule, pricing, initial_tiers=initial)
    plan = Plan(
        graph=graph, schedule=schedule, capacities=dict(pricing.capacities), channels=list(pricing.channels),
        op_time_s=dict(pricing.op_time_s), initial_tiers=initial, hardware=pricing.hardware,
        training=pricing.training, peak_bytes=dict(figures.peak_bytes), predicted_time_s=figures.time_s,
        compute_time_s=figures.compute_time_s, recompute_time_s=figures.recompute_time_s,
        exposed_transfer_s=figures.exposed_transfer_s, keep_all_time_s=reference.predicted_time_s,
        keep_all_peak_bytes=reference.keep_all_peak_bytes, method=method, solver=solver,
        decisions=_decisions(problem, spans, reference, reloads),
    )
    return plan, figures


def _decisions(problem: RematProblem, spans: Spans, reference: Plan,
               reloads: frozenset[tuple[int, int]]) -> dict[str, Decision]:
    out = dict(reference.decisions)
    ops = problem.graph.ops
    for nd, mine in zip(problem.nodes, spans):
        if len(mine) < 2:
            continue
        held = ", ".join(f"{ops[s // 2].name}..{ops[e // 2].name}" for s, e in mine)
        loaded = sum((nd.index, k) in reloads for k in range(len(mine)))
        for storage in nd.storages:
            size = format_bytes(problem.graph.tensors[storage].nbytes)
            if loaded:
                out[storage] = Decision("swap", cast(str, problem.tier), (
                    f"copied to {problem.tier} after its compute, loaded back {loaded} time(s)"
                    f"{f' and recomputed {len(mine) - 1 - loaded} time(s)' if len(mine) - 1 > loaded else ''}, "
                    f"held over {held}: {size} off the device in between"))
            else:
                out[storage] = Decision("recompute", DEVICE, (
                    f"computed {len(mine)} times ({len(mine) - 1} recompute(s)), held over {held}: "
                    f"{size} off the device in between"))
    return out
