"""Turn fates (one option per unit) into a Plan with exact predictions and explained decisions.

Shared by the solver and the baselines, so that every plan is priced by the same simulator and the
same cost model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from tierplan.ir import PERSISTENT_KINDS, TensorKind
from tierplan.placement.candidates import KEEP, Option, Problem, Segment, Unit
from tierplan.plans.plan import DEVICE, Decision, Plan, SolverReport
from tierplan.placement.schedule import build_schedule, initial_tiers
from tierplan.placement.simulate import Figures, simulate
from tierplan.units import format_bytes


@dataclass
class Built:
    plan: Plan
    figures: Figures

    @property
    def fits(self) -> bool:
        return all(self.figures.peak_bytes.get(t, 0) <= cap for t, cap in self.plan.capacities.items())


def build_plan(
    problem: Problem,
    fates: Mapping,
    *,
    method: str,
    segments: Mapping[int, Segment] | None = None,
    solver: SolverReport | None = None,
) -> Built:
    """The plan for ``fates`` with predictions from ``simulate`` (it may exceed the
    capacities; ``Built.fits`` says whether it does)."""
    graph = problem.graph
    schedule = build_schedule(problem, fates, segments)
    initial = initial_tiers(problem, fates)
    figures = simulate(graph, schedule, problem.pricing, initial_tiers=initial)
    pricing, reference = problem.pricing, problem.keep_all
    plan = Plan(
        graph=graph, schedule=schedule, capacities=dict(pricing.capacities),
        channels=list(pricing.channels), op_time_s=dict(pricing.op_time_s), initial_tiers=initial,
        hardware=pricing.hardware, training=pricing.training, peak_bytes=dict(figures.peak_bytes),
        predicted_time_s=figures.time_s, compute_time_s=figures.compute_time_s,
        recompute_time_s=figures.recompute_time_s, exposed_transfer_s=figures.exposed_transfer_s,
        keep_all_time_s=reference.predicted_time_s, keep_all_peak_bytes=reference.keep_all_peak_bytes,
        method=method, solver=solver,
        decisions=decisions(problem, fates, segments or {}),
    )
    return Built(plan, figures)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _alternatives(problem: Problem, unit: Unit, chosen: Option) -> str:
    """What the options not taken would have cost, in the cost model's terms."""
    parts = []
    if not chosen.is_recompute:
        if unit.segment is None:
            parts.append("recompute is not possible here (its producer chain is not re-creatable)")
        else:
            parts.append(f"recompute would cost {_ms(unit.segment.time_s)} "
                         f"({len(unit.segment.ops)} op{'s' if len(unit.segment.ops) > 1 else ''})")
    for tier, windows in unit.swaps.items():
        if chosen.tier == tier and not chosen.is_recompute:
            continue
        out_s = sum(w.out_s for w in windows)
        in_s = sum(w.in_s for w in windows)
        parts.append(f"a swap to {tier} would copy {_ms(out_s)} out and {_ms(in_s)} back")
    if not unit.swaps and chosen != KEEP:
        parts.append("no swap tier is reachable")
    return "; ".join(parts)


def decisions(problem: Problem, fates: Mapping, segments: Mapping[int, Segment]) -> dict[str, Decision]:
    graph = problem.graph
    out: dict[str, Decision] = {}
    for storage in graph.storages():
        t = graph.tensors[storage]
        if t.kind in PERSISTENT_KINDS or storage in graph.inputs:
            out[storage] = Decision("persistent", DEVICE, f"a {t.kind.value} owned by the caller, "
                                    "resident on the device for the whole step")
        elif t.kind == TensorKind.ACTIVATION:
            out[storage] = Decision("keep", DEVICE, "an activation read again right after it is made "
                                    "(or never in the backward): nothing to gain by moving it")
        else:
            out[storage] = Decision("keep", DEVICE, f"a {t.kind.value}: lives on the device from its "
                                    "producer to its last reader")
    order = problem.order
    for index, unit in enumerate(problem.units):
        fate = fates.get(index, KEEP)
        alternatives = _alternatives(problem, unit, fate)
        tier = fate.tier
        for w_index, storage in enumerate(unit.storages):
            size = format_bytes(graph.tensors[storage].nbytes)
            f, b = unit.last_fwd[storage], unit.first_bwd[storage]
            if fate == KEEP:
                gap = problem.compute_between(f + 1, b - 1)
                reason = (f"kept: {size} on the device from {unit.op} to {order[b]} "
                          f"({_ms(gap)} of compute in between), the budget holds with it; {alternatives}")
                out[storage] = Decision("keep", DEVICE, reason)
            elif tier is not None:
                w = unit.windows(fate)[w_index]
                hidden_out = "hidden behind" if w.out_hidden_s >= w.out_s else "partly exposed, behind"
                hidden_in = "hidden behind" if w.in_hidden_s >= w.in_s else "partly exposed, behind"
                reason = (f"swapped to {tier}: {size}, offload ({_ms(w.out_s)}) {hidden_out} "
                          f"{_ms(w.out_hidden_s)} of forward compute after {order[f]}, prefetch "
                          f"({_ms(w.in_s)}) {hidden_in} {_ms(w.in_hidden_s)} of compute before "
                          f"{order[b]}; {alternatives}")
                out[storage] = Decision("swap", tier, reason)
            else:
                segment = segments.get(index) or unit.segment_for(fate)
                assert segment is not None
                reason = (f"recomputed before {order[segment.at]}: freed after {order[f]}, "
                          f"{size} off the device for {_ms(problem.compute_between(f + 1, segment.at - 1))} "
                          f"of compute; re-running {', '.join(segment.ops)} costs {_ms(segment.time_s)}; "
                          f"{alternatives}")
                out[storage] = Decision("recompute", DEVICE, reason)
    for i, st in enumerate(problem.streams):
        size = format_bytes(st.nbytes)
        uses = ", ".join(f"{order[a]}..{order[b]}" for a, b in st.clusters)
        if fates.get(("stream", i), KEEP).tier == st.tier:
            exposed = sum(max(0.0, st.in_s - h) for h in st.hidden_s)
            out[st.storage] = Decision("stream", st.tier, (
                f"streamed from {st.tier}: {size} starts there and is fetched to the device "
                f"{len(st.clusters)} time(s) ({_ms(st.in_s)} each, {_ms(exposed)} not hidden by the "
                f"compute before it if the link is free), once per cluster of uses ({uses}), and "
                f"freed from the device after each"))
        elif out.get(st.storage) is not None and out[st.storage].fate == "persistent":
            out[st.storage] = Decision("persistent", DEVICE, (
                f"a {problem.graph.tensors[st.storage].kind.value} owned by the caller, resident on "
                f"the device for the whole step; streaming it from {st.tier} would fetch {size} "
                f"{len(st.clusters)} time(s) at {_ms(st.in_s)} each"))
    for i, off in enumerate(problem.offloads):
        if fates.get(("offload", i), KEEP).tier == off.tier:
            out[off.storage] = Decision("offload", off.tier, (
                f"offloaded to {off.tier}: {format_bytes(off.nbytes)} copied out after "
                f"{order[off.start]} ({_ms(off.out_s)}, behind {_ms(off.hidden_s)} of compute), its "
                f"device copy freed once it has landed; it ends the step on {off.tier}"))
    return out
