"""Abstract graphs in the Checkmate/Moccasin benchmark format, planned by the same solver.

Input: networkx node-link JSON, nodes ``{id, name, backward, cost_cpu, cost_ram}``, links
``{source, target}``. Each node becomes one op (its time ``cost_cpu``) with one output tensor
(``cost_ram`` bytes); forward nodes read by a backward node are activations. Sinks (nodes nobody
reads) are graph outputs, kept to the end. There is no slower tier: the only choices are keep and
recompute, under Checkmate's accounting (an output occupies memory from the step computing it to
the step freeing it; inputs and output are resident while a node computes), which is the
validator's.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tierplan.ir import Graph, GraphError, OpInfo, Phase, TensorInfo, TensorKind, link_users
from tierplan.planner.keep_all import keep_all_plan
from tierplan.planner.plan import DEVICE, Plan, PlanError, StepKind


def _op_name(node_id: Any) -> str:
    return f"n{node_id}"


def load_abstract(path: str | Path) -> tuple[Graph, dict[str, float], dict[str, Any]]:
    """(graph, op time per op, op name -> original node id)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise PlanError(f"cannot read graph file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise PlanError(f"graph file {path} is not JSON: {exc}") from None
    return graph_from_node_link(data, name=Path(path).stem)


def graph_from_node_link(data: dict[str, Any], *, name: str = "abstract") -> tuple[Graph, dict[str, float], dict[str, Any]]:
    try:
        nodes = data["nodes"]
        links = data.get("links", data.get("edges", []))
    except (KeyError, TypeError):
        raise PlanError("graph JSON must be networkx node-link data with \"nodes\" and \"links\"") from None
    ids: dict[str, Any] = {}
    preds: dict[Any, list[Any]] = {}
    for node in nodes:
        for field_name in ("id", "cost_cpu", "cost_ram"):
            if field_name not in node:
                raise PlanError(f"node {node.get('id', node)!r} has no {field_name!r} field")
        if node["cost_ram"] < 0 or node["cost_cpu"] < 0:
            raise PlanError(f"node {node['id']!r} has a negative cost")
        ids[_op_name(node["id"])] = node["id"]
        preds[node["id"]] = []
    for link in links:
        if link["source"] not in preds or link["target"] not in preds:
            raise PlanError(f"link {link['source']!r} -> {link['target']!r} names an unknown node")
        preds[link["target"]].append(link["source"])
    order = _topological(nodes, preds)
    by_id = {node["id"]: node for node in nodes}
    has_readers = {s for ps in preds.values() for s in ps}
    tensors: dict[str, TensorInfo] = {}
    ops: list[OpInfo] = []
    times: dict[str, float] = {}
    for node_id in order:
        node = by_id[node_id]
        op = _op_name(node_id)
        backward = bool(node.get("backward", False))
        tensors[op] = TensorInfo(op, (int(node["cost_ram"]),), "uint8", int(node["cost_ram"]),
                                 TensorKind.TEMPORARY if backward else TensorKind.ACTIVATION)
        ops.append(OpInfo(op, str(node.get("name", op)), [_op_name(p) for p in dict.fromkeys(preds[node_id])],
                          [op], Phase.BACKWARD if backward else Phase.FORWARD))
        times[op] = float(node["cost_cpu"])
    outputs = [_op_name(n) for n in order if n not in has_readers]
    for name in outputs:
        tensors[name].kind = TensorKind.OUTPUT
    link_users(tensors, ops)
    graph = Graph(name, tensors, ops, inputs=[], outputs=outputs)
    try:
        graph.check()
    except GraphError as exc:
        raise PlanError(f"abstract graph: {exc}") from None
    return graph, times, ids


def _topological(nodes: list[dict[str, Any]], preds: dict[Any, list[Any]]) -> list[Any]:
    """Kahn's order, ties broken by the order the file lists nodes (usually already topological)."""
    rank = {node["id"]: i for i, node in enumerate(nodes)}
    waiting = {n: len(set(ps)) for n, ps in preds.items()}
    succ: dict[Any, list[Any]] = {n: [] for n in preds}
    for n, ps in preds.items():
        for p in set(ps):
            succ[p].append(n)
    import heapq

    ready = [(rank[n], n) for n, k in waiting.items() if k == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, n = heapq.heappop(ready)
        order.append(n)
        for s in succ[n]:
            waiting[s] -= 1
            if waiting[s] == 0:
                heapq.heappush(ready, (rank[s], s))
    if len(order) != len(preds):
        raise PlanError("the abstract graph has a cycle")
    return order


def plan_abstract(graph: Graph, times: dict[str, float], budget: int, time_limit_s: float | None) -> Plan:
    from tierplan.planner.remat_swap import solve

    return solve(graph, capacities={DEVICE: budget}, channels=[], op_time_s=times,
                 hardware="abstract", training=True, time_limit_s=time_limit_s)


def schedule_of(plan: Plan, ids: dict[str, Any]) -> list[list[Any]]:
    """[["compute", id] | ["free", id], ...]: a recompute is a compute of the same id."""
    out: list[list[Any]] = []
    for step in plan.schedule:
        if step.kind in (StepKind.COMPUTE, StepKind.RECOMPUTE):
            out.append(["compute", ids[step.op]])
        elif step.kind == StepKind.FREE:
            out.append(["free", ids[step.tensor]])
        else:
            raise PlanError(f"abstract plans have no transfers, found {step.describe()}")
    return out


def remat_command(path: str | Path, budget: int, time_limit: float | None = None,
                  json_out: str | Path | None = None) -> str:
    """Plan ``path`` within ``budget`` bytes; return the text to print (and write ``json_out``)."""
    started = time.perf_counter()
    graph, times, ids = load_abstract(path)
    reference = keep_all_plan(graph, capacities={DEVICE: budget}, channels=[], op_time_s=times,
                              hardware="abstract", training=True)
    plan = plan_abstract(graph, times, budget, time_limit)
    solve_s = time.perf_counter() - started
    recomputed = sum(1 for s in plan.schedule if s.kind == StepKind.RECOMPUTE)
    result = {
        "schedule": schedule_of(plan, ids),
        "peak_bytes": plan.peak_bytes[DEVICE],
        "cost": plan.predicted_time_s,
        "keep_all_cost": reference.predicted_time_s,
        "solve_s": solve_s,
        "gap": float(plan.solver.get("gap", 0.0)),
    }
    if json_out is not None:
        Path(json_out).write_text(json.dumps(result))
    overhead = plan.predicted_time_s / reference.predicted_time_s - 1 if reference.predicted_time_s else 0.0
    lines = [
        f"{graph.name}: {len(graph.ops)} nodes, budget {budget} bytes, keep-all peak "
        f"{reference.peak_bytes[DEVICE]} bytes",
        f"  plan: peak {result['peak_bytes']} bytes, cost {result['cost']:.6g} "
        f"(keep-all {result['keep_all_cost']:.6g}, +{overhead * 100:.2f}%), {recomputed} recomputes",
        f"  method {plan.method}; solver {plan.solver.get('status')}, gap {result['gap']:.4f}, "
        f"solved in {solve_s:.2f} s",
    ]
    if json_out is not None:
        lines.append(f"  schedule written to {json_out}")
    return "\n".join(lines)
