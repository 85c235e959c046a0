"""Per-device memory of data/tensor/pipeline-parallel training.

Model state (Rajbhandari et al., ZeRO, 2019): with mixed-precision Adam every parameter costs
2 bytes of fp16/bf16 weights, 2 of gradients and K = 12 of optimizer state (fp32 master weights,
Adam m and v). Over N_d data-parallel ranks:

    stage 0 (DP)   (2 + 2 + K) Psi
    stage 1        2 Psi + 2 Psi + K Psi / N_d          (optimizer state partitioned)
    stage 2        2 Psi + (2 + K) Psi / N_d            (+ gradients)
    stage 3        (2 + 2 + K) Psi / N_d                (+ parameters)

Activations of one transformer layer (Korthikanti et al., 2022), s sequence, b micro-batch,
h hidden, a heads, t tensor-parallel degree, 16-bit activations and 1-byte dropout masks:

    no parallelism            s b h (34 + 5 a s / h)
    tensor parallel           s b h (10 + 24 / t + 5 a s / (h t))
    TP + sequence parallel    s b h (34 / t + 5 a s / (h t))
    selective recompute       drops the 5 a s / h term (the attention core is recomputed)
    full recompute            2 s b h  (only the layer input; / t with sequence parallelism)

tierplan measures the same quantity on the captured graph instead of assuming a layer shape
(``activation_split``): the storages a layer's forward saves for its backward, split by how tensor
and sequence parallelism shard them. ``korthikanti_bytes`` is the reference the tests hold it to.
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Iterable

from tierplan.ir import Graph, TensorInfo, TensorKind

__all__ = [
    "ActivationSplit",
    "ModelState",
    "activation_split",
    "korthikanti_bytes",
    "model_state_bytes",
    "zero_table",
]

ADAM_K = 12  # fp32 master weights + Adam m + v, bytes per parameter (ZeRO's K)


@dataclass(frozen=True)
class ModelState:
    """Bytes per device of parameters, gradients and optimizer state."""

    parameters: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer


def model_state_bytes(
    num_params: float,
    dp: int,
    zero_stage: int,
    *,
    param_bytes: int = 2,
    grad_bytes: int = 2,
    optimizer_bytes: int = ADAM_K,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> ModelState:
    """Device bytes of the model state of ``num_params`` parameters (already divided by TP and
    PP) on one of ``dp`` data-parallel ranks under ZeRO ``zero_stage``.

    Offloading moves the optimizer state (ZeRO-Offload) or the parameters (ZeRO-Infinity, stage 3
    only: a stage 3 rank gathers a layer's parameters when it needs them, so where the shard rests
    is free) to host memory; what is offloaded costs no device memory. As in ZeRO-Offload (built
    on stage 2), offloading the optimizer at stage >= 2 streams the gradient shards to the host as
    they are reduced, so they cost no device memory either.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {zero_stage}")
    if dp < 1:
        raise ValueError(f"data-parallel degree must be >= 1, got {dp}")
    if offload_params and zero_stage != 3:
        raise ValueError("parameter offload needs ZeRO stage 3 (parameters gathered on use)")
    p = num_params * param_bytes / (dp if zero_stage >= 3 else 1)
    g = num_params * grad_bytes / (dp if zero_stage >= 2 else 1)
    o = num_params * optimizer_bytes / (dp if zero_stage >= 1 else 1)
    return ModelState(
        parameters=0.0 if offload_params else p,
        gradients=0.0 if offload_optimizer and zero_stage >= 2 else g,
        optimizer=0.0 if offload_optimizer else o,
    )


def zero_table(num_params: float, dp: int) -> dict[int, float]:
    """Per-device model state in GB (1e9) by ZeRO stage, rounded half up to 0.1 as the paper's
    Table 1 prints it (7.5B on 64 GPUs: 120, 31.4, 16.6, 1.9)."""
    out = {}
    for stage in (0, 1, 2, 3):
        gb = Decimal(repr(model_state_bytes(num_params, dp, stage).total / 1e9))
        out[stage] = float(gb.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))
    return out


def korthikanti_bytes(
    s: int, b: int, h: int, a: int, *, t: int = 1, sequence_parallel: bool = False,
    recompute: str = "none",
) -> float:  # fmt: skip
    """Activation bytes of one standard transformer layer (Korthikanti et al. 2022, Table 2)."""
    sbh = s * b * h
    attn = 5 * a * s / (h * t)
    if recompute == "full":
        return 2 * sbh / (t if sequence_parallel else 1)
    if recompute == "selective":
        attn = 0.0
    elif recompute != "none":
        raise ValueError(f"recompute must be none, selective or full, got {recompute!r}")
    if sequence_parallel:
        return sbh * (34 / t + attn)
    return sbh * (10 + 24 / t + attn)


@dataclass(frozen=True)
class ActivationSplit:
    """Saved-activation bytes by how they shard: ``tp`` tensors split by tensor parallelism
    (heads, the MLP's intermediate width, the vocabulary), ``seq`` tensors of the hidden width
    split only by sequence parallelism, ``replicated`` ones (e.g. a causal mask) split by
    neither. ``attention_core`` is the part a selective recompute (Korthikanti) drops."""

    tp: float = 0.0
    seq: float = 0.0
    replicated: float = 0.0
    attention_core: float = 0.0  # a subset of tp: tensors of s x s per head (scores, softmax)

    def bytes(self, t: int = 1, sequence_parallel: bool = True, scale: float = 1.0) -> float:
        """Bytes per device at TP degree ``t``, times ``scale`` (the micro-batch size when the
        split was measured at batch 1)."""
        seq = self.seq / t if sequence_parallel else self.seq
        return scale * (self.tp / t + seq + self.replicated)

    def __add__(self, other: ActivationSplit) -> ActivationSplit:
        return ActivationSplit(
            self.tp + other.tp, self.seq + other.seq, self.replicated + other.replicated,
            self.attention_core + other.attention_core,
        )  # fmt: skip

    def scaled(self, f: float) -> ActivationSplit:
        return ActivationSplit(self.tp * f, self.seq * f, self.replicated * f, self.attention_core * f)


def _classify(t: TensorInfo, seq_len: int, hidden: int, tp_dims: frozenset[int]) -> str:
    """'tp', 'seq' or 'replicated' for one saved tensor, by its shape.

    A dimension equal to the head count, the MLP width or the vocabulary is what Megatron's TP
    splits; a tensor covering the sequence whose last dimension is the hidden width (or 1: a
    norm's statistics) is what sequence parallelism splits. Shapes are ambiguous when, say, the
    head count equals the sequence length; capture at a sequence length unlike every model width.
    """
    shape = t.shape
    if any(d in tp_dims for d in shape):
        return "tp"
    if seq_len in shape and shape and shape[-1] in (hidden, 1):
        return "seq"
    flat = 1
    for d in shape:
        flat *= d
    if shape and shape[-1] == hidden and flat % seq_len == 0:
        return "seq"  # (b*s, h) flattened for a matmul
    return "replicated"


def activation_split(
    graph: Graph,
    ops: Iterable[str],
    *,
    seq_len: int,
    hidden: int,
    tp_dims: Iterable[int],
) -> ActivationSplit:
    """Saved activations produced by ``ops`` (forward op names of one layer or one cell).

    Counted per storage: a storage is saved when its kind is ACTIVATION (the forward made it and
    the backward reads it). ``tp_dims``: the sizes TP splits (heads, kv heads, MLP width, vocab).
    """
    dims = frozenset(int(d) for d in tp_dims)
    names = set(ops)
    tp = seq = rep = core = 0.0
    for t in graph.tensors.values():
        if t.is_view or t.kind is not TensorKind.ACTIVATION or t.producer not in names:
            continue
        kind = _classify(t, seq_len, hidden, dims)
        if kind == "tp":
            tp += t.nbytes
            if len(t.shape) >= 2 and t.shape[-1] == seq_len and t.shape[-2] == seq_len:
                core += t.nbytes  # s x s: attention scores, probabilities, dropout mask
        elif kind == "seq":
            seq += t.nbytes
        else:
            rep += t.nbytes
    return ActivationSplit(tp=tp, seq=seq, replicated=rep, attention_core=core)
