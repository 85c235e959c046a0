"""What ``tierplan pack FILE.csv`` prints: the buffers of a CSV packed into one arena, against
the lower bound."""
from __future__ import annotations

import os

from tierplan.formats.buffers_csv import read_buffers_csv, write_packing_csv
from tierplan.packing.pack import pack


def pack_command(
    csv_path: str | os.PathLike,
    capacity: int | None = None,
    time_limit_s: float = 10.0,
    out_path: str | os.PathLike | None = None,
) -> str:
    """What ``tierplan pack FILE.csv [--capacity BYTES] [--time-limit S] [--out OUT.csv]``
    prints. Raises PackingError (a ValueError) for a bad file or an unmeetable capacity."""
    buffers = read_buffers_csv(csv_path)
    result = pack(buffers, capacity, time_limit_s)
    gap = result.gap_bytes
    share = gap / result.lower_bound if result.lower_bound else 0.0
    lines = [
        f"{os.fspath(csv_path)}: {len(buffers)} buffers"
        + (f", capacity {capacity:,} bytes" if capacity is not None else ""),
        f"  arena        {result.arena_bytes:,} bytes",
        f"  lower bound  {result.lower_bound:,} bytes",
        f"  gap          {gap:,} bytes ({share:.2%})",
        "  optimal      " + ("yes: the arena meets the lower bound" if result.optimal
                             else "not proven within the time limit"),
        f"  method       {result.method}",
        f"  solve time   {result.solve_s:.2f} s",
    ]
    if out_path is not None:
        write_packing_csv(out_path, buffers, result)
        lines.append(f"  offsets in   {os.fspath(out_path)}")
    return "\n".join(lines)
