"""Baselines priced by the planner's simulator: they validate when they fit, and their shapes are
what their names promise."""
from __future__ import annotations

import pytest

from planner_graphs import channels, random_layered, transformer
from tierplan.placement.baselines import baseline_plans
from tierplan.plans.validate import replay, validate
from tierplan.plans.plan import Pricing

CAPS = {"device": 10**15, "host": 10**15}


def _baselines(graph, times, chans=None):
    return baseline_plans(graph, Pricing(capacities=CAPS, channels=channels() if chans is None else chans,
                                         op_time_s=times, hardware="test", training=True))


@pytest.mark.parametrize("layers", [2, 5])
def test_transformer_baselines_validate(layers) -> None:
    graph, times = transformer(layers, seed=layers)
    plans = _baselines(graph, times)
    assert set(plans) == {"keep-all", "checkpoint-blocks", "swap-all"}
    for name, plan in plans.items():
        validate(plan)
    keep, ckpt, swap = plans["keep-all"], plans["checkpoint-blocks"], plans["swap-all"]
    assert ckpt.peak_bytes["device"] < keep.peak_bytes["device"]
    assert swap.peak_bytes["device"] < keep.peak_bytes["device"]
    assert ckpt.recompute_time_s > 0 and ckpt.exposed_transfer_s == 0
    assert swap.recompute_time_s == 0 and swap.peak_bytes["host"] > 0


def test_checkpoint_recomputes_each_block_once_at_its_first_backward_use() -> None:
    graph, times = transformer(3)
    ckpt = _baselines(graph, times)["checkpoint-blocks"]
    recomputed = [s.op for s in ckpt.schedule if s.kind.value == "recompute"]
    assert len(recomputed) == len(set(recomputed))  # every forward op of a block at most once
    for k in range(3):
        # the block output (x{k+1}, read by the next block) is saved, as torch.utils.checkpoint does
        assert f"add_{k}" not in recomputed
        assert f"mm1_{k}" in recomputed and f"ln_{k}" in recomputed
    assert ckpt.decisions["h1_0"].fate == "recompute"
    assert ckpt.decisions["x1"].fate == "keep"


def test_no_blocks_no_checkpoint_baseline() -> None:
    graph, times = random_layered(20, seed=2)
    plans = _baselines(graph, times)
    assert "checkpoint-blocks" not in plans
    for plan in plans.values():
        validate(plan)


def test_swap_all_on_a_slow_link_exposes_the_copies() -> None:
    graph, times = transformer(3)
    fast = _baselines(graph, times, channels(bandwidth=1e13, latency_s=0.0))["swap-all"]
    slow = _baselines(graph, times, channels(bandwidth=1e8))["swap-all"]
    assert replay(fast).exposed_transfer_s == pytest.approx(0.0, abs=1e-9)
    assert replay(slow).exposed_transfer_s > 0
    assert slow.predicted_time_s > fast.predicted_time_s


# -- torch's activation_memory_budget, priced by tierplan ----------------------------------------


def _captured_tiny():
    zoo = pytest.importorskip("tierplan.zoo")
    from tierplan.cost_models.compute import graph_op_times
    from tierplan.cost_models.hardware import load_hardware
    from tierplan.passes.capture import capture
    from tierplan.placement.pricing import tier_capacities, transfer_channels

    model, args, kwargs = zoo.load_model("gpt2-tiny", batch_size=2, seq_len=32, training=True, fake=True)
    captured = capture(model, args, example_kwargs=kwargs, training=True)
    hw = load_hardware("h100-sxm")
    return (captured, graph_op_times(captured.graph, hw), tier_capacities(hw, ("host",)),
            transfer_channels(hw, ("host",)))


def test_torch_activation_memory_budget_baseline_on_a_captured_model() -> None:
    from tierplan.placement.keep_all import keep_all_plan
    from tierplan.plans.plan import InfeasibleBudget
    from tierplan.placement.solve import solve
    from tierplan.placement.torch_baseline import TorchBudgetBaseline, num_fwd_outputs

    captured, times, caps, chans = _captured_tiny()
    graph = captured.graph
    assert num_fwd_outputs(captured.joint) == 1  # the loss
    baseline = TorchBudgetBaseline(graph, captured.joint, Pricing(capacities=caps, channels=chans,
                                                                  op_time_s=times, hardware="h100-sxm", training=True))
    # torch's default partition (1.0) and its save-little end (0.0) are both valid tierplan plans.
    default, low = baseline.plan(1.0, caps["device"]), baseline.plan(0.0, caps["device"])
    for plan in (default, low):
        validate(plan)
        assert plan.predicted_time_s >= baseline.keep_all.predicted_time_s * (1 - 1e-9)
    assert low.recompute_time_s > default.recompute_time_s
    assert any(d.fate == "recompute" and "torch's partitioner" in d.reason for d in low.decisions.values())
    ka = keep_all_plan(graph, Pricing(capacities=caps, channels=chans,
                                      op_time_s=times, hardware="x", training=True))
    budget = int(ka.keep_all_peak_bytes * 0.75)
    result = baseline.fit(budget, probes=5)
    assert result.probes and result.naive_fraction is not None and result.naive_peak_bytes is not None
    if result.plan is None:
        return
    assert validate(result.plan).peak_bytes["device"] <= budget
    try:
        ours = solve(graph, Pricing(capacities=dict(caps, device=budget), channels=chans,
                                    op_time_s=times, hardware="h100-sxm", training=True), time_limit_s=5)
    except InfeasibleBudget:  # pragma: no cover - torch fits, so tierplan must
        raise AssertionError("torch's plan fits the budget but tierplan's planner says infeasible")
    assert ours.predicted_time_s <= result.plan.predicted_time_s * (1 + 1e-9)
