"""One replay of a schedule, step by step, with handlers to override.

A Plan's schedule has one meaning in time and memory (docs/architecture.md): one compute stream
runs the compute and recompute steps in order, each taking its op's time; a transfer joins its
channel's queue, starting no earlier than the compute clock at the step that issues it nor before
the copy ahead of it on that queue ends, and takes ``latency + bytes / bandwidth`` (a copy on the
compute queue runs on the compute stream itself: the clock advances by it at once); a wait advances
the compute clock to the end of the copy it waits for; a storage occupies a tier from the step
that allocates it there (an op's output, a copy's destination from the copy's start) until the
step that frees it. The planner's simulator and the report's timeline both need that replay; the
``ScheduleWalker`` here is the one place it is written.

It follows torch.fx's ``Interpreter``: ``run()`` is the loop, and each kind of step goes to a
handler (``on_compute``, ``on_start_transfer``, ``on_wait``, ``on_free``) that a subclass overrides,
calling ``super()`` for the shared bookkeeping and adding its own before or after it. The memory
primitives (``hold``, ``release``) and the new-peak hook (``on_peak``) are overridable the same way.

Two policies for a schedule that breaks the rules:

- ``strict=True`` (the simulator's): a step that reads something absent, allocates a storage
  twice, or a copy never waited for raises PlanError; a missing channel, op time, tier or pending
  copy raises KeyError, as a plain lookup does.
- ``strict=False`` (pictures of any plan): nothing is checked; a copy with no channel is
  instantaneous, an unknown tier holds nothing, a missing op time is 0, a wait for no copy waits
  for nothing.

``tierplan.plans.validate`` keeps its own replay on purpose, so that it checks this one.

The walker is on the planner's hot path (its local search measures thousands of schedules), so
the loop dispatches inline and the handlers keep lookups in locals; keep it that way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence, cast

from tierplan.ir import Graph, OpInfo
from tierplan.plans.plan import COMPUTE_QUEUE, DEVICE, Channel, PlanError, Step, StepKind

_OP_KINDS = (StepKind.COMPUTE, StepKind.RECOMPUTE)


@dataclass
class WalkState:
    """Where a replay stands between two steps."""

    held: dict[str, set[str]]  # tier -> storages on it (a copy counts at its dst from its start)
    used: dict[str, int]  # tier -> bytes of the storages it holds
    peak: dict[str, int]  # tier -> the most bytes it has held (device: with a recompute's scratch)
    clock: float = 0.0  # the compute stream's time, seconds
    queue_free: dict[str, float] = field(default_factory=dict)  # queue -> end of its last copy
    pending: dict[tuple[str, str], float] = field(default_factory=dict)  # (storage, dst) -> end
    compute_s: float = 0.0  # time of the compute steps
    recompute_s: float = 0.0  # time of the recompute steps
    exposed_s: float = 0.0  # time the compute stream waited for copies


class ScheduleWalker:
    """Replays ``schedule`` over ``graph``; subclass it and override the handlers to observe
    or extend the replay (see the module docstring for the rules and the two policies)."""

    def __init__(
        self,
        graph: Graph,
        schedule: Sequence[Step],
        *,
        capacities: Mapping[str, int],
        channels: Sequence[Channel],
        op_time_s: Mapping[str, float],
        initial_tiers: Mapping[str, str],
        strict: bool = True,
    ) -> None:
        self.graph = graph
        self.schedule = schedule
        self.tiers = list(capacities)
        self.op_time_s = op_time_s
        self.initial_tiers = initial_tiers
        self.strict = strict
        # Later channels of the same route win, as in a dict built from the list.
        self.channels: dict[tuple[str, str], Channel] = {(c.src, c.dst): c for c in channels}
        held: dict[str, set[str]] = {tier: set() for tier in self.tiers}
        used = {tier: 0 for tier in self.tiers}
        self.state = WalkState(held=held, used=used, peak=dict(used))

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> WalkState:
        """Place the inputs, replay every step in order, then ``finish``; returns the end state."""
        self.place_inputs()
        tensors = self.graph.tensors
        op_of = self.graph.op
        on_compute, on_start = self.on_compute, self.on_start_transfer
        on_wait, on_free = self.on_wait, self.on_free
        # Inline dispatch (no per-step run_step layer): this loop runs thousands of times per plan.
        for index, step in enumerate(self.schedule):
            kind = step.kind
            if kind in _OP_KINDS:
                on_compute(index, step, op_of(step.op))
            elif kind == StepKind.START_TRANSFER:
                on_start(index, step, tensors[step.tensor].storage)
            elif kind == StepKind.WAIT_TRANSFER:
                on_wait(index, step, tensors[step.tensor].storage)
            else:
                on_free(index, step, tensors[step.tensor].storage)
        self.finish()
        return self.state

    def place_inputs(self) -> None:
        """The graph inputs' storages on their initial tiers before step 0; the peaks start there.

        A storage several inputs view is placed once; this is not an allocation, so it never
        raises for a storage already placed."""
        state = self.state
        tensors = self.graph.tensors
        for name in self.graph.inputs:
            storage = tensors[name].storage
            tier = self.initial_tiers[storage] if self.strict else self.initial_tiers.get(storage)
            if tier is not None:
                self.hold(storage, tier)
        state.peak = dict(state.used)

    def finish(self) -> None:
        """After the last step: a strict replay requires every copy to have been waited for."""
        if self.strict and self.state.pending:
            raise PlanError(f"a transfer of {next(iter(self.state.pending))[0]} is never waited for")

    # -- handlers, one per kind of step ---------------------------------------------------------

    def on_compute(self, index: int, step: Step, op: OpInfo) -> float:
        """Run ``op`` (a compute or recompute step): its outputs are allocated on the device, the
        ones it discards take scratch bytes for the step, and the clock advances by its time,
        which is returned."""
        state = self.state
        tensors = self.graph.tensors
        if self.strict:
            held, pending = state.held[DEVICE], state.pending
            for name in op.inputs:
                storage = tensors[name].storage
                if storage not in held or (storage, DEVICE) in pending:
                    raise PlanError(f"step {index} ({step.describe()}): input {name} is not ready")
        discard = step.discard
        for name in op.outputs:
            if not tensors[name].is_view and name not in discard:
                self.allocate(index, name, DEVICE)
        if discard and DEVICE in state.used:  # (a tolerant replay may have no device tier)
            # Discarded outputs occupy scratch memory while the op runs: a peak, never a hold.
            scratch = sum(tensors[name].nbytes for name in discard)
            if scratch and state.used[DEVICE] + scratch > state.peak[DEVICE]:
                state.peak[DEVICE] = state.used[DEVICE] + scratch
                self.on_peak(index, DEVICE)
        seconds = self.op_time_s[op.name] if self.strict else self.op_time_s.get(op.name, 0.0)
        state.clock += seconds
        if step.kind == StepKind.RECOMPUTE:
            state.recompute_s += seconds
        else:
            state.compute_s += seconds
        return seconds

    def on_start_transfer(self, index: int, step: Step, storage: str) -> tuple[str, float, float]:
        """Issue a copy of ``storage`` from ``step.src`` to ``step.dst``: the destination holds it
        from now on, and its queue takes it when both the clock and the copy ahead of it allow.
        Returns ``(queue, start_s, end_s)`` (a plain tuple: this runs for every copy)."""
        state = self.state
        # Steps type their fields optional; a start_transfer has both (a malformed one fails as is).
        src, dst = cast(str, step.src), cast(str, step.dst)
        if self.strict and storage not in state.held[src]:
            raise PlanError(f"step {index} ({step.describe()}): source not on {src}")
        self.allocate(index, storage, dst)
        clock = state.clock
        channel = self.channels[src, dst] if self.strict else self.channels.get((src, dst))
        if channel is None:  # a broken plan, replayed tolerantly: the copy takes no time
            state.pending[storage, dst] = clock
            return f"{src}->{dst}", clock, clock
        queue = channel.queue
        if queue == COMPUTE_QUEUE:  # the compute stream copies it: the clock waits it out now
            end = clock + channel.seconds(self.graph.tensors[storage].nbytes)
            state.exposed_s += end - clock
            state.clock = end
            state.pending[storage, dst] = end
            return queue, clock, end
        begin = max(clock, state.queue_free.get(queue, 0.0))
        end = begin + channel.seconds(self.graph.tensors[storage].nbytes)
        state.queue_free[queue] = end
        state.pending[storage, dst] = end
        return queue, begin, end

    def on_wait(self, index: int, step: Step, storage: str) -> float | None:
        """The compute stream waits for the copy of ``storage`` to ``step.dst``: the clock advances
        by what is left of it (the exposed time). Returns the copy's end, or None when a tolerant
        replay finds no such copy."""
        state = self.state
        key = (storage, cast(str, step.dst))
        end = state.pending.pop(key) if self.strict else state.pending.pop(key, None)
        if end is not None and end > state.clock:
            state.exposed_s += end - state.clock
            state.clock = end
        return end

    def on_free(self, index: int, step: Step, storage: str) -> None:
        """``storage`` leaves ``step.tier``."""
        self.release(storage, cast(str, step.tier))

    # -- memory ---------------------------------------------------------------------------------

    def allocate(self, index: int, storage: str, tier: str) -> None:
        """``storage`` arrives on ``tier`` at step ``index`` (an op's output or a copy's
        destination); a strict replay refuses a storage already there. Calls ``on_peak`` when
        the tier reaches a new peak."""
        state = self.state
        if not self.hold(storage, tier):
            if self.strict:
                raise PlanError(f"step {index}: {storage} is already on {tier}")
            return
        if state.used[tier] > state.peak[tier]:
            state.peak[tier] = state.used[tier]
            self.on_peak(index, tier)

    def hold(self, storage: str, tier: str) -> bool:
        """Add ``storage`` to what ``tier`` holds; False when it is there already (or, in a
        tolerant replay, when the tier is unknown). The one place bytes are added, so a subclass
        that counts bytes another way (per kind of tensor) overrides this and ``release``."""
        state = self.state
        held = state.held[tier] if self.strict else state.held.get(tier)
        if held is None or storage in held:
            return False
        held.add(storage)
        state.used[tier] += self.graph.tensors[storage].nbytes
        return True

    def release(self, storage: str, tier: str) -> bool:
        """Take ``storage`` off ``tier``; False when nothing changed.

        A strict replay takes the bytes off even when the tier does not hold the storage: its
        figures follow the schedule as written, and the validator is what rejects such a free."""
        state = self.state
        held = state.held[tier] if self.strict else state.held.get(tier)
        if held is None or (storage not in held and not self.strict):
            return False
        held.discard(storage)
        state.used[tier] -= self.graph.tensors[storage].nbytes
        return True

    def on_peak(self, index: int, tier: str) -> None:
        """``tier`` has just reached a new peak at step ``index`` (``state.peak[tier]``); the
        state is as it is at that moment. Does nothing here; a simulator records the moment."""
