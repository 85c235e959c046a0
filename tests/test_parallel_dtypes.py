"""The parallel planner's compute dtype: bf16 models on devices without bf16 (Turing t4, Volta
v100) are priced as fp16 mixed precision at the float16 peak, and say so; a device with neither
16-bit peak is a clear HardwareError (docs/cost-model.md, "Compute precision")."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tierplan.cli.whatif import format_whatif
from tierplan.cost_models.hardware import (
    Hardware,
    HardwareError,
    compute_precision,
    load_hardware,
)
from tierplan.parallel.profile import GEMM_TAIL_S, OpTable
from tierplan.parallel.search import format_result, plan_parallel
from tierplan.parallel.serving import ServeSearch
from tierplan.parallel.training import TrainSearch
from tierplan.parallel.types import cluster_for
from tierplan.parallel.whatif import whatif
from tierplan.profiling import profile_transformers

transformers = pytest.importorskip("transformers")

FP16_PEAK = {"t4": 65e12, "v100": 125e12}  # the presets' float16 peaks (datasheets)


@pytest.fixture(scope="module")
def bf16_profile():
    """A small Llama in bf16 (2 layers captured on the meta device, scaled to 8): ~1 s."""
    cfg = transformers.LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                                   num_key_value_heads=8, intermediate_size=1408, vocab_size=4096,
                                   max_position_embeddings=512)  # fmt: skip
    prof = profile_transformers(cfg, seq_len=512, dtype=torch.bfloat16, name="llama-bf16")
    assert prof.param_bytes == 2
    assert "bfloat16" in {k for c in prof.cells.values() for k in c.forward.keys}
    return prof


def _with_bf16_peak(hw: Hardware, peak: float) -> Hardware:
    """``hw`` with a bfloat16 peak of ``peak`` FLOP/s added (what a user file could say)."""
    dev = dataclasses.replace(hw.device, peak_flops={**hw.device.peak_flops, "bfloat16": peak})
    return dataclasses.replace(hw, name=f"{hw.name}-bf16", device=dev)


def _without_half(hw: Hardware) -> Hardware:
    peaks = {k: v for k, v in hw.device.peak_flops.items() if k not in ("bfloat16", "float16")}
    return dataclasses.replace(hw, name="fp32-only", device=dataclasses.replace(hw.device, peak_flops=peaks))


def _same_plans(a, b) -> None:
    """Two rankings that agree on every plan's layout, memory and times."""
    assert len(a.plans) == len(b.plans) > 0
    for p, q in zip(a.plans, b.plans):
        assert {**p.config, "compute_dtype": None} == {**q.config, "compute_dtype": None}
        assert p.step_time == pytest.approx(q.step_time, rel=1e-12)
        assert p.memory.total == pytest.approx(q.memory.total, rel=1e-12)
        for key in ("tokens_per_s", "mfu", "ttft_s", "tpot_s"):
            if key in p.metrics:
                assert p.metrics[key] == pytest.approx(q.metrics[key], rel=1e-12), key


def test_compute_precision_rule() -> None:
    for name in ("t4", "v100"):
        hw = load_hardware(name)
        p = compute_precision(hw, 2)
        assert p.dtype == "float16"
        assert p.device.peak("bfloat16") == p.device.peak("float16") == FP16_PEAK[name]
        assert "bfloat16" not in hw.device.peak_flops  # the preset itself is left as it is
        assert f"bf16 unsupported on {name}" in p.note and "priced as fp16" in p.note
        assert compute_precision(hw, 4).dtype == "float32" and not compute_precision(hw, 4).note
    for name in ("h100-sxm", "a100-80gb-sxm", "cpu"):  # devices with bf16: unchanged
        hw = load_hardware(name)
        p = compute_precision(hw, 2)
        assert (p.dtype, p.device, p.note) == ("bfloat16", hw.device, "")


def test_the_compute_term_of_a_bf16_gemm_on_t4_is_at_the_fp16_peak() -> None:
    hw = load_hardware("t4")
    n = 8192
    gemm = OpTable(flops=np.array([2.0 * n**3]), nbytes=np.array([3.0 * n * n * 2]),
                   keys=("bfloat16",), tensor_core=np.array([True]))  # fmt: skip
    with pytest.raises(HardwareError, match="bfloat16"):
        gemm.seconds(hw.device)  # the preset alone has no bf16 peak
    dev = compute_precision(hw, 2).device
    expected = 2.0 * n**3 / (65e12 * 0.81) + GEMM_TAIL_S + 5e-6  # compute-bound + tail + launch
    assert gemm.seconds(dev) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ["t4", "v100"])
def test_bf16_training_on_a_device_without_bf16_is_priced_as_fp16(bf16_profile, name) -> None:
    hw = load_hardware(name)
    r = plan_parallel(bf16_profile, hw, 8, top=0)
    assert r.best is not None and r.best.fits
    assert {p.config["compute_dtype"] for p in r.plans} == {"float16"}
    note = next(n for n in r.notes if n.startswith(f"bf16 unsupported on {name}"))
    assert "priced as fp16" in note and note in r.best.notes
    assert note in format_result(r)
    # The same as a machine whose bf16 peak is the fp16 one: step times priced at that peak.
    same = plan_parallel(bf16_profile, _with_bf16_peak(hw, FP16_PEAK[name]), 8, top=0)
    assert {p.config["compute_dtype"] for p in same.plans} == {"bfloat16"}
    assert not any("unsupported" in n for n in same.notes)
    _same_plans(r, same)
    # MFU is against the fp16 peak: model FLOPs / (step x GPUs x float16 peak).
    best, prof = r.best, bf16_profile
    flops = best.config["global_batch"] * (
        prof.num_layers * sum(c.forward.total_flops + c.backward.total_flops for c in prof.cells.values())
        + sum(x.forward.total_flops + x.backward.total_flops for x in (prof.pre, prof.post)))  # fmt: skip
    assert best.metrics["mfu"] == pytest.approx(flops / (best.step_time * 8 * FP16_PEAK[name]), rel=1e-9)
    # Not silently fp32: pricing the bf16 ops at the fp32 rate is several times slower.
    fp32 = plan_parallel(bf16_profile, _with_bf16_peak(hw, hw.device.peak("float32")), 8, top=1)
    assert fp32.best.step_time > 2 * best.step_time


@pytest.mark.parametrize("name", ["t4", "v100"])
def test_one_training_layout_compute_matches_the_fp16_peak(bf16_profile, name) -> None:
    hw = load_hardware(name)
    layout = {"t": 1, "pp": 1, "d": 8, "b": 4, "schedule": "none", "v": 1, "zero": 1,
              "offload_optimizer": False, "offload_params": False}
    plans = {}
    for label, machine in (("t4", hw), ("fp16", _with_bf16_peak(hw, FP16_PEAK[name])),
                           ("fp32", _with_bf16_peak(hw, hw.device.peak("float32")))):  # fmt: skip
        cluster, _ = cluster_for(machine, 8)
        plans[label] = TrainSearch(bf16_profile, machine, cluster, 8, 256).evaluate(**layout)
    assert plans["t4"].time.compute == pytest.approx(plans["fp16"].time.compute, rel=1e-12)
    assert plans["fp32"].time.compute > 2 * plans["t4"].time.compute


@pytest.mark.parametrize("name", ["t4", "v100"])
def test_bf16_serving_on_a_device_without_bf16_is_priced_as_fp16(bf16_profile, name) -> None:
    hw = load_hardware(name)
    r = plan_parallel(bf16_profile, hw, 8, serve=True, top=0)
    assert r.best is not None and r.best.fits
    assert {p.config["compute_dtype"] for p in r.plans} == {"float16"}
    assert any(n.startswith(f"bf16 unsupported on {name}") for n in r.notes)
    same = plan_parallel(bf16_profile, _with_bf16_peak(hw, FP16_PEAK[name]), 8, serve=True, top=0)
    _same_plans(r, same)
    # The prefill (TTFT) prices the captured bf16 ops: at the fp32 rate it would be slower.
    cluster, _ = cluster_for(hw, 8)
    fast = ServeSearch(bf16_profile, hw, cluster, 8, 512, 256).evaluate(1, 1, 1)
    slow_hw = _with_bf16_peak(hw, hw.device.peak("float32"))
    slow = ServeSearch(bf16_profile, slow_hw, cluster, 8, 512, 256).evaluate(1, 1, 1)
    assert slow.metrics["ttft_s"] > 1.5 * fast.metrics["ttft_s"]


def test_whatif_table_notes_the_fp16_pricing(bf16_profile) -> None:
    for serve in (False, True):
        rows = whatif(bf16_profile, ["t4", "v100", "a100-80gb-sxm"], [1, 8], serve=serve)
        assert all(r.plan for r in rows), [r.reason for r in rows]
        text = format_whatif(rows, serve=serve)
        assert "note: bf16 unsupported on t4" in text and "note: bf16 unsupported on v100" in text
        assert "unsupported on a100" not in text


def test_a_device_with_neither_16_bit_peak_is_a_clear_error(bf16_profile) -> None:
    hw = _without_half(load_hardware("t4"))
    for serve in (False, True):
        with pytest.raises(HardwareError) as info:
            plan_parallel(bf16_profile, hw, 8, serve=serve)
        msg = str(info.value)
        assert "'fp32-only'" in msg and "NVIDIA T4" in msg
        assert "'bfloat16'" in msg and "'float16'" in msg
        assert "[device.peak_flops]" in msg and "float32" in msg
