"""Training plans: DP x TP(+SP) x PP (1F1B / interleaved) x ZeRO 0-3 x micro-batch x per-layer
recompute x offload, enumerated APEX-style and priced with the memory and collective models.

Enumeration (what APEX does for serving, here for training): the TP degree and pipeline depth are
divisors of the GPU count (the layer count must split evenly over stages, TP must divide the
heads), the micro-batch size a divisor of the per-replica batch; one schedule is chosen for the
repeated layer and applied to every layer of a stage. Recompute is chosen per layer and per cell
(attention, MLP, the whole layer): with identical layers, the choice is how many layers of a
stage take each option, a multiple-choice knapsack (minimize recompute time subject to the
stage's activation budget) solved exactly for at most two options per stage by enumeration
(what the LP relaxation needs), and refined with OR-tools CP-SAT over all options for the best
plans. A memory lower bound (model state + full recompute) prunes before anything is priced.

Rank layout: TP innermost (NVLink), then DP, then PP, as Megatron lays them out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

from tierplan.cost_models.collectives import CollectiveError, collective_time, group_shape, p2p_time
from tierplan.cost_models.hardware import Cluster, Hardware
from tierplan.cost_models.training_memory import ADAM_K, model_state_bytes
from tierplan.parallel.profile import CELLS, ModelProfile
from tierplan.parallel.types import (
    WORKSPACE_BYTES,
    MemoryBreakdown,
    ParallelPlan,
    TimeBreakdown,
    divisors,
)

__all__ = ["RecomputeOption", "TrainSearch", "search_training", "solve_recompute_mix"]

MICRO_BATCHES = (1, 2, 4, 8, 16)
VIRTUAL_STAGES = (2, 4)
# Bytes an Adam step touches per parameter on the host: fp32 master, m, v read and written,
# the bf16 gradient read and the bf16 parameter written.
CPU_ADAM_BYTES = 3 * 4 * 2 + 2 + 2
# Accumulating one micro-batch's bf16 gradient shard into the host's fp32 sum: read 2 + 4, write 4.
HOST_GRAD_ACC_BYTES = 2 + 4 + 4

# Efficiency assumptions of the time model (docs/cost-model.md, "Parallel training"):
# NCCL reaches ~80% of the link's per-direction bandwidth as bus bandwidth on large all-gathers
# and reduce-scatters (nccl-tests on 8 x H100 NVLink: ~360 of 450 GB/s; NDR IB: ~40-45 of 50).
COLLECTIVE_EFFICIENCY = 0.8
# A collective hidden behind compute still slows it: NCCL kernels occupy SMs and HBM bandwidth.
# Each hidden second of communication costs this many seconds of compute.
OVERLAP_INTERFERENCE = 0.15
# The CPU Adam step and gradient accumulation on the host stream at this fraction of the DRAM
# peak (STREAM reaches ~70-80% on a 2-socket server; Adam's 7 streams across NUMA less).
HOST_EFFICIENCY = 0.5
# Device memory a training plan leaves to the caching allocator's fragmentation and the CUDA
# context, besides APEX's 1 GiB workspace: plans packed to 99% of HBM run out in practice.
ALLOCATOR_HEADROOM = 0.05


@dataclass(frozen=True)
class RecomputeOption:
    """What one layer keeps for its backward (bytes per micro-batch per device) and what
    recomputing the rest costs (seconds per micro-batch)."""

    name: str
    act_bytes: float
    seconds: float


def solve_recompute_mix(
    options: list[RecomputeOption], layers: int, budget: float, *, exact: bool = False
) -> dict[str, int] | None:
    """How many of ``layers`` identical layers take each option so that their activation bytes
    fit ``budget`` with the least recompute time; None when even the leanest does not fit.

    The default enumerates every pair of options (k layers on one, the rest on the other): the LP
    relaxation of this knapsack has one constraint besides the count, so an optimal vertex uses at
    most two options and the pair search is within one layer of it. ``exact=True`` solves the
    integer program with OR-tools CP-SAT over all options.
    """
    if layers == 0:
        return {}
    if min(o.act_bytes for o in options) * layers > budget:
        return None
    if exact:
        return _cpsat_mix(options, layers, budget)
    best: tuple[float, dict[str, int]] | None = None
    for i, hi in enumerate(options):
        for lo in options:
            if lo.act_bytes > hi.act_bytes:
                continue
            # k layers on lo, layers-k on hi: the fewest k that fits.
            gap = hi.act_bytes - lo.act_bytes
            over = hi.act_bytes * layers - budget
            k = 0 if over <= 0 else (layers if gap <= 0 else math.ceil(over / gap))
            if k > layers or k * lo.act_bytes + (layers - k) * hi.act_bytes > budget * (1 + 1e-12):
                continue
            cost = k * lo.seconds + (layers - k) * hi.seconds
            mix = {hi.name: layers - k}
            mix[lo.name] = mix.get(lo.name, 0) + k
            if best is None or cost < best[0] - 1e-12:
                best = (cost, mix)
    return None if best is None else {k: v for k, v in best[1].items() if v}


def _cpsat_mix(options: list[RecomputeOption], layers: int, budget: float) -> dict[str, int] | None:
    from ortools.sat.python import cp_model

    m = cp_model.CpModel()
    n = [m.NewIntVar(0, layers, o.name) for o in options]
    m.Add(sum(n) == layers)
    unit = max(1.0, budget / 1e7)  # integer bytes scaled to keep coefficients small
    m.Add(sum(int(math.ceil(o.act_bytes / unit)) * v for o, v in zip(options, n)) <= int(budget / unit))
    m.Minimize(sum(int(round(o.seconds * 1e7)) * v for o, v in zip(options, n)))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = 2.0
    solver.parameters.num_workers = 1
    if solver.Solve(m) not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    return {o.name: int(solver.Value(v)) for o, v in zip(options, n) if solver.Value(v)}


@dataclass
class TrainSearch:
    """The search's inputs and caches; ``plans()`` yields every priced plan that fits."""

    profile: ModelProfile
    hardware: Hardware
    cluster: Cluster
    gpus: int
    global_batch: int  # sequences per step
    capacity: float = 0.0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    closest: tuple[float, str] | None = None  # the smallest memory overshoot seen, and the plan
    evaluated: int = 0
    _cache: dict[tuple, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.capacity:
            self.capacity = float(self.hardware.tier("device").capacity_bytes)

    # -- pieces ------------------------------------------------------------------------------

    def _sec(self, part: str, phase: str, b: int, t: int) -> float:
        key = (part, phase, b, t)
        if key not in self._cache:
            p = self.profile
            prof = p.core if part == "core" else (p.cells.get(part) or getattr(p, part))
            table = prof if part == "core" else getattr(prof, phase)
            self._cache[key] = table.seconds(self.hardware.device, b, t)
        return self._cache[key]

    def _coll(self, kind: str, nbytes: float, size: int, stride: int) -> float:
        g = group_shape(size, stride, self.cluster.gpus_per_node)
        return collective_time(kind, nbytes, g, self.cluster).seconds / COLLECTIVE_EFFICIENCY

    def _reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def recompute_options(self, b: int, t: int, tp_fwd: float) -> list[RecomputeOption]:
        """Per-layer options at micro-batch ``b`` and TP ``t`` (sequence parallel when t > 1)."""
        p = self.profile
        cells = p.cells
        act = {c: cells[c].activations.bytes(t, True, b) for c in CELLS}
        full_act = sum(act.values())
        fwd = {c: self._sec(c, "forward", b, t) for c in CELLS}
        layer_input = b * p.seq_len * p.hidden * p.param_bytes / t
        core = p.layer_activations.attention_core * b / t
        opts = [RecomputeOption("none", full_act, 0.0)]
        if core > 0:
            opts.append(RecomputeOption("selective", full_act - core, self._sec("core", "", b, t)))
        opts.append(RecomputeOption("attn", full_act - act["attention"], fwd["attention"] + tp_fwd / 2))
        opts.append(RecomputeOption("mlp", full_act - act["mlp"], fwd["mlp"] + tp_fwd / 2))
        opts.append(RecomputeOption("full", layer_input, sum(fwd.values()) + tp_fwd))
        # Drop dominated options: no less memory for no less time.
        keep = [o for o in opts if not any(
            q is not o and q.act_bytes <= o.act_bytes and q.seconds <= o.seconds
            and (q.act_bytes, q.seconds) != (o.act_bytes, o.seconds) for q in opts)]  # fmt: skip
        return keep

    # -- one configuration -------------------------------------------------------------------

    def evaluate(
        self, *, t: int, pp: int, d: int, b: int, schedule: str, v: int, zero: int,
        offload_optimizer: bool, offload_params: bool, exact: bool = False,
    ) -> ParallelPlan | None:  # fmt: skip
        self.evaluated += 1
        prof, dev, hw = self.profile, self.hardware.device, self.hardware
        m = self.global_batch // (d * b)
        L = prof.num_layers // pp
        pb = prof.param_bytes
        seq_bytes = b * prof.seq_len * prof.hidden * pb  # one [b, s, h] activation
        inflight = 1.0 if pp == 1 else min(m, pp) * (1 + (pp - 1) / (pp * v) if v > 1 else 1)

        # TP with sequence parallelism: per layer 2 all-gathers + 2 reduce-scatters forward,
        # the same backward (Korthikanti et al.).
        tp_fwd = 0.0
        if t > 1:
            tp_fwd = 2 * (self._coll("all_gather", seq_bytes, t, 1)
                          + self._coll("reduce_scatter", seq_bytes, t, 1))  # fmt: skip
        options = self.recompute_options(b, t, tp_fwd)

        # Stages that bind: the first (embeddings, the most micro-batches in flight) and the
        # last (head and loss); with one stage they are the same.
        stages = [("first", prof.pre.params + (prof.post.params if pp == 1 else 0), inflight)]
        if pp > 1:
            stages.append(("last", prof.post.params, 1.0))
        temp = max(max(c.largest_temporary for c in prof.cells.values()), prof.post.largest_temporary)
        results = []
        for name, extra_params, flight in stages:
            n_params = (L * prof.layer_params + extra_params) / t
            state = model_state_bytes(n_params, d, zero, param_bytes=pb, grad_bytes=pb,
                                      offload_optimizer=offload_optimizer,
                                      offload_params=offload_params)  # fmt: skip
            buffers = WORKSPACE_BYTES + ALLOCATOR_HEADROOM * self.capacity + temp * b / t
            if zero == 3:  # the gathered layer in use and the one prefetched
                buffers += 2 * prof.layer_params * pb / t
            fixed_act = 0.0
            if name == "first":
                fixed_act += prof.pre.activations.bytes(t, True, b) * flight
                if pp == 1:
                    fixed_act += prof.post.activations.bytes(t, True, b)
            else:
                fixed_act += prof.post.activations.bytes(t, True, b)
            budget = self.capacity - state.total - buffers - fixed_act
            mix = solve_recompute_mix(
                [RecomputeOption(o.name, o.act_bytes * flight, o.seconds) for o in options],
                L, budget, exact=exact,
            )  # fmt: skip
            if mix is None:
                lean = min(o.act_bytes for o in options) * flight * L
                over = state.total + buffers + fixed_act + lean
                self._note_overshoot(over, t, pp, d, b, zero, offload_optimizer, offload_params)
                return None
            by = {o.name: o for o in options}
            layer_act = sum(by[k].act_bytes * n for k, n in mix.items()) * flight
            recompute = sum(by[k].seconds * n for k, n in mix.items())
            mem = MemoryBreakdown(
                parameters=state.parameters, gradients=state.gradients, optimizer=state.optimizer,
                activations=layer_act + fixed_act, buffers=buffers,
            )  # fmt: skip
            fwd = L * sum(self._sec(c, "forward", b, t) for c in CELLS)
            bwd = L * sum(self._sec(c, "backward", b, t) for c in CELLS)
            part = "pre" if name == "first" else "post"
            fwd += self._sec(part, "forward", b, t) + (self._sec("post", "forward", b, t) if pp == 1 else 0)
            bwd += self._sec(part, "backward", b, t) + (self._sec("post", "backward", b, t) if pp == 1 else 0)
            results.append((name, mix, mem, fwd, bwd, recompute, n_params))

        # The slowest stage sets the pace; the first stage's memory usually binds, report the
        # stage with the larger footprint.
        # (the recompute options' seconds already include the TP traffic they repeat)
        name, _, _, fwd, bwd, recompute, n_params = max(results, key=lambda r: r[3] + r[4] + r[5])
        mem = max((r[2] for r in results), key=lambda x: x.total)
        mix = results[0][1]  # the first stage's choice: where activations bind
        recompute_by_stage = {r[0]: dict(sorted(r[1].items())) for r in results}
        time = TimeBreakdown()
        # Per layer and micro-batch, the pieces the overlap model needs.
        fwd_l = sum(self._sec(c, "forward", b, t) for c in CELLS)
        bwd_l = sum(self._sec(c, "backward", b, t) for c in CELLS) + recompute / max(L, 1)
        kappa = OVERLAP_INTERFERENCE
        # TP + SP (Megatron): forward 2 AG + 2 RS on the critical path; backward 2 AG of the
        # output gradients on the critical path, and the re-gather of the inputs (2 AG) and the
        # reduce-scatter of the input gradients (2 RS) overlapped with the dgrad / wgrad GEMMs.
        tp_layer = 0.0
        if t > 1:
            hidden = tp_fwd  # 2 AG + 2 RS overlapped in the backward
            tp_layer = 1.5 * tp_fwd + max(hidden - bwd_l, 0.0) + kappa * min(hidden, bwd_l)
        tp_time = L * tp_layer
        p2p = 0.0
        if pp > 1:
            same_node = t * d * pp <= self.cluster.gpus_per_node
            p2p = 2 * v * p2p_time(seq_bytes / t, self.cluster, same_node=same_node) / COLLECTIVE_EFFICIENCY

        # Data parallelism and offload, per layer: the network (DP collectives), PCIe (offloaded
        # parameters up, gradient shards down) and the host (accumulating gradient shards) are
        # three streams pipelined with the layer's compute; each layer exposes what its slowest
        # stream does not hide, and every hidden second still costs kappa (SMs and HBM shared).
        pcie = hw.link("device", "host")
        layer_bytes = prof.layer_params * pb / t  # one layer's unsharded bf16 weights (or grads)
        layer_shard = layer_bytes / d if zero >= 1 else layer_bytes
        host_share = hw.host.dram_bandwidth * HOST_EFFICIENCY / self.cluster.gpus_per_node

        def window(net: float, up: float, down: float, host: float, compute: float) -> float:
            both = up > 0 and down > 0
            bw = pcie.bandwidth_both_ways() if both else pcie.bandwidth
            link = (max(up, down) / bw) if (up or down) else 0.0
            busy = max(net, link, host)
            return max(busy - compute, 0.0) + kappa * min(net, compute)

        shard = n_params / (d if zero >= 1 else 1)
        grad_bytes = n_params * pb
        layers_here = max(L, 1)
        per_mb_dp = 0.0  # exposed DP / offload seconds per micro-batch
        grads_streamed = offload_optimizer and zero >= 2
        host_acc = layer_shard / pb * HOST_GRAD_ACC_BYTES / host_share if grads_streamed else 0.0
        down = layer_shard if grads_streamed else 0.0
        if d > 1 and zero == 3:
            ag_l = self._coll("all_gather", layer_bytes, d, t)
            rs_l = self._coll("reduce_scatter", layer_bytes, d, t)
            up = layer_shard if offload_params else 0.0
            per_mb_dp = (L * (window(ag_l, up, 0.0, 0.0, fwd_l)
                              + window(ag_l + rs_l, up, down, host_acc, bwd_l))
                         + ag_l)  # the first layer's gather: nothing to hide it behind
            time.collectives["zero3 allgather+reducescatter"] = m * per_mb_dp
        elif d > 1 and zero == 2:
            rs_l = self._coll("reduce_scatter", layer_bytes, d, t)
            per_mb_dp = L * window(rs_l, 0.0, down, host_acc, bwd_l) + rs_l  # the last layer's
            time.collectives["dp reducescatter"] = m * per_mb_dp
        elif d > 1:  # stages 0 and 1: gradients accumulate whole, one reduction per step
            kind = "all_reduce" if zero == 0 else "reduce_scatter"
            comm = self._coll(kind, grad_bytes, d, t)
            exposed = max(comm - bwd, comm / layers_here) + kappa * min(comm, bwd)
            time.collectives[f"dp {kind.replace('_', '')}"] = exposed
        if d > 1 and zero in (1, 2):  # the updated parameters come back before the next forward
            ag = self._coll("all_gather", grad_bytes, d, t)
            time.collectives["dp allgather"] = max(ag - fwd, ag / layers_here) + kappa * min(ag, fwd)
        per_micro = fwd + bwd + recompute + tp_time + p2p
        time.compute = m * (fwd + bwd)
        time.recompute = m * recompute
        if tp_time:
            time.collectives["tp allgather+reducescatter"] = m * tp_time
        if p2p:
            time.collectives["pp send/recv"] = m * p2p
        time.bubble = (pp - 1) / v * (per_micro + per_mb_dp) if pp > 1 else 0.0

        # Optimizer step on this device's shard.
        if offload_optimizer:
            if not grads_streamed:  # stages 0-1: the reduced gradient shard goes down once
                time.exposed_transfers += shard * pb / pcie.bandwidth
            if not offload_params:  # the updated bf16 parameters come back up
                time.exposed_transfers += shard * pb / pcie.bandwidth
            time.optimizer = shard * CPU_ADAM_BYTES / host_share
        else:
            time.optimizer = shard * CPU_ADAM_BYTES / (dev.memory_bandwidth * dev.memory_efficiency)
        if offload_optimizer or offload_params:
            host_need = self.cluster.gpus_per_node * (
                (shard * ADAM_K if offload_optimizer else 0) + (n_params / d * pb if offload_params else 0))
            if host_need > 0.9 * hw.host.dram_bytes:
                self._reject("offloaded state exceeds host memory")
                return None

        step = time.total
        tokens = self.global_batch * prof.seq_len
        model_flops = self.global_batch * (
            prof.num_layers * sum(c.forward.total_flops + c.backward.total_flops for c in prof.cells.values())
            + sum(x.forward.total_flops + x.backward.total_flops for x in (prof.pre, prof.post)))
        peak = dev.peak("bfloat16" if pb == 2 else "float32")
        config = dict(
            dp=d, tp=t, pp=pp, zero=zero, micro_batch=b, num_micro=m, schedule=schedule,
            virtual=v, recompute=dict(sorted(mix.items())), recompute_by_stage=recompute_by_stage, offload_optimizer=offload_optimizer,
            offload_params=offload_params, sequence_parallel=t > 1, global_batch=self.global_batch,
        )  # fmt: skip
        return ParallelPlan(
            mode="train", config=config, memory=mem, time=time, capacity=self.capacity,
            metrics={"tokens_per_s": tokens / step, "mfu": model_flops / (step * self.gpus * peak),
                     "step_s": step},
        )  # fmt: skip

    def _note_overshoot(self, total: float, t: int, pp: int, d: int, b: int, zero: int,
                        oo: bool, op: bool) -> None:  # fmt: skip
        self._reject("activations do not fit even with full recompute")
        desc = f"dp{d} tp{t} pp{pp} zero{zero} mb{b}" + (" +offload" if oo or op else "")
        if self.closest is None or total < self.closest[0]:
            self.closest = (total, desc)

    # -- the enumeration ---------------------------------------------------------------------

    def configurations(self) -> Iterator[dict]:
        prof, n = self.profile, self.gpus
        for t in divisors(n):
            if prof.heads % t or prof.intermediate % t or (t > prof.kv_heads and t % prof.kv_heads) or (
                    t <= prof.kv_heads and prof.kv_heads % t):
                self._reject("TP degree does not divide the heads / MLP width")
                continue
            for pp in divisors(n // t):
                if prof.num_layers % pp:
                    self._reject("layers do not split evenly over pipeline stages")
                    continue
                d = n // (t * pp)
                if self.global_batch % d:
                    self._reject("global batch not divisible by the DP degree")
                    continue
                per_replica = self.global_batch // d
                for b in MICRO_BATCHES:
                    if per_replica % b:
                        continue
                    m = per_replica // b
                    if pp > 1 and m < pp:
                        self._reject("fewer micro-batches than pipeline stages")
                        continue
                    schedules = [("1f1b", 1)] if pp > 1 else [("none", 1)]
                    if pp > 1 and m % pp == 0:
                        schedules += [("interleaved", v) for v in VIRTUAL_STAGES
                                      if prof.num_layers % (pp * v) == 0]  # fmt: skip
                    for schedule, v in schedules:
                        for zero in ((0, 1, 2, 3) if d > 1 else (0,)):
                            offloads = [(False, False), (True, False)]
                            if zero == 3:
                                offloads.append((True, True))
                            for oo, op in offloads:
                                yield dict(t=t, pp=pp, d=d, b=b, schedule=schedule, v=v, zero=zero,
                                           offload_optimizer=oo, offload_params=op)  # fmt: skip

    def state_lower_bound(self, cfg: dict) -> float:
        """Model state of the first stage: no plan of this shape uses less memory."""
        prof = self.profile
        L = prof.num_layers // cfg["pp"]
        n = (L * prof.layer_params + prof.pre.params) / cfg["t"]
        return model_state_bytes(n, cfg["d"], cfg["zero"], param_bytes=prof.param_bytes,
                                 grad_bytes=prof.param_bytes,
                                 offload_optimizer=cfg["offload_optimizer"],
                                 offload_params=cfg["offload_params"]).total + WORKSPACE_BYTES + (
                                 ALLOCATOR_HEADROOM * self.capacity)  # fmt: skip

    def plans(self) -> Iterator[ParallelPlan]:
        for cfg in self.configurations():
            bound = self.state_lower_bound(cfg)
            if bound > self.capacity:
                self._reject("model state exceeds device memory")
                desc = f"dp{cfg['d']} tp{cfg['t']} pp{cfg['pp']} zero{cfg['zero']}"
                if self.closest is None or bound < self.closest[0]:
                    self.closest = (bound, desc)
                continue
            try:
                plan = self.evaluate(**cfg)
            except CollectiveError as exc:
                self._reject(str(exc))
                continue
            if plan is not None:
                yield plan


def search_training(
    profile: ModelProfile, hardware: Hardware, cluster: Cluster, gpus: int, global_batch: int,
    *, top: int = 5, refine: int = 5,
) -> tuple[list[ParallelPlan], TrainSearch]:  # fmt: skip
    """All fitting plans ranked by step time (the ``top`` first), and the search (its counts of
    rejections and the closest miss explain an empty answer). The best ``refine`` plans are
    re-solved with CP-SAT's exact recompute mix."""
    search = TrainSearch(profile, hardware, cluster, gpus, global_batch)
    plans = sorted(search.plans(), key=lambda p: (p.step_time, p.memory.total))
    refined = []
    for p in plans[:refine]:
        c = p.config
        again = search.evaluate(t=c["tp"], pp=c["pp"], d=c["dp"], b=c["micro_batch"],
                                schedule=c["schedule"], v=c["virtual"], zero=c["zero"],
                                offload_optimizer=c["offload_optimizer"],
                                offload_params=c["offload_params"], exact=True)  # fmt: skip
        refined.append(again if again is not None and again.step_time < p.step_time else p)
    plans = sorted(refined + plans[refine:], key=lambda p: (p.step_time, p.memory.total))
    return plans[:top] if top else plans, search
