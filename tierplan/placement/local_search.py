"""Improve a fitting choice by local moves measured exactly (the planner's own simulator).

CP-SAT's objective prices copies by per-window channel loads (a bound, not the replay's queue
timing) and rarely proves optimality on two cores; the heuristic hint ignores channels. This pass
works on the measured step time instead. From a choice that fits the budget it tries, best
estimated gain first:

- drop: a key back to keep (saves its recompute / exposed copy time);
- switch: a key to a cheaper option (e.g. recompute -> a swap that hides behind compute);
- trade: drop an expensive key and pay for the bytes with a cheap option on a kept key (e.g.
  keep a block's recompute, move a block output to host behind compute), which is how a tight
  budget gets below checkpoint-blocks.

Moves are screened with the linear device profile (``linear.delta``/``transient``, the solver's
own memory model), then measured; a move is taken only if the measured plan fits and is faster.
Deterministic: candidates are ordered by (estimated gain, pair index), and the pass stops at a
deadline or after ``max_evals`` measurements.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from tierplan.placement.candidates import KEEP, Option
from tierplan.placement.linear_model import Key, Linear, anchors_ok

Measure = Callable[[dict], tuple[bool, float]]  # choice -> (fits every tier, measured time s)


class _Profile:
    def __init__(self, linear: Linear, choice: dict[Key, Option]) -> None:
        self.linear = linear
        self.steps = linear.transient_steps()
        self.profile = linear.base.astype(np.int64).copy()
        self.pre = linear.pre_base[self.steps].astype(np.int64).copy()
        self.tier = {t: 0 for t in linear.swap_bytes}
        for key, option in choice.items():
            self.apply(linear.pair_index[key, option], 1)

    def apply(self, p: int, sign: int) -> None:
        lin = self.linear
        self.profile += sign * lin.delta[p]
        if len(self.steps):
            self.pre += sign * (lin.delta[p, self.steps] + lin.transient[p, self.steps])
        for t, amounts in lin.swap_bytes.items():
            self.tier[t] += sign * int(amounts[p])

    def over(self, budget: int, extra: list[tuple[int, int]] = ()) -> np.ndarray:
        """Device bytes over ``budget`` at each step after applying (pair, sign) ``extra``."""
        prof = self.profile.copy()
        for p, sign in extra:
            prof += sign * self.linear.delta[p]
        return prof - budget

    def fits(self, budget: int, extra: list[tuple[int, int]]) -> bool:
        lin = self.linear
        prof = self.profile.copy()
        pre = self.pre.copy()
        tiers = dict(self.tier)
        for p, sign in extra:
            prof += sign * lin.delta[p]
            if len(self.steps):
                pre += sign * (lin.delta[p, self.steps] + lin.transient[p, self.steps])
            for t, amounts in lin.swap_bytes.items():
                tiers[t] += sign * int(amounts[p])
        if prof.max(initial=0) > budget or (len(pre) and pre.max() > budget):
            return False
        return all(tiers[t] <= lin.problem.capacities[t] for t in tiers)


def improve(linear: Linear, choice: dict[Key, Option], budget: int, measure: Measure, *,
            deadline: float, max_evals: int = 400) -> tuple[dict[Key, Option], float, int]:
    """(improved choice, its measured time, measurements made); ``choice`` must fit."""
    fits, best_t = measure(choice)
    evals = 1
    if not fits:
        return choice, best_t, evals
    current = dict(choice)
    cost = linear.cost_s
    tiny = 1e-12
    while evals < max_evals and time.perf_counter() < deadline:
        prof = _Profile(linear, current)
        moves: list[tuple[float, tuple, dict[Key, Option]]] = []
        chosen = [(linear.pair_index[k, o], k, o) for k, o in current.items()]
        for p, key, option in chosen:
            # drop
            if prof.fits(budget, [(p, -1)]) and anchors_ok(linear, current, key, KEEP):
                new = dict(current)
                del new[key]
                moves.append((cost[p], (0, p), new))
            # switch to a cheaper option
            for other in linear.options[key]:
                q = linear.pair_index[key, other]
                if q == p or cost[q] >= cost[p] - tiny:
                    continue
                if prof.fits(budget, [(p, -1), (q, 1)]) and anchors_ok(linear, current, key, other):
                    new = dict(current)
                    new[key] = other
                    moves.append((cost[p] - cost[q], (1, p, q), new))
        # trades: drop an expensive key, cover its bytes with the cheapest option of a kept key
        kept = [k for k in linear.keys if k not in current]
        for p, key, option in sorted(chosen, key=lambda c: (-cost[c[0]], c[0]))[:24]:
            if not anchors_ok(linear, current, key, KEEP):
                continue
            over = prof.over(budget, [(p, -1)])
            bad = np.nonzero(over > 0)[0]
            if not len(bad):
                continue
            best_q, best_c = -1, cost[p] - tiny
            for k2 in kept:
                for o2 in linear.options[k2]:
                    q = linear.pair_index[k2, o2]
                    if cost[q] >= best_c:
                        continue
                    if np.all(linear.delta[q, bad] <= -over[bad]):
                        best_q, best_c = q, cost[q]
            if best_q < 0:
                continue
            k2, o2 = linear.pairs[best_q]
            if not prof.fits(budget, [(p, -1), (best_q, 1)]):
                continue
            new = dict(current)
            del new[key]
            if not anchors_ok(linear, new, k2, o2):
                continue
            new[k2] = o2
            moves.append((cost[p] - cost[best_q], (2, p, best_q), new))
        moves.sort(key=lambda m: (-m[0], m[1]))
        improved = False
        for gain, _, new in moves:
            if evals >= max_evals or time.perf_counter() >= deadline:
                break
            ok, t = measure(new)
            evals += 1
            if ok and t < best_t * (1 - 1e-9):
                current, best_t, improved = new, t, True
                break
        if not improved:
            break
    return current, best_t, evals


__all__ = ["improve"]

