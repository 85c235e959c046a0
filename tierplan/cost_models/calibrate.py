"""Measure this machine and describe it as a Hardware (what ``tierplan calibrate`` runs).

Spec sheets give peaks; a plan is only as good as the rates it assumes, so this measures the
rates that the cost models use, on the machine at hand:

- matmul throughput per dtype: 2 n^3 FLOPs over the median time of an n x n x n ``torch.mm``
  (CPU: float32, bfloat16; CUDA: float32 with TF32 off, tf32, bfloat16, float16);
- memory bandwidth: a ``copy_`` of a buffer larger than the last-level cache, counted as bytes
  read plus bytes written (2 n), as the roofline counts an op's bytes;
- per-op overhead: the median time of a one-element ``torch.add`` (dispatch, plus the kernel launch
  on CUDA, where back-to-back launches are timed between synchronizations);
- convolution efficiency: the FLOP rate of a small 3x3 convolution (4 x 32 x 16 x 16, 32 filters),
  forward and backward, as a share of the float32 matmul rate above;
- copy bandwidths: CPU memcpy within DRAM for the device<->host link of the CPU machine; on CUDA
  host->device and device->host from pinned memory, alone and both at once on two streams;
- the nvme tier: sequential write (with fsync) and read bandwidth of a file in a temporary
  directory, the page cache dropped in between with posix_fadvise where the OS has it, and the
  latency of a 4 KiB read. The directory is removed afterwards, on errors too;
- what running a plan costs beyond kernels and bytes (``RuntimeCosts``, see ``_runtime_costs``):
  the issue cost per op of a generated program of small ops, the per-step cost of the module that
  runs it, and the per-copy cost of each kind of copy queue the runtime has (inline on the compute
  thread, a worker thread, a CUDA stream where CUDA is, a swap file).

Every time is taken after a warm-up call, over samples of several calls each (long enough to swamp
timer resolution), as the median of the fastest quarter of the samples: interference from other
processes only ever adds time, and on a shared machine it hits most samples (see
``_median_seconds``). Rates are achieved rates, so a calibrated device has efficiency factors of 1.
"""
from __future__ import annotations

import ctypes
import dataclasses
import datetime
import operator
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from tierplan.cost_models.hardware import (
    Cluster,
    Device,
    Hardware,
    HardwareError,
    Host,
    Link,
    RuntimeCosts,
    Tier,
    load_hardware,
    render_hardware_toml,
    write_hardware_toml,
)

__all__ = ["calibrate", "render_hardware_toml", "write_hardware_toml"]

_MiB = 2**20


@dataclass(frozen=True)
class _Sizes:
    matmul_n: int  # n of the n x n x n matmul
    copy_bytes: int  # buffer for the memory-bandwidth copy; must exceed the last-level cache
    link_bytes: int  # buffer for host<->device copies
    file_bytes: int  # file written and read for the nvme tier
    file_reps: int
    budget_s: float  # time spent on each measurement after warm-up


_SIZES = {
    ("cpu", True): _Sizes(256, 64 * _MiB, 64 * _MiB, 16 * _MiB, 2, 0.12),
    ("cpu", False): _Sizes(1024, 256 * _MiB, 256 * _MiB, 256 * _MiB, 3, 0.4),
    ("cuda", True): _Sizes(2048, 256 * _MiB, 64 * _MiB, 16 * _MiB, 2, 0.1),
    ("cuda", False): _Sizes(8192, 1024 * _MiB, 256 * _MiB, 256 * _MiB, 3, 0.4),
}


class CalibrationWarning(UserWarning):
    """The machine changed speed while calibrate measured it: run it again when it is quiet."""


# The host matmul's rate measured first and again last, slower over faster, beyond which the
# machine was not the same throughout (three quiet runs on the 2-core dev box: 1.01, 1.19, 1.20).
STEADY_RATIO = 1.5


def unsteady_machine(first_flops: float, last_flops: float) -> str | None:
    """What to say when the host matmul ran at ``first_flops`` at the start of calibrate and at
    ``last_flops`` at its end, if the two are more than STEADY_RATIO apart (else None)."""
    ratio = max(first_flops, last_flops) / min(first_flops, last_flops)
    if ratio <= STEADY_RATIO:
        return None
    return (f"calibrate: the host's float32 matmul ran at {first_flops / 1e9:.1f} GFLOP/s first and "
            f"{last_flops / 1e9:.1f} GFLOP/s last ({ratio:.1f}x apart): something else used the machine "
            f"while it was measured, so these figures may be off; run calibrate again when it is quiet")


def _median_seconds(fn: Callable[[], Any], sync: Callable[[], None], budget_s: float) -> float:
    """Seconds per call of ``fn``: the median of the fastest quarter of timed samples.

    Warm up, then time ~24 samples of several calls each. Other processes can only add time: on a
    shared 2-core machine a 0.19 ms matmul was measured taking up to 33 ms while another job ran,
    in most samples. The plain median then measures the neighbours; the fast quarter measures the
    machine, and its median resists a single lucky sample.
    """
    fn()
    sync()
    # Estimate the time per call from a short burst: one call alone may pay the wake-up of idle
    # worker threads (milliseconds on a loaded machine) and would make every sample one call.
    burst, start = 0, time.perf_counter()
    while burst < 1000 and time.perf_counter() - start < budget_s / 16:
        fn()
        sync()
        burst += 1
    once = (time.perf_counter() - start) / burst
    calls = max(1, int(budget_s / 24 / max(once, 1e-7)))
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < 4 or (time.perf_counter() < deadline and len(samples) < 64):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / calls)
    fastest = sorted(samples)[: max(1, len(samples) // 4)]
    return statistics.median(fastest)


def _matmul_flops(device: torch.device, dtype: torch.dtype, n: int, budget_s: float,
                  sync: Callable[[], None]) -> float:  # fmt: skip
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / _median_seconds(lambda: torch.mm(a, b), sync, budget_s)


def _copy_seconds(src: torch.Tensor, dst: torch.Tensor, budget_s: float,
                  sync: Callable[[], None]) -> float:  # fmt: skip
    return _median_seconds(lambda: dst.copy_(src, non_blocking=True), sync, budget_s)


def _conv_efficiency(device: torch.device, matmul_flops: float, budget_s: float,
                     sync: Callable[[], None]) -> float:  # fmt: skip
    """The FLOP rate of a small convolution, forward and backward, over ``matmul_flops``."""
    x = torch.randn(4, 32, 16, 16, device=device)
    w = torch.randn(32, 32, 3, 3, device=device)
    y = torch.conv2d(x, w, padding=1)
    g = torch.ones_like(y)
    flops = 2 * x.shape[0] * 32 * 32 * 9 * 16 * 16  # forward; the backward is twice that

    def step() -> None:
        torch.ops.aten.convolution.default(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
        torch.ops.aten.convolution_backward.default(g, x, w, None, [1, 1], [1, 1], [1, 1], False,
                                                    [0, 0], 1, [True, True, False])  # fmt: skip

    rate = 3 * flops / _median_seconds(step, sync, budget_s)
    return min(1.0, rate / matmul_flops)


def _dispatch_seconds(device: torch.device, budget_s: float, sync: Callable[[], None]) -> float:
    a, b, c = (torch.ones(1, device=device) for _ in range(3))
    return _median_seconds(lambda: torch.add(a, b, out=c), sync, budget_s)


def _drop_page_cache(path: Path) -> bool:
    """Ask the OS to forget the file's cached pages, so a read comes from the drive."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


@dataclass(frozen=True)
class _Disk:
    read_bandwidth: float
    write_bandwidth: float
    latency_s: float
    free_bytes: int
    method: str


def _measure_disk(folder: str | Path | None, nbytes: int, reps: int) -> _Disk:
    chunk = min(nbytes, 8 * _MiB)
    data = memoryview(os.urandom(chunk))  # random: no compression or dedup can flatter the drive
    buffer = bytearray(chunk)
    writes: list[float] = []
    reads: list[float] = []
    latencies: list[float] = []
    dropped = True
    # The context manager removes the directory and the probe file on any exit, errors included.
    with tempfile.TemporaryDirectory(prefix="tierplan-calibrate-", dir=folder) as tmp:
        path = Path(tmp) / "probe.bin"
        for _ in range(reps):
            start = time.perf_counter()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                written = 0
                while written < nbytes:
                    written += os.write(fd, data[: min(chunk, nbytes - written)])
                os.fsync(fd)  # the drive, not the page cache, must hold the bytes
            finally:
                os.close(fd)
            writes.append(time.perf_counter() - start)

            dropped = _drop_page_cache(path) and dropped
            start = time.perf_counter()
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass
            reads.append(time.perf_counter() - start)

        dropped = _drop_page_cache(path) and dropped
        with open(path, "rb", buffering=0) as f:
            step = max(4096, (nbytes // 16) // 4096 * 4096)  # 4 KiB reads spread over the file
            for offset in range(0, nbytes - 4096 + 1, step):
                f.seek(offset)
                start = time.perf_counter()
                f.read(4096)
                latencies.append(time.perf_counter() - start)
        free = _free_bytes(tmp)
    cache = "page cache dropped with posix_fadvise" if dropped else (
        "page cache NOT dropped (no posix_fadvise): read figures may be DRAM speed"
    )
    return _Disk(
        read_bandwidth=nbytes / statistics.median(reads),
        write_bandwidth=nbytes / statistics.median(writes),
        latency_s=statistics.median(latencies) if latencies else 0.0,
        free_bytes=free,
        method=f"{nbytes // _MiB} MiB file in {folder or tempfile.gettempdir()}, median of "
        f"{reps}; {cache}",
    )


def _free_bytes(folder: str) -> int:
    return max(shutil.disk_usage(folder).free, 1)


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30  # unknown; a budget will usually bind first


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def calibrate(
    device: str = "cpu",
    *,
    quick: bool = False,
    name: str | None = None,
    base: str | Path | Hardware | None = None,
    scratch_dir: str | Path | None = None,
) -> Hardware:
    """Measure this machine's ``device`` ("cpu" or "cuda") and return it as a Hardware.

    ``quick`` shortens every measurement (about a second on CPU; less accurate). ``base`` (a
    preset name, file or Hardware) supplies what is not measured (the cluster, extra tiers and
    links, peaks of dtypes not timed, derated by its compute efficiency); without it the result
    is one device on one node. ``scratch_dir`` is where the nvme probe file goes (a directory on
    the drive to describe; default: the system's temporary directory).
    """
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise HardwareError(f"calibrate: device must be 'cpu' or 'cuda', got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise HardwareError(
            "calibrate: device 'cuda' asked for but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}); calibrate 'cpu' here or run on a GPU machine"
        )
    sizes = _SIZES[(kind, quick)]
    today = datetime.date.today().isoformat()
    stamp = f"measured by tierplan calibrate on {today}"
    notes: dict[str, str] = {}

    def note(path: str, method: str) -> None:
        notes[path] = f"{stamp}, {method}"

    cpu = torch.device("cpu")
    no_sync: Callable[[], None] = lambda: None  # noqa: E731
    threads = torch.get_num_threads()

    # The host is measured in both cases: it is the CPU machine's device, and the CUDA machine's
    # pinned tier and optimizer-step CPU.
    cpu_fp32 = _matmul_flops(cpu, torch.float32, _SIZES[("cpu", quick)].matmul_n, sizes.budget_s,
                             no_sync)  # fmt: skip
    cpu_copy_n = _SIZES[("cpu", quick)].copy_bytes
    src = torch.ones(cpu_copy_n, dtype=torch.uint8)
    dst = torch.empty_like(src)
    cpu_copy_s = _copy_seconds(src, dst, sizes.budget_s, no_sync)
    del src, dst
    dram_bandwidth = 2 * cpu_copy_n / cpu_copy_s
    ram = _ram_bytes()
    cpu_name = _cpu_name()
    host = Host(name=cpu_name, dram_bytes=ram, dram_bandwidth=dram_bandwidth, cpu_flops=cpu_fp32,
                cores=os.cpu_count() or 0)  # fmt: skip
    note("host.cpu_flops", f"float32 median time of torch.mm n={_SIZES[('cpu', quick)].matmul_n}, "
                           f"{threads} threads")  # fmt: skip
    note("host.dram_bandwidth", f"copy_ of {cpu_copy_n // _MiB} MiB, read + write bytes")
    note("host.dram_bytes", "physical memory from sysconf")

    disk = _measure_disk(scratch_dir, sizes.file_bytes, sizes.file_reps)
    nvme = Tier(
        name="nvme",
        capacity_bytes=disk.free_bytes,
        read_bandwidth=disk.read_bandwidth,
        write_bandwidth=disk.write_bandwidth,
        latency_s=disk.latency_s,
        description="scratch file system (free space at calibration)",
    )
    for key in ("read_bandwidth", "write_bandwidth"):
        note(f"tiers.nvme.{key}", f"sequential, {disk.method}")
    note("tiers.nvme.latency_s", "median 4 KiB read after dropping the page cache")
    note("tiers.nvme.capacity_bytes", "free space of the scratch file system")
    # The drive, not a PCIe x4 link, is what the file measurements saw: let the tier figures bind.
    nvme_link = Link(
        name="host-nvme", src="host", dst="nvme",
        bandwidth=max(disk.read_bandwidth, disk.write_bandwidth), duplex=False,
        description="file I/O (reads and writes share the drive)",
    )  # fmt: skip
    note("links.host-nvme.bandwidth", "the faster of the nvme tier's read and write")

    if kind == "cpu":
        hw = _cpu_hardware(host, nvme, nvme_link, sizes, note, no_sync)
    else:
        hw = _cuda_hardware(torch.device(device), host, nvme, nvme_link, sizes, note)
    run_on = torch.device(device) if kind == "cuda" else cpu
    # A quick run probes the runtime on one thread: hundreds of small ops, each a parallel region
    # that waits for a descheduled OpenMP thread on a busy machine, would take seconds (and measure
    # the neighbours). Its figures are then a little low for a multi-threaded run.
    if quick:
        torch.set_num_threads(1)
    try:
        runtime = _runtime_costs(run_on, hw.device, sizes, scratch_dir, note)
    finally:
        torch.set_num_threads(threads)
    hw = dataclasses.replace(hw, runtime=runtime)
    # The host matmul again: a machine whose speed changed while it was measured (a neighbour
    # taking the cores) wrote figures that describe neither state (a run beside a test suite
    # wrote conv_efficiency 0.008 and a 7.7 ms per-parameter update where quiet runs give 0.6-0.8
    # and 45 us). Nothing else can tell, so say so where the figures go.
    again = _matmul_flops(cpu, torch.float32, _SIZES[("cpu", quick)].matmul_n, sizes.budget_s, no_sync)
    unsteady = unsteady_machine(cpu_fp32, again)
    hw = dataclasses.replace(
        hw,
        description=f"{hw.device.name}, {stamp}",
        sources=(
            f"{stamp} with torch {torch.__version__}, {threads} CPU threads "
            f"({'quick' if quick else 'full'} run)",
        ) + ((unsteady,) if unsteady else ()),
    )
    if unsteady:
        warnings.warn(unsteady, CalibrationWarning, stacklevel=2)
    if base is not None:
        hw = _over_base(hw, base if isinstance(base, Hardware) else load_hardware(base))
    return dataclasses.replace(hw, name=name or hw.name, notes=notes)


def _cpu_hardware(
    host: Host,
    nvme: Tier,
    nvme_link: Link,
    sizes: _Sizes,
    note: Callable[[str, str], None],
    sync: Callable[[], None],
) -> Hardware:
    cpu = torch.device("cpu")
    peaks = {"float32": host.cpu_flops}
    try:
        peaks["bfloat16"] = _matmul_flops(cpu, torch.bfloat16, sizes.matmul_n, sizes.budget_s, sync)
    except RuntimeError:
        pass  # a build without CPU bf16 matmul: leave the dtype out, op_time names it if needed
    for key in peaks:
        note(f"device.peak_flops.{key}", f"{key} median time of torch.mm n={sizes.matmul_n}")
    dispatch = _dispatch_seconds(cpu, sizes.budget_s, sync)
    note("device.launch_overhead_s", "median time of a one-element torch.add (dispatch)")
    conv = _conv_efficiency(cpu, host.cpu_flops, sizes.budget_s, sync)
    note("device.conv_efficiency", "3x3 convolution 4x32x16x16 -> 32, forward + backward, FLOP rate "
                                   "over the float32 matmul's")
    note("device.memory_bandwidth", "as host.dram_bandwidth (the device is the CPU)")
    memcpy = host.dram_bandwidth / 2  # a copy of n bytes moves 2n: n per direction of the "link"
    device = Device(
        name=host.name, kind="cpu", memory_bytes=host.dram_bytes,
        memory_bandwidth=host.dram_bandwidth, peak_flops=peaks, launch_overhead_s=dispatch,
        conv_efficiency=conv,
    )  # fmt: skip
    # On a CPU machine the device and host tiers are the same DRAM: a budget on the device tier
    # is what binds, and a "transfer" between them is a memcpy over the one memory bus.
    tiers = {
        "device": Tier("device", host.dram_bytes, host.dram_bandwidth, host.dram_bandwidth,
                       description="CPU DRAM (the device of a CPU-only machine)"),
        "host": Tier("host", host.dram_bytes, host.dram_bandwidth, host.dram_bandwidth,
                     description="CPU DRAM (the same memory as the device tier)"),
        "nvme": nvme,
    }  # fmt: skip
    # The fixed cost of a copy is the runtime's (runtime.inline_copy_s: the program makes it on the
    # compute thread, its copy_ dispatch included), not the memory bus's.
    links = {
        "device-host": Link(
            name="device-host", src="device", dst="host", bandwidth=memcpy,
            latency_s=0.0, duplex=False, description="memcpy within DRAM (one memory bus)",
        ),
        "host-nvme": nvme_link,
    }  # fmt: skip
    note("links.device-host.bandwidth", "copy_ within DRAM, bytes copied per second")
    note("links.device-host.latency_s", "none of its own: a copy's fixed cost is runtime.inline_copy_s")
    return Hardware(
        name="calibrated-cpu", description="", device=device, tiers=tiers, links=links, host=host,
        cluster=Cluster(gpus_per_node=1, nodes=1),
    )  # fmt: skip


def _cuda_hardware(dev: torch.device, host: Host, nvme: Tier, nvme_link: Link, sizes: _Sizes,
                   note: Callable[[str, str], None]) -> Hardware:  # fmt: skip
    sync: Callable[[], None] = lambda: torch.cuda.synchronize(dev)  # noqa: E731
    n = sizes.matmul_n
    peaks: dict[str, float] = {}
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for key, dtype, tf32 in (("float32", torch.float32, False), ("tf32", torch.float32, True),
                                 ("bfloat16", torch.bfloat16, False),
                                 ("float16", torch.float16, False)):  # fmt: skip
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                peaks[key] = _matmul_flops(dev, dtype, n, sizes.budget_s, sync)
                note(f"device.peak_flops.{key}", f"{key} median time of torch.mm n={n}")
            except RuntimeError:
                pass  # the device lacks the dtype: leave it out
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32

    a = torch.empty(sizes.copy_bytes, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    d2d = _copy_seconds(a, b, sizes.budget_s, sync)
    del a, b
    note("device.memory_bandwidth", f"device-to-device copy_ of {sizes.copy_bytes // _MiB} MiB, "
                                    f"read + write bytes")  # fmt: skip
    dispatch = _dispatch_seconds(dev, sizes.budget_s, sync)
    note("device.launch_overhead_s", "median time per back-to-back one-element torch.add")
    conv = _conv_efficiency(dev, peaks.get("float32", 0.0) or 1.0, sizes.budget_s, sync)
    note("device.conv_efficiency", "3x3 convolution 4x32x16x16 -> 32 in float32, forward + "
                                   "backward, FLOP rate over the float32 matmul's")

    m = sizes.link_bytes
    h_in = torch.empty(m, dtype=torch.uint8, pin_memory=True)
    h_out = torch.empty(m, dtype=torch.uint8, pin_memory=True)
    d_in = torch.empty(m, dtype=torch.uint8, device=dev)
    d_out = torch.empty(m, dtype=torch.uint8, device=dev)
    h2d = m / _copy_seconds(h_in, d_in, sizes.budget_s, sync)
    d2h = m / _copy_seconds(d_out, h_out, sizes.budget_s, sync)
    up, down = torch.cuda.Stream(dev), torch.cuda.Stream(dev)

    def both() -> None:
        with torch.cuda.stream(up):
            d_in.copy_(h_in, non_blocking=True)
        with torch.cuda.stream(down):
            h_out.copy_(d_out, non_blocking=True)

    both_ways = m / _median_seconds(both, sync, sizes.budget_s)
    tiny = torch.empty(1, dtype=torch.uint8, pin_memory=True)
    tiny_d = torch.empty(1, dtype=torch.uint8, device=dev)
    copy_latency = _copy_seconds(tiny, tiny_d, sizes.budget_s, sync)
    del h_in, h_out, d_in, d_out

    props = torch.cuda.get_device_properties(dev)
    device = Device(
        name=torch.cuda.get_device_name(dev),
        kind="rocm" if getattr(torch.version, "hip", None) else "cuda",
        memory_bytes=props.total_memory,
        memory_bandwidth=2 * sizes.copy_bytes / d2d,
        peak_flops=peaks,
        launch_overhead_s=dispatch,
        conv_efficiency=conv,
        allow_tf32=bool(previous_tf32),
    )
    note("device.memory_bytes", "torch.cuda.get_device_properties().total_memory")
    tiers = {
        "device": Tier("device", device.memory_bytes, device.memory_bandwidth,
                       device.memory_bandwidth, description=f"{device.name} memory"),
        "host": Tier("host", host.dram_bytes, host.dram_bandwidth, host.dram_bandwidth,
                     description=f"pinned DRAM of {host.name}"),
        "nvme": nvme,
    }  # fmt: skip
    pinned = f"{m // _MiB} MiB pinned copy_"
    links = {
        "host-to-device": Link(
            name="host-to-device", src="host", dst="device", bandwidth=h2d,
            latency_s=copy_latency, concurrent_bandwidth=min(both_ways, h2d),
            description="PCIe, host to device",
        ),
        "device-to-host": Link(
            name="device-to-host", src="device", dst="host", bandwidth=d2h,
            latency_s=copy_latency, concurrent_bandwidth=min(both_ways, d2h),
            description="PCIe, device to host",
        ),
        "host-nvme": nvme_link,
    }  # fmt: skip
    note("links.host-to-device.bandwidth", pinned)
    note("links.device-to-host.bandwidth", pinned)
    for link in ("host-to-device", "device-to-host"):
        note(f"links.{link}.concurrent_bandwidth", f"{pinned}, both ways at once on two streams")
        note(f"links.{link}.latency_s", "median time of a 1-byte pinned copy_")
    return Hardware(
        name="calibrated-cuda", description="", device=device, tiers=tiers, links=links,
        host=host, cluster=Cluster(gpus_per_node=torch.cuda.device_count(), nodes=1),
    )  # fmt: skip


def _over_base(measured: Hardware, base: Hardware) -> Hardware:
    """``measured`` completed by ``base``: its cluster, extra tiers and links, untimed dtypes."""
    derate = base.device.compute_efficiency
    peaks = {k: v * derate for k, v in base.device.peak_flops.items()}
    peaks.update(measured.device.peak_flops)
    measured_pairs = {frozenset((l.src, l.dst)) for l in measured.links.values()}
    links = dict(measured.links)
    for name, link in base.links.items():
        if frozenset((link.src, link.dst)) not in measured_pairs and name not in links:
            links[name] = link
    tiers = dict(measured.tiers)
    for name, tier in base.tiers.items():
        tiers.setdefault(name, tier)
    for link in links.values():
        if link.src not in tiers or link.dst not in tiers:
            raise HardwareError(
                f"calibrate: base {base.name!r} link {link.name!r} joins unknown tiers"
            )
    return dataclasses.replace(
        measured,
        name=f"{base.name}-calibrated",
        device=dataclasses.replace(measured.device, peak_flops=peaks),
        tiers=tiers,
        links=links,
        cluster=base.cluster,
        sources=measured.sources + tuple(base.sources),
    )


# -- what the generated program and its runtime cost (RuntimeCosts) ------------------------------
#
# tierplan.codegen runs a plan as a generated straight-line program of torch.ops.aten calls, inside
# a module whose forward is an autograd Function over the model's parameters, and copies storages
# through a Context (inline on the CPU, CUDA streams, worker threads for swap files). The cost
# models cannot import codegen (tests/test_layering.py), so the probes below do what it does, with
# the same torch calls, on a small model made here.

_PROBE_COPY_BYTES = 4096  # a small storage: a copy's fixed cost, not its bytes


class _ProbeBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        x = x + self.proj(a)
        return x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))


class _Probe(nn.Module):
    """A small language model and a small conv net in one: the kinds of ops the zoo's small
    models run (embedding, layer norm, linear, attention, GELU, cross-entropy; convolution, batch
    norm, ReLU, pooling), at their sizes (2 x 32 tokens, 64 wide; 16 channels of 16 x 16)."""

    def __init__(self, layers: int, vocab: int = 256, d: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(32, d)
        self.blocks = nn.ModuleList(_ProbeBlock(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.conv, self.bn = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        return loss + F.max_pool2d(F.relu(self.bn(self.conv(image))), 2).mean()


def _probe(device: torch.device, layers: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(0)
    model = _Probe(layers).to(device)
    ids = torch.randint(0, 256, (2, 32), generator=gen).to(device)
    image = torch.randn(2, 8, 16, 16, generator=gen).to(device)
    return model, (ids, image)


class _Recorder(TorchDispatchMode):
    """Every aten call of a step, with its arguments (kept alive, to call it again)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _is_view(func: Any) -> bool:
    """An op whose output aliases an input (no kernel: the roofline prices it at 0)."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _generated_program(calls: list[tuple[Any, tuple[Any, ...], dict[str, Any]]]) -> Callable[[], Any]:
    """A straight-line program of ``calls``, written as tierplan.codegen writes one: one
    ``name = aten.op.overload(args)`` line per op, the previous value freed by the next line.
    Tensors and values without a literal are module constants."""
    constants: dict[str, Any] = {}

    def literal(x: Any) -> str:
        if x is None or isinstance(x, (bool, int, str)) or (isinstance(x, float) and x == x
                                                            and abs(x) != float("inf")):
            return repr(x)
        if isinstance(x, (list, tuple)):
            items = ", ".join(literal(v) for v in x)
            return f"[{items}]" if isinstance(x, list) else f"({items}{',' if len(x) == 1 else ''})"
        name = f"c{len(constants)}"
        constants[name] = x
        return name

    lines = []
    for func, args, kwargs in calls:
        text = str(func)
        fn = text if text.startswith("aten.") else f"torch.ops.{text}"
        parts = [literal(a) for a in args] + [f"{k}={literal(v)}" for k, v in kwargs.items()]
        lines.append(f"    value = {fn}({', '.join(parts)})")
    source = "def program():\n" + "\n".join(lines) + "\n    return value\n"
    namespace: dict[str, Any] = {"torch": torch, "aten": torch.ops.aten, **constants}
    exec(compile(source, "<tierplan-calibrate-program>", "exec"), namespace)  # noqa: S102
    return namespace["program"]


def _call_flops(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    """FLOPs of one aten call by torch.utils.flop_counter's formulas, as the annotate pass counts
    them (the CPU flash-attention kernels by the CUDA ones' formulas); 0 without a formula."""
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    like = {aten._scaled_dot_product_flash_attention_for_cpu: aten._scaled_dot_product_flash_attention,
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
                aten._scaled_dot_product_flash_attention_backward}  # fmt: skip
    packet = func.overloadpacket
    formula = flop_registry.get(like.get(packet, packet))
    if formula is None:
        return 0
    try:
        return int(formula(*args, **kwargs, out_val=out))
    except Exception:  # noqa: BLE001 - a formula that cannot read these args counts nothing
        return 0


def _call_roofline(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
                   device: Device) -> float:  # fmt: skip
    """The roofline time of one aten call (``compute.op_cost``), with its bytes counted as the
    annotate pass counts them: every distinct input tensor's elements and every output's; a view
    costs nothing."""
    from tierplan.cost_models.compute import op_time
    from tierplan.ir import OpInfo

    if _is_view(func):
        return 0.0

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    seen: set[int] = set()
    read = 0
    for t in pytree.tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            read += nbytes(t)
    written = sum(nbytes(t) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
    floats = [t.dtype for t in pytree.tree_leaves((args, out))
              if isinstance(t, torch.Tensor) and t.is_floating_point()]  # fmt: skip
    dtype = str(floats[0]).removeprefix("torch.") if floats else "float32"
    op = OpInfo(name="probe", target=str(func), inputs=[], outputs=[],
                flops=_call_flops(func, args, kwargs, out), bytes_read=read, bytes_written=written)
    return op_time(op, device, dtype)


@dataclass
class _ProbeStep:
    """One training step of the probe model, recorded as aten calls, and its generated program."""

    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    calls: list[tuple[Any, tuple[Any, ...], dict[str, Any]]]
    program: Callable[[], Any]
    seconds: float  # the program's time (median of the fastest quarter)


def _probe_step(device: torch.device, layers: int, budget_s: float, sync: Callable[[], None]) -> _ProbeStep:
    model, inputs = _probe(device, layers)
    recorder = _Recorder()
    with recorder:
        model(*inputs).backward()
    calls = [c for c in recorder.calls if c[0] is not operator.getitem]
    program = _generated_program(calls)
    return _ProbeStep(model, inputs, calls, program, _median_seconds(program, sync, budget_s))


def _op_issue_seconds(probe: _ProbeStep, dev: Device, budget_s: float,
                      sync: Callable[[], None]) -> float:  # fmt: skip
    """Seconds per op that the probe's generated program takes beyond the roofline of its ops on
    ``dev`` (``compute.op_time``: launch overhead, FLOPs, bytes; 0 for a view), and never less
    than a view takes in a program of the views alone (a line with no kernel: what any op costs at
    least, whatever the roofline's error the other way).

    What this is: the Python line and the ``OpOverload`` call, argument parsing, the output's
    allocation and the previous output's free, and what small kernels take beyond their roofline
    in a program (setup, caches cold after the other ops, few threads busy, a layer norm's or an
    attention's extra passes), less what they take below it (small tensors read from cache,
    faster than the DRAM bandwidth): the average residual of the roofline per op, views included,
    over a mix of ops like the zoo's small models'."""
    roofline = sum(_call_roofline(func, args, kwargs, func(*args, **kwargs), dev)
                   for func, args, kwargs in probe.calls)  # fmt: skip
    views = [c for c in probe.calls if _is_view(c[0])]
    per_view = _median_seconds(_generated_program(views), sync, budget_s) / len(views) if views else 0.0
    return max(per_view, (probe.seconds - roofline) / len(probe.calls))


class _EmulatedStep(torch.autograd.Function):
    """What ``tierplan.compile``'s module does around its program: an autograd Function over the
    parameters whose forward runs the program on their detached values and keeps the gradients
    it made, and whose backward returns them."""

    @staticmethod
    def forward(ctx: Any, program: Callable[[], Any], shapes: list[torch.Size],
                *flat: torch.Tensor) -> torch.Tensor:  # fmt: skip
        detached = [t.detach() for t in flat]  # noqa: F841 - the program's inputs
        program()
        # New gradients every step, as a program makes them (autograd takes them over as .grad;
        # gradients that something else still held would be copied).
        ctx.grads = [torch.empty(s, device=flat[0].device) for s in shapes]
        ctx.n_inputs = len(flat) - len(ctx.grads)  # the call's own tensors: no gradient
        return torch.ones((), device=flat[0].device)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        grads, ctx.grads = ctx.grads, None
        if not bool(torch.all(grad == 1)):
            grads = [g * grad for g in grads]
        return (None, None, *grads, *([None] * ctx.n_inputs))


def _step_seconds(probe: _ProbeStep, budget_s: float, sync: Callable[[], None]) -> tuple[float, int]:
    """Seconds one training step of a compiled module takes beyond its program (flatten the
    call, look the parameters up, check them, run the program in an autograd Function,
    ``loss.backward()`` hands the gradients to the parameters), and its number of inputs. The
    program is the probe's own step, so that the module's work runs after it as it does."""
    model, inputs, program = probe.model, probe.inputs, probe.program
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    owned = list(model.parameters())

    def step() -> None:
        for p in owned:  # none left from the last step (outside a step, in the caller's loop)
            p.grad = None
        leaves = [x for x in pytree.tree_leaves((inputs, {})) if isinstance(x, torch.Tensor)]
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        flat = [params[n] for n in names] + leaves
        for t, shape in zip(flat, shapes):
            if t.shape != shape or t.dtype != torch.float32:
                raise HardwareError("calibrate: the probe's parameters changed")
        for p in model.parameters():  # the runtime looks for gradients it must move out
            if p.grad is not None and p.grad.untyped_storage()._cdata == 0:
                raise HardwareError("calibrate: unreachable")
        del buffers
        _EmulatedStep.apply(program, shapes, *flat).backward()

    return max(0.0, _median_seconds(step, sync, budget_s) - probe.seconds), len(names) + len(inputs)


class _Transfer:
    """The runtime's handle of one copy (``codegen.runtime.Transfer``)."""

    __slots__ = ("storage", "done", "landed")

    def __init__(self, storage: str, done: Any = None) -> None:
        self.storage, self.done, self.landed = storage, done, None


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src)


def _copy_seconds_per_kind(device: torch.device, budget_s: float, scratch_dir: str | Path | None,
                           sync: Callable[[], None]) -> dict[str, float]:  # fmt: skip
    """Seconds per copy of a small storage, issued and waited for as the runtime does it, per
    kind of copy queue: ``inline`` (the compute thread copies it when the program issues it),
    ``thread`` (handed to a one-thread worker, waited for on its future), ``file`` (a swap file
    written, or read back, by the worker), and on CUDA ``stream`` (a copy stream that waits for
    the compute stream, an event recorded after the copy, the compute stream waiting for it).
    Each figure is a round trip (an offload and a fetch back) halved; the storage is 4 KiB, so
    its bytes take next to nothing."""
    n = _PROBE_COPY_BYTES
    cpu = torch.device("cpu")
    pin = device.type == "cuda"
    pool = torch.zeros(2 * n, dtype=torch.uint8, pin_memory=pin)
    slots = {"s": pool[:n]}
    value = torch.ones(n // 4, device=device)
    out: dict[str, float] = {}

    def storage_bytes(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())

    def alias(data: torch.Tensor) -> torch.Tensor:
        return torch.empty(0, dtype=torch.float32, device=data.device).set_(
            data.untyped_storage(), 0, (n // 4,), (1,))

    def round_trip(offload: Callable[[torch.Tensor, torch.Tensor], _Transfer],
                   fetch: Callable[[torch.Tensor, torch.Tensor], _Transfer]) -> Callable[[], None]:
        def run() -> None:
            pending: list[_Transfer] = []
            t = offload(slots["s"], storage_bytes(value))
            pending.append(t)
            wait(t, pending)
            landed = torch.empty(n, dtype=torch.uint8, device=device)
            t = fetch(landed, slots["s"])
            t.landed = landed
            pending.append(t)
            got = wait(t, pending)
            alias(got)
        return run

    def wait(t: _Transfer, pending: list[_Transfer]) -> Any:
        if t.done is not None:
            t.done.result() if hasattr(t.done, "result") else t.done()
            pending.remove(t)
        landed, t.landed = t.landed, None
        return landed

    if device.type == "cpu":
        def inline(dst: torch.Tensor, src: torch.Tensor | torch.UntypedStorage) -> _Transfer:
            # codegen.runtime.copy_bytes: a small copy is one memmove of the bytes
            count = src.nbytes() if isinstance(src, torch.UntypedStorage) else src.numel()
            if count != dst.numel():
                raise HardwareError("calibrate: the copy probe's sizes differ")
            ctypes.memmove(dst.data_ptr(), src.data_ptr(), count)
            return _Transfer("s")

        def inline_round_trip() -> None:
            wait(inline(slots["s"], value.untyped_storage()), [])  # offload: the whole storage
            landed = torch.empty(n, dtype=torch.uint8)
            t = inline(landed, slots["s"])  # fetch: the pool slot
            t.landed = landed
            alias(wait(t, []))

        out["inline"] = _median_seconds(inline_round_trip, sync, budget_s) / 2
    with ThreadPoolExecutor(1, thread_name_prefix="tierplan-calibrate") as worker:
        if device.type == "cpu":
            def threaded(dst: torch.Tensor, src: torch.Tensor) -> _Transfer:
                return _Transfer("s", worker.submit(_copy, dst, src))

            out["thread"] = _median_seconds(round_trip(threaded, threaded), sync, budget_s) / 2
        with tempfile.TemporaryDirectory(prefix="tierplan-calibrate-", dir=scratch_dir) as tmp:
            path = Path(tmp) / "s.bin"

            def write(_: torch.Tensor, src: torch.Tensor) -> _Transfer:
                host = src if src.device.type == "cpu" else src.to(cpu)
                return _Transfer("s", worker.submit(_write_file, path, host))

            def read(dst: torch.Tensor, _: torch.Tensor) -> _Transfer:
                return _Transfer("s", worker.submit(_read_file, path, dst))

            out["file"] = _median_seconds(round_trip(write, read), sync, budget_s) / 2
    if device.type == "cuda":
        stream = torch.cuda.Stream(device)

        def on_stream(dst: torch.Tensor, src: torch.Tensor) -> _Transfer:
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            return _Transfer("s", lambda: torch.cuda.current_stream(device).wait_event(event))

        out["stream"] = _median_seconds(round_trip(on_stream, on_stream), sync, budget_s) / 2
    return out


def _write_file(path: Path, data: torch.Tensor) -> None:
    with open(path, "wb") as f:
        f.write(memoryview(data.numpy()))


def _read_file(path: Path, landed: torch.Tensor) -> None:
    host = landed if landed.device.type == "cpu" else torch.empty_like(landed, device="cpu")
    with open(path, "rb") as f:
        f.readinto(memoryview(host.numpy()))
    if host is not landed:
        landed.copy_(host)
        torch.cuda.current_stream(landed.device).synchronize()


# The optimizer probe: as many parameters as a small model has, each of a few thousand elements.
_PROBE_PARAMS, _PROBE_PARAM_NUMEL = 16, 4096
_PROBE_STATE_FILES = 4  # AdamW's on NVMe: exp_avg, exp_avg_sq, step and the host master


def _optimizer_costs(budget_s: float, scratch_dir: str | Path | None) -> tuple[float, float]:
    """(param_update_s, state_file_s) of the placed optimizer's runtime, on the host CPU.

    ``TieredOptimizer`` (codegen, which this module cannot import) steps a scratch optimizer once
    per off-device parameter: the probe steps one AdamW per parameter of a small set and keeps
    the time per call less the arithmetic's DRAM time (32 bytes per element touched). Its NVMe
    states are one raw file per tensor, written to a temporary name and renamed over the old one,
    read ahead and written behind on worker threads: the probe updates its parameters the same
    way from 16 KiB files, and the time beyond the step calls is per file written or read.
    """
    params = [torch.zeros(_PROBE_PARAM_NUMEL, requires_grad=True) for _ in range(_PROBE_PARAMS)]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    optimizers = [torch.optim.AdamW([p], lr=1e-3, foreach=False) for p in params]

    def step_each() -> None:
        for opt in optimizers:
            opt.step()

    per_call = _median_seconds(step_each, lambda: None, budget_s) / _PROBE_PARAMS
    streaming = 32 * _PROBE_PARAM_NUMEL / _dram_bandwidth_estimate()
    param_update_s = max(0.0, per_call - streaming)
    root = Path(tempfile.mkdtemp(prefix="tierplan-calibrate-optim-", dir=scratch_dir))
    try:
        # Every parameter's states in files, updated as TieredOptimizer does: the next parameter's
        # files read ahead and the last one's written behind on a 2-thread pool.
        names = [[root / f"p{i}.s{j}.bin" for j in range(_PROBE_STATE_FILES)] for i in range(_PROBE_PARAMS)]
        values = [torch.zeros(_PROBE_PARAM_NUMEL) for _ in range(_PROBE_STATE_FILES)]
        for paths in names:
            _write_state_files(paths, values)

        def swap_each() -> None:
            with ThreadPoolExecutor(max_workers=2) as pool:
                reads = [pool.submit(_read_state_files, names[0])]
                write = None
                for i, opt in enumerate(optimizers):
                    states = reads.pop().result()
                    if i + 1 < len(names):
                        reads.append(pool.submit(_read_state_files, names[i + 1]))
                    opt.step()
                    if write is not None:
                        write.result()
                    write = pool.submit(_write_state_files, names[i], states)
                if write is not None:
                    write.result()

        per_swap = _median_seconds(swap_each, lambda: None, budget_s) / _PROBE_PARAMS
        state_file_s = max(0.0, per_swap - per_call) / (2 * _PROBE_STATE_FILES)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return param_update_s, state_file_s


def _write_state_files(paths: list[Path], tensors: list[torch.Tensor]) -> None:
    for path, t in zip(paths, tensors):
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(memoryview(t.detach().reshape(-1).contiguous().numpy()))
        os.replace(tmp, path)


def _read_state_files(paths: list[Path]) -> list[torch.Tensor]:
    out = []
    for path in paths:
        t = torch.empty(_PROBE_PARAM_NUMEL)
        with open(path, "rb") as f:
            f.readinto(memoryview(t.numpy()))
        out.append(t)
    return out


def _dram_bandwidth_estimate() -> float:
    """A DRAM bandwidth to take the probe's arithmetic off with (its tensors are cache-sized, so
    any realistic figure makes that term small)."""
    return 20e9


def _runtime_costs(device: torch.device, dev: Device, sizes: _Sizes,
                   scratch_dir: str | Path | None, note: Callable[[str, str], None]) -> RuntimeCosts:  # fmt: skip
    """The RuntimeCosts of this machine: see the probes above."""
    sync: Callable[[], None] = (
        (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    )
    budget = sizes.budget_s
    # A quick run probes one size (fewer timings, each shorter: a busy machine stretches them).
    quick = sizes.budget_s < _SIZES[(device.type, False)].budget_s
    if quick:
        budget /= 2
    probes = [_probe_step(device, layers, budget, sync) for layers in ((1,) if quick else (2, 1, 4))]
    issue = _op_issue_seconds(probes[0], dev, budget, sync)
    note("runtime.op_issue_s", f"a generated program of the {len(probes[0].calls)} aten calls of one "
                               f"training step of a small model ({1 if quick else 2} layers of "
                               f"attention and MLP, 64 wide, 2 x 32 tokens; a conv layer), its time "
                               f"less its ops' roofline on this device, per op (at least a view's "
                               f"time in a program of its views alone)"
                               f"{'; quick run: one size, one thread' if quick else ''}")
    points = [_step_seconds(probe, budget, sync) for probe in probes]
    n_mean = statistics.fmean(n for _, n in points)
    t_mean = statistics.fmean(t for t, _ in points)
    spread = sum((n - n_mean) ** 2 for _, n in points)
    per_input = sum((n - n_mean) * (t - t_mean) for t, n in points) / spread if spread else 0.0
    if per_input <= 0:  # one point (quick), or noise swamped the slope: all of it per input
        per_input = t_mean / n_mean
    step_s = t_mean - per_input * n_mean  # least squares
    step_s = step_s if step_s > 1e-9 else 0.0
    inputs = ", ".join(str(n) for _, n in sorted(points, key=lambda p: p[1]))
    note("runtime.input_s", f"a training step of the probe model with {inputs} inputs run as the "
                            f"compiled module runs it (parameter lookup, the program in an "
                            f"autograd Function, gradients handed back) less its program's time: "
                            f"the least-squares slope per input (one point: all of it per input)")
    note("runtime.step_s", "the intercept of that line")
    copies = _copy_seconds_per_kind(device, budget, scratch_dir, sync)
    what = f"round trip of a {_PROBE_COPY_BYTES // 1024} KiB storage, issued and waited for as the runtime does, halved"
    for kind, why in (("inline", "copied by the compute thread"), ("thread", "on a one-thread worker"),
                      ("stream", "on a CUDA copy stream with events"),
                      ("file", "a swap file written and read back by a worker thread")):  # fmt: skip
        if kind in copies:
            note(f"runtime.{kind}_copy_s", f"{what}, {why}")
    param_update_s, state_file_s = _optimizer_costs(budget, scratch_dir)
    note("runtime.param_update_s", f"one AdamW step call per parameter over {_PROBE_PARAMS} parameters of "
                                   f"{_PROBE_PARAM_NUMEL} elements (as TieredOptimizer steps its off-device "
                                   f"parameters), less the arithmetic's memory time, per parameter")
    note("runtime.state_file_s", f"{_PROBE_STATE_FILES} optimizer-state files written under a temporary name, "
                                 f"renamed, and read back, per file written or read")
    return RuntimeCosts(
        op_issue_s=issue, step_s=step_s, input_s=per_input,
        inline_copy_s=copies.get("inline", 0.0), thread_copy_s=copies.get("thread", 0.0),
        stream_copy_s=copies.get("stream", 0.0), file_copy_s=copies.get("file", 0.0),
        param_update_s=param_update_s, state_file_s=state_file_s,
    )
