"""Arenas in generated code (issue #5, item 4): one device buffer per program, every planned
storage a view at a packed offset. Numerics against eager, an independent overlap check of every
placement, the measured peak against arena + fallback, the share of bytes placed in the arena."""
from __future__ import annotations

import functools
import re
import warnings

import pytest
import torch

from tierplan.api import plan_graph
from tierplan.codegen.arena import ALIGNMENT, out_variant
from tierplan.codegen.measure import StorageTracker
from tierplan.compile import compile_plan
from tierplan.passes.capture import capture
from tierplan.planner.plan import DEVICE, InfeasibleBudget, StepKind
from tierplan.zoo import load_model

SIZES = {"mlp": (8, 1), "gpt2-tiny": (2, 32)}


def _build(name):
    batch, seq = SIZES[name]
    model, args, kwargs = load_model(name, batch_size=batch, seq_len=seq)
    model.eval()  # dropout off: eager and compiled draw nothing random
    return model, args, kwargs


@functools.lru_cache(maxsize=None)
def _captured(name):
    model, args, kwargs = _build(name)
    return capture(model, args, example_kwargs=kwargs)


@functools.lru_cache(maxsize=None)
def _plan(name, budget=0.75):
    graph = _captured(name).graph
    try:
        return plan_graph(graph, hardware="cpu", memory_budget=budget, tiers=("host",), time_limit=2)
    except InfeasibleBudget as exc:  # mlp: parameters dominate; plan at the smallest feasible budget
        return plan_graph(graph, hardware="cpu", memory_budget=exc.min_feasible_bytes, tiers=("host",),
                          time_limit=2)


def _compiled(name):
    model, args, kwargs = _build(name)
    return model, args, kwargs, compile_plan(model, _captured(name), _plan(name), arena=True)


def _loss(out):
    return out if isinstance(out, torch.Tensor) else out.loss


def _tracker(compiled, flat):
    """Caller-owned tensors the plan starts on the device and the arena count from the start;
    the host pool and caller tensors starting on the host never count."""
    plan = compiled.plan
    on_device, on_host = [compiled.arena], [compiled.host_pool]
    for name, t in zip(compiled.program.inputs, flat):
        if name.startswith("tangents"):
            continue
        tier = plan.initial_tiers.get(plan.graph.tensors[name].storage, DEVICE)
        (on_device if tier == DEVICE else on_host).append(t)
    return StorageTracker(existing=on_device, exclude=on_host)


@pytest.mark.parametrize("name", ["mlp", "gpt2-tiny"])
def test_arena_outputs_and_grads_match_eager_and_peak_is_arena_plus_fallback(name):
    model, args, kwargs, compiled = _compiled(name)
    layout = compiled.program.arena
    assert layout is not None and compiled.arena_bytes == layout.arena_bytes > 0
    assert compiled.arena.numel() == compiled.arena_bytes
    assert "_arena = ctx.arena" in compiled.source_path.read_text()
    model.zero_grad(set_to_none=True)
    want_loss = _loss(model(*args, **kwargs))
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    for run in range(2):  # the second run reuses the arena
        model.zero_grad(set_to_none=True)
        tracker = _tracker(compiled, compiled.flat_inputs(args, kwargs))
        with tracker:
            loss = compiled(*args, **kwargs)
        loss.backward()
        torch.testing.assert_close(loss.detach(), want_loss.detach(), rtol=1e-5, atol=1e-6)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{run} {n}: {m}")
        # Nothing the program allocates in the arena shows up as a new storage: the measured
        # peak is the arena plus what is outside it, as the layout predicts.
        bound = layout.arena_bytes + layout.fallback_peak_bytes
        assert tracker.peak_bytes <= bound, (tracker.peak_bytes, bound)
        assert tracker.peak_bytes >= 0.98 * bound, (tracker.peak_bytes, bound)


def _independent_lifetimes(plan):
    """(storage, first step, last step) of every device allocation the schedule makes, derived
    here from the schedule alone."""
    graph, n = plan.graph, len(plan.schedule)
    live, spans = {}, []
    for i, s in enumerate(plan.schedule):
        if s.kind in (StepKind.COMPUTE, StepKind.RECOMPUTE):
            for t in graph.op(s.op).outputs:
                if graph.tensors[t].storage == t:
                    live[t] = i
        elif s.kind == StepKind.START_TRANSFER and s.dst == DEVICE:
            live[graph.tensors[s.tensor].storage] = i
        elif s.kind == StepKind.FREE and s.tier == DEVICE and graph.tensors[s.tensor].storage in live:
            storage = graph.tensors[s.tensor].storage
            spans.append((storage, live.pop(storage), i))
    spans += [(st, i, n) for st, i in live.items()]
    return spans


_ARENA_VIEW = re.compile(
    r"alias\(_arena, torch\.(\w+), \(([\d, ]*)\), \(([\d, ]*)\), (\d+)\)|_arena\[(\d+):(\d+)\]")


@pytest.mark.parametrize("name", ["mlp", "gpt2-tiny"])
def test_arena_placements_never_overlap_while_live(name):
    model, args, kwargs, compiled = _compiled(name)
    plan, layout = compiled.plan, compiled.program.arena
    spans = {(st, a): b for st, a, b in _independent_lifetimes(plan)}
    placed = [p for p in layout.placements if p.in_arena]
    assert placed
    # Every allocation the layout places is one the schedule makes, with the same lifetime.
    for p in placed:
        assert (p.storage, p.start) in spans and spans[p.storage, p.start] == p.end - 1, p
        dtype = getattr(torch, plan.graph.tensors[p.storage].dtype)
        assert p.offset % ALIGNMENT == 0 and p.offset % dtype.itemsize == 0, p
        assert 0 <= p.offset and p.offset + p.nbytes <= compiled.arena_bytes, p
    # No two storages live at the same time share a byte (checked pairwise).
    for i, a in enumerate(placed):
        for b in placed[i + 1:]:
            live_together = a.start <= b.end - 1 and b.start <= a.end - 1
            share = a.offset < b.offset + b.nbytes and b.offset < a.offset + a.nbytes
            assert not (live_together and share and a.nbytes and b.nbytes), (a, b)
    # Every arena view the generated source makes stays inside the arena.
    views = _ARENA_VIEW.findall(compiled.source_path.read_text())
    assert len(views) >= len(placed) - sum(1 for p in placed if p.nbytes == 0)
    for dtype, shape, stride, offset, lo, hi in views:
        if lo:
            assert int(hi) <= compiled.arena_bytes
            continue
        itemsize = getattr(torch, dtype).itemsize
        dims = [int(x) for x in shape.split(",") if x.strip()]
        strides = [int(x) for x in stride.split(",") if x.strip()]
        end = int(offset) + sum((d - 1) * s for d, s in zip(dims, strides)) + 1
        assert end * itemsize <= compiled.arena_bytes
    # The share of the program's device allocations placed in the arena, for the report.
    ops_in, ops_out = layout.op_counts()
    warnings.warn(f"{name}: {layout.placed_fraction:.1%} of the allocated bytes in the arena, ops "
                  f"{ops_in} in / {ops_out} outside; {layout.summary()}")
    if name == "gpt2-tiny":
        assert layout.placed_fraction > 0.8 and ops_in > 3 * ops_out


def test_out_variants():
    aten = torch.ops.aten
    assert out_variant(aten.mm.default).overload is aten.mm.out
    nll = out_variant(aten.nll_loss_forward.default)
    assert nll.overload is aten.nll_loss_forward.output and nll.outs == ("output", "total_weight")
    assert out_variant(aten.add.Tensor).overload is aten.add.out
    assert out_variant(aten.full.default).overload is aten.full.out  # dtype/device come from out
    assert out_variant(aten.native_layer_norm.default).outs == ("out0", "out1", "out2")
    assert isinstance(out_variant(aten._scaled_dot_product_flash_attention_for_cpu.default), str)
    assert isinstance(out_variant(aten.split.Tensor), str)  # returns a list


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_reserved_memory_is_arena_plus_fallback():
    batch, seq = 8, 256  # large enough that the caching allocator's rounding is small
    model, args, kwargs = load_model("gpt2-tiny", batch_size=batch, seq_len=seq)
    model.eval().cuda()
    args = tuple(a.cuda() for a in args)
    kwargs = {k: v.cuda() for k, v in kwargs.items()}
    captured = capture(model, args, example_kwargs=kwargs)
    plan = plan_graph(captured.graph, hardware="h100-sxm", memory_budget=0.75, tiers=("host",), time_limit=2)
    compiled = compile_plan(model, captured, plan, device="cuda", arena=True)
    loss = compiled(*args, **kwargs)  # warm-up: copy streams, kernels
    loss.backward()
    del loss
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    loss = compiled(*args, **kwargs)
    loss.backward()
    torch.cuda.synchronize()
    layout = compiled.program.arena
    reserved = torch.cuda.max_memory_reserved()
    assert reserved <= 1.01 * (layout.arena_bytes + layout.fallback_peak_bytes), (
        reserved, layout.arena_bytes, layout.fallback_peak_bytes)
