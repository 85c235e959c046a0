"""plan_generation: the policy for a generation job, chosen by the linear model and measured by
the simulator.

The search runs ``PolicyModel`` (tierplan's units: every tensor of a layer and every split of
the cache's blocks, binary) for each batching of the job's batch into micro-batches and each
attention place, prices each answer by ``simulate`` and keeps the fastest whole job.
"""
from __future__ import annotations

import math
import time
from typing import Callable

from tierplan.generation.policy_model import (
    CacheOption, PolicyModel, WeightUnit, cache_splits, step_groups,
)
from tierplan.generation.simulate import peak_bytes, simulate
from tierplan.plans.generation import GenerationPlan, GenerationPolicy, GenerationRates, GenerationShape
from tierplan.plans.plan import DEVICE, HOST, NVME, PlanError
from tierplan.units import format_bytes

CACHE_BLOCKS = 16  # the cache's positions are placed in this many blocks
MIP_SECONDS = 5.0  # each linear model's time limit


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def block_tokens(shape: GenerationShape) -> int:
    return math.ceil(shape.max_positions / CACHE_BLOCKS)


def attention_places(capacities: dict[str, int]) -> list[str]:
    """Host attention only pays where the cache may live off the device."""
    return [DEVICE, HOST] if (HOST in capacities or NVME in capacities) else [DEVICE]


def make_policy(shape: GenerationShape, *, gpu_batch: int, layer_tiers: dict[str, str],
                cache: CacheOption, attention: str, activations: str = DEVICE) -> GenerationPolicy:
    """Every layer's tensors as ``layer_tiers`` (name inside a layer -> tier), the rest on the
    device, the cache as ``cache``'s blocks, the hidden states between layers on ``activations``."""
    tiers = {shape.param_name(i, name): layer_tiers[name] for i in range(shape.layers) for name, _ in shape.layer_params}
    tiers.update((name, DEVICE) for name, _ in shape.other_params)
    assert cache.blocks is not None
    return GenerationPolicy(gpu_batch=gpu_batch, num_gpu_batches=shape.batch // gpu_batch, weight_tiers=tiers,
                            kv_block_tokens=cache.block_tokens, kv_tiers=cache.blocks, attention=attention,
                            activations=activations)


def over_tier(peaks: dict[str, int], capacities: dict[str, int]) -> str | None:
    """The first tier whose peak is over its capacity (a tier the plan lacks has none)."""
    return next((tier for tier, need in peaks.items() if need > capacities.get(tier, 0)), None)


def price(shape: GenerationShape, policy: GenerationPolicy, rates: GenerationRates, capacities: dict[str, int],
          hardware: str, *, record: bool = True, **fields: object) -> GenerationPlan | str:
    """The plan of ``policy``, or why it does not fit (the first tier over its capacity); its
    tasks only when ``record`` (the search prices candidates without them)."""
    peaks = peak_bytes(shape, policy, rates)
    tier = over_tier(peaks, capacities)
    if tier is not None:
        return f"{tier} needs {format_bytes(peaks[tier])}, more than its {format_bytes(capacities.get(tier, 0))}"
    tasks, step_end = simulate(shape, policy, rates, record=record)
    return GenerationPlan(shape=shape, policy=policy, rates=rates, hardware=hardware, capacities=dict(capacities),
                          tasks=tasks, step_end_s=step_end, peak_bytes=peaks, **fields)  # type: ignore[arg-type]


def plan_generation(shape: GenerationShape, rates: GenerationRates, capacities: dict[str, int], *,
                    hardware: str, time_limit_s: float = 60.0, attention: str | None = None,
                    on_candidate: Callable[[str], None] | None = None) -> GenerationPlan:
    """The fastest policy tierplan finds for ``shape`` on a machine of ``rates`` and tier
    ``capacities`` (the device's is the budget; a tier left out is not used); ``attention``
    ("device" or "host") fixes where attention runs, else both are searched."""
    t0 = time.perf_counter()
    units = [WeightUnit(name, nbytes, 1) for name, nbytes in shape.layer_params]
    groups = step_groups(shape)
    tokens = block_tokens(shape)
    blocks = math.ceil(shape.max_positions / tokens)
    slower = tuple(t for t in (HOST, NVME) if t in capacities)
    batchings = divisors(shape.batch)
    places = attention_places(capacities) if attention is None else [attention]
    tried: list[tuple[float, str]] = []
    best: GenerationPlan | None = None
    why_not: list[str] = []
    for g in batchings:
        for place in places:
            options = cache_splits(blocks, tokens, slower, place)
            model = PolicyModel(shape, rates, capacities, gpu_batch=g, num_gpu_batches=shape.batch // g,
                                attention=place, units=units, options=options, groups=groups, integral=True)
            left = time_limit_s - (time.perf_counter() - t0)
            answer = model.solve(max(0.5, min(MIP_SECONDS, left / 2)))
            label = f"{shape.batch // g} x {g} sequences, attention on the {place}"
            if answer is None:
                why_not.append(f"{label}: nothing fits")
                continue
            shares, chosen, act, _ = answer
            layer_tiers = {u: max(s, key=s.__getitem__) for u, s in shares.items()}
            cache = next(o for o in options if chosen[o.name] > 0.5)
            policy = make_policy(shape, gpu_batch=g, layer_tiers=layer_tiers, cache=cache, attention=place,
                                 activations=HOST if act > 0.5 else DEVICE)
            plan = price(shape, policy, rates, capacities, hardware, record=False)
            if isinstance(plan, str):  # the model's memory is the simulator's: only rounding gets here
                why_not.append(f"{label}: {plan}")
                continue
            tried.append((plan.tokens_per_s, label))
            if on_candidate is not None:
                on_candidate(f"{label}: {plan.tokens_per_s:.4g} tokens/s")
            if best is None or plan.total_s < best.total_s:
                best = plan
    if best is None:
        least = least_device_bytes(shape, rates, slower)
        raise PlanError(f"no generation policy for {shape.model} (batch {shape.batch}, prompt {shape.prompt_len}, "
                        f"{shape.new_tokens} new tokens) fits a {format_bytes(capacities[DEVICE])} device: the "
                        f"least any policy needs is about {format_bytes(least)} (every layer and the whole cache "
                        f"off the device, one sequence per micro-batch; the embeddings and head stay on it). "
                        "Give a larger budget, add host or NVMe tiers, or a smaller batch.")
    best.tasks = simulate(shape, best.policy, rates)[0]
    best.method = "MIP (SCIP) per batching and attention place, priced by the simulator"
    best.solve_s = time.perf_counter() - t0
    best.candidates = len(tried)
    best.reasons = explain_choice(best, tried)
    return best


def least_device_bytes(shape: GenerationShape, rates: GenerationRates, slower: tuple[str, ...]) -> int:
    """The device peak of the policy that keeps the least there (a lower estimate of what any
    policy of the search needs; host and NVMe room aside)."""
    if not slower:
        slower = (DEVICE,)
    tier = slower[-1]
    cache = CacheOption("off", (tier,) * math.ceil(shape.max_positions / block_tokens(shape)), block_tokens(shape))
    places = (DEVICE, HOST) if HOST in slower else (DEVICE,)
    return min(peak_bytes(shape, make_policy(shape, gpu_batch=1, layer_tiers={n: tier for n, _ in shape.layer_params},
                                             cache=cache, attention=HOST if tier != DEVICE else DEVICE,
                                             activations=place), rates)[DEVICE]
               for place in places)


def explain_choice(plan: GenerationPlan, tried: list[tuple[float, str]]) -> list[str]:
    """Why the policy is what it is: its placements' reasons and the batchings it beat."""
    s, p = plan.shape, plan.policy
    on = {t: [n for n, _ in s.layer_params if p.weight_tiers[s.param_name(0, n)] == t] for t in (DEVICE, HOST, NVME)}
    reasons = []
    if on[HOST] or on[NVME]:
        reasons.append(
            f"weights: {len(on[DEVICE])} of the {len(s.layer_params)} tensors of every layer stay on the device; "
            + ", ".join(f"{len(on[t])} stream from {t}" for t in (HOST, NVME) if on[t])
            + f" ({format_bytes(plan.weight_bytes_on(HOST) + plan.weight_bytes_on(NVME))} of "
              f"{format_bytes(s.weight_bytes)} do not fit beside the cache and the block's activations)")
    else:
        reasons.append(f"weights: all {format_bytes(s.weight_bytes)} on the device")
    runs = [(t, p.kv_tiers.count(t)) for t in (DEVICE, HOST, NVME) if t in p.kv_tiers]
    reasons.append("KV cache: " + ", ".join(f"{n} blocks on {t}" for t, n in runs)
                   + f" ({format_bytes(s.batch * s.layers * s.kv_bytes_per_token * s.max_positions)} at the last step)"
                   + ("; the device's blocks come first: a decode step reads every earlier position, so the "
                      "first ones are read most" if len(runs) > 1 and runs[0][0] == DEVICE else ""))
    if p.attention == HOST:
        reasons.append("attention runs on the host CPU next to the cache: only the new positions' Q, K and V "
                       "cross PCIe, not the whole cache every step")
    if p.activations == HOST:
        block = s.batch * s.prompt_len * s.hidden * s.dtype_bytes
        reasons.append(f"the block's hidden states ({format_bytes(block)} in the prefill) wait on the host between "
                       f"layers: the device holds one micro-batch's ({format_bytes(block // p.num_gpu_batches)}) "
                       "in and out of a layer instead of the block's, for a copy in and out of every layer")
    ranked = sorted(tried, reverse=True)
    if len(ranked) > 1:
        reasons.append("micro-batches x sequences and attention place, tokens/s: " + ", ".join(f"{label} {tps:.4g}" for tps, label in ranked[:6]))
    return reasons


__all__ = ["CACHE_BLOCKS", "attention_places", "block_tokens", "divisors", "least_device_bytes", "make_policy", "over_tier",
           "plan_generation", "price"]
