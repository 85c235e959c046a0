"""A Plan's schedule laid out in time, for pictures (the memory plot, the Perfetto trace).

This reads only the Plan's data and follows the timing semantics of docs/architecture.md, the
ones the validator checks: one compute stream runs the compute and recompute steps in order;
each channel's queue runs its transfers one after another, a transfer starting no earlier than
the compute clock at the step that issues it and taking ``latency + bytes / bandwidth``; a wait
advances the compute clock to the transfer's end. It does not check the plan (``tierplan.validate``
does); it only records when things happen and how many bytes each tier holds, by tensor kind.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tierplan.ir import TensorKind
from tierplan.plans.plan import Plan, StepKind

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
    graph = plan.graph
    tiers = list(plan.capacities)
    usage = {tier: {group: 0 for group in GROUPS} for tier in tiers}
    held: dict[str, set[str]] = {tier: set() for tier in tiers}
    out = Timeline(usage={tier: {group: [] for group in GROUPS} for tier in tiers})

    def group_of(storage: str) -> str:
        return _GROUP_OF[graph.tensors[storage].kind]

    def add(storage: str, tier: str) -> None:
        if tier not in usage or storage in held[tier]:
            return
        held[tier].add(storage)
        usage[tier][group_of(storage)] += graph.tensors[storage].nbytes

    def remove(storage: str, tier: str) -> None:
        if tier not in usage or storage not in held[tier]:
            return
        held[tier].discard(storage)
        usage[tier][group_of(storage)] -= graph.tensors[storage].nbytes

    def sample(clock: float) -> None:
        out.times_s.append(clock)
        for tier in tiers:
            for group in GROUPS:
                out.usage[tier][group].append(usage[tier][group])

    for name in graph.inputs:
        storage = graph.tensors[name].storage
        tier = plan.initial_tiers.get(storage)
        if tier is not None:
            add(storage, tier)
    sample(0.0)

    channels = {(c.src, c.dst): c for c in plan.channels}
    queue_free: dict[str, float] = {}
    pending: dict[tuple[str, str], int] = {}  # (storage, dst) -> index into out.transfers
    clock = 0.0
    for index, step in enumerate(plan.schedule):
        at = clock
        if step.kind in (StepKind.COMPUTE, StepKind.RECOMPUTE):
            op = graph.op(step.op)
            for name in op.outputs:
                info = graph.tensors[name]
                if not info.is_view and name not in step.discard:  # discarded: scratch for one op
                    add(name, "device")
            seconds = plan.op_time_s.get(op.name, 0.0)
            out.compute.append(ComputeEvent(index, op.name, step.kind == StepKind.RECOMPUTE, clock, clock + seconds))
            clock += seconds
        elif step.kind == StepKind.START_TRANSFER:
            storage = graph.tensors[step.tensor].storage
            channel = channels.get((step.src, step.dst))
            nbytes = graph.tensors[storage].nbytes
            if channel is None:  # a broken plan: show the copy as instantaneous
                queue, begin, end = f"{step.src}->{step.dst}", clock, clock
            else:
                queue = channel.queue
                begin = max(clock, queue_free.get(queue, 0.0))
                end = begin + channel.seconds(nbytes)
                queue_free[queue] = end
            add(storage, step.dst)
            pending[storage, step.dst] = len(out.transfers)
            out.transfers.append(TransferEvent(index, storage, step.src, step.dst, queue, nbytes, clock, begin, end))
        elif step.kind == StepKind.WAIT_TRANSFER:
            storage = graph.tensors[step.tensor].storage
            which = pending.pop((storage, step.dst), None)
            begin = clock
            if which is not None:
                transfer = out.transfers[which]
                out.transfers[which] = TransferEvent(**{**transfer.__dict__, "waited_step": index})
                clock = max(clock, transfer.end_s)
            out.waits.append(WaitEvent(index, storage, step.dst, begin, clock))
        else:  # free
            remove(graph.tensors[step.tensor].storage, step.tier)
        sample(at)
    out.end_s = max([clock] + [t.end_s for t in out.transfers])
    return out
