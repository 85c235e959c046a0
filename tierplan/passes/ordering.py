"""Operator orders with a lower peak of live bytes.

The peak of a schedule is ``tierplan.passes.liveness.peak_bytes``: a storage is live from the op
that creates it to the last op reading it or a view of it. Any topological order of the ops is a
valid schedule, and the order decides how long each storage lives.

Inductor (torch 2.13, ``torch/_inductor/memory.py``, ``reorder_for_peak_memory``) keeps the best
of the capture order and three topological sorts; they are re-implemented here over the IR:
- LPMF, least peak memory first (after the DAC 2006 Simulink buffer paper): among the ready ops,
  if some fit under the peak reached so far pick the one leaving the least memory allocated,
  otherwise the one allocating the least;
- BFS: the ready op whose predecessors ran earliest (FIFO), so buffers die young;
- DFS: a depth-first post-order that visits cheap ops (own outputs plus inputs) first.
``best_order`` adds a greedy that frees memory first and then improves the best order found by
hill climbing: each op is moved as early or as late as its dependencies allow when that lowers
(peak, total live bytes over time).

Dependencies are data edges (producer -> reader) plus
- for ops writing a storage in place (the optimizer's updates, aten ``op_`` variants), edges from
  the earlier readers of that storage;
- the phases: every forward op before every backward op, every backward op before every optimizer
  op. The backward starts from the loss's gradient, and a split program (``tierplan.backend``)
  hands the forward's outputs back before that gradient arrives;
- a chain through ``graph.meta["ordered_ops"]`` (ops that draw random numbers or have side
  effects, recorded at capture) in capture order, so the program draws the same random numbers
  as eager.
"""
from __future__ import annotations

import dataclasses
import heapq
import time
from dataclasses import dataclass
from typing import Sequence

from tierplan.ir import PERSISTENT_KINDS, Graph, GraphError, OpInfo, Phase
from tierplan.passes.liveness import check_schedule, live_bytes


@dataclass(frozen=True)
class Dependencies:
    """The op DAG and, per op, the storages whose memory it allocates or may free."""

    names: list[str]  # op names in capture order; ops are referred to by index below
    preds: list[frozenset[int]]
    succs: list[frozenset[int]]
    creates: list[dict[str, int]]  # storage -> bytes, for storages the op allocates
    reads: list[dict[str, int]]  # storage -> bytes, for the freeable storages it reads
    readers: dict[str, frozenset[int]]  # freeable storage -> ops reading it or a view of it
    kept: frozenset[str]  # storages never freed: graph outputs


def dependencies(graph: Graph) -> Dependencies:
    """The DAG of ``graph`` (data edges plus in-place write-after-read edges) and what each op
    allocates and reads; storages of graph inputs and persistent kinds are never freed."""
    names = [op.name for op in graph.ops]
    index = {name: i for i, name in enumerate(names)}
    persistent = {
        s for s in graph.storages()
        if graph.tensors[s].kind in PERSISTENT_KINDS or s in graph.inputs
    }
    preds: list[set[int]] = [set() for _ in names]
    readers: dict[str, set[int]] = {}
    readers_so_far: dict[str, set[int]] = {}  # for in-place writes: readers earlier in capture
    last_writer: dict[str, int] = {}
    creates: list[dict[str, int]] = [{} for _ in names]
    reads: list[dict[str, int]] = [{} for _ in names]
    for i, op in enumerate(graph.ops):
        for name in op.inputs:
            t = graph.tensors[name]
            if t.producer is not None and t.producer in index:
                preds[i].add(index[t.producer])
            readers_so_far.setdefault(t.storage, set()).add(i)
            if t.storage not in persistent:
                readers.setdefault(t.storage, set()).add(i)
                reads[i][t.storage] = graph.tensors[t.storage].nbytes
        in_place = _writes_in_place(op)
        for name in op.outputs:
            t = graph.tensors[name]
            if not t.is_view and t.storage not in persistent:
                creates[i][t.storage] = t.nbytes
            if t.is_view and in_place:  # a write: after every earlier reader and writer
                preds[i].update(j for j in readers_so_far.get(t.storage, ()) if j != i)
                if t.storage in last_writer:
                    preds[i].add(last_writer[t.storage])
                last_writer[t.storage] = i
    _order_phases(graph, preds)
    ordered = [index[name] for name in graph.meta.get("ordered_ops", ()) if name in index]
    for earlier, later in zip(ordered, ordered[1:]):
        preds[later].add(earlier)
    succs: list[set[int]] = [set() for _ in names]
    for i, ps in enumerate(preds):
        for p in ps:
            succs[p].add(i)
    kept = frozenset(graph.tensors[o].storage for o in graph.outputs)
    return Dependencies(
        names=names,
        preds=[frozenset(p) for p in preds],
        succs=[frozenset(s) for s in succs],
        creates=creates,
        reads=reads,
        readers={s: frozenset(r) for s, r in readers.items()},
        kept=kept,
    )


_PHASE_RANK = {Phase.FORWARD: 0, Phase.BACKWARD: 1, Phase.OPTIMIZER: 2}


def _order_phases(graph: Graph, preds: list[set[int]]) -> None:
    """Edges from the last ops of each phase (no reader in the same phase) to the first ops of the
    next phase present (no producer in their own phase): each phase starts after the one before
    ends, with few edges (barrier edges through the sinks and sources suffice)."""
    rank = [_PHASE_RANK[op.phase] for op in graph.ops]
    present = sorted(set(rank))
    if len(present) < 2 or any(rank[p] > rank[i] for i, ps in enumerate(preds) for p in ps):
        return  # one phase, or phases that are not stages (an op reads a later phase's result)
    has_same_phase_succ = [False] * len(rank)
    for i, ps in enumerate(preds):
        for p in ps:
            if rank[p] == rank[i]:
                has_same_phase_succ[p] = True
    for before, after in zip(present, present[1:]):
        sinks = [i for i, r in enumerate(rank) if r == before and not has_same_phase_succ[i]]
        sources = [i for i, r in enumerate(rank) if r == after and not any(rank[p] == after for p in preds[i])]
        for i in sources:
            preds[i].update(sinks)


def _writes_in_place(op: OpInfo) -> bool:
    """Optimizer updates, and aten's in-place variants (``aten.add_.Tensor``; not dunders)."""
    if op.phase == Phase.OPTIMIZER:
        return True
    parts = op.target.split(".")
    return len(parts) > 1 and parts[1].endswith("_") and not parts[1].endswith("__")


def order_lpmf(graph: Graph, deps: Dependencies | None = None) -> list[str]:
    """Least peak memory first, as inductor's ``topological_sort_lpmf``."""
    d = deps or dependencies(graph)
    n = len(d.names)
    indegree = [len(p) for p in d.preds]
    outdegree = {s: len(r) + (s in d.kept) for s, r in d.readers.items()}
    alloc = [sum(c.values()) for c in d.creates]
    to_free = [0] * n  # bytes freed once op i runs, given the ops run so far
    for i in range(n):
        to_free[i] += sum(z for s, z in d.reads[i].items() if outdegree[s] == 1)
        to_free[i] += sum(z for s, z in d.creates[i].items() if outdegree.get(s, 0) == 0)
    ready = {i for i in range(n) if indegree[i] == 0}
    live = peak = 0
    order = []
    while ready:
        gap = peak - live
        pick = min(ready, key=lambda i: (alloc[i] if alloc[i] > gap else 0, alloc[i] - to_free[i], i))
        ready.remove(pick)
        order.append(pick)
        live += alloc[pick]
        peak = max(peak, live)
        live -= to_free[pick]
        for j in d.succs[pick]:
            indegree[j] -= 1
            if indegree[j] == 0:
                ready.add(j)
        for s in d.reads[pick]:
            outdegree[s] -= 1
            if outdegree[s] == 1:  # the last reader left frees it
                for j in d.readers[s]:
                    to_free[j] += d.reads[j][s]
    return [d.names[i] for i in order]


def order_bfs(graph: Graph, deps: Dependencies | None = None) -> list[str]:
    """FIFO: the ready op whose predecessors ran earliest, as inductor's ``topological_sort_bfs``."""
    d = deps or dependencies(graph)
    indegree = [len(p) for p in d.preds]
    position: dict[int, int] = {}
    heap = [([], i) for i in range(len(d.names)) if indegree[i] == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        _, i = heapq.heappop(heap)
        position[i] = len(order)
        order.append(i)
        for j in d.succs[i]:
            indegree[j] -= 1
            if indegree[j] == 0:
                heapq.heappush(heap, (sorted(position[p] for p in d.preds[j]), j))
    return [d.names[i] for i in order]


def order_dfs(graph: Graph, deps: Dependencies | None = None) -> list[str]:
    """Depth-first post-order visiting the ops with the least bytes written and read first, as
    inductor's ``topological_sort_dfs`` (iterative: chains of ops are deep)."""
    d = deps or dependencies(graph)
    n = len(d.names)
    weight = [sum(d.creates[i].values()) + sum(d.reads[i].values()) for i in range(n)]
    key = lambda i: (weight[i], i)  # noqa: E731
    seen = [False] * n
    order: list[int] = []
    for root in sorted(range(n), key=key):
        if seen[root]:
            continue
        seen[root] = True
        stack = [(root, iter(sorted(d.preds[root], key=key)))]
        while stack:
            node, pending = stack[-1]
            for p in pending:
                if not seen[p]:
                    seen[p] = True
                    stack.append((p, iter(sorted(d.preds[p], key=key))))
                    break
            else:
                stack.pop()
                order.append(node)
    return [d.names[i] for i in order]


def order_free_first(graph: Graph, deps: Dependencies | None = None) -> list[str]:
    """Greedy: run the ready op that adds the fewest net bytes (allocated minus freed), ties to
    the capture order; an op that frees memory runs as soon as it can."""
    d = deps or dependencies(graph)
    n = len(d.names)
    indegree = [len(p) for p in d.preds]
    remaining = {s: len(r) for s, r in d.readers.items()}

    def net(i: int) -> int:
        freed = sum(z for s, z in d.reads[i].items() if remaining[s] == 1 and s not in d.kept)
        dead = sum(z for s, z in d.creates[i].items() if s not in d.readers and s not in d.kept)
        return sum(d.creates[i].values()) - freed - dead

    ready = {i for i in range(n) if indegree[i] == 0}
    order = []
    while ready:
        pick = min(ready, key=lambda i: (net(i), i))
        ready.remove(pick)
        order.append(pick)
        for s in d.reads[pick]:
            remaining[s] -= 1
        for j in d.succs[pick]:
            indegree[j] -= 1
            if indegree[j] == 0:
                ready.add(j)
    return [d.names[i] for i in order]


def improve(
    graph: Graph, order: Sequence[str], deps: Dependencies | None = None, time_limit_s: float = 2.0
) -> list[str]:
    """Hill climbing: move one op as early or as late as its dependencies allow while that
    lowers (peak, total of live bytes over the steps); repeat until no move helps."""
    d = deps or dependencies(graph)
    index = {name: i for i, name in enumerate(d.names)}
    seq = [index[name] for name in order]
    deadline = time.monotonic() + time_limit_s
    best = _score(graph, d, seq)
    improved = True
    while improved and time.monotonic() < deadline:
        improved = False
        for op in sorted(range(len(seq)), key=lambda i: -sum(d.creates[i].values())):
            if time.monotonic() > deadline:
                break
            at = seq.index(op)
            lo = max((seq.index(p) for p in d.preds[op]), default=-1) + 1
            hi = min((seq.index(s) for s in d.succs[op]), default=len(seq)) - 1
            for target in (lo, hi):
                if target == at:
                    continue
                trial = seq[:at] + seq[at + 1 :]
                trial.insert(target, op)
                score = _score(graph, d, trial)
                if score < best:
                    seq, best, improved = trial, score, True
                    break
    return [d.names[i] for i in seq]


def _score(graph: Graph, d: Dependencies, seq: Sequence[int]) -> tuple[int, int]:
    live = live_bytes(graph, [d.names[i] for i in seq])
    return max(live, default=0), sum(live)


def orders(graph: Graph) -> dict[str, list[str]]:
    """The capture order and inductor's three sorts, by method name."""
    d = dependencies(graph)
    return {
        "capture": list(d.names),
        "lpmf": order_lpmf(graph, d),
        "bfs": order_bfs(graph, d),
        "dfs": order_dfs(graph, d),
    }


def best_order(graph: Graph, time_limit_s: float = 2.0) -> tuple[list[str], int, str]:
    """(order, its peak bytes, method): the best of the capture order, inductor's three sorts
    and the free-first greedy, improved by hill climbing when that lowers the peak further."""
    d = dependencies(graph)
    candidates = orders(graph)
    candidates["free-first"] = order_free_first(graph, d)
    index = {name: i for i, name in enumerate(d.names)}
    scored = {}
    for method, order in candidates.items():
        check_schedule(graph, order)
        scored[method] = (_score(graph, d, [index[o] for o in order]), order)
    method = min(scored, key=lambda m: scored[m][0])
    (peak, _), order = scored[method]
    better = improve(graph, order, d, time_limit_s)
    better_peak = max(live_bytes(graph, better), default=0)
    if better_peak < peak:
        check_schedule(graph, better)
        return better, better_peak, f"{method}+climb"
    return order, peak, method


def check_order(graph: Graph, order: Sequence[str]) -> None:
    """Raise GraphError unless ``order`` runs every op of ``graph`` once after everything
    ``dependencies`` puts before it (data, in-place writes, phases, ordered ops)."""
    check_schedule(graph, order)
    d = dependencies(graph)
    position = {name: i for i, name in enumerate(order)}
    for i, name in enumerate(d.names):
        for p in d.preds[i]:
            if position[d.names[p]] > position[name]:
                raise GraphError(f"op order runs {name!r} before {d.names[p]!r}, which must come first "
                                 f"(a phase, an in-place write or a random draw keeps their capture order)")


def reorder_graph(graph: Graph, order: Sequence[str], method: str) -> Graph:
    """``graph`` with its ops run in ``order`` (checked by ``check_order``): the same tensors and
    ops, every tensor's users listed in the new order, ``meta["op_order"]`` = ``method``. Blocks
    keep their op lists, which pair ops across repeated blocks by position in the list."""
    check_order(graph, order)
    position = {name: i for i, name in enumerate(order)}
    tensors = {
        name: dataclasses.replace(t, users=sorted(t.users, key=position.__getitem__))
        for name, t in graph.tensors.items()
    }
    return Graph(
        name=graph.name, tensors=tensors, ops=[dataclasses.replace(graph.op(n)) for n in order],
        inputs=list(graph.inputs), outputs=list(graph.outputs), blocks=list(graph.blocks),
        meta={**graph.meta, "op_order": method},
    )
