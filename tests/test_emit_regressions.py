"""Regressions of code generation found through the drop-in paths.

- Dynamic shapes: when torch.compile sees a second input shape it traces the graph again with
  symbolic sizes. Their arithmetic (``add_36 = operator.add(1, s0)``, ``mul_19 = s0 * 8``) is
  fx nodes whose values are SymInts, not tensors; the emitter bound only tensor results, so the
  first view taking such a size failed with ``NameError: name 'mul_19' is not defined`` (first seen
  on T5 under ``tierplan.backend``).
- CXL: a plan whose storages start on or move to a ``cxl`` tier (a CXL memory expander, host
  memory the CPU addresses) was refused; the program now keeps them in the host pool.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import tierplan
from tierplan.api import plan_graph
from tierplan.codegen.emit import EmitError, emit
from tierplan.codegen.runtime import Context, TierplanRuntimeError, in_host_pool
from tierplan.passes.capture import capture
from tierplan.plans.plan import DEVICE, HOST, NVME, StepKind
from tierplan.plans.validate import validate
from tierplan.zoo import load_model

RTOL, ATOL = 1e-5, 1e-6
CXL = "cxl"


def _assert_same_grads(model: nn.Module, eager: nn.Module) -> None:
    for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        if q.grad is None:
            assert p.grad is None or not bool(p.grad.any()), name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")


def _train_and_compare(compiled: Any, model: nn.Module, eager: nn.Module, batches: list[dict[str, Any]],
                       args: tuple[Any, ...] = ()) -> None:
    """One SGD step per batch on the compiled and the eager model; the outputs (loss, and logits
    where the model returns them) and every gradient must agree."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, eager)]
    for batch in batches:
        out = compiled(*args, **batch)
        ref = eager(*args, **batch)
        loss, ref_loss = (out, ref) if isinstance(ref, torch.Tensor) else (out.loss, ref.loss)
        loss.backward()
        ref_loss.backward()
        torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=RTOL, atol=ATOL)
        if not isinstance(ref, torch.Tensor) and getattr(ref, "logits", None) is not None:
            torch.testing.assert_close(out.logits.detach(), ref.logits.detach(), rtol=RTOL, atol=ATOL)
        _assert_same_grads(model, eager)
        for opt in opts:
            opt.step()
            opt.zero_grad()


# -- dynamic shapes under tierplan.backend --------------------------------------------------------


def _t5() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0)
    return transformers.T5ForConditionalGeneration(config).eval()  # dropout off: nothing random


def _t5_batch(batch: int, seq: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(1, 128, (batch, seq)), "labels": torch.randint(1, 128, (batch, seq // 2))}


@pytest.mark.slow  # ~20 s: dynamo and AOTAutograd trace T5's ~1200 ops twice
def test_t5_through_backend_matches_eager_at_a_new_shape() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _t5()
    model = copy.deepcopy(eager)
    tp = tierplan.backend(memory_budget=0.5, time_limit=1)
    compiled = torch.compile(model, backend=tp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The second shape makes dynamo trace again with symbolic sizes: the regression.
        _train_and_compare(compiled, model, eager, [_t5_batch(2, 12), _t5_batch(3, 10)])
    assert [g.kind for g in tp.graphs] == ["training", "training"]
    for g in tp.graphs:
        validate(g.plan)
    static, dynamic = (g.source_path.read_text() for g in tp.graphs)
    assert "ctx.check_planned(" not in static
    assert "ctx.check_planned(" in dynamic and "TARGETS[" in dynamic  # size inputs, size arithmetic
    assert "\n    _ = TARGETS[" not in dynamic  # every size computed is bound to its node's name


class _Flatten(nn.Module):
    """Reshapes by sizes read off its input: under dynamic shapes, SymInt arithmetic feeds a view."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.proj(x).view(b * s, d)
        return torch.tanh(h).sum()


def test_dynamic_graph_binds_its_size_arithmetic_and_checks_its_planned_sizes() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _Flatten()
    model = copy.deepcopy(eager)
    tp = tierplan.backend(hardware="cpu", memory_budget=1.0, time_limit=1)
    compiled = torch.compile(model, backend=tp, dynamic=True)
    xs = [torch.randn(2, 3, 8), torch.randn(4, 5, 8)]
    for x in xs:
        _train_and_compare(compiled, model, eager, [{}], args=(x,))
    sources = [g.source_path.read_text() for g in tp.graphs]
    assert sources and all("ctx.check_planned(" in s for s in sources)
    assert all("\n    _ = TARGETS[" not in s for s in sources)  # ``b * s`` is bound, the view reads it


def test_check_planned_names_the_size_input() -> None:
    Context.check_planned("primals_2", 12, 12)
    with pytest.raises(TierplanRuntimeError, match=r"input primals_2 is 10.*made for primals_2 = 12"):
        Context.check_planned("primals_2", 10, 12)


# -- the cxl tier ---------------------------------------------------------------------------------


def _gpt2_tiny() -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, args, kwargs = load_model("gpt2-tiny", batch_size=2, seq_len=32)
    return model.eval(), args, kwargs  # dropout off: eager and compiled draw nothing random


def _tiers_used(plan: Any) -> set[str]:
    tiers = {t for t in plan.initial_tiers.values()}
    tiers |= {s.dst for s in plan.schedule if s.kind == StepKind.START_TRANSFER}
    return tiers - {DEVICE}


def _compile_on_cxl(hardware: Any, tiers: tuple[str, ...]) -> tuple[Any, nn.Module, nn.Module, tuple, dict]:
    model, args, kwargs = _gpt2_tiny()
    eager = copy.deepcopy(model)
    compiled = tierplan.compile(model, args, example_kwargs=kwargs, hardware=hardware, memory_budget=0.5,
                                tiers=tiers, time_limit=2)
    return compiled, model, eager, args, kwargs


def test_cxl_plan_compiles_validates_and_matches_eager() -> None:
    compiled, model, eager, args, kwargs = _compile_on_cxl("h100-sxm-cxl", (CXL,))
    plan = compiled.plan
    validate(plan)
    assert _tiers_used(plan) == {CXL}
    moves = {(s.src, s.dst) for s in plan.schedule if s.kind == StepKind.START_TRANSFER}
    assert (CXL, DEVICE) in moves  # streamed or prefetched from cxl
    # Every cxl storage has a host-pool slot; nothing goes to a swap file.
    slots = compiled.program.layout.host_slots
    assert {plan.graph.tensors[s.tensor].storage for s in plan.schedule
            if s.kind == StepKind.START_TRANSFER and s.dst == CXL} <= set(slots)
    assert "stage_file" not in compiled.source_path.read_text()
    _train_and_compare(compiled, model, eager, [kwargs, kwargs], args=args)


def test_host_and_cxl_share_the_host_pool() -> None:
    # A small host tier: the plan puts what fits on host and the rest on cxl.
    hardware = tierplan.load_hardware("h100-sxm-cxl").with_tier_capacity(HOST, 64 * 1024)
    compiled, model, eager, args, kwargs = _compile_on_cxl(hardware, (HOST, CXL))
    validate(compiled.plan)
    assert _tiers_used(compiled.plan) == {HOST, CXL}
    _train_and_compare(compiled, model, eager, [kwargs, kwargs], args=args)


def test_cxl_plan_runs_as_a_split_program_under_the_backend() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, args, kwargs = load_model("mlp", batch_size=8, seq_len=1)
    model.eval()  # nothing random: eager and compiled must agree
    eager = copy.deepcopy(model)
    tp = tierplan.backend(hardware="h100-sxm-cxl", memory_budget=0.5, tiers=(CXL,), time_limit=1)
    _train_and_compare(torch.compile(model, backend=tp), model, eager, [kwargs, kwargs], args=args)
    assert any(CXL in _tiers_used(g.plan) for g in tp.graphs)


def test_tiers_in_the_host_pool() -> None:
    assert in_host_pool(HOST) and in_host_pool(CXL)
    assert not in_host_pool(DEVICE) and not in_host_pool(NVME)


def test_a_copy_between_two_offdevice_tiers_is_refused_by_name() -> None:
    model, args, kwargs = _gpt2_tiny()
    captured = capture(model, args, example_kwargs=kwargs)
    plan = plan_graph(captured.graph, hardware="h100-sxm-cxl", memory_budget=0.5, tiers=(CXL,), time_limit=1,
                      optimizer="none")
    index, step = next((i, s) for i, s in enumerate(plan.schedule)
                       if s.kind == StepKind.START_TRANSFER and s.src == CXL)
    # Plans copy between the device and one tier; a hand-edited plan file may not.
    plan.schedule[index] = dataclasses.replace(step, src=HOST, dst=CXL)
    storage = plan.graph.tensors[step.tensor].storage
    with pytest.raises(EmitError, match=rf"step {index} .*: {storage} moves host -> cxl"):
        emit(plan, captured.joint)
