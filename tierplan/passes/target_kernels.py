"""Trace a model with the kernels of the device it is planned for, not the tracing machine's.

Capture runs on fake tensors on the CPU, so a composite op that picks its kernel by device records
the CPU's choice. The one that matters is ``F.scaled_dot_product_attention``: on the CPU, training
with dropout, it falls back to the math path, whose ``_safe_softmax`` and dropout outputs are
batch x heads x seq x seq tensors saved for the backward; CUDA runs the fused flash or
memory-efficient kernel, which saves the output, the log-sum-exp and the RNG seed/offset only.

``target_kernels(kernels)`` is a context manager that, while a model is traced, replaces each SDPA
call by what ATen's CUDA composite calls (``aten/src/ATen/native/transformers/attention.cpp``,
backend choice from ``sdp_utils.cpp``): ``aten._scaled_dot_product_flash_attention`` (head dim
padded to a multiple of 8, as CUDA pads it), ``aten._scaled_dot_product_efficient_attention``
(boolean mask converted to an additive one and expanded to batch x heads), or the math path, each
with the autograd formula and backward op ATen registers for it. The fused ops' fake kernels give
the GPU's output shapes (logsumexp padded to 32 rows for the efficient kernel, philox seed and
offset), so the graph holds what AOTAutograd records on the GPU.

Why not trace on fake CUDA tensors: a CPU-only torch build has no CUDA device guard, and the
autograd engine needs one for every CUDA tensor that requires grad (the process aborts); and even
on a CUDA machine the choice would be that machine's GPU's, not the planned one's. The tensors
stay on the CPU device (codegen maps the capture device to the run device).

The choice follows ``sdp_utils.cpp`` with the default priority (flash, efficient, math; cuDNN
attention comes after math and so is never picked by default) and honours
``torch.backends.cuda.enable_{flash,mem_efficient,math}_sdp``. What the hardware description
cannot say is approximated: a device with a ``bfloat16`` peak counts as sm80+ (Ampere or newer:
flash attention, bf16 kernels, 4-element fp32 GEMM alignment), one without as sm70/75 (no flash,
no bf16); the sm86/89 head-dim limits of flash (> 192 with grad) are not modelled; ROCm devices
follow the CUDA rules.
"""
from __future__ import annotations

import contextlib
import math
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from tierplan.cost_models.hardware import Hardware, load_hardware

__all__ = ["GPU_KINDS", "KernelRecord", "TargetKernels", "sdpa_backend", "target_kernels"]

GPU_KINDS = ("cuda", "rocm")

FLASH = "flash_attention"
EFFICIENT = "efficient_attention"
MATH = "math"

_SDPA = torch._C._nn.scaled_dot_product_attention  # what F.scaled_dot_product_attention is
_FLASH_MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class TargetKernels:
    """The kernel families of the device a graph is captured for."""

    kind: str  # Device.kind: "cuda", "rocm", "cpu", "other"
    name: str = ""  # the hardware's name, for the record
    sm80: bool = True  # Ampere or newer: flash attention, bf16 kernels (see the module docstring)

    @property
    def gpu(self) -> bool:
        return self.kind in GPU_KINDS

    @staticmethod
    def of(target: str | Path | Hardware | TargetKernels) -> TargetKernels:
        """The kernels of a hardware preset name, TOML path, Hardware, or TargetKernels."""
        if isinstance(target, TargetKernels):
            return target
        hw = target if isinstance(target, Hardware) else load_hardware(target)
        return TargetKernels(
            kind=hw.device.kind, name=hw.name, sm80="bfloat16" in hw.device.peak_flops
        )

    def describe(self) -> str:
        if not self.gpu:
            return f"{self.kind} kernels (the tracing machine's)"
        arch = "sm80+" if self.sm80 else "pre-sm80"
        return f"{self.kind} kernels ({self.name or 'generic'}, {arch})"


@dataclass
class KernelRecord:
    """Why the trace chose each SDPA backend it chose: backend -> the first call's reason."""

    reasons: dict[str, str] = field(default_factory=dict)


def sdpa_backend(
    kernels: TargetKernels,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> tuple[str, str]:
    """(backend, reason): the SDPA kernel a ``kernels`` GPU runs for these inputs."""
    flash_why = _flash_refusal(kernels, query, key, value, attn_mask, is_causal, enable_gqa)
    if flash_why is None:
        return FLASH, "fp16/bf16, no mask, head dim <= 256"
    efficient_why = _efficient_refusal(kernels, query, key, value, enable_gqa)
    if efficient_why is None:
        return EFFICIENT, f"flash refused: {flash_why}"
    return MATH, f"flash refused: {flash_why}; efficient refused: {efficient_why}"


def _common_refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> str | None:
    if q.is_nested or k.is_nested or v.is_nested:
        return "nested tensors are not modelled"
    if not (q.dim() == k.dim() == v.dim() == 4):
        return f"inputs are {q.dim()}-d, fused kernels need 4-d (batch, heads, seq, dim)"
    if min(q.shape[2], k.shape[2]) == 0:
        return "an empty sequence"
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return "the last dimension's stride is not 1"
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        return "batch sizes differ"
    heads_q, heads_k, heads_v = q.shape[1], k.shape[1], v.shape[1]
    if heads_q == heads_k == heads_v:
        return None
    if gqa and heads_k == heads_v and heads_q % heads_k == 0:
        return "grouped-query attention"
    return "head counts differ"


def _flash_refusal(kernels, q, k, v, attn_mask, is_causal, enable_gqa) -> str | None:
    if not torch.backends.cuda.flash_sdp_enabled():
        return "disabled (torch.backends.cuda.enable_flash_sdp)"
    if not kernels.sm80:
        return "the device is older than sm80"
    common = _common_refusal(q, k, v, enable_gqa)
    if common is not None and common != "grouped-query attention":
        return common  # flash runs grouped-query attention natively
    if q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        return f"dtype {str(q.dtype).removeprefix('torch.')} (flash takes fp16/bf16)"
    if attn_mask is not None:
        return "an attn_mask is given"
    if not (q.shape[-1] == k.shape[-1] == v.shape[-1]) or q.shape[-1] > _FLASH_MAX_HEAD_DIM:
        return f"head dims {q.shape[-1]}/{k.shape[-1]}/{v.shape[-1]} (flash: equal, <= 256)"
    if is_causal and q.shape[2] != k.shape[2]:
        return "is_causal with different query and key lengths"
    return None


def _efficient_refusal(kernels, q, k, v, enable_gqa) -> str | None:
    if not torch.backends.cuda.mem_efficient_sdp_enabled():
        return "disabled (torch.backends.cuda.enable_mem_efficient_sdp)"
    common = _common_refusal(q, k, v, enable_gqa)
    if common is not None:
        return common  # includes grouped-query attention, which it does not run
    dtypes = (torch.float32, torch.float16, torch.bfloat16) if kernels.sm80 else (
        torch.float32, torch.float16)
    if q.dtype not in dtypes or not (q.dtype == k.dtype == v.dtype):
        return f"dtype {str(q.dtype).removeprefix('torch.')}"
    half = q.dtype in (torch.float16, torch.bfloat16)
    # sdp_utils.cpp minimum_gemm_alignment: 128-bit tensor-core operands, 4 on sm80+ anyway.
    align = 8 if half else (4 if kernels.sm80 else 1)
    if q.shape[-1] != k.shape[-1] or q.shape[-1] % align or v.shape[-1] % align:
        return f"head dims {q.shape[-1]}/{v.shape[-1]} (equal q/k, multiples of {align})"
    return None


# -- the replacement ---------------------------------------------------------------------------


def _gpu_sdpa(
    kernels: TargetKernels,
    record: KernelRecord,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` as ATen's CUDA composite runs it."""
    backend, reason = sdpa_backend(kernels, query, key, value, attn_mask, dropout_p, is_causal,
                                   enable_gqa)  # fmt: skip
    record.reasons.setdefault(backend, reason)
    if backend == MATH:
        # The same composite the CPU runs, minus its own fused kernel.
        with sdpa_kernel([SDPBackend.MATH]):
            return _SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                         enable_gqa=enable_gqa)  # fmt: skip
    if backend == FLASH:
        head_dim = query.shape[-1]
        og_scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
        pad = (-head_dim) % 8
        if pad:
            query, key, value = (F.pad(t, (0, pad)) for t in (query, key, value))
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=og_scale
        )[0]
        return out[..., :head_dim] if pad else out
    bias = attn_mask
    if bias is not None:
        if bias.dtype == torch.bool:  # convert_boolean_attn_mask
            bias = torch.where(bias, torch.scalar_tensor(0.0, dtype=query.dtype),
                               torch.scalar_tensor(-math.inf, dtype=query.dtype))  # fmt: skip
        bias = _preprocess_mask(bias, query, key)
    needs_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, needs_lse, dropout_p, is_causal, scale=scale
    )[0]


def _preprocess_mask(mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """attention.cpp preprocess_mask: a mask whose strides are not 8-aligned is padded in its last
    dim (pad_bias: by 8 - size % 8) and sliced back; then it is expanded to (batch, heads, seq_q,
    seq_k), a view."""
    align = 8
    aligned = all(s % align == 0 for s in mask.stride()[:-1]) and mask.stride(-1) == 1
    if not aligned:
        last = mask.shape[-1]
        mask = F.pad(mask, (0, align - last % align))[..., :last]
    return mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])


class _TargetMode(TorchFunctionMode):
    """Routes every SDPA call of the traced model to ``_gpu_sdpa``. A Python-level torch function
    the mode passes through (``F.multi_head_attention_forward``) runs with the mode off, so its
    own SDPA call is caught by pointing ``torch.nn.functional``'s name at ``_gpu_sdpa`` meanwhile."""

    def __init__(self, sdpa: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.sdpa = sdpa

    def __torch_function__(self, func, types_, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is _SDPA:
            return self.sdpa(*args, **kwargs)
        if isinstance(func, types.FunctionType) and func.__module__ == F.__name__:
            with _functional_sdpa(self.sdpa):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _functional_sdpa(sdpa: Callable[..., torch.Tensor]) -> Iterator[None]:
    old = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = old


# transformers' switch for passing grouped-query attention to SDPA (``enable_gqa=True``) instead of
# repeating the K/V heads first (``integrations/sdpa_attention.py: use_gqa_in_sdpa``).
_TRANSFORMERS_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextlib.contextmanager
def _cpu_grouped_query_attention() -> Iterator[None]:
    """Trace a transformers model's grouped-query attention as one SDPA call with fewer K/V heads.

    transformers passes ``enable_gqa=True`` only when no attention mask is built, and a trace builds
    one whenever the decision to skip it reads data (positions, a padding mask: fake while traced),
    so eager's unpadded step would be traced as ``repeat_kv`` + SDPA. The CPU's flash kernel runs
    grouped-query attention natively, with a mask too: with the switch on, the graph saves K/V with
    their own head count (not repeated) and sums the repeated heads' gradients inside the kernel, as
    eager does (a bf16 autocast step of llama-tiny then equals eager's bitwise; repeated, each
    head's gradient is rounded to bf16 before the sum, 0.3-0.6% apart per step). GPU targets keep
    transformers' choice: with a mask, their flash kernel is refused and the memory-efficient one
    does not run grouped-query attention, so the switch would send them to the math path.
    """
    old = os.environ.get(_TRANSFORMERS_FORCE_GQA)
    os.environ[_TRANSFORMERS_FORCE_GQA] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ[_TRANSFORMERS_FORCE_GQA]
        else:
            os.environ[_TRANSFORMERS_FORCE_GQA] = old


@contextlib.contextmanager
def target_kernels(kernels: TargetKernels | None, record: KernelRecord | None = None) -> Iterator[KernelRecord]:
    """Trace with ``kernels``' attention kernels (a no-op for the CPU or None); yields ``record``
    (a new one by default), which receives why each SDPA backend was chosen."""
    record = KernelRecord() if record is None else record
    if kernels is None or not kernels.gpu:
        with _cpu_grouped_query_attention():
            yield record
        return

    def sdpa(*args: Any, **kwargs: Any) -> torch.Tensor:
        return _gpu_sdpa(kernels, record, *args, **kwargs)

    with _TargetMode(sdpa):
        yield record
