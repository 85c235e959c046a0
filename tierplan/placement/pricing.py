"""From a Hardware description to the Pricing a plan is made in: how many bytes each tier may hold,
the transfer channels between the device and the slower tiers, and each op's time.

What running a plan costs beyond its kernels and its bytes (``Hardware.runtime``, a
``RuntimeCosts``: the generated program and its runtime, ``tierplan.codegen``) is priced in the
same two currencies, so that the simulator and the validator price it unchanged:

- every op of the graph costs ``op_issue_s`` more than its roofline: the program's line for it
  (the ``OpOverload`` call, its output's allocation and the previous one's free) and what small
  kernels take beyond their roofline in a program, a view included (no kernel runs, but it is a
  line of the program too);
- a step costs ``step_s + input_s`` per graph input (the module around the program: parameter
  lookup, the autograd Function, the gradients handed back), charged to the graph's last op,
  which no plan runs twice (its outputs are read by nothing but the return);
- every copy costs the fixed cost of the queue the runtime puts it on, as channel latency:
  ``file_copy_s`` for NVMe (a swap file, on a worker thread), and for host memory (host, cxl)
  ``inline_copy_s`` on a CPU device (the compute thread copies it: device and host are one DRAM)
  or ``stream_copy_s`` on a GPU (a CUDA copy stream);
- on a CPU device, a copy to host memory runs on the compute thread (``COMPUTE_QUEUE``): it hides
  behind nothing, so the plan pays its whole time, and it saves device budget, not memory (the
  two are one DRAM; ``same_memory``).
"""
from __future__ import annotations

from typing import Mapping, Sequence

from tierplan.cost_models.compute import graph_op_times
from tierplan.cost_models.hardware import Hardware
from tierplan.cost_models.transfer import tier_route
from tierplan.ir import Graph
from tierplan.plans.plan import COMPUTE_QUEUE, DEVICE, NVME, Channel, PlanError, Pricing


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


def copy_issue_s(hardware: Hardware, tier: str) -> float:
    """The runtime's fixed cost of one copy between the device and ``tier`` (issue and
    completion, on the queue it uses there; see the module docstring)."""
    runtime = hardware.runtime
    if tier == NVME:
        return runtime.file_copy_s
    return runtime.inline_copy_s if hardware.device.kind == "cpu" else runtime.stream_copy_s


def same_memory(hardware: Hardware, tier: str) -> bool:
    """Whether ``tier`` is the same memory as the device (host DRAM on a CPU-only machine): a
    copy to it frees device budget, not memory, and costs a memcpy on the compute thread."""
    return hardware.device.kind == "cpu" and tier != NVME and tier != DEVICE


def transfer_channels(hardware: Hardware, tiers: Sequence[str]) -> list[Channel]:
    """One channel each way between the device and every tier in ``tiers``.

    Bandwidth and latency are the α-β route of the cost model (``transfer.tier_route``: the
    slowest stage sets the rate, latencies add up), plus the runtime's fixed cost of a copy on
    that route (``copy_issue_s``). The queue is named after the route's link at the device end
    and its direction, so that transfers to host and to NVMe, which both cross the device's PCIe
    link, wait for each other; a link that is not duplex has one queue both ways.
    """
    channels = []
    for name in tiers:
        issue = copy_issue_s(hardware, name)
        for src, dst in ((DEVICE, name), (name, DEVICE)):
            route = tier_route(hardware, src, dst)
            device_link = route.links[0] if src == DEVICE else route.links[-1]
            direction = "from-device" if src == DEVICE else "to-device"
            if same_memory(hardware, name):  # a memcpy by the compute thread (module docstring)
                queue = COMPUTE_QUEUE
            else:
                queue = f"{device_link.name}:{direction}" if device_link.duplex else device_link.name
            channels.append(Channel(src, dst, bandwidth=route.bandwidth, latency_s=route.latency_s + issue,
                                    queue=queue))
    return channels


def op_times(graph: Graph, hardware: Hardware, measured: Mapping[str, float] | None = None) -> dict[str, float]:
    """Seconds per op of ``graph`` as a generated program runs it on ``hardware``: the roofline
    (``compute.graph_op_times``) plus the runtime's issue cost per op, and the per-step cost on the
    last op (see the module docstring). ``measured``: seconds per op name timed on the machine
    (``cost_models.measured``), which replace roofline and issue cost for those ops (a timed
    call is the program's call: dispatch and allocation included)."""
    runtime = hardware.runtime
    measured = measured or {}
    times = {name: measured[name] if name in measured else t + runtime.op_issue_s
             for name, t in graph_op_times(graph, hardware).items()}
    if graph.ops:
        times[graph.ops[-1].name] += runtime.step_s + runtime.input_s * len(graph.inputs)
    return times


def machine_pricing(graph: Graph, hardware: Hardware, *, tiers: Sequence[str], training: bool,
                    budget: int | None = None, measured_op_s: Mapping[str, float] | None = None) -> Pricing:
    """``graph`` priced on ``hardware`` with the slower ``tiers``: each op's time (``op_times``,
    ``measured_op_s`` where given), the tiers' capacities and the copy channels. ``budget``
    (bytes) defaults to the device memory."""
    capacities = tier_capacities(hardware, tiers)
    if budget is not None:
        capacities[DEVICE] = int(budget)
    return Pricing(capacities=capacities, channels=tuple(transfer_channels(hardware, tiers)),
                   op_time_s=op_times(graph, hardware, measured_op_s), hardware=hardware.name, training=training)
