"""Can any op order beat the capture order's remat-only floor? `python bench/reorder_floor.py`.

bench/planner.py's torch comparison prints a floor: the proven bound's overhead
(``placement.bound``) over torch's, below which no remat-only plan in the capture order goes. On
GPT-2 small it binds at one step T (the log-softmax backward). This bench asks whether another
order could lower the bound at T, which is what ``--reorder`` would need to go below the floor.

Every topological order runs T after all its ancestors and before all its descendants; only the
ops that are neither (the *crossing* ops) can sit on either side of it. So the bound at T over
all orders lies between the orders that put every crossing op on one side, when each crossing op
moves the bound one way only. Printed per model: the crossing ops (how many make no storage of
their own: views), the ones that allocate, the forward storages they are the last readers of
after T, and the bound at T (and over the usual high-pressure steps) in three orders: capture,
every crossing op before T, every crossing op after T. The orders keep the phases, so they are
orders ``--reorder`` may choose (``passes.ordering.check_order`` accepts them).

Why the extremes decide it on GPT-2: its crossing ops are views (no bytes) and the tanh-GELU
backward's ``pow(x, 2)`` and its scaling, backward ops whose input x (the MLP's first matmul
output) nothing else reads after T. Moved before T, such a pair turns x (a forward storage a
plan may drop and re-create) into its own output of the same size, which a plan must keep
(backward-made): each solution of the step's MIP in the moved order is one of the capture
order's keeping x in those bytes, at the same cost, so the bound at T can only rise.
"""
from __future__ import annotations

import argparse
import heapq
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo_graph import training_graph  # noqa: E402

from tierplan.cost_models.hardware import load_hardware  # noqa: E402
from tierplan.ir import Graph, Phase  # noqa: E402
from tierplan.passes.liveness import Liveness, liveness  # noqa: E402
from tierplan.passes.ordering import reorder_graph  # noqa: E402
from tierplan.placement.bound import overhead_lower_bound  # noqa: E402
from tierplan.placement.torch_baseline import TorchBudgetBaseline  # noqa: E402
from tierplan.plans.plan import Pricing  # noqa: E402

MIB = 2**20
PHASE_RANK = {phase: i for i, phase in enumerate(Phase)}


def data_edges(graph: Graph) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(producers of each op's inputs, readers of each op's outputs)."""
    preds = {op.name: {graph.tensors[i].producer for i in op.inputs if graph.tensors[i].producer} for op in graph.ops}
    succs: dict[str, set[str]] = {op.name: set() for op in graph.ops}
    for name, ps in preds.items():
        for p in ps:
            succs[p].add(name)
    return preds, succs


def forward_made(graph: Graph, tensor: str) -> bool:
    producer = graph.tensors[tensor].producer
    return producer is not None and graph.op(producer).phase == Phase.FORWARD


def reach(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    stack = [start]
    while stack:
        for nxt in edges[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def order_by(graph: Graph, preds: dict[str, set[str]], succs: dict[str, set[str]], rank: dict[str, int]) -> list[str]:
    """A topological order of ``graph``: phase first, then ``rank``, then capture position."""
    capture = {op.name: i for i, op in enumerate(graph.ops)}
    key = {op.name: (PHASE_RANK[op.phase], rank[op.name], capture[op.name]) for op in graph.ops}
    waiting = {name: len(ps) for name, ps in preds.items()}
    ready = [(key[n], n) for n, w in waiting.items() if w == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, name = heapq.heappop(ready)
        order.append(name)
        for s in succs[name]:
            waiting[s] -= 1
            if waiting[s] == 0:
                heapq.heappush(ready, (key[s], s))
    return order


@dataclass(frozen=True)
class Crossing:
    """Where the ops of ``graph`` may sit relative to its op ``binding`` in a topological order."""

    binding: str
    before: frozenset[str]  # its ancestors: before it in every order
    after: frozenset[str]  # its descendants: after it in every order
    ops: tuple[str, ...]  # neither: either side, in capture order


def crossing(graph: Graph, binding: str) -> Crossing:
    preds, succs = data_edges(graph)
    before, after = reach(binding, preds), reach(binding, succs)
    ops = tuple(op.name for op in graph.ops if op.name not in before and op.name not in after and op.name != binding)
    return Crossing(binding, frozenset(before), frozenset(after), ops)


def extreme_orders(graph: Graph, cross: Crossing) -> dict[str, Graph]:
    """``graph`` with every crossing op before the binding op, and with every one after it (each
    a phase-keeping order ``reorder_graph`` checks)."""
    preds, succs = data_edges(graph)
    side = {n: 0 if n in cross.before else 2 if n in cross.after else 1 for n in preds}  # 1: it and the crossing
    moved = set(cross.ops)
    return {label: reorder_graph(graph, order_by(graph, preds, succs, {n: to if n in moved else side[n]
                                                                      for n in preds}), label)
            for label, to in (("crossing ops before T", 0), ("crossing ops after T", 2))}


def bound_at(graph: Graph, pricing: Pricing, op_name: str, live: Liveness | None = None) -> float:
    """The remat-only bound's overhead (placement/bound.py) at the step of ``op_name`` in
    ``graph``'s own order (``live``: its liveness, when the caller has it)."""
    step = [op.name for op in graph.ops].index(op_name)
    return overhead_lower_bound(graph, pricing, live=live, at=[step]).overhead_s


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2:8:1024", help="zoo model name:batch:seq")
    parser.add_argument("--hardware", default="rtx4090", help="as bench/planner.py's torch comparison")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.5])
    args = parser.parse_args(argv)
    name, batch, seq = args.model.split(":")
    hw = load_hardware(args.hardware)
    captured, graph, times = training_graph(name, int(batch), int(seq), hw)
    probe = Pricing(capacities={"device": 10**15}, channels=[], op_time_s=times, hardware=hw.name, training=True)
    torch_plans = TorchBudgetBaseline(graph, captured.joint, probe)
    keep_all_s = torch_plans.keep_all.predicted_time_s
    readers: dict[str, set[str]] = {}
    for op in graph.ops:
        for i in op.inputs:
            readers.setdefault(graph.tensors[i].storage, set()).add(op.name)
    for f in args.fractions:
        torch_plan = torch_plans.plan(f, 10**15)
        budget = torch_plan.peak_bytes["device"]
        torch_s = torch_plan.predicted_time_s - keep_all_s
        pricing = Pricing(capacities={"device": budget}, channels=[], op_time_s=times, hardware=hw.name,
                          training=True)
        step = overhead_lower_bound(graph, pricing).step
        binding = graph.ops[step].name
        cross = crossing(graph, binding)
        allocating = [graph.op(n) for n in cross.ops
                      if any(graph.tensors[o].storage == o and graph.tensors[o].nbytes for o in graph.op(n).outputs)]
        print(f"\n{name} b{batch}s{seq} on {hw.name}, torch f={f}: budget {budget / MIB:.0f} MiB, torch overhead "
              f"{torch_s * 1e3:.1f} ms; the bound binds at {binding} (capture position {step}); "
              f"{len(cross.before)} ops must precede it, {len(cross.after)} follow it, {len(cross.ops)} may cross "
              f"it, {len(cross.ops) - len(allocating)} of them views")
        kinds: dict[tuple[str, str, int], list[str]] = {}  # (target, phase, bytes) -> its ops
        freed: dict[tuple[str, str, int], list[str]] = {}  # -> forward storages they alone read after T
        for op in allocating:
            made = sum(graph.tensors[o].nbytes for o in op.outputs if graph.tensors[o].storage == o)
            key = (op.target, op.phase.name, made)
            kinds.setdefault(key, []).append(op.name)
            forward_inputs = {graph.tensors[i].storage for i in op.inputs if forward_made(graph, i)}
            freed.setdefault(key, []).extend(sorted(s for s in forward_inputs if not readers[s] & cross.after))
        for (target, phase, made), ops in kinds.items():
            print(f"  crossing: {len(ops)} x {target} ({phase}, {made / MIB:.1f} MiB each); the only readers after T "
                  f"of forward storages: {', '.join(freed[target, phase, made]) or 'none'}")
        print(f"  {'order':24s} {'live at T':>10s} {'bound at T':>22s} {'bound, usual steps':>24s}")
        for label, ordered in {"capture": graph, **extreme_orders(graph, cross)}.items():
            live = liveness(ordered)
            at_t = bound_at(ordered, pricing, binding, live)
            usual = overhead_lower_bound(ordered, pricing, live=live).overhead_s
            t = [op.name for op in ordered.ops].index(binding)
            print(f"  {label:24s} {live.live_bytes[t] / MIB:8.0f} M {at_t * 1e3:8.2f} ms ({at_t / torch_s:5.3f}x) "
                  f"{usual * 1e3:10.2f} ms ({usual / torch_s:5.3f}x)", flush=True)
    print("\nbound = keep-all + this for every remat-only plan in that order (placement/bound.py); "
          "x = over torch's overhead at the same budget (bench/planner.py's floor in the capture order)")


if __name__ == "__main__":
    main()
