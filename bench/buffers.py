"""Benchmark of static buffer packing and of operator ordering.

    python3 bench/buffers.py [--minimalloc DIR] [--time-limit S] [--no-zoo]

Table 1, per instance: the lower bound (most bytes live at once), the greedy best fit by size
and tierplan's exact search (``pack_exact``): arena, gap to the bound, solve time. Instances are
the six MiniMalloc CSVs (capacity 1,048,576 bytes, which the exact search must meet) and the
storage lifetimes of captured zoo models in capture order and in ``best_order``.
Table 2, per captured graph: the peak of live bytes of the capture order, inductor's three
topological sorts (LPMF, BFS, DFS) and tierplan's ``best_order``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tierplan.packing.pack import (  # noqa: E402
    Buffer,
    Packing,
    as_buffers,
    lower_bound,
    pack_exact,
    pack_greedy,
)
from tierplan.formats.buffers_csv import read_buffers_csv  # noqa: E402

MINIMALLOC_CAPACITY = 1_048_576
ZOO_MODELS = ("mlp", "tiny-transformer", "gpt2-tiny")


def minimalloc_instances(directory: Path) -> Iterator[tuple[str, list[Buffer], int | None]]:
    for path in sorted(directory.glob("*.csv")):
        yield path.name.split(".")[0], read_buffers_csv(path), MINIMALLOC_CAPACITY


def captured_graphs() -> Iterator[tuple[str, object]]:
    """(name, tierplan.ir.Graph) of the zoo models, training and inference; nothing when the
    capture pass or the zoo is unavailable."""
    try:
        from tierplan.passes.capture import capture
        from tierplan.zoo import load_model
    except ImportError as e:
        print(f"(zoo graphs skipped: {e})", file=sys.stderr)
        return
    for name in ZOO_MODELS:
        for training in (True, False):
            model, args, kwargs = load_model(name, training=training)
            graph = capture(model, args, example_kwargs=kwargs, training=training).graph
            yield f"{name} {'train' if training else 'infer'}", graph


def zoo_instances(graphs: list[tuple[str, object]], best: dict[str, list[str]]):
    """The storage lifetimes of each graph in capture order and in its best order."""
    from tierplan.passes.liveness import lifetimes

    for name, graph in graphs:
        yield f"{name} (capture)", as_buffers(lifetimes(graph)), None
        yield f"{name} (best order)", as_buffers(lifetimes(graph, best[name])), None


def _gap(p: Packing, bound: int) -> str:
    return f"{(p.arena_bytes - bound) / bound:.2%}" if bound else "-"


def packing_rows(instances, time_limit_s: float) -> list[list[str]]:
    rows = []
    for name, buffers, capacity in instances:
        bound = lower_bound(buffers)
        greedy = pack_greedy(buffers)
        exact = pack_exact(buffers, capacity, time_limit_s)
        rows.append([
            name, f"{len(buffers)}", f"{bound:,}",
            f"{greedy.arena_bytes:,}", _gap(greedy, bound), f"{greedy.solve_s:.2f}",
            f"{exact.arena_bytes:,}", _gap(exact, bound), f"{exact.solve_s:.2f}",
            "yes" if exact.optimal else f"no (>= {exact.lower_bound:,})",
        ])
        print(f"  packed {name}", file=sys.stderr, flush=True)
    return rows


def ordering_rows(graphs) -> tuple[list[list[str]], dict[str, list[str]]]:
    from tierplan.passes.liveness import peak_bytes
    from tierplan.passes.ordering import best_order, orders

    rows, best = [], {}
    for name, graph in graphs:
        peaks = {m: peak_bytes(graph, o) for m, o in orders(graph).items()}
        order, peak, method = best_order(graph)
        best[name] = order
        rows.append([name, f"{len(graph.ops)}", *(f"{peaks[m]:,}" for m in ("capture", "lpmf", "bfs", "dfs")),
                     f"{peak:,}", method])
    return rows, best


def show(title: str, header: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        print(f"\n{title}")
        for r in [header, *rows]:
            print("  ".join(c.rjust(w) if k else c.ljust(w) for k, (c, w) in enumerate(zip(r, widths))))
        return
    table = Table(title=title)
    for k, h in enumerate(header):
        table.add_column(h, justify="left" if k == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console(width=200).print(table)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minimalloc", type=Path, default=ROOT.parent / "shared/benchmarks/minimalloc")
    ap.add_argument("--time-limit", type=float, default=10.0, help="seconds per exact packing")
    ap.add_argument("--no-zoo", action="store_true", help="skip the captured zoo models")
    args = ap.parse_args(argv)

    graphs = [] if args.no_zoo else list(captured_graphs())
    order_rows, best = ordering_rows(graphs)
    instances = list(minimalloc_instances(args.minimalloc)) + list(zoo_instances(graphs, best))
    rows = packing_rows(instances, args.time_limit)
    show(
        "Buffer packing: arena bytes, gap to the lower bound, seconds",
        ["instance", "buffers", "lower bound", "greedy", "gap", "s", "exact", "gap", "s", "optimal"],
        rows,
    )
    if order_rows:
        show(
            "Operator order: peak live bytes",
            ["graph", "ops", "capture", "LPMF", "BFS", "DFS", "tierplan", "method"],
            order_rows,
        )


if __name__ == "__main__":
    main()
