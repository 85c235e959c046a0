"""A plan's schedule as a Chrome / Perfetto trace (open it at https://ui.perfetto.dev).

Tracks (threads of one process): the compute stream (compute and recompute ops, and waits that
stall it), then one track per transfer channel (device->host, host->device, device->nvme, ...);
channels that share a queue (both cross the device's PCIe link) say so in their name; a plan with
an optimizer step adds its tasks (gradient and weight copies, state reads and writes, updates)
on one track per resource, after the schedule's tracks. Counter
tracks give the bytes each tier holds, by tensor kind. Times are the plan's predicted times
(``report.timeline``: the validator's semantics), in microseconds as the format wants.

Format: the JSON object form, ``{"traceEvents": [...], "displayTimeUnit": "ms"}``; complete
events (``ph: "X"``) with ``ts`` and ``dur``, counters (``"C"``), metadata (``"M"``). Every event
has ``name``, ``ph``, ``ts``, ``pid`` and ``tid``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tierplan.plans.plan import DEVICE, Plan
from tierplan.report.timeline import GROUPS, timeline

PID = 1
COMPUTE_TID = 1
_US = 1e6


def trace_events(plan: Plan) -> list[dict[str, Any]]:
    """The trace events of ``plan`` (see the module docstring)."""
    tl = timeline(plan)
    graph = plan.graph
    mode = "training step" if plan.training else "inference"
    events: list[dict[str, Any]] = [
        _meta("process_name", 0, {"name": f"tierplan: {graph.name} {mode} on {plan.hardware}"}),
        _meta("thread_name", COMPUTE_TID, {"name": "compute stream"}),
        _meta("thread_sort_index", COMPUTE_TID, {"sort_index": 0}),
    ]
    queues: dict[str, list[str]] = {}
    for c in plan.channels:
        queues.setdefault(c.queue, []).append(f"{c.src}->{c.dst}")
    channel_tid: dict[tuple[str, str], int] = {}
    ordered = sorted(plan.channels, key=lambda c: (c.src != DEVICE and c.dst != DEVICE, c.dst == DEVICE, c.src, c.dst))
    for i, c in enumerate(ordered):
        tid = COMPUTE_TID + 1 + i
        channel_tid[c.src, c.dst] = tid
        shared = [name for name in queues[c.queue] if name != f"{c.src}->{c.dst}"]
        label = f"{c.src} -> {c.dst} ({c.bandwidth / 1e9:.1f} GB/s)"
        if shared:
            label += f", queue shared with {', '.join(shared)}"
        events.append(_meta("thread_name", tid, {"name": label}))
        events.append(_meta("thread_sort_index", tid, {"sort_index": tid}))

    for e in tl.compute:
        op = graph.op(e.op)
        events.append({
            "name": e.op, "cat": "recompute" if e.recompute else "compute", "ph": "X",
            "ts": e.start_s * _US, "dur": (e.end_s - e.start_s) * _US, "pid": PID, "tid": COMPUTE_TID,
            "args": {"step": e.step, "target": op.target, "phase": op.phase.value,
                     "block": op.block, "module": op.module},
            **({"cname": "terrible"} if e.recompute else {}),
        })
    for w in tl.waits:
        if w.end_s > w.start_s:
            events.append({
                "name": f"wait {w.storage} ->{w.dst}", "cat": "wait", "ph": "X",
                "ts": w.start_s * _US, "dur": (w.end_s - w.start_s) * _US, "pid": PID,
                "tid": COMPUTE_TID, "args": {"step": w.step, "exposed_ms": (w.end_s - w.start_s) * 1e3},
                "cname": "grey",
            })
    for t in tl.transfers:
        tid = channel_tid.get((t.src, t.dst))
        if tid is None:
            continue
        events.append({
            "name": t.storage, "cat": "transfer", "ph": "X", "ts": t.start_s * _US,
            "dur": (t.end_s - t.start_s) * _US, "pid": PID, "tid": tid,
            "args": {"bytes": t.nbytes, "src": t.src, "dst": t.dst, "queue": t.queue,
                     "issued_step": t.step, "issued_at_us": t.issued_s * _US,
                     "waited_step": t.waited_step},
        })
    if plan.update is not None:
        events += _update_events(plan, first_tid=COMPUTE_TID + 1 + len(ordered))
    for tier in plan.capacities:
        if tier != DEVICE and tl.peak(tier) == 0:
            continue
        last: tuple[int, ...] | None = None
        for i, at in enumerate(tl.times_s):
            values = tuple(tl.usage[tier][g][i] for g in GROUPS)
            if values == last:
                continue
            last = values
            events.append({
                "name": f"{tier} memory (bytes)", "ph": "C", "ts": at * _US, "pid": PID, "tid": 0,
                "args": dict(zip(GROUPS, values)),
            })
    return events


def _update_events(plan: Plan, *, first_tid: int) -> list[dict[str, Any]]:
    """The optimizer step's tasks, one track per resource they use."""
    assert plan.update is not None
    tids: dict[str, int] = {}
    events: list[dict[str, Any]] = []
    for task in plan.update.tasks:
        if task.resource not in tids:
            tid = tids[task.resource] = first_tid + len(tids)
            events.append(_meta("thread_name", tid, {"name": f"optimizer step: {task.resource}"}))
            events.append(_meta("thread_sort_index", tid, {"sort_index": tid}))
        events.append({
            "name": f"{task.kind} {task.param}", "cat": f"optimizer.{task.kind}", "ph": "X",
            "ts": task.start_s * _US, "dur": (task.end_s - task.start_s) * _US, "pid": PID,
            "tid": tids[task.resource], "args": {"bytes": task.nbytes, "flops": task.flops,
                                                 "states_on": plan.update.states_tier[task.param]},
        })
    return events


def write_trace(plan: Plan, path: str | Path) -> Path:
    """Write the trace of ``plan`` to ``path`` as Chrome trace JSON."""
    path = Path(path)
    document = {
        "traceEvents": trace_events(plan),
        "displayTimeUnit": "ms",
        "otherData": {
            "tool": "tierplan", "graph": plan.graph.name, "hardware": plan.hardware,
            "method": plan.method, "predicted_time_s": plan.predicted_time_s,
            "budget_bytes": plan.budget_bytes,
        },
    }
    path.write_text(json.dumps(document, separators=(",", ":")))
    return path


def _meta(name: str, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ph": "M", "ts": 0, "pid": PID, "tid": tid, "args": args}
