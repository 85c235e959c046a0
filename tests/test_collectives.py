"""Alpha-beta collective times over ring/tree and the node topology, against hand values."""
from __future__ import annotations

import math

import pytest

from tierplan.cost_models.collectives import (
    CollectiveError,
    GroupShape,
    collective_time,
    flat_time,
    group_shape,
    p2p_time,
)
from tierplan.cost_models.hardware import Cluster, Link, load_hardware

NV = Link("nv", "device", "device", bandwidth=450e9, latency_s=2e-6)
IB = Link("ib", "node", "node", bandwidth=50e9, latency_s=5e-6)
CLUSTER = Cluster(gpus_per_node=8, nodes=8, intra_node=NV, inter_node=IB)


def test_ring_formulas() -> None:
    n, p = 1e9, 8
    assert flat_time("all_reduce", n, p, NV) == pytest.approx(2 * 7 * (2e-6 + n / (8 * 450e9)))
    assert flat_time("reduce_scatter", n, p, NV) == pytest.approx(7 * (2e-6 + n / (8 * 450e9)))
    assert flat_time("all_gather", n, p, NV) == flat_time("reduce_scatter", n, p, NV)
    assert flat_time("all_reduce", n, 1, NV) == 0 and flat_time("all_reduce", 0, 8, NV) == 0


def test_tree_wins_small_messages_ring_large() -> None:
    p = 64
    small = collective_time("all_reduce", 1024, GroupShape(p, 1), CLUSTER)
    assert small.algorithm == "tree"
    assert small.seconds == pytest.approx(2 * math.ceil(math.log2(p)) * 5e-6 + 2 * 1024 / 50e9)
    assert collective_time("all_reduce", 1e10, GroupShape(p, 1), CLUSTER).algorithm == "ring"


def test_group_layout() -> None:
    assert group_shape(8, 1, 8) == GroupShape(8, 8)  # TP inside a node
    assert group_shape(8, 8, 8) == GroupShape(8, 1)  # DP across nodes, one rank per node
    assert group_shape(16, 2, 8) == GroupShape(16, 4)


def test_hierarchical_beats_flat_ring_across_nodes() -> None:
    n = 4e9
    g = GroupShape(64, 8)
    cost = collective_time("all_reduce", n, g, CLUSTER)
    flat = flat_time("all_reduce", n, 64, IB)
    expect = (flat_time("reduce_scatter", n, 8, NV) + flat_time("all_reduce", n / 8, 8, IB)
              + flat_time("all_gather", n, 8, NV))
    assert cost.algorithm == "hierarchical" and cost.seconds == pytest.approx(expect)
    assert cost.seconds < flat
    # Inside one node the same buffer is far faster than across nodes.
    assert collective_time("all_reduce", n, GroupShape(8, 8), CLUSTER).seconds < cost.seconds / 2


def test_missing_links_are_errors() -> None:
    lonely = Cluster(gpus_per_node=8, nodes=2, intra_node=NV)
    with pytest.raises(CollectiveError, match="inter-node"):
        collective_time("all_gather", 1e6, GroupShape(16, 8), lonely)
    with pytest.raises(CollectiveError):
        p2p_time(1e6, lonely, same_node=False)
    assert p2p_time(1e6, CLUSTER, same_node=True) == pytest.approx(2e-6 + 1e6 / 450e9)


def test_preset_cluster_links() -> None:
    c = load_hardware("h100-sxm").cluster
    t = collective_time("all_reduce", 1e9, GroupShape(8, 8), c)
    assert t.seconds == pytest.approx(2 * 7 * (2e-6 + 1e9 / (8 * 450e9)))
