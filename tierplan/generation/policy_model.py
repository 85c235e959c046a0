"""The linear model that places a generation job's weights and KV cache: built in one place
(``PolicyModel``), read back in one place (``PolicyModel.solve``).

For one batching (``gpu_batch`` x ``num_gpu_batches``) and one attention place it chooses

- a tier for each weight *unit* of a decoder layer, the same in every layer: tierplan's units are
  the layer's tensors (binary choices, so the answer is a placement the runtime can carry out);
  FlexGen's single unit is the whole layer, split in continuous fractions;
- one cache *option*: tierplan's options are the splits of the cache's blocks into device, host
  and NVMe runs (device first, so that the blocks a decode step reads most are the fast ones;
  binary, one chosen); FlexGen's options are the three whole tiers, mixed in fractions;
- where the block's hidden states wait between layers (``act``: 1 on the host), when the job has a
  host tier: binary for tierplan, a fraction in FlexGen's LP (rounded by its caller).

Time: each step's time is at least the load of each resource in that step (every copy, every
layer's compute, the head), as FlexGen's LP has it; the objective is the job's time, the steps'
sum. It is a relaxation (it ignores the order tasks wait in) and the simulator's measure is what a
plan predicts. Memory: the peak per tier of ``simulate.peak_bytes``, which is linear in these
choices when every layer is placed alike (as here).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ortools.linear_solver import pywraplp

from tierplan.generation.simulate import head_seconds, host_activation_bytes, layer_work, working_bytes
from tierplan.plans.generation import (
    ACT_IN, ACT_OUT, ATTENTION, ATTN_IN, KV_IN, KV_OUT, KV_READ, KV_WRITE, LAYER, QKV_OUT, WEIGHT_IN, WEIGHT_READ,
    GenerationRates, GenerationShape,
)
from tierplan.plans.plan import DEVICE, HOST, NVME

DECODE_GROUPS = 32
GIB = float(1 << 30)  # decode steps are priced in at most this many groups of consecutive steps


@dataclass(frozen=True)
class WeightUnit:
    """Part of every decoder layer placed as one: ``nbytes`` in ``tensors`` tensors."""

    name: str
    nbytes: int
    tensors: int


@dataclass(frozen=True)
class CacheOption:
    """A placement of the cache: positions per tier among the first n, as a function of n."""

    name: str
    blocks: tuple[str, ...] | None  # the tier of each block; None: every position on ``pure``
    block_tokens: int = 1
    pure: str = ""

    def positions(self, tier: str, length: int) -> int:
        if self.blocks is None:
            return length if tier == self.pure else 0
        return sum(min(self.block_tokens, length - b * self.block_tokens)
                   for b, t in enumerate(self.blocks) if t == tier and b * self.block_tokens < length)


@dataclass(frozen=True)
class StepGroup:
    """``count`` steps priced as one: ``q`` new positions each after ``before`` cached ones."""

    q: int
    before: int
    count: int
    prefill: bool


def step_groups(shape: GenerationShape, *, average: bool = False) -> list[StepGroup]:
    """The prefill and the decode steps, in at most DECODE_GROUPS groups (or, ``average``, as
    FlexGen's LP prices them: one decode step at the mean context, N - 1 times)."""
    p, n = shape.prompt_len, shape.new_tokens
    groups = [StepGroup(p, 0, 1, True)]
    decode = n - 1
    if decode <= 0:
        return groups
    if average:
        return groups + [StepGroup(1, p + decode // 2, decode, False)]
    size = math.ceil(decode / DECODE_GROUPS)
    for first in range(1, n, size):
        count = min(size, n - first)
        groups.append(StepGroup(1, p + first - 1 + count // 2, count, False))
    return groups


def cache_splits(blocks: int, block_tokens: int, tiers: tuple[str, ...], attention: str) -> list[CacheOption]:
    """Every split of ``blocks`` blocks into a device run, a host run and an NVMe run."""
    allowed = {DEVICE} | set(tiers)
    out = []
    for nd in range(blocks + 1):
        for nh in range(blocks + 1 - nd):
            nn = blocks - nd - nh
            if (nh and HOST not in allowed) or (nn and NVME not in allowed) or (nd and attention == HOST):
                continue
            out.append(CacheOption(f"{nd}/{nh}/{nn}", (DEVICE,) * nd + (HOST,) * nh + (NVME,) * nn, block_tokens))
    return out


class PolicyModel:
    """One batching and attention place; see the module docstring."""

    def __init__(self, shape: GenerationShape, rates: GenerationRates, capacities: dict[str, int], *,
                 gpu_batch: int, num_gpu_batches: int, attention: str, units: list[WeightUnit],
                 options: list[CacheOption], groups: list[StepGroup], integral: bool) -> None:
        s = shape
        self.shape, self.units, self.options = shape, units, options
        self.solver = pywraplp.Solver.CreateSolver("SCIP" if integral else "GLOP")
        solver = self.solver
        tiers = [t for t in (DEVICE, HOST, NVME) if t in capacities]
        new = solver.IntVar if integral else solver.NumVar
        self.x = {(u.name, t): new(0, 1, f"w[{u.name},{t}]") for u in units for t in tiers}
        self.y = {o.name: new(0, 1, f"kv[{o.name}]") for o in options}
        # The hidden states on the host: only where there is one.
        act = self.act = new(0, 1 if HOST in capacities else 0, "act")
        for u in units:
            solver.Add(sum(self.x[u.name, t] for t in tiers) == 1)
        solver.Add(sum(self.y.values()) == 1)
        g, k, L, kvb, dt = gpu_batch, num_gpu_batches, s.layers, s.kv_bytes_per_token, s.dtype_bytes

        def w(tier: str, per: float) -> pywraplp.LinearExpr:
            """sum over units on ``tier`` of per(unit)."""
            return sum(self.x[u.name, tier] * per(u) for u in units if (u.name, tier) in self.x)

        def kv(per: float) -> pywraplp.LinearExpr:
            return sum(self.y[o.name] * per(o) for o in options)

        def copy_s(kind: str, nbytes: float) -> float:
            return rates.copy_seconds(kind, int(nbytes))

        objective = 0
        for grp in groups:
            after = grp.before + grp.q
            work = layer_work(s, g, grp.q, after, prefill=grp.prefill)
            host_attention = attention == HOST and not grp.prefill
            load: dict[str, pywraplp.LinearExpr] = {}

            def add(kind: str, expr: pywraplp.LinearExpr | float) -> None:
                resource = rates.queue(kind)
                load[resource] = load.get(resource, 0) + expr

            dense = rates.device_seconds(work.flops - work.attention_flops, work.nbytes - work.attention_bytes,
                                         rates.kernels_per_layer)
            if host_attention:
                add(LAYER, L * k * dense)
                add(ATTENTION, L * k * rates.cpu_seconds(work.attention_flops, work.attention_bytes))
                add(QKV_OUT, L * k * copy_s(QKV_OUT, g * grp.q * (s.heads + 2 * s.kv_heads) * s.head_dim * dt))
                add(ATTN_IN, L * k * copy_s(ATTN_IN, g * grp.q * s.heads * s.head_dim * dt))
            else:
                add(LAYER, L * k * rates.device_seconds(work.flops, work.nbytes, rates.kernels_per_layer))
            rows = g * grp.q * s.hidden * dt  # a micro-batch's hidden states: in (not layer 0), out (not the last)
            add(ACT_IN, act * ((L - 1) * k * copy_s(ACT_IN, rows)))
            add(ACT_OUT, act * ((L - 1) * k * copy_s(ACT_OUT, rows)))
            add(LAYER, head_seconds(s, rates)[0])
            for tier in (HOST, NVME):
                add(WEIGHT_IN, L * w(tier, lambda u: copy_s(WEIGHT_IN, u.nbytes) + (u.tensors - 1) * rates.pcie_latency_s))
            add(WEIGHT_READ, L * w(NVME, lambda u: copy_s(WEIGHT_READ, u.nbytes) + (u.tensors - 1) * rates.nvme_latency_s))

            def new(o: CacheOption, tier: str) -> int:
                return o.positions(tier, after) - o.positions(tier, grp.before)

            add(KV_READ, L * k * kv(lambda o: copy_s(KV_READ, g * kvb * o.positions(NVME, grp.before))))
            if not host_attention:
                add(KV_IN, L * k * kv(lambda o: copy_s(KV_IN, g * kvb * (o.positions(HOST, grp.before)
                                                                        + o.positions(NVME, grp.before)))))
                add(KV_OUT, L * k * kv(lambda o: copy_s(KV_OUT, g * kvb * (new(o, HOST) + new(o, NVME)))))
            add(KV_WRITE, L * k * kv(lambda o: copy_s(KV_WRITE, g * kvb * new(o, NVME))))
            t = solver.NumVar(0, solver.infinity(), f"T[{grp.before}]")
            for expr in load.values():
                solver.Add(t >= expr)
            objective += grp.count * t

        # Memory: simulate.peak_bytes, with every layer placed alike.
        n, old = s.max_positions, s.max_positions - 1
        layer_total = sum(u.nbytes for u in units)
        streamed = min(2, L) * (layer_total - w(DEVICE, lambda u: u.nbytes))
        prefill, decode = working_bytes(s, g, rates)
        prefill_host, decode_host = working_bytes(s, g, rates, HOST)
        prefill = prefill + act * (prefill_host - prefill)
        decode = decode + act * (decode_host - decode)
        if attention == DEVICE:
            decode = decode + g * kvb * n + kv(lambda o: 2 * g * kvb * (o.positions(HOST, old) + o.positions(NVME, old)))
        working = solver.NumVar(0, solver.infinity(), "working")
        # Bytes in GiB: coefficients of 1e10 and more leave SCIP's tolerances too coarse to tell
        # a full device from an empty one.
        solver.Add(working >= prefill / GIB)
        solver.Add(working >= decode / GIB)
        kv_bytes = {tier: kv(lambda o, tier=tier: s.batch * L * kvb * o.positions(tier, n)) for tier in tiers}
        need = {
            DEVICE: (L * w(DEVICE, lambda u: u.nbytes) + s.other_bytes + streamed + kv_bytes[DEVICE] + working * GIB
                     + s.batch * s.vocab * 4),
            HOST: (L * w(HOST, lambda u: u.nbytes) + kv_bytes.get(HOST, 0) + min(2, L) * w(NVME, lambda u: u.nbytes)
                   + kv(lambda o: 2 * g * kvb * o.positions(NVME, old)) + act * host_activation_bytes(s, HOST)
                   + ((g * s.heads * n * 4 + g * kvb * n) if attention == HOST else 0)),
            NVME: L * w(NVME, lambda u: u.nbytes) + kv_bytes.get(NVME, 0),
        }
        for tier in tiers:
            solver.Add(need[tier] * (1 / GIB) <= capacities[tier] / GIB)
        solver.Minimize(objective)

    def solve(self, time_limit_s: float) -> tuple[dict[str, dict[str, float]], dict[str, float], float, float] | None:
        """(unit -> tier -> share, option -> share, the hidden states' share on the host, predicted
        seconds), or None when nothing fits."""
        self.solver.SetTimeLimit(int(time_limit_s * 1000))
        status = self.solver.Solve()
        if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
            return None
        shares: dict[str, dict[str, float]] = {}
        for (unit, tier), var in self.x.items():
            shares.setdefault(unit, {})[tier] = var.solution_value()
        return (shares, {name: var.solution_value() for name, var in self.y.items()}, self.act.solution_value(),
                self.solver.Objective().Value())


__all__ = ["CacheOption", "PolicyModel", "StepGroup", "WeightUnit", "cache_splits", "step_groups"]
