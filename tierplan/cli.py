"""The ``tierplan`` command line.

Every error a user can cause (an unknown model or machine, a bad budget, an unreadable file) is
printed as one line with what to do, and the exit code is 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

USAGE_ERROR = 2


class UsageError(Exception):
    """A mistake in what the user asked for; printed as one line."""


def _user_errors() -> tuple[type[BaseException], ...]:
    # Imported lazily: `tierplan --help` should not pay for importing torch.
    from tierplan.cost_models.hardware import HardwareError
    from tierplan.ir import GraphError
    from tierplan.passes.capture import CaptureError
    from tierplan.planner.buffers import PackingError
    from tierplan.planner.plan import PlanError
    from tierplan.zoo import ZooError

    return (UsageError, HardwareError, GraphError, CaptureError, PackingError, PlanError, ZooError)


# -- commands ------------------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> None:
    from tierplan.api import plan_graph
    from tierplan.passes.capture import capture
    from tierplan.report.text import plan_report
    from tierplan.zoo import load_model

    tiers = tuple(t for t in args.tiers.split(",") if t)
    budget = _budget_arg(args.budget)
    started = time.perf_counter()
    _status(args, f"capturing {args.model} ({'training' if args.training else 'inference'}) on fake tensors")
    model, example_args, example_kwargs = load_model(
        args.model, batch_size=args.batch_size, seq_len=args.seq_len, training=args.training, fake=True
    )
    captured = capture(model, example_args, example_kwargs=example_kwargs, training=args.training)
    captured_s = time.perf_counter() - started
    _status(args, f"captured {len(captured.graph.ops)} ops in {captured_s:.1f} s; planning")
    result = plan_graph(
        captured.graph, hardware=args.hardware, memory_budget=budget, training=args.training,
        tiers=tiers, time_limit=args.time_limit,
    )
    print(plan_report(result))
    if args.json:
        result.to_json(args.json)
        print(f"plan written to {args.json}")


def cmd_show(args: argparse.Namespace) -> None:
    from tierplan.planner.plan import Plan
    from tierplan.report.text import plan_report

    print(plan_report(Plan.from_json(args.plan)))


def cmd_explain(args: argparse.Namespace) -> None:
    from tierplan.planner.plan import Plan

    print(Plan.from_json(args.plan).explain(args.tensor))


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
    from tierplan.cost_models.calibrate import calibrate, write_hardware_toml
    from tierplan.cost_models.hardware import describe_hardware

    hw = calibrate(device=args.device, quick=args.quick)
    write_hardware_toml(hw, args.out)
    print(describe_hardware(hw))
    print(f"hardware file written to {args.out}; use it with --hardware {args.out}")


def cmd_pack(args: argparse.Namespace) -> None:
    from tierplan.planner.buffers import pack_command

    capacity = _budget_arg(args.capacity) if args.capacity else None
    print(pack_command(args.csv, capacity, args.time_limit, args.out))


def cmd_remat(args: argparse.Namespace) -> None:
    from tierplan.planner.abstract import remat_command
    from tierplan.units import parse_bytes

    try:
        budget = parse_bytes(args.budget, setting="--budget")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(remat_command(args.graph, budget, args.time_limit, args.json))


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


def _status(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"[tierplan] {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tierplan",
        description="Plan where every tensor of a PyTorch model lives across memory tiers.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="capture a model and print its plan")
    p.add_argument("model", help="a zoo name (gpt2, llama-7b, bert-base, ...) or path/to/file.py:factory")
    p.add_argument("--hardware", default="h100-sxm", help="a preset name or a hardware TOML file")
    p.add_argument("--budget", help="device memory budget: bytes, a size (6GiB, 500MB) or a fraction (0.5)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--training", dest="training", action="store_true", default=True)
    mode.add_argument("--inference", dest="training", action="store_false")
    p.add_argument("--tiers", default="host", help="slower tiers the plan may use, e.g. host,nvme")
    p.add_argument("--time-limit", type=float, default=None, help="solver time limit in seconds")
    p.add_argument("--json", type=Path, help="write the plan to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(run=cmd_plan)

    p = sub.add_parser("show", help="print a saved plan")
    p.add_argument("plan", type=Path)
    p.set_defaults(run=cmd_show)

    p = sub.add_parser("explain", help="say why a tensor of a saved plan was kept, recomputed or swapped")
    p.add_argument("plan", type=Path)
    p.add_argument("tensor")
    p.set_defaults(run=cmd_explain)

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
    p.add_argument("graph", type=Path, help="networkx node-link JSON: nodes {id, name, backward, cost_cpu, cost_ram}")
    p.add_argument("--budget", required=True, help="memory budget in bytes (or a size such as 64MiB)")
    p.add_argument("--time-limit", type=float, default=None)
    p.add_argument("--json", type=Path, help="write the schedule and figures here")
    p.set_defaults(run=cmd_remat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        run(args)
    except KeyboardInterrupt:
        print("tierplan: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug or not isinstance(exc, _user_errors() + (OSError,)):
            raise
        print(f"tierplan: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
