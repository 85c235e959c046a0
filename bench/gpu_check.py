"""GPU self-check: the CUDA tests, a calibration and a fidelity table in one run of a few minutes.

    python bench/gpu_check.py                          # everything, within --budget-s (420 s)
    python bench/gpu_check.py --quick                  # fewer rows and repeats, within 180 s
    python bench/gpu_check.py --install-wheels .whl    # first pip install --no-index .whl/*.whl
    python bench/gpu_check.py --no-gpu                 # the no-GPU path (what CI sees)

It runs three stages and prints ONE table (also written to OUT/gpu_check.txt, with the rows as
OUT/gpu_check.json; OUT is --out, else $OUT, else a new temporary directory):

1. ``pytest -m cuda`` (a subprocess, log in OUT/pytest-cuda.log): passed/failed/skipped counts and
   the ids of the tests that failed;
2. ``tierplan calibrate --device cuda`` (a subprocess, writing OUT/calibrated-cuda.toml, log in
   OUT/calibrate.log): device memory bandwidth, host<->device bandwidths (one way and both ways),
   copy latency, launch overhead and matmul peaks, each beside the preset of that GPU;
3. fidelity rows for a few zoo models (gpt2-tiny, llama-tiny, and gpt2-8l: an 8-layer GPT-2 of
   768 hidden, 8192 vocabulary, batch 8 x 512 tokens, some tens of ms per step on an H100) planned on
   the calibrated hardware with ``tiers=("host",)`` at each --budgets fraction and at the measured
   peak of the checkpoint baseline ("=ckpt"): predicted vs measured device peak and step time,
   beside eager and ``torch.utils.checkpoint`` of every transformer block.

Measured device peak: ``torch.cuda.max_memory_allocated()`` over one step after
``reset_peak_memory_stats()``, gradients set to None first, minus what was allocated before the
step that is not the model's: the bytes of the model's parameters, buffers and inputs that are on
the device count (the plan counts them too), anything else (earlier models, the cuBLAS workspace)
does not. Step time: the median over --repeats steps after --warmup steps, each between
``torch.cuda.synchronize()`` calls. Errors are predicted / measured - 1, as bench/fidelity.py
gives them: +10% means the plan predicted 10% more than was measured.

Time budget: each stage gets at most what is left of --budget-s after a reserve for the later
stages; a fidelity row is only started when the time left covers its estimate, else the table
says it was skipped. Exit status: 0 when every stage ran and no CUDA test failed (and on the
no-GPU path), 1 when a test failed or a stage broke, 2 when a dependency is missing.

Without a GPU (or with --no-gpu) it prints a line saying so, then the table layout with dry-run
rows, and exits 0. The module imports only the standard library at the top, so that
--install-wheels runs before torch or tierplan is imported.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SITE = "/tmp/tierplan-site"
WHEELS_HINT = (
    "python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
    "--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 "
    "-d .whl ortools==9.15.6755 immutabledict==4.3.1 protobuf==6.33.6"
)
# What tierplan and the zoo models import beyond torch; the GPU image lacks ortools (and the
# immutabledict it needs).
REQUIRED_MODULES = ("ortools", "immutabledict", "networkx", "jinja2", "rich", "transformers")

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PEAK_TOLERANCE = 0.05  # the verdict row counts rows within these of the prediction
TIME_TOLERANCE = 0.20


# -- arguments -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModeDefaults:
    budget_s: float
    models: str
    repeats: int
    warmup: int
    time_limit: float
    pytest_s: float  # the most the pytest stage may take
    calibrate_s: float


FULL = ModeDefaults(420.0, "gpt2-tiny,llama-tiny,gpt2-8l", 10, 2, 4.0, 240.0, 150.0)
QUICK = ModeDefaults(180.0, "gpt2-tiny,gpt2-8l", 5, 1, 2.0, 150.0, 60.0)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="gpu_check", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true",
                    help=f"fewer models and repeats, calibrate --quick; budget {QUICK.budget_s:.0f} s")
    ap.add_argument("--budget-s", type=float, help=f"total time budget in seconds "
                    f"(default {FULL.budget_s:.0f}, --quick {QUICK.budget_s:.0f})")
    ap.add_argument("--out", type=Path, help="where the log, TOML and table files go "
                    "(default: $OUT, else a new temporary directory)")
    ap.add_argument("--install-wheels", type=Path, metavar="DIR",
                    help="pip install --no-index --no-deps DIR/*.whl into --site first (the GPU "
                         "machine has no ortools)")
    ap.add_argument("--site", type=Path, default=Path(DEFAULT_SITE),
                    help=f"target of --install-wheels (default {DEFAULT_SITE})")
    ap.add_argument("--models", help=f"comma-separated zoo names or gpt2-8l (default {FULL.models}; "
                    f"--quick {QUICK.models})")
    ap.add_argument("--budgets", default="1.0,0.6", help="memory budgets, fractions of keep-all")
    ap.add_argument("--tiers", default="host", help="tiers besides the device (comma-separated)")
    ap.add_argument("--no-ckpt-budget", action="store_true",
                    help="skip the rows planned at the checkpoint baseline's measured peak")
    ap.add_argument("--repeats", type=int, help="timed steps per row (median)")
    ap.add_argument("--warmup", type=int, help="untimed steps before them (at least 1 on a GPU)")
    ap.add_argument("--time-limit", type=float, help="planner time limit per plan, seconds")
    ap.add_argument("--hardware", help="preset to plan with when calibration is skipped or fails "
                    "(default: the preset of the GPU's name, else h100-sxm)")
    ap.add_argument("--skip-pytest", action="store_true")
    ap.add_argument("--skip-calibrate", action="store_true")
    ap.add_argument("--skip-fidelity", action="store_true")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: run the stages on the CPU at small shapes (checks the plumbing; "
                         "peaks by storage tracking, calibrate --device cpu)")
    ap.add_argument("--no-gpu", action="store_true",
                    help="take the no-GPU path even if there is a GPU: the dry-run table, exit 0")
    a = ap.parse_args(argv)
    mode = QUICK if a.quick else FULL
    for name in ("budget_s", "models", "repeats", "warmup", "time_limit"):
        if getattr(a, name) is None:
            setattr(a, name, getattr(mode, name))
    a.pytest_s, a.calibrate_s = mode.pytest_s, mode.calibrate_s
    if a.budget_s <= 0:
        ap.error("--budget-s must be positive")
    if a.repeats < 1 or a.warmup < 0:
        ap.error("--repeats must be at least 1 and --warmup at least 0")
    if a.device == "cuda" and a.warmup < 1:
        ap.error("--warmup must be at least 1 on a GPU (the first step allocates the cuBLAS workspace)")
    try:
        a.budget_list = [float(b) for b in a.budgets.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--budgets {a.budgets!r}: give fractions such as 1.0,0.6")
    if not a.budget_list or not all(0.0 < b <= 1.0 for b in a.budget_list):
        ap.error(f"--budgets {a.budgets!r}: each budget is a fraction in (0, 1]")
    a.model_list = [m.strip() for m in a.models.split(",") if m.strip()]
    a.tier_list = tuple(t.strip() for t in a.tiers.split(",") if t.strip())
    return a


# -- the time budget ----------------------------------------------------------------------------


class Deadline:
    """The run's time budget: what is left of ``total_s`` since it was made (``clock`` in
    seconds, replaceable for tests)."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.total_s = float(total_s)
        self.clock = clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return self.total_s - self.elapsed()

    def allows(self, estimate_s: float, reserve_s: float = 0.0) -> bool:
        """Whether work estimated at ``estimate_s`` fits, keeping ``reserve_s`` for what follows."""
        return self.remaining() - reserve_s >= estimate_s

    def timeout(self, want_s: float, reserve_s: float = 0.0, minimum_s: float = 10.0) -> float | None:
        """A stage's time limit: ``want_s``, cut to what is left after ``reserve_s``; None when
        that is under ``minimum_s`` (too little to be worth starting)."""
        t = min(want_s, self.remaining() - reserve_s)
        return t if t >= minimum_s else None


TABLE_RESERVE_S = 10.0  # printing, writing the files, freeing the GPU
MODEL_SETUP_S = {"gpt2-tiny": 10.0, "llama-tiny": 10.0, "gpt2-8l": 25.0}  # build, capture, eager, ckpt
DEFAULT_SETUP_S = 20.0
FIDELITY_MIN_S = 45.0  # kept for the fidelity stage when the earlier stages set their timeouts


def row_estimate_s(time_limit_s: float, step_s: float, repeats: int, warmup: int,
                   overhead_s: float = 3.0) -> float:
    """Seconds one planned row takes: planning (at most the planner's limit, plus the local search
    around it), code generation and loading, and the steps, each with its synchronizations and a
    gc pass, at twice the eager step time (a plan at a tight budget is slower)."""
    return 1.5 * time_limit_s + overhead_s + (repeats + warmup) * (2.0 * step_s + 0.01)


def model_estimate_s(name: str, time_limit_s: float, repeats: int, warmup: int) -> float:
    """Seconds before a model's first planned row is done: setup plus that row, before any step
    of the model has been timed."""
    return MODEL_SETUP_S.get(name, DEFAULT_SETUP_S) + row_estimate_s(time_limit_s, 0.05, repeats, warmup)


# -- the table ----------------------------------------------------------------------------------


@dataclass
class Row:
    """One measured configuration; None cells print empty."""

    model: str
    budget: str = ""
    policy: str = ""
    pred_peak: int | None = None
    meas_peak: int | None = None
    pred_s: float | None = None
    meas_s: float | None = None

    def peak_error(self) -> float | None:
        return prediction_error(self.pred_peak, self.meas_peak)

    def time_error(self) -> float | None:
        return prediction_error(self.pred_s, self.meas_s)


@dataclass
class Note:
    """A row whose text spans the columns after the first (pytest counts, calibrated figures,
    skipped rows, errors)."""

    label: str
    text: str


@dataclass
class Rule:
    """A separator line between the stages."""


Item = Row | Note | Rule
COLUMNS = ("model", "budget", "policy", "pred peak", "meas peak", "err", "pred ms", "meas ms", "err")
RIGHT = {1, 3, 4, 5, 6, 7, 8}  # right-aligned columns


def prediction_error(predicted: float | None, measured: float | None) -> float | None:
    """predicted / measured - 1, as bench/fidelity.py reports it: +10% predicts 10% more than
    was measured."""
    if measured is None or predicted is None or measured == 0:
        return None
    return predicted / measured - 1


def format_size(n: int | float | None) -> str:
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_ms(seconds: float | None) -> str:
    if seconds is None:
        return ""
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def format_error(err: float | None) -> str:
    return "" if err is None else f"{100 * err:+.1f}%"


def row_cells(row: Row) -> list[str]:
    return [row.model, row.budget, row.policy, format_size(row.pred_peak), format_size(row.meas_peak),
            format_error(row.peak_error()), format_ms(row.pred_s), format_ms(row.meas_s),
            format_error(row.time_error())]


def render_table(items: Sequence[Item], title: str = "") -> str:
    """The rows as one plain-text table: a header, the rows, rules between stages; a Note's text
    starts in the second column and may run past the last."""
    cells = [row_cells(r) for r in items if isinstance(r, Row)]
    widths = [len(c) for c in COLUMNS]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    for item in items:
        if isinstance(item, Note):
            widths[0] = max(widths[0], len(item.label))

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if i in RIGHT else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))]
        return " | ".join(parts).rstrip()

    full = sum(widths) + 3 * (len(widths) - 1)
    out = [title] if title else []
    out += [line(COLUMNS), "-" * full]
    rows = iter(cells)
    for item in items:
        if isinstance(item, Row):
            out.append(line(next(rows)))
        elif isinstance(item, Note):
            out.append(f"{item.label.ljust(widths[0])} | {item.text}".rstrip())
        else:
            out.append("-" * full)
    return "\n".join(out)


def verdict(items: Sequence[Item]) -> Note | None:
    """How many tierplan rows predicted their peak and time within the tolerances."""
    rows = [r for r in items if isinstance(r, Row) and r.pred_peak is not None and r.meas_peak is not None]
    if not rows:
        return None
    peak_ok = sum(abs(r.peak_error() or 0.0) <= PEAK_TOLERANCE for r in rows)
    timed = [r for r in rows if r.time_error() is not None]
    time_ok = sum(abs(r.time_error() or 0.0) <= TIME_TOLERANCE for r in timed)
    text = f"peak within {PEAK_TOLERANCE:.0%} in {peak_ok}/{len(rows)} planned rows"
    if timed:
        text += f", step time within {TIME_TOLERANCE:.0%} in {time_ok}/{len(timed)}"
    return Note("fidelity", text)


def dry_run_items() -> list[Item]:
    """The table's layout with illustrative figures (not measured): what the no-GPU path prints."""
    return [
        Note("pytest -m cuda", "not run (no GPU); on a GPU: N passed, N failed, N skipped in T s"),
        Rule(),
        Note("calibrate", "not run (no GPU); on a GPU: device memory bandwidth, h2d/d2h, latency, peaks"),
        Rule(),
        Row("gpt2-tiny", "eager", "torch eager", meas_peak=190 * MiB, meas_s=2.1e-3),
        Row("gpt2-tiny", "ckpt", "checkpoint x2 blocks", meas_peak=150 * MiB, meas_s=2.6e-3),
        Row("gpt2-tiny", "1.00", "tierplan keep-all", 219 * MiB, 221 * MiB, 1.31e-3, 1.52e-3),
        Row("gpt2-tiny", "0.60", "tierplan cp-sat r9 s8", 131 * MiB, 133 * MiB, 1.41e-3, 1.70e-3),
        Note("gpt2-8l", "skipped: 12 s left of the time budget, the model needs ~40 s"),
    ]


# -- pytest ---------------------------------------------------------------------------------------


@dataclass
class PytestResult:
    counts: dict[str, int] = field(default_factory=dict)  # passed, failed, skipped, error, ...
    failed: list[str] = field(default_factory=list)  # node ids that failed or errored
    finished: bool = False  # the closing summary line was seen
    seconds: float | None = None
    returncode: int | None = None

    def describe(self) -> str:
        order = ["passed", "failed", "error", "skipped", "xfailed", "xpassed", "deselected"]
        keys = order + sorted(k for k in self.counts if k not in order)
        shown = [f"{self.counts.get(k, 0)} {k}" for k in keys[:4]]
        shown += [f"{self.counts[k]} {k}" for k in keys[4:] if self.counts.get(k)]
        text = ", ".join(shown)
        if self.seconds is not None:
            text += f" in {self.seconds:.0f} s"
        if not self.finished:
            text += " (stopped before the end: time limit or crash; counts so far)"
        return text

    @property
    def ok(self) -> bool:
        return self.finished and not self.counts.get("failed") and not self.counts.get("error")


_OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_SUMMARY = re.compile(r"^=+ (.*\b(?:passed|failed|skipped|errors?|deselected|no tests ran)\b.*?) =+$")
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed|warnings?)")


def parse_pytest_output(text: str) -> PytestResult:
    """Counts from ``pytest -v`` output: the closing summary line when there is one, else the
    per-test outcome lines seen so far (a run cut off by its time limit)."""
    res = PytestResult()
    seen: dict[str, int] = {}
    for raw in text.splitlines():
        ln = raw.strip()
        m = _OUTCOME.match(ln)
        if m:
            nodeid, outcome = m.groups()
            key = {"XFAIL": "xfailed", "XPASS": "xpassed"}.get(outcome, outcome.lower())
            seen[key] = seen.get(key, 0) + 1
            if outcome in ("FAILED", "ERROR") and nodeid not in res.failed:
                res.failed.append(nodeid)
            continue
        m = _SUMMARY.match(ln)
        if m:
            res.finished = True
            res.counts = {}
            for n, what in _COUNT.findall(m.group(1)):
                what = {"errors": "error", "warnings": "warning"}.get(what, what)
                if what != "warning":
                    res.counts[what] = int(n)
            secs = re.search(r" in ([\d.]+)s", m.group(1))
            res.seconds = float(secs.group(1)) if secs else None
        elif ln.startswith(("FAILED ", "ERROR ")):  # the -ra short summary
            nodeid = ln.split()[1]
            if "::" in nodeid and nodeid not in res.failed:
                res.failed.append(nodeid)
    if not res.finished:
        res.counts = seen
    return res


def run_logged(cmd: list[str], log: Path, timeout_s: float, env: dict[str, str]) -> tuple[int | None, str]:
    """Run ``cmd`` in the repository with its output to ``log``; (exit status or None when it was
    stopped at ``timeout_s``, the output). A stopped run's process group (the one started here)
    is killed."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = None
    return rc, log.read_text(errors="replace")


def child_env(device: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO) not in paths:
        paths.append(str(REPO))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def stage_pytest(a: argparse.Namespace, out: Path, deadline: Deadline, items: list[Item]) -> bool:
    reserve = (0 if a.skip_calibrate else 30.0) + (0 if a.skip_fidelity else FIDELITY_MIN_S)
    timeout = deadline.timeout(a.pytest_s, reserve_s=reserve + TABLE_RESERVE_S)
    if timeout is None:
        items.append(Note("pytest -m cuda", f"skipped: {deadline.remaining():.0f} s left of the time budget"))
        return False
    log("pytest -m cuda", f"(at most {timeout:.0f} s)")
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "--tb=short", "-p", "no:cacheprovider",
           "tests"]
    started = time.monotonic()
    rc, text = run_logged(cmd, out / "pytest-cuda.log", timeout, child_env(a.device))
    res = parse_pytest_output(text)
    res.returncode = rc
    if res.seconds is None:
        res.seconds = time.monotonic() - started
    items.append(Note("pytest -m cuda", res.describe()))
    for nodeid in res.failed[:6]:
        items.append(Note("  failed", nodeid))
    if len(res.failed) > 6:
        items.append(Note("  failed", f"... and {len(res.failed) - 6} more (pytest-cuda.log)"))
    if rc not in (0, 5) and not res.failed:  # 5: nothing collected
        items.append(Note("  pytest", f"exit status {rc}; see pytest-cuda.log"))
    return res.ok and rc in (0, 5)


# -- calibrate -----------------------------------------------------------------------------------


def preset_for(device_name: str) -> str:
    """The preset describing a GPU of this name (h100-sxm when none matches)."""
    n = device_name.lower()
    if "h200" in n:
        return "h200"
    if "h100" in n:
        return "h100-pcie" if "pcie" in n else "h100-sxm"
    if "a100" in n:
        return "a100-40gb-pcie" if "40gb" in n or "pcie" in n else "a100-80gb-sxm"
    for name in ("b200", "gh200", "l40s", "l4", "a10g", "t4", "v100", "rtx4090"):
        if name in n:
            return name
    return "h100-sxm"


def calibration_notes(hw: Any, preset: Any) -> list[Note]:
    """The calibrated figures that the plans' times rest on, each beside the preset's."""
    from tierplan.cost_models.hardware import format_bandwidth, format_flops, format_seconds

    def link(h: Any, src: str, dst: str) -> Any:
        try:
            return h.link(src, dst)
        except Exception:  # noqa: BLE001 - a file without that link: leave the figure out
            return None

    def both(h: Any, src: str, dst: str) -> float | None:
        lk = link(h, src, dst)
        return None if lk is None else lk.bandwidth_both_ways()

    def peak(h: Any, key: str) -> float | None:
        v = h.device.peak_flops.get(key)
        return None if v is None else v * h.device.compute_efficiency

    def get(f: Callable[[Any], float | None], h: Any) -> float | None:
        try:
            return f(h)
        except Exception:  # noqa: BLE001
            return None

    figures: list[tuple[str, Callable[[Any], float | None], Callable[[float], str]]] = [
        ("device memory bandwidth", lambda h: h.device.memory_bandwidth * h.device.memory_efficiency,
         format_bandwidth),
        ("host->device bandwidth", lambda h: link(h, "host", "device").bandwidth, format_bandwidth),
        ("device->host bandwidth", lambda h: link(h, "device", "host").bandwidth, format_bandwidth),
        ("h2d while d2h (each way)", lambda h: both(h, "host", "device"), format_bandwidth),
        ("copy latency", lambda h: link(h, "host", "device").latency_s or None, format_seconds),
        ("launch overhead", lambda h: h.device.launch_overhead_s, format_seconds),
        ("bfloat16 matmul", lambda h: peak(h, "bfloat16"), format_flops),
        ("float32 matmul (tf32 off)", lambda h: peak(h, "float32"), format_flops),
        ("tf32 matmul", lambda h: peak(h, "tf32"), format_flops),
        # What running a plan costs beyond kernels and bytes, where the hardware file has it
        # (Hardware.runtime; a figure of 0 is left out).
        ("runtime: issue per op", lambda h: h.runtime.op_issue_s or None, format_seconds),
        ("runtime: per step", lambda h: h.runtime.step_s or None, format_seconds),
        ("runtime: per stream copy", lambda h: h.runtime.stream_copy_s or None, format_seconds),
        ("runtime: per inline copy", lambda h: h.runtime.inline_copy_s or None, format_seconds),
    ]
    notes = [Note("calibrate", f"{hw.device.name}: measured, and in preset {preset.name} (efficiency applied)")]
    for label, f, fmt in figures:
        m, p = get(f, hw), get(f, preset)
        if m is None:
            continue
        text = f"{label:26} {fmt(m):>14}"
        if p:
            text += f"   preset {fmt(p):>14}  (preset {format_error(prediction_error(p, m))})"
        notes.append(Note("", text))
    return notes


def stage_calibrate(a: argparse.Namespace, out: Path, deadline: Deadline, items: list[Item],
                    device_name: str) -> tuple[Any, bool]:
    """(the hardware to plan with: the calibrated TOML's path, or a preset name; ok)."""
    from tierplan.cost_models.hardware import load_hardware

    preset = a.hardware or ("cpu" if a.device == "cpu" else preset_for(device_name))
    if a.skip_calibrate:
        items.append(Note("calibrate", f"skipped (--skip-calibrate); planning with preset {preset}"))
        return preset, True
    reserve = (0 if a.skip_fidelity else FIDELITY_MIN_S) + TABLE_RESERVE_S
    timeout = deadline.timeout(a.calibrate_s, reserve_s=reserve)
    if timeout is None:
        items.append(Note("calibrate", f"skipped: time budget; planning with preset {preset}"))
        return preset, False
    toml = out / f"calibrated-{a.device}.toml"
    cmd = [sys.executable, "-m", "tierplan", "calibrate", "--device", a.device, "--out", str(toml)]
    if a.quick or a.device == "cpu":
        cmd.append("--quick")
    log("tierplan calibrate", f"--device {a.device} (at most {timeout:.0f} s)")
    started = time.monotonic()
    rc, text = run_logged(cmd, out / "calibrate.log", timeout, child_env(a.device))
    seconds = time.monotonic() - started
    if rc != 0 or not toml.is_file():
        why = "stopped at its time limit" if rc is None else f"exit status {rc}"
        last = [ln for ln in text.splitlines() if ln.strip()][-1:] or [""]
        items.append(Note("calibrate", f"FAILED ({why}): {last[0][:100]}; planning with preset {preset} "
                                       f"(calibrate.log)"))
        return preset, False
    hw = load_hardware(toml)
    items += calibration_notes(hw, load_hardware(preset))
    items.append(Note("", f"written to {toml.name} in {seconds:.0f} s{' (--quick)' if '--quick' in cmd else ''}"))
    return toml, True


# -- fidelity ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    name: str
    batch: int
    seq: int
    quick_batch: int | None = None
    quick_seq: int | None = None


# Shapes on the GPU: large enough that a step is not only kernel launches; on the CPU (--device
# cpu, a plumbing check) the zoo's test shapes.
CUDA_SHAPES = {
    "gpt2-tiny": ModelSpec("gpt2-tiny", 64, 128),
    "llama-tiny": ModelSpec("llama-tiny", 64, 128),
    "gpt2-8l": ModelSpec("gpt2-8l", 8, 512, 4, 256),
    "mlp": ModelSpec("mlp", 8192, 1),
}
CPU_SHAPES = {"gpt2-tiny": (2, 32), "llama-tiny": (2, 32), "gpt2-8l": (1, 64), "mlp": (8, 1)}


def gpt2_8l_entry() -> Any:
    """An 8-layer GPT-2 (768 hidden, 12 heads) with an 8192-token vocabulary: the blocks, not the
    logits, hold most of the activations, so 0.6 of keep-all is feasible with host transfers."""
    import torch

    from tierplan.zoo import TransformersConfig, ZooEntry

    cfg = TransformersConfig("GPT2Config", "GPT2LMHeadModel", "ForCausalLM", torch.float32, dict(
        n_layer=8, n_embd=768, n_head=12, vocab_size=8192, n_positions=1024, bos_token_id=0,
        eos_token_id=0))
    return ZooEntry("gpt2-8l", "GPT-2, 8 layers, 768 hidden, 8192 vocab (63M params)", cfg, 8, 512)


def build_model(name: str, device: str, quick: bool) -> tuple[Any, tuple, dict]:
    from tierplan.zoo import ZOO, ZooError

    if device == "cpu":
        b, s = CPU_SHAPES.get(name, (2, 32))
    else:
        spec = CUDA_SHAPES.get(name)
        b, s = (None, None) if spec is None else (spec.batch, spec.seq)
        if spec is not None and quick and spec.quick_batch:
            b, s = spec.quick_batch, spec.quick_seq
    entry = gpt2_8l_entry() if name == "gpt2-8l" else ZOO.get(name)
    if entry is None:
        raise ZooError(f"unknown model {name!r}; known: gpt2-8l, {', '.join(ZOO)}")
    return entry.build(b, s)


def loss_of(out: Any) -> Any:
    import torch

    return out if isinstance(out, torch.Tensor) else out.loss


def resident_bytes(tensors: Sequence[Any], device_type: str) -> int:
    """Bytes of the distinct storages among ``tensors`` that are on ``device_type``."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t.device.type == device_type:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


class CudaMeter:
    """Device peak and time of one step on the GPU (see the module docstring)."""

    device_type = "cuda"

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def step(self, fn: Callable[[], Any], zero: Callable[[], None], caller: Callable[[], list],
             tail: Callable[[Any], None] | None = None) -> tuple[int, float]:
        """(device peak, seconds) of ``fn()`` then ``tail(fn())``, both measured."""
        torch = self.torch
        zero()
        gc.collect()
        torch.cuda.synchronize()
        other = torch.cuda.memory_allocated() - resident_bytes(caller(), "cuda")
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = fn()
        if tail is not None:
            tail(result)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return torch.cuda.max_memory_allocated() - other, seconds

    def cleanup(self) -> None:
        gc.collect()
        self.torch.cuda.empty_cache()


class CpuMeter:
    """--device cpu: the device peak by storage tracking (tierplan.codegen.measure), as
    bench/fidelity.py measures it on the CPU; the caller's tensors count from the start."""

    device_type = "cpu"

    def __init__(self) -> None:
        from tierplan.codegen.measure import StorageTracker

        self.tracker = StorageTracker
        self.exclude: list = []

    def step(self, fn: Callable[[], Any], zero: Callable[[], None], caller: Callable[[], list],
             tail: Callable[[Any], None] | None = None) -> tuple[int, float]:
        """(device peak of ``fn()``, seconds of it and ``tail(fn())``): the tail (a compiled
        step's backward, which hands the planned gradients over) runs outside the tracker, as in
        bench/fidelity.py: on the CPU, gradients the plan put on the host are the same memory."""
        zero()
        gc.collect()
        tracker = self.tracker(existing=caller(), exclude=self.exclude)
        start = time.perf_counter()
        with tracker:
            result = fn()
        if tail is not None:
            tail(result)
        return tracker.peak_bytes, time.perf_counter() - start

    def cleanup(self) -> None:
        gc.collect()


def timed(meter: Any, fn: Callable[[], Any], zero: Callable[[], None], caller: Callable[[], list],
          repeats: int, warmup: int, tail: Callable[[Any], None] | None = None) -> tuple[int, float]:
    """(the largest peak, the median time) of ``repeats`` steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        zero()
        result = fn()
        if tail is not None:
            tail(result)
    runs = [meter.step(fn, zero, caller, tail) for _ in range(repeats)]
    return max(r[0] for r in runs), statistics.median(r[1] for r in runs)


@contextlib.contextmanager
def checkpointed(model: Any) -> Iterator[int]:
    """Every repeated block of ``model`` (each element of every nn.ModuleList: the transformer
    blocks; else each layer of its first nn.Sequential) under torch.utils.checkpoint,
    non-reentrant, as bench/fidelity.py's baseline; yields the number of blocks."""
    import functools

    import torch
    from torch.utils.checkpoint import checkpoint

    blocks = [m for ml in model.modules() if isinstance(ml, torch.nn.ModuleList) for m in ml]
    if not blocks:
        seq = next((m for m in model.modules() if isinstance(m, torch.nn.Sequential)), None)
        blocks = list(seq) if seq is not None else []
    saved = [(b, b.forward) for b in blocks]
    for b, fwd in saved:
        b.forward = functools.partial(checkpoint, fwd, use_reentrant=False)
    try:
        yield len(blocks)
    finally:
        for b, fwd in saved:
            b.forward = fwd


POLICY_FATES = (("recompute", "r"), ("swap", "s"), ("stream", "p"), ("offload", "g"))


def policy_of(plan: Any) -> str:
    """``tierplan <method>`` and the counts of the plan's decisions that are not "keep": r
    recomputed, s swapped to another tier, p caller-owned tensors (parameters) streamed from
    the host, g gradients offloaded; e.g. ``tierplan cp-sat r9 s8``."""
    method = plan.method.split(" (")[0]
    method = {"local search": "local"}.get(method, method)
    fates: dict[str, int] = {}
    for d in plan.decisions.values():
        fates[d.fate] = fates.get(d.fate, 0) + 1
    counts = [f"{letter}{fates[fate]}" for fate, letter in POLICY_FATES if fates.get(fate)]
    return " ".join(["tierplan", method, *counts])[:32]


def stage_fidelity(a: argparse.Namespace, hardware: Any, deadline: Deadline, items: list[Item],
                   on_progress: Callable[[], None] | None = None) -> bool:
    """The fidelity rows of every --models entry that fits the time left; ``on_progress`` runs
    after each model (main writes the table so far, in case the run is cut off)."""
    import torch

    from tierplan.api import plan_graph
    from tierplan.compile import compile_plan
    from tierplan.cost_models.hardware import load_hardware
    from tierplan.passes.capture import capture
    from tierplan.plans.plan import DEVICE, InfeasibleBudget

    device = torch.device(a.device)
    meter = CudaMeter() if a.device == "cuda" else CpuMeter()
    hw = load_hardware(hardware)
    ok = True
    for name in a.model_list:
        need = model_estimate_s(name, a.time_limit, a.repeats, a.warmup)
        if not deadline.allows(need, reserve_s=TABLE_RESERVE_S):
            items.append(Note(name, f"skipped: {deadline.remaining():.0f} s left of the time budget, "
                                    f"the model needs ~{need:.0f} s"))
            continue
        log("fidelity", f"{name} ({deadline.remaining():.0f} s left)")
        try:
            ok &= _fidelity_model(name, a, hw, device, meter, deadline, items,
                                  capture=capture, plan_graph=plan_graph, compile_plan=compile_plan,
                                  DEVICE=DEVICE, InfeasibleBudget=InfeasibleBudget)
        except Exception as exc:  # noqa: BLE001 - one model's failure is a row, not the end
            ok = False
            first = (str(exc).splitlines() or [""])[0]
            items.append(Note(name, f"ERROR {type(exc).__name__}: {first[:140]}"))
            traceback.print_exc()
        finally:
            meter.cleanup()
            if on_progress is not None:
                on_progress()
    return ok


def _fidelity_model(name: str, a: argparse.Namespace, hw: Any, device: Any, meter: Any,
                    deadline: Deadline, items: list[Item], *,
                    capture: Any, plan_graph: Any, compile_plan: Any, DEVICE: str,
                    InfeasibleBudget: type) -> bool:
    model, args, kwargs = build_model(name, a.device, a.quick)
    model.eval()  # no dropout: the planned and the eager step compute the same thing
    model.to(device)
    args = tuple(x.to(device) for x in args)
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    captured = capture(model, args, example_kwargs=kwargs)

    def zero() -> None:
        model.zero_grad(set_to_none=True)

    def caller() -> list:
        return [*model.parameters(), *model.buffers(), *args, *kwargs.values()]

    def eager() -> None:
        loss_of(model(*args, **kwargs)).backward()

    eager_peak, eager_s = timed(meter, eager, zero, caller, a.repeats, a.warmup)
    items.append(Row(name, "eager", "torch eager", meas_peak=eager_peak, meas_s=eager_s))
    with checkpointed(model) as n_blocks:
        ckpt_peak, ckpt_s = timed(meter, eager, zero, caller, a.repeats, a.warmup)
    items.append(Row(name, "ckpt", f"checkpoint x{n_blocks} blocks", meas_peak=ckpt_peak, meas_s=ckpt_s))

    budgets: list[tuple[str, float | int]] = [(f"{b:.2f}", b) for b in a.budget_list]
    if not a.no_ckpt_budget:
        budgets.append(("=ckpt", int(ckpt_peak)))
    for label, budget in budgets:
        need = row_estimate_s(a.time_limit, eager_s, a.repeats, a.warmup)
        if not deadline.allows(need, reserve_s=TABLE_RESERVE_S):
            items.append(Note(name, f"budget {label} skipped: {deadline.remaining():.0f} s left of the "
                                    f"time budget, the row needs ~{need:.0f} s"))
            continue
        try:
            plan = plan_graph(captured.graph, hardware=hw, memory_budget=budget, tiers=a.tier_list,
                              time_limit=a.time_limit)
        except InfeasibleBudget as exc:
            smallest = format_size(exc.min_feasible_bytes) if exc.min_feasible_bytes else "unknown"
            items.append(Note(name, f"budget {label}: infeasible (smallest feasible peak {smallest})"))
            continue
        compiled = compile_plan(model, captured, plan, device=device)
        planned_caller = caller  # on the GPU: what compile_plan left on the device
        if isinstance(meter, CpuMeter):
            # On the CPU the device and the host are one memory: the plan's initial tiers say
            # which caller tensors are on the device; the others and the host pool never count.
            on_device, off = cpu_caller_split(compiled, plan, args, kwargs, DEVICE)
            meter.exclude = [compiled.host_pool, *off]
            planned_caller = lambda: on_device  # noqa: E731

        def step() -> Any:
            return loss_of(compiled(*args, **kwargs))

        def backward(loss: Any) -> None:
            loss.backward()

        try:
            peak, seconds = timed(meter, step, zero, planned_caller, a.repeats, a.warmup, tail=backward)
        finally:
            zero()
            meter.exclude = []
            _restore_devices(model, device)
        items.append(Row(name, label, policy_of(plan), plan.peak_bytes[DEVICE], peak,
                         plan.predicted_time_s, seconds))
        del compiled
        meter.cleanup()
    return True


def cpu_caller_split(compiled: Any, plan: Any, args: tuple, kwargs: dict, device_tier: str) -> tuple[list, list]:
    """(caller-owned tensors the plan starts on the device, the others), as bench/fidelity.py's
    measure_cpu splits them."""
    on_device, off = [], []
    for name, t in zip(compiled.program.inputs, compiled.flat_inputs(args, kwargs)):
        if name.startswith("tangents"):
            continue
        tier = plan.initial_tiers.get(plan.graph.tensors[name].storage, device_tier)
        (on_device if tier == device_tier else off).append(t)
    return on_device, off


def _restore_devices(model: Any, device: Any) -> None:
    """compile_plan moves the parameters a plan starts on the host to (pinned) host memory; the
    next budget's plan starts from the model on the device again."""
    for p in [*model.parameters(), *model.buffers()]:
        if p.device.type != device.type:  # torch.device("cuda") != torch.device("cuda:0")
            p.data = p.data.to(device)


# -- setup ---------------------------------------------------------------------------------------


def log(what: str, detail: str = "") -> None:
    print(f"[gpu_check] {what} {detail}".rstrip(), file=sys.stderr, flush=True)


def install_wheels(wheel_dir: Path, site: Path) -> list[str]:
    """pip install every wheel in ``wheel_dir`` (no index, no dependency resolution: the
    directory holds them all) into ``site``, and put ``site`` first on this process's path and
    on PYTHONPATH for the subprocesses. Returns the wheels' file names."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"gpu_check: --install-wheels {wheel_dir}: no .whl files there; make them with\n"
                         f"  {WHEELS_HINT}")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)]
    log("pip install", f"{len(wheels)} wheels from {wheel_dir} into {site}")
    subprocess.run(cmd, check=True)
    add_to_path(site)
    return [w.name for w in wheels]


def add_to_path(folder: Path) -> None:
    folder_s = str(folder)
    if folder_s not in sys.path:
        sys.path.insert(0, folder_s)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != folder_s]
    os.environ["PYTHONPATH"] = os.pathsep.join([folder_s, *paths])
    importlib.invalidate_caches()


def missing_modules(names: Sequence[str] = REQUIRED_MODULES) -> list[str]:
    """The modules among ``names`` that cannot be imported (ortools is imported for real: a wheel
    of the wrong protobuf is found but fails)."""
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if "ortools" not in missing:
        try:
            importlib.import_module("ortools.sat.python.cp_model")
        except Exception as exc:  # noqa: BLE001 - any import failure means the planner cannot run
            missing.append(f"ortools (installed but fails to import: {type(exc).__name__}: {exc})")
    return missing


def missing_message(missing: Sequence[str], wheel_dir: Path | None) -> str:
    where = wheel_dir or Path(".whl")
    return (
        f"gpu_check: missing Python packages: {', '.join(missing)}.\n"
        f"tierplan's planner needs ortools, which the GPU machine's image lacks. Carry wheels with the "
        f"tree and install them in the same call:\n"
        f"  python3 bench/gpu_check.py --install-wheels {where}\n"
        f"where {where}/ holds the cp312 manylinux wheels, made on a machine with the package registry:\n"
        f"  {WHEELS_HINT}\n"
        f"(see docs/gpu-check.md)"
    )


def output_dir(a: argparse.Namespace) -> Path:
    if a.out is not None:
        out = a.out
    elif os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
    else:
        out = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_results(out: Path, table: str, items: Sequence[Item]) -> None:
    (out / "gpu_check.txt").write_text(table + "\n")
    rows = [{"type": type(i).__name__, **dataclasses.asdict(i)} for i in items if not isinstance(i, Rule)]
    (out / "gpu_check.json").write_text(json.dumps(rows, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    deadline = Deadline(a.budget_s)
    add_to_path(REPO)
    if a.install_wheels is not None:
        install_wheels(a.install_wheels, a.site)
    import torch

    gpu = a.device == "cuda" and not a.no_gpu and torch.cuda.is_available()
    if a.no_gpu or (a.device == "cuda" and not gpu):
        why = "--no-gpu given" if a.no_gpu else "torch.cuda.is_available() is False"
        print(f"gpu_check: no GPU ({why}; torch {torch.__version__}): pytest -m cuda, calibrate and "
              f"the fidelity rows need one and were not run; the table below shows its layout "
              f"with dry-run rows (illustrative figures, not measurements)")
        print(render_table(dry_run_items(), title="gpu_check DRY RUN (no GPU)"))
        return 0

    missing = missing_modules()
    if missing:
        print(missing_message(missing, a.install_wheels), file=sys.stderr)
        return 2
    out = output_dir(a)
    device_name = torch.cuda.get_device_name(0) if gpu else "CPU"
    log("start", f"{device_name}, torch {torch.__version__}, budget {a.budget_s:.0f} s, files in {out}")

    items: list[Item] = []
    ok = True
    hardware: Any = a.hardware or "h100-sxm"

    def title() -> str:
        hw_name = hardware.name if isinstance(hardware, Path) else hardware
        return (f"gpu_check on {device_name}, torch {torch.__version__}, hardware {hw_name}, tiers "
                f"{','.join(a.tier_list) or '(none)'}; {deadline.elapsed():.0f} s of {a.budget_s:.0f} s")

    if a.skip_pytest:
        items.append(Note("pytest -m cuda", "skipped (--skip-pytest)"))
    else:
        ok &= stage_pytest(a, out, deadline, items)
    items.append(Rule())
    try:
        hardware, cal_ok = stage_calibrate(a, out, deadline, items, device_name)
        ok &= cal_ok
    except Exception as exc:  # noqa: BLE001
        ok = False
        items.append(Note("calibrate", f"ERROR {type(exc).__name__}: {exc}"[:160]))
        traceback.print_exc()
    items.append(Rule())
    if a.skip_fidelity:
        items.append(Note("fidelity", "skipped (--skip-fidelity)"))
    else:
        def partial() -> None:
            write_results(out, render_table(items, title=title() + " (partial)"), items)

        try:
            ok &= stage_fidelity(a, hardware, deadline, items, on_progress=partial)
        except Exception as exc:  # noqa: BLE001 - the table is printed all the same
            ok = False
            items.append(Note("fidelity", f"ERROR {type(exc).__name__}: {exc}"[:160]))
            traceback.print_exc()
        v = verdict(items)
        if v is not None:
            items.append(v)
    table = render_table(items, title=title())
    print(table, flush=True)
    write_results(out, table, items)
    log("files", f"in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
