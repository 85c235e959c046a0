"""From a Hardware description to the Pricing a plan is made in: how many bytes each tier may hold,
the transfer channels between the device and the slower tiers, and each op's time."""
from __future__ import annotations

from typing import Sequence

from tierplan.cost_models.compute import graph_op_times
from tierplan.cost_models.hardware import Hardware
from tierplan.cost_models.transfer import tier_route
from tierplan.ir import Graph
from tierplan.plans.plan import DEVICE, Channel, PlanError, Pricing


def tier_capacities(hardware: Hardware, tiers: Sequence[str]) -> dict[str, int]:
    """Capacity in bytes of the device tier and of each slower tier the plan may use."""
    capacities = {DEVICE: hardware.tier(DEVICE).capacity_bytes}
    for name in tiers:
        if name == DEVICE:
            raise PlanError(
                "tiers lists 'device': name only the slower tiers a plan may use, e.g. host,nvme"
            )
        capacities[name] = hardware.tier(name).capacity_bytes
    return capacities


def transfer_channels(hardware: Hardware, tiers: Sequence[str]) -> list[Channel]:
    """One channel each way between the device and every tier in ``tiers``.

    Bandwidth and latency are the α-β route of the cost model (``transfer.tier_route``: the
    slowest stage sets the rate, latencies add up). The queue is named after the route's link at
    the device end and its direction, so that transfers to host and to NVMe, which both cross the
    device's PCIe link, wait for each other; a link that is not duplex has one queue both ways.
    """
    channels = []
    for name in tiers:
        for src, dst in ((DEVICE, name), (name, DEVICE)):
            route = tier_route(hardware, src, dst)
            device_link = route.links[0] if src == DEVICE else route.links[-1]
            direction = "from-device" if src == DEVICE else "to-device"
            queue = f"{device_link.name}:{direction}" if device_link.duplex else device_link.name
            channels.append(
                Channel(src, dst, bandwidth=route.bandwidth, latency_s=route.latency_s, queue=queue)
            )
    return channels


def machine_pricing(graph: Graph, hardware: Hardware, *, tiers: Sequence[str], training: bool,
                    budget: int | None = None) -> Pricing:
    """``graph`` priced on ``hardware`` with the slower ``tiers``: each op's roofline time, the
    tiers' capacities and the copy channels. ``budget`` (bytes) defaults to the device memory."""
    capacities = tier_capacities(hardware, tiers)
    if budget is not None:
        capacities[DEVICE] = int(budget)
    return Pricing(capacities=capacities, channels=tuple(transfer_channels(hardware, tiers)),
                   op_time_s=graph_op_times(graph, hardware), hardware=hardware.name, training=training)
