"""The pictures and text of tierplan/report: timeline, trace, plot, report."""
from __future__ import annotations

import dataclasses
import json

import pytest

import tierplan
from tierplan.placement.baselines import baseline_plans
from tierplan.plans.plan import DEVICE, Pricing, StepKind
from tierplan.report.plot import plot_memory
from tierplan.report.text import compare_report, plan_report
from tierplan.report.timeline import timeline
from tierplan.report.trace import COMPUTE_TID, trace_events, write_trace
from tierplan.zoo import load_model


@pytest.fixture(scope="module")
def plans():
    """A tiny transformer's plan under a tight budget, and its baselines (one swaps)."""
    model, args, kwargs = load_model("gpt2-tiny", training=True)
    plan = tierplan.plan(model, args, example_kwargs=kwargs, hardware="rtx4090", memory_budget=0.6,
                         time_limit=5)
    baselines = baseline_plans(plan.graph, Pricing(capacities=plan.capacities, channels=plan.channels,
                                                   op_time_s=plan.op_time_s, hardware=plan.hardware, training=plan.training))
    return plan, baselines


def all_plans(plans):
    plan, baselines = plans
    return [plan, *baselines.values()]


def test_timeline_agrees_with_the_validator(plans) -> None:
    tierplan.validate(plans[0])
    for plan in all_plans(plans):
        # Baselines may not fit the budget: replay them with room to spare.
        roomy = dataclasses.replace(plan, capacities={t: 2**62 for t in plan.capacities})
        replay = tierplan.plans.validate.replay(roomy)
        tl = timeline(plan)
        assert tl.compute[-1].end_s == pytest.approx(replay.time_s, rel=1e-9)
        for tier, peak in replay.peak_bytes.items():
            assert tl.peak(tier) == peak, (plan.method, tier)
        exposed = sum(w.end_s - w.start_s for w in tl.waits)
        assert exposed == pytest.approx(replay.exposed_transfer_s, rel=1e-9, abs=1e-12)
        recompute = sum(e.end_s - e.start_s for e in tl.compute if e.recompute)
        assert recompute == pytest.approx(replay.recompute_time_s, rel=1e-9, abs=1e-12)
        moved: dict[str, int] = {}
        for t in tl.transfers:
            moved[f"{t.src}->{t.dst}"] = moved.get(f"{t.src}->{t.dst}", 0) + t.nbytes
        assert moved == {k: v for k, v in replay.transferred_bytes.items() if v}


def test_swap_all_moves_bytes(plans) -> None:
    """The fixture must exercise transfers, or the trace and plot tests below prove little."""
    swap = plans[1]["swap-all"]
    assert timeline(swap).transfers


def test_trace_is_chrome_trace_json_matching_the_schedule(plans, tmp_path) -> None:
    for plan in all_plans(plans):
        path = write_trace(plan, tmp_path / "t.json")
        document = json.loads(path.read_text())
        events = document["traceEvents"]
        for event in events:
            assert {"name", "ph", "ts", "pid", "tid"} <= set(event), event
            assert event["ph"] in {"X", "C", "M"}
            if event["ph"] == "X":
                assert event["dur"] >= 0 and event["ts"] >= 0
        # The compute track holds exactly the schedule's compute and recompute steps, in order,
        # back to back except where a wait stalls the stream.
        ops = [e for e in events if e["ph"] == "X" and e["tid"] == COMPUTE_TID and e["cat"] != "wait"]
        steps = [(i, s) for i, s in enumerate(plan.schedule) if s.kind in (StepKind.COMPUTE, StepKind.RECOMPUTE)]
        assert [e["name"] for e in ops] == [s.op for _, s in steps]
        assert [e["args"]["step"] for e in ops] == [i for i, _ in steps]
        assert [e["cat"] for e in ops] == [s.kind.value for _, s in steps]
        for e, (_, s) in zip(ops, steps):
            assert e["dur"] == pytest.approx(plan.op_time_s[s.op] * 1e6)
        waits = sum(e["dur"] for e in events if e.get("cat") == "wait")
        end = ops[-1]["ts"] + ops[-1]["dur"]
        assert end == pytest.approx(plan.predicted_time_s * 1e6, rel=1e-9)
        assert sum(e["dur"] for e in ops) + waits == pytest.approx(end, rel=1e-9)
        # Transfers: one event per start_transfer step, never overlapping on a track.
        copies = [e for e in events if e.get("cat") == "transfer"]
        assert len(copies) == sum(s.kind == StepKind.START_TRANSFER for s in plan.schedule)
        by_track: dict[int, list] = {}
        for e in copies:
            by_track.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"]))
        for spans in by_track.values():
            spans.sort()
            assert all(a[1] <= b[0] + 1e-6 for a, b in zip(spans, spans[1:]))
        names = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
        assert "compute stream" in names
        assert any(n.startswith("device -> host") for n in names)
        assert any(n.startswith("host -> device") for n in names)


def test_trace_counters_reach_the_peak(plans) -> None:
    plan = plans[0]
    counters = [e for e in trace_events(plan) if e["ph"] == "C" and e["name"].startswith("device")]
    assert max(sum(e["args"].values()) for e in counters) == plan.peak_bytes[DEVICE]


def test_plot_writes_a_png(plans, tmp_path) -> None:
    plan, baselines = plans
    for name, p in [("plan", plan), ("swap", baselines["swap-all"])]:
        path = plot_memory(p, tmp_path / f"{name}.png", reference=baselines["keep-all"])
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_report_summarizes_blocks_and_decisions(plans) -> None:
    plan, baselines = plans
    text = plan_report(plan, hardware_description="a test machine")
    assert "a test machine" in text
    assert "overhead" in text and "peak per tier" in text and "device budget" in text
    assert "repeated blocks" in text and "structure 0:" in text
    assert "largest storages" in text
    # Bounded size whatever the model: no line per storage.
    assert len(text.splitlines()) < 80
    assert all(line == line.rstrip() for line in text.splitlines())
    table = compare_report(plan, baselines)
    for name in ("keep-all", "swap-all", "this plan"):
        assert name in table


def test_trace_shows_the_optimizer_step_on_its_resources(plans, tmp_path) -> None:
    plan = plans[0]
    assert plan.update is not None and plan.update.tasks
    events = json.loads(write_trace(plan, tmp_path / "t.json").read_text())["traceEvents"]
    tasks = [e for e in events if e.get("cat", "").startswith("optimizer.")]
    assert len(tasks) == len(plan.update.tasks)
    tracks = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    for e, task in zip(tasks, plan.update.tasks):
        assert tracks[e["tid"]] == f"optimizer step: {task.resource}"
        assert e["ts"] == pytest.approx(task.start_s * 1e6)
        assert e["dur"] == pytest.approx((task.end_s - task.start_s) * 1e6)
    end = max(e["ts"] + e["dur"] for e in tasks)
    assert end <= plan.step_time_s * 1e6 * (1 + 1e-9)
