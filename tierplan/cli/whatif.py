"""What ``tierplan whatif MODEL --hardware A,B --gpus 8,64 [--serve]`` prints: the what-if rows
(``tierplan.parallel.whatif``) of a zoo model as a text table, and optionally as JSON."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from tierplan.cost_models.hardware import format_seconds
from tierplan.parallel.whatif import WhatIfRow, whatif
from tierplan.profiling import profile_zoo_model

__all__ = ["format_whatif", "whatif_command"]


def format_whatif(rows: Sequence[WhatIfRow], *, serve: bool, title: str = "") -> str:
    """One line per row, columns padded; the reason a setup cannot run last, unpadded."""
    if serve:
        head = ["hardware", "GPUs", "best plan", "tokens/s", "TTFT", "TPOT", "mem/device", "why not"]
    else:
        head = ["hardware", "GPUs", "best plan", "step", "tokens/s", "MFU", "mem/device", "why not"]
    table = [head]
    for r in rows:
        mem = f"{r.memory_gb:.1f}/{r.capacity_gb:.0f} GB" if r.memory_gb is not None else "-"
        if not r.plan:
            table.append([r.hardware, str(r.gpus), "-", "-", "-", "-", "-", r.reason])
        elif serve:
            table.append([r.hardware, str(r.gpus), r.plan, f"{r.tokens_per_s:,.0f}",
                          format_seconds(r.ttft_s), format_seconds(r.tpot_s), mem, ""])  # fmt: skip
        else:
            table.append([r.hardware, str(r.gpus), r.plan, format_seconds(r.step_s),
                          f"{r.tokens_per_s:,.0f}", f"{r.mfu:.0%}", mem, ""])  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    lines = [title] if title else []
    for i, row in enumerate(table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        if i == 0:
            lines.append("-" * (sum(widths) + 2 * len(widths) + 8))
    notes = sorted({n for r in rows for n in r.notes})
    lines += [f"note: {n}" for n in notes]
    return "\n".join(line.rstrip() for line in lines)


def whatif_command(
    model: str,
    hardware_list: Sequence[str],
    gpus_list: Sequence[int],
    serve: bool,
    json_out: str | Path | None,
) -> str:
    """The text of ``tierplan whatif`` for zoo model ``model``; also writes the rows as JSON to
    ``json_out`` if given."""
    profile = profile_zoo_model(model)
    rows = whatif(profile, hardware_list, gpus_list, serve=serve)
    mode = "serving" if serve else "training"
    title = (f"what-if: {mode} {model} ({profile.total_params / 1e9:.1f}B parameters, seq "
             f"{profile.seq_len}); {profile.notes[0]}")  # fmt: skip
    if json_out is not None:
        Path(json_out).write_text(json.dumps(
            {"model": model, "mode": mode, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return format_whatif(rows, serve=serve, title=title)
