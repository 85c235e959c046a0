"""bench/reorder_floor.py: the ops that may cross the step where the remat-only bound binds, and
the bound there in the orders that put them all on one side."""
from __future__ import annotations

import pytest

from bench_modules import load_bench
from tierplan.cost_models.hardware import load_hardware
from tierplan.passes.liveness import liveness
from tierplan.placement.bound import overhead_lower_bound
from tierplan.plans.plan import Pricing

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def floor():
    return load_bench("reorder_floor")


@pytest.fixture(scope="module")
def gpt2_tiny(floor):
    hw = load_hardware("rtx4090")
    _, graph, times = floor.training_graph("gpt2-tiny", 2, 64, hw)
    peak = max(liveness(graph).live_bytes)
    pricing = Pricing(capacities={"device": int(0.6 * peak)}, channels=[], op_time_s=times, hardware=hw.name,
                      training=True)
    return graph, pricing


def test_the_crossing_ops_are_neither_ancestors_nor_descendants(floor, gpt2_tiny) -> None:
    graph, pricing = gpt2_tiny
    binding = graph.ops[overhead_lower_bound(graph, pricing).step].name
    cross = floor.crossing(graph, binding)
    assert cross.ops and not cross.before & cross.after
    assert len(cross.before) + len(cross.after) + len(cross.ops) + 1 == len(graph.ops)
    preds, succs = floor.data_edges(graph)
    for name in cross.ops:  # nothing crossing reads the binding op's results or feeds it
        assert binding not in floor.reach(name, preds) and binding not in floor.reach(name, succs)


def test_no_extreme_order_lowers_the_bound_where_it_binds(floor, gpt2_tiny) -> None:
    """The claim bench/reorder_floor.py prints for GPT-2 small, on gpt2-tiny: with every crossing
    op after the binding step the bound there is the capture order's; with every one before it,
    no lower. Both orders keep the binding op after its ancestors and before its descendants."""
    graph, pricing = gpt2_tiny
    found = overhead_lower_bound(graph, pricing)
    binding = graph.ops[found.step].name
    capture = floor.bound_at(graph, pricing, binding)
    assert capture == pytest.approx(found.overhead_s) and capture > 0
    assert overhead_lower_bound(graph, pricing, at=[0]).overhead_s == 0  # nothing is made before the first op
    orders = floor.extreme_orders(graph, floor.crossing(graph, binding))
    assert [op.name for op in orders["crossing ops before T"].ops] != [op.name for op in graph.ops]
    assert floor.bound_at(orders["crossing ops after T"], pricing, binding) == pytest.approx(capture)
    assert floor.bound_at(orders["crossing ops before T"], pricing, binding) >= capture * (1 - 1e-6)
