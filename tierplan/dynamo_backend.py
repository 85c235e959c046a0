"""``tierplan.backend``: the planner and the emitter as a ``torch.compile`` backend.

AOTAutograd hands the backend the joint forward+backward graph of each dynamo subgraph; the plan of
it is rendered as one generator program that the forward graph runs up to the first step that
needs the backward's inputs and the backward graph resumes (see ``backend``).
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from tierplan.api import Budget, plan_graph_or_smallest
from tierplan.codegen.emit import Program, emit
from tierplan.codegen.runtime import (
    Context,
    Runtime,
    SplitRun,
    TierplanRuntimeError,
    run_step,
    shutdown_workers,
)
from tierplan.codegen.optimizer import StatePlacement, TieredOptimizer
from tierplan.compile import load_program, optimizer_setting, placed_optimizer, slug, state_placements
from tierplan.cost_models.hardware import Hardware
from tierplan.ir import TensorKind
from tierplan.passes.capture import annotate_aot_joint
from tierplan.plans.plan import Plan


@dataclass
class CompiledGraph:
    """One graph ``tierplan.backend`` planned: a training (joint forward+backward) or inference
    graph of one dynamo subgraph. ``plan`` is what runs, ``source_path`` the generated program."""

    name: str
    kind: str  # "training" or "inference"
    plan: Plan
    program: Program
    source_path: Path
    note: str = ""  # set when the budget was infeasible for this graph and a larger one was used


class Backend:
    """``torch.compile(model, backend=tierplan.backend(...))``; see ``backend``.

    ``graphs`` lists every graph planned so far (one per dynamo subgraph and mode, more after a
    recompilation); ``plans`` their Plans. ``on_transfer`` is passed to every run's Context.
    """

    def __init__(
        self, *, hardware: str | Path | Hardware | None, memory_budget: Budget, training: bool,
        tiers: Sequence[str], time_limit: float | None, debug_dir: str | Path | None,
        optimizer: torch.optim.Optimizer | None = None, precision: str | None = None, reorder: bool = False,
    ) -> None:
        self.hardware = hardware
        self.reorder = reorder
        self.memory_budget = memory_budget
        self.training = training
        self.tiers = tuple(tiers)
        self.time_limit = time_limit
        self.debug_dir = Path(debug_dir) if debug_dir is not None else None
        self.graphs: list[CompiledGraph] = []
        self.on_transfer: Callable[[Context, str], None] | None = None
        self._count = 0
        self._runners: weakref.WeakSet[_Runner] = weakref.WeakSet()
        self._source_root: Path | None = None  # generated sources without a debug_dir
        if precision == "fp16-mixed":
            raise ValueError("tierplan.backend does not run precision='fp16-mixed': autograd starts each graph's "
                             "backward from an unscaled gradient, so the loss scale cannot be applied inside the "
                             "plan; use tierplan.compile(..., precision='fp16-mixed', optimizer=...) or bf16-mixed")
        self._optimizer_kind, self._precision = optimizer_setting(optimizer, precision, training=training)
        self._user_optimizer = optimizer
        self._placements: dict[torch.Tensor, StatePlacement] = {}  # from every training graph's plan
        self._tiered: TieredOptimizer | None = None

    @property
    def optimizer(self) -> TieredOptimizer:
        """The optimizer to step (given ``optimizer=``): its states where the plans of the graphs
        planned so far put them. Made at its first use, which must follow the first training
        call (the graphs are planned then); parameters of graphs planned later keep their states
        on the device."""
        if self._user_optimizer is None:
            raise RuntimeError("tierplan.backend(...) was made without optimizer=: there is no placed optimizer")
        if self._tiered is None:
            if not self._placements:
                raise RuntimeError("run a training step through the compiled model first: the backend plans "
                                   "the optimizer's states with the first training graph")
            swap_root = self.debug_dir / "swap" if self.debug_dir is not None else None
            self._tiered = placed_optimizer(self._user_optimizer, self._placements, precision=self._precision,
                                            swap_root=swap_root)
        return self._tiered

    def pending_runs(self) -> int:
        """Forward runs whose backward has not run yet (each holds its paused program)."""
        return sum(len(r.runs) for r in self._runners if isinstance(r, _SplitRunner))

    @property
    def plans(self) -> list[Plan]:
        return [g.plan for g in self.graphs]

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
        from torch._functorch.partitioners import default_partition

        self._count += 1
        name = f"{slug(gm.__class__.__name__ if gm.__class__.__name__ != 'GraphModule' else 'graph')}{self._count}"
        kinds = _primal_kinds(gm, example_inputs)
        device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
        hardware = self.hardware or ("cpu" if device.type == "cpu" else "h100-sxm")

        def partition_fn(joint: torch.fx.GraphModule, joint_inputs: Any, **kwargs: Any) -> Any:
            if not self.training:
                return default_partition(joint, joint_inputs, **kwargs)
            # Dead nodes would be counted by the planner although nothing runs them.
            joint.graph.eliminate_dead_code()
            joint.recompile()
            num_fwd = int(kwargs["num_fwd_outputs"])
            fw, _ = default_partition(joint, joint_inputs, **kwargs)
            forward_names = {n.name for n in fw.graph.nodes if n.op == "call_function"}
            graph, specs = annotate_aot_joint(
                joint, kinds, num_fwd_outputs=num_fwd, forward_names=forward_names, name=f"{name}.train")
            plan, note = self._plan(graph, hardware, training=True)
            if plan.update is not None:
                primals = [sp.name for sp in specs if sp.source != "tangent"]
                self._placements.update(state_placements(plan, {
                    n: v for n, v in zip(primals, example_inputs) if isinstance(v, nn.Parameter)}))
            late = [sp.name for sp in specs if sp.source == "tangent"]
            program = emit(plan, joint, title=f"{graph.name}: {plan.method}", split=(late, num_fwd))
            step, source_path = self._load(program, plan, device)
            self.graphs.append(CompiledGraph(graph.name, "training", plan, program, source_path, note))
            runner = _SplitRunner(self, step, program, source_path, device)
            return _aot_graphs(joint, joint_inputs, num_fwd, runner)

        def inference_compiler(fgm: torch.fx.GraphModule, inputs: Any) -> Callable[..., Any]:
            graph, _ = annotate_aot_joint(
                fgm, kinds, num_fwd_outputs=None, forward_names=None, name=f"{name}.infer")
            plan, note = self._plan(graph, hardware, training=False)
            program = emit(plan, fgm, title=f"{graph.name}: {plan.method}")
            step, source_path = self._load(program, plan, device)
            self.graphs.append(CompiledGraph(graph.name, "inference", plan, program, source_path, note))
            return make_boxed_func(_InferenceRunner(self, step, program, source_path, device))

        return aot_module_simplified(
            gm, example_inputs, fw_compiler=lambda g, _: make_boxed_func(g),
            bw_compiler=lambda g, _: make_boxed_func(g), partition_fn=partition_fn,
            inference_compiler=inference_compiler,
        )

    def _plan(self, graph: Any, hardware: Any, *, training: bool) -> tuple[Plan, str]:
        plan, note = plan_graph_or_smallest(
            graph, hardware=hardware, memory_budget=self.memory_budget, training=training,
            tiers=self.tiers, time_limit=self.time_limit,
            optimizer=self._optimizer_kind if training else None, precision=self._precision,
            reorder=self.reorder)
        if note:
            warnings.warn(f"tierplan.backend: {note}", stacklevel=2)
        return plan, note

    def _load(self, program: Program, plan: Plan, device: torch.device) -> tuple[Callable[..., Any], Path]:
        if self.debug_dir is not None:
            return load_program(program, plan, device, self.debug_dir, keep_plan=True)
        if self._source_root is None:
            self._source_root = Path(tempfile.mkdtemp(prefix="tierplan-"))
            weakref.finalize(self, shutil.rmtree, self._source_root, True)
        return load_program(program, plan, device, self._source_root, keep_plan=False)


class _RuntimePool:
    """Runtimes (host pool + copy queues) of one program. A run holds one from its forward to its
    backward, so runs in flight at once (gradient accumulation) never share host-pool slots."""

    def __init__(self, program: Program, device: torch.device, swap_root: Path | None) -> None:
        self.program, self.device, self.swap_root = program, device, swap_root
        self.free: list[Runtime] = []

    def take(self) -> Runtime:
        if self.free:
            return self.free.pop()
        rt = Runtime(self.program.layout, self.device, swap_root=self.swap_root)
        weakref.finalize(rt, shutdown_workers, rt._workers)
        return rt

    def give(self, rt: Runtime) -> None:
        self.free.append(rt)


class _Runner:
    def __init__(self, backend: Backend, step: Callable[..., Any], program: Program,
                 source_path: Path, device: torch.device) -> None:
        self.backend, self.step, self.program = backend, step, program
        self.source_path, self.device = source_path, device
        swap = backend.debug_dir / "swap" if backend.debug_dir is not None else None
        self.pool = _RuntimePool(program, device, swap)
        backend._runners.add(self)

    def _copied_out(self, outs: Sequence[Any], on_host: Sequence[bool]) -> list[Any]:
        # Outputs the plan leaves on the host are views of the reused host pool: copy them out,
        # to the device the caller expects them on.
        return [o.to(self.device, copy=True) if host and o is not None else o
                for o, host in zip(outs, on_host)]


class _InferenceRunner(_Runner):
    def __call__(self, *flat: torch.Tensor) -> list[Any]:
        rt = self.pool.take()
        try:
            outs = run_step(self.step, Context(rt, on_transfer=self.backend.on_transfer), list(flat),
                            source_path=str(self.source_path), line_steps=self.program.line_steps)
            return self._copied_out(list(outs), self.program.outputs_on_host)
        finally:
            self.pool.give(rt)


class _SplitRunner(_Runner):
    """Runs a split program: ``forward`` to the yield, ``backward`` from it. The run in between is
    found by a token tensor the forward returns as its only saved value."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.runs: dict[int, tuple[SplitRun, Runtime]] = {}
        self._ids = 0

    def forward(self, *primals: torch.Tensor) -> tuple[Any, ...]:
        rt = self.pool.take()
        ctx = Context(rt, on_transfer=self.backend.on_transfer)
        run = SplitRun(self.step, ctx, list(primals), source_path=str(self.source_path),
                       line_steps=self.program.line_steps)
        try:
            outs = run.forward()
        except BaseException:
            self.pool.give(rt)
            raise
        self._ids += 1
        self.runs[self._ids] = (run, rt)
        token = torch.tensor([self._ids], dtype=torch.int64)
        # A forward whose backward never runs (its graph is dropped) gives its resources back.
        weakref.finalize(token, self._abandon, self._ids)
        return (*outs, token)

    def backward(self, token: torch.Tensor, *tangents: torch.Tensor) -> tuple[Any, ...]:
        key = int(token.item())
        if key not in self.runs:
            raise TierplanRuntimeError(
                f"{self.source_path}: no forward run {key} is waiting for its backward (a planned "
                f"step's backward runs once; retain_graph is not supported)"
            )
        run, rt = self.runs.pop(key)
        try:
            grads = run.backward([t.contiguous() if isinstance(t, torch.Tensor) else t for t in tangents])
            return tuple(self._copied_out(list(grads), self.program.outputs_on_host))
        finally:
            self.pool.give(rt)

    def _abandon(self, key: int) -> None:
        entry = self.runs.pop(key, None)
        if entry is not None:
            entry[0].abandon()
            self.pool.give(entry[1])


def _primal_kinds(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> list[tuple[TensorKind, str]]:
    """Parameter, buffer or input, with a readable source, for every input dynamo lifted."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    kinds = []
    for node, value in zip(placeholders, example_inputs):
        arg = node.meta.get("grapharg")
        source = arg.source.name if arg is not None and getattr(arg, "source", None) is not None else node.name
        source = source() if callable(source) else str(source)
        if isinstance(value, nn.Parameter):
            kinds.append((TensorKind.PARAMETER, source))
        elif "_buffers_" in node.name or "._buffers[" in source:
            kinds.append((TensorKind.BUFFER, source))
        else:
            kinds.append((TensorKind.INPUT, source))
    return kinds


def _aot_graphs(
    joint: torch.fx.GraphModule, joint_inputs: Any, num_fwd: int, runner: _SplitRunner
) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """The forward and backward graphs AOTAutograd gets back from the partitioner: the forward
    calls ``runner.forward`` on the primals and returns the forward outputs and a token (its only
    saved value); the backward calls ``runner.backward`` on the token and the tangents and returns
    one gradient slot per primal, None where the joint graph has none. Node metadata (the fake
    values AOTAutograd reads) is copied from the joint graph."""
    import operator

    from torch._guards import detect_fake_mode

    placeholders = [n for n in joint.graph.nodes if n.op == "placeholder"]
    tangents = [n for n in placeholders if n.name.startswith("tangents") or
                type(n.meta.get("desc")).__name__ == "TangentAOTInput"]
    primals = [n for n in placeholders if n not in tangents]
    outs = list(pytree.tree_leaves(joint.graph.output_node().args[0], is_leaf=lambda x: x is None))
    fake_mode = detect_fake_mode([n.meta.get("val") for n in placeholders])
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        token_val = torch.empty(1, dtype=torch.int64)

    def placeholder(g: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
        new = g.placeholder(node.name)
        new.meta.update(node.meta)
        return new

    fw = torch.fx.Graph()
    call = fw.call_function(runner.forward, tuple(placeholder(fw, n) for n in primals))
    fw_outs: list[Any] = []
    for i, v in enumerate(outs[:num_fwd]):
        if not isinstance(v, torch.fx.Node):
            fw_outs.append(v)
            continue
        item = fw.call_function(operator.getitem, (call, i))
        item.meta["val"] = v.meta.get("val")
        fw_outs.append(item)
    token = fw.call_function(operator.getitem, (call, num_fwd))
    token.meta["val"] = token_val
    fw.output(tuple([*fw_outs, token]))

    bw = torch.fx.Graph()
    token_in = bw.placeholder("tierplan_token")
    token_in.meta["val"] = token_val
    bcall = bw.call_function(runner.backward, (token_in, *(placeholder(bw, n) for n in tangents)))
    grads: list[Any] = []
    for j, v in enumerate(outs[num_fwd:]):
        if not isinstance(v, torch.fx.Node):
            grads.append(None)
            continue
        item = bw.call_function(operator.getitem, (bcall, j))
        item.meta["val"] = v.meta.get("val")
        grads.append(item)
    bw.output(tuple(grads))
    return torch.fx.GraphModule(torch.nn.Module(), fw), torch.fx.GraphModule(torch.nn.Module(), bw)


def backend(
    *,
    hardware: str | Path | Hardware | None = None,
    memory_budget: Budget = None,
    training: bool = True,
    tiers: Sequence[str] = ("host",),
    time_limit: float | None = None,
    debug_dir: str | Path | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    precision: str | None = None,
    reorder: bool = False,
) -> Backend:
    """A ``torch.compile`` backend that plans every graph it is given and runs the plan.

        tp = tierplan.backend(hardware="h100-sxm", memory_budget=0.8)
        model = torch.compile(model, backend=tp)
        loss = model(x, labels=y); loss.backward()      # planned forward, planned backward
        tp.plans[0].summary()

    AOTAutograd gives the backend the joint forward+backward graph of each dynamo subgraph (in
    ``partition_fn``). The backend annotates it (dynamo lifts parameters to inputs; example inputs
    that are ``nn.Parameter`` are parameters), plans it with ``plan_graph`` and renders the plan
    as ONE generator program that runs the whole schedule: the forward graph AOTAutograd compiles
    runs it up to the first step that needs the backward's tangents and returns the forward
    outputs; the backward graph resumes it with the tangents and returns the gradients. What
    the plan saves, recomputes or offloads across that boundary stays in the paused program (the
    forward's only saved tensor is a token naming the run). Graphs run without autograd
    (``torch.no_grad()``, or inputs that need no gradient) come to the inference compiler and are
    planned with ``training=False``.

    New shapes: dynamo traces a graph again with symbolic sizes when a call brings a new shape. A
    plan is made at concrete sizes (annotating a graph reads each size as an int, which adds a
    guard on it), so every new set of sizes is a new graph and a new plan, within torch.compile's
    own recompile limit; the generated program checks its size inputs against the values it was
    planned at (``ctx.check_planned``) rather than run a plan at sizes it was not made for.

    Graph breaks: every dynamo subgraph is planned on its own, and ``memory_budget`` applies to
    each: a fraction is of that subgraph's keep-all peak, bytes are that subgraph's limit. The
    activations a subgraph hands to the next are held by autograd between them, outside any plan.
    When a fractional budget is infeasible for a subgraph (a loss-only subgraph after a graph
    break has nothing to move), that subgraph is planned at the smallest budget the planner can
    meet, with a warning and ``CompiledGraph.note``; a budget in bytes that a subgraph cannot meet
    raises InfeasibleBudget (inside torch's BackendCompilerFailed).
    ``training=False`` plans inference graphs only; joint graphs then run AOTAutograd's default
    partition, unplanned. ``hardware`` defaults to "cpu" for graphs on the CPU, else "h100-sxm";
    the other options are as in ``tierplan.compile``. The returned object keeps ``graphs`` and
    ``plans``.

    ``optimizer``: the ``torch.optim`` AdamW, Adam or SGD the loop steps. Every training graph's
    plan then places its parameters' states (within that graph's budget), and the loop steps
    ``tp.optimizer`` instead, after the first training call (a ``TieredOptimizer`` sharing the
    given one's param groups, as ``compile``'s ``compiled.optimizer``).

    ``reorder=True``: each graph's op order is chosen with its plan (``tierplan.plan``'s
    ``reorder``); the forward's ops still all run before the backward's.
    """
    return Backend(hardware=hardware, memory_budget=memory_budget, training=training, tiers=tiers,
                   time_limit=time_limit, debug_dir=debug_dir, optimizer=optimizer, precision=precision,
                   reorder=reorder)


__all__ = ["Backend", "CompiledGraph", "backend"]
