"""Capture: joint graphs of real and fake models, the IR they reduce to, and capture errors."""
from __future__ import annotations

import resource
import time

import pytest
import torch
from torch import nn

from tierplan.ir import Phase, TensorKind
from tierplan.passes.capture import CaptureError, capture
from tierplan.passes.liveness import peak_bytes
from tierplan.zoo import load_model

SMALL = ["mlp", "cnn", "tiny-transformer", "gpt2-tiny", "llama-tiny", "bert-tiny"]


def _trainable_param_placeholders(graph, model):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {t for t, q in graph.meta["param_names"].items() if q in trainable}


@pytest.mark.parametrize("name", SMALL)
def test_training_capture_of_small_models(name):
    model, args, kwargs = load_model(name, training=True)
    captured = capture(model, args, example_kwargs=kwargs, training=True)
    graph = captured.graph
    graph.check()
    # Both phases are there, forward first.
    phases = [op.phase for op in graph.ops]
    assert Phase.FORWARD in phases and Phase.BACKWARD in phases
    assert phases.index(Phase.BACKWARD) > phases.index(Phase.FORWARD)
    # Every trainable parameter has exactly one gradient output, of its shape.
    grad_of = graph.meta["grad_of"]
    params = _trainable_param_placeholders(graph, model)
    assert set(grad_of.values()) == params
    for grad, param in grad_of.items():
        assert graph.tensors[grad].kind is TensorKind.GRADIENT
        assert graph.tensors[grad].shape == graph.tensors[param].shape
        assert grad in graph.outputs
    assert graph.meta["num_parameters"] == sum(p.numel() for p in model.parameters())
    # The loss is the one forward output, a scalar.
    losses = [t for t in graph.outputs if graph.tensors[t].kind is TensorKind.OUTPUT]
    assert [graph.tensors[t].shape for t in losses] == [()]
    # The joint module's node order is the IR's op order.
    fx_ops = [
        n.name for n in captured.joint.graph.nodes
        if n.op == "call_function" and n.target.__name__ != "getitem"
    ]
    assert fx_ops == [op.name for op in graph.ops]


def test_gpt2_small_parameter_count():
    model, args, kwargs = load_model("gpt2", batch_size=1, seq_len=64, training=True, fake=True)
    graph = capture(model, args, example_kwargs=kwargs, training=True).graph
    assert graph.meta["num_parameters"] == 124_439_808
    assert graph.meta["parameter_bytes"] == 124_439_808 * 4
    params = graph.tensors_of_kind(TensorKind.PARAMETER)
    assert all(t.dtype == "float32" for t in params)
    # The LM head is tied to the token embedding: one parameter, one gradient.
    assert sorted(graph.meta["param_names"].values()).count("transformer.wte.weight") == 1
    assert len(graph.meta["grad_of"]) == len(params)


def test_joint_module_computes_the_eager_loss_and_gradients():
    model, args, kwargs = load_model("mlp", batch_size=8, training=True)
    captured = capture(model, args, example_kwargs=kwargs)
    outs = captured.run(captured.real_inputs(model, args, kwargs))
    loss = model(*args, **kwargs)
    loss.backward()
    torch.testing.assert_close(outs[0], loss.detach())
    by_name = dict(model.named_parameters())
    position = {t: i for i, t in enumerate(n.name for n in captured.joint.graph.output_node().args[0] if n is not None)}
    for grad, param in captured.graph.meta["grad_of"].items():
        qualified = captured.graph.meta["param_names"][param]
        torch.testing.assert_close(outs[position[grad]], by_name[qualified].grad)


@pytest.mark.parametrize("name", ["mlp", "tiny-transformer"])
def test_measured_peak_equals_liveness_peak(name):
    from torch.distributed._tools.mem_tracker import MemTracker

    model, args, kwargs = load_model(name, batch_size=4, seq_len=64, training=True)
    captured = capture(model, args, example_kwargs=kwargs, training=True)
    inputs = captured.real_inputs(model, args, kwargs)
    tracker = MemTracker()
    tracker.track_external(*inputs)
    with tracker:
        outs = captured.run(inputs)
    del outs
    measured = sum(dev["Total"] for dev in tracker.get_tracker_snapshot("peak").values())
    predicted = peak_bytes(captured.graph)
    assert abs(measured - predicted) <= 0.02 * predicted, (measured, predicted)


def test_fake_capture_of_a_real_model_matches_its_real_capture():
    model, args, kwargs = load_model("tiny-transformer", batch_size=2, seq_len=16, training=True)
    real = capture(model, args, example_kwargs=kwargs, fake=False).graph
    fake = capture(model, args, example_kwargs=kwargs, fake=True).graph
    assert [(op.target, op.phase) for op in real.ops] == [(op.target, op.phase) for op in fake.ops]
    assert peak_bytes(real) == peak_bytes(fake)


def test_meta_model_is_captured_on_fake_tensors_and_fed_by_a_real_twin():
    meta_model, meta_args, meta_kwargs = load_model("mlp", training=True, fake=True)
    assert next(meta_model.parameters()).device.type == "meta"
    captured = capture(meta_model, meta_args, example_kwargs=meta_kwargs)  # fake=None: detected
    real_model, args, kwargs = load_model("mlp", training=True)
    outs = captured.run(captured.real_inputs(real_model, args, kwargs))
    torch.testing.assert_close(outs[0], real_model(*args, **kwargs).detach())


def test_inference_capture_is_forward_only():
    model, args, kwargs = load_model("gpt2-tiny", training=False)
    captured = capture(model, args, example_kwargs=kwargs, training=False)
    graph = captured.graph
    graph.check()
    assert {op.phase for op in graph.ops} == {Phase.FORWARD}
    assert not graph.meta["grad_of"]
    assert TensorKind.ACTIVATION not in {t.kind for t in graph.tensors.values()}
    logits = graph.tensors[graph.outputs[0]]
    assert logits.shape == (2, 32, 1000) and logits.kind is TensorKind.OUTPUT
    outs = captured.run(captured.real_inputs(model, args, kwargs))
    with torch.no_grad():
        torch.testing.assert_close(outs[0], model(*args, **kwargs).logits)


def test_module_paths_are_recorded_in_both_phases():
    model, args, kwargs = load_model("tiny-transformer", batch_size=2, seq_len=16, training=True)
    graph = capture(model, args, example_kwargs=kwargs).graph
    qkv = [op for op in graph.ops if op.module == "blocks.2.attn.qkv"]
    assert {op.phase for op in qkv} == {Phase.FORWARD, Phase.BACKWARD}
    assert any(op.target == "aten.addmm.default" for op in qkv)


def test_loss_field_of_a_dict_output_is_the_loss():
    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            y = self.lin(x)
            return {"logits": y, "loss": y.square().mean()}

    graph = capture(DictOut(), (torch.randn(2, 4),)).graph
    (loss,) = [t for t in graph.outputs if graph.tensors[t].kind is TensorKind.OUTPUT]
    assert graph.tensors[loss].shape == ()
    assert graph.op(graph.tensors[loss].producer).target == "aten.mean.default"


class _Gate(nn.Module):
    def __init__(self, branchy: bool) -> None:
        super().__init__()
        self.branchy = branchy

    def forward(self, x):
        if self.branchy and x.sum() > 0:  # data-dependent control flow
            return x * 2
        return x


class _Layer(nn.Module):
    def __init__(self, branchy: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.gate = _Gate(branchy)

    def forward(self, x):
        return self.gate(self.lin(x))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Layer(branchy=(i == 2)) for i in range(4)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x.sum()


@pytest.mark.parametrize("fake", [False, True])
def test_data_dependent_control_flow_names_the_module(fake):
    with pytest.raises(CaptureError) as err:
        capture(_Net(), (torch.randn(2, 4),), fake=fake)
    message = str(err.value)
    assert "'layers.2.gate'" in message
    assert "data-dependent" in message
    assert "torch.cond" in message


def test_value_dependent_shape_names_the_op():
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x)
            return y[y > 0].sum()

    with pytest.raises(CaptureError, match="nonzero.*depends on tensor values"):
        capture(Masked(), (torch.randn(2, 4),))


def test_training_capture_without_a_loss_says_what_to_return():
    with pytest.raises(CaptureError, match="scalar loss.*training=False"):
        capture(nn.Linear(4, 4), (torch.randn(2, 4),))
    model, args, kwargs = load_model("gpt2-tiny", training=False)  # no labels: no .loss
    with pytest.raises(CaptureError, match="labels="):
        capture(model, args, example_kwargs=kwargs, training=True)


def test_real_inputs_rejects_a_different_model():
    model, args, kwargs = load_model("mlp", training=True)
    captured = capture(model, args, example_kwargs=kwargs)
    other, args2, kwargs2 = load_model("mlp", batch_size=3, training=True)
    with pytest.raises(CaptureError, match="captured as"):
        captured.real_inputs(other, args2, kwargs2)


@pytest.mark.slow
def test_llama_70b_shape_captures_on_fake_tensors_quickly():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    model, args, kwargs = load_model("llama-70b", training=True, fake=True)
    captured = capture(model, args, example_kwargs=kwargs, training=True)
    seconds = time.perf_counter() - start
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    graph = captured.graph
    assert graph.meta["num_parameters"] == 68_976_648_192
    assert graph.meta["parameter_bytes"] == 2 * 68_976_648_192  # bf16
    assert len(graph.meta["grad_of"]) == len(graph.tensors_of_kind(TensorKind.PARAMETER))
    assert seconds < 120, f"capture took {seconds:.0f} s"  # ~30 s on 2 cores
    assert grown_kib < 4 * 2**20, f"capture grew the RSS by {grown_kib / 2**20:.1f} GiB"
