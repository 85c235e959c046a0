"""What a model returns, as data: which leaves are the program's outputs and which are constants.

A captured graph returns flat tensors; the model returned a loss, a tuple, a dict or a
transformers ``ModelOutput`` (a registered pytree node). ``OutputLayout`` is read off the traced
call once and rebuilds the model's own structure from the program's outputs, so a compiled model
returns what the eager one does (``out.loss``, ``out.logits``, ``out["x"]``, ``out[0]``).

Leaves that are neither tensors nor plain values (a KV-cache object holding tensors) cannot be
rebuilt from flat outputs: they come back as None, and ``dropped`` names them so the caller can
say so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils import _pytree as pytree

# Leaf values returned as they were at trace time: they do not depend on the inputs' values.
_PLAIN = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.Size)


@dataclass(frozen=True)
class OutputLayout:
    """How to rebuild the model's return value from the user outputs of a program.

    ``slots[i]`` is the index of leaf i among the program's user outputs, or None for a leaf
    that is the constant ``constants[i]``; ``loss_slot`` is the index of the loss (training).
    """

    spec: pytree.TreeSpec
    slots: tuple[int | None, ...]
    constants: tuple[Any, ...]
    n_outputs: int
    loss_slot: int | None = None
    dropped: tuple[str, ...] = ()  # leaf paths returned as None (not tensors, not plain values)

    def rebuild(self, outputs: Sequence[Any]) -> Any:
        if len(outputs) != self.n_outputs:
            raise ValueError(f"the layout takes {self.n_outputs} outputs, got {len(outputs)}")
        leaves = [outputs[s] if s is not None else c for s, c in zip(self.slots, self.constants)]
        return pytree.tree_unflatten(leaves, self.spec)


def read_layout(out: Any, *, loss: torch.Tensor | None = None) -> tuple[OutputLayout, list[torch.Tensor]]:
    """The layout of ``out`` and the tensors the graph must return, in slot order.

    With ``loss`` (training) the loss is slot 0 and every other tensor leaf follows; a tensor
    that appears twice gets one slot.
    """
    leaves, spec = pytree.tree_flatten(out)
    paths = [pytree.keystr(path) for path, _ in pytree.tree_flatten_with_path(out)[0]]
    tensors: list[torch.Tensor] = [] if loss is None else [loss]
    slot_of: dict[int, int] = {} if loss is None else {id(loss): 0}
    slots: list[int | None] = []
    constants: list[Any] = []
    dropped: list[str] = []
    for path, leaf in zip(paths, leaves):
        if isinstance(leaf, torch.Tensor):
            if id(leaf) not in slot_of:
                slot_of[id(leaf)] = len(tensors)
                tensors.append(leaf)
            slots.append(slot_of[id(leaf)])
            constants.append(None)
        else:
            slots.append(None)
            plain = isinstance(leaf, _PLAIN)
            constants.append(leaf if plain else None)
            if not plain:
                dropped.append(f"{path or 'output'} ({type(leaf).__name__})")
    layout = OutputLayout(spec, tuple(slots), tuple(constants), len(tensors),
                          loss_slot=0 if loss is not None else None, dropped=tuple(dropped))
    return layout, tensors


__all__ = ["OutputLayout", "read_layout"]
