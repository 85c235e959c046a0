"""Operator orders: every order is checked to be a topological order of the graph by
``check_topological`` below (independent of tierplan.passes.ordering and liveness)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierplan.ir import Graph, OpInfo, Phase, TensorInfo, TensorKind, link_users
from tierplan.passes.liveness import peak_bytes
from tierplan.passes.ordering import (
    best_order,
    order_bfs,
    order_dfs,
    order_free_first,
    order_lpmf,
    orders,
)


def make_graph(inputs, ops, outputs, name="g") -> Graph:
    """``inputs``: {name: nbytes}; ``ops``: (op, target, reads, {out: nbytes or ("view", base)},
    phase); outputs: names. Views and in-place results alias their base's storage."""
    tensors = {n: TensorInfo(n, (z,), "uint8", z, TensorKind.INPUT) for n, z in inputs.items()}
    op_infos = []
    for op, target, reads, outs, phase in ops:
        for out, spec in outs.items():
            if isinstance(spec, tuple):
                base = tensors[spec[1]].storage
                tensors[out] = TensorInfo(out, (0,), "uint8", 0, TensorKind.TEMPORARY, storage=base)
            else:
                tensors[out] = TensorInfo(out, (spec,), "uint8", spec, TensorKind.TEMPORARY)
        op_infos.append(OpInfo(op, target, list(reads), list(outs), phase))
    link_users(tensors, op_infos)
    for o in outputs:
        if tensors[o].kind == TensorKind.TEMPORARY:
            tensors[o].kind = TensorKind.OUTPUT
    g = Graph(name, tensors, op_infos, list(inputs), list(outputs))
    g.check()
    return g


def check_topological(graph: Graph, order) -> None:
    """Each op once, after the producers of everything it reads, and after every op that read
    a storage it overwrites in place (optimizer updates, aten ``op_``)."""
    assert sorted(order) == sorted(op.name for op in graph.ops)
    pos = {name: i for i, name in enumerate(order)}
    capture = {op.name: i for i, op in enumerate(graph.ops)}
    for op in graph.ops:
        for t in op.inputs:
            producer = graph.tensors[t].producer
            if producer is not None:
                assert pos[producer] < pos[op.name], (producer, op.name)
        writes = op.phase == Phase.OPTIMIZER or op.target.split(".")[1].endswith("_")
        for t in op.outputs:
            info = graph.tensors[t]
            if writes and info.is_view:
                for other in graph.ops:
                    reads_it = any(graph.tensors[x].storage == info.storage for x in other.inputs)
                    if other is not op and reads_it and capture[other.name] < capture[op.name]:
                        assert pos[other.name] < pos[op.name], (other.name, op.name)


F = Phase.FORWARD


def two_branches() -> Graph:
    """Two independent branches, each a big temporary reduced to a small result, joined at the
    end. Capture interleaves them, so both temporaries are live at once."""
    return make_graph(
        {"x": 8},
        [
            ("a1", "aten.mm.default", ["x"], {"A": 1000}, F),
            ("b1", "aten.mm.default", ["x"], {"B": 1000}, F),
            ("a2", "aten.sum.default", ["A"], {"a": 10}, F),
            ("b2", "aten.sum.default", ["B"], {"b": 10}, F),
            ("c", "aten.add.Tensor", ["a", "b"], {"out": 10}, F),
        ],
        ["out"],
    )


def test_reordering_lowers_the_peak_of_two_interleaved_branches():
    g = two_branches()
    capture_peak = peak_bytes(g)
    assert capture_peak == 8 + 1000 + 1000 + 10  # at a2: x, A, B and a
    order, peak, method = best_order(g)
    check_topological(g, order)
    assert peak == peak_bytes(g, order) == 8 + 10 + 1000 + 10  # at b2: x, a, B and b
    assert peak < capture_peak


def test_inductor_sorts_are_topological_and_reported():
    g = two_branches()
    found = orders(g)
    assert set(found) == {"capture", "lpmf", "bfs", "dfs"}
    for order in found.values():
        check_topological(g, order)
    assert peak_bytes(g, found["lpmf"]) < peak_bytes(g)  # LPMF frees A before allocating B
    assert peak_bytes(g, found["dfs"]) < peak_bytes(g)  # DFS finishes a branch first


def test_views_extend_the_base_and_in_place_writes_wait_for_readers():
    g = make_graph(
        {"p": 64, "x": 8},
        [
            ("f", "aten.mm.default", ["x", "p"], {"h": 100}, F),
            ("v", "aten.view.default", ["h"], {"hv": ("view", "h")}, F),
            ("big", "aten.mm.default", ["x"], {"t": 500}, F),
            ("use", "aten.add.Tensor", ["hv", "t"], {"y": 8}, F),
            ("upd", "optimizer.sgd", ["p", "y"], {"p2": ("view", "p")}, Phase.OPTIMIZER),
            ("late", "aten.mul.Tensor", ["p", "x"], {"z": 8}, F),
            ("inplace", "aten.add_.Tensor", ["z", "y"], {"z2": ("view", "z")}, F),
        ],
        ["p2", "z2"],
    )
    # "late" reads p before the optimizer overwrites it in capture order: it must stay first.
    for order in [*orders(g).values(), order_free_first(g), best_order(g)[0]]:
        check_topological(g, order)


@st.composite
def random_graphs(draw):
    """Random DAGs: each op reads one to three earlier tensors and writes one or two new ones
    (sometimes a view of what it reads); the last few tensors are outputs."""
    inputs = {f"in{i}": draw(st.integers(1, 64)) for i in range(draw(st.integers(1, 3)))}
    names = list(inputs)
    ops = []
    for k in range(draw(st.integers(1, 14))):
        reads = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
        outs = {}
        if draw(st.integers(0, 4)) == 0:
            outs[f"v{k}"] = ("view", reads[0])
        else:
            for j in range(draw(st.integers(1, 2))):
                outs[f"t{k}_{j}"] = draw(st.integers(0, 200))
        ops.append((f"op{k}", "aten.op.default", reads, outs, F))
        names += list(outs)
    produced = [n for n in names if n not in inputs]
    outputs = draw(st.lists(st.sampled_from(produced), min_size=1, max_size=2, unique=True))
    return make_graph(inputs, ops, outputs)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs())
def test_all_orders_are_topological_and_best_is_no_worse_than_capture(g):
    for fn in (order_lpmf, order_bfs, order_dfs, order_free_first):
        check_topological(g, fn(g))
    order, peak, _ = best_order(g, time_limit_s=0.5)
    check_topological(g, order)
    assert peak == peak_bytes(g, order)
    assert peak <= min(peak_bytes(g, o) for o in orders(g).values())


def test_captured_model_orders():
    pytest.importorskip("torch")
    zoo = pytest.importorskip("tierplan.zoo")
    capture = pytest.importorskip("tierplan.passes.capture")
    model, args, kwargs = zoo.load_model("mlp", batch_size=8, training=True)
    g = capture.capture(model, args, example_kwargs=kwargs, training=True).graph
    for order in orders(g).values():
        check_topological(g, order)
    order, peak, _ = best_order(g, time_limit_s=1.0)
    check_topological(g, order)
    assert peak <= peak_bytes(g)
