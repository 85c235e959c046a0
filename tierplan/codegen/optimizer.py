"""A torch optimizer whose master weights and states live on the tiers a plan chose.

``TieredOptimizer`` wraps a user's ``torch.optim.AdamW``, ``Adam`` or ``SGD`` and is what
``tierplan.compile(..., optimizer=...)`` hands back as ``compiled.optimizer``. The model's
parameters stay where they are (the *device*) and their gradients arrive in ``p.grad`` as usual, so
gradient accumulation, ``clip_grad_norm_`` and LR schedulers work unchanged: ``param_groups`` is the
wrapped optimizer's own list of group dicts. What moves is each parameter's optimizer state (and
its master weight, when it has one), per a ``StatePlacement``:

- ``states``: the tier the master and the states live on between steps: ``DEVICE`` (the
  parameter's device), ``HOST`` (CPU memory, pinned when the parameter is on CUDA) or ``NVME``
  (one raw file per state tensor in a swap directory; nothing is held in memory between steps);
- ``update``: where the update runs. ``DEVICE`` runs it on the parameter's device (on a fp32
  master when ``master_dtype`` asks for mixed precision), moving a HOST/NVME parameter's states
  there for its update and back after it, one parameter at a time, so the device holds one
  parameter's states at a time. ``HOST`` runs it with torch's CPU kernels on a host master copy of
  the parameter: the gradient is copied to the host (cast to the master's dtype), the update runs,
  and the master is copied back into the parameter (cast to its dtype).

The update itself is always the wrapped class's own ``step``: a scratch instance of that class is
pointed at one parameter (or, for the parameters whose states stay on the device, at all of a
group's at once so that ``foreach``/``fused`` batch them as the user asked) with a copy of the
owning group's live hyper-parameters and that parameter's state dict, and stepped. Results are
therefore those of the plain optimizer: on the CPU, bitwise equal.

fp16 mixed precision (``loss_scale=DynamicLossScale()``): fp16 gradients of small values underflow,
so the loss is scaled before the backward (``tierplan.compile`` seeds its planned backward with
``loss_scale.scale``) and the gradients arrive multiplied by it. ``step`` first checks every
gradient: with an inf or a NaN among them it skips the update and lowers the scale; otherwise it
divides each gradient by the scale in fp32, on its way into the master, and after
``growth_interval`` clean steps in a row raises the scale (Micikevicius et al., "Mixed Precision
Training", ICLR 2018; the defaults are ``torch.amp.GradScaler``'s). ``clip_grad_norm_`` clips the
true gradients: it returns their norm and folds the clip factor into the next step's division
(``torch.nn.utils.clip_grad_norm_`` on ``p.grad`` would clip the scaled values).

``state_dict`` writes the wrapped class's standard format (a plain optimizer of the same class can
load it and vice versa), adding a ``"master"`` entry for masters of another dtype than their
parameter, and ``"loss_scale"`` under fp16 mixed precision; ``load_state_dict`` puts every state back on its planned tier. The swap directory is
removed by ``close()``, by a ``weakref.finalize`` when the optimizer is collected, and at interpreter
exit; files are replaced atomically, so a step that raises midway leaves every file either old or
new, never torn.

Updates during the backward (``update_in_backward=True``; ``tierplan.compile(...,
update_in_backward=True)``). ZeRO-Offload (Ren et al., "ZeRO-Offload: Democratizing Billion-Scale
Model Training", USENIX ATC 2021) hides most of a host update behind the backward: each gradient is
copied to the host as soon as the backward produces it and the CPU Adam runs while the rest of the
backward computes. In this mode the compiled program reports each host-updated parameter's final
gradient (``gradient_ready``, called by ``Context.gradient_ready``) the moment it exists; the
gradient is copied to the host (on a GPU: into pinned memory on a side stream, after an event on
the compute stream) and that parameter's update is handed to one background thread (torch's CPU
kernels release the GIL). The update is *speculative*: it runs on private copies of the master and
the states (NVMe states are staged to temporary files), because nothing is final before ``step()``:
the caller may still scale, accumulate or edit ``p.grad``, or drop the step with ``zero_grad()``.
``step()`` waits for the background updates (re-raising a worker's exception, with nothing
committed), checks each parameter's ``p.grad`` against the reported gradient (the same storage at
the same ``_version``, else equal values), and commits the updated master and states (swapping
the tensors in, renaming staged files over the old ones) and writes the master into the
parameter; the master is never written during the backward, which may still read the weight. A
parameter whose gradient was not reported, was already there before the report (it would be
accumulated into), changed after it, or whose group's hyper-parameters changed meanwhile, is
updated in ``step()`` as without the mode: the overlap never changes results. The price: until
``step()``, a second copy of every reported host parameter's master and states (host memory, not
device memory). Refused: a loss scale (fp16-mixed: whether to step at all depends on every
gradient being finite), ``clip_grad_norm_`` (the clip factor needs the norm of all gradients),
and a second report of one parameter's gradient before ``step()`` (gradient accumulation: the
update would see one micro-batch's gradient). On the CPU the update shares the cores with the
backward, so the mode is for a GPU; the CPU runs it for tests.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from collections import defaultdict
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from tierplan.codegen.runtime import _read_file, _write_file
from tierplan.plans.plan import DEVICE, HOST, NVME

__all__ = [
    "DEVICE",
    "DynamicLossScale",
    "HOST",
    "NVME",
    "SUPPORTED_OPTIMIZERS",
    "StatePlacement",
    "TieredOptimizer",
    "UnsupportedOptimizer",
    "optimizer_hyperparameters",
    "optimizer_name",
]

SUPPORTED_OPTIMIZERS: Mapping[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}

_STATE_TIERS = (DEVICE, HOST, NVME)
_UPDATE_TIERS = (DEVICE, HOST)
_CPU = torch.device("cpu")
# Flags that only make sense for device kernels: a host update runs the single-tensor CPU path,
# which is also what an eager CPU optimizer runs, so host results match a CPU reference bitwise.
_HOST_FLAGS = {"foreach": False, "fused": False, "capturable": False}


@dataclass
class DynamicLossScale:
    """The loss scale of fp16 mixed precision and its schedule (the module docstring)."""

    scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000  # clean steps in a row before the scale grows
    clean_steps: int = 0  # since the last change of the scale
    skipped_steps: int = 0  # steps skipped for an inf or NaN gradient, in all

    def __post_init__(self) -> None:
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"loss scale {self.scale!r}: give a finite positive number")
        if not (self.growth_factor > 1 and 0 < self.backoff_factor < 1 and self.growth_interval >= 1):
            raise ValueError("need growth_factor > 1, 0 < backoff_factor < 1 and growth_interval >= 1")

    def update(self, found_inf: bool) -> None:
        """After a step: back off on an inf or NaN gradient, grow after enough clean steps."""
        if found_inf:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            self.skipped_steps += 1
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class UnsupportedOptimizer(ValueError):
    """The optimizer is not one whose update tierplan can place."""


@dataclass(frozen=True)
class StatePlacement:
    """Where one parameter's master weight and optimizer states live, and where its update runs."""

    states: str = DEVICE
    update: str = DEVICE

    def __post_init__(self) -> None:
        if self.states not in _STATE_TIERS:
            raise ValueError(f"StatePlacement.states must be one of {_STATE_TIERS}, got {self.states!r}")
        if self.update not in _UPDATE_TIERS:
            raise ValueError(f"StatePlacement.update must be one of {_UPDATE_TIERS}, got {self.update!r}")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def optimizer_name(optimizer: torch.optim.Optimizer | type) -> str:
    """``'adamw'``, ``'adam'`` or ``'sgd'`` for exactly those torch classes.

    Subclasses are rejected too: they may override ``step`` with an update tierplan cannot model.
    """
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    for name, supported in SUPPORTED_OPTIMIZERS.items():
        if cls is supported:
            return name
    listed = ", ".join(f"{_qualname(c)} ({n!r})" for n, c in SUPPORTED_OPTIMIZERS.items())
    raise UnsupportedOptimizer(
        f"optimizer {_qualname(cls)} is not supported; supported: {listed}. "
        f"Pass optimizer=None (or 'none') to leave the update outside the plan."
    )


def optimizer_hyperparameters(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The first parameter group's hyper-parameters (lr, weight_decay, betas, momentum...)."""
    if not optimizer.param_groups:
        return dict(optimizer.defaults)
    return {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}


@dataclass(frozen=True)
class _SwapFile:
    """One state tensor written to the swap directory as raw bytes."""

    path: Path
    dtype: torch.dtype
    shape: torch.Size

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def read(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        if self.numel:  # the runtime's reader: it refuses a file shorter than the tensor
            _read_file(self.path, out.view(-1).view(torch.uint8), None)
        return out


@dataclass(eq=False)
class _Slot:
    """Book-keeping for one parameter.

    ``state`` is the very dict ``TieredOptimizer.state[param]`` shows and the wrapped class's
    ``step`` updates: on the DEVICE and HOST tiers it holds the state tensors; on the NVME tier only
    the non-tensor values, the tensors being in ``files``. The master is kept apart from ``state``
    because torch's optimizers initialise a parameter's state when its dict is empty.
    """

    param: torch.Tensor
    index: int
    placement: StatePlacement
    master_dtype: torch.dtype | None  # None: the update runs on the parameter itself
    state: dict[str, Any]
    master: torch.Tensor | None = None  # DEVICE/HOST tiers only
    files: dict[str, _SwapFile] = field(default_factory=dict)  # NVME tier only

    @property
    def update_device(self) -> torch.device:
        return self.param.device if self.placement.update == DEVICE else _CPU

    @property
    def pin(self) -> bool:
        # Pinned host memory only pays off (and only exists) for copies to and from a GPU.
        return self.param.is_cuda and torch.cuda.is_available()


class _StepIO:
    """The NVMe reads and writes of one step, pipelined with the updates (docs/cost-model.md,
    "Optimizer step": the plan's STAGING_SLOTS): the states of the next NVMe parameters are read
    ahead while one is updated, and each one's write-back runs behind the next updates. At most
    ``ahead`` reads and ``behind`` writes are in flight, so the host holds a few parameters'
    states at once. Leaving the block waits for every write and raises the first I/O error."""

    def __init__(self, slots: list[_Slot], read: Callable[[_Slot], dict[str, torch.Tensor]], *,
                 ahead: int = 1, behind: int = 1) -> None:
        self._order = slots
        self._read = read
        self._ahead, self._behind = ahead, behind
        self._next = 0  # the index in ``slots`` of the next read to issue
        self._reads: dict[int, Future] = {}
        self._writes: list[Future] = []
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tierplan-optim-io")

    def __enter__(self) -> _StepIO:
        self._top_up(0)
        return self

    def _top_up(self, current: int) -> None:
        while self._next < len(self._order) and self._next <= current + self._ahead:
            slot = self._order[self._next]
            self._reads[id(slot)] = self._pool.submit(self._read, slot)
            self._next += 1

    def loaded(self, slot: _Slot) -> dict[str, torch.Tensor] | None:
        """``slot``'s files, read ahead (None for a slot not on NVMe)."""
        future = self._reads.pop(id(slot), None)
        if future is None:
            return None
        self._top_up(self._order.index(slot))
        return future.result()

    def write_behind(self, write: Callable[[_Slot, Mapping[str, torch.Tensor]], None], slot: _Slot,
                     tensors: Mapping[str, torch.Tensor]) -> None:
        while len(self._writes) >= self._behind:
            self._writes.pop(0).result()
        self._writes.append(self._pool.submit(write, slot, tensors))

    def __exit__(self, *exc: object) -> None:
        try:
            for future in self._writes:
                future.result()  # every write lands (or raises) before the step returns
        finally:
            for future in self._reads.values():
                future.cancel()
            self._pool.shutdown(wait=True)


@dataclass(eq=False)
class _HostGrad:
    """A gradient on its way to the host: the copy (on a GPU, still in flight until ``done``) and
    the dtype of the master it feeds."""

    copy: torch.Tensor
    dtype: torch.dtype
    done: Any = None  # the CUDA event recorded after the copy on the side stream

    def result(self) -> torch.Tensor:
        if self.done is not None:
            self.done.synchronize()
        return self.copy.to(dtype=self.dtype)  # no copy when the dtype is the master's


@dataclass(eq=False)
class _Speculated:
    """A host update run during the backward on private copies, waiting for ``step()`` to
    commit or discard it."""

    grad: torch.Tensor  # the gradient it ran on, in the master's dtype, on the host
    state: dict[str, Any]  # the updated state dict (NVMe: its non-tensor values only)
    master: torch.Tensor | None  # the updated master (None on NVMe: it is in ``staged``)
    staged: list[tuple[str, Path, Path, _SwapFile]] = field(default_factory=list)  # NVMe files


@dataclass(eq=False)
class _Reported:
    """What the program reported of one parameter's gradient, and the update it started."""

    slot: _Slot
    storage: Callable[[], Any]  # weak reference to the reported gradient's storage
    version: int  # the gradient's ``_version`` when reported
    geometry: tuple[int, tuple[int, ...], tuple[int, ...]]  # storage offset, shape, stride
    hyper: dict[str, Any]  # the group's hyper-parameters the update ran with
    future: Future | None  # resolves to a _Speculated; None: not updated (p.grad already set)

    def same_tensor(self, grad: torch.Tensor) -> bool:
        """Whether ``grad`` is the reported gradient untouched: the same storage (autograd hands
        a detached alias of it to ``p.grad``, sharing its version counter) at the same version."""
        storage = self.storage()
        return (storage is not None and grad.untyped_storage() is storage and grad._version == self.version
                and (grad.storage_offset(), tuple(grad.shape), tuple(grad.stride())) == self.geometry)


def _same_values(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(
            torch.equal(a.detach().cpu(), b.detach().cpu()))
    return bool(a == b)


def _hyperparameters(group: Mapping[str, Any]) -> dict[str, Any]:
    """A snapshot of a group's hyper-parameters (tensor values copied: schedulers may write them in
    place)."""
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
            for k, v in group.items() if k not in ("params", "param_names")}


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """No inf or NaN in any of ``tensors`` (one host sync in all)."""
    if not tensors:
        return True
    flags = [torch.isfinite(t).all().to(_CPU) for t in tensors]
    return bool(torch.stack(flags).all())


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class TieredOptimizer(torch.optim.Optimizer):
    """Runs a torch optimizer's update with its states placed on memory tiers.

    Args:
        optimizer: a ``torch.optim.AdamW``, ``Adam`` or ``SGD`` over the model's parameters. Its
            ``param_groups`` are shared, not copied; any state it already has is moved to the
            planned tiers (and cleared from it). Do not step it directly afterwards.
        placements: each parameter's ``StatePlacement``; parameters left out get the default
            (states and update on the device, i.e. the plain optimizer).
        master_dtype: the dtype of master weights for device updates (``torch.float32`` for mixed
            precision); ``None`` keeps the update on the parameter. Host updates always run on a
            host master, of this dtype or else of the parameter's dtype promoted to at least fp32.
        swap_root: where to make the swap directory for NVME states (default: the system's
            temporary directory).
        loss_scale: fp16 mixed precision's dynamic loss scale (the gradients arrive scaled by
            it); needs ``master_dtype``, so that every update runs on an unscaled master.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        placements: Mapping[torch.Tensor, StatePlacement] | None = None,
        *,
        master_dtype: torch.dtype | None = None,
        swap_root: str | Path | None = None,
        loss_scale: DynamicLossScale | None = None,
        update_in_backward: bool = False,
    ) -> None:
        optimizer_name(optimizer)  # refuses an optimizer whose update tierplan cannot place
        if loss_scale is not None and master_dtype is None:
            raise ValueError("a loss scale needs master weights (master_dtype=torch.float32): the gradients "
                             "are unscaled on their way into the masters")
        if loss_scale is not None and update_in_backward:
            raise ValueError("update_in_backward=True cannot run with a loss scale (fp16-mixed): whether a step "
                             "runs at all depends on every gradient being finite, known only after the backward; "
                             "use update_in_backward=False")
        # Optimizer.__init__ sets up the hook dicts and the profiled ``step``; its own parameter
        # group is a placeholder, replaced by the wrapped optimizer's list right after.
        super().__init__([torch.zeros(0)], dict(optimizer.defaults))
        self.defaults = optimizer.defaults
        self.param_groups = optimizer.param_groups
        self.state: defaultdict[torch.Tensor, Any] = defaultdict(dict)
        self._optimizer = optimizer
        self._master_dtype = master_dtype
        self._swap_root = swap_root
        self._swap_dir: Path | None = None
        self._finalizer: weakref.finalize | None = None
        self._closed = False
        self._slots: dict[int, _Slot] = {}
        self.loss_scale = loss_scale
        self._clip = 1.0  # clip_grad_norm_'s factor, applied by the next step
        self._grad_factor = 1.0  # what each gradient is multiplied by on its way into its master
        # The scratch instance whose ``step`` is the wrapped class's update. Built without the
        # class's __init__ (whose signature may not take every key of ``defaults``, e.g. AdamW and
        # ``decoupled_weight_decay``) over a placeholder that is never stepped.
        self._scratch = self._new_scratch()
        # update_in_backward (the module docstring): the background thread, its own scratch
        # instance (the main thread's may run device updates meanwhile), the side stream of the
        # gradient copies on a GPU, and each reported gradient since the last step by slot index.
        self._update_in_backward = bool(update_in_backward)
        self._worker: ThreadPoolExecutor | None = None
        self._worker_scratch: torch.optim.Optimizer | None = None
        self._copy_streams: dict[torch.device, Any] = {}
        self._reported: dict[int, _Reported] = {}
        self._group_of: dict[int, Mapping[str, Any]] | None = None

        params = [p for group in self.param_groups for p in group["params"]]
        by_id = {id(p): i for i, p in enumerate(params)}
        chosen: dict[int, StatePlacement] = {}
        for p, placement in (placements or {}).items():
            if id(p) not in by_id:
                raise ValueError(
                    f"placement given for a parameter of shape {tuple(p.shape)} that is not in "
                    f"the optimizer's param_groups"
                )
            chosen[id(p)] = placement
        for group in self.param_groups:
            for p in group["params"]:
                slot = self._new_slot(p, chosen.get(id(p), StatePlacement()))
                existing = optimizer.state.pop(p, None)
                self._place(slot, group, dict(existing or {}))

    def _new_scratch(self) -> torch.optim.Optimizer:
        """A scratch instance of the wrapped class (see ``__init__``)."""
        cls = SUPPORTED_OPTIMIZERS[optimizer_name(self._optimizer)]
        scratch: torch.optim.Optimizer = cls.__new__(cls)
        torch.optim.Optimizer.__init__(scratch, [torch.zeros(0)], dict(self._optimizer.defaults))
        return scratch

    # ------------------------------------------------------------------ placement book-keeping

    def _new_slot(self, p: torch.Tensor, placement: StatePlacement) -> _Slot:
        index = len(self._slots)
        shape = tuple(p.shape)
        if placement.update == HOST and placement.states == DEVICE:
            raise ValueError(
                f"parameter {index} (shape {shape}): a host update needs its states on the host "
                f"or NVMe, not on the device"
            )
        if placement.update == HOST:
            if self._master_dtype is not None:
                master_dtype: torch.dtype | None = self._master_dtype
            elif p.is_floating_point():
                master_dtype = torch.promote_types(p.dtype, torch.float32)
            else:
                master_dtype = p.dtype
        elif self._master_dtype is not None and (self._master_dtype != p.dtype or self.loss_scale is not None):
            # Under a loss scale every update runs on a master, which gets the unscaled gradient.
            master_dtype = self._master_dtype
        else:
            master_dtype = None
        slot = _Slot(p, index, placement, master_dtype, self.state[p])
        self._slots[id(p)] = slot
        if placement.states == NVME:
            self._ensure_swap_dir()
        return slot

    def _slot(self, p: torch.Tensor) -> _Slot:
        slot = self._slots.get(id(p))
        if slot is not None:
            return slot
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                # A group added after construction (add_param_group): the default placement.
                slot = self._new_slot(p, StatePlacement())
                self._place(slot, group, {})
                return slot
        raise ValueError(f"parameter of shape {tuple(p.shape)} is not in this optimizer")

    def placement(self, p: torch.Tensor) -> StatePlacement:
        """The placement of parameter ``p``'s master and states."""
        return self._slot(p).placement

    def _ensure_swap_dir(self) -> Path:
        if self._closed:
            raise RuntimeError("TieredOptimizer is closed: its NVMe states were removed")
        if self._swap_dir is None:
            if self._swap_root is not None:
                Path(self._swap_root).mkdir(parents=True, exist_ok=True)  # compile's debug_dir/swap
            path = tempfile.mkdtemp(prefix="tierplan-optim-", dir=self._swap_root)
            self._swap_dir = Path(path)
            # Holds the path, not ``self``: collecting the optimizer (or exiting) removes it.
            self._finalizer = weakref.finalize(self, _remove_tree, path)
        return self._swap_dir

    @staticmethod
    def _home(key: str, group: Mapping[str, Any], device: torch.device) -> torch.device:
        # Torch keeps Adam's "step" counter on the CPU unless capturable or fused kernels need it
        # beside the parameter (torch's load_state_dict policy does the same).
        if key == "step" and not (group.get("capturable") or group.get("fused")):
            return _CPU
        return device

    def _host_copy(self, slot: _Slot, t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(t.shape, dtype=t.dtype, device=_CPU, pin_memory=slot.pin)
        out.copy_(t)
        return out

    def _swap_path(self, slot: _Slot, key: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", str(key))
        return self._ensure_swap_dir() / f"p{slot.index}.{safe}.bin"

    def _write_files(self, slot: _Slot, tensors: Mapping[str, torch.Tensor]) -> None:
        """Writes every tensor to a temporary file, then renames them over the old ones.

        A step interrupted while writing leaves the old files untouched; the rename is atomic,
        so each file always holds a whole tensor.
        """
        self._commit_files(slot, self._stage_files(slot, tensors, ".tmp"))

    def _stage_files(self, slot: _Slot, tensors: Mapping[str, torch.Tensor], suffix: str,
                     ) -> list[tuple[str, Path, Path, _SwapFile]]:
        """Writes every tensor to its file's name plus ``suffix``, leaving the old files as they are."""
        staged: list[tuple[str, Path, Path, _SwapFile]] = []
        for key, t in tensors.items():
            path = self._swap_path(slot, key)
            tmp = path.with_name(path.name + suffix)
            flat = t.detach().reshape(-1).contiguous().to(_CPU)
            _write_file(tmp, flat.view(torch.uint8), None)
            staged.append((key, tmp, path, _SwapFile(path, t.dtype, t.shape)))
        return staged

    @staticmethod
    def _commit_files(slot: _Slot, staged: list[tuple[str, Path, Path, _SwapFile]]) -> None:
        for key, tmp, path, record in staged:
            os.replace(tmp, path)
            slot.files[key] = record

    def _clear(self, slot: _Slot) -> None:
        slot.state.clear()
        slot.master = None
        for record in slot.files.values():
            record.path.unlink(missing_ok=True)
        slot.files.clear()

    def _place(self, slot: _Slot, group: Mapping[str, Any], values: dict[str, Any]) -> None:
        """Puts a parameter's state (a dict in the wrapped class's format) on its tier."""
        p = slot.param
        tier = slot.placement.states
        device = slot.update_device if tier == DEVICE else _CPU
        master_value = values.pop("master", None)
        tensors: dict[str, torch.Tensor] = {}
        if slot.master_dtype is not None:
            # Without a saved master (a plain optimizer's checkpoint, or a master of the
            # parameter's own dtype, which is not saved) the parameter's value is the master.
            source = master_value if isinstance(master_value, torch.Tensor) else p.detach()
            tensors["master"] = source.to(dtype=slot.master_dtype)
        reference_dtype = slot.master_dtype or p.dtype
        for key, value in values.items():
            if not isinstance(value, torch.Tensor):
                slot.state[key] = value
            elif key == "step":
                fast = slot.placement.update == DEVICE and (group.get("capturable") or group.get("fused"))
                tensors[key] = value.to(torch.float32) if fast else value
            elif value.is_floating_point() and reference_dtype.is_floating_point:
                # torch's own policy: floating states follow the dtype of the tensor they update.
                tensors[key] = value.to(dtype=reference_dtype)
            else:
                tensors[key] = value
        if tier == NVME:
            self._write_files(slot, tensors)
            return
        for key, t in tensors.items():
            # Always a copy: the tier's tensors must not alias the caller's (or the parameter).
            if tier == HOST:
                placed = self._host_copy(slot, t)
            else:
                placed = t.to(self._home(key, group, device), copy=True)
            if key == "master":
                slot.master = placed
            else:
                slot.state[key] = placed

    # ------------------------------------------------------------------ the update

    def _fetch(self, slot: _Slot, group: Mapping[str, Any], loaded: dict[str, torch.Tensor] | None = None,
               ) -> tuple[dict[str, Any], torch.Tensor | None]:
        """The state dict and master the update runs on, where the update runs (``loaded``: an
        NVMe slot's files, already read ahead)."""
        tier, update = slot.placement.states, slot.placement.update
        if tier == DEVICE or (tier == HOST and update == HOST):
            return slot.state, slot.master
        device = slot.update_device
        work: dict[str, Any] = {}
        master: torch.Tensor | None = None
        if tier == HOST:
            for key, value in slot.state.items():
                if isinstance(value, torch.Tensor):
                    value = value.to(self._home(key, group, device), copy=True)
                work[key] = value
            if slot.master is not None:
                master = slot.master.to(device, copy=True)
            return work, master
        work.update(slot.state)  # NVME: only non-tensor values are in memory
        for key, value in (loaded if loaded is not None else self._read_files(slot)).items():
            if key == "master":
                master = value.to(device)
            else:
                work[key] = value.to(self._home(key, group, device))
        return work, master

    @staticmethod
    def _read_files(slot: _Slot) -> dict[str, torch.Tensor]:
        return {key: record.read() for key, record in slot.files.items()}

    def _store(self, slot: _Slot, work: dict[str, Any], master: torch.Tensor | None,
               io: _StepIO | None = None) -> None:
        """Puts the updated state back on its tier (the inverse of ``_fetch``); an NVMe slot's
        files are written behind by ``io`` when given."""
        tier, update = slot.placement.states, slot.placement.update
        if tier == DEVICE or (tier == HOST and update == HOST):
            return  # the update ran on the tier's own tensors
        if tier == NVME:
            tensors = {k: v for k, v in work.items() if isinstance(v, torch.Tensor)}
            if master is not None:
                tensors["master"] = master
            # Written first, dropped after: an interrupted write keeps the old files.
            if io is not None:
                io.write_behind(self._write_files, slot, tensors)
            else:
                self._write_files(slot, tensors)
            slot.state.clear()
            slot.state.update({k: v for k, v in work.items() if not isinstance(v, torch.Tensor)})
            return
        for key, value in work.items():
            old = slot.state.get(key)
            if (
                isinstance(value, torch.Tensor)
                and isinstance(old, torch.Tensor)
                and old.shape == value.shape
                and old.dtype == value.dtype
            ):
                old.copy_(value)
            elif isinstance(value, torch.Tensor):
                slot.state[key] = self._host_copy(slot, value)
            else:
                slot.state[key] = value
        if master is not None and slot.master is not None:
            slot.master.copy_(master)

    def _run_update(
        self, group: Mapping[str, Any], tensors: list[torch.Tensor], states: list[dict[str, Any]], *, host: bool,
        scratch: torch.optim.Optimizer | None = None,
    ) -> None:
        """Runs the wrapped class's ``step`` over ``tensors`` (their ``.grad`` set) and ``states``
        (on ``scratch``, default the main thread's scratch instance)."""
        scratch_group = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        if host:
            scratch_group.update({k: v for k, v in _HOST_FLAGS.items() if k in scratch_group})
        scratch_group["params"] = tensors
        scratch = scratch if scratch is not None else self._scratch
        idle_groups = scratch.param_groups
        scratch.param_groups = [scratch_group]
        scratch.state = defaultdict(dict, zip(tensors, states))
        try:
            scratch.step()
        finally:
            # Drop every reference to this update's tensors, even when the step raised.
            scratch.param_groups = idle_groups
            scratch.state = defaultdict(dict)

    def _set_master_grad(self, p: torch.Tensor, master: torch.Tensor) -> None:
        grad = p.grad
        assert grad is not None
        # No copy when the gradient already has the master's dtype and device: torch's updates
        # never write into a gradient, so the master may share it. The loss scale and a clip
        # are divided out in the master's dtype (an fp16 gradient divided in fp16 underflows).
        grad = grad.to(device=master.device, dtype=master.dtype)
        master.grad = grad if self._grad_factor == 1.0 else grad * self._grad_factor

    @staticmethod
    def _write_back(p: torch.Tensor, master: torch.Tensor) -> None:
        with torch.no_grad():
            p.copy_(master)

    def _step_resident(self, group: Mapping[str, Any], slots: list[_Slot]) -> None:
        """One batched update of a group's parameters whose states stay on the device."""
        tensors = []
        for slot in slots:
            if slot.master is not None:
                self._set_master_grad(slot.param, slot.master)
                tensors.append(slot.master)
            else:
                tensors.append(slot.param)
        try:
            self._run_update(group, tensors, [s.state for s in slots], host=False)
            for slot in slots:
                if slot.master is not None:
                    self._write_back(slot.param, slot.master)
        finally:
            for slot in slots:
                if slot.master is not None:
                    slot.master.grad = None

    def _step_one(self, group: Mapping[str, Any], slot: _Slot, io: _StepIO | None = None) -> None:
        """Fetches one parameter's states, updates it where planned, and stores them back."""
        work, master = self._fetch(slot, group, io.loaded(slot) if io is not None else None)
        try:
            target = slot.param
            if master is not None:
                self._set_master_grad(slot.param, master)
                target = master
            self._run_update(group, [target], [work], host=slot.placement.update == HOST)
            if master is not None:
                self._write_back(slot.param, master)
            self._store(slot, work, master, io)
        finally:
            if master is not None:
                master.grad = None

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """Performs one optimization step (the wrapped class's update, placed per parameter)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._closed and any(s.placement.states == NVME for s in self._slots.values()):
            raise RuntimeError("TieredOptimizer is closed: its NVMe states were removed")
        scale = self.loss_scale
        if scale is not None and not _all_finite(self._grads()):
            scale.update(found_inf=True)  # skipped: the next backward runs at a smaller scale
            self._clip = 1.0
            return loss
        self._grad_factor = self._clip / (scale.scale if scale is not None else 1.0)
        try:
            # Updates run during the backward first: waiting for them re-raises a worker's error
            # before anything else of this step is written.
            committed = self._commit_reported() if self._reported else set()
            self._step_groups(skip=committed)
        finally:
            self._grad_factor, self._clip = 1.0, 1.0
        if scale is not None:
            scale.update(found_inf=False)
        return loss

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the parameters' gradients, loss scale or not:
        returns the total norm of the true gradients (inf or NaN when a scaled gradient
        overflowed; that step is skipped anyway). With a loss scale the gradients are not
        touched: the clip is folded into the next ``step``'s unscale."""
        if self._update_in_backward:
            raise ValueError("clip_grad_norm_ with update_in_backward=True: the host updates already ran during the "
                             "backward, before the norm of all gradients was known; use update_in_backward=False "
                             "to clip")
        if self.loss_scale is None:
            params = [p for group in self.param_groups for p in group["params"]]
            return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
        grads = self._grads()
        if not grads:
            return torch.tensor(0.0)
        norms = [torch.linalg.vector_norm(g.float(), norm_type).to(_CPU) for g in grads]
        total = torch.linalg.vector_norm(torch.stack(norms), norm_type) / self.loss_scale.scale
        if bool(torch.isfinite(total)):
            self._clip = min(1.0, float(max_norm) / (float(total) + 1e-6))  # torch's own epsilon
        return total

    def _step_groups(self, skip: set[int] | frozenset[int] = frozenset()) -> None:
        """The updates of every parameter with a gradient, but those in ``skip`` (by ``id``: their
        update ran during the backward and is committed)."""
        for group in self.param_groups:
            resident: list[_Slot] = []
            placed: list[_Slot] = []
            for p in group["params"]:
                if p.grad is None or id(p) in skip:
                    continue
                slot = self._slot(p)
                (resident if slot.placement.states == DEVICE else placed).append(slot)
            if resident:
                self._step_resident(group, resident)
            swapped = [slot for slot in placed if slot.placement.states == NVME]
            if not swapped:
                for slot in placed:
                    self._step_one(group, slot)
                continue
            with _StepIO(swapped, self._read_files) as io:
                for slot in placed:
                    self._step_one(group, slot, io)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._discard_reported()  # the step is dropped: so are the updates it started
        self._optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ updates during the backward

    @property
    def update_in_backward(self) -> bool:
        """Whether host updates start as the backward reports their gradients (module docstring)."""
        return self._update_in_backward

    @property
    def pending_updates(self) -> int:
        """Host updates started during the backward since the last ``step`` or ``zero_grad``."""
        return sum(1 for r in self._reported.values() if r.future is not None)

    def gradient_ready(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """The program's listener: ``grad`` is parameter ``p``'s final gradient of this backward.

        With ``update_in_backward`` and a host update, copies it to the host and starts the
        update on the background thread (a no-op otherwise). Raises ValueError when ``p``'s
        gradient was already reported since the last ``step`` (gradient accumulation)."""
        if not self._update_in_backward:
            return
        slot = self._slots.get(id(p))
        if slot is None or slot.placement.update != HOST:
            return
        if slot.index in self._reported:
            raise ValueError(
                f"update_in_backward=True: the gradient of parameter {slot.index} (shape {tuple(p.shape)}) came "
                f"twice before step(), as in gradient accumulation; its update already started from the first "
                f"one. Use update_in_backward=False to accumulate gradients over several backwards")
        geometry = (grad.storage_offset(), tuple(grad.shape), tuple(grad.stride()))
        if self._group_of is None:
            self._group_of = {id(q): g for g in self.param_groups for q in g["params"]}
        hyper = _hyperparameters(self._group_of[id(p)])
        future = None
        if p.grad is None:
            # Else the new gradient is added to the one in p.grad, which step() updates from.
            host = self._offload_grad(slot, grad)
            future = self._background().submit(self._speculate, slot, hyper, host)
        self._reported[slot.index] = _Reported(slot, weakref.ref(grad.untyped_storage()), grad._version,
                                               geometry, hyper, future)

    def _background(self) -> ThreadPoolExecutor:
        if self._closed:
            raise RuntimeError("TieredOptimizer is closed")
        if self._worker is None:
            # One thread: the updates run one after another, in the order the backward reports them.
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierplan-host-update")
            self._worker_scratch = self._new_scratch()
        return self._worker

    def _offload_grad(self, slot: _Slot, grad: torch.Tensor) -> _HostGrad:
        """Starts the copy of ``grad`` to the host. The program may reuse or free its storage
        once it goes on, so the copy is made now: on the CPU a plain copy (and cast to the
        master's dtype); on a GPU into pinned memory on a side stream, after the compute stream's
        work so far (which made ``grad``)."""
        dtype = slot.master_dtype or grad.dtype
        if not grad.is_cuda:
            return _HostGrad(grad.detach().to(dtype=dtype, copy=True), dtype)
        stream = self._copy_streams.get(grad.device)
        if stream is None:
            stream = self._copy_streams[grad.device] = torch.cuda.Stream(device=grad.device)
        host = torch.empty(grad.shape, dtype=grad.dtype, pin_memory=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(grad.device))
        stream.wait_event(ready)
        with torch.cuda.stream(stream):
            host.copy_(grad.detach(), non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        # The caching allocator keeps the gradient's block until the copy ran, without a
        # reference here (which would stop autograd handing this very tensor to p.grad).
        grad.record_stream(stream)
        return _HostGrad(host, dtype, done)

    def _speculate(self, slot: _Slot, hyper: dict[str, Any], host: _HostGrad) -> _Speculated:
        """The background job: ``slot``'s host update on private copies of its master and states."""
        grad = host.result()
        if slot.placement.states == NVME:
            work, master = self._fetch(slot, hyper)  # read from the files: already private
        else:
            work = {k: (self._host_copy(slot, v) if isinstance(v, torch.Tensor) else v)
                    for k, v in slot.state.items()}
            master = self._host_copy(slot, slot.master) if slot.master is not None else None
        assert master is not None, "a host update runs on a host master"
        master.grad = grad
        try:
            self._run_update(hyper, [master], [work], host=True, scratch=self._worker_scratch)
        finally:
            master.grad = None
        if slot.placement.states != NVME:
            return _Speculated(grad, work, master)
        tensors = {k: v for k, v in work.items() if isinstance(v, torch.Tensor)}
        tensors["master"] = master
        # Staged beside the current files; step() renames them over, zero_grad() removes them.
        staged = self._stage_files(slot, tensors, ".next")
        return _Speculated(grad, {k: v for k, v in work.items() if not isinstance(v, torch.Tensor)}, None, staged)

    def _wait_reported(self) -> tuple[dict[int, _Speculated], BaseException | None]:
        """Every background update's result by slot index, and the first error among them."""
        results: dict[int, _Speculated] = {}
        error: BaseException | None = None
        for index, reported in self._reported.items():
            if reported.future is None:
                continue
            try:
                results[index] = reported.future.result()
            except BaseException as exc:  # noqa: BLE001 - re-raised by the caller, after the clean-up
                error = error or exc
        return results, error

    def _commit_reported(self) -> set[int]:
        """Waits for the updates run during the backward and commits each one whose gradient is
        the one in ``p.grad`` now; returns the committed parameters' ids. A worker's error is
        re-raised with nothing committed."""
        results, error = self._wait_reported()
        reported, self._reported, self._group_of = self._reported, {}, None
        if error is not None:
            for result in results.values():
                self._drop(result)
            raise error
        committed: set[int] = set()
        group_of = {id(q): g for g in self.param_groups for q in g["params"]}
        for index, result in results.items():
            slot = reported[index].slot
            if self._still_valid(reported[index], result, group_of[id(slot.param)]):
                self._commit(slot, result)
                committed.add(id(slot.param))
            else:
                self._drop(result)  # step() updates it from p.grad as it is now
        return committed

    @staticmethod
    def _still_valid(reported: _Reported, result: _Speculated, group: Mapping[str, Any]) -> bool:
        """Whether the update that ran is the one step() would run now: the same gradient (the
        reported tensor untouched, else equal values) and the same hyper-parameters."""
        grad = reported.slot.param.grad
        if grad is None:
            return False
        now = _hyperparameters(group)
        if now.keys() != reported.hyper.keys() or not all(_same_values(now[k], reported.hyper[k]) for k in now):
            return False
        if reported.same_tensor(grad):
            return True
        # Another tensor (autograd copied it, or the caller replaced it): compare the values.
        return grad.shape == result.grad.shape and bool(
            torch.equal(grad.detach().to(device=_CPU, dtype=result.grad.dtype), result.grad))

    def _commit(self, slot: _Slot, result: _Speculated) -> None:
        """Makes a background update the slot's state, then writes its master into the parameter
        (not earlier: the backward may still have read the weight)."""
        if result.staged:
            self._commit_files(slot, result.staged)
            slot.state.clear()
            slot.state.update(result.state)
            master = slot.files["master"].read()  # not kept in memory since the update: NVMe's point
        else:
            # The updated tensors replace the old ones (no copy); the dict is the one self.state shows.
            slot.state.clear()
            slot.state.update(result.state)
            slot.master = master = result.master
        assert master is not None
        self._write_back(slot.param, master)

    @staticmethod
    def _drop(result: _Speculated) -> None:
        for _, tmp, _, _ in result.staged:
            tmp.unlink(missing_ok=True)

    def _discard_reported(self) -> None:
        """Waits for the background updates and throws them away (errors included: nothing of
        them is kept)."""
        if not self._reported:
            return
        results, _ = self._wait_reported()
        for result in results.values():
            self._drop(result)
        self._reported, self._group_of = {}, None

    # ------------------------------------------------------------------ checkpoints

    def _full_state(self, slot: _Slot) -> dict[str, Any]:
        """The parameter's state in the wrapped class's format (NVMe files read back)."""
        entry: dict[str, Any] = {}
        master = slot.master
        for key, value in slot.state.items():
            entry[key] = value
        for key, record in slot.files.items():
            if key == "master":
                master = record.read()
            else:
                entry[key] = record.read()
        # The master is saved only beside a state (a plain optimizer takes a non-empty state for
        # an initialised one) and only when it is not the parameter's own value at its dtype.
        if entry and master is not None and master.dtype != slot.param.dtype:
            entry["master"] = master
        return entry

    def state_dict(self) -> dict[str, Any]:
        """The wrapped class's standard state dict; host and NVMe states are CPU tensors."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        if self._closed and any(s.files for s in self._slots.values()):
            raise RuntimeError("TieredOptimizer is closed: its NVMe states were removed")
        param_mappings: dict[int, int] = {}
        start_index = 0
        packed_groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            for i, p in enumerate(group["params"], start_index):
                param_mappings.setdefault(id(p), i)
            packed["params"] = [param_mappings[id(p)] for p in group["params"]]
            start_index += len(packed["params"])
            packed_groups.append(packed)
        packed_state: dict[int, dict[str, Any]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                entry = self._full_state(self._slot(p))
                if entry:
                    packed_state[param_mappings[id(p)]] = entry
        state_dict: dict[str, Any] = {"state": packed_state, "param_groups": packed_groups}
        if self.loss_scale is not None:
            state_dict["loss_scale"] = self.loss_scale.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Loads a state dict of the wrapped class's format, each state onto its planned tier."""
        state_dict = dict(state_dict)
        self._discard_reported()  # updates of the old states must not land on the loaded ones
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for group, saved in zip(groups, saved_groups):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size of "
                    "optimizer's group"
                )
        saved_state: Mapping[Any, Any] = state_dict["state"]
        if self.loss_scale is not None and "loss_scale" in state_dict:
            self.loss_scale.load_state_dict(state_dict["loss_scale"])
        for group, saved in zip(groups, saved_groups):
            params = group["params"]
            names = group.get("param_names")
            # Updated in place, not replaced: the wrapped optimizer and LR schedulers hold these
            # very dicts.
            group.clear()
            group.update({k: v for k, v in saved.items() if k != "params"})
            group["params"] = params
            if names is not None and "param_names" not in saved:
                group["param_names"] = names
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            for saved_id, p in zip(saved["params"], params):
                slot = self._slot(p)
                self._clear(slot)
                self._place(slot, group, dict(saved_state.get(saved_id, {})))
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # ------------------------------------------------------------------ accounting and cleanup

    def state_bytes(self) -> dict[str, int]:
        """Bytes of masters and optimizer states on each tier now."""
        totals = {DEVICE: 0, HOST: 0, NVME: 0}
        for slot in self._slots.values():
            tier = slot.placement.states
            if tier == NVME:
                totals[NVME] += sum(record.nbytes for record in slot.files.values())
                continue
            tensors: Iterable[Any] = list(slot.state.values()) + [slot.master]
            totals[tier] += sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))
        return totals

    @property
    def swap_dir(self) -> Path | None:
        """The directory of the NVMe state files (None when no state is placed on NVMe)."""
        return self._swap_dir

    def close(self) -> None:
        """Stops the background update thread and removes the swap directory (and with it the
        NVMe states). Idempotent."""
        self._discard_reported()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()
        for slot in self._slots.values():
            slot.files.clear()
