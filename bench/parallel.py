"""Parallel planning benchmark: the Llama-2-70B search on 64 H100 (8 nodes of 8), a what-if, and
the training model against published runs.

    python bench/parallel.py [--serve]
    python bench/parallel.py --calibrate

Prints the profile time (2 captured layers, scaled to 80), the search time, the top plans with
their memory and time breakdowns, where a Megatron-style layout (TP8 PP4 interleaved, ZeRO-1)
ranks, a what-if table over presets x {8, 64} GPUs, and (training) the calibration table.

``--calibrate`` prints only the calibration: the GPT runs of Narayanan et al. 2021 (Megatron-LM,
Table 1; 1.7B on 32 A100 ... 1T on 3,072) priced at the paper's layouts on the a100-80gb-sxm
preset, published vs predicted TFLOP/s per GPU and the mean error, then re-fits the one fitted
constant, ``[device] training_efficiency``, and says whether the preset's value is still the fit
(``tierplan.parallel.calibration``; docs/cost-model.md, "Calibration against published runs").

Published MFU for comparison (bf16, dense): Llama 2 70B ~44-47% on A100 (from the paper's
1,720,320 GPU-hours for 2T tokens), Megatron-LM 52-56% on A100 (Narayanan et al. 2021,
Korthikanti et al. 2022), Llama 3 405B 38-43% on H100 (Dubey et al. 2024, Table 4).
"""
from __future__ import annotations

import argparse
import time

from tierplan.cli.whatif import format_whatif
from tierplan.cost_models.hardware import load_hardware
from tierplan.parallel.calibration import (
    CALIBRATION_HARDWARE,
    MEGATRON_TABLE1,
    calibration_table,
    fit_training_efficiency,
    format_calibration,
)
from tierplan.parallel.search import format_plan, format_result, plan_parallel
from tierplan.parallel.training import TrainSearch
from tierplan.parallel.types import cluster_for
from tierplan.parallel.whatif import whatif
from tierplan.profiling import profile_zoo_model, published_run_profiles

PRESETS = ["h100-sxm", "h200", "a100-80gb-sxm", "a100-40gb-pcie", "rtx4090", "mi300x"]


def calibrate(fit: bool) -> None:
    """The calibration table on the A100 preset; with ``fit``, the constant re-fitted."""
    start = time.perf_counter()
    hw = load_hardware(CALIBRATION_HARDWARE)
    profiles = published_run_profiles(MEGATRON_TABLE1, hw)
    rows = calibration_table(hw, profiles=profiles)
    print(f"\ncalibration: Narayanan et al. 2021 Table 1 on {hw.name} "
          f"(training_efficiency {hw.device.training_efficiency:g}; "
          f"{time.perf_counter() - start:.1f} s)")
    print(format_calibration(rows))
    if fit:
        value, error = fit_training_efficiency(hw, profiles=profiles)
        same = abs(round(value, 2) - hw.device.training_efficiency) < 0.015
        print(f"fitted training_efficiency = {value:.3f} (mean error {error:.1%}); the preset has "
              f"{hw.device.training_efficiency:g}" + ("" if same else " -- update the preset"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--calibrate", action="store_true",
                    help="only the calibration against Narayanan et al. 2021, and the fit")
    args = ap.parse_args()
    if args.calibrate:
        calibrate(fit=True)
        return
    start = time.perf_counter()
    prof = profile_zoo_model("llama-70b")
    profiled = time.perf_counter() - start
    start = time.perf_counter()
    result = plan_parallel(prof, "h100-sxm", 64, serve=args.serve, top=5)
    searched = time.perf_counter() - start
    print(f"llama-70b: profile {profiled:.2f} s, search {searched:.2f} s, "
          f"total {profiled + searched:.2f} s")
    print(format_result(result))
    if not args.serve:
        hw = load_hardware("h100-sxm")
        cluster, _ = cluster_for(hw, 64)
        s = TrainSearch(prof, hw, cluster, 64, 1024)
        mega = s.evaluate(t=8, pp=4, d=2, b=1, schedule="interleaved", v=2, zero=1,
                          offload_optimizer=False, offload_params=False)
        every = plan_parallel(prof, "h100-sxm", 64, top=0).plans
        rank = next(i for i, p in enumerate(every, 1) if p.describe().split(" rc[")[0] == mega.describe().split(" rc[")[0])
        print(f"\nMegatron-style layout for comparison (rank {rank} of {len(every)} fitting plans):")
        print(f"  {format_plan(mega)}")
    if not args.serve:
        print("\npublished MFU (bf16): Llama 2 70B ~44-47% (A100), Megatron-LM 52-56% (A100), "
              "Llama 3 405B 38-43% (H100); calibrated on Megatron-LM's A100 runs (table below), "
              "the model predicts ~45% on H100 and ~51% on A100 for this 70B")
    start = time.perf_counter()
    rows = whatif(prof, PRESETS, [8, 64], serve=args.serve)
    print(f"\nwhat-if ({time.perf_counter() - start:.2f} s):")
    print(format_whatif(rows, serve=args.serve))
    if not args.serve:
        calibrate(fit=False)


if __name__ == "__main__":
    main()
