"""The exact figures of a schedule: peaks per tier, step time, recompute and stall time.

``simulate`` steps through a schedule with the validator's timing and memory rules (the strict
replay of ``tierplan.plans.walk``) and returns the figures the plan must predict. It is the
planner's own simulator: the validator stays an independent check of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from tierplan.ir import Graph
from tierplan.plans.plan import DEVICE, Channel, Pricing, Step
from tierplan.plans.walk import ScheduleWalker


@dataclass
class Figures:
    peak_bytes: dict[str, int]
    time_s: float
    compute_time_s: float
    recompute_time_s: float
    exposed_transfer_s: float
    peak_step: int  # index in the schedule where the device peak is first reached
    device_at_peak: tuple[str, ...]  # storages on the device at that moment


def simulate(graph: Graph, schedule: Sequence[Step], pricing: Pricing, *,
             initial_tiers: Mapping[str, str]) -> Figures:
    """Peaks per tier and the step time of ``schedule`` (the validator's rules).

    Raises PlanError when a step reads something absent; capacities are not enforced here (the
    caller compares the peaks with them), so that an over-budget plan can still be measured.
    """
    walker = _Simulation(graph, schedule, capacities=pricing.capacities, channels=pricing.channels,
                         op_time_s=pricing.op_time_s, initial_tiers=initial_tiers)
    state = walker.run()
    return Figures(
        peak_bytes=state.peak, time_s=state.clock, compute_time_s=state.compute_s,
        recompute_time_s=state.recompute_s, exposed_transfer_s=state.exposed_s,
        peak_step=walker.peak_step, device_at_peak=walker.at_peak,
    )


class _Simulation(ScheduleWalker):
    """The strict replay, plus the moment of the device peak: the step that first reaches it and
    the storages on the device then (what the infeasible-budget report names)."""

    def __init__(
        self, graph: Graph, schedule: Sequence[Step], *, capacities: Mapping[str, int],
        channels: Sequence[Channel], op_time_s: Mapping[str, float], initial_tiers: Mapping[str, str],
    ) -> None:
        super().__init__(graph, schedule, capacities=capacities, channels=channels,
                         op_time_s=op_time_s, initial_tiers=initial_tiers, strict=True)
        self.peak_step = -1  # the inputs' placement, before step 0, until a step beats it
        self.at_peak: tuple[str, ...] = ()

    def place_inputs(self) -> None:
        super().place_inputs()
        self.at_peak = tuple(sorted(self.state.held[DEVICE]))

    def on_peak(self, index: int, tier: str) -> None:
        if tier == DEVICE:
            self.peak_step, self.at_peak = index, tuple(sorted(self.state.held[DEVICE]))
