"""Greedy generation with a Hugging Face causal LM whose weights and KV cache live on planned tiers.

``TieredGenerator(model, policy)`` carries out a ``GenerationPolicy`` (``tierplan.plans.generation``):
FlexGen's schedule (Sheng et al., ICML 2023) run by the model's own forward, with the runtime in
charge of where every weight and cache block is. What runs where:

- **weights**: a parameter on the ``device`` tier is moved there once, at construction. One on
  ``host`` stays in host memory (pinned on a GPU, so its copies are asynchronous); one on ``nvme``
  is written to a file in the swap directory and its host copy dropped. The model's modules hold a
  placeholder (a meta tensor: shape and dtype, no memory) for every parameter not on the device.
  Before a decoder layer runs, its streamed parameters are materialized: fresh device tensors,
  allocated on the calling thread (where the plan counts them, and where a CPU ``StorageTracker``
  can see them), filled from the host copy or the file, and swapped into the modules; after the
  layer they go back to placeholders, which frees them. Layer ``i + 1``'s load is issued when
  layer ``i`` starts, so it overlaps layer ``i``'s compute, and at most two layers' streamed
  weights are on the device at once (the running one and the prefetched one). NVMe reads run on a
  worker thread into one of two host staging buffers (one per layer in flight). On a GPU the
  host->device copies run on a side stream ordered by CUDA events; on the CPU the device and the
  host are the same DRAM, so the compute thread copies host weights itself when the load is
  issued, and copies an NVMe weight out of its staging buffer when the layer needs it: a worker
  thread's copy costs a wake-up and a GIL hand-off for a memcpy of microseconds, and a worker that
  runs torch ops gets an OpenMP team of its own that fights the compute thread's (see
  ``tierplan.codegen.runtime``). The parameters outside the decoder layers (embeddings, final
  norm, head) are materialized once for the whole of ``generate()``: every step needs them.
- **KV cache**: a transformers ``Cache`` of ``TieredKVLayer`` layers, laid out when a generation
  starts for ``prompt + max_new_tokens`` positions of the whole batch. Each layer's positions are
  split into blocks of ``kv_block_tokens``; a block's K and V (each ``[batch, kv_heads, tokens,
  head_dim]``) are device tensors, host tensors (pinned on a GPU), or two files in the swap
  directory, read into a host staging buffer before the layer's attention and written back after
  the layer's last micro-batch (reads of layer ``i + 1``'s blocks are issued when layer ``i``
  starts, on the cache's worker thread, which also orders every write before the next read of the
  same file). ``update`` writes the new positions into their blocks and returns K and V up to the
  current length, assembled from the blocks: a fresh device tensor when attention runs on the
  device (freed when the layer's attention drops it), or a view of a preallocated host workspace
  when attention runs on the host.
- **attention on the host** (``policy.attention == "host"``, FlexGen's CPU attention): the model
  is switched to the ``tierplan_host`` attention function for the duration of ``generate()``; it
  moves the query (and mask) to the host, runs transformers' own SDPA attention there next to the
  cache, and sends the output back; the policy then keeps every cache block off the device. On
  the CPU the tokens are identical to device attention: the same kernel reads the same values.
- **micro-batches** (``num_gpu_batches > 1``): each decoder layer runs its micro-batches one after
  another, its weights loaded once for all of them: the layer's forward is wrapped so that every
  argument whose first dimension is the batch is split into micro-batches, the cache is told which
  rows run, and the outputs are concatenated.
- **activations on the host** (``policy.activations == "host"``, FlexGen's activation placement):
  between decoder layers the block's hidden states wait in a host buffer, not on the device. Each
  micro-batch's input rows are copied in just before its forward (layer 0's are taken from the
  embedding output, already on the device) and its output rows copied out into the layer's output
  buffer right after, so the device holds one micro-batch's hidden states in and out instead of the
  block's. Two buffers (pinned on a GPU) of ``batch x prompt x hidden`` are allocated when a
  generation starts, layer ``i`` reading one and writing the other; a step of ``q`` tokens uses
  their first ``batch * q * hidden`` elements as a contiguous ``[batch, q, hidden]`` (so a
  micro-batch's rows are one contiguous span, which an asynchronous copy needs). The last layer
  returns its output on the device, where the final norm and head run, so its micro-batches'
  outputs gather there; and the embedding output stays on the device for the whole step in any
  case (the model's forward holds it: Llama's ``inputs_embeds``). On a GPU both copies are
  ``non_blocking`` and issued on the current stream: the compute thread does not wait for them and
  they overlap the weight streamer's side-stream copies, but not the compute: a micro-batch's
  copy-in runs after the previous micro-batch's compute and copy-out, and that stream order is
  also what keeps layer ``i + 1`` from reading a buffer before layer ``i``'s copy-out into it is
  done (the host thread never touches the buffers).

The swap directory (``tempfile.mkdtemp(prefix="tierplan-gen-", dir=swap_root)``) exists only when
the policy puts something on NVMe. The cache's files live in a subdirectory made for one
generation and removed when it ends, however it ends; the directory itself goes with ``close()``
(which also hands the model back: every parameter in its modules again, the device ones on the
device, the others in host memory), with a ``KeyboardInterrupt`` during a generation, or when the
generator is garbage-collected (``weakref.finalize``).

``measure_generate`` runs a generation inside a ``StorageTracker`` (``tierplan.codegen.measure``)
that counts device-tier storages only: the device-tier weights and cache blocks are ``existing``,
every host-tier buffer (host weights, host cache blocks, staging buffers, the host attention
workspace, the host activation buffers) is allocated before the tracker starts and ``exclude``d.
On the CPU the tracker cannot tell host work from device work otherwise; what it still counts of
host attention is its output, which on a GPU lands on the device anyway, and of host activations
the micro-batch copies made on the device.
"""
from __future__ import annotations

import inspect
import math
import shutil
import tempfile
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tierplan.codegen.measure import StorageTracker
from tierplan.codegen.runtime import TierplanRuntimeError, keep_freed_memory
from tierplan.passes.decoder import check_cache_capture, decoder_layers, kv_geometry, layer_of, text_config
from tierplan.plans.generation import GenerationPolicy
from tierplan.plans.plan import DEVICE, HOST, NVME

HOST_ATTENTION = "tierplan_host"  # the attention function the model is switched to for host attention
_ALIGN = 64  # byte alignment of weights in a staging buffer (any dtype can view them)


# -- files ----------------------------------------------------------------------------------------


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor's memory as a 1-D uint8 tensor (no copy)."""
    if not t.is_contiguous():  # reshape would copy, and a read would land in the copy
        raise TierplanRuntimeError(f"swap-file I/O needs a contiguous tensor, not strides {t.stride()}")
    return t.reshape(-1).view(torch.uint8)


def _write_file(path: Path, data: torch.Tensor) -> None:
    with open(path, "wb") as f:
        f.write(memoryview(_bytes_of(data).numpy()))


def _read_file(path: Path, into: torch.Tensor) -> None:
    """Fill ``into`` (a contiguous CPU tensor) with the bytes of ``path``."""
    dst = _bytes_of(into)
    with open(path, "rb") as f:
        read = f.readinto(memoryview(dst.numpy()))
    if read != dst.numel():
        raise TierplanRuntimeError(f"swap file {path} holds {read} bytes, expected {dst.numel()}")


def _host_empty(shape: Sequence[int], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, pin_memory=pinned)


# -- weights --------------------------------------------------------------------------------------


@dataclass(eq=False)
class Weight:
    """One parameter of the model and where it lives. ``param`` is the model's own Parameter
    object: its ``.data`` is the device copy (device tier), the host copy (host tier), or empty
    (NVMe: the bytes are in ``file``). ``sites`` are every (module, attribute) holding it (tied
    weights have several)."""

    name: str
    param: nn.Parameter
    sites: tuple[tuple[nn.Module, str], ...]
    tier: str
    layer: int | None  # decoder layer, None outside the layers
    shape: torch.Size
    dtype: torch.dtype
    nbytes: int
    placeholder: nn.Parameter  # what the modules hold while the weight is not on the device
    file: Path | None = None  # NVMe: written and host copy dropped
    offset: int = 0  # NVMe: where it lands in its group's staging buffer


@dataclass
class _Load:
    """A group's (one layer's, or the non-layer parameters') streamed weights on their way in."""

    group: int | None
    weights: list[Weight]
    tensors: list[torch.Tensor]  # the device tensors, allocated when the load was issued
    slot: int  # staging buffer of its NVMe weights
    reads: Future | None = None  # NVMe reads (on a GPU also their copies; the value: the copy event)
    event: Any = None  # GPU: the host-tier copies are done


@dataclass
class GenerationStats:
    """What the last generation moved (reset by every ``generate``)."""

    steps: int = 0  # forwards: the prefill and one per further token
    layer_loads: int = 0  # decoder-layer loads of streamed weights
    weight_bytes_streamed: int = 0  # bytes of weights copied to the device, layers and the rest
    max_layers_on_device: int = 0  # most decoder layers' streamed weights on the device at once


def _collect_weights(model: nn.Module, policy: GenerationPolicy, prefix: str) -> list[Weight]:
    named = dict(model.named_parameters())
    missing = [n for n in named if n not in policy.weight_tiers]
    unknown = [n for n in policy.weight_tiers if n not in named]
    if missing or unknown:
        raise ValueError(
            f"the policy's weight_tiers must name every parameter of {type(model).__name__} "
            f"(model.named_parameters()); missing: {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unknown: {unknown[:5]}{'...' if len(unknown) > 5 else ''}"
        )
    sites: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                sites.setdefault(id(p), []).append((module, attr))
    return [
        Weight(name, p, tuple(sites[id(p)]), policy.weight_tiers[name], layer_of(name, prefix), p.shape,
               p.dtype, p.numel() * p.element_size(),
               nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False))
        for name, p in named.items()
    ]


class WeightStreamer:
    """Places the weights on their tiers and streams the non-device ones in and out by group."""

    def __init__(self, weights: list[Weight], device: torch.device, swap_dir: Path | None,
                 worker: ThreadPoolExecutor) -> None:
        self.weights = weights
        self.device = device
        self.cuda = device.type == "cuda"
        self.swap_dir = swap_dir
        self.worker = worker
        self.stats = GenerationStats()  # the generator puts a fresh one in for every generation
        self.groups: dict[int | None, list[Weight]] = {}
        for w in weights:
            if w.tier != DEVICE:
                self.groups.setdefault(w.layer, []).append(w)
        self.staging: list[torch.Tensor] = []
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._slot_events: list[Any] = [None, None]  # GPU: the last copy out of each slot (worker only)
        self.on_device: set[int] = set()  # decoder layers whose streamed weights are allocated

    # -- construction and hand-back -----------------------------------------------------------

    def place(self) -> None:
        """Move every weight to its tier; the modules hold placeholders for the non-device ones.
        Staging buffers are allocated here, before any generation (and any tracker)."""
        slot_bytes = 0
        for group in self.groups.values():
            offset = 0
            for w in group:
                if w.tier == NVME:
                    w.offset = offset
                    offset += -(-w.nbytes // _ALIGN) * _ALIGN
            slot_bytes = max(slot_bytes, offset)
        if slot_bytes:
            self.staging = [_host_empty([slot_bytes], torch.uint8, self.cuda) for _ in range(2)]
        for i, w in enumerate(self.weights):
            with torch.no_grad():
                if w.tier == DEVICE:
                    w.param.data = w.param.data.to(self.device)
                    continue
                host = w.param.data.to("cpu").contiguous()
                if w.tier == NVME:
                    assert self.swap_dir is not None
                    path = self.swap_dir / f"weight-{i:05d}.bin"
                    _write_file(path, host)
                    w.file = path
                    w.param.data = torch.empty(0, dtype=w.dtype)  # the host copy goes
                else:
                    w.param.data = host.pin_memory() if self.cuda else host
            self._put(w, w.placeholder)

    def restore(self) -> None:
        """Hand the model back: every parameter in its modules, NVMe ones read back to host."""
        for w in self.weights:
            if w.file is not None and w.file.exists():
                data = torch.empty(w.shape, dtype=w.dtype)
                _read_file(w.file, data)
                w.param.data = data
                w.file = None
            self._put(w, w.param)

    def device_tensors(self) -> list[torch.Tensor]:
        return [w.param.data for w in self.weights if w.tier == DEVICE]

    def host_tensors(self) -> list[torch.Tensor]:
        return [w.param.data for w in self.weights if w.tier == HOST] + list(self.staging)

    # -- streaming ----------------------------------------------------------------------------

    def fetch(self, group: int | None) -> _Load:
        """Issue the load of ``group``'s streamed weights: device tensors allocated now, on the
        calling thread; host ones copied (inline on the CPU, on the side stream on a GPU); NVMe
        ones read on the worker."""
        weights = self.groups.get(group, [])
        tensors = [torch.empty(w.shape, dtype=w.dtype, device=self.device) for w in weights]
        load = _Load(group, weights, tensors, slot=0 if group is None else group % 2)
        if not weights:
            return load
        if group is not None:
            self.on_device.add(group)
            self.stats.layer_loads += 1
            self.stats.max_layers_on_device = max(self.stats.max_layers_on_device, len(self.on_device))
        self.stats.weight_bytes_streamed += sum(w.nbytes for w in weights)
        host = [(w, t) for w, t in zip(weights, tensors) if w.tier != NVME]
        nvme = [(w, t) for w, t in zip(weights, tensors) if w.tier == NVME]
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))  # the allocations above
            if host:
                with torch.cuda.stream(self._stream):
                    self._stream.wait_event(ready)
                    for w, t in host:
                        t.copy_(w.param.data, non_blocking=True)
                    load.event = torch.cuda.Event()
                    load.event.record(self._stream)
            if nvme:
                load.reads = self.worker.submit(self._read_and_copy, load.slot, nvme, ready)
        else:
            for w, t in host:  # the CPU: the compute thread copies now (module docstring)
                t.copy_(w.param.data)
            if nvme:
                load.reads = self.worker.submit(self._read_files, load.slot, [w for w, _ in nvme])
        return load

    def install(self, load: _Load) -> None:
        """Wait for ``load`` and swap its device tensors into the modules."""
        if load.event is not None:
            torch.cuda.current_stream(self.device).wait_event(load.event)
        if load.reads is not None:
            done = load.reads.result()
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(done)
            else:  # the compute thread copies out of the staging buffer (module docstring)
                for w, t in zip(load.weights, load.tensors):
                    if w.tier == NVME:
                        t.copy_(self._staged(load.slot, w))
        for w, t in zip(load.weights, load.tensors):
            self._put(w, nn.Parameter(t, requires_grad=False))
        load.tensors = []  # the modules hold them now: releasing them frees them

    def release(self, group: int | None) -> None:
        """Back to placeholders: the group's device copies are freed."""
        for w in self.groups.get(group, []):
            self._put(w, w.placeholder)
        if group is not None:
            self.on_device.discard(group)

    def discard(self, load: _Load) -> None:
        """Drop a load that was issued but never installed, once its copies are done (their
        destination must outlive them)."""
        try:
            done = load.reads.result() if load.reads is not None else None
            for event in (load.event, done):
                if event is not None:
                    event.synchronize()
        except Exception:  # noqa: BLE001 - the generation's own error is the one to report
            pass
        load.tensors = []
        if load.group is not None:
            self.on_device.discard(load.group)

    # -- worker-thread jobs -------------------------------------------------------------------

    def _staged(self, slot: int, w: Weight) -> torch.Tensor:
        return self.staging[slot][w.offset : w.offset + w.nbytes].view(w.dtype).view(w.shape)

    def _read_files(self, slot: int, weights: list[Weight]) -> None:
        for w in weights:
            assert w.file is not None
            _read_file(w.file, self._staged(slot, w))

    def _read_and_copy(self, slot: int, pairs: list[tuple[Weight, torch.Tensor]], ready: Any) -> Any:
        # The slot's previous copy to the device must be done before its bytes are overwritten.
        if self._slot_events[slot] is not None:
            self._slot_events[slot].synchronize()
        self._read_files(slot, [w for w, _ in pairs])
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            for w, t in pairs:
                t.copy_(self._staged(slot, w), non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._slot_events[slot] = event
        return event

    @staticmethod
    def _put(w: Weight, value: nn.Parameter) -> None:
        for module, attr in w.sites:
            module._parameters[attr] = value


# -- the KV cache ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVLayout:
    """The cache of one generation: ``batch`` sequences of up to ``capacity`` positions, in blocks
    of ``block_tokens`` positions on ``tiers`` (one per block, every layer alike)."""

    batch: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_tokens: int
    tiers: tuple[str, ...]
    capacity: int

    @property
    def block_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.kv_heads, self.block_tokens, self.head_dim)

    def spans(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(block, first, last + 1) of the positions of [start, end) in each block they touch."""
        t = self.block_tokens
        for b in range(start // t, -(-end // t)):
            yield b, max(start, b * t), min(end, (b + 1) * t)

    def nvme_blocks(self, end: int) -> list[int]:
        return [b for b, _, _ in self.spans(0, end) if self.tiers[b] == NVME]


@dataclass
class _CacheRun:
    """What the generator tells the cache as it goes."""

    step: int = 0
    step_end: int = 0  # cache length after this step's forward
    rows: slice = field(default_factory=lambda: slice(None))  # the running micro-batch's sequences
    last_micro_batch: bool = True


class TieredKVLayer(CacheLayerMixin):
    """One decoder layer's cache: its blocks live in the owning ``TieredCache``; this holds the
    layer's length and answers the questions the model's forward asks."""

    is_compileable = False
    is_sliding = False

    def __init__(self, index: int, owner: TieredCache) -> None:
        super().__init__()
        self.index = index
        self._owner = weakref.proxy(owner)  # the cache owns its layers, not the other way
        self.length = 0
        self.is_initialized = True  # laid out before the first update

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # preallocated by TieredCache

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self._owner.write_and_gather(self, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self._owner.layout.capacity

    def reset(self) -> None:
        self.length = 0


class TieredCache(Cache):
    """A ``Cache`` whose blocks live on the policy's tiers (module docstring). Everything host-side
    (host blocks, NVMe staging, the host attention workspace) is allocated here, up front."""

    def __init__(self, layout: KVLayout, num_layers: int, device: torch.device, *, host_attention: bool,
                 cache_dir: Path | None, worker: ThreadPoolExecutor) -> None:
        super().__init__(layers=[TieredKVLayer(i, self) for i in range(num_layers)])
        self.layout = layout
        self.device = device
        self.cuda = device.type == "cuda"
        self.host_attention = host_attention
        self.cache_dir = cache_dir
        self.worker = worker
        self.run = _CacheRun()
        self._io: list[Future] = []  # file jobs not yet known to be done
        self._reads: list[tuple[tuple[int, int], Future] | None] = [None, None]  # per staging slot
        self._loaded: list[tuple[int, int] | None] = [None, None]  # (layer, step) a slot holds
        try:
            self._allocate(num_layers)
        except BaseException:
            self.close()
            raise

    def _allocate(self, num_layers: int) -> None:
        lay, pinned = self.layout, self.cuda
        shape = lay.block_shape
        self.blocks: list[list[tuple[torch.Tensor, torch.Tensor] | None]] = []
        self.files: list[list[tuple[Path, Path] | None]] = []
        for layer in range(num_layers):
            blocks: list[tuple[torch.Tensor, torch.Tensor] | None] = []
            files: list[tuple[Path, Path] | None] = []
            for b, tier in enumerate(lay.tiers):
                if tier == NVME:
                    assert self.cache_dir is not None
                    pair = (self.cache_dir / f"l{layer}-b{b}-k.bin", self.cache_dir / f"l{layer}-b{b}-v.bin")
                    nbytes = math.prod(shape) * lay.dtype.itemsize
                    for path in pair:  # sparse files: a block is read whole before it is written
                        with open(path, "wb") as f:
                            f.truncate(nbytes)
                    blocks.append(None)
                    files.append(pair)
                elif tier == HOST:
                    blocks.append((_host_empty(shape, lay.dtype, pinned), _host_empty(shape, lay.dtype, pinned)))
                    files.append(None)
                else:
                    blocks.append((torch.empty(shape, dtype=lay.dtype, device=self.device),
                                   torch.empty(shape, dtype=lay.dtype, device=self.device)))
                    files.append(None)
            self.blocks.append(blocks)
            self.files.append(files)
        nvme = [b for b, t in enumerate(lay.tiers) if t == NVME]
        # Two staging sets: the running layer's NVMe blocks and the prefetched layer's.
        self.staging = [{b: (_host_empty(shape, lay.dtype, pinned), _host_empty(shape, lay.dtype, pinned))
                         for b in nvme} for _ in range(2)]
        n = lay.batch * lay.kv_heads * lay.capacity * lay.head_dim
        self.workspace = ((_host_empty([n], lay.dtype, pinned), _host_empty([n], lay.dtype, pinned))
                          if self.host_attention else None)

    # -- what the generator calls ---------------------------------------------------------------

    def begin_step(self, new_tokens: int) -> None:
        """A forward of ``new_tokens`` positions starts: prefetch layer 0's NVMe blocks."""
        self.run.step += 1
        self.run.step_end = self.layers[0].get_seq_length() + new_tokens
        if self.run.step_end > self.layout.capacity:
            raise TierplanRuntimeError(f"the cache holds {self.layout.capacity} positions, the step needs "
                                       f"{self.run.step_end}")
        self.prefetch_layer(0)

    def prefetch_layer(self, layer: int) -> None:
        """Issue the reads of ``layer``'s NVMe blocks for this step into its staging slot."""
        if layer >= len(self.layers) or not self.layout.nvme_blocks(self.run.step_end):
            return
        slot = layer % 2
        self._loaded[slot] = None
        self._reads[slot] = ((layer, self.run.step), self._submit_reads(layer, slot))

    def set_rows(self, rows: slice, last: bool) -> None:
        """The micro-batch that runs next: its sequences, and whether it is the layer's last."""
        self.run.rows, self.run.last_micro_batch = rows, last

    def device_tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.blocks for b, pair in enumerate(layer)
                if pair is not None and self.layout.tiers[b] == DEVICE for t in pair]

    def host_tensors(self) -> list[torch.Tensor]:
        host = [t for layer in self.blocks for b, pair in enumerate(layer)
                if pair is not None and self.layout.tiers[b] == HOST for t in pair]
        staged = [t for slot in self.staging for pair in slot.values() for t in pair]
        return host + staged + list(self.workspace or ())

    def finish(self) -> None:
        """Wait for every file job; raise the first one's error."""
        jobs, self._io = self._io, []
        for job in jobs:
            job.result()

    def close(self) -> None:
        """Finish the file jobs (their buffers must outlive them), then remove the cache's files."""
        jobs, self._io = self._io, []
        for job in jobs:
            try:
                job.result()
            except Exception:  # noqa: BLE001 - the generation's own error is the one to report
                pass
        self._reads = [None, None]
        if self.cache_dir is not None:
            shutil.rmtree(self.cache_dir, ignore_errors=True)
            self.cache_dir = None

    # -- update -------------------------------------------------------------------------------

    def write_and_gather(self, layer: TieredKVLayer, keys: torch.Tensor,
                         values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions into their blocks; return K and V of the running micro-batch
        up to the new length (module docstring: where they are assembled)."""
        lay, run = self.layout, self.run
        rows = range(lay.batch)[run.rows]
        start = layer.length
        end = start + keys.shape[-2]
        expected = (len(rows), lay.kv_heads, keys.shape[-2], lay.head_dim)
        if tuple(keys.shape) != expected or tuple(values.shape) != expected or keys.dtype != lay.dtype:
            raise TierplanRuntimeError(
                f"decoder layer {layer.index} sent keys {tuple(keys.shape)} / values {tuple(values.shape)} "
                f"of {keys.dtype}; the cache was laid out for {expected} of {lay.dtype}"
            )
        if end != run.step_end:
            raise TierplanRuntimeError(f"decoder layer {layer.index} writes positions up to {end}, the "
                                       f"step ends at {run.step_end}: the layers ran out of order")
        slot = layer.index % 2
        self._ensure_staged(layer.index, slot)
        for b, lo, hi in lay.spans(start, end):
            k_block, v_block = self._block(layer.index, b, slot)
            at = slice(lo - b * lay.block_tokens, hi - b * lay.block_tokens)
            k_block[run.rows, :, at].copy_(keys[:, :, lo - start : hi - start])
            v_block[run.rows, :, at].copy_(values[:, :, lo - start : hi - start])
        if run.last_micro_batch:
            touched = [b for b, _, _ in lay.spans(start, end) if lay.tiers[b] == NVME]
            if touched:
                self._io.append(self.worker.submit(self._write_blocks, layer.index, slot, touched))
            layer.length = end
        return self._gather(layer.index, slot, len(rows), end)

    def _block(self, layer: int, b: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.blocks[layer][b]
        return pair if pair is not None else self.staging[slot][b]

    def _gather(self, layer: int, slot: int, nrows: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        lay, rows = self.layout, self.run.rows
        shape = (nrows, lay.kv_heads, end, lay.head_dim)
        if self.workspace is not None:  # host attention: a contiguous view of the workspace
            n = math.prod(shape)
            outs = (self.workspace[0][:n].view(shape), self.workspace[1][:n].view(shape))
        else:  # device attention: fresh device tensors, freed when attention drops them
            outs = (torch.empty(shape, dtype=lay.dtype, device=self.device),
                    torch.empty(shape, dtype=lay.dtype, device=self.device))
        for b, lo, hi in lay.spans(0, end):
            blocks = self._block(layer, b, slot)
            # Pinned host blocks may copy asynchronously (only stream-ordered copies write them);
            # a staging buffer is refilled by the worker thread, so copies out of it are synchronous.
            async_ok = self.cuda and lay.tiers[b] == HOST
            for out, block in zip(outs, blocks):
                out[:, :, lo:hi].copy_(block[rows, :, : hi - lo], non_blocking=async_ok)
        return outs

    # -- NVMe blocks --------------------------------------------------------------------------

    def _ensure_staged(self, layer: int, slot: int) -> None:
        """The staging slot holds ``layer``'s NVMe blocks of this step (read now if no prefetch)."""
        if not self.layout.nvme_blocks(self.run.step_end):
            return
        key = (layer, self.run.step)
        if self._loaded[slot] == key:
            return
        pending = self._reads[slot]
        job = pending[1] if pending is not None and pending[0] == key else self._submit_reads(layer, slot)
        self._reads[slot] = None
        job.result()
        self._loaded[slot] = key

    def _submit_reads(self, layer: int, slot: int) -> Future:
        job = self.worker.submit(self._read_blocks, layer, slot, self.layout.nvme_blocks(self.run.step_end))
        self._io.append(job)
        self._io = [j for j in self._io if not j.done() or j.exception() is not None]
        return job

    def _read_blocks(self, layer: int, slot: int, blocks: list[int]) -> None:
        for b in blocks:
            for path, buffer in zip(self.files[layer][b], self.staging[slot][b]):
                _read_file(path, buffer)

    def _write_blocks(self, layer: int, slot: int, blocks: list[int]) -> None:
        for b in blocks:
            for path, buffer in zip(self.files[layer][b], self.staging[slot][b]):
                _write_file(path, buffer)


# -- host attention -------------------------------------------------------------------------------


def host_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Attention next to the cache: the query (and mask) go to the host, where the cache returned
    K and V, transformers' SDPA attention runs there, and the output goes back to the device."""
    host = key.device
    mask = attention_mask.to(host) if isinstance(attention_mask, torch.Tensor) else attention_mask
    out, weights = sdpa_attention_forward(module, query.to(host), key, value, mask, **kwargs)
    return out.to(query.device), weights


def _register_host_attention() -> None:
    # Both registries: a name without a mask function gets no mask at all from transformers.
    AttentionInterface.register(HOST_ATTENTION, host_attention)
    AttentionMaskInterface.register(HOST_ATTENTION, sdpa_mask)


# -- micro-batches --------------------------------------------------------------------------------


def _rows(x: Any, batch: int, rows: slice) -> Any:
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch:
        return x[rows]
    return x


def _concat(outputs: list[Any], micro: int) -> Any:
    """The micro-batches' outputs as one: tensors of ``micro`` rows concatenated, the rest as the
    first micro-batch gave them."""
    flat = [pytree.tree_flatten(o)[0] for o in outputs]
    spec = pytree.tree_flatten(outputs[0])[1]
    merged = [torch.cat([f[j] for f in flat]) if isinstance(leaf, torch.Tensor) and leaf.dim() > 0
              and leaf.shape[0] == micro else leaf for j, leaf in enumerate(flat[0])]
    return pytree.tree_unflatten(merged, spec)


# -- activations on the host ---------------------------------------------------------------------


class HostActivations:
    """The two host buffers the block's hidden states wait in between decoder layers (module
    docstring): layer ``i`` writes buffer ``i % 2``, which layer ``i + 1`` reads."""

    def __init__(self, batch: int, tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> None:
        self.batch, self.tokens, self.hidden, self.dtype = batch, tokens, hidden, dtype
        self.device = device
        self.cuda = device.type == "cuda"
        self.buffers = [_host_empty([batch * tokens * hidden], dtype, self.cuda) for _ in range(2)]

    def host_tensors(self) -> list[torch.Tensor]:
        return list(self.buffers)

    def output(self, layer: int, q: int) -> torch.Tensor:
        """Where layer ``layer``'s hidden states of a ``q``-token step go: contiguous, so that a
        micro-batch's rows are one span (a strided ``[:, :q]`` view would make copies of them
        stage through pageable memory)."""
        if q > self.tokens:
            raise TierplanRuntimeError(f"a step of {q} tokens; the host activation buffers hold {self.tokens}")
        return self.buffers[layer % 2][: self.batch * q * self.hidden].view(self.batch, q, self.hidden)

    def check(self, layer: int, what: str, t: Any, rows: int, q: int | None = None) -> torch.Tensor:
        """``t`` is hidden states of ``rows`` sequences (of ``q`` tokens) that fit the buffers, or a
        clear error (a copy into a buffer would cast or broadcast without a word)."""
        if (not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] != rows or t.shape[2] != self.hidden
                or (q is not None and t.shape[1] != q) or t.dtype != self.dtype):
            got = f"{tuple(t.shape)} of {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TierplanRuntimeError(
                f"decoder layer {layer}'s {what} is {got}; activations on the host need hidden states "
                f"[{rows}, {q or 'tokens'}, {self.hidden}] of {self.dtype}: use activations='device'")
        return t

    def copy_in(self, rows: torch.Tensor) -> torch.Tensor:
        """A micro-batch's hidden states, host -> device: a fresh device tensor (also on the CPU,
        where it is the device's copy the tracker counts). Asynchronous from pinned memory; the
        current stream orders it after the copy-out that filled the buffer."""
        return rows.to(self.device, non_blocking=self.cuda, copy=True)

    def copy_out(self, into: torch.Tensor, hidden: torch.Tensor) -> None:
        """A micro-batch's output hidden states, device -> host, on the current stream: the next
        layer's copy-in (same stream) reads them only after this is done."""
        into.copy_(hidden, non_blocking=self.cuda)


def _hidden_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The decoder layer's hidden states: its first positional argument, or ``hidden_states``."""
    return args[0] if args else kwargs.get("hidden_states")


def _with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any],
                 hidden: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


# -- the generator --------------------------------------------------------------------------------


@dataclass
class _Resources:
    """What ``close()`` (or the garbage collector) releases; it references no generator."""

    streamer: WeightStreamer
    workers: list[ThreadPoolExecutor]
    swap_dir: Path | None


def _release(res: _Resources) -> None:
    for worker in res.workers:
        worker.shutdown(wait=True)
    try:
        res.streamer.restore()
    finally:
        if res.swap_dir is not None:
            shutil.rmtree(res.swap_dir, ignore_errors=True)


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class TieredGenerator:
    """Greedy generation under a ``GenerationPolicy`` (module docstring). While it is open, the
    model's non-device parameters are placeholders; ``close()`` hands the model back."""

    def __init__(self, model: nn.Module, policy: GenerationPolicy, *, device: torch.device | str | None = None,
                 swap_root: str | Path | None = None) -> None:
        check_cache_capture(model)
        self.model = model
        self.policy = policy
        self.device = torch.device(device) if device is not None else _default_device()
        self.layers_prefix, self.layers = decoder_layers(model)
        weights = _collect_weights(model, policy, self.layers_prefix)
        self._dtype = next((w.dtype for w in weights if w.dtype.is_floating_point), torch.float32)
        self._accepted = set(inspect.signature(model.forward).parameters)
        self._pending: dict[int, _Load] = {}
        if self.device.type == "cpu":
            keep_freed_memory()  # see tierplan.codegen.runtime: freed layers would fault back in
        swap_dir = None
        if NVME in {w.tier for w in weights} or NVME in policy.kv_tiers:
            if swap_root is not None:
                Path(swap_root).mkdir(parents=True, exist_ok=True)
            swap_dir = Path(tempfile.mkdtemp(prefix="tierplan-gen-", dir=swap_root))
        self.swap_dir = swap_dir
        self._weight_io = ThreadPoolExecutor(1, thread_name_prefix="tierplan-gen-weights")
        self._cache_io = ThreadPoolExecutor(1, thread_name_prefix="tierplan-gen-cache")
        self._streamer = WeightStreamer(weights, self.device, swap_dir, self._weight_io)
        # What the finalizer holds must not reach the generator, or it would never be collected.
        self._finalizer = weakref.finalize(
            self, _release, _Resources(self._streamer, [self._weight_io, self._cache_io], swap_dir))
        try:
            self._streamer.place()
            for module in model.modules():  # buffers (rotary tables, masks) are small: on the device
                for name, buf in module._buffers.items():
                    if buf is not None:
                        module._buffers[name] = buf.to(self.device)
        except BaseException:
            self.close()
            raise

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def stats(self) -> GenerationStats:
        """What the last generation moved."""
        return self._streamer.stats

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Hand the model back and remove the swap directory. Idempotent."""
        self._finalizer()

    def __enter__(self) -> TieredGenerator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- generation ---------------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 attention_mask: torch.Tensor | None = None) -> torch.LongTensor:
        """The prompt followed by ``max_new_tokens`` greedy tokens, ``[batch, prompt + new]``."""
        cache = self._new_cache(input_ids, max_new_tokens, attention_mask)
        return self._guarded(cache, lambda: self._run(cache, self._new_activations(input_ids), input_ids,
                                                      max_new_tokens, attention_mask))

    def measure_generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                         attention_mask: torch.Tensor | None = None) -> tuple[torch.LongTensor, int]:
        """``generate`` inside a StorageTracker counting device-tier storages only: (tokens, the
        device peak in bytes). Every host-tier buffer exists before the tracker starts, and every
        device copy is made on this thread (the tracker sees no other)."""
        cache = self._new_cache(input_ids, max_new_tokens, attention_mask)

        def tracked() -> tuple[torch.LongTensor, int]:
            acts = self._new_activations(input_ids)
            existing = self._streamer.device_tensors() + cache.device_tensors()
            exclude = (self._streamer.host_tensors() + cache.host_tensors()
                       + (acts.host_tensors() if acts is not None else []))
            with StorageTracker(existing=existing, exclude=exclude, device_type=self.device.type) as tracker:
                tokens = self._run(cache, acts, input_ids, max_new_tokens, attention_mask)
            return tokens, tracker.peak_bytes

        return self._guarded(cache, tracked)

    def _guarded(self, cache: TieredCache, body: Callable[[], Any]) -> Any:
        """Run ``body``; the cache's files go whatever happens, and an interrupt closes the
        generator (the user is leaving: leave nothing behind)."""
        try:
            try:
                return body()
            finally:
                cache.close()
        except KeyboardInterrupt:
            self.close()
            raise

    def _new_cache(self, input_ids: torch.Tensor, max_new_tokens: int,
                   attention_mask: torch.Tensor | None) -> TieredCache:
        if self.closed:
            raise RuntimeError("this TieredGenerator is closed")
        p = self.policy
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, prompt], not {tuple(input_ids.shape)}")
        batch, prompt = input_ids.shape
        if batch != p.batch:
            raise ValueError(f"input_ids has a batch of {batch} sequences, but the policy runs {p.batch} "
                             f"({p.num_gpu_batches} micro-batches of {p.gpu_batch})")
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, prompt):
            raise ValueError(f"attention_mask is {tuple(attention_mask.shape)}, input_ids {(batch, prompt)}")
        if max_new_tokens < 0 or prompt < 1:
            raise ValueError(f"need a prompt (got {prompt} tokens) and max_new_tokens >= 0 (got {max_new_tokens})")
        capacity = prompt + max_new_tokens
        blocks = -(-capacity // p.kv_block_tokens)
        if blocks > len(p.kv_tiers):
            raise ValueError(f"prompt {prompt} + {max_new_tokens} new tokens need {blocks} cache blocks of "
                             f"{p.kv_block_tokens} positions; the policy places {len(p.kv_tiers)}")
        kv_heads, head_dim = kv_geometry(self.model)
        layout = KVLayout(batch, kv_heads, head_dim, self._dtype, p.kv_block_tokens, p.kv_tiers[:blocks], capacity)
        cache_dir = None
        if NVME in layout.tiers:
            assert self.swap_dir is not None
            cache_dir = Path(tempfile.mkdtemp(prefix="cache-", dir=self.swap_dir))
        return TieredCache(layout, len(self.layers), self.device, host_attention=p.attention == HOST,
                           cache_dir=cache_dir, worker=self._cache_io)

    def _new_activations(self, input_ids: torch.Tensor) -> HostActivations | None:
        """The host activation buffers of one generation (None with activations on the device):
        the prefill's ``prompt`` tokens are the most any step runs."""
        if self.policy.activations != HOST:
            return None
        hidden = getattr(text_config(self.model), "hidden_size", None)
        if not isinstance(hidden, int) or hidden < 1:
            raise TierplanRuntimeError(f"{type(self.model).__name__}'s config names no hidden_size: the host "
                                       "activation buffers cannot be laid out; use activations='device'")
        batch, prompt = input_ids.shape
        return HostActivations(batch, prompt, hidden, self._dtype, self.device)

    def _run(self, cache: TieredCache, acts: HostActivations | None, input_ids: torch.Tensor,
             max_new_tokens: int, attention_mask: torch.Tensor | None) -> torch.LongTensor:
        self._streamer.stats = GenerationStats()
        ids = input_ids.to(self.device)
        # As GenerationMixin does: positions count the unmasked tokens; a mask of all ones is
        # dropped (so SDPA may take its causal path), a padded one grows by one column a step.
        mask = (attention_mask.to(self.device) if attention_mask is not None
                else torch.ones_like(ids, dtype=torch.long))
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        step_mask = None if bool(mask.all()) else mask
        new: list[torch.Tensor] = []
        with torch.no_grad(), self._installed(cache, acts):
            step_ids = ids
            for _ in range(max_new_tokens):
                logits = self._step(cache, step_ids, step_mask, positions)
                token = logits.argmax(-1)
                new.append(token)
                step_ids, positions = token[:, None], positions[:, -1:] + 1
                if step_mask is not None:
                    step_mask = torch.cat([step_mask, step_mask.new_ones((step_mask.shape[0], 1))], dim=-1)
        cache.finish()
        return torch.cat([ids, *(t[:, None] for t in new)], dim=1)

    def _step(self, cache: TieredCache, ids: torch.Tensor, mask: torch.Tensor | None,
              positions: torch.Tensor) -> torch.Tensor:
        """One forward (the prefill, or one token): the logits of the last position."""
        self.stats.steps += 1
        cache.begin_step(ids.shape[1])
        self._pending[0] = self._streamer.fetch(0)  # overlaps the embeddings
        kwargs: dict[str, Any] = {"cache" if "cache" in self._accepted else "past_key_values": cache,
                                  "use_cache": True, "attention_mask": mask}
        if "logits_to_keep" in self._accepted:
            kwargs["logits_to_keep"] = 1
        if "position_ids" in self._accepted:
            kwargs["position_ids"] = positions[:, -ids.shape[1]:]
        return self.model(input_ids=ids, **kwargs).logits[:, -1, :]

    @contextmanager
    def _installed(self, cache: TieredCache, acts: HostActivations | None) -> Iterator[None]:
        """For one generation: host attention switched on, the non-layer weights on the device,
        the decoder layers wrapped; all undone on the way out."""
        with ExitStack() as stack:
            if self.policy.attention == HOST:
                stack.enter_context(self._host_attention())
            self._streamer.install(self._streamer.fetch(None))
            stack.callback(self._streamer.release, None)
            stack.callback(self._discard_pending)
            for i, layer in enumerate(self.layers):
                stack.enter_context(self._wrapped(i, layer, cache, acts))
            yield

    @contextmanager
    def _host_attention(self) -> Iterator[None]:
        original = self.model.config._attn_implementation
        _register_host_attention()
        self.model.set_attn_implementation(HOST_ATTENTION)
        try:
            if self.model.config._attn_implementation != HOST_ATTENTION:
                raise TierplanRuntimeError(
                    f"{type(self.model).__name__} did not take the {HOST_ATTENTION!r} attention function "
                    f"(it does not dispatch through transformers' AttentionInterface): use attention='device'")
            yield
        finally:
            self.model.set_attn_implementation(original)

    @contextmanager
    def _wrapped(self, index: int, layer: nn.Module, cache: TieredCache,
                 acts: HostActivations | None) -> Iterator[None]:
        had_own = "forward" in layer.__dict__
        own = layer.__dict__.get("forward")
        forward = layer.forward

        def run(*args: Any, **kwargs: Any) -> Any:
            return self._run_layer(index, forward, cache, acts, args, kwargs)

        layer.forward = run
        try:
            yield
        finally:
            if had_own:
                layer.forward = own
            else:
                del layer.forward

    def _run_layer(self, index: int, forward: Callable[..., Any], cache: TieredCache,
                   acts: HostActivations | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Decoder layer ``index``: its weights in, the next layer's load issued, its micro-batches
        run one after another, its weights out."""
        load = self._pending.pop(index, None) or self._streamer.fetch(index)
        try:
            self._streamer.install(load)
            if index + 1 < len(self.layers):
                self._pending[index + 1] = self._streamer.fetch(index + 1)
                cache.prefetch_layer(index + 1)
            return self._micro_batches(index, forward, cache, acts, args, kwargs)
        finally:
            self._streamer.release(index)

    def _micro_batches(self, index: int, forward: Callable[..., Any], cache: TieredCache,
                       acts: HostActivations | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        p = self.policy
        if acts is None and p.num_gpu_batches == 1:
            cache.set_rows(slice(None), last=True)
            return forward(*args, **kwargs)
        out = None
        if acts is not None:
            hidden = acts.check(index, "input", _hidden_arg(args, kwargs), p.batch)
            if index > 0 and hidden.untyped_storage().data_ptr() != acts.buffers[(index - 1) % 2].data_ptr():
                raise TierplanRuntimeError(f"decoder layer {index} got hidden states that are not layer "
                                           f"{index - 1}'s output: the model changes them between layers; "
                                           "use activations='device'")
            if index < len(self.layers) - 1:  # the last layer's output stays on the device
                out = acts.output(index, hidden.shape[1])
        outputs = []
        for m in range(p.num_gpu_batches):
            rows = slice(m * p.gpu_batch, (m + 1) * p.gpu_batch)
            cache.set_rows(rows, last=m == p.num_gpu_batches - 1)
            outputs.append(self._micro_batch(index, forward, acts, args, kwargs, rows, out))
        cache.set_rows(slice(None), last=True)
        # With activations on the host every output's hidden states are ``out`` itself, the whole
        # block (not ``gpu_batch`` rows): _concat passes it through as the first micro-batch gave it.
        return outputs[0] if len(outputs) == 1 else _concat(outputs, p.gpu_batch)

    def _micro_batch(self, index: int, forward: Callable[..., Any], acts: HostActivations | None,
                     args: tuple[Any, ...], kwargs: dict[str, Any], rows: slice, out: torch.Tensor | None) -> Any:
        """One micro-batch of decoder layer ``index``: ``rows`` of every batch-first argument. With
        activations on the host, its hidden states are copied in (but layer 0's: the embedding
        output is on the device) and, unless it is the last layer, out into ``out``. Its own
        function, so that its device copies are dropped when it returns, before the next one's."""
        p = self.policy
        part_args, part_kwargs = pytree.tree_map(lambda x: _rows(x, p.batch, rows), (args, kwargs))
        if acts is not None and index > 0:
            part_args, part_kwargs = _with_hidden(part_args, part_kwargs,
                                                  acts.copy_in(_hidden_arg(part_args, part_kwargs)))
        output = forward(*part_args, **part_kwargs)
        if out is None:
            return output
        assert acts is not None
        leaves, spec = pytree.tree_flatten(output)  # a bare tensor, or a tuple that starts with it
        hidden = acts.check(index, "output", leaves[0] if leaves else None, p.gpu_batch, out.shape[1])
        acts.copy_out(out[rows], hidden)
        leaves[0] = out
        return pytree.tree_unflatten(leaves, spec)

    def _discard_pending(self) -> None:
        for load in self._pending.values():
            self._streamer.discard(load)
        self._pending.clear()


__all__ = ["GenerationStats", "HOST_ATTENTION", "HostActivations", "KVLayout", "TieredCache", "TieredGenerator",
           "TieredKVLayer", "Weight", "WeightStreamer", "host_attention"]
