"""Op times measured on the machine that will run the plan, in place of the roofline.

The roofline (``compute.py``) prices an op from its FLOPs and bytes at a device's peak rates. On
small tensors that is far from what the kernels take: measured on the 2-core dev box, a
8 x 1024 x 1024 matmul streams its weight at ~17 GB/s where a large copy reaches 22-41 GB/s, a
64^3 matmul takes 8 us against a 3 us roofline, and tiny-transformer's layer-norm backwards take
11 us each against 3.6 (thread start-up, cache state, vector units a transcendental keeps busy). When the
plan is made for the machine it runs on (``tierplan.compile``, ``bench/fidelity.py``), each op of
the captured graph can simply be timed there, as Checkmate (Jain et al., MLSys 2020) and MONeT
profile their cost models: ``measure_op_times`` runs the graph a few times with ``torch.fx``'s
interpreter and times every call, each on its real inputs.

What a time covers: the ``OpOverload`` call as the generated program makes it (dispatch, the
output's allocation, the kernel), timed in place: the graph runs 5 to 25 times (as half a
second allows) after one untimed run, each op timed where it runs, after the ops before it, so
its inputs are as warm or cold in cache and its output's allocation as fresh as in a program that
runs the ops in that order; an op's time is its median over the runs. (Timed alone, each op
called again and again on the same inputs, gpt2-tiny's ops sum to 2.2 ms where the whole graph
takes 3.2 ms.) On CUDA every call is synchronized. Ops that write into an input (``copy_``,
``add_``) run on copies of their inputs, and the random generators' states are restored at the
end: measuring changes neither the model's buffers nor the random stream. A view is timed too:
it launches no kernel, but its call is a line of the program. The caller sets the allocator up
as the program will run (on the CPU, ``codegen.runtime.keep_freed_memory``): timed before it,
the MLP's 3-4 MiB gradients came from fresh mmaps and one matmul took 1.2 ms of page faults
instead of 0.3.
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch.utils import _pytree as pytree

__all__ = ["MIN_REPEATS", "MAX_REPEATS", "measure_op_times"]

# Runs of the graph: at least MIN_REPEATS, then more while the runs so far took less than
# REPEAT_SECONDS, up to MAX_REPEATS. A few runs of a small graph leave each op's median to a
# shared machine's bursts: with 5 runs gpt2-tiny's ops summed to 2.5, 3.0 and 4.1 ms in three
# measurements a minute apart; a run takes 3-5 ms, so 25 cost 0.1 s.
MIN_REPEATS = 5
MAX_REPEATS = 25
REPEAT_SECONDS = 0.5


def measure_op_times(gm: torch.fx.GraphModule, inputs: Sequence[Any], *,
                     repeats: int | None = None) -> dict[str, float]:
    """Seconds per call_function node of ``gm`` (by node name: the IR's op names), run on
    ``inputs`` (its placeholders' values, on the device the plan is for); ``repeats`` runs
    (default: MIN_REPEATS to MAX_REPEATS, as REPEAT_SECONDS allows)."""
    if repeats is not None and repeats < 1:
        raise ValueError(f"repeats={repeats}: time each op at least once")
    cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if cuda else None
    try:
        with torch.no_grad():
            timer = _TimedInterpreter(gm, sync=torch.cuda.synchronize if cuda else None)
            timer.run(*inputs)  # untimed: first calls (kernel selection, caches, allocator)
            timer.samples.clear()
            runs, began = 0, time.perf_counter()
            while runs < (repeats or MAX_REPEATS):
                timer.run(*inputs)
                runs += 1
                if repeats is None and runs >= MIN_REPEATS and time.perf_counter() - began > REPEAT_SECONDS:
                    break
    finally:
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return {name: statistics.median(samples) for name, samples in timer.samples.items()}


class _TimedInterpreter(torch.fx.Interpreter):
    """Runs the graph as fx does (each value freed after its last use), timing every call."""

    def __init__(self, gm: torch.fx.GraphModule, *, sync: Callable[[], None] | None) -> None:
        super().__init__(gm)
        self.sync = sync
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.node_name = ""

    def run_node(self, n: torch.fx.Node) -> Any:
        self.node_name = n.name
        return super().run_node(n)

    def call_function(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable:
            # It writes an input (a buffer's running statistics): it runs on copies (the graph
            # reads its result, not the buffer), so measuring changes nothing.
            args, kwargs = pytree.tree_map_only(torch.Tensor, torch.clone, (args, kwargs))
        if self.sync is not None:
            self.sync()
        start = time.perf_counter()
        result = target(*args, **kwargs)
        if self.sync is not None:
            self.sync()
        self.samples[self.node_name].append(time.perf_counter() - start)
        return result
