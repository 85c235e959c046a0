"""Static buffer packing: every packing is checked by ``check_packing`` below, which shares no
code with tierplan.packing.pack."""
from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierplan.passes.liveness import Lifetime
from tierplan.packing.pack import (
    Buffer,
    Packing,
    PackingError,
    lower_bound,
    pack,
    pack_exact,
    pack_greedy,
    verify,
)
from tierplan.cli.pack import pack_command
from tierplan.formats.buffers_csv import read_buffers_csv, write_packing_csv

MINIMALLOC = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "minimalloc"


# -- the independent checker ---------------------------------------------------------------------


def check_packing(buffers, packing: Packing, capacity=None) -> None:
    """Pairwise, by definition: every buffer has an aligned offset >= 0; two buffers of positive
    size whose half-open live ranges intersect occupy disjoint byte ranges; the arena is the
    highest end; it is within the capacity and not below the live bytes at any step."""
    assert set(packing.offsets) == {b.id for b in buffers}
    for b in buffers:
        o = packing.offsets[b.id]
        assert isinstance(o, int) and o >= 0, (b, o)
        assert o % b.alignment == 0, (b, o)
    for a, b in itertools.combinations(buffers, 2):
        if a.size and b.size and a.start < b.end and b.start < a.end:
            oa, ob = packing.offsets[a.id], packing.offsets[b.id]
            assert oa + a.size <= ob or ob + b.size <= oa, (a, oa, b, ob)
    arena = max((packing.offsets[b.id] + b.size for b in buffers if b.size), default=0)
    assert packing.arena_bytes == arena
    if capacity is not None:
        assert arena <= capacity
    steps = {b.start for b in buffers}
    live = max((sum(b.size for b in buffers if b.start <= t < b.end) for t in steps), default=0)
    assert packing.lower_bound >= live or any(b.alignment > 1 for b in buffers)
    assert live <= arena
    assert packing.lower_bound <= arena
    assert packing.optimal == (arena == packing.lower_bound)


def cpsat_optimum(buffers) -> int:
    """The optimal arena by CP-SAT (NoOverlap2D over time x address): an independent oracle."""
    cp_model = pytest.importorskip("ortools.sat.python.cp_model")
    m = cp_model.CpModel()
    top = sum(b.size + b.alignment for b in buffers)
    arena = m.NewIntVar(0, top, "arena")
    xs, ys = [], []
    for b in buffers:
        k = m.NewIntVar(0, top // b.alignment, f"k{b.id}")
        xs.append(m.NewFixedSizeIntervalVar(b.start, b.end - b.start, ""))
        ys.append(m.NewFixedSizeIntervalVar(b.alignment * k, b.size, ""))
        if b.size:
            m.Add(arena >= b.alignment * k + b.size)
    m.AddNoOverlap2D(xs, ys)
    m.Minimize(arena)
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    assert solver.Solve(m) == cp_model.OPTIMAL
    return int(solver.ObjectiveValue())


# -- instance generators -------------------------------------------------------------------------


@st.composite
def instances(draw, max_buffers=10, aligns=(1,)):
    n = draw(st.integers(1, max_buffers))
    out = []
    for i in range(n):
        start = draw(st.integers(0, 8))
        end = draw(st.integers(start + 1, 10))
        out.append(Buffer(i, start, end, draw(st.integers(0, 40)), draw(st.sampled_from(aligns))))
    return out


@st.composite
def perfect_instances(draw):
    """A rectangle (time x bytes) cut by random guillotine cuts into buffers: a packing with no
    waste exists, and the live bytes equal the height at every step."""
    width, height = draw(st.integers(2, 12)), draw(st.integers(2, 64))
    pieces, todo = [], [(0, width, 0, height)]
    while todo:
        t0, t1, y0, y1 = todo.pop()
        cuts = draw(st.integers(0, 3)) if len(pieces) + len(todo) < 14 else 0
        if cuts and t1 - t0 > 1 and draw(st.booleans()):
            t = draw(st.integers(t0 + 1, t1 - 1))
            todo += [(t0, t, y0, y1), (t, t1, y0, y1)]
        elif cuts and y1 - y0 > 1:
            y = draw(st.integers(y0 + 1, y1 - 1))
            todo += [(t0, t1, y0, y), (t0, t1, y, y1)]
        else:
            pieces.append((t0, t1, y1 - y0))
    random.Random(draw(st.integers(0, 99))).shuffle(pieces)
    return [Buffer(f"p{i}", t0, t1, z) for i, (t0, t1, z) in enumerate(pieces)], height


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- lower bound ---------------------------------------------------------------------------------


def test_lower_bound_is_peak_live_bytes_with_half_open_ranges():
    bufs = [Buffer("a", 0, 2, 10), Buffer("b", 2, 4, 7), Buffer("c", 1, 3, 5)]
    assert lower_bound(bufs) == 15  # a+c at step 1, b+c at step 2; a and b never together
    assert lower_bound([]) == 0


def test_lower_bound_minds_alignment():
    # Offsets are multiples of 8, so the lower of two 5-byte buffers takes 8 bytes.
    bufs = [Buffer("a", 0, 1, 5, 8), Buffer("b", 0, 1, 5, 8)]
    assert lower_bound(bufs) == 13
    p = pack_exact(bufs)
    check_packing(bufs, p)
    assert p.arena_bytes == 13 and p.optimal


@FAST
@given(instances(max_buffers=7, aligns=(1, 2, 4)))
def test_lower_bound_never_exceeds_the_optimum(bufs):
    assert lower_bound(bufs) <= cpsat_optimum(bufs)


# -- greedy --------------------------------------------------------------------------------------


def test_greedy_best_fit_takes_the_smallest_gap():
    # Largest first: at step 1 the free gaps end up [100, 135) and [147, 150); the 3-byte buffer
    # goes into the 3-byte gap (best fit), not the lower 35-byte one (first fit).
    bufs = [
        Buffer("L", 0, 4, 100), Buffer("a", 0, 1, 50), Buffer("b", 0, 4, 40),
        Buffer("e", 2, 4, 35), Buffer("f", 0, 4, 20), Buffer("g", 1, 3, 12), Buffer("h", 1, 2, 3),
    ]
    p = pack_greedy(bufs)
    check_packing(bufs, p)
    assert p.method == "greedy-by-size"
    assert p.offsets == {"L": 0, "a": 100, "b": 150, "e": 100, "f": 190, "g": 135, "h": 147}


@FAST
@given(instances(aligns=(1, 2, 3, 8)))
def test_greedy_is_valid(bufs):
    check_packing(bufs, pack_greedy(bufs))


# -- exact ---------------------------------------------------------------------------------------


@FAST
@given(instances(aligns=(1, 2, 3, 8)))
def test_exact_is_valid_and_never_worse_than_greedy(bufs):
    exact = pack_exact(bufs, time_limit_s=2.0)
    check_packing(bufs, exact)
    assert exact.arena_bytes <= pack_greedy(bufs).arena_bytes


@FAST
@given(perfect_instances())
def test_exact_meets_the_bound_when_a_perfect_packing_exists(case):
    bufs, height = case
    assert lower_bound(bufs) == height
    p = pack_exact(bufs, capacity=height, time_limit_s=5.0)
    check_packing(bufs, p, capacity=height)
    assert p.arena_bytes == height and p.optimal


@settings(max_examples=25, deadline=None)
@given(instances(max_buffers=8, aligns=(1,)), st.sampled_from([1, 4]))
def test_exact_finds_and_proves_the_optimum(bufs, scale):
    bufs = [Buffer(b.id, b.start, b.end, b.size * scale, scale) for b in bufs]
    p = pack_exact(bufs, time_limit_s=5.0)
    check_packing(bufs, p)
    assert p.arena_bytes == cpsat_optimum(bufs)
    assert p.optimal  # one alignment: exhausting the search is a proof


def test_exact_beats_greedy_on_a_cut_rectangle():
    # Seven pieces of a 4-step x 9-byte rectangle: greedy by size needs 10 bytes.
    bufs = [
        Buffer("a", 1, 4, 3), Buffer("b", 1, 4, 1), Buffer("c", 0, 1, 4), Buffer("d", 2, 4, 2),
        Buffer("e", 2, 4, 1), Buffer("f", 0, 2, 3), Buffer("g", 0, 4, 2),
    ]
    assert lower_bound(bufs) == 9 and pack_greedy(bufs).arena_bytes == 10
    p = pack(bufs, capacity=9)
    check_packing(bufs, p, capacity=9)
    assert p.optimal and p.method == "skyline-search"


@pytest.mark.parametrize("name", ["A", "B", "C"])
def test_hard_minimalloc_instances_fit(name):
    path = MINIMALLOC / f"{name}.1048576.csv"
    if not path.exists():
        pytest.skip(f"{path} not present")
    bufs = read_buffers_csv(path)
    assert pack_greedy(bufs).arena_bytes > 1.3 * lower_bound(bufs)
    p = pack(bufs, capacity=1_048_576, time_limit_s=10.0)
    check_packing(bufs, p, capacity=1_048_576)
    assert p.optimal and p.solve_s < 10.0


def test_accepts_liveness_lifetimes():
    lives = [Lifetime("x", 100, 0, 3), Lifetime("y", 50, 1, 2), Lifetime("z", 100, 3, 4)]
    p = pack(lives)
    bufs = [Buffer(l.storage, l.start, l.end, l.nbytes) for l in lives]
    check_packing(bufs, p)
    assert p.arena_bytes == 150 and p.optimal


def test_zero_size_buffers_take_no_space():
    bufs = [Buffer("a", 0, 2, 0), Buffer("b", 0, 2, 8), Buffer("c", 1, 3, 0)]
    p = pack_exact(bufs)
    check_packing(bufs, p)
    assert p.arena_bytes == 8


def test_verify_catches_overlap():
    bufs = [Buffer("a", 0, 2, 8), Buffer("b", 1, 3, 8)]
    bad = Packing({"a": 0, "b": 4}, 12, 16, False, 0.0, "hand")
    with pytest.raises(PackingError, match="'a' and 'b'"):
        verify(bufs, bad)
    verify(bufs, pack(bufs))


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, words",
    [
        (Buffer("neg", 0, 1, -1), ["'neg'", "size", "negative"]),
        (Buffer("flat", 3, 3, 1), ["'flat'", "end 3 <= start 3"]),
        (Buffer("back", 4, 2, 1), ["'back'", "end 2 <= start 4"]),
        (Buffer("al", 0, 1, 1, 0), ["'al'", "alignment"]),
        (Buffer("fl", 0, 1, 1.5), ["'fl'", "size", "integer"]),
    ],
)
def test_malformed_buffers_are_named(bad, words):
    for fn in (pack, pack_greedy, pack_exact, lower_bound):
        with pytest.raises(PackingError) as e:
            fn([Buffer("ok", 0, 1, 1), bad])
        for w in words:
            assert w in str(e.value)


def test_duplicate_id_is_named():
    with pytest.raises(PackingError, match="'x' appears twice"):
        pack([Buffer("x", 0, 1, 1), Buffer("x", 1, 2, 1)])


def test_capacity_below_the_bound_says_both():
    bufs = [Buffer("a", 0, 2, 600), Buffer("b", 1, 3, 500)]
    for fn in (pack, pack_exact, pack_greedy):
        with pytest.raises(PackingError, match=r"lower bound 1,100 > capacity 1,000"):
            fn(bufs, capacity=1000)


def test_search_proves_a_capacity_above_the_bound_infeasible():
    # Offsets are multiples of 4. The bound lets a 1-byte buffer sit on top, padding-free, at
    # every step: a on top of c at step 0 and b on top of d at step 2 (bound 5). But a and b are
    # live together at step 1, so they cannot both sit at 4: the optimum is 8.
    bufs = [
        Buffer("a", 0, 2, 1, 4), Buffer("b", 1, 3, 1, 4),
        Buffer("c", 0, 1, 4, 4), Buffer("d", 2, 3, 4, 4),
    ]
    assert lower_bound(bufs) == 5
    assert cpsat_optimum(bufs) == 8
    with pytest.raises(PackingError, match="proved"):
        pack(bufs, capacity=7)
    p = pack_exact(bufs)
    check_packing(bufs, p)
    assert p.arena_bytes == 8 and p.lower_bound == 8 and p.optimal


# -- CSV -----------------------------------------------------------------------------------------


def test_csv_round_trip(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("id,lower,upper,size\n0,0,4,8\n1,2,6,8\n2,4,8,16\n")
    bufs = read_buffers_csv(src)
    assert bufs[1] == Buffer("1", 2, 6, 8)
    p = pack(bufs)
    out = tmp_path / "out.csv"
    write_packing_csv(out, bufs, p)
    lines = out.read_text().splitlines()
    assert lines[0] == "id,lower,upper,size,offset"
    rows = [line.split(",") for line in lines[1:]]
    back = {r[0]: int(r[4]) for r in rows}
    check_packing(bufs, Packing(back, p.arena_bytes, p.lower_bound, p.optimal, 0.0, "csv"))


@pytest.mark.parametrize(
    "text, words",
    [
        ("", ["empty"]),
        ("id,lower,size\n", [":1:", "'upper'"]),
        ("id,lower,upper,size\n0,0,4\n", [":2:", "3 fields"]),
        ("id,lower,upper,size\n0,0,4,8\n1,x,4,8\n", [":3:", "lower 'x'"]),
        ("id,lower,upper,size\n0,0,4,-8\n", [":2:", "'0'", "negative"]),
        ("id,lower,upper,size\n0,4,4,8\n", [":2:", "upper 4 <= lower 4"]),
        ("id,lower,upper,size\n7,0,4,8\n7,1,4,8\n", [":3:", "'7'", "line 2"]),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path, text, words):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(PackingError) as e:
        read_buffers_csv(path)
    assert str(path) in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_missing_csv_is_named(tmp_path):
    with pytest.raises(PackingError, match="nope.csv"):
        read_buffers_csv(tmp_path / "nope.csv")


def test_pack_command_reports_and_writes(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("id,lower,upper,size\na,0,2,6\nb,2,4,6\nc,1,3,4\nd,0,1,4\ne,3,4,4\nf,1,3,6\n")
    out = tmp_path / "out.csv"
    text = pack_command(src, capacity=None, time_limit_s=5.0, out_path=out)
    for w in ("arena", "lower bound", "gap", "optimal", "solve time", str(out)):
        assert w in text
    assert out.exists()
    with pytest.raises(PackingError, match="capacity"):
        pack_command(src, capacity=5, time_limit_s=1.0, out_path=None)
