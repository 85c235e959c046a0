"""Predicted vs measured device peak (and, on a GPU, step time) of compiled models.

    python bench/fidelity.py [--models mlp,gpt2-tiny] [--budgets 1.0,0.9,0.75] [--tiers host]

CPU: the device peak is measured by an independent storage tracker (tierplan.codegen.measure),
which counts the tensors the program allocates and the caller-owned tensors the plan starts on
the device, never the host pool. GPU: torch.cuda.max_memory_allocated over the step, and step
times (median of --repeats) of the compiled module and of eager.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from tierplan.api import plan_graph
from tierplan.codegen.measure import StorageTracker
from tierplan.compile import compile_plan
from tierplan.passes.capture import capture
from tierplan.planner.plan import DEVICE, InfeasibleBudget
from tierplan.units import format_bytes
from tierplan.zoo import load_model


def measure_cpu(compiled, args, kwargs) -> int:
    flat = compiled.flat_inputs(args, kwargs)
    plan = compiled.plan
    on_device, off = [], [compiled.host_pool]
    for name, t in zip(compiled.program.inputs, flat):
        if name.startswith("tangents"):
            continue
        tier = plan.initial_tiers.get(plan.graph.tensors[name].storage, DEVICE)
        (on_device if tier == DEVICE else off).append(t)
    tracker = StorageTracker(existing=on_device, exclude=off)
    with tracker:
        loss = compiled(*args, **kwargs)
    loss.backward()
    return tracker.peak_bytes


def measure_cuda(fn) -> tuple[int, float]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn,tiny-transformer,gpt2-tiny,llama-tiny,bert-tiny")
    ap.add_argument("--budgets", default="1.0,0.9,0.75")
    ap.add_argument("--tiers", default="host")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--time-limit", type=float, default=2.0)
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    hardware = "h100-sxm" if cuda else "cpu"
    tiers = tuple(t for t in a.tiers.split(",") if t)
    print(f"device {device}, hardware preset {hardware}, tiers {tiers or '(none)'}")
    head = f"{'model':18} {'budget':>7} {'method':28} {'predicted':>11} {'measured':>11} {'error':>7}"
    if cuda:
        head += f" {'pred ms':>8} {'meas ms':>8} {'eager ms':>8}"
    print(head)
    for name in a.models.split(","):
        model, args, kwargs = load_model(name, batch_size=None, seq_len=None) if cuda else _small(name)
        if name != "cnn":
            model.eval()  # no dropout: the planned and eager steps compute the same thing
        model.to(device)
        args = tuple(x.to(device) for x in args)
        kwargs = {k: v.to(device) for k, v in kwargs.items()}
        captured = capture(model, args, example_kwargs=kwargs)
        for frac in (float(b) for b in a.budgets.split(",")):
            try:
                plan = plan_graph(captured.graph, hardware=hardware, memory_budget=frac, tiers=tiers,
                                  time_limit=a.time_limit)
            except InfeasibleBudget:
                print(f"{name:18} {frac:7.2f} {'infeasible':28}")
                continue
            compiled = compile_plan(model, captured, plan, device=device)
            predicted = plan.peak_bytes[DEVICE]
            row = f"{name:18} {frac:7.2f} {plan.method.split(' (')[0][:28]:28} {format_bytes(predicted):>11}"
            if cuda:
                def step():
                    compiled(*args, **kwargs).backward()
                def eager():
                    out = model(*args, **kwargs)
                    (out if isinstance(out, torch.Tensor) else out.loss).backward()
                step(); eager()  # warm up
                runs = [measure_cuda(step) for _ in range(a.repeats)]
                measured = max(r[0] for r in runs)
                t_c = statistics.median(r[1] for r in runs)
                t_e = statistics.median(measure_cuda(eager)[1] for _ in range(a.repeats))
                row += (f" {format_bytes(measured):>11} {100 * (measured - predicted) / predicted:6.1f}%"
                        f" {plan.predicted_time_s * 1e3:8.3f} {t_c * 1e3:8.3f} {t_e * 1e3:8.3f}")
            else:
                measured = measure_cpu(compiled, args, kwargs)
                row += f" {format_bytes(measured):>11} {100 * (measured - predicted) / predicted:6.1f}%"
            model.zero_grad(set_to_none=True)
            print(row, flush=True)


def _small(name: str):
    sizes = {"mlp": (8, 1), "cnn": (4, 16), "tiny-transformer": (2, 32)}
    batch, seq = sizes.get(name, (2, 32))
    return load_model(name, batch_size=batch, seq_len=seq)


if __name__ == "__main__":
    main()
