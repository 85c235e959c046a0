"""tierplan.compile end to end on the CPU: numerics against eager, measured peak against the plan,
swap files, and a short training run."""
from __future__ import annotations

import functools
import warnings

import pytest
import torch

from tierplan.api import plan_graph
from tierplan.codegen.measure import StorageTracker
from tierplan.compile import compile, compile_plan
from tierplan.passes.capture import capture
from tierplan.planner.plan import DEVICE, InfeasibleBudget, StepKind
from tierplan.units import format_bytes
from tierplan.zoo import load_model

MODELS = ["mlp", "cnn", "tiny-transformer", "gpt2-tiny", "llama-tiny", "bert-tiny"]
BUDGETS = [None, 0.9, 0.75]  # None: keep-all (the whole device); fractions of the keep-all peak
SIZES = {"mlp": (8, 1), "cnn": (4, 16), "tiny-transformer": (2, 32)}  # (batch, seq/side)


def _build(name: str):
    batch, seq = SIZES.get(name, (2, 32))
    model, args, kwargs = load_model(name, batch_size=batch, seq_len=seq)
    if name != "cnn":
        model.eval()  # dropout off: eager and compiled must draw nothing random (cnn keeps BN in train)
    return model, args, kwargs


@functools.lru_cache(maxsize=None)
def _captured(name: str):
    model, args, kwargs = _build(name)
    return capture(model, args, example_kwargs=kwargs)


def captured_peak(captured):
    from tierplan.passes.liveness import peak_bytes

    return peak_bytes(captured.graph)


def _loss(out):
    return out if isinstance(out, torch.Tensor) else out.loss


def _tracker(compiled, flat):
    """A device tracker: caller-owned tensors the plan starts on the device count from the start;
    those it starts on the host, and the host pool, are host memory and never count."""
    plan = compiled.plan
    on_device, on_host = [], [compiled.host_pool]
    for name, t in zip(compiled.program.inputs, flat):
        if name.startswith("tangents"):
            continue  # made by the call, so the tracker sees it allocated
        tier = plan.initial_tiers.get(plan.graph.tensors[name].storage, DEVICE)
        (on_device if tier == DEVICE else on_host).append(t)
    return StorageTracker(existing=on_device, exclude=on_host)


@pytest.mark.parametrize("budget", BUDGETS, ids=["keep-all", "0.9", "0.75"])
@pytest.mark.parametrize("name", MODELS)
def test_compiled_matches_eager_and_plan_peak(name, budget):
    model, args, kwargs = _build(name)
    captured = _captured(name)
    try:
        plan = plan_graph(captured.graph, hardware="cpu", memory_budget=budget, tiers=("host",), time_limit=2)
    except InfeasibleBudget as exc:
        # mlp at 0.75: parameters dominate and the planner cannot reach the budget. The error must
        # say the smallest budget it can meet; the program is then checked at that budget.
        assert exc.min_feasible_bytes is not None and exc.min_feasible_bytes > exc.budget_bytes, exc
        warnings.warn(f"{name} at {budget}: {format_bytes(exc.budget_bytes)} is infeasible; the planner's "
              f"smallest feasible budget is {format_bytes(exc.min_feasible_bytes)} (keep-all "
                      f"{format_bytes(captured_peak(captured))}), tested at that budget instead")
        assert exc.min_feasible_bytes <= captured_peak(captured)
        plan = plan_graph(captured.graph, hardware="cpu", memory_budget=exc.min_feasible_bytes,
                          tiers=("host",), time_limit=2)
    compiled = compile_plan(model, captured, plan)

    flat = compiled.flat_inputs(args, kwargs)
    tracker = _tracker(compiled, flat)
    with tracker:
        loss = compiled(*args, **kwargs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    expected = _loss(model(*args, **kwargs))
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")

    predicted = plan.peak_bytes[DEVICE]
    assert tracker.peak_bytes <= plan.budget_bytes, (tracker.peak_bytes, plan.budget_bytes)
    assert abs(tracker.peak_bytes - predicted) <= 0.02 * predicted, (tracker.peak_bytes, predicted)


def _nvme_compiled(tmp_path):
    model, args, kwargs = _build("gpt2-tiny")
    captured = _captured("gpt2-tiny")
    plan = plan_graph(captured.graph, hardware="cpu", memory_budget=0.75, tiers=("nvme",), time_limit=2)
    if not any(s.kind == StepKind.START_TRANSFER and s.dst == "nvme" for s in plan.schedule):
        pytest.skip("the planner swapped nothing to nvme at this budget")
    return model, args, kwargs, compile_plan(model, captured, plan, debug_dir=tmp_path)


def test_nvme_swap_matches_eager_and_leaves_no_file(tmp_path):
    model, args, kwargs, compiled = _nvme_compiled(tmp_path)
    written = []
    compiled.on_transfer = lambda ctx, storage: written.append(ctx.swap_dir)
    loss = compiled(*args, **kwargs)
    loss.backward()
    assert written, "no transfer ran"
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected = _loss(model(*args, **kwargs))
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6)
    assert not any((tmp_path / "swap").iterdir())


def test_interrupt_while_swapping_to_nvme_removes_swap_files(tmp_path):
    model, args, kwargs, compiled = _nvme_compiled(tmp_path)
    seen = []

    def interrupt(ctx, storage):
        ctx._pending[-1].done.result()  # let the write land, so there is a file to clean up
        seen.extend(ctx.swap_dir.iterdir())
        raise KeyboardInterrupt

    compiled.on_transfer = interrupt
    with pytest.raises(KeyboardInterrupt):
        compiled(*args, **kwargs)
    assert seen and all(p.suffix == ".bin" for p in seen)
    assert not any((tmp_path / "swap").iterdir())


def test_runtime_error_names_the_step_and_tensor(tmp_path):
    from tierplan.codegen.runtime import TierplanRuntimeError

    model, args, kwargs = _build("mlp")
    compiled = compile(model, args, example_kwargs=kwargs, hardware="cpu", debug_dir=tmp_path)
    flat = [t.detach() for t in compiled.flat_inputs(args, kwargs)]
    flat[1] = flat[1][:3]  # a wrong-shaped bias reaches the first op that reads it
    with pytest.raises(TierplanRuntimeError, match=r"step \d+ \(compute addmm\) failed at .*\.py:\d+"):
        compiled.run_flat(flat)


def test_adamw_loss_curve_matches_eager():
    import copy

    model, args, kwargs = _build("mlp")
    eager = copy.deepcopy(model)
    compiled = compile(model, args, example_kwargs=kwargs, hardware="cpu", memory_budget=0.9, time_limit=2)
    opt_c = torch.optim.AdamW(compiled.parameters(), lr=1e-3)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        x = torch.randn(args[0].shape, generator=gen)
        y = torch.randint(0, 10, kwargs["labels"].shape, generator=gen)
        loss_c = compiled(x, labels=y)
        loss_c.backward()
        opt_c.step()
        opt_c.zero_grad()
        loss_e = eager(x, labels=y)
        loss_e.backward()
        opt_e.step()
        opt_e.zero_grad()
        assert abs(loss_c.item() - loss_e.item()) <= 1e-4 * abs(loss_e.item())
