"""bench/gpu_check.py without a GPU: arguments, the table, the no-GPU path, the time budget."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from bench_modules import load_bench


def _load():
    return load_bench("gpu_check")


gc_ = _load()


@pytest.fixture(autouse=True)
def _isolated_paths(monkeypatch):
    """main() and install_wheels put folders on sys.path and PYTHONPATH: undo it after each test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- arguments -----------------------------------------------------------------------------------


def test_parse_args_defaults_and_quick():
    a = gc_.parse_args([])
    assert a.budget_s == gc_.FULL.budget_s <= 480  # the whole run fits 8 minutes
    assert a.model_list == ["gpt2-tiny", "llama-tiny", "gpt2-8l"]
    assert a.budget_list == [1.0, 0.6] and a.tier_list == ("host",)
    assert (a.repeats, a.warmup, a.time_limit) == (10, 2, 4.0)
    assert a.device == "cuda" and not a.no_gpu and a.install_wheels is None
    q = gc_.parse_args(["--quick"])
    assert q.budget_s == gc_.QUICK.budget_s < a.budget_s
    assert q.repeats < a.repeats and q.calibrate_s < a.calibrate_s
    assert q.model_list == ["gpt2-tiny", "gpt2-8l"]
    # Explicit values win over the mode's defaults.
    o = gc_.parse_args(["--quick", "--budget-s", "60", "--models", "mlp, gpt2-tiny", "--repeats", "3",
                        "--budgets", "0.9,0.5", "--tiers", "host,nvme", "--install-wheels", "w",
                        "--out", "o"])
    assert o.budget_s == 60 and o.model_list == ["mlp", "gpt2-tiny"] and o.repeats == 3
    assert o.budget_list == [0.9, 0.5] and o.tier_list == ("host", "nvme")
    assert o.install_wheels == Path("w") and o.out == Path("o") and o.site == Path(gc_.DEFAULT_SITE)


@pytest.mark.parametrize("argv", [["--budgets", "1.5"], ["--budgets", "x"], ["--budgets", ","],
                                  ["--budget-s", "0"], ["--repeats", "0"], ["--device", "tpu"]])
def test_parse_args_rejects(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        gc_.parse_args(argv)
    assert exc.value.code == 2
    assert "usage: gpu_check" in capsys.readouterr().err


# -- the table -----------------------------------------------------------------------------------


def test_render_table():
    MiB = gc_.MiB
    items = [
        gc_.Note("pytest -m cuda", "7 passed, 0 failed, 0 error, 0 skipped in 61 s"),
        gc_.Rule(),
        gc_.Row("gpt2-8l", "eager", "torch eager", meas_peak=3 * gc_.GiB, meas_s=0.0412),
        gc_.Row("gpt2-8l", "0.60", "tierplan cp-sat r9 s8", 110 * MiB, 100 * MiB, 0.0045, 0.005),
        gc_.Note("gpt2-8l", "budget =ckpt skipped: 3 s left of the time budget"),
    ]
    text = gc_.render_table(items, title="title line")
    lines = text.splitlines()
    assert lines[0] == "title line"
    header = lines[1]
    assert [c.strip() for c in header.split("|")] == list(gc_.COLUMNS)
    rules = [ln for ln in lines if set(ln) == {"-"}]
    assert len(rules) == 2 and len({len(r) for r in rules}) == 1 and len(rules[0]) >= len(header)
    eager = next(ln for ln in lines if "torch eager" in ln)
    cells = [c.strip() for c in eager.split("|")]
    assert cells == ["gpt2-8l", "eager", "torch eager", "", "3.0 GiB", "", "", "41.20", ""]
    planned = next(ln for ln in lines if "cp-sat" in ln)
    cells = [c.strip() for c in planned.split("|")]
    # err = predicted / measured - 1, as bench/fidelity.py reports it.
    assert cells[3:] == ["110.0 MiB", "100.0 MiB", "+10.0%", "4.500", "5.000", "-10.0%"]
    bars = [[i for i, c in enumerate(ln) if c == "|"] for ln in (header, eager, planned)]
    assert bars[0] == bars[1] == bars[2]  # the columns line up
    note = next(ln for ln in lines if "pytest" in ln)
    assert note.startswith("pytest -m cuda | 7 passed")
    assert lines[-1].startswith("gpt2-8l ") and "skipped" in lines[-1]


def test_formatting_helpers():
    assert gc_.prediction_error(110, 100) == pytest.approx(0.1)
    assert gc_.prediction_error(None, 100) is None and gc_.prediction_error(1, 0) is None
    assert gc_.format_size(None) == "" and gc_.format_size(512) == "512 B"
    assert gc_.format_size(1536) == "1.5 KiB" and gc_.format_size(5 * gc_.GiB) == "5.0 GiB"
    assert gc_.format_ms(None) == "" and gc_.format_ms(0.0012345) == "1.234"
    assert gc_.format_ms(0.04567) == "45.67" and gc_.format_ms(0.4567) == "456.7"
    assert gc_.format_error(None) == "" and gc_.format_error(-0.0312) == "-3.1%"


def test_verdict_counts_planned_rows_within_tolerance():
    rows = [gc_.Row("m", "eager", meas_peak=10, meas_s=1.0),  # not planned: not counted
            gc_.Row("m", "1.00", "p", 100, 102, 1.0, 1.1),  # peak -2%, time -9%
            gc_.Row("m", "0.60", "p", 100, 80, 1.0, 2.0)]  # peak +25%, time -50%
    note = gc_.verdict(rows)
    assert note.text == "peak within 5% in 1/2 planned rows, step time within 20% in 1/2"
    assert gc_.verdict([gc_.Note("x", "y")]) is None


def test_dry_run_rows_render():
    text = gc_.render_table(gc_.dry_run_items())
    assert "pytest -m cuda" in text and "calibrate" in text and "tierplan" in text


# -- pytest output -------------------------------------------------------------------------------


_PYTEST_OUT = """\
tests/test_arena.py::test_cuda_reserved[mlp-8192-1-0.9] PASSED                      [ 20%]
tests/test_arena.py::test_cuda_reserved[gpt2-tiny-64-128-0.75] FAILED               [ 40%]
tests/test_backend.py::test_cuda_compile[tiers0] SKIPPED (needs a CUDA device)      [ 60%]
tests/test_cuda_plans.py::test_capture[gpt2-tiny] ERROR                             [ 80%]
tests/test_cuda_plans.py::test_capture[llama-tiny] PASSED                           [100%]
=========================== short test summary info ============================
FAILED tests/test_arena.py::test_cuda_reserved[gpt2-tiny-64-128-0.75] - AssertionError: 3
ERROR tests/test_cuda_plans.py::test_capture[gpt2-tiny] - RuntimeError: x
====== 1 failed, 2 passed, 1 skipped, 503 deselected, 2 warnings, 1 error in 61.52s (0:01:01) ======
"""


def test_parse_pytest_output_summary():
    res = gc_.parse_pytest_output(_PYTEST_OUT)
    assert res.finished and res.seconds == pytest.approx(61.52)
    assert res.counts == {"failed": 1, "passed": 2, "skipped": 1, "deselected": 503, "error": 1}
    assert res.failed == ["tests/test_arena.py::test_cuda_reserved[gpt2-tiny-64-128-0.75]",
                          "tests/test_cuda_plans.py::test_capture[gpt2-tiny]"]
    assert not res.ok
    assert res.describe().startswith("2 passed, 1 failed, 1 error, 1 skipped, 503 deselected in 62 s")


def test_parse_pytest_output_cut_off_and_clean():
    cut = gc_.parse_pytest_output("\n".join(_PYTEST_OUT.splitlines()[:3]))
    assert not cut.finished and not cut.ok
    assert cut.counts == {"passed": 1, "failed": 1, "skipped": 1}
    assert "stopped before the end" in cut.describe()
    clean = gc_.parse_pytest_output("t.py::a PASSED\n===== 1 passed, 9 deselected in 3.00s =====\n")
    assert clean.ok and clean.counts == {"passed": 1, "deselected": 9}
    none = gc_.parse_pytest_output("===== 5 deselected in 0.50s =====\n")
    assert none.finished and none.ok


# -- the time budget -----------------------------------------------------------------------------


def test_deadline():
    clock = FakeClock()
    d = gc_.Deadline(100, clock=clock)
    assert d.remaining() == 100 and d.elapsed() == 0
    clock.t += 30
    assert d.remaining() == 70 and d.elapsed() == 30
    assert d.allows(60) and d.allows(60, reserve_s=10) and not d.allows(60, reserve_s=11)
    assert d.timeout(240) == 70  # cut to what is left
    assert d.timeout(240, reserve_s=50) == 20
    assert d.timeout(15) == 15  # what the stage wants, when that fits
    assert d.timeout(240, reserve_s=65) is None  # 5 s left: not worth starting
    clock.t += 100
    assert d.remaining() == -30 and not d.allows(0)


def test_row_estimates():
    base = gc_.row_estimate_s(4.0, 0.01, 10, 2)
    assert base > 4.0  # at least the planner's limit
    assert gc_.row_estimate_s(4.0, 0.1, 10, 2) > base  # slower steps cost more
    assert gc_.row_estimate_s(2.0, 0.01, 10, 2) < base  # a shorter planner limit costs less
    assert gc_.model_estimate_s("gpt2-8l", 4.0, 10, 2) > gc_.model_estimate_s("gpt2-tiny", 4.0, 10, 2)
    assert gc_.model_estimate_s("unknown", 4.0, 10, 2) > gc_.row_estimate_s(4.0, 0.05, 10, 2)
    # The default run's models fit its budget with room for the other stages.
    a = gc_.parse_args([])
    need = sum(gc_.model_estimate_s(m, a.time_limit, a.repeats, a.warmup) for m in a.model_list)
    assert need + a.pytest_s / 2 + gc_.TABLE_RESERVE_S < a.budget_s


def test_fidelity_skips_models_when_the_budget_is_spent(monkeypatch):
    clock = FakeClock()
    deadline = gc_.Deadline(60, clock=clock)
    clock.t += 55  # 5 s left: no model fits
    monkeypatch.setattr(gc_, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    a = gc_.parse_args(["--device", "cpu", "--hardware", "cpu"])
    items: list = []
    assert gc_.stage_fidelity(a, "cpu", deadline, items)
    assert [i.label for i in items] == a.model_list
    assert all("skipped: 5 s left of the time budget" in i.text for i in items)


def test_stages_skip_when_too_little_time_is_left(tmp_path, monkeypatch):
    clock = FakeClock()
    deadline = gc_.Deadline(60, clock=clock)
    clock.t += 50
    monkeypatch.setattr(gc_, "run_logged", lambda *a, **k: pytest.fail("a stage ran"))
    a = gc_.parse_args(["--device", "cpu"])
    items: list = []
    assert not gc_.stage_pytest(a, tmp_path, deadline, items)
    hardware, ok = gc_.stage_calibrate(a, tmp_path, deadline, items, "CPU")
    assert hardware == "cpu" and not ok
    assert "skipped" in items[0].text and "preset cpu" in items[1].text


# -- the no-GPU path and the setup ---------------------------------------------------------------


def test_no_gpu_path_exits_0_with_the_dry_run_table(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(gc_, "run_logged", lambda *a, **k: pytest.fail("a stage ran without a GPU"))
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gc_.main(["--no-gpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gpu_check: no GPU (--no-gpu given")
    assert "gpu_check DRY RUN (no GPU)" in out and "| pred peak |" in out
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing written


def test_missing_dependencies_exit_2_naming_the_wheels(monkeypatch, capsys):
    monkeypatch.setattr(gc_, "missing_modules", lambda *a: ["ortools", "immutabledict"])
    assert gc_.main(["--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "missing Python packages: ortools, immutabledict" in err
    assert "--install-wheels .whl" in err and "pip download" in err
    msg = gc_.missing_message(["ortools"], Path("wheels"))
    assert "--install-wheels wheels" in msg and "wheels/ holds" in msg


def test_missing_modules_finds_what_is_absent():
    assert gc_.missing_modules(["json", "no_such_module_gpu_check"]) == ["no_such_module_gpu_check"]


def test_install_wheels_needs_wheels(tmp_path):
    with pytest.raises(SystemExit, match="no .whl files there"):
        gc_.install_wheels(tmp_path, tmp_path / "site")


def test_install_wheels_runs_pip_into_the_site(tmp_path, monkeypatch):
    (tmp_path / "a-1.0-py3-none-any.whl").write_bytes(b"")
    calls = []
    monkeypatch.setattr(gc_.subprocess, "run", lambda cmd, check: calls.append(cmd))
    site = tmp_path / "site"
    assert gc_.install_wheels(tmp_path, site) == ["a-1.0-py3-none-any.whl"]
    (cmd,) = calls
    assert cmd[1:4] == ["-m", "pip", "install"] and "--no-index" in cmd and "--no-deps" in cmd
    assert cmd[cmd.index("--target") + 1] == str(site) and cmd[-1].endswith("a-1.0-py3-none-any.whl")
    assert sys.path[0] == str(site)
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [str(site), "/elsewhere"]


def test_preset_for():
    assert gc_.preset_for("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert gc_.preset_for("NVIDIA H100 PCIe") == "h100-pcie"
    assert gc_.preset_for("NVIDIA H200") == "h200"
    assert gc_.preset_for("NVIDIA A100-SXM4-80GB") == "a100-80gb-sxm"
    assert gc_.preset_for("Some GPU") == "h100-sxm"


def test_cpu_plumbing_run_end_to_end(tmp_path, capsys):
    """--device cpu runs the fidelity stage on the CPU (peaks by storage tracking): the same
    capture, plan, compile and measurement code as on the GPU, so API drift shows here."""
    argv = ["--device", "cpu", "--models", "mlp", "--budgets", "0.6", "--no-ckpt-budget", "--skip-pytest",
            "--skip-calibrate", "--hardware", "cpu", "--repeats", "1", "--warmup", "0", "--time-limit", "1",
            "--out", str(tmp_path)]
    assert gc_.main(argv) == 0
    out = capsys.readouterr().out
    assert "pytest -m cuda | skipped (--skip-pytest)" in out
    rows = {r["budget"]: r for r in __import__("json").loads((tmp_path / "gpu_check.json").read_text())
            if r["type"] == "Row"}
    assert set(rows) == {"eager", "ckpt", "0.60"}
    planned = rows["0.60"]
    assert planned["policy"].startswith("tierplan ")
    assert planned["meas_peak"] == pytest.approx(planned["pred_peak"], rel=0.05)
    assert planned["meas_peak"] < rows["eager"]["meas_peak"]
    assert (tmp_path / "gpu_check.txt").read_text().strip() in out
