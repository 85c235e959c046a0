"""The memory timeline of a plan as a PNG (matplotlib, Agg backend).

One panel per tier that holds anything: bytes over the predicted step time, stacked by tensor
kind, with the tier's capacity (the budget, on the device) and, on the device, the keep-all
plan's curve for comparison. Below them a lane chart: recompute and exposed waits on the compute
stream, and each transfer channel's copies.
"""
from __future__ import annotations

from pathlib import Path

from tierplan.plans.plan import DEVICE, Plan
from tierplan.report.timeline import GROUPS, Timeline, timeline
from tierplan.units import format_bytes

_COLORS = {
    "parameters": "#4c72b0",
    "optimizer state": "#8172b3",
    "gradients": "#dd8452",
    "activations": "#55a868",
    "temporaries": "#c9c9c9",
}
_GIB = float(2**30)


def _unit(peak: float) -> tuple[float, str]:
    for scale, name in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if peak >= scale:
            return float(scale), name
    return 1.0, "B"


def plot_memory(
    plan: Plan,
    path: str | Path,
    *,
    reference: Plan | None = None,
    title: str | None = None,
) -> Path:
    """Write the memory timeline of ``plan`` to ``path`` (a .png, .svg or .pdf).

    ``reference``: a plan to draw as a line on the device panel, normally the keep-all plan.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = timeline(plan)
    ref = timeline(reference) if reference is not None else None
    tiers = [t for t in plan.capacities if t == DEVICE or tl.peak(t) > 0]
    channels = sorted({(c.src, c.dst) for c in plan.channels} | {(t.src, t.dst) for t in tl.transfers},
                      key=lambda c: (c[1] == DEVICE, c))
    lanes = ["recompute", "exposed wait"] + [f"{src}→{dst}" for src, dst in channels]

    heights = [3.2 if t == DEVICE else 1.6 for t in tiers] + [0.35 * len(lanes) + 0.5]
    fig, axes = plt.subplots(
        len(heights), 1, figsize=(12, sum(heights) + 1.2), sharex=True,
        gridspec_kw={"height_ratios": heights},
    )
    ms = 1e3
    times = [t * ms for t in tl.times_s] + [tl.end_s * ms]
    for ax, tier in zip(axes, tiers):
        per_group = tl.usage[tier]
        peak = max(tl.peak(tier), plan.capacities.get(tier, 0) if tier == DEVICE else 0)
        if tier == DEVICE and ref is not None:
            peak = max(peak, ref.peak(DEVICE))
        scale, unit = _unit(peak)
        groups = [g for g in GROUPS if any(per_group[g])]  # kinds this tier never holds stay out of the legend
        ys = [[v / scale for v in per_group[g]] + [per_group[g][-1] / scale] for g in groups]
        if groups:
            ax.stackplot(times, ys, step="post", colors=[_COLORS[g] for g in groups],
                         labels=groups, linewidth=0)
        capacity = plan.capacities.get(tier)
        if capacity is not None and (tier == DEVICE or capacity <= 1.5 * tl.peak(tier)):
            label = f"budget {format_bytes(capacity)}" if tier == DEVICE else f"capacity {format_bytes(capacity)}"
            ax.axhline(capacity / scale, color="#c44e52", linestyle="--", linewidth=1.4, label=label)
        if tier == DEVICE and ref is not None:
            rt = [t * ms for t in ref.times_s] + [ref.end_s * ms]
            total = ref.total(DEVICE)
            ax.step(rt, [v / scale for v in total] + [total[-1] / scale], where="post", color="black",
                    linewidth=1.0, alpha=0.75,
                    label=f"keep-all (peak {format_bytes(max(total))})")
        ax.set_ylabel(f"{tier} ({unit})")
        ax.set_ylim(0, peak / scale * 1.08 if peak else 1)
        ax.grid(axis="y", alpha=0.3)
        of = f" of {format_bytes(capacity)}" if capacity is not None else ""
        ax.text(0.005, 0.97, f"{tier}: peak {format_bytes(tl.peak(tier))}{of}", transform=ax.transAxes,
                va="top", ha="left", fontsize=9, bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})
    for ax in axes[:-1]:
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(handles[::-1], labels[::-1], loc="upper right", fontsize=8, framealpha=0.9)

    lane_ax = axes[-1]
    _draw_lanes(lane_ax, tl, lanes, channels, ms)
    lane_ax.set_xlabel("predicted time in the step (ms)")
    lane_ax.set_xlim(0, max(tl.end_s, ref.end_s if ref else 0.0) * ms or 1)

    mode = "training step" if plan.training else "inference"
    fig.suptitle(
        title or (
            f"{plan.graph.name} {mode} on {plan.hardware}: budget {format_bytes(plan.budget_bytes)}, "
            f"step {plan.predicted_time_s * 1e3:.1f} ms (keep-all {plan.keep_all_time_s * 1e3:.1f} ms)"
        ),
        fontsize=11,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_lanes(ax, tl: Timeline, lanes: list[str], channels: list[tuple[str, str]], ms: float) -> None:
    rows = {name: len(lanes) - 1 - i for i, name in enumerate(lanes)}
    spans = {name: [] for name in lanes}
    for event in tl.compute:
        if event.recompute:
            spans["recompute"].append((event.start_s * ms, (event.end_s - event.start_s) * ms))
    for wait in tl.waits:
        if wait.end_s > wait.start_s:
            spans["exposed wait"].append((wait.start_s * ms, (wait.end_s - wait.start_s) * ms))
    for t in tl.transfers:
        spans[f"{t.src}→{t.dst}"].append((t.start_s * ms, max((t.end_s - t.start_s) * ms, 0.0)))
    colors = {"recompute": "#c44e52", "exposed wait": "#937860"}
    for name in lanes:
        color = colors.get(name, "#4c72b0" if name.startswith(DEVICE) else "#55a868")
        if spans[name]:
            ax.broken_barh(spans[name], (rows[name] - 0.35, 0.7), facecolors=color, edgecolors=color,
                           linewidth=0.3)
    labels = []
    for name in lanes:
        total = sum(d for _, d in spans[name])
        what = "ops" if name == "recompute" else "waits" if name == "exposed wait" else "copies"
        labels.append(f"{name}\n{len(spans[name])} {what}, {total:.1f} ms")
    ax.set_yticks([rows[n] for n in lanes], labels, fontsize=8)
    ax.set_ylim(-0.6, len(lanes) - 0.4)
    ax.grid(axis="x", alpha=0.3)
