"""Measure this machine and describe it as a Hardware (what ``tierplan calibrate`` runs).

Spec sheets give peaks; a plan is only as good as the rates it assumes, so this measures the
rates that the cost models use, on the machine at hand:

- matmul throughput per dtype: 2 n^3 FLOPs over the median time of an n x n x n ``torch.mm``
  (CPU: float32, bfloat16; CUDA: float32 with TF32 off, tf32, bfloat16, float16);
- memory bandwidth: a ``copy_`` of a buffer larger than the last-level cache, counted as bytes
  read plus bytes written (2 n), as the roofline counts an op's bytes;
- per-op overhead: the median time of a one-element ``torch.add`` (dispatch, plus the kernel launch
  on CUDA, where back-to-back launches are timed between synchronizations);
- copy bandwidths: CPU memcpy within DRAM for the device<->host link of the CPU machine; on CUDA
  host->device and device->host from pinned memory, alone and both at once on two streams;
- the nvme tier: sequential write (with fsync) and read bandwidth of a file in a temporary
  directory, the page cache dropped in between with posix_fadvise where the OS has it, and the
  latency of a 4 KiB read. The directory is removed afterwards, on errors too.

Every time is taken after a warm-up call, over samples of several calls each (long enough to swamp
timer resolution), as the median of the fastest quarter of the samples: interference from other
processes only ever adds time, and on a shared machine it hits most samples (see
``_median_seconds``). Rates are achieved rates, so a calibrated device has efficiency factors of 1.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tierplan.cost_models.hardware import (
    Cluster,
    Device,
    Hardware,
    HardwareError,
    Host,
    Link,
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
    hw = dataclasses.replace(
        hw,
        description=f"{hw.device.name}, {stamp}",
        sources=(
            f"{stamp} with torch {torch.__version__}, {threads} CPU threads "
            f"({'quick' if quick else 'full'} run)",
        ),
    )
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
    note("device.memory_bandwidth", "as host.dram_bandwidth (the device is the CPU)")
    memcpy = host.dram_bandwidth / 2  # a copy of n bytes moves 2n: n per direction of the "link"
    device = Device(
        name=host.name, kind="cpu", memory_bytes=host.dram_bytes,
        memory_bandwidth=host.dram_bandwidth, peak_flops=peaks, launch_overhead_s=dispatch,
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
    links = {
        "device-host": Link(
            name="device-host", src="device", dst="host", bandwidth=memcpy,
            latency_s=dispatch, duplex=False, description="memcpy within DRAM (one memory bus)",
        ),
        "host-nvme": nvme_link,
    }  # fmt: skip
    note("links.device-host.bandwidth", "copy_ within DRAM, bytes copied per second")
    note("links.device-host.latency_s", "as device.launch_overhead_s")
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
