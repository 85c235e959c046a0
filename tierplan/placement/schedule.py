"""From decisions to a concrete schedule.

``build_schedule`` turns one fate per unit into steps (computes, recomputes, transfers, waits),
lets ``retime`` move the copies to where their queues land them, and ``insert_frees`` free every
copy right after its last use, the Checkmate accounting the validator uses. ``simulate`` measures
the result.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from tierplan.ir import Graph
from tierplan.placement.candidates import KEEP, Problem, Segment
from tierplan.plans.plan import (
    DEVICE, PlanError, Step, StepKind, compute, free, recompute, start_transfer, wait_transfer,
)
from tierplan.placement.retime import Copy, device_profile, positions_clock, retime


def build_schedule(
    problem: Problem, fates: Mapping, segments: Mapping[int, Segment] | None = None
) -> list[Step]:
    """Steps for ``fates`` (member -> option; missing members are kept), frees included.

    Members are unit indices, ("stream", i) for ``problem.streams[i]`` and ("offload", i) for
    ``problem.offloads[i]``. ``segments`` overrides where and what a recomputed unit re-runs.
    """
    segments = segments or {}
    graph = problem.graph
    n = len(problem.order)
    copies: list[Copy] = []
    groups: list[list[tuple[int, Segment]]] = [[] for _ in range(n)]  # (unit index, segment)
    routes = {(c.src, c.dst): c for c in problem.channels}

    def copy(storage: str, src: str, dst: str, start: int, wait: int, limit: int,
             after: Copy | None = None) -> Copy:
        channel = routes[src, dst]
        nbytes = graph.tensors[storage].nbytes
        made = Copy(storage, nbytes, src, dst, channel.queue, channel.seconds(nbytes),
                    start, wait, limit, after)
        copies.append(made)
        return made

    for index, fate in fates.items():
        if fate == KEEP:
            continue
        tier = fate.tier
        if isinstance(index, tuple):
            kind, i = index
            if _item(problem, index).tier != tier:
                continue  # the option moves this storage to another tier (one member per tier)
            if kind == "stream":
                st = problem.streams[i]
                previous_last = -1
                for (first, last), q in zip(st.clusters, st.fetch):
                    copy(st.storage, st.tier, DEVICE, q, first, previous_last + 1)
                    previous_last = last
            else:
                off = problem.offloads[i]
                copy(off.storage, DEVICE, off.tier, off.start, off.wait, n - 1)
            continue
        unit = problem.units[index]
        if tier is not None:
            for w in unit.windows(fate):
                out = copy(w.storage, DEVICE, tier, w.last_fwd, w.out_wait, w.in_start - 1)
                copy(w.storage, tier, DEVICE, w.in_start, w.first_bwd, w.out_wait + 1, after=out)
            continue
        segment = segments.get(index) or unit.segment_for(fate)
        if segment is None:
            raise PlanError(f"unit {unit.op} cannot be recomputed (no valid recompute segment)")
        groups[segment.at].append((index, segment))

    ops: list[list[Step]] = []  # position -> its recomputes and its compute
    for i, name in enumerate(problem.order):
        present: set[str] = set()
        needed = _needed_by_group(problem, groups[i])
        here: list[Step] = []
        # Producers first, so that a unit another recomputed unit reads is back before it.
        for _, segment in sorted(groups[i], key=lambda item: problem.units[item[0]].position):
            for op in segment.ops:
                outs = [o for o in graph.op(op).outputs if not graph.tensors[o].is_view]
                if outs and all(o in present or o not in needed for o in outs):
                    continue  # an earlier segment of this group re-created what it needs already
                here.append(recompute(op, tuple(o for o in outs if o not in needed)))
                present.update(o for o in outs if o in needed)
        here.append(compute(name))
        ops.append(here)
    keep, keep_on = placement(problem, fates)
    if copies:
        steps, positions = _interleave(ops, copies)
        freed = insert_frees(graph, steps, keep, keep_on)
        on_device = {s for s, tier in initial_tiers(problem, fates).items() if tier == DEVICE}
        profile = device_profile(graph, freed, _positions_with_frees(freed, steps, positions), on_device, n)
        retime(copies, positions_clock(steps, positions, problem.op_time_s, n), profile,
               problem.capacities[DEVICE])
    steps, _ = _interleave(ops, copies)
    return insert_frees(graph, steps, keep, keep_on)


def _interleave(ops: Sequence[Sequence[Step]], copies: Sequence[Copy]) -> tuple[list[Step], list[int]]:
    """The steps in order, with the op position each belongs to: at each position, the fetches
    that start there (in the order of their readers), the waits for fetches, the recomputes, the
    compute, the offloads that start after it and the waits for offloads."""
    n = len(ops)
    pre_start: list[list[Copy]] = [[] for _ in range(n)]
    pre_wait: list[list[Step]] = [[] for _ in range(n)]
    post_start: list[list[Step]] = [[] for _ in range(n)]
    post_wait: list[list[Step]] = [[] for _ in range(n)]
    for c in copies:
        if c.outward:
            post_start[c.start].append(start_transfer(c.storage, c.src, c.dst))
            post_wait[c.wait].append(wait_transfer(c.storage, c.dst))
        else:
            pre_start[c.start].append(c)
            pre_wait[c.wait].append(wait_transfer(c.storage, c.dst))
    steps: list[Step] = []
    positions: list[int] = []
    for i in range(n):
        here = [start_transfer(c.storage, c.src, c.dst) for c in sorted(pre_start[i], key=lambda c: c.wait)]
        here += pre_wait[i] + list(ops[i]) + post_start[i] + post_wait[i]
        steps.extend(here)
        positions.extend([i] * len(here))
    return steps, positions


def _positions_with_frees(freed: list[Step], steps: list[Step], positions: list[int]) -> list[int]:
    """The op position of each step of ``insert_frees``' output: a free belongs to the step it
    follows."""
    out: list[int] = []
    j = 0
    for step in freed:
        if j < len(steps) and step is steps[j]:
            out.append(positions[j])
            j += 1
        else:
            out.append(out[-1])
    return out


def _needed_by_group(problem: Problem, group: Sequence[tuple[int, Segment]]) -> set[str]:
    """Storages a group of segments re-run at one step must re-create: the recomputed units' own
    storages and what the group's ops read that is not an anchor (a storage the plan holds there).
    Every other output of the re-run ops is discarded: nothing reads it before it would be freed,
    or the plan holds its own copy of it."""
    graph = problem.graph
    needed: set[str] = set()
    anchors: set[str] = set()
    for _, segment in group:
        anchors.update(segment.anchors)
        for op in segment.ops:
            needed.update(graph.tensors[name].storage for name in graph.op(op).inputs)
    needed -= anchors
    for index, _ in group:
        needed.update(problem.units[index].storages)
    return needed


def _item(problem: Problem, index: tuple):
    kind, i = index
    return problem.streams[i] if kind == "stream" else problem.offloads[i]


def placement(problem: Problem, fates: Mapping) -> tuple[frozenset[str], frozenset[tuple[str, str]]]:
    """(storages whose device copy is never freed, (storage, tier) copies never freed) for
    ``fates``: streamed storages live on their tier, offloaded gradients end there."""
    keep = set(problem.never_free)
    keep_on = set()
    for index, fate in fates.items():
        if fate == KEEP or not isinstance(index, tuple):
            continue
        item = _item(problem, index)
        if item.tier != fate.tier:
            continue
        keep.discard(item.storage)
        keep_on.add((item.storage, item.tier))
    return frozenset(keep), frozenset(keep_on)


def initial_tiers(problem: Problem, fates: Mapping) -> dict[str, str]:
    graph = problem.graph
    initial = {graph.tensors[name].storage: DEVICE for name in graph.inputs}
    for index, fate in fates.items():
        if fate != KEEP and isinstance(index, tuple) and index[0] == "stream":
            st = problem.streams[index[1]]
            if st.tier == fate.tier:
                initial[st.storage] = st.tier
    return initial


def insert_frees(graph: Graph, steps: Sequence[Step], keep: frozenset[str],
                 keep_on: frozenset[tuple[str, str]] = frozenset()) -> list[Step]:
    """Free each copy of a storage on a tier right after its last use.

    A copy lives from its allocation (an op writing it, a transfer landing it) to its last use
    (an op reading it, a transfer reading it, the wait of a transfer reading or landing it); a
    new allocation of the same storage on the same tier closes the previous copy. Copies on the
    device of storages in ``keep`` (caller-owned, graph outputs) are never freed.
    """
    last_use: dict[tuple[str, str], int] = {}
    frees_after: dict[int, list[tuple[str, str]]] = {}
    source: dict[tuple[str, str], str] = {}

    def close(key: tuple[str, str]) -> None:
        index = last_use.pop(key)
        if not (key[1] == DEVICE and key[0] in keep) and key not in keep_on:
            frees_after.setdefault(index, []).append(key)

    def allocate(storage: str, tier: str, index: int) -> None:
        if (storage, tier) in last_use:
            close((storage, tier))
        last_use[storage, tier] = index

    for index, step in enumerate(steps):
        if step.kind in (StepKind.COMPUTE, StepKind.RECOMPUTE):
            op = graph.op(step.op)
            for name in op.inputs:
                last_use[graph.tensors[name].storage, DEVICE] = index
            for name in op.outputs:
                t = graph.tensors[name]
                if t.is_view:
                    last_use[t.storage, DEVICE] = index
                elif name not in step.discard:
                    allocate(name, DEVICE, index)
        elif step.kind == StepKind.START_TRANSFER:
            storage = graph.tensors[step.tensor].storage
            last_use[storage, step.src] = index
            allocate(storage, step.dst, index)
            source[storage, step.dst] = step.src
        elif step.kind == StepKind.WAIT_TRANSFER:
            storage = graph.tensors[step.tensor].storage
            last_use[storage, step.dst] = index
            last_use[storage, source.pop((storage, step.dst))] = index
    for key in list(last_use):
        close(key)
    out: list[Step] = []
    for index, step in enumerate(steps):
        out.append(step)
        out.extend(free(storage, tier) for storage, tier in frees_after.get(index, ()))
    return out
