"""Predicted vs measured training-step time and device peak of compiled models.

    tierplan calibrate --out cal.toml             # measure this machine once
    python bench/fidelity.py --hardware cal.toml  # mlp, cnn, tiny-transformer, gpt2-tiny, llama-tiny,
                                                  # bert-tiny at budgets 1.0 and 0.6, tiers host
    python bench/fidelity.py [--models mlp,gpt2-tiny] [--budgets 1.0,0.9,0.6] [--tiers host]
                             [--repeats 9] [--warmup 3] [--arena] [--baselines]

Every case is planned on ``--hardware`` (a preset or a calibrated TOML; default: the ``cpu``
preset on a CPU, ``h100-sxm`` on a GPU) and compiled (``compile_plan``). Ops are priced by their
times measured here (``--op-times measured``, the default: each op of the captured graph timed in
place, ``tierplan.cost_models.measured``, as ``compile(op_times="measured")`` plans), the
hardware's runtime costs and links by ``--hardware``; ``--op-times roofline`` prices ops by the
hardware's roofline instead, as a plan for a machine tierplan does not run on. Its row compares:

- step time: the plan's ``predicted_time_s`` against the measured time of one training step of
  the compiled module, ``compiled(*args, **kwargs)`` and ``loss.backward()`` (gradients set to None
  before each step, outside the timed region), the median of ``--repeats`` steps after
  ``--warmup`` steps (on a GPU synchronized before and after). The error is pred / meas - 1. On
  the CPU every case is compiled first and the timed steps are taken in ``--rounds`` rounds over
  all cases (each case's steps of a round after one untimed step), so that a neighbour's burst
  of load on a shared machine spreads over the cases instead of landing on one.
- device peak: the plan's device peak against the measured one. CPU: an independent storage
  tracker (tierplan.codegen.measure) counts the tensors the program allocates and the
  caller-owned tensors the plan starts on the device, never the host pool. GPU: the absolute
  ``torch.cuda.max_memory_allocated`` over one step after ``reset_peak_memory_stats`` (gradients
  set to None first, so the model, its inputs and what the step allocates are what is on the
  device, as in the plan).

The "copy ms" column is the time the plan's copies take on their channels (latency + bytes /
bandwidth, summed); on a CPU the runtime makes them on the compute thread (inline), while the
plan's timing model overlaps them with compute and counts only what a wait exposes. The last
lines give the median and the largest |error| of step time and device peak over the cases (and,
on the CPU, of the prediction with every copy on the compute clock: predicted - exposed + copy). Timings are medians: on a shared machine, run it when the machine is quiet (calibrate
measures the fastest quarter of its samples, i.e. the machine without its neighbours);
``--stat fast`` reports the median of the fastest quarter of the steps instead, the same
statistic as calibrate's, for a machine that cannot be had quiet (use --repeats 20 or more).

On the CPU, denormal floats are flushed to zero (``torch.set_flush_denormal``) unless
``--keep-denormals``: at initialization tiny-transformer's logit gradients are ~37% denormal (its
softmax puts probabilities below 1e-38), and an x86 matmul on denormal operands runs some 300x
slower (microcode assists), in eager mode as in the planned program. That is the data, not the
shapes a cost model prices; flushing measures the machine. Both modes compute the same step
otherwise.

``--baselines`` (GPU): rows for eager and for the checkpoint baseline (every repeated block, each
element of every nn.ModuleList, or each layer of the top-level nn.Sequential, under
``torch.utils.checkpoint``), and tierplan planned with the checkpoint baseline's measured peak as
its budget ("@ckpt" rows), so the two step times compare at an equal peak.

``--arena``: every plan is also compiled with ``arena=True``; its row ("arena") predicts the plan's
device peak and step time and measures both the same way (each call allocates its arena,
gradients included); the method column gives the arena's size and the peak of what the program
allocates outside it.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import statistics
import time
from dataclasses import dataclass

import torch

from tierplan.api import plan_graph
from tierplan.codegen.measure import StorageTracker
from tierplan.compile import compile_plan, measured_op_times
from tierplan.passes.capture import capture
from tierplan.plans.plan import DEVICE, InfeasibleBudget
from tierplan.units import format_bytes


def _loss(out):
    return out if isinstance(out, torch.Tensor) else out.loss


def measure_cpu(compiled, args, kwargs) -> int:
    """Device peak of one step of ``compiled`` on the CPU, by the storage tracker."""
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
        loss = _loss(compiled(*args, **kwargs))
    loss.backward()
    return tracker.peak_bytes


def measure_cuda_peak(fn, zero) -> int:
    """Peak bytes allocated on the device during ``fn``, from a state with no gradients
    (``zero``), so the peak is comparable with the plan's device peak."""
    zero()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def step_seconds(fn, zero, *, repeats: int, warmup: int, cuda: bool, stat: str = "median") -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` calls (``stat="fast"``:
    the median of the fastest quarter); ``zero`` runs before each call, outside the timed region."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        zero()
        fn()
    times = []
    for _ in range(repeats):
        zero()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    if stat == "fast":
        times = sorted(times)[: max(1, len(times) // 4)]
    return statistics.median(times)


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


@dataclass
class Row:
    model: str
    budget: str
    method: str
    copies: int | None = None
    copy_s: float | None = None
    exposed_s: float | None = None
    pred_peak: int | None = None
    meas_peak: int | None = None
    pred_s: float | None = None
    meas_s: float | None = None

    @property
    def peak_error(self) -> float | None:
        if self.pred_peak is None or not self.meas_peak:
            return None
        return self.pred_peak / self.meas_peak - 1

    @property
    def time_error(self) -> float | None:
        if self.pred_s is None or not self.meas_s:
            return None
        return self.pred_s / self.meas_s - 1

    @property
    def blocking_error(self) -> float | None:
        """The error if every copy were on the compute clock (an inline copy is)."""
        if self.pred_s is None or not self.meas_s or self.copy_s is None:
            return None
        return (self.pred_s - (self.exposed_s or 0.0) + self.copy_s) / self.meas_s - 1

    def render(self) -> str:
        def b(x):
            return format_bytes(x) if x is not None else ""

        def ms(x):
            return f"{x * 1e3:.3f}" if x is not None else ""

        def pct(x):
            return f"{100 * x:+.1f}%" if x is not None else ""

        copies = "" if self.copies is None else str(self.copies)
        return (f"{self.model:17} {self.budget:>6} {self.method[:22]:22} {copies:>6} {ms(self.copy_s):>8} "
                f"{b(self.pred_peak):>10} {b(self.meas_peak):>10} {pct(self.peak_error):>7} {ms(self.pred_s):>9} "
                f"{ms(self.meas_s):>9} {pct(self.time_error):>7}")


HEADER = (f"{'model':17} {'budget':>6} {'method':22} {'copies':>6} {'copy ms':>8} {'pred peak':>10} "
          f"{'meas peak':>10} {'error':>7} {'pred ms':>9} {'meas ms':>9} {'error':>7}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hardware", default=None,
                    help="preset name or hardware TOML (tierplan calibrate --out); default cpu / h100-sxm")
    ap.add_argument("--models", default="mlp,cnn,tiny-transformer,gpt2-tiny,llama-tiny,bert-tiny")
    ap.add_argument("--budgets", default="1.0,0.6")
    ap.add_argument("--tiers", default="host")
    ap.add_argument("--repeats", type=int, default=9, help="timed steps per case (the median is used)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    ap.add_argument("--rounds", type=int, default=3, help="CPU: rounds over the cases the repeats are split in")
    ap.add_argument("--time-limit", type=float, default=2.0, help="planner time limit per case, s")
    ap.add_argument("--stat", choices=("median", "fast"), default="median",
                    help="step time: the median, or the median of the fastest quarter (a shared machine)")
    ap.add_argument("--op-times", choices=("roofline", "measured"), default="measured",
                    help="price ops by timing each op of the graph here (tierplan.cost_models.measured, as "
                         "compile(op_times='measured')), or by the hardware's roofline")
    ap.add_argument("--keep-denormals", action="store_true", help="CPU: do not flush denormals to zero")
    ap.add_argument("--arena", action="store_true", help="also run every plan as an arena program")
    ap.add_argument("--baselines", action="store_true", help="GPU: eager and checkpoint rows, @ckpt budgets")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    hardware = a.hardware or ("h100-sxm" if cuda else "cpu")
    tiers = tuple(t for t in a.tiers.split(",") if t)
    flush = not cuda and not a.keep_denormals
    if flush:
        torch.set_flush_denormal(True)
    what = "median" if a.stat == "median" else "median of the fastest quarter"
    print(f"device {device}, hardware {hardware}, op times {a.op_times}, tiers {tiers or '(none)'}, torch threads "
          f"{torch.get_num_threads()}{', denormals flushed' if flush else ''}; step time = {what} of "
          f"{a.repeats} after {a.warmup} warm-up steps")
    print(HEADER)
    rows: list[Row] = []
    timed: list[tuple[Row, object, object]] = []  # CPU: (row, step, zero) timed in rounds at the end
    for name in a.models.split(","):
        model, args, kwargs = load_case(name, cuda)
        if name != "cnn":
            model.eval()  # no dropout: the planned and eager steps compute the same thing
        model.to(device)
        args = tuple(x.to(device) for x in args)
        kwargs = {k: v.to(device) for k, v in kwargs.items()}
        captured = capture(model, args, example_kwargs=kwargs)
        zero = functools.partial(model.zero_grad, set_to_none=True)
        # As compile(op_times="measured") times them (the runtime's allocator set first).
        op_times = measured_op_times(model, captured, args, kwargs, device) if a.op_times == "measured" else None

        def eager():
            _loss(model(*args, **kwargs)).backward()

        budgets: list[tuple[str, object]] = [(f"{float(b):.2f}", float(b)) for b in a.budgets.split(",")]
        if cuda and a.baselines:
            eager_peak = measure_cuda_peak(eager, zero)
            t_e = step_seconds(eager, zero, repeats=a.repeats, warmup=a.warmup, cuda=True, stat=a.stat)
            print(Row(name, "eager", "torch eager", meas_peak=eager_peak, meas_s=t_e).render())
            with checkpointed(model) as n_blocks:
                ckpt_peak = measure_cuda_peak(eager, zero)
                t_ckpt = step_seconds(eager, zero, repeats=a.repeats, warmup=a.warmup, cuda=True, stat=a.stat)
            print(Row(name, "ckpt", f"checkpoint x{n_blocks} blocks", meas_peak=ckpt_peak, meas_s=t_ckpt).render())
            budgets.append(("@ckpt", int(ckpt_peak)))
        for label, budget in budgets:
            try:
                # The program's forward and backward, as before the optimizer step was planned
                # (bench/offload.py measures the step with its update).
                plan = plan_graph(captured.graph, hardware=hardware, memory_budget=budget, tiers=tiers,
                                  time_limit=a.time_limit, optimizer="none", op_times=op_times)
            except InfeasibleBudget as exc:
                print(f"{name:17} {label:>6} infeasible (smallest feasible "
                      f"{format_bytes(exc.min_feasible_bytes or 0)})", flush=True)
                continue
            variants = [(label, False)] + ([("arena", True)] if a.arena else [])
            for row_label, arena in variants:
                compiled = compile_plan(model, captured, plan, device=device, arena=arena)
                method = plan.method.split(" (")[0]
                if arena:
                    layout = compiled.program.arena
                    method = f"arena {format_bytes(layout.arena_bytes)} +{format_bytes(layout.outside_peak_bytes)}"
                row = Row(name, row_label, method, copies=_copies(plan), copy_s=_copy_seconds(plan),
                          exposed_s=plan.exposed_transfer_s, pred_peak=plan.peak_bytes[DEVICE],
                          pred_s=plan.predicted_time_s)
                rows.append(row)
                if cuda:
                    row.meas_peak, row.meas_s = _measure(compiled, model, device, args, kwargs, zero, a)
                    model.zero_grad(set_to_none=True)
                    print(row.render(), flush=True)
                else:
                    zero()
                    row.meas_peak = measure_cpu(compiled, args, kwargs)
                    step = _step_of(compiled, args, kwargs)
                    for _ in range(a.warmup):
                        zero()
                        step()
                    timed.append((row, step, zero))
    if timed:
        _time_in_rounds(timed, repeats=a.repeats, rounds=a.rounds, stat=a.stat)
        for row in rows:
            print(row.render())
    print(summary(rows, blocking=not cuda))


def _step_of(compiled, args, kwargs):
    def step():
        _loss(compiled(*args, **kwargs)).backward()

    return step


def _time_in_rounds(cases, *, repeats: int, rounds: int, stat: str) -> None:
    """Each case's ``meas_s``: ``repeats`` timed steps taken in ``rounds`` rounds over the cases."""
    rounds = max(1, min(rounds, repeats))
    samples: list[list[float]] = [[] for _ in cases]
    for r in range(rounds):
        per_round = repeats // rounds + (1 if r < repeats % rounds else 0)
        for (row, step, zero), times in zip(cases, samples):
            zero()
            step()  # untimed: the caches after another case's steps
            for _ in range(per_round):
                zero()
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            zero()
    for (row, _, _), times in zip(cases, samples):
        if stat == "fast":
            times = sorted(times)[: max(1, len(times) // 4)]
        row.meas_s = statistics.median(times)


def summary(rows: list[Row], *, blocking: bool = False) -> str:
    times = [abs(r.time_error) for r in rows if r.time_error is not None]
    peaks = [abs(r.peak_error) for r in rows if r.peak_error is not None]
    lines = []
    if times:
        lines.append(f"step time |pred/meas - 1| over {len(times)} cases: median {100 * statistics.median(times):.1f}%, "
                     f"max {100 * max(times):.1f}%")
    blocked = [abs(r.blocking_error) for r in rows if r.blocking_error is not None]
    if blocking and blocked:
        lines.append(f"  with every copy on the compute clock (not the plan's model): median "
                     f"{100 * statistics.median(blocked):.1f}%, max {100 * max(blocked):.1f}%")
    if peaks:
        lines.append(f"device peak |pred/meas - 1| over {len(peaks)} cases: median "
                     f"{100 * statistics.median(peaks):.1f}%, max {100 * max(peaks):.1f}%")
    return "\n".join(lines)


def _copies(plan) -> int:
    return sum(1 for s in plan.schedule if s.kind.value == "start_transfer")


def _copy_seconds(plan) -> float:
    """Seconds of all the plan's copies on their channels."""
    total = 0.0
    for s in plan.schedule:
        if s.kind.value == "start_transfer":
            nbytes = plan.graph.tensors[plan.graph.tensors[s.tensor].storage].nbytes
            total += plan.channel(s.src, s.dst).seconds(nbytes)
    return total


def _measure(compiled, model, device, args, kwargs, zero, a) -> tuple[int, float]:
    """(device peak of one step, median step time) of ``compiled``."""
    cuda = device.type == "cuda"

    def step():
        _loss(compiled(*args, **kwargs)).backward()

    if cuda:
        peak = measure_cuda_peak(step, zero)
    else:
        zero()
        peak = measure_cpu(compiled, args, kwargs)
    seconds = step_seconds(step, zero, repeats=a.repeats, warmup=a.warmup, cuda=cuda, stat=a.stat)
    if cuda:
        _restore_devices(model, device)
    return peak, seconds


def _restore_devices(model: torch.nn.Module, device: torch.device) -> None:
    """compile_plan moves parameters a plan starts on the host to pinned host memory; the next
    budget's plan starts from the model on the device again."""
    for p in [*model.parameters(), *model.buffers()]:
        if p.device != device:
            p.data = p.data.to(device)


def load_case(name: str, cuda: bool):
    """The model and inputs of a case: the zoo's defaults on a GPU, small batches on the CPU."""
    from tierplan.zoo import load_model

    if cuda:
        return load_model(name, batch_size=None, seq_len=None)
    sizes = {"mlp": (8, 1), "cnn": (4, 16), "tiny-transformer": (2, 32)}
    batch, seq = sizes.get(name, (2, 32))
    return load_model(name, batch_size=batch, seq_len=seq)


if __name__ == "__main__":
    main()
