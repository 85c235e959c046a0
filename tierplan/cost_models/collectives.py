"""Collective communication time by alpha-beta models of ring and tree algorithms over a topology.

A collective runs over a *group* of ranks; what matters for its time is how many of them share a
node (they talk over ``Cluster.intra_node``, NVLink) and how many nodes it spans (those hops go
over ``Cluster.inter_node``, InfiniBand). Ranks are laid out Megatron's way, the innermost
parallel dimension fastest: a group of ``size`` ranks ``stride`` apart puts
``min(size, max(1, gpus_per_node // stride))`` of them on each node.

Per link (alpha = latency, beta = per-direction bandwidth per device), for p ranks and a buffer of
n bytes (the full, unsharded size: an all-gather's output, a reduce-scatter's input):

    ring all-reduce      2 (p-1) (alpha + n / (p beta))
    ring reduce-scatter    (p-1) (alpha + n / (p beta))          (all-gather: the same)
    tree all-reduce      2 ceil(log2 p) alpha + 2 n / beta       (pipelined double binary tree)
    all-to-all             (p-1) (alpha + n / (p beta))          (pairwise exchange)
    send / recv          alpha + n / beta

A group spanning k > 1 nodes with m > 1 ranks on each is priced hierarchically, as NCCL does on
NVLink + IB clusters: reduce-scatter inside the node over n, the collective across nodes over n/m
(m rings in parallel, one NIC per GPU), all-gather inside the node. The cheaper of that and a
flat ring over the inter-node link is taken; ``algorithm="auto"`` also takes the cheaper of ring
and tree. The model ignores congestion between concurrent groups and switch topology beyond
"one node, one fabric".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tierplan.cost_models.hardware import Cluster, Link

__all__ = [
    "COLLECTIVES",
    "CollectiveCost",
    "CollectiveError",
    "GroupShape",
    "collective_time",
    "flat_time",
    "group_shape",
    "p2p_time",
]

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "broadcast")


class CollectiveError(ValueError):
    """A group the cluster cannot connect (e.g. spanning nodes with no inter-node link)."""


@dataclass(frozen=True)
class GroupShape:
    """``size`` ranks, ``per_node`` of them on each node they occupy."""

    size: int
    per_node: int

    def __post_init__(self) -> None:
        if self.size < 1 or self.per_node < 1 or self.size % self.per_node:
            raise ValueError(f"bad group shape: {self.size} ranks, {self.per_node} per node")

    @property
    def nodes(self) -> int:
        return self.size // self.per_node


@dataclass(frozen=True)
class CollectiveCost:
    seconds: float
    algorithm: str  # "ring", "tree", "hierarchical", "none"


def group_shape(size: int, stride: int, gpus_per_node: int) -> GroupShape:
    """The shape of a group of ``size`` ranks ``stride`` apart on nodes of ``gpus_per_node``."""
    per_node = min(size, max(1, gpus_per_node // max(1, stride)))
    while size % per_node:  # a ragged layout: fall back to the largest even split
        per_node -= 1
    return GroupShape(size, per_node)


def flat_time(kind: str, nbytes: float, p: int, link: Link, algorithm: str = "ring") -> float:
    """One collective over ``p`` ranks on one kind of link (see the module docstring)."""
    if kind not in COLLECTIVES:
        raise ValueError(f"unknown collective {kind!r}; known: {', '.join(COLLECTIVES)}")
    if p <= 1 or nbytes <= 0:
        return 0.0
    a, b = link.latency_s, link.bandwidth
    if algorithm == "tree":
        steps = math.ceil(math.log2(p))
        if kind == "all_reduce":
            return 2 * steps * a + 2 * nbytes / b
        if kind == "broadcast":
            return steps * a + nbytes / b
        algorithm = "ring"  # no tree variant of the others in NCCL
    if algorithm != "ring":
        raise ValueError(f"unknown algorithm {algorithm!r}")
    if kind == "all_reduce":
        return 2 * (p - 1) * (a + nbytes / (p * b))
    if kind == "broadcast":  # pipelined chain
        return (p - 1) * a + nbytes / b
    return (p - 1) * (a + nbytes / (p * b))  # reduce_scatter, all_gather, all_to_all


def _best_flat(kind: str, nbytes: float, p: int, link: Link, algorithm: str) -> CollectiveCost:
    if algorithm == "auto":
        ring = flat_time(kind, nbytes, p, link, "ring")
        tree = flat_time(kind, nbytes, p, link, "tree")
        return CollectiveCost(ring, "ring") if ring <= tree else CollectiveCost(tree, "tree")
    return CollectiveCost(flat_time(kind, nbytes, p, link, algorithm), algorithm)


def collective_time(
    kind: str, nbytes: float, group: GroupShape, cluster: Cluster, algorithm: str = "auto"
) -> CollectiveCost:
    """Seconds for collective ``kind`` of an ``nbytes`` buffer over ``group`` on ``cluster``."""
    if group.size <= 1 or nbytes <= 0:
        return CollectiveCost(0.0, "none")
    intra, inter = cluster.intra_node, cluster.inter_node
    if group.nodes == 1:
        if intra is None:
            raise CollectiveError("the hardware describes no intra-node link ([cluster.intra_node])")
        return _best_flat(kind, nbytes, group.size, intra, algorithm)
    if inter is None:
        raise CollectiveError(
            f"a group of {group.size} ranks spans {group.nodes} nodes but the hardware describes "
            f"no inter-node link ([cluster.inter_node])"
        )
    flat = _best_flat(kind, nbytes, group.size, inter, algorithm)
    m, k = group.per_node, group.nodes
    if m == 1 or intra is None:
        return flat
    if kind == "all_reduce":
        t = (flat_time("reduce_scatter", nbytes, m, intra)
             + _best_flat("all_reduce", nbytes / m, k, inter, algorithm).seconds
             + flat_time("all_gather", nbytes, m, intra))  # fmt: skip
    elif kind in ("reduce_scatter", "all_gather"):
        t = flat_time(kind, nbytes, m, intra) + flat_time(kind, nbytes / m, k, inter)
    elif kind == "all_to_all":
        # Each rank sends n/p to every other: (m-1) peers over NVLink, (p-m) over the NIC.
        p = group.size
        t = ((m - 1) * (intra.latency_s + nbytes / (p * intra.bandwidth))
             + (p - m) * (inter.latency_s / m + nbytes / (p * inter.bandwidth)))  # fmt: skip
    else:  # broadcast: across nodes, then inside
        t = flat_time(kind, nbytes, k, inter) + flat_time(kind, nbytes, m, intra)
    return flat if flat.seconds <= t else CollectiveCost(t, "hierarchical")


def p2p_time(nbytes: float, cluster: Cluster, *, same_node: bool) -> float:
    """A point-to-point send (pipeline stages): ``alpha + n / beta`` on the link between them."""
    if nbytes <= 0:
        return 0.0
    link = cluster.intra_node if same_node else cluster.inter_node
    if link is None:
        where = "intra" if same_node else "inter"
        raise CollectiveError(f"the hardware describes no {where}-node link ([cluster.{where}_node])")
    return link.latency_s + nbytes / link.bandwidth
