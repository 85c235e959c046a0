"""Transfer time between tiers by the alpha-beta model.

    t(n) = alpha + n / beta

alpha is the fixed cost of a transfer (link latency plus the access latency of the tiers at
either end: tens of microseconds for NVMe, negligible for DRAM and HBM) and beta the bandwidth of
the slowest stage on the way: each link, the source tier's read bandwidth and the destination
tier's write bandwidth (an NVMe drive writes slower than PCIe 4 x4 carries). A path through
several tiers (device -> host -> nvme) is priced as a pipelined copy through bounce buffers, as
DeepSpeed and our runtime do it: latencies add up, the narrowest stage sets the rate. A CXL
memory expander (the ``cxl-type3`` part) hangs off the host too: device -> host -> cxl is the
GPU's one DMA over its PCIe link and out the CPU's CXL port; host DRAM's rates, an intermediate
stage there, are far above both links and never bind.

When both directions of a link run at once (prefetching one tensor while evicting another), each
direction gets ``Link.bandwidth_both_ways()``: the measured ``concurrent_bandwidth`` when the file
gives one, the full bandwidth on a duplex link, half of it on a shared (half-duplex) channel.
"""
from __future__ import annotations

from dataclasses import dataclass

from tierplan.cost_models.hardware import Hardware, Link

__all__ = [
    "Route",
    "concurrent_bandwidth",
    "tier_bandwidth",
    "tier_route",
    "tier_transfer_time",
    "transfer_time",
]


def _check_nbytes(nbytes: int) -> None:
    if nbytes < 0:
        raise ValueError(f"cannot transfer a negative number of bytes ({nbytes})")


def transfer_time(nbytes: int, link: Link, *, both_ways: bool = False) -> float:
    """Seconds to move ``nbytes`` over ``link``; 0 for nothing.

    ``both_ways``: the opposite direction is busy at the same time.
    """
    _check_nbytes(nbytes)
    if nbytes == 0:
        return 0.0
    bandwidth = link.bandwidth_both_ways() if both_ways else link.bandwidth
    return link.latency_s + nbytes / bandwidth


def concurrent_bandwidth(link: Link) -> float:
    """Per-direction bytes/s of ``link`` while both directions run."""
    return link.bandwidth_both_ways()


@dataclass(frozen=True)
class Route:
    """How data goes from tier ``src`` to tier ``dst``: the links, alpha and beta."""

    src: str
    dst: str
    links: tuple[Link, ...]
    latency_s: float  # alpha
    bandwidth: float  # beta, bytes/s; inf for src == dst (nothing moves)

    def time(self, nbytes: int) -> float:
        _check_nbytes(nbytes)
        if nbytes == 0 or not self.links:
            return 0.0
        return self.latency_s + nbytes / self.bandwidth


def tier_route(hw: Hardware, src: str, dst: str, *, both_ways: bool = False) -> Route:
    """The alpha-beta route from tier ``src`` to tier ``dst`` of ``hw`` (fewest hops)."""
    links = hw.route(src, dst)
    if not links:
        hw.tier(src)
        return Route(src, dst, (), 0.0, float("inf"))
    names = [src] + [link.dst for link in links]
    tiers = [hw.tier(n) for n in names]
    # Intermediate tiers are written then read (bounce buffers); the ends only one way each.
    stages = [tiers[0].read_bandwidth, tiers[-1].write_bandwidth]
    for t in tiers[1:-1]:
        stages += [t.read_bandwidth, t.write_bandwidth]
    stages += [link.bandwidth_both_ways() if both_ways else link.bandwidth for link in links]
    latency = sum(link.latency_s for link in links) + tiers[0].latency_s + tiers[-1].latency_s
    return Route(src, dst, tuple(links), latency, min(stages))


def tier_transfer_time(
    hw: Hardware, nbytes: int, src: str, dst: str, *, both_ways: bool = False
) -> float:
    """Seconds to move ``nbytes`` from tier ``src`` to tier ``dst``; 0 when they are the same."""
    return tier_route(hw, src, dst, both_ways=both_ways).time(nbytes)


def tier_bandwidth(hw: Hardware, src: str, dst: str, *, both_ways: bool = False) -> float:
    """Bytes/s from tier ``src`` to tier ``dst`` for large transfers (beta of the route)."""
    return tier_route(hw, src, dst, both_ways=both_ways).bandwidth
