"""What running a plan costs beyond kernels and bytes (RuntimeCosts): calibration measures it on
this machine, pricing charges it as op times and channel latencies, and the CPU runtime copies
between device and host memory on the compute thread with the same results as its worker threads."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from test_cost_models import small_graph
from tierplan.api import plan_graph
from tierplan.codegen import runtime as rt
from tierplan.codegen.runtime import Runtime, TierplanRuntimeError, copy_bytes, keep_freed_memory
from tierplan.compile import compile_plan
from tierplan.cost_models.calibrate import calibrate
from tierplan.cost_models.compute import graph_op_times
from tierplan.cost_models.hardware import Hardware, RuntimeCosts, load_hardware, write_hardware_toml
from tierplan.cost_models.transfer import tier_route
from tierplan.passes.capture import capture
from tierplan.placement.pricing import copy_issue_s, machine_pricing, same_memory, transfer_channels
from tierplan.plans.plan import DEVICE, HOST, NVME, StepKind

# -- calibration ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> tuple[Hardware, float, Path]:
    scratch = tmp_path_factory.mktemp("scratch")
    start = time.perf_counter()
    hw = calibrate("cpu", quick=True, scratch_dir=scratch)
    return hw, time.perf_counter() - start, scratch


def test_runtime_costs_are_measured_positive_and_sane(measured: tuple[Hardware, float, Path]) -> None:
    hw, seconds, scratch = measured
    r = hw.runtime
    assert seconds < 20  # the quick run, new probes included (~2 s on an idle 2-core machine)
    assert list(scratch.iterdir()) == []  # the swap-file probe's directory is gone too
    # A generated program's line costs microseconds, not nothing and not milliseconds.
    assert 1e-7 < r.op_issue_s < 1e-3
    assert r.step_s >= 0 and r.input_s > 0
    assert 1e-6 < r.step_s + 20 * r.input_s < 1e-2  # a 20-input step's wrapper: well under 10 ms
    # An inline copy of 4 KiB is a memmove and a few calls; a worker hand-off or a file costs more.
    assert 1e-8 < r.inline_copy_s < 1e-3
    assert r.thread_copy_s > r.inline_copy_s and r.file_copy_s > r.inline_copy_s
    assert r.file_copy_s < 1.0
    assert r.stream_copy_s == 0.0  # no CUDA here: nothing measured, nothing charged
    assert 0 < hw.device.conv_efficiency <= 1
    for key in ("op_issue_s", "step_s", "input_s", "inline_copy_s", "thread_copy_s", "file_copy_s"):
        assert "measured by tierplan calibrate" in hw.notes[f"runtime.{key}"], key
    # The fixed cost of a copy is the runtime's: the memcpy "link" has none of its own.
    assert hw.link("device", "host").latency_s == 0.0


def test_runtime_costs_round_trip_through_toml(measured: tuple[Hardware, float, Path], tmp_path: Path) -> None:
    hw = measured[0]
    text = write_hardware_toml(hw, tmp_path / "cal.toml").read_text(encoding="utf-8")
    assert "[runtime]" in text and "op_issue_s = " in text and "conv_efficiency = " in text
    loaded = load_hardware(tmp_path / "cal.toml")
    assert loaded == hw and loaded.runtime == hw.runtime


def test_presets_say_where_their_runtime_costs_come_from() -> None:
    cpu = load_hardware("cpu")
    assert cpu.runtime.op_issue_s > 0 and cpu.runtime.inline_copy_s > 0 and cpu.runtime.stream_copy_s == 0
    text = (Path(__file__).parents[1] / "tierplan/cost_models/presets/runtime-gpu.toml").read_text()
    for line in text.splitlines():
        if line.split("=")[0].strip().endswith("_s"):
            assert "# assumed: " in line, line  # every GPU figure says it is assumed, and why
    assert load_hardware("h100-sxm").runtime == RuntimeCosts()  # all 0 there: nothing measured yet


# -- pricing -------------------------------------------------------------------------------------

COSTS = RuntimeCosts(op_issue_s=5e-6, step_s=2e-4, input_s=1e-5, inline_copy_s=3e-6,
                     thread_copy_s=5e-5, stream_copy_s=7e-6, file_copy_s=1e-4)  # fmt: skip


def _with(name: str, costs: RuntimeCosts = COSTS) -> Hardware:
    return dataclasses.replace(load_hardware(name), runtime=costs)


def test_pricing_adds_the_issue_cost_per_op_and_the_step_cost_once() -> None:
    graph = small_graph()
    graph.ops.pop(2)  # no fp8 on a CPU
    hw = _with("cpu")
    roofline = graph_op_times(graph, hw)
    times = machine_pricing(graph, hw, tiers=("host",), training=True).op_time_s
    *first, last = [op.name for op in graph.ops]
    for name in first:  # a view too: it is a line of the program
        assert times[name] == pytest.approx(roofline[name] + COSTS.op_issue_s)
    step = COSTS.step_s + COSTS.input_s * len(graph.inputs)
    assert times[last] == pytest.approx(roofline[last] + COSTS.op_issue_s + step)
    assert sum(times.values()) == pytest.approx(sum(roofline.values()) + len(graph.ops) * COSTS.op_issue_s + step)
    # Without runtime costs pricing is the roofline alone.
    assert machine_pricing(graph, _with("cpu", RuntimeCosts()), tiers=(), training=True).op_time_s == roofline


@pytest.mark.parametrize("name, host_cost", [("cpu", COSTS.inline_copy_s), ("h100-sxm", COSTS.stream_copy_s)])
def test_pricing_adds_the_copy_cost_of_its_queue_as_latency(name: str, host_cost: float) -> None:
    hw = _with(name)
    channels = {(c.src, c.dst): c for c in transfer_channels(hw, (HOST, NVME))}
    for tier, cost in ((HOST, host_cost), (NVME, COSTS.file_copy_s)):
        assert copy_issue_s(hw, tier) == cost
        for src, dst in ((DEVICE, tier), (tier, DEVICE)):
            route = tier_route(hw, src, dst)
            assert channels[src, dst].latency_s == pytest.approx(route.latency_s + cost)
            assert channels[src, dst].bandwidth == route.bandwidth
    # Host memory is the device's own only on a CPU-only machine.
    assert same_memory(hw, HOST) == (name == "cpu") and not same_memory(hw, NVME)


def test_a_plan_pays_the_runtime_costs_it_incurs() -> None:
    model = _Net()
    graph = capture(model, (torch.randn(32, 64), torch.randint(0, 10, (32,)))).graph
    base = plan_graph(graph, hardware=_with("cpu", RuntimeCosts()), tiers=(HOST,))
    costly = plan_graph(graph, hardware=_with("cpu"), tiers=(HOST,))
    assert base.method.startswith("keep-all") and costly.method.startswith("keep-all")
    extra = len(graph.ops) * COSTS.op_issue_s + COSTS.step_s + COSTS.input_s * len(graph.inputs)
    assert costly.predicted_time_s == pytest.approx(base.predicted_time_s + extra)


# -- the CPU runtime: inline copies --------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                                    nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))  # fmt: skip

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.layers(x), y)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_inline_copies_give_the_worker_paths_results() -> None:
    torch.manual_seed(0)
    model, x, y = _Net(), torch.randn(32, 64), torch.randint(0, 10, (32,))
    captured = capture(model, (x, y))
    plans = []
    for budget in (0.6, 0.55, 0.65, 0.7):  # a plan that copies both ways, where the planner makes one
        plans.append(plan_graph(captured.graph, hardware="cpu", memory_budget=budget, tiers=(HOST,),
                                time_limit=2))  # fmt: skip
        if {s.dst for s in plans[-1].schedule if s.kind == StepKind.START_TRANSFER} >= {DEVICE, HOST}:
            break
    plan = next((p for p in plans if {s.dst for s in p.schedule if s.kind == StepKind.START_TRANSFER}
                 >= {DEVICE, HOST}), plans[0])  # fmt: skip
    starts = [s for s in plan.schedule if s.kind == StepKind.START_TRANSFER]
    assert starts, "the plan must copy for this test"
    compiled = compile_plan(model, captured, plan)
    inline = compiled.active.runtime
    assert inline.inline  # the default on the CPU
    seen: list[str] = []
    compiled.on_transfer = lambda ctx, storage: seen.append(storage)

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = compiled(x, y)
        loss.backward()
        return loss.detach().clone(), _grads(model)

    loss_inline, grads_inline = step()
    assert len(seen) == len(starts) and not inline._workers  # every copy made, no thread started
    compiled.active.runtime = Runtime(compiled.program.layout, torch.device("cpu"), inline_copies=False)
    loss_worker, grads_worker = step()
    assert compiled.active.runtime._workers  # the copies went through worker threads
    assert torch.equal(loss_inline, loss_worker)
    assert all(torch.equal(a, b) for a, b in zip(grads_inline, grads_worker))
    model.zero_grad(set_to_none=True)
    expected = nn.functional.cross_entropy(model.layers(x), y)
    expected.backward()
    assert torch.allclose(loss_inline, expected)
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(grads_inline, model.parameters()))
    compiled.active.runtime.close()


@pytest.mark.parametrize("nbytes", [0, 1000, rt._MEMMOVE_BYTES, rt._MEMMOVE_BYTES + 64])
def test_copy_bytes_copies_a_storage_or_a_slot_exactly(nbytes: int) -> None:
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    pool = torch.zeros(2 * nbytes + 64, dtype=torch.uint8)
    slot = pool[32 : 32 + nbytes]
    copy_bytes(slot, src.untyped_storage())  # an offload: the whole storage into its slot
    assert torch.equal(slot, src) and not pool[:32].any() and not pool[32 + nbytes :].any()
    back = torch.empty(nbytes, dtype=torch.uint8)
    copy_bytes(back, slot)  # a fetch: the slot into new device bytes
    assert torch.equal(back, src)


def test_copy_bytes_refuses_sizes_that_differ() -> None:
    with pytest.raises(TierplanRuntimeError, match="a copy of 8 bytes into 4"):
        copy_bytes(torch.empty(4, dtype=torch.uint8), torch.empty(2).untyped_storage())


def test_keeping_freed_memory_is_asked_once_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    first = keep_freed_memory()
    assert isinstance(first, bool) and keep_freed_memory() == first
    monkeypatch.setattr(rt, "_kept_freed_memory", None)
    monkeypatch.setenv("TIERPLAN_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False
