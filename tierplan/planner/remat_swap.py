"""The joint keep / recompute / swap planner (issue #3), solved with OR-tools CP-SAT.

Design (see ``candidates`` and ``linear`` for the pieces):

- Capture order is kept. Candidates are forward ops whose outputs are read again in the backward
  (units); each takes keep, recompute (re-run it and its dead producer chain right before the first
  backward reader) or swap to a tier reachable by a channel pair (offload after the last forward
  reader, prefetch early enough to hide behind the backward's compute).
- The device's live bytes at every step are a linear function of the choices; only steps that can
  exceed the budget are constrained, one per stretch of steps with the same set of choices in
  play (the others are dominated).
- Objective: recompute seconds + exposed copy time, a lower bound per queue from the load of
  every window of steps (bytes / bandwidth of the copies that must run inside it beyond its
  compute time). A recompute needs its inputs: precedence constraints tie it to its anchors.
- The heuristic plan (``linear.greedy``) is the hint. The schedule built from the answer is
  measured exactly by ``timeline.simulate``; if the approximations let it exceed the budget, the
  model is re-solved with a budget tightened by the overshoot. The best measured plan among the
  solver's, the heuristic's and the baselines' is returned, so it is never worse than them.
- Stages: (1) small models whose answers are choices of the full one: each unit recomputed only
  at its own first backward use with one swap window; with a slower tier, the recompute-only
  sub-model (so a host tier never makes the plan worse than remat alone); on a large graph
  (more than ``_SHARE_ABOVE_UNITS`` units), every option with one decision per block position
  (the size of one block: solved in a fraction of a second), then measured local moves in it;
  (2) every option with one decision per unit, hinted with the best measured plan so far (GPT-2
  small b8 s1024 on the RTX 4090 model at 12 GiB: 38.6 ms of recompute with one decision per
  block position and its local search, 34.0 ms with one per unit); (3) measured local moves with one decision per unit. The recompute
  points include each block's first backward use, so checkpoint-blocks is a choice of the model.
- Local search (``local_search.improve``): drop / switch / trade moves screened by the linear
  profile and measured by the simulator, from the best three measured plans. It finds plans the
  model's conservative transient bytes exclude and, with copies in play, corrects the model's
  queue timing (it gets more of the time then). CP-SAT runs with a fixed seed and two workers
  (results still depend on how far it gets within the limit).
- The gap reported is against ``bound.overhead_lower_bound``: a relaxation that no plan of the
  space beats (torch's included). CP-SAT's bound on its own model is ``solver["model_bound_s"]``;
  it does not cover plans outside that model.

Checkmate (Jain et al., MLSys 2020) decides a full T x T recompute grid; Moccasin (Bartan et al.,
ICML 2023) uses retention intervals in CP-SAT. Both stall at a few hundred nodes. Fixing the order
and the candidate lifetimes keeps this model at O(units x options) booleans, which is what lets it
take thousands of ops, and adds the swap tiers neither has.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ortools.sat.python import cp_model

from tierplan.ir import PERSISTENT_KINDS, Graph
from tierplan.planner.assemble import Built, build_plan
from tierplan.planner.bound import overhead_lower_bound
from tierplan.planner.candidates import KEEP, RECOMPUTE, Problem, analyze, option_tier
from tierplan.planner.keep_all import keep_all_plan
from tierplan.planner.linear import Key, Linear, greedy, linearize
from tierplan.planner.local_search import improve
from tierplan.planner.plan import DEVICE, Channel, InfeasibleBudget, Plan, PlanError
from tierplan.planner.timeline import build_schedule, initial_tiers, simulate
from tierplan.units import format_bytes

# Measured on 2 shared CPU cores: GPT-2 small plans in ~20 s; Llama-2-70B training (18k ops) in
# ~40 s with this limit (CP-SAT stops at it; building and measuring candidate plans takes the rest).
DEFAULT_TIME_LIMIT_S = 30.0
_TIME_UNITS = 1_000_000  # the keep-all step time in the model's integer time units
_WINDOW_GROUPS = 32  # steps are grouped into this many windows for the channel-load constraints
_LOCAL_SEARCH_STARTS = 3  # measured plans the local search starts from (best first)
# Above this many units a block-shared model (one decision per block position) solves first and
# hints the per-unit model; below it the per-unit model alone is small enough.
_SHARE_ABOVE_UNITS = 150
_LOCAL_SEARCH_SHARE = 0.25  # of the time left after stage 1, kept for the measured local search
_LOCAL_SEARCH_SHARE_WITH_COPIES = 0.6
_OWN_POINT_SHARE = 0.3  # of the time left, for the own-point model (stage 1)
_OWN_POINT_SHARE_WITH_STREAMS = 0.5
_BOUND_STEPS = 2  # high-pressure steps the proven bound tries (the keep-all peak is the first)
_BOUND_STEP_S = 2.0  # SCIP time per step; its LP-based bound is used when it stops early
_OPTIMAL_GAP = 1e-6  # a plan this close to the proven bound is reported OPTIMAL
_MIN_SOLVE_S = 0.05  # a CP-SAT model with less time than this left is not solved
_CHAIN_ABOVE_TERMS = 2_000_000  # memory constraints with more terms than this are chained


@dataclass
class Solved:
    choice: dict[Key, str] | None
    status: str
    objective_s: float | None  # the model's overhead (recompute + exposed-copy lower bound)
    bound_s: float | None
    solve_s: float
    peak: int | None = None  # min-peak mode: the model's peak


def solve(
    graph: Graph,
    *,
    capacities: dict[str, int],
    channels: list[Channel],
    op_time_s: dict[str, float],
    hardware: str,
    training: bool,
    time_limit_s: float | None = None,
    _offer_streams: bool | None = None,
) -> Plan:
    """The fastest plan found whose device peak is at most ``capacities["device"]``.

    Raises InfeasibleBudget (with the smallest budget this planner can meet) when none fits.
    """
    started = time.perf_counter()
    limit = DEFAULT_TIME_LIMIT_S if time_limit_s is None else max(float(time_limit_s), 0.1)
    budget = capacities[DEVICE]
    reference = keep_all_plan(
        graph, capacities=capacities, channels=channels, op_time_s=op_time_s, hardware=hardware,
        training=training,
    )
    ka_time, ka_peak = reference.predicted_time_s, reference.keep_all_peak_bytes
    if ka_peak <= budget:
        reference.method = "keep-all (it fits the budget: nothing to recompute or swap)"
        reference.solver = _solver_info("KEEP_ALL_FITS", ka_time, ka_time, time.perf_counter() - started)
        return reference

    # The proven bound covers every plan of the space, torch's included; CP-SAT's bound covers
    # its own model only (fixed recompute points and windows) and is reported beside it.
    proven = overhead_lower_bound(graph, budget=budget, channels=channels, op_time_s=op_time_s,
                                  steps=_BOUND_STEPS, time_limit_s=min(_BOUND_STEP_S, max(0.2, 0.05 * limit)))
    problem = analyze(graph, op_time_s=op_time_s, capacities=capacities, channels=channels,
                      offer_streams=_offer_streams)
    # One decision per unit is the model that matters; on a large graph a block-shared model (the
    # size of one block) solves first, in a fraction of a second, and hints it.
    linear = linearize(problem)
    shared = len(problem.units) > _SHARE_ABOVE_UNITS and any(u.share_key for u in problem.units)
    coarse = linearize(problem, shared=True) if shared else linear
    search = _Search(problem, budget, started, limit, dict(
        hardware=hardware, training=training, keep_all_time_s=ka_time, keep_all_peak_bytes=ka_peak))

    # Portfolio: the heuristic and the baselines are both hints and fallbacks.
    from tierplan.planner.baselines import checkpoint_blocks_fates, swap_all_fates

    search.build(coarse.fates(greedy(coarse, budget)), "greedy (seconds per byte freed at the peak step)",
                 start=True)
    ckpt = checkpoint_blocks_fates(problem)
    if ckpt is not None:
        built = search.build(ckpt[0], "checkpoint-blocks", segments=ckpt[1])
        as_options = _as_options(problem, ckpt[0], ckpt[1])
        if as_options is not None:
            search.fates_of[id(built)] = as_options
    search.build(swap_all_fates(problem), "swap-all")

    # Stage 1 (small models that solve fast; their answers are choices of the full model): each
    # unit recomputed only at its own first backward use with one swap window; with a slower tier,
    # the remat-only sub-model (so a slower tier never makes the plan worse than recompute alone:
    # copy costs the model under-prices cannot lure the search away from it); on a large graph,
    # every option with one decision per block position, then local moves in that model (a move
    # changes every block at once, which escapes optima single-unit moves cannot). With several
    # slower tiers (host and NVMe) all of stage 1 uses the nearest alone, and its per-unit model
    # is solved and improved before the full one: adding a farther tier starts from the answer
    # without it (copies to NVMe that look cheap to the model cannot lure the search away).
    slower = {option_tier(o) for _, o in linear.pairs} - {None}
    nearest = min(slower, key=lambda t: _copy_seconds_per_byte(problem, t)) if len(slower) > 1 else None
    first_tiers = (nearest,) if nearest else None
    restricted = linearize(problem, shared=shared, restrict=True, tiers=first_tiers)
    if len(restricted.pairs) < len(coarse.pairs):
        # With streams the per-unit models take seconds to build and rarely solve in the time
        # left; this one does, given the time: it gets more of it.
        search.stage(restricted, _OWN_POINT_SHARE_WITH_STREAMS if problem.streams else _OWN_POINT_SHARE,
                     "own-point options" + (f", {nearest} only" if nearest else ""))
    if slower:
        remat = linearize(problem, shared=shared, tiers=())
        if remat.pairs:
            search.stage(remat, 0.2, "recompute only")
    if shared:
        coarse_first = linearize(problem, shared=True, tiers=first_tiers) if nearest else coarse
        label = ", per block position" + (f", {nearest} only" if nearest else "")
        search.stage(coarse_first, 0.2, "every option" + label)
        search.local_search(coarse_first, label, share=0.3)
    if nearest:
        near = linearize(problem, tiers=first_tiers)
        search.stage(near, 0.3, f"recompute and {nearest} only")
        search.local_search(near, f", {nearest} only", share=0.6)
    # Stage 2: every option, one decision per unit, hinted with the best measured plan so far.
    # With copies in play the model's queue timing is a loose bound and the measured local search
    # does most of the work: it gets more of the time.
    solved = search.stage(linear, 1.0 - (_LOCAL_SEARCH_SHARE_WITH_COPIES if slower else _LOCAL_SEARCH_SHARE),
                          "keep/recompute/swap/stream")
    # Stage 3: local moves with one decision per unit (see ``local_search``), e.g. swap some
    # blocks' activations behind the forward, recompute the others'.
    search.local_search(linear, "")

    fitting = [b for b in search.tried if b.fits]
    if not fitting and getattr(problem, "streams_withheld", False):
        # Parameter streaming / gradient offload were left out to keep the model small: retry with
        # them in the time left (at least 1 s: a plan late beats a false "infeasible"), and
        # report the solve time of both passes.
        elapsed = time.perf_counter() - started
        retried = solve(graph, capacities=capacities, channels=channels, op_time_s=op_time_s,
                        hardware=hardware, training=training,
                        time_limit_s=max(limit - elapsed, 1.0), _offer_streams=True)
        retried.solver["solve_s"] = retried.solver.get("solve_s", 0.0) + elapsed
        return retried
    if not fitting:
        found = _infeasible(problem, coarse, budget, search)  # the smaller model
        if isinstance(found, InfeasibleBudget):
            raise found
        fitting = [found]  # the min-peak probe found a plan within the budget
    # Ties go to the solver's plan (its decisions come with a bound).
    best = min(fitting, key=lambda b: (b.plan.predicted_time_s * (1 - 1e-12 * b.plan.method.startswith("cp-sat")),
                                       b.plan.recompute_time_s))
    plan = best.plan
    bound = ka_time + proven.overhead_s  # not clipped: above the plan would be a bug to see
    solve_s = time.perf_counter() - started
    # OPTIMAL only when the plan meets the proven bound; the per-unit model's own status beside it.
    plan.solver = _solver_info("FEASIBLE", plan.predicted_time_s, bound, solve_s)
    if plan.solver["gap"] <= _OPTIMAL_GAP:
        plan.solver["status"] = "OPTIMAL"
    plan.solver["model_status"] = solved.status if solved else "NOT_RUN"
    plan.solver["bound_step"] = graph.ops[proven.step].name if proven.step >= 0 else None
    if solved is not None and solved.objective_s is not None:
        plan.solver["model_objective_s"] = ka_time + solved.objective_s
        plan.solver["model_bound_s"] = ka_time + (solved.bound_s or 0.0)
    plan.solver["bound_kind"] = (
        "bound_s: no plan that runs the ops in capture order, re-runs forward ops and copies through "
        "the channels' queues is faster (a relaxation at the step named by bound_step: the bytes the "
        "device must hold there, what dropping the rest costs; planner/bound.py); model_bound_s: "
        "CP-SAT's bound on its own model (options at fixed points and windows, one decision per unit), "
        "not over every plan")
    if not plan.method.startswith("cp-sat"):
        plan.method = f"{plan.method} (best measured plan; the cp-sat answer was not faster)"
    return plan


@dataclass
class _Search:
    """What one ``solve`` has built and the time it has, shared by its stages.

    Plans are kept with their member fates (not one model's choice), so that any model reads
    them back (``Linear.choice``) as a hint or a local-search start.
    """

    problem: Problem
    budget: int
    started: float
    limit: float
    common: dict[str, Any]  # build_plan's keywords: hardware, training, the keep-all figures
    tried: list[Built] = field(default_factory=list)
    fates_of: dict[int, dict] = field(default_factory=dict)  # id(built) -> its member fates

    @property
    def end(self) -> float:
        return self.started + self.limit - 0.5  # time to build the plan (a schedule and its replay)

    def build(self, fates: dict, method: str, *, start: bool = False, **extra: Any) -> Built:
        """Build and measure the plan of ``fates``; ``start``: a model may start from it."""
        built = build_plan(self.problem, fates, method=method, **self.common, **extra)
        self.tried.append(built)
        if start:
            self.fates_of[id(built)] = fates
        return built

    def starts(self, model: Linear) -> list[tuple[Built, dict[Key, str]]]:
        """Plans the model can express, fitting ones first, fastest first, with their choices."""
        ranked = sorted((b for b in self.tried if id(b) in self.fates_of),
                        key=lambda b: (not b.fits, b.plan.predicted_time_s))
        return [(b, c) for b in ranked if (c := model.choice(self.fates_of[id(b)])) is not None]

    def stage(self, model: Linear, share: float, label: str) -> Solved | None:
        """Solve, measure, tighten the cap by any overshoot; at most ``share`` of the time left."""
        now = time.perf_counter()
        stage_end = now + share * (self.limit - (now - self.started))
        ka_time = self.common["keep_all_time_s"]
        hints = self.starts(model)
        cap, result, start_hint = self.budget, None, hints[0][1] if hints else None
        for _ in range(4):
            if stage_end - time.perf_counter() <= _MIN_SOLVE_S:
                break
            result = _solve_model(model, cap, hint=start_hint, deadline=stage_end)
            if result.choice is None:
                break
            info = _solver_info(result.status, ka_time + (result.objective_s or 0.0),
                                ka_time + (result.bound_s or 0.0), result.solve_s)
            built = self.build(model.fates(result.choice), f"cp-sat ({label})", start=True, solver=info)
            if built.fits:
                break
            over = built.figures.peak_bytes[DEVICE] - self.budget
            if over <= 0:
                break  # another tier overflowed: the per-tier bound is already conservative
            cap -= over  # the model under-counted somewhere (transients); ask for that much less
            start_hint = result.choice
        return result

    def measure(self, model: Linear, choice: dict[Key, str]) -> tuple[bool, float]:
        """(fits every tier, step time) of the choice's plan, from the simulator."""
        problem = self.problem
        fates = model.fates(choice)
        try:
            figures = simulate(problem.graph, build_schedule(problem, fates), capacities=problem.capacities,
                               channels=problem.channels, op_time_s=problem.op_time_s,
                               initial_tiers=initial_tiers(problem, fates))
        except PlanError:
            return False, math.inf
        return all(figures.peak_bytes.get(t, 0) <= c for t, c in problem.capacities.items()), figures.time_s

    def local_search(self, model: Linear, label: str, share: float = 1.0) -> None:
        """Local moves from the best measured plans the model can express, measured exactly, for
        at most ``share`` of the time left."""
        deadline = time.perf_counter() + share * (self.end - time.perf_counter())
        seen: list[dict] = []
        for start, choice in [(b, c) for b, c in self.starts(model) if b.fits][:_LOCAL_SEARCH_STARTS]:
            if time.perf_counter() >= deadline or choice in seen:
                continue
            seen.append(choice)
            better, better_s, evals = improve(model, choice, self.budget, functools.partial(self.measure, model),
                                              deadline=deadline)
            if better_s < start.plan.predicted_time_s * (1 - 1e-9):
                self.build(model.fates(better), f"local search ({evals} measured moves{label}) from "
                           f"{start.plan.method}", start=True, solver=dict(start.plan.solver))


def _copy_seconds_per_byte(problem: Problem, tier: str) -> float:
    """Seconds per byte of a round trip device -> tier -> device (inf when a way is missing)."""
    ways = [c for c in problem.channels if (c.src, c.dst) in ((DEVICE, tier), (tier, DEVICE))]
    return sum(1.0 / c.bandwidth for c in ways) if len(ways) == 2 else math.inf


def _as_options(problem: Problem, fates: dict, segments: dict) -> dict | None:
    """Baseline fates with their own recompute segments as the units' options (the model's
    language), or None when a segment is not one of the unit's options."""
    out = dict(fates)
    for member, segment in segments.items():
        if out.get(member, KEEP) == KEEP:
            continue
        option = next((o for o, seg in problem.units[member].recomputes.items() if seg == segment), None)
        if option is None:
            return None
        out[member] = option
    return out


def _solver_info(status: str, objective_s: float, bound_s: float, solve_s: float) -> dict[str, Any]:
    gap = 0.0 if objective_s <= 0 else max(0.0, (objective_s - bound_s) / objective_s)
    return {"status": status, "objective_s": objective_s, "bound_s": bound_s, "gap": gap, "solve_s": solve_s}


# -- the model: built here, read back in ``_read`` ---------------------------------------------


def _constrained_steps(linear: Linear, threshold: int) -> list[int]:
    """Steps whose memory constraint can bind: one (the fullest) per stretch of steps where the
    same choices change the profile, and only where the profile can exceed ``threshold``."""
    n = linear.base.shape[0]
    changes = np.zeros(n, dtype=bool)
    changes[0] = True
    if linear.delta.shape[0]:
        d = linear.delta
        changes[1:] |= np.any(d[:, 1:] != d[:, :-1], axis=0)
    starts = np.nonzero(changes)[0].tolist() + [n]
    steps = []
    for a, b in zip(starts[:-1], starts[1:]):
        # Every choice changes the bytes of the stretch by the same amount at each of its steps
        # (deltas only free bytes), so its fullest step dominates the rest.
        i = a + int(np.argmax(linear.base[a:b]))
        if linear.base[i] > threshold:
            steps.append(i)
    return steps


def _lower_bound_peak(linear: Linear) -> int:
    """No choice brings any step below this (the model's own floor)."""
    if not linear.pairs:
        return int(linear.base.max())
    best_saving = np.zeros(linear.base.shape[0], dtype=np.int64)
    for key in linear.keys:
        rows = [linear.pair_index[key, o] for o in linear.options[key]]
        if rows:
            best_saving += np.clip(-linear.delta[rows].min(axis=0), 0, None)
    floor = int((linear.base - best_saving).max())
    return floor


def _solve_model(
    linear: Linear, cap: int | None, *, hint: dict[Key, str] | None, deadline: float, workers: int = 2,
) -> Solved:
    """Minimize overhead with the device at most ``cap``; with ``cap=None`` minimize the peak.

    Building the model counts against ``deadline`` (``time.perf_counter()`` time) as solving
    does: on a large graph with streams it takes seconds, and a model with no time left to solve
    is not built to the end (no choice, status ``NOT_BUILT``).
    """
    started = time.perf_counter()
    problem = linear.problem
    total_s = max(sum(problem.op_time_s.values()), 1e-12)
    unit_s = total_s / _TIME_UNITS
    model = cp_model.CpModel()
    x: dict[tuple[Key, str], cp_model.IntVar] = {}
    for key in linear.keys:
        x[key, KEEP] = model.NewBoolVar(f"keep{key}")
        for option in linear.options[key]:
            x[key, option] = model.NewBoolVar(f"{option}{key}")
        model.AddExactlyOne([x[key, KEEP]] + [x[key, o] for o in linear.options[key]])
    pair_vars = [x[p] for p in linear.pairs]

    # Device memory at every step that can bind.
    floor = _lower_bound_peak(linear)
    peak_var = None
    if cap is None:
        peak_var = model.NewIntVar(floor, int(linear.base.max()), "peak")
        threshold = floor
    else:
        threshold = cap
    limit = peak_var if peak_var is not None else cap
    by_index = np.array(pair_vars + [None], dtype=object)[:-1]  # fancy-indexable variables

    def weighted(coefficients: np.ndarray) -> cp_model.LinearExpr:
        nz = np.nonzero(coefficients)[0]
        return cp_model.LinearExpr.WeightedSum(by_index[nz].tolist(), coefficients[nz].tolist())

    steps = _constrained_steps(linear, threshold)
    # A choice changes the profile at a few steps, but streams and offloads hold their bytes off
    # the device over most of them: with many of those, each step's sum is long. Then the model
    # carries the profile's change from one constrained step to the next (the same constraints,
    # with far fewer terms to build).
    chained = int(np.count_nonzero(linear.delta[:, steps])) > _CHAIN_ABOVE_TERMS if steps else False
    previous, carried = np.zeros(len(linear.pairs), dtype=np.int64), None
    for count, step in enumerate(steps):
        if count % 64 == 0 and time.perf_counter() >= deadline - _MIN_SOLVE_S:
            return Solved(None, "NOT_BUILT", None, None, time.perf_counter() - started)
        column = linear.delta[:, step]
        if not chained:
            model.Add(int(linear.base[step]) + weighted(column) <= limit)
            continue
        here = model.NewIntVar(int(np.clip(column, None, 0).sum()), int(np.clip(column, 0, None).sum()), "")
        model.Add(here == (carried if carried is not None else 0) + weighted(column - previous))
        model.Add(int(linear.base[step]) + here <= limit)
        previous, carried = column, here
    # Right before steps with recompute groups: without the step's outputs, with the transients.
    for step in linear.transient_steps():
        column = linear.delta[:, step] + linear.transient[:, step]
        if linear.pre_base[step] + np.clip(column, 0, None).sum() <= threshold:
            continue
        model.Add(int(linear.pre_base[step]) + weighted(column) <= limit)

    # Other tiers: everything swapped there at once (an upper bound on their peak).
    for tier, amounts in linear.swap_bytes.items():
        if np.any(amounts):
            model.Add(weighted(amounts) <= problem.capacities[tier])

    # A recompute reads its anchors at its recompute step.
    for a in linear.anchors:
        if (a.user, a.option) in x:
            model.Add(x[a.user, a.option] <= sum(x[a.owner, o] for o in a.allowed if (a.owner, o) in x))

    for first, second in linear.conflicts:
        if first in x and second in x:
            model.Add(x[first] + x[second] <= 1)

    # Exposed copy time per queue: over every window of step groups, the copies that must run
    # inside it, beyond its compute time, are exposed (a lower bound of the queue's stall).
    exposed_vars = _queue_exposure(model, linear, pair_vars, unit_s)

    cost = [max(1, math.ceil(c / unit_s)) if c > 0 else 1 for c in linear.cost_s]
    overhead = cp_model.LinearExpr.WeightedSum(pair_vars + exposed_vars, cost + [1] * len(exposed_vars))
    if peak_var is not None:
        model.Minimize(peak_var)
    else:
        model.Minimize(overhead)
    if hint:
        for key in linear.keys:
            chosen = hint.get(key, KEEP)
            for option in [KEEP] + linear.options[key]:
                model.AddHint(x[key, option], option == chosen)

    time_limit_s = deadline - time.perf_counter()
    if time_limit_s < _MIN_SOLVE_S:
        return Solved(None, "NOT_BUILT", None, None, time.perf_counter() - started)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = 0
    started = time.perf_counter()
    status = solver.Solve(model)
    elapsed = time.perf_counter() - started
    return _read(solver, status, linear, x, unit_s, peak_var, elapsed)


def _queue_exposure(model: cp_model.CpModel, linear: Linear, pair_vars: list, unit_s: float) -> list:
    problem = linear.problem
    n = len(problem.order)
    groups = min(_WINDOW_GROUPS, n)
    cum = np.asarray(problem.cumulative_s)
    # Group boundaries at equal shares of compute time, so windows are comparable.
    edges = np.searchsorted(cum[1:], np.linspace(0, cum[-1], groups + 1)[1:-1], side="left")
    group_of = np.zeros(n, dtype=np.int64)
    for e in edges:
        group_of[e + 1:] += 1
    g_first = [int(np.min(np.nonzero(group_of == g)[0])) if np.any(group_of == g) else None for g in range(groups)]
    g_last = [int(np.max(np.nonzero(group_of == g)[0])) if np.any(group_of == g) else None for g in range(groups)]
    by_queue: dict[str, list[tuple[int, int, int, int]]] = {}
    for p, transfers in linear.transfers.items():
        for t in transfers:
            lo, hi = int(group_of[max(t.first, 0)]), int(group_of[min(max(t.last, t.first), n - 1)])
            by_queue.setdefault(t.queue, []).append((p, lo, hi, max(1, math.ceil(t.time_s / unit_s))))
    exposed = []
    for queue, items in by_queue.items():
        e = model.NewIntVar(0, sum(i[3] for i in items), f"exposed_{queue}")
        exposed.append(e)
        lo = np.array([i[1] for i in items])
        hi = np.array([i[2] for i in items])
        for g1 in range(groups):
            if g_first[g1] is None:
                continue
            for g2 in range(g1, groups):
                if g_last[g2] is None:
                    continue
                inside = np.nonzero((lo >= g1) & (hi <= g2))[0]
                if not len(inside):
                    continue
                capacity = int((cum[g_last[g2] + 1] - cum[g_first[g1]]) / unit_s)
                load: dict[int, int] = {}
                for k in inside:
                    p, _, _, t = items[k]
                    load[p] = load.get(p, 0) + t
                if sum(load.values()) <= capacity:
                    continue
                model.Add(cp_model.LinearExpr.WeightedSum([pair_vars[p] for p in load], list(load.values()))
                          - capacity <= e)
    return exposed


def _read(solver: cp_model.CpSolver, status: int, linear: Linear, x: dict, unit_s: float,
          peak_var: Any, elapsed: float) -> Solved:
    name = solver.StatusName(status)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return Solved(None, name, None, None, elapsed)
    choice = {}
    for key in linear.keys:
        for option in linear.options[key]:
            if solver.BooleanValue(x[key, option]):
                choice[key] = option
    if peak_var is not None:
        return Solved(choice, name, None, None, elapsed, peak=solver.Value(peak_var))
    return Solved(choice, name, solver.ObjectiveValue() * unit_s, solver.BestObjectiveBound() * unit_s, elapsed)


# -- no plan fits ------------------------------------------------------------------------------


def _infeasible(problem: Problem, linear: Linear, budget: int, search: _Search) -> InfeasibleBudget | Built:
    """The smallest budget a plan of this planner meets (measured), and what dominates it; or the
    smallest-peak plan itself when it fits after all (the stages' budget-constrained models can
    miss a plan that the min-peak model finds).

    The budget reported is one that planning again at it meets: the smallest peak of the plans
    found the same way whatever the budget and the clock (the min-peak model on one worker,
    which is deterministic when it finishes, and freeing everything). The stages' plans are
    budget- and time-dependent; they count only when those two find nothing."""
    tried = list(search.tried)
    reproducible: list[Built] = []
    min_solved = _solve_model(linear, None, hint=None, workers=1,
                              deadline=time.perf_counter() + min(10.0, max(search.limit, 1.0)))
    if min_solved.choice is not None:
        reproducible.append(search.build(linear.fates(min_solved.choice), "min-peak"))
    everything: dict = {}
    for index, unit in enumerate(problem.units):
        opts = unit.options()
        everything[index] = RECOMPUTE if RECOMPUTE in opts else (opts[-1] if len(opts) > 1 else KEEP)
    moved: set[str] = set()  # one tier per storage (a storage has a stream per reachable tier)
    for i, st in enumerate(problem.streams):
        if st.storage not in moved:
            everything[("stream", i)] = st.option
            moved.add(st.storage)
    moved.clear()
    for i, off in enumerate(problem.offloads):
        if off.storage not in moved:
            everything[("offload", i)] = off.option
            moved.add(off.storage)
    try:
        reproducible.append(search.build(everything, "free-everything"))
    except PlanError:  # a probe only; the other candidates stand
        pass

    def lowest(candidates: list[Built]) -> Built | None:
        usable = [b for b in candidates if all(
            b.figures.peak_bytes.get(t, 0) <= cap for t, cap in problem.capacities.items() if t != DEVICE)]
        return min(usable, key=lambda b: b.figures.peak_bytes[DEVICE], default=None)

    fitting = [b for b in [*tried, *reproducible] if b.fits]
    if fitting:
        return min(fitting, key=lambda b: b.plan.predicted_time_s)
    best = lowest(reproducible) or lowest(tried) or min([*tried, *reproducible], key=lambda b: b.figures.peak_bytes[DEVICE])
    smallest = best.figures.peak_bytes[DEVICE]
    graph = problem.graph
    at_peak = best.figures.device_at_peak
    owned = sum(graph.tensors[s].nbytes for s in at_peak
                if graph.tensors[s].kind in PERSISTENT_KINDS or s in graph.inputs)
    step = best.plan.schedule[best.figures.peak_step] if best.figures.peak_step >= 0 else None
    working = 0
    where = "before the first step"
    if step is not None and step.op is not None:
        op = graph.op(step.op)
        mine = {graph.tensors[t].storage for t in op.inputs + op.outputs}
        working = sum(graph.tensors[s].nbytes for s in mine if s in at_peak) - sum(
            graph.tensors[s].nbytes for s in mine if s in at_peak and (
                graph.tensors[s].kind in PERSISTENT_KINDS or s in graph.inputs))
        where = f"at {step.describe()}"
    other = smallest - owned - working
    message = (
        f"device budget {format_bytes(budget)} ({budget} bytes) is below the smallest peak tierplan "
        f"can reach, {format_bytes(smallest)} ({smallest} bytes; keep-all needs "
        f"{format_bytes(int(linear.base.max()))}); that peak is {where}: caller-owned tensors "
        f"(parameters, buffers, inputs, optimizer state) {format_bytes(owned)}, the op's own inputs "
        f"and outputs {format_bytes(working)}, other live tensors {format_bytes(other)}"
    )
    message += _dominant(problem, budget, smallest)
    return InfeasibleBudget(message, budget_bytes=budget, min_feasible_bytes=smallest)


def _dominant(problem: Problem, budget: int, smallest: int) -> str:
    """One sentence on what dominates the budget: the parameters, optimizer state, the inputs."""
    from tierplan.ir import TensorKind

    graph = problem.graph
    slower = [t for t in problem.capacities if t != DEVICE]
    inputs = {graph.tensors[n].storage for n in graph.inputs}
    parts = []
    for kind, label in ((TensorKind.PARAMETER, "parameters"), (TensorKind.OPTIMIZER_STATE, "optimizer state")):
        total = sum(t.nbytes for t in graph.tensors_of_kind(kind) if not t.is_view)
        if not total:
            continue
        streamable = sum(st.nbytes for st in problem.streams if graph.tensors[st.storage].kind == kind)
        if total > budget:
            if not slower:
                parts.append(f"{label} alone are {format_bytes(total)} > budget {format_bytes(budget)}; "
                             f"with --tiers host they can be streamed from host memory")
            elif streamable < total:
                parts.append(f"{label} alone are {format_bytes(total)} > budget; only "
                             f"{format_bytes(streamable)} of them can be streamed (the rest are written "
                             f"in the step or never read)")
            else:
                parts.append(f"{label} are {format_bytes(total)} > budget and are streamed from "
                             f"{slower[0]}; what remains is the working set of the op at the peak and the fetches in flight")
    batch = sum(graph.tensors[s].nbytes for s in inputs
                if graph.tensors[s].kind not in (TensorKind.PARAMETER, TensorKind.OPTIMIZER_STATE,
                                                 TensorKind.BUFFER))
    if batch > budget:
        parts.append(f"the inputs alone are {format_bytes(batch)} > budget")
    if not parts and not slower:
        parts.append("no slower tier is given: only recompute can free memory; with --tiers host "
                     "activations and parameters can also be moved to host memory")
    return ("; " + "; ".join(parts)) if parts else ""
