"""Baselines priced by the same simulator and cost model as the planner.

- keep-all: every op once, every tensor on the device until its last use (``keep_all``);
- checkpoint-blocks: what ``torch.utils.checkpoint`` users do around every repeated block: a
  block keeps only what it hands to the next block and re-runs its forward ops at the first
  backward use of any of them;
- swap-all: every activation that can go to a slower tier goes there (offload after its last
  forward reader, prefetch before its first backward reader).

These plans are returned whether or not they fit the budget (``plan.peak_bytes`` says), so a
bench can show them side by side; ``solve`` also uses them as hints and fallbacks.
"""
from __future__ import annotations

from tierplan.ir import Graph, Phase
from tierplan.placement.assemble import build_plan
from tierplan.placement.candidates import KEEP, RECOMPUTE, Option, Problem, Segment, analyze, recompute_segment
from tierplan.plans.plan import Plan, Pricing


def checkpoint_blocks_fates(problem: Problem) -> tuple[dict[int, Option], dict[int, Segment]] | None:
    """Fates and block-wide recompute segments, or None when the graph has no blocks."""
    graph = problem.graph
    by_block: dict[int, list[int]] = {}
    for index, unit in enumerate(problem.units):
        block = graph.op(unit.op).block
        if block is not None:
            by_block.setdefault(block, []).append(index)
    if not by_block:
        return None
    fates: dict[int, Option] = {}
    segments: dict[int, Segment] = {}
    readers: dict[str, list[str]] = {}
    for t in graph.tensors.values():
        readers.setdefault(t.storage, []).extend(t.users)
    for block, members in by_block.items():
        inside = [m for m in members if not _hands_on(problem, readers, problem.units[m].op, block)]
        if not inside:
            continue
        at = min(problem.units[m].recompute_at for m in inside)
        for m in inside:
            segment = recompute_segment(problem, problem.units[m], at)
            if segment is not None:
                fates[m], segments[m] = RECOMPUTE, segment
    # A recompute needs its anchors on the device at its step: drop those that would not have them.
    changed = True
    while changed:
        changed = False
        for m, segment in list(segments.items()):
            for storage in segment.anchors:
                owner = problem.unit_of_storage.get(storage)
                if owner is None or fates.get(owner, KEEP) == KEEP:
                    continue
                if segments[owner].at > segment.at:
                    del fates[m], segments[m]
                    changed = True
                    break
    return fates, segments


def _hands_on(problem: Problem, readers: dict[str, list[str]], op_name: str, block: int) -> bool:
    """Whether ``op_name``'s outputs are read in the forward outside its block (a block output)."""
    graph = problem.graph
    for name in graph.op(op_name).outputs:
        for user in readers.get(graph.tensors[name].storage, ()):
            reader = graph.op(user)
            if reader.phase == Phase.FORWARD and reader.block != block:
                return True
    return False


def swap_all_fates(problem: Problem) -> dict[int, Option]:
    fates = {}
    for index, unit in enumerate(problem.units):
        swaps = [o for o in unit.options() if o.tier is not None]
        if swaps:
            fates[index] = swaps[0]
    return fates


def baseline_plans(graph: Graph, pricing: Pricing) -> dict[str, Plan]:
    """{"keep-all", "checkpoint-blocks" (when the graph has blocks), "swap-all"} -> plan."""
    problem = analyze(graph, pricing)
    out = {"keep-all": problem.keep_all}
    ckpt = checkpoint_blocks_fates(problem)
    if ckpt is not None:
        out["checkpoint-blocks"] = build_plan(problem, ckpt[0], segments=ckpt[1], method="checkpoint-blocks").plan
    out["swap-all"] = build_plan(problem, swap_all_fates(problem), method="swap-all").plan
    return out
