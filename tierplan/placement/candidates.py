"""What the remat/swap planner may decide, read off a graph in capture order.

A *unit* is a forward op whose outputs are read again after the first backward reader of any of
them (activations). Its fate is decided as a whole, because re-running the op re-creates all of
its outputs at once:

- keep: every output lives on the device from the op to its last reader (the keep-all lifetime);
- swap to a tier: each output with a backward reader is copied out right after its last forward
  reader, its device copy is freed once the copy has landed, and it is copied back early enough
  before its first backward reader that the copy can hide behind compute;
- recompute: the outputs are freed after their last forward reader and the op (with the chain of
  dead producers it needs) runs again right before the first backward reader.

Every option changes the device's live bytes by a fixed amount over fixed step ranges, so the
memory at every step is a linear function of the choices (what the solver model needs). The
exact schedule and its figures come from ``schedule`` and ``simulate``; this module only describes the options.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Sequence

from tierplan.ir import PERSISTENT_KINDS, Graph, Phase, TensorKind
from tierplan.passes.liveness import Liveness, liveness
from tierplan.placement.keep_all import keep_all_plan
from tierplan.plans.plan import DEVICE, Channel, Plan, Pricing

# Option kinds.
KEEP_KIND = "keep"
RECOMPUTE_KIND = "recompute"
SWAP = "swap"  # a unit's outputs copied out after their last forward reader and back before use
STREAM = "stream"  # a caller-owned storage starts on a slower tier, fetched for each use cluster
OFFLOAD = "offload"  # a gradient copied out once produced, its device copy freed


class Option(NamedTuple):
    """One choice for a unit, a stream or an offload: what happens to its bytes.

    ``tier``: where SWAP, STREAM and OFFLOAD move them (None for keep and recompute).
    ``earlier`` > 0: a recompute re-runs, or a swap's prefetch lands, that many steps before the
    unit's own first backward use (where a unit that reads it is recomputed, e.g. at the block's
    first backward use). A tuple, so that it hashes and compares at C speed in the search.
    """

    kind: str
    tier: str | None = None
    earlier: int = 0

    @property
    def is_recompute(self) -> bool:
        return self.kind == RECOMPUTE_KIND

    @property
    def is_swap(self) -> bool:
        return self.kind == SWAP

    def __str__(self) -> str:
        """``swap:host@3``: the form reports and messages print."""
        return self.kind + (f":{self.tier}" if self.tier else "") + (f"@{self.earlier}" if self.earlier else "")


KEEP = Option(KEEP_KIND)
RECOMPUTE = Option(RECOMPUTE_KIND)  # at the unit's own first backward use

# A recompute chain longer than this is not offered: it would rarely beat a swap, and long chains
# make the transient bytes of the recompute group (counted conservatively) meaningless.
MAX_CHAIN_OPS = 32

# At most this many recompute points (and as many early-prefetch swap variants) per unit.
MAX_POINTS = 4


def swap_option(tier: str, earlier: int = 0) -> Option:
    return Option(SWAP, tier, earlier)


def recompute_option(earlier: int = 0) -> Option:
    return Option(RECOMPUTE_KIND, None, earlier)


@dataclass(frozen=True)
class SwapWindow:
    """Where the copies of one storage go when its unit is swapped to ``tier``.

    The offload starts after step ``last_fwd`` and is waited for after step ``out_wait``, when the
    device copy is freed; the prefetch starts before step ``in_start`` and is waited for before
    step ``first_bwd``. The storage is off the device for the steps in (out_wait, in_start).
    These are the model's windows; the built schedule may move the wait later and the prefetch
    earlier where the copy queue and the budget call for it (``retime``).
    """

    storage: str
    tier: str
    nbytes: int
    last_fwd: int
    out_wait: int
    in_start: int
    first_bwd: int
    out_s: float  # time of the offload copy (latency + bytes / bandwidth)
    in_s: float  # time of the prefetch copy
    out_queue: str
    in_queue: str
    out_hidden_s: float  # compute between the offload's start and its wait
    in_hidden_s: float  # compute between the prefetch's start and its wait


@dataclass(frozen=True)
class Segment:
    """The ops a recompute of a unit runs at step ``at`` (in topological order)."""

    at: int
    ops: tuple[str, ...]
    anchors: tuple[str, ...]  # storages the ops read that must be on the device at ``at``
    transient_bytes: int  # bytes it creates beyond the unit's own activations (upper bound)
    time_s: float
    persistent: tuple[str, ...] = ()  # caller-owned storages the ops read (streamed ones must be there)


@dataclass
class Unit:
    op: str  # the producer
    position: int
    storages: tuple[str, ...]  # its outputs read again in the backward (the ones that move)
    last_fwd: dict[str, int]  # storage -> its last reader before its first backward reader
    first_bwd: dict[str, int]  # storage -> its first backward reader
    nbytes: int
    segment: Segment | None = None  # None: recompute is not an option
    swaps: dict[str, list[SwapWindow]] = field(default_factory=dict)  # tier -> windows
    # (block template, index in block) when repeated: where a shared model gives one decision.
    share_key: tuple[int, int] | None = None
    # Every recompute option (recompute_option(d)) -> its segment; every swap option -> windows.
    recomputes: dict[Option, Segment] = field(default_factory=dict)
    swap_variants: dict[Option, list[SwapWindow]] = field(default_factory=dict)

    @property
    def recompute_at(self) -> int:
        return min(self.first_bwd.values())

    def options(self) -> list[Option]:
        opts = [KEEP]
        if self.recomputes:
            opts.extend(self.recomputes)
        elif self.segment is not None:
            opts.append(RECOMPUTE)
        if self.swap_variants:
            opts.extend(self.swap_variants)
        else:
            opts.extend(swap_option(tier) for tier in self.swaps)
        return opts

    def segment_for(self, option: Option) -> Segment | None:
        if option == RECOMPUTE and option not in self.recomputes:
            return self.segment
        return self.recomputes.get(option)

    def windows(self, option: Option) -> list[SwapWindow]:
        if option in self.swap_variants:
            return self.swap_variants[option]
        return self.swaps[option.tier]  # type: ignore[index]

    def lands(self, option: Option, storage: str) -> int:
        """The step before which ``storage`` is back on the device under ``option`` (a swap or
        a recompute); the keep-all first backward use for keep."""
        if option.is_recompute:
            seg = self.segment_for(option)
            return seg.at if seg is not None else self.first_bwd[storage]
        if option.is_swap:
            for w in self.windows(option):
                if w.storage == storage:
                    return w.first_bwd
        return self.first_bwd[storage]


@dataclass(frozen=True)
class Stream:
    """A caller-owned storage (a parameter, optimizer state, a buffer) that may start on a slower
    tier and be fetched to the device for each cluster of uses, its device copy freed after each.

    ``clusters``: (first, last) step of each cluster of reads (forward, backward, optimizer);
    ``fetch``: the step before which each fetch starts. The device holds it over
    [fetch, last] of each cluster; a recompute that reads it elsewhere conflicts with streaming.
    """

    storage: str
    tier: str
    nbytes: int
    clusters: tuple[tuple[int, int], ...]
    fetch: tuple[int, ...]
    in_s: float
    in_queue: str
    hidden_s: tuple[float, ...]  # compute between each fetch's start and its wait

    @property
    def option(self) -> Option:
        return Option(STREAM, self.tier)

    def present_at(self, step: int) -> bool:
        """Whether it is on the device and landed (waited for) before ``step``'s recomputes."""
        return any(first <= step <= last for first, last in self.clusters)


@dataclass(frozen=True)
class Offload:
    """A gradient (a graph output) copied to a slower tier once its last device reader ran; its
    device copy is freed when the copy has landed (ZeRO-Offload's gradient offload)."""

    storage: str
    tier: str
    nbytes: int
    start: int  # the copy starts after this step
    wait: int  # and is waited for after this step
    out_s: float
    out_queue: str
    hidden_s: float

    @property
    def option(self) -> Option:
        return Option(OFFLOAD, self.tier)


@dataclass
class Problem:
    """Everything the solver and the plan builder read, derived once from the graph."""

    graph: Graph
    pricing: Pricing
    keep_all: Plan  # the reference: every plan's overhead is measured against it
    order: list[str]
    position: dict[str, int]
    units: list[Unit]
    unit_of_storage: dict[str, int]  # storage -> index in units
    base_bytes: list[int]  # keep-all live bytes at each step
    start: dict[str, int]  # storage -> keep-all first step
    end: dict[str, int]  # storage -> keep-all end (exclusive)
    never_free: frozenset[str]  # storages the caller owns or receives
    cumulative_s: list[float]  # cumulative_s[i] = compute time of steps [0, i)
    streams: list[Stream] = field(default_factory=list)
    offloads: list[Offload] = field(default_factory=list)
    # Streams and offloads that were found but not offered (they enlarge the model; see analyze).
    streams_withheld: bool = False

    @property
    def op_time_s(self) -> Mapping[str, float]:
        return self.pricing.op_time_s

    @property
    def capacities(self) -> Mapping[str, int]:
        return self.pricing.capacities

    @property
    def channels(self) -> Sequence[Channel]:
        return self.pricing.channels

    def compute_between(self, first: int, last: int) -> float:
        """Compute time of steps first..last inclusive (0 when empty)."""
        if last < first:
            return 0.0
        return self.cumulative_s[last + 1] - self.cumulative_s[first]

    def alive_before(self, storage: str, step: int) -> bool:
        """Whether ``storage`` is on the device right before ``step`` in the keep-all plan."""
        if storage in self.never_free and self.start[storage] == 0:
            return True
        return self.start[storage] < step < self.end[storage]


def analyze(
    graph: Graph,
    pricing: Pricing,
    *,
    live: Liveness | None = None,
    keep_all: Plan | None = None,
    offer_streams: bool | None = None,
) -> Problem:
    """The options of every unit, stream and offload of ``graph``.

    ``live`` (the liveness in capture order) and ``keep_all`` (its keep-all plan) are computed
    when the caller does not hand them on. ``offer_streams``: True offers parameter streams and
    gradient offloads always, False never, None where they are a large share of the budget.
    """
    live = live if live is not None else liveness(graph)
    keep_all = keep_all if keep_all is not None else keep_all_plan(graph, pricing, live=live)
    order = list(live.order)
    position = {name: i for i, name in enumerate(order)}
    lives = {life.storage: life for life in live.lifetimes}
    cumulative = [0.0]
    for name in order:
        cumulative.append(cumulative[-1] + pricing.op_time_s[name])
    never_free = frozenset(
        [s for s in graph.storages() if graph.tensors[s].kind in PERSISTENT_KINDS or s in graph.inputs]
        + [graph.tensors[name].storage for name in graph.outputs]
    )
    problem = Problem(
        graph=graph, pricing=pricing, keep_all=keep_all, order=order, position=position,
        units=[], unit_of_storage={}, base_bytes=list(live.live_bytes),
        start={s: life.start for s, life in lives.items()},
        end={s: life.end for s, life in lives.items()},
        never_free=never_free, cumulative_s=cumulative,
    )
    readers = _storage_readers(graph, position)
    for op in graph.ops:
        if op.phase != Phase.FORWARD:
            continue
        unit = _unit_for(problem, op.name, position[op.name], readers)
        if unit is not None:
            problem.unit_of_storage.update({s: len(problem.units) for s in unit.storages})
            problem.units.append(unit)
    for unit in problem.units:
        unit.segment = recompute_segment(problem, unit, unit.recompute_at)
        unit.swaps = _swap_windows(problem, unit)
    _recompute_points(problem)
    _streams_and_offloads(problem, readers)
    # Streams and offloads enlarge the model a lot; offer them only where caller-owned state and
    # gradients are a large share of the budget (otherwise activations decide the plan).
    # (Each storage once, however many tiers could take it: the decision must not depend on them.)
    movable = sum({item.storage: item.nbytes for item in [*problem.streams, *problem.offloads]}.values())
    if offer_streams is False or (offer_streams is None and movable < 0.75 * problem.capacities.get(DEVICE, 0)):
        problem.streams_withheld = bool(problem.streams or problem.offloads)
        problem.streams, problem.offloads = [], []
    _share_keys(problem)
    return problem


def _storage_readers(graph: Graph, position: dict[str, int]) -> dict[str, list[int]]:
    """storage -> sorted positions of the ops that read it (through any view)."""
    out: dict[str, list[int]] = {}
    for op in graph.ops:
        for name in op.inputs:
            out.setdefault(graph.tensors[name].storage, []).append(position[op.name])
    return {s: sorted(set(p)) for s, p in out.items()}


def _unit_for(problem: Problem, op_name: str, pos: int, readers: dict[str, list[int]]) -> Unit | None:
    graph = problem.graph
    storages, last_fwd, first_bwd = [], {}, {}
    for name in graph.op(op_name).outputs:
        t = graph.tensors[name]
        if t.is_view or name in problem.never_free:
            continue
        uses = readers.get(name, [])
        bwd = [p for p in uses if graph.ops[p].phase != Phase.FORWARD]
        if not bwd:
            continue
        b = bwd[0]
        before = [p for p in uses if p < b]
        f = before[-1] if before else pos
        if b - f < 2 or t.nbytes == 0:
            continue  # nothing to gain: it is needed again right away
        storages.append(name)
        last_fwd[name], first_bwd[name] = f, b
    if not storages:
        return None
    return Unit(
        op=op_name, position=pos, storages=tuple(storages), last_fwd=last_fwd, first_bwd=first_bwd,
        nbytes=sum(graph.tensors[s].nbytes for s in storages),
    )


def recompute_segment(problem: Problem, unit: Unit, at: int) -> Segment | None:
    """The ops to re-run right before step ``at`` to re-create ``unit``'s storages, or None.

    The chain grows backwards through storages that are dead at ``at`` in the keep-all plan; it
    stops at storages alive there (the anchors, which the solver must keep available). Outputs of
    the re-run ops that the recompute does not need are discarded (``Step.discard``), so an op
    whose other output is still held (a dropout's mask) can be re-run for the one that is not.
    """
    graph = problem.graph
    moved = set(unit.storages)
    ops, anchors, stack, seen = {unit.op}, set(), [unit.op], {unit.op}
    persistent: set[str] = set()
    while stack:
        for name in graph.op(stack.pop()).inputs:
            storage = graph.tensors[name].storage
            if storage in problem.never_free and problem.start[storage] == 0:
                persistent.add(storage)
                continue
            if storage in moved or problem.alive_before(storage, at):
                if storage not in moved:
                    anchors.add(storage)
                continue
            producer = graph.tensors[storage].producer
            if producer is None or producer in seen:
                continue
            seen.add(producer)
            ops.add(producer)
            stack.append(producer)
            if len(ops) > MAX_CHAIN_OPS:
                return None
    ordered = sorted(ops, key=problem.position.__getitem__)
    transient = sum(
        graph.tensors[o].nbytes
        for op in ordered for o in graph.op(op).outputs
        if not graph.tensors[o].is_view and o not in moved
    )
    return Segment(
        at=at, ops=tuple(ordered), anchors=tuple(sorted(anchors)), transient_bytes=transient,
        time_s=sum(problem.op_time_s[op] for op in ordered), persistent=tuple(sorted(persistent)),
    )


def _recompute_points(problem: Problem) -> None:
    """Offer each unit recompute (and early-prefetch swap) options at the recompute points of the
    units that read it, so that groups recomputed together (checkpoint-blocks: every unit of a
    block at the block's first backward use) and mixes of them are in the option space.

    Units are visited from the last to the first: a reader's points are final before the units
    it anchors on see them (a chain of readers propagates its earliest point to the front).
    """
    extra: dict[int, set[int]] = {i: set() for i in range(len(problem.units))}
    # The block's first backward use (where checkpoint-blocks re-runs the whole block): offered to
    # every unit of the block, so that plan is a choice of the model (a hint, a local-search start).
    by_block: dict[int, list[int]] = {}
    block_points: dict[int, set[int]] = {i: set() for i in range(len(problem.units))}
    for index, unit in enumerate(problem.units):
        block = problem.graph.op(unit.op).block
        if block is not None:
            by_block.setdefault(block, []).append(index)
    graph = problem.graph
    for block, members in by_block.items():
        # Units whose outputs no forward op outside the block reads (checkpoint-blocks' set).
        inside = [m for m in members if not any(
            graph.ops[problem.position[user]].phase == Phase.FORWARD
            and graph.ops[problem.position[user]].block != block
            for name in graph.op(problem.units[m].op).outputs
            for user in graph.tensors[graph.tensors[name].storage].users)]
        for group in (members, inside):
            if group:
                first = min(problem.units[m].recompute_at for m in group)
                for m in members:
                    extra[m].add(first)
                    block_points[m].add(first)
    for index in sorted(range(len(problem.units)), key=lambda i: -problem.units[i].position):
        unit = problem.units[index]
        own = unit.recompute_at
        floor = max(unit.last_fwd.values()) + 2
        points = sorted((p for p in extra[index] if floor <= p < own), reverse=True)
        if len(points) > MAX_POINTS - 1:  # the earliest (whole group) and the nearest ones
            points = points[:MAX_POINTS - 2] + [points[-1]]
            points += sorted((p for p in block_points[index] if floor <= p < own and p not in points),
                             reverse=True)
        unit.recomputes = {}
        if unit.segment is not None:
            unit.recomputes[RECOMPUTE] = unit.segment
        for at in points:
            seg = recompute_segment(problem, unit, at)
            if seg is not None:
                unit.recomputes[recompute_option(own - at)] = seg
        unit.swap_variants = {}
        for tier, windows in unit.swaps.items():
            unit.swap_variants[swap_option(tier)] = windows
            down, up = problem.pricing.channel(DEVICE, tier), problem.pricing.channel(tier, DEVICE)
            for at in points:
                early = [_window(problem, unit, s, tier, down, up, lands=at) for s in unit.storages]
                if all(w is not None for w in early):
                    unit.swap_variants[swap_option(tier, own - at)] = early  # type: ignore[assignment]
        for seg in unit.recomputes.values():
            for storage in seg.anchors:
                owner = problem.unit_of_storage.get(storage)
                if owner is not None and seg.at < problem.units[owner].recompute_at:
                    extra[owner].add(seg.at)


_STREAM_KINDS = frozenset({TensorKind.PARAMETER, TensorKind.BUFFER, TensorKind.OPTIMIZER_STATE})


def _streams_and_offloads(problem: Problem, readers: dict[str, list[int]]) -> None:
    """Stream options for caller-owned storages, offload options for gradients (one per tier
    reachable both ways for streams, one way for offloads)."""
    graph = problem.graph
    n = len(problem.order)
    cum = problem.cumulative_s
    # Storages an op writes; a view an op returns (aten.t of a weight) only reads its base.
    written = {o for op in graph.ops for o in op.outputs if not graph.tensors[o].is_view}
    outputs = {graph.tensors[name].storage for name in graph.outputs}
    inputs = {graph.tensors[name].storage for name in graph.inputs}
    for tier in problem.capacities:
        if tier == DEVICE:
            continue
        down, up = problem.pricing.channel(DEVICE, tier), problem.pricing.channel(tier, DEVICE)
        if up is not None:
            for storage in graph.storages():
                t = graph.tensors[storage]
                if (t.kind not in _STREAM_KINDS or storage not in inputs or storage in written
                        or storage in outputs or t.nbytes == 0):
                    continue
                uses = readers.get(storage, [])
                if not uses:
                    continue
                clusters: list[list[int]] = []
                for pos in uses:
                    if clusters and graph.ops[pos].phase == graph.ops[clusters[-1][1]].phase:
                        clusters[-1][1] = pos
                    else:
                        clusters.append([pos, pos])
                in_s = up.seconds(t.nbytes)
                fetch, hidden, merged = [], [], []
                for first, last in clusters:
                    prev_last = merged[-1][1] if merged else -1
                    # An inline copy hides behind nothing: fetch it right before its reader.
                    q = first if up.inline else bisect.bisect_right(cum, cum[first] - in_s) - 1
                    q = min(first, max(q, prev_last + 1))
                    if merged and q <= prev_last + 1:
                        merged[-1][1] = last  # no room to free in between: one cluster
                        continue
                    merged.append([first, last])
                    fetch.append(q)
                    hidden.append(0.0 if up.inline else problem.compute_between(q, first - 1))
                problem.streams.append(Stream(
                    storage=storage, tier=tier, nbytes=t.nbytes,
                    clusters=tuple((a, b) for a, b in merged), fetch=tuple(fetch), in_s=in_s,
                    in_queue=up.queue, hidden_s=tuple(hidden),
                ))
        if down is not None:
            for storage in graph.storages():
                t = graph.tensors[storage]
                if t.kind != TensorKind.GRADIENT or storage not in outputs or t.producer is None or t.nbytes == 0:
                    continue
                last = max(readers.get(storage, []) + [problem.position[t.producer]])
                out_s = down.seconds(t.nbytes)
                w = last if down.inline else bisect.bisect_left(cum, cum[last + 1] + out_s) - 1
                w = max(last, min(w, n - 1))
                if w >= n - 1:
                    continue
                problem.offloads.append(Offload(
                    storage=storage, tier=tier, nbytes=t.nbytes, start=last, wait=w, out_s=out_s,
                    out_queue=down.queue,
                    hidden_s=0.0 if down.inline else problem.compute_between(last + 1, w),
                ))


def _swap_windows(problem: Problem, unit: Unit) -> dict[str, list[SwapWindow]]:
    out: dict[str, list[SwapWindow]] = {}
    for tier in problem.capacities:
        if tier == DEVICE:
            continue
        down, up = problem.pricing.channel(DEVICE, tier), problem.pricing.channel(tier, DEVICE)
        if down is None or up is None:
            continue
        windows = [_window(problem, unit, s, tier, down, up) for s in unit.storages]
        if all(w is not None for w in windows):
            out[tier] = windows  # type: ignore[assignment]
    return out


def _window(problem: Problem, unit: Unit, storage: str, tier: str, down: Channel, up: Channel,
            lands: int | None = None) -> SwapWindow | None:
    nbytes = problem.graph.tensors[storage].nbytes
    f, b = unit.last_fwd[storage], unit.first_bwd[storage]
    if lands is not None:
        b = min(b, lands)
    out_s = down.seconds(nbytes)
    in_s = up.seconds(nbytes)
    cum = problem.cumulative_s
    if down.inline:
        # Copied by the compute thread: no compute hides it, so it leaves as soon as it can and
        # comes back right before its reader (the device holds it the least).
        w, q = f, b
    else:
        # Wait for the offload after the first step w at which the compute since f covers it.
        w = bisect.bisect_left(cum, cum[f + 1] + out_s) - 1
        # Start the prefetch before the last step q from which the compute up to b covers it.
        q = bisect.bisect_right(cum, cum[b] - in_s) - 1
    w = max(f, min(w, b - 2))
    q = min(b, max(q, w + 2))
    if q - w < 2:
        return None
    return SwapWindow(
        storage=storage, tier=tier, nbytes=nbytes, last_fwd=f, out_wait=w, in_start=q, first_bwd=b,
        out_s=out_s, in_s=in_s, out_queue=down.queue, in_queue=up.queue,
        out_hidden_s=0.0 if down.inline else problem.compute_between(f + 1, w),
        in_hidden_s=0.0 if up.inline else problem.compute_between(q, b - 1),
    )


def _share_keys(problem: Problem) -> None:
    """Give units at the same place of repeats of one block template the same key."""
    graph = problem.graph
    blocks = {b.index: b for b in graph.blocks}
    index_in_block = {b.index: {op: i for i, op in enumerate(b.ops)} for b in graph.blocks}
    for unit in problem.units:
        block_index = graph.op(unit.op).block
        block = blocks.get(block_index) if block_index is not None else None
        if block is None or block.template not in blocks:
            continue
        if len(blocks[block.template].ops) != len(block.ops):
            continue
        unit.share_key = (block.template, index_in_block[block.index][unit.op])
