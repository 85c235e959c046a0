"""What-if: the best parallel plan of one model on several machines and GPU counts.

    rows = whatif("llama-70b", ["h100-sxm", "a100-40gb-pcie", "rtx4090"], [8, 64])
    print(whatif_command("llama-70b", ["h100-sxm", "rtx4090"], [8, 64], serve=False, json_out=None))

The model is profiled once (a few captured layers, scaled); every hardware x GPU count runs the
parallel search on that profile. A row says the best plan and its step time (training) or
tokens/s, TTFT and TPOT (serving) and memory per device, or why that setup cannot run the model.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from tierplan.cost_models.hardware import format_seconds, load_hardware
from tierplan.parallel.search import plan_parallel
from tierplan.parallel.profile import ModelProfile, profile_model

__all__ = ["WhatIfRow", "whatif", "whatif_command", "format_whatif"]


@dataclass
class WhatIfRow:
    hardware: str
    gpus: int
    plan: str  # the best plan, described; "" when none fits
    step_s: float | None = None  # training
    tokens_per_s: float | None = None
    mfu: float | None = None
    ttft_s: float | None = None  # serving
    tpot_s: float | None = None
    memory_gb: float | None = None  # per device, GB (1e9)
    capacity_gb: float | None = None
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    search_seconds: float = 0.0


def whatif(
    model: str | ModelProfile,
    hardware_list: Sequence[str],
    gpus_list: Sequence[int],
    *,
    serve: bool = False,
    seq_len: int | None = None,
    global_batch: int | None = None,
    generate: int = 256,
) -> list[WhatIfRow]:
    """One row per (hardware, GPU count), in the order given."""
    profile = model if isinstance(model, ModelProfile) else profile_model(model, seq_len=seq_len)
    rows = []
    for name in hardware_list:
        hw = load_hardware(name)
        for gpus in gpus_list:
            r = plan_parallel(profile, hw, int(gpus), serve=serve, global_batch=global_batch,
                              generate=generate, top=1)  # fmt: skip
            row = WhatIfRow(hardware=name, gpus=int(gpus), plan="", reason=r.reason,
                            notes=r.notes[1:], search_seconds=r.search_seconds)  # fmt: skip
            if r.best is not None:
                b = r.best
                row.plan = b.describe()
                row.memory_gb = b.memory.total / 1e9
                row.capacity_gb = b.capacity / 1e9
                row.tokens_per_s = b.metrics["tokens_per_s"]
                if serve:
                    row.ttft_s, row.tpot_s = b.metrics["ttft_s"], b.metrics["tpot_s"]
                else:
                    row.step_s, row.mfu = b.step_time, b.metrics["mfu"]
            rows.append(row)
    return rows


def format_whatif(rows: Sequence[WhatIfRow], *, serve: bool, title: str = "") -> str:
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
    """The text of ``tierplan whatif``; also writes the rows as JSON to ``json_out`` if given."""
    profile = profile_model(model)
    rows = whatif(profile, hardware_list, gpus_list, serve=serve)
    mode = "serving" if serve else "training"
    title = (f"what-if: {mode} {model} ({profile.total_params / 1e9:.1f}B parameters, seq "
             f"{profile.seq_len}); {profile.notes[0]}")  # fmt: skip
    if json_out is not None:
        Path(json_out).write_text(json.dumps(
            {"model": model, "mode": mode, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return format_whatif(rows, serve=serve, title=title)
