"""What-if: the best parallel plan of one model on several machines and GPU counts.

    profile = profile_zoo_model("llama-70b")  # tierplan.profiling
    rows = whatif(profile, ["h100-sxm", "a100-40gb-pcie", "rtx4090"], [8, 64])

The model is profiled once, by the caller; every hardware x GPU count runs the parallel search
on that profile. A row says the best plan and its step time (training) or tokens/s, TTFT and
TPOT (serving) and memory per device, or why that setup cannot run the model. The table
``tierplan whatif`` prints is ``tierplan.cli.whatif``'s.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from tierplan.cost_models.hardware import load_hardware
from tierplan.parallel.profile import ModelProfile
from tierplan.parallel.search import plan_parallel

__all__ = ["WhatIfRow", "whatif"]


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
    profile: ModelProfile,
    hardware_list: Sequence[str],
    gpus_list: Sequence[int],
    *,
    serve: bool = False,
    global_batch: int | None = None,
    generate: int = 256,
) -> list[WhatIfRow]:
    """One row per (hardware, GPU count), in the order given."""
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
