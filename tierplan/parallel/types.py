"""The data a parallel plan is made of: the configuration chosen and its memory and time."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from tierplan.cost_models.hardware import Cluster, Hardware, Link

__all__ = [
    "ASSUMED_INTER_NODE",
    "ASSUMED_SERVER_GPUS",
    "LAYOUT_FORMS",
    "WORKSPACE_BYTES",
    "Layout",
    "LayoutError",
    "degree_problem",
    "MemoryBreakdown",
    "ParallelPlan",
    "TimeBreakdown",
    "cluster_for",
    "parse_layout",
]

# APEX reserves 1 GiB per device for the framework's workspace (cuBLAS, NCCL buffers, allocator
# slack); so do we, for training and serving alike.
WORKSPACE_BYTES = 1 << 30

# A preset describing a single card (PCIe GPUs, RTX 4090) says nothing about servers. For a
# what-if beyond one card we assume the common 8-card server, cards talking over the preset's
# intra-node link, and servers joined by one 100 Gb/s NIC shared by the server's 8 cards.
ASSUMED_SERVER_GPUS = 8
ASSUMED_INTER_NODE = Link(
    name="inter_node", src="node", dst="node", bandwidth=12.5e9 / ASSUMED_SERVER_GPUS,
    latency_s=10e-6, description="one 100 Gb/s NIC per 8-card server",
)  # fmt: skip


def cluster_for(hw: Hardware, gpus: int) -> tuple[Cluster, list[str]]:
    """The cluster of ``gpus`` devices of ``hw``'s kind, and the assumptions made to build it."""
    c, notes = hw.cluster, []
    per_node = c.gpus_per_node
    inter = c.inter_node
    if per_node == 1 and gpus > 1:
        per_node = ASSUMED_SERVER_GPUS
        notes.append(f"{hw.name}: assumed {per_node} cards per server over {c.intra_node.description if c.intra_node else 'PCIe'}")
    intra = c.intra_node
    if intra is None and gpus > 1:  # e.g. the cpu preset: processes on one machine copy via DRAM
        intra = dataclasses.replace(hw.link("device", "host"), name="intra_node")
        notes.append(f"{hw.name}: assumed the device-host link between devices of a node")
    nodes = max(1, math.ceil(gpus / per_node))
    if nodes > 1 and inter is None:
        inter = ASSUMED_INTER_NODE
        notes.append(f"{hw.name}: assumed {ASSUMED_INTER_NODE.description} between servers")
    if nodes > 1 and gpus % per_node:
        raise ValueError(f"{gpus} GPUs do not fill whole nodes of {per_node}")
    return Cluster(gpus_per_node=min(per_node, gpus), nodes=nodes, intra_node=intra,
                   inter_node=inter), notes  # fmt: skip


@dataclass
class MemoryBreakdown:
    """Bytes per device (the binding pipeline stage's)."""

    parameters: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    kv_cache: float = 0.0
    buffers: float = 0.0

    @property
    def total(self) -> float:
        return (self.parameters + self.gradients + self.optimizer + self.activations
                + self.kv_cache + self.buffers)  # fmt: skip


@dataclass
class TimeBreakdown:
    """Seconds per training step (or per decode step when serving), on the critical path."""

    compute: float = 0.0
    recompute: float = 0.0
    collectives: dict[str, float] = field(default_factory=dict)  # exposed time per collective
    bubble: float = 0.0
    exposed_transfers: float = 0.0  # offload traffic over PCIe not hidden behind compute
    optimizer: float = 0.0

    @property
    def total(self) -> float:
        return (self.compute + self.recompute + sum(self.collectives.values()) + self.bubble
                + self.exposed_transfers + self.optimizer)  # fmt: skip


@dataclass
class ParallelPlan:
    """One point of the search, priced. ``config`` holds the knobs (see ``describe``)."""

    mode: str  # "train" or "serve"
    config: dict[str, Any]
    memory: MemoryBreakdown
    time: TimeBreakdown
    capacity: float  # device bytes available
    metrics: dict[str, float] = field(default_factory=dict)  # tokens/s, MFU, TTFT, TPOT, ...
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.capacity

    @property
    def step_time(self) -> float:
        return self.time.total

    def describe(self) -> str:
        c = self.config
        if self.mode == "serve":
            ep = f" ep{c['ep']}" if c.get("ep", 1) > 1 else ""
            return f"replicas{c['replicas']} tp{c['tp']} pp{c['pp']}{ep} batch{c['batch']}"
        sched = ""
        if c["pp"] > 1:
            sched = " 1F1B" if c["schedule"] == "1f1b" else f" interleaved(v={c['virtual']})"
        rc = ",".join(f"{k}x{n}" for k, n in c["recompute"].items() if n and k != "none") or "none"
        off = [k for k in ("optimizer", "params") if c.get(f"offload_{k}")]
        return (f"dp{c['dp']} tp{c['tp']}{'+sp' if c['tp'] > 1 else ''} pp{c['pp']}{sched} "
                f"zero{c['zero']} mb{c['micro_batch']}x{c['num_micro']} rc[{rc}]"
                + (f" offload[{'+'.join(off)}]" if off else ""))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["memory"]["total"] = self.memory.total
        d["time"]["total"] = self.time.total
        d["describe"] = self.describe()
        return d


def divisors(n: int) -> list[int]:
    """The degrees a dimension of n devices can be split into (APEX enumerates the same)."""
    return [k for k in range(1, n + 1) if n % k == 0]


# -- a layout the user fixes -----------------------------------------------------------------------

RECOMPUTE_OPTIONS = ("none", "selective", "attn", "mlp", "full")

# The grammar of ``parse_layout``, one line per form (docs/cli.md, "tierplan whatif").
LAYOUT_FORMS = {
    "train": (
        "dpN (data-parallel degree)",
        "tpN or tpN+sp (tensor-parallel degree; sequence parallelism is always on when N > 1)",
        "sp (sequence parallelism: asks for tp > 1)",
        "ppN (pipeline stages)",
        "1f1b | interleaved | interleaved(v=N) | vN (pipeline schedule; N virtual stages)",
        "zeroN (ZeRO stage 0-3)",
        "mbN or mbNxM (micro-batch size N; M micro-batches per step)",
        ("rc[OPT] or rc-OPT, OPT one of none|selective|attn|mlp|full (every layer); "
         "rc[OPTxK,...] (K layers of each stage, the rest none)"),
        ("offload[none|optimizer|optimizer+params] or offload-none|offload-optimizer|"
         "offload-optimizer+params"),
    ),
    "serve": (
        "replicasN or dpN (model replicas)",
        "tpN (tensor-parallel degree)",
        "ppN (pipeline stages)",
        "epN (expert-parallel degree, mixture-of-experts models)",
        "batchN (sequences decoded at once; default: as many as fit, at most 256)",
    ),
}


class LayoutError(ValueError):
    """A ``--layout`` that does not parse: names the bad token and lists the valid forms."""


@dataclass(frozen=True)
class Layout:
    """The fields of a parallel layout the user fixes; ``None`` leaves a field to the search.

    Training: ``dp``, ``tp`` (``sp`` asks for tp > 1), ``pp``, ``schedule`` ("1f1b" or
    "interleaved") and ``virtual``, ``zero``, ``micro_batch`` and ``num_micro``, ``recompute``
    (per option, the layers of a stage taking it, ``None`` for all of them; the layers not
    named keep everything), ``offload_optimizer`` / ``offload_params``. Serving: ``dp`` (the
    replicas), ``tp``, ``pp``, ``ep``, ``batch``.
    """

    text: str = ""
    mode: str = "train"
    dp: int | None = None
    tp: int | None = None
    pp: int | None = None
    sp: bool = False
    schedule: str | None = None
    virtual: int | None = None
    zero: int | None = None
    micro_batch: int | None = None
    num_micro: int | None = None
    recompute: tuple[tuple[str, int | None], ...] | None = None
    offload_optimizer: bool | None = None
    offload_params: bool | None = None
    ep: int | None = None
    batch: int | None = None

    @property
    def empty(self) -> bool:
        return self == Layout(mode=self.mode, text=self.text)

    def recompute_mix(self, layers: int) -> dict[str, int]:
        """The recompute option of each of a stage's ``layers`` layers, as counts per option;
        raises ``ValueError`` when the counts given exceed ``layers``."""
        assert self.recompute is not None
        if len(self.recompute) == 1 and self.recompute[0][1] is None:
            return {self.recompute[0][0]: layers}
        mix = {name: n for name, n in self.recompute if n}
        named = sum(mix.values())
        if named > layers:
            raise ValueError(f"{self.recompute_text()} names {named} layers; a stage has {layers}")
        if named < layers:
            mix["none"] = mix.get("none", 0) + layers - named
        return mix

    def recompute_text(self) -> str:
        if self.recompute is None:
            return ""
        return "rc[" + ",".join(k if n is None else f"{k}x{n}" for k, n in self.recompute) + "]"


def _layout_error(text: str, token: str, why: str, mode: str) -> LayoutError:
    forms = "; ".join(LAYOUT_FORMS[mode])
    return LayoutError(f"--layout {text!r}: {why} {token!r}; valid {'serving' if mode == 'serve' else 'training'} "
                       f"forms: {forms}")


_INT = r"([1-9][0-9]*)"
_TRAIN_ONLY = re.compile(r"^(sp|1f1b|interleaved.*|v\d+|zero.*|mb.*|rc.*|offload.*)$")
_SERVE_ONLY = re.compile(r"^(replicas.*|ep.*|batch.*)$")


def parse_layout(text: str, *, serve: bool = False) -> Layout:
    """Parse a ``--layout`` string, e.g. ``"dp1 tp8 pp8 mb1 sp"`` or what ``ParallelPlan.describe``
    prints (``"dp4 tp2+sp pp16 1F1B zero2 mb1x512 rc[fullx5]"``). Tokens are separated by
    spaces, case does not matter, every field at most once. Raises ``LayoutError``."""
    mode = "serve" if serve else "train"
    fields: dict[str, Any] = {}

    def put(token: str, **values: Any) -> None:
        for k, v in values.items():
            if k in fields and fields[k] != v:
                raise _layout_error(text, token, f"{k.replace('_', ' ')} given twice, again by", mode)
            fields[k] = v

    tokens = text.split()
    if not tokens:
        raise LayoutError(f"--layout {text!r} is empty; valid forms: {'; '.join(LAYOUT_FORMS[mode])}")
    for raw in tokens:
        tok = raw.lower()
        if serve and _TRAIN_ONLY.match(tok):
            raise _layout_error(text, raw, "a training field in a serving layout:", mode)
        if not serve and _SERVE_ONLY.match(tok):
            raise _layout_error(text, raw, "a serving field in a training layout:", mode)
        if m := re.fullmatch(rf"(dp|replicas){_INT}", tok):
            put(raw, dp=int(m[2]))
        elif m := re.fullmatch(rf"tp{_INT}(\+sp)?", tok):
            if m[2] and serve:
                raise _layout_error(text, raw, "sequence parallelism is a training field:", mode)
            if m[2] and int(m[1]) == 1:
                raise _layout_error(text, raw, "sequence parallelism needs tp > 1:", mode)
            put(raw, tp=int(m[1]))
            if m[2]:
                put(raw, sp=True)
        elif tok == "sp":
            put(raw, sp=True)
        elif m := re.fullmatch(rf"pp{_INT}", tok):
            put(raw, pp=int(m[1]))
        elif tok == "1f1b":
            put(raw, schedule="1f1b", virtual=1)
        elif tok == "interleaved":
            put(raw, schedule="interleaved")
        elif m := re.fullmatch(rf"(?:interleaved\(v=|v){_INT}\)?", tok):
            if tok.startswith("interleaved") != tok.endswith(")"):
                raise _layout_error(text, raw, "unbalanced parenthesis in", mode)
            v = int(m[1])
            if v == 1 and tok.startswith("interleaved"):
                raise _layout_error(text, raw, "the interleaved schedule needs v >= 2:", mode)
            put(raw, schedule="1f1b" if v == 1 else "interleaved", virtual=v)
        elif m := re.fullmatch(r"zero(\d+)", tok):
            if int(m[1]) > 3:
                raise _layout_error(text, raw, "ZeRO stages are 0-3, not", mode)
            put(raw, zero=int(m[1]))
        elif m := re.fullmatch(rf"mb{_INT}(?:x{_INT})?", tok):
            put(raw, micro_batch=int(m[1]))
            if m[2]:
                put(raw, num_micro=int(m[2]))
        elif m := re.fullmatch(r"rc\[([^\]]*)\]|rc-([a-z]+)", tok):
            put(raw, recompute=_parse_recompute(text, raw, m[1] if m[1] is not None else m[2], mode))
        elif m := re.fullmatch(r"offload\[([a-z+]*)\]|offload-([a-z+]+)", tok):
            what = m[1] if m[1] is not None else m[2]
            parts = set(what.split("+"))
            if what == "none":
                put(raw, offload_optimizer=False, offload_params=False)
            elif parts == {"optimizer"}:
                put(raw, offload_optimizer=True, offload_params=False)
            elif parts == {"optimizer", "params"}:
                put(raw, offload_optimizer=True, offload_params=True)
            elif parts == {"params"}:
                raise _layout_error(text, raw, "parameters are offloaded only with the optimizer "
                                    "(offload[optimizer+params]):", mode)  # fmt: skip
            else:
                raise _layout_error(text, raw, "unknown offload in", mode)
        elif m := re.fullmatch(rf"ep{_INT}", tok):
            put(raw, ep=int(m[1]))
        elif m := re.fullmatch(rf"batch{_INT}", tok):
            put(raw, batch=int(m[1]))
        else:
            raise _layout_error(text, raw, "bad token", mode)
    if fields.get("offload_params") and fields.get("zero", 3) != 3:
        raise _layout_error(text, f"zero{fields['zero']}", "offloaded parameters need zero3, not", mode)
    return Layout(text=" ".join(tokens), mode=mode, **fields)


def _parse_recompute(text: str, raw: str, body: str, mode: str) -> tuple[tuple[str, int | None], ...]:
    items: list[tuple[str, int | None]] = []
    for part in body.split(","):
        m = re.fullmatch(rf"([a-z]+)(?:x{_INT})?", part)
        if m is None or m[1] not in RECOMPUTE_OPTIONS:
            raise _layout_error(text, raw, f"unknown recompute option {part!r} (options: "
                                f"{', '.join(RECOMPUTE_OPTIONS)}) in", mode)  # fmt: skip
        if any(m[1] == k for k, _ in items):
            raise _layout_error(text, raw, f"recompute option {m[1]!r} named twice in", mode)
        items.append((m[1], int(m[2]) if m[2] else None))
    if len(items) > 1 and any(n is None for _, n in items):
        raise _layout_error(text, raw, "with several recompute options each needs a layer count "
                            "(rc[fullx4,selectivex8]):", mode)  # fmt: skip
    return tuple(items)


def degree_problem(fixed: dict[str, int], gpus: int) -> str | None:
    """Why the degrees a layout fixes (name -> degree) cannot cover ``gpus``, or None: all three
    given must multiply to the GPU count, fewer must divide it."""
    product = math.prod(fixed.values())
    named = " x ".join(f"{k}{v}" for k, v in fixed.items())
    if len(fixed) == 3 and product != gpus:
        return f"{named} = {product} GPUs, not the {gpus} given"
    if gpus % product:
        return f"{named} does not divide {gpus} GPUs"
    return None

