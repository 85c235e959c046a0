"""``tierplan.compile``: capture, plan, emit and load a model as a drop-in ``nn.Module``.

    compiled = tierplan.compile(model, (x,), example_kwargs={"labels": y}, memory_budget=0.75)
    loss = compiled(x, labels=y); loss.backward(); opt.step()

Training runs the plan of the JOINT forward+backward graph in one generated function,
``step(ctx, *flat_inputs) -> (loss, *grads)``: the planner decided over the whole step, so one
straight-line program is the faithful rendering of it (a split into a forward and a backward
program would add a boundary the plan does not have). The module's forward runs that program
inside a ``torch.autograd.Function`` and returns the loss; its backward hands the precomputed
gradients (scaled by the incoming gradient, 1 for ``loss.backward()``) to the parameters, so they
land in ``.grad`` as in eager mode and any ``torch.optim`` optimizer works unchanged. The cost is
that gradients exist from the forward call on, which the plan already accounts for (they are
outputs of the step it planned).

``backend`` plugs the planner and the emitter into ``torch.compile`` (see its docstring): there the
plan of each joint graph is split at the first step that needs the backward's inputs.
"""
from __future__ import annotations

import contextlib
import hashlib
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

from tierplan.api import Budget, plan_graph
from tierplan.codegen.emit import Program, emit, load
from tierplan.codegen.runtime import (
    Context,
    Runtime,
    SplitRun,
    TierplanRuntimeError,
    run_step,
    shutdown_workers,
)
from tierplan.cost_models.hardware import Hardware
from tierplan.ir import TensorKind
from tierplan.passes.capture import Captured, CaptureError, annotate_aot_joint, capture
from tierplan.plans.plan import InfeasibleBudget, Plan
from tierplan.plans.validate import validate
from tierplan.units import format_bytes


class CompiledModule(nn.Module):
    """A model whose every call runs a generated, planned program.

    ``plan`` is the Plan it runs, ``source_path`` the generated Python file (open it to read
    what runs), ``program`` the rendered program. ``model`` is the wrapped module: its parameters
    are this module's parameters, so optimizers, ``state_dict`` and ``.to`` see them.
    Shapes and dtypes of the inputs are fixed by the example inputs it was compiled for.
    """

    def __init__(
        self, model: nn.Module, captured: Captured, plan: Plan, program: Program,
        step: Callable[..., Any], runtime: Runtime, source_path: Path, device: torch.device,
    ) -> None:
        super().__init__()
        self.model = model
        self.plan = plan
        self.program = program
        self.source_path = source_path
        self.training_step = captured.training
        self._captured = captured
        self._step = step
        self._runtime = runtime
        self._device = device
        # Called as on_transfer(ctx, storage) after every transfer is issued (tracing, tests).
        self.on_transfer: Callable[[Context, str], None] | None = None
        self._held: list[_HeldGrads] = []
        weakref.finalize(self, runtime.close)
        n_primals = sum(1 for s in captured.inputs if s.source != "tangent")
        self._n_fwd = len(program.outputs) - n_primals if captured.training else len(program.outputs)

    @property
    def host_pool(self) -> torch.Tensor:
        """The preallocated host pool the program swaps into (not device memory)."""
        return self._runtime.host_pool

    @property
    def arena(self) -> torch.Tensor | None:
        """The device arena of the latest call (compiled with ``arena=True``) while its gradients
        keep it alive, else None. Every call allocates its own arena of ``arena_bytes`` when it
        starts; ``program.arena`` says what lives where in it."""
        storage = self._runtime.latest_arena()
        if storage is None:
            return None
        return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)

    @property
    def arena_bytes(self) -> int:
        return self.program.layout.arena_bytes

    # -- running ------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat = self.flat_inputs(args, kwargs)
        if self.training_step:
            return _PlannedStep.apply(self, *flat)
        with torch.no_grad():
            outs = self.run_flat([t.detach() for t in flat])
            # Outputs the plan leaves on the host are views of the reused host pool: copy them out.
            outs = [o.to(self._device, copy=True) if host else o
                    for o, host in zip(outs, self.program.outputs_on_host)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def run_flat(self, flat: Sequence[torch.Tensor]) -> list[Any]:
        """Run the program once on its flat inputs (the placeholders of the captured graph)."""
        # The host pool is about to be reused: gradients of earlier runs still in it move out.
        # Gradients that are views of an earlier run's arena (a forward whose backward has not
        # run; ``.grad`` kept for gradient accumulation) move out of it too, so they keep their
        # own bytes alive, not a whole arena, while this run allocates its own.
        arena = self._runtime.latest_arena()
        for held in self._held:
            held.materialize(arena)
        self._held.clear()
        if arena is not None:
            for p in self.model.parameters():
                if p.grad is not None and p.grad.untyped_storage()._cdata == arena._cdata:
                    p.grad = p.grad.clone()
        del arena
        ctx = Context(self._runtime, on_transfer=self.on_transfer)
        outs = run_step(
            self._step, ctx, list(flat), source_path=str(self.source_path),
            line_steps=self.program.line_steps,
        )
        return list(outs)

    def flat_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """Parameters, buffers, the call's tensors and the loss seed, in placeholder order.

        Parameters are passed as themselves (not detached), so the autograd Function links the
        gradients it returns to them.
        """
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        flat: list[torch.Tensor] = []
        for spec in self._captured.inputs:
            if spec.kind is TensorKind.PARAMETER:
                t = params[spec.source]
            elif spec.kind is TensorKind.BUFFER:
                t = buffers[spec.source]
            elif spec.source == "tangent":
                t = torch.ones(spec.shape, dtype=getattr(torch, spec.dtype), device=self._device)
            else:
                if spec.index >= len(leaves):
                    raise CaptureError(
                        f"compiled {self.plan.graph.name} takes {spec.index + 1}+ input tensors "
                        f"({spec.source} is one), the call passed {len(leaves)}"
                    )
                t = leaves[spec.index]
            if tuple(t.shape) != tuple(spec.shape) or str(t.dtype).removeprefix("torch.") != spec.dtype:
                raise CaptureError(
                    f"input {spec.source} is {t.dtype}{list(t.shape)}, but {self.plan.graph.name} "
                    f"was compiled for {spec.dtype}{list(spec.shape)}; compile again for new shapes"
                )
            flat.append(t)
        return flat

    def split_outputs(self, outs: list[Any]) -> tuple[Any, list[Any], list[bool]]:
        """(the loss, one gradient per primal input, whether each is in host memory the program
        reuses) of a training step's outputs."""
        on_host = self.program.outputs_on_host
        return outs[self._n_fwd - 1], outs[self._n_fwd:], on_host[self._n_fwd:]


class _HeldGrads:
    """Gradients of one run between its forward and its backward."""

    def __init__(self, grads: list[Any], devices: list[torch.device], on_host: list[bool]) -> None:
        self.grads, self.devices, self.on_host = grads, devices, on_host

    def materialize(self, arena: torch.UntypedStorage | None = None) -> None:
        """Copy out gradients in the host pool (to their parameter's device) and in ``arena``."""
        key = arena._cdata if arena is not None else None
        self.grads = [
            g.to(d, copy=True) if g is not None and (
                host or (key is not None and g.untyped_storage()._cdata == key)) else g
            for g, d, host in zip(self.grads, self.devices, self.on_host)
        ]
        self.on_host = [False] * len(self.grads)

    def claim(self) -> list[Any]:
        self.materialize()
        grads, self.grads = self.grads, []
        return grads


class _PlannedStep(torch.autograd.Function):
    """Forward runs the whole planned step; backward returns the gradients it computed."""

    @staticmethod
    def forward(ctx: Any, module: CompiledModule, *flat: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        outs = module.run_flat([t.detach() for t in flat])
        loss, grads, on_host = module.split_outputs(outs)
        # A gradient the plan left on the host is a view of the host pool: it is copied to where
        # its parameter lives in backward (outside the planned step, whose peak it is not part
        # of), or before the next run reuses the pool, whichever comes first.
        ctx.held = _HeldGrads(grads, [p.device for p in flat[: len(grads)]], on_host)
        module._held.append(ctx.held)
        ctx.n_tangents = len(flat) - len(grads)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> Any:  # type: ignore[override]
        held, ctx.held = ctx.held, None
        grads = held.claim()
        # The program ran with a seed of 1 (loss.backward()); the gradient is linear in the seed.
        if not bool(torch.all(grad_loss == 1)):
            grads = [None if g is None else g * grad_loss for g in grads]
        return (None, *grads, *([None] * ctx.n_tangents))


def compile(  # noqa: A001 - the public name mirrors torch.compile
    model: nn.Module,
    example_inputs: Any,
    *,
    example_kwargs: dict[str, Any] | None = None,
    hardware: str | Path | Hardware | None = None,
    memory_budget: Budget = None,
    training: bool = True,
    tiers: Sequence[str] = ("host",),
    time_limit: float | None = None,
    debug_dir: str | Path | None = None,
    arena: bool = False,
) -> CompiledModule:
    """Plan ``model`` under ``memory_budget`` and return a module that runs the plan.

    ``hardware`` defaults to the "cpu" preset for a model on the CPU and "h100-sxm" on a GPU;
    ``memory_budget`` and ``tiers`` are as in ``tierplan.plan``. The generated source is written
    to ``debug_dir`` (or a temporary directory) and its path is ``compiled.source_path``; NVMe
    swap files go to ``debug_dir/swap`` (or the system temporary directory) and are removed at
    the end of every call.

    ``arena=True``: every device allocation of the plan, gradients included, is a view of one
    device buffer of ``compiled.arena_bytes`` that each call allocates when it starts, written by
    the ops' ``.out`` overloads at offsets packed by lifetime; the loss, caller-owned tensors and
    ops without a usable out overload stay outside it (``compiled.program.arena.summary()``). The
    gradients in ``.grad`` keep their call's arena alive until they are dropped
    (``optimizer.zero_grad()``, which sets them to None by default); on a GPU the caching
    allocator then gives the same block to the next call, so the device holds one arena plus
    the caller's tensors. A call that finds ``.grad`` still in the previous call's arena (gradient
    accumulation) first copies those gradients out, so the old arena is freed and only the
    gradients' own bytes stay, as in eager mode.
    """
    args = example_inputs if isinstance(example_inputs, tuple) else (
        tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,)
    )
    device = _model_device(model, args, example_kwargs)
    if hardware is None:
        hardware = "cpu" if device.type == "cpu" else "h100-sxm"
    captured = capture(model, args, example_kwargs=example_kwargs, training=training)
    plan = plan_graph(
        captured.graph, hardware=hardware, memory_budget=memory_budget, training=training,
        tiers=tiers, time_limit=time_limit,
    )
    validate(plan)
    return compile_plan(model, captured, plan, device=device, debug_dir=debug_dir, arena=arena)


def compile_plan(
    model: nn.Module, captured: Captured, plan: Plan, *, device: torch.device | str = "cpu",
    debug_dir: str | Path | None = None, arena: bool = False,
) -> CompiledModule:
    """Emit and load the program of an existing ``plan`` of ``captured`` (see ``compile``)."""
    program = emit(plan, captured.joint, title=f"{plan.graph.name}: {plan.method}", arena=arena)
    device = torch.device(device)
    runtime = Runtime(program.layout, device,
                      swap_root=Path(debug_dir) / "swap" if debug_dir is not None else None)
    source_root = Path(debug_dir) if debug_dir is not None else Path(tempfile.mkdtemp(prefix="tierplan-"))
    step, source_path = _load_program(program, plan, device, source_root, keep_plan=debug_dir is not None)
    if device.type == "cuda" and program.offdevice_inputs:
        # The plan keeps these caller-owned tensors (parameters, usually) off the device: they
        # move to pinned host memory, and the program brings them to the GPU when it needs them.
        named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        for spec in captured.inputs:
            if spec.name in program.offdevice_inputs and spec.source in named:
                t = named[spec.source]
                t.data = t.data.to("cpu").pin_memory()
    compiled = CompiledModule(model, captured, plan, program, step, runtime, source_path, device)
    if debug_dir is None:
        weakref.finalize(compiled, shutil.rmtree, source_root, True)
    return compiled


def _load_program(program: Program, plan: Plan, device: torch.device, root: Path, *,
                  keep_plan: bool) -> tuple[Callable[..., Any], Path]:
    """Write ``program`` under ``root`` (named after the model and its source's digest), load it,
    and with ``keep_plan`` write the plan's JSON beside it."""
    digest = hashlib.sha1(program.source.encode()).hexdigest()[:10]
    source_path = root / f"{_slug(plan.graph.name)}_{digest}.py"
    step = load(program, source_path, device)
    if keep_plan:
        plan.to_json(source_path.with_suffix(".plan.json"))
    return step, source_path


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
    ) -> None:
        self.hardware = hardware
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
        name = f"{_slug(gm.__class__.__name__ if gm.__class__.__name__ != 'GraphModule' else 'graph')}{self._count}"
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
        kw = dict(hardware=hardware, training=training, tiers=self.tiers, time_limit=self.time_limit)
        note = ""
        try:
            plan = plan_graph(graph, memory_budget=self.memory_budget, **kw)
        except InfeasibleBudget as exc:
            # A fraction is relative to each subgraph's keep-all peak; a small subgraph (the loss
            # after a graph break, one op's inputs and outputs at its peak) may have nothing to
            # move. Such a subgraph gets the smallest budget the planner can meet, with a warning;
            # a budget in bytes is a hard limit and stays an error.
            if not isinstance(self.memory_budget, float) or exc.min_feasible_bytes is None:
                raise
            note = (f"memory_budget={self.memory_budget} ({format_bytes(exc.budget_bytes)}) is "
                    f"infeasible for {graph.name}; planned at the smallest feasible budget, "
                    f"{format_bytes(exc.min_feasible_bytes)}")
            warnings.warn(f"tierplan.backend: {note}", stacklevel=2)
            plan = plan_graph(graph, memory_budget=exc.min_feasible_bytes, **kw)
        validate(plan)
        return plan, note

    def _load(self, program: Program, plan: Plan, device: torch.device) -> tuple[Callable[..., Any], Path]:
        if self.debug_dir is not None:
            return _load_program(program, plan, device, self.debug_dir, keep_plan=True)
        if self._source_root is None:
            self._source_root = Path(tempfile.mkdtemp(prefix="tierplan-"))
            weakref.finalize(self, shutil.rmtree, self._source_root, True)
        return _load_program(program, plan, device, self._source_root, keep_plan=False)


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
    """
    return Backend(hardware=hardware, memory_budget=memory_budget, training=training, tiers=tiers,
                   time_limit=time_limit, debug_dir=debug_dir)


def _model_device(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> torch.device:
    for t in [*model.parameters(), *model.buffers(), *pytree.tree_leaves((args, kwargs or {}))]:
        if isinstance(t, torch.Tensor):
            if t.device.type == "meta":
                raise CaptureError("compile needs a model with real weights; this one is on the meta device")
            return t.device
    return torch.device("cpu")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "model"


__all__ = ["Backend", "CompiledGraph", "CompiledModule", "backend", "compile", "compile_plan"]
