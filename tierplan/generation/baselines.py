"""The policies tierplan's generation plans are compared with, priced by the same simulator.

- ``all-on-device``: every weight and the whole cache on the device, one batch (when it fits).
- ``layer-streaming``: Hugging Face Accelerate's and DeepSpeed ZeRO-Inference's offload: every
  decoder layer's weights on the host (NVMe when the host cannot hold them), streamed in one
  layer ahead; the cache and the rest of the model on the device; one batch.
- ``flexgen``: FlexGen's policy search (Sheng et al. 2023, section 4.2 and its code): for each
  batching and attention place, an LP over the *fractions* of every layer's weights and of the
  cache on device, host and NVMe, with one decode step priced at the mean context; the batching
  with the best LP value wins, and its fractions become a placement as FlexGen's runtime makes
  them (each weight tensor to the tier whose share of the layer holds the tensor's midpoint, in
  the order NVMe, host, device; the cache's fractions rounded to blocks; the hidden states on the
  host when more than half of them are there: FlexGen's LP has a fraction of them on each tier,
  and tierplan's runtime keeps them whole on one, so its disk share is not modelled). Where rounding overruns
  a tier, the fastest tier's last block or largest tensor moves one tier down until it fits.
"""
from __future__ import annotations

import dataclasses

from tierplan.generation.policy_model import CacheOption, PolicyModel, WeightUnit, step_groups
from tierplan.generation.search import attention_places, block_tokens, divisors, make_policy, over_tier, price
from tierplan.generation.simulate import peak_bytes
from tierplan.plans.generation import GenerationPlan, GenerationPolicy, GenerationRates, GenerationShape
from tierplan.plans.plan import DEVICE, HOST, NVME

BASELINES = ("all-on-device", "layer-streaming", "flexgen")
REPAIR_STEPS = 256


def uniform_policy(shape: GenerationShape, layer_tier: str, kv_tier: str) -> GenerationPolicy:
    """Every layer's weights on ``layer_tier``, the rest on the device, the cache on ``kv_tier``; one batch."""
    tokens = block_tokens(shape)
    cache = CacheOption(kv_tier, (kv_tier,) * -(-shape.max_positions // tokens), tokens)
    return make_policy(shape, gpu_batch=shape.batch, layer_tiers={n: layer_tier for n, _ in shape.layer_params},
                       cache=cache, attention=DEVICE)


def midpoint_tiers(sizes: list[tuple[str, int]], shares: dict[str, float]) -> dict[str, str]:
    """FlexGen's placement of one layer's tensors by the layer's tier shares."""
    total = sum(b for _, b in sizes)
    bounds, acc = [], 0.0
    for tier in (NVME, HOST, DEVICE):
        acc += shares.get(tier, 0.0)
        bounds.append((acc, tier))
    out, seen = {}, 0
    for name, nbytes in sizes:
        mid = (seen + nbytes / 2) / total
        out[name] = next((t for bound, t in bounds if mid <= bound + 1e-9), bounds[-1][1])
        seen += nbytes
    return out


def rounded_blocks(blocks: int, shares: dict[str, float]) -> tuple[str, ...]:
    """The cache's fractions as whole blocks (largest remainders), device first."""
    raw = {t: shares.get(t, 0.0) * blocks for t in (DEVICE, HOST, NVME)}
    counts = {t: int(v) for t, v in raw.items()}
    for t in sorted(raw, key=lambda t: raw[t] - counts[t], reverse=True)[: blocks - sum(counts.values())]:
        counts[t] += 1
    return tuple(t for t in (DEVICE, HOST, NVME) for _ in range(counts[t]))


def _demote(policy: GenerationPolicy, shape: GenerationShape, tier: str, below: str) -> GenerationPolicy | None:
    """``policy`` with ``tier``'s last cache block, else its largest layer tensor, moved to ``below``."""
    kv = list(policy.kv_tiers)
    if tier in kv:
        kv[len(kv) - 1 - kv[::-1].index(tier)] = below
        return dataclasses.replace(policy, kv_tiers=tuple(sorted(kv, key=(DEVICE, HOST, NVME).index)))
    names = [(b, n) for n, b in shape.layer_params if policy.weight_tiers[shape.param_name(0, n)] == tier]
    if not names:
        return None
    moved = max(names)[1]
    tiers = dict(policy.weight_tiers)
    for i in range(shape.layers):
        tiers[shape.param_name(i, moved)] = below
    return dataclasses.replace(policy, weight_tiers=tiers)


def flexgen_policy(shape: GenerationShape, rates: GenerationRates, capacities: dict[str, int]) -> GenerationPolicy | str:
    """FlexGen's choice for the job (see the module docstring), or why it has none."""
    layer = [WeightUnit("layer", shape.layer_bytes, len(shape.layer_params))]
    groups = step_groups(shape, average=True)
    slower = [t for t in (HOST, NVME) if t in capacities]
    best: tuple[float, GenerationPolicy] | None = None
    tokens = block_tokens(shape)
    blocks = -(-shape.max_positions // tokens)
    for g in divisors(shape.batch):
        for attention in attention_places(capacities):
            pures = [t for t in ([DEVICE] if attention == DEVICE else []) + slower]
            options = [CacheOption(t, None, pure=t) for t in pures]
            model = PolicyModel(shape, rates, capacities, gpu_batch=g, num_gpu_batches=shape.batch // g,
                                attention=attention, units=layer, options=options, groups=groups, integral=False)
            answer = model.solve(10.0)
            if answer is None:
                continue
            shares, kv_shares, act, value = answer
            if best is not None and value >= best[0]:
                continue
            cache = CacheOption("rounded", rounded_blocks(blocks, kv_shares), tokens)
            best = (value, make_policy(shape, gpu_batch=g, cache=cache, attention=attention,
                                       layer_tiers=midpoint_tiers(list(shape.layer_params), shares["layer"]),
                                       activations=HOST if act > 0.5 else DEVICE))
    if best is None:
        return "FlexGen's LP finds no fractions that fit any batching"
    return best[1]


def baseline_plans(shape: GenerationShape, rates: GenerationRates, capacities: dict[str, int], *,
                   hardware: str) -> dict[str, GenerationPlan | str]:
    """Each baseline's plan, or the reason it cannot run."""
    out: dict[str, GenerationPlan | str] = {}
    out["all-on-device"] = price(shape, uniform_policy(shape, DEVICE, DEVICE), rates, capacities, hardware,
                                 baseline="all-on-device")
    home = HOST if HOST in capacities and shape.layers * shape.layer_bytes <= capacities[HOST] else NVME
    if home in capacities:
        out["layer-streaming"] = price(shape, uniform_policy(shape, home, DEVICE), rates, capacities, hardware,
                                       baseline="layer-streaming")
    else:
        out["layer-streaming"] = "no host or NVMe tier to stream the weights from"
    policy = flexgen_policy(shape, rates, capacities)
    if isinstance(policy, str):
        out["flexgen"] = policy
        return out
    order = [t for t in (DEVICE, HOST, NVME) if t in capacities]
    for _ in range(REPAIR_STEPS):
        over = over_tier(peak_bytes(shape, policy, rates), capacities)
        below = order[order.index(over) + 1] if over in order and order.index(over) + 1 < len(order) else None
        repaired = _demote(policy, shape, over, below) if below else None
        if repaired is None:
            break
        policy = repaired
    out["flexgen"] = price(shape, policy, rates, capacities, hardware, baseline="flexgen")
    return out


__all__ = ["BASELINES", "baseline_plans", "flexgen_policy", "midpoint_tiers", "rounded_blocks", "uniform_policy"]
