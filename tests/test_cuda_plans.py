"""Plans with host transfers run on a GPU as planned: same numbers as eager, the predicted device
peak, and a graph planned for the GPU from fake tensors equal to the one captured on it.

The CUDA tests (marked ``cuda``) are skipped without a CUDA device; ``pytest -m cuda`` (or
``python bench/gpu_check.py``) runs them on a GPU machine. One CPU test checks the graph
comparison they use.
"""
from __future__ import annotations

import copy
import gc
import inspect

import pytest
import torch

import tierplan
from tierplan.cost_models.hardware import load_hardware
from tierplan.passes.capture import capture
from tierplan.plans.plan import DEVICE, StepKind
from tierplan.zoo import load_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Large enough that the step is more than a few allocator blocks (the measured peak rounds each
# block to 512 bytes), small enough to compile in seconds.
SHAPES = {"gpt2-tiny": (64, 128), "llama-tiny": (64, 128)}
# The measured device peak (torch.cuda.max_memory_allocated, less what is not the model's) is the
# plan's device peak within 5% or 64 KiB, whichever is larger.
PEAK_REL, PEAK_ABS = 0.05, 64 << 10


def _loss(out):
    return out if isinstance(out, torch.Tensor) else out.loss


def _resident_bytes(tensors) -> int:
    """Bytes of the distinct CUDA storages among ``tensors``."""
    seen = {}
    for t in tensors:
        if t.device.type == "cuda":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _on_cuda(name):
    batch, seq = SHAPES[name]
    model, args, kwargs = load_model(name, batch_size=batch, seq_len=seq)
    model.eval().cuda()  # eval: no dropout, so the planned and the eager step compute the same
    return model, tuple(a.cuda() for a in args), {k: v.cuda() for k, v in kwargs.items()}


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_cuda_host_transfers_match_eager_and_the_predicted_peak(name, tmp_path):
    model, args, kwargs = _on_cuda(name)
    eager = copy.deepcopy(model)
    compiled = tierplan.compile(model, args, example_kwargs=kwargs, hardware="h100-sxm", memory_budget=0.6,
                                tiers=("host",), time_limit=2, debug_dir=tmp_path)
    plan = compiled.plan
    transfers = [s for s in plan.schedule if s.kind == StepKind.START_TRANSFER]
    assert transfers, f"{name} at 0.6 of keep-all planned no host transfer ({plan.method})"

    loss = _loss(compiled(*args, **kwargs))  # warm-up: kernels, copy streams, cuBLAS workspace
    loss.backward()
    del loss
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.synchronize()
    # Before the step: what is not the model's (the eager copy, the workspace) does not count;
    # the model's parameters, buffers and inputs on the device do, as in the plan.
    caller = [*model.parameters(), *model.buffers(), *args, *kwargs.values()]
    other = torch.cuda.memory_allocated() - _resident_bytes(caller)
    torch.cuda.reset_peak_memory_stats()
    loss = _loss(compiled(*args, **kwargs))
    loss.backward()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - other
    predicted = plan.peak_bytes[DEVICE]
    assert abs(measured - predicted) <= max(PEAK_REL * predicted, PEAK_ABS), (
        f"{name}: measured device peak {measured} B, plan predicts {predicted} B "
        f"({measured / predicted - 1:+.1%}); {len(transfers)} transfers, {plan.method}")

    expected = _loss(eager(*args, **kwargs))
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-5)
    for (n, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad.to(q.grad.device), q.grad, rtol=1e-4, atol=1e-5, msg=n)


# -- the graph planned for a GPU is the graph captured on it -------------------------------------


def _graph_signature(graph):
    """Per op, in order: its target and the shape, dtype and bytes of each output; then the
    graph's inputs."""
    t = graph.tensors
    ops = [(op.target, tuple((tuple(t[o].shape), t[o].dtype, t[o].nbytes) for o in op.outputs))
           for op in graph.ops]
    return ops, [(tuple(t[i].shape), t[i].dtype) for i in graph.inputs]


def _assert_same_graph(got, want, what):
    (ops_g, in_g), (ops_w, in_w) = _graph_signature(got), _graph_signature(want)
    assert in_g == in_w, f"{what}: the graphs' inputs differ"
    for i, (g, w) in enumerate(zip(ops_g, ops_w)):
        assert g == w, f"{what}: op {i} differs: {g} vs {w} (ops before: {[o[0] for o in ops_w[max(0, i - 3):i]]})"
    assert len(ops_g) == len(ops_w), f"{what}: {len(ops_g)} ops vs {len(ops_w)}"


def _capture_for(name, hardware, *, training):
    """The graph tierplan plans for ``hardware`` without touching it: the model built on the meta
    device, traced on fake tensors. With ``capture(target=...)`` (the GPU's kernels traced on the
    CPU), that; else fake tensors on the hardware's device (needs a CUDA build of torch)."""
    batch, seq = SHAPES[name]
    model, args, kwargs = load_model(name, batch_size=batch, seq_len=seq, fake=True)
    model.train(training)
    if "target" in inspect.signature(capture).parameters:
        return capture(model, args, example_kwargs=kwargs, fake=True, target=hardware)
    return capture(model, args, example_kwargs=kwargs, fake=True, fake_device=load_hardware(hardware).device.kind)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_graph_planned_for_the_gpu_is_the_graph_captured_on_it(name, training):
    """train: dropout, where the CPU's attention kernel differs most from the GPU's."""
    if not torch.cuda.get_device_capability() >= (8, 0):
        pytest.skip("h100-sxm's kernels are sm80+ kernels; this GPU runs others")
    model, args, kwargs = _on_cuda(name)
    model.train(training)
    on_gpu = capture(model, args, example_kwargs=kwargs)
    planned = _capture_for(name, "h100-sxm", training=training)
    _assert_same_graph(planned.graph, on_gpu.graph, f"{name} ({'train' if training else 'eval'})")


def test_graph_signature_real_vs_fake_on_cpu():
    """The comparison above, on the CPU: a model traced on real tensors and the same model built
    on the meta device and traced on fake CPU tensors give the same graph."""
    model, args, kwargs = load_model("gpt2-tiny", batch_size=2, seq_len=16)
    model.eval()
    real = capture(model, args, example_kwargs=kwargs)
    model, args, kwargs = load_model("gpt2-tiny", batch_size=2, seq_len=16, fake=True)
    model.eval()
    fake = capture(model, args, example_kwargs=kwargs, fake=True, fake_device="cpu")
    _assert_same_graph(fake.graph, real.graph, "gpt2-tiny on the CPU")
    ops, _ = _graph_signature(real.graph)
    assert any("mm" in target for target, _ in ops) and all(outs is not None for _, outs in ops)
