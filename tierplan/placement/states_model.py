"""The CP-SAT model that places each parameter's master weight and optimizer states.

One boolean per (parameter, tier it may use); each parameter takes one. The step time T is
bounded below by what every placement costs (docs/cost-model.md, "Optimizer step"):

- each tier's room: the states placed there fit beside the schedule's own peak (on the host also
  beside STAGING_SLOTS of the largest staging buffers);
- each resource's load: T >= the earliest a task can use it + the time of every task placed on it
  (the compute stream's device updates start at the schedule's end);
- each parameter's own chain: T >= when its gradient is available + its chain's tasks.

The model is a relaxation of the list scheduler (it ignores waiting between parameters), so its
optimum is a lower bound and the scheduler's measure of the chosen placement is the prediction.
The secondary objective prefers the device, then the host, then NVMe when T ties.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence, cast

from ortools.sat.python import cp_model

from tierplan.placement.update import (
    ActivationTimeline,
    grad_available,
    most_staging_bytes,
    nvme_seconds,
    update_seconds,
)
from tierplan.plans.plan import DEVICE, HOST, NVME, Channel, PlanError
from tierplan.plans.update import (
    NVME_READ,
    NVME_WRITE,
    STAGING_SLOTS,
    ParamState,
    UpdateRates,
)
from tierplan.units import format_bytes

_NS = 1e9  # the model's time unit is the nanosecond
_PREFERENCE = {DEVICE: 0, HOST: 1, NVME: 2}


def choose_states(
    params: Sequence[ParamState],
    allowed: Mapping[str, Sequence[str]],
    timeline: ActivationTimeline,
    *,
    channels: Sequence[Channel],
    capacities: Mapping[str, int],
    rates: UpdateRates,
    time_limit_s: float = 10.0,
    overlap_backward: bool = False,
    staging_slots: int = STAGING_SLOTS,
) -> dict[str, str]:
    """The tier of every parameter's master and states that minimises the model's step time."""
    if not params:
        return {}
    by_route = {(c.src, c.dst): c for c in channels}
    down, up = by_route.get((DEVICE, HOST)), by_route.get((HOST, DEVICE))
    model = cp_model.CpModel()
    ns = lambda seconds: int(round(seconds * _NS))  # noqa: E731 - a unit, read as one
    x: dict[tuple[str, str], cp_model.IntVar] = {}
    for ps in params:
        tiers = allowed[ps.param]
        if not tiers:
            raise PlanError(f"parameter {ps.param} has no tier its optimizer states may use; add tiers=host")
        for tier in tiers:
            x[ps.param, tier] = model.new_bool_var(f"{ps.param}@{tier}")
        model.add_exactly_one(x[ps.param, tier] for tier in tiers)

    # Rooms.
    reserve = {HOST: most_staging_bytes(params, staging_slots)}
    for tier in (DEVICE, HOST, NVME):
        placed = [(x[ps.param, tier], ps.resident_bytes(tier)) for ps in params if (ps.param, tier) in x]
        if not placed:
            continue
        room = capacities.get(tier, 0) - timeline.peak_bytes.get(tier, 0) - reserve.get(tier, 0)
        model.add(sum(b * v for v, b in placed) <= max(room, 0))

    # Loads per resource, from the first moment a gradient is available.
    grad_at = {ps.param: timeline.end_tier.get(cast(str, ps.grad), DEVICE) for ps in params}
    floor = 0.0 if overlap_backward else timeline.end_s
    avail = {ps.param: max(floor, grad_available(ps, timeline)) for ps in params}
    first = min(avail.values())
    end = ns(timeline.end_s)
    horizon = ns(timeline.end_s + sum(_chain_s(ps, tier, grad_at[ps.param], timeline, down, up, rates)
                                      for ps in params for tier in allowed[ps.param]) + 1.0)
    step = model.new_int_var(end, max(horizon, end), "step")
    off = lambda ps: sum(x[ps.param, t] for t in (HOST, NVME) if (ps.param, t) in x)  # noqa: E731

    device_updates = sum(ns(update_seconds(ps, DEVICE, rates)) * x[ps.param, DEVICE]
                         for ps in params if (ps.param, DEVICE) in x)
    host_updates = sum(ns(update_seconds(ps, HOST, rates)) * off(ps) for ps in params)
    # Copies on the compute stream itself (a CPU device's) run between the updates there.
    inline = sum(ns((down.seconds(ps.grad_bytes) if down is not None and down.inline and grad_at[ps.param] == DEVICE
                     else 0.0)
                    + (up.seconds(ps.weight_bytes) if up is not None and up.inline
                       and timeline.home.get(ps.param, DEVICE) == DEVICE else 0.0)) * off(ps) for ps in params)
    if rates.shared_cpu:  # one set of cores runs the schedule, then every update
        model.add(step >= end + device_updates + host_updates + inline)
    else:
        model.add(step >= end + device_updates)
        model.add(step >= ns(first) + host_updates)
    # The drive's queues: reads and writes apart, or one queue for both on a half-duplex link.
    directions = [(NVME_READ,), (NVME_WRITE,)] if rates.nvme_duplex else [(NVME_READ, NVME_WRITE)]
    for queue in directions if NVME in capacities else ():
        model.add(step >= ns(first + sum(_busy_after(timeline, d, first) for d in queue)) + sum(
            ns(sum(nvme_seconds(ps.resident_bytes(NVME), d, rates, ps.state_files) for d in queue))
            * x[ps.param, NVME] for ps in params if (ps.param, NVME) in x))
    if down is not None and not down.inline:
        moved = [ps for ps in params if grad_at[ps.param] == DEVICE]
        model.add(step >= ns(first + _busy_after(timeline, down.queue, first)) + sum(
            ns(down.seconds(ps.grad_bytes)) * off(ps) for ps in moved))
    if up is not None and not up.inline:
        # The new weights go home after the backward (in step(), overlapped or not).
        back = [ps for ps in params if timeline.home.get(ps.param, DEVICE) == DEVICE]
        model.add(step >= ns(timeline.end_s + _busy_after(timeline, up.queue, timeline.end_s)) + sum(
            ns(up.seconds(ps.weight_bytes)) * off(ps) for ps in back))
    for ps in params:
        model.add(step >= ns(avail[ps.param]) + sum(
            ns(_chain_s(ps, tier, grad_at[ps.param], timeline, down, up, rates)) * x[ps.param, tier]
            for tier in allowed[ps.param]))

    weight = 2 * len(params) + 1  # one nanosecond of T outweighs every preference together
    model.minimize(weight * step + sum(_PREFERENCE[t] * v for (_, t), v in x.items()))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = max(1, min(8, os.cpu_count() or 1))
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        if staging_slots > 1:  # the caller retries with fewer parameters staged at once
            return {ps.param: next(iter(allowed[ps.param])) for ps in params}
        raise PlanError(_no_room(params, allowed, timeline, capacities, reserve, solver.status_name(status)))
    return {ps.param: next(t for t in allowed[ps.param] if solver.value(x[ps.param, t]))
            for ps in params}


def _chain_s(ps: ParamState, tier: str, grad_at: str, timeline: ActivationTimeline,
             down: Channel | None, up: Channel | None, rates: UpdateRates) -> float:
    """One parameter's own chain on ``tier``, from its gradient's availability, alone on the machine."""
    if tier == DEVICE:  # after the schedule, on the compute stream (its load bound covers the wait)
        return update_seconds(ps, DEVICE, rates)
    grad_s = 0.0
    if grad_at == DEVICE and down is not None:
        grad_s = down.seconds(ps.grad_bytes)
    elif grad_at == NVME:
        grad_s = nvme_seconds(ps.grad_bytes, NVME_READ, rates)
    tail = nvme_seconds(ps.resident_bytes(NVME), NVME_WRITE, rates, ps.state_files) if tier == NVME else 0.0
    home = timeline.home.get(ps.param, DEVICE)
    if home == DEVICE and up is not None:
        tail = max(tail, up.seconds(ps.weight_bytes))
    elif home == NVME:
        tail = max(tail, nvme_seconds(ps.weight_bytes, NVME_WRITE, rates))
    return grad_s + update_seconds(ps, HOST, rates) + tail


def _busy_after(timeline: ActivationTimeline, resource: str, t: float) -> float:
    return sum(max(0.0, e - max(s, t)) for s, e in timeline.busy.get(resource, ()))


def _no_room(params: Sequence[ParamState], allowed: Mapping[str, Sequence[str]], timeline: ActivationTimeline,
             capacities: Mapping[str, int], reserve: Mapping[str, int], status: str) -> str:
    need = sum(ps.resident_bytes(HOST) for ps in params)
    rooms = ", ".join(
        f"{tier} {format_bytes(max(0, capacities[tier] - timeline.peak_bytes.get(tier, 0) - reserve.get(tier, 0)))}"
        for tier in (DEVICE, HOST, NVME) if tier in capacities)
    return (f"the master weights and optimizer states ({format_bytes(need)}) fit in no placement "
            f"(CP-SAT: {status}); free room beside the schedule: {rooms}. Add tiers (tiers=host,nvme), "
            f"a larger tier, or a smaller model")


__all__ = ["choose_states"]
