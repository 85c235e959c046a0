"""Copies placed by the queues they share: offload waits follow the queue, fetches fill it as late
as they can, and neither goes past the device budget."""
from __future__ import annotations

import numpy as np
import pytest

from planner_graphs import channels, transformer
from tierplan.placement import schedule
from tierplan.placement.assemble import build_plan
from tierplan.placement.baselines import swap_all_fates
from tierplan.placement.candidates import analyze
from tierplan.placement.retime import Copy, retime
from tierplan.plans.validate import validate
from tierplan.plans.plan import Pricing

CLOCK = np.arange(11, dtype=float)  # ten ops of one second each


def _offload(start: int, wait: int, limit: int = 9) -> Copy:
    return Copy("s", 10, "device", "host", "d2h", 2.0, start, wait, limit)


def _fetch(start: int, wait: int, limit: int = 0) -> Copy:
    return Copy("s", 10, "host", "device", "h2d", 2.0, start, wait, limit)


def test_offload_waits_follow_the_queue() -> None:
    # Three 2 s copies issued after ops 0, 1, 2, each waited for as if the link were idle.
    copies = [_offload(0, 2), _offload(1, 3), _offload(2, 4)]
    profile = np.zeros(10, dtype=np.int64)
    retime(copies, CLOCK, profile, cap=100)
    # The queue lands them at 3 s, 5 s and 7 s: the ends of ops 2, 4 and 6.
    assert [c.wait for c in copies] == [2, 4, 6]
    # Each storage is now held on the device over the ops its wait moved past.
    assert profile.tolist() == [0, 0, 0, 0, 10, 10, 10, 0, 0, 0]


def test_offload_waits_stop_where_the_budget_would_break() -> None:
    copies = [_offload(0, 2), _offload(1, 3), _offload(2, 4)]
    profile = np.zeros(10, dtype=np.int64)
    profile[5] = 95  # op 5 has room for no extra storage
    retime(copies, CLOCK, profile, cap=100)
    assert [c.wait for c in copies] == [2, 4, 4]
    assert profile.max() <= 100
    # And never past the limit (the fetch of the same storage).
    limited = [_offload(0, 2), _offload(1, 3, limit=3)]
    retime(limited, CLOCK, np.zeros(10, dtype=np.int64), cap=100)
    assert [c.wait for c in limited] == [2, 3]


def test_fetches_fill_the_queue_as_late_as_their_readers_allow() -> None:
    # Three 2 s fetches read before ops 7, 8, 9, each started as if the link were idle.
    copies = [_fetch(5, 7), _fetch(6, 8), _fetch(7, 9)]
    profile = np.zeros(10, dtype=np.int64)
    retime(copies, CLOCK, profile, cap=100)
    # Back to back, latest first: 7-9 s, 5-7 s, 3-5 s.
    assert [c.start for c in copies] == [3, 5, 7]
    assert profile.tolist() == [0, 0, 0, 10, 10, 10, 0, 0, 0, 0]
    # An idle link: a fetch started early is moved to its latest start, freeing the bytes.
    early = [_fetch(1, 9)]
    idle = np.full(10, 10, dtype=np.int64)
    retime(early, CLOCK, idle, cap=100)
    assert early[0].start == 7 and idle.tolist() == [10] * 1 + [0] * 6 + [10] * 3


def test_fetches_respect_the_budget_and_their_offload() -> None:
    profile = np.zeros(10, dtype=np.int64)
    profile[4] = 95
    copies = [_fetch(5, 7), _fetch(6, 8), _fetch(7, 9)]
    retime(copies, CLOCK, profile, cap=100)
    assert [c.start for c in copies] == [5, 5, 7]  # op 4 has no room: the first stalls instead
    out = _offload(0, 2, limit=5)
    fetch = _fetch(6, 7, limit=0)
    fetch.after = out
    retime([out, fetch], CLOCK, np.zeros(10, dtype=np.int64), cap=100)
    assert fetch.start >= out.wait + 1


@pytest.mark.parametrize("at_tight_peak", [False, True])
def test_swap_all_on_a_busy_link_stalls_less_and_stays_in_budget(at_tight_peak, monkeypatch) -> None:
    # Every activation of a 4-layer stack swapped over a link that keeps pace with the compute on
    # average, but copies issued close together overlap and tight waits stall on each other.
    graph, times = transformer(4)

    def built(budget: int):
        problem = analyze(graph, Pricing(capacities={"device": budget, "host": 10**12}, channels=channels(bandwidth=30e9),
                                         op_time_s=times, hardware="test", training=True))
        return build_plan(problem, swap_all_fates(problem), method="swap-all").plan

    with monkeypatch.context() as patched:
        patched.setattr(schedule, "retime", lambda *args: None)
        tight = built(10**15)
    # With the tight plan's own peak as the budget the waits can move only where bytes leave room.
    budget = tight.peak_bytes["device"] if at_tight_peak else 10**15
    retimed = built(budget)
    validate(retimed), validate(tight)
    assert tight.exposed_transfer_s > 0
    assert retimed.exposed_transfer_s < 0.8 * tight.exposed_transfer_s
    assert retimed.predicted_time_s < tight.predicted_time_s
    assert retimed.peak_bytes["device"] <= budget
