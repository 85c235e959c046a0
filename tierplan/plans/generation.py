"""Generation plans as data: where a causal LM's weights and KV cache live over prefill and decode.

A generation job is a prompt of ``prompt_len`` tokens for ``batch`` sequences, then ``new_tokens``
greedy tokens. The schedule is FlexGen's (Sheng et al., ICML 2023, section 4.1): one step is the
prefill or one decode token; a step runs the decoder layers in order, and each layer runs all of
its micro-batches (``num_gpu_batches`` of ``gpu_batch`` sequences: a *block*) before the next
layer, so that one load of a layer's weights serves the whole block.

``GenerationPolicy`` is what runs: the tier of every parameter (``device``, ``host`` or ``nvme``;
a layer whose weights are not all on the device is streamed in before it runs, the next layer's
load overlapping this layer's compute), the tier of every block of ``kv_block_tokens`` cache
positions (the same in every layer), and where attention over the cache runs: on the device (the
cache's host and NVMe blocks are copied in) or on the host CPU next to the cache (``host``: the
device sends the query, key and value of the new tokens and gets the attention output back, as
FlexGen's CPU attention), and where the block's hidden states wait between decoder layers
(``activations``): on the device, or on the host (FlexGen's activation placement: each micro-batch's
input rows are copied in before its layer runs and its output rows copied out after, so the device
holds one micro-batch's hidden states, and the next one's arriving, instead of the block's).

``GenerationPlan`` is a policy with its setting, its predictions (time to first token, decode
time, tokens per second, peak bytes per tier) and the timed tasks that carry it out; it is
checked by ``tierplan.plans.check_generation``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from tierplan.plans.plan import DEVICE, HOST, NVME, PlanError
from tierplan.units import format_bytes

GENERATION_TIERS = (DEVICE, HOST, NVME)
ATTENTION_PLACES = (DEVICE, HOST)
ACTIVATION_PLACES = (DEVICE, HOST)


@dataclass(frozen=True)
class GenerationPolicy:
    """How one generation job runs: batching, the tier of every weight and cache block, and where
    attention runs. Every parameter of the model is named in ``weight_tiers``."""

    gpu_batch: int  # sequences per micro-batch
    num_gpu_batches: int  # micro-batches per block (one weight load serves them all)
    weight_tiers: Mapping[str, str]  # parameter name (model.named_parameters()) -> tier
    kv_block_tokens: int  # cache positions per block
    kv_tiers: tuple[str, ...]  # the tier of each block of positions, in order, every layer alike
    attention: str = DEVICE  # where attention over the cache runs: "device" or "host"
    activations: str = DEVICE  # where the block's hidden states wait between layers: "device" or "host"

    def __post_init__(self) -> None:
        object.__setattr__(self, "kv_tiers", tuple(self.kv_tiers))
        object.__setattr__(self, "weight_tiers", dict(self.weight_tiers))
        if self.gpu_batch < 1 or self.num_gpu_batches < 1:
            raise PlanError(f"gpu_batch ({self.gpu_batch}) and num_gpu_batches ({self.num_gpu_batches}) "
                            "must be at least 1")
        if self.kv_block_tokens < 1:
            raise PlanError(f"kv_block_tokens must be at least 1, not {self.kv_block_tokens}")
        if self.attention not in ATTENTION_PLACES:
            raise PlanError(f"attention must be one of {ATTENTION_PLACES}, not {self.attention!r}")
        if self.activations not in ACTIVATION_PLACES:
            raise PlanError(f"activations must be one of {ACTIVATION_PLACES}, not {self.activations!r}")
        for where, tier in [*(("weight " + n, t) for n, t in self.weight_tiers.items()),
                            *((f"cache block {i}", t) for i, t in enumerate(self.kv_tiers))]:
            if tier not in GENERATION_TIERS:
                raise PlanError(f"{where}: tier {tier!r} is not one of {GENERATION_TIERS}")
        if self.attention == HOST and DEVICE in self.kv_tiers:
            # Attention next to the cache reads it where it lives: blocks on the device would
            # have to come back to the host first, which no plan wants.
            raise PlanError("attention on the host needs every cache block on the host or NVMe; "
                            f"blocks {[i for i, t in enumerate(self.kv_tiers) if t == DEVICE]} are on the device")

    @property
    def batch(self) -> int:
        """Sequences generated together: one block."""
        return self.gpu_batch * self.num_gpu_batches

    def kv_tier(self, position: int) -> str:
        """The tier holding cache position ``position`` (0-based, prompt first)."""
        block = position // self.kv_block_tokens
        if block >= len(self.kv_tiers):
            raise PlanError(f"cache position {position} is past the policy's "
                            f"{len(self.kv_tiers) * self.kv_block_tokens} positions")
        return self.kv_tiers[block]

    def kv_positions(self, tier: str, length: int) -> int:
        """How many of the first ``length`` cache positions live on ``tier``."""
        return sum(min(self.kv_block_tokens, length - b * self.kv_block_tokens)
                   for b, t in enumerate(self.kv_tiers) if t == tier and b * self.kv_block_tokens < length)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kv_tiers"] = list(self.kv_tiers)
        d["weight_tiers"] = dict(self.weight_tiers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GenerationPolicy:
        return cls(**{**d, "kv_tiers": tuple(d["kv_tiers"])})


# Resources a generation step's tasks run on. PCIe copies run on one queue each way ("h2d",
# "d2h"), or one queue both ways on a link that is not full duplex ("pcie"); the drive's reads
# and writes likewise ("nvme:read", "nvme:write", or "nvme").
COMPUTE = "compute"  # the device's compute stream
HOST_CPU = "host-cpu"  # the host CPU's cores (attention next to a host-resident cache)
H2D, D2H, PCIE = "h2d", "d2h", "pcie"
NVME_READ, NVME_WRITE, NVME_BOTH = "nvme:read", "nvme:write", "nvme"

# Task kinds. One layer of one step of one micro-batch runs, in order:
#   weight_read (nvme -> host staging) -> weight_in (host -> device), once per layer and step;
#   kv_read (the cache's NVMe positions -> host staging) -> kv_in (host -> device);
#   compute (the layer on the device), or with attention on the host:
#     compute (projections) -> qkv_out (d2h) -> attention (host CPU) -> attn_in (h2d) -> compute;
#   kv_out (the new positions' K and V to the host) -> kv_write (their NVMe part to the drive).
# With the block's hidden states on the host: act_in (the micro-batch's input rows, h2d) before
# its compute (not in layer 0, which reads the embedding) and act_out (its output rows, d2h) after
# it (not in the last layer, whose output the head reads on the device).
# ``head`` is the final norm, LM head and next-token pick after the last layer of a step.
WEIGHT_READ, WEIGHT_IN = "weight_read", "weight_in"
KV_READ, KV_IN, KV_OUT, KV_WRITE = "kv_read", "kv_in", "kv_out", "kv_write"
ACT_IN, ACT_OUT = "act_in", "act_out"
LAYER, PROJECT, QKV_OUT, ATTENTION, ATTN_IN, HEAD = "layer", "project", "qkv_out", "attention", "attn_in", "head"


@dataclass(frozen=True)
class GenerationShape:
    """A causal LM and the job it runs, in the numbers generation is priced with.

    ``layer_params`` lists one decoder layer's parameters by their name inside the layer (every
    layer has the same ones; ``layers_prefix`` + ``.{i}.`` + name is the model's name);
    ``other_params`` the rest by full name (embeddings, final norm, LM head)."""

    model: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype_bytes: int  # bytes per weight, activation and cache element
    layers_prefix: str  # e.g. "model.layers"
    layer_params: tuple[tuple[str, int], ...]  # (name inside a layer, bytes)
    other_params: tuple[tuple[str, int], ...]  # (full name, bytes)
    prompt_len: int
    new_tokens: int
    batch: int
    ops_per_layer: int = 0  # aten ops one decoder layer dispatches per decode step (0: not counted)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_params", tuple((n, int(b)) for n, b in self.layer_params))
        object.__setattr__(self, "other_params", tuple((n, int(b)) for n, b in self.other_params))
        for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "vocab", "dtype_bytes",
                     "prompt_len", "new_tokens", "batch"):
            if getattr(self, name) < 1:
                raise PlanError(f"generation {name} must be at least 1, not {getattr(self, name)}")

    @property
    def layer_bytes(self) -> int:
        return sum(b for _, b in self.layer_params)

    @property
    def other_bytes(self) -> int:
        return sum(b for _, b in self.other_params)

    @property
    def weight_bytes(self) -> int:
        return self.layers * self.layer_bytes + self.other_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one position of one sequence in one layer."""
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def max_positions(self) -> int:
        return self.prompt_len + self.new_tokens

    def param_name(self, layer: int, name: str) -> str:
        return f"{self.layers_prefix}.{layer}.{name}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_params"] = [list(p) for p in self.layer_params]
        d["other_params"] = [list(p) for p in self.other_params]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GenerationShape:
        return cls(**{**d, "layer_params": tuple(map(tuple, d["layer_params"])),
                      "other_params": tuple(map(tuple, d["other_params"]))})


@dataclass(frozen=True)
class GenerationRates:
    """The machine figures every task's duration is priced with (docs/cost-model.md,
    "Generation"), recorded so that the check re-derives them."""

    device_flops: float  # achieved FLOP/s at the model's dtype (peak x compute_efficiency)
    device_bandwidth: float  # achieved device-memory bytes/s
    kernel_s: float  # one kernel launch
    kernels_per_layer: int  # launches per layer and micro-batch
    h2d_bandwidth: float
    d2h_bandwidth: float
    pcie_latency_s: float
    pcie_duplex: bool
    nvme_read_bandwidth: float
    nvme_write_bandwidth: float
    nvme_latency_s: float
    nvme_duplex: bool
    cpu_flops: float
    dram_bandwidth: float
    fused_attention: bool  # the device's attention keeps no [q, c] score matrix (flash / mem-efficient)
    # A CPU-only machine: the "device" is the host's cores and memory, so copies between device
    # and host are the compute thread's own memcpys and host attention is the same cores.
    shared_cpu: bool = False

    def queue(self, kind: str) -> str:
        """The resource a copy of kind ``kind`` runs on."""
        if kind in (ACT_IN, ACT_OUT):
            # The runtime copies a micro-batch's hidden states on the compute stream, right
            # before and after its layer (they are small: one micro-batch's rows).
            return COMPUTE
        if self.shared_cpu and kind in (WEIGHT_IN, KV_IN, KV_OUT, QKV_OUT, ATTN_IN):
            return COMPUTE
        if kind in (WEIGHT_IN, KV_IN, ATTN_IN):
            return H2D if self.pcie_duplex else PCIE
        if kind in (KV_OUT, QKV_OUT):
            return D2H if self.pcie_duplex else PCIE
        if kind in (WEIGHT_READ, KV_READ):
            return NVME_READ if self.nvme_duplex else NVME_BOTH
        if kind == KV_WRITE:
            return NVME_WRITE if self.nvme_duplex else NVME_BOTH
        if kind == ATTENTION:
            return COMPUTE if self.shared_cpu else HOST_CPU
        return COMPUTE

    def copy_seconds(self, kind: str, nbytes: int, count: int = 1) -> float:
        """``count`` copies of ``nbytes`` in all (0 bytes: nothing moves, no time)."""
        if nbytes <= 0:
            return 0.0
        if kind in (WEIGHT_READ, KV_READ):
            return count * self.nvme_latency_s + nbytes / self.nvme_read_bandwidth
        if kind == KV_WRITE:
            return count * self.nvme_latency_s + nbytes / self.nvme_write_bandwidth
        bandwidth = self.h2d_bandwidth if kind in (WEIGHT_IN, KV_IN, ATTN_IN, ACT_IN) else self.d2h_bandwidth
        return count * self.pcie_latency_s + nbytes / bandwidth

    def device_seconds(self, flops: float, nbytes: float, kernels: int) -> float:
        """Roofline time of device work."""
        return kernels * self.kernel_s + max(flops / self.device_flops, nbytes / self.device_bandwidth)

    def cpu_seconds(self, flops: float, nbytes: float) -> float:
        return max(flops / self.cpu_flops, nbytes / self.dram_bandwidth)


@dataclass(frozen=True)
class GenerationTask:
    """One timed piece of work: ``step`` 0 is the prefill, step s >= 1 the s-th decode token;
    ``layer`` -1 is outside the decoder layers (the head); ``micro_batch`` -1 is the whole block."""

    kind: str
    resource: str
    step: int
    layer: int
    micro_batch: int
    start_s: float
    end_s: float
    nbytes: int = 0
    flops: float = 0.0


@dataclass
class GenerationPlan:
    """A policy, the setting it was planned in, and what it predicts.

    ``tokens_per_s`` is FlexGen's throughput: batch x new tokens over the whole job (prefill
    included); ``ttft_s`` the prefill step's end (the first token); ``peak_bytes`` per tier over
    the job. ``reasons`` are explain()'s lines; ``baseline`` names a policy that is not the
    planner's own (``"all-on-device"``, ``"layer-streaming"``, ``"flexgen"``)."""

    shape: GenerationShape
    policy: GenerationPolicy
    rates: GenerationRates
    hardware: str
    capacities: dict[str, int]
    tasks: list[GenerationTask]
    step_end_s: list[float]  # each step's end: [prefill, decode 1, ...]
    peak_bytes: dict[str, int]
    method: str = ""
    solve_s: float = 0.0
    candidates: int = 0  # policies priced by the search
    baseline: str = ""
    reasons: list[str] = field(default_factory=list)

    @property
    def ttft_s(self) -> float:
        return self.step_end_s[0]

    @property
    def total_s(self) -> float:
        return self.step_end_s[-1]

    @property
    def decode_s_per_token(self) -> float:
        steps = len(self.step_end_s) - 1
        return (self.total_s - self.ttft_s) / steps if steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.shape.batch * self.shape.new_tokens / self.total_s

    def weight_bytes_on(self, tier: str) -> int:
        sizes = {self.shape.param_name(i, n): b for i in range(self.shape.layers) for n, b in self.shape.layer_params}
        sizes.update(self.shape.other_params)
        return sum(b for n, b in sizes.items() if self.policy.weight_tiers[n] == tier)

    def weight_share(self, tier: str) -> float:
        return self.weight_bytes_on(tier) / self.shape.weight_bytes

    def kv_share(self, tier: str) -> float:
        return self.policy.kv_positions(tier, self.shape.max_positions) / self.shape.max_positions

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "generation", "shape": self.shape.to_dict(), "policy": self.policy.to_dict(),
            "rates": asdict(self.rates), "hardware": self.hardware, "capacities": self.capacities,
            "tasks": [[t.kind, t.resource, t.step, t.layer, t.micro_batch, t.start_s, t.end_s, t.nbytes, t.flops]
                      for t in self.tasks],
            "step_end_s": self.step_end_s, "peak_bytes": self.peak_bytes, "method": self.method,
            "solve_s": self.solve_s, "candidates": self.candidates, "baseline": self.baseline,
            "reasons": self.reasons,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GenerationPlan:
        return cls(
            shape=GenerationShape.from_dict(d["shape"]), policy=GenerationPolicy.from_dict(d["policy"]),
            rates=GenerationRates(**d["rates"]), hardware=d["hardware"],
            capacities={k: int(v) for k, v in d["capacities"].items()},
            tasks=[GenerationTask(*t) for t in d["tasks"]], step_end_s=[float(x) for x in d["step_end_s"]],
            peak_bytes={k: int(v) for k, v in d["peak_bytes"].items()}, method=d["method"],
            solve_s=float(d["solve_s"]), candidates=int(d["candidates"]), baseline=d["baseline"],
            reasons=list(d["reasons"]),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> GenerationPlan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    def summary(self) -> str:
        s, p = self.shape, self.policy
        shares = lambda share: " / ".join(f"{t} {share(t):.0%}" for t in GENERATION_TIERS)  # noqa: E731
        lines = [
            f"generation plan for {s.model} on {self.hardware}: batch {s.batch} "
            f"({p.num_gpu_batches} x {p.gpu_batch} sequences), prompt {s.prompt_len}, {s.new_tokens} new tokens",
            f"  weights    {shares(self.weight_share)}",
            f"  KV cache   {shares(self.kv_share)}  (blocks of {p.kv_block_tokens} positions)",
            f"  attention  on the {p.attention}; the block's hidden states between layers on the {p.activations}",
            f"  predicted  {self.tokens_per_s:.4g} tokens/s, time to first token {self.ttft_s:.4g} s, "
            f"{self.decode_s_per_token:.4g} s per decode step, {self.total_s:.4g} s in all",
            "  peak       " + ", ".join(f"{t} {format_bytes(self.peak_bytes.get(t, 0))} of "
                                          f"{format_bytes(self.capacities[t])}" for t in self.capacities),
        ]
        if self.method:
            lines.append(f"  solver     {self.method}, {self.candidates} policies priced in {self.solve_s:.2f} s")
        return "\n".join(lines)

    def explain(self) -> str:
        return self.summary() + "".join(f"\n  - {r}" for r in self.reasons)


def load_generation_plan(path: str | Path) -> GenerationPlan:
    return GenerationPlan.from_json(Path(path).read_text())


__all__ = [
    "ACTIVATION_PLACES", "ATTENTION_PLACES", "GENERATION_TIERS", "GenerationPlan", "GenerationPolicy",
    "GenerationRates", "GenerationShape", "GenerationTask", "load_generation_plan",
]
