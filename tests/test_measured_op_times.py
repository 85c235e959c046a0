"""Op times measured on the machine (cost_models.measured): every op of a captured graph timed in
place, without side effects, and priced in place of the roofline by plan_graph and compile."""
from __future__ import annotations

import pytest
import torch

from tierplan.api import plan_graph
from tierplan.compile import compile as tierplan_compile
from tierplan.cost_models.measured import measure_op_times
from tierplan.passes.capture import capture
from tierplan.placement.pricing import machine_pricing
from tierplan.zoo import load_model


def _captured(name: str, batch: int, seq: int):
    model, args, kwargs = load_model(name, batch_size=batch, seq_len=seq)
    if name != "cnn":
        model.eval()
    return model, args, kwargs, capture(model, args, example_kwargs=kwargs)


def test_every_op_is_timed_and_nothing_changes() -> None:
    """cnn's batch norms write their running statistics and count batches (in-place ops of the
    graph): measuring leaves the buffers and the random stream as they were."""
    model, args, kwargs, captured = _captured("cnn", 4, 16)
    inputs = captured.real_inputs(model, args, kwargs)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    rng = torch.random.get_rng_state()
    times = measure_op_times(captured.joint, inputs, repeats=2)
    calls = {n.name for n in captured.joint.graph.nodes if n.op == "call_function"}
    assert set(times) == calls
    assert {op.name for op in captured.graph.ops} <= set(times)  # the IR's ops, by name
    assert all(t > 0 for t in times.values())
    assert any(n.target._schema.is_mutable for n in captured.joint.graph.nodes
               if isinstance(n.target, torch._ops.OpOverload))  # the case this test is about
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), name
    assert torch.equal(torch.random.get_rng_state(), rng)
    with pytest.raises(ValueError, match="repeats=0"):
        measure_op_times(captured.joint, inputs, repeats=0)


def test_measured_times_replace_the_roofline_in_pricing_and_plans() -> None:
    _, _, _, captured = _captured("gpt2-tiny", 2, 32)
    graph = captured.graph
    roofline = machine_pricing(graph, _cpu(), tiers=("host",), training=True).op_time_s
    first, last = graph.ops[0].name, graph.ops[-1].name
    measured = {first: 0.5, last: 0.25}
    priced = machine_pricing(graph, _cpu(), tiers=("host",), training=True, measured_op_s=measured).op_time_s
    assert priced[first] == 0.5
    # The step's cost stays on the last op, on top of its measured time.
    assert priced[last] == pytest.approx(0.25 + roofline[last] - _op_alone(graph, last))
    assert all(priced[op.name] == roofline[op.name] for op in graph.ops[1:-1])

    slow = {op.name: 1e-3 for op in graph.ops}
    plan = plan_graph(graph, hardware="cpu", memory_budget=1.0, tiers=("host",), optimizer="none", op_times=slow)
    step = plan.predicted_time_s
    assert step == pytest.approx(len(graph.ops) * 1e-3 + roofline[last] - _op_alone(graph, last))


def test_compile_plans_with_measured_op_times_and_equals_eager() -> None:
    model, args, kwargs = load_model("gpt2-tiny", batch_size=2, seq_len=32)
    model.eval()
    compiled = tierplan_compile(model, args, example_kwargs=kwargs, memory_budget=0.7, op_times="measured")
    # Priced by times of this machine, not the cpu preset's roofline: the plan's op times differ.
    roofline = machine_pricing(compiled.plan.graph, _cpu(), tiers=("host",), training=True).op_time_s
    assert compiled.plan.pricing.op_time_s != roofline
    out = compiled(*args, **kwargs).loss
    out.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model(*args, **kwargs).loss.backward()
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="op_times='fast'"):
        tierplan_compile(model, args, example_kwargs=kwargs, memory_budget=0.7, op_times="fast")


def _cpu():
    from tierplan.cost_models.hardware import load_hardware

    return load_hardware("cpu")


def _op_alone(graph, name: str) -> float:
    """The last op's price without the step's cost: its roofline plus the issue cost."""
    hw = _cpu()
    from tierplan.cost_models.compute import graph_op_times

    return graph_op_times(graph, hw)[name] + hw.runtime.op_issue_s


def test_compile_says_when_the_unplanned_step_does_not_fit_for_timing(monkeypatch) -> None:
    """Timing runs the step at keep-all: where that runs out of device memory, compile names the
    setting and the way out instead of a bare out-of-memory error."""
    import importlib

    compile_module = importlib.import_module("tierplan.compile")  # the module (tierplan.compile is the function)

    def out_of_memory(*_, **__):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(compile_module, "measure_op_times", out_of_memory)
    model, args, kwargs = load_model("gpt2-tiny", batch_size=2, seq_len=32)
    with pytest.raises(RuntimeError, match="op_times='roofline'"):
        tierplan_compile(model, args, example_kwargs=kwargs, memory_budget=0.7, op_times="measured")
