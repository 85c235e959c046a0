"""What generated programs call at run time: the host pool, the swap directory, the copy queues.

A generated program (see ``emit.py``) is straight-line Python: one line per scheduled op and one
call into this module per transfer. Everything stateful lives in a ``Context`` made for one run:

- the **host pool**: one preallocated byte buffer (pinned when the device is a GPU); every storage
  the plan sends to a host-memory tier (host, or cxl: see ``in_host_pool``) has a static
  (offset, size) slot in it, packed by the emitter;
- the **device arena** (programs emitted with ``arena=True``, see ``arena.py``): one device byte
  buffer per run, allocated when the program starts (``Context.new_arena``), in which ops write
  their outputs (``.out`` overloads) and transfers to the device land, at static offsets; the
  gradients it returns are views of it, so it lives until the caller drops them (on a GPU the
  caching allocator then hands the same block to the next run);
- the **swap directory**: one file per storage the plan sends to the NVMe tier, removed when the
  run ends (returns, raises, or is interrupted);
- one **copy queue per plan channel queue**: on a GPU, device<->host copies run on their own CUDA
  stream ordered by CUDA events and file I/O on a worker thread (one per queue, so transfers on
  one queue run one after another as the plan's timing model assumes, and overlap the compute
  stream). On the CPU the device and host memory are the same DRAM: a copy between them is a
  memcpy that the compute thread makes itself when the program issues it (``inline``), since
  handing it to a worker thread costs a wake-up and a GIL hand-off (tens to hundreds of
  microseconds on a loaded machine, ``tierplan calibrate`` measures both) for a copy of a few
  microseconds, and a worker would share the same cores and memory bus with the compute anyway.
  Worse, a worker thread that runs a torch op gets an OpenMP thread team of its own: on a 2-core
  machine the two teams spin against each other, and once a plan's worker had copied, every
  compiled model in the process ran about 3x slower (gpt2-tiny's keep-all step 3.0 -> 9 ms).
  Small copies are one ``memmove`` of the storage's bytes, larger ones a (multi-threaded)
  ``copy_``. Swap-file I/O keeps its worker thread on the CPU too (a drive's latency can overlap
  compute).

On the CPU a program also asks glibc to keep freed memory (``keep_freed_memory``): by default it
returns a freed block of 128 KiB or more to the OS (and trims the heap's top), so a step that frees
its gradients and activations makes the next step fault its pages in again, zeroed by the kernel
(an 11 MiB MLP step took 2800 page faults, ~4 ms, more than its kernels). Set
``TIERPLAN_KEEP_FREED_MEMORY=0`` to leave malloc as it is.

Storages move as raw bytes: a transfer copies the whole storage behind a tensor, and the arrival
rebuilds the tensor (and any view of it the program still needs) over the landed bytes with the
geometry recorded at capture (``alias``). Destinations are allocated on the compute thread at the
start of the transfer, which is when the plan counts them.
"""
from __future__ import annotations

import ctypes
import os
import platform
import shutil
import sys
import tempfile
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tierplan.plans.plan import DEVICE, NVME


def in_host_pool(tier: str) -> bool:
    """Whether storages on ``tier`` live in the host pool: every off-device tier but NVMe. Host
    DRAM is; so is a CXL memory expander (tier "cxl"), which the CPU addresses as memory (a
    CPU-less NUMA node) and a GPU reaches by DMA like DRAM, so copies to and from it are the
    host's. NVMe storages live in swap files."""
    return tier not in (DEVICE, NVME)


# Inline (CPU) copies up to this size are one memmove; larger ones a copy_ on torch's threads.
_MEMMOVE_BYTES = 256 * 1024
# glibc mallopt parameters (malloc.h) and what keep_freed_memory sets them to.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
_TRIM_THRESHOLD = 512 * 2**20
_kept_freed_memory: bool | None = None


def keep_freed_memory() -> bool:
    """Ask glibc, once per process, to keep freed memory for reuse instead of returning it to the
    OS: blocks up to 32 MiB come from the heap (not a fresh mmap each time) and up to 512 MiB free
    at the heap's top stay mapped. Returns whether malloc is set so (False off glibc, or with
    ``TIERPLAN_KEEP_FREED_MEMORY=0``). See the module docstring."""
    global _kept_freed_memory
    if _kept_freed_memory is None:
        _kept_freed_memory = False
        if (os.environ.get("TIERPLAN_KEEP_FREED_MEMORY", "1") != "0" and sys.platform.startswith("linux")
                and platform.libc_ver()[0] == "glibc"):
            try:
                libc = ctypes.CDLL(None)
                _kept_freed_memory = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
                                          and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
            except (OSError, AttributeError):
                pass
    return _kept_freed_memory


def copy_bytes(dst: torch.Tensor, src: torch.Tensor | torch.UntypedStorage) -> None:
    """``dst`` (1-D uint8, contiguous, on the CPU) <- the bytes of ``src`` (1-D uint8, or a whole
    storage), on the calling thread: one memmove when small, else ``copy_``."""
    n = dst.numel()
    count = src.nbytes() if isinstance(src, torch.UntypedStorage) else src.numel()
    if count != n:
        raise TierplanRuntimeError(f"a copy of {count} bytes into {n}: the plan's sizes do not match the tensors")
    if n <= _MEMMOVE_BYTES:
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), n)
    elif isinstance(src, torch.UntypedStorage):
        dst.copy_(torch.empty(0, dtype=torch.uint8).set_(src))
    else:
        dst.copy_(src)


class TierplanRuntimeError(RuntimeError):
    """A generated program failed; the message names the plan step, the tensor and the source line."""


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 tensor over the whole storage behind ``t`` (views included)."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def alias(
    data: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], stride: tuple[int, ...], offset: int
) -> torch.Tensor:
    """A tensor of the given geometry over the storage of ``data``.

    ``offset`` (in elements of ``dtype``) counts from where ``data`` starts, so ``data`` may be a
    slot of the host pool as well as a whole storage.
    """
    itemsize = dtype.itemsize
    start = data.storage_offset() * data.element_size() // itemsize
    return torch.empty(0, dtype=dtype, device=data.device).set_(
        data.untyped_storage(), start + offset, shape, stride
    )


@dataclass
class Transfer:
    """One copy in flight: what the compute thread waits for, and what it gets at the end."""

    storage: str
    done: Future | None = None  # worker-thread copies (CPU, and file I/O everywhere)
    event: Any = None  # CUDA event recorded on the copy stream after the copy
    landed: torch.Tensor | None = None  # the destination bytes, on the device (arrivals only)
    dst: str = DEVICE


@dataclass
class Layout:
    """What the emitter decided about tiers other than the device; fixed for a program."""

    host_slots: dict[str, tuple[int, int]]  # storage -> (offset, nbytes) in the host pool
    host_pool_bytes: int
    queues: dict[str, str]  # "src->dst" -> queue name (the plan's channel queues)
    arena_bytes: int = 0  # the device arena (programs emitted with arena=True; see arena.py)


class Runtime:
    """Per-compiled-program resources that outlive one run: the host pool and the copy queues."""

    def __init__(self, layout: Layout, device: torch.device, swap_root: str | Path | None = None,
                 *, inline_copies: bool | None = None) -> None:
        self.layout = layout
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        # Copies between the device and host memory made on the compute thread when the program
        # issues them: the default on the CPU (see the module docstring); False hands them to a
        # worker thread per queue as file I/O is. Never on a GPU, whose copies run on streams.
        cpu = self.device.type == "cpu"
        self.inline = cpu if inline_copies is None else (bool(inline_copies) and cpu)
        self._slots: dict[str, torch.Tensor] = {}
        if cpu:
            keep_freed_memory()
        # The host pool is allocated once, before any run, so it is never part of a run's device
        # peak (and on a GPU it is pinned so device<->host copies are asynchronous).
        self.host_pool = torch.empty(
            layout.host_pool_bytes, dtype=torch.uint8, pin_memory=self.cuda and layout.host_pool_bytes > 0
        )
        # The device arena is NOT allocated here: every run allocates its own (Context.new_arena),
        # and its gradients keep it alive. This is the storage of the latest one, while it lives.
        self._last_arena: Callable[[], torch.UntypedStorage | None] = lambda: None
        self.swap_root = Path(swap_root) if swap_root is not None else None
        self._workers: dict[str, ThreadPoolExecutor] = {}
        self._streams: dict[str, Any] = {}
        self._lock = threading.Lock()

    def worker(self, queue: str) -> ThreadPoolExecutor:
        with self._lock:
            if queue not in self._workers:
                self._workers[queue] = ThreadPoolExecutor(1, thread_name_prefix=f"tierplan-{queue}")
            return self._workers[queue]

    def stream(self, queue: str) -> Any:
        if queue not in self._streams:
            self._streams[queue] = torch.cuda.Stream(device=self.device)
        return self._streams[queue]

    def latest_arena(self) -> torch.UntypedStorage | None:
        """The storage of the latest run's arena while anything (its gradients) keeps it alive."""
        return self._last_arena()

    def host_slot(self, storage: str) -> torch.Tensor:
        slot = self._slots.get(storage)
        if slot is None:  # made once per storage: a slot is a fixed view of the pool
            offset, nbytes = self.layout.host_slots[storage]
            slot = self._slots[storage] = self.host_pool[offset : offset + nbytes]
        return slot

    def close(self) -> None:
        shutdown_workers(self._workers)


def shutdown_workers(workers: dict[str, ThreadPoolExecutor]) -> None:
    """Stop a Runtime's copy threads. A free function so that ``weakref.finalize`` can call it on
    the Runtime's worker table without keeping the Runtime itself alive."""
    for w in workers.values():
        w.shutdown(wait=True)
    workers.clear()


class Context:
    """One run of a generated program: pending transfers and the swap directory.

    ``on_transfer`` (debugging, tests) is called with the Context and the storage name after
    every transfer is issued. ``on_gradient`` is called as ``on_gradient(key, grad)`` by programs
    emitted with gradient reports (``emit(..., gradients=...)``) as soon as each reported final
    gradient exists: a TieredOptimizer starts that parameter's host update there.
    """

    def __init__(self, runtime: Runtime, on_transfer: Callable[[Context, str], None] | None = None,
                 on_gradient: Callable[[Any, torch.Tensor], None] | None = None) -> None:
        self.rt = runtime
        self.device = runtime.device
        self.on_transfer = on_transfer
        self.on_gradient = on_gradient
        self._swap_dir: Path | None = None
        self._pending: list[Transfer] = []
        # GPU copies into host memory that the compute stream has waited for: the stream wait
        # orders later GPU work only, so the host (a caller reading an output the plan leaves in
        # the host pool) must synchronize on them before the run returns.
        self._host_events: list[Any] = []

    # -- the swap directory -------------------------------------------------------------------

    @property
    def swap_dir(self) -> Path:
        if self._swap_dir is None:
            root = self.rt.swap_root
            if root is not None:
                root.mkdir(parents=True, exist_ok=True)
            self._swap_dir = Path(tempfile.mkdtemp(prefix="tierplan-swap-", dir=root))
        return self._swap_dir

    def swap_file(self, storage: str) -> Path:
        return self.swap_dir / f"{storage}.bin"

    def host_bytes(self, storage: str) -> torch.Tensor:
        """The host-pool slot of ``storage`` (for outputs the plan leaves on the host)."""
        return self.rt.host_slot(storage)

    def stage_file(self, storage: str, tensor: torch.Tensor) -> None:
        """Write a caller-owned tensor the plan keeps on NVMe to its swap file (synchronously)."""
        _write_file(self.swap_file(storage), storage_bytes(tensor), None)

    def read_file(self, storage: str, nbytes: int) -> torch.Tensor:
        """The bytes of ``storage``'s swap file, in a new host tensor (outputs left on NVMe)."""
        host = torch.empty(nbytes, dtype=torch.uint8)
        _read_file(self.swap_file(storage), host, None)
        return host

    def drop_file(self, storage: str) -> None:
        """The plan frees ``storage`` from the NVMe tier: its file goes."""
        self.swap_file(storage).unlink(missing_ok=True)

    def close(self) -> None:
        """Finish every copy still running (their buffers must outlive them), then remove the
        swap directory. Called when a run ends, however it ends."""
        for t in self._pending:
            try:
                if t.done is not None:
                    t.done.result()
                elif t.event is not None:
                    t.event.synchronize()
            except BaseException:  # noqa: BLE001 - the run's own error is the one to report
                pass
        self._pending.clear()
        for event in self._host_events:
            event.synchronize()
        self._host_events.clear()
        if self._swap_dir is not None:
            shutil.rmtree(self._swap_dir, ignore_errors=True)
            self._swap_dir = None

    @staticmethod
    def check_planned(name: str, value: Any, planned: Any) -> None:
        """Raise unless the size input ``name`` (a graph traced with dynamic shapes) is the value
        the plan was made at: every tensor size, transfer and host slot of the plan depends on it."""
        if value != planned:
            raise TierplanRuntimeError(
                f"input {name} is {value}, but this program's plan was made for {name} = {planned}; "
                f"its tensor sizes, transfers and host slots hold only there: plan this shape anew "
                f"(torch.compile recompiles for a new size when its guards are specialized)"
            )

    @staticmethod
    def handoff(*outputs: Any) -> tuple[Any, ...]:
        """What a split program yields: its forward outputs as new tensor objects over the same
        storages (no copy), so the caller's references and the program's are distinct."""
        return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in outputs)

    def gradient_ready(self, key: Any, grad: torch.Tensor) -> None:
        """The program made ``grad``, the final gradient reported as ``key``: tell the listener."""
        if self.on_gradient is not None:
            self.on_gradient(key, grad)

    # -- random ops that are recomputed -----------------------------------------------------------

    def rng_state(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.rt.cuda else torch.get_rng_state()

    def replay_rng(self, state: torch.Tensor, run: Callable[[], Any]) -> Any:
        """Run ``run`` from RNG ``state`` (so a recomputed dropout draws its mask again), then put
        the generator back where it was."""
        now = self.rng_state()
        setter = (lambda s: torch.cuda.set_rng_state(s, self.device)) if self.rt.cuda else torch.set_rng_state
        setter(state)
        try:
            return run()
        finally:
            setter(now)

    # -- transfers ----------------------------------------------------------------------------

    def new_arena(self) -> torch.Tensor:
        """This run's device arena (1-D uint8, ``layout.arena_bytes``), allocated now, on the
        compute stream. The Context keeps no reference: the program's views of it (and the
        gradients it returns) are what keep it alive."""
        arena = torch.empty(self.rt.layout.arena_bytes, dtype=torch.uint8, device=self.device)
        self.rt._last_arena = weakref.ref(arena.untyped_storage())
        return arena

    def start(
        self, storage: str, tensor: torch.Tensor | None, src: str, dst: str, nbytes: int,
        into: torch.Tensor | None = None, raw: bool = False,
    ) -> Transfer:
        """Issue the copy of ``storage`` from ``src`` to ``dst``; ``tensor`` is its device value
        when ``src`` is the device (with ``raw``, already its bytes: a slot of the arena).
        ``into`` (arena programs) is the device bytes an arrival lands in; otherwise they are
        allocated here."""
        if self.rt.inline and in_host_pool(dst if src == DEVICE else src):
            # The CPU: the compute thread copies it now (see the module docstring).
            if src == DEVICE:
                assert tensor is not None
                copy_bytes(self.rt.host_slot(storage), tensor if raw else tensor.untyped_storage())
                t = Transfer(storage, dst=dst)
            else:
                landed = into if into is not None else torch.empty(nbytes, dtype=torch.uint8)
                copy_bytes(landed, tensor.untyped_storage() if tensor is not None else self.rt.host_slot(storage))
                t = Transfer(storage, landed=landed)
            if self.on_transfer is not None:
                self.on_transfer(self, storage)
            return t
        queue = self.rt.layout.queues[f"{src}->{dst}"]
        if src == DEVICE:
            assert tensor is not None
            t = self._offload(storage, tensor if raw else storage_bytes(tensor), dst, queue)
            t.dst = dst
        else:
            t = self._fetch(storage, src, queue, nbytes, tensor, into)
        if t.done is not None or t.event is not None:  # in flight (an inline copy is done)
            self._pending.append(t)
        if self.on_transfer is not None:
            self.on_transfer(self, storage)
        return t

    def wait(self, t: Transfer) -> torch.Tensor | None:
        """The compute stream waits for ``t``; returns the landed bytes of an arrival."""
        if t.done is not None:
            t.done.result()
        if t.event is not None:
            torch.cuda.current_stream(self.device).wait_event(t.event)
            if t.dst != DEVICE:
                self._host_events.append(t.event)
        if t.done is not None or t.event is not None:
            self._pending.remove(t)
        landed, t.landed = t.landed, None  # the handle must not keep the storage alive
        return landed

    def _offload(self, storage: str, data: torch.Tensor, dst: str, queue: str) -> Transfer:
        if in_host_pool(dst):
            slot = self.rt.host_slot(storage)
            if self.rt.cuda:
                return self._on_stream(storage, queue, lambda: slot.copy_(data, non_blocking=True))
            return Transfer(storage, done=self.rt.worker(queue).submit(_copy, slot, data))
        path = self.swap_file(storage)
        ready = self._compute_event()
        return Transfer(storage, done=self.rt.worker(queue).submit(_write_file, path, data, ready))

    def _fetch(
        self, storage: str, src: str, queue: str, nbytes: int, tensor: torch.Tensor | None,
        into: torch.Tensor | None = None,
    ) -> Transfer:
        # The destination is allocated here, on the compute stream, when the plan counts it
        # (or is its slot of the arena).
        landed = into if into is not None else torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if in_host_pool(src):
            # A caller-owned tensor that lives in host memory is read in place; anything else the
            # program sent to a host-memory tier is in its pool slot.
            slot = storage_bytes(tensor) if tensor is not None else self.rt.host_slot(storage)
            if self.rt.cuda:
                t = self._on_stream(storage, queue, lambda: landed.copy_(slot, non_blocking=True))
            else:
                t = Transfer(storage, done=self.rt.worker(queue).submit(_copy, landed, slot))
        else:
            path = self.swap_file(storage)
            ready = self._compute_event()
            t = Transfer(storage, done=self.rt.worker(queue).submit(_read_file, path, landed, ready))
        t.landed = landed
        return t

    def _on_stream(self, storage: str, queue: str, copy: Callable[[], Any]) -> Transfer:
        stream = self.rt.stream(queue)
        # The copy stream waits for everything the compute stream issued so far (the source's
        # producer, the destination's allocation).
        # No record_stream: both tensors were allocated on the compute stream, and the program
        # frees neither before its wait, which makes the compute stream wait for this event, so a
        # later reuse of either block by the caching allocator is ordered after the copy (the
        # validator rejects plans that free a source while its copy is in flight).
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            copy()
            event = torch.cuda.Event()
            event.record(stream)
        return Transfer(storage, event=event)

    def _compute_event(self) -> Any:
        if not self.rt.cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event


# -- worker-thread jobs (they return nothing, so a finished future keeps no tensor alive) ------


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src)


def _write_file(path: Path, data: torch.Tensor, ready: Any) -> None:
    if ready is not None:
        ready.synchronize()
    host = data if data.device.type == "cpu" else data.to("cpu")
    with open(path, "wb") as f:
        f.write(memoryview(host.numpy()))


def _read_file(path: Path, landed: torch.Tensor, ready: Any) -> None:
    if ready is not None:
        ready.synchronize()
    host = landed if landed.device.type == "cpu" else torch.empty_like(landed, device="cpu")
    with open(path, "rb") as f:
        read = f.readinto(memoryview(host.numpy()))
    if read != host.numel():
        raise TierplanRuntimeError(f"swap file {path} holds {read} bytes, expected {host.numel()}")
    if host is not landed:
        landed.copy_(host)
        torch.cuda.current_stream(landed.device).synchronize()


def run_step(
    step_fn: Callable[..., Any],
    ctx: Context,
    inputs: list[torch.Tensor],
    *,
    source_path: str,
    line_steps: dict[int, str],
) -> Any:
    """Run a generated ``step`` and always close ``ctx`` (swap files go, copies finish).

    A failure inside the generated code is re-raised as TierplanRuntimeError naming the plan
    step (and so the op or tensor) at the failing line; KeyboardInterrupt passes through as is.
    """
    try:
        return step_fn(ctx, *inputs)
    except Exception as exc:
        where = _failing_step(exc, source_path, line_steps)
        if where is None:
            raise
        raise TierplanRuntimeError(f"{where}: {type(exc).__name__}: {exc}") from exc
    finally:
        ctx.close()


class SplitRun:
    """One forward..backward of a split (generator) program: ``forward()`` runs it to the yield
    and returns the forward outputs; ``backward(late)`` sends the late inputs (tangents) and
    returns the gradients. ``ctx`` is closed when the run ends, fails, or is abandoned (a forward
    whose backward never comes)."""

    def __init__(
        self, step_fn: Callable[..., Any], ctx: Context, inputs: list[torch.Tensor], *,
        source_path: str, line_steps: dict[int, str],
    ) -> None:
        self.ctx = ctx
        self.source_path, self.line_steps = source_path, line_steps
        self._gen = step_fn(ctx, *inputs)
        self.done = False

    def _send(self, value: Any) -> tuple[bool, Any]:
        try:
            return False, self._gen.send(value)
        except StopIteration as stop:
            return True, stop.value
        except Exception as exc:
            self.abandon()
            where = _failing_step(exc, self.source_path, self.line_steps)
            if where is None:
                raise
            raise TierplanRuntimeError(f"{where}: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            self.abandon()
            raise

    def forward(self) -> Any:
        finished, value = self._send(None)
        if finished:
            self.abandon()
            raise TierplanRuntimeError("the split program returned before its yield")
        return value

    def backward(self, late: list[Any]) -> Any:
        if self.done:
            raise TierplanRuntimeError(
                "this forward's backward already ran (or was abandoned); a planned step's backward "
                "runs once - use retain_graph=False and one backward per forward"
            )
        finished, value = self._send(list(late))
        self.abandon()
        if not finished:
            raise TierplanRuntimeError("the split program yielded twice")
        return value

    def abandon(self) -> None:
        if not self.done:
            self.done = True
            self._gen.close()
            self.ctx.close()


def _failing_step(exc: BaseException, source_path: str, line_steps: dict[int, str]) -> str | None:
    tb = exc.__traceback__
    found = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == source_path:
            found = tb.tb_lineno
        tb = tb.tb_next
    if found is None:
        return None
    step = line_steps.get(found, "outside any plan step")
    return f"{step} failed at {source_path}:{found}"


__all__ = [
    "Context", "Layout", "Runtime", "SplitRun", "TierplanRuntimeError", "Transfer", "alias",
    "copy_bytes", "in_host_pool", "keep_freed_memory", "run_step",
    "storage_bytes",
]
