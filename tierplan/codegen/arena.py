"""Arenas: one preallocated device buffer per program, every planned storage a view in it.

With ``emit(..., arena=True)`` the program does not ask the allocator for device memory as it
runs: every storage the plan allocates on the device (an op's output at its compute or recompute
step, the destination of a transfer to the device at the transfer's start) lives in ONE byte
buffer, the arena, at a static offset. The offsets come from ``tierplan.packing.pack.pack``
over the storages' lifetimes in schedule steps, so storages live at the same time never overlap
and storages that are not reuse the same bytes; the arena is then at most the plan's device peak
plus the packing's fragmentation (the packing's lower bound is the most bytes live at once).

What stays outside the arena (counted as "fallback"):

- caller-owned storages that start on the device (parameters, inputs): the caller allocated them;
- graph outputs other than gradients (the loss, logits) and values yielded at a split: a caller
  may keep them across runs, and a view would keep a whole arena alive. Gradients are IN the
  arena (live from their producing step to the end of the schedule): they go to ``.grad`` and
  are dropped by ``zero_grad()`` before the next run;
- outputs of ops that have no ``.out`` overload the emitter can map (a functional op whose
  arguments the out variant does not take, ops returning lists or views): the op runs as a normal
  functional call and a note says why. An op with several outputs, some of them graph outputs,
  still runs its out overload: those outputs get their own ``torch.empty_strided`` outside.

Every run allocates its own arena when it starts (``Context.new_arena``); the gradients it
returns are views of it and keep it alive until they are dropped, and on a GPU the caching
allocator hands the freed block to the next run. The program's device peak is then
``arena_bytes + fallback_peak_bytes``, which equals the plan's device peak when every op has an
out overload and the packing meets its lower bound; an op without one (fused attention) adds its
outputs on top, since they are allocated outside while the arena keeps its full size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from tierplan.packing.pack import Buffer, pack
from tierplan.plans.plan import DEVICE, Plan, StepKind
from tierplan.units import format_bytes

ALIGNMENT = 64  # bytes: a multiple of every dtype's size, and a cache line
# Arguments of a factory-style functional op that its out variant takes from ``out`` instead.
_FROM_OUT = {"dtype", "layout", "device", "pin_memory"}


@dataclass(frozen=True)
class OutVariant:
    """How to call the out overload of a functional op: ``overload`` takes the functional
    arguments named ``args`` (the rest are dropped: the out tensors carry them) plus one
    keyword per output, ``outs``, in the order of the functional op's returns."""

    overload: torch._ops.OpOverload
    args: tuple[str, ...]
    positional: tuple[str, ...]  # the leading positional arguments of the out overload
    outs: tuple[str, ...]


_CACHE: dict[torch._ops.OpOverload, OutVariant | str] = {}


def out_variant(target: object) -> OutVariant | str:
    """The out overload of ``target`` (an OpOverload), or a reason why there is none."""
    if not isinstance(target, torch._ops.OpOverload):
        return "not a torch.ops overload"
    if target in _CACHE:
        return _CACHE[target]
    _CACHE[target] = found = _find_out_variant(target)
    return found


def _find_out_variant(target: torch._ops.OpOverload) -> OutVariant | str:
    schema = target._schema
    if schema.is_mutable:
        return "mutates an input"
    if not schema.returns or any(str(r.type) != "Tensor" for r in schema.returns):
        return "returns something other than tensors"
    fn_args = {a.name: str(a.type) for a in schema.arguments}
    packet = target.overloadpacket
    for name in packet.overloads():
        overload = getattr(packet, name)
        if overload is target:
            continue
        sch = overload._schema
        outs = [a for a in sch.arguments if a.is_out]
        if len(outs) != len(schema.returns):
            continue
        # The returns alias the out arguments in order (Tensor(a!) out0, Tensor(b!) out1, ...).
        ret_sets = [r.alias_info.before_set if r.alias_info else None for r in sch.returns]
        out_sets = [a.alias_info.before_set if a.alias_info else None for a in outs]
        if len(ret_sets) != len(outs) or ret_sets != out_sets:
            continue
        rest = [a for a in sch.arguments if not a.is_out]
        if any(a.name not in fn_args or fn_args[a.name] != str(a.type) for a in rest):
            continue
        if set(fn_args) - {a.name for a in rest} - _FROM_OUT:
            continue
        positional = tuple(a.name for a in rest if not a.kwarg_only)
        return OutVariant(overload, tuple(a.name for a in rest), positional, tuple(a.name for a in outs))
    return "no out overload takes its arguments"


@dataclass(frozen=True)
class Placement:
    """One device allocation of the plan: ``storage`` allocated at schedule step ``start`` (its
    op, or the start of its transfer to the device) and freed at step ``end - 1`` (``end`` is
    ``len(schedule) + 1`` when the plan never frees it). ``offset`` is its byte offset in the
    arena, None when it is outside; ``how`` says which ("out", "transfer") or why not."""

    storage: str
    start: int
    end: int
    nbytes: int
    op: str | None
    offset: int | None
    how: str

    @property
    def in_arena(self) -> bool:
        return self.offset is not None


@dataclass
class ArenaLayout:
    """Where every device allocation of a program lives (see the module docstring)."""

    arena_bytes: int
    lower_bound: int  # of the packing: the most arena bytes live at one time
    placements: list[Placement]
    # The plan's device peak counted over what is NOT in the arena (caller-owned storages on the
    # device, graph outputs, fallback ops): the program's device peak is at most
    # arena_bytes + fallback_peak_bytes.
    fallback_peak_bytes: int
    method: str = ""
    # Caller-owned storages the plan starts on the device (part of fallback_peak_bytes).
    caller_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def at(self, start: int, storage: str) -> Placement | None:
        return self._index().get((start, storage))

    def live(self, storage: str, index: int) -> Placement | None:
        """The allocation of ``storage`` that is on the device at schedule step ``index``."""
        return next((p for p in self.placements
                     if p.storage == storage and p.start <= index < p.end), None)

    def _index(self) -> dict[tuple[int, str], Placement]:
        if not hasattr(self, "_by_start"):
            self._by_start = {(p.start, p.storage): p for p in self.placements}
        return self._by_start

    @property
    def predicted_peak_bytes(self) -> int:
        """The program's device peak: the arena plus the peak of what is outside it."""
        return self.arena_bytes + self.fallback_peak_bytes

    @property
    def outside_peak_bytes(self) -> int:
        """The peak of what the program itself allocates outside the arena."""
        return self.fallback_peak_bytes - self.caller_bytes

    @property
    def placed_bytes(self) -> int:
        return sum(p.nbytes for p in self.placements if p.in_arena)

    @property
    def fallback_bytes(self) -> int:
        return sum(p.nbytes for p in self.placements if not p.in_arena)

    @property
    def placed_fraction(self) -> float:
        total = self.placed_bytes + self.fallback_bytes
        return self.placed_bytes / total if total else 1.0

    def op_counts(self) -> tuple[int, int]:
        """(op steps whose outputs go to the arena, op steps that allocate outside it)."""
        inside = {p.start for p in self.placements if p.op is not None and p.in_arena}
        outside = {p.start for p in self.placements if p.op is not None and not p.in_arena}
        return len(inside), len(outside - inside)

    def summary(self) -> str:
        ops_in, ops_out = self.op_counts()
        reasons: dict[str, int] = {}
        for p in self.placements:
            if not p.in_arena:
                reasons[p.how] = reasons.get(p.how, 0) + p.nbytes
        lines = [
            f"arena {format_bytes(self.arena_bytes)} (packing lower bound "
            f"{format_bytes(self.lower_bound)}, {self.method}); fallback peak "
            f"{format_bytes(self.fallback_peak_bytes)} (caller-owned "
            f"{format_bytes(self.caller_bytes)}); predicted device peak "
            f"{format_bytes(self.predicted_peak_bytes)}",
            f"  allocations in the arena: {format_bytes(self.placed_bytes)} "
            f"({self.placed_fraction:.1%} of the bytes the program allocates); ops {ops_in} in, "
            f"{ops_out} outside",
        ]
        for why, nbytes in sorted(reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"  outside: {format_bytes(nbytes)}: {why}")
        return "\n".join(lines)


def device_allocations(plan: Plan) -> list[tuple[str, int, int, str | None]]:
    """(storage, start, end, op or None for a transfer) of every device allocation the plan's
    schedule makes, in schedule order of ``start``."""
    graph = plan.graph
    n = len(plan.schedule)
    opened: dict[str, tuple[int, str | None]] = {}
    spans: list[tuple[str, int, int, str | None]] = []
    for i, s in enumerate(plan.schedule):
        if s.op is not None:
            for t in graph.op(s.op).outputs:
                if not graph.tensors[t].is_view and t not in s.discard:
                    opened[t] = (i, s.op)
        elif s.kind == StepKind.START_TRANSFER and s.dst == DEVICE:
            opened[graph.tensors[s.tensor or ""].storage] = (i, None)
        elif s.kind == StepKind.FREE and s.tier == DEVICE:
            storage = graph.tensors[s.tensor or ""].storage
            if storage in opened:
                start, op = opened.pop(storage)
                spans.append((storage, start, i + 1, op))
    for storage, (start, op) in opened.items():
        spans.append((storage, start, n + 1, op))
    return sorted(spans, key=lambda x: (x[1], x[0]))


def plan_arena(
    plan: Plan, *, keep_out: set[str], op_placeable: Callable[[str], str | None],
    time_limit_s: float = 1.0,
) -> ArenaLayout:
    """Place the plan's device allocations: ``keep_out`` are storages that must stay outside
    (graph outputs, yielded values); ``op_placeable(op)`` is None when the op's outputs can be
    written into the arena (it has a usable out variant), else the reason they cannot."""
    graph = plan.graph
    rows: list[tuple[str, int, int, str | None, str]] = []
    for storage, start, end, op in device_allocations(plan):
        if storage in keep_out:
            how = "a graph output (the caller keeps it)"
        elif op is None:
            how = "transfer"
        elif plan.schedule[start].discard:
            # Its out variant would need scratch space for the discarded outputs as well.
            how = "a recompute that discards outputs (allocated outside)"
        else:
            why = op_placeable(op)
            how = "out" if why is None else f"{graph.op(op).target}: {why}"
        rows.append((storage, start, end, op, how))
    buffers = [
        Buffer((storage, start), start, end, graph.tensors[storage].nbytes, ALIGNMENT)
        for storage, start, end, _, how in rows
        if how in ("out", "transfer") and graph.tensors[storage].nbytes > 0
    ]
    offsets: dict[object, int] = {}
    arena_bytes = bound = 0
    method = "empty"
    if buffers:
        packing = pack(buffers, time_limit_s=time_limit_s)
        offsets, arena_bytes, bound, method = (
            dict(packing.offsets), packing.arena_bytes, packing.lower_bound, packing.method)
    placements = []
    for storage, start, end, op, how in rows:
        nbytes = graph.tensors[storage].nbytes
        offset = offsets.get((storage, start), 0 if how in ("out", "transfer") else None)
        placements.append(Placement(storage, start, end, nbytes, op, offset, how))
    peak, caller = _fallback_peak(plan, placements)
    return ArenaLayout(arena_bytes, bound, placements, peak, method, caller_bytes=caller)


def _fallback_peak(plan: Plan, placements: list[Placement]) -> tuple[int, int]:
    """(the peak of what is outside the arena, caller-owned storages included; those alone)."""
    graph = plan.graph
    used = 0
    seen: set[str] = set()
    for name in graph.inputs:
        storage = graph.tensors[name].storage
        if plan.initial_tiers.get(storage) == DEVICE and storage not in seen:
            seen.add(storage)
            used += graph.tensors[storage].nbytes
    peak = caller = used
    starts: dict[int, int] = {}
    ends: dict[int, int] = {}
    for p in placements:
        if not p.in_arena:
            starts[p.start] = starts.get(p.start, 0) + p.nbytes
            ends[p.end - 1] = ends.get(p.end - 1, 0) + p.nbytes
    for i, step in enumerate(plan.schedule):
        used += starts.get(i, 0)
        scratch = sum(graph.tensors[t].nbytes for t in step.discard)  # a discarding recompute's
        peak = max(peak, used + scratch)
        used -= ends.get(i, 0)
    return peak, caller


__all__ = ["ALIGNMENT", "ArenaLayout", "OutVariant", "Placement", "device_allocations",
           "out_variant", "plan_arena"]
