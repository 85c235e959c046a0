"""Buffers from, and packings to, MiniMalloc's CSV format.

Input rows are ``id,lower,upper,size``: buffer ``id`` is live over [lower, upper) and needs
``size`` bytes (an optional ``alignment`` column is read too). Output rows repeat them with the
``offset`` chosen for each buffer.
"""
from __future__ import annotations

import csv
import os
from typing import Sequence

from tierplan.packing.buffers import Buffer, Packing, PackingError

REQUIRED = ("id", "lower", "upper", "size")


def read_buffers_csv(path: str | os.PathLike) -> list[Buffer]:
    """The buffers of a MiniMalloc CSV; PackingError names the file and line of a bad row."""
    where = os.fspath(path)
    try:
        with open(where, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise PackingError(f"{where}: cannot read: {e.strerror or e}") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise PackingError(f"{where}: not a CSV file: {e}") from None
    if not rows:
        raise PackingError(f"{where}: empty file; expected the header {','.join(REQUIRED)}")
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise PackingError(
            f"{where}:1: header {','.join(rows[0])!r} lacks column {missing[0]!r}; "
            f"expected {','.join(REQUIRED)}"
        )
    col = {name: header.index(name) for name in (*REQUIRED, "alignment") if name in header}
    buffers, line_of = [], {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank lines are allowed anywhere
        if len(row) != len(header):
            raise PackingError(f"{where}:{line}: {len(row)} fields, the header has {len(header)}")
        values = {}
        for name, k in col.items():
            if name == "id":
                continue
            try:
                values[name] = int(row[k].strip())
            except ValueError:
                raise PackingError(
                    f"{where}:{line}: {name} {row[k]!r} is not an integer"
                ) from None
        b = Buffer(row[col["id"]].strip(), values["lower"], values["upper"], values["size"],
                   values.get("alignment", 1))
        if b.size < 0:
            raise PackingError(f"{where}:{line}: buffer {b.id!r}: size {b.size} is negative")
        if b.end <= b.start:
            raise PackingError(
                f"{where}:{line}: buffer {b.id!r}: upper {b.end} <= lower {b.start}; "
                f"the live range [lower, upper) must not be empty"
            )
        if b.alignment < 1:
            raise PackingError(f"{where}:{line}: buffer {b.id!r}: alignment {b.alignment} is below 1")
        if b.id in line_of:
            raise PackingError(f"{where}:{line}: buffer id {b.id!r} already on line {line_of[b.id]}")
        line_of[b.id] = line
        buffers.append(b)
    return buffers


def write_packing_csv(path: str | os.PathLike, buffers: Sequence[Buffer], packing: Packing) -> None:
    """Write ``id,lower,upper,size,offset`` rows (plus ``alignment`` when any is not 1)."""
    aligned = any(b.alignment != 1 for b in buffers)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow([*REQUIRED, *(["alignment"] if aligned else []), "offset"])
        for b in buffers:
            extra = [b.alignment] if aligned else []
            out.writerow([b.id, b.start, b.end, b.size, *extra, packing.offsets[b.id]])
