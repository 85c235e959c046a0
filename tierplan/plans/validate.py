"""An independent replay of a Plan.

This module shares no code with the planners that make plans: it reads only the Plan's data (the
graph, the schedule, the tiers' capacities, the channels and the op times) and steps through the
schedule with its own bookkeeping. It checks that

- every op reads inputs that are resident on the device and not still in flight (the outputs a
  recompute discards take scratch bytes during the op only);
- every transfer reads a resident source, lands before anything uses it, and is waited for;
- no tier ever holds more bytes than its capacity;
- nothing is used after it was freed; every op runs; outputs and caller-owned state survive;

and it recomputes the peak bytes of every tier and the step time, which must agree with the plan's
own predictions. Any violation raises PlanError naming the step and the tensor.

The keep-all figures the report compares the plan against (``keep_all_time_s``,
``keep_all_peak_bytes``) are checked the same way: this module builds the keep-all schedule of the
plan's graph itself (every op once in capture order, each storage freed right after its last
reader) and replays it with the device unbounded.

Timing: one compute stream runs the compute and recompute steps in order; every transfer goes on
its channel's queue, which runs its transfers one after another (each takes latency + bytes /
bandwidth) and starts a transfer no earlier than the compute clock at the step that issued it; a
transfer on the compute queue runs on the compute stream (the clock advances by it as it is
issued); a wait advances the compute clock to the transfer's end.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tierplan.ir import PERSISTENT_KINDS, Graph
from tierplan.plans.plan import COMPUTE_QUEUE, DEVICE, Plan, PlanError, Step, StepKind, compute, free
from tierplan.plans.check_generation import check_generation
from tierplan.plans.generation import GenerationPlan

_READY = "ready"
_INCOMING = "incoming"


@dataclass
class Replay:
    """The figures the replay measured."""

    peak_bytes: dict[str, int]
    time_s: float
    compute_time_s: float
    recompute_time_s: float
    exposed_transfer_s: float
    transferred_bytes: dict[str, int] = field(default_factory=dict)  # "src->dst" -> bytes
    # What the optimizer step is checked against (tierplan.plans.check_update):
    produced_s: dict[str, float] = field(default_factory=dict)  # storage -> end of its first writer
    landed_s: dict[str, float] = field(default_factory=dict)  # storage -> end of its last copy off the device
    last_use_s: dict[str, float] = field(default_factory=dict)  # storage -> end of its last reader
    copies: list[tuple[str, str, str, float, float]] = field(default_factory=list)  # queue, src, dst, start, end
    end_tiers: dict[str, list[str]] = field(default_factory=dict)  # storage -> tiers holding it at the end


@dataclass
class _Transfer:
    src: str
    end_s: float


class _State:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.graph = plan.graph
        self.held: dict[str, dict[str, str]] = {tier: {} for tier in plan.capacities}
        self.used: dict[str, int] = {tier: 0 for tier in plan.capacities}
        self.peak: dict[str, int] = {tier: 0 for tier in plan.capacities}
        self.freed_at: dict[tuple[str, str], int] = {}
        self.pending: dict[tuple[str, str], _Transfer] = {}
        self.queue_free_s: dict[str, float] = {}
        self.computed: set[str] = set()
        self.clock_s = 0.0
        self.compute_s = 0.0
        self.recompute_s = 0.0
        self.exposed_s = 0.0
        self.moved: dict[str, int] = {}
        self.produced_s: dict[str, float] = {}
        self.landed_s: dict[str, float] = {}
        self.last_use_s: dict[str, float] = {}
        self.copies: list[tuple[str, str, str, float, float]] = []

    # -- helpers --------------------------------------------------------------------------

    def fail(self, index: int, step: Step, message: str) -> PlanError:
        return PlanError(f"step {index} ({step.describe()}): {message}")

    def tier_of(self, index: int, step: Step, tier: str | None) -> str:
        if tier not in self.held:
            raise self.fail(index, step, f"tier {tier!r} has no capacity in the plan")
        return tier

    def storage(self, index: int, step: Step, tensor: str | None) -> str:
        if tensor is None or tensor not in self.graph.tensors:
            raise self.fail(index, step, f"unknown tensor {tensor!r}")
        return self.graph.tensors[tensor].storage

    def nbytes(self, storage: str) -> int:
        return self.graph.tensors[storage].nbytes

    def allocate(self, index: int, step: Step, storage: str, tier: str, state: str) -> None:
        if storage in self.held[tier]:
            raise self.fail(index, step, f"{storage} is already on {tier}")
        self.held[tier][storage] = state
        self.used[tier] += self.nbytes(storage)
        if self.used[tier] > self.plan.capacities[tier]:
            raise self.fail(
                index, step,
                f"{tier} holds {self.used[tier]} bytes, over its capacity of "
                f"{self.plan.capacities[tier]} bytes, when {storage} "
                f"({self.nbytes(storage)} bytes) arrives",
            )
        self.peak[tier] = max(self.peak[tier], self.used[tier])

    def require_ready(self, index: int, step: Step, tensor: str, tier: str, role: str) -> None:
        storage = self.graph.tensors[tensor].storage
        state = self.held[tier].get(storage)
        if state == _READY:
            return
        what = tensor if storage == tensor else f"{tensor} (storage {storage})"
        if state == _INCOMING:
            raise self.fail(
                index, step,
                f"{role} {what} is still in flight to {tier}: wait_transfer must come first",
            )
        if (storage, tier) in self.freed_at:
            raise self.fail(
                index, step,
                f"{role} {what} was freed from {tier} at step {self.freed_at[storage, tier]}",
            )
        where = [t for t, held in self.held.items() if storage in held]
        located = f"it is on {', '.join(where)}" if where else "it is on no tier"
        raise self.fail(index, step, f"{role} {what} is not resident on {tier}: {located}")

    # -- steps ----------------------------------------------------------------------------

    def run_op(self, index: int, step: Step) -> None:
        if step.op not in self.plan.op_time_s:
            raise self.fail(index, step, f"unknown op {step.op!r} (no time in the plan)")
        op = self.graph.op(step.op)
        again = step.kind == StepKind.RECOMPUTE
        if again and op.name not in self.computed:
            raise self.fail(index, step, "recompute of an op that was never computed")
        if not again and op.name in self.computed:
            raise self.fail(index, step, "op computed twice: the second run must be a recompute")
        if step.discard and not again:
            raise self.fail(index, step, "only a recompute may discard outputs (a first run makes them all)")
        for tensor in step.discard:
            if tensor not in op.outputs or self.graph.tensors[tensor].is_view:
                raise self.fail(index, step, f"discards {tensor!r}, which is not a storage the op writes")
        for tensor in op.inputs:
            self.require_ready(index, step, tensor, DEVICE, "input")
        for tensor in op.outputs:
            info = self.graph.tensors[tensor]
            if info.is_view:
                self.require_ready(index, step, info.storage, DEVICE, "the base of output")
            elif tensor not in step.discard:
                self.freed_at.pop((tensor, DEVICE), None)
                self.allocate(index, step, tensor, DEVICE, _READY)
        # A discarded output is written to scratch memory for the duration of the op: it counts
        # against the budget at this step and leaves any copy the plan holds untouched.
        scratch = sum(self.nbytes(tensor) for tensor in step.discard)
        if scratch:
            if self.used[DEVICE] + scratch > self.plan.capacities[DEVICE]:
                raise self.fail(
                    index, step,
                    f"{DEVICE} holds {self.used[DEVICE]} bytes, over its capacity of "
                    f"{self.plan.capacities[DEVICE]} bytes with the {scratch} scratch bytes of the "
                    f"discarded outputs",
                )
            self.peak[DEVICE] = max(self.peak[DEVICE], self.used[DEVICE] + scratch)
        seconds = self.plan.op_time_s[op.name]
        self.clock_s += seconds
        if again:
            self.recompute_s += seconds
        else:
            self.compute_s += seconds
        self.computed.add(op.name)
        for tensor in op.inputs:
            self.last_use_s[self.graph.tensors[tensor].storage] = self.clock_s
        for tensor in op.outputs:
            self.produced_s.setdefault(self.graph.tensors[tensor].storage, self.clock_s)

    def start(self, index: int, step: Step) -> None:
        storage = self.storage(index, step, step.tensor)
        src = self.tier_of(index, step, step.src)
        dst = self.tier_of(index, step, step.dst)
        channel = next((c for c in self.plan.channels if c.src == src and c.dst == dst), None)
        if channel is None:
            raise self.fail(index, step, f"the plan has no channel {src}->{dst}")
        self.require_ready(index, step, storage, src, "source")
        self.freed_at.pop((storage, dst), None)
        self.allocate(index, step, storage, dst, _INCOMING)
        seconds = channel.latency_s + self.nbytes(storage) / channel.bandwidth
        if channel.queue == COMPUTE_QUEUE:
            # Copied by the compute stream itself: it stalls now, whenever the copy is waited for.
            begin, end = self.clock_s, self.clock_s + seconds
            self.exposed_s += seconds
            self.clock_s = end
        else:
            begin = max(self.clock_s, self.queue_free_s.get(channel.queue, 0.0))
            end = begin + seconds
            self.queue_free_s[channel.queue] = end
        self.copies.append((channel.queue, src, dst, begin, end))
        self.last_use_s[storage] = max(self.last_use_s.get(storage, 0.0), end)
        if dst != DEVICE:
            self.landed_s[storage] = end
        self.pending[storage, dst] = _Transfer(src, end)
        key = f"{src}->{dst}"
        self.moved[key] = self.moved.get(key, 0) + self.nbytes(storage)

    def wait(self, index: int, step: Step) -> None:
        storage = self.storage(index, step, step.tensor)
        dst = self.tier_of(index, step, step.dst)
        transfer = self.pending.pop((storage, dst), None)
        if transfer is None:
            raise self.fail(index, step, f"no transfer of {storage} to {dst} is in flight")
        if transfer.end_s > self.clock_s:
            self.exposed_s += transfer.end_s - self.clock_s
            self.clock_s = transfer.end_s
        self.held[dst][storage] = _READY

    def release(self, index: int, step: Step) -> None:
        storage = self.storage(index, step, step.tensor)
        tier = self.tier_of(index, step, step.tier)
        if storage not in self.held[tier]:
            raise self.fail(index, step, f"{storage} is not on {tier}")
        if (storage, tier) in self.pending:
            raise self.fail(index, step, f"{storage} is still in flight to {tier}")
        readers = [dst for (s, dst), t in self.pending.items() if s == storage and t.src == tier]
        if readers:
            raise self.fail(
                index, step,
                f"{storage} is the source of a transfer to {readers[0]} not yet waited for",
            )
        del self.held[tier][storage]
        self.used[tier] -= self.nbytes(storage)
        self.freed_at[storage, tier] = index

    def finish(self) -> None:
        if self.pending:
            (storage, dst), _ = next(iter(self.pending.items()))
            raise PlanError(f"end of schedule: the transfer of {storage} to {dst} is never waited for")
        missing = [op.name for op in self.graph.ops if op.name not in self.computed]
        if missing:
            raise PlanError(f"end of schedule: op {missing[0]} never runs ({len(missing)} ops never run)")
        must_survive = [self.graph.tensors[name].storage for name in self.graph.outputs]
        must_survive += [
            t.name for t in self.graph.tensors.values()
            if not t.is_view and (t.kind in PERSISTENT_KINDS or t.name in self.graph.inputs)
        ]
        for storage in must_survive:
            if not any(storage in held for held in self.held.values()):
                raise PlanError(
                    f"end of schedule: {storage} ({self.graph.tensors[storage].kind.value}) "
                    f"is freed from every tier, but the caller needs it after the step"
                )


def replay(plan: Plan) -> Replay:
    """Step through ``plan.schedule``; raise PlanError at the first violation."""
    state = _State(plan)
    for name in plan.graph.inputs:
        storage = plan.graph.tensors[name].storage
        tier = plan.initial_tiers.get(storage)
        if tier is None:
            raise PlanError(f"graph input {name} has no initial tier in the plan")
        if tier not in state.held:
            raise PlanError(f"graph input {name} starts on tier {tier!r}, which has no capacity")
        if storage not in state.held[tier]:
            state.held[tier][storage] = _READY
            state.used[tier] += state.nbytes(storage)
    for tier, used in state.used.items():
        if used > plan.capacities[tier]:
            raise PlanError(
                f"before step 0: the tensors that start on {tier} take {used} bytes, "
                f"over its capacity of {plan.capacities[tier]} bytes"
            )
        state.peak[tier] = used
    handlers = {
        StepKind.COMPUTE: state.run_op,
        StepKind.RECOMPUTE: state.run_op,
        StepKind.START_TRANSFER: state.start,
        StepKind.WAIT_TRANSFER: state.wait,
        StepKind.FREE: state.release,
    }
    for index, step in enumerate(plan.schedule):
        handlers[step.kind](index, step)
    state.finish()
    return Replay(
        peak_bytes=dict(state.peak),
        time_s=state.clock_s,
        compute_time_s=state.compute_s,
        recompute_time_s=state.recompute_s,
        exposed_transfer_s=state.exposed_s,
        transferred_bytes=state.moved,
        produced_s=state.produced_s,
        landed_s=state.landed_s,
        last_use_s=state.last_use_s,
        copies=state.copies,
        end_tiers={storage: [t for t, held in state.held.items() if storage in held]
                   for storage in {s for held in state.held.values() for s in held}},
    )


def validate(plan: Plan | GenerationPlan, *, rel_tol: float = 1e-6) -> Replay | None:
    """Replay ``plan`` and check that its predictions, and the keep-all figures it is compared
    against, match what the replays measure. Times agree within ``rel_tol`` of the plan's
    measured step time (round-off of the same floats summed in another order is ~1e-15 of it);
    bytes agree exactly. A GenerationPlan is checked by ``check_generation`` (no Replay)."""
    if isinstance(plan, GenerationPlan):
        check_generation(plan)
        return None
    result = replay(plan)
    for tier, peak in result.peak_bytes.items():
        predicted = plan.peak_bytes.get(tier, 0)
        if predicted != peak:
            raise PlanError(
                f"the plan predicts a peak of {predicted} bytes on {tier}, "
                f"the replay measures {peak} bytes"
            )
    for label, predicted, measured in (
        ("step time", plan.predicted_time_s, result.time_s),
        ("compute time", plan.compute_time_s, result.compute_time_s),
        ("recompute time", plan.recompute_time_s, result.recompute_time_s),
        ("exposed transfer time", plan.exposed_transfer_s, result.exposed_transfer_s),
    ):
        if not _same_time(predicted, measured, result.time_s, rel_tol):
            raise PlanError(
                f"the plan predicts a {label} of {predicted:.9g} s, the replay measures {measured:.9g} s"
            )
    _check_keep_all(plan, result.time_s, rel_tol)
    if plan.update is not None:
        from tierplan.plans.check_update import check_update  # it reads this module's Replay

        check_update(plan, result, rel_tol=rel_tol)
    return result


def _same_time(predicted: float, measured: float, step_s: float, rel_tol: float) -> bool:
    # Relative to the step: the parts are sums of the same floats in another order, so a part
    # that is zero in one sum can be rounding noise (1e-17 s) in the other.
    return abs(predicted - measured) <= rel_tol * max(abs(measured), step_s, 1e-12)


def keep_all_schedule(graph: Graph) -> list[Step]:
    """Every op once in capture order, each storage freed right after the last op that touches
    it (its producer when nothing reads it); graph inputs and outputs and the caller's state
    (parameters, buffers, optimizer state) are never freed. Built here, from the graph alone, so
    the check does not trust the planner's own keep-all plan."""
    last_touch: dict[str, int] = {}
    for index, op in enumerate(graph.ops):
        for name in op.inputs + op.outputs:
            last_touch[graph.tensors[name].storage] = index
    kept = {graph.tensors[name].storage for name in graph.inputs + graph.outputs}
    kept |= {s for s in last_touch if graph.tensors[s].kind in PERSISTENT_KINDS}
    frees_after: dict[int, list[str]] = {}
    for storage, index in last_touch.items():
        if storage not in kept:
            frees_after.setdefault(index, []).append(storage)
    schedule: list[Step] = []
    for index, op in enumerate(graph.ops):
        schedule.append(compute(op.name))
        schedule.extend(free(storage, DEVICE) for storage in sorted(frees_after.get(index, ())))
    return schedule


def replay_keep_all(plan: Plan) -> Replay:
    """The keep-all schedule of ``plan``'s graph replayed with its op times, every input on the
    device and the device unbounded (keep-all need not fit the plan's budget)."""
    graph = plan.graph
    unbounded = sum(graph.tensors[s].nbytes for s in graph.storages()) + 1
    keep_all = dataclasses.replace(
        plan, schedule=keep_all_schedule(graph), capacities={DEVICE: unbounded},
        initial_tiers={graph.tensors[name].storage: DEVICE for name in graph.inputs},
    )
    return replay(keep_all)


def _check_keep_all(plan: Plan, step_s: float, rel_tol: float) -> None:
    """The plan's keep_all_peak_bytes and keep_all_time_s must be keep-all's own: the report's
    overhead, budget share and gaps are measured against them."""
    try:
        measured = replay_keep_all(plan)
    except PlanError as exc:
        raise PlanError(f"the keep-all schedule of the plan's graph does not replay: {exc}") from None
    fix = "re-plan with this tierplan, or fix the tool that wrote the plan"
    peak = measured.peak_bytes[DEVICE]
    if plan.keep_all_peak_bytes != peak:
        raise PlanError(
            f"the plan's keep_all_peak_bytes is {plan.keep_all_peak_bytes} bytes, a replay of the keep-all "
            f"schedule of its graph (every op once in capture order, each storage freed after its last "
            f"reader) measures {peak} bytes; {fix}"
        )
    if not _same_time(plan.keep_all_time_s, measured.time_s, max(step_s, measured.time_s), rel_tol):
        raise PlanError(
            f"the plan's keep_all_time_s is {plan.keep_all_time_s:.9g} s, a replay of the keep-all schedule "
            f"of its graph with the plan's op times measures {measured.time_s:.9g} s; {fix}"
        )
