"""Calibration measures positive, plausible figures quickly, cleans up after itself, and its
output round-trips through a TOML file."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from test_cost_models import small_graph
from tierplan.cost_models.calibrate import calibrate, write_hardware_toml
from tierplan.cost_models.compute import graph_op_times
from tierplan.cost_models.hardware import Hardware, HardwareError, load_hardware
from tierplan.cost_models.transfer import tier_transfer_time


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> tuple[Hardware, float, Path]:
    scratch = tmp_path_factory.mktemp("scratch")
    start = time.perf_counter()
    hw = calibrate("cpu", quick=True, scratch_dir=scratch)
    return hw, time.perf_counter() - start, scratch


def test_quick_calibration_is_quick_and_cleans_up(measured: tuple[Hardware, float, Path]) -> None:
    _, seconds, scratch = measured
    assert seconds < 6  # ~1 s on an idle 2-core machine; slack for a loaded one
    assert list(scratch.iterdir()) == []  # the probe file's temporary directory is gone


def test_figures_are_positive_and_plausible(measured: tuple[Hardware, float, Path]) -> None:
    hw, _, _ = measured
    d = hw.device
    assert d.kind == "cpu" and set(d.peak_flops) <= {"float32", "bfloat16"}
    # Loose bounds: a loaded 2-core VM measures ~1 GFLOPS at worst, no CPU reaches 100 TFLOPS.
    assert 1e8 < d.peak_flops["float32"] < 1e14
    assert 1e8 < d.memory_bandwidth < 1e13  # bytes/s, read + write
    assert 0 < d.launch_overhead_s < 1e-2
    assert d.compute_efficiency == d.memory_efficiency == 1.0  # measured rates are achieved rates
    assert hw.host.dram_bytes == d.memory_bytes == hw.tiers["device"].capacity_bytes > 2**28
    nvme = hw.tiers["nvme"]
    assert nvme.capacity_bytes > 0 and 1e6 < nvme.read_bandwidth and 1e6 < nvme.write_bandwidth
    assert 0 < nvme.latency_s < 1
    link = hw.link("device", "host")
    assert link.bandwidth == pytest.approx(d.memory_bandwidth / 2) and not link.duplex
    to_nvme = tier_transfer_time(hw, 2**20, "device", "nvme")
    assert to_nvme > tier_transfer_time(hw, 2**20, "device", "host")


def test_round_trip_through_toml(measured: tuple[Hardware, float, Path], tmp_path: Path) -> None:
    hw, _, _ = measured
    path = write_hardware_toml(hw, tmp_path / "calibrated.toml")
    text = path.read_text(encoding="utf-8")
    assert "# measured by tierplan calibrate on " in text and "median" in text
    loaded = load_hardware(path)
    assert loaded == hw
    assert load_hardware(write_hardware_toml(loaded, tmp_path / "again.toml")) == hw


def test_calibrated_hardware_prices_ops(measured: tuple[Hardware, float, Path]) -> None:
    graph = small_graph()
    graph.ops.pop(2)  # no fp8 on a CPU
    assert all(t >= 0 for t in graph_op_times(graph, measured[0]).values())


def test_base_supplies_what_is_not_measured(tmp_path: Path) -> None:
    hw = calibrate("cpu", quick=True, base="h100-sxm", name="mine", scratch_dir=tmp_path)
    base = load_hardware("h100-sxm")
    assert hw.name == "mine" and hw.cluster == base.cluster
    # Untimed dtypes come from the base, derated by its compute efficiency; timed ones are measured.
    assert hw.device.peak_flops["float8"] == pytest.approx(base.device.peak_flops["float8"] * 0.81)
    assert hw.device.peak_flops["float32"] < base.device.peak_flops["float32"]
    assert load_hardware(write_hardware_toml(hw, tmp_path / "mine.toml")) == hw
    assert list(tmp_path.iterdir()) == [tmp_path / "mine.toml"]


def test_scratch_directory_is_removed_on_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk on fire"):
        calibrate("cpu", quick=True, scratch_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_bad_device() -> None:
    with pytest.raises(HardwareError, match="'cpu' or 'cuda'"):
        calibrate("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(HardwareError, match="torch.cuda.is_available"):
            calibrate("cuda", quick=True)


def _host_matmul_slows_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """calibrate's host float32 matmul measures 100 GFLOP/s first and 20 GFLOP/s last."""
    from tierplan.cost_models import calibrate as module

    rates = iter([100e9, 20e9])
    real = module._matmul_flops
    monkeypatch.setattr(module, "_matmul_flops", lambda device, dtype, *a: next(rates) if device.type == "cpu"
                        and dtype == torch.float32 else real(device, dtype, *a))


def test_a_machine_that_changed_speed_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The host matmul is timed first and again last: when the two rates are far apart (a
    neighbour took the cores meanwhile) calibrate warns and the file's sources say so."""
    from tierplan.cost_models import calibrate as module

    assert module.unsteady_machine(100e9, 90e9) is None
    _host_matmul_slows_down(monkeypatch)
    with pytest.warns(module.CalibrationWarning, match=r"100\.0 GFLOP/s first and 20\.0 GFLOP/s last \(5\.0x"):
        hw = calibrate("cpu", quick=True, scratch_dir=tmp_path)
    assert any("run calibrate again when it is quiet" in s for s in hw.sources)
    assert list(tmp_path.iterdir()) == []


def test_the_cli_prints_the_warning_after_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from tierplan.cli import main
    from tierplan.cost_models import calibrate as module

    _host_matmul_slows_down(monkeypatch)
    monkeypatch.setattr(module.tempfile, "tempdir", str(tmp_path))
    assert main(["calibrate", "--quick", "--out", str(tmp_path / "cal.toml")]) == 0
    err = capsys.readouterr().err
    assert "tierplan: warning: calibrate: the host's float32 matmul ran at 100.0 GFLOP/s first" in err
    assert "run calibrate again when it is quiet" in (tmp_path / "cal.toml").read_text()
