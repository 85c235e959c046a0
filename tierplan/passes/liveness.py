"""Liveness of storages over a schedule, and the peak of live bytes.

The accounting is Checkmate's (Jain et al., MLSys 2020), per storage rather than per tensor so that
views are counted once: a storage occupies memory from the step of the op that creates it until
the step of the last op that reads it or any of its views, inclusive; while an op runs, its inputs
and its outputs are resident. Storages the caller owns (parameters, buffers, inputs, optimizer
state) are live over the whole schedule, and so are graph outputs from the step that produces them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tierplan.ir import PERSISTENT_KINDS, Graph, GraphError


@dataclass(frozen=True)
class Lifetime:
    """Storage ``storage`` of ``nbytes`` is live over the half-open step range [start, end)."""

    storage: str
    nbytes: int
    start: int
    end: int


def check_schedule(graph: Graph, schedule: Sequence[str]) -> None:
    """Raise GraphError unless ``schedule`` runs every op of ``graph`` once, inputs first."""
    seen: set[str] = set()
    available = set(graph.inputs)
    for step, name in enumerate(schedule):
        op = graph.op(name)
        if name in seen:
            raise GraphError(f"schedule runs op {name!r} twice (step {step})")
        missing = [t for t in op.inputs if t not in available]
        if missing:
            raise GraphError(
                f"schedule step {step} runs op {name!r} before its input {missing[0]!r} exists"
            )
        seen.add(name)
        available.update(op.outputs)
    if len(seen) != len(graph.ops):
        absent = next(op.name for op in graph.ops if op.name not in seen)
        raise GraphError(f"schedule never runs op {absent!r}")


def lifetimes(graph: Graph, schedule: Sequence[str] | None = None) -> list[Lifetime]:
    """The live range of every storage of ``graph`` when its ops run in ``schedule`` order."""
    order = [op.name for op in graph.ops] if schedule is None else list(schedule)
    position = {name: i for i, name in enumerate(order)}
    n = len(order)
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    for t in graph.tensors.values():
        s = t.storage
        if graph.tensors[s].kind in PERSISTENT_KINDS or t.name in graph.inputs:
            start[s], end[s] = 0, n
            continue
        if t.producer is not None and not t.is_view:
            start[s] = min(start.get(s, n), position[t.producer])
        last = max((position[u] for u in t.users), default=-1)
        if t.name in graph.outputs:
            last = n - 1
        end[s] = max(end.get(s, 0), last + 1)
    result = []
    for s in graph.storages():
        if s not in start:
            raise GraphError(f"storage {s!r} has no producer and is not a graph input")
        result.append(Lifetime(s, graph.tensors[s].nbytes, start[s], max(end[s], start[s] + 1)))
    return result


def live_bytes(graph: Graph, schedule: Sequence[str] | None = None) -> list[int]:
    """Bytes live at each step of the schedule."""
    return list(liveness(graph, schedule).live_bytes)


def peak_bytes(graph: Graph, schedule: Sequence[str] | None = None) -> int:
    """The peak of live bytes over the schedule (0 for a graph without ops)."""
    return liveness(graph, schedule).peak


@dataclass(frozen=True)
class Liveness:
    """The lifetimes of every storage over one op order and the bytes live at each step.

    Planning one graph reads both many times (the budget, the keep-all plan, the candidates, the
    bound): a plan computes this once and hands it on.
    """

    order: tuple[str, ...]
    lifetimes: tuple[Lifetime, ...]
    live_bytes: tuple[int, ...]

    @property
    def peak(self) -> int:
        return max(self.live_bytes, default=0)


def liveness(graph: Graph, schedule: Sequence[str] | None = None) -> Liveness:
    """Lifetimes and live bytes of ``graph`` when its ops run in ``schedule`` order."""
    order = tuple(op.name for op in graph.ops) if schedule is None else tuple(schedule)
    lives = tuple(lifetimes(graph, order))
    delta = [0] * (len(order) + 1)
    for life in lives:
        delta[life.start] += life.nbytes
        delta[life.end] -= life.nbytes
    out, running = [], 0
    for step in range(len(order)):
        running += delta[step]
        out.append(running)
    return Liveness(order, lives, tuple(out))
