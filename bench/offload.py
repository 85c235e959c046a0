"""Benchmark of the whole training step with the optimizer's states across tiers.

    python3 bench/offload.py [--quick] [--time-limit S] [--repeats N] [--hardware-cpu FILE.toml]

Table 1 (predicted, one run): model x machine x {tierplan, zero-offload, zero-infinity,
keep-all}, every plan priced by the same cost model and validated: the whole step's time (forward,
backward and the AdamW update, bf16-mixed), model TFLOPS (6 x parameters x tokens / step, the
model FLOPs of Narayanan et al. 2021 without recompute), the whole step's peak per tier and the
planning time. A policy that cannot run says why. The machines are presets (rtx4090: 24 GB, 64 GiB
of host DRAM, one Gen4 NVMe; rtx4090-host128: 128 GiB of host DRAM), so these are predictions
for them, not measurements.

Table 2 (measured here, on this CPU): gpt2-tiny and llama-tiny trained by the compiled module with
AdamW, the states placed by tierplan and by fixed policies (all on the device, the host or NVMe):
the predicted step beside the measured median step (forward + backward + optimizer.step +
zero_grad). ``--hardware-cpu`` takes a calibrated TOML (``tierplan calibrate --out FILE``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import tierplan  # noqa: E402
from tierplan.api import plan_graph  # noqa: E402
from tierplan.compile import compile_plan  # noqa: E402
from tierplan.cost_models.hardware import load_hardware  # noqa: E402
from tierplan.passes.capture import capture  # noqa: E402
from tierplan.placement.optimizer_step import plan_update  # noqa: E402
from tierplan.placement.update import update_rates  # noqa: E402
from tierplan.plans.plan import DEVICE, HOST, NVME  # noqa: E402
from tierplan.units import format_bytes  # noqa: E402
from tierplan.zoo import load_model  # noqa: E402

# (model, hardware, device budget, batch, sequence): 2048 tokens a step, bf16-mixed AdamW (the zoo's
# GPT-2 is fp32: planned in bf16 like the rest), host and NVMe tiers.
CASES = [
    ("gpt2-large", "rtx4090", "22GiB", 2, 1024),
    ("llama-7b", "rtx4090", "22GiB", 1, 2048),
    ("gpt3-13b", "rtx4090", "22GiB", 1, 2048),
    ("gpt3-175b", "rtx4090-host128", "22GiB", 1, 2048),
]
QUICK = CASES[:2]
POLICIES = ("zero-offload", "zero-infinity", "keep-all")


def predicted_rows(cases, time_limit: float) -> list[list[str]]:
    rows = []
    for model_name, hw_name, budget, batch, seq in cases:
        model, args, kwargs = load_model(model_name, batch_size=batch, seq_len=seq, fake=True)
        model = model.to(torch.bfloat16)
        numel = sum(p.numel() for p in model.parameters())
        tokens = batch * seq
        hw = load_hardware(hw_name)
        started = time.perf_counter()
        graph = capture(model, args, example_kwargs=kwargs, target=hw).graph
        plan = plan_graph(graph, hardware=hw, memory_budget=budget, tiers=(HOST, NVME), time_limit=time_limit)
        solve_s = time.perf_counter() - started
        found = tierplan.baselines(plan)
        for policy, p in [("tierplan", plan), *((name, found[name]) for name in POLICIES)]:
            if p is None:
                rows.append([model_name, hw_name, policy, "-", "-", "-", "-", "-", "-", "-",
                             f"cannot run: {found.reasons[policy]}"])
                continue
            u = p.update
            assert u is not None
            tflops = 6 * numel * tokens / p.step_time_s / 1e12
            rows.append([
                model_name, hw_name, policy, f"{p.step_time_s:.2f}", f"{p.step_time_s / plan.step_time_s:.2f}x"
                if policy != "tierplan" else "1.00x", f"{tflops:.1f}",
                *(format_bytes(u.peak_bytes.get(t, 0)) for t in (DEVICE, HOST, NVME)),
                f"{solve_s:.0f}" if policy == "tierplan" else "",
                f"{u.model_state_bytes() / numel:.1f} B/param; states " + ", ".join(
                    f"{n} {t}" for t, n in u.placement_counts().items() if n),
            ])
        print(f"  {model_name} on {hw_name}: planned in {solve_s:.1f} s", file=sys.stderr)
    return rows


def measured_rows(hardware: str, repeats: int) -> list[list[str]]:
    hw = load_hardware(hardware)
    rows = []
    for name in ("gpt2-tiny", "llama-tiny"):
        for policy in ("tierplan", DEVICE, HOST, NVME):
            model, args, kwargs = load_model(name)
            model.eval()  # no dropout: every step does the same work
            captured = capture(model, args, example_kwargs=kwargs, keep_outputs=True)
            plan = plan_graph(captured.graph, hardware=hw, tiers=(HOST, NVME), time_limit=5)
            if policy != "tierplan":
                plan.update = plan_update(plan, update_rates(hw), optimizer="adamw", precision="fp32",
                                          fixed=policy, method=f"all states on {policy}")
                tierplan.validate(plan)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
            compiled = compile_plan(model, captured, plan, optimizer=opt)
            seconds = _median_step(compiled, args, kwargs, repeats)
            compiled.optimizer.close()
            rows.append([name, policy, f"{plan.step_time_s * 1e3:.2f}", f"{seconds * 1e3:.2f}",
                         f"{(plan.step_time_s - seconds) / seconds:+.0%}",
                         f"{plan.update.update_exposed_s * 1e3:.2f}" if plan.update else "-"])
    return rows


def _median_step(compiled, args, kwargs, repeats: int) -> float:
    optimizer = compiled.optimizer

    def step() -> None:
        compiled(*args, **kwargs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):
        step()  # warm-up: the states exist from the first step on
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(title)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="gpt2 and llama-7b only")
    parser.add_argument("--time-limit", type=float, default=30.0, help="the planner's time limit per model")
    parser.add_argument("--repeats", type=int, default=20, help="measured steps per row of table 2")
    parser.add_argument("--hardware-cpu", default="cpu", help="the CPU's hardware (a preset or calibrated TOML)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = predicted_rows(QUICK if args.quick else CASES, args.time_limit)
    print_table(
        "Table 1: whole training step (AdamW, bf16-mixed, 2048 tokens), predicted for each machine",
        ["model", "machine", "policy", "step s", "vs tierplan", "model TFLOPS", "peak device", "peak host",
         "peak nvme", "plan s", "model state"], rows)
    print_table(
        f"Table 2: measured on this CPU ({args.hardware_cpu} cost model), fp32 AdamW, median of {args.repeats} steps",
        ["model", "states", "predicted ms", "measured ms", "error", "update exposed ms"],
        measured_rows(args.hardware_cpu, args.repeats))


if __name__ == "__main__":
    main()
