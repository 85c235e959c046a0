"""Checkmate/Moccasin-format graphs: JSON in, schedule out, checked by an independent replay of
Checkmate's accounting written here."""
from __future__ import annotations

import json
import random

import pytest

from tierplan.cli.remat import remat_command
from tierplan.formats.node_link import graph_from_node_link
from tierplan.plans.plan import InfeasibleBudget, PlanError, Pricing


def chain_with_backward(n: int, seed: int) -> dict:
    """A forward chain with skip links and its backward, as node-link JSON."""
    rng = random.Random(seed)
    nodes, links = [], []
    for i in range(n):
        nodes.append({"id": i, "name": f"f{i}", "backward": False,
                      "cost_cpu": rng.randint(1, 10), "cost_ram": rng.randint(1, 10) * 100})
        if i:
            links.append({"source": i - 1, "target": i})
        if i >= 3 and rng.random() < 0.3:
            links.append({"source": i - 3, "target": i})
    for j, i in enumerate(reversed(range(n))):
        b = n + j
        nodes.append({"id": b, "name": f"b{i}", "backward": True,
                      "cost_cpu": rng.randint(1, 10), "cost_ram": rng.randint(1, 10) * 100})
        links.append({"source": i, "target": b})
        if j:
            links.append({"source": b - 1, "target": b})
        if i:
            links.append({"source": i - 1, "target": b})
    return {"directed": True, "multigraph": False, "graph": {}, "nodes": nodes, "links": links}


def checkmate_replay(data: dict, schedule: list) -> tuple[int, float]:
    """Peak bytes and cost of ``schedule``: an output lives from its compute to its free; a node's
    inputs must be resident when it computes; every node is computed; sinks are never freed."""
    ram = {n["id"]: n["cost_ram"] for n in data["nodes"]}
    cpu = {n["id"]: n["cost_cpu"] for n in data["nodes"]}
    preds: dict = {n["id"]: set() for n in data["nodes"]}
    for link in data["links"]:
        preds[link["target"]].add(link["source"])
    sinks = set(ram) - {link["source"] for link in data["links"]}
    resident: set = set()
    computed: set = set()
    used = peak = 0
    cost = 0.0
    for kind, node in schedule:
        if kind == "compute":
            assert preds[node] <= resident, f"{node} computed without its inputs"
            assert node not in resident, f"{node} computed while still resident"
            resident.add(node)
            computed.add(node)
            used += ram[node]
            peak = max(peak, used)
            cost += cpu[node]
        else:
            assert kind == "free" and node in resident
            resident.remove(node)
            used -= ram[node]
    assert computed == set(ram)
    assert sinks <= resident
    return peak, cost


def _keep_all_peak(data: dict) -> int:
    out = json.loads(json.dumps(data))
    graph, times, _ = graph_from_node_link(out)
    from tierplan.placement.keep_all import keep_all_plan

    return keep_all_plan(graph, Pricing(capacities={"device": 10**15}, channels=[],
                                        op_time_s=times, hardware="t", training=True)).keep_all_peak_bytes


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fraction", [1.0, 0.7, 0.5])
def test_round_trip_and_checkmate_accounting(tmp_path, seed, fraction) -> None:
    data = chain_with_backward(14, seed)
    path = tmp_path / "g.json"
    path.write_text(json.dumps(data))
    budget = int(_keep_all_peak(data) * fraction)
    out = tmp_path / "out.json"
    try:
        text = remat_command(path, budget, time_limit=5, json_out=out)
    except InfeasibleBudget as exc:
        assert fraction < 1.0 and exc.min_feasible_bytes > budget
        return
    result = json.loads(out.read_text())
    assert set(result) == {"schedule", "peak_bytes", "cost", "keep_all_cost", "solve_s", "gap"}
    peak, cost = checkmate_replay(data, result["schedule"])
    assert peak == result["peak_bytes"] <= budget
    assert cost == pytest.approx(result["cost"])
    assert result["cost"] >= result["keep_all_cost"]
    assert "peak" in text and "cost" in text
    if fraction < 1.0:
        ids = [node for kind, node in result["schedule"] if kind == "compute"]
        assert len(ids) > len(data["nodes"])  # something was recomputed: it appears twice


def test_infeasible_abstract_budget(tmp_path) -> None:
    data = chain_with_backward(10, 5)
    path = tmp_path / "g.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InfeasibleBudget) as info:
        remat_command(path, 50, time_limit=2)
    assert info.value.min_feasible_bytes > 50
    assert "--tiers" not in str(info.value)  # tierplan remat has no such option


def test_bad_files(tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{")
    with pytest.raises(PlanError, match="not JSON"):
        remat_command(path, 100)
    path.write_text(json.dumps({"nodes": [{"id": 0, "cost_cpu": 1}], "links": []}))
    with pytest.raises(PlanError, match="cost_ram"):
        remat_command(path, 100)
    path.write_text(json.dumps({"nodes": [{"id": 0, "cost_cpu": 1, "cost_ram": 1}],
                                "links": [{"source": 0, "target": 7}]}))
    with pytest.raises(PlanError, match="unknown node"):
        remat_command(path, 100)
