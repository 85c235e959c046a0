"""Plan the optimizer step of a training plan: where master weights and states live, where each
update runs, and when its copies and arithmetic happen (tierplan.plans.update has the contract).

Three steps, as pure functions:

- ``param_states``: each trained parameter's bytes of weight, gradient, master and states and
  its update's FLOPs, from the optimizer's rule (``passes.optimizer.optimizer_spec``);
- ``activation_timeline``: what the update is planned against, from a replay of the schedule:
  when each gradient is ready on the device (or has landed where the schedule offloaded it),
  when each weight is last read, which intervals the schedule's copies hold on every queue;
- ``schedule_update``: a list scheduler that, given every parameter's placement, puts each
  parameter's chain of tasks (in the order its gradient is ready) at the earliest time its
  inputs and its resource allow, with at most STAGING_SLOTS parameters holding host staging
  buffers at once, and returns the tasks, the whole step's peaks and its time.

``placement.optimizer_step.plan_update`` chooses the placements with the CP-SAT model of
``placement.states_model`` and measures the choice by ``schedule_update``. The model is a
relaxation (resource loads and each parameter's own chain, no queueing between parameters), so
the scheduled step is what the plan predicts and what the validator checks; the model's optimum
is only a lower bound of it.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence, cast

from tierplan.cost_models.hardware import Hardware
from tierplan.ir import Graph, OpInfo, TensorKind
from tierplan.passes.optimizer import optimizer_spec
from tierplan.plans.plan import (
    COMPUTE_QUEUE,
    DEVICE,
    HOST,
    NVME,
    Channel,
    Plan,
    PlanError,
    Step,
)
from tierplan.plans.update import (
    GRAD_OUT,
    GRAD_READ,
    NVME_READ,
    NVME_WRITE,
    READ_STATES,
    STAGING_SLOTS,
    UPDATE,
    WEIGHT_IN,
    WEIGHT_OUT,
    WRITE_STATES,
    ParamState,
    UpdateRates,
    UpdateTask,
    check_choice,
)
from tierplan.plans.walk import ScheduleWalker
from tierplan.units import format_bytes


def param_states(graph: Graph, optimizer: str, precision: str, *, momentum: float = 0.9,
                 weight_decay: float | None = None) -> list[ParamState]:
    """The model state of every parameter of ``graph`` that has a gradient, in graph order.

    ``weight_decay`` defaults to torch's for the optimizer (AdamW 0.01, Adam and SGD 0); "sgd"
    means SGD with momentum (0.9 unless given), which keeps one state per parameter.
    Mixed precision keeps fp32 states and an fp32 master beside a bf16/fp16 parameter (an fp32
    parameter under autocast is its own master); "fp32" keeps fp32 states; "bf16" keeps the states
    in the parameters' dtype (torch.optim's states take the parameter's dtype)."""
    check_choice(optimizer, precision)
    if weight_decay is None:
        weight_decay = 0.01 if optimizer == "adamw" else 0.0
    spec = optimizer_spec(optimizer, momentum=momentum, weight_decay=weight_decay)
    grad_for = {param: grad for grad, param in graph.meta.get("grad_of", {}).items()}
    mixed = precision.endswith("-mixed")
    out: list[ParamState] = []
    for name in graph.inputs:
        t = graph.tensors[name]
        if t.kind is not TensorKind.PARAMETER or name not in grad_for or t.is_view:
            continue
        grad = graph.tensors[grad_for[name]]
        numel = math.prod(int(d) for d in t.shape)
        # "bf16" keeps the states in the parameter's own dtype: its bytes per element.
        state_size = 4 if mixed or precision == "fp32" else t.nbytes // max(1, numel)
        out.append(ParamState(
            param=t.storage, grad=grad.storage, numel=numel, weight_bytes=t.nbytes,
            grad_bytes=graph.tensors[grad.storage].nbytes,
            master_bytes=4 * numel if mixed and t.dtype != "float32" else 0,
            state_bytes=len(spec.states) * numel * state_size, flops=spec.flops_per_element * numel,
            # One file per state, Adam's step counter and the host master (TieredOptimizer's files).
            state_files=len(spec.states) + (1 if optimizer in ("adam", "adamw") else 0) + 1,
        ))
    return out


def update_rates(hardware: Hardware) -> UpdateRates:
    """The figures ``task_seconds`` prices with, from ``hardware``'s data."""
    device = hardware.device
    nvme = hardware.tiers.get(NVME)
    return UpdateRates(
        cpu_flops=hardware.host.cpu_flops, dram_bandwidth=hardware.host.dram_bandwidth,
        device_bandwidth=device.memory_bandwidth * device.memory_efficiency,
        device_launch_s=device.launch_overhead_s,
        nvme_read_bandwidth=nvme.read_bandwidth if nvme else 0.0,
        nvme_write_bandwidth=nvme.write_bandwidth if nvme else 0.0,
        nvme_latency_s=nvme.latency_s if nvme else 0.0,
        file_s=hardware.runtime.state_file_s,
        param_update_s=hardware.runtime.param_update_s,
        shared_cpu=device.kind == "cpu",
        nvme_duplex=_nvme_duplex(hardware),
    )


def _nvme_duplex(hardware: Hardware) -> bool:
    link = next((link for link in hardware.links.values() if NVME in (link.src, link.dst)), None)
    return link.duplex if link is not None else True


def update_seconds(ps: ParamState, where: str, rates: UpdateRates) -> float:
    """One update of ``ps`` on the device (memory-bound, fused) or the host CPU (the slower of
    its arithmetic and its memory traffic); docs/cost-model.md, "Optimizer step"."""
    if where == DEVICE:
        return rates.param_update_s + rates.device_launch_s + ps.update_bytes(DEVICE) / rates.device_bandwidth
    return rates.param_update_s + max(ps.flops / rates.cpu_flops, ps.update_bytes(HOST) / rates.dram_bandwidth)


def nvme_seconds(nbytes: int, resource: str, rates: UpdateRates, files: int = 1) -> float:
    """A read or write of ``nbytes`` in ``files`` swap files on the drive."""
    bandwidth = rates.nvme_read_bandwidth if resource == NVME_READ else rates.nvme_write_bandwidth
    return rates.nvme_latency_s + files * rates.file_s + nbytes / bandwidth


# -- what the update is planned against ---------------------------------------------------------


@dataclass
class ActivationTimeline:
    """The schedule's replay, as the update needs it."""

    end_s: float  # the schedule's step time: the compute stream is busy until then
    peak_bytes: dict[str, int]
    produced_s: dict[str, float]  # storage -> end of the op that first wrote it
    landed_s: dict[str, float]  # storage -> end of the last copy of it to a slower tier
    last_use_s: dict[str, float]  # storage -> end of the last op or copy that read it
    end_tier: dict[str, str]  # storage -> the fastest tier holding it at the end
    home: dict[str, str]  # persistent storage -> its tier before step 0
    busy: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # resource -> intervals


class _TimelineWalker(ScheduleWalker):
    def __init__(self, plan: Plan) -> None:
        super().__init__(plan.graph, plan.schedule, capacities=plan.capacities, channels=plan.channels,
                         op_time_s=plan.op_time_s, initial_tiers=plan.initial_tiers)
        self.produced_s: dict[str, float] = {}
        self.landed_s: dict[str, float] = {}
        self.last_use_s: dict[str, float] = {}
        self.busy: dict[str, list[tuple[float, float]]] = {}

    def on_compute(self, index: int, step: Step, op: OpInfo) -> float:
        seconds = super().on_compute(index, step, op)
        end = self.state.clock
        tensors = self.graph.tensors
        for name in op.inputs:
            self.last_use_s[tensors[name].storage] = end
        for name in op.outputs:
            self.produced_s.setdefault(tensors[name].storage, end)
        return seconds

    def on_start_transfer(self, index: int, step: Step, storage: str) -> tuple[str, float, float]:
        queue, start, end = super().on_start_transfer(index, step, storage)
        src, dst = cast(str, step.src), cast(str, step.dst)
        self.busy.setdefault(queue, []).append((start, end))
        # The drive serves the schedule's NVMe copies too: they hold its read or write queue.
        if src == NVME:
            self.busy.setdefault(NVME_READ, []).append((start, end))
        if dst == NVME:
            self.busy.setdefault(NVME_WRITE, []).append((start, end))
        self.last_use_s[storage] = max(self.last_use_s.get(storage, 0.0), end)
        if dst != DEVICE:
            self.landed_s[storage] = end
        return queue, start, end


def activation_timeline(plan: Plan) -> ActivationTimeline:
    walker = _TimelineWalker(plan)
    state = walker.run()
    end_tier: dict[str, str] = {}
    for tier in (NVME, HOST, DEVICE):  # the fastest tier holding a storage wins
        for storage in state.held.get(tier, ()):
            end_tier[storage] = tier
    busy = {queue: sorted(intervals) for queue, intervals in walker.busy.items()}
    return ActivationTimeline(
        end_s=state.clock, peak_bytes=dict(state.peak), produced_s=walker.produced_s,
        landed_s=walker.landed_s, last_use_s=walker.last_use_s, end_tier=end_tier,
        home=dict(plan.initial_tiers), busy=busy,
    )


# -- the list scheduler --------------------------------------------------------------------------


class _Resource:
    """A queue's busy intervals, sorted; a task takes the earliest gap that fits it."""

    def __init__(self, intervals: Sequence[tuple[float, float]] = ()) -> None:
        merged: list[list[float]] = []  # overlapping intervals (two queues on one drive) as one
        for start, end in sorted(intervals):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.starts = [s for s, _ in merged]
        self.ends = [e for _, e in merged]

    def place(self, ready: float, seconds: float) -> float:
        """The start of the earliest gap of ``seconds`` at or after ``ready``; the gap is taken."""
        starts, ends = self.starts, self.ends
        i = bisect.bisect_right(ends, ready)  # the first interval still running at ``ready``
        t = ready
        while i < len(starts) and starts[i] < t + seconds:
            t = max(t, ends[i])
            i += 1
        starts.insert(i, t)
        ends.insert(i, t + seconds)
        return t


@dataclass
class Scheduled:
    tasks: list[UpdateTask]
    peak_bytes: dict[str, int]
    step_time_s: float
    overflow: str = ""  # the tier over its capacity, and by how much; "" when everything fits


def most_staging_bytes(params: Sequence[ParamState], slots: int) -> int:
    """The host staging ``slots`` parameters can hold at most: the largest gradients in fp32 with
    their states read from NVMe."""
    return sum(sorted((4 * ps.numel + ps.resident_bytes(NVME) for ps in params), reverse=True)[:slots])


def staging_bytes(ps: ParamState, kinds: set[str], states_tier: str) -> int:
    """Host staging a parameter's chain holds: its gradient in fp32 when it arrives from the
    device or NVMe, its master and states when they come from NVMe."""
    grad = 4 * ps.numel if kinds & {GRAD_OUT, GRAD_READ} else 0
    return grad + (ps.resident_bytes(states_tier) if READ_STATES in kinds else 0)


def schedule_update(
    params: Sequence[ParamState],
    states_tier: Mapping[str, str],
    timeline: ActivationTimeline,
    *,
    channels: Sequence[Channel],
    capacities: Mapping[str, int],
    rates: UpdateRates,
    overlap_backward: bool = False,
    staging_slots: int = STAGING_SLOTS,
) -> Scheduled:
    """Every parameter's chain of tasks at its earliest time (see the module docstring); with
    ``overlap_backward`` False no task starts before the schedule ends."""
    by_route = {(c.src, c.dst): c for c in channels}
    down, up = by_route.get((DEVICE, HOST)), by_route.get((HOST, DEVICE))
    busy: dict[str, list[tuple[float, float]]] = {}
    for queue, intervals in timeline.busy.items():
        key = rates.nvme_resource(queue) if queue in (NVME_READ, NVME_WRITE) else queue
        busy.setdefault(key, []).extend(intervals)
    resources: dict[str, _Resource] = {q: _Resource(iv) for q, iv in busy.items()}
    resources[COMPUTE_QUEUE] = _Resource([(0.0, timeline.end_s)])

    floor = 0.0 if overlap_backward else timeline.end_s

    def run(ps: ParamState, kind: str, resource: str, ready: float, seconds: float, *,
            nbytes: int = 0, flops: int = 0) -> float:
        start = resources.setdefault(resource, _Resource()).place(max(ready, floor), seconds)
        tasks.append(UpdateTask(ps.param, kind, resource, start, start + seconds, nbytes, flops))
        return start + seconds

    def copy(ps: ParamState, kind: str, channel: Channel | None, ready: float, nbytes: int) -> float:
        if channel is None:
            raise PlanError(f"the plan has no channel for the {kind} of {ps.param}")
        return run(ps, kind, channel.queue, ready, channel.seconds(nbytes), nbytes=nbytes)

    tasks: list[UpdateTask] = []
    slot_free: list[float] = [0.0] * staging_slots
    order = sorted(params, key=lambda ps: grad_available(ps, timeline))
    for ps in order:
        tier = states_tier[ps.param]
        grad_at = timeline.end_tier.get(cast(str, ps.grad), DEVICE)
        home = timeline.home.get(ps.param, DEVICE)
        weight_free = timeline.last_use_s.get(ps.param, 0.0)
        if tier == DEVICE:
            run(ps, UPDATE, COMPUTE_QUEUE, timeline.end_s, update_seconds(ps, DEVICE, rates),
                nbytes=ps.update_bytes(DEVICE), flops=ps.flops)
            continue
        first = len(tasks)
        slot = min(range(staging_slots), key=slot_free.__getitem__)
        ready = slot_free[slot]
        if grad_at == DEVICE:
            grad_ready = copy(ps, GRAD_OUT, down, max(ready, timeline.produced_s[cast(str, ps.grad)]),
                              ps.grad_bytes)
        elif grad_at == NVME:
            grad_ready = run(ps, GRAD_READ, rates.nvme_resource(NVME_READ),
                             max(ready, timeline.landed_s[cast(str, ps.grad)]),
                             nvme_seconds(ps.grad_bytes, NVME_READ, rates), nbytes=ps.grad_bytes)
        else:
            grad_ready = timeline.landed_s.get(cast(str, ps.grad), timeline.end_s)
        states_ready = 0.0
        if tier == NVME:
            nbytes = ps.resident_bytes(NVME)
            states_ready = run(ps, READ_STATES, rates.nvme_resource(NVME_READ), ready,
                               nvme_seconds(nbytes, NVME_READ, rates, ps.state_files), nbytes=nbytes)
        done = run(ps, UPDATE, rates.host_update_resource, max(grad_ready, states_ready),
                   update_seconds(ps, HOST, rates), nbytes=ps.update_bytes(HOST), flops=ps.flops)
        released = done
        if tier == NVME:
            nbytes = ps.resident_bytes(NVME)
            released = run(ps, WRITE_STATES, rates.nvme_resource(NVME_WRITE), done,
                           nvme_seconds(nbytes, NVME_WRITE, rates, ps.state_files), nbytes=nbytes)
        # The new weight goes home in step(), after the backward, even when its update ran during
        # it (TieredOptimizer never writes a weight the backward may still read).
        home_ready = max(done, weight_free, timeline.end_s)
        if home == DEVICE:
            copy(ps, WEIGHT_IN, up, home_ready, ps.weight_bytes)
        elif home == NVME:
            run(ps, WEIGHT_OUT, rates.nvme_resource(NVME_WRITE), home_ready,
                nvme_seconds(ps.weight_bytes, NVME_WRITE, rates), nbytes=ps.weight_bytes)
        if staging_bytes(ps, {t.kind for t in tasks[first:]}, tier):
            slot_free[slot] = released
    end = max([timeline.end_s, *(t.end_s for t in tasks)])
    peaks, overflow = step_peaks(params, states_tier, tasks, timeline.peak_bytes, capacities)
    return Scheduled(tasks=tasks, peak_bytes=peaks, step_time_s=end, overflow=overflow)


def grad_available(ps: ParamState, timeline: ActivationTimeline) -> float:
    """When ``ps``'s gradient can first be used: produced on the device, or landed where the
    schedule offloaded it."""
    grad = cast(str, ps.grad)
    return timeline.landed_s.get(grad, timeline.produced_s.get(grad, timeline.end_s))


def step_peaks(params: Sequence[ParamState], states_tier: Mapping[str, str], tasks: Sequence[UpdateTask],
               schedule_peaks: Mapping[str, int], capacities: Mapping[str, int]) -> tuple[dict[str, int], str]:
    """The whole step's peak per tier and the first tier over its capacity ("" when none)."""
    peaks = dict(schedule_peaks)
    for ps in params:
        tier = states_tier[ps.param]
        peaks[tier] = peaks.get(tier, 0) + ps.resident_bytes(tier)
    if tasks:
        peaks[HOST] = peaks.get(HOST, 0) + max_staging(params, states_tier, tasks)
    for tier, peak in peaks.items():
        if peak > capacities.get(tier, 0):
            return peaks, f"{tier} needs {format_bytes(peak)}, over its {format_bytes(capacities.get(tier, 0))}"
    return peaks, ""


def max_staging(params: Sequence[ParamState], states_tier: Mapping[str, str],
                tasks: Sequence[UpdateTask]) -> int:
    """The most host staging bytes held at once: each parameter holds its staging from its
    first staging task's start to its update's (or its states' write-back's) end."""
    by_param: dict[str, list[UpdateTask]] = {}
    for t in tasks:
        by_param.setdefault(t.param, []).append(t)
    events: list[tuple[float, int]] = []
    for ps in params:
        chain = by_param.get(ps.param, [])
        nbytes = staging_bytes(ps, {t.kind for t in chain}, states_tier[ps.param])
        if not nbytes:
            continue
        held = [t for t in chain if t.kind in (GRAD_OUT, GRAD_READ, READ_STATES, UPDATE, WRITE_STATES)]
        events.append((min(t.start_s for t in held), nbytes))
        events.append((max(t.end_s for t in held), -nbytes))
    used = peak = 0
    for _, delta in sorted(events):  # at equal times a release (negative) comes first
        used += delta
        peak = max(peak, used)
    return peak


__all__ = [
    "ActivationTimeline", "STAGING_SLOTS", "Scheduled", "activation_timeline", "grad_available", "max_staging",
    "most_staging_bytes",
    "nvme_seconds", "param_states", "schedule_update", "staging_bytes", "step_peaks", "update_rates",
    "update_seconds",
]
