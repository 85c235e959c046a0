"""Op time by roofline: an op costs its launch overhead plus the larger of its compute time and
its memory time, each at a derated peak.

    t(op) = launch + max(flops / (peak[dtype] * compute_efficiency),
                         (bytes_read + bytes_written) / (memory_bandwidth * memory_efficiency))

An op that neither computes nor moves bytes (a view, a reshape) costs nothing: it launches no
kernel. The roofline ignores caches, fusion and overlap between kernels; it is the first-order
model the planner needs to trade recompute against transfers, and calibration (calibrate.py)
replaces the spec-sheet peaks with measured ones when that matters.

Convolutions (``CONV_OPS``, forward and backward) run at ``Device.conv_efficiency`` of that rate:
``tierplan calibrate`` measures it (small convolutions on a CPU reach about half a large matmul's
rate); 1 in the presets, which have no measured ratio.

Which peak applies: matmul-like ops (mm, bmm, addmm, convolution, fused attention, ...) run on
tensor cores at the rate of their operand dtype; float32 matmuls get the plain "float32" rate
unless the hardware file sets ``allow_tf32 = true`` (PyTorch's default for matmuls is full fp32,
``torch.backends.cuda.matmul.allow_tf32 = False``). Every other op runs on vector units and is
priced at the "float32" rate whatever its dtype: such ops are memory bound, so the rate rarely
decides their time, and the tensor-core rate would overstate them.
"""
from __future__ import annotations

from dataclasses import dataclass

from tierplan.cost_models.hardware import PEAK_FLOPS_KEYS, Device, Hardware
from tierplan.ir import Graph, OpInfo

__all__ = [
    "CONV_OPS",
    "OpCost",
    "TENSOR_CORE_OPS",
    "graph_op_times",
    "is_tensor_core_op",
    "op_base_name",
    "op_cost",
    "op_dtype",
    "op_time",
    "peak_key",
    "peak_key_for",
]

# aten op names (no namespace, no overload) whose FLOPs run on matrix units.
TENSOR_CORE_OPS = frozenset({
    "mm", "bmm", "addmm", "baddbmm", "addbmm", "addmv", "mv", "matmul", "linear", "einsum",
    "convolution", "convolution_backward", "_convolution", "cudnn_convolution",
    "_scaled_mm", "_int_mm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_flash_attention_forward", "_flash_attention_backward",
    "_efficient_attention_forward", "_efficient_attention_backward",
})  # fmt: skip

# aten op names of convolutions, priced at Device.conv_efficiency of the matmul rate.
CONV_OPS = frozenset({
    "convolution", "convolution_backward", "_convolution", "cudnn_convolution", "mkldnn_convolution",
})  # fmt: skip

# Bytes per element of the floating dtypes, to pick an op's narrowest operand.
_FLOAT_WIDTH = {
    "float64": 8, "float32": 4, "bfloat16": 2, "float16": 2,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
}  # fmt: skip


def op_base_name(target: str) -> str:
    """'aten.mm.default', 'aten::mm' and 'torch.ops.aten.mm.default' all give 'mm'."""
    parts = target.replace("::", ".").split(".")
    if parts[:2] == ["torch", "ops"]:
        parts = parts[2:]
    return parts[1] if len(parts) >= 2 else parts[0]


def is_tensor_core_op(target: str) -> bool:
    return op_base_name(target) in TENSOR_CORE_OPS


def peak_key(dtype: str, *, tensor_core: bool, allow_tf32: bool) -> str:
    """The ``Device.peak_flops`` key pricing an op whose operands have torch dtype ``dtype``."""
    if not tensor_core:
        return "float32"
    if dtype.startswith("float8"):
        return "float8"
    if dtype in ("bfloat16", "float16", "float64"):
        return dtype
    if dtype in ("int8", "uint8"):
        return "int8"
    if dtype == "float32" and allow_tf32:
        return "tf32"
    return "float32"


@dataclass(frozen=True)
class OpCost:
    """The roofline of one op: both bounds, so a report can say which one bound it."""

    launch_s: float
    compute_s: float
    memory_s: float

    @property
    def time(self) -> float:
        if self.compute_s == 0 and self.memory_s == 0:
            return 0.0  # a view: no kernel, no launch
        return self.launch_s + max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        """'compute', 'memory', or 'none' for an op that costs nothing."""
        if self.compute_s == 0 and self.memory_s == 0:
            return "none"
        return "compute" if self.compute_s >= self.memory_s else "memory"


def op_cost(op: OpInfo, device: Device, dtype: str) -> OpCost:
    """The roofline of ``op`` on ``device``.

    ``dtype`` is a ``peak_flops`` key ("float32", "tf32", "bfloat16", ...) used as given, or any
    other torch dtype name ("float8_e4m3fn", "int64"), mapped by ``peak_key``.
    """
    nbytes = op.bytes_read + op.bytes_written
    if op.flops < 0 or nbytes < 0:
        raise ValueError(f"op {op.name!r} has negative flops or bytes")
    compute_s = 0.0
    if op.flops:  # a pure data-movement op needs no peak (and the device may lack its dtype's)
        key = dtype if dtype in PEAK_FLOPS_KEYS else peak_key(
            dtype, tensor_core=is_tensor_core_op(op.target), allow_tf32=device.allow_tf32
        )
        compute_s = op.flops / (device.peak(key) * device.compute_efficiency)
        if op_base_name(op.target) in CONV_OPS:
            compute_s /= device.conv_efficiency
    memory_s = nbytes / (device.memory_bandwidth * device.memory_efficiency)
    return OpCost(launch_s=device.launch_overhead_s, compute_s=compute_s, memory_s=memory_s)


def op_time(op: OpInfo, device: Device, dtype: str) -> float:
    """Seconds ``op`` takes on ``device`` by roofline; 0 for an op with no FLOPs and no bytes."""
    return op_cost(op, device, dtype).time


def op_dtype(graph: Graph, op: OpInfo) -> str:
    """The torch dtype that prices ``op``.

    A matmul-like op runs at the rate of its narrowest floating operand (an fp8 GEMM with a bf16
    output is an fp8 GEMM); any other op at its first output's dtype. "float32" when unknown.
    """
    if is_tensor_core_op(op.target):
        floats = [
            graph.tensor(n).dtype
            for n in [*op.inputs, *op.outputs]
            if graph.tensor(n).dtype in _FLOAT_WIDTH
        ]
        if floats:
            return min(floats, key=lambda d: _FLOAT_WIDTH[d])
    for name in [*op.outputs, *op.inputs]:
        return graph.tensor(name).dtype
    return "float32"


def peak_key_for(graph: Graph, op: OpInfo, device: Device) -> str:
    """The ``peak_flops`` key ``graph_op_times`` prices ``op`` at."""
    return peak_key(
        op_dtype(graph, op), tensor_core=is_tensor_core_op(op.target), allow_tf32=device.allow_tf32
    )


def graph_op_times(graph: Graph, hardware: Hardware) -> dict[str, float]:
    """Seconds per op of ``graph`` on ``hardware``'s device, by op name, in graph order."""
    device = hardware.device
    return {op.name: op_time(op, device, peak_key_for(graph, op, device)) for op in graph.ops}
