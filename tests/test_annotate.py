"""Annotation: tensors, kinds, storage aliasing, FLOPs and bytes of the IR built from fx graphs."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tierplan.ir import Graph, Phase, TensorKind
from tierplan.passes.capture import capture
from tierplan.zoo import load_model


@pytest.fixture(scope="module")
def tiny():
    model, args, kwargs = load_model("tiny-transformer", training=True)
    return capture(model, args, example_kwargs=kwargs).graph


class _MatMul(nn.Module):
    def __init__(self, k: int, n: int, loss: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(k, n))
        self.loss = loss

    def forward(self, x):
        y = x @ self.w
        return y.sum() if self.loss else y


def test_mm_flops_and_bytes():
    m, k, n = 6, 10, 14
    graph = capture(_MatMul(k, n), (torch.randn(m, k),), training=False).graph
    (mm,) = [op for op in graph.ops if op.target == "aten.mm.default"]
    assert mm.flops == 2 * m * n * k
    assert mm.bytes_read == (m * k + k * n) * 4
    assert mm.bytes_written == m * n * 4


def test_training_mm_flops_cover_forward_and_backward():
    m, k, n = 6, 10, 14
    graph = capture(_MatMul(k, n, loss=True), (torch.randn(m, k),), training=True).graph
    mms = [op for op in graph.ops if op.target == "aten.mm.default"]
    # forward x@w, backward grad_w = x^T @ g (grad_x is not needed: x does not require grad)
    assert [op.phase for op in mms] == [Phase.FORWARD, Phase.BACKWARD]
    assert all(op.flops == 2 * m * n * k for op in mms)


def test_views_own_no_bytes_and_point_at_an_owner(tiny):
    views = [t for t in tiny.tensors.values() if t.is_view]
    assert views
    for t in views:
        assert t.nbytes == 0
        assert not tiny.tensors[t.storage].is_view
    for op in tiny.ops:
        if op.target in ("aten.t.default", "aten.view.default", "aten.transpose.int",
                         "aten.expand.default", "aten._unsafe_view.default", "aten.detach.default"):
            (out,) = op.outputs
            assert tiny.tensors[out].storage == tiny.tensors[op.inputs[0]].storage, op
            assert op.bytes_read == op.bytes_written == 0
    # The transposed weight of a linear layer is a view of the parameter.
    t_ops = [op for op in tiny.ops if op.target == "aten.t.default" and op.phase is Phase.FORWARD]
    assert any(tiny.tensors[op.inputs[0]].kind is TensorKind.PARAMETER for op in t_ops)


def test_multi_output_ops_and_getitem(tiny):
    assert not any("getitem" in op.target for op in tiny.ops)
    ln = next(op for op in tiny.ops if op.target == "aten.native_layer_norm.default")
    assert len(ln.outputs) == 3  # normalized, mean, rstd
    assert tiny.tensors[ln.outputs[0]].shape == (8, 128, 128)
    assert all(tiny.tensors[o].producer == ln.name for o in ln.outputs)


def test_kinds(tiny):
    kinds = {t.kind for t in tiny.tensors.values()}
    assert {TensorKind.PARAMETER, TensorKind.INPUT, TensorKind.ACTIVATION, TensorKind.TEMPORARY,
            TensorKind.OUTPUT, TensorKind.GRADIENT} <= kinds
    phase = {op.name: op.phase for op in tiny.ops}
    for t in tiny.tensors.values():
        if t.kind is TensorKind.ACTIVATION:
            assert phase[t.producer] is Phase.FORWARD
            readers = [u for v in tiny.tensors.values() if v.storage == t.storage for u in v.users]
            assert any(phase[u] is Phase.BACKWARD for u in readers)
        if t.kind is TensorKind.TEMPORARY and not t.is_view:
            assert len({phase[t.producer], *(phase[u] for u in t.users)}) == 1
    # The backward seed is an input; parameters and the batch are inputs of the graph.
    tangents = [n for n, q in tiny.meta["input_names"].items() if q == "tangent"]
    assert len(tangents) == 1 and tiny.tensors[tangents[0]].kind is TensorKind.INPUT
    assert set(tiny.meta["param_names"]) <= set(tiny.inputs)


def test_meta_names_and_grad_mapping(tiny):
    names = tiny.meta["param_names"]
    assert "blocks.0.attn.qkv.weight" in names.values()
    assert tiny.meta["input_names"]["primals_54"] in ("args[0]", "kwargs['labels']")
    for grad, param in tiny.meta["grad_of"].items():
        assert param in names
        assert tiny.tensors[grad].dtype == tiny.tensors[param].dtype


def test_attention_flops_come_from_the_registry(tiny):
    sdpa = [op for op in tiny.ops if "scaled_dot_product" in op.target]
    assert sdpa and all(op.flops > 0 for op in sdpa)
    fwd = next(op for op in sdpa if op.phase is Phase.FORWARD)
    b, h, s, d = 8, 4, 128, 32
    assert fwd.flops == 4 * b * h * s * s * d  # q@k^T and p@v, causality not discounted


def test_graph_round_trips_through_json(tiny):
    again = Graph.from_dict(json.loads(json.dumps(tiny.to_dict())))
    again.check()
    assert again.tensors == tiny.tensors and again.ops == tiny.ops


def test_in_place_buffer_update_aliases_the_buffer():
    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.register_buffer("seen", torch.zeros(4))

        def forward(self, x):
            self.seen.add_(x.sum(0))
            return self.lin(x)

    graph = capture(Counter(), (torch.randn(3, 4),), training=False).graph
    (buffer,) = graph.meta["buffer_names"]
    (copy,) = [op for op in graph.ops if op.target == "aten.copy_.default"]
    (out,) = copy.outputs
    assert graph.tensors[out].storage == buffer
    assert graph.tensors[out].nbytes == 0
    assert copy.bytes_written == 16  # in place: written, though no storage is new


def test_input_passed_twice_is_one_storage():
    model, args, kwargs = load_model("tiny-transformer", batch_size=2, seq_len=16, training=True)
    kwargs["labels"] = args[0]  # the same tensor as input_ids
    graph = capture(model, args, example_kwargs=kwargs).graph
    inputs = [n for n, q in graph.meta["input_names"].items() if q != "tangent"]
    assert len(inputs) == 2
    assert {graph.tensors[n].storage for n in inputs} == {inputs[0]}
