"""Capture a model as an aten-level, functionalized torch.fx graph and reduce it to the IR.

Training captures the joint forward+backward graph the way AOTAutograd builds it for
``torch.compile``: parameters and buffers are lifted to graph inputs, the backward seed of the loss
is an input (a "tangent"), and parameter gradients are graph outputs. The forward/backward split is
AOTAutograd's own ``default_partition``; the joint graph's node names are shared by the partitioned
graphs, so every joint op is labelled FORWARD or BACKWARD from the partition.

Tracing always runs on fake tensors (AOTAutograd fakifies real inputs itself), so no kernel runs and
no activation is allocated. A model whose parameters live on the meta device (or are fake already)
is captured by handing AOTAutograd fake CPU tensors of the same shapes, which lets a
Llama-2-70B-shaped model be captured on a laptop. ``capture(..., target=<GPU>)`` traces with that
GPU's kernels where they differ from the CPU's (fused attention: ``passes/target_kernels.py``).

The seam with AOTAutograd is ``AotRecorder``: a partition function plus forward/backward/inference
compilers that record the graphs they are given. The same object plugs into
``aot_module_simplified`` for a later ``torch.compile`` backend.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx
import torch.fx.traceback as fx_traceback
from torch import nn
from torch._functorch.aot_autograd import aot_function
from torch._functorch.partitioners import default_partition
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils import _pytree as pytree

from tierplan.cost_models.compute import op_base_name
from tierplan.cost_models.hardware import Hardware
from tierplan.ir import Graph, Phase, TensorKind
from tierplan.passes.annotate import (
    MODULE_META_KEY,
    GraphSignature,
    InputSpec,
    OutputSpec,
    annotate_graph,
)
from tierplan.passes.output_layout import OutputLayout, read_layout
from tierplan.passes.target_kernels import KernelRecord, TargetKernels, target_kernels

# The issuing module's qualified name is recorded under node.meta["custom"][MODULE_META_KEY]:
# make_fx copies the "custom" dict onto every node created while it is set, and AOTAutograd
# copies it from a forward node to the backward nodes that differentiate it (via seq_nr).


class CaptureError(RuntimeError):
    """The model could not be traced; the message names the module and/or op, why, and what to do."""


@dataclass
class AotRecorder:
    """Records what AOTAutograd hands its partitioner and compilers.

    ``partition_fn`` keeps the joint graph and partitions it with AOTAutograd's default
    partitioner (no recomputation: what the forward produces and the backward reads is saved).
    The compilers keep the graphs and return ``compiled`` (the graph itself when None), so a
    ``torch.compile`` backend can wrap this object and decide what to run.
    """

    compiled: Callable[[torch.fx.GraphModule], Callable[..., Any]] | None = None
    joint: torch.fx.GraphModule | None = None
    forward: torch.fx.GraphModule | None = None
    backward: torch.fx.GraphModule | None = None
    inference: torch.fx.GraphModule | None = None
    num_fwd_outputs: int = 0

    def partition_fn(
        self, joint: torch.fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any
    ) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
        # Dead nodes (e.g. a detach whose result nothing reads) would otherwise be run by the
        # joint module and counted by the planner although neither partition contains them.
        joint.graph.eliminate_dead_code()
        self.joint = joint
        self.num_fwd_outputs = int(kwargs.get("num_fwd_outputs", 0))
        fw, bw = default_partition(joint, joint_inputs, **kwargs)
        self.forward, self.backward = fw, bw
        return fw, bw

    def fw_compiler(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        self.forward = gm
        return self._compile(gm)

    def bw_compiler(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        self.backward = gm
        return self._compile(gm)

    def inference_compiler(
        self, gm: torch.fx.GraphModule, example_inputs: Any
    ) -> Callable[..., Any]:
        self.inference = gm
        return self._compile(gm)

    def _compile(self, gm: torch.fx.GraphModule) -> Callable[..., Any]:
        return gm if self.compiled is None else self.compiled(gm)


class _TraceDone(Exception):
    """Raised by the recorded graph in place of running it: capture needs the graphs only."""


def _stop_running(gm: torch.fx.GraphModule) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        raise _TraceDone()

    return run


@dataclass
class Captured:
    """A captured model: the IR, the fx graphs it came from, and how to feed them."""

    graph: Graph
    # Training: the joint forward+backward module; inference: the forward module. It takes the
    # flat input list of ``real_inputs`` and its node order is ``graph.ops`` order.
    joint: torch.fx.GraphModule
    training: bool
    inputs: list[InputSpec]  # one per placeholder of ``joint``, in order
    forward: torch.fx.GraphModule | None = None  # the partitioned forward (training)
    backward: torch.fx.GraphModule | None = None  # the partitioned backward (training)
    seconds: float = 0.0  # wall time of the trace
    # How the model's return value is rebuilt from the graph's user outputs (the first
    # ``layout.n_outputs`` outputs; a training graph's gradients follow them).
    layout: OutputLayout | None = None

    def real_inputs(
        self,
        model: nn.Module,
        example_inputs: Any,
        example_kwargs: dict[str, Any] | None = None,
    ) -> list[torch.Tensor]:
        """The flat input list of ``joint`` built from a real model and real example inputs.

        Parameters and buffers are looked up by qualified name (so a model rebuilt with real
        weights after a fake capture works), user inputs by their position in the flattened
        ``(args, kwargs)``, and the loss tangent is ones (the seed of ``loss.backward()``).
        """
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        leaves = _tensor_leaves(_as_args(example_inputs), dict(example_kwargs or {}))
        result: list[torch.Tensor] = []
        for spec in self.inputs:
            if spec.kind is TensorKind.PARAMETER:
                t = _lookup(params, spec.source, "parameter")
            elif spec.kind is TensorKind.BUFFER:
                t = _lookup(buffers, spec.source, "buffer")
            elif spec.source == "tangent":
                t = torch.ones(spec.shape, dtype=_dtype(spec.dtype))
            else:
                t = leaves[spec.index]
            if tuple(t.shape) != tuple(spec.shape) or str(t.dtype).removeprefix("torch.") != spec.dtype:
                raise CaptureError(
                    f"input {spec.name!r} ({spec.source}) was captured as {spec.dtype}"
                    f"{list(spec.shape)} but the given tensor is {t.dtype}{list(t.shape)}; "
                    f"pass the model and example inputs the capture was made with"
                )
            if t.device.type == "meta" or isinstance(t, FakeTensor):
                raise CaptureError(
                    f"input {spec.name!r} ({spec.source}) is a {t.device.type}/fake tensor; "
                    f"real_inputs needs a model and inputs with real storage"
                )
            result.append(t.detach())
        return result

    def run(self, inputs: Sequence[torch.Tensor]) -> list[Any]:
        """Run ``joint`` on the flat inputs without autograd (the graph computes the gradients)."""
        with torch.no_grad():
            return list(self.joint(*inputs))


def capture(
    model: nn.Module,
    example_inputs: Any,
    *,
    example_kwargs: dict[str, Any] | None = None,
    training: bool = True,
    fake: bool | None = None,
    fake_device: str = "cpu",
    name: str | None = None,
    keep_outputs: bool = False,
    target: str | Path | Hardware | TargetKernels | None = None,
    autocast: torch.dtype | None = None,
) -> Captured:
    """Trace ``model(*example_inputs, **example_kwargs)`` into a Captured graph.

    ``training=True`` captures the joint forward+backward graph of the loss: the model's output
    if it is a scalar tensor, else its ``loss`` field or attribute. ``fake=None`` traces on fake
    tensors when the model's parameters are on the meta device or fake already; ``fake=True``
    forces it (meta tensors become fake tensors on ``fake_device``). Tracing never runs a kernel
    either way. Raises CaptureError when the model cannot be traced.

    ``keep_outputs=True`` (training): the graph also returns every other tensor the model returns
    (detached, as values: the logits beside the loss), so a compiled step can return what the
    model returns; they are outputs of the planned step and live to its end. Inference graphs
    always return every tensor. ``Captured.layout`` rebuilds the model's own return value.

    ``target`` (a hardware preset name, TOML path, Hardware or TargetKernels): the device the graph
    is for. A GPU ("cuda"/"rocm" device kind) gets the GPU's kernels where they save other tensors
    than the tracing machine's (fused flash / memory-efficient attention, see
    ``tierplan.passes.target_kernels``); None or a CPU keeps the kernels of the device traced on.
    Tensors stay on ``fake_device`` (the CPU) either way: only kernels and shapes change, and a
    graph with a GPU's kernels runs on that GPU only (``Captured.run`` on CPU tensors fails).

    ``autocast`` (``torch.bfloat16``): trace under ``torch.autocast`` of the traced tensors' device
    type: the graph holds its casts (fp32 weights, bf16 copies for the ops autocast lowers), so it
    runs as eager autocast does without a context; ``graph.meta["autocast"]`` names the dtype.
    """
    kernels = None if target is None else TargetKernels.of(target)
    flat = _flatten_call(model, example_inputs, example_kwargs)
    fake = _check_capturable(model, flat, training=training, fake=fake)
    _check_fake_device(fake_device)
    trace_inputs = _trace_inputs(flat, _tensor_converter(flat, fake, fake_device), training)
    recorder = AotRecorder(compiled=_stop_running)
    flat_fn, layouts, record = _flat_function(model, flat, training, keep_outputs, kernels)
    compiled = aot_function(
        flat_fn,
        fw_compiler=recorder.fw_compiler,
        bw_compiler=recorder.bw_compiler,
        partition_fn=recorder.partition_fn,
        inference_compiler=recorder.inference_compiler,
        num_params_buffers=len(flat.params) + len(flat.buffers),
        keep_inference_input_mutations=True,
        # Logging pretty-prints every graph (several seconds on a 20k-node joint graph) even when
        # no log handler is listening.
        enable_log=False,
    )
    device_type = trace_inputs[0].device.type if trace_inputs else fake_device
    with torch.autocast(device_type, dtype=autocast) if autocast is not None else contextlib.nullcontext():
        seconds = _run_trace(model, compiled, trace_inputs, training)
    gm = _recorded_graph(recorder, training, type(model).__name__)
    _use_flat_calling_convention(gm)
    signature = _capture_signature(gm, recorder, flat, training)
    layout = _checked_layout(layouts, signature, type(model).__name__)
    graph = annotate_graph(gm, signature, name=name or type(model).__name__)
    graph.meta["training"] = training
    graph.meta["capture_seconds"] = round(seconds, 3)
    if autocast is not None:
        graph.meta["autocast"] = str(autocast).removeprefix("torch.")
    if kernels is not None:
        graph.meta["kernels"] = _kernels_meta(kernels, graph, record)
    return Captured(
        graph=graph,
        joint=gm,
        training=training,
        inputs=signature.inputs,
        forward=recorder.forward if training else gm,
        backward=recorder.backward,
        seconds=seconds,
        layout=layout,
    )


@dataclass
class _FlatCall:
    """A model call flattened the way the traced function takes it: parameters, buffers, then
    the tensor leaves of ``(args, kwargs)``."""

    params: dict[str, torch.Tensor]  # by qualified name; tied weights appear once
    buffers: dict[str, torch.Tensor]
    leaves: list[Any]  # every leaf of (args, kwargs), tensors or not
    spec: pytree.TreeSpec  # rebuilds (args, kwargs) from ``leaves``
    tensor_pos: list[int]  # positions of the tensor leaves in ``leaves``
    user_tensors: list[torch.Tensor]  # the tensor leaves, in order

    @property
    def all_tensors(self) -> list[torch.Tensor]:
        return [*self.params.values(), *self.buffers.values(), *self.user_tensors]


def _flatten_call(model: nn.Module, example_inputs: Any, example_kwargs: dict[str, Any] | None) -> _FlatCall:
    """The model's state and the call's arguments, flattened."""
    args = _as_args(example_inputs)
    kwargs = dict(example_kwargs or {})
    params = dict(model.named_parameters())  # tied weights appear once
    buffers = dict(model.named_buffers())
    flat_user, user_spec = pytree.tree_flatten((args, kwargs))
    tensor_pos = [i for i, x in enumerate(flat_user) if isinstance(x, torch.Tensor)]
    user_tensors = [flat_user[i] for i in tensor_pos]
    return _FlatCall(params, buffers, flat_user, user_spec, tensor_pos, user_tensors)


def _check_capturable(model: nn.Module, flat: _FlatCall, *, training: bool, fake: bool | None) -> bool:
    """Whether to trace on fake tensors (``fake=None`` decides from the tensors); raises
    CaptureError for a meta model traced for real, or a training capture with nothing to
    differentiate."""
    all_tensors = flat.all_tensors
    on_meta = any(t.device.type == "meta" for t in all_tensors)
    if fake is None:
        fake = on_meta or any(isinstance(t, FakeTensor) for t in all_tensors)
    elif not fake and on_meta:
        raise CaptureError(
            f"{type(model).__name__} has tensors on the meta device, which hold no data: capture "
            f"it with fake=True (or fake=None), or build it on a real device"
        )
    if training and not any(p.requires_grad for p in flat.params.values()):
        raise CaptureError(
            f"{type(model).__name__} has no parameter with requires_grad=True, so there is no "
            f"backward to capture; use capture(..., training=False) for inference"
        )
    return fake


def _tensor_converter(
    flat: _FlatCall, fake: bool, fake_device: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """What each tensor is handed to AOTAutograd as: a fake twin (one per distinct tensor, in
    the fake mode the tensors already use, if any) or, traced for real, the tensor itself."""
    if not fake:
        return lambda t: t  # AOTAutograd fakifies real tensors itself
    mode = _existing_fake_mode(flat.all_tensors) or FakeTensorMode()
    fakes: dict[int, torch.Tensor] = {}

    def convert(t: torch.Tensor) -> torch.Tensor:
        # One fake per distinct tensor, so a tensor passed twice still shares one storage.
        if id(t) not in fakes:
            fakes[id(t)] = _to_fake(t, mode, fake_device)
        return fakes[id(t)]

    return convert


def _trace_inputs(
    flat: _FlatCall, convert: Callable[[torch.Tensor], torch.Tensor], training: bool
) -> list[torch.Tensor]:
    """The flat inputs of the traced function, converted, requiring grad where the backward
    differentiates them (never buffers; nothing for inference)."""
    flat_params = [_with_grad(convert(p), training and p.requires_grad) for p in flat.params.values()]
    flat_buffers = [_with_grad(convert(b), False) for b in flat.buffers.values()]
    flat_inputs = [_with_grad(convert(t), training and t.requires_grad) for t in flat.user_tensors]
    return [*flat_params, *flat_buffers, *flat_inputs]


def _flat_function(
    model: nn.Module,
    flat: _FlatCall,
    training: bool,
    keep_outputs: bool,
    kernels: TargetKernels | None = None,
) -> tuple[Callable[..., Any], list[OutputLayout], KernelRecord]:
    """The model as a function of flat tensors (parameters, buffers, user tensors) returning
    the loss (training; with ``keep_outputs`` the model's other tensors after it, detached) or the
    model's tensor outputs (inference), as AOTAutograd traces it. The list it returns receives
    the layout of the model's return value when AOTAutograd calls the function; the record, why
    each attention kernel of ``kernels`` was chosen."""
    param_names, buffer_names = list(flat.params), list(flat.buffers)
    n_params, n_buffers = len(param_names), len(buffer_names)
    layouts: list[OutputLayout] = []
    record = KernelRecord()

    def flat_fn(*tensors: torch.Tensor) -> Any:
        state = dict(zip(param_names, tensors[:n_params]))
        state.update(zip(buffer_names, tensors[n_params : n_params + n_buffers]))
        leaves = list(flat.leaves)
        for pos, t in zip(flat.tensor_pos, tensors[n_params + n_buffers :]):
            leaves[pos] = t
        call_args, call_kwargs = pytree.tree_unflatten(leaves, flat.spec)
        # Entered here, inside every trace AOTAutograd makes of the function.
        with target_kernels(kernels, record):
            out = torch.func.functional_call(model, state, tuple(call_args), call_kwargs)
        if not training:
            layout, values = read_layout(out)
            layouts.append(layout)
            return tuple(values)
        loss = _loss_of(out, type(model).__name__)
        layout, values = read_layout(out if keep_outputs else loss, loss=loss)
        layouts.append(layout)
        # Detached: the other outputs are values of the step, not roots of its backward.
        return (loss, *(v.detach() for v in values[1:]))

    return flat_fn, layouts, record


def _check_fake_device(fake_device: str) -> None:
    """A fake CUDA tensor that requires grad aborts a CPU-only torch build (its autograd engine
    asks the missing CUDA device guard for a stream): refuse before tracing."""
    kind = torch.device(fake_device).type
    if kind == "cuda" and not torch.cuda._is_compiled():
        raise CaptureError(
            f"fake_device={fake_device!r} needs a CUDA build of torch (this one is "
            f"{torch.__version__}); to capture a graph with a GPU's kernels on this machine pass "
            f"target='<gpu preset>' (e.g. target='h100-sxm') and keep fake_device='cpu'"
        )


# The forward ops of the fused attention kernels a GPU target may run.
_FUSED_ATTENTION = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention")


def _kernels_meta(kernels: TargetKernels, graph: Graph, record: KernelRecord) -> dict[str, Any]:
    """graph.meta["kernels"]: the device the graph's kernels are for, and its attention ops."""
    counts: dict[str, int] = {}
    for op in graph.ops:
        base = op_base_name(op.target)
        if base in _FUSED_ATTENTION or base == "_safe_softmax":
            counts[base] = counts.get(base, 0) + 1
    meta: dict[str, Any] = {"device": kernels.kind, "hardware": kernels.name,
                            "describe": kernels.describe()}  # fmt: skip
    if kernels.gpu:
        meta["attention"] = counts
        meta["attention_choice"] = dict(record.reasons)
    return meta


def _checked_layout(layouts: list[OutputLayout], signature: GraphSignature, model_name: str) -> OutputLayout:
    """The traced layout, checked against the graph: its user outputs come first, one per slot."""
    layout = layouts[-1]
    user_outputs = [o for o in signature.outputs if o.kind is TensorKind.OUTPUT]
    if len(user_outputs) != layout.n_outputs:
        raise CaptureError(
            f"{model_name} returns {layout.n_outputs} distinct tensors but its captured graph has "
            f"{len(user_outputs)} outputs (an output that is an input or a view of one is not "
            f"supported); return fresh tensors from forward"
        )
    return layout


def _run_trace(
    model: nn.Module, compiled: Callable[..., Any], inputs: list[torch.Tensor], training: bool
) -> float:
    """Call the AOT-wrapped function once so that the recorder receives its graphs; returns
    the wall time of the trace. Tracer failures become CaptureErrors naming the module."""
    modules = _ModuleStack(model)
    start = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(fx_traceback.preserve_node_meta())
            stack.enter_context(_tracing_flag())
            # GraphModules generate their Python code on first call instead of at every
            # construction and graph edit (partitioning builds several).
            stack.enter_context(torch.fx._lazy_graph_module._use_lazy_graph_module(True))
            stack.enter_context(modules.installed())
            if not training:
                stack.enter_context(torch.no_grad())
            compiled(*inputs)
    except _TraceDone:
        pass
    except CaptureError:
        raise
    except Exception as exc:  # noqa: BLE001 - every tracer failure becomes a CaptureError
        raise _capture_error(
            exc, modules.failed_in, modules.type_of(modules.failed_in), type(model).__name__
        ) from exc
    return time.perf_counter() - start


def _recorded_graph(recorder: AotRecorder, training: bool, model_name: str) -> torch.fx.GraphModule:
    """The joint (training) or inference graph AOTAutograd handed the recorder."""
    gm = recorder.joint if training else recorder.inference
    if gm is None:
        raise CaptureError(
            f"AOTAutograd produced no {'joint' if training else 'inference'} graph for "
            f"{model_name}: "
            + (
                "the loss does not depend on any parameter that requires grad"
                if training
                else "no output of the model is a tensor"
            )
        )
    return gm


def _capture_signature(
    gm: torch.fx.GraphModule, recorder: AotRecorder, flat: _FlatCall, training: bool
) -> GraphSignature:
    """What each placeholder and output of ``gm`` is, and (training) the phase of each op as
    AOTAutograd's partition assigned it."""
    user_paths = [_leaf_path(flat.spec, pos) for pos in flat.tensor_pos]
    specs = _input_specs(
        gm, list(flat.params), list(flat.buffers), user_paths, len(flat.user_tensors),
        len(flat.params), len(flat.buffers),
    )
    outputs = _output_specs(gm, recorder.num_fwd_outputs if training else None, specs)
    phases: dict[str, Phase] = {}
    if training:
        assert recorder.forward is not None
        fw_names = {n.name for n in recorder.forward.graph.nodes if n.op == "call_function"}
        phases = _phases(gm, fw_names)
    return GraphSignature(inputs=specs, outputs=outputs, phases=phases)


def _phases(gm: torch.fx.GraphModule, forward_names: set[str]) -> dict[str, Phase]:
    """FORWARD for the ops of ``gm`` the forward partition contains, BACKWARD for the rest
    (the partitions share the joint graph's node names)."""
    return {
        n.name: Phase.FORWARD if n.name in forward_names else Phase.BACKWARD
        for n in gm.graph.nodes
        if n.op == "call_function"
    }


def annotate_aot_joint(
    gm: torch.fx.GraphModule,
    primal_kinds: Sequence[tuple[TensorKind, str]],
    *,
    num_fwd_outputs: int | None,
    forward_names: set[str] | None,
    name: str,
) -> tuple[Graph, list[InputSpec]]:
    """The IR of a graph AOTAutograd handed a ``torch.compile`` backend (``tierplan.backend``).

    Dynamo lifts parameters and buffers to graph inputs, so the caller says what each primal
    placeholder is (``primal_kinds``: (kind, source) per primal, in order); tangents are found by
    their AOT descriptors. ``num_fwd_outputs``/``forward_names`` come from the partitioner call for
    a joint graph; both are None for an inference graph.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    primals = [n for n in placeholders if not _is_tangent(n)]
    if len(primals) != len(primal_kinds):
        raise CaptureError(
            f"the AOT graph of {name} has {len(primals)} primal inputs but the backend was given "
            f"{len(primal_kinds)} example inputs"
        )
    specs = [_spec(node, kind, source, i) for i, (node, (kind, source)) in enumerate(zip(primals, primal_kinds))]
    for j, node in enumerate(n for n in placeholders if _is_tangent(n)):
        specs.append(_spec(node, TensorKind.INPUT, "tangent", j))
    order = {n.name: i for i, n in enumerate(placeholders)}
    specs.sort(key=lambda s: order[s.name])
    outputs = _output_specs(gm, num_fwd_outputs, specs)
    phases: dict[str, Phase] = {}
    if forward_names is not None:
        phases = _phases(gm, forward_names)
    graph = annotate_graph(gm, GraphSignature(inputs=specs, outputs=outputs, phases=phases), name=name)
    graph.meta["training"] = forward_names is not None
    return graph, specs


# -- tracing helpers -----------------------------------------------------------------------------


@contextlib.contextmanager
def _tracing_flag() -> Iterator[None]:
    """Tell libraries that they are being traced, as torch.compile and torch.export do.

    Libraries (transformers among them) skip eager-only, data-dependent checks such as
    ``if (mask == 0).all():`` when ``torch.compiler.is_compiling()`` is true; without the flag
    they would call ``bool()`` on a traced tensor.
    """
    import torch.compiler as tc

    old = tc._is_compiling_flag
    tc._is_compiling_flag = True
    try:
        yield
    finally:
        tc._is_compiling_flag = old


class _ModuleStack:
    """Forward pre/post hooks that keep the stack of modules being run during the trace.

    The innermost module is recorded on every fx node created inside it (MODULE_META_KEY), and
    on failure ``failed_in`` names the module the tracer was in.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.stack: list[tuple[str, contextlib.AbstractContextManager[None]]] = []
        self.failed_in: str | None = None
        self.types = {name: type(m).__name__ for name, m in model.named_modules()}

    def type_of(self, name: str | None) -> str:
        return self.types.get(name or "", "nn.Module")

    def _pre(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            ctx = fx_traceback.annotate({MODULE_META_KEY: name})
            ctx.__enter__()
            self.stack.append((name, ctx))
            self.failed_in = name

        return hook

    def _post(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.stack and self.stack[-1][0] == name:
                self.stack.pop()[1].__exit__(None, None, None)
            self.failed_in = self.stack[-1][0] if self.stack else None

        return hook

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        handles = []
        for name, module in self.model.named_modules():
            handles.append(module.register_forward_pre_hook(self._pre(name)))
            handles.append(module.register_forward_hook(self._post(name)))
        try:
            yield
        except BaseException:
            # Keep failed_in (the innermost module entered and not left); the annotation
            # contexts are discarded with the preserved node meta around us.
            self.stack.clear()
            raise
        finally:
            for h in handles:
                h.remove()
        self.failed_in = None


def _loss_of(out: Any, model_name: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        if out.dim() == 0 or out.numel() == 1:
            return out
        raise CaptureError(
            f"training capture of {model_name} needs a scalar loss, but the model returned a "
            f"tensor of shape {list(out.shape)}; return the loss (e.g. "
            f"F.cross_entropy(logits, labels)) or an object with a `loss` field, or capture with "
            f"training=False"
        )
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss
    hint = (
        " (for transformers models pass labels=... in example_kwargs)"
        if loss is None and hasattr(out, "logits")
        else ""
    )
    raise CaptureError(
        f"training capture of {model_name} needs a scalar loss: the model's output (a "
        f"{type(out).__name__}) is neither a scalar tensor nor has a scalar `loss` "
        f"field/attribute{hint}; return the loss from forward, or capture with training=False"
    )


def _capture_error(
    exc: Exception, module: str | None, module_type: str, model_name: str
) -> CaptureError:
    """Translate a tracer exception into a CaptureError saying where, why and what to do."""
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
        UnsupportedOperatorException,
    )

    if module:
        where = f"in module {module!r} ({module_type})"
    elif module == "":
        where = f"in the top-level forward of {model_name}"
    else:
        where = f"in {model_name} (outside any module's forward: the loss or the backward trace)"
    reason = f"{type(exc).__name__}: {_first_line(exc)}"
    op = getattr(exc, "func", None)
    op_text = f" at op {op}" if op is not None else ""
    name = type(exc).__name__
    if isinstance(exc, DataDependentOutputException) or "DataDependent" in name:
        return CaptureError(
            f"cannot capture {model_name}: data-dependent control flow {where}{op_text} - the "
            f"model reads a tensor's value (bool(), .item(), if tensor: ...) to decide what to "
            f"run, which a trace on fake tensors cannot know. Use torch.cond or torch.where, or "
            f"move the branch out of the model. ({reason})"
        )
    if isinstance(exc, DynamicOutputShapeException):
        return CaptureError(
            f"cannot capture {model_name}: an op{op_text} {where} has an output shape that depends "
            f"on tensor values (e.g. nonzero, boolean-mask indexing); use a fixed-shape "
            f"formulation (torch.where, masking with multiplication). ({reason})"
        )
    if isinstance(exc, UnsupportedOperatorException):
        return CaptureError(
            f"cannot capture {model_name}: an op{op_text} {where} has no fake/meta kernel, so it "
            f"cannot be traced without running it; register a fake implementation "
            f"(torch.library.register_fake) or replace the op. ({reason})"
        )
    return CaptureError(
        f"cannot capture {model_name}: the tracer failed {where}{op_text}. Make the model "
        f"traceable by torch.compile/torch.export (no data-dependent Python control flow, no "
        f"tensors created outside forward on another device). ({reason})"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


# -- inputs and outputs --------------------------------------------------------------------------


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def _tensor_leaves(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]


def _leaf_path(spec: pytree.TreeSpec, position: int) -> str:
    """A readable path ("args[0]", "kwargs['labels']") of leaf ``position`` of (args, kwargs)."""
    dummy = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    for path, leaf in pytree.tree_flatten_with_path(dummy)[0]:
        if leaf == position:
            text = pytree.keystr(path)  # e.g. "[0][1]['labels']"
            head, _, rest = text.partition("]")
            return ("args" if head == "[0" else "kwargs") + rest
    return f"input[{position}]"


def _existing_fake_mode(tensors: Sequence[torch.Tensor]) -> FakeTensorMode | None:
    for t in tensors:
        if isinstance(t, FakeTensor):
            return t.fake_mode
    return None


def _to_fake(t: torch.Tensor, mode: FakeTensorMode, device: str) -> torch.Tensor:
    if isinstance(t, FakeTensor) and t.fake_mode is mode:
        return t
    if t.device.type == "meta":
        # A fake tensor on a real device type, not a fake meta tensor: some autograd formulas
        # (nll_loss among them) are not registered for meta and would silently drop the backward.
        with mode:
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
    return mode.from_tensor(t)


def _with_grad(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    if t.requires_grad == requires_grad:
        return t
    return t.detach().requires_grad_(requires_grad)


def _lookup(table: dict[str, torch.Tensor], name: str, what: str) -> torch.Tensor:
    try:
        return table[name]
    except KeyError:
        raise CaptureError(
            f"the model has no {what} named {name!r}; real_inputs needs the same architecture "
            f"the capture was made from"
        ) from None


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _use_flat_calling_convention(gm: torch.fx.GraphModule) -> None:
    """Make ``gm(*flat_inputs)`` work: the joint graph is generated to take (primals, tangents)."""
    if type(gm.graph._codegen) is not torch.fx.graph.CodeGen:
        gm.graph._codegen = torch.fx.graph.CodeGen()
    gm.recompile()
    # A lazy GraphModule generates its code on the first call and then calls itself again,
    # which runs forward hooks (a memory tracker's, say) twice; generate the code now.
    torch.fx._lazy_graph_module._LazyGraphModule.force_recompile(gm)


def _input_specs(
    gm: torch.fx.GraphModule,
    param_names: list[str],
    buffer_names: list[str],
    user_paths: list[str],
    n_user: int,
    n_params: int,
    n_buffers: int,
) -> list[InputSpec]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    primals = [n for n in placeholders if not _is_tangent(n)]
    if len(primals) != n_params + n_buffers + n_user:
        raise CaptureError(
            f"the traced graph has {len(primals)} inputs but {n_params} parameters, "
            f"{n_buffers} buffers and {n_user} input tensors were given; AOTAutograd merged or "
            f"split inputs (the same tensor passed twice, or inputs that are views of each "
            f"other) - pass distinct tensors"
        )
    specs = []
    for i, node in enumerate(primals):
        if i < n_params:
            kind, source, index = TensorKind.PARAMETER, param_names[i], i
        elif i < n_params + n_buffers:
            kind, source, index = TensorKind.BUFFER, buffer_names[i - n_params], i - n_params
        else:
            index = i - n_params - n_buffers
            kind, source = TensorKind.INPUT, user_paths[index]
        specs.append(_spec(node, kind, source, index))
    for j, node in enumerate(n for n in placeholders if _is_tangent(n)):
        specs.append(_spec(node, TensorKind.INPUT, "tangent", j))
    order = {n.name: i for i, n in enumerate(placeholders)}
    return sorted(specs, key=lambda s: order[s.name])


def _is_tangent(node: torch.fx.Node) -> bool:
    desc = node.meta.get("desc")
    if desc is not None:
        return type(desc).__name__ == "TangentAOTInput"
    return node.name.startswith("tangents")


def _spec(node: torch.fx.Node, kind: TensorKind, source: str, index: int) -> InputSpec:
    val = node.meta.get("val")
    shape = tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else ()
    dtype = str(val.dtype).removeprefix("torch.") if isinstance(val, torch.Tensor) else "float32"
    return InputSpec(name=node.name, kind=kind, source=source, index=index, shape=shape, dtype=dtype)


def _output_specs(
    gm: torch.fx.GraphModule, num_fwd_outputs: int | None, inputs: list[InputSpec]
) -> list[OutputSpec]:
    """Kinds of the graph outputs; gradients are matched to the primal they differentiate."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    values = list(pytree.tree_leaves(out_node.args[0], is_leaf=lambda x: x is None))
    descs = out_node.meta.get("desc")
    primals = [s for s in inputs if s.source != "tangent"]
    n_fwd = len(values) if num_fwd_outputs is None else num_fwd_outputs
    specs = []
    for i, value in enumerate(values):
        if not isinstance(value, torch.fx.Node):
            continue
        if i < n_fwd:
            specs.append(OutputSpec(node=value.name, kind=TensorKind.OUTPUT, position=i))
            continue
        grad_of = None
        desc = descs[i] if isinstance(descs, (list, tuple)) and i < len(descs) else None
        inner = getattr(desc, "grad_of", None)
        idx = getattr(inner, "idx", None)
        if idx is None:
            idx = i - n_fwd  # AOTAutograd returns one gradient slot per primal, in order
        if 0 <= idx < len(primals):
            grad_of = primals[idx].name
        specs.append(
            OutputSpec(node=value.name, kind=TensorKind.GRADIENT, position=i, grad_of=grad_of)
        )
    return specs


__all__ = [
    "AotRecorder", "CaptureError", "Captured", "MODULE_META_KEY", "annotate_aot_joint", "capture",
]
