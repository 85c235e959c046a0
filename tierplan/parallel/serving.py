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
    MemoryBreakdown,
    ParallelPlan,
    TimeBreakdown,
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
    # The dtype compute is priced in and the device to price it on (bf16 models on a device
    # without bf16 run in fp16); raises HardwareError when the device has neither.
    precision: ComputePrecision = field(init=False)

    def __post_init__(self) -> None:
        if not self.capacity:
            self.capacity = float(self.hardware.tier("device").capacity_bytes)
        self.precision = compute_precision(self.hardware, self.profile.param_bytes)

    def _reject(self, reason: str, need: float | None = None, desc: str = "") -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if need is not None and (self.closest is None or need < self.closest[0]):
            self.closest = (need, desc)

    def _coll(self, kind: str, nbytes: float, size: int) -> float:
        g = group_shape(size, 1, self.cluster.gpus_per_node)
        return collective_time(kind, nbytes, g, self.cluster).seconds

    def evaluate(self, t: int, pp: int, ep: int) -> ParallelPlan | None:
        self.evaluated += 1
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
        if kv_room < kv_per_seq:
            self._reject("weights and one sequence's KV cache exceed device memory",
                         weights + WORKSPACE_BYTES + kv_per_seq, desc)
            return None
        batch = min(self.max_batch, int(kv_room // kv_per_seq))
        if pp > 1 and batch < pp:
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
        prof = self.profile
        for t in divisors(self.gpus):
            if prof.heads % t:
                self._reject("TP degree does not divide the heads")
                continue
            for pp in divisors(self.gpus // t):
                if prof.num_layers % pp:
                    self._reject("layers do not split evenly over pipeline stages")
                    continue
                eps = [e for e in divisors(t) if prof.experts and prof.experts % e == 0] or [1]
                for ep in eps:
                    yield t, pp, ep

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
) -> tuple[list[ParallelPlan], ServeSearch]:  # fmt: skip
    """Fitting serving plans ranked by tokens/s (then TTFT), the ``top`` first."""
    search = ServeSearch(profile, hardware, cluster, gpus, prompt or profile.seq_len, generate,
                         max_batch)  # fmt: skip
    plans = sorted(search.plans(), key=lambda p: (-p.metrics["tokens_per_s"], p.metrics["ttft_s"]))
    return (plans[:top] if top else plans), search
