"""Capture for a GPU target records the GPU's kernels: fused attention instead of the CPU's math
path, with the fused kernels' saved tensors (output, log-sum-exp, RNG state) and FLOPs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import tierplan
from tierplan.cost_models.compute import graph_op_times, is_tensor_core_op, op_base_name
from tierplan.passes.capture import CaptureError, capture
from tierplan.passes.target_kernels import (
    EFFICIENT,
    FLASH,
    MATH,
    TargetKernels,
    sdpa_backend,
)

B, H, S, D = 2, 4, 128, 16  # batch, heads, sequence, head dim of the small GPT-2 below
EFF, EFF_BWD = "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward"


def _gpt2(batch: int = B, seq: int = S):
    """GPT-2 with attention dropout 0.1 (GPT2Config's default), 2 layers, n_embd 64, on meta."""
    transformers = pytest.importorskip("transformers")
    from tierplan.zoo import build_transformers

    config = transformers.GPT2Config(n_layer=2, n_embd=H * D, n_head=H, vocab_size=1000,
                                     n_positions=seq, attn_pdrop=0.1, bos_token_id=0, eos_token_id=0)
    config.loss_type = "ForCausalLM"
    with torch.device("meta"):
        model, args, kwargs = build_transformers(config, "GPT2LMHeadModel", torch.float32, batch, seq, True)
    model.train(True)
    return model, args, kwargs


def _ops(graph) -> list[str]:
    return [op_base_name(op.target) for op in graph.ops]


def _materialized_seq_by_seq(graph, batch: int = B, heads: int = H, seq: int = S) -> list[str]:
    """Tensors with storage of their own holding batch x heads x seq x seq elements."""
    return [
        t.name for t in graph.tensors.values()
        if t.nbytes > 0 and not t.is_view and math.prod(t.shape) == batch * heads * seq * seq
    ]  # fmt: skip


@pytest.mark.parametrize("hardware", ["h100-sxm", "rtx4090"])
def test_gpt2_for_a_gpu_has_fused_attention_and_no_seq_by_seq_tensor(hardware):
    model, args, kwargs = _gpt2()
    graph = capture(model, args, example_kwargs=kwargs, target=hardware).graph
    graph.check()
    ops = _ops(graph)
    # fp32 on sm80+: the memory-efficient kernel, once per layer each way (flash takes fp16/bf16).
    assert ops.count(EFF) == 2 and ops.count(EFF_BWD) == 2
    assert "_safe_softmax" not in ops and "_softmax_backward_data" not in ops and "bmm" not in ops
    assert _materialized_seq_by_seq(graph) == []
    # What the forward kernel saves: the output, the log-sum-exp (rows padded to 32) and the RNG
    # seed and offset, which the backward reads.
    fwd = next(op for op in graph.ops if op_base_name(op.target) == EFF)
    shapes = [graph.tensor(t).shape for t in fwd.outputs]
    assert shapes == [(B, H, S, D), (B, H, math.ceil(S / 32) * 32), (), ()]
    read_back = {graph.tensor(t).storage for op in graph.ops if op_base_name(op.target) == EFF_BWD
                 for t in op.inputs}  # fmt: skip
    assert {graph.tensor(t).storage for t in fwd.outputs} <= read_back
    # The attention dropout is inside the kernel: only the residual/embedding dropouts remain.
    assert ops.count("native_dropout") == 1 + 2 * 2
    meta = graph.meta["kernels"]
    assert meta["device"] == "cuda" and meta["attention"] == {EFF: 2}
    assert "float32" in meta["attention_choice"][EFFICIENT]


def test_gpt2_for_the_cpu_keeps_the_cpu_graph():
    model, args, kwargs = _gpt2()
    graph = capture(model, args, example_kwargs=kwargs, target="cpu").graph
    ops = _ops(graph)
    assert ops.count("_safe_softmax") == 2 and EFF not in ops and EFF_BWD not in ops
    # The math path's softmax and dropout outputs are batch x heads x seq x seq, saved per layer.
    assert len(_materialized_seq_by_seq(graph)) >= 2 * 2
    assert graph.meta["kernels"]["device"] == "cpu"
    # No target is the tracing machine's kernels too.
    untargeted = capture(model, args, example_kwargs=kwargs).graph
    assert _ops(untargeted) == ops and "kernels" not in untargeted.meta


def test_fused_attention_is_priced_with_flops_and_bytes():
    model, args, kwargs = _gpt2()
    graph = capture(model, args, example_kwargs=kwargs, target="rtx4090").graph
    fwd = next(op for op in graph.ops if op_base_name(op.target) == EFF)
    bwd = next(op for op in graph.ops if op_base_name(op.target) == EFF_BWD)
    assert fwd.flops == 4 * B * H * S * S * D  # QK^T and PV, 2 FLOPs per multiply-add
    assert bwd.flops == 10 * B * H * S * S * D  # torch's formula: 2.5x the forward
    qkv = 3 * B * H * S * D * 4
    bias = B * 1 * S * S * 4  # the additive causal mask, broadcast over heads (a view)
    assert fwd.bytes_read == qkv + bias
    assert fwd.bytes_written == B * H * S * D * 4 + B * H * S * 4 + 8 + 8
    assert is_tensor_core_op(fwd.target) and is_tensor_core_op(bwd.target)
    times = graph_op_times(graph, tierplan.load_hardware("rtx4090"))
    assert times[fwd.name] > 0 and times[bwd.name] > times[fwd.name]


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int, dtype: torch.dtype, *, kv_heads: int | None = None,
                 mask: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.d, self.heads, self.kv_heads, self.mask = d, heads, kv_heads or heads, mask
        self.qkv = nn.Linear(d * heads, d * (heads + 2 * self.kv_heads), dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).split([self.d * self.heads, self.d * self.kv_heads,
                                     self.d * self.kv_heads], dim=-1)  # fmt: skip
        q, k, v = (t.view(b, n, -1, self.d).transpose(1, 2) for t in (q, k, v))
        mask = torch.ones(n, n, dtype=torch.bool).tril() if self.mask else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.1,
                                             is_causal=not self.mask,
                                             enable_gqa=self.kv_heads != self.heads)  # fmt: skip
        return out.float().sum()


def _capture_attention(hardware: str, dtype: torch.dtype, d: int = 16, **kw):
    model = _Attention(d, 2, dtype, **kw)
    x = torch.randn(2, 64, 2 * d, dtype=dtype)
    return capture(model, (x,), target=hardware).graph


def test_bf16_on_sm80_runs_flash_attention_with_its_rng_state():
    graph = _capture_attention("h100-sxm", torch.bfloat16)
    ops = _ops(graph)
    assert "_scaled_dot_product_flash_attention" in ops
    assert "_scaled_dot_product_flash_attention_backward" in ops
    fwd = next(op for op in graph.ops if op_base_name(op.target) == "_scaled_dot_product_flash_attention")
    out, lse, *rest = (graph.tensor(t) for t in fwd.outputs)
    assert out.shape == (2, 2, 64, 16) and out.dtype == "bfloat16"
    assert lse.shape == (2, 2, 64) and lse.dtype == "float32"
    assert [(t.shape, t.dtype) for t in rest[:2]] == [((2,), "uint64"), ((), "uint64")]  # philox
    assert _materialized_seq_by_seq(graph, 2, 2, 64) == []


def test_flash_pads_the_head_dim_to_a_multiple_of_8_as_cuda_does():
    ops = _ops(_capture_attention("h100-sxm", torch.bfloat16, d=20))
    assert "_scaled_dot_product_flash_attention" in ops and "constant_pad_nd" in ops


@pytest.mark.parametrize(
    ("hardware", "dtype", "kw", "backend"),
    [
        ("v100", torch.bfloat16, {}, "_safe_softmax"),  # no bf16 kernels before sm80: math
        ("v100", torch.float16, {}, EFF),  # no flash before sm80
        ("h100-sxm", torch.bfloat16, {"mask": True}, EFF),  # flash takes no mask
        ("h100-sxm", torch.bfloat16, {"kv_heads": 1}, "_scaled_dot_product_flash_attention"),
        ("h100-sxm", torch.float32, {"kv_heads": 1}, "_safe_softmax"),  # efficient: no GQA
        ("mi300x", torch.bfloat16, {}, "_scaled_dot_product_flash_attention"),  # ROCm: CUDA's rules
    ],
)
def test_the_attention_kernel_follows_the_gpu_rules(hardware, dtype, kw, backend):
    assert backend in _ops(_capture_attention(hardware, dtype, **kw))


def test_sdpa_backend_choice():
    def t(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    sm80, sm70 = TargetKernels("cuda", "a", sm80=True), TargetKernels("cuda", "b", sm80=False)
    q = t(2, 8, 128, 64)
    assert sdpa_backend(sm80, q, q, q)[0] == FLASH
    assert sdpa_backend(sm80, q, q, q, attn_mask=t(128, 128))[0] == EFFICIENT
    assert sdpa_backend(sm70, q, q, q)[0] == MATH
    assert sdpa_backend(sm80, t(2, 8, 128, 320), t(2, 8, 128, 320), t(2, 8, 128, 320))[0] == EFFICIENT
    f = t(2, 8, 128, 64, dtype=torch.float32)
    assert sdpa_backend(sm80, f, f, f)[0] == EFFICIENT
    odd = t(2, 8, 128, 18, dtype=torch.float32)
    assert sdpa_backend(sm80, odd, odd, odd)[0] == MATH  # head dim not a multiple of 4
    assert sdpa_backend(sm70, odd, odd, odd)[0] == EFFICIENT  # alignment 1 before sm80
    assert sdpa_backend(sm80, t(2, 128, 64), t(2, 128, 64), t(2, 128, 64))[0] == MATH  # 3-d
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        assert sdpa_backend(sm80, q, q, q)[0] == EFFICIENT
    assert TargetKernels.of("v100").sm80 is False and TargetKernels.of("rtx4090").sm80 is True
    assert not TargetKernels.of("cpu").gpu


def test_sdpa_inside_a_torch_function_is_replaced_too():
    # nn.MultiheadAttention calls SDPA from F.multi_head_attention_forward (Python).
    model = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.1, batch_first=True)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x).sum()

    before = F.scaled_dot_product_attention
    graph = capture(Encoder(), (torch.randn(2, 64, 32),), target="h100-sxm").graph
    assert EFF in _ops(graph) and "_safe_softmax" not in _ops(graph)
    assert F.scaled_dot_product_attention is before


def test_plan_captures_for_its_hardware():
    from tierplan.zoo import load_model

    model, args, kwargs = load_model("gpt2-tiny", training=True, fake=True)
    plan = tierplan.plan(model, args, example_kwargs=kwargs, hardware="rtx4090", time_limit=5)
    assert EFF in _ops(plan.graph)
    plan = tierplan.plan(model, args, example_kwargs=kwargs, hardware="cpu", time_limit=5)
    assert "_safe_softmax" in _ops(plan.graph)


def test_fake_cuda_tensors_are_refused_on_a_cpu_only_torch():
    if torch.cuda._is_compiled():
        pytest.skip("a CUDA build of torch can make fake CUDA tensors")
    model = nn.Linear(4, 4)
    with pytest.raises(CaptureError, match="target="):
        capture(model, (torch.randn(2, 4),), fake=True, fake_device="cuda", training=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (a device check)")
def test_the_target_graph_is_the_graph_captured_on_a_gpu():
    """The CPU trace for this GPU's kernels records what AOTAutograd records on the GPU itself."""
    from collections import Counter

    from tierplan.ir import TensorKind

    model, args, kwargs = _gpt2()
    major, _ = torch.cuda.get_device_capability()
    kernels = TargetKernels("cuda", torch.cuda.get_device_name(), sm80=major >= 8)
    ours = capture(model, args, example_kwargs=kwargs, target=kernels).graph
    real = model.to_empty(device="cuda")
    ids = torch.randint(0, 1000, (B, S), device="cuda")
    gpu = capture(real, (), example_kwargs={"input_ids": ids, "labels": ids.clone()}).graph

    def saved(graph):
        return sorted((t.shape, t.dtype, t.nbytes) for t in graph.tensors.values()
                      if t.kind is TensorKind.ACTIVATION)  # fmt: skip

    assert Counter(_ops(ours)) == Counter(_ops(gpu))
    assert saved(ours) == saved(gpu)
