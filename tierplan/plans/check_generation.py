"""The independent check of a GenerationPlan: its own bookkeeping of what the tasks do.

It shares no code with the planner or its simulator. From the plan's shape and policy it
re-derives what must move and what must be resident; from the tasks it replays what is on the
device over time; and it checks

- the policy names every parameter and covers every cache position, on tiers the plan has;
- every layer of every micro-batch of every step is computed once, after its streamed weights and
  its cache have arrived, in order, and each step's head after its last layer; each resource runs
  one task at a time;
- every copy moves exactly the bytes the policy implies and lasts what the rates say; with the
  hidden states on the host, each micro-batch's rows come in after the previous layer sent them
  out and before its layer computes;
- at most two layers' streamed weights are on the device at once (the one computing and the next);
- the peak per tier (resident weights and cache, the replayed streamed weights and cache copies,
  the working set) fits the tier, and the plan does not claim less than the replay finds;
- each step ends at its head, and the plan's throughput is batch x new tokens over its time.

Each failure is a PlanError naming the step, layer, micro-batch or tier at fault.
"""
from __future__ import annotations

from collections import defaultdict

from tierplan.plans.generation import (
    ACT_IN, ACT_OUT, ATTENTION, ATTN_IN, HEAD, KV_IN, KV_OUT, KV_READ, KV_WRITE, LAYER, PROJECT, QKV_OUT, WEIGHT_IN,
    WEIGHT_READ, GenerationPlan,
)
from tierplan.plans.plan import DEVICE, HOST, NVME, PlanError
from tierplan.units import format_bytes

REL_TOL = 1e-6
ABS_TOL_S = 1e-9


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= ABS_TOL_S + REL_TOL * max(abs(a), abs(b))


def _where(step: int, layer: int, mb: int) -> str:
    what = "the prefill" if step == 0 else f"decode step {step}"
    return what + (f", layer {layer}" if layer >= 0 else "") + (f", micro-batch {mb}" if mb >= 0 else "")


def check_generation(plan: GenerationPlan) -> None:
    s, pol, rates = plan.shape, plan.policy, plan.rates
    names = {s.param_name(i, n) for i in range(s.layers) for n, _ in s.layer_params} | {n for n, _ in s.other_params}
    if set(pol.weight_tiers) != names:
        missing, extra = sorted(names - set(pol.weight_tiers)), sorted(set(pol.weight_tiers) - names)
        raise PlanError(f"the policy's weights do not match the model: missing {missing[:3]}, unknown {extra[:3]}")
    if len(pol.kv_tiers) * pol.kv_block_tokens < s.max_positions:
        raise PlanError(f"the policy's {len(pol.kv_tiers)} cache blocks of {pol.kv_block_tokens} positions do not "
                        f"cover the job's {s.max_positions} positions")
    used = set(pol.weight_tiers.values()) | set(pol.kv_tiers)
    for tier in used:
        if tier not in plan.capacities:
            raise PlanError(f"the policy puts data on {tier!r}, which the plan's tiers {sorted(plan.capacities)} lack")
    if pol.batch != s.batch:
        raise PlanError(f"the policy's {pol.num_gpu_batches} micro-batches of {pol.gpu_batch} are not the job's batch {s.batch}")

    # What must move: per layer, its streamed bytes and tensors; per step, each micro-batch's cache.
    g, kvb, k = pol.gpu_batch, s.kv_bytes_per_token, pol.num_gpu_batches
    def positions(tier: str, n: int) -> int:  # noqa: E306 - the check's own count
        return sum(max(0, min(pol.kv_block_tokens, n - b * pol.kv_block_tokens))
                   for b, t in enumerate(pol.kv_tiers) if t == tier)
    off = {i: [b for n, b in s.layer_params if pol.weight_tiers[s.param_name(i, n)] != DEVICE] for i in range(s.layers)}
    nvme = {i: [b for n, b in s.layer_params if pol.weight_tiers[s.param_name(i, n)] == NVME] for i in range(s.layers)}
    steps = 1 + max(0, s.new_tokens - 1)
    before = [0] + [s.prompt_len + t - 1 for t in range(1, steps)]
    after = [s.prompt_len] + [s.prompt_len + t for t in range(1, steps)]

    # Each resource runs one task at a time.
    by_resource: dict[str, list] = defaultdict(list)
    for t in plan.tasks:
        if t.end_s < t.start_s - ABS_TOL_S:
            raise PlanError(f"a {t.kind} task of {_where(t.step, t.layer, t.micro_batch)} ends before it starts")
        by_resource[t.resource].append(t)
    for resource, tasks in by_resource.items():
        tasks.sort(key=lambda t: (t.start_s, t.end_s))
        for a, b in zip(tasks, tasks[1:]):
            if b.start_s < a.end_s - ABS_TOL_S - REL_TOL * a.end_s:
                raise PlanError(f"{resource} runs {a.kind} of {_where(a.step, a.layer, a.micro_batch)} and {b.kind} "
                                f"of {_where(b.step, b.layer, b.micro_batch)} at once")

    # Index the tasks; check bytes and durations.
    one: dict[tuple[str, int, int, int], object] = {}
    for t in plan.tasks:
        key = (t.kind, t.step, t.layer, t.micro_batch)
        if key in one:
            raise PlanError(f"{t.kind} of {_where(t.step, t.layer, t.micro_batch)} runs twice")
        one[key] = t
        if t.kind in (WEIGHT_READ, WEIGHT_IN, KV_READ, KV_IN, KV_OUT, KV_WRITE, QKV_OUT, ATTN_IN, ACT_IN, ACT_OUT):
            count = 1
            if t.kind == WEIGHT_IN and t.layer >= 0:
                count = len(off[t.layer])
            elif t.kind == WEIGHT_READ:
                count = len(nvme[t.layer])
            elif t.kind == WEIGHT_IN:
                count = sum(1 for n, _ in s.other_params if pol.weight_tiers[n] != DEVICE)
            if not _close(t.end_s - t.start_s, rates.copy_seconds(t.kind, t.nbytes, count)):
                raise PlanError(f"{t.kind} of {_where(t.step, t.layer, t.micro_batch)} takes {t.end_s - t.start_s:.3g} s "
                                f"where {format_bytes(t.nbytes)} take {rates.copy_seconds(t.kind, t.nbytes, count):.3g} s")
        elif t.kind in (LAYER, PROJECT, HEAD) and t.end_s - t.start_s < t.flops / rates.device_flops - ABS_TOL_S:
            raise PlanError(f"{t.kind} of {_where(t.step, t.layer, t.micro_batch)} runs faster than the device's peak")

    def get(kind: str, st: int, i: int, j: int):  # noqa: ANN202
        return one.get((kind, st, i, j))

    def moved(kind: str, st: int, i: int, j: int) -> int:
        t = get(kind, st, i, j)
        return t.nbytes if t is not None else 0  # type: ignore[attr-defined]

    # Every layer of every micro-batch computed after its inputs; the bytes the policy implies.
    live_weights: list[tuple[float, float, int]] = []  # (arrived from, used until, bytes) per streamed layer
    live_cache: list[tuple[float, float, int]] = []
    prev_head = 0.0
    for st in range(steps):
        host_attention = pol.attention == HOST and st > 0
        old = {t: positions(t, before[st]) for t in (DEVICE, HOST, NVME)}
        new = {t: positions(t, after[st]) - old[t] for t in (DEVICE, HOST, NVME)}
        last_done = 0.0
        for i in range(s.layers):
            w_in = get(WEIGHT_IN, st, i, -1)
            if moved(WEIGHT_IN, st, i, -1) != sum(off[i]) or moved(WEIGHT_READ, st, i, -1) != sum(nvme[i]):
                raise PlanError(f"{_where(st, i, -1)}: the weights copied in are not the layer's "
                                f"{format_bytes(sum(off[i]))} off the device")
            w_read = get(WEIGHT_READ, st, i, -1)
            if w_read is not None and w_in is not None and w_in.start_s < w_read.end_s - ABS_TOL_S:  # type: ignore[attr-defined]
                raise PlanError(f"{_where(st, i, -1)}: weights leave host staging before the NVMe read ends")
            layer_end = 0.0
            for j in range(k):
                first = get(PROJECT if host_attention else LAYER, st, i, j)
                done = get(LAYER, st, i, j)
                if first is None or done is None:
                    raise PlanError(f"{_where(st, i, j)} is never computed")
                start = first.start_s  # type: ignore[attr-defined]
                if w_in is not None and start < w_in.end_s - ABS_TOL_S:  # type: ignore[attr-defined]
                    raise PlanError(f"{_where(st, i, j)} starts before its streamed weights arrive")
                if i == 0 and start < prev_head - ABS_TOL_S:
                    raise PlanError(f"{_where(st, i, j)} starts before the previous step's token is picked")
                want_read = g * kvb * old[NVME]
                want_in = 0 if host_attention else g * kvb * (old[HOST] + old[NVME])
                if moved(KV_READ, st, i, j) != want_read or moved(KV_IN, st, i, j) != want_in:
                    raise PlanError(f"{_where(st, i, j)}: the cache read moves {format_bytes(moved(KV_IN, st, i, j))}, "
                                    f"the policy's off-device positions are {format_bytes(want_in)}")
                kv_in = get(KV_IN, st, i, j) or get(KV_READ, st, i, j)
                if kv_in is not None and start < kv_in.end_s - ABS_TOL_S:  # type: ignore[attr-defined]
                    raise PlanError(f"{_where(st, i, j)} starts before its cache arrives")
                if host_attention:
                    chain = [get(k_, st, i, j) for k_ in (PROJECT, QKV_OUT, ATTENTION, ATTN_IN, LAYER)]
                    for a, b in zip(chain, chain[1:]):
                        if a is not None and b is not None and b.start_s < a.end_s - ABS_TOL_S:  # type: ignore[attr-defined]
                            raise PlanError(f"{_where(st, i, j)}: {b.kind} starts before {a.kind} ends")  # type: ignore[attr-defined]
                elif moved(KV_OUT, st, i, j) != g * kvb * (new[HOST] + new[NVME]):
                    raise PlanError(f"{_where(st, i, j)}: the new positions sent to the host are not the policy's")
                if moved(KV_WRITE, st, i, j) != g * kvb * new[NVME]:
                    raise PlanError(f"{_where(st, i, j)}: the new positions written to NVMe are not the policy's")
                rows = g * (after[st] - before[st]) * s.hidden * s.dtype_bytes if pol.activations == HOST else 0
                if (moved(ACT_IN, st, i, j) != (rows if i > 0 else 0)
                        or moved(ACT_OUT, st, i, j) != (rows if i < s.layers - 1 else 0)):
                    raise PlanError(f"{_where(st, i, j)}: the hidden states copied in and out are not the "
                                    f"policy's ({pol.activations} between layers)")
                act_in, sent = get(ACT_IN, st, i, j), get(ACT_OUT, st, i - 1, j)
                if act_in is not None and (
                        start < act_in.end_s - ABS_TOL_S  # type: ignore[attr-defined]
                        or sent is None or act_in.start_s < sent.end_s - ABS_TOL_S):  # type: ignore[attr-defined]
                    raise PlanError(f"{_where(st, i, j)}: its hidden states are used before they arrive from the host")
                layer_end = max(layer_end, done.end_s)  # type: ignore[attr-defined]
                if kv_in is not None and want_in:
                    live_cache.append((kv_in.start_s, done.end_s, want_in))  # type: ignore[attr-defined]
            if w_in is not None and i >= 0:
                live_weights.append((w_in.start_s, layer_end, sum(off[i])))  # type: ignore[attr-defined]
            last_done = max(last_done, layer_end)
        head = get(HEAD, st, -1, -1)
        if head is None or head.start_s < last_done - ABS_TOL_S:  # type: ignore[attr-defined]
            raise PlanError(f"the head of {_where(st, -1, -1)} runs before its last layer ends")
        prev_head = head.end_s  # type: ignore[attr-defined]
        if st < steps - 1 and not _close(plan.step_end_s[st], prev_head):
            raise PlanError(f"{_where(st, -1, -1)} ends at {prev_head:.6g} s, the plan says {plan.step_end_s[st]:.6g} s")
    end = max(t.end_s for t in plan.tasks)
    if len(plan.step_end_s) != steps or not _close(plan.step_end_s[-1], max(end, prev_head)):
        raise PlanError(f"the plan's {len(plan.step_end_s)} step ends do not match its {steps} steps ending at {end:.6g} s")

    # At most two layers' streamed weights at once; the replayed device peak.
    def most_at_once(intervals: list[tuple[float, float, int]]) -> tuple[int, int]:
        events = sorted([(a, 1, b) for a, _, b in intervals] + [(e, -1, b) for _, e, b in intervals])
        count = most = held = peak = 0
        for _, sign, nbytes in events:  # ends sort before starts at the same time
            count += sign
            held += sign * nbytes
            most, peak = max(most, count), max(peak, held)
        return most, peak

    layers_at_once, streamed_peak = most_at_once(live_weights)
    if layers_at_once > 2:
        raise PlanError(f"{layers_at_once} layers' streamed weights are on the device at once; the runtime holds two")
    cache_peak = most_at_once(live_cache)[1]
    home = {DEVICE: 0, HOST: 0, NVME: 0}  # each tier's weights and cache, where they live
    for name, nbytes in [*((s.param_name(i, n), b) for i in range(s.layers) for n, b in s.layer_params),
                         *s.other_params]:
        home[pol.weight_tiers[name]] += nbytes
    for tier in home:
        home[tier] += s.batch * s.layers * kvb * positions(tier, s.max_positions)
    if pol.activations == HOST:  # two buffers of the block's hidden states at the prompt's length
        home[HOST] += 2 * s.batch * s.prompt_len * s.hidden * s.dtype_bytes
    held = sum(b for n, b in s.other_params if pol.weight_tiers[n] != DEVICE)  # on the device for the whole job
    replayed = {DEVICE: home[DEVICE] + held + streamed_peak + cache_peak, HOST: home[HOST], NVME: home[NVME]}
    for tier, need in replayed.items():
        claimed = plan.peak_bytes.get(tier, 0)
        if need > claimed:
            raise PlanError(f"{tier}: the replay finds {format_bytes(need)} held at once, the plan claims "
                            f"{format_bytes(claimed)}")
        if claimed > plan.capacities.get(tier, 0) and claimed:
            raise PlanError(f"{tier}: the plan's peak {format_bytes(claimed)} is over the tier's "
                            f"{format_bytes(plan.capacities.get(tier, 0))}")


__all__ = ["check_generation"]
