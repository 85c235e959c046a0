"""What the multi-process tests share: spawn a gloo world whose ranks report "ok" (or their
traceback) to files, and the parallel search's ranked plans for gpt2-tiny on CPU devices."""
from __future__ import annotations

import functools
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

SEQ, BATCH = 16, 8  # gpt2-tiny's sequence and global batch in every multi-process test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker: Callable[..., None], world: int, *args: Any) -> None:
    """``worker(rank, world, port, out, *args)`` on ``world`` processes; each writes
    ``out/rank{r}``, starting "ok" or holding its traceback, and every rank must say ok."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(world, free_port(), out, *args), nprocs=world, join=True)
        for r in range(world):
            text = Path(out, f"rank{r}").read_text()
            assert text.startswith("ok"), f"rank {r}:\n{text}"
        print(Path(out, "rank0").read_text())


@functools.lru_cache(maxsize=None)
def _profile() -> Any:
    from tierplan.profiling import profile_zoo_model

    return profile_zoo_model("gpt2-tiny", seq_len=SEQ)


@functools.lru_cache(maxsize=None)
def ranked_plans(world: int, layout: str | None = None) -> tuple[dict[str, Any], ...]:
    """The configs of every plan the search ranks for gpt2-tiny on ``world`` CPU devices."""
    from tierplan.parallel.search import plan_parallel

    result = plan_parallel(_profile(), "cpu", world, global_batch=BATCH, top=200, layout=layout)
    return tuple(dict(p.config) for p in result.plans)
