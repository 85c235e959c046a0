"""Serving plans: replicas x TP x PP x EP x batch, APEX-style.

Memory per device (APEX): weights of the device's share, a 1 GiB workspace, and the rest is KV
cache. The batch is the number of sequences whose KV cache (prompt + generated tokens) fits, at
most ``max_batch``. Times by roofline on the profile:

    TTFT = prefill of one prompt: the captured forward at batch 1 (split t ways) + per layer two
           all-reduces of the [s, h] activation over TP + (pp-1) stage sends
    TPOT = pp x decode step of one stage for batch/pp sequences, each the larger of
           (weight bytes + KV bytes read) / memory bandwidth and
           (2 x params + 4 x context x hidden per layer) x sequences / peak,
           + launches + two all-reduces of [batch, h] per layer over TP
    tokens/s = replicas x batch / TPOT

Experts: a model with E experts may put its MLP cell on EP e (e divides E and the TP degree; the
rest of the group is TP), trading the MLP's all-reduce for two all-to-alls; without experts EP = 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

from tierplan.cost_models.collectives import CollectiveError, collective_time, group_shape, p2p_time
from tierplan.cost_models.hardware import Cluster, ComputePrecision, Hardware, compute_precision
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

__all__ = ["ServeSearch", "search_serving"]


@dataclass
class ServeSearch:
    profile: ModelProfile
    hardware: Hardware
    cluster: Cluster
    gpus: int
    prompt: int
    generate: int
    max_batch: int = 256
    capacity: float = 0.0
    rejected: dict[str, int] = field(default_factory=dict)
    closest: tuple[float, str] | None = None
    evaluated: int = 0
    # The fields of the layout the user fixed (``--layout``): replicas (``dp``), tp, pp, ep, batch.
    layout: Layout | None = None
    closest_config: tuple[int, int, int] | None = None  # (t, pp, ep) of ``closest``
    # The dtype compute is priced in and the device to price it on (bf16 models on a device
    # without bf16 run in fp16); raises HardwareError when the device has neither.
    precision: ComputePrecision = field(init=False)

    def __post_init__(self) -> None:
        if not self.capacity:
            self.capacity = float(self.hardware.tier("device").capacity_bytes)
        self.precision = compute_precision(self.hardware, self.profile.param_bytes)

    def _reject(self, reason: str, need: float | None = None, desc: str = "",
                config: tuple[int, int, int] | None = None) -> None:  # fmt: skip
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if need is not None and (self.closest is None or need < self.closest[0]):
            self.closest = (need, desc)
            self.closest_config = config

    def _coll(self, kind: str, nbytes: float, size: int) -> float:
        g = group_shape(size, 1, self.cluster.gpus_per_node)
        return collective_time(kind, nbytes, g, self.cluster).seconds

    def evaluate(self, t: int, pp: int, ep: int, *, over_capacity: bool = False) -> ParallelPlan | None:
        """Price one layout, or None when it does not fit (the reason counted in ``rejected``);
        with ``over_capacity`` a layout that does not fit is priced anyway (its ``fits`` is
        False). The batch is ``layout.batch`` when the layout fixes it."""
        self.evaluated += 1
        fixed_batch = self.layout.batch if self.layout is not None else None
        prof, dev = self.profile, self.precision.device
        pb, h, L = prof.param_bytes, prof.hidden, prof.num_layers // pp
        replicas = self.gpus // (t * pp)
        ends = prof.pre.params + prof.post.params if pp == 1 else max(prof.pre.params, prof.post.params)
        stage_params = (L * prof.layer_params + ends) / t
        weights = stage_params * pb
        kv_share = math.ceil(prof.kv_heads / t) / prof.kv_heads  # KV heads replicate past t
        kv_per_seq = (self.prompt + self.generate) * L * prof.kv_bytes_per_token_per_layer() * kv_share
        kv_room = self.capacity - weights - WORKSPACE_BYTES
        desc = f"replicas{replicas} tp{t} pp{pp}"
        need_one = weights + WORKSPACE_BYTES + kv_per_seq * (fixed_batch or 1)
        if need_one > self.capacity and not over_capacity:
            what = f"{fixed_batch} sequences'" if fixed_batch else "one sequence's"
            self._reject(f"weights and {what} KV cache exceed device memory", need_one, desc, (t, pp, ep))
            return None
        fits = max(0, int(kv_room // kv_per_seq))
        batch = fixed_batch or max(1, min(self.max_batch, fits))
        if pp > 1 and batch < pp and not over_capacity:
            self._reject("fewer sequences than pipeline stages")
            return None
        micro = batch / pp

        # Prefill of one prompt (TTFT), from the captured forward at the profiled sequence.
        scale = self.prompt / prof.seq_len
        fwd = L * sum(prof.cells[c].forward.seconds(dev, scale, t) for c in CELLS)
        fwd_ends = prof.pre.forward.seconds(dev, scale, t) + prof.post.forward.seconds(dev, scale, t)
        prefill_tp = 2 * L * self._coll("all_reduce", self.prompt * h * pb, t) if t > 1 else 0.0
        same_node = t * pp <= self.cluster.gpus_per_node
        hop = p2p_time(self.prompt * h * pb, self.cluster, same_node=same_node) if pp > 1 else 0.0
        ttft = pp * fwd + fwd_ends + pp * prefill_tp + (pp - 1) * hop

        # One decode step of one stage for ``micro`` sequences at the mean context.
        ctx = self.prompt + self.generate / 2
        kv_read = micro * ctx * L * prof.kv_bytes_per_token_per_layer() * kv_share
        flops = 2 * stage_params * micro + 4 * micro * ctx * h * L / t
        peak = dev.peak(self.precision.dtype) * dev.compute_efficiency
        launches = L * sum(len(prof.cells[c].forward.keys) for c in CELLS) * dev.launch_overhead_s
        mem_s = (weights + kv_read) / (dev.memory_bandwidth * dev.memory_efficiency)
        compute_s = flops / peak
        decode_tp = 0.0
        if t > 1:
            if ep > 1:  # MLP on experts: two all-to-alls instead of the MLP's all-reduce
                decode_tp = L * (self._coll("all_reduce", micro * h * pb, t)
                                 + 2 * self._coll("all_to_all", micro * h * pb, ep))  # fmt: skip
            else:
                decode_tp = 2 * L * self._coll("all_reduce", micro * h * pb, t)
        dhop = p2p_time(micro * h * pb, self.cluster, same_node=same_node) if pp > 1 else 0.0
        stage = max(mem_s, compute_s) + launches + decode_tp
        tpot = pp * stage + (pp - 1) * dhop

        time = TimeBreakdown(compute=pp * (max(mem_s, compute_s) + launches))
        if decode_tp:
            time.collectives["tp allreduce"] = pp * decode_tp
        if pp > 1:
            time.collectives["pp send/recv"] = (pp - 1) * dhop
        mem = MemoryBreakdown(parameters=weights, kv_cache=batch * kv_per_seq, buffers=WORKSPACE_BYTES)
        config = dict(replicas=replicas, tp=t, pp=pp, ep=ep, batch=batch, prompt=self.prompt,
                      generate=self.generate, compute_dtype=self.precision.dtype)  # fmt: skip
        tokens = replicas * batch / tpot
        return ParallelPlan(
            mode="serve", config=config, memory=mem, time=time, capacity=self.capacity,
            metrics={"tokens_per_s": tokens, "ttft_s": ttft, "tpot_s": tpot,
                     "decode_bound": "memory" if mem_s >= compute_s else "compute"},
            notes=[self.precision.note] if self.precision.note else [],
        )  # fmt: skip

    def configurations(self) -> Iterator[tuple[int, int, int]]:
        prof, lay = self.profile, self.layout or Layout(mode="serve")
        for t in divisors(self.gpus):
            if lay.tp is not None and t != lay.tp:
                continue
            if prof.heads % t:
                self._reject("TP degree does not divide the heads")
                continue
            for pp in divisors(self.gpus // t):
                if (lay.pp is not None and pp != lay.pp) or (
                        lay.dp is not None and self.gpus // (t * pp) != lay.dp):  # fmt: skip
                    continue
                if prof.num_layers % pp:
                    self._reject("layers do not split evenly over pipeline stages")
                    continue
                if lay.batch is not None and pp > lay.batch:
                    self._reject("fewer sequences than pipeline stages")
                    continue
                eps = [e for e in divisors(t) if prof.experts and prof.experts % e == 0] or [1]
                for ep in eps:
                    if lay.ep is None or ep == lay.ep:
                        yield t, pp, ep

    def layout_problem(self) -> str | None:
        """Why no configuration can match ``layout``'s fixed fields, or None (memory is the
        search's to say)."""
        lay, prof, n = self.layout, self.profile, self.gpus
        if lay is None:
            return None
        fixed = {k: v for k, v in (("replicas", lay.dp), ("tp", lay.tp), ("pp", lay.pp)) if v is not None}
        problem = degree_problem(fixed, n)
        if problem is not None:
            return problem
        if lay.tp is not None and prof.heads % lay.tp:
            return f"tp{lay.tp} does not divide the model's {prof.heads} attention heads"
        if lay.pp is not None and prof.num_layers % lay.pp:
            return f"pp{lay.pp} does not divide the model's {prof.num_layers} layers"
        if lay.ep is not None and lay.ep > 1:
            if not prof.experts:
                return f"ep{lay.ep}: the model has no experts (expert parallelism needs a mixture of experts)"
            if prof.experts % lay.ep:
                return f"ep{lay.ep} does not divide the model's {prof.experts} experts"
            if lay.tp is not None and lay.tp % lay.ep:
                return f"ep{lay.ep} must divide the TP group (tp{lay.tp}): experts split within it"
        if lay.batch is not None and lay.pp is not None and lay.batch < lay.pp:
            return f"batch{lay.batch} is fewer sequences than the pp{lay.pp} stages"
        return None

    def plans(self) -> Iterator[ParallelPlan]:
        for t, pp, ep in self.configurations():
            try:
                plan = self.evaluate(t, pp, ep)
            except CollectiveError as exc:
                self._reject(str(exc))
                continue
            if plan is not None:
                yield plan


def search_serving(
    profile: ModelProfile, hardware: Hardware, cluster: Cluster, gpus: int, *,
    prompt: int | None = None, generate: int = 256, max_batch: int = 256, top: int = 5,
    layout: Layout | None = None,
) -> tuple[list[ParallelPlan], ServeSearch]:  # fmt: skip
    """Fitting serving plans ranked by tokens/s (then TTFT), the ``top`` first; with ``layout``,
    only those matching its fixed fields (none when ``search.layout_problem()`` says why)."""
    search = ServeSearch(profile, hardware, cluster, gpus, prompt or profile.seq_len, generate,
                         max_batch, layout=layout)  # fmt: skip
    if search.layout_problem() is not None:
        return [], search
    plans = sorted(search.plans(), key=lambda p: (-p.metrics["tokens_per_s"], p.metrics["ttft_s"]))
    return (plans[:top] if top else plans), search
