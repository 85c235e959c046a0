"""The data a parallel plan is made of: the configuration chosen and its memory and time."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from tierplan.cost_models.hardware import Cluster, Hardware, Link

__all__ = [
    "ASSUMED_INTER_NODE",
    "ASSUMED_SERVER_GPUS",
    "MemoryBreakdown",
    "ParallelPlan",
    "TimeBreakdown",
    "WORKSPACE_BYTES",
    "cluster_for",
]

# APEX reserves 1 GiB per device for the framework's workspace (cuBLAS, NCCL buffers, allocator
# slack); so do we, for training and serving alike.
WORKSPACE_BYTES = 1 << 30

# A preset describing a single card (PCIe GPUs, RTX 4090) says nothing about servers. For a
# what-if beyond one card we assume the common 8-card server, cards talking over the preset's
# intra-node link, and servers joined by one 100 Gb/s NIC shared by the server's 8 cards.
ASSUMED_SERVER_GPUS = 8
ASSUMED_INTER_NODE = Link(
    name="inter_node", src="node", dst="node", bandwidth=12.5e9 / ASSUMED_SERVER_GPUS,
    latency_s=10e-6, description="one 100 Gb/s NIC per 8-card server",
)  # fmt: skip


def cluster_for(hw: Hardware, gpus: int) -> tuple[Cluster, list[str]]:
    """The cluster of ``gpus`` devices of ``hw``'s kind, and the assumptions made to build it."""
    c, notes = hw.cluster, []
    per_node = c.gpus_per_node
    inter = c.inter_node
    if per_node == 1 and gpus > 1:
        per_node = ASSUMED_SERVER_GPUS
        notes.append(f"{hw.name}: assumed {per_node} cards per server over {c.intra_node.description if c.intra_node else 'PCIe'}")
    intra = c.intra_node
    if intra is None and gpus > 1:  # e.g. the cpu preset: processes on one machine copy via DRAM
        intra = dataclasses.replace(hw.link("device", "host"), name="intra_node")
        notes.append(f"{hw.name}: assumed the device-host link between devices of a node")
    nodes = max(1, math.ceil(gpus / per_node))
    if nodes > 1 and inter is None:
        inter = ASSUMED_INTER_NODE
        notes.append(f"{hw.name}: assumed {ASSUMED_INTER_NODE.description} between servers")
    if nodes > 1 and gpus % per_node:
        raise ValueError(f"{gpus} GPUs do not fill whole nodes of {per_node}")
    return Cluster(gpus_per_node=min(per_node, gpus), nodes=nodes, intra_node=intra,
                   inter_node=inter), notes  # fmt: skip


@dataclass
class MemoryBreakdown:
    """Bytes per device (the binding pipeline stage's)."""

    parameters: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    kv_cache: float = 0.0
    buffers: float = 0.0

    @property
    def total(self) -> float:
        return (self.parameters + self.gradients + self.optimizer + self.activations
                + self.kv_cache + self.buffers)  # fmt: skip


@dataclass
class TimeBreakdown:
    """Seconds per training step (or per decode step when serving), on the critical path."""

    compute: float = 0.0
    recompute: float = 0.0
    collectives: dict[str, float] = field(default_factory=dict)  # exposed time per collective
    bubble: float = 0.0
    exposed_transfers: float = 0.0  # offload traffic over PCIe not hidden behind compute
    optimizer: float = 0.0

    @property
    def total(self) -> float:
        return (self.compute + self.recompute + sum(self.collectives.values()) + self.bubble
                + self.exposed_transfers + self.optimizer)  # fmt: skip


@dataclass
class ParallelPlan:
    """One point of the search, priced. ``config`` holds the knobs (see ``describe``)."""

    mode: str  # "train" or "serve"
    config: dict[str, Any]
    memory: MemoryBreakdown
    time: TimeBreakdown
    capacity: float  # device bytes available
    metrics: dict[str, float] = field(default_factory=dict)  # tokens/s, MFU, TTFT, TPOT, ...
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.capacity

    @property
    def step_time(self) -> float:
        return self.time.total

    def describe(self) -> str:
        c = self.config
        if self.mode == "serve":
            ep = f" ep{c['ep']}" if c.get("ep", 1) > 1 else ""
            return f"replicas{c['replicas']} tp{c['tp']} pp{c['pp']}{ep} batch{c['batch']}"
        sched = ""
        if c["pp"] > 1:
            sched = " 1F1B" if c["schedule"] == "1f1b" else f" interleaved(v={c['virtual']})"
        rc = ",".join(f"{k}x{n}" for k, n in c["recompute"].items() if n and k != "none") or "none"
        off = [k for k in ("optimizer", "params") if c.get(f"offload_{k}")]
        return (f"dp{c['dp']} tp{c['tp']}{'+sp' if c['tp'] > 1 else ''} pp{c['pp']}{sched} "
                f"zero{c['zero']} mb{c['micro_batch']}x{c['num_micro']} rc[{rc}]"
                + (f" offload[{'+'.join(off)}]" if off else ""))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["memory"]["total"] = self.memory.total
        d["time"]["total"] = self.time.total
        d["describe"] = self.describe()
        return d


def divisors(n: int) -> list[int]:
    """The degrees a dimension of n devices can be split into (APEX enumerates the same)."""
    return [k for k in range(1, n + 1) if n % k == 0]
