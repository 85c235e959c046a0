"""Parallelism plans for training and serving: the public entry point.

    profile = profile_zoo_model("llama-70b")  # tierplan.profiling: a few captured layers, scaled
    result = plan_parallel(profile, "h100-sxm", gpus=64)
    print(format_result(result))
    # the best plan with these fields fixed (the rest searched), or why none fits
    mine = plan_parallel(profile, "h100-sxm", gpus=64, layout="dp1 tp8 pp8 rc[full]")

A zoo name, a ``path/to/file.py:factory`` or a transformers ``config.json`` is profiled by
``tierplan.profiling.profile_model`` (the front end; this package never builds a model), and
``tierplan.profiling.plan_model`` does both steps.

``plan_parallel`` takes a ``ModelProfile`` (``parallel.profile``), sizes the cluster
(``parallel.types.cluster_for``), and runs the training search (``parallel.training``) or the
serving search (``parallel.serving``). The answer is a ranked list of
``ParallelPlan``s, each with per-device memory (parameters, gradients, optimizer state,
activations, KV cache, buffers) and step time (compute, recompute, each collective, pipeline
bubble, exposed transfers, optimizer), or an empty list and a one-line reason.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tierplan.cost_models.collectives import CollectiveError
from tierplan.cost_models.hardware import Hardware, format_seconds, load_hardware
from tierplan.parallel.profile import ModelProfile
from tierplan.parallel.serving import search_serving
from tierplan.parallel.training import search_training
from tierplan.parallel.types import (
    Layout,
    LayoutError,
    MemoryBreakdown,
    ParallelPlan,
    TimeBreakdown,
    cluster_for,
    parse_layout,
)

__all__ = [
    "Layout",
    "LayoutError",
    "MemoryBreakdown",
    "ParallelPlan",
    "ParallelResult",
    "TimeBreakdown",
    "default_global_batch",
    "format_result",
    "plan_parallel",
]

# Llama 2 trained with 4M-token batches (Touvron et al. 2023); the default global batch is that
# many sequences, rounded down to a power of two.
DEFAULT_BATCH_TOKENS = 4 * 1024 * 1024


def default_global_batch(seq_len: int) -> int:
    n = max(1, DEFAULT_BATCH_TOKENS // seq_len)
    return 1 << (n.bit_length() - 1)


@dataclass
class ParallelResult:
    mode: str
    model: str
    hardware: str
    gpus: int
    plans: list[ParallelPlan]
    evaluated: int
    rejected: dict[str, int]
    search_seconds: float
    profile_seconds: float  # what capturing the profile took (ModelProfile.capture_seconds)
    reason: str = ""  # why no plan fits, when none does
    notes: list[str] = field(default_factory=list)
    layout: str = ""  # the fields the search was restricted to (``--layout``), as given
    # When no plan fits for want of memory: the closest miss priced anyway (``fits`` False), its
    # memory breakdown showing what overflows.
    over_capacity: ParallelPlan | None = None

    @property
    def best(self) -> ParallelPlan | None:
        return self.plans[0] if self.plans else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "model": self.model, "hardware": self.hardware, "gpus": self.gpus,
            "plans": [p.to_dict() for p in self.plans], "evaluated": self.evaluated,
            "rejected": self.rejected, "search_seconds": self.search_seconds,
            "profile_seconds": self.profile_seconds, "reason": self.reason, "notes": self.notes,
            "layout": self.layout,
            "over_capacity": self.over_capacity.to_dict() if self.over_capacity else None,
        }  # fmt: skip


def plan_parallel(
    profile: ModelProfile,
    hardware: str | Hardware,
    gpus: int,
    *,
    serve: bool = False,
    global_batch: int | None = None,
    prompt: int | None = None,
    generate: int = 256,
    top: int = 5,
    layout: Layout | str | None = None,
) -> ParallelResult:
    """Ranked parallel plans for the profiled model on ``gpus`` devices of ``hardware`` (a preset
    name, a file, or a Hardware). The sequence length is the profile's.

    ``layout`` (a ``Layout`` or its text, ``parse_layout``'s grammar, e.g. ``"dp1 tp8 pp8"``)
    restricts the search to the configurations matching the fields it fixes; the fields left out
    are searched. When none fits, ``reason`` says why (a field that cannot divide the model, GPUs
    or batch; or memory), and ``over_capacity`` holds the closest miss priced anyway. A text that
    does not parse raises ``LayoutError``."""
    mode = "serve" if serve else "train"
    if isinstance(layout, str):
        layout = parse_layout(layout, serve=serve)
    if layout is not None and layout.mode != mode:
        raise LayoutError(f"layout {layout.text!r} is a {layout.mode} layout; this search is {mode}")
    hw = hardware if isinstance(hardware, Hardware) else load_hardware(hardware)
    profiled = profile.capture_seconds
    notes = list(profile.notes)
    text = layout.text if layout is not None else ""
    try:
        cluster, assumed = cluster_for(hw, gpus)
    except ValueError as exc:
        return ParallelResult(mode, profile.name, hw.name, gpus, [], 0, {}, 0.0, profiled,
                              reason=str(exc), notes=notes, layout=text)  # fmt: skip
    notes += assumed
    start = time.perf_counter()
    search: Any
    if serve:
        plans, search = search_serving(profile, hw, cluster, gpus, prompt=prompt,
                                       generate=generate, top=top, layout=layout)  # fmt: skip
    else:
        gb = global_batch or default_global_batch(profile.seq_len)
        notes.append(f"global batch {gb} sequences of {profile.seq_len} tokens")
        plans, search = search_training(profile, hw, cluster, gpus, gb, top=top, layout=layout)
    seconds = time.perf_counter() - start
    if search.precision.note:  # e.g. a bf16 model on a device without bf16, priced as fp16
        notes.append(search.precision.note)
    evaluated, rejected = search.evaluated, dict(search.rejected)
    problem = search.layout_problem()
    reason = ""
    over = None
    if problem is not None:
        reason = f"layout {text!r}: {problem}"
    elif not plans:
        reason = _reason(search, hw)
        over = _over_capacity(search)
        if layout is not None and over is not None:
            reason = f"layout {text!r}: memory over capacity: {_overflow(over, hw)}"
        elif layout is not None:
            reason = f"layout {text!r}: no configuration on {gpus} GPUs matches it" + (
                f" ({reason})" if search.rejected else "")  # fmt: skip
    return ParallelResult(
        mode=mode, model=profile.name, hardware=hw.name, gpus=gpus,
        plans=plans, evaluated=evaluated, rejected=rejected,
        search_seconds=seconds, profile_seconds=profiled, reason=reason, notes=notes,
        layout=text, over_capacity=over,
    )  # fmt: skip


def _overflow(plan: ParallelPlan, hw: Hardware) -> str:
    """What a plan over capacity needs per device, by part, against what the device has."""
    m = plan.memory
    parts = [(k, getattr(m, k)) for k in ("parameters", "gradients", "optimizer", "activations",
                                          "kv_cache", "buffers")]  # fmt: skip
    said = " + ".join(f"{k.replace('_', ' ')} {_gb(v)}" for k, v in parts if v > 0)
    return (f"{plan.describe()} needs {_gb(m.total)} GB per device ({said}), {hw.name} has "
            f"{_gb(plan.capacity)} GB")


def _over_capacity(search: Any) -> ParallelPlan | None:
    """The closest miss of a search that found no plan, priced though it does not fit."""
    cfg = search.closest_config
    if cfg is None:
        return None
    try:
        if isinstance(cfg, dict):
            plan = search.evaluate(**cfg, over_capacity=True)
        else:
            plan = search.evaluate(*cfg, over_capacity=True)
    except (CollectiveError, ValueError):
        return None
    if plan is not None:
        plan.notes.append("does not fit: priced over capacity to show what overflows")
    return plan


def _reason(search: Any, hw: Hardware) -> str:
    cap = search.capacity
    if search.closest is not None:
        need, desc = search.closest
        host = search.rejected.get("offloaded state exceeds host memory")
        return (f"does not fit: the leanest plan ({desc}) needs {need / 1e9:.1f} GB per device, "
                f"{hw.name} has {cap / 1e9:.1f} GB"
                + (f"; offloading would exceed the host's {hw.host.dram_bytes / 1e9:.0f} GB"
                   if host else ""))  # fmt: skip
    if search.rejected:
        top = max(search.rejected.items(), key=lambda kv: kv[1])[0]
        return f"no valid configuration: {top}"
    return "no configuration to try"


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f}"


def format_plan(plan: ParallelPlan) -> str:
    m, t = plan.memory, plan.time
    mem = (f"mem/device {_gb(m.total)} GB of {_gb(plan.capacity)}: params {_gb(m.parameters)}, "
           f"grads {_gb(m.gradients)}, optimizer {_gb(m.optimizer)}, activations "
           f"{_gb(m.activations)}, kv {_gb(m.kv_cache)}, buffers {_gb(m.buffers)}")  # fmt: skip
    colls = ", ".join(f"{k} {format_seconds(v)}" for k, v in t.collectives.items()) or "none"
    tim = (f"time: compute {format_seconds(t.compute)}, recompute {format_seconds(t.recompute)}, "
           f"bubble {format_seconds(t.bubble)}, exposed transfers "
           f"{format_seconds(t.exposed_transfers)}, optimizer {format_seconds(t.optimizer)}; "
           f"collectives: {colls}")  # fmt: skip
    if plan.mode == "serve":
        x = plan.metrics
        head = (f"{plan.describe()}: {x['tokens_per_s']:.0f} tokens/s, TTFT "
                f"{format_seconds(x['ttft_s'])}, TPOT {format_seconds(x['tpot_s'])}")  # fmt: skip
    else:
        head = (f"{plan.describe()}: step {format_seconds(plan.step_time)}, "
                f"{plan.metrics['tokens_per_s']:.0f} tokens/s, MFU {plan.metrics['mfu']:.0%}")  # fmt: skip
    return f"{head}\n    {mem}\n    {tim}"


def format_result(result: ParallelResult) -> str:
    lines = [
        f"{result.mode} {result.model} on {result.gpus} x {result.hardware}: "
        f"{result.evaluated} configurations priced in {result.search_seconds:.2f} s "
        f"(profile {result.profile_seconds:.1f} s)"
        + (f"; layout {result.layout!r}" if result.layout else "")
    ]
    lines += [f"  note: {n}" for n in result.notes]
    if not result.plans:
        lines.append(f"  no plan: {result.reason}")
    if result.over_capacity is not None:
        lines.append(f"  over capacity: {format_plan(result.over_capacity)}")
    for i, p in enumerate(result.plans, 1):
        lines.append(f"  {i}. {format_plan(p)}")
    return "\n".join(lines)
