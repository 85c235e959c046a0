"""The decisions as linear data: device bytes per step, costs, channel loads, precedences.

Units that share a block-template key share one decision (the block structure shrinks the model);
a *pair* is (key, option) for every option other than keep. ``delta[pair, step]`` is how that
choice changes the device's live bytes while the step's op runs (negative: freed); the keep-all
profile plus the chosen rows is the model's device profile, exact for keep/swap/recompute
lifetimes. Recompute groups run right before their step, without that op's outputs but with their
own transient bytes (``transient[pair, step]``, an upper bound: the whole chain at once). Transfer time is not exact here (queues interact); it is priced
by per-window channel loads in the solver and measured exactly by ``simulate``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection

import numpy as np

from tierplan.placement.candidates import KEEP, RECOMPUTE, Option, Problem

Key = tuple


@dataclass
class Transfer:
    queue: str
    first: int  # first step of the window it can hide behind
    last: int  # last step of the window
    time_s: float


@dataclass
class Anchor:
    """If ``user`` is recomputed, ``owner`` must take one of ``allowed`` (or keep)."""

    user: Key
    owner: Key
    allowed: frozenset[str]
    option: Option = RECOMPUTE  # the user's recompute option this precedence belongs to


@dataclass
class Linear:
    problem: Problem
    keys: list[Key]
    units_of: dict[Key, list[int]]
    options: dict[Key, list[Option]]  # non-keep options available to every unit of the key
    pairs: list[tuple[Key, Option]]
    delta: np.ndarray  # (pairs, steps) int64
    cost_s: np.ndarray  # (pairs,) recompute seconds, or the swap's unhidden copy time (estimate)
    swap_bytes: dict[str, np.ndarray]  # tier -> (pairs,) bytes held on that tier (upper bound)
    transfers: dict[int, list[Transfer]]  # pair index -> copies it puts on the queues
    anchors: list[Anchor]
    base: np.ndarray  # (steps,) keep-all live bytes
    transient: np.ndarray  # (pairs, steps) int64, bytes a recompute group adds before the step
    pre_base: np.ndarray  # (steps,) keep-all live bytes right before the step's op runs
    pair_index: dict[tuple[Key, Option], int] = field(default_factory=dict)
    # Choices that exclude each other: a recompute reading a streamed storage where the stream
    # does not hold it on the device.
    conflicts: list[tuple[tuple[Key, Option], tuple[Key, Option]]] = field(default_factory=list)

    def transient_steps(self) -> np.ndarray:
        return np.nonzero(self.transient.any(axis=0))[0] if self.transient.size else np.zeros(0, dtype=int)

    def fates(self, choice: dict[Key, Option]) -> dict:
        """member (a unit index, or ("stream"|"offload", index)) -> option."""
        return {u: choice.get(key, KEEP) for key, units in self.units_of.items() for u in units}

    def choice(self, fates: dict) -> dict[Key, Option] | None:
        """The inverse of ``fates``: this model's choice for member fates, or None when the model
        cannot express them (members of one shared key differ, or an option is not offered)."""
        out: dict[Key, Option] = {}
        for key, members in self.units_of.items():
            picked = {fates.get(m, KEEP) for m in members}
            if len(picked) != 1:
                return None
            option = picked.pop()
            if option != KEEP:
                if option not in self.options[key]:
                    return None
                out[key] = option
        return out


def unit_key(problem: Problem, index: int, shared: bool) -> Key:
    unit = problem.units[index]
    return ("block",) + unit.share_key if shared and unit.share_key is not None else ("unit", index)


def linearize(problem: Problem, *, shared: bool = False, restrict: bool = False,
              tiers: Collection[str] | None = None) -> Linear:
    """``shared``: units at the same place of repeated blocks take one decision (a model the size
    of one block). ``restrict``: only v1's options (recompute at the unit's own first backward use,
    the default swap window), a smaller model whose answers are valid choices of the full one.
    ``tiers``: the slower tiers swap / stream / offload options may use (None: all; empty: the
    remat-only sub-model)."""
    units_of: dict[Key, list] = {}
    for index in range(len(problem.units)):
        units_of.setdefault(unit_key(problem, index, shared), []).append(index)
    options: dict[Key, list[Option]] = {}
    for key, members in units_of.items():
        common = set(problem.units[members[0]].options())
        for m in members[1:]:
            common &= set(problem.units[m].options())
        if restrict:
            common = {o for o in common if o.earlier == 0}
        if tiers is not None:
            common = {o for o in common if o.is_recompute or o.tier in tiers}
        options[key] = [o for o in problem.units[members[0]].options() if o in common and o != KEEP]
    for i, stream in enumerate(problem.streams):
        if tiers is not None and stream.tier not in tiers:
            continue
        key = ("stream", stream.storage)
        units_of.setdefault(key, []).append(("stream", i))
        options.setdefault(key, []).append(stream.option)
    for i, off in enumerate(problem.offloads):
        if tiers is not None and off.tier not in tiers:
            continue
        key = ("offload", off.storage)
        units_of.setdefault(key, []).append(("offload", i))
        options.setdefault(key, []).append(off.option)
    pairs = [(key, o) for key in units_of for o in options[key]]
    pair_index = {p: i for i, p in enumerate(pairs)}
    n = len(problem.order)
    diff = np.zeros((len(pairs), n + 1), dtype=np.int64)
    transient = np.zeros((len(pairs), n), dtype=np.int64)
    cost = np.zeros(len(pairs))
    tiers = [t for t in problem.capacities if t != "device"]
    swap_bytes = {t: np.zeros(len(pairs), dtype=np.int64) for t in tiers}
    transfers: dict[int, list[Transfer]] = {}
    for p, (key, option) in enumerate(pairs):
        row = diff[p]
        tier = option.tier
        for u in units_of[key]:
            if isinstance(u, tuple):
                kind, i = u
                if kind == "stream":
                    st = problem.streams[i]
                    if st.tier != tier:
                        continue
                    _add(row, 0, n - 1, -st.nbytes)
                    swap_bytes[tier][p] += st.nbytes
                    for (first, last), q, hidden in zip(st.clusters, st.fetch, st.hidden_s):
                        _add(row, q, last, st.nbytes)
                        cost[p] += max(0.0, st.in_s - hidden)
                        transfers.setdefault(p, []).append(Transfer(st.in_queue, q, first - 1, st.in_s))
                else:
                    off = problem.offloads[i]
                    if off.tier != tier:
                        continue
                    _add(row, off.wait + 1, n - 1, -off.nbytes)
                    swap_bytes[tier][p] += off.nbytes
                    cost[p] += max(0.0, off.out_s - off.hidden_s)
                    transfers.setdefault(p, []).append(Transfer(off.out_queue, off.start + 1, off.wait, off.out_s))
                continue
            unit = problem.units[u]
            if tier is None:
                seg = unit.segment_for(option)
                assert seg is not None
                for s in unit.storages:
                    _add(row, unit.last_fwd[s] + 1, seg.at - 1, -problem.graph.tensors[s].nbytes)
                transient[p, seg.at] += seg.transient_bytes
                cost[p] += seg.time_s
                continue
            for w in unit.windows(option):
                _add(row, w.out_wait + 1, w.in_start - 1, -w.nbytes)
                swap_bytes[tier][p] += w.nbytes
                cost[p] += max(0.0, w.out_s - w.out_hidden_s) + max(0.0, w.in_s - w.in_hidden_s)
                transfers.setdefault(p, []).extend([
                    Transfer(w.out_queue, w.last_fwd + 1, w.out_wait, w.out_s),
                    Transfer(w.in_queue, w.in_start, w.first_bwd - 1, w.in_s),
                ])
    delta = np.cumsum(diff, axis=1)[:, :n]
    anchors = _anchors(problem, units_of, options)
    conflicts = []
    streams_of: dict[str, list] = {}  # one stream per tier the storage can start on
    for st in problem.streams:
        streams_of.setdefault(st.storage, []).append(st)
    for key, members in units_of.items():
        for option in options[key]:
            if not option.is_recompute:
                continue
            for u in members:
                seg = problem.units[u].segment_for(option)
                for storage in seg.persistent if seg is not None else ():
                    for st in streams_of.get(storage, ()):
                        if not st.present_at(seg.at):
                            pair = ((key, option), (("stream", storage), st.option))
                            if pair not in conflicts:
                                conflicts.append(pair)
    graph = problem.graph
    outs = np.array([sum(graph.tensors[o].nbytes for o in op.outputs if not graph.tensors[o].is_view)
                     for op in graph.ops], dtype=np.int64)
    base = np.asarray(problem.base_bytes, dtype=np.int64)
    return Linear(
        problem=problem, keys=list(units_of), units_of=units_of, options=options, pairs=pairs,
        delta=delta, cost_s=cost, swap_bytes=swap_bytes, transfers=transfers, anchors=anchors,
        base=base, transient=transient, pre_base=base - outs, pair_index=pair_index,
        conflicts=conflicts,
    )


def _add(row: np.ndarray, first: int, last: int, value: int) -> None:
    if last >= first:
        row[first] += value
        row[last + 1] -= value


def _anchors(problem: Problem, units_of: dict[Key, list], options: dict[Key, list[Option]]) -> list[Anchor]:
    """A recomputed unit reads its anchors at its recompute step: each must be there then."""
    key_of = {u: key for key, members in units_of.items() for u in members if not isinstance(u, tuple)}
    found: dict[tuple[Key, Option, Key], set[Option]] = {}
    for index, unit in enumerate(problem.units):
        user = key_of[index]
        for option, seg in unit.recomputes.items():
            if option not in options[user]:
                continue
            at = seg.at
            for storage in seg.anchors:
                owner_index = problem.unit_of_storage.get(storage)
                if owner_index is None:
                    continue
                owner = problem.units[owner_index]
                allowed = {KEEP} | {o for o in owner.options() if o != KEEP and owner.lands(o, storage) <= at}
                triple = (user, option, key_of[owner_index])
                found[triple] = found[triple] & allowed if triple in found else allowed
    return [Anchor(u, o, frozenset(a), option=opt) for (u, opt, o), a in found.items()]


def anchors_ok(linear: Linear, choice: dict[Key, Option], key: Key, option: Option) -> bool:
    """Whether setting ``key`` to ``option`` keeps every anchor precedence satisfied."""
    def fate(k: Key) -> Option:
        return option if k == key else choice.get(k, KEEP)

    for a in linear.anchors:
        if (a.user == key or a.owner == key) and fate(a.user) == a.option and fate(a.owner) not in a.allowed:
            return False
    for (k1, o1), (k2, o2) in linear.conflicts:
        if (k1 == key or k2 == key) and fate(k1) == o1 and fate(k2) == o2:
            return False
    return True


def greedy(linear: Linear, budget: int) -> dict[Key, Option]:
    """Free bytes at the worst step, cheapest seconds per byte first, until the profile fits.

    A fast heuristic (the solver's hint and its fallback); it ignores channel contention.
    """
    choice: dict[Key, Option] = {}
    profile = linear.base.copy()
    pre_steps = linear.transient_steps()
    pre = linear.pre_base[pre_steps].copy()
    pre_delta = linear.delta[:, pre_steps] + linear.transient[:, pre_steps]
    host_left = {t: linear.problem.capacities[t] for t in linear.swap_bytes}
    blocked: set[int] = set()
    tiny = 1e-9 * max(float(np.sum(list(linear.problem.op_time_s.values()))), 1e-12)
    while True:
        worst = int(np.argmax(profile))
        worst_pre = int(np.argmax(pre)) if len(pre) else -1
        if len(pre) and pre[worst_pre] > profile[worst]:
            if pre[worst_pre] <= budget:
                return choice
            column = pre_delta[:, worst_pre]
        else:
            if profile[worst] <= budget:
                return choice
            column = linear.delta[:, worst]
        best, best_score = -1, float("inf")
        for p in np.nonzero(column < 0)[0]:
            key, option = linear.pairs[p]
            if key in choice or p in blocked:
                continue
            tier = option.tier
            if tier is not None and linear.swap_bytes[tier][p] > host_left[tier]:
                continue
            # Seconds per byte freed at the worst step; a transient that would itself overflow
            # is caught by the next round (its step becomes the worst).
            score = (linear.cost_s[p] + tiny) / float(-column[p])
            if score < best_score:
                best, best_score = p, score
        if best < 0:
            return choice  # nothing left to free there: the caller measures and reports
        key, option = linear.pairs[best]
        if not anchors_ok(linear, choice, key, option):
            blocked.add(best)
            continue
        choice[key] = option
        tier = option.tier
        if tier is not None:
            host_left[tier] -= int(linear.swap_bytes[tier][best])
        profile += linear.delta[best]
        pre += pre_delta[best]
