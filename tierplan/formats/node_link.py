"""Abstract graphs in the Checkmate/Moccasin benchmark format, planned by the same solver.

Input: networkx node-link JSON, nodes ``{id, name, backward, cost_cpu, cost_ram}``, links
``{source, target}``. Each node becomes one op (its time ``cost_cpu``) with one output tensor
(``cost_ram`` bytes); forward nodes read by a backward node are activations. ``backward`` is
optional: a graph without it (an inference graph, a benchmark graph where any node may be
recomputed) is all forward, and the planner may recompute any node. Sinks (nodes nobody reads)
are graph outputs, kept to the end.

The op order is ``graph.order`` (Moccasin's files carry the order their budgets are stated
against) when present, which must list every node once in a topological order; else Kahn's
order, ties broken by the order the file lists the nodes in. There is no slower tier: the only choices are keep and
recompute, under Checkmate's accounting (an output occupies memory from the step computing it to
the step freeing it; inputs and output are resident while a node computes), which is the
validator's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tierplan.ir import Graph, GraphError, OpInfo, Phase, TensorInfo, TensorKind, link_users
from tierplan.plans.plan import PlanError, read_json


def _op_name(node_id: Any) -> str:
    return f"n{node_id}"


def load_abstract(path: str | Path) -> tuple[Graph, dict[str, float], dict[str, Any]]:
    """(graph, op time per op, op name -> original node id)."""
    return graph_from_node_link(read_json(path, "graph file"), name=Path(path).stem)


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
    given = (data.get("graph") or {}).get("order") if isinstance(data.get("graph"), dict) else None
    order = _checked_order(given, nodes, preds) if given is not None else _topological(nodes, preds)
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


def _checked_order(order: Any, nodes: list[dict[str, Any]], preds: dict[Any, list[Any]]) -> list[Any]:
    """``graph.order`` when it lists every node once, each after all the nodes it reads."""
    if not isinstance(order, list):
        raise PlanError(f"graph.order must be a list of node ids, not {type(order).__name__}")
    seen: set[Any] = set()
    for node_id in order:
        if node_id not in preds:
            raise PlanError(f"graph.order names node {node_id!r}, which is not in \"nodes\"")
        if node_id in seen:
            raise PlanError(f"graph.order lists node {node_id!r} twice")
        missing = [p for p in preds[node_id] if p not in seen]
        if missing:
            raise PlanError(f"graph.order is not a topological order: node {node_id!r} comes before "
                            f"node {missing[0]!r}, which it reads")
        seen.add(node_id)
    absent = [node["id"] for node in nodes if node["id"] not in seen]
    if absent:
        raise PlanError(f"graph.order leaves out node {absent[0]!r} ({len(absent)} node(s) in all)")
    return list(order)


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
