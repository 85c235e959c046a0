"""The joint keep / recompute / swap / stream planner: a search in stages over CP-SAT models.

Design (the pieces: ``candidates``, ``linear_model``, ``cpsat``, ``local_search``):

- Capture order is kept. Candidates are forward ops whose outputs are read again in the backward
  (units); each takes keep, recompute (re-run it and its dead producer chain right before the first
  backward reader) or swap to a tier reachable by a channel pair (offload after the last forward
  reader, prefetch early enough to hide behind the backward's compute). Caller-owned storages may
  stream from a slower tier, gradients may be offloaded to one.
- The device's live bytes at every step are a linear function of the choices (``linear_model``);
  the CP-SAT model (``cpsat``) minimizes recompute seconds plus a lower bound of each copy
  queue's stall under the budget.
- Every answer is turned into a schedule and measured exactly by ``simulate``; if the model's
  approximations let it exceed the budget, it is re-solved with the cap tightened by the
  overshoot. The best measured plan among the solver's, the greedy heuristic's and the
  baselines' is returned, so it is never worse than them.
- The stages are the table ``STAGES``: small models whose answers are choices of the full one
  first (each unit at its own recompute point; recompute alone, so a slower tier never makes the
  plan worse than recompute alone; one decision per block position on a large graph; the nearest
  slower tier alone when there are several), then every option with one decision per unit, then
  measured local moves in it. Each stage starts from the best measured plan so far that its model
  can express. Local moves (``local_search.improve``) find plans the model's conservative
  transient bytes exclude and correct its queue timing, so they get more of the time when copies
  are in play.
- The first stage (RETAIN) is ``remat_any``'s retention-interval model (Moccasin's), in which
  any forward op is re-run at any later op as often as pays, and with a slower tier any forward
  node is copied to the nearest one after its compute and loaded back instead
  (``interval_channels``). A graph with no backward op (inference, abstract benchmark graphs) has no
  units, so it gets 0.9 of the time; a training graph, or one whose parameters may need
  streaming, gets it as one more measured candidate in 0.25 of the time, beside the per-unit
  models.
- Parameter streams and gradient offloads enlarge the model; they are offered when caller-owned
  state is a large share of the budget, and in a second pass when the first finds no plan.
- The gaps reported are against ``bound.overhead_lower_bound``: a relaxation that no plan of the
  space beats (torch's included), as shares of the step time and of the overhead over keep-all; a
  bound above the plan is a bug (InternalError), never OPTIMAL. CP-SAT's bound on its own model is
  ``model_bound_s``; it does not cover plans outside that model. CP-SAT runs with a fixed seed and
  two workers (results still depend on how far it gets within the limit).

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
from typing import Any, cast

from tierplan.ir import Graph
from tierplan.passes.liveness import Liveness, liveness
from tierplan.placement.assemble import Built, build_plan
from tierplan.placement.baselines import checkpoint_blocks_fates, swap_all_fates
from tierplan.placement.bound import KEEP_ALL, LowerBound, overhead_lower_bound
from tierplan.placement.candidates import KEEP, Option, Problem, analyze
from tierplan.placement.cpsat import MIN_SOLVE_S, Solved, solve_model
from tierplan.placement.infeasible import infeasible
from tierplan.placement.keep_all import keep_all_plan
from tierplan.placement.linear_model import Key, Linear, greedy, linearize
from tierplan.placement.local_search import improve
from tierplan.placement.remat_any import (
    FIRST_FIT, GREEDY, REMAT_ANY_CPSAT, RematProblem, RematSolved, remat_problem, search_remat_any, spans_plan,
)
from tierplan.placement.schedule import build_schedule, initial_tiers
from tierplan.placement.simulate import simulate
from tierplan.units import format_bytes
from tierplan.plans.plan import (
    BOUND_ABS_TOL_S, BOUND_REL_TOL, DEVICE, Channel, InfeasibleBudget, InternalError, Plan, PlanError, Pricing,
    SolverReport, bound_above, meets_bound,
)

# Measured on 2 shared CPU cores: GPT-2 small plans in ~20 s; Llama-2-70B training (18k ops) in
# ~40 s with this limit (CP-SAT stops at it; building and measuring candidate plans takes the rest).
DEFAULT_TIME_LIMIT_S = 30.0
_LOCAL_SEARCH_STARTS = 3  # measured plans the local search starts from (best first)
# Above this many units a block-shared model (one decision per block position) solves first and
# hints the per-unit model; below it the per-unit model alone is small enough.
_SHARE_ABOVE_UNITS = 150
_BOUND_STEPS = 2  # high-pressure steps the proven bound tries (the keep-all peak is the first)
_BOUND_STEP_S = 2.0  # SCIP time per step; its LP-based bound is used when it stops early
_MIN_RETRY_S = 1.0  # the second pass gets at least this long: a plan late beats a false "infeasible"

# The bound kind of a CP-SAT answer's own report: CP-SAT's bound on the model it solved, which covers
# that model's plans only (docs/cost-model.md, "Bound kinds").
CP_SAT_MODEL = "cp-sat-model"

# -- the stages --------------------------------------------------------------------------------

SOLVE = "solve"  # CP-SAT on the model, then measure its plan and tighten the cap by any overshoot
IMPROVE = "improve"  # measured local moves in the model
RETAIN = "retain"  # CP-SAT on remat_any's retention-interval model (any node re-run at any later op)

OWN_POINT = "own-point"  # each unit recomputed only at its own first backward use, one swap window
RECOMPUTE_ONLY = "recompute-only"  # no copies (only when a slower tier is offered)
PER_BLOCK = "per-block"  # every option, one decision per block position (large graphs)
NEAREST_TIER = "nearest-tier"  # every option, one decision per unit, the nearest slower tier alone
EVERY_OPTION = "every-option"  # every option, one decision per unit: the model that matters
ANY_POINT = "any-point"  # any forward op re-run anywhere (settings without a slower tier)


@dataclass(frozen=True)
class Stage:
    """One row of the search. A stage whose model does not apply to the graph is skipped; each
    stage starts from (is hinted with) the best measured plan so far that its model expresses."""

    action: str  # SOLVE or IMPROVE
    model: str
    share: float  # of the time left when the stage starts
    share_with_streams: float | None = None  # instead, when streams or offloads are offered
    share_with_copies: float | None = None  # instead, when the model can copy to a slower tier
    share_with_backward: float | None = None  # instead, on a training graph (its units have models too)


STAGES: tuple[Stage, ...] = (
    # Without a slower tier every forward op may be re-run wherever it is read again, which only
    # the interval model expresses. A graph with no backward (inference, abstract benchmark
    # graphs) has no units, so it gets most of the time; on a training graph it is one more
    # candidate beside the per-unit models (recompute at own points, per block), which get the rest.
    # Parameter streams are the per-unit models' alone: when they are offered (the budget may need
    # them) the interval model is one more candidate too.
    Stage(RETAIN, ANY_POINT, 0.9, share_with_streams=0.25, share_with_backward=0.25),
    # With streams the per-unit models take seconds to build and rarely solve in the time left;
    # the own-point model does, given the time.
    Stage(SOLVE, OWN_POINT, 0.3, share_with_streams=0.5),
    Stage(SOLVE, RECOMPUTE_ONLY, 0.2),
    # A move in the block-shared model changes every block at once, which escapes optima that
    # single-unit moves cannot.
    Stage(SOLVE, PER_BLOCK, 0.2),
    Stage(IMPROVE, PER_BLOCK, 0.3),
    # With host and NVMe the full model starts from the answer without the farther tier, so that
    # copies to NVMe that look cheap to the model cannot lure the search away from it.
    Stage(SOLVE, NEAREST_TIER, 0.3),
    Stage(IMPROVE, NEAREST_TIER, 0.6),
    # With copies in play the model's queue timing is a loose bound and the measured local moves
    # do most of the work: they get more of the time.
    Stage(SOLVE, EVERY_OPTION, 0.75, share_with_copies=0.4),
    Stage(IMPROVE, EVERY_OPTION, 1.0),
)


@dataclass(frozen=True)
class _Model:
    linear: Linear
    solve_label: str  # in the plan's method: "cp-sat (<solve_label>)"
    improve_label: str  # "local search (N measured moves<improve_label>) from ..."


class _Models:
    """The models of one problem, built when a stage first asks for them (building one takes
    seconds on a large graph, and counts against the stage that needs it)."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.every = linearize(problem)
        self.shared = len(problem.units) > _SHARE_ABOVE_UNITS and any(u.share_key for u in problem.units)
        # The model the greedy start and the infeasibility report use: the smaller one.
        self.coarse = linearize(problem, shared=True) if self.shared else self.every
        tiers = {o.tier for _, o in self.every.pairs} - {None}
        self.copies = bool(tiers)
        self.nearest = min(tiers, key=lambda t: _copy_seconds_per_byte(problem, t)) if len(tiers) > 1 else None
        self._built: dict[str, _Model | None] = {EVERY_OPTION: _Model(self.every, "keep/recompute/swap/stream", "")}

    def get(self, name: str) -> _Model | None:
        if name not in self._built:
            self._built[name] = self._build(name)
        return self._built[name]

    def _build(self, name: str) -> _Model | None:
        problem, shared, nearest = self.problem, self.shared, self.nearest
        first_tiers = (nearest,) if nearest else None
        only = f", {nearest} only" if nearest else ""
        if name == OWN_POINT:
            linear = linearize(problem, shared=shared, restrict=True, tiers=first_tiers)
            return _Model(linear, "own-point options" + only, "") if len(linear.pairs) < len(self.coarse.pairs) else None
        if name == RECOMPUTE_ONLY:
            linear = linearize(problem, shared=shared, tiers=()) if self.copies else None
            return _Model(linear, "recompute only", "") if linear is not None and linear.pairs else None
        if name == PER_BLOCK:
            if not shared:
                return None
            linear = linearize(problem, shared=True, tiers=first_tiers) if nearest else self.coarse
            return _Model(linear, "every option, per block position" + only, ", per block position" + only)
        if name == ANY_POINT:
            ways = interval_channels(problem)
            label = "recompute anywhere" + (f" or load from {ways[0].dst}" if ways else "") + ", retention intervals"
            return _Model(self.every, label, "")
        if name == NEAREST_TIER:
            if not nearest:
                return None
            return _Model(linearize(problem, tiers=first_tiers), f"recompute and {nearest} only", only)
        raise ValueError(f"no model named {name!r}")


def solve(graph: Graph, pricing: Pricing, *, time_limit_s: float | None = None,
          live: Liveness | None = None, suggest_tiers: bool = True) -> Plan:
    """The fastest plan found whose device peak is at most ``pricing.budget``.

    Raises InfeasibleBudget (with the smallest budget this planner can meet) when none fits.
    ``live``: the graph's liveness in capture order, when the caller has it. ``suggest_tiers``:
    the caller's command has a ``--tiers`` option that an infeasible budget's message may suggest.
    """
    started = time.perf_counter()
    limit = DEFAULT_TIME_LIMIT_S if time_limit_s is None else max(float(time_limit_s), 0.1)
    live = live if live is not None else liveness(graph)
    reference = keep_all_plan(graph, pricing, live=live)
    ka_time, ka_peak = reference.predicted_time_s, reference.keep_all_peak_bytes
    if ka_peak <= pricing.budget:
        reference.method = "keep-all (it fits the budget: nothing to recompute or swap)"
        reference.solver = SolverReport.of("KEEP_ALL_FITS", ka_time, ka_time, time.perf_counter() - started,
                                           keep_all_s=ka_time, bound_kind=KEEP_ALL)
        return reference

    # The proven bound covers every plan of the space, torch's included; CP-SAT's bound covers
    # its own model only (fixed recompute points and windows) and is reported beside it.
    proven = overhead_lower_bound(graph, pricing, live=live, steps=_BOUND_STEPS,
                                  time_limit_s=min(_BOUND_STEP_S, max(0.2, 0.05 * limit)))
    problem = analyze(graph, pricing, live=live, keep_all=reference)
    best, solved = _search(problem, started, limit, suggest_tiers)
    if best is None and problem.streams_withheld:
        # Streams and offloads were left out to keep the model small: search again with them in
        # the time left.
        problem = analyze(graph, pricing, live=live, keep_all=reference, offer_streams=True)
        best, solved = _search(problem, time.perf_counter(),
                               max(limit - (time.perf_counter() - started), _MIN_RETRY_S), suggest_tiers)
    if isinstance(best, InfeasibleBudget):
        raise best
    assert best is not None  # a search with streams offered never returns None
    return _finish(best.plan, solved, proven, graph, ka_time, time.perf_counter() - started)


def _search(problem: Problem, started: float, limit: float,
            suggest_tiers: bool = True) -> tuple[Built | InfeasibleBudget | None, Solved | None]:
    """The fastest measured plan that fits; when none does, None if streams were withheld (the
    caller searches again with them), else the smallest budget the planner meets. Beside it, the
    every-option model's own answer."""
    models = _Models(problem)
    search = _Search(problem, started, limit)
    # Portfolio: the heuristic and the baselines are both hints and fallbacks.
    search.build(models.coarse.fates(greedy(models.coarse, problem.pricing.budget)),
                 "greedy (seconds per byte freed at the peak step)", start=True)
    ckpt = checkpoint_blocks_fates(problem)
    if ckpt is not None:
        built = search.build(ckpt[0], "checkpoint-blocks", segments=ckpt[1])
        as_options = _as_options(problem, ckpt[0], ckpt[1])
        if as_options is not None:
            search.fates_of[id(built)] = as_options
    search.build(swap_all_fates(problem), "swap-all")

    solved: Solved | None = None
    for stage in STAGES:
        model = models.get(stage.model)
        if model is None:
            continue
        share = stage.share
        if stage.share_with_streams is not None and problem.streams:
            share = stage.share_with_streams
        if stage.share_with_copies is not None and models.copies:
            share = stage.share_with_copies
        if stage.share_with_backward is not None and problem.units:
            share = stage.share_with_backward
        if stage.action == RETAIN:
            search.retain(share, model.solve_label)
        elif stage.action == SOLVE:
            result = search.stage(model.linear, share, model.solve_label)
            if stage.model == EVERY_OPTION:
                solved = result
        else:
            search.local_search(model.linear, model.improve_label, share=share)

    fitting = [b for b in search.tried if b.fits]
    if not fitting and problem.streams_withheld:
        return None, solved
    if not fitting:
        found = infeasible(problem, models.coarse, problem.pricing.budget, search, suggest_tiers=suggest_tiers)
        if isinstance(found, InfeasibleBudget) and search.retained is not None and not problem.units:
            # Without units the per-unit diagnosis has nothing to say; with them it names what
            # binds (the parameters, the tiers), which the interval model's floor does not.
            found = _retain_infeasible(found, search.retained, search.closest_peak())
        if isinstance(found, InfeasibleBudget):
            return found, solved
        fitting = [found]  # the min-peak probe found a plan within the budget
    # Ties go to the solver's plan (its decisions come with a bound).
    best = min(fitting, key=lambda b: (b.plan.predicted_time_s * (1 - 1e-12 * b.plan.method.startswith("cp-sat")),
                                       b.plan.recompute_time_s))
    return best, solved


def _finish(plan: Plan, solved: Solved | None, proven: LowerBound, graph: Graph, ka_time: float,
            solve_s: float) -> Plan:
    """The plan with its solver report: both gaps to the proven bound (unclipped), OPTIMAL only
    when the plan meets the bound, and the per-unit model's own status beside it. A bound above
    the plan raises InternalError: no plan of the space beats a proven bound, so one of the two
    figures is wrong."""
    bound_s = ka_time + proven.overhead_s
    bound_step = graph.ops[proven.step].name if proven.step >= 0 else None
    _check_bound(plan, bound_s, ka_time, proven.kind, bound_step)
    model: dict[str, Any] = {}
    model_status = solved.status if solved else "NOT_RUN"
    own = plan.solver
    if own is not None and own.bound_kind == REMAT_ANY_CPSAT:
        # The interval model's bound covers only that model's plans, which count a stage's
        # recomputes together (coarser than Checkmate's accounting: on a 100-node layered graph
        # its OPTIMAL +2.80% sits above the exact MILP's proven +0.37%), so it is the model's
        # figure, never the proven bound (docs/cost-model.md, "Recompute anywhere (Moccasin)").
        model = dict(model_objective_s=own.objective_s, model_bound_s=own.bound_s)
        model_status = own.status
    elif solved is not None and solved.objective_s is not None:
        model = dict(model_objective_s=ka_time + solved.objective_s,
                     model_bound_s=ka_time + (solved.bound_s or 0.0))
    status = "OPTIMAL" if meets_bound(plan.predicted_time_s, bound_s) else "FEASIBLE"
    plan.solver = SolverReport.of(
        status, plan.predicted_time_s, bound_s, solve_s, keep_all_s=ka_time, bound_kind=proven.kind,
        model_status=model_status, bound_step=bound_step, **model,
    )
    if not plan.method.startswith("cp-sat"):
        plan.method = f"{plan.method} (best measured plan; the cp-sat answer was not faster)"
    return plan


def _check_bound(plan: Plan, bound_s: float, ka_time: float, kind: str, bound_step: str | None) -> None:
    """Raise InternalError when the proven bound is above the plan's step time by more than the
    tolerance (BOUND_REL_TOL of it + BOUND_ABS_TOL_S, for round-off): no plan beats a proven
    bound, so the bound's relaxation or the plan's measured figures are wrong."""
    if not bound_above(plan.predicted_time_s, bound_s):
        return
    where = f" at op {bound_step}" if bound_step else ""
    raise InternalError(
        f"a bug in tierplan: the proven lower bound on the step time, {bound_s:.9g} s (kind {kind}{where}: "
        f"keep-all {ka_time:.9g} s + {bound_s - ka_time:.9g} s), is above the step time of the plan it "
        f"bounds, {plan.predicted_time_s:.9g} s (method {plan.method!r}), by more than {BOUND_REL_TOL:g} of "
        f"it + {BOUND_ABS_TOL_S:g} s. No plan can beat a proven bound: the bound (placement/bound.py) or "
        f"the plan's figures (placement/simulate.py) are wrong. Please report it with the model, hardware "
        f"and budget (--debug shows the traceback)"
    )


@dataclass(frozen=True)
class IntervalOutcome:
    """The interval model's (``remat_any``) problem and answer in a search: read when no plan
    fits the budget."""

    problem: RematProblem
    answer: RematSolved


@dataclass
class _Search:
    """What one search has built and the time it has, shared by its stages.

    Plans are kept with their member fates (not one model's choice), so that any model reads
    them back (``Linear.choice``) as a hint or a local-search start.
    """

    problem: Problem
    started: float
    limit: float
    tried: list[Built] = field(default_factory=list)
    fates_of: dict[int, dict] = field(default_factory=dict)  # id(built) -> its member fates
    retained: IntervalOutcome | None = None  # what the interval model found, when it ran

    @property
    def budget(self) -> int:
        return self.problem.pricing.budget

    @property
    def end(self) -> float:
        return self.started + self.limit - 0.5  # time to build the plan (a schedule and its replay)

    def build(self, fates: dict, method: str, *, start: bool = False, **extra: Any) -> Built:
        """Build and measure the plan of ``fates``; ``start``: a model may start from it."""
        built = build_plan(self.problem, fates, method=method, **extra)
        self.tried.append(built)
        if start:
            self.fates_of[id(built)] = fates
        return built

    def starts(self, model: Linear) -> list[tuple[Built, dict[Key, Option]]]:
        """Plans the model can express, fitting ones first, fastest first, with their choices."""
        ranked = sorted((b for b in self.tried if id(b) in self.fates_of),
                        key=lambda b: (not b.fits, b.plan.predicted_time_s))
        return [(b, c) for b in ranked if (c := model.choice(self.fates_of[id(b)])) is not None]

    def stage(self, model: Linear, share: float, label: str) -> Solved | None:
        """Solve, measure, tighten the cap by any overshoot; at most ``share`` of the time left."""
        now = time.perf_counter()
        stage_end = now + share * (self.limit - (now - self.started))
        ka_time = self.problem.keep_all.predicted_time_s
        hints = self.starts(model)
        cap, result, start_hint = self.budget, None, hints[0][1] if hints else None
        for _ in range(4):
            if stage_end - time.perf_counter() <= MIN_SOLVE_S:
                break
            result = solve_model(model, cap, hint=start_hint, deadline=stage_end)
            if result.choice is None:
                break
            info = SolverReport.of(result.status, ka_time + (result.objective_s or 0.0),
                                   ka_time + (result.bound_s or 0.0), result.solve_s, keep_all_s=ka_time,
                                   bound_kind=CP_SAT_MODEL)
            built = self.build(model.fates(result.choice), f"cp-sat ({label})", start=True, solver=info)
            if built.fits:
                break
            over = built.figures.peak_bytes[DEVICE] - self.budget
            if over <= 0:
                break  # another tier overflowed: the per-tier bound is already conservative
            cap -= over  # the model under-counted somewhere (transients); ask for that much less
            start_hint = result.choice
        return result

    def retain(self, share: float, label: str) -> None:
        """remat_any's interval model for at most ``share`` of the time left; its plan, when it
        fits, joins the measured plans (it is no choice of the per-unit models: no start for them)."""
        now = time.perf_counter()
        deadline = now + share * (self.end - now)
        problem = self.problem
        reference = problem.keep_all
        remat = remat_problem(problem.graph, self.budget, problem.pricing.op_time_s,
                              channels=interval_channels(problem))
        found = search_remat_any(remat, reference.keep_all_peak_bytes, deadline=deadline)
        self.retained = IntervalOutcome(remat, found)
        if not found.fits or found.spans is None:
            return
        ka_time = reference.predicted_time_s
        info = SolverReport.of(found.status, ka_time + (found.objective_s or 0.0), ka_time + (found.bound_s or 0.0),
                               found.solve_s, keep_all_s=ka_time, bound_kind=REMAT_ANY_CPSAT)
        # The start's spans are the answer when the last solve found none within the budget in
        # time: the sweep's, or the ladder's (CP-SAT's first answer within it, no better one).
        method = {GREEDY: f"greedy sweep ({label})", FIRST_FIT: f"cp-sat first fit ({label})"}.get(
            found.status, f"cp-sat ({label})")
        plan, figures = spans_plan(remat, found.spans, problem.pricing, reference, method=method, solver=info,
                                   reloads=found.reloads)
        if info.bound_s is not None and info.bound_s > plan.predicted_time_s:
            # The model's integer op times round: a bound above its own plan is that rounding.
            plan.solver = SolverReport.of(found.status, plan.predicted_time_s, plan.predicted_time_s, found.solve_s,
                                          keep_all_s=ka_time, bound_kind=REMAT_ANY_CPSAT)
        self.tried.append(Built(plan, figures))

    def closest_peak(self) -> int | None:
        """The device peak of the interval model's lowest plan over the budget, when it answered
        with one: it tells the user how close the search came, where keep-all's peak would say it
        found nothing below keep-all. Built here, for the infeasible budget's message only."""
        outcome = self.retained
        if outcome is None or outcome.answer.fits or outcome.answer.spans is None:
            return None
        try:
            _, figures = spans_plan(outcome.problem, outcome.answer.spans, self.problem.pricing, self.problem.keep_all,
                                    method="closest", reloads=outcome.answer.reloads)
        except PlanError:  # only a figure for the message: the message goes on without it
            return None
        return figures.peak_bytes[DEVICE]

    def measure(self, model: Linear, choice: dict[Key, Option]) -> tuple[bool, float]:
        """(fits every tier, step time) of the choice's plan, from the simulator."""
        problem = self.problem
        fates = model.fates(choice)
        try:
            figures = simulate(problem.graph, build_schedule(problem, fates), problem.pricing,
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
                           f"{start.plan.method}", start=True, solver=start.plan.solver)


def _retain_infeasible(found: InfeasibleBudget, retained: IntervalOutcome, closest: int | None) -> InfeasibleBudget:
    """The infeasible-budget message when any op could be re-run anywhere: the per-unit models'
    smallest peak (keep-all's, with no units) is not this space's; say what the interval model
    found, the floor no schedule goes below and how close the interval model came. The smallest
    feasible budget stays the per-unit models' (a plan found again at that budget: callers plan
    there, ``api.plan_graph_fractional``); the interval model's closest plan is reported beside it,
    since a search at its peak walks other steps and may not find it."""
    status, floor = retained.answer.status, retained.problem.floor() + retained.problem.fixed_bytes
    budget, smallest = found.budget_bytes, found.min_feasible_bytes
    proven = "none fits (proven for that model)" if status == "INFEASIBLE" else f"none found in the time given ({status})"
    message = (
        f"device budget {format_bytes(budget)} ({budget} bytes): no plan found. Re-running any op at any "
        f"later point (the retention-interval model): {proven}; no schedule peaks below "
        f"{format_bytes(floor)} ({floor} bytes: an op's inputs and output and the outputs made before it)."
    )
    if closest is not None and smallest is not None and closest >= smallest:
        closest = None
    if closest is not None:
        message += (f" Its lowest plan on the way down peaks at {format_bytes(closest)} ({closest} bytes; a "
                    "search at that budget takes other steps and may not find it again).")
    message += (f" The smallest budget sure to be met is {format_bytes(smallest or 0)} ({smallest} bytes)"
                + ("; more time (--time-limit) may find a plan" if status != "INFEASIBLE" and floor <= budget else ""))
    return InfeasibleBudget(message, budget_bytes=budget, min_feasible_bytes=smallest, closest_bytes=closest)


def interval_channels(problem: Problem) -> tuple[Channel, Channel] | None:
    """The copies (device -> tier, tier -> device) to the slower tier the interval model may load
    from: the one with the fastest round trip (copies to a farther tier are the per-unit models')."""
    round_trip = {c.dst: _copy_seconds_per_byte(problem, c.dst) for c in problem.channels if c.src == DEVICE}
    tier = min(round_trip, key=round_trip.__getitem__, default=None)
    if tier is None or round_trip[tier] == math.inf:
        return None
    return cast(Channel, problem.pricing.channel(DEVICE, tier)), cast(Channel, problem.pricing.channel(tier, DEVICE))


def _copy_seconds_per_byte(problem: Problem, tier: str) -> float:
    """Seconds per byte of a round trip device -> tier -> device (inf when a way is missing)."""
    ways = (problem.pricing.channel(DEVICE, tier), problem.pricing.channel(tier, DEVICE))
    return sum(1.0 / c.bandwidth for c in ways if c is not None) if None not in ways else math.inf


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
