"""A Plan's schedule laid out in time, for pictures (the memory plot, the Perfetto trace).

This reads only the Plan's data and follows the timing semantics of docs/architecture.md, the
ones the validator checks: one compute stream runs the compute and recompute steps in order;
each channel's queue runs its transfers one after another, a transfer starting no earlier than
the compute clock at the step that issues it and taking ``latency + bytes / bandwidth``; a wait
advances the compute clock to the transfer's end. That replay is ``tierplan.plans.walk``'s, run
tolerantly: it does not check the plan (``tierplan.validate`` does), and a broken plan is still
drawn (a copy with no channel is instantaneous, an unknown tier is left out). It only records
when things happen and how many bytes each tier holds, by tensor kind.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from tierplan.ir import OpInfo, TensorKind
from tierplan.plans.plan import Plan, Step, StepKind
from tierplan.plans.walk import ScheduleWalker

# Tensor kinds grouped the way the pictures show them.
GROUPS = ("parameters", "optimizer state", "gradients", "activations", "temporaries")
_GROUP_OF = {
    TensorKind.PARAMETER: "parameters",
    TensorKind.BUFFER: "parameters",
    TensorKind.OPTIMIZER_STATE: "optimizer state",
    TensorKind.GRADIENT: "gradients",
    TensorKind.ACTIVATION: "activations",
    TensorKind.TEMPORARY: "temporaries",
    TensorKind.INPUT: "temporaries",
    TensorKind.OUTPUT: "temporaries",
}


@dataclass(frozen=True)
class ComputeEvent:
    step: int
    op: str
    recompute: bool
    start_s: float
    end_s: float


@dataclass(frozen=True)
class TransferEvent:
    step: int  # index of the start_transfer step
    storage: str
    src: str
    dst: str
    queue: str
    nbytes: int
    issued_s: float  # compute clock at the issuing step
    start_s: float  # when its queue took it
    end_s: float
    waited_step: int | None = None  # index of the wait_transfer step, once seen


@dataclass(frozen=True)
class WaitEvent:
    step: int
    storage: str
    dst: str
    start_s: float
    end_s: float  # > start_s when the wait was exposed


@dataclass
class Timeline:
    compute: list[ComputeEvent] = field(default_factory=list)
    transfers: list[TransferEvent] = field(default_factory=list)
    waits: list[WaitEvent] = field(default_factory=list)
    # One sample per step, plus one before step 0: the compute clock when the step runs and the
    # bytes each tier holds right after it, per kind group (in-flight copies count at their dst).
    times_s: list[float] = field(default_factory=list)
    usage: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # tier -> group -> bytes
    end_s: float = 0.0

    def total(self, tier: str) -> list[int]:
        per_group = self.usage.get(tier, {})
        return [sum(values) for values in zip(*per_group.values())] if per_group else []

    def peak(self, tier: str) -> int:
        return max(self.total(tier), default=0)


def timeline(plan: Plan) -> Timeline:
    """Lay ``plan.schedule`` out in time (see the module docstring for the semantics)."""
    return _Layout(plan).run_layout()


class _Layout(ScheduleWalker):
    """The tolerant replay of ``tierplan.plans.walk`` (a broken plan is drawn, not refused),
    recording an event per step and a sample of the bytes per tier and group after each."""

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan.graph, plan.schedule, capacities=plan.capacities, channels=plan.channels,
                         op_time_s=plan.op_time_s, initial_tiers=plan.initial_tiers, strict=False)
        self.usage = {tier: {group: 0 for group in GROUPS} for tier in self.tiers}
        self.out = Timeline(usage={tier: {group: [] for group in GROUPS} for tier in self.tiers})
        self.event_of: dict[tuple[str, str], int] = {}  # (storage, dst) -> index into out.transfers

    def run_layout(self) -> Timeline:
        state = self.run()
        self.out.end_s = max([state.clock] + [t.end_s for t in self.out.transfers])
        return self.out

    def sample(self, clock: float) -> None:
        self.out.times_s.append(clock)
        for tier in self.tiers:
            for group in GROUPS:
                self.out.usage[tier][group].append(self.usage[tier][group])

    # The walker adds and removes every storage through these two; the groups follow them.
    def hold(self, storage: str, tier: str) -> bool:
        if not super().hold(storage, tier):
            return False
        info = self.graph.tensors[storage]
        self.usage[tier][_GROUP_OF[info.kind]] += info.nbytes
        return True

    def release(self, storage: str, tier: str) -> bool:
        if not super().release(storage, tier):
            return False
        info = self.graph.tensors[storage]
        self.usage[tier][_GROUP_OF[info.kind]] -= info.nbytes
        return True

    def place_inputs(self) -> None:
        super().place_inputs()
        self.sample(0.0)

    # Each step records its event, then a sample at the clock it started from.
    def on_compute(self, index: int, step: Step, op: OpInfo) -> float:
        at = self.state.clock
        seconds = super().on_compute(index, step, op)
        self.out.compute.append(ComputeEvent(index, op.name, step.kind == StepKind.RECOMPUTE, at, at + seconds))
        self.sample(at)
        return seconds

    def on_start_transfer(self, index: int, step: Step, storage: str) -> tuple[str, float, float]:
        at = self.state.clock
        queue, begin, end = super().on_start_transfer(index, step, storage)
        nbytes = self.graph.tensors[storage].nbytes
        self.event_of[storage, cast(str, step.dst)] = len(self.out.transfers)
        self.out.transfers.append(
            TransferEvent(index, storage, cast(str, step.src), cast(str, step.dst), queue, nbytes, at, begin, end)
        )
        self.sample(at)
        return queue, begin, end

    def on_wait(self, index: int, step: Step, storage: str) -> float | None:
        at = self.state.clock
        end = super().on_wait(index, step, storage)
        which = self.event_of.pop((storage, cast(str, step.dst)), None)
        if which is not None:
            transfer = self.out.transfers[which]
            self.out.transfers[which] = TransferEvent(**{**transfer.__dict__, "waited_step": index})
        self.out.waits.append(WaitEvent(index, storage, cast(str, step.dst), at, self.state.clock))
        self.sample(at)
        return end

    def on_free(self, index: int, step: Step, storage: str) -> None:
        at = self.state.clock
        super().on_free(index, step, storage)
        self.sample(at)
