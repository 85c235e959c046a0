"""Predicted vs measured device peak (and, on a GPU, step time) of compiled models.

    python bench/fidelity.py                      # on a GPU: everything below, one command
    python bench/fidelity.py [--models mlp,gpt2-tiny] [--budgets 1.0,0.9,0.75] [--tiers host]
    python bench/fidelity.py --arena              # also each plan's arena program (one row more)

CPU: the device peak is measured by an independent storage tracker (tierplan.codegen.measure),
which counts the tensors the program allocates and the caller-owned tensors the plan starts on
the device, never the host pool. GPU: the absolute ``torch.cuda.max_memory_allocated`` over one
step after ``reset_peak_memory_stats`` (gradients set to None first, so the model, its inputs and
what the step allocates are what is on the device, as in the plan), and step times (median of
--repeats, after a warm-up) of the compiled module, of eager, and of the checkpoint baseline:
every repeated block (each element of every nn.ModuleList; for models without one, each layer of
their top-level nn.Sequential) wrapped in ``torch.utils.checkpoint``. tierplan is then planned
again with the checkpoint baseline's measured peak as its budget ("@ckpt" rows), so the two step
times compare at an equal peak.

--arena: every plan is also compiled with ``arena=True``; its row ("arena") predicts the plan's
device peak (as the other rows; the arena program's own prediction, the arena plus what is
outside it: caller-owned tensors, the loss, ops without an out overload, is in the row's note),
measures the same way (each call allocates its arena, gradients included); the note is the
arena's size and the peak of what the program allocates outside it.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import statistics
import time

import torch

from tierplan.api import plan_graph
from tierplan.codegen.measure import StorageTracker
from tierplan.compile import compile_plan
from tierplan.passes.capture import capture
from tierplan.plans.plan import DEVICE, InfeasibleBudget
from tierplan.units import format_bytes
from tierplan.zoo import load_model


def measure_cpu(compiled, args, kwargs) -> int:
    flat = compiled.flat_inputs(args, kwargs)
    plan = compiled.plan
    # An arena program allocates its arena when it starts: the tracker sees it like any storage.
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


def measure_cuda(fn, zero) -> tuple[int, float]:
    """(peak bytes allocated on the device during ``fn``, its wall time), from a state with no
    gradients (``zero``) so the peak is comparable with the plan's device peak."""
    zero()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), time.perf_counter() - start


@contextlib.contextmanager
def checkpointed(model: torch.nn.Module):
    """Every repeated block of ``model`` runs under torch.utils.checkpoint (non-reentrant)."""
    from torch.utils.checkpoint import checkpoint

    blocks = [m for ml in model.modules() if isinstance(ml, torch.nn.ModuleList) for m in ml]
    if not blocks:
        seq = next((m for m in model.modules() if isinstance(m, torch.nn.Sequential)), None)
        blocks = list(seq) if seq is not None else []
    saved = []
    for b in blocks:
        saved.append((b, b.forward))
        b.forward = functools.partial(checkpoint, b.forward, use_reentrant=False)
    try:
        yield len(blocks)
    finally:
        for b, fwd in saved:
            b.forward = fwd


def timed_runs(fn, zero, repeats: int) -> tuple[int, float]:
    fn()  # warm-up
    runs = [measure_cuda(fn, zero) for _ in range(repeats)]
    return max(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn,tiny-transformer,gpt2-tiny,llama-tiny,bert-tiny")
    ap.add_argument("--budgets", default="1.0,0.9,0.75")
    ap.add_argument("--tiers", default="host")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--time-limit", type=float, default=2.0)
    ap.add_argument("--arena", action="store_true", help="also run every plan as an arena program")
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
        zero = functools.partial(model.zero_grad, set_to_none=True)

        def eager():
            out = model(*args, **kwargs)
            (out if isinstance(out, torch.Tensor) else out.loss).backward()

        budgets: list[tuple[str, object]] = [(f"{float(b):7.2f}", float(b)) for b in a.budgets.split(",")]
        t_e = None
        if cuda:
            eager_peak, t_e = timed_runs(eager, zero, a.repeats)
            with checkpointed(model) as n_blocks:
                ckpt_peak, t_ckpt = timed_runs(eager, zero, a.repeats)
            print(f"{name:18} {'eager':>7} {'torch eager':28} {'':>11} {format_bytes(eager_peak):>11} "
                  f"{'':>7} {'':>8} {t_e * 1e3:8.3f}")
            print(f"{name:18} {'ckpt':>7} {f'checkpoint x{n_blocks} blocks':28} {'':>11} "
                  f"{format_bytes(ckpt_peak):>11} {'':>7} {'':>8} {t_ckpt * 1e3:8.3f}")
            budgets.append(("   @ckpt", int(ckpt_peak)))
        for label, budget in budgets:
            try:
                plan = plan_graph(captured.graph, hardware=hardware, memory_budget=budget, tiers=tiers,
                                  time_limit=a.time_limit)
            except InfeasibleBudget as exc:
                print(f"{name:18} {label:>7} {'infeasible':28} (smallest feasible "
                      f"{format_bytes(exc.min_feasible_bytes or 0)})")
                continue
            compiled = compile_plan(model, captured, plan, device=device)
            predicted = plan.peak_bytes[DEVICE]
            row = f"{name:18} {label:>7} {plan.method.split(' (')[0][:28]:28} {format_bytes(predicted):>11}"
            measured, t_c = _measure(compiled, model, device, args, kwargs, zero, a.repeats)
            row += f" {format_bytes(measured):>11} {100 * (measured - predicted) / predicted:6.1f}%"
            if t_c is not None:
                row += f" {plan.predicted_time_s * 1e3:8.3f} {t_c * 1e3:8.3f} {t_e * 1e3:8.3f}"
            model.zero_grad(set_to_none=True)
            print(row, flush=True)
            if a.arena:
                print(_arena_row(name, model, captured, plan, device, args, kwargs, zero, a.repeats), flush=True)


def _arena_row(name, model, captured, plan, device, args, kwargs, zero, repeats) -> str:
    compiled = compile_plan(model, captured, plan, device=device, arena=True)
    layout = compiled.program.arena
    predicted = plan.peak_bytes[DEVICE]
    what = f"arena {format_bytes(layout.arena_bytes)} +{format_bytes(layout.outside_peak_bytes)}"
    row = f"{name:18} {'arena':>7} {what[:28]:28} {format_bytes(predicted):>11}"
    measured, t_c = _measure(compiled, model, device, args, kwargs, zero, repeats)
    row += f" {format_bytes(measured):>11} {100 * (measured - predicted) / predicted:6.1f}%"
    if t_c is not None:
        row += f" {'':>8} {t_c * 1e3:8.3f}"
    model.zero_grad(set_to_none=True)
    return row


def _measure(compiled, model, device, args, kwargs, zero, repeats) -> tuple[int, float | None]:
    """Device peak of one compiled step, and on CUDA its time (None on the CPU)."""
    if device.type != "cuda":
        return measure_cpu(compiled, args, kwargs), None

    def step():
        compiled(*args, **kwargs).backward()

    measured, seconds = timed_runs(step, zero, repeats)
    _restore_devices(model, device)
    return measured, seconds


def _restore_devices(model: torch.nn.Module, device: torch.device) -> None:
    """compile_plan moves parameters a plan starts on the host to pinned host memory; the next
    budget's plan starts from the model on the device again."""
    for p in [*model.parameters(), *model.buffers()]:
        if p.device != device:
            p.data = p.data.to(device)


def _small(name: str):
    sizes = {"mlp": (8, 1), "cnn": (4, 16), "tiny-transformer": (2, 32)}
    batch, seq = sizes.get(name, (2, 32))
    return load_model(name, batch_size=batch, seq_len=seq)


if __name__ == "__main__":
    main()
