"""The Plan type, the keep-all plan and the independent validator, on a hand-built graph."""
from __future__ import annotations

import dataclasses

import pytest

from tierplan.ir import Graph, OpInfo, Phase, TensorInfo, TensorKind, link_users
from tierplan.passes.liveness import lifetimes, peak_bytes
from tierplan.plans import plan as P
from tierplan.placement.keep_all import keep_all_plan
from tierplan.plans.validate import replay, validate
from tierplan.plans.plan import Pricing

MB = 1_000_000


def tiny_graph() -> Graph:
    """x (input, 1 MB), w (param, 2 MB) -> h = x @ w (4 MB) -> v = view(h) -> r = relu(v) (4 MB)
    -> loss (scalar); backward: gw = grad(h, r) (2 MB)."""
    tensors = {
        "x": TensorInfo("x", (250_000,), "float32", 1 * MB, TensorKind.INPUT),
        "w": TensorInfo("w", (500_000,), "float32", 2 * MB, TensorKind.PARAMETER),
        "h": TensorInfo("h", (1_000_000,), "float32", 4 * MB, TensorKind.ACTIVATION),
        "v": TensorInfo("v", (1000, 1000), "float32", 0, TensorKind.ACTIVATION, storage="h"),
        "r": TensorInfo("r", (1000, 1000), "float32", 4 * MB, TensorKind.TEMPORARY),
        "loss": TensorInfo("loss", (), "float32", 4, TensorKind.OUTPUT),
        "gw": TensorInfo("gw", (500_000,), "float32", 2 * MB, TensorKind.GRADIENT),
    }
    ops = [
        OpInfo("mm", "aten.mm.default", ["x", "w"], ["h"], Phase.FORWARD, flops=10),
        OpInfo("view", "aten.view.default", ["h"], ["v"], Phase.FORWARD),
        OpInfo("relu", "aten.relu.default", ["v"], ["r"], Phase.FORWARD),
        OpInfo("sum", "aten.sum.default", ["r"], ["loss"], Phase.FORWARD),
        OpInfo("grad", "aten.mm.default", ["v", "x"], ["gw"], Phase.BACKWARD),
    ]
    link_users(tensors, ops)
    graph = Graph("tiny", tensors, ops, inputs=["x", "w"], outputs=["loss", "gw"])
    graph.check()
    return graph


OP_TIME = {"mm": 1.0, "view": 0.0, "relu": 0.5, "sum": 0.25, "grad": 1.0}
CHANNELS = [
    P.Channel("device", "host", bandwidth=1 * MB, latency_s=0.0, queue="d2h"),
    P.Channel("host", "device", bandwidth=2 * MB, latency_s=0.5, queue="h2d"),
]


def make_keep_all(device_capacity: int = 100 * MB) -> P.Plan:
    return keep_all_plan(
        tiny_graph(),
        Pricing(capacities={"device": device_capacity, "host": 100 * MB}, channels=CHANNELS,
                op_time_s=OP_TIME, hardware="test", training=True),
    )


def test_liveness_counts_views_once_and_keeps_inputs() -> None:
    graph = tiny_graph()
    by_storage = {life.storage: life for life in lifetimes(graph)}
    assert "v" not in by_storage  # a view has no storage of its own
    assert (by_storage["h"].start, by_storage["h"].end) == (0, 5)  # read through v by "grad"
    assert (by_storage["r"].start, by_storage["r"].end) == (2, 4)
    assert (by_storage["x"].start, by_storage["x"].end) == (0, 5)
    # relu: x + w + h + r = 11 MB; sum: same plus loss.
    assert peak_bytes(graph) == 11 * MB + 4


def test_keep_all_plan_validates_and_matches_liveness() -> None:
    plan = make_keep_all()
    result = validate(plan)
    assert result.peak_bytes["device"] == peak_bytes(plan.graph)
    assert result.time_s == pytest.approx(sum(OP_TIME.values()))
    assert plan.overhead_s == 0.0
    frees = [s.tensor for s in plan.schedule if s.kind == P.StepKind.FREE]
    assert sorted(frees) == ["h", "r"]  # outputs and caller-owned tensors are never freed


def test_json_round_trip(tmp_path) -> None:
    plan = make_keep_all()
    path = tmp_path / "plan.json"
    plan.to_json(path)
    again = P.Plan.from_json(path)
    assert again.schedule == plan.schedule
    assert again.graph.to_dict() == plan.graph.to_dict()
    assert again.peak_bytes == plan.peak_bytes
    assert validate(again).peak_bytes == validate(plan).peak_bytes
    assert "kept on the device" in again.explain("h")
    assert "a view of h" in again.explain("v")


def test_rejects_use_before_prefetch_completes() -> None:
    plan = make_keep_all()
    plan.initial_tiers["w"] = "host"
    plan.schedule.insert(0, P.start_transfer("w", "host", "device"))
    with pytest.raises(P.PlanError, match=r"step 1 \(compute mm\).*w is still in flight"):
        replay(plan)


def test_prefetch_then_wait_prices_the_exposed_transfer() -> None:
    plan = make_keep_all()
    plan.initial_tiers["w"] = "host"
    plan.schedule[:0] = [P.start_transfer("w", "host", "device"), P.wait_transfer("w", "device")]
    result = replay(plan)
    # 0.5 s latency + 2 MB / 2 MB/s, nothing to hide it behind.
    assert result.exposed_transfer_s == pytest.approx(1.5)
    assert result.time_s == pytest.approx(1.5 + sum(OP_TIME.values()))
    assert result.transferred_bytes == {"host->device": 2 * MB}


def test_swap_out_overlaps_compute() -> None:
    """h leaves the device during relu/sum and comes back for the backward."""
    plan = make_keep_all()
    steps = [
        P.compute("mm"), P.compute("view"),
        P.start_transfer("h", "device", "host"),  # 4 MB at 1 MB/s: 4 s on d2h
        P.compute("relu"), P.compute("sum"), P.free("r", "device"),
        P.wait_transfer("h", "host"), P.free("h", "device"),
        P.start_transfer("h", "host", "device"), P.wait_transfer("h", "device"),
        P.compute("grad"), P.free("h", "device"), P.free("h", "host"),
    ]
    plan.schedule = steps
    result = replay(plan)
    # d2h ends at 1 + 4 = 5 s; compute reached 1.75 s: 3.25 s exposed, then h2d 0.5 + 2 = 2.5 s.
    assert result.exposed_transfer_s == pytest.approx(3.25 + 2.5)
    assert result.time_s == pytest.approx(1.75 + 5.75 + 1.0)
    assert result.peak_bytes["host"] == 4 * MB


def test_rejects_over_capacity_tier() -> None:
    plan = make_keep_all(device_capacity=10 * MB)  # the relu step needs 11 MB
    with pytest.raises(P.PlanError, match=r"step \d+ \(compute relu\): device holds 11000000 bytes, over"):
        replay(plan)


def test_rejects_freed_tensor_used_later() -> None:
    plan = make_keep_all()
    position = plan.schedule.index(P.compute("relu"))
    plan.schedule.insert(position + 1, P.free("h", "device"))
    plan.schedule = [s for s in plan.schedule[: position + 2]] + [
        s for s in plan.schedule[position + 2 :] if s != P.free("h", "device")
    ]
    with pytest.raises(P.PlanError, match=r"\(compute grad\): input v \(storage h\) was freed from device at step"):
        replay(plan)


def test_rejects_free_of_a_transfer_source_not_waited_for() -> None:
    plan = make_keep_all()
    plan.schedule[1:1] = [P.start_transfer("h", "device", "host"), P.free("h", "device")]
    with pytest.raises(P.PlanError, match="source of a transfer to host not yet waited"):
        replay(plan)


def test_rejects_missing_op_and_lost_output() -> None:
    plan = make_keep_all()
    plan.schedule = [s for s in plan.schedule if s != P.compute("grad")]
    with pytest.raises(P.PlanError, match="op grad never runs"):
        replay(plan)
    plan = make_keep_all()
    plan.schedule.append(P.free("gw", "device"))
    with pytest.raises(P.PlanError, match="gw .*freed from every tier"):
        replay(plan)


def test_rejects_wrong_predictions() -> None:
    plan = dataclasses.replace(make_keep_all(), predicted_time_s=1.0)
    with pytest.raises(P.PlanError, match="predicts a step time of 1 s"):
        validate(plan)
    plan = make_keep_all()
    plan.peak_bytes["device"] -= 1
    with pytest.raises(P.PlanError, match="predicts a peak"):
        validate(plan)


def test_malformed_plan_files(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(P.PlanError, match="is not JSON"):
        P.Plan.from_json(bad)
    bad.write_text('{"format": "something else"}')
    with pytest.raises(P.PlanError, match="not a tierplan plan"):
        P.Plan.from_json(bad)
    with pytest.raises(P.PlanError, match="cannot read plan file"):
        P.Plan.from_json(tmp_path / "missing.json")


def dropout_graph() -> Graph:
    """x (input, 1 MB), w (param, 2 MB) -> h = x @ w (4 MB) -> o, m = dropout(h) (4 MB, mask
    1 MB) -> a = o * m (4 MB) -> loss; backward: gw = grad(a, m, p) (2 MB). Re-running the mul for
    the backward needs o, so the dropout again, whose mask the plan already holds (and the mul
    reads that copy)."""
    tensors = {
        "x": TensorInfo("x", (250_000,), "float32", 1 * MB, TensorKind.INPUT),
        "w": TensorInfo("w", (500_000,), "float32", 2 * MB, TensorKind.PARAMETER),
        "h": TensorInfo("h", (1_000_000,), "float32", 4 * MB, TensorKind.TEMPORARY),
        "o": TensorInfo("o", (1_000_000,), "float32", 4 * MB, TensorKind.TEMPORARY),
        "m": TensorInfo("m", (1_000_000,), "bool", 1 * MB, TensorKind.ACTIVATION),
        "a": TensorInfo("a", (1_000_000,), "float32", 4 * MB, TensorKind.ACTIVATION),
        "loss": TensorInfo("loss", (), "float32", 4, TensorKind.OUTPUT),
        "gw": TensorInfo("gw", (500_000,), "float32", 2 * MB, TensorKind.GRADIENT),
    }
    ops = [
        OpInfo("mm", "aten.mm.default", ["x", "w"], ["h"], Phase.FORWARD),
        OpInfo("drop", "aten.native_dropout.default", ["h"], ["o", "m"], Phase.FORWARD),
        OpInfo("mul", "aten.mul.Tensor", ["o", "m"], ["a"], Phase.FORWARD),
        OpInfo("sum", "aten.sum.default", ["a"], ["loss"], Phase.FORWARD),
        OpInfo("pad", "aten.relu.default", ["x"], ["p"], Phase.FORWARD),
        OpInfo("grad", "aten.mm.default", ["a", "m", "p"], ["gw"], Phase.BACKWARD),
    ]
    tensors["p"] = TensorInfo("p", (250_000,), "float32", 1 * MB, TensorKind.ACTIVATION)
    link_users(tensors, ops)
    graph = Graph("dropout", tensors, ops, inputs=["x", "w"], outputs=["loss", "gw"])
    graph.check()
    return graph


def _recompute_the_mul() -> P.Plan:
    from tierplan.placement.assemble import build_plan
    from tierplan.placement.candidates import RECOMPUTE, analyze

    graph = dropout_graph()
    times = {op.name: 1.0 for op in graph.ops}
    problem = analyze(graph, Pricing(capacities={"device": 100 * MB}, channels=[],
                                     op_time_s=times, hardware="test", training=True))
    (unit,) = [i for i, u in enumerate(problem.units) if u.op == "mul"]
    return build_plan(problem, {unit: RECOMPUTE}, method="test").plan


def test_a_recompute_discards_an_output_the_plan_holds(tmp_path) -> None:
    plan = _recompute_the_mul()
    reruns = [s for s in plan.schedule if s.kind == P.StepKind.RECOMPUTE]
    assert [s.op for s in reruns] == ["mm", "drop", "mul"]
    assert reruns[1].discard == ("m",) and reruns[0].discard == reruns[2].discard == ()
    result = validate(plan)
    # While the dropout re-runs: x, w, p, m (held), h (its input), o and a scratch mask.
    assert result.peak_bytes["device"] == (1 + 2 + 1 + 1 + 4 + 4 + 1) * MB + 4
    path = tmp_path / "plan.json"
    plan.to_json(path)
    assert P.Plan.from_json(path).schedule == plan.schedule


def test_rejects_bad_discards() -> None:
    plan = _recompute_the_mul()
    at = next(i for i, s in enumerate(plan.schedule) if s.discard)

    def with_step(step: P.Step) -> P.Plan:
        return dataclasses.replace(plan, schedule=plan.schedule[:at] + [step] + plan.schedule[at + 1:])

    with pytest.raises(P.PlanError, match="m is already on device"):
        replay(with_step(P.recompute("drop")))  # re-creating the mask the plan holds
    with pytest.raises(P.PlanError, match="not a storage the op writes"):
        replay(with_step(P.recompute("drop", ("h",))))
    first = next(i for i, s in enumerate(plan.schedule) if s.op == "drop")
    broken = list(plan.schedule)
    broken[first] = P.Step(P.StepKind.COMPUTE, op="drop", discard=("m",))
    with pytest.raises(P.PlanError, match="only a recompute may discard"):
        replay(dataclasses.replace(plan, schedule=broken))
    # The scratch bytes count against the budget.
    with pytest.raises(P.PlanError, match="scratch bytes of the discarded outputs"):
        replay(dataclasses.replace(plan, capacities={"device": validate(plan).peak_bytes["device"] - 1}))
