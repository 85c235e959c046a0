"""``tierplan.compile``: capture, plan, emit and load a model as a drop-in ``nn.Module``.

    compiled = tierplan.compile(model, (x,), example_kwargs={"labels": y}, memory_budget=0.75)
    out = compiled(x, labels=y); out.loss.backward(); opt.step()     # out.logits as in eager

Training runs the plan of the JOINT forward+backward graph in one generated function,
``step(ctx, *flat_inputs) -> (loss, *other outputs, *grads)``: the planner decided over the whole
step, so one straight-line program is the faithful rendering of it (a split into a forward and a
backward program would add a boundary the plan does not have). The module's forward runs that
program inside a ``torch.autograd.Function`` and returns what the model returns (its
``ModelOutput``, tuple, dict or loss), rebuilt from the program's outputs; its backward hands the
precomputed gradients (scaled by the incoming gradient, 1 for ``loss.backward()``) to the
parameters, so they land in ``.grad`` as in eager mode and any ``torch.optim`` optimizer works
unchanged. The cost is that gradients exist from the forward call on, which the plan already
accounts for (they are outputs of the step it planned).

A call is planned for its signature: whether it is a training step (compiled for training, and
grad enabled), the module's train/eval mode, and the shapes and dtypes of its tensors. A call with
a new signature is captured and planned on first sight (``Specialization``), with a warning, up to
``recompile_limit`` signatures, as torch.compile re-specializes. ``dynamic=True`` plans a model once
at its largest shape: a call whose every tensor is no larger than a planned one runs under that
plan's decisions, re-timed for its shapes, without a new search.

``tierplan.backend`` (``tierplan.dynamo_backend``) plugs the same planner and emitter into
``torch.compile``.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from tierplan.api import (
    COMPUTE_DTYPE, Budget, autocast_dtype, model_dtype, plan_graph, plan_graph_like, plan_graph_or_smallest,
    resolve_optimizer,
)
from tierplan.codegen.emit import Program, emit, load
from tierplan.codegen.optimizer import DynamicLossScale, StatePlacement, TieredOptimizer, optimizer_name
from tierplan.codegen.runtime import Context, Runtime, keep_freed_memory, run_step
from tierplan.cost_models.hardware import Hardware
from tierplan.cost_models.measured import measure_op_times
from tierplan.ir import TensorKind
from tierplan.passes.capture import Captured, CaptureError, capture
from tierplan.plans.plan import HOST, Plan

if TYPE_CHECKING:  # the front end of generation imports this module's siblings
    from tierplan.generate import GenerationModule

# As torch._dynamo.config.recompile_limit: signatures planned per compiled module before a call
# with yet another one is refused.
DEFAULT_RECOMPILE_LIMIT = 8
OP_TIMES = ("roofline", "measured")  # how compile prices ops: the hardware's roofline, or timed on the device


class RecompileLimitExceeded(RuntimeError):
    """A call brought a new input signature after ``recompile_limit`` were planned."""


@dataclass(frozen=True)
class Signature:
    """What a plan is specific to: the kind of step, the module's mode and the call's tensors."""

    training: bool  # a training step (forward and backward), else an inference run
    module_training: bool  # model.training: dropout and batch-norm trace differently
    structure: str  # the call's argument tree and its non-tensor values
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @staticmethod
    def of(args: tuple[Any, ...], kwargs: dict[str, Any], *, training: bool, module_training: bool) -> Signature:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        values = [repr(x) for x in leaves if not isinstance(x, torch.Tensor)]
        return Signature(
            training=training, module_training=module_training, structure=f"{spec}|{values}",
            shapes=tuple(tuple(t.shape) for t in tensors),
            dtypes=tuple(str(t.dtype).removeprefix("torch.") for t in tensors),
        )

    def covers(self, other: Signature) -> bool:
        """Whether ``other`` is the same call with every tensor no larger in any dimension."""
        same = (self.training, self.module_training, self.structure, self.dtypes) == (
            other.training, other.module_training, other.structure, other.dtypes)
        return same and len(self.shapes) == len(other.shapes) and all(
            len(a) == len(b) and all(x >= y for x, y in zip(a, b)) for a, b in zip(self.shapes, other.shapes))

    def describe(self) -> str:
        step = "training step" if self.training else "inference"
        mode = "train()" if self.module_training else "eval()"
        tensors = ", ".join(f"{d}{list(s)}" for s, d in zip(self.shapes, self.dtypes))
        return f"{step}, module in {mode}, inputs {tensors}"


@dataclass(frozen=True)
class CompileSettings:
    """The options of ``tierplan.compile``, kept to plan new signatures as they come."""

    hardware: str | Path | Hardware
    memory_budget: Budget
    training: bool
    tiers: tuple[str, ...]
    time_limit: float | None
    dynamic: bool
    recompile_limit: int
    optimizer: str | None = None  # the planned optimizer step's ("adamw", ...), None: not planned
    precision: str | None = None
    reorder: bool = False  # choose the op order too (placement.reorder)
    update_in_backward: bool = False  # host updates start as the backward makes their gradients
    op_times: str = "roofline"  # or "measured": each op timed on the device first (cost_models.measured)


@dataclass
class Specialization:
    """One signature's capture, plan and loaded program."""

    signature: Signature
    captured: Captured
    plan: Plan
    program: Program
    step: Callable[..., Any]
    runtime: Runtime
    source_path: Path

    @property
    def n_fwd(self) -> int:
        """Outputs before the gradients (all of them for inference)."""
        if not self.captured.training:
            return len(self.program.outputs)
        return first_gradient(self.captured, len(self.program.outputs))

    def flat_inputs(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                    device: torch.device, seed: float = 1.0) -> list[torch.Tensor]:
        """Parameters, buffers, the call's tensors and the loss seed, in placeholder order.

        Parameters are passed as themselves (not detached), so the autograd Function links the
        gradients it returns to them. ``seed``: the loss gradient the backward starts from (fp16
        mixed precision's loss scale; the gradients come out multiplied by it).
        """
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        flat: list[torch.Tensor] = []
        for spec in self.captured.inputs:
            if spec.kind is TensorKind.PARAMETER:
                t = params[spec.source]
            elif spec.kind is TensorKind.BUFFER:
                t = buffers[spec.source]
            elif spec.source == "tangent":
                t = torch.full(spec.shape, seed, dtype=getattr(torch, spec.dtype), device=device)
            else:
                if spec.index >= len(leaves):
                    raise CaptureError(
                        f"compiled {self.plan.graph.name} takes {spec.index + 1}+ input tensors "
                        f"({spec.source} is one), the call passed {len(leaves)}"
                    )
                t = leaves[spec.index]
            if tuple(t.shape) != tuple(spec.shape) or str(t.dtype).removeprefix("torch.") != spec.dtype:
                raise CaptureError(
                    f"input {spec.source} is {t.dtype}{list(t.shape)}, but this program of "
                    f"{self.plan.graph.name} was planned for {spec.dtype}{list(spec.shape)}"
                )
            flat.append(t)
        return flat

    def user_outputs(self, outs: Sequence[Any], device: torch.device) -> list[Any]:
        """The outputs the model's return value is rebuilt from, outside the reused host pool."""
        on_host = self.program.outputs_on_host
        n = self.captured.layout.n_outputs if self.captured.layout is not None else self.n_fwd
        # Outputs the plan leaves on the host are views of the reused host pool: copy them out.
        return [o.to(device, copy=True) if on_host[i] and o is not None else o for i, o in enumerate(outs[:n])]

    def rebuild(self, values: Sequence[Any]) -> Any:
        layout = self.captured.layout
        if layout is None:
            return values[0] if len(values) == 1 else tuple(values)
        return layout.rebuild(values)


class CompiledModule(nn.Module):
    """A model whose every call runs a generated, planned program.

    ``plan``, ``program`` and ``source_path`` (the generated Python file: open it to read what
    runs) are those of the latest call's signature; ``specializations`` has every signature
    planned so far. ``model`` is the wrapped module: its parameters are this module's
    parameters, so optimizers, ``state_dict``, ``.to``, ``train()`` and ``eval()`` reach them.
    """

    def __init__(self, model: nn.Module, device: torch.device, settings: CompileSettings | None,
                 *, training: bool, debug_dir: Path | None = None, arena: bool = False,
                 update_in_backward: bool = False) -> None:
        super().__init__()
        self.model = model
        self._debug_dir, self._arena = debug_dir, arena
        # Programs report the gradients of host-updated parameters (emit's ``gradients``) and
        # the optimizer's host updates start from them during the backward.
        self._update_in_backward = update_in_backward
        self.specializations: dict[Signature, Specialization] = {}
        self._settings = settings
        self._trains = training
        self._device = device
        self._active: Specialization | None = None
        self._last_run: Specialization | None = None
        self._source_root: Path | None = None
        # Called as on_transfer(ctx, storage) after every transfer is issued (tracing, tests).
        self.on_transfer: Callable[[Context, str], None] | None = None
        self._held: list[_HeldGrads] = []
        # The optimizer to step: compile(..., optimizer=...)'s, with its states on the planned tiers.
        self.optimizer: TieredOptimizer | None = None

    # -- the latest signature's program ---------------------------------------------------------

    @property
    def active(self) -> Specialization:
        assert self._active is not None, "a CompiledModule is made with its first specialization"
        return self._active

    @property
    def plan(self) -> Plan:
        return self.active.plan

    @property
    def program(self) -> Program:
        return self.active.program

    @property
    def source_path(self) -> Path:
        return self.active.source_path

    @property
    def training_step(self) -> bool:
        return self.active.captured.training

    @property
    def _n_fwd(self) -> int:
        return self.active.n_fwd

    @property
    def host_pool(self) -> torch.Tensor:
        """The preallocated host pool the program swaps into (not device memory)."""
        return self.active.runtime.host_pool

    @property
    def arena(self) -> torch.Tensor | None:
        """The device arena of the latest call (compiled with ``arena=True``) while its gradients
        keep it alive, else None. Every call allocates its own arena of ``arena_bytes`` when it
        starts; ``program.arena`` says what lives where in it."""
        storage = self.active.runtime.latest_arena()
        if storage is None:
            return None
        return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)

    @property
    def arena_bytes(self) -> int:
        return self.program.layout.arena_bytes

    # -- running ------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        spec = self.specialize(args, kwargs)
        scale = self.optimizer.loss_scale if self.optimizer is not None else None
        flat = spec.flat_inputs(self.model, args, kwargs, self._device, seed=scale.scale if scale else 1.0)
        if spec.captured.training:
            values = _PlannedStep.apply(self, spec, *flat)
        else:
            with torch.no_grad():
                values = spec.user_outputs(self.run_flat([t.detach() for t in flat], spec), self._device)
        return spec.rebuild(values)

    def specialize(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Specialization:
        """The program for this call's signature, planned now if it is new."""
        if self._settings is None:
            return self.active  # one given plan: flat_inputs checks the call against it
        signature = Signature.of(args, kwargs, training=self._trains and torch.is_grad_enabled(),
                                 module_training=self.model.training)
        spec = self.specializations.get(signature)
        if spec is None:
            spec = self._plan_new(signature, args, kwargs)
        self._active = spec
        return spec

    def flat_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """The flat inputs of this call's program (see ``Specialization.flat_inputs``)."""
        return self.specialize(args, kwargs).flat_inputs(self.model, args, kwargs, self._device)

    def run_flat(self, flat: Sequence[torch.Tensor], spec: Specialization | None = None) -> list[Any]:
        """Run the program of ``spec`` (the latest signature's) once on its flat inputs."""
        spec = spec or self.active
        # The host pool is about to be reused: gradients of earlier runs still in it move out.
        # Gradients that are views of an earlier run's arena (a forward whose backward has not
        # run; ``.grad`` kept for gradient accumulation) move out of it too, so they keep their
        # own bytes alive, not a whole arena, while this run allocates its own.
        arena = self._last_run.runtime.latest_arena() if self._last_run is not None else None
        for held in self._held:
            held.materialize(arena)
        self._held.clear()
        if arena is not None:
            for p in self.model.parameters():
                if p.grad is not None and p.grad.untyped_storage()._cdata == arena._cdata:
                    p.grad = p.grad.clone()
        del arena
        self._last_run = spec
        ctx = Context(spec.runtime, on_transfer=self.on_transfer, on_gradient=self._gradient_listener())
        outs = run_step(spec.step, ctx, list(flat), source_path=str(spec.source_path),
                        line_steps=spec.program.line_steps)
        return list(outs)

    def _gradient_listener(self) -> Callable[[str, torch.Tensor], None] | None:
        """What a run's reported gradients go to: the optimizer's ``gradient_ready``, by parameter
        name (None unless the optimizer updates during the backward)."""
        optimizer = self.optimizer
        if optimizer is None or not optimizer.update_in_backward:
            return None
        params = dict(self.model.named_parameters())
        return lambda name, grad: optimizer.gradient_ready(params[name], grad)

    # -- planning -----------------------------------------------------------------------------

    def _plan_new(self, signature: Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Specialization:
        s = self._settings
        name = type(self.model).__name__
        assert s is not None, "a module of one given plan (compile_plan) plans nothing"
        if len(self.specializations) >= s.recompile_limit:
            raise RecompileLimitExceeded(
                f"{name} has been planned for {len(self.specializations)} input signatures "
                f"(recompile_limit={s.recompile_limit}) and the call is a new one, "
                f"{signature.describe()}; pad inputs to a few shapes, compile with dynamic=True at "
                f"the largest shape, or raise recompile_limit"
            )
        like = next((sp for sp in self.specializations.values() if sp.signature.covers(signature)),
                    None) if s.dynamic else None
        if self.specializations:
            how = (f"reusing the decisions of the plan for {like.signature.describe()}" if like
                   else f"{len(self.specializations) + 1} of recompile_limit={s.recompile_limit}")
            warnings.warn(f"tierplan.compile: planning {name} for a new signature, "
                          f"{signature.describe()} ({how})", stacklevel=3)
        captured = capture(self.model, args, example_kwargs=kwargs, training=signature.training,
                           keep_outputs=True, autocast=autocast_dtype(s.precision, model_dtype(self.model)))
        op_times = (measured_op_times(self.model, captured, args, kwargs, self._device)
                    if s.op_times == "measured" else None)
        plan = None
        if like is not None:
            plan = plan_graph_like(captured.graph, like.plan, hardware=s.hardware, tiers=s.tiers,
                                   source=f"the plan for {like.signature.describe()}")
        if plan is None and not self.specializations:
            plan = plan_graph(captured.graph, hardware=s.hardware, memory_budget=s.memory_budget,
                              training=signature.training, tiers=s.tiers, time_limit=s.time_limit,
                              optimizer=s.optimizer if signature.training else None, precision=s.precision,
                              reorder=s.reorder, update_in_backward=s.update_in_backward, op_times=op_times)
        elif plan is None:
            # A later signature meets the budget as the backend's subgraphs do (see
            # plan_graph_or_smallest); the first one, planned in compile(), stays strict.
            plan, note = plan_graph_or_smallest(
                captured.graph, hardware=s.hardware, memory_budget=s.memory_budget,
                training=signature.training, tiers=s.tiers, time_limit=s.time_limit,
                optimizer=s.optimizer if signature.training else None, precision=s.precision,
                reorder=s.reorder, update_in_backward=s.update_in_backward, op_times=op_times)
            if note:
                warnings.warn(f"tierplan.compile: {note}", stacklevel=3)
        return self.add(signature, captured, plan)

    def add(self, signature: Signature, captured: Captured, plan: Plan) -> Specialization:
        """Emit and load the program of ``plan`` and run calls of ``signature`` on it."""
        debug_dir = self._debug_dir
        gradients = host_update_gradients(captured, plan) if self._update_in_backward else None
        program = emit(plan, captured.joint, title=f"{plan.graph.name}: {plan.method}", arena=self._arena,
                       gradients=gradients or None)
        runtime = Runtime(program.layout, self._device,
                          swap_root=debug_dir / "swap" if debug_dir is not None else None)
        weakref.finalize(self, runtime.close)
        step, source_path = load_program(program, plan, self._device, self._sources(),
                                          keep_plan=debug_dir is not None)
        if self._device.type == "cuda" and program.offdevice_inputs:
            # The plan keeps these caller-owned tensors (parameters, usually) off the device: they
            # move to pinned host memory, and the program brings them to the GPU when it needs them.
            named = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
            for spec in captured.inputs:
                if spec.name in program.offdevice_inputs and spec.source in named:
                    t = named[spec.source]
                    if t.device.type != "cpu":
                        t.data = t.data.to("cpu").pin_memory()
        spec = Specialization(signature, captured, plan, program, step, runtime, source_path)
        self.specializations[signature] = spec
        self._active = spec
        return spec

    def _sources(self) -> Path:
        """Where generated programs go: ``debug_dir``, else a temporary directory removed with
        the module."""
        if self._debug_dir is not None:
            return self._debug_dir
        if self._source_root is None:
            self._source_root = Path(tempfile.mkdtemp(prefix="tierplan-"))
            weakref.finalize(self, shutil.rmtree, self._source_root, True)
        return self._source_root

    def split_outputs(self, spec: Specialization, outs: list[Any]) -> tuple[list[Any], list[Any], list[bool]]:
        """(the user outputs, loss first; one gradient per primal input; whether each gradient is
        in host memory the program reuses) of a training step's outputs."""
        n_fwd = spec.n_fwd
        return (spec.user_outputs(outs, self._device), outs[n_fwd:],
                spec.program.outputs_on_host[n_fwd:])


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
    def forward(ctx: Any, module: CompiledModule, spec: Specialization,  # type: ignore[override]
                *flat: torch.Tensor) -> tuple[Any, ...]:
        outs = module.run_flat([t.detach() for t in flat], spec)
        values, grads, on_host = module.split_outputs(spec, outs)
        # A gradient the plan left on the host is a view of the host pool: it is copied to where
        # its parameter lives in backward (outside the planned step, whose peak it is not part
        # of), or before the next run reuses the pool, whichever comes first.
        ctx.held = _HeldGrads(grads, [p.device for p in flat[: len(grads)]], on_host)
        module._held.append(ctx.held)
        ctx.n_tangents = len(flat) - len(grads)
        # The loss is the root of the backward; the model's other outputs are values.
        ctx.mark_non_differentiable(*(v for v in values[1:] if isinstance(v, torch.Tensor)))
        return tuple(values)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> Any:  # type: ignore[override]
        held, ctx.held = ctx.held, None
        grads = held.claim()
        # The program ran with a seed of 1 (loss.backward()); the gradient is linear in the seed.
        if not bool(torch.all(grad_loss == 1)):
            grads = [None if g is None else g * grad_loss for g in grads]
        return (None, None, *grads, *([None] * ctx.n_tangents))


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
    dynamic: bool = False,
    recompile_limit: int = DEFAULT_RECOMPILE_LIMIT,
    optimizer: torch.optim.Optimizer | None = None,
    precision: str | None = None,
    generate: bool = False,
    reorder: bool = False,
    update_in_backward: bool = False,
    op_times: str = "roofline",
) -> CompiledModule | GenerationModule:
    """Plan ``model`` under ``memory_budget`` and return a module that runs the plan.

    ``generate=True`` (a transformers ``*ForCausalLM``): a ``GenerationModule`` whose
    ``generate(input_ids, max_new_tokens)`` returns greedy tokens (those of
    ``model.generate(do_sample=False)``) with every weight and KV-cache block where a generation
    plan for that batch, prompt and length puts them (``tierplan.plan(..., generate=N)``, planned
    on the first call of each job shape; ``compiled.plan`` is the latest). NVMe swap files go to
    ``debug_dir/swap`` (or the system temporary directory) and are removed when a call ends.

    The model is planned now for the example inputs, as the first call with them would be; a
    call with other shapes, dtypes, train/eval mode or grad mode is planned on first sight (see
    the module docstring), with a warning, up to ``recompile_limit`` signatures.
    ``dynamic=True``: a call whose tensors are no larger than an already planned call's runs
    that plan's decisions re-timed for its shapes, within the same budget in bytes, without a
    new search (compile at the largest shape, and smaller batches and sequences reuse it).
    ``training=True`` runs training steps (forward and backward in one planned program) while
    grad is enabled, inference otherwise; ``training=False`` plans inference only.

    ``hardware`` defaults to the "cpu" preset for a model on the CPU and "h100-sxm" on a GPU;
    ``memory_budget`` and ``tiers`` are as in ``tierplan.plan``. The generated sources are written
    to ``debug_dir`` (or a temporary directory) and the latest one's path is
    ``compiled.source_path``; NVMe swap files go to ``debug_dir/swap`` (or the system temporary
    directory) and are removed at the end of every call.

    The compiled module returns what the model returns (a transformers ``ModelOutput`` with
    ``.loss`` and ``.logits``, a tuple, a dict, a tensor): tensors come from the program and are
    outputs of the planned step, so they live to its end as the caller holds them in eager mode.
    A returned object that is neither a tensor nor a plain value (a KV cache object) comes back
    as None, with a warning; pass ``use_cache=False`` to a transformers model in training.

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

    ``optimizer``: the ``torch.optim.AdamW``, ``Adam`` or ``SGD`` over the model's parameters that
    the training loop steps. The plan then covers the whole step, its master weights and states
    placed on the device, the host or NVMe and each update run where its states are, and
    ``compiled.optimizer`` is the optimizer to step (a ``TieredOptimizer`` sharing the given one's
    ``param_groups``: LR schedulers, ``clip_grad_norm_``, gradient accumulation and
    ``state_dict`` work as with the plain one); step it instead of the one given. ``precision``:
    "fp32", "bf16", "bf16-mixed" or "fp16-mixed" (the model's own dtype by default). A mixed
    precision keeps fp32 master weights and states; "bf16-mixed" of an fp32 model runs it under
    ``torch.autocast(bfloat16)`` (torch AMP: the planned program holds autocast's casts, the fp32
    weights are the masters), of a bf16 model with fp32 masters beside its weights (ZeRO's);
    "fp16-mixed" needs an fp16 model. Under
    "fp16-mixed" the planned backward starts from the loss scale, ``compiled.optimizer.loss_scale``
    (dynamic: a step whose gradients overflow is skipped and the scale halves; it doubles after
    2,000 clean steps), and ``compiled.optimizer.step`` divides it out in fp32: clip with
    ``compiled.optimizer.clip_grad_norm_(max_norm)``, which clips the true gradients
    (``torch.nn.utils.clip_grad_norm_`` would see the scaled ones). Without an optimizer ``compiled.optimizer``
    is None and the update is not planned.

    ``reorder=True``: the op order is chosen with the plan (``tierplan.plan``'s ``reorder``); the
    program runs the ops in that order, random draws in their capture order, so it computes what
    eager does.

    ``update_in_backward=True`` (ZeRO-Offload's overlap; see ``tierplan.codegen.optimizer``): the
    program reports each host-updated parameter's gradient as soon as its backward makes it, and
    ``compiled.optimizer`` copies it to the host and runs that update on a background thread while
    the rest of the backward runs; ``step()`` commits those updates (checking each ``p.grad`` is the
    reported gradient, else updating from ``p.grad`` as without the option) and runs the others.
    Refused: "fp16-mixed" (the loss scale's finite check needs every gradient first),
    ``compiled.optimizer.clip_grad_norm_``, and gradient accumulation (a second backward before
    ``step()`` raises).

    ``op_times="measured"``: before planning, every op of the captured graph is timed on
    ``device`` (``tierplan.cost_models.measured``: the graph run a few times, each op timed in
    place) and the plan prices ops by those times instead of ``hardware``'s roofline; the plan is
    then a plan for this machine (on the CPU, ``bench/fidelity.py`` measures its step within 10%
    median). Timing runs the step unplanned, so it must fit the device at keep-all (else a
    RuntimeError says so). "roofline" (default) prices by ``hardware``, the machine named,
    wherever it runs.
    """
    args = example_inputs if isinstance(example_inputs, tuple) else (
        tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,)
    )
    kwargs = dict(example_kwargs or {})
    if generate:
        from tierplan.generate import GenerationModule

        if reorder:
            raise ValueError("reorder=True orders a captured graph's ops; generate=True runs a decoder layer by "
                             "layer: drop one of them")
        device = _model_device(model, args, kwargs)
        return GenerationModule(model, hardware=hardware or ("cpu" if device.type == "cpu" else "h100-sxm"),
                                memory_budget=memory_budget, tiers=tiers, time_limit=time_limit,
                                swap_root=Path(debug_dir) / "swap" if debug_dir is not None else None, device=device)
    if isinstance(recompile_limit, bool) or not isinstance(recompile_limit, int) or recompile_limit < 1:
        raise ValueError(f"recompile_limit={recompile_limit!r}: give a positive number of signatures")
    device = _model_device(model, args, kwargs)
    if hardware is None:
        hardware = "cpu" if device.type == "cpu" else "h100-sxm"
    optimizer_kind, precision = optimizer_setting(optimizer, precision, training=training,
                                                  param_dtype=model_dtype(model), autocast=True)
    check_update_in_backward(update_in_backward, optimizer, precision)
    if op_times not in OP_TIMES:
        raise ValueError(f"op_times={op_times!r}: one of {', '.join(map(repr, OP_TIMES))}")
    settings = CompileSettings(
        hardware=hardware, memory_budget=memory_budget, training=training, tiers=tuple(tiers),
        time_limit=time_limit, dynamic=dynamic, recompile_limit=recompile_limit,
        optimizer=optimizer_kind, precision=precision, reorder=reorder, update_in_backward=update_in_backward,
        op_times=op_times,
    )
    compiled = CompiledModule(model, device, settings, training=training,
                              debug_dir=Path(debug_dir) if debug_dir is not None else None, arena=arena,
                              update_in_backward=update_in_backward)
    signature = Signature.of(args, kwargs, training=training, module_training=model.training)
    spec = compiled._plan_new(signature, args, kwargs)
    if spec.captured.layout is not None and spec.captured.layout.dropped:
        warnings.warn(
            f"tierplan.compile: {type(model).__name__} returns "
            f"{', '.join(spec.captured.layout.dropped)}, not a tensor or a plain value: the compiled "
            f"module returns None there (for transformers models, pass use_cache=False)", stacklevel=2)
    if optimizer is not None:
        compiled.optimizer = tiered_optimizer(optimizer, spec, model, precision=precision,
                                              swap_root=Path(debug_dir) / "swap" if debug_dir is not None else None,
                                              update_in_backward=update_in_backward)
    return compiled


def measured_op_times(model: nn.Module, captured: Captured, args: tuple[Any, ...], kwargs: dict[str, Any],
                      device: torch.device) -> dict[str, float]:
    """Seconds per op of ``captured`` timed on ``device`` as its program will run there
    (``compile(op_times="measured")``; ``cost_models.measured``)."""
    inputs = [x.to(device) for x in captured.real_inputs(model, args, kwargs)]
    if device.type == "cpu":
        keep_freed_memory()  # the allocator as the program runs with it: else ops time page faults
    try:
        return measure_op_times(captured.joint, inputs)
    except torch.OutOfMemoryError as exc:
        # Timing runs the step unplanned (keep-all), which is what may not fit.
        raise RuntimeError(
            f"op_times='measured' times {type(model).__name__}'s ops by running its step on {device} without a "
            f"plan, and that step does not fit there ({exc}); compile with op_times='roofline'") from exc


def check_update_in_backward(update_in_backward: bool, optimizer: torch.optim.Optimizer | None,
                             precision: str | None) -> None:
    """Refuse ``update_in_backward=True`` where it cannot be right (before anything is planned)."""
    if not update_in_backward:
        return
    if optimizer is None:
        raise ValueError("update_in_backward=True needs optimizer=: it runs that optimizer's host updates "
                         "during the backward")
    if precision == "fp16-mixed":
        raise ValueError("update_in_backward=True cannot run with precision='fp16-mixed': its loss scale skips a "
                         "step when any gradient is inf or NaN, known only after the whole backward; use "
                         "update_in_backward=False")


def host_update_gradients(captured: Captured, plan: Plan) -> dict[int, str]:
    """Flat output index -> parameter name of every gradient of a parameter that ``plan.update``
    updates on the host (the gradients follow the forward outputs, one per primal input)."""
    update = plan.update
    if update is None or not captured.training:
        return {}
    primals = [spec for spec in captured.inputs if spec.source != "tangent"]
    first = first_gradient(captured, len(_flat_outputs(captured.joint)))
    found: dict[int, str] = {}
    for i, spec in enumerate(primals):
        if spec.kind is not TensorKind.PARAMETER or spec.name not in plan.graph.tensors:
            continue
        if update.update_on.get(plan.graph.tensors[spec.name].storage) == HOST:
            found[first + i] = spec.source
    return found


def first_gradient(captured: Captured, n_outputs: int) -> int:
    """Where the gradients start among a training step's ``n_outputs`` outputs: they come last,
    one per primal input (every input but the loss seed)."""
    return n_outputs - sum(1 for spec in captured.inputs if spec.source != "tangent")


def _flat_outputs(gm: torch.fx.GraphModule) -> list[Any]:
    outputs = gm.graph.output_node().args[0]
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def optimizer_setting(optimizer: torch.optim.Optimizer | None, precision: str | None, *, training: bool,
                      param_dtype: torch.dtype | None = None,
                      autocast: bool = False) -> tuple[str | None, str | None]:
    """The optimizer's kind and the precision to plan with (the default precision from
    ``param_dtype``, else from the optimizer's first parameter); errors name what is wrong.
    ``autocast``: the caller runs bf16-mixed of an fp32 model under autocast (``compile``)."""
    if optimizer is None:
        if precision == "fp16-mixed":
            raise ValueError("precision='fp16-mixed' needs optimizer=: its loss scale is kept and stepped by "
                             "compiled.optimizer, which unscales the gradients into fp32 masters")
        return None, None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer={optimizer!r}: give the torch.optim.Optimizer instance the training loop "
                        f"steps (tierplan.plan takes a name such as 'adamw')")
    if not training:
        raise ValueError("optimizer= needs training=True: an inference module has no update to plan")
    if param_dtype is None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.is_floating_point()]
        param_dtype = params[0].dtype if params else torch.float32
    kind, precision = resolve_optimizer(optimizer_name(optimizer), precision, param_dtype, training=True)
    if autocast and autocast_dtype(precision, param_dtype) is not None:
        return kind, precision  # an fp32 model run under autocast, its weights the masters
    if COMPUTE_DTYPE[str(precision)] != param_dtype:
        raise ValueError(
            f"precision={precision!r} computes in {COMPUTE_DTYPE[str(precision)]}, the model's parameters "
            f"are {param_dtype}: tierplan runs the model in its own dtype, so cast it first "
            f"(model.to(torch.bfloat16) for bf16-mixed, whose fp32 master weights the optimizer keeps)")
    return kind, precision


def tiered_optimizer(optimizer: torch.optim.Optimizer, spec: Specialization, model: nn.Module, *,
                     precision: str | None, swap_root: Path | None,
                     update_in_backward: bool = False) -> TieredOptimizer:
    """``optimizer`` with every parameter's master and states where ``spec``'s plan put them."""
    named = dict(model.named_parameters())
    inputs = {inp.name: named[inp.source] for inp in spec.captured.inputs if inp.source in named}
    return placed_optimizer(optimizer, state_placements(spec.plan, inputs), precision=precision,
                            swap_root=swap_root, update_in_backward=update_in_backward)


def placed_optimizer(optimizer: torch.optim.Optimizer, placements: dict[torch.Tensor, StatePlacement], *,
                     precision: str | None, swap_root: Path | None,
                     update_in_backward: bool = False) -> TieredOptimizer:
    """``optimizer`` with its states at ``placements``, on fp32 masters under mixed precision,
    with a dynamic loss scale under fp16-mixed (the program's backward is seeded with it)."""
    master = torch.float32 if precision is not None and precision.endswith("-mixed") else None
    scale = DynamicLossScale() if precision == "fp16-mixed" else None
    return TieredOptimizer(optimizer, placements, master_dtype=master, swap_root=swap_root, loss_scale=scale,
                           update_in_backward=update_in_backward)


def state_placements(plan: Plan, inputs: dict[str, torch.Tensor]) -> dict[torch.Tensor, StatePlacement]:
    """Where ``plan.update`` puts each parameter's states, for ``inputs`` (the parameter tensor
    of each graph input name)."""
    update = plan.update
    assert update is not None, "a plan made with an optimizer has its update"
    placements: dict[torch.Tensor, StatePlacement] = {}
    for name, param in inputs.items():
        storage = plan.graph.tensors[name].storage if name in plan.graph.tensors else None
        if storage in update.states_tier:
            placements[param] = StatePlacement(states=update.states_tier[storage], update=update.update_on[storage])
    return placements


def compile_plan(
    model: nn.Module, captured: Captured, plan: Plan, *, device: torch.device | str = "cpu",
    debug_dir: str | Path | None = None, arena: bool = False, optimizer: torch.optim.Optimizer | None = None,
    update_in_backward: bool = False,
) -> CompiledModule:
    """A module that runs the program of an existing ``plan`` of ``captured`` (see ``compile``).
    It has nothing to plan other calls with: calls with other shapes or dtypes are refused.
    ``optimizer`` and ``update_in_backward``: as in ``compile``, placed by ``plan.update`` (the
    plan must have one)."""
    if optimizer is not None and plan.update is None:
        raise ValueError("compile_plan(optimizer=...) needs a plan made with an optimizer (plan.update is None)")
    if optimizer is not None and optimizer_name(optimizer) != plan.update.optimizer:
        raise ValueError(f"the plan's update is {plan.update.optimizer}'s, the optimizer given is "
                         f"{optimizer_name(optimizer)}; plan with optimizer={optimizer_name(optimizer)!r}")
    check_update_in_backward(update_in_backward, optimizer, plan.update.precision if plan.update else None)
    device = torch.device(device)
    compiled = CompiledModule(model, device, None, training=captured.training,
                              debug_dir=Path(debug_dir) if debug_dir is not None else None, arena=arena,
                              update_in_backward=update_in_backward)
    leaves = [s for s in captured.inputs if s.kind is TensorKind.INPUT and s.source != "tangent"]
    signature = Signature(
        training=captured.training, module_training=model.training, structure="",
        shapes=tuple(tuple(s.shape) for s in leaves), dtypes=tuple(s.dtype for s in leaves),
    )
    spec = compiled.add(signature, captured, plan)
    if optimizer is not None:
        compiled.optimizer = tiered_optimizer(
            optimizer, spec, model, precision=plan.update.precision if plan.update else None,
            swap_root=Path(debug_dir) / "swap" if debug_dir is not None else None,
            update_in_backward=update_in_backward)
    return compiled


def load_program(program: Program, plan: Plan, device: torch.device, root: Path, *,
                  keep_plan: bool) -> tuple[Callable[..., Any], Path]:
    """Write ``program`` under ``root`` (named after the model and its source's digest), load it,
    and with ``keep_plan`` write the plan's JSON beside it."""
    digest = hashlib.sha1(program.source.encode()).hexdigest()[:10]
    source_path = root / f"{slug(plan.graph.name)}_{digest}.py"
    step = load(program, source_path, device)
    if keep_plan:
        plan.to_json(source_path.with_suffix(".plan.json"))
    return step, source_path


def _model_device(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> torch.device:
    for t in [*model.parameters(), *model.buffers(), *pytree.tree_leaves((args, kwargs or {}))]:
        if isinstance(t, torch.Tensor):
            if t.device.type == "meta":
                raise CaptureError("compile needs a model with real weights; this one is on the meta device")
            return t.device
    return torch.device("cpu")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "model"


__all__ = [
    "CompiledModule", "RecompileLimitExceeded", "Signature", "Specialization", "compile", "compile_plan",
    "load_program", "optimizer_setting", "placed_optimizer", "state_placements",
]
