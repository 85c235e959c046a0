"""On a CPU device the host tier is the same DRAM and the runtime copies on the compute thread:
those copies are priced on the compute queue (nothing hides them), by the planner's replay, the
validator, the candidates' windows and the bound alike, and the report says so."""
from __future__ import annotations

import functools

import pytest

from tierplan.cost_models.hardware import load_hardware
from tierplan.passes.capture import capture
from tierplan.placement.baselines import baseline_plans
from tierplan.placement.bound import overhead_lower_bound
from tierplan.placement.pricing import machine_pricing, transfer_channels
from tierplan.plans.plan import COMPUTE_QUEUE, DEVICE, HOST, NVME, StepKind
from tierplan.plans.validate import validate
from tierplan.passes.liveness import peak_bytes
from tierplan.report.text import plan_report
from tierplan.zoo import load_model


@functools.lru_cache(maxsize=None)
def _graph():
    model, args, kwargs = load_model("gpt2-tiny", batch_size=2, seq_len=32)
    model.eval()
    return capture(model, args, example_kwargs=kwargs).graph


def _copy_seconds(plan) -> float:
    total = 0.0
    for step in plan.schedule:
        if step.kind == StepKind.START_TRANSFER:
            total += plan.channel(step.src, step.dst).seconds(plan.graph.tensors[step.tensor].nbytes)
    return total


def test_cpu_host_copies_are_on_the_compute_queue_and_gpu_ones_are_not() -> None:
    cpu = {(c.src, c.dst): c for c in transfer_channels(load_hardware("cpu"), [HOST, NVME])}
    assert cpu[DEVICE, HOST].inline and cpu[HOST, DEVICE].inline
    assert not cpu[DEVICE, NVME].inline and not cpu[NVME, DEVICE].inline  # a swap file's worker
    gpu = transfer_channels(load_hardware("rtx4090"), [HOST])
    assert gpu and not any(c.inline or c.queue == COMPUTE_QUEUE for c in gpu)


@pytest.mark.parametrize("hardware", ["cpu", "rtx4090"])
def test_swap_all_pays_every_inline_copy_whole_and_the_validator_agrees(hardware: str) -> None:
    graph = _graph()
    pricing = machine_pricing(graph, load_hardware(hardware), tiers=[HOST], training=True,
                              budget=peak_bytes(graph))
    swap_all = baseline_plans(graph, pricing)["swap-all"]
    validate(swap_all)  # its own replay reaches the same figures
    copies = _copy_seconds(swap_all)
    assert copies > 0
    if hardware == "cpu":
        # Nothing hides a copy the compute thread makes: exposed time is every copy's whole time.
        assert swap_all.exposed_transfer_s == pytest.approx(copies, rel=1e-9)
    else:
        assert swap_all.exposed_transfer_s < copies  # a copy stream overlaps the compute


def test_bound_stays_below_the_swap_all_plan_on_the_cpu() -> None:
    graph = _graph()
    keep_all_peak = peak_bytes(graph)
    pricing = machine_pricing(graph, load_hardware("cpu"), tiers=[HOST], training=True,
                              budget=int(0.7 * keep_all_peak))
    plans = baseline_plans(graph, pricing)
    bound = overhead_lower_bound(graph, pricing)
    for name, plan in plans.items():
        if plan.peak_bytes[DEVICE] <= pricing.budget:
            assert bound.overhead_s <= plan.overhead_s + 1e-12, name


def test_report_says_host_and_device_are_one_memory_on_a_cpu() -> None:
    graph = _graph()
    for hardware, expected in (("cpu", True), ("rtx4090", False)):
        pricing = machine_pricing(graph, load_hardware(hardware), tiers=[HOST], training=True,
                                  budget=peak_bytes(graph))
        text = plan_report(baseline_plans(graph, pricing)["swap-all"])
        assert ("one memory here" in text) is expected, hardware
