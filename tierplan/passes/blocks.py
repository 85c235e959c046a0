"""Detection of repeated blocks (the layers of a transformer) in a captured graph.

Structural, not name-based: every op is reduced to a token (target + the shapes and dtypes it
reads and writes), and a repeated block is a tandem repeat of the token sequence, a run
``u u ... u`` of one unit ``u``. For a candidate period p, ``tok[i] == tok[i + p]`` holds over a
stretch exactly when the stretch is periodic with period p, so the longest such stretch gives the
longest repetition of that period in O(n) (vectorized). Candidate periods are the distances
between consecutive occurrences of the same token (a token that appears once per layer recurs at
the layer's length), most frequent first; the sort behind them makes the search O(n log n).

The forward ops are searched first, the repetition covering most ops wins, and the stretches left
on either side are searched again (an encoder and a decoder give two groups of blocks).

Where a repetition starts is ambiguous when the ops around it happen to match its ends: any shift
that stays inside the periodic stretch is equally periodic. The shift is chosen so that block
starts fall where a label changes between consecutive ops: in the forward, the layer part of the
module path when capture recorded one ("h.3" -> "h.4"); in the backward, the forward block that
each backward op differentiates, known from data flow: a backward op reads the parameters of its
layer (or writes their gradients), or failing that the activations its layer saved. Each backward
repetition then takes the forward block index most of its ops point at, so the forward and
backward ops of layer i share block index i.
"""
from __future__ import annotations

import copy
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Hashable, Sequence

import numpy as np

from tierplan.ir import BlockInfo, Graph, Phase, TensorKind

# Periods shorter than this are not blocks (e.g. two views in a row).
MIN_PERIOD = 3
# How many candidate periods are scored per search.
MAX_CANDIDATES = 64


@dataclass(frozen=True)
class Repeat:
    """``count`` consecutive copies of a ``period``-op unit starting at ``start`` of a sequence."""

    start: int
    period: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.period * self.count

    @property
    def covered(self) -> int:
        return self.period * self.count


def detect_blocks(graph: Graph, *, min_period: int = MIN_PERIOD, min_repeats: int = 2) -> Graph:
    """A copy of ``graph`` with ``blocks`` and every ``OpInfo.block`` filled in."""
    result = Graph(
        name=graph.name,
        tensors={n: replace(t, users=list(t.users)) for n, t in graph.tensors.items()},
        ops=[
            replace(op, inputs=list(op.inputs), outputs=list(op.outputs), block=None)
            for op in graph.ops
        ],
        inputs=list(graph.inputs),
        outputs=list(graph.outputs),
        blocks=[],
        meta=copy.deepcopy(graph.meta),
    )
    ops = result.ops
    tokens = op_tokens(result)
    heavy = np.array([op.flops > 0 for op in ops], dtype=bool)
    fw = [i for i, op in enumerate(ops) if op.phase is Phase.FORWARD]
    bw = [i for i, op in enumerate(ops) if op.phase is Phase.BACKWARD]

    # Forward: groups of repeated blocks, numbered in forward order.
    fw_tokens = np.array([tokens[i] for i in fw], dtype=np.int64)
    layer_keys = [_layer_key(ops[i].module) for i in fw]
    repeats = find_repeats(
        fw_tokens, heavy=heavy[fw], min_period=min_period, min_repeats=min_repeats
    )
    repeats = sorted((align(r, fw_tokens, layer_keys) for r in repeats), key=lambda r: r.start)
    templates: list[int] = []
    for rep in repeats:
        first = len(templates)
        for j in range(rep.count):
            for pos in range(rep.start + j * rep.period, rep.start + (j + 1) * rep.period):
                ops[fw[pos]].block = len(templates)
            templates.append(first)

    if bw and templates:
        _assign_backward(result, bw, tokens, heavy[bw], min_period, min_repeats)

    members: list[list[str]] = [[] for _ in templates]
    for op in ops:
        if op.block is not None:
            members[op.block].append(op.name)
    result.blocks = [
        BlockInfo(index=b, ops=names, template=templates[b]) for b, names in enumerate(members)
    ]
    return result


def op_tokens(graph: Graph) -> list[int]:
    """One integer per op, equal for ops with the same target and input/output shapes/dtypes."""
    ids: dict[tuple, int] = {}
    tensors = graph.tensors
    out = []
    for op in graph.ops:
        key = (
            op.target,
            tuple((tensors[t].shape, tensors[t].dtype) for t in op.inputs),
            tuple((tensors[t].shape, tensors[t].dtype) for t in op.outputs),
        )
        out.append(ids.setdefault(key, len(ids)))
    return out


def find_repeats(
    tokens: np.ndarray,
    *,
    heavy: np.ndarray | None = None,
    min_period: int = MIN_PERIOD,
    min_repeats: int = 2,
) -> list[Repeat]:
    """Non-overlapping tandem repeats of ``tokens``, the one covering most ops first.

    With ``heavy`` (one bool per token), a unit must contain a heavy op: a run of elementwise
    bookkeeping (say, the running-statistics updates of consecutive BatchNorms) is no layer.
    """
    found: list[Repeat] = []
    pending = [(0, len(tokens))]
    if heavy is None:
        heavy = np.ones(len(tokens), dtype=bool)
    while pending:
        lo, hi = pending.pop()
        best = _longest_repeat(tokens[lo:hi], heavy[lo:hi], min_period, min_repeats)
        if best is None:
            continue
        rep = replace(best, start=best.start + lo)
        found.append(rep)
        pending += [(lo, rep.start), (rep.end, hi)]
    return sorted(found, key=lambda r: -r.covered)


def _longest_repeat(
    a: np.ndarray, heavy: np.ndarray, min_period: int, min_repeats: int
) -> Repeat | None:
    best: Repeat | None = None
    for p in _candidate_periods(a, min_period, len(a) // max(min_repeats, 1)):
        eq = a[p:] == a[:-p]
        edges = np.diff(np.concatenate(([0], eq.view(np.int8), [0])))
        starts = np.flatnonzero(edges == 1)
        if not len(starts):
            continue
        lengths = np.flatnonzero(edges == -1) - starts
        i = int(np.argmax(lengths))
        start = int(starts[i])
        # tok[i] == tok[i+p] over [s, s+L) makes [s, s+L+p) periodic: (L+p) // p whole units.
        count = (int(lengths[i]) + p) // p
        if count < min_repeats or len(np.unique(a[start : start + p])) < 2:
            continue
        if not heavy[start : start + p].any():
            continue
        cand = Repeat(start, p, count)
        if best is None or (cand.covered, -p) > (best.covered, -best.period):
            best = cand
    return best


def _candidate_periods(a: np.ndarray, min_period: int, max_period: int) -> list[int]:
    if len(a) < 2:
        return []
    order = np.argsort(a, kind="stable")  # equal tokens end up adjacent, in position order
    same = a[order[1:]] == a[order[:-1]]
    gaps = (order[1:] - order[:-1])[same]
    gaps = gaps[(gaps >= min_period) & (gaps <= max_period)]
    return [int(g) for g, _ in Counter(gaps.tolist()).most_common(MAX_CANDIDATES)]


def align(rep: Repeat, tokens: np.ndarray, labels: Sequence[Hashable | None]) -> Repeat:
    """Shift ``rep`` inside its periodic stretch so block starts fall on changes of label.

    A change is two consecutive labelled positions u < v with different labels; it is honoured
    when a block starts in (u, v]. Counting, for every start residue modulo the period, the
    changes it honours is O(n + period) with a difference array.
    """
    p, n = rep.period, len(tokens)
    lo, hi = rep.start, rep.end
    while lo > 0 and lo - 1 + p < n and tokens[lo - 1] == tokens[lo - 1 + p]:
        lo -= 1
    while hi < n and tokens[hi] == tokens[hi - p]:
        hi += 1
    first, last = lo, hi - rep.covered  # legal starts keep all rep.count blocks
    if first == last:
        return rep
    diff = np.zeros(p + 1, dtype=np.int64)
    prev: tuple[int, Hashable] | None = None
    for pos in range(lo, hi):
        label = labels[pos]
        if label is None:
            continue
        if prev is not None and prev[1] != label:
            u, v = prev[0], pos  # a start in (u, v] separates the two labels
            if v - u >= p:
                diff[0] += 1
                diff[p] -= 1
            else:
                a, b = (u + 1) % p, v % p
                if a <= b:
                    diff[a] += 1
                    diff[b + 1] -= 1
                else:
                    diff[a] += 1
                    diff[p] -= 1
                    diff[0] += 1
                    diff[b + 1] -= 1
        prev = (pos, label)
    score = np.cumsum(diff)[:p]
    if not score.any():
        return rep
    candidates = range(max(first, rep.start - p + 1), min(last, rep.start + p - 1) + 1)
    best = max(candidates, key=lambda s: (score[s % p], -abs(s - rep.start)))
    return Repeat(best, p, rep.count)


_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def _layer_key(module: str) -> str | None:
    """The module path up to its first numeric component ("model.layers.3"), if any."""
    m = _LAYER.match(module)
    return m.group(1) if m else None


def _assign_backward(
    graph: Graph,
    bw: list[int],
    tokens: list[int],
    heavy: np.ndarray,
    min_period: int,
    min_repeats: int,
) -> None:
    ops = graph.ops
    votes = _backward_votes(graph, bw)
    # Module paths, when recorded, confirm the votes: a backward op carries the module of the
    # forward op it differentiates, so its layer key names a forward block.
    key_block = _key_blocks(graph)
    keys = [_layer_key(ops[i].module) for i in bw]
    votes = [v if v >= 0 else key_block.get(k, -1) if k else -1 for v, k in zip(votes, keys)]
    labels: Sequence[Hashable | None] = (
        keys if any(keys) else [v if v >= 0 else None for v in votes]
    )
    bw_tokens = np.array([tokens[i] for i in bw], dtype=np.int64)
    repeats = find_repeats(bw_tokens, heavy=heavy, min_period=min_period, min_repeats=min_repeats)
    taken: set[int] = set()
    for rep in sorted((align(r, bw_tokens, labels) for r in repeats), key=lambda r: r.start):
        for j in range(rep.count):
            lo = rep.start + j * rep.period
            tally = Counter(v for v in votes[lo : lo + rep.period] if v >= 0)
            if not tally:
                continue
            block = tally.most_common(1)[0][0]
            if block in taken:
                continue
            taken.add(block)
            for pos in range(lo, lo + rep.period):
                ops[bw[pos]].block = block


def _key_blocks(graph: Graph) -> dict[str, int]:
    """Layer key -> forward block, for keys whose forward ops all lie in one block."""
    found: dict[str, set[int | None]] = {}
    for op in graph.ops:
        key = _layer_key(op.module)
        if op.phase is Phase.FORWARD and key:
            found.setdefault(key, set()).add(op.block)
    return {k: next(iter(b)) for k, b in found.items() if len(b) == 1 and None not in b}


def _backward_votes(graph: Graph, bw: list[int]) -> list[int]:
    """For each backward op, the forward block it differentiates, by data flow (-1: unknown).

    Strong evidence: the op reads a parameter of that block (all forward readers of the
    parameter are in it) or writes the gradient of one. Weak evidence, used when there is no
    strong one: it reads an activation that was produced and read in the forward by that block
    only. An activation crossing blocks (a layer's input, made by the previous layer) is no
    evidence: the layer norm backward that reads it belongs to the reading layer.
    """
    ops, tensors = graph.ops, graph.tensors
    fw_block = {op.name: op.block for op in ops if op.phase is Phase.FORWARD}
    touching: dict[str, set[int | None]] = {}  # storage -> blocks of forward ops touching it
    for t in tensors.values():
        blocks = touching.setdefault(t.storage, set())
        blocks.update(fw_block[u] for u in t.users if u in fw_block)
        if t.producer in fw_block:
            blocks.add(fw_block[t.producer])
    owned = {
        name: next(iter(blocks))
        for name, blocks in touching.items()
        if len(blocks) == 1 and None not in blocks
    }
    grad_of = graph.meta.get("grad_of", {})
    votes = []
    for pos in bw:
        op = ops[pos]
        strong: Counter[int] = Counter()
        weak: Counter[int] = Counter()
        for name in op.inputs:
            owner = tensors[name].storage
            block = owned.get(owner)
            if block is None:
                continue
            if tensors[owner].kind is TensorKind.PARAMETER:
                strong[block] += 1
            else:
                weak[block] += 1
        for name in op.outputs:
            block = owned.get(grad_of.get(name, ""))
            if block is not None:
                strong[block] += 1
        tally = strong or weak
        votes.append(tally.most_common(1)[0][0] if tally else -1)
    return votes


__all__ = ["Repeat", "align", "detect_blocks", "find_repeats", "op_tokens"]
