"""The ``tierplan`` command line.

Every error a user can cause (an unknown model or machine, a bad budget or option, an unreadable
file, an exception raised by the user's own model file, factory or forward) is printed as one
line with what to do, and the exit code is 2; ``--debug`` shows the traceback. Progress goes to
stderr: a spinner when stderr is a terminal, plain ``[tierplan]`` lines when it is not (logs),
nothing with ``--quiet``.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from tierplan.placement.solve import DEFAULT_TIME_LIMIT_S
from tierplan.plans.update import OPTIMIZERS, PRECISIONS

if TYPE_CHECKING:
    from tierplan.plans.plan import Plan

USAGE_ERROR = 2
INTERNAL_ERROR = 1  # a bug, not a usage error
_IMAGE_SUFFIXES = (".png", ".svg", ".pdf")


class UsageError(Exception):
    """A mistake in what the user asked for; printed as one line."""


def _user_errors() -> tuple[type[BaseException], ...]:
    # Imported here, not at the top, so that `tierplan.cli` stays cheap to import for tools.
    from tierplan.cost_models.hardware import HardwareError
    from tierplan.ir import GraphError
    from tierplan.passes.capture import CaptureError
    from tierplan.packing.pack import PackingError
    from tierplan.plans.plan import PlanError
    from tierplan.zoo import ZooError

    return (UsageError, HardwareError, GraphError, CaptureError, PackingError, PlanError, ZooError)


# -- progress ------------------------------------------------------------------------------------


class Progress:
    """Progress on stderr: a rich spinner with the elapsed time on a terminal, plain lines in
    logs, nothing when quiet. ``with progress.phase("capturing x") as done: ...; done.note = "..."``
    ends the phase with that note and its duration."""

    class _Phase:
        note: str | None = None

    def __init__(self, *, quiet: bool, stream: Any = None) -> None:
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def line(self, message: str) -> None:
        if not self.quiet:
            print(f"[tierplan] {message}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def phase(self, message: str) -> Iterator[Progress._Phase]:
        phase = Progress._Phase()
        started = time.perf_counter()
        if self.quiet:
            yield phase
            return
        if self.tty:
            from rich.console import Console
            from rich.progress import Progress as RichProgress
            from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

            console = Console(file=self.stream)
            with RichProgress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                              console=console, transient=True) as bar:
                bar.add_task(message, total=None)
                yield phase
        else:
            self.line(f"{message} ...")
            yield phase
        elapsed = time.perf_counter() - started
        self.line(f"{phase.note or message + ': done'} ({elapsed:.1f} s)")


# -- commands ------------------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep library chatter out of the report
    _check_outputs(args)
    from tierplan.api import autocast_dtype, in_precision, model_dtype, plan_graph
    from tierplan.plans.plan import PlanError
    from tierplan.cost_models.hardware import load_hardware
    from tierplan.passes.capture import capture
    from tierplan.zoo import load_model

    progress = Progress(quiet=args.quiet)
    tiers = tuple(t.strip() for t in args.tiers.split(",") if t.strip())
    budget = _budget_arg(args.budget)
    # Everything that can be checked without the model is checked before the long capture.
    hardware = load_hardware(args.hardware)
    if getattr(args, "host_memory", None):
        from tierplan.units import parse_bytes

        try:
            hardware = hardware.with_tier_capacity("host", parse_bytes(args.host_memory, setting="--host-memory"))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if args.generate is not None:
        if args.reorder:
            raise UsageError("--reorder orders the ops of a captured graph; --generate plans a decoder's layers, "
                             "not a graph: drop one of them")
        if args.update_in_backward:
            raise UsageError("--update-in-backward overlaps a training step's optimizer update with its backward; "
                             "--generate plans inference: drop one of them")
        _plan_generation(args, hardware, tiers, budget, progress)
        return
    if args.prompt_len is not None or args.attention is not None:
        raise UsageError("--prompt-len and --attention are for generation: give --generate N too")
    _check_plan_settings(args, hardware, tiers, budget)
    mode = "training" if args.training else "inference"
    with progress.phase(f"capturing {args.model} ({mode}) on fake tensors") as done:
        model, example_args, example_kwargs = load_model(
            args.model, batch_size=args.batch_size, seq_len=args.seq_len, training=args.training, fake=True
        )
        try:
            model, example_args, example_kwargs, optimizer, precision = in_precision(
                model, example_args, example_kwargs, optimizer=args.optimizer, precision=args.precision,
                training=args.training)
        except PlanError as exc:
            raise UsageError(str(exc)) from None
        try:
            captured = capture(model, example_args, example_kwargs=example_kwargs, training=args.training,
                               target=hardware,  # the hardware's kernels (a GPU's fused attention)
                               autocast=autocast_dtype(precision, model_dtype(model)))
        except Exception as exc:
            _blame_user_model(exc, args.model)
            raise
        done.note = f"captured {args.model}: {len(captured.graph.ops):,} ops"
    limit = DEFAULT_TIME_LIMIT_S if args.time_limit is None else args.time_limit
    with progress.phase(f"planning on {hardware.name} (solver time limit {limit:g} s)") as done:
        result = plan_graph(
            captured.graph, hardware=hardware, memory_budget=budget, training=args.training,
            tiers=tiers, time_limit=limit, optimizer=optimizer or "none", precision=precision,
            reorder=args.reorder, update_in_backward=args.update_in_backward,
        )
        done.note = f"planned: {result.method.split(' (')[0]}"
    emitted = None
    if getattr(args, "emit", None):
        from tierplan.codegen.emit import emit

        with progress.phase(f"generating the module source into {args.emit}") as done:
            program = emit(result, captured.joint, title=f"{result.graph.name}: {result.method}")
            args.emit.mkdir(parents=True, exist_ok=True)
            emitted = args.emit / f"{_identifier(result.graph.name)}_plan.py"
            emitted.write_text(program.source)
            done.note = f"wrote {emitted}"
    _report(result, args, progress, hardware_description=hardware.description, emitted=emitted)


def _plan_generation(args: argparse.Namespace, hardware: Any, tiers: tuple[str, ...], budget: Any,
                     progress: Progress) -> None:
    """``tierplan plan MODEL --generate N --prompt-len P --batch-size B``: the generation plan,
    why, and (``--compare``) the baselines beside it."""
    from tierplan.generate import generation_baselines, generation_shape, plan_for
    from tierplan.units import format_bytes
    from tierplan.passes.decoder import DecoderError
    from tierplan.plans.plan import PlanError
    from tierplan.zoo import load_model

    for option in ("generate", "prompt_len", "batch_size"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UsageError(f"--{option.replace('_', '-')} {value}: give a positive number")
    if args.seq_len is not None:
        raise UsageError("--seq-len is for training and inference plans; generation takes --prompt-len")
    if args.emit is not None:
        raise UsageError("--emit writes a training or inference program; a generation plan runs with "
                         "tierplan.compile(model, example_inputs, generate=True)")
    prompt, batch = args.prompt_len or 512, args.batch_size or 1
    with progress.phase(f"reading {args.model} on the meta device") as done:
        try:
            model, _, _ = load_model(args.model, batch_size=1, seq_len=1, training=False, fake=True)
            shape = generation_shape(model, batch=batch, prompt_len=prompt, new_tokens=args.generate,
                                     name=args.model)
        except (DecoderError, PlanError) as exc:
            raise UsageError(str(exc)) from None
        except Exception as exc:
            _blame_user_model(exc, args.model)
            raise
        done.note = f"{shape.layers} layers, {format_bytes(shape.weight_bytes)} of weights"
    limit = DEFAULT_TIME_LIMIT_S if args.time_limit is None else args.time_limit
    with progress.phase(f"planning generation on {hardware.name} (time limit {limit:g} s)") as done:
        try:
            plan = plan_for(shape, hardware=hardware, memory_budget=budget, tiers=tiers, time_limit=limit,
                            attention=args.attention)
        except PlanError as exc:
            raise UsageError(str(exc)) from None
        done.note = f"{plan.candidates} policies priced in {plan.solve_s:.1f} s"
    print(plan.explain())
    if args.compare:
        from tierplan.report.generation import generation_compare_report

        with progress.phase("pricing the baselines (all-on-device, layer-streaming, flexgen)"):
            found = generation_baselines(plan)
        print()
        print(generation_compare_report(plan, found, width=_width()))
    if args.json:
        plan.save(args.json)
    if args.trace:
        from tierplan.report.generation import write_generation_trace

        write_generation_trace(plan, args.trace)
    if args.plot:
        from tierplan.report.generation import plot_generation

        plot_generation(plan, args.plot)
    written = [f"{what} {path}" for what, path in (("plan", args.json), ("trace", args.trace), ("plot", args.plot))
               if path]
    if written:
        print("\nwrote " + ", ".join(written))


def cmd_show(args: argparse.Namespace) -> None:
    from tierplan.plans.plan import Plan

    _check_outputs(args)
    plan = Plan.from_json(args.plan)
    _report(plan, args, Progress(quiet=args.quiet), hardware_description=_describe(plan.hardware))


def cmd_explain(args: argparse.Namespace) -> None:
    from tierplan.plans.plan import Plan

    plan = Plan.from_json(args.plan)
    print(plan.explain(_tensor_name(plan, args.tensor, args.plan)))


def cmd_whatif(args: argparse.Namespace) -> None:
    from tierplan.cli.whatif import whatif_command
    from tierplan.parallel.types import LayoutError, parse_layout

    machines = [h.strip() for h in args.hardware.split(",") if h.strip()]
    try:
        gpus = [int(g) for g in args.gpus.split(",") if g.strip()]
    except ValueError:
        raise UsageError(f"--gpus {args.gpus!r}: give comma-separated GPU counts, e.g. 8,64") from None
    if not machines or not gpus or min(gpus) < 1:
        raise UsageError("whatif needs at least one --hardware name and positive --gpus counts, e.g. "
                         "--hardware h100-sxm,a100-80gb-sxm --gpus 8,64")
    if args.json is not None and not args.json.parent.is_dir():
        raise UsageError(f"--json {args.json}: directory {args.json.parent} does not exist; create it first")
    for option in ("seq_len", "global_batch"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UsageError(f"--{option.replace('_', '-')} {value}: give a positive number")
    if args.serve and args.global_batch is not None:
        raise UsageError("--global-batch is for training; serving decodes as many sequences as fit "
                         "(fix it with --layout \"batchN\")")  # fmt: skip
    layout = None
    if args.layout is not None:
        try:  # before the profile: a typo costs no capture
            layout = parse_layout(args.layout, serve=args.serve)
        except LayoutError as exc:
            raise UsageError(str(exc)) from None
    try:
        text = whatif_command(args.model, machines, gpus, args.serve, args.json, seq_len=args.seq_len,
                              global_batch=args.global_batch, precision=args.precision, layout=layout)  # fmt: skip
    except Exception as exc:
        _blame_user_model(exc, args.model)  # the model file's own error, said as one
        raise
    print(text)


def cmd_hardware(args: argparse.Namespace) -> None:
    from tierplan.cost_models.hardware import describe_hardware, list_presets, load_hardware

    if args.action == "list":
        for name in list_presets():
            print(f"{name:20s} {load_hardware(name).description}")
        return
    if not args.name:
        raise UsageError("`tierplan hardware show` needs a preset name or a TOML file path")
    print(describe_hardware(load_hardware(args.name)))


def cmd_calibrate(args: argparse.Namespace) -> None:
    from tierplan.cost_models.calibrate import CalibrationWarning, calibrate, write_hardware_toml
    from tierplan.cost_models.hardware import describe_hardware

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        hw = calibrate(device=args.device, quick=args.quick)
    write_hardware_toml(hw, args.out)
    print(describe_hardware(hw))
    print(f"hardware file written to {args.out}; use it with --hardware {args.out}")
    for w in caught:  # after the table, where it is read (the file's sources say it too)
        print(f"tierplan: warning: {w.message}", file=sys.stderr)


def cmd_pack(args: argparse.Namespace) -> None:
    from tierplan.cli.pack import pack_command

    capacity = _budget_arg(args.capacity) if args.capacity else None
    print(pack_command(args.csv, capacity, args.time_limit, args.out))


def cmd_remat(args: argparse.Namespace) -> None:
    from tierplan.cli.remat import remat_command
    from tierplan.units import parse_bytes

    try:
        budget = parse_bytes(args.budget, setting="--budget")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(remat_command(args.graph, budget, args.time_limit, args.json, reorder=args.reorder))


# -- shared by plan and show ---------------------------------------------------------------------


def _report(plan: Plan, args: argparse.Namespace, progress: Progress, *, hardware_description: str | None,
            emitted: Path | None = None) -> None:
    from tierplan.report.text import compare_report, plan_report

    width = _width()
    print(plan_report(plan, hardware_description=hardware_description, width=width))
    baselines: dict[str, Plan] = {}
    if args.compare and plan.update is not None:
        from tierplan.api import baselines as step_baselines
        from tierplan.report.text import step_compare_report

        with progress.phase("pricing the baselines (keep-all, checkpoint-blocks, swap-all, zero-offload, "
                            "zero-infinity)"):
            found = step_baselines(plan)
        baselines = {name: p for name, p in found.items() if p is not None}
        print()
        print(step_compare_report(plan, found, found.reasons, width=width))
    elif args.compare:
        with progress.phase("pricing the baselines (keep-all, checkpoint-blocks, swap-all)"):
            baselines = _baselines(plan)
        print()
        print(compare_report(plan, baselines, width=width))
    written = []
    if args.json:
        plan.to_json(args.json)
        written.append(f"plan {args.json}")
    if args.plot:
        from tierplan.report.plot import plot_memory

        with progress.phase(f"drawing the memory timeline to {args.plot}"):
            reference = baselines.get("keep-all") or _keep_all(plan)
            plot_memory(plan, args.plot, reference=reference)
        written.append(f"memory timeline {args.plot}")
    if args.trace:
        from tierplan.report.trace import write_trace

        write_trace(plan, args.trace)
        written.append(f"trace {args.trace} (open it in https://ui.perfetto.dev)")
    if emitted is not None:
        written.append(f"generated module {emitted}")
    if written:
        print()
        print("written: " + "; ".join(written))


def _keep_all(plan: Plan) -> Plan:
    from tierplan.placement.keep_all import keep_all_plan

    return keep_all_plan(plan.graph, plan.pricing)


def _baselines(plan: Plan) -> dict[str, Plan]:
    from tierplan.placement.baselines import baseline_plans

    return baseline_plans(plan.graph, plan.pricing)


def _identifier(name: str) -> str:
    out = "".join(c.lower() if c.isalnum() else "_" for c in name).strip("_")
    return out or "model"


def _check_outputs(args: argparse.Namespace) -> None:
    """Fail before the long capture on output paths that cannot work."""
    for option in ("json", "plot", "trace", "emit"):
        path: Path | None = getattr(args, option, None)
        if path is None:
            continue
        if option == "plot" and path.suffix.lower() not in _IMAGE_SUFFIXES:
            raise UsageError(f"--plot {path}: give a file ending in {', '.join(_IMAGE_SUFFIXES)}")
        if option != "emit" and not path.parent.is_dir():
            raise UsageError(f"--{option} {path}: directory {path.parent} does not exist; create it first")


def _check_plan_settings(args: argparse.Namespace, hardware: Any, tiers: tuple[str, ...],
                         budget: float | str | None) -> None:
    """Fail before the long capture on settings that cannot work whatever the model: the tiers
    (against the machine's), the budget (its form, sign and the device memory; a fraction only
    needs the keep-all peak to be resolved, not to be checked), the solver time limit and the
    batch size and sequence length. The messages are those of the checks after capture."""
    import math

    from tierplan.api import resolve_budget
    from tierplan.placement.pricing import tier_capacities, transfer_channels
    from tierplan.plans.plan import DEVICE

    if args.time_limit is not None and not (math.isfinite(args.time_limit) and args.time_limit > 0):
        raise UsageError(f"--time-limit {args.time_limit:g}: give a positive number of seconds, e.g. 30")
    if args.update_in_backward and (not args.training or args.optimizer == "none"):
        raise UsageError("--update-in-backward overlaps the optimizer update with the backward: it needs a "
                         "training step with an optimizer (drop --inference / --optimizer none, or the option)")
    for option in ("batch_size", "seq_len"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UsageError(f"--{option.replace('_', '-')} {value}: give a positive number")
    capacities = tier_capacities(hardware, tiers)
    transfer_channels(hardware, tiers)  # every tier is reachable from the device
    if isinstance(budget, float) and 0.0 < budget <= 1.0:
        return  # a fraction of the keep-all peak: resolved once the model is captured
    resolve_budget(budget, keep_all_peak=0, device_bytes=capacities[DEVICE], hardware=hardware.name)


def _blame_user_model(exc: Exception, spec: str) -> None:
    """Raise a user error for an exception from capturing the model of ``path/to/file.py:factory``
    that the user's file raised (its forward, say), naming where in that file; return, for the
    caller to re-raise ``exc`` as it is, when it came from elsewhere (tierplan, or a zoo model)."""
    from tierplan.passes.capture import CaptureError
    from tierplan.zoo import UserCodeError

    path, sep, _ = spec.rpartition(":")
    if not sep or not path.endswith(".py"):
        return  # a zoo model: its code is tierplan's
    user_file = Path(path)
    # The capture wraps what the tracer raised in a CaptureError: look at what it wraps.
    inner = exc.__cause__ if isinstance(exc, CaptureError) and exc.__cause__ is not None else exc
    location = UserCodeError.location_in(inner, user_file)
    if location is None:
        return
    if UserCodeError.location_in(inner, user_file, innermost=True):
        # The model's own code raised it (a raise, an assert, a typo).
        raise UserCodeError(
            f"{spec}: the model's forward raised {UserCodeError.describe(inner)} at {location} "
            f"while tierplan captured it on fake tensors; fix the model, or rerun with --debug for "
            f"the traceback",
            location=location,
        ) from exc
    if isinstance(exc, CaptureError):  # the tracer failed on an op the model's code called
        raise CaptureError(f"{str(exc).rstrip()}; in the model's code at {location}") from exc
    if UserCodeError.raised_in_tierplan(inner):
        return  # tierplan's own code failed under the model's: a bug, not the user's doing
    raise UserCodeError(
        f"{spec}: capturing the model raised {UserCodeError.describe(inner)} in code called from "
        f"{location}; rerun with --debug for the traceback",
        location=location,
    ) from exc


def _tensor_name(plan: Plan, name: str, path: Path) -> str:
    """``name`` as a tensor of ``plan``: a graph name, or a parameter's module path
    (``transformer.h.0.attn.c_attn.weight``); otherwise a UsageError listing close names."""
    graph = plan.graph
    if name in graph.tensors:
        return name
    aliases: dict[str, str] = {}
    for table in ("param_names", "buffer_names", "input_names"):
        for tensor, alias in (graph.meta.get(table) or {}).items():
            aliases.setdefault(str(alias), tensor)
    if name in aliases and aliases[name] in graph.tensors:
        return aliases[name]
    close = difflib.get_close_matches(name, list(graph.tensors) + list(aliases), n=5, cutoff=0.6)
    hint = (f"close names: {', '.join(close)}" if close else
            f"it has {len(graph.tensors):,} tensors; `tierplan show {path}` lists the largest")
    raise UsageError(f"plan {path} has no tensor {name!r}; {hint}")


def _describe(hardware: str) -> str | None:
    try:
        from tierplan.cost_models.hardware import load_hardware

        return load_hardware(hardware).description
    except Exception:  # a saved plan may name a file that is gone: the report does without
        return None


def _width() -> int:
    if sys.stdout.isatty():
        import shutil

        return max(100, min(shutil.get_terminal_size().columns, 200))
    return 140


# -- parsing -------------------------------------------------------------------------------------


def _budget_arg(text: str | None) -> int | float | str | None:
    """'0.5' is a fraction, '123' bytes, anything else a size string parsed later."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as one-line UsageErrors instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _add_outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, help="write the plan to this JSON file")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="draw the memory timeline (bytes per tier by tensor kind, budget, keep-all)")
    p.add_argument("--trace", type=Path, metavar="FILE.json",
                   help="write a Chrome/Perfetto trace of the schedule (open in ui.perfetto.dev)")
    p.add_argument("--compare", action="store_true",
                   help="also price keep-all, checkpoint-blocks and swap-all with the same cost model")


REORDER_HELP = ("choose the op order too: plan the capture order and up to 3 memory-lowering orders "
                "(within data dependencies, phases and the order of random draws), keep the fastest plan")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tierplan",
        description="Plan where every tensor of a PyTorch model lives across memory tiers.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plan", help="capture a model and print its plan")
    p.add_argument("model", help="a zoo name (gpt2, llama-7b, bert-base, ...) or path/to/file.py:factory")
    p.add_argument("--hardware", default="h100-sxm", help="a preset name or a hardware TOML file")
    p.add_argument("--budget", help="device memory budget: bytes, a size (6GiB, 500MB) or a fraction (0.5)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--training", dest="training", action="store_true", default=True,
                      help="plan a whole training step (the default)")
    mode.add_argument("--inference", dest="training", action="store_false", help="plan the forward only")
    p.add_argument("--tiers", default="host", help="slower tiers the plan may use, e.g. host,nvme")
    p.add_argument("--optimizer", default="adamw", choices=[*OPTIMIZERS, "none"],
                   help="the optimizer step planned with a training step (none: forward and backward only)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="default: the model's (bf16 weights: bf16-mixed, fp32 master weights and states)")
    p.add_argument("--host-memory", default=None, metavar="SIZE",
                   help="host DRAM the plan may use, at most the hardware's (a bigger host: a hardware TOML)")
    p.add_argument("--time-limit", type=float, default=None,
                   help=f"solver time limit in seconds (default {DEFAULT_TIME_LIMIT_S:g})")
    p.add_argument("--generate", type=int, default=None, metavar="N",
                   help="plan greedy generation of N new tokens (weights and KV cache across tiers)")
    p.add_argument("--prompt-len", type=int, default=None, metavar="P",
                   help="with --generate: prompt tokens per sequence (default 512)")
    p.add_argument("--attention", choices=["device", "host"], default=None,
                   help="with --generate: where attention runs (default: the faster, searched)")
    p.add_argument("--reorder", action="store_true", help=REORDER_HELP)
    p.add_argument("--update-in-backward", action="store_true",
                   help="host optimizer updates start as the backward makes their gradients (ZeRO-Offload's "
                        "overlap; compile(update_in_backward=True) runs it)")
    _add_outputs(p)
    p.add_argument("--emit", type=Path, metavar="DIR",
                   help="write the generated Python module that runs the plan into this directory")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(run=cmd_plan)

    p = sub.add_parser("show", help="print a saved plan (and draw it)")
    p.add_argument("plan", type=Path)
    _add_outputs(p)
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(run=cmd_show)

    p = sub.add_parser("explain", help="say why a tensor of a saved plan was kept, recomputed or swapped")
    p.add_argument("plan", type=Path)
    p.add_argument("tensor", help="a tensor name from the plan, or a parameter's module path")
    p.set_defaults(run=cmd_explain)

    p = sub.add_parser("whatif", help="the best parallel plan of a model on several machines and GPU counts")
    p.add_argument("model", help="a zoo name (llama-70b, gpt2, ...), path/to/file.py:factory, or a "
                                 "transformers config.json (or the directory holding it)")
    p.add_argument("--hardware", required=True, help="comma-separated presets, e.g. h100-sxm,a100-80gb-sxm")
    p.add_argument("--gpus", required=True, help="comma-separated GPU counts, e.g. 8,64")
    p.add_argument("--serve", action="store_true", help="serving (tokens/s, TTFT, TPOT) instead of training")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (serving: the prompt); default: "
                                               "the zoo entry's, a config's position limit up to 4096")
    p.add_argument("--global-batch", type=int, help="training: sequences per step (default: ~4M tokens)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                   help="parameter bytes and compute dtype (default: the model's own)")
    p.add_argument("--layout", help='fix some fields of the plan, e.g. "dp1 tp8 pp8 mb1 sp"; the rest are '
                                    "searched; shown beside the best plan (grammar: docs/cli.md)")
    p.add_argument("--json", type=Path, help="write the rows to this JSON file")
    p.set_defaults(run=cmd_whatif)

    p = sub.add_parser("hardware", help="list the hardware presets or show one")
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("name", nargs="?")
    p.set_defaults(run=cmd_hardware)

    p = sub.add_parser("calibrate", help="measure this machine and write a hardware file")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", type=Path, default=Path("calibrated.toml"))
    p.add_argument("--quick", action="store_true", help="shorter measurements (less accurate)")
    p.set_defaults(run=cmd_calibrate)

    p = sub.add_parser("pack", help="pack buffers (MiniMalloc CSV: id,lower,upper,size) into one arena")
    p.add_argument("csv", type=Path)
    p.add_argument("--capacity", help="arena capacity in bytes (or a size such as 1MiB)")
    p.add_argument("--time-limit", type=float, default=10.0)
    p.add_argument("--out", type=Path, help="write the rows with an offset column here")
    p.set_defaults(run=cmd_pack)

    p = sub.add_parser("remat", help="plan recomputation for an abstract graph (Checkmate/Moccasin JSON)")
    p.add_argument("graph", type=Path, help="networkx node-link JSON: nodes {id, name, backward, cost_cpu, cost_ram} "
                   "(backward optional: without it any node may be recomputed); graph.order, when given, is the "
                   "op order (else Kahn's order over the file's listing)")
    p.add_argument("--budget", required=True, help="memory budget in bytes (or a size such as 64MiB)")
    p.add_argument("--time-limit", type=float, default=None)
    p.add_argument("--json", type=Path, help="write the schedule and figures here")
    p.add_argument("--reorder", action="store_true", help=REORDER_HELP)
    p.set_defaults(run=cmd_remat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    argv = [a for a in argv if a != "--debug"]
    try:
        args = build_parser().parse_args(argv)
        run: Callable[[argparse.Namespace], None] = args.run
        run(args)
    except BrokenPipeError:  # `tierplan ... | head`: the reader left; nothing to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("tierplan: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, _user_errors() + (OSError,)):
            print(f"tierplan: error: {_one_line(exc)}", file=sys.stderr)
            return USAGE_ERROR
        # Not the user's doing: a bug. Still one line, saying where, and how to see the rest.
        import traceback

        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.lineno}"
        print(f"tierplan: internal error: {type(exc).__name__}: {_one_line(exc)} at {where}; this is a "
              "bug in tierplan: rerun with --debug for the traceback and report it", file=sys.stderr)
        return INTERNAL_ERROR
    return 0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    least = getattr(exc, "min_feasible_bytes", None)  # InfeasibleBudget: say what would work
    if least:
        from tierplan.units import format_bytes

        text = text.rstrip(". ") + f"; give --budget {format_bytes(least)} or more, or a machine with more memory"
    return text


if __name__ == "__main__":
    sys.exit(main())
