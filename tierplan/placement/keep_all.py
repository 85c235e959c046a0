"""The keep-all plan: every op once, in capture order, every tensor kept on the device until its
last use. It is the reference every other plan's overhead is measured against, and the plan
tierplan falls back to when it fits the budget."""
from __future__ import annotations

from tierplan.ir import PERSISTENT_KINDS, Graph, TensorKind
from tierplan.passes.liveness import Liveness, liveness
from tierplan.plans.plan import DEVICE, Decision, Plan, Pricing, Step, compute, free


def keep_all_plan(graph: Graph, pricing: Pricing, *, live: Liveness | None = None) -> Plan:
    """Run ``graph.ops`` in order on the device and free each storage after its last reader.

    The plan is returned whether or not it fits the budget: callers compare
    ``plan.peak_bytes[DEVICE]`` with it and decide. ``live``: the graph's liveness in capture
    order, when the caller has it.
    """
    live = live if live is not None else liveness(graph)
    order = list(live.order)
    frees_after: dict[int, list[str]] = {}
    keep = set(graph.tensors[name].storage for name in graph.outputs)
    for life in live.lifetimes:
        owner = graph.tensors[life.storage]
        if owner.kind in PERSISTENT_KINDS or life.storage in graph.inputs or life.storage in keep:
            continue
        frees_after.setdefault(life.end - 1, []).append(life.storage)

    schedule: list[Step] = []
    for index, name in enumerate(order):
        schedule.append(compute(name))
        schedule.extend(free(storage, DEVICE) for storage in frees_after.get(index, ()))

    peak_device = live.peak
    inputs_bytes = sum(graph.storage_bytes(name) for name in graph.inputs)
    peak_device = max(peak_device, inputs_bytes)
    total_time = sum(pricing.op_time_s[name] for name in order)
    peaks = {tier: 0 for tier in pricing.capacities}
    peaks[DEVICE] = peak_device
    return Plan(
        graph=graph,
        schedule=schedule,
        capacities=dict(pricing.capacities),
        channels=list(pricing.channels),
        op_time_s=dict(pricing.op_time_s),
        initial_tiers={graph.tensors[name].storage: DEVICE for name in graph.inputs},
        hardware=pricing.hardware,
        training=pricing.training,
        peak_bytes=peaks,
        predicted_time_s=total_time,
        compute_time_s=total_time,
        keep_all_time_s=total_time,
        keep_all_peak_bytes=peak_device,
        method="keep-all",
        decisions=_decisions(graph),
    )


def _decisions(graph: Graph) -> dict[str, Decision]:
    decisions = {}
    for storage in graph.storages():
        t = graph.tensors[storage]
        if t.kind in PERSISTENT_KINDS or storage in graph.inputs:
            decisions[storage] = Decision(
                "persistent", DEVICE, f"a {t.kind.value} owned by the caller, resident on the device "
                "for the whole step (keep-all plan)",
            )
        elif t.kind == TensorKind.ACTIVATION:
            decisions[storage] = Decision(
                "keep", DEVICE, "kept on the device from the forward op that produces it to its "
                "last backward reader: the keep-all plan fits the budget, so nothing is "
                "recomputed or swapped",
            )
        else:
            decisions[storage] = Decision(
                "keep", DEVICE, f"a {t.kind.value}: lives on the device from its producer to its "
                "last reader",
            )
    return decisions
