"""The optimizer step pass: states, one update op per parameter, FLOPs, purity, errors."""
from __future__ import annotations

import pytest

from tierplan.ir import GraphError, Phase, TensorKind
from tierplan.passes.capture import capture
from tierplan.passes.liveness import check_schedule, peak_bytes
from tierplan.passes.optimizer import add_optimizer_step, optimizer_spec
from tierplan.zoo import load_model


@pytest.fixture(scope="module")
def graph():
    model, args, kwargs = load_model("llama-tiny", training=True, fake=True)
    return capture(model, args, example_kwargs=kwargs).graph


def _params(graph):
    return [graph.tensors[n] for n in graph.inputs if graph.tensors[n].kind is TensorKind.PARAMETER]


def test_adamw_adds_two_fp32_states_and_one_op_per_parameter(graph):
    stepped = add_optimizer_step(graph, "adamw")
    stepped.check()
    check_schedule(stepped, [op.name for op in stepped.ops])
    params = _params(graph)
    opt_ops = stepped.ops_in_phase(Phase.OPTIMIZER)
    assert len(opt_ops) == len(params)
    assert stepped.ops[: len(graph.ops)] == graph.ops  # appended after the backward
    numel = sum(_numel(p.shape) for p in params)
    assert stepped.total_bytes(TensorKind.OPTIMIZER_STATE) == 2 * 4 * numel
    grad_for = {p: g for g, p in graph.meta["grad_of"].items()}
    for op in opt_ops:
        param = graph.tensors[op.inputs[0]]
        assert op.inputs[1] == grad_for[param.name]
        states = [stepped.tensors[s] for s in op.inputs[2:]]
        assert [s.kind for s in states] == [TensorKind.OPTIMIZER_STATE] * 2
        assert all(s.dtype == "float32" and s.shape == param.shape for s in states)
        assert op.flops == 14 * _numel(param.shape)
        # Written in place: the outputs alias the parameter and the states.
        assert [stepped.tensors[o].storage for o in op.outputs] == op.inputs[:1] + op.inputs[2:]
        assert all(stepped.tensors[o].nbytes == 0 for o in op.outputs)


def test_states_are_live_over_the_whole_step(graph):
    stepped = add_optimizer_step(graph, "adam")
    states = stepped.total_bytes(TensorKind.OPTIMIZER_STATE)
    assert peak_bytes(stepped) >= peak_bytes(graph) + states


def test_sgd_states(graph):
    with_momentum = add_optimizer_step(graph, "sgd")
    states = with_momentum.tensors_of_kind(TensorKind.OPTIMIZER_STATE)
    assert len([s for s in states if not s.is_view]) == len(_params(graph))  # one buffer each
    assert all(s.storage in with_momentum.inputs for s in states)  # updates alias it
    plain = add_optimizer_step(graph, "sgd", momentum=0.0)
    assert plain.tensors_of_kind(TensorKind.OPTIMIZER_STATE) == []
    op = plain.ops_in_phase(Phase.OPTIMIZER)[0]
    assert op.flops == 2 * _numel(plain.tensors[op.inputs[0]].shape)


def test_flop_counts_per_element():
    assert optimizer_spec("adamw").flops_per_element == 14
    assert optimizer_spec("adam").flops_per_element == 13
    assert optimizer_spec("adam", weight_decay=0.1).flops_per_element == 15
    assert optimizer_spec("sgd").flops_per_element == 4


def test_pass_is_pure(graph):
    before = graph.to_dict()
    add_optimizer_step(graph)
    assert graph.to_dict() == before


def test_errors(graph):
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        add_optimizer_step(graph, "lion")
    with pytest.raises(GraphError, match="already has an optimizer"):
        add_optimizer_step(add_optimizer_step(graph), "sgd")
    model, args, kwargs = load_model("mlp", training=False, fake=True)
    inference = capture(model, args, example_kwargs=kwargs, training=False).graph
    with pytest.raises(GraphError, match="training=True"):
        add_optimizer_step(inference)


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n
