"""A lower bound on the overhead of every plan in tierplan's plan space, from one step at a time.

CP-SAT's bound covers its own model (fixed recompute points and copy windows, conservative
transient bytes); the plans the local search returns can be outside it. This bound covers all of them, and torch's
``activation_memory_budget`` plans too: every plan that runs the graph's ops in capture order,
frees copies after their last use, and may re-run forward ops (recompute), copy storages through
the channels' queues (swap activations, stream caller-owned state, offload gradients).

Pick a step t. While its op runs, the device holds its inputs and outputs, every storage nothing
may move (backward-made tensors alive at t, caller-owned state without a slower tier), and, of
the forward-made storages read at or after t, the ones the plan keeps. Every other such storage
is off the device at t, so after t it is either re-created (its producer runs again: that op's
time is overhead, and the re-run needs its own inputs then: kept at t, re-created or copied back
in turn) or copied back (its copy out finished before t and its copy in runs after t, on the
channels' queues). A queue runs one copy at a time, a copy out starts after its storage is made,
a copy in lands before its reader, and the clock in any window is its compute plus what the plan
adds there: before t at most S (stalls, other re-runs; the re-runs counted in R run after t),
after t at most R + E. That is a small MIP:

    minimize   R + S + E
    subject to kept bytes <= budget - forced bytes at t
               R = sum of the re-run producers' times
               copies out of storages made after step k  <= compute in (k, t) + S       (per queue, k)
               copies in of storages read by step k      <= compute in (t, k) + R + E   (per queue, k)

Each step's optimum (or SCIP's bound on it, when it stops at its time limit) is a valid lower
bound; the best over a few high-pressure steps is reported. Relaxed on purpose: a producer pays
once however often a plan re-runs it, the bytes a re-run needs and other steps' budgets are not
counted, so it is loose where those bind, but it never exceeds a real plan (docs/cost-model.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from ortools.linear_solver import pywraplp

from tierplan.ir import PERSISTENT_KINDS, Graph, Phase, TensorKind
from tierplan.passes.liveness import Liveness, liveness
from tierplan.plans.plan import COMPUTE_QUEUE, DEVICE, Channel, Pricing

_STEPS = 6  # high-pressure steps tried
_TIME_LIMIT_S = 2.0  # per step; SCIP's bound is used when it stops early
_WINDOWS = 24  # prefix windows per queue direction


# How a bound was proven: the codes a plan's SolverReport.bound_kind records; docs/cost-model.md
# ("Bound kinds") explains each, so saved plans hold the code only.
KEEP_ALL = "keep-all"  # every op runs once: no plan is faster than keep-all (no step binds)
STEP_MIP = "step-mip"  # the optimum of one step's MIP, solved to optimality
STEP_MIP_LP = "step-mip-lp"  # SCIP's LP-based bound on one step's MIP (it stopped at its time limit)


@dataclass(frozen=True)
class LowerBound:
    overhead_s: float  # no plan in the space is faster than keep-all + this
    step: int  # the op position it comes from (-1: no step binds)
    forced_bytes: int  # bytes the device must hold at that step whatever the plan
    exact: bool  # the step's knapsack was solved to optimality

    @property
    def kind(self) -> str:
        """The bound's code (KEEP_ALL, STEP_MIP or STEP_MIP_LP)."""
        if self.step < 0 or self.overhead_s <= 0:
            return KEEP_ALL
        return STEP_MIP if self.exact else STEP_MIP_LP


@dataclass(frozen=True)
class _Copy:
    """Moving a storage off the device through one tier: its copies' queues and times."""

    out_queue: str | None  # copied out before the step (None: it may start on the tier)
    in_queue: str | None  # copied back after the step (None: it need not come back)
    out_s: float
    in_s: float


@dataclass(frozen=True)
class _Item:
    """A storage the device may drop at the step."""

    storage: str
    nbytes: int
    needed: bool  # read at or after the step (else only a re-run may need it)
    producer: str | None  # a forward op that can re-create it; None: it cannot be
    copies: tuple[_Copy, ...]
    made: int  # position of its producer (-1: the caller's); a copy out starts after it
    due: int | None  # its first reader after the step (a copy in lands before it); None: any time


def overhead_lower_bound(
    graph: Graph,
    pricing: Pricing,
    *,
    live: Liveness | None = None,
    steps: int = _STEPS,
    time_limit_s: float = _TIME_LIMIT_S,
    at: Sequence[int] | None = None,
) -> LowerBound:
    """The largest per-step bound over ``steps`` high-pressure steps of keep-all (``_peaks``),
    at ``pricing``'s budget; over the op positions ``at`` instead when given. ``live``: the
    liveness in the graph's op order, when the caller has it."""
    live = live if live is not None else liveness(graph)
    budget, channels, op_time_s = pricing.budget, pricing.channels, pricing.op_time_s
    order = list(live.order)
    base = np.asarray(live.live_bytes, dtype=np.int64)
    readers: dict[str, list[int]] = {}
    for i, op in enumerate(graph.ops):
        for name in op.inputs:
            readers.setdefault(graph.tensors[name].storage, []).append(i)
    cumulative = np.concatenate([[0.0], np.cumsum([op_time_s[n] for n in order])])
    lives = list(live.lifetimes)
    best = LowerBound(0.0, -1, 0, True)
    for step in (at if at is not None else _peaks(graph, base, lives, steps)):
        found = _step_bound(graph, order, lives, int(step), budget, channels, op_time_s, readers, cumulative,
                            time_limit_s)
        if found.overhead_s > best.overhead_s:
            best = found
    return best


def _peaks(graph: Graph, base: np.ndarray, lives: list, count: int) -> list[int]:
    """Up to ``count`` steps: the one with the most live bytes, the one with the most bytes of
    forward-made storages live (where activations, not gradients, pile up), then the next fullest.
    On a graph whose weights dwarf its activations the fullest steps all sit at the end of the
    backward, where only weights and gradients bind."""
    made_forward = np.zeros(len(base) + 1, dtype=np.int64)
    for life in lives:
        info = graph.tensors[life.storage]
        if info.producer is not None and graph.op(info.producer).phase == Phase.FORWARD:
            made_forward[life.start] += info.nbytes
            made_forward[life.end] -= info.nbytes
    picked: list[int] = []
    ranked = np.argsort(-base, kind="stable")[:count + 2].tolist()
    for step in [int(np.argmax(base)), int(np.argmax(np.cumsum(made_forward)[:len(base)]))] + ranked:
        if len(picked) < count and step not in picked:
            picked.append(step)
    return picked


def _copies(nbytes: int, channels: Sequence[Channel], *, out: bool, back: bool) -> tuple[_Copy, ...]:
    """One way off the device per tier with the routes asked for."""
    routes = {(c.src, c.dst): c for c in channels}
    tiers = sorted({c.dst for c in channels if c.src == DEVICE} | {c.src for c in channels if c.dst == DEVICE})
    found = []
    for tier in tiers:
        down, up = routes.get((DEVICE, tier)), routes.get((tier, DEVICE))
        if (out and down is None) or (back and up is None):
            continue
        found.append(_Copy(
            out_queue=down.queue if out else None, in_queue=up.queue if back else None,
            out_s=down.seconds(nbytes) if out else 0.0,
            in_s=up.seconds(nbytes) if back else 0.0,
        ))
    return tuple(found)


def _step_bound(graph: Graph, order: list[str], lives: list, t: int, budget: int, channels: Sequence[Channel],
                op_time_s: Mapping[str, float], readers: dict[str, list[int]], cumulative: np.ndarray,
                time_limit_s: float) -> LowerBound:
    tensors = graph.tensors
    op = graph.ops[t]
    here = {tensors[n].storage for n in op.inputs + op.outputs}
    outputs = {tensors[n].storage for n in graph.outputs}
    inputs = {tensors[n].storage for n in graph.inputs}
    position = {name: i for i, name in enumerate(order)}
    forced = 0
    items: list[_Item] = []
    for life in lives:
        s = life.storage
        info = tensors[s]
        if s in here:
            forced += info.nbytes
            continue
        if info.nbytes == 0:
            continue
        producer = info.producer
        made = position[producer] if producer is not None else -1
        due = next((r for r in readers.get(s, []) if r > t), None)
        forward_made = (producer is not None and graph.op(producer).phase == Phase.FORWARD
                        and info.kind not in PERSISTENT_KINDS and s not in inputs and s not in outputs)
        resident = s in inputs or life.start <= t < life.end or (s in outputs and life.start <= t)
        if forward_made and life.start < t:
            # Alive at t, or dead there but possibly read again by a re-run after t.
            items.append(_Item(s, info.nbytes, resident, producer,
                               _copies(info.nbytes, channels, out=True, back=True), made, due))
            continue
        if not resident:
            continue
        copies: tuple[_Copy, ...] = ()
        if info.kind in (TensorKind.PARAMETER, TensorKind.BUFFER, TensorKind.OPTIMIZER_STATE) and s in inputs:
            # Streamed (it starts away). Read after t: fetched after t, landing before that
            # reader (a fetch in flight at t holds its bytes there: that is keeping it). Else
            # fetched for a use before t, at some time.
            copies = _copies(info.nbytes, channels, out=False, back=True)
        elif info.kind == TensorKind.GRADIENT and s in outputs:
            copies = _copies(info.nbytes, channels, out=True, back=False)  # offloaded
        if copies:
            items.append(_Item(s, info.nbytes, True, None, copies, made, due))
        else:
            forced += info.nbytes  # tierplan's plans keep it here (backward-made, or no tier)
    room = budget - forced
    if room < 0:
        return LowerBound(math.inf, t, forced, True)
    if sum(i.nbytes for i in items if i.needed) <= room:
        return LowerBound(0.0, t, forced, True)
    reads = {}
    for item in items:
        if item.producer is not None and item.producer not in reads:
            reads[item.producer] = sorted({tensors[n].storage for n in graph.op(item.producer).inputs})
    return _solve(items, reads, room, t, op_time_s, cumulative, forced, time_limit_s)


def _solve(items: list[_Item], reads: dict[str, list[str]], room: int, t: int,
           op_time_s: Mapping[str, float], cumulative: np.ndarray, forced: int,
           time_limit_s: float) -> LowerBound:
    """The step's knapsack as a MIP (SCIP): its LP bound is tight here, where CP-SAT's stalls."""
    solver = pywraplp.Solver.CreateSolver("SCIP")
    solver.SetTimeLimit(int(time_limit_s * 1000))
    keep_terms = []
    outs: dict[str, list] = {}  # queue -> (var, seconds, made)
    ins: dict[str, list] = {}  # queue -> (var, seconds, due or None)
    rerun_op = {p: solver.BoolVar("") for p in reads}  # the op runs again after t
    available: dict[str, object] = {}  # storage -> 1 if it is on the device when needed after t
    inline_terms: list = []  # seconds of the copies the compute stream makes itself
    for item in items:
        keep = solver.BoolVar("")
        ways = [keep]
        if item.producer is not None:
            again = solver.BoolVar("")
            solver.Add(again <= rerun_op[item.producer])
            ways.append(again)
        for copy in item.copies:
            moved = solver.BoolVar("")
            ways.append(moved)
            if COMPUTE_QUEUE in (copy.out_queue, copy.in_queue):
                # Copied by the compute stream: the plan pays the whole time, before or after t.
                inline_terms.append(moved * (copy.out_s * (copy.out_queue is not None)
                                             + copy.in_s * (copy.in_queue is not None)))
                continue
            if copy.out_queue is not None:
                outs.setdefault(copy.out_queue, []).append((moved, copy.out_s, item.made))
            if copy.in_queue is not None:
                ins.setdefault(copy.in_queue, []).append((moved, copy.in_s, item.due))
        total = solver.Sum(ways)
        solver.Add(total == 1) if item.needed else solver.Add(total <= 1)
        available[item.storage] = total
        keep_terms.append((keep, item.nbytes))
    # A re-run reads its inputs after t: each is kept at t, itself re-created, or copied back
    # (inputs that are not items are there anyway: the step's own tensors, caller-owned state).
    for producer, storages in reads.items():
        for storage in storages:
            if storage in available:
                solver.Add(available[storage] >= rerun_op[producer])
    # Bytes in MiB keep the coefficients well scaled for the LP.
    solver.Add(solver.Sum([v * (b / 2**20) for v, b in keep_terms]) <= room / 2**20)
    # The re-runs above happen after t. Time the plan adds before t (stalls, or other re-runs) is
    # the only slack the copies out have; after t the re-runs and the stalls there lengthen the
    # windows of the copies in. Each second of either is overhead.
    rerun_total = solver.Sum([v * op_time_s[p] for p, v in rerun_op.items()])
    # Inline copies stall the compute wherever they sit: overhead, and slack in any window.
    inline = solver.Sum(inline_terms)
    before = solver.NumVar(0.0, solver.infinity(), "before")
    after = solver.NumVar(0.0, solver.infinity(), "after")
    end = len(cumulative) - 1
    for load in outs.values():
        # Copies of storages made after step k run inside (k, t): one queue, one copy at a time.
        for k in _cuts(sorted({made for _, _, made in load})):
            window = float(cumulative[t] - cumulative[k + 1]) if k >= 0 else float(cumulative[t])
            solver.Add(solver.Sum([v * c for v, c, made in load if made >= k]) <= window + before + inline)
    for load in ins.values():
        # Copies that must land before step k (k > t) run inside (t, k); the rest within the step.
        for k in _cuts(sorted({due for _, _, due in load if due is not None})):
            window = float(cumulative[k] - cumulative[t + 1])
            solver.Add(solver.Sum([v * c for v, c, due in load if due is not None and due <= k])
                       <= window + rerun_total + after + inline)
        solver.Add(solver.Sum([v * c for v, c, _ in load])
                   <= float(cumulative[end]) + rerun_total + before + after + inline)
    solver.Minimize(rerun_total + before + after + inline)
    status = solver.Solve()
    if status == pywraplp.Solver.INFEASIBLE:
        return LowerBound(math.inf, t, forced, True)
    if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        return LowerBound(0.0, t, forced, False)
    # SCIP's bound is on the model with floating-point tolerances; shave them off.
    bound = max(0.0, solver.Objective().BestBound() * (1 - 1e-6) - 1e-9)
    return LowerBound(bound, t, forced, status == pywraplp.Solver.OPTIMAL)


def _cuts(values: list[int]) -> list[int]:
    """At most ``_WINDOWS`` of ``values`` (evenly spread, ends included): each gives a valid window."""
    if len(values) <= _WINDOWS:
        return values
    picks = np.linspace(0, len(values) - 1, _WINDOWS).round().astype(int)
    return [values[i] for i in sorted(set(picks.tolist()))]
