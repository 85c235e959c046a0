"""The CP-SAT model of one ``Linear`` (the linear memory model): built in ``solve_model``, read
back in ``_read``.

Variables: one boolean per (member, option), exactly one per member. Constraints: device bytes at
every step that can bind (``_constrained_steps``), the transients of recompute groups, the slower
tiers' capacities, anchors (a recompute reads what the plan holds there) and conflicts. Objective:
recompute seconds plus, per queue, the copy time that no window of steps can hide (a lower bound
of the queue's stall). With ``cap=None`` it minimizes the peak instead.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from ortools.sat.python import cp_model

from tierplan.placement.candidates import KEEP, Option
from tierplan.plans.plan import COMPUTE_QUEUE
from tierplan.placement.linear_model import Key, Linear

_TIME_UNITS = 1_000_000  # the keep-all step time in the model's integer time units
_WINDOW_GROUPS = 32  # steps are grouped into this many windows for the channel-load constraints
MIN_SOLVE_S = 0.05  # a CP-SAT model with less time than this left is not solved
_CHAIN_ABOVE_TERMS = 2_000_000  # memory constraints with more terms than this are chained


@dataclass
class Solved:
    choice: dict[Key, Option] | None
    status: str
    objective_s: float | None  # the model's overhead (recompute + exposed-copy lower bound)
    bound_s: float | None
    solve_s: float
    peak: int | None = None  # min-peak mode: the model's peak



def _constrained_steps(linear: Linear, threshold: int) -> list[int]:
    """Steps whose memory constraint can bind: one (the fullest) per stretch of steps where the
    same choices change the profile, and only where the profile can exceed ``threshold``."""
    n = linear.base.shape[0]
    changes = np.zeros(n, dtype=bool)
    changes[0] = True
    if linear.delta.shape[0]:
        d = linear.delta
        changes[1:] |= np.any(d[:, 1:] != d[:, :-1], axis=0)
    starts = np.nonzero(changes)[0].tolist() + [n]
    steps = []
    for a, b in zip(starts[:-1], starts[1:]):
        # Every choice changes the bytes of the stretch by the same amount at each of its steps
        # (deltas only free bytes), so its fullest step dominates the rest.
        i = a + int(np.argmax(linear.base[a:b]))
        if linear.base[i] > threshold:
            steps.append(i)
    return steps


def _lower_bound_peak(linear: Linear) -> int:
    """No choice brings any step below this (the model's own floor)."""
    if not linear.pairs:
        return int(linear.base.max())
    best_saving = np.zeros(linear.base.shape[0], dtype=np.int64)
    for key in linear.keys:
        rows = [linear.pair_index[key, o] for o in linear.options[key]]
        if rows:
            best_saving += np.clip(-linear.delta[rows].min(axis=0), 0, None)
    floor = int((linear.base - best_saving).max())
    return floor


def solve_model(
    linear: Linear, cap: int | None, *, hint: dict[Key, Option] | None, deadline: float, workers: int = 2,
) -> Solved:
    """Minimize overhead with the device at most ``cap``; with ``cap=None`` minimize the peak.

    Building the model counts against ``deadline`` (``time.perf_counter()`` time) as solving
    does: on a large graph with streams it takes seconds, and a model with no time left to solve
    is not built to the end (no choice, status ``NOT_BUILT``).
    """
    started = time.perf_counter()
    problem = linear.problem
    total_s = max(sum(problem.op_time_s.values()), 1e-12)
    unit_s = total_s / _TIME_UNITS
    model = cp_model.CpModel()
    x: dict[tuple[Key, Option], cp_model.IntVar] = {}
    for key in linear.keys:
        x[key, KEEP] = model.NewBoolVar(f"keep{key}")
        for option in linear.options[key]:
            x[key, option] = model.NewBoolVar(f"{option}{key}")
        model.AddExactlyOne([x[key, KEEP]] + [x[key, o] for o in linear.options[key]])
    pair_vars = [x[p] for p in linear.pairs]

    # Device memory at every step that can bind.
    floor = _lower_bound_peak(linear)
    peak_var = None
    if cap is None:
        peak_var = model.NewIntVar(floor, int(linear.base.max()), "peak")
        threshold = floor
    else:
        threshold = cap
    limit = peak_var if peak_var is not None else cap
    by_index = np.array(pair_vars + [None], dtype=object)[:-1]  # fancy-indexable variables

    def weighted(coefficients: np.ndarray) -> cp_model.LinearExpr:
        nz = np.nonzero(coefficients)[0]
        return cp_model.LinearExpr.WeightedSum(by_index[nz].tolist(), coefficients[nz].tolist())

    steps = _constrained_steps(linear, threshold)
    # A choice changes the profile at a few steps, but streams and offloads hold their bytes off
    # the device over most of them: with many of those, each step's sum is long. Then the model
    # carries the profile's change from one constrained step to the next (the same constraints,
    # with far fewer terms to build).
    chained = int(np.count_nonzero(linear.delta[:, steps])) > _CHAIN_ABOVE_TERMS if steps else False
    previous, carried = np.zeros(len(linear.pairs), dtype=np.int64), None
    for count, step in enumerate(steps):
        if count % 64 == 0 and time.perf_counter() >= deadline - MIN_SOLVE_S:
            return Solved(None, "NOT_BUILT", None, None, time.perf_counter() - started)
        column = linear.delta[:, step]
        if not chained:
            model.Add(int(linear.base[step]) + weighted(column) <= limit)
            continue
        here = model.NewIntVar(int(np.clip(column, None, 0).sum()), int(np.clip(column, 0, None).sum()), "")
        model.Add(here == (carried if carried is not None else 0) + weighted(column - previous))
        model.Add(int(linear.base[step]) + here <= limit)
        previous, carried = column, here
    # Right before steps with recompute groups: without the step's outputs, with the transients.
    for step in linear.transient_steps():
        column = linear.delta[:, step] + linear.transient[:, step]
        if linear.pre_base[step] + np.clip(column, 0, None).sum() <= threshold:
            continue
        model.Add(int(linear.pre_base[step]) + weighted(column) <= limit)

    # Other tiers: everything swapped there at once (an upper bound on their peak).
    for tier, amounts in linear.swap_bytes.items():
        if np.any(amounts):
            model.Add(weighted(amounts) <= problem.capacities[tier])

    # A recompute reads its anchors at its recompute step.
    for a in linear.anchors:
        if (a.user, a.option) in x:
            model.Add(x[a.user, a.option] <= sum(x[a.owner, o] for o in a.allowed if (a.owner, o) in x))

    for first, second in linear.conflicts:
        if first in x and second in x:
            model.Add(x[first] + x[second] <= 1)

    # Exposed copy time per queue: over every window of step groups, the copies that must run
    # inside it, beyond its compute time, are exposed (a lower bound of the queue's stall).
    exposed_vars = _queue_exposure(model, linear, pair_vars, unit_s)

    cost = [max(1, math.ceil(c / unit_s)) if c > 0 else 1 for c in linear.cost_s]
    overhead = cp_model.LinearExpr.WeightedSum(pair_vars + exposed_vars, cost + [1] * len(exposed_vars))
    if peak_var is not None:
        model.Minimize(peak_var)
    else:
        model.Minimize(overhead)
    if hint:
        for key in linear.keys:
            chosen = hint.get(key, KEEP)
            for option in [KEEP] + linear.options[key]:
                model.AddHint(x[key, option], option == chosen)

    time_limit_s = deadline - time.perf_counter()
    if time_limit_s < MIN_SOLVE_S:
        return Solved(None, "NOT_BUILT", None, None, time.perf_counter() - started)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = 0
    started = time.perf_counter()
    status = solver.Solve(model)
    elapsed = time.perf_counter() - started
    return _read(solver, status, linear, x, unit_s, peak_var, elapsed)


def _queue_exposure(model: cp_model.CpModel, linear: Linear, pair_vars: list, unit_s: float) -> list:
    problem = linear.problem
    n = len(problem.order)
    groups = min(_WINDOW_GROUPS, n)
    cum = np.asarray(problem.cumulative_s)
    # Group boundaries at equal shares of compute time, so windows are comparable.
    edges = np.searchsorted(cum[1:], np.linspace(0, cum[-1], groups + 1)[1:-1], side="left")
    group_of = np.zeros(n, dtype=np.int64)
    for e in edges:
        group_of[e + 1:] += 1
    g_first = [int(np.min(np.nonzero(group_of == g)[0])) if np.any(group_of == g) else None for g in range(groups)]
    g_last = [int(np.max(np.nonzero(group_of == g)[0])) if np.any(group_of == g) else None for g in range(groups)]
    by_queue: dict[str, list[tuple[int, int, int, int]]] = {}
    for p, transfers in linear.transfers.items():
        for t in transfers:
            if t.queue == COMPUTE_QUEUE:  # priced whole in the linear cost: no queue to congest
                continue
            lo, hi = int(group_of[max(t.first, 0)]), int(group_of[min(max(t.last, t.first), n - 1)])
            by_queue.setdefault(t.queue, []).append((p, lo, hi, max(1, math.ceil(t.time_s / unit_s))))
    exposed = []
    for queue, items in by_queue.items():
        e = model.NewIntVar(0, sum(i[3] for i in items), f"exposed_{queue}")
        exposed.append(e)
        lo = np.array([i[1] for i in items])
        hi = np.array([i[2] for i in items])
        for g1 in range(groups):
            if g_first[g1] is None:
                continue
            for g2 in range(g1, groups):
                if g_last[g2] is None:
                    continue
                inside = np.nonzero((lo >= g1) & (hi <= g2))[0]
                if not len(inside):
                    continue
                capacity = int((cum[g_last[g2] + 1] - cum[g_first[g1]]) / unit_s)
                load: dict[int, int] = {}
                for k in inside:
                    p, _, _, t = items[k]
                    load[p] = load.get(p, 0) + t
                if sum(load.values()) <= capacity:
                    continue
                model.Add(cp_model.LinearExpr.WeightedSum([pair_vars[p] for p in load], list(load.values()))
                          - capacity <= e)
    return exposed


def _read(solver: cp_model.CpSolver, status: int, linear: Linear, x: dict, unit_s: float,
          peak_var: Any, elapsed: float) -> Solved:
    name = solver.StatusName(status)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return Solved(None, name, None, None, elapsed)
    choice = {}
    for key in linear.keys:
        for option in linear.options[key]:
            if solver.BooleanValue(x[key, option]):
                choice[key] = option
    if peak_var is not None:
        return Solved(choice, name, None, None, elapsed, peak=solver.Value(peak_var))
    return Solved(choice, name, solver.ObjectiveValue() * unit_s, solver.BestObjectiveBound() * unit_s, elapsed)
