"""Where a schedule's copies start and are waited for, given the queues they share and the budget.

``build_schedule`` first places each copy by its own window (``candidates._window``): an offload is
waited for once the compute since its start would cover it on an idle link, and a fetch starts once
the compute left before its reader would. Copies in one direction share a queue and run one at a
time (``simulate``), so in a busy stretch a copy waits behind the ones ahead of it, and its tight
wait stalls the compute even when the bytes it frees are not needed yet. ``retime`` runs each
queue on the no-stall clock and moves

- an offload's wait later, to the first op by whose end its copy has landed;
- a fetch's start to where the queue, filled as late as it can be, lands every fetch before its
  reader (earlier than its own window in a busy stretch, later where the link is idle);

each only as far as the device holds it within the budget over the ops it is added to (or within
the plan's own peak, for a plan already above the budget). So a retimed plan fits wherever its
first placement did; a copy the budget stops short still stalls, and ``simulate`` prices that.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tierplan.ir import Graph
from tierplan.plans.plan import COMPUTE_QUEUE, DEVICE, Step, StepKind


@dataclass
class Copy:
    """One transfer, placed by op positions.

    An offload (``src`` is the device) starts after op ``start`` and is waited for after op
    ``wait``; a fetch (``dst`` is the device) starts before op ``start`` and is waited for before
    op ``wait``. ``limit``: the latest op an offload's wait may follow, or the earliest op a fetch
    may start before; ``after``: the offload of the same storage a fetch must start after.
    """

    storage: str
    nbytes: int
    src: str
    dst: str
    queue: str
    seconds: float
    start: int
    wait: int
    limit: int
    after: Copy | None = None

    @property
    def outward(self) -> bool:
        return self.src == DEVICE


def retime(copies: Sequence[Copy], clock: np.ndarray, profile: np.ndarray, cap: int) -> None:
    """Move the copies' waits and starts in place (see the module docstring).

    ``clock[i]``: when op position i begins if nothing stalls (``len(clock)`` = ops + 1);
    ``profile[i]``: the device bytes while position i runs, as placed (updated in place).
    Queues that carry both directions (a half-duplex link) keep their first placement.
    """
    cap = max(cap, int(profile.max()) if len(profile) else cap)
    queues: dict[str, list[Copy]] = {}
    for copy in copies:
        if copy.queue != COMPUTE_QUEUE:  # inline copies stall the compute wherever they sit
            queues.setdefault(copy.queue, []).append(copy)
    mixed = {q for q, cs in queues.items() if len({c.outward for c in cs}) > 1}
    for queue, members in queues.items():
        if queue not in mixed and members[0].outward:
            _offloads(members, clock, profile, cap)
    for queue, members in queues.items():
        if queue not in mixed and not members[0].outward:
            _fetches(members, clock, profile, cap)


def _offloads(copies: list[Copy], clock: np.ndarray, profile: np.ndarray, cap: int) -> None:
    free_at = 0.0
    for copy in sorted(copies, key=lambda c: c.start):  # the queue runs them in issue order
        begin = max(float(clock[copy.start + 1]), free_at)
        free_at = begin + copy.seconds
        # The first op w whose end (clock[w + 1]) is at or after the copy has landed.
        landed = bisect.bisect_left(clock, free_at) - 1
        target = min(max(landed, copy.wait), copy.limit)
        wait = copy.wait
        while wait < target and profile[wait + 1] + copy.nbytes <= cap:
            wait += 1
        profile[copy.wait + 1:wait + 1] += copy.nbytes
        copy.wait = wait


def _fetches(copies: list[Copy], clock: np.ndarray, profile: np.ndarray, cap: int) -> None:
    # Latest first: each fetch lands before its reader and before the next one in the queue
    # begins; fetches start in the order their readers come (the queue is first in, first out).
    next_begin = float("inf")
    ceiling = len(clock) - 1
    for copy in sorted(copies, key=lambda c: (c.wait, c.start), reverse=True):
        begin = min(float(clock[copy.wait]), next_begin) - copy.seconds
        target = bisect.bisect_right(clock, begin) - 1  # the last op that begins by then
        lowest = max(copy.limit, copy.after.wait + 1 if copy.after is not None else 0)
        target = max(min(target, copy.wait, ceiling), lowest)  # order yields to correctness
        start = copy.start
        if target > start:
            profile[start:target] -= copy.nbytes  # the link is idle: start later, hold it less
            start = target
        else:
            while start > target and profile[start - 1] + copy.nbytes <= cap:
                start -= 1
            profile[start:copy.start] += copy.nbytes
        copy.start = start
        ceiling = start
        next_begin = max(begin, float(clock[start]))


def positions_clock(steps: Sequence[Step], positions: Sequence[int], op_time_s: dict[str, float],
                    n: int) -> np.ndarray:
    """clock[i]: when op position i begins with no stall (computes and recomputes before it)."""
    spent = np.zeros(n + 1)
    for step, pos in zip(steps, positions):
        if step.kind in (StepKind.COMPUTE, StepKind.RECOMPUTE):
            spent[pos + 1] += op_time_s[step.op]
    return np.cumsum(spent)


def device_profile(graph: Graph, steps: Sequence[Step], positions: Sequence[int], on_device: set[str],
                   n: int) -> np.ndarray:
    """profile[i]: the most bytes on the device while position i's steps run (``steps`` with its
    frees; ``on_device``: the storages there before the first step)."""
    used = sum(graph.tensors[s].nbytes for s in on_device)
    profile = np.zeros(n, dtype=np.int64)
    for step, pos in zip(steps, positions):
        kind = step.kind
        if kind in (StepKind.COMPUTE, StepKind.RECOMPUTE):
            op = graph.op(step.op)
            used += sum(graph.tensors[o].nbytes for o in op.outputs
                        if not graph.tensors[o].is_view and o not in step.discard)
            scratch = sum(graph.tensors[o].nbytes for o in step.discard)
            profile[pos] = max(profile[pos], used + scratch)
        elif kind == StepKind.START_TRANSFER and step.dst == DEVICE:
            used += graph.tensors[graph.tensors[step.tensor].storage].nbytes
        elif kind == StepKind.FREE and step.tier == DEVICE:
            used -= graph.tensors[graph.tensors[step.tensor].storage].nbytes
        profile[pos] = max(profile[pos], used)
    return profile
