"""Host updates that start while the backward runs (``update_in_backward=True``, ZeRO-Offload's
overlap): the same results as updating in ``step()``, the reports really made during the run, and
the refusals of what cannot be right with updates before ``step()``."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

import tierplan
from tierplan.codegen.optimizer import (
    HOST,
    NVME,
    DynamicLossScale,
    StatePlacement,
    TieredOptimizer,
)
from tierplan.codegen.runtime import TierplanRuntimeError
from tierplan.compile import compile_plan
from tierplan.zoo import load_model

LR, DECAY = 1e-2, 0.1


@functools.cache
def _compiled_once():
    """gpt2-tiny compiled with AdamW at a budget that puts states on the host, updates during the
    backward; the model as it was before any step; its capture and plan (for references)."""
    model, args, kwargs = load_model("gpt2-tiny")
    model.eval()  # no dropout: every run computes the same gradients
    initial = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=DECAY)
    compiled = tierplan.compile(model, args, example_kwargs=kwargs, memory_budget=0.9, tiers=("host",),
                                optimizer=opt, time_limit=2, update_in_backward=True)
    return compiled, initial, args, kwargs


def _fresh(update_in_backward: bool):
    """A new module running the same plan from the same initial weights."""
    compiled, initial, args, kwargs = _compiled_once()
    model = copy.deepcopy(initial)
    spec = compiled.active
    module = compile_plan(model, spec.captured, spec.plan, update_in_backward=update_in_backward,
                          optimizer=torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=DECAY))
    return module, model, args, kwargs


def _host_updated(module) -> list[torch.Tensor]:
    opt = module.optimizer
    return [p for p in module.model.parameters() if opt.placement(p).update == HOST]


def _assert_same(a, b) -> None:
    """Bitwise the same weights and optimizer states (the same CPU kernels ran on the same values)."""
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), name
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for index in sa:
        assert sa[index].keys() == sb[index].keys()
        for key, value in sa[index].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[index][key])), (index, key)


def test_updates_during_the_backward_equal_updates_in_step():
    overlapped, _, args, kwargs = _fresh(True)
    plain, _, _, _ = _fresh(False)
    host = _host_updated(overlapped)
    assert host, "the plan at this budget updates some parameters on the host"
    # The program reports exactly those gradients; without the option its source is unchanged.
    source = overlapped.source_path.read_text()
    assert source.count("ctx.gradient_ready(") == len(host)
    assert [ln for ln in source.splitlines() if "ctx.gradient_ready(" not in ln] == \
        plain.source_path.read_text().splitlines()
    for _ in range(5):
        for module in (overlapped, plain):
            out = module(*args, **kwargs)
            if module is overlapped:
                # The joint program ran: every host update started during it, none committed yet.
                assert module.optimizer.pending_updates == len(host)
            out.loss.backward()
            module.optimizer.step()
            assert module.optimizer.pending_updates == 0
            module.optimizer.zero_grad()
    _assert_same(overlapped, plain)
    overlapped.optimizer.close()


def test_a_gradient_changed_after_its_report_or_a_dropped_step_is_updated_as_without_the_option():
    overlapped, _, args, kwargs = _fresh(True)
    plain, _, _, _ = _fresh(False)
    for module in (overlapped, plain):
        opt = module.optimizer
        module(*args, **kwargs).loss.backward()
        opt.zero_grad()  # a dropped step: its started updates are thrown away
        (module(*args, **kwargs).loss * 0.5).backward()  # p.grad is not the reported gradient
        opt.step()
        opt.zero_grad()
        module(*args, **kwargs).loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 0.01)  # edits p.grad in place
        opt.step()
        opt.zero_grad()
        module(*args, **kwargs).loss.backward()
        opt.step()
        opt.zero_grad()
    _assert_same(overlapped, plain)


def test_what_cannot_be_right_before_step_is_refused():
    overlapped, model, args, kwargs = _fresh(True)
    opt = overlapped.optimizer
    overlapped(*args, **kwargs).loss.backward()
    with pytest.raises(ValueError, match="clip_grad_norm_ with update_in_backward=True"):
        opt.clip_grad_norm_(1.0)
    # A second backward before step(): gradient accumulation.
    with pytest.raises(TierplanRuntimeError, match="came twice before step.*update_in_backward=False"):
        overlapped(*args, **kwargs)
    opt.zero_grad()
    # fp16-mixed: the loss scale decides whether to step only after the whole backward.
    with pytest.raises(ValueError, match="update_in_backward=True cannot run with a loss scale"):
        TieredOptimizer(torch.optim.AdamW(model.parameters()), master_dtype=torch.float32,
                        loss_scale=DynamicLossScale(), update_in_backward=True)
    half = copy.deepcopy(model).half()
    with pytest.raises(ValueError, match="update_in_backward=True cannot run with precision='fp16-mixed'"):
        tierplan.compile(half, args, example_kwargs=kwargs, precision="fp16-mixed", update_in_backward=True,
                         optimizer=torch.optim.AdamW(half.parameters()))
    with pytest.raises(ValueError, match="needs optimizer="):
        tierplan.compile(model, args, example_kwargs=kwargs, update_in_backward=True)


def test_a_background_update_error_surfaces_at_step_with_nothing_committed():
    overlapped, model, args, kwargs = _fresh(True)
    opt = overlapped.optimizer
    before = [p.detach().clone() for p in model.parameters()]

    def broken(slot, hyper, host):
        raise RuntimeError("the host update failed")

    opt._speculate = broken  # what the listener hands the background thread
    overlapped(*args, **kwargs).loss.backward()
    with pytest.raises(RuntimeError, match="the host update failed"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.state_dict()["state"] == {} and opt.pending_updates == 0
    del opt._speculate
    opt.zero_grad()
    overlapped(*args, **kwargs).loss.backward()
    opt.step()  # the next step runs normally
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_direct_reports_with_host_and_nvme_states(tmp_path):
    """The optimizer alone: gradients reported by hand, states on the host and on NVMe."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    twin = copy.deepcopy(model)
    x, y = torch.randn(5, 8), torch.randn(5, 4)

    def optimizer(m: torch.nn.Module, overlap: bool) -> TieredOptimizer:
        params = list(m.parameters())
        tiers = [HOST, NVME, HOST, NVME]
        placements = {p: StatePlacement(states=t, update=HOST) for p, t in zip(params, tiers)}
        return TieredOptimizer(torch.optim.Adam(m.parameters(), lr=LR), placements, swap_root=tmp_path,
                               update_in_backward=overlap)

    overlapped, plain = optimizer(model, True), optimizer(twin, False)
    for _ in range(3):
        for m, opt in ((model, overlapped), (twin, plain)):
            params = list(m.parameters())
            grads = torch.autograd.grad(torch.nn.functional.mse_loss(m(x), y), params)
            for p, g in zip(params, grads):
                opt.gradient_ready(p, g)  # a no-op without the option
                p.grad = g
            assert opt.pending_updates == (len(params) if opt is overlapped else 0)
            opt.step()
            opt.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    sa, sb = overlapped.state_dict()["state"], plain.state_dict()["state"]
    assert all(torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])) for i in sa for k in sa[i])
    # No staged file is left behind, and close() stops the background thread.
    assert not list(tmp_path.rglob("*.next"))
    overlapped.close()
    assert overlapped._worker is None


def test_the_plan_prices_updates_that_start_in_the_backward():
    """update_in_backward=True plans the step the runtime then runs (plan_update's
    overlap_backward). Priced on one schedule: on a GPU, host updates start when their gradient
    is made and the whole step is shorter; on the CPU the host update runs on the cores the
    backward uses, so nothing starts before the schedule ends. compile plans it so."""
    from tierplan.placement.optimizer_step import plan_update

    compiled, _, _, _ = _compiled_once()
    assert compiled.plan.update.overlap_backward
    graph = compiled.plan.graph
    for hardware in ("h100-sxm", "cpu"):
        kw = dict(hardware=hardware, memory_budget=0.7, tiers=("host",), optimizer="adamw", time_limit=2)
        assert tierplan.plan_graph(graph, update_in_backward=True, **kw).update.overlap_backward
        plan = tierplan.plan_graph(graph, **kw)
        after = plan.update
        assert not after.overlap_backward
        during = plan_update(plan, after.rates, optimizer="adamw", precision=after.precision, overlap_backward=True)
        host = [p for p, where in during.update_on.items() if where == HOST]
        assert host, "the budget puts some update on the host"
        first = min(t.start_s for t in during.tasks if t.param in host)
        if hardware == "cpu":
            assert first >= plan.predicted_time_s
            assert during.step_time_s <= after.step_time_s * (1 + 1e-9)
        else:
            assert first < plan.predicted_time_s  # an update starts while the backward runs
            assert during.step_time_s < after.step_time_s


def test_cli_plans_the_overlapped_step_and_refuses_it_without_a_training_update(tmp_path, capsys):
    import json

    from tierplan.cli.commands import main

    out = tmp_path / "plan.json"
    assert main(["plan", "gpt2-tiny", "--hardware", "h100-sxm", "--budget", "0.7", "--time-limit", "2",
                 "--update-in-backward", "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["update"]["overlap_backward"] is True
    for extra in (["--inference"], ["--optimizer", "none"], ["--generate", "4"]):
        assert main(["plan", "gpt2-tiny", "--update-in-backward", "--quiet", *extra]) != 0
        assert "--update-in-backward" in capsys.readouterr().err
