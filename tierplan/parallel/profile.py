"""What the parallel planner needs to know about a model, measured on its captured graph.

A ``ModelProfile`` holds, for one transformer layer split into cells (attention, MLP, the rest:
norms and residuals, as APEX splits a layer), the parameter count, the forward and backward ops
(FLOPs and bytes, to price by roofline on any device at any micro-batch and TP degree) and the
activations the forward saves for the backward; the same for what precedes the layers
(embeddings) and what follows them (final norm, head, loss).

``profile_graph`` takes a captured training graph (batch 1) of a few layers and the
``Architecture`` (real layer count and the sizes tensor parallelism splits), passed in by whoever
captured the model: the layers are identical, so a copy of the model with 2 layers is captured in
seconds where all 80 of a Llama-2-70B shape take ~30 s; layer 0 is measured and scaled by the real
layer count. Everything is measured at micro-batch 1; FLOPs, bytes and activations are scaled
linearly with the micro-batch size (this over-counts the weight reads of memory-bound ops at
larger batches, a small error for training shapes). Capturing is the front end's job
(``tierplan.profiling``); this module only reads graphs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tierplan.cost_models.compute import op_dtype, peak_key
from tierplan.cost_models.compute import is_tensor_core_op
from tierplan.cost_models.hardware import Device
from tierplan.cost_models.training_memory import ActivationSplit, activation_split
from tierplan.ir import Graph, OpInfo, Phase, TensorKind

__all__ = ["CELLS", "Architecture", "ModelProfile", "OpTable", "PartProfile", "profile_graph"]

CELLS = ("attention", "mlp", "other")

# Kernel efficiency beyond the device preset's (which is measured on one 8192^3 matmul and one
# large copy: the best case). Assumptions, stated in docs/cost-model.md:
# - a tensor-core kernel (GEMM) loses GEMM_TAIL_S to ramp-up and wave quantization, i.e. it runs
#   at F / (F + F0) of the large-matmul rate with F0 = GEMM_TAIL_S x that rate (10 us puts a
#   4096^3 bf16 GEMM at ~94% and a 2048^3 one at ~68% of the 8192^3 rate, the usual cuBLAS
#   curve on A100/H100); thin TP shards (N = 128 at TP 8) lose about half.
# - fused attention (SDPA flash / memory-efficient kernels) reaches a fraction of the GEMM rate:
#   FlashAttention-2 runs at ~35% of H100 peak (Shah et al. 2024, FlashAttention-3) and 50-73% of
#   A100 peak forward, less backward (Dao 2023), against ~81% / ~90% for large GEMMs; we take
#   0.6 of the GEMM rate forward and 0.5 backward.
GEMM_TAIL_S = 10e-6
ATTENTION_EFFICIENCY = {"forward": 0.6, "backward": 0.5}
_ATTN = re.compile(r"attn|attention", re.I)
_MLP = re.compile(r"mlp|feed_forward|ffn|intermediate|\.output\b|experts", re.I)


def cell_of(module: str) -> str:
    """The cell an op belongs to, from the module that issued it."""
    if _ATTN.search(module):
        return "attention"
    if _MLP.search(module):
        return "mlp"
    return "other"


@dataclass(frozen=True, eq=False)
class OpTable:
    """Ops to price together: FLOPs, bytes moved and the tensor-core flag and dtype of each."""

    flops: np.ndarray
    nbytes: np.ndarray
    keys: tuple[str, ...]  # peak key per op assuming no tf32
    derate: np.ndarray | None = None  # fraction of the GEMM rate (fused attention < 1)
    tensor_core: np.ndarray | None = None  # bool: pays GEMM_TAIL_S

    @staticmethod
    def of(graph: Graph, ops: list[OpInfo]) -> OpTable:
        live = [op for op in ops if op.flops or op.bytes_read or op.bytes_written]
        keys = tuple(
            peak_key(op_dtype(graph, op), tensor_core=is_tensor_core_op(op.target), allow_tf32=False)
            for op in live
        )

        def derate(op: OpInfo) -> float:
            if "scaled_dot_product" not in op.target and "flash_attention" not in op.target:
                return 1.0
            return ATTENTION_EFFICIENCY["backward" if "backward" in op.target else "forward"]

        return OpTable(
            flops=np.array([op.flops for op in live], dtype=float),
            nbytes=np.array([op.bytes_read + op.bytes_written for op in live], dtype=float),
            keys=keys,
            derate=np.array([derate(op) for op in live], dtype=float),
            tensor_core=np.array([is_tensor_core_op(op.target) and op.flops > 0 for op in live]),
        )

    @property
    def total_flops(self) -> float:
        return float(self.flops.sum())

    def seconds(self, device: Device, batch: float = 1.0, tp: int = 1) -> float:
        """Roofline time of all ops, each scaled by ``batch`` and split ``tp`` ways."""
        if not self.keys:
            return 0.0
        peaks = np.array([device.peak(k) for k in self.keys]) * device.compute_efficiency
        if self.derate is not None:
            peaks = peaks * self.derate
        scale = batch / tp
        compute = self.flops * scale / peaks
        if self.tensor_core is not None and device.kind != "cpu":
            compute = compute + np.where(self.tensor_core, GEMM_TAIL_S, 0.0)
        memory = self.nbytes * scale / (device.memory_bandwidth * device.memory_efficiency)
        return float(np.maximum(compute, memory).sum() + len(self.keys) * device.launch_overhead_s)


@dataclass(frozen=True, eq=False)
class PartProfile:
    params: int
    forward: OpTable
    backward: OpTable
    activations: ActivationSplit
    largest_temporary: int = 0  # bytes, the biggest transient this part allocates


@dataclass(frozen=True, eq=False)
class ModelProfile:
    name: str
    num_layers: int
    profiled_layers: int
    seq_len: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    param_bytes: int  # bytes per parameter element in the captured dtype
    cells: dict[str, PartProfile]  # one layer
    pre: PartProfile
    post: PartProfile
    core: OpTable  # the attention core's ops (what selective recompute reruns)
    experts: int = 0
    capture_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        return sum(c.params for c in self.cells.values())

    @property
    def total_params(self) -> int:
        return self.pre.params + self.post.params + self.num_layers * self.layer_params

    @property
    def layer_activations(self) -> ActivationSplit:
        out = ActivationSplit()
        for c in self.cells.values():
            out = out + c.activations
        return out

    def kv_bytes_per_token_per_layer(self) -> int:
        """K and V of one token in one layer, all KV heads, in the captured dtype."""
        return 2 * self.kv_heads * self.head_dim * self.param_bytes


# Attribute names per architecture fact, as transformers configs (and TinyTransformerConfig)
# spell them.
_CONFIG_NAMES: dict[str, tuple[str, ...]] = {
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "heads": ("num_attention_heads", "n_head"),
    "kv_heads": ("num_key_value_heads",),
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim", "d_ff"),
    "vocab": ("vocab_size",),
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "experts": ("num_local_experts", "num_experts"),
}


@dataclass(frozen=True)
class Architecture:
    """The facts about a transformer that a few captured layers do not show: the real layer count
    and the sizes tensor parallelism splits (heads, KV heads, the MLP width, the vocabulary)."""

    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    experts: int = 0

    @classmethod
    def from_config(cls, cfg: Any) -> Architecture:
        """Read from a model config object by attribute name (no import of its library): a
        transformers ``PretrainedConfig``, ``TinyTransformerConfig`` or anything naming the same
        fields. Missing KV heads mean plain multi-head attention; a missing MLP width, 4 x hidden."""

        def first(fact: str) -> Any:
            return next((v for n in _CONFIG_NAMES[fact] if (v := getattr(cfg, n, None)) is not None), None)

        missing = [f for f in ("hidden", "heads", "vocab", "num_layers") if first(f) is None]
        if missing:
            raise ValueError(f"{type(cfg).__name__} names no {', '.join(missing)}: not a transformer "
                             f"config the parallel planner can profile")  # fmt: skip
        hidden, heads = int(first("hidden")), int(first("heads"))
        return cls(
            num_layers=int(first("num_layers")),
            hidden=hidden,
            heads=heads,
            kv_heads=int(first("kv_heads") or heads),
            intermediate=int(first("intermediate") or 4 * hidden),
            vocab=int(first("vocab")),
            experts=int(first("experts") or 0),
        )


def profile_graph(
    graph: Graph, arch: Architecture, *, seq_len: int, capture_seconds: float = 0.0
) -> ModelProfile:
    """Profile a captured training graph (batch 1, sequence ``seq_len``) whose ``blocks`` are its
    layers, as the model ``arch`` describes (its layer count, not the graph's, is the real one)."""
    if not graph.blocks:
        raise ValueError(f"{graph.name}: no repeated blocks found; run passes.blocks.detect_blocks")
    hidden, heads, kv_heads = arch.hidden, arch.heads, arch.kv_heads
    intermediate, vocab, experts = arch.intermediate, arch.vocab, arch.experts
    block0 = graph.blocks[0].index
    first_pos = min(graph.op_position(n) for n in graph.blocks[0].ops)
    head_dim = hidden // heads
    # Sizes TP splits, fused projections included (GPT-2's c_attn is 3h wide, a fused
    # gate/up projection 2 x intermediate).
    tp_dims = {heads, kv_heads, intermediate, 2 * intermediate, vocab,
               (heads + 2 * kv_heads) * head_dim} | ({experts} if experts else set())

    part_ops: dict[str, list[OpInfo]] = {k: [] for k in (*CELLS, "pre", "post")}
    for i, op in enumerate(graph.ops):
        if op.block == block0:
            part_ops[cell_of(op.module)].append(op)
        elif op.block is None:
            if op.phase is Phase.FORWARD:
                part_ops["pre" if i < first_pos else "post"].append(op)
            elif "embed" in op.module or "embedding" in op.target or "wte" in op.module:
                part_ops["pre"].append(op)
            else:
                part_ops["post"].append(op)

    # Each parameter belongs to the part of its first forward reader (a tied embedding: "pre").
    owner: dict[str, str] = {}
    part_of = {op.name: k for k, ops in part_ops.items() for op in ops}
    for t in graph.tensors.values():
        if t.kind is not TensorKind.PARAMETER:
            continue
        readers = [u for u in t.users if graph.op(u).phase is Phase.FORWARD] or t.users
        if readers and readers[0] in part_of:
            owner[t.name] = part_of[readers[0]]
    params = {k: 0 for k in part_ops}
    for name, k in owner.items():
        n = 1
        for d in graph.tensor(name).shape:
            n *= d
        params[k] += n

    def part(k: str) -> PartProfile:
        ops = part_ops[k]
        fwd = [op for op in ops if op.phase is Phase.FORWARD]
        bwd = [op for op in ops if op.phase is not Phase.FORWARD]
        temps = [
            graph.tensor(o).nbytes for op in ops for o in op.outputs
            if graph.tensor(o).kind is TensorKind.TEMPORARY
        ]  # fmt: skip
        return PartProfile(
            params=params[k],
            forward=OpTable.of(graph, fwd),
            backward=OpTable.of(graph, bwd),
            activations=activation_split(
                graph, [op.name for op in fwd], seq_len=seq_len, hidden=hidden, tp_dims=tp_dims
            ),
            largest_temporary=max(temps, default=0),
        )

    # Ops producing an s x s tensor per head: the attention core selective recompute reruns.
    core_ops = [
        op for op in part_ops["attention"] if op.phase is Phase.FORWARD and any(
            len(graph.tensor(o).shape) >= 2 and graph.tensor(o).shape[-2:] == (seq_len, seq_len)
            and heads in graph.tensor(o).shape for o in op.outputs)
    ]  # fmt: skip
    pbytes = max(
        (graph.tensor(n).nbytes // max(1, int(np.prod(graph.tensor(n).shape))) for n in owner),
        default=2,
    )
    return ModelProfile(
        name=graph.name,
        num_layers=arch.num_layers,
        profiled_layers=len(graph.blocks),
        seq_len=seq_len,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vocab=vocab,
        param_bytes=int(pbytes),
        cells={k: part(k) for k in CELLS},
        pre=part("pre"),
        post=part("post"),
        core=OpTable.of(graph, core_ops),
        experts=experts,
        capture_seconds=capture_seconds,
        notes=[
            f"profiled {len(graph.blocks)} captured layer(s) at batch 1, seq {seq_len}; "
            f"scaled to {arch.num_layers} layers"
        ],
    )
