"""tierplan.backend under torch.compile on the CPU: numerics against eager, graph breaks, inference,
optimizer steps, runs in flight at once, and the plans it keeps."""
from __future__ import annotations

import copy
import gc

import pytest
import torch

import tierplan
from tierplan.plans.plan import InfeasibleBudget, StepKind
from tierplan.zoo import load_model

SIZES = {"mlp": (8, 1), "gpt2-tiny": (2, 32)}


def _build(name):
    batch, seq = SIZES[name]
    model, args, kwargs = load_model(name, batch_size=batch, seq_len=seq)
    model.eval()  # dropout off: eager and compiled draw nothing random
    return model, args, kwargs


def _loss(out):
    return out if isinstance(out, torch.Tensor) else out.loss


def _compiled(name, budget=0.9, **options):
    torch._dynamo.reset()
    model, args, kwargs = _build(name)
    eager = copy.deepcopy(model)
    tp = tierplan.backend(hardware="cpu", memory_budget=budget, time_limit=2, **options)
    return model, eager, torch.compile(model, backend=tp), tp, args, kwargs


def _assert_grads_equal(model, eager, scale=1.0):
    for (n, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad * scale, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", ["mlp", "gpt2-tiny"])
def test_loss_and_grads_match_eager_and_plans_validate(name):
    model, eager, compiled, tp, args, kwargs = _compiled(name)
    loss = _loss(compiled(*args, **kwargs))
    loss.backward()
    expected = _loss(eager(*args, **kwargs))
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    _assert_grads_equal(model, eager)

    assert tp.plans and all(g.kind == "training" for g in tp.graphs)
    for g in tp.graphs:
        tierplan.validate(g.plan)
        assert "yield" in g.source_path.read_text()  # one program, paused between fwd and bwd
    main = max(tp.plans, key=lambda p: p.keep_all_peak_bytes)
    assert main.peak_bytes["device"] <= main.budget_bytes
    assert main.budget_bytes < main.keep_all_peak_bytes  # 0.9 of keep-all: the plan had to act
    assert any(s.kind in (StepKind.RECOMPUTE, StepKind.START_TRANSFER) for s in main.schedule)
    if name == "gpt2-tiny":
        # transformers' GPT-2 breaks the graph before its loss function: two subgraphs, each
        # planned on its own; the loss-only one cannot meet 0.9 of its own peak.
        assert len(tp.graphs) == 2
        assert [bool(g.note) for g in tp.graphs] == [False, True]
    assert tp.pending_runs() == 0


def test_optimizer_steps_follow_eager():
    model, eager, compiled, tp, args, kwargs = _compiled("mlp")
    opt_c = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(args[0].shape, generator=gen)
        y = torch.randint(0, 10, kwargs["labels"].shape, generator=gen)
        losses = []
        for m, opt in ((compiled, opt_c), (eager, opt_e)):
            loss = m(x, labels=y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[1])
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert len(tp.graphs) == 1  # new batches of the same shape reuse the compiled graph


def test_inference_under_no_grad_is_planned_and_matches_eager():
    model, eager, compiled, tp, args, kwargs = _compiled("gpt2-tiny", budget=None)
    with torch.no_grad():
        got = compiled(*args, **kwargs)
        want = eager(*args, **kwargs)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)
    assert [g.kind for g in tp.graphs] == ["inference", "inference"]
    assert "yield" not in tp.graphs[0].source_path.read_text()


def test_two_forwards_before_backward_and_a_forward_never_backpropagated():
    model, eager, compiled, tp, args, kwargs = _compiled("mlp")
    first = compiled(*args, **kwargs)
    second = compiled(*args, **kwargs)  # gradient accumulation: two runs paused at once
    assert tp.pending_runs() == 2
    (first + second).backward()
    _loss(eager(*args, **kwargs)).backward()
    _assert_grads_equal(model, eager, scale=2.0)
    assert tp.pending_runs() == 0
    dropped = compiled(*args, **kwargs)  # evaluated with grad on, never backpropagated
    assert tp.pending_runs() == 1
    del dropped
    gc.collect()
    assert tp.pending_runs() == 0


def test_budget_in_bytes_that_cannot_be_met_raises():
    model, eager, compiled, tp, args, kwargs = _compiled("mlp", budget=1_000_000)
    with pytest.raises(Exception) as info:
        compiled(*args, **kwargs)
    assert isinstance(info.value, InfeasibleBudget) or isinstance(info.value.__cause__, InfeasibleBudget) \
        or "InfeasibleBudget" in str(info.value)


def test_checkpoint_baseline_of_the_fidelity_bench_keeps_gradients(monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "fidelity", Path(__file__).parents[1] / "bench" / "fidelity.py")
    fidelity = importlib.util.module_from_spec(spec)
    # Registered while it runs: dataclasses look their module up in sys.modules.
    monkeypatch.setitem(sys.modules, spec.name, fidelity)
    spec.loader.exec_module(fidelity)
    model, args, kwargs = _build("gpt2-tiny")
    _loss(model(*args, **kwargs)).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with fidelity.checkpointed(model) as n_blocks:
        _loss(model(*args, **kwargs)).backward()
    assert n_blocks == model.config.n_layer
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-6)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("tiers", [("host",), ("nvme",)])
def test_cuda_compile_with_transfers_matches_eager(tiers, tmp_path):
    from tierplan.compile import compile

    model, args, kwargs = _build("gpt2-tiny")
    model.cuda()
    args = tuple(a.cuda() for a in args)
    kwargs = {k: v.cuda() for k, v in kwargs.items()}
    eager = copy.deepcopy(model)
    compiled = compile(model, args, example_kwargs=kwargs, hardware="h100-sxm", memory_budget=0.75,
                       tiers=tiers, time_limit=2, debug_dir=tmp_path)
    assert any(s.kind == StepKind.START_TRANSFER for s in compiled.plan.schedule)
    for _ in range(2):  # the second run reuses the pinned pool and the copy streams
        model.zero_grad(set_to_none=True)
        loss = compiled(*args, **kwargs)
        loss.backward()
    expected = _loss(eager(*args, **kwargs))
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-5)
    for (n, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p.grad.to(q.grad.device), q.grad, rtol=1e-4, atol=1e-5)
    if compiled.program.layout.host_pool_bytes:
        assert compiled.host_pool.is_pinned()


@pytest.mark.cuda
@cuda
def test_cuda_backend_matches_eager():
    torch._dynamo.reset()
    model, args, kwargs = _build("gpt2-tiny")
    model.cuda()
    args = tuple(a.cuda() for a in args)
    kwargs = {k: v.cuda() for k, v in kwargs.items()}
    eager = copy.deepcopy(model)
    tp = tierplan.backend(hardware="h100-sxm", memory_budget=0.8, time_limit=2)
    compiled = torch.compile(model, backend=tp)
    _loss(compiled(*args, **kwargs)).backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    loss = _loss(compiled(*args, **kwargs))
    loss.backward()
    torch.cuda.synchronize()
    expected = _loss(eager(*args, **kwargs))
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-5)
    _assert_grads_equal(model, eager)
    assert tp.pending_runs() == 0
