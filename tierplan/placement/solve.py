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
  measured exactly by ``simulate``; if the approximations let it exceed the budget, the
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


from tierplan.ir import Graph
from tierplan.placement.assemble import Built, build_plan
from tierplan.placement.bound import overhead_lower_bound
from tierplan.placement.cpsat import MIN_SOLVE_S, Solved, solve_model
from tierplan.placement.candidates import KEEP, Problem, analyze, option_tier
from tierplan.placement.keep_all import keep_all_plan
from tierplan.placement.linear_model import Key, Linear, greedy, linearize
from tierplan.placement.infeasible import infeasible
from tierplan.placement.local_search import improve
from tierplan.plans.plan import DEVICE, Channel, InfeasibleBudget, Plan, PlanError
from tierplan.placement.schedule import build_schedule, initial_tiers
from tierplan.placement.simulate import simulate

# Measured on 2 shared CPU cores: GPT-2 small plans in ~20 s; Llama-2-70B training (18k ops) in
# ~40 s with this limit (CP-SAT stops at it; building and measuring candidate plans takes the rest).
DEFAULT_TIME_LIMIT_S = 30.0
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
    from tierplan.placement.baselines import checkpoint_blocks_fates, swap_all_fates

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
        found = infeasible(problem, coarse, budget, search)  # the smaller model
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
            if stage_end - time.perf_counter() <= MIN_SOLVE_S:
                break
            result = solve_model(model, cap, hint=start_hint, deadline=stage_end)
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
