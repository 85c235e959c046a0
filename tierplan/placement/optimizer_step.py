"""The whole training step: the schedule of forward and backward, then the optimizer step.

``plan_step`` plans both. The device memory the optimizer's states may take is what the schedule
leaves: it first plans the schedule at the whole budget and places the states in the room left
(CP-SAT, ``states_model``), then, when every parameter's states could live on the device, plans
the schedule again at the budget less those states and keeps whichever whole step is faster.

``step_baselines`` prices the policies of the systems tierplan is measured against, with the same
simulator and list scheduler:

- keep-all, checkpoint-blocks, swap-all: those schedules with the states on the device (what a
  plain ``torch.optim`` optimizer does);
- zero-offload (Ren et al. 2021): block checkpointing, parameters on the device, gradients
  offloaded to the host as the backward produces them, states and the update on the host CPU;
- zero-infinity (Rajbhandari et al. 2021): block checkpointing, parameters streamed from NVMe
  at the fixed prefetch points of ``candidates``, gradients offloaded to the host, states on
  NVMe and the update on the host CPU.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Iterable, Mapping, cast

from tierplan.ir import Graph
from tierplan.passes.liveness import Liveness
from tierplan.placement.assemble import build_plan
from tierplan.placement.baselines import checkpoint_blocks_fates, swap_all_fates
from tierplan.placement.candidates import Option, Problem, Segment, analyze
from tierplan.placement.solve import solve
from tierplan.placement.states_model import choose_states
from tierplan.placement.update import (
    ActivationTimeline,
    Scheduled,
    activation_timeline,
    most_staging_bytes,
    param_states,
    schedule_update,
)
from tierplan.plans.plan import (
    DEVICE,
    HOST,
    NVME,
    InfeasibleBudget,
    Plan,
    PlanError,
    Pricing,
)
from tierplan.plans.update import STAGING_SLOTS, ParamState, UpdatePlan, UpdateRates
from tierplan.units import format_bytes

# The states' placement is a small model; it gets this share of the caller's time limit.
STATES_TIME_SHARE = 0.25
DEFAULT_STATES_TIME_S = 10.0


def allowed_tiers(ps: ParamState, timeline: ActivationTimeline, capacities: Mapping[str, int]) -> list[str]:
    """Where ``ps``'s states may live: on the device only when its weight and gradient stay there
    (a device update reads both), on a slower tier when the plan may use it."""
    tiers = [t for t in (HOST, NVME) if t in capacities]
    if timeline.home.get(ps.param, DEVICE) == DEVICE and timeline.end_tier.get(cast(str, ps.grad)) == DEVICE:
        tiers.insert(0, DEVICE)
    return tiers


def plan_update(plan: Plan, rates: UpdateRates, *, optimizer: str, precision: str,
                time_limit_s: float = DEFAULT_STATES_TIME_S, fixed: str | None = None,
                method: str = "", overlap_backward: bool = False, staging_slots: int = STAGING_SLOTS) -> UpdatePlan:
    """The optimizer step of ``plan``: placements chosen by the CP-SAT model (or every
    parameter's states on the ``fixed`` tier, as a baseline policy does), scheduled by
    ``schedule_update``. Raises PlanError naming the tiers when the states fit nowhere."""
    started = time.perf_counter()
    if not plan.training:
        raise PlanError("an optimizer step needs a training plan (training=True)")
    params = param_states(plan.graph, optimizer, precision)
    timeline = activation_timeline(plan)
    capacities = dict(plan.capacities)
    if fixed is not None and fixed not in capacities:
        raise PlanError(f"the {method or fixed} policy keeps states on {fixed}, which the plan's tiers lack")
    allowed = {ps.param: [fixed] if fixed is not None else allowed_tiers(ps, timeline, capacities) for ps in params}
    method = method or "CP-SAT placement of masters and states, list-scheduled after the schedule"
    # Fewer parameters staged at once when the host cannot stage that many (down to one).
    def measure(states_tier: dict[str, str], slots: int) -> Scheduled:
        return schedule_update(params, states_tier, timeline, channels=plan.channels, capacities=capacities,
                               rates=rates, overlap_backward=overlap_backward, staging_slots=slots)

    for slots in range(staging_slots, 0, -1):
        if fixed is not None:
            states_tier = {ps.param: fixed for ps in params}
            scheduled = measure(states_tier, slots)
        else:
            states_tier = choose_states(params, allowed, timeline, channels=plan.channels, capacities=capacities,
                                        rates=rates, time_limit_s=time_limit_s, overlap_backward=overlap_backward,
                                        staging_slots=slots)
            scheduled = measure(states_tier, slots)
            # The model is a relaxation: keep a uniform placement the scheduler measures faster.
            for tier in (DEVICE, HOST, NVME):
                if all(tier in allowed[ps.param] for ps in params):
                    uniform = {ps.param: tier for ps in params}
                    other = measure(uniform, slots)
                    if not other.overflow and (scheduled.overflow or other.step_time_s < scheduled.step_time_s):
                        states_tier, scheduled = uniform, other
        if not scheduled.overflow:
            break
    else:
        raise PlanError(
            f"the {optimizer} states ({precision}) do not fit: {scheduled.overflow}; add a slower "
            f"tier (tiers=host,nvme), lower the batch, or raise the tier's capacity")
    return UpdatePlan(
        optimizer=optimizer, precision=precision, params=params, states_tier=states_tier,
        update_on={p: (DEVICE if t == DEVICE else HOST) for p, t in states_tier.items()},
        tasks=scheduled.tasks, rates=rates, peak_bytes=scheduled.peak_bytes,
        step_time_s=scheduled.step_time_s, update_exposed_s=scheduled.step_time_s - timeline.end_s,
        method=method, solve_s=time.perf_counter() - started, overlap_backward=overlap_backward,
        staging_slots=slots,
    )


def plan_step(graph: Graph, pricing: Pricing, rates: UpdateRates, *, optimizer: str, precision: str,
              time_limit_s: float | None = None, live: Liveness | None = None,
              overlap_backward: bool = False) -> Plan:
    """The fastest whole step found: the schedule and the optimizer step (module docstring).
    ``overlap_backward``: host updates may start as the backward makes their gradients (the
    runtime's ``update_in_backward``); else the update starts when the schedule ends.

    The schedule is planned with the host's room for the update's staging buffers held back (the
    largest STAGING_SLOTS parameters' gradients and states), so that the update can run beside
    whatever the schedule leaves on the host; without that room, with none held back."""
    states_limit = DEFAULT_STATES_TIME_S if time_limit_s is None else max(1.0, STATES_TIME_SHARE * time_limit_s)
    params = param_states(graph, optimizer, precision)
    staging = most_staging_bytes(params, STAGING_SLOTS)

    def attempt(device_reserve: int, host_reserve: int) -> Plan:
        held = dict(pricing.capacities)
        held[DEVICE] -= device_reserve
        if HOST in held:
            held[HOST] = max(0, held[HOST] - host_reserve)
        plan = solve(graph, dataclasses.replace(pricing, capacities=held), time_limit_s=time_limit_s, live=live)
        plan.capacities = {**plan.capacities, **pricing.capacities}  # the update takes what was held back
        plan.update = plan_update(plan, rates, optimizer=optimizer, precision=precision, time_limit_s=states_limit,
                                  overlap_backward=overlap_backward)
        return plan

    try:
        plan = attempt(0, staging)
    except (InfeasibleBudget, PlanError):
        plan = attempt(0, 0)  # raises what keeps the step from fitting at all
    assert plan.update is not None
    on_device = sum(ps.resident_bytes(DEVICE) for ps in plan.update.params)
    if plan.update.bytes_on(DEVICE) == on_device or on_device >= pricing.budget:
        return plan
    # Every parameter's states could live on the device: plan the schedule in what they leave.
    try:
        reserved = attempt(on_device, staging)
    except PlanError:  # InfeasibleBudget included
        return plan
    assert reserved.update is not None
    return reserved if reserved.update.step_time_s < plan.update.step_time_s else plan


@dataclass
class StepBaselines:
    """Each policy's plan (None where it cannot run) and, for those, why."""

    plans: dict[str, Plan | None]
    reasons: dict[str, str]


def step_baselines(plan: Plan, *, live: Liveness | None = None) -> StepBaselines:
    """The baseline policies of the module docstring, for ``plan``'s graph, setting and optimizer."""
    if plan.update is None:
        raise PlanError("step baselines need a plan with an optimizer step (plan it with optimizer=...)")
    update = plan.update
    pricing = plan.pricing
    problem = analyze(plan.graph, pricing, live=live, offer_streams=True)
    ckpt = checkpoint_blocks_fates(problem)
    ckpt_fates, ckpt_segments = ckpt if ckpt is not None else ({}, {})
    swap_fates = swap_all_fates(problem)
    to_host = _offloads(problem, HOST)
    # Each policy: the states' tier and its schedules (fates, recompute segments), the fastest
    # that fits kept. ZeRO-Infinity checkpoints blocks and offloads the checkpoints to the host;
    # the candidate space cannot stream a parameter that a recompute reads, so its swap-all
    # variant (every saved activation to the host, every parameter streamed) stands beside it.
    policies: dict[str, tuple[str, list[tuple[Mapping, Mapping[int, Segment] | None]]]] = {
        "keep-all": (DEVICE, [({}, None)]),
        "checkpoint-blocks": (DEVICE, [(ckpt_fates, ckpt_segments)]),
        "swap-all": (DEVICE, [(swap_fates, None)]),
        "zero-offload": (HOST, [({**ckpt_fates, **to_host}, ckpt_segments)]),
        "zero-infinity": (NVME, [
            ({**ckpt_fates, **to_host, **_streams(problem, NVME, ckpt_segments.values())}, ckpt_segments),
            ({**swap_fates, **to_host, **_streams(problem, NVME, ())}, None),
        ]),
    }
    # ZeRO-Infinity's optimizer swapper reads, updates and writes one parameter group after
    # another (DeepSpeed's pipeline_read and pipeline_write default to false): one staging slot.
    slots = {"zero-infinity": 1}
    plans: dict[str, Plan | None] = {}
    reasons: dict[str, str] = {}
    for name, (states, schedules) in policies.items():
        missing = [t for t in (HOST, NVME) if t in _tiers_used(name) and t not in pricing.capacities]
        if missing:
            plans[name], reasons[name] = None, f"needs the {', '.join(missing)} tier"
            continue
        plans[name], why = None, []
        for fates, segments in schedules:
            built = build_plan(problem, fates, segments=segments or None, method=name)
            if not built.fits:
                why.append(_over_capacity(built.plan))
                continue
            candidate = built.plan
            try:
                candidate.update = plan_update(candidate, update.rates, optimizer=update.optimizer,
                                               precision=update.precision, fixed=states, method=name,
                                               staging_slots=slots.get(name, STAGING_SLOTS))
            except PlanError as exc:
                why.append(str(exc).split("; add ")[0])
                continue
            best = plans[name]
            if best is None or candidate.step_time_s < best.step_time_s:
                plans[name] = candidate
        if plans[name] is None:
            reasons[name] = "; with its other schedule, ".join(why)
    return StepBaselines(plans=plans, reasons=reasons)


def _over_capacity(plan: Plan) -> str:
    """What keeps a schedule from fitting: the first tier over its capacity."""
    for tier, capacity in plan.capacities.items():
        peak = plan.peak_bytes.get(tier, 0)
        if peak > capacity:
            what = "device memory" if tier == DEVICE else f"the {tier} tier"
            return (f"its schedule needs {format_bytes(peak)} of {what}, {format_bytes(peak - capacity)} over "
                    f"its {format_bytes(capacity)}")
    return "its schedule does not fit"


def _tiers_used(policy: str) -> tuple[str, ...]:
    return {"zero-offload": (HOST,), "zero-infinity": (HOST, NVME)}.get(policy, ())


def _offloads(problem: Problem, tier: str) -> dict[object, Option]:
    return {("offload", i): o.option for i, o in enumerate(problem.offloads) if o.tier == tier}


def _streams(problem: Problem, tier: str, segments: Iterable[Segment]) -> dict[object, Option]:
    """Every parameter streamed from ``tier``, except those a recompute of ``segments`` reads
    where the stream has no copy on the device (those stay on the device)."""
    params = set(problem.graph.meta.get("grad_of", {}).values())
    segments = list(segments)
    return {("stream", i): s.option for i, s in enumerate(problem.streams)
            if s.tier == tier and s.storage in params
            and all(s.present_at(seg.at) for seg in segments if s.storage in seg.persistent)}


__all__ = ["StepBaselines", "allowed_tiers", "plan_step", "plan_update", "step_baselines"]
