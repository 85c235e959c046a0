"""What a GenerationPlan says, for people: a comparison table, a Perfetto trace of its tasks, and
a plot of the device's bytes over the job (reads GenerationPlans only)."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping

from rich import box
from rich.console import Console
from rich.table import Table

from tierplan.plans.generation import GENERATION_TIERS, KV_IN, LAYER, WEIGHT_IN, GenerationPlan
from tierplan.plans.plan import DEVICE
from tierplan.units import format_bytes

_US = 1e6


def _shares(plan: GenerationPlan, share: Any) -> str:
    return "/".join(f"{share(t):.0%}" for t in GENERATION_TIERS)


def generation_compare_report(plan: GenerationPlan, baselines: Mapping[str, GenerationPlan | str], *,
                              width: int = 140, published: Mapping[str, float] | None = None) -> str:
    """The plan next to its baselines, priced by the same simulator; ``published`` adds measured
    figures from papers as rows of their own (tokens/s only)."""
    table = Table(title="generation compared with the baselines (same cost model, same tiers; peaks per tier; "
                        "batch = micro-batches x sequences)", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    tiers = list(plan.capacities)
    for column in ("policy", "tokens/s", "vs plan", "1st token", "decode step", "batch",
                   "weights d/h/n", "cache d/h/n", "attn", *tiers):
        table.add_column(column, justify="left" if column in ("policy", "batch", "attn") else "right",
                         no_wrap=True)
    rows: list[tuple[str, GenerationPlan | str]] = [("tierplan", plan), *baselines.items()]
    notes = []
    for name, p in rows:
        if isinstance(p, str):
            table.add_row(name, *["-"] * (8 + len(tiers)))
            notes.append(f"  {name} cannot run: {p}")
            continue
        table.add_row(
            name, f"{p.tokens_per_s:.4g}", f"{p.tokens_per_s / plan.tokens_per_s:.2f}x", f"{p.ttft_s:.4g} s",
            f"{p.decode_s_per_token:.4g} s", f"{p.policy.num_gpu_batches} x {p.policy.gpu_batch}",
            _shares(p, p.weight_share), _shares(p, p.kv_share), p.policy.attention,
            *(format_bytes(p.peak_bytes.get(t, 0)) for t in tiers))
    for name, tps in (published or {}).items():
        table.add_row(name, f"{tps:.4g}", f"{tps / plan.tokens_per_s:.2f}x", "published",
                      *["-"] * (5 + len(tiers)))
    buffer = io.StringIO()
    Console(file=buffer, width=width, no_color=True, highlight=False, emoji=False).print(table)
    text = "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())
    return "\n".join([text, *notes])


def generation_trace_events(plan: GenerationPlan) -> list[dict[str, Any]]:
    """One track per resource, a complete event per task, and a counter of the streamed bytes."""
    resources = sorted({t.resource for t in plan.tasks}, key=lambda r: (r != "compute", r))
    tid = {r: i + 1 for i, r in enumerate(resources)}
    events: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "ts": 0,
                                     "args": {"name": f"tierplan: {plan.shape.model} generation on {plan.hardware}"}}]
    for r, i in tid.items():
        events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": i, "ts": 0, "args": {"name": r}})
    for t in plan.tasks:
        step = "prefill" if t.step == 0 else f"decode {t.step}"
        where = f" layer {t.layer}" if t.layer >= 0 else ""
        events.append({"name": f"{t.kind}{where}", "cat": t.kind, "ph": "X", "ts": t.start_s * _US,
                       "dur": (t.end_s - t.start_s) * _US, "pid": 1, "tid": tid[t.resource],
                       "args": {"step": step, "micro_batch": t.micro_batch, "bytes": t.nbytes, "flops": t.flops}})
    return events


def write_generation_trace(plan: GenerationPlan, path: str | Path) -> None:
    Path(path).write_text(json.dumps({"traceEvents": generation_trace_events(plan), "displayTimeUnit": "ms"}))


def device_copies_over_time(plan: GenerationPlan) -> list[tuple[float, int]]:
    """(time, bytes) of the streamed weights and cache copies on the device over the job: each
    copy held from its start until its layer's last micro-batch ends (the runtime's lifetimes)."""
    layer_end: dict[tuple[int, int], float] = {}
    mb_end: dict[tuple[int, int, int], float] = {}
    for t in plan.tasks:
        if t.kind == LAYER:
            layer_end[t.step, t.layer] = max(layer_end.get((t.step, t.layer), 0.0), t.end_s)
            mb_end[t.step, t.layer, t.micro_batch] = t.end_s
    events = []
    for t in plan.tasks:
        until = (layer_end.get((t.step, t.layer)) if t.kind == WEIGHT_IN and t.layer >= 0
                 else mb_end.get((t.step, t.layer, t.micro_batch)) if t.kind == KV_IN else None)
        if until is not None:
            events += [(t.start_s, t.nbytes), (until, -t.nbytes)]
    held, out = 0, [(0.0, 0)]
    for time_s, delta in sorted(events):
        held += delta
        out.append((time_s, held))
    return out


def plot_generation(plan: GenerationPlan, path: str | Path) -> None:
    """The device's resident bytes and its streamed copies over the job, against the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    resident = plan.peak_bytes[DEVICE] - max(b for _, b in device_copies_over_time(plan))
    points = device_copies_over_time(plan)
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.step([t for t, _ in points], [(resident + b) / 2**30 for _, b in points], where="post",
            label="resident weights, cache and working set + streamed copies")
    ax.axhline(plan.capacities[DEVICE] / 2**30, color="red", linestyle="--", label="device budget")
    for end in plan.step_end_s[:1]:
        ax.axvline(end, color="gray", linestyle=":", label="first token")
    ax.set_xlabel("seconds")
    ax.set_ylabel("GiB on the device")
    ax.set_title(f"{plan.shape.model} generation on {plan.hardware}: {plan.tokens_per_s:.3g} tokens/s")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["device_copies_over_time", "generation_compare_report", "generation_trace_events", "plot_generation",
           "write_generation_trace"]
