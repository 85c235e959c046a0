"""Plans as text: the summary and the table of the largest decisions that `tierplan plan` prints."""
from __future__ import annotations

import io
from collections import Counter

from rich.console import Console
from rich.table import Table

from tierplan.planner.plan import Plan
from tierplan.units import format_bytes


def plan_report(plan: Plan, *, largest: int = 12, width: int = 140) -> str:
    """The plan's summary, its largest storages with their fate, and the repeated blocks."""
    graph = plan.graph
    out = [plan.summary()]

    kinds = Counter()
    for storage in graph.storages():
        kinds[graph.tensors[storage].kind] += graph.tensors[storage].nbytes
    out.append(
        "  bytes by kind: "
        + ", ".join(f"{kind.value} {format_bytes(n)}" for kind, n in kinds.most_common() if n)
    )
    if graph.blocks:
        templates = Counter(b.template for b in graph.blocks)
        first = graph.blocks[0]
        out.append(
            f"  repeated blocks: {len(graph.blocks)} blocks of {len(first.ops)} ops "
            f"({len(templates)} distinct structure{'s' if len(templates) > 1 else ''}); "
            "the table lists each decision once per structure"
        )

    table = Table(title=f"largest storages ({largest} of {len(graph.storages())})", title_justify="left")
    for column in ("tensor", "kind", "size", "fate", "tier", "why"):
        # One line per row: the full reason is one `tierplan explain` away.
        table.add_column(column, no_wrap=True, overflow="ellipsis", ratio=1 if column == "why" else None)
    ranked = sorted(graph.storages(), key=lambda s: graph.tensors[s].nbytes, reverse=True)
    for storage in ranked[:largest]:
        t = graph.tensors[storage]
        decision = plan.decisions.get(storage)
        table.add_row(
            storage, t.kind.value, format_bytes(t.nbytes),
            decision.fate if decision else "-", decision.tier if decision else "-",
            decision.reason if decision else "-",
        )
    buffer = io.StringIO()
    Console(file=buffer, width=width, no_color=True, highlight=False).print(table)
    out.append(buffer.getvalue().rstrip())
    return "\n".join(out)

