"""Roofline op times and alpha-beta transfer times, against hand-computed values."""
from __future__ import annotations

import dataclasses

import pytest

from tierplan.cost_models.compute import (
    graph_op_times,
    is_tensor_core_op,
    op_base_name,
    op_cost,
    op_dtype,
    op_time,
    peak_key,
)
from tierplan.cost_models.hardware import HardwareError, Link, load_hardware
from tierplan.cost_models.transfer import (
    concurrent_bandwidth,
    tier_bandwidth,
    tier_route,
    tier_transfer_time,
    transfer_time,
)
from tierplan.ir import Graph, OpInfo, TensorInfo, TensorKind, link_users

H100 = load_hardware("h100-sxm")
# The H100 SXM preset's figures, restated so the expected values below can be checked by hand.
BF16, FP32, TF32 = 989.5e12, 67e12, 494.5e12  # FLOP/s
HBM = 3.35e12  # bytes/s
COMPUTE_EFF, MEMORY_EFF, LAUNCH = 0.81, 0.9, 5e-6


def mm_op(n: int, itemsize: int, target: str = "aten.mm.default") -> OpInfo:
    return OpInfo(
        name="mm", target=target, inputs=["a", "b"], outputs=["c"],
        flops=2 * n**3, bytes_read=2 * n * n * itemsize, bytes_written=n * n * itemsize,
    )  # fmt: skip


def test_preset_constants_are_the_ones_restated_here() -> None:
    d = H100.device
    assert (d.peak_flops["bfloat16"], d.peak_flops["float32"], d.peak_flops["tf32"]) == (
        BF16, FP32, TF32,
    )  # fmt: skip
    assert (d.memory_bandwidth, d.compute_efficiency, d.memory_efficiency) == (HBM, 0.81, 0.9)
    assert d.launch_overhead_s == pytest.approx(LAUNCH)


def test_big_matmul_is_compute_bound() -> None:
    op = mm_op(8192, 2)
    cost = op_cost(op, H100.device, "bfloat16")
    # 2 * 8192^3 = 1.0995e12 FLOP at 989.5e12 * 0.81 FLOP/s = 1.3718 ms;
    # 3 * 8192^2 * 2 B = 402.7 MB at 3.35e12 * 0.9 B/s = 0.1336 ms.
    assert cost.compute_s == pytest.approx(2 * 8192**3 / (BF16 * COMPUTE_EFF))
    assert cost.compute_s == pytest.approx(1.3718e-3, rel=1e-4)
    assert cost.memory_s == pytest.approx(3 * 8192**2 * 2 / (HBM * MEMORY_EFF))
    assert cost.memory_s == pytest.approx(1.3355e-4, rel=1e-4)
    assert cost.bound == "compute"
    assert op_time(op, H100.device, "bfloat16") == pytest.approx(LAUNCH + 1.3718e-3, rel=1e-4)


def test_elementwise_add_is_memory_bound() -> None:
    n = 2**26  # float32 elements: two 256 MiB inputs, one 256 MiB output
    op = OpInfo(name="add", target="aten.add.Tensor", inputs=["a", "b"], outputs=["c"],
                flops=n, bytes_read=2 * 4 * n, bytes_written=4 * n)  # fmt: skip
    cost = op_cost(op, H100.device, "float32")
    # 805.3 MB at 3.015e12 B/s = 267.1 us; 67.1 MFLOP at 54.27 TFLOP/s = 1.24 us.
    assert cost.memory_s == pytest.approx(12 * n / (HBM * MEMORY_EFF))
    assert cost.memory_s == pytest.approx(2.6710e-4, rel=1e-4)
    assert cost.compute_s == pytest.approx(n / (FP32 * COMPUTE_EFF))
    assert cost.bound == "memory"
    assert op_time(op, H100.device, "float32") == pytest.approx(LAUNCH + 2.6710e-4, rel=1e-4)
    # A torch dtype name that is no peak key maps by peak_key: non-matmul ops at the float32
    # (vector) rate whatever their dtype.
    assert op_cost(op, H100.device, "float8_e4m3fn").compute_s == cost.compute_s
    assert op_cost(op, H100.device, "int64").compute_s == cost.compute_s


def test_views_cost_nothing_and_copies_pay_the_launch() -> None:
    view = OpInfo(name="v", target="aten.view.default", inputs=["a"], outputs=["b"])
    assert op_time(view, H100.device, "float32") == 0.0
    assert op_cost(view, H100.device, "float32").bound == "none"
    copy = OpInfo(name="c", target="aten.clone.default", inputs=["a"], outputs=["b"],
                  bytes_read=1000, bytes_written=1000)  # fmt: skip
    expected = LAUNCH + 2000 / (HBM * MEMORY_EFF)
    assert op_time(copy, H100.device, "float32") == pytest.approx(expected)
    # No FLOPs: no peak needed, even for a dtype the device lacks.
    a100 = load_hardware("a100-80gb-sxm").device
    assert op_time(copy, a100, "float8") > 0


def test_fp32_matmul_uses_the_fp32_peak_unless_tf32_is_allowed() -> None:
    assert peak_key("float32", tensor_core=True, allow_tf32=False) == "float32"
    assert peak_key("float32", tensor_core=True, allow_tf32=True) == "tf32"
    assert peak_key("bfloat16", tensor_core=False, allow_tf32=True) == "float32"
    assert peak_key("float8_e4m3fn", tensor_core=True, allow_tf32=False) == "float8"
    op = mm_op(4096, 4)
    slow = op_time(op, H100.device, "float32")
    tf32_device = dataclasses.replace(H100.device, allow_tf32=True)
    assert op_time(op, tf32_device, "float32") == slow  # a peak key is used as given
    assert op_cost(op, H100.device, "tf32").compute_s == pytest.approx(2 * 4096**3 / (TF32 * 0.81))


def test_op_names() -> None:
    assert op_base_name("aten.mm.default") == "mm"
    assert op_base_name("aten::addmm") == "addmm"
    assert op_base_name("torch.ops.aten.bmm.default") == "bmm"
    assert op_base_name("mm") == "mm"
    assert is_tensor_core_op("aten.convolution.default")
    assert is_tensor_core_op("aten._scaled_dot_product_flash_attention.default")
    assert not is_tensor_core_op("aten.add.Tensor")


def small_graph() -> Graph:
    def t(name: str, dtype: str, kind: TensorKind, storage: str = "") -> TensorInfo:
        nbytes = 0 if storage else 1024 * 1024 * {"float32": 4, "bfloat16": 2}.get(dtype, 1)
        return TensorInfo(name=name, shape=(1024, 1024), dtype=dtype, nbytes=nbytes, kind=kind,
                          storage=storage)  # fmt: skip

    tensors = {x.name: x for x in [
        t("x", "float32", TensorKind.INPUT), t("w", "float32", TensorKind.PARAMETER),
        t("y", "float32", TensorKind.ACTIVATION), t("yv", "float32", TensorKind.ACTIVATION, "y"),
        t("x8", "float8_e4m3fn", TensorKind.INPUT), t("w8", "float8_e4m3fn", TensorKind.PARAMETER),
        t("s", "float32", TensorKind.INPUT), t("q", "bfloat16", TensorKind.OUTPUT),
        t("h", "bfloat16", TensorKind.OUTPUT),
    ]}  # fmt: skip
    mb = 1024 * 1024
    ops = [
        OpInfo("mm", "aten.mm.default", ["x", "w"], ["y"], flops=2 * 1024**3,
               bytes_read=8 * mb, bytes_written=4 * mb),
        OpInfo("view", "aten.view.default", ["y"], ["yv"]),
        OpInfo("smm", "aten._scaled_mm.default", ["x8", "w8", "s"], ["q"], flops=2 * 4096**3,
               bytes_read=2 * mb, bytes_written=2 * mb),
        OpInfo("gelu", "aten.gelu.default", ["q"], ["h"], flops=8 * mb,
               bytes_read=2 * mb, bytes_written=2 * mb),
    ]  # fmt: skip
    link_users(tensors, ops)
    graph = Graph("small", tensors, ops, inputs=["x", "w", "x8", "w8", "s"], outputs=["yv", "h"])
    graph.check()
    return graph


def test_graph_op_times_choose_the_dtype_per_op() -> None:
    graph = small_graph()
    assert [op_dtype(graph, op) for op in graph.ops] == [
        "float32", "float32", "float8_e4m3fn", "bfloat16",
    ]  # fmt: skip
    times = graph_op_times(graph, H100)
    assert list(times) == ["mm", "view", "smm", "gelu"]
    assert times["mm"] == pytest.approx(LAUNCH + 2 * 1024**3 / (FP32 * 0.81))  # not tf32
    assert times["view"] == 0.0
    assert times["smm"] == pytest.approx(LAUNCH + 2 * 4096**3 / (1979e12 * 0.81))  # fp8 peak
    assert times["gelu"] == pytest.approx(LAUNCH + 4 * 2**20 / (HBM * 0.9))
    tf32 = dataclasses.replace(H100, device=dataclasses.replace(H100.device, allow_tf32=True))
    assert graph_op_times(graph, tf32)["mm"] == pytest.approx(LAUNCH + 2 * 1024**3 / (TF32 * 0.81))


def test_missing_dtype_peak_is_a_clear_error() -> None:
    message = "no peak_flops entry for 'float8'.*\\[device.peak_flops\\]"
    with pytest.raises(HardwareError, match=message):
        graph_op_times(small_graph(), load_hardware("a100-80gb-sxm"))


@pytest.mark.parametrize("name", ["cpu", "l4", "mi300x", "rtx4090"])
def test_graph_op_times_on_every_kind_of_device(name: str) -> None:
    graph = small_graph()
    graph.ops.pop(2)  # no fp8 GEMM: the cpu preset has no float8 peak
    graph = Graph(graph.name, graph.tensors, graph.ops, graph.inputs, ["yv"])
    times = graph_op_times(graph, load_hardware(name))
    assert times["mm"] > times["gelu"] > times["view"] == 0


# -- transfers -----------------------------------------------------------------------------------


def test_alpha_beta_transfer_time() -> None:
    pcie = H100.link("device", "host")  # 50 GB/s, 22 GB/s both ways, 10 us
    assert transfer_time(10**9, pcie) == pytest.approx(10e-6 + 1e9 / 50e9)
    assert transfer_time(10**9, pcie, both_ways=True) == pytest.approx(10e-6 + 1e9 / 22e9)
    assert transfer_time(0, pcie) == 0.0
    with pytest.raises(ValueError):
        transfer_time(-1, pcie)
    assert concurrent_bandwidth(pcie) == 22e9


def test_duplex_sharing() -> None:
    full = Link("l", "a", "b", bandwidth=10e9)
    half = dataclasses.replace(full, duplex=False)
    measured = dataclasses.replace(full, concurrent_bandwidth=4e9)
    assert concurrent_bandwidth(full) == 10e9
    assert concurrent_bandwidth(half) == 5e9
    assert concurrent_bandwidth(measured) == 4e9
    assert transfer_time(10**9, half, both_ways=True) == pytest.approx(0.2)
    assert transfer_time(10**9, half) == pytest.approx(0.1)


def test_tier_to_tier_routes() -> None:
    # device -> host -> nvme: alpha = PCIe 10 us + NVMe 50 us; beta = min(PCIe 5 x16 50 GB/s,
    # PCIe 5 x4 15.75 GB/s, host DRAM 614 GB/s, NVMe write 12.7 GB/s) = 12.7 GB/s.
    route = tier_route(H100, "device", "nvme")
    assert [l.name for l in route.links] == ["device-host", "host-nvme"]
    assert route.latency_s == pytest.approx(60e-6)
    assert route.bandwidth == pytest.approx(12.7e9)
    assert tier_transfer_time(H100, 10**9, "device", "nvme") == pytest.approx(60e-6 + 1e9 / 12.7e9)
    assert tier_bandwidth(H100, "nvme", "device") == pytest.approx(14.5e9)  # NVMe read binds
    assert tier_bandwidth(H100, "device", "host") == pytest.approx(50e9)
    assert tier_bandwidth(H100, "device", "host", both_ways=True) == pytest.approx(22e9)
    assert tier_transfer_time(H100, 10**9, "host", "host") == 0.0
    cpu = load_hardware("cpu")  # memcpy "link" is half duplex: one memory bus
    assert tier_bandwidth(cpu, "device", "host", both_ways=True) == pytest.approx(5e9)
