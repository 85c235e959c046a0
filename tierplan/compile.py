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

``backend`` plugs the same path into ``torch.compile``.
"""
from __future__ import annotations

import hashlib
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from tierplan.api import Budget, plan_graph
from tierplan.codegen.emit import Program, emit, load
from tierplan.codegen.runtime import Context, Runtime, run_step
from tierplan.cost_models.hardware import Hardware
from tierplan.ir import TensorKind
from tierplan.passes.capture import Captured, CaptureError, capture
from tierplan.planner.plan import Plan
from tierplan.planner.validate import validate


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

    # -- running ------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat = self.flat_inputs(args, kwargs)
        if self.training_step:
            return _PlannedStep.apply(self, *flat)
        with torch.no_grad():
            outs = self.run_flat([t.detach() for t in flat])
            # Outputs the plan leaves on the host are views of the reused host pool: copy them out.
            outs = [o.clone() if host else o for o, host in zip(outs, self.program.outputs_on_host)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def run_flat(self, flat: Sequence[torch.Tensor]) -> list[Any]:
        """Run the program once on its flat inputs (the placeholders of the captured graph)."""
        # The host pool is about to be reused: gradients of earlier runs still in it move out.
        for held in self._held:
            held.materialize()
        self._held.clear()
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

    def materialize(self) -> None:
        self.grads = [
            g.to(d, copy=True) if host and g is not None else g
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
) -> CompiledModule:
    """Plan ``model`` under ``memory_budget`` and return a module that runs the plan.

    ``hardware`` defaults to the "cpu" preset for a model on the CPU and "h100-sxm" on a GPU;
    ``memory_budget`` and ``tiers`` are as in ``tierplan.plan``. The generated source is written
    to ``debug_dir`` (or a temporary directory) and its path is ``compiled.source_path``; NVMe
    swap files go to ``debug_dir/swap`` (or the system temporary directory) and are removed at
    the end of every call.
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
    return compile_plan(model, captured, plan, device=device, debug_dir=debug_dir)


def compile_plan(
    model: nn.Module, captured: Captured, plan: Plan, *, device: torch.device | str = "cpu",
    debug_dir: str | Path | None = None,
) -> CompiledModule:
    """Emit and load the program of an existing ``plan`` of ``captured`` (see ``compile``)."""
    program = emit(plan, captured.joint, title=f"{plan.graph.name}: {plan.method}")
    digest = hashlib.sha1(program.source.encode()).hexdigest()[:10]
    root = Path(debug_dir) if debug_dir is not None else Path(tempfile.gettempdir()) / "tierplan"
    source_path = root / f"{_slug(plan.graph.name)}_{digest}.py"
    step = load(program, source_path, device)
    device = torch.device(device)
    if device.type == "cuda" and program.offdevice_inputs:
        # The plan keeps these caller-owned tensors (parameters, usually) off the device: they
        # move to pinned host memory, and the program brings them to the GPU when it needs them.
        named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        for spec in captured.inputs:
            if spec.name in program.offdevice_inputs and spec.source in named:
                t = named[spec.source]
                t.data = t.data.to("cpu").pin_memory()
    if debug_dir is not None:
        plan.to_json(source_path.with_suffix(".plan.json"))
    runtime = Runtime(program.layout, torch.device(device),
                      swap_root=Path(debug_dir) / "swap" if debug_dir is not None else None)
    return CompiledModule(model, captured, plan, program, step, runtime, source_path, torch.device(device))


def backend(**options: Any) -> Callable[[torch.fx.GraphModule, list[Any]], Callable[..., Any]]:
    """A ``torch.compile`` backend (not implemented yet).

    The intended design: ``aot_module_simplified`` with ``AotRecorder``-style hooks, the planner
    deciding on the joint graph in ``partition_fn`` and the emitter compiling the result. Until
    then, use ``tierplan.compile(model, example_inputs, ...)``.
    """
    raise NotImplementedError(
        "tierplan.backend is not implemented yet: capture() needs a module whose parameters "
        "require grad, but dynamo lifts parameters to graph inputs; use tierplan.compile"
    )


def _model_device(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> torch.device:
    for t in [*model.parameters(), *model.buffers(), *pytree.tree_leaves((args, kwargs or {}))]:
        if isinstance(t, torch.Tensor):
            if t.device.type == "meta":
                raise CaptureError("compile needs a model with real weights; this one is on the meta device")
            return t.device
    return torch.device("cpu")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "model"


__all__ = ["CompiledModule", "backend", "compile", "compile_plan"]
