"""The data of buffer packing: buffers in, a packing out, and the error for both.

Kept apart from the algorithms (``pack``, ``exact``) so that file formats and code generation can
use them without the search.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterable, Sequence, Union

from tierplan.passes.liveness import Lifetime


class PackingError(ValueError):
    """The buffers are malformed (the message names the buffer and field) or cannot be packed
    within the capacity (the message gives the lower bound and the capacity)."""


@dataclass(frozen=True)
class Buffer:
    """``size`` bytes live over steps [start, end), at an offset that is a multiple of
    ``alignment``."""

    id: Hashable
    start: int
    end: int
    size: int
    alignment: int = 1


@dataclass
class Packing:
    offsets: dict[Hashable, int]  # buffer id -> byte offset in the arena
    arena_bytes: int  # the highest end of a buffer: offset + size
    lower_bound: int  # proven: no packing needs fewer bytes (the live-bytes bound or better)
    optimal: bool  # arena_bytes == lower_bound
    solve_s: float
    method: str  # what produced the offsets: "greedy-by-size" or "skyline-search"

    @property
    def gap_bytes(self) -> int:
        return self.arena_bytes - self.lower_bound


BufferLike = Union[Buffer, Lifetime]


def as_buffers(items: Iterable[BufferLike], alignment: int = 1) -> list[Buffer]:
    """Buffers from Buffers or liveness Lifetimes (which get ``alignment``), checked."""
    out = []
    for it in items:
        if isinstance(it, Lifetime):
            out.append(Buffer(it.storage, it.start, it.end, it.nbytes, alignment))
        elif isinstance(it, Buffer):
            out.append(it)
        else:
            raise PackingError(f"cannot pack {it!r}: expected a Buffer or a Lifetime")
    check_buffers(out)
    return out


def check_buffers(buffers: Sequence[Buffer]) -> None:
    """Raise PackingError naming the first malformed buffer and field."""
    seen: set[Hashable] = set()
    for b in buffers:
        for field in ("start", "end", "size", "alignment"):
            value = getattr(b, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise PackingError(f"buffer {b.id!r}: {field} must be an integer, got {value!r}")
        if b.size < 0:
            raise PackingError(f"buffer {b.id!r}: size {b.size} is negative")
        if b.end <= b.start:
            raise PackingError(
                f"buffer {b.id!r}: end {b.end} <= start {b.start}; a buffer lives at least one step"
            )
        if b.alignment < 1:
            raise PackingError(f"buffer {b.id!r}: alignment {b.alignment} is below 1")
        try:
            duplicate = b.id in seen
        except TypeError:
            raise PackingError(f"buffer id {b.id!r} is not hashable") from None
        if duplicate:
            raise PackingError(f"buffer id {b.id!r} appears twice")
        seen.add(b.id)
