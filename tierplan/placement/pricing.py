"""From a Hardware description to the two things a plan needs of it: how many bytes each tier may
hold, and the transfer channels between the device and the slower tiers."""
from __future__ import annotations

from typing import Sequence

from tierplan.cost_models.hardware import Hardware
from tierplan.cost_models.transfer import tier_route
from tierplan.plans.plan import DEVICE, Channel, PlanError


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
