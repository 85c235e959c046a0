"""The schedule walker on hand-built plans: queues, waits, memory per tier, handlers, both policies.

Expected times are written from the rules (one compute stream; a copy starts at
max(issuing clock, its queue's last end) and takes latency + bytes / bandwidth; a wait moves the
clock to the copy's end) so that a change to the walker's arithmetic shows here.
"""
from __future__ import annotations

import pytest

from tierplan.ir import Graph, OpInfo, Phase, TensorInfo, TensorKind, link_users
from tierplan.plans import plan as P
from tierplan.plans.plan import Step, StepKind, compute, free, recompute, start_transfer, wait_transfer
from tierplan.plans.validate import replay
from tierplan.plans.walk import ScheduleWalker, WalkState

MB = 1_000_000
D2H = P.Channel("device", "host", bandwidth=1 * MB, latency_s=0.0, queue="d2h")
H2D = P.Channel("host", "device", bandwidth=2 * MB, latency_s=0.5, queue="h2d")
OP_TIME = {"f": 1.0, "g": 0.5, "s": 0.25, "b": 1.0}


def graph() -> Graph:
    """x (input, 1 MB), w (param, 2 MB) -f-> h (4 MB), v a view of h; v -g-> r (4 MB);
    r -s-> loss (4 B); backward v, x -b-> gw (2 MB)."""
    tensors = {
        "x": TensorInfo("x", (250_000,), "float32", 1 * MB, TensorKind.INPUT),
        "w": TensorInfo("w", (500_000,), "float32", 2 * MB, TensorKind.PARAMETER),
        "h": TensorInfo("h", (1_000_000,), "float32", 4 * MB, TensorKind.ACTIVATION),
        "v": TensorInfo("v", (1000, 1000), "float32", 0, TensorKind.ACTIVATION, storage="h"),
        "r": TensorInfo("r", (1_000_000,), "float32", 4 * MB, TensorKind.TEMPORARY),
        "loss": TensorInfo("loss", (), "float32", 4, TensorKind.OUTPUT),
        "gw": TensorInfo("gw", (500_000,), "float32", 2 * MB, TensorKind.GRADIENT),
    }
    ops = [
        OpInfo("f", "aten.mm.default", ["x", "w"], ["h", "v"], Phase.FORWARD),
        OpInfo("g", "aten.relu.default", ["v"], ["r"], Phase.FORWARD),
        OpInfo("s", "aten.sum.default", ["r"], ["loss"], Phase.FORWARD),
        OpInfo("b", "aten.mm.default", ["v", "x"], ["gw"], Phase.BACKWARD),
    ]
    link_users(tensors, ops)
    g = Graph("walk", tensors, ops, inputs=["x", "w"], outputs=["loss", "gw"])
    g.check()
    return g


def walker(schedule: list[Step], cls: type[ScheduleWalker] = ScheduleWalker, *, strict: bool = True,
           channels: list[P.Channel] | None = None, tiers: tuple[str, ...] = ("device", "host")) -> ScheduleWalker:
    return cls(graph(), schedule, capacities={t: 100 * MB for t in tiers},
               channels=[D2H, H2D] if channels is None else channels, op_time_s=OP_TIME,
               initial_tiers={"x": "device", "w": "device"}, strict=strict)


# h goes to the host after g, comes back for the backward.
SWAP = [
    compute("f"),  # 0: clock 1.0
    start_transfer("h", "device", "host"),  # 1: d2h from 1.0, 4 MB at 1 MB/s -> 5.0
    compute("g"),  # 2: clock 1.5
    wait_transfer("h", "host"),  # 3: clock 5.0
    free("v", "device"),  # 4: names the view: the walker frees its storage h
    compute("s"),  # 5: clock 5.25
    free("r", "device"),  # 6
    start_transfer("h", "host", "device"),  # 7: h2d from 5.25, 0.5 + 4 MB / 2 MB/s -> 7.75
    wait_transfer("h", "device"),  # 8: clock 7.75
    compute("b"),  # 9: clock 8.75
    free("h", "device"),  # 10
    free("h", "host"),  # 11
]


class Recorder(ScheduleWalker):
    """Records every handler call (after the shared bookkeeping) and every new peak."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[int, str, str]] = []
        self.copies: list[tuple[str, float, float]] = []
        self.clocks: list[float] = []
        self.peaks: list[tuple[int, str, int]] = []

    def on_compute(self, index: int, step: Step, op: OpInfo) -> float:
        seconds = super().on_compute(index, step, op)
        self.calls.append((index, "op", op.name))
        self.clocks.append(self.state.clock)
        return seconds

    def on_start_transfer(self, index: int, step: Step, storage: str) -> tuple[str, float, float]:
        window = super().on_start_transfer(index, step, storage)
        self.calls.append((index, "start", storage))
        self.copies.append(window)
        self.clocks.append(self.state.clock)
        return window

    def on_wait(self, index: int, step: Step, storage: str) -> float | None:
        end = super().on_wait(index, step, storage)
        self.calls.append((index, "wait", storage))
        self.clocks.append(self.state.clock)
        return end

    def on_free(self, index: int, step: Step, storage: str) -> None:
        super().on_free(index, step, storage)
        self.calls.append((index, "free", storage))
        self.clocks.append(self.state.clock)

    def on_peak(self, index: int, tier: str) -> None:
        self.peaks.append((index, tier, self.state.peak[tier]))


def test_handlers_see_every_step_once_in_order_with_its_storage() -> None:
    w = walker(SWAP, Recorder)
    w.run()
    g = w.graph
    expected = []
    for index, step in enumerate(SWAP):
        if step.kind in (StepKind.COMPUTE, StepKind.RECOMPUTE):
            expected.append((index, "op", step.op))
        else:
            what = {StepKind.START_TRANSFER: "start", StepKind.WAIT_TRANSFER: "wait", StepKind.FREE: "free"}
            expected.append((index, what[step.kind], g.tensors[step.tensor].storage))
    assert w.calls == expected
    assert (4, "free", "h") in w.calls  # the step names the view v


def test_swap_times_follow_the_rules() -> None:
    w = walker(SWAP, Recorder)
    state = w.run()
    out = (D2H.latency_s + 4 * MB / D2H.bandwidth)
    back = (H2D.latency_s + 4 * MB / H2D.bandwidth)
    assert w.copies == [("d2h", 1.0, 1.0 + out), ("h2d", 5.25, 5.25 + back)]
    assert w.clocks == [1.0, 1.0, 1.5, 1.0 + out, 5.0, 5.25, 5.25, 5.25, 5.25 + back, 6.25 + back, 6.25 + back,
                        6.25 + back]
    assert state.clock == pytest.approx(8.75)
    assert state.compute_s == pytest.approx(2.75) and state.recompute_s == 0.0
    assert state.exposed_s == pytest.approx((1.0 + out - 1.5) + back)
    assert state.pending == {}
    assert state.queue_free == {"d2h": 1.0 + out, "h2d": 5.25 + back}


def test_the_walker_agrees_with_the_independent_validator() -> None:
    w = walker(SWAP)
    state = w.run()
    plan = P.Plan(graph=w.graph, schedule=SWAP, capacities={"device": 100 * MB, "host": 100 * MB},
                  channels=[D2H, H2D], op_time_s=OP_TIME, initial_tiers={"x": "device", "w": "device"},
                  hardware="test", training=True)
    checked = replay(plan)
    assert checked.peak_bytes == state.peak
    assert checked.time_s == pytest.approx(state.clock)
    assert checked.exposed_transfer_s == pytest.approx(state.exposed_s)


def test_bytes_and_storages_per_tier_after_frees() -> None:
    w = walker(SWAP, Recorder)
    state = w.run()
    sizes = {n: w.graph.tensors[n].nbytes for n in w.graph.tensors}
    assert state.held == {"device": {"x", "w", "loss", "gw"}, "host": set()}
    assert state.used == {"device": sizes["x"] + sizes["w"] + sizes["loss"] + sizes["gw"], "host": 0}
    # Device peak: x, w, h and r together while g runs (step 2); the host holds h from step 1.
    assert state.peak == {"device": 11 * MB, "host": 4 * MB}
    assert (2, "device", 11 * MB) in w.peaks and (1, "host", 4 * MB) in w.peaks
    assert all(index >= 0 for index, _, _ in w.peaks)  # the inputs' placement is not a step's peak


def test_a_second_copy_on_a_busy_queue_starts_when_the_first_ends() -> None:
    schedule = [
        compute("f"), compute("g"),  # clock 1.5; h and r on the device
        start_transfer("h", "device", "host"),
        start_transfer("r", "device", "host"),  # same queue: behind h
        start_transfer("w", "device", "host"),  # behind r
        wait_transfer("h", "host"), wait_transfer("r", "host"), wait_transfer("w", "host"),
    ]
    w = walker(schedule, Recorder)
    w.run()
    (q1, b1, e1), (q2, b2, e2), (q3, b3, e3) = w.copies
    assert q1 == q2 == q3 == "d2h"
    assert b1 == 1.5 and e1 == 1.5 + 4 * MB / D2H.bandwidth
    assert b2 == e1 and e2 == e1 + 4 * MB / D2H.bandwidth
    assert b3 == e2 and e3 == e2 + 2 * MB / D2H.bandwidth
    assert w.state.clock == e3  # the waits move the clock to the last copy's end


def test_copies_on_different_queues_run_together() -> None:
    h2d_only = P.Channel("host", "device", bandwidth=2 * MB, latency_s=0.5, queue="h2d")
    schedule = [
        compute("f"),  # clock 1.0
        start_transfer("h", "device", "host"),  # d2h: 1.0 -> 5.0
        wait_transfer("h", "host"), free("h", "device"),  # clock 5.0
        start_transfer("h", "host", "device"),  # h2d: 5.0 -> 7.5
        start_transfer("w", "device", "host"),  # d2h, idle since 5.0: starts at the clock
        wait_transfer("h", "device"), wait_transfer("w", "host"),
    ]
    w = walker(schedule, Recorder, channels=[D2H, h2d_only])
    w.run()
    assert w.copies[1] == ("h2d", 5.0, 7.5)
    assert w.copies[2] == ("d2h", 5.0, 5.0 + 2 * MB / D2H.bandwidth)
    assert w.state.clock == 7.5


@pytest.mark.parametrize("busy_s", [0.5, 10.0])
def test_a_wait_advances_the_clock_only_by_what_is_left_of_the_copy(busy_s: float) -> None:
    times = dict(OP_TIME, g=busy_s)
    schedule = [compute("f"), start_transfer("h", "device", "host"), compute("g"), wait_transfer("h", "host")]
    w = ScheduleWalker(graph(), schedule, capacities={"device": 100 * MB, "host": 100 * MB}, channels=[D2H],
                       op_time_s=times, initial_tiers={"x": "device", "w": "device"})
    state = w.run()
    end = 1.0 + 4 * MB / D2H.bandwidth  # issued when f ends
    before_wait = 1.0 + busy_s
    assert state.clock == max(end, before_wait)
    assert state.exposed_s == max(0.0, end - before_wait)


def test_a_recompute_counts_its_discarded_outputs_as_scratch_only() -> None:
    schedule = [compute("f"), compute("g"), compute("s"), free("r", "device"), compute("b"),
                recompute("g", discard=("r",))]
    w = walker(schedule, Recorder)
    state = w.run()
    held_before = 1 * MB + 2 * MB + 4 * MB + 4 + 2 * MB  # x, w, h, loss, gw
    assert state.peak["device"] == held_before + 4 * MB
    assert w.peaks[-1] == (5, "device", held_before + 4 * MB)
    assert "r" not in state.held["device"] and state.used["device"] == held_before
    assert state.recompute_s == OP_TIME["g"] and state.compute_s == pytest.approx(2.75 + OP_TIME["g"] - 0.5)


@pytest.mark.parametrize("schedule,message", [
    ([compute("f"), compute("f")], "step 1: h is already on device"),
    ([compute("g")], r"step 0 \(compute g\): input v is not ready"),
    ([compute("f"), start_transfer("h", "device", "host"), compute("g"), free("h", "device"),
      start_transfer("h", "host", "device"), compute("b")], "input v is not ready"),  # never waited
    ([start_transfer("h", "host", "device")], "source not on host"),
    ([compute("f"), start_transfer("h", "device", "host")], "a transfer of h is never waited for"),
])
def test_a_strict_walk_refuses_a_broken_schedule(schedule: list[Step], message: str) -> None:
    with pytest.raises(P.PlanError, match=message):
        walker(schedule).run()


def test_a_tolerant_walk_replays_a_broken_schedule() -> None:
    schedule = [
        compute("f"), compute("f"),  # twice: held once, run twice (clock 2.0)
        start_transfer("h", "device", "host"),  # no channel: instantaneous
        start_transfer("w", "device", "nvme"),  # an unknown tier: holds nothing
        wait_transfer("r", "device"),  # a wait for no copy
        free("gw", "device"),  # a free of nothing
        compute("g"),
    ]
    w = walker(schedule, Recorder, strict=False, channels=[])
    state = w.run()
    assert w.copies[0] == ("device->host", 2.0, 2.0)
    assert w.copies[1] == ("device->nvme", 2.0, 2.0)
    assert state.clock == 2.0 + 0.5 and state.exposed_s == 0.0
    assert state.held["device"] == {"x", "w", "h", "r"} and state.held["host"] == {"h"}
    assert state.used == {"device": 11 * MB, "host": 4 * MB}
    assert set(state.pending) == {("h", "host"), ("w", "nvme")}  # tolerated at the end too


def test_a_missing_op_time_is_zero_only_when_tolerant() -> None:
    g = graph()
    args = dict(capacities={"device": 100 * MB}, channels=[], op_time_s={"f": 1.0},
                initial_tiers={"x": "device", "w": "device"})
    assert ScheduleWalker(g, [compute("f"), compute("g")], strict=False, **args).run().clock == 1.0
    with pytest.raises(KeyError):
        ScheduleWalker(g, [compute("f"), compute("g")], **args).run()


class ByKind(ScheduleWalker):
    """Counts bytes per tier and tensor kind through ``hold`` and ``release`` only."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.by_kind: dict[tuple[str, TensorKind], int] = {}

    def hold(self, storage: str, tier: str) -> bool:
        added = super().hold(storage, tier)
        if added:
            key = (tier, self.graph.tensors[storage].kind)
            self.by_kind[key] = self.by_kind.get(key, 0) + self.graph.tensors[storage].nbytes
        return added

    def release(self, storage: str, tier: str) -> bool:
        removed = super().release(storage, tier)
        if removed:
            key = (tier, self.graph.tensors[storage].kind)
            self.by_kind[key] -= self.graph.tensors[storage].nbytes
        return removed


@pytest.mark.parametrize("strict", [True, False])
def test_every_byte_goes_through_hold_and_release(strict: bool) -> None:
    w = walker(SWAP, ByKind, strict=strict)
    state = w.run()
    assert isinstance(state, WalkState) and state is w.state
    for tier in ("device", "host"):
        assert sum(v for (t, _), v in w.by_kind.items() if t == tier) == state.used[tier]
    assert w.by_kind[("device", TensorKind.ACTIVATION)] == 0  # h left the device at its frees
    assert w.by_kind[("device", TensorKind.GRADIENT)] == 2 * MB
