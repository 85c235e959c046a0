"""The emitter: the generated source, its layout decisions, recompute (with random ops), literals."""
from __future__ import annotations

import math
import re

import pytest
import torch

from tierplan.api import plan_graph
from tierplan.codegen.emit import emit
from tierplan.compile import compile_plan
from tierplan.passes.capture import capture
from tierplan.plans.plan import HOST, StepKind
from tierplan.zoo import load_model


def _setup(name, *, train_mode=False, budget=0.9, tiers=("host",), batch=2, seq=32, hardware="cpu"):
    model, args, kwargs = load_model(name, batch_size=batch, seq_len=seq)
    model.train(train_mode)
    captured = capture(model, args, example_kwargs=kwargs)
    plan = plan_graph(captured.graph, hardware=hardware, memory_budget=budget, tiers=tiers, time_limit=2,
                      optimizer="none")
    return model, args, kwargs, captured, plan


def _grads_after(fn, model):
    model.zero_grad()
    out = fn()
    loss = out if isinstance(out, torch.Tensor) else out.loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_source_has_one_line_per_op_and_cites_decisions(tmp_path):
    model, args, kwargs, captured, plan = _setup("gpt2-tiny", budget=0.75)
    compiled = compile_plan(model, captured, plan, debug_dir=tmp_path)
    source = compiled.source_path.read_text()
    assert compiled.source_path.parent == tmp_path
    assert compiled.source_path.with_suffix(".plan.json").exists()
    compile(source, "generated", "exec")
    for step in plan.schedule:
        if step.kind == StepKind.COMPUTE:
            op = plan.graph.op(step.op)
            target = op.target if op.target.startswith("aten.") else f"torch.ops.{op.target}"
            assert re.search(rf"^    .*\b{re.escape(step.op)}\b.* = {re.escape(target)}\(", source, re.M) or (
                re.search(rf"= {re.escape(target)}\(", source)
            ), step.op
    transfers = [s for s in plan.schedule if s.kind == StepKind.START_TRANSFER]
    assert transfers, "a budget of 0.75 should move something"
    for s in transfers:
        storage = plan.graph.tensors[s.tensor].storage
        reason = plan.decisions[storage].reason
        assert f"# {storage} (" in source and reason in source
        assert f"ctx.start({storage!r}" in source
    # Every line of the schedule maps back to its step, for runtime errors.
    labels = set(compiled.program.line_steps.values())
    assert all(f"step {i} ({s.describe()})" in labels for i, s in enumerate(plan.schedule)
               if s.kind == StepKind.COMPUTE)


def test_host_pool_slots_do_not_overlap_while_live():
    # Planned for a GPU, whose copy stream hides swaps (on the CPU they cost their whole time, so
    # the plan prefers recompute): the host pool's layout is what is under test.
    model, args, kwargs, captured, plan = _setup("gpt2-tiny", budget=0.75, hardware="rtx4090")
    layout = emit(plan, captured.joint).layout
    slots = layout.host_slots
    caller_owned = sum(plan.graph.tensors[s].nbytes for s, t in plan.initial_tiers.items() if t == HOST)
    assert slots and layout.host_pool_bytes >= plan.peak_bytes.get(HOST, 0) - caller_owned
    # Residency intervals on the host, from the schedule.
    live: dict[str, list[int]] = {}
    for i, s in enumerate(plan.schedule):
        if s.kind == StepKind.START_TRANSFER and s.dst == HOST:
            live.setdefault(plan.graph.tensors[s.tensor].storage, [i, len(plan.schedule)])
        if s.kind == StepKind.FREE and s.tier == HOST:
            live[plan.graph.tensors[s.tensor].storage][1] = i
    names = list(slots)
    for a in names:
        for b in names:
            if a >= b:
                continue
            (oa, na), (ob, nb) = slots[a], slots[b]
            overlap_mem = oa < ob + nb and ob < oa + na
            overlap_time = live[a][0] <= live[b][1] and live[b][0] <= live[a][1]
            assert not (overlap_mem and overlap_time), (a, b)


@pytest.mark.parametrize("name", ["gpt2-tiny", "cnn"])
def test_recompute_only_plan_matches_eager(name):
    batch, seq = (2, 32) if name == "gpt2-tiny" else (4, 16)
    model, args, kwargs, captured, plan = _setup(
        name, budget=0.9, tiers=(), batch=batch, seq=seq, train_mode=(name == "cnn"))
    assert any(s.kind == StepKind.RECOMPUTE for s in plan.schedule)
    compiled = compile_plan(model, captured, plan)
    assert "# recompute " in compiled.source_path.read_text()
    got = _grads_after(lambda: compiled(*args, **kwargs), model)
    want = _grads_after(lambda: model(*args, **kwargs), model)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], rtol=1e-5, atol=1e-6)


def test_dropout_draws_the_same_masks_as_eager_even_when_recomputed():
    model, args, kwargs, captured, plan = _setup("gpt2-tiny", train_mode=True, budget=0.9, tiers=())
    compiled = compile_plan(model, captured, plan)
    torch.manual_seed(1)
    got = _grads_after(lambda: compiled(*args, **kwargs), model)
    torch.manual_seed(1)
    want = _grads_after(lambda: model(*args, **kwargs), model)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], rtol=1e-5, atol=1e-6)


def test_literals():
    from tierplan.codegen.emit import _Emitter

    lit = _Emitter.literal.__get__(object.__new__(_Emitter))
    assert lit(torch.float16) == "torch.float16"
    assert lit(torch.device("cpu")) == "DEVICE"
    assert lit(torch.contiguous_format) == "torch.contiguous_format"
    assert lit(-math.inf) == "float('-inf')"
    assert lit([1, (2,), None, True]) == "[1, (2,), None, True]"
