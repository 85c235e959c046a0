"""Hardware descriptions: a device, its memory tiers, the links between them, the host, the cluster.

A Hardware is plain data loaded from TOML (a preset shipped in ``presets/``, or a user's file) so
that every number sits next to its source in a comment, and a what-if study is a short file:
``extends = "h100-sxm"`` followed by the fields that differ. Quantities may be written as numbers in
base units (bytes, bytes/s, FLOP/s, seconds) or as strings with a unit ("3.35 TB/s", "80 GiB",
"400 Gb/s", "989 TFLOPS", "5 us"), which keeps the files checkable against spec sheets by eye.

Tier names are a public contract: ``"device"`` (the accelerator's memory), ``"host"`` (pinned host
DRAM) and ``"nvme"``; a file may add others (e.g. ``"cxl"``, which the ``cxl-type3`` part declares,
linked to ``"host"``). Nothing here assumes which slower tiers exist: a tier is any ``[tiers.NAME]``
and routes follow the declared links. The device and host tiers default to the ``[device]`` and
``[host]`` figures, so overriding the device's memory also moves its tier.

Loading resolves a file in this order: its ``extends`` base, then each ``include`` in order (parts
such as ``nvme-gen5``), then the file's own keys; tables merge key by key, ``sources`` concatenate.
Each file is type-checked on its own before merging, so an error names the file that holds the bad
value; fields missing after the merge are reported against the file that was asked for.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import tomllib

from tierplan.units import format_bytes

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "Cluster",
    "ComputePrecision",
    "Device",
    "Hardware",
    "HardwareError",
    "Host",
    "Link",
    "RuntimeCosts",
    "Tier",
    "TIER_NAMES",
    "PEAK_FLOPS_KEYS",
    "compute_precision",
    "describe_hardware",
    "format_bandwidth",
    "format_flops",
    "format_seconds",
    "list_parts",
    "list_presets",
    "load_hardware",
    "render_hardware_toml",
    "write_hardware_toml",
]

# The tier names other modules may rely on; files may add more.
TIER_NAMES = ("device", "host", "nvme")

# Keys of Device.peak_flops. "tf32" is the tensor-core rate for float32 matmuls; "float32" is the
# plain (CUDA-core / vector) rate, which is what fp32 ops get unless the file allows tf32.
PEAK_FLOPS_KEYS = ("float64", "float32", "tf32", "bfloat16", "float16", "float8", "int8")

DEVICE_KINDS = ("cuda", "rocm", "cpu", "other")


class HardwareError(ValueError):
    """A hardware description is unknown or malformed; the message names the file and key."""


# -- data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tier:
    """A memory tier: where a tensor can live. Bandwidths in bytes/s, capacity in bytes."""

    name: str
    capacity_bytes: int
    read_bandwidth: float
    write_bandwidth: float
    latency_s: float = 0.0  # access latency of the first byte (matters for NVMe, not for DRAM)
    description: str = ""


@dataclass(frozen=True)
class Link:
    """A channel between two tiers (or devices, or nodes), oriented ``src -> dst``.

    ``bandwidth`` is per direction. A duplex link carries both directions at once at full rate
    unless ``concurrent_bandwidth`` says otherwise (PCIe 4 x16 moves ~25 GB/s one way but only
    ~11 GB/s each way when both run); a non-duplex link shares one channel between directions.
    """

    name: str
    src: str
    dst: str
    bandwidth: float
    latency_s: float = 0.0
    duplex: bool = True
    concurrent_bandwidth: float | None = None  # per direction when both directions run
    description: str = ""

    def reversed(self) -> Link:
        return dataclasses.replace(self, src=self.dst, dst=self.src)

    def bandwidth_both_ways(self) -> float:
        """Per-direction bandwidth while the opposite direction is busy too."""
        if self.concurrent_bandwidth is not None:
            return self.concurrent_bandwidth
        return self.bandwidth if self.duplex else self.bandwidth / 2


@dataclass(frozen=True)
class Device:
    """The accelerator (or the CPU, for the ``cpu`` preset) that runs the ops."""

    name: str
    kind: str  # one of DEVICE_KINDS
    memory_bytes: int
    memory_bandwidth: float  # bytes/s, reads + writes together
    peak_flops: Mapping[str, float]  # FLOP/s by PEAK_FLOPS_KEYS key, dense (no sparsity)
    compute_efficiency: float = 1.0  # fraction of peak FLOP/s a large kernel reaches
    memory_efficiency: float = 1.0  # fraction of peak bandwidth a streaming kernel reaches
    # Convolutions (forward and backward) run at this fraction of the matmul rate above (small
    # convolutions on a CPU reach about half of a 1024^3 matmul's); 1 where nothing was measured.
    conv_efficiency: float = 1.0
    # A whole multi-GPU training step sustains this fraction of the rates above (clocks under
    # sustained power, kernels the captured graph lacks, host gaps); the parallel training model
    # applies it to compute. 1 where nothing was fitted (docs/cost-model.md, "Calibration
    # against published runs").
    training_efficiency: float = 1.0
    launch_overhead_s: float = 0.0  # fixed cost per kernel (launch + dispatch)
    allow_tf32: bool = False  # fp32 matmuls run on tensor cores at the "tf32" rate

    def peak(self, key: str) -> float:
        try:
            return self.peak_flops[key]
        except KeyError:
            raise HardwareError(
                f"device {self.name!r} has no peak_flops entry for {key!r} "
                f"(it has {', '.join(self.peak_flops) or 'none'}); add one under "
                f"[device.peak_flops] in the hardware file"
            ) from None


@dataclass(frozen=True)
class Host:
    """The host CPU and its DRAM: the pinned-memory tier and the CPU optimizer step run here."""

    name: str
    dram_bytes: int
    dram_bandwidth: float  # bytes/s
    cpu_flops: float  # fp32 FLOP/s of all cores (an offloaded Adam step is priced with it)
    cores: int = 0


@dataclass(frozen=True)
class Cluster:
    """How many devices, and what connects them. Link bandwidths are per device, per direction."""

    gpus_per_node: int = 1
    nodes: int = 1
    intra_node: Link | None = None  # e.g. NVLink through NVSwitch
    inter_node: Link | None = None  # e.g. one InfiniBand NDR port per GPU

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class RuntimeCosts:
    """What running a plan costs beyond its kernels and the bytes it moves: the work of the
    generated program and its runtime (``tierplan.codegen``) on the host CPU. Seconds.

    Priced as op-time additions and channel latencies (``placement/pricing.py``); measured by
    ``tierplan calibrate``, and in the presets either measured or marked assumed.
    """

    op_issue_s: float = 0.0  # per op of a generated program, beyond its roofline (views too)
    step_s: float = 0.0  # per step: entering and leaving the program (context, autograd, outputs)
    input_s: float = 0.0  # per graph input of a step (its lookup, its gradient handed back)
    inline_copy_s: float = 0.0  # per copy made on the compute thread (CPU device <-> host memory)
    thread_copy_s: float = 0.0  # per copy handed to a worker thread: hand-off, wake-up, wait
    stream_copy_s: float = 0.0  # per copy on a CUDA copy stream: issue, event record and wait
    file_copy_s: float = 0.0  # per swap-file write or read on a worker thread: hand-off, open, close
    param_update_s: float = 0.0  # per parameter the placed optimizer updates: its step call and bookkeeping
    state_file_s: float = 0.0  # per optimizer-state swap file read or written (open, rename, bookkeeping)


@dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    device: Device
    tiers: Mapping[str, Tier]  # by tier name; always has "device" and "host"
    links: Mapping[str, Link]  # by link name, as declared
    host: Host
    cluster: Cluster = Cluster()
    sources: tuple[str, ...] = ()
    runtime: RuntimeCosts = RuntimeCosts()
    # Provenance comments by dotted field path ("device.peak_flops.float32"), written next to the
    # value by render_hardware_toml. Comments are not data: they take no part in equality.
    notes: Mapping[str, str] = field(default_factory=dict, compare=False)

    def tier(self, name: str) -> Tier:
        try:
            return self.tiers[name]
        except KeyError:
            raise HardwareError(
                f"hardware {self.name!r} has no tier {name!r}; its tiers are "
                f"{', '.join(self.tiers)}"
            ) from None

    def link(self, src: str, dst: str) -> Link:
        """The direct link carrying data ``src -> dst``, oriented that way.

        A declared link serves both directions; a link declared for the exact direction wins,
        which is how a file describes an asymmetric channel.
        """
        self.tier(src)
        self.tier(dst)
        reverse = None
        for link in self.links.values():
            if (link.src, link.dst) == (src, dst):
                return link
            if reverse is None and (link.src, link.dst) == (dst, src):
                reverse = link
        if reverse is not None:
            return reverse.reversed()
        pairs = ", ".join(f"{l.src}<->{l.dst}" for l in self.links.values()) or "none"
        raise HardwareError(
            f"hardware {self.name!r} has no direct link between {src!r} and {dst!r} "
            f"(links: {pairs}); use Hardware.route() for a path through other tiers"
        )

    def route(self, src: str, dst: str) -> list[Link]:
        """The fewest-hop path of links from tier ``src`` to tier ``dst`` (empty when equal).

        Ties go to the links declared first, so routes are deterministic.
        """
        self.tier(src)
        self.tier(dst)
        if src == dst:
            return []
        previous: dict[str, Link] = {}
        frontier, seen = [src], {src}
        while frontier and dst not in seen:
            nxt: list[str] = []
            for here in frontier:
                for link in self.links.values():
                    ends = (link.src, link.dst)
                    if here in ends:
                        other = ends[1] if ends[0] == here else ends[0]
                        if other not in seen:
                            seen.add(other)
                            previous[other] = self.link(here, other)  # the exact direction wins
                            nxt.append(other)
            frontier = nxt
        if dst not in seen:
            raise HardwareError(
                f"hardware {self.name!r} has no path of links from tier {src!r} to {dst!r}"
            )
        path: list[Link] = []
        node = dst
        while node != src:
            path.append(previous[node])
            node = previous[node].src
        return path[::-1]

    def with_tier_capacity(self, tier: str, nbytes: int) -> Hardware:
        """A copy whose tier ``tier`` holds at most ``nbytes`` (a budget, not new hardware)."""
        old = self.tier(tier)
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise HardwareError(f"capacity of tier {tier!r} must be a positive int, got {nbytes!r}")
        physical = {"device": self.device.memory_bytes, "host": self.host.dram_bytes}.get(tier)
        if physical is not None and nbytes > physical:
            raise HardwareError(
                f"a {format_bytes(nbytes)} budget for tier {tier!r} exceeds the "
                f"{format_bytes(physical)} that {self.name!r} has; describe bigger hardware in a "
                f"TOML file instead"
            )
        tiers = dict(self.tiers)
        tiers[tier] = dataclasses.replace(old, capacity_bytes=nbytes)
        return dataclasses.replace(self, tiers=tiers)

    def with_device_capacity(self, nbytes: int) -> Hardware:
        """A copy with a device-memory budget of ``nbytes`` (e.g. leave room for the context)."""
        return self.with_tier_capacity("device", nbytes)


@dataclass(frozen=True)
class ComputePrecision:
    """The dtype a model's matmuls are priced in on a machine (``compute_precision``)."""

    dtype: str  # the peak_flops key: "bfloat16", "float16" or "float32"
    device: Device  # the device to price with: its bfloat16 peak is the float16 one if substituted
    note: str = ""  # what was assumed, for the plan's text; "" when nothing was


def compute_precision(hw: Hardware, param_bytes: int) -> ComputePrecision:
    """The precision a model with ``param_bytes``-byte parameters computes in on ``hw``.

    2-byte models are bf16 mixed precision where the device has a ``bfloat16`` peak; where it has
    none (Turing ``t4``, Volta ``v100``) they run in fp16 with loss scaling, as Megatron-LM and
    DeepSpeed train on V100: the same 2-byte weights, priced at the ``float16`` peak (the returned
    device's ``bfloat16`` peak is its ``float16`` one, so per-op bf16 tables price as fp16). A
    device with neither is a HardwareError. Other widths compute in float32.
    """
    dev = hw.device
    if param_bytes != 2:
        return ComputePrecision("float32", dev)
    if "bfloat16" in dev.peak_flops:
        return ComputePrecision("bfloat16", dev)
    if "float16" in dev.peak_flops:
        fp16 = dev.peak_flops["float16"]
        return ComputePrecision(
            "float16",
            dataclasses.replace(dev, peak_flops={**dev.peak_flops, "bfloat16": fp16}),
            f"bf16 unsupported on {hw.name} ({dev.name} has no bfloat16 peak): priced as fp16 at "
            f"{format_flops(fp16)} (mixed precision with loss scaling)",
        )
    raise HardwareError(
        f"hardware {hw.name!r} cannot price a bf16/fp16 model: device {dev.name!r} has neither a "
        f"'bfloat16' nor a 'float16' peak (it has {', '.join(dev.peak_flops)}); add one under "
        f"[device.peak_flops] in the hardware file, or profile the model in float32"
    )


# -- units ---------------------------------------------------------------------------------------

_BYTE_UNITS = {
    "B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "PiB": 2**50,
}  # fmt: skip
_BIT_UNITS = {  # network figures are quoted in bits: "400 Gb/s" is 50 GB/s
    "b": 1, "kb": 10**3, "Kb": 10**3, "Mb": 10**6, "Gb": 10**9, "Tb": 10**12,
    "bit": 1, "kbit": 10**3, "Mbit": 10**6, "Gbit": 10**9, "Tbit": 10**12,
}  # fmt: skip
_BANDWIDTH_UNITS = {f"{u}/s": float(f) for u, f in _BYTE_UNITS.items()} | {
    f"{u}/s": f / 8 for u, f in _BIT_UNITS.items()
}
_FLOPS_UNITS = {
    f"{p}{s}": float(f)
    for p, f in {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}.items()
    for s in ("FLOPS", "FLOP/s")
}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}

_QUANTITY = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*(\S.*?)?\s*$")


def _scaled(value: float, divisors: list[tuple[float, str]], digits: int = 3) -> str:
    for divisor, unit in divisors:
        if abs(value) >= divisor:
            return f"{value / divisor:.{digits}g} {unit}"
    divisor, unit = divisors[-1]
    return f"{value / divisor:.{digits}g} {unit}"


def format_bandwidth(bps: float) -> str:
    """Decimal units, as bandwidth is quoted: 3.35e12 -> '3.35 TB/s'."""
    return _scaled(bps, [(1e12, "TB/s"), (1e9, "GB/s"), (1e6, "MB/s"), (1e3, "kB/s"), (1, "B/s")])


def format_flops(flops: float) -> str:
    return _scaled(flops, [(1e15, "PFLOPS"), (1e12, "TFLOPS"), (1e9, "GFLOPS"), (1e6, "MFLOPS"),
                           (1, "FLOPS")])  # fmt: skip


def format_seconds(s: float) -> str:
    if s == 0:
        return "0 s"
    return _scaled(s, [(1.0, "s"), (1e-3, "ms"), (1e-6, "us"), (1e-9, "ns")])


# -- schema --------------------------------------------------------------------------------------
# Every key a file may hold, with its converter. A converter gets the raw TOML value and returns
# the normalized one or raises _Bad(what was expected); _normalize turns that into a HardwareError
# naming the file, the table and the key.


class _Bad(Exception):
    pass


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad
    return value


def _quantity(units: Mapping[str, float], what: str) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if isinstance(value, str):
            m = _QUANTITY.match(value)
            if not m or (m.group(2) is not None and m.group(2) not in units):
                raise _Bad(f"{what}, got {value!r} (known units: {', '.join(units)})")
            number = float(m.group(1)) * (units[m.group(2)] if m.group(2) else 1.0)
        else:
            try:
                number = float(_number(value))
            except _Bad:
                raise _Bad(f"{what}, got {value!r} ({type(value).__name__})") from None
        if not math.isfinite(number):
            raise _Bad(f"{what}, got {value!r}: must be finite")
        return number

    return convert


def _positive(convert: Callable[[Any], float], integer: bool = False) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        number = convert(value)
        if number <= 0:
            raise _Bad(f"must be positive, got {value!r}")
        return int(round(number)) if integer else number

    return check


def _non_negative(convert: Callable[[Any], float]) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        number = convert(value)
        if number < 0:
            raise _Bad(f"must be zero or positive, got {value!r}")
        return number

    return check


_BYTES = _positive(
    _quantity(_BYTE_UNITS, "expected a size in bytes (an integer, or a string like '80 GiB')"),
    integer=True,
)
_BANDWIDTH = _positive(
    _quantity(
        _BANDWIDTH_UNITS,
        "expected a bandwidth in bytes/s (a number, or a string like '3.35 TB/s' or '400 Gb/s')",
    )
)
_FLOPS = _positive(
    _quantity(_FLOPS_UNITS, "expected a rate in FLOP/s (a number, or a string like '989 TFLOPS')")
)
_SECONDS = _non_negative(
    _quantity(_TIME_UNITS, "expected a time in seconds (a number, or a string like '5 us')")
)


def _fraction(value: Any) -> float:
    try:
        number = float(_number(value))
    except _Bad:
        raise _Bad(f"expected a number in (0, 1], got {value!r} ({type(value).__name__})") from None
    if not 0 < number <= 1:
        raise _Bad(f"expected a number in (0, 1], got {value!r}")
    return number


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"expected a positive integer, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise _Bad(f"must be a positive integer, got {value!r}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad(f"expected a string, got {value!r} ({type(value).__name__})")
    return value


def _choice(*options: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if _string(value) not in options:
            raise _Bad(f"expected one of {', '.join(options)}, got {value!r}")
        return value

    return convert


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"expected true or false, got {value!r} ({type(value).__name__})")
    return value


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):  # include = "nvme-gen5" reads naturally; take it as a list of one
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Bad(f"expected a list of strings, got {value!r}")
    return list(value)


@dataclass(frozen=True)
class _Table:
    """A TOML table with fixed keys."""

    keys: Mapping[str, Any]  # key -> converter, _Table, _TableOf or _MapOf


@dataclass(frozen=True)
class _TableOf:
    """A table of tables with free names (tiers, links), each shaped like ``item``."""

    item: _Table


@dataclass(frozen=True)
class _MapOf:
    """A table from a closed set of names to converted values (peak FLOP/s by dtype)."""

    names: tuple[str, ...]
    convert: Callable[[Any], Any]


_TIER = _Table({
    "capacity_bytes": _BYTES, "read_bandwidth": _BANDWIDTH, "write_bandwidth": _BANDWIDTH,
    "latency_s": _SECONDS, "description": _string,
})  # fmt: skip
_LINK = _Table({
    "src": _string, "dst": _string, "bandwidth": _BANDWIDTH, "latency_s": _SECONDS,
    "duplex": _boolean, "concurrent_bandwidth": _BANDWIDTH, "description": _string,
})  # fmt: skip
_SCHEMA = _Table({
    "name": _string,
    "description": _string,
    "extends": _string,
    "include": _strings,
    "part": _boolean,  # a fragment (tiers, links, host) for machines to include, not a machine
    "sources": _strings,
    "device": _Table({
        "name": _string, "kind": _choice(*DEVICE_KINDS), "memory_bytes": _BYTES,
        "memory_bandwidth": _BANDWIDTH, "peak_flops": _MapOf(PEAK_FLOPS_KEYS, _FLOPS),
        "compute_efficiency": _fraction, "memory_efficiency": _fraction, "conv_efficiency": _fraction,
        "training_efficiency": _fraction, "launch_overhead_s": _SECONDS, "allow_tf32": _boolean,
    }),
    "host": _Table({
        "name": _string, "cores": _count, "dram_bytes": _BYTES, "dram_bandwidth": _BANDWIDTH,
        "cpu_flops": _FLOPS,
    }),
    "tiers": _TableOf(_TIER),
    "links": _TableOf(_LINK),
    "cluster": _Table({
        "gpus_per_node": _count, "nodes": _count, "intra_node": _LINK, "inter_node": _LINK,
    }),
    "runtime": _Table({f.name: _SECONDS for f in dataclasses.fields(RuntimeCosts)}),
})  # fmt: skip

_REQUIRED = {
    "device": ("name", "memory_bytes", "memory_bandwidth", "peak_flops"),
    "host": ("dram_bytes", "dram_bandwidth", "cpu_flops"),
    "tier": ("capacity_bytes", "read_bandwidth", "write_bandwidth"),
    "link": ("src", "dst", "bandwidth"),
    "cluster_link": ("bandwidth",),
}


def _section(path: tuple[str, ...]) -> str:
    return f"[{'.'.join(path)}]" if path else "top level"


def _unknown_key(origin: str, path: tuple[str, ...], key: str, known: Any) -> HardwareError:
    hint = difflib.get_close_matches(key, list(known), n=1)
    maybe = f"did you mean {hint[0]!r}? " if hint else ""
    return HardwareError(
        f"{origin}: unknown key {key!r} in {_section(path)}; {maybe}"
        f"expected one of: {', '.join(known)}"
    )


def _normalize(value: Any, spec: Any, origin: str, path: tuple[str, ...]) -> Any:
    if isinstance(spec, (_Table, _TableOf, _MapOf)) and not isinstance(value, dict):
        raise HardwareError(
            f"{origin}: {_section(path)} must be a table, got {value!r} ({type(value).__name__})"
        )
    if isinstance(spec, _Table):
        out = {}
        for key, item in value.items():
            if key not in spec.keys:
                raise _unknown_key(origin, path, key, spec.keys)
            out[key] = _normalize(item, spec.keys[key], origin, path + (key,))
        return out
    if isinstance(spec, _TableOf):
        return {k: _normalize(v, spec.item, origin, path + (k,)) for k, v in value.items()}
    if isinstance(spec, _MapOf):
        out = {}
        for key, item in value.items():
            if key not in spec.names:
                raise _unknown_key(origin, path, key, spec.names)
            out[key] = _normalize(item, spec.convert, origin, path + (key,))
        return out
    try:
        return spec(value)
    except _Bad as bad:
        where = f"{_section(path[:-1])} {path[-1]}" if len(path) > 1 else f"key {path[-1]!r}"
        raise HardwareError(f"{origin}: {where}: {bad}") from None


# -- loading -------------------------------------------------------------------------------------


def _presets_dir() -> Traversable:
    return resources.files("tierplan.cost_models") / "presets"


def _preset_files() -> dict[str, Traversable]:
    return {
        entry.name[: -len(".toml")]: entry
        for entry in sorted(_presets_dir().iterdir(), key=lambda e: e.name[: -len(".toml")])
        if entry.name.endswith(".toml")
    }


def _is_part(entry: Traversable) -> bool:
    return bool(tomllib.loads(entry.read_text(encoding="utf-8")).get("part", False))


def list_presets() -> list[str]:
    """Names of the machine presets ``load_hardware`` accepts, sorted."""
    return [name for name, entry in _preset_files().items() if not _is_part(entry)]


def list_parts() -> list[str]:
    """Names of the preset parts (host DRAM, NVMe drives) that machine files ``include``."""
    return [name for name, entry in _preset_files().items() if _is_part(entry)]


@dataclass(frozen=True)
class _Source:
    label: str  # how errors name it
    read: Callable[[], str]
    folder: Path | None  # where relative paths in it resolve; None for presets


def _looks_like_path(ref: str | Path) -> bool:
    return isinstance(ref, Path) or "/" in ref or "\\" in ref or ref.endswith(".toml")


def _resolve(ref: str | Path, relative_to: Path | None, asked_by: str | None) -> _Source:
    if _looks_like_path(ref):
        path = Path(ref).expanduser()
        if not path.is_absolute() and relative_to is not None:
            path = relative_to / path
        if not path.is_file():
            by = f" (named in {asked_by})" if asked_by else ""
            stem = Path(ref).stem
            hint = f"; did you mean the preset {stem!r}?" if stem in _preset_files() else ""
            raise HardwareError(f"no hardware file at {str(path)!r}{by}{hint}")
        return _Source(str(path), lambda: path.read_text(encoding="utf-8"), path.parent)
    presets = _preset_files()
    if ref not in presets:
        by = f"{asked_by}: " if asked_by else ""
        machines = [n for n, e in presets.items() if not _is_part(e)]
        parts = [n for n, e in presets.items() if _is_part(e)]
        raise HardwareError(
            f"{by}unknown hardware preset {ref!r}; presets: {', '.join(machines)}; parts: "
            f"{', '.join(parts)}; or give the path of a TOML file (e.g. my-gpu.toml holding "
            f'extends = "h100-sxm" and the fields that differ)'
        )
    entry = presets[ref]
    return _Source(f"preset {ref} ({ref}.toml)", lambda: entry.read_text(encoding="utf-8"), None)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if key == "sources":  # the file's own sources first, then what it builds on
            out[key] = list(dict.fromkeys([*value, *base.get(key, [])]))
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value)
        else:
            out[key] = value
    return out


def _load_merged(source: _Source, chain: tuple[str, ...]) -> dict[str, Any]:
    if source.label in chain:
        raise HardwareError(
            f"{source.label}: extends/include loop: {' -> '.join(chain + (source.label,))}"
        )
    try:
        raw = tomllib.loads(source.read())
    except tomllib.TOMLDecodeError as exc:
        raise HardwareError(f"{source.label}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HardwareError(f"{source.label}: cannot read: {exc}") from None
    own = _normalize(raw, _SCHEMA, source.label, ())
    chain = chain + (source.label,)
    merged: dict[str, Any] = {}
    for ref in ([own["extends"]] if "extends" in own else []) + own.get("include", []):
        base = _load_merged(_resolve(ref, source.folder, source.label), chain)
        base.pop("part", None)  # being a part is not inherited
        base.pop("name", None)  # neither is the name (a file is named by itself or its stem)
        merged = _merge(merged, base)
    own = {k: v for k, v in own.items() if k not in ("extends", "include")}
    return _merge(merged, own)


def load_hardware(name_or_path: str | Path) -> Hardware:
    """Load a preset by name (see ``list_presets()``) or a TOML file by path.

    A string is a path when it contains a slash or ends in ``.toml``; otherwise a preset name.
    """
    source = _resolve(name_or_path, Path.cwd(), None)
    data = _load_merged(source, ())
    if data.get("part"):
        raise HardwareError(
            f"{source.label} is a part (tiers/links to include), not a machine; name it in a "
            f"machine file's include = [...], or load one of: {', '.join(list_presets())}"
        )
    default_name = Path(str(name_or_path)).stem if _looks_like_path(name_or_path) else str(
        name_or_path
    )
    return _build(data, source.label, default_name)


def _require(data: Mapping[str, Any], keys: tuple[str, ...], origin: str, path: tuple[str, ...],
             what: str) -> None:  # fmt: skip
    for key in keys:
        if key not in data:
            raise HardwareError(
                f"{origin}: {_section(path)} is missing required key {key!r} (in this file or "
                f"what it extends/includes); {what}"
            )


def _link(name: str, data: Mapping[str, Any], src: str, dst: str) -> Link:
    return Link(
        name=name,
        src=data.get("src", src),
        dst=data.get("dst", dst),
        bandwidth=data["bandwidth"],
        latency_s=data.get("latency_s", 0.0),
        duplex=data.get("duplex", True),
        concurrent_bandwidth=data.get("concurrent_bandwidth"),
        description=data.get("description", ""),
    )


def _build(data: Mapping[str, Any], origin: str, default_name: str) -> Hardware:
    for section in ("device", "host"):
        if section not in data:
            raise HardwareError(
                f"{origin}: missing required table [{section}] (in this file or what it extends); "
                f"start the file with extends = \"h100-sxm\" (or another preset) to inherit one"
            )
    d = data["device"]
    _require(d, _REQUIRED["device"], origin, ("device",), "see presets/h100-sxm.toml")
    if not d["peak_flops"]:
        raise HardwareError(f"{origin}: [device.peak_flops] must name at least one dtype")
    device = Device(
        name=d["name"],
        kind=d.get("kind", "cuda"),
        memory_bytes=d["memory_bytes"],
        memory_bandwidth=d["memory_bandwidth"],
        peak_flops=dict(d["peak_flops"]),
        compute_efficiency=d.get("compute_efficiency", 1.0),
        memory_efficiency=d.get("memory_efficiency", 1.0),
        conv_efficiency=d.get("conv_efficiency", 1.0),
        training_efficiency=d.get("training_efficiency", 1.0),
        launch_overhead_s=d.get("launch_overhead_s", 0.0),
        allow_tf32=d.get("allow_tf32", False),
    )
    h = data["host"]
    _require(h, _REQUIRED["host"], origin, ("host",), "see presets/host-ddr5-server.toml")
    host = Host(
        name=h.get("name", "host"),
        dram_bytes=h["dram_bytes"],
        dram_bandwidth=h["dram_bandwidth"],
        cpu_flops=h["cpu_flops"],
        cores=h.get("cores", 0),
    )

    # The device and host tiers default to the memories they stand for; a file may override
    # any field (a smaller capacity is a budget; a larger one is an error, below).
    tier_data: dict[str, dict[str, Any]] = {
        "device": {
            "capacity_bytes": device.memory_bytes,
            "read_bandwidth": device.memory_bandwidth,
            "write_bandwidth": device.memory_bandwidth,
            "description": f"{device.name} memory",
        },
        "host": {
            "capacity_bytes": host.dram_bytes,
            "read_bandwidth": host.dram_bandwidth,
            "write_bandwidth": host.dram_bandwidth,
            "description": f"pinned DRAM of {host.name}",
        },
    }
    tier_data = _merge(tier_data, data.get("tiers", {}))
    tiers: dict[str, Tier] = {}
    for name, t in tier_data.items():
        _require(t, _REQUIRED["tier"], origin, ("tiers", name), "a tier needs all three")
        tiers[name] = Tier(
            name=name,
            capacity_bytes=t["capacity_bytes"],
            read_bandwidth=t["read_bandwidth"],
            write_bandwidth=t["write_bandwidth"],
            latency_s=t.get("latency_s", 0.0),
            description=t.get("description", ""),
        )
    for name, physical, key in (("device", device.memory_bytes, "[device] memory_bytes"),
                                ("host", host.dram_bytes, "[host] dram_bytes")):  # fmt: skip
        if tiers[name].capacity_bytes > physical:
            capacity = format_bytes(tiers[name].capacity_bytes)
            raise HardwareError(
                f"{origin}: [tiers.{name}] capacity_bytes ({capacity}) exceeds {key} "
                f"({format_bytes(physical)})"
            )

    links: dict[str, Link] = {}
    for name, l in data.get("links", {}).items():
        _require(l, _REQUIRED["link"], origin, ("links", name), "a link needs src, dst, bandwidth")
        for end in ("src", "dst"):
            if l[end] not in tiers:
                raise HardwareError(
                    f"{origin}: [links.{name}] {end}: {l[end]!r} is not a tier; tiers: "
                    f"{', '.join(tiers)}"
                )
        links[name] = _link(name, l, l["src"], l["dst"])

    c = data.get("cluster", {})
    cluster_links: dict[str, Link | None] = {}
    for key, ends in (("intra_node", ("device", "device")), ("inter_node", ("node", "node"))):
        if key in c:
            _require(c[key], _REQUIRED["cluster_link"], origin, ("cluster", key), "")
            cluster_links[key] = _link(key, c[key], *ends)
        else:
            cluster_links[key] = None
    cluster = Cluster(
        gpus_per_node=c.get("gpus_per_node", 1),
        nodes=c.get("nodes", 1),
        intra_node=cluster_links["intra_node"],
        inter_node=cluster_links["inter_node"],
    )

    for link in [*links.values(), *(l for l in cluster_links.values() if l is not None)]:
        if link.concurrent_bandwidth is not None and link.concurrent_bandwidth > link.bandwidth:
            where = f"[links.{link.name}]" if link.name in links else f"[cluster.{link.name}]"
            both = format_bandwidth(link.concurrent_bandwidth)
            raise HardwareError(
                f"{origin}: {where} concurrent_bandwidth ({both}) exceeds bandwidth "
                f"({format_bandwidth(link.bandwidth)})"
            )

    return Hardware(
        name=data.get("name", default_name),
        description=data.get("description", ""),
        device=device,
        tiers=tiers,
        links=links,
        host=host,
        cluster=cluster,
        sources=tuple(data.get("sources", ())),
        runtime=RuntimeCosts(**data.get("runtime", {})),
    )


# -- output --------------------------------------------------------------------------------------


def describe_hardware(hw: Hardware) -> str:
    """A readable multi-line summary (what ``tierplan hardware show NAME`` prints)."""
    d = hw.device
    lines = [f"{hw.name}: {hw.description}" if hw.description else hw.name]
    lines.append(
        f"  device   {d.name} ({d.kind}): {format_bytes(d.memory_bytes)} at "
        f"{format_bandwidth(d.memory_bandwidth)}, "
        f"launch overhead {format_seconds(d.launch_overhead_s)}"
    )
    peaks = ", ".join(f"{k} {format_flops(v)}" for k, v in d.peak_flops.items())
    lines.append(f"           peak {peaks}")
    lines.append(
        f"           efficiency: compute {d.compute_efficiency:.2f}, memory "
        f"{d.memory_efficiency:.2f}, convolutions {d.conv_efficiency:.2f} of the matmul rate; "
        f"fp32 matmuls at the "
        f"{'tf32' if d.allow_tf32 else 'float32'} rate"
        + (f"; training steps sustain {d.training_efficiency:.2f} of the compute rate"
           if d.training_efficiency < 1 else "")
    )
    lines.append(
        f"  host     {hw.host.name}: {format_bytes(hw.host.dram_bytes)} DRAM at "
        f"{format_bandwidth(hw.host.dram_bandwidth)}, CPU {format_flops(hw.host.cpu_flops)} fp32"
        + (f" on {hw.host.cores} cores" if hw.host.cores else "")
    )
    lines.append("  tiers")
    width = max(len(n) for n in hw.tiers)
    for t in hw.tiers.values():
        latency = f", latency {format_seconds(t.latency_s)}" if t.latency_s else ""
        lines.append(
            f"    {t.name:<{width}}  {format_bytes(t.capacity_bytes):>10}  read "
            f"{format_bandwidth(t.read_bandwidth)}, write {format_bandwidth(t.write_bandwidth)}"
            f"{latency}" + (f"  ({t.description})" if t.description else "")
        )
    if hw.links:
        lines.append("  links")
        for link in hw.links.values():
            lines.append(f"    {_describe_link(link)}")
    r = hw.runtime
    lines.append(
        f"  runtime  per op {format_seconds(r.op_issue_s)}, per step {format_seconds(r.step_s)} + "
        f"{format_seconds(r.input_s)} per input; per copy: inline {format_seconds(r.inline_copy_s)}, "
        f"thread {format_seconds(r.thread_copy_s)}, stream {format_seconds(r.stream_copy_s)}, "
        f"file {format_seconds(r.file_copy_s)}; optimizer: per parameter {format_seconds(r.param_update_s)}, "
        f"per state file {format_seconds(r.state_file_s)}"
    )
    c = hw.cluster
    lines.append(
        f"  cluster  {c.gpus_per_node} device(s) per node x {c.nodes} node(s)"
        + "".join(f"\n    {_describe_link(l)}" for l in (c.intra_node, c.inter_node) if l)
    )
    if hw.sources:
        lines.append("  sources")
        lines.extend(f"    - {s}" for s in hw.sources)
    return "\n".join(lines)


def _describe_link(link: Link) -> str:
    both = (
        f", {format_bandwidth(link.bandwidth_both_ways())} each way when both run"
        if link.bandwidth_both_ways() != link.bandwidth
        else ""
    )
    kind = "" if link.duplex else " (half duplex)"
    desc = f" {link.description}:" if link.description else ""
    return (
        f"{link.name} {link.src}<->{link.dst}:{desc} {format_bandwidth(link.bandwidth)} per "
        f"direction{both}{kind}, latency {format_seconds(link.latency_s)}"
    )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # shortest repr round-trips exactly, and is valid TOML
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def _human(key: str, value: Any) -> str:
    """A unit-bearing rendering of a base-unit number, for the comment beside it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    if key.endswith("_bytes"):
        return format_bytes(value)
    if "bandwidth" in key:
        return format_bandwidth(value)
    if key.endswith("_s"):
        return format_seconds(value)
    if "flops" in key:
        return format_flops(value)
    return ""


def render_hardware_toml(hw: Hardware) -> str:
    """The TOML text of ``hw`` in the preset format, every field explicit (no ``extends``).

    Numbers are written in base units (exact round trip); a comment beside each gives it with a
    unit and its provenance from ``hw.notes`` when there is one.
    """
    out: list[str] = [f"# {hw.name}: written by tierplan", ""]

    def put(path: str, key: str, value: Any) -> None:
        comment = "; ".join(c for c in (_human(key, value), hw.notes.get(path, "")) if c)
        line = f"{key} = {_toml_value(value)}"
        out.append(f"{line}  # {comment}" if comment else line)

    def key(name: str) -> str:  # tier and link names become TOML keys: quote odd ones
        return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)

    def table(header: str, prefix: str, fields: Mapping[str, Any]) -> None:
        out.extend(["", f"[{header}]"])
        for key, value in fields.items():
            if value is not None:
                put(f"{prefix}.{key}", key, value)

    put("name", "name", hw.name)
    put("description", "description", hw.description)
    put("sources", "sources", list(hw.sources))
    d = hw.device
    table("device", "device", {
        "name": d.name, "kind": d.kind, "memory_bytes": d.memory_bytes,
        "memory_bandwidth": d.memory_bandwidth, "compute_efficiency": d.compute_efficiency,
        "memory_efficiency": d.memory_efficiency, "conv_efficiency": d.conv_efficiency,
        "training_efficiency": d.training_efficiency, "launch_overhead_s": d.launch_overhead_s,
        "allow_tf32": d.allow_tf32,
    })  # fmt: skip
    table("device.peak_flops", "device.peak_flops", {k: float(v) for k, v in d.peak_flops.items()})
    host = dataclasses.asdict(hw.host)
    if not host["cores"]:  # 0 means unknown; the file format has no way to say 0 cores
        del host["cores"]
    table("host", "host", host)
    for t in hw.tiers.values():
        fields = dataclasses.asdict(t)
        del fields["name"]
        table(f"tiers.{key(t.name)}", f"tiers.{t.name}", fields)
    for link in hw.links.values():
        fields = dataclasses.asdict(link)
        del fields["name"]
        table(f"links.{key(link.name)}", f"links.{link.name}", fields)
    table("runtime", "runtime", dataclasses.asdict(hw.runtime))
    c = hw.cluster
    table("cluster", "cluster", {"gpus_per_node": c.gpus_per_node, "nodes": c.nodes})
    for link in (c.intra_node, c.inter_node):
        if link is not None:
            fields = dataclasses.asdict(link)
            del fields["name"]
            table(f"cluster.{link.name}", f"cluster.{link.name}", fields)
    return "\n".join(out) + "\n"


def write_hardware_toml(hw: Hardware, path: str | Path) -> Path:
    """Write ``hw`` as a TOML file that ``load_hardware(path)`` reads back equal to ``hw``."""
    path = Path(path)
    path.write_text(render_hardware_toml(hw), encoding="utf-8")
    return path
