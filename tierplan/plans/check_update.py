"""The independent check of a plan's optimizer step (``Plan.update``).

Like ``validate``, it shares no code with the planner: it reads the UpdatePlan's data and the
validator's own replay of the schedule, and checks that

- every trained parameter of the graph has one placement, with the bytes its optimizer and
  precision imply, on a tier the plan may use (the device only where its weight and gradient
  stay there, as a device update reads both);
- each parameter has exactly the chain of tasks its placement needs, each on its resource, with
  the duration its bytes and FLOPs take at the recorded rates, starting no earlier than its
  inputs are ready (the gradient produced or landed, the states read, the weight's last reader
  done, the compute stream free of the schedule);
- no resource runs two things at once, the schedule's own copies included;
- at most STAGING_SLOTS parameters hold host staging at once;
- the whole step's peaks (the schedule's, plus resident states, plus the most host staging in
  use at once) and its time are those the plan predicts, and every peak fits its tier.
"""
from __future__ import annotations

import math
from typing import Sequence

from tierplan.ir import TensorKind
from tierplan.plans.plan import COMPUTE_QUEUE, DEVICE, HOST, NVME, Plan, PlanError
from tierplan.plans.update import (
    GRAD_OUT,
    GRAD_READ,
    NVME_READ,
    NVME_WRITE,
    READ_STATES,
    UPDATE,
    WEIGHT_IN,
    WEIGHT_OUT,
    WRITE_STATES,
    ParamState,
    UpdatePlan,
    UpdateTask,
)
from tierplan.plans.validate import Replay

_STATE_COUNT = {"adamw": (2,), "adam": (2,), "sgd": (0, 1)}


def check_update(plan: Plan, replay: Replay, *, rel_tol: float = 1e-6) -> None:
    """Raise PlanError naming the parameter and task at the first violation."""
    update = plan.update
    assert update is not None
    tol = rel_tol * max(replay.time_s, update.step_time_s) + 1e-12
    _check_params(plan, update)
    channels = {(c.src, c.dst): c for c in plan.channels}
    by_param: dict[str, list[UpdateTask]] = {}
    for task in update.tasks:
        by_param.setdefault(task.param, []).append(task)
    unknown = set(by_param) - set(update.states_tier)
    if unknown:
        raise PlanError(f"the update has tasks for {sorted(unknown)[0]}, which it does not place")
    for ps in update.params:
        _check_chain(plan, update, replay, ps, by_param.get(ps.param, []), channels, tol)
    _check_resources(update, replay, tol)
    _check_totals(plan, update, replay, by_param, tol)


def _check_params(plan: Plan, update: UpdatePlan) -> None:
    graph = plan.graph
    grad_of = {param: grad for grad, param in graph.meta.get("grad_of", {}).items()}
    trained = [graph.tensors[n].storage for n in graph.inputs
               if graph.tensors[n].kind is TensorKind.PARAMETER and n in grad_of and not graph.tensors[n].is_view]
    placed = [ps.param for ps in update.params]
    if sorted(placed) != sorted(trained):
        missing = sorted(set(trained) - set(placed)) or sorted(set(placed) - set(trained))
        raise PlanError(f"the update places {len(placed)} parameters, the graph trains {len(trained)} "
                        f"(first difference: {missing[0] if missing else '?'})")
    mixed = update.precision.endswith("-mixed")
    for ps in update.params:
        t = graph.tensors[ps.param]
        numel = math.prod(int(d) for d in t.shape)
        size = 4 if mixed or update.precision == "fp32" else t.nbytes // max(1, numel)
        grad = graph.tensors[grad_of[ps.param]].storage
        # An fp32 parameter under mixed precision (autocast) is its own master.
        expected = dict(numel=numel, weight_bytes=t.nbytes, grad=grad, grad_bytes=graph.tensors[grad].nbytes,
                        master_bytes=4 * numel if mixed and t.dtype != "float32" else 0)
        for name, value in expected.items():
            if getattr(ps, name) != value:
                raise PlanError(f"parameter {ps.param}: the update records {name}={getattr(ps, name)}, "
                                f"the graph and precision give {value}")
        files = ps.state_bytes // max(1, numel * size) + (1 if update.optimizer != "sgd" else 0) + 1
        if ps.state_files != files:
            raise PlanError(f"parameter {ps.param}: {ps.state_files} swap files recorded, its states take {files}")
        if ps.state_bytes not in [k * numel * size for k in _STATE_COUNT[update.optimizer]]:
            raise PlanError(f"parameter {ps.param}: {ps.state_bytes} bytes of {update.optimizer} states "
                            f"is not a whole number of {update.precision} states of {numel} elements")
        tier = update.states_tier.get(ps.param)
        if tier not in plan.capacities:
            raise PlanError(f"parameter {ps.param}: states on {tier!r}, a tier the plan does not have")
        if update.update_on.get(ps.param) != (DEVICE if tier == DEVICE else HOST):
            raise PlanError(f"parameter {ps.param}: states on {tier} but the update runs on "
                            f"{update.update_on.get(ps.param)}; it runs where the states are read")


def _expected_chain(plan: Plan, update: UpdatePlan, replay: Replay, ps: ParamState) -> list[str]:
    tier = update.states_tier[ps.param]
    if tier == DEVICE:
        return [UPDATE]
    grad_at = _fastest(replay.end_tiers.get(str(ps.grad), []))
    chain = {DEVICE: [GRAD_OUT], NVME: [GRAD_READ]}.get(grad_at, [])
    if tier == NVME:
        chain.append(READ_STATES)
    chain.append(UPDATE)
    if tier == NVME:
        chain.append(WRITE_STATES)
    home = plan.initial_tiers.get(ps.param, DEVICE)
    if home == DEVICE:
        chain.append(WEIGHT_IN)
    elif home == NVME:
        chain.append(WEIGHT_OUT)
    return chain


def _fastest(tiers: Sequence[str]) -> str | None:
    for tier in (DEVICE, HOST, NVME):
        if tier in tiers:
            return tier
    return None


def _check_chain(plan: Plan, update: UpdatePlan, replay: Replay, ps: ParamState, chain: list[UpdateTask],
                 channels: dict, tol: float) -> None:
    name = ps.param
    tier = update.states_tier[name]
    expected = _expected_chain(plan, update, replay, ps)
    if sorted(t.kind for t in chain) != sorted(expected):
        raise PlanError(f"parameter {name} (states on {tier}): tasks {[t.kind for t in chain]}, "
                        f"its placement needs {expected}")
    if tier == DEVICE and (plan.initial_tiers.get(name, DEVICE) != DEVICE
                           or _fastest(replay.end_tiers.get(str(ps.grad), [])) != DEVICE):
        raise PlanError(f"parameter {name}: a device update needs its weight and gradient on the device, "
                        f"and the schedule keeps one of them elsewhere")
    task = {t.kind: t for t in chain}
    rates = update.rates
    grad = str(ps.grad)
    resident = ps.state_bytes + (ps.master_bytes if tier == DEVICE else (ps.master_bytes or 4 * ps.numel))
    touched = ps.grad_bytes + 2 * resident + ps.weight_bytes

    def need(kind: str, resource: str, seconds: float, ready: float, nbytes: int) -> None:
        t = task[kind]
        if t.resource != resource:
            raise PlanError(f"parameter {name}: {kind} runs on {t.resource}, it belongs on {resource}")
        if t.nbytes != nbytes:
            raise PlanError(f"parameter {name}: {kind} moves {t.nbytes} bytes, it must move {nbytes}")
        if abs((t.end_s - t.start_s) - seconds) > tol:
            raise PlanError(f"parameter {name}: {kind} takes {t.end_s - t.start_s:.9g} s, "
                            f"its bytes and the rates give {seconds:.9g} s")
        if not update.overlap_backward:
            ready = max(ready, replay.time_s)  # the runtime steps the optimizer after the backward
        if t.start_s < ready - tol:
            raise PlanError(f"parameter {name}: {kind} starts at {t.start_s:.9g} s, before its inputs "
                            f"are ready at {ready:.9g} s")

    def nvme(nbytes: int, read: bool, files: int = 1) -> float:
        bandwidth = rates.nvme_read_bandwidth if read else rates.nvme_write_bandwidth
        return rates.nvme_latency_s + files * rates.file_s + nbytes / bandwidth

    if tier == DEVICE:
        need(UPDATE, COMPUTE_QUEUE, rates.param_update_s + rates.device_launch_s + touched / rates.device_bandwidth,
             replay.time_s, touched)
        return
    grad_ready = replay.landed_s.get(grad, replay.time_s)
    if GRAD_OUT in task:
        down = channels[DEVICE, HOST]
        need(GRAD_OUT, down.queue, down.latency_s + ps.grad_bytes / down.bandwidth,
             replay.produced_s.get(grad, replay.time_s), ps.grad_bytes)
        grad_ready = task[GRAD_OUT].end_s
    if GRAD_READ in task:
        need(GRAD_READ, rates.nvme_resource(NVME_READ), nvme(ps.grad_bytes, True),
             replay.landed_s.get(grad, replay.time_s), ps.grad_bytes)
        grad_ready = task[GRAD_READ].end_s
    states_ready = 0.0
    if READ_STATES in task:
        need(READ_STATES, rates.nvme_resource(NVME_READ), nvme(resident, True, ps.state_files), 0.0, resident)
        states_ready = task[READ_STATES].end_s
    need(UPDATE, rates.host_update_resource,
         rates.param_update_s + max(ps.flops / rates.cpu_flops, touched / rates.dram_bandwidth),
         max(grad_ready, states_ready), touched)
    if task[UPDATE].flops != ps.flops:
        raise PlanError(f"parameter {name}: the update counts {task[UPDATE].flops} FLOPs, the parameter {ps.flops}")
    done = task[UPDATE].end_s
    if WRITE_STATES in task:
        need(WRITE_STATES, rates.nvme_resource(NVME_WRITE), nvme(resident, False, ps.state_files), done, resident)
    weight_free = max(done, replay.last_use_s.get(name, 0.0))
    if WEIGHT_IN in task:
        up = channels[HOST, DEVICE]
        need(WEIGHT_IN, up.queue, up.latency_s + ps.weight_bytes / up.bandwidth, weight_free, ps.weight_bytes)
    if WEIGHT_OUT in task:
        need(WEIGHT_OUT, rates.nvme_resource(NVME_WRITE), nvme(ps.weight_bytes, False), weight_free, ps.weight_bytes)


def _check_resources(update: UpdatePlan, replay: Replay, tol: float) -> None:
    """No task overlaps another task or the schedule's copies and compute on its resource."""
    tasks = update.tasks
    reads, writes = update.rates.nvme_resource(NVME_READ), update.rates.nvme_resource(NVME_WRITE)
    busy: dict[str, list[tuple[float, float, str]]] = {}
    for queue, src, dst, start, end in replay.copies:
        if queue != COMPUTE_QUEUE:
            busy.setdefault(queue, []).append((start, end, f"the schedule's copy {src}->{dst}"))
        if src == NVME:
            busy.setdefault(reads, []).append((start, end, f"the schedule's copy {src}->{dst}"))
        if dst == NVME:
            busy.setdefault(writes, []).append((start, end, f"the schedule's copy {src}->{dst}"))
    busy.setdefault(COMPUTE_QUEUE, []).append((0.0, replay.time_s, "the schedule"))
    for t in tasks:
        busy.setdefault(t.resource, []).append((t.start_s, t.end_s, f"{t.kind} of {t.param}"))
    schedule = "the schedule"
    for resource, intervals in busy.items():
        intervals.sort()
        latest: tuple[float, float, str] | None = None  # the interval running longest so far
        for s1, e1, b in intervals:
            if latest is not None and s1 < latest[1] - tol and e1 > s1 and not (
                    latest[2].startswith(schedule) and b.startswith(schedule)):
                s0, e0, a = latest
                raise PlanError(f"{resource} runs {a} ({s0:.9g}-{e0:.9g} s) and {b} "
                                f"({s1:.9g}-{e1:.9g} s) at once")
            if latest is None or e1 > latest[1]:
                latest = (s1, e1, b)


def _check_totals(plan: Plan, update: UpdatePlan, replay: Replay, by_param: dict[str, list[UpdateTask]],
                  tol: float) -> None:
    peaks = dict(replay.peak_bytes)
    events: list[tuple[float, int, int]] = []
    for ps in update.params:
        tier = update.states_tier[ps.param]
        resident = ps.state_bytes + (ps.master_bytes if tier == DEVICE else (ps.master_bytes or 4 * ps.numel))
        peaks[tier] = peaks.get(tier, 0) + resident
        chain = [t for t in by_param.get(ps.param, []) if t.kind not in (WEIGHT_IN, WEIGHT_OUT)]
        kinds = {t.kind for t in chain}
        staged = (4 * ps.numel if kinds & {GRAD_OUT, GRAD_READ} else 0) + (resident if READ_STATES in kinds else 0)
        if staged:
            events.append((min(t.start_s for t in chain), staged, 1))
            events.append((max(t.end_s for t in chain), -staged, -1))
    used = most = slots = 0
    for _, delta, slot in sorted(events):
        used += delta
        slots += slot
        most = max(most, used)
        if slots > update.staging_slots:
            raise PlanError(f"more than {update.staging_slots} parameters hold host staging buffers at once")
    if update.tasks:
        peaks[HOST] = peaks.get(HOST, 0) + most
    for tier, peak in peaks.items():
        if update.peak_bytes.get(tier, 0) != peak:
            raise PlanError(f"the update predicts a whole-step peak of {update.peak_bytes.get(tier, 0)} bytes "
                            f"on {tier}, the check measures {peak}")
        if peak > plan.capacities.get(tier, 0):
            raise PlanError(f"the whole step holds {peak} bytes on {tier}, over its capacity of "
                            f"{plan.capacities.get(tier, 0)} bytes")
    end = max([replay.time_s, *(t.end_s for t in update.tasks)])
    if abs(end - update.step_time_s) > tol:
        raise PlanError(f"the update predicts a step of {update.step_time_s:.9g} s, the check measures {end:.9g} s")
