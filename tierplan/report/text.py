"""Plans as text: what `tierplan plan` and `tierplan show` print.

The report has four parts: the headline figures (machine, budget, predicted step time and its
overhead against keep-all, peak per tier, the solver's proven bound with its kind, and the gap to it
as a share of the step time and of the overhead over keep-all), the fates of all storages
in a line, one summary per repeated-block structure (counts and bytes by fate per block, instead
of thousands of lines), and a table of the largest decisions, where a decision repeated in every
block is listed once with its count.
"""
from __future__ import annotations

import io
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Mapping

from rich import box
from rich.console import Console
from rich.table import Table

from tierplan.ir import TensorKind
from tierplan.plans.plan import DEVICE, Plan, meets_bound
from tierplan.units import format_bytes

# The order fates are listed in.
FATES = ("persistent", "keep", "recompute", "swap", "stream", "offload")
# Kept storages of these kinds involve no choice: they live from producer to last reader.
_NO_CHOICE_KINDS = frozenset({TensorKind.TEMPORARY, TensorKind.INPUT, TensorKind.OUTPUT})


def _ms(seconds: float) -> str:
    # Small graphs and small overheads are microseconds: "0.0 ms" would hide them.
    if abs(seconds) < 1e-3 and seconds != 0:
        return f"{seconds * 1e6:,.1f} µs"
    return f"{seconds * 1e3:,.1f} ms" if seconds < 1 else f"{seconds:,.2f} s"


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.0f}%" if whole else "-"


@dataclass
class _Group:
    """Storages that are the same decision repeated across blocks of one structure."""

    first: str
    count: int
    nbytes: int  # of one
    fate: str
    tier: str
    reason: str


def storage_blocks(plan: Plan) -> dict[str, tuple[int, int, str]]:
    """storage -> (block, position of its anchor op in the block, role) for storages that belong
    to a repeated block: made by one of its ops, or (parameters) first read by one."""
    graph = plan.graph
    position: dict[str, tuple[int, int]] = {}
    for block in graph.blocks:
        for i, op in enumerate(block.ops):
            position[op] = (block.index, i)
    out: dict[str, tuple[int, int, str]] = {}
    for storage in graph.storages():
        t = graph.tensors[storage]
        if t.producer is not None:
            if t.producer in position:
                op = graph.op(t.producer)
                block, i = position[t.producer]
                out[storage] = (block, i, f"out{op.outputs.index(storage)}")
        else:
            first = next((u for u in t.users if u in position), None)
            if first is not None:
                block, i = position[first]
                out[storage] = (block, i, f"in{graph.op(first).inputs.index(storage)}")
    return out


def _fate_line(counts: Counter, nbytes: Counter, per: int = 1) -> str:
    parts = []
    for fate in FATES + tuple(sorted(set(counts) - set(FATES))):
        if counts.get(fate):
            parts.append(f"{fate} {counts[fate] // per:,} ({format_bytes(nbytes[fate] // per)})")
    return ", ".join(parts) or "none"


# What the solver line's two bounds mean (docs/architecture.md, "Bounds and gaps").
_BOUND_MEANING = (
    "bound_s: no plan that runs the ops in capture order, re-runs forward ops and copies through "
    "the channels' queues is faster (a relaxation at the step named by bound_step: the bytes the "
    "device must hold there, what dropping the rest costs); model_bound_s: CP-SAT's bound on its "
    "own model (options at fixed points and windows, one decision per unit), not over every plan")


def _solver_rows(plan: Plan) -> list[tuple[str, str]]:
    """The solver's status, the proven bound with its kind, and the two gaps beside each other."""
    solver = plan.solver
    assert solver is not None
    bits = [solver.status]
    if solver.solve_s is not None:
        bits.append(f"in {solver.solve_s:.1f} s")
    shown = {"status", "solve_s", "bound_s", "gap", "overhead_gap", "bound_kind", "bound_step", "objective_s"}
    bits += [f"{k} {_value(v)}" for k, v in solver.items() if k not in shown]
    rows = [("solver", ", ".join(bits))]
    if solver.bound_s is None:
        return rows
    where = f" at {solver.bound_step}" if solver.bound_step else ""
    above = _sign_ms(solver.bound_s - plan.keep_all_time_s)
    kind = solver.bound_kind or "-"
    rows.append(("  proven bound", f"{_ms(solver.bound_s)} = keep-all {above} (kind {kind}{where})"))
    rows.append(("  gap", _gaps(plan)))
    meaning = _BOUND_MEANING + "; " if solver.bound_step is not None else ""
    rows.append(("  bound", meaning + 'bound kinds: docs/cost-model.md, "Bound kinds"'))
    return rows


def _gaps(plan: Plan) -> str:
    """Both gaps, unclipped: (plan - bound) / plan and (plan - bound) / (plan - keep-all)."""
    solver = plan.solver
    assert solver is not None and solver.bound_s is not None
    objective = solver.objective_s if solver.objective_s is not None else plan.predicted_time_s
    step = f"{_pct1(solver.gap)} of the step time" if solver.gap is not None else "-"
    if meets_bound(objective, plan.keep_all_time_s):  # within round-off of keep-all: no share to give
        over = "no overhead over keep-all"
    elif solver.overhead_gap is None:
        over = "overhead gap not recorded"
    else:
        over = f"{_pct1(solver.overhead_gap)} of the overhead over keep-all"
    return f"{step}, {over} ({_ms(objective - solver.bound_s)} of the plan not proven unavoidable)"


def _pct1(share: float) -> str:
    """A share as a percentage with one decimal, unclipped (a negative gap shows as one)."""
    return f"{100 * share:.1f}%"


def _sign_ms(seconds: float) -> str:
    return f"{'+' if seconds >= 0 else '-'}{_ms(abs(seconds))}"


def plan_report(
    plan: Plan,
    *,
    largest: int = 12,
    width: int = 140,
    hardware_description: str | None = None,
) -> str:
    """The readable report of ``plan`` (see the module docstring)."""
    graph = plan.graph
    mode = "training step" if plan.training else "inference"
    machine = plan.hardware + (f" ({hardware_description})" if hardware_description else "")
    out = [f"plan for {graph.name} ({'training' if plan.training else 'inference'}) on {plan.hardware}"]
    rows: list[tuple[str, str]] = []
    rows.append(("machine", machine))
    keep_peak = plan.keep_all_peak_bytes
    rows.append((
        "device budget",
        f"{format_bytes(plan.budget_bytes)}; keep-all needs {format_bytes(keep_peak)}"
        + (f" (the budget is {_pct(plan.budget_bytes, keep_peak)} of it)" if keep_peak > plan.budget_bytes else
           " (fits: nothing has to move)"),
    ))
    overhead = plan.overhead_s
    rows.append((
        f"predicted {mode}",
        f"{_ms(plan.predicted_time_s)}; keep-all {_ms(plan.keep_all_time_s)}; overhead "
        f"{'+' if overhead >= 0 else ''}{_ms(overhead)} ({'+' if overhead >= 0 else ''}"
        f"{_pct(overhead, plan.keep_all_time_s)})",
    ))
    rows.append((
        "  made of",
        f"compute {_ms(plan.compute_time_s)}, recompute {_ms(plan.recompute_time_s)}, "
        f"exposed transfers {_ms(plan.exposed_transfer_s)}",
    ))
    peaks = []
    for tier, peak in plan.peak_bytes.items():
        cap = plan.capacities.get(tier)
        peaks.append(f"{tier} {format_bytes(peak)}" + (f" of {format_bytes(cap)} ({_pct(peak, cap)})" if cap else ""))
    rows.append(("peak per tier", "; ".join(peaks)))
    same = sorted({c.dst for c in plan.channels if c.inline and c.src == DEVICE})
    if same:
        rows.append((
            "same memory",
            f"{', '.join(same)} and the device are one memory here (a CPU): a copy there frees device "
            f"budget, not memory, and runs on the compute thread, so its whole time is paid",
        ))
    if plan.update is not None:
        rows += _update_rows(plan)
    rows.append(("method", plan.method or "-"))
    if plan.solver is not None:
        rows += _solver_rows(plan)
    rows.append((
        "graph",
        f"{len(graph.ops):,} ops, {len(graph.storages()):,} storages, {len(plan.schedule):,} steps; "
        f"parameters {format_bytes(graph.total_bytes(TensorKind.PARAMETER))}",
    ))
    label_width = max(len(k) for k, _ in rows)
    out += [f"  {k:<{label_width}}  {v}" for k, v in rows]

    counts: Counter = Counter()
    nbytes: Counter = Counter()
    for storage in graph.storages():
        d = plan.decisions.get(storage)
        fate = d.fate if d else "undecided"
        counts[fate] += 1
        nbytes[fate] += graph.tensors[storage].nbytes
    out.append("")
    out.append(f"fates of all {len(graph.storages()):,} storages: {_fate_line(counts, nbytes)}")

    in_block = storage_blocks(plan)
    if graph.blocks:
        out.append(_block_summary(plan, in_block))
    out.append("")
    out.append(_decision_table(plan, in_block, largest, width))
    return "\n".join(out)


def _block_summary(plan: Plan, in_block: dict[str, tuple[int, int, str]]) -> str:
    graph = plan.graph
    members: dict[int, list[int]] = defaultdict(list)
    for b in graph.blocks:
        members[b.template].append(b.index)
    per_block: dict[int, tuple[Counter, Counter]] = {b.index: (Counter(), Counter()) for b in graph.blocks}
    for storage, (block, _, _) in in_block.items():
        d = plan.decisions.get(storage)
        fate = d.fate if d else "undecided"
        per_block[block][0][fate] += 1
        per_block[block][1][fate] += graph.tensors[storage].nbytes
    lines = ["repeated blocks (storages made in a block, and parameters first read there):"]
    outside_c: Counter = Counter()
    outside_b: Counter = Counter()
    for storage in graph.storages():
        if storage not in in_block:
            d = plan.decisions.get(storage)
            fate = d.fate if d else "undecided"
            outside_c[fate] += 1
            outside_b[fate] += graph.tensors[storage].nbytes
    for template, blocks in members.items():
        n_ops = len(graph.blocks[blocks[0]].ops)
        lines.append(f"  structure {template}: {len(blocks)} blocks of {n_ops} ops")
        # Blocks whose fate counts are the same share one line.
        patterns: dict[tuple, list[int]] = defaultdict(list)
        for b in blocks:
            c, by = per_block[b]
            patterns[tuple(sorted(c.items())) + tuple(sorted(by.items()))].append(b)
        for _, which in sorted(patterns.items(), key=lambda kv: kv[1][0]):
            c, by = per_block[which[0]]
            label = ("each block" if len(which) == len(blocks) else
                     f"block {which[0]}" if len(which) == 1 else f"blocks {_ranges(which)}, each")
            lines.append(f"    {label}: {_fate_line(c, by)}")
    if outside_c:
        lines.append(f"  outside blocks: {_fate_line(outside_c, outside_b)}")
    return "\n".join(lines)


def _ranges(indices: list[int]) -> str:
    indices = sorted(indices)
    spans: list[str] = []
    start = prev = indices[0]
    for i in indices[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        spans.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(spans)


def _decision_table(plan: Plan, in_block: dict[str, tuple[int, int, str]], largest: int, width: int) -> str:
    graph = plan.graph
    template_of = {b.index: b.template for b in graph.blocks}
    groups: dict[tuple, _Group] = {}
    skipped = 0
    for storage in graph.storages():
        t = graph.tensors[storage]
        d = plan.decisions.get(storage)
        if d is None or t.nbytes == 0:
            continue
        if d.fate == "keep" and t.kind in _NO_CHOICE_KINDS:
            skipped += 1
            continue
        if storage in in_block:
            block, position, role = in_block[storage]
            key = (template_of[block], position, role, d.fate, d.tier, t.nbytes)
        else:
            key = (storage,)
        group = groups.get(key)
        if group is None:
            groups[key] = _Group(storage, 1, t.nbytes, d.fate, d.tier, d.reason)
        else:
            group.count += 1
    # Choices first (keep against alternatives, recompute, swap, stream, offload), largest first;
    # storages the caller owns and that stay put come after them.
    ranked = sorted(groups.values(), key=lambda g: (g.fate != "persistent", g.nbytes * g.count, g.nbytes),
                    reverse=True)
    shown = ranked[:largest]
    table = Table(
        title=f"largest storages and their decisions ({len(shown)} of {len(ranked)}; ×N: the same decision in N blocks)",
        title_justify="left", expand=False, box=box.SIMPLE_HEAD, pad_edge=False,
    )
    table.add_column("tensor", no_wrap=True, max_width=28, overflow="ellipsis")
    table.add_column("kind", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("×", justify="right", no_wrap=True)
    table.add_column("fate", no_wrap=True)
    table.add_column("tier", no_wrap=True)
    table.add_column("why", overflow="fold")
    for g in shown:
        why = g.reason.split("; ")[0]
        table.add_row(g.first, graph.tensors[g.first].kind.value, format_bytes(g.nbytes),
                      str(g.count), g.fate, g.tier, why)
    buffer = io.StringIO()
    Console(file=buffer, width=width, no_color=True, highlight=False, emoji=False).print(table)
    text = _strip(buffer.getvalue())
    text += "\nthe full reason of any tensor: tierplan explain PLAN.json TENSOR"
    if skipped:
        text += (f"\n(not listed: {skipped:,} temporaries, inputs and outputs that live on the device from "
                 "their producer to their last reader)")
    return text


def _update_rows(plan: Plan) -> list[tuple[str, str]]:
    """The optimizer step: where the states live, what the whole step costs and holds."""
    u = plan.update
    assert u is not None
    where = "; ".join(f"{tier} {n} ({format_bytes(u.bytes_on(tier))})"
                      for tier, n in u.placement_counts().items() if n)
    per_param = u.model_state_bytes() / max(1, sum(ps.numel for ps in u.params))
    peaks = "; ".join(f"{tier} {format_bytes(b)}" + (f" of {format_bytes(plan.capacities[tier])}"
                                                    if tier in plan.capacities else "")
                      for tier, b in u.peak_bytes.items())
    return [
        ("optimizer step", f"{u.optimizer}, {u.precision}: masters and states of {len(u.params):,} parameters "
                           f"on {where}; updates on the host CPU where the states are off the device"),
        ("  model state", f"{format_bytes(u.model_state_bytes())} over all tiers ({per_param:.1f} B/parameter: "
                          f"weights, gradients, masters, states)"),
        ("whole step", f"{_ms(u.step_time_s)} (the update adds {_ms(u.update_exposed_s)} after the backward); "
                       f"placed in {u.solve_s:.1f} s"),
        ("  peak per tier", peaks),
    ]


def step_compare_report(plan: Plan, baselines: Mapping[str, Plan | None], reasons: Mapping[str, str], *,
                        width: int = 140) -> str:
    """The whole step (forward, backward, optimizer) next to the offload policies' (same cost model)."""
    table = Table(title="whole training step compared with the baselines (same cost model, same budget)",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    tiers = list(plan.capacities)
    for column in ("policy", "step time", "vs this plan", "update exposed", *(f"peak {t}" for t in tiers), "states"):
        table.add_column(column, justify="left" if column in ("policy", "states") else "right", no_wrap=True)
    rows = [(f"this plan ({plan.method.split(' ')[0] or 'tierplan'})", plan)] + list(baselines.items())
    for name, p in rows:
        if p is None or p.update is None:
            table.add_row(name, "-", "-", "-", *("-" for _ in tiers), "cannot run (below)")
            continue
        u = p.update
        counts = ", ".join(f"{n} {tier}" for tier, n in u.placement_counts().items() if n)
        table.add_row(name, _ms(u.step_time_s), f"{u.step_time_s / plan.step_time_s:.2f}x", _ms(u.update_exposed_s),
                      *(format_bytes(u.peak_bytes.get(t, 0)) for t in tiers), counts)
    buffer = io.StringIO()
    Console(file=buffer, width=width, no_color=True, highlight=False, emoji=False).print(table)
    notes = [f"  {name} cannot run: {reasons.get(name, 'no reason recorded')}"
             for name, p in baselines.items() if p is None]
    return "\n".join([_strip(buffer.getvalue()), *notes])


def compare_report(plan: Plan, baselines: dict[str, Plan], *, width: int = 140) -> str:
    """The plan next to the baselines, priced by the same cost model."""
    table = Table(title="compared with the baselines (same cost model, same budget)", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("plan", "fits", "peak device", "step time", "overhead", "recompute", "exposed transfers"):
        table.add_column(column, justify="left" if column in ("plan", "fits") else "right", no_wrap=True)
    rows = [(f"this plan ({plan.method.split(' ')[0] or 'tierplan'})", plan)] + list(baselines.items())
    for name, p in rows:
        peak = p.peak_bytes.get(DEVICE, 0)
        fits = "yes" if peak <= plan.budget_bytes else f"no (+{format_bytes(peak - plan.budget_bytes)})"
        over = p.predicted_time_s - plan.keep_all_time_s
        table.add_row(
            name, fits, format_bytes(peak), _ms(p.predicted_time_s),
            f"{'+' if over >= 0 else ''}{_ms(over)} ({_pct(over, plan.keep_all_time_s)})",
            _ms(p.recompute_time_s), _ms(p.exposed_transfer_s),
        )
    buffer = io.StringIO()
    Console(file=buffer, width=width, no_color=True, highlight=False, emoji=False).print(table)
    return _strip(buffer.getvalue())


def _value(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _strip(text: str) -> str:
    """rich pads every line to the console width: drop the padding and blank lines."""
    return "\n".join(line.rstrip() for line in text.splitlines() if line.strip())
