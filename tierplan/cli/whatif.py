"""What ``tierplan whatif MODEL --hardware A,B --gpus 8,64 [--serve] [--layout "dp1 tp8 pp8"]``
prints: for each machine and GPU count the best parallel plan (and, with ``--layout``, the best
plan matching the layout's fields) as a text table, the two side by side in a memory and time
breakdown, and optionally the rows as JSON. MODEL is anything ``tierplan.profiling.profile_model``
takes: a zoo name, ``path/to/file.py:factory`` or a transformers ``config.json``."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any
from collections.abc import Sequence

from tierplan.cost_models.hardware import format_seconds, load_hardware
from tierplan.parallel.profile import ModelProfile
from tierplan.parallel.search import ParallelResult, default_global_batch, plan_parallel
from tierplan.parallel.types import Layout, ParallelPlan, parse_layout
from tierplan.parallel.whatif import WhatIfRow
from tierplan.passes.target_kernels import TargetKernels
from tierplan.profiling import profile_model

__all__ = ["format_breakdown", "format_whatif", "whatif_command"]

_MEMORY_FIELDS = ("parameters", "gradients", "optimizer", "activations", "kv_cache", "buffers")
_TIME_FIELDS = ("compute", "recompute", "bubble", "exposed_transfers", "optimizer")


def format_whatif(
    rows: Sequence[WhatIfRow], *, serve: bool, title: str = "", kinds: Sequence[str] | None = None
) -> str:
    """One line per row, columns padded; the reason a setup cannot run last, unpadded. With
    ``kinds`` (one per row: "best" or "layout"), a column saying which plan a row is."""
    if serve:
        head = ["hardware", "GPUs", "best plan", "tokens/s", "TTFT", "TPOT", "mem/device", "why not"]
    else:
        head = ["hardware", "GPUs", "best plan", "step", "tokens/s", "MFU", "mem/device", "why not"]
    if kinds is not None:
        head[2] = "plan"
    table = [head]
    for i, r in enumerate(rows):
        mem = f"{r.memory_gb:.1f}/{r.capacity_gb:.0f} GB" if r.memory_gb is not None else "-"
        plan = r.plan or "-"
        if kinds is not None:
            plan = f"{kinds[i]}: {plan}"
        if not r.plan:
            table.append([r.hardware, str(r.gpus), plan, "-", "-", "-", "-", r.reason])
        elif serve:
            table.append([r.hardware, str(r.gpus), plan, f"{r.tokens_per_s:,.0f}",
                          format_seconds(r.ttft_s), format_seconds(r.tpot_s), mem, ""])  # fmt: skip
        else:
            table.append([r.hardware, str(r.gpus), plan, format_seconds(r.step_s),
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


def _row(name: str, gpus: int, r: ParallelResult, serve: bool) -> WhatIfRow:
    """The what-if row of one search (as ``tierplan.parallel.whatif.whatif`` makes them)."""
    row = WhatIfRow(hardware=name, gpus=gpus, plan="", reason=r.reason, notes=r.notes[1:],
                    search_seconds=r.search_seconds)  # fmt: skip
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
    return row


def _breakdown(plan: ParallelPlan) -> dict[str, Any]:
    """A plan's figures for JSON: memory per device in GB, seconds per step by part."""
    m, t = plan.memory, plan.time
    return {
        "plan": plan.describe(),
        "fits": plan.fits,
        "memory_gb": m.total / 1e9,
        "capacity_gb": plan.capacity / 1e9,
        "step_s": plan.step_time if plan.mode == "train" else None,
        **plan.metrics,
        "memory_breakdown_gb": {**{k: getattr(m, k) / 1e9 for k in _MEMORY_FIELDS}, "total": m.total / 1e9},
        "time_breakdown_s": {**{k: getattr(t, k) for k in _TIME_FIELDS}, **t.collectives, "total": t.total},
        "config": plan.config,
    }


def _json_row(kind: str, row: WhatIfRow, r: ParallelResult) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": kind, **asdict(row), "fits": r.best is not None}
    if kind == "layout":
        out["layout"] = r.layout
    if r.best is not None:
        b = _breakdown(r.best)
        out.update(memory_breakdown_gb=b["memory_breakdown_gb"], time_breakdown_s=b["time_breakdown_s"],
                   config=b["config"])  # fmt: skip
    out["over_capacity"] = _breakdown(r.over_capacity) if r.over_capacity is not None else None
    return out


def _cell_gb(plan: ParallelPlan | None, field: str) -> str:
    if plan is None:
        return "-"
    return f"{getattr(plan.memory, field) / 1e9:.2f}"


def format_breakdown(best: ParallelResult, layout: ParallelResult, *, serve: bool) -> str:
    """The best plan's and the layout's memory and time breakdowns side by side, for one machine
    and GPU count. A layout with no plan shows the closest miss priced over capacity, if the
    search has one, else dashes; either way the reason follows."""
    a = best.best
    b = layout.best or layout.over_capacity
    over = layout.best is None and layout.over_capacity is not None
    cols = ["best", "layout (over capacity)" if over else "layout"]
    lines = [f"{best.hardware} x {best.gpus}:"]
    lines.append(f"  best:   {a.describe() if a else '- (' + best.reason + ')'}")
    lines.append(f"  layout: {b.describe() if b else '-'}  [{layout.layout}]")
    if layout.best is None:
        lines.append(f"    why not: {layout.reason}")
    table: list[tuple[str, str, str]] = [("", *cols), ("memory per device (GB)", "", "")]
    for f in _MEMORY_FIELDS:
        if (f == "kv_cache") != serve and f not in ("parameters", "buffers"):
            continue  # training holds no KV cache; serving no gradients, optimizer, activations
        table.append((f"  {f.replace('_', ' ')}", _cell_gb(a, f), _cell_gb(b, f)))
    total = [f"{p.memory.total / 1e9:.2f} of {p.capacity / 1e9:.1f}" if p else "-" for p in (a, b)]
    table.append(("  total", *total))
    per = "decode step" if serve else "step"
    table.append((f"time per {per}", "", ""))
    names = list(dict.fromkeys([*(a.time.collectives if a else {}), *(b.time.collectives if b else {})]))
    for f in (*_TIME_FIELDS, *names):
        vals = []
        for p in (a, b):
            if p is None:
                vals.append("-")
            else:
                v = getattr(p.time, f) if f in _TIME_FIELDS else p.time.collectives.get(f, 0.0)
                vals.append(format_seconds(v))
        if serve and f in ("recompute", "bubble", "exposed_transfers", "optimizer") and vals == ["0 s", "0 s"]:
            continue
        table.append((f"  {f.replace('_', ' ')}", *vals))
    table.append(("  total", *[format_seconds(p.time.total) if p else "-" for p in (a, b)]))
    if serve:
        metrics = [("tokens/s", "tokens_per_s", "{:,.0f}"), ("TTFT", "ttft_s", None), ("TPOT", "tpot_s", None)]
    else:
        metrics = [("tokens/s", "tokens_per_s", "{:,.0f}"), ("MFU", "mfu", "{:.1%}")]
    for label, key, form in metrics:
        vals = []
        for p in (a, b):
            v = p.metrics.get(key) if p else None
            vals.append("-" if v is None else (form.format(v) if form else format_seconds(v)))
        table.append((label, *vals))
    w0, w1, w2 = (max(len(r[i]) for r in table) for i in range(3))
    lines += [f"  {r[0].ljust(w0)}  {r[1].rjust(w1)}  {r[2].rjust(w2)}".rstrip() for r in table]
    return "\n".join(lines)


def _precision_of(profile: ModelProfile) -> str:
    keys = {k for c in profile.cells.values() for k in c.forward.keys}
    if profile.param_bytes == 2:
        return "fp16" if any("float16" in k and "bfloat16" not in k for k in keys) and not any(
            "bfloat16" in k for k in keys) else "bf16"  # fmt: skip
    return "fp32" if profile.param_bytes == 4 else f"{profile.param_bytes}-byte"


def whatif_command(
    model: str,
    hardware_list: Sequence[str],
    gpus_list: Sequence[int],
    serve: bool,
    json_out: str | Path | None,
    *,
    seq_len: int | None = None,
    global_batch: int | None = None,
    precision: str | None = None,
    layout: str | Layout | None = None,
) -> str:
    """The text of ``tierplan whatif`` for ``model`` (a zoo name, ``path/to/file.py:factory`` or
    a transformers config.json), profiled at ``seq_len`` in ``precision``; also writes the rows
    as JSON to ``json_out`` if given. With ``layout`` (``parse_layout``'s grammar), each setup
    also gets the best plan matching it, and the two are broken down side by side. A layout that
    does not parse raises ``LayoutError`` before anything is profiled.

    The model is captured with each machine's kernels (a GPU's fused attention), once per kind
    of kernels among the machines (usually once)."""
    lay = parse_layout(layout, serve=serve) if isinstance(layout, str) else layout
    machines = [(name, load_hardware(name)) for name in hardware_list]
    profiles: dict[tuple[str, bool], tuple[ModelProfile, TargetKernels]] = {}
    for _, hw in machines:
        kernels = TargetKernels.of(hw)
        key = (kernels.kind, kernels.sm80) if kernels.gpu else ("cpu", False)
        if key not in profiles:
            profiles[key] = (profile_model(model, seq_len=seq_len, precision=precision,
                                           target=kernels if kernels.gpu else None), kernels)  # fmt: skip
    profile_of = {}
    for name, hw in machines:
        kernels = TargetKernels.of(hw)
        profile_of[name] = profiles[(kernels.kind, kernels.sm80) if kernels.gpu else ("cpu", False)][0]
    profile = next(iter(profiles.values()))[0]
    gb = None if serve else (global_batch or default_global_batch(profile.seq_len))
    entries: list[tuple[str, WhatIfRow, ParallelResult]] = []
    pairs: list[tuple[ParallelResult, ParallelResult]] = []
    for name, hw in machines:
        profile = profile_of[name]
        for gpus in gpus_list:
            best = plan_parallel(profile, hw, int(gpus), serve=serve, global_batch=gb, top=1)
            entries.append(("best", _row(name, int(gpus), best, serve), best))
            if lay is not None:
                mine = plan_parallel(profile, hw, int(gpus), serve=serve, global_batch=gb, top=1,
                                     layout=lay)  # fmt: skip
                entries.append(("layout", _row(name, int(gpus), mine, serve), mine))
                pairs.append((best, mine))
    mode = "serving" if serve else "training"
    profile = next(iter(profiles.values()))[0]
    prec = _precision_of(profile)
    kinds_used = [
        k.describe().replace(f"{k.name}, ", "") if k.gpu else "the CPU's kernels" for _, k in profiles.values()
    ]  # fmt: skip
    n = profile.total_params
    count = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    title = (f"what-if: {mode} {model} ({count} parameters, seq "
             f"{profile.seq_len}, {prec}); {profile.notes[0]}; captured with "
             f"{' / '.join(kinds_used)}")  # fmt: skip
    if json_out is not None:
        Path(json_out).write_text(json.dumps({
            "model": model, "mode": mode, "seq_len": profile.seq_len, "precision": prec,
            "global_batch": gb, "layout": lay.text if lay is not None else None,
            "rows": [_json_row(kind, row, r) for kind, row, r in entries],
        }, indent=2) + "\n")  # fmt: skip
    rows = [row for _, row, _ in entries]
    kinds = [kind for kind, _, _ in entries] if lay is not None else None
    text = format_whatif(rows, serve=serve, title=title, kinds=kinds)
    if pairs:
        text += "\n\n" + "\n\n".join(format_breakdown(b, m, serve=serve) for b, m in pairs)
    return text
