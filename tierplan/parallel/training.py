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

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Iterator

from tierplan.cost_models.collectives import CollectiveError, collective_time, group_shape, p2p_time
from tierplan.cost_models.hardware import Cluster, ComputePrecision, Hardware, Link, compute_precision
from tierplan.cost_models.training_memory import ADAM_K, model_state_bytes
from tierplan.parallel.profile import CELLS, ModelProfile
from tierplan.parallel.types import (
    WORKSPACE_BYTES,
    Layout,
    MemoryBreakdown,
    ParallelPlan,
    TimeBreakdown,
    degree_problem,
    divisors,
)

__all__ = ["RecomputeOption", "TrainSearch", "search_training", "solve_recompute_mix", "sustained"]

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


def sustained(precision: ComputePrecision) -> ComputePrecision:
    """``precision`` with its device's compute rate derated to what a whole training step
    sustains (``Device.training_efficiency``, fitted to published runs by
    ``tierplan.parallel.calibration``); peaks, and so MFU's denominator, are left as they are."""
    dev = precision.device
    if dev.training_efficiency == 1.0:
        return precision
    derated = dataclasses.replace(dev, compute_efficiency=dev.compute_efficiency * dev.training_efficiency,
                                  training_efficiency=1.0)  # fmt: skip
    return dataclasses.replace(precision, device=derated)


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


@dataclass(frozen=True)
class _Layout:
    """One training configuration and the quantities derived from it that every piece of
    ``TrainSearch.evaluate`` reads."""

    t: int  # TP degree (with sequence parallelism when > 1)
    pp: int  # pipeline stages
    d: int  # DP degree
    b: int  # micro-batch size
    schedule: str
    v: int  # virtual stages per device (interleaved schedule)
    zero: int
    offload_optimizer: bool
    offload_params: bool
    m: int  # micro-batches per step
    L: int  # layers per stage
    seq_bytes: float  # one [b, s, h] activation
    inflight: float  # micro-batches whose activations the first stage holds

    @property
    def grads_streamed(self) -> bool:
        """ZeRO-2/3 with the optimizer offloaded: each layer's gradient shard goes to the host
        as the backward produces it, instead of once per step."""
        return self.offload_optimizer and self.zero >= 2

    def shard(self, n_params: float) -> float:
        """This device's share of ``n_params`` optimizer state (sharded from ZeRO-1 on)."""
        return n_params / (self.d if self.zero >= 1 else 1)


@dataclass(frozen=True)
class _StageCost:
    """One pipeline stage priced: its recompute mix, memory, and per-micro-batch seconds."""

    name: str  # "first" or "last"
    mix: dict[str, int]  # recompute option -> layers taking it
    memory: MemoryBreakdown
    fwd: float
    bwd: float
    recompute: float
    n_params: float  # parameters on one device of the stage


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
    # The fields of the layout the user fixed (``--layout``); the search enumerates the rest.
    layout: Layout | None = None
    # The configuration (``evaluate``'s keywords) of ``closest``.
    closest_config: dict | None = None
    _cache: dict[tuple, float] = field(default_factory=dict)
    # The dtype compute is priced in and the device to price it on (bf16 models on a device
    # without bf16 run in fp16; its compute rate derated to what a training step sustains);
    # raises HardwareError when the device has neither.
    precision: ComputePrecision = field(init=False)

    def __post_init__(self) -> None:
        if not self.capacity:
            self.capacity = float(self.hardware.tier("device").capacity_bytes)
        self.precision = sustained(compute_precision(self.hardware, self.profile.param_bytes))

    # -- pieces ------------------------------------------------------------------------------

    def _sec(self, part: str, phase: str, b: int, t: int) -> float:
        key = (part, phase, b, t)
        if key not in self._cache:
            p = self.profile
            prof = p.core if part == "core" else (p.cells.get(part) or getattr(p, part))
            table = prof if part == "core" else getattr(prof, phase)
            self._cache[key] = table.seconds(self.precision.device, b, t)
        return self._cache[key]

    def _coll(self, kind: str, nbytes: float, size: int, stride: int) -> float:
        g = group_shape(size, stride, self.cluster.gpus_per_node)
        return collective_time(kind, nbytes, g, self.cluster).seconds / COLLECTIVE_EFFICIENCY

    def _reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def recompute_options(
        self, b: int, t: int, tp_fwd: float, *, dominated: bool = False
    ) -> list[RecomputeOption]:
        """Per-layer options at micro-batch ``b`` and TP ``t`` (sequence parallel when t > 1);
        options no better than another in both memory and time are dropped unless
        ``dominated``."""
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
        if dominated:
            return opts
        # Drop dominated options: no less memory for no less time.
        keep = [o for o in opts if not any(
            q is not o and q.act_bytes <= o.act_bytes and q.seconds <= o.seconds
            and (q.act_bytes, q.seconds) != (o.act_bytes, o.seconds) for q in opts)]  # fmt: skip
        return keep

    # -- one configuration -------------------------------------------------------------------

    def evaluate(
        self, *, t: int, pp: int, d: int, b: int, schedule: str, v: int, zero: int,
        offload_optimizer: bool, offload_params: bool, exact: bool = False,
        over_capacity: bool = False,
    ) -> ParallelPlan | None:  # fmt: skip
        """Price one layout: its memory per device and its step time, or None when it does not
        fit (the reason is counted in ``rejected``). With ``over_capacity`` a layout that does not
        fit is priced anyway (each stage on its leanest recompute), to show what overflows; its
        plan's ``fits`` is False.

        A pipeline: the layout's derived shape, the TP traffic the recompute options repeat,
        the recompute mix and memory of each binding stage, the step time of the slowest stage,
        the host-memory check of offloaded state, and the plan. ``exact`` solves the recompute
        mix with CP-SAT instead of the pair enumeration.
        """
        self.evaluated += 1
        shape = self._layout(t=t, pp=pp, d=d, b=b, schedule=schedule, v=v, zero=zero,
                             offload_optimizer=offload_optimizer, offload_params=offload_params)  # fmt: skip
        tp_fwd = self._tp_forward_seconds(shape)
        fixed = self.layout is not None and self.layout.recompute is not None
        options = self.recompute_options(b, t, tp_fwd, dominated=fixed)
        stages: list[_StageCost] = []
        for name, extra_params, flight in self._binding_stages(shape):
            stage = self._price_stage(shape, name, extra_params, flight, options, exact, over_capacity)
            if stage is None:
                return None
            stages.append(stage)
        # The slowest stage sets the pace (the recompute options' seconds already include the
        # TP traffic they repeat); the stage with the larger footprint is the memory reported.
        pace = max(stages, key=lambda r: r.fwd + r.bwd + r.recompute)
        memory = max((r.memory for r in stages), key=lambda x: x.total)
        time = self._step_time(shape, pace, tp_fwd)
        if not self._offload_fits_host(shape, pace.n_params) and not over_capacity:
            return None
        return self._plan(shape, stages, memory, time)

    def _layout(
        self, *, t: int, pp: int, d: int, b: int, schedule: str, v: int, zero: int,
        offload_optimizer: bool, offload_params: bool,
    ) -> _Layout:  # fmt: skip
        """The configuration and the quantities every later piece derives from it."""
        prof = self.profile
        m = self.global_batch // (d * b)
        seq_bytes = b * prof.seq_len * prof.hidden * prof.param_bytes  # one [b, s, h] activation
        # Micro-batches whose activations the first stage holds at once (1F1B warm-up; the
        # interleaved schedule keeps a fraction more).
        inflight = 1.0 if pp == 1 else min(m, pp) * (1 + (pp - 1) / (pp * v) if v > 1 else 1)
        return _Layout(
            t=t, pp=pp, d=d, b=b, schedule=schedule, v=v, zero=zero,
            offload_optimizer=offload_optimizer, offload_params=offload_params,
            m=m, L=prof.num_layers // pp, seq_bytes=seq_bytes, inflight=inflight,
        )  # fmt: skip

    def _tp_forward_seconds(self, s: _Layout) -> float:
        """One layer's forward TP traffic per micro-batch: with sequence parallelism, 2
        all-gathers + 2 reduce-scatters (Korthikanti et al.); the backward repeats them."""
        if s.t > 1:
            return 2 * (self._coll("all_gather", s.seq_bytes, s.t, 1)
                        + self._coll("reduce_scatter", s.seq_bytes, s.t, 1))  # fmt: skip
        return 0.0

    def _binding_stages(self, s: _Layout) -> list[tuple[str, float, float]]:
        """(name, parameters besides the layers, micro-batches in flight) of the stages that
        bind: the first (embeddings, the most micro-batches in flight) and the last (head and
        loss); with one stage they are the same."""
        prof = self.profile
        stages = [("first", prof.pre.params + (prof.post.params if s.pp == 1 else 0), s.inflight)]
        if s.pp > 1:
            stages.append(("last", prof.post.params, 1.0))
        return stages

    def _price_stage(
        self, s: _Layout, name: str, extra_params: float, flight: float,
        options: list[RecomputeOption], exact: bool, over_capacity: bool = False,
    ) -> _StageCost | None:  # fmt: skip
        """The recompute mix, memory and per-micro-batch times of one stage; None (and the
        overshoot noted) when its activations do not fit even with the leanest option (or with
        the recompute the layout fixes). ``over_capacity``: price it anyway."""
        prof = self.profile
        n_params = (s.L * prof.layer_params + extra_params) / s.t
        state = model_state_bytes(n_params, s.d, s.zero, param_bytes=prof.param_bytes,
                                  grad_bytes=prof.param_bytes,
                                  offload_optimizer=s.offload_optimizer,
                                  offload_params=s.offload_params)  # fmt: skip
        buffers = self._buffer_bytes(s)
        fixed_act = self._fixed_activation_bytes(s, name, flight)
        budget = self.capacity - state.total - buffers - fixed_act
        by = {o.name: o for o in options}
        if self.layout is not None and self.layout.recompute is not None:
            mix = self.layout.recompute_mix(s.L)  # layout_problem checked the options and counts
            need = sum(by[k].act_bytes * n for k, n in mix.items()) * flight
            if need > budget and not over_capacity:
                self._note_overshoot(state.total + buffers + fixed_act + need, s,
                                     f"activations do not fit with {self.layout.recompute_text()}")  # fmt: skip
                return None
        else:
            mix = solve_recompute_mix(
                [RecomputeOption(o.name, o.act_bytes * flight, o.seconds) for o in options],
                s.L, budget, exact=exact,
            )  # fmt: skip
            if mix is None:
                lean = min(options, key=lambda o: o.act_bytes)
                if not over_capacity:
                    self._note_overshoot(state.total + buffers + fixed_act
                                         + lean.act_bytes * flight * s.L, s)  # fmt: skip
                    return None
                mix = {lean.name: s.L} if s.L else {}
        layer_act = sum(by[k].act_bytes * n for k, n in mix.items()) * flight
        recompute = sum(by[k].seconds * n for k, n in mix.items())
        mem = MemoryBreakdown(
            parameters=state.parameters, gradients=state.gradients, optimizer=state.optimizer,
            activations=layer_act + fixed_act, buffers=buffers,
        )  # fmt: skip
        fwd, bwd = self._stage_compute_seconds(s, name)
        return _StageCost(name=name, mix=mix, memory=mem, fwd=fwd, bwd=bwd, recompute=recompute,
                          n_params=n_params)  # fmt: skip

    def _buffer_bytes(self, s: _Layout) -> float:
        """Device memory besides model state and activations: the workspace, the allocator's
        headroom, the largest temporary, and under ZeRO-3 the gathered layers."""
        prof = self.profile
        temp = max(max(c.largest_temporary for c in prof.cells.values()), prof.post.largest_temporary)
        buffers = WORKSPACE_BYTES + ALLOCATOR_HEADROOM * self.capacity + temp * s.b / s.t
        if s.zero == 3:  # the gathered layer in use and the one prefetched
            buffers += 2 * prof.layer_params * prof.param_bytes / s.t
        return buffers

    def _fixed_activation_bytes(self, s: _Layout, name: str, flight: float) -> float:
        """Activations no recompute choice removes: the embeddings' (per micro-batch in flight)
        on the first stage, the head's and loss's on the last."""
        prof = self.profile
        fixed_act = 0.0
        if name == "first":
            fixed_act += prof.pre.activations.bytes(s.t, True, s.b) * flight
            if s.pp == 1:
                fixed_act += prof.post.activations.bytes(s.t, True, s.b)
        else:
            fixed_act += prof.post.activations.bytes(s.t, True, s.b)
        return fixed_act

    def _stage_compute_seconds(self, s: _Layout, name: str) -> tuple[float, float]:
        """Forward and backward seconds of one micro-batch on a stage: its layers plus the
        embeddings (first stage) or the head and loss (last stage; both with one stage)."""
        b, t = s.b, s.t
        fwd = s.L * sum(self._sec(c, "forward", b, t) for c in CELLS)
        bwd = s.L * sum(self._sec(c, "backward", b, t) for c in CELLS)
        part = "pre" if name == "first" else "post"
        fwd += self._sec(part, "forward", b, t) + (self._sec("post", "forward", b, t) if s.pp == 1 else 0)
        bwd += self._sec(part, "backward", b, t) + (self._sec("post", "backward", b, t) if s.pp == 1 else 0)
        return fwd, bwd

    # -- the step time -----------------------------------------------------------------------

    def _step_time(self, s: _Layout, pace: _StageCost, tp_fwd: float) -> TimeBreakdown:
        """The step's time breakdown, paced by the slowest stage: compute, recompute, the
        exposed TP / PP / DP traffic, the pipeline bubble and the optimizer step."""
        b, t = s.b, s.t
        time = TimeBreakdown()
        # Per layer and micro-batch, the pieces the overlap model needs.
        fwd_l = sum(self._sec(c, "forward", b, t) for c in CELLS)
        bwd_l = sum(self._sec(c, "backward", b, t) for c in CELLS) + pace.recompute / max(s.L, 1)
        tp_time = s.L * self._tp_layer_seconds(s, tp_fwd, bwd_l)
        p2p = self._p2p_seconds(s)
        pcie = self.hardware.link("device", "host")
        per_mb_dp = self._data_parallel_seconds(s, time, pace, pcie, fwd_l, bwd_l)
        per_micro = pace.fwd + pace.bwd + pace.recompute + tp_time + p2p
        time.compute = s.m * (pace.fwd + pace.bwd)
        time.recompute = s.m * pace.recompute
        if tp_time:
            time.collectives["tp allgather+reducescatter"] = s.m * tp_time
        if p2p:
            time.collectives["pp send/recv"] = s.m * p2p
        time.bubble = (s.pp - 1) / s.v * (per_micro + per_mb_dp) if s.pp > 1 else 0.0
        self._optimizer_seconds(s, time, pace, pcie)
        return time

    def _tp_layer_seconds(self, s: _Layout, tp_fwd: float, bwd_l: float) -> float:
        """Exposed TP + SP seconds of one layer and micro-batch (Megatron): forward 2 AG + 2 RS
        on the critical path; backward 2 AG of the output gradients on the critical path, and
        the re-gather of the inputs (2 AG) and the reduce-scatter of the input gradients (2 RS)
        overlapped with the dgrad / wgrad GEMMs."""
        if s.t > 1:
            kappa = OVERLAP_INTERFERENCE
            hidden = tp_fwd  # 2 AG + 2 RS overlapped in the backward
            return 1.5 * tp_fwd + max(hidden - bwd_l, 0.0) + kappa * min(hidden, bwd_l)
        return 0.0

    def _p2p_seconds(self, s: _Layout) -> float:
        """Pipeline send/recv seconds per micro-batch: forward activation and backward
        gradient at each of the ``v`` virtual stage boundaries."""
        if s.pp > 1:
            same_node = s.t * s.d * s.pp <= self.cluster.gpus_per_node
            return 2 * s.v * p2p_time(s.seq_bytes / s.t, self.cluster, same_node=same_node) / COLLECTIVE_EFFICIENCY
        return 0.0

    def _host_share(self) -> float:
        """Host DRAM bandwidth one GPU's optimizer and gradient accumulation can count on."""
        return self.hardware.host.dram_bandwidth * HOST_EFFICIENCY / self.cluster.gpus_per_node

    def _overlap_window(
        self, pcie: Link, net: float, up: float, down: float, host: float, compute: float
    ) -> float:
        """Seconds one layer exposes when its network, PCIe and host streams run beside
        ``compute``: what the slowest stream does not hide, plus the interference of the
        hidden network traffic (SMs and HBM shared)."""
        both = up > 0 and down > 0
        bw = pcie.bandwidth_both_ways() if both else pcie.bandwidth
        link = (max(up, down) / bw) if (up or down) else 0.0
        busy = max(net, link, host)
        return max(busy - compute, 0.0) + OVERLAP_INTERFERENCE * min(net, compute)

    def _data_parallel_seconds(
        self, s: _Layout, time: TimeBreakdown, pace: _StageCost, pcie: Link,
        fwd_l: float, bwd_l: float,
    ) -> float:  # fmt: skip
        """Record the exposed DP collectives of the step in ``time.collectives`` and return the
        exposed DP / offload seconds per micro-batch (which the pipeline bubble repeats).

        Per layer, the network (DP collectives), PCIe (offloaded parameters up, gradient shards
        down) and the host (accumulating gradient shards) are three streams pipelined with the
        layer's compute. ZeRO-0/1 reduce whole gradients once per step instead.
        """
        prof, d, t, zero, L = self.profile, s.d, s.t, s.zero, s.L
        pb = prof.param_bytes
        kappa = OVERLAP_INTERFERENCE
        layer_bytes = prof.layer_params * pb / t  # one layer's unsharded bf16 weights (or grads)
        layer_shard = layer_bytes / d if zero >= 1 else layer_bytes
        grad_bytes = pace.n_params * pb
        layers_here = max(L, 1)
        per_mb_dp = 0.0
        host_acc = layer_shard / pb * HOST_GRAD_ACC_BYTES / self._host_share() if s.grads_streamed else 0.0
        down = layer_shard if s.grads_streamed else 0.0
        if d > 1 and zero == 3:
            ag_l = self._coll("all_gather", layer_bytes, d, t)
            rs_l = self._coll("reduce_scatter", layer_bytes, d, t)
            up = layer_shard if s.offload_params else 0.0
            per_mb_dp = (L * (self._overlap_window(pcie, ag_l, up, 0.0, 0.0, fwd_l)
                              + self._overlap_window(pcie, ag_l + rs_l, up, down, host_acc, bwd_l))
                         + ag_l)  # the first layer's gather: nothing to hide it behind
            time.collectives["zero3 allgather+reducescatter"] = s.m * per_mb_dp
        elif d > 1 and zero == 2:
            rs_l = self._coll("reduce_scatter", layer_bytes, d, t)
            # the last layer's reduce-scatter: nothing left to hide it behind
            per_mb_dp = L * self._overlap_window(pcie, rs_l, 0.0, down, host_acc, bwd_l) + rs_l
            time.collectives["dp reducescatter"] = s.m * per_mb_dp
        elif d > 1:  # stages 0 and 1: gradients accumulate whole, one reduction per step
            kind = "all_reduce" if zero == 0 else "reduce_scatter"
            comm = self._coll(kind, grad_bytes, d, t)
            exposed = max(comm - pace.bwd, comm / layers_here) + kappa * min(comm, pace.bwd)
            time.collectives[f"dp {kind.replace('_', '')}"] = exposed
        if d > 1 and zero in (1, 2):  # the updated parameters come back before the next forward
            ag = self._coll("all_gather", grad_bytes, d, t)
            time.collectives["dp allgather"] = max(ag - pace.fwd, ag / layers_here) + kappa * min(ag, pace.fwd)
        return per_mb_dp

    def _optimizer_seconds(self, s: _Layout, time: TimeBreakdown, pace: _StageCost, pcie: Link) -> None:
        """Record the optimizer step on this device's shard in ``time``: CPU Adam over the host's
        DRAM when offloaded (plus the PCIe transfers it exposes), else over HBM."""
        dev, pb = self.hardware.device, self.profile.param_bytes
        shard = s.shard(pace.n_params)
        if s.offload_optimizer:
            if not s.grads_streamed:  # stages 0-1: the reduced gradient shard goes down once
                time.exposed_transfers += shard * pb / pcie.bandwidth
            if not s.offload_params:  # the updated bf16 parameters come back up
                time.exposed_transfers += shard * pb / pcie.bandwidth
            time.optimizer = shard * CPU_ADAM_BYTES / self._host_share()
        else:
            time.optimizer = shard * CPU_ADAM_BYTES / (dev.memory_bandwidth * dev.memory_efficiency)

    def _offload_fits_host(self, s: _Layout, n_params: float) -> bool:
        """Whether the state offloaded by every GPU of a server fits in 90% of its host
        memory; counts the rejection when not."""
        if s.offload_optimizer or s.offload_params:
            pb = self.profile.param_bytes
            host_need = self.cluster.gpus_per_node * (
                (s.shard(n_params) * ADAM_K if s.offload_optimizer else 0)
                + (n_params / s.d * pb if s.offload_params else 0))  # fmt: skip
            if host_need > 0.9 * self.hardware.host.dram_bytes:
                self._reject("offloaded state exceeds host memory")
                return False
        return True

    # -- the plan ----------------------------------------------------------------------------

    def _model_flops(self) -> float:
        """FLOPs of one step's forward and backward over the whole model (no recompute)."""
        prof = self.profile
        return self.global_batch * (
            prof.num_layers * sum(c.forward.total_flops + c.backward.total_flops for c in prof.cells.values())
            + sum(x.forward.total_flops + x.backward.total_flops for x in (prof.pre, prof.post)))  # fmt: skip

    def _plan(
        self, s: _Layout, stages: list[_StageCost], memory: MemoryBreakdown, time: TimeBreakdown
    ) -> ParallelPlan:
        """The priced plan: its configuration, breakdowns, throughput and MFU."""
        prof, precision = self.profile, self.precision
        step = time.total
        tokens = self.global_batch * prof.seq_len
        model_flops = self._model_flops()
        peak = precision.device.peak(precision.dtype)
        mix = stages[0].mix  # the first stage's choice: where activations bind
        recompute_by_stage = {r.name: dict(sorted(r.mix.items())) for r in stages}
        config = dict(
            dp=s.d, tp=s.t, pp=s.pp, zero=s.zero, micro_batch=s.b, num_micro=s.m,
            schedule=s.schedule, virtual=s.v, recompute=dict(sorted(mix.items())),
            recompute_by_stage=recompute_by_stage, offload_optimizer=s.offload_optimizer,
            offload_params=s.offload_params, sequence_parallel=s.t > 1,
            global_batch=self.global_batch, compute_dtype=precision.dtype,
        )  # fmt: skip
        return ParallelPlan(
            mode="train", config=config, memory=memory, time=time, capacity=self.capacity,
            metrics={"tokens_per_s": tokens / step, "mfu": model_flops / (step * self.gpus * peak),
                     "step_s": step},
            notes=[precision.note] if precision.note else [],
        )  # fmt: skip

    def _note_overshoot(
        self, total: float, s: _Layout, reason: str = "activations do not fit even with full recompute"
    ) -> None:
        self._reject(reason)
        desc = f"dp{s.d} tp{s.t} pp{s.pp} zero{s.zero} mb{s.b}" + (
            " +offload" if s.offload_optimizer or s.offload_params else "")  # fmt: skip
        if self.closest is None or total < self.closest[0]:
            self.closest = (total, desc)
            self.closest_config = {
                "t": s.t, "pp": s.pp, "d": s.d, "b": s.b, "schedule": s.schedule, "v": s.v,
                "zero": s.zero, "offload_optimizer": s.offload_optimizer,
                "offload_params": s.offload_params,
            }  # fmt: skip

    # -- the enumeration ---------------------------------------------------------------------

    def configurations(self) -> Iterator[dict]:
        """Every configuration to price, restricted to the fields ``layout`` fixes."""
        prof, n = self.profile, self.gpus
        lay = self.layout or Layout()
        for t in divisors(n):
            if (lay.tp is not None and t != lay.tp) or (lay.sp and t == 1):
                continue
            if prof.heads % t or prof.intermediate % t or (t > prof.kv_heads and t % prof.kv_heads) or (
                    t <= prof.kv_heads and prof.kv_heads % t):
                self._reject("TP degree does not divide the heads / MLP width")
                continue
            for pp in divisors(n // t):
                if lay.pp is not None and pp != lay.pp:
                    continue
                if lay.pp is None and lay.schedule is not None and pp == 1:
                    continue
                if prof.num_layers % pp:
                    self._reject("layers do not split evenly over pipeline stages")
                    continue
                if lay.recompute is not None and sum(c or 0 for _, c in lay.recompute) > prof.num_layers // pp:
                    self._reject(f"{lay.recompute_text()} names more layers than a stage has")
                    continue
                d = n // (t * pp)
                if (lay.dp is not None and d != lay.dp) or (lay.zero and d == 1 and lay.dp is None):
                    continue
                if self.global_batch % d:
                    self._reject("global batch not divisible by the DP degree")
                    continue
                per_replica = self.global_batch // d
                for b in (MICRO_BATCHES if lay.micro_batch is None else (lay.micro_batch,)):
                    if per_replica % b:
                        if lay.micro_batch is not None:
                            self._reject("the micro-batch does not divide the per-replica batch")
                        continue
                    m = per_replica // b
                    if lay.num_micro is not None and m != lay.num_micro:
                        self._reject("the micro-batch count is not global batch / (dp x micro-batch)")
                        continue
                    if pp > 1 and m < pp:
                        self._reject("fewer micro-batches than pipeline stages")
                        continue
                    schedules = [("1f1b", 1)] if pp > 1 else [("none", 1)]
                    if pp > 1 and m % pp == 0:
                        virtual = VIRTUAL_STAGES if lay.virtual in (None, 1) else (lay.virtual,)
                        schedules += [("interleaved", v) for v in virtual
                                      if prof.num_layers % (pp * v) == 0]  # fmt: skip
                    if lay.schedule is not None:
                        wanted = [(k, v) for k, v in schedules if k == lay.schedule
                                  and (lay.virtual is None or v == lay.virtual)]  # fmt: skip
                        if not wanted:
                            self._reject(f"the {lay.schedule} schedule does not fit this pipeline "
                                         f"(interleaving needs micro-batches and layers divisible "
                                         f"by the stages x virtual stages)")  # fmt: skip
                        schedules = wanted
                    for schedule, v in schedules:
                        zeros = (0, 1, 2, 3) if d > 1 else (0,)
                        for zero in (z for z in zeros if lay.zero is None or z == lay.zero):
                            offloads = [(False, False), (True, False)]
                            if zero == 3:
                                offloads.append((True, True))
                            for oo, op in offloads:
                                if lay.offload_optimizer is not None and oo != lay.offload_optimizer:
                                    continue
                                if lay.offload_params is not None and op != lay.offload_params:
                                    continue
                                yield dict(t=t, pp=pp, d=d, b=b, schedule=schedule, v=v, zero=zero,
                                           offload_optimizer=oo, offload_params=op)  # fmt: skip

    def layout_problem(self) -> str | None:
        """Why no configuration can match ``layout``'s fixed fields on this model, GPU count and
        global batch (divisibility, degrees, schedule, recompute options), or None. What only
        pricing shows (memory) is the search's to say."""
        lay, prof, n, gb = self.layout, self.profile, self.gpus, self.global_batch
        if lay is None:
            return None
        fixed = {k: v for k, v in (("dp", lay.dp), ("tp", lay.tp), ("pp", lay.pp)) if v is not None}
        problem = degree_problem(fixed, n)
        if problem is not None:
            return problem
        t, pp = lay.tp, lay.pp
        if t is not None:
            for what, size in (("attention heads", prof.heads), ("MLP width", prof.intermediate)):
                if size % t:
                    return f"tp{t} does not divide the model's {size} {what}"
            if (t > prof.kv_heads and t % prof.kv_heads) or (t <= prof.kv_heads and prof.kv_heads % t):
                return f"tp{t} does not divide (nor is a multiple of) the model's {prof.kv_heads} KV heads"
        if lay.sp and (t == 1 or n == 1):
            return "sequence parallelism needs tp > 1"
        if pp is not None and prof.num_layers % pp:
            return f"pp{pp} does not divide the model's {prof.num_layers} layers"
        d = lay.dp if lay.dp is not None else (n // (t * pp) if t is not None and pp is not None else None)
        if d is not None and gb % d:
            return f"the global batch of {gb} sequences does not divide over dp{d}"
        if lay.zero and (d if d is not None else n // ((t or 1) * (pp or 1))) == 1:
            return f"zero{lay.zero} shards over data parallelism: it needs dp > 1 (dp is 1 here)"
        b = lay.micro_batch
        if b is not None:
            per = gb // d if d is not None else gb
            if per % b:
                return (f"mb{b} does not divide the {per} sequences of "
                        + (f"each of the dp{d} replicas" if d is not None else "the global batch"))  # fmt: skip
        m = gb // (d * b) if d is not None and b is not None else None
        if lay.num_micro is not None and m is not None and m != lay.num_micro:
            return (f"mb{b}x{lay.num_micro}: global batch {gb} over dp{d} in micro-batches of {b} "
                    f"makes {m} micro-batches, not {lay.num_micro}")  # fmt: skip
        if lay.schedule is not None and (pp == 1 or (pp is None and n // (t or 1) // (lay.dp or 1) == 1)):
            return f"the {lay.schedule} schedule needs pp > 1"
        if pp is not None and pp > 1 and m is not None and m < pp:
            return f"pp{pp} needs at least {pp} micro-batches per step; mb{b} at dp{d} makes {m}"
        if lay.schedule == "interleaved" and pp is not None:
            v = lay.virtual
            if v is not None and prof.num_layers % (pp * v):
                return (f"interleaved(v={v}) with pp{pp} needs the {prof.num_layers} layers in "
                        f"{pp * v} equal chunks")  # fmt: skip
            if v is None and not any(prof.num_layers % (pp * w) == 0 for w in VIRTUAL_STAGES):
                return (f"interleaving with pp{pp}: the {prof.num_layers} layers do not split into "
                        f"pp x v chunks for v in {VIRTUAL_STAGES}; give interleaved(v=N)")  # fmt: skip
            if m is not None and m % pp:
                return f"interleaving needs the micro-batch count ({m}) to be a multiple of pp{pp}"
        if lay.recompute is not None:
            if any(k == "selective" for k, _ in lay.recompute) and prof.layer_activations.attention_core <= 0:
                return ("selective recompute drops the attention's seq x seq scores, and this model's "
                        "attention keeps none (a fused kernel); use rc[attn] or rc[full]")  # fmt: skip
            if pp is not None:
                try:
                    lay.recompute_mix(prof.num_layers // pp)
                except ValueError as exc:
                    return str(exc)
            elif any(c and c > prof.num_layers for _, c in lay.recompute):
                return f"{lay.recompute_text()} names more layers than the model's {prof.num_layers}"
        return None

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
                    self.closest_config = cfg
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
    *, top: int = 5, refine: int = 5, layout: Layout | None = None,
) -> tuple[list[ParallelPlan], TrainSearch]:  # fmt: skip
    """All fitting plans ranked by step time (the ``top`` first), and the search (its counts of
    rejections and the closest miss explain an empty answer). The best ``refine`` plans are
    re-solved with CP-SAT's exact recompute mix. With ``layout``, only the plans matching its
    fixed fields (none when ``search.layout_problem()`` says why)."""
    search = TrainSearch(profile, hardware, cluster, gpus, global_batch, layout=layout)
    if search.layout_problem() is not None:
        return [], search
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
