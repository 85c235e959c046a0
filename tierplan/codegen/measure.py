"""An independent device-memory tracker for checking a program's peak against its plan.

On a GPU, ``torch.cuda.max_memory_allocated`` is the measure. On the CPU the device tier and the
host pool are the same DRAM, so the allocator cannot tell them apart; this tracker counts storages
instead: it sees every op's outputs through a ``TorchDispatchMode`` and counts each storage the
first time it appears, until the storage is freed (a weak reference's callback). Storages passed as
``exclude`` (the host pool) are never counted; ``existing`` ones (caller-owned tensors the plan puts
on the device) are counted from the start. It shares nothing with the planner or the emitter.
"""
from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class StorageTracker(TorchDispatchMode):
    """``with StorageTracker(existing=..., exclude=...) as t: ...``; then ``t.peak_bytes``."""

    def __init__(
        self, *, existing: Iterable[torch.Tensor] = (), exclude: Iterable[torch.Tensor] = (),
        device_type: str = "cpu",
    ) -> None:
        super().__init__()
        self.device_type = device_type
        self._excluded = {t.untyped_storage()._cdata for t in exclude}
        self._live: dict[int, int] = {}
        self._refs: dict[int, Any] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        for t in existing:
            self._see(t.untyped_storage(), watch=False)

    def _see(self, storage: torch.UntypedStorage, *, watch: bool = True) -> None:
        key = storage._cdata
        if key in self._live or key in self._excluded:
            return
        self._live[key] = storage.nbytes()
        self.current_bytes += self._live[key]
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        if watch:
            self._refs[key] = weakref.ref(storage, lambda _ref, k=key: self._gone(k))

    def _gone(self, key: int) -> None:
        self.current_bytes -= self._live.pop(key, 0)
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                self._see(t.untyped_storage())
        return out


__all__ = ["StorageTracker"]
