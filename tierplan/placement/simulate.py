"""The exact figures of a schedule: peaks per tier, step time, recompute and stall time.

``simulate`` steps through a schedule with the validator's timing and memory rules and returns
the figures the plan must predict. It is the planner's own simulator: the validator stays an
independent check of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from tierplan.ir import Graph
from tierplan.plans.plan import DEVICE, Channel, PlanError, Step, StepKind


@dataclass
class Figures:
    peak_bytes: dict[str, int]
    time_s: float
    compute_time_s: float
    recompute_time_s: float
    exposed_transfer_s: float
    peak_step: int  # index in the schedule where the device peak is first reached
    device_at_peak: tuple[str, ...]  # storages on the device at that moment



def simulate(
    graph: Graph,
    schedule: Sequence[Step],
    *,
    capacities: Mapping[str, int],
    channels: Sequence[Channel],
    op_time_s: Mapping[str, float],
    initial_tiers: Mapping[str, str],
) -> Figures:
    """Peaks per tier and the step time of ``schedule`` (the validator's rules).

    Raises PlanError when a step reads something absent; capacities are not enforced here (the
    caller compares the peaks with them), so that an over-budget plan can still be measured.
    """
    held: dict[str, set[str]] = {tier: set() for tier in capacities}
    used = {tier: 0 for tier in capacities}
    peak = dict(used)
    pending: dict[tuple[str, str], float] = {}
    queue_free: dict[str, float] = {}
    by_route = {(c.src, c.dst): c for c in channels}
    clock = compute_s = recompute_s = exposed = 0.0
    peak_step, at_peak = -1, tuple()
    for name in graph.inputs:
        storage = graph.tensors[name].storage
        tier = initial_tiers[storage]
        if storage not in held[tier]:
            held[tier].add(storage)
            used[tier] += graph.tensors[storage].nbytes
    peak = dict(used)
    at_peak = tuple(sorted(held[DEVICE]))

    def allocate(storage: str, tier: str, index: int) -> None:
        nonlocal peak_step, at_peak
        if storage in held[tier]:
            raise PlanError(f"step {index}: {storage} is already on {tier}")
        held[tier].add(storage)
        used[tier] += graph.tensors[storage].nbytes
        if used[tier] > peak[tier]:
            peak[tier] = used[tier]
            if tier == DEVICE:
                peak_step, at_peak = index, tuple(sorted(held[DEVICE]))

    for index, step in enumerate(schedule):
        kind = step.kind
        if kind in (StepKind.COMPUTE, StepKind.RECOMPUTE):
            op = graph.op(step.op)
            for name in op.inputs:
                storage = graph.tensors[name].storage
                if storage not in held[DEVICE] or (storage, DEVICE) in pending:
                    raise PlanError(f"step {index} ({step.describe()}): input {name} is not ready")
            for name in op.outputs:
                if not graph.tensors[name].is_view and name not in step.discard:
                    allocate(name, DEVICE, index)
            # Discarded outputs occupy scratch memory while the op runs.
            scratch = sum(graph.tensors[name].nbytes for name in step.discard)
            if scratch and used[DEVICE] + scratch > peak[DEVICE]:
                peak[DEVICE] = used[DEVICE] + scratch
                peak_step, at_peak = index, tuple(sorted(held[DEVICE]))
            seconds = op_time_s[op.name]
            clock += seconds
            if kind == StepKind.RECOMPUTE:
                recompute_s += seconds
            else:
                compute_s += seconds
        elif kind == StepKind.START_TRANSFER:
            storage = graph.tensors[step.tensor].storage
            if storage not in held[step.src]:
                raise PlanError(f"step {index} ({step.describe()}): source not on {step.src}")
            allocate(storage, step.dst, index)
            channel = by_route[step.src, step.dst]
            begin = max(clock, queue_free.get(channel.queue, 0.0))
            end = begin + channel.seconds(graph.tensors[storage].nbytes)
            queue_free[channel.queue] = end
            pending[storage, step.dst] = end
        elif kind == StepKind.WAIT_TRANSFER:
            storage = graph.tensors[step.tensor].storage
            end = pending.pop((storage, step.dst))
            if end > clock:
                exposed += end - clock
                clock = end
        else:
            storage = graph.tensors[step.tensor].storage
            held[step.tier].discard(storage)
            used[step.tier] -= graph.tensors[storage].nbytes
    if pending:
        raise PlanError(f"a transfer of {next(iter(pending))[0]} is never waited for")
    return Figures(
        peak_bytes=peak, time_s=clock, compute_time_s=compute_s, recompute_time_s=recompute_s,
        exposed_transfer_s=exposed, peak_step=peak_step, device_at_peak=at_peak,
    )
