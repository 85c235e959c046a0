"""Random layered graphs (tierplan.formats.random_graphs), Checkmate's accounting over them, the
exact-optimum fixture and the bench/remat.py baselines, checked by the independent replay."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench_modules import load_bench

from tierplan.formats.random_graphs import (
    LayeredSpec,
    ScheduleError,
    instance,
    keep_all_cost,
    keep_all_peak,
    keep_all_schedule,
    layered_graph,
    lower_bound_peak,
    replay,
    standard_spec,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "remat_layered_100.json"


def _bench():
    return load_bench("remat")


@pytest.mark.parametrize("n", [100, 250])
def test_deterministic_by_seed(n) -> None:
    assert layered_graph(standard_spec(n, 3)) == layered_graph(standard_spec(n, 3))
    assert layered_graph(standard_spec(n, 3)) != layered_graph(standard_spec(n, 4))


@pytest.mark.parametrize("spec", [
    standard_spec(100), standard_spec(1000, 7),
    LayeredSpec(60, seed=2, width=(2, 6), skip_prob=0.8, interleave=True),
    LayeredSpec(40, seed=1, with_backward=True),
])
def test_dag_layers_and_order(spec) -> None:
    data = layered_graph(spec)
    n = spec.n_nodes * (2 if spec.with_backward else 1)
    assert len(data["nodes"]) == n and data["directed"]
    order = data["graph"]["order"]
    assert sorted(order) == list(range(n))
    assert [node["id"] for node in data["nodes"]] == order  # nodes listed in graph.order
    position = {v: i for i, v in enumerate(order)}
    assert all(position[link["source"]] < position[link["target"]] for link in data["links"])  # topological
    layers = data["graph"]["layers"]
    layer_of = {v: k for k, layer in enumerate(layers) for v in layer}
    assert sorted(layer_of) == list(range(spec.n_nodes)) and layers[-1] == [spec.n_nodes - 1]
    lo, hi = spec.width
    assert all(lo <= len(layer) <= hi for layer in layers[:-2])
    forward = [(link["source"], link["target"]) for link in data["links"]
               if link["source"] < spec.n_nodes and link["target"] < spec.n_nodes]
    assert all(layer_of[s] < layer_of[t] for s, t in forward)  # edges only go to later layers
    for here, there in zip(layers, layers[1:]):
        assert all(any((u, v) in forward for u in here) for v in there)  # every node reads the layer before
        assert all(any((u, v) in forward for v in there) for u in here)  # nothing dangles
    inst = instance(data)
    if not spec.with_backward:
        assert inst.sinks == {spec.n_nodes - 1}
    assert all(node["cost_cpu"] > 0 and node["cost_ram"] > 0 for node in data["nodes"])


def test_keep_all_peak_by_hand() -> None:
    # a(4) -> b(2) -> c(1); a -> c. Computing b: a + b = 6; computing c: a + b + c = 7, then a, b
    # freed; c is the sink and stays.
    data = {"directed": True, "graph": {"order": ["a", "b", "c"]},
            "nodes": [{"id": "a", "cost_cpu": 1, "cost_ram": 4}, {"id": "b", "cost_cpu": 2, "cost_ram": 2},
                      {"id": "c", "cost_cpu": 3, "cost_ram": 1}],
            "links": [{"source": "a", "target": "b"}, {"source": "b", "target": "c"},
                      {"source": "a", "target": "c"}]}
    assert keep_all_peak(data) == 7
    assert keep_all_cost(data) == 6
    assert lower_bound_peak(instance(data)) == 7
    # Recompute a for c instead of keeping it: a b (free a) a c -> peak max(6, 2 + 4 + 1) = 7, cost 7.
    schedule = [["compute", "a"], ["compute", "b"], ["free", "a"], ["compute", "a"], ["compute", "c"],
                ["free", "a"], ["free", "b"]]
    assert replay(instance(data), schedule, budget=7).cost == 7
    with pytest.raises(ScheduleError, match="without its inputs"):
        replay(instance(data), [["compute", "a"], ["compute", "b"], ["free", "a"], ["compute", "c"]])
    with pytest.raises(ScheduleError, match="over the budget"):
        replay(instance(data), keep_all_schedule(instance(data)), budget=6)


@pytest.mark.parametrize("spec", [standard_spec(100), LayeredSpec(30, seed=1, with_backward=True)])
def test_keep_all_peak_matches_tierplan(spec) -> None:
    from tierplan.cli.remat import abstract_pricing
    from tierplan.formats.node_link import graph_from_node_link
    from tierplan.placement.keep_all import keep_all_plan
    from tierplan.plans.validate import validate

    data = layered_graph(spec)
    graph, times, _ = graph_from_node_link(json.loads(json.dumps(data)))
    plan = keep_all_plan(graph, abstract_pricing(times, 10**15))
    validate(plan)
    assert plan.peak_bytes["device"] == plan.keep_all_peak_bytes == keep_all_peak(data)
    assert plan.predicted_time_s == pytest.approx(keep_all_cost(data))


def test_fixture() -> None:
    fx = json.loads(FIXTURE.read_text())
    spec = LayeredSpec.from_json(fx["spec"])
    assert fx["graph"] == layered_graph(spec)  # the generator still makes the fixture's graph
    assert fx["keep_all_peak_bytes"] == keep_all_peak(fx["graph"])
    assert fx["keep_all_cost"] == keep_all_cost(fx["graph"])
    for entry in fx["budgets"]:
        assert entry["budget_bytes"] == int(entry["fraction"] * fx["keep_all_peak_bytes"])
        assert entry["bound"] >= fx["keep_all_cost"]  # a memory limit never makes it cheaper
        if entry.get("schedule"):
            checked = replay(instance(fx["graph"]), entry["schedule"], entry["budget_bytes"])
            assert checked.cost == pytest.approx(entry["best_cost"])
    small = fx["small_optimal"]
    graph = small["graph"]
    assert graph == layered_graph(LayeredSpec.from_json(small["spec"]))
    for entry in small["budgets"]:
        assert entry["status"] == "OPTIMAL"
        checked = replay(instance(graph), entry["schedule"], entry["budget_bytes"])
        assert checked.cost == pytest.approx(entry["optimal_cost"]) == pytest.approx(entry["bound"])
        assert checked.peak <= entry["budget_bytes"] < small["keep_all_peak_bytes"]


@pytest.mark.parametrize("n", [60, 100])
def test_baselines_valid(n) -> None:
    bench = _bench()
    data = layered_graph(standard_spec(n))
    inst = instance(data)
    ckpt = bench.checkpoint_all(inst)
    assert replay(inst, ckpt.schedule, ckpt.peak).peak == ckpt.peak
    assert replay(inst, ckpt.schedule).computes > len(inst.order)  # it does recompute
    ka = keep_all_peak(data)
    descent = bench.greedy(inst, [ka, int(0.95 * ka)], time_limit_s=10)
    assert descent.floor.peak <= ka
    for budget, sim in list(descent.reached.items()) + [(descent.floor.peak, descent.floor)]:
        checked = replay(inst, sim.schedule, budget)
        assert checked.peak == sim.peak <= budget


def test_bench_rows_today() -> None:
    """The bench's tierplan row says infeasible / n/a instead of crashing, and each row it prints
    that is "ok" passed the replay."""
    bench = _bench()
    lines: list[str] = []
    rows = bench.run((100,), time_limit_s=2, greedy_limit_s=5, out=lines.append)
    assert {row.status for row in rows} <= {"ok", "infeasible", "n/a", "error"}
    assert any(row.method == "greedy" and row.status == "ok" for row in rows)  # at "min", by construction
    assert len(lines) == 2 + 1 + len(rows)


@pytest.mark.parametrize("spec", [standard_spec(n) for n in (100, 250, 500, 1000)]
                         + [standard_spec(300, seed) for seed in (1, 2, 3)])
def test_no_op_footprint_over_the_cap(spec) -> None:
    """No op's inputs and output exceed MAX_FOOTPRINT_SHARE of the keep-all peak, so 0.8 of it
    leaves room to run every op (standard_spec(500) was at 0.86 before the repair)."""
    from tierplan.formats.random_graphs import MAX_FOOTPRINT_SHARE

    data = layered_graph(spec)
    assert lower_bound_peak(instance(data)) <= MAX_FOOTPRINT_SHARE * keep_all_peak(data)


def test_the_repair_acts_only_on_a_violation(monkeypatch) -> None:
    """standard_spec(500) as drawn has an op at 0.86 of the keep-all peak; the repair shrinks
    sizes only (same links and order, whole units within the spec's range) to about
    FOOTPRINT_REPAIR_SHARE. An instance within the cap is left as it is (the fixture's 20- and
    100-node instances are also checked byte for byte in test_fixture)."""
    import copy

    from tierplan.formats import random_graphs

    spec = standard_spec(500)
    data = layered_graph(spec)
    with monkeypatch.context() as patch:
        patch.setattr(random_graphs, "MAX_FOOTPRINT_SHARE", 1.0)
        drawn = layered_graph(spec)
    assert lower_bound_peak(instance(drawn)) > 0.85 * keep_all_peak(drawn)
    assert lower_bound_peak(instance(data)) <= (random_graphs.FOOTPRINT_REPAIR_SHARE + 0.01) * keep_all_peak(data)
    assert data["links"] == drawn["links"] and data["graph"] == drawn["graph"]
    shrunk = [(a["cost_ram"], b["cost_ram"]) for a, b in zip(data["nodes"], drawn["nodes"]) if a != b]
    assert shrunk and all(after < before for after, before in shrunk)
    lo, hi = spec.ram
    assert all(lo <= node["cost_ram"] // spec.ram_unit <= hi and node["cost_ram"] % spec.ram_unit == 0
               for node in data["nodes"])
    again = copy.deepcopy(data)
    random_graphs._cap_footprints(again, spec.ram_unit)  # within the cap now: untouched
    assert again == data
    small = layered_graph(standard_spec(20))
    assert lower_bound_peak(instance(small)) > random_graphs.FOOTPRINT_REPAIR_SHARE * keep_all_peak(small)
    within = copy.deepcopy(small)
    random_graphs._cap_footprints(within, spec.ram_unit)  # 0.72: over the target, within the cap
    assert within == small
