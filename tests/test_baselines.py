"""Baselines priced by the planner's simulator: they validate when they fit, and their shapes are
what their names promise."""
from __future__ import annotations

import pytest

from planner_graphs import channels, random_layered, transformer
from tierplan.planner.baselines import baseline_plans
from tierplan.planner.validate import replay, validate

CAPS = {"device": 10**15, "host": 10**15}


def _baselines(graph, times, chans=None):
    return baseline_plans(graph, capacities=CAPS, channels=channels() if chans is None else chans,
                          op_time_s=times, hardware="test", training=True)


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
