"""Reduce a captured aten-level fx graph to the IR: one TensorInfo per tensor, one OpInfo per op.

Every fx value that is a tensor becomes a TensorInfo: placeholders, single-output ops, and the
``getitem`` results of multi-output ops (``getitem`` itself only unpacks a tuple, so it is no op;
an output of a multi-output op that nothing unpacks still gets a tensor, ``<op>.<i>``, because the
kernel allocates it). Shapes, dtypes and storage sizes are read from the fake tensors that tracing
left in ``node.meta["val"]``; nothing is executed except torch's FLOP formulas, which only look at
shapes.

Storage aliasing follows the op schema: a return whose ``alias_info`` names an argument's alias set
is a view of that argument (``Tensor(a)``) or, when written (``Tensor(a!)``), the in-place result;
either way it shares that argument's storage. Kernels that alias without saying so in their schema
(``aten._unsafe_view`` returns a view of its input) are caught by comparing fake storages, which
fake tensors allocate exactly as the real kernels do.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx
from torch.utils import _pytree as pytree

from tierplan.ir import PERSISTENT_KINDS, Graph, OpInfo, Phase, TensorInfo, TensorKind, link_users

# Key under node.meta["custom"] holding the qualified name of the module that issued the node
# (written by the capture pass's module hooks).
MODULE_META_KEY = "tierplan_module"


@dataclass(frozen=True)
class InputSpec:
    """What one placeholder of the captured graph is."""

    name: str  # placeholder name
    kind: TensorKind  # PARAMETER, BUFFER or INPUT (user inputs and backward seeds)
    source: str  # parameter/buffer qualified name, input path ("args[0]"), or "tangent"
    index: int  # position among the parameters / buffers / user input tensors / tangents
    shape: tuple[int, ...] = ()
    dtype: str = "float32"


@dataclass(frozen=True)
class OutputSpec:
    """What one value returned by the captured graph is."""

    node: str  # name of the fx node returned
    kind: TensorKind  # OUTPUT (forward outputs: the loss, updated buffers) or GRADIENT
    position: int  # index in the graph's flat output list
    grad_of: str | None = None  # placeholder whose gradient this is


@dataclass
class GraphSignature:
    inputs: list[InputSpec]
    outputs: list[OutputSpec]
    phases: dict[str, Phase] = field(default_factory=dict)  # node name -> phase; default FORWARD


def annotate_graph(gm: torch.fx.GraphModule, signature: GraphSignature, *, name: str) -> Graph:
    """Build the IR Graph of ``gm``; ``Graph.check()`` holds for the result."""
    builder = _Builder(signature)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            builder.placeholder(node)
        elif node.op == "get_attr":
            builder.constant(node, getattr(gm, str(node.target), None))
        elif node.op == "call_function" and node.target is not operator.getitem:
            builder.op(node)
    graph = builder.finish(name)
    graph.check()
    return graph


# -- building ------------------------------------------------------------------------------------


class _Builder:
    def __init__(self, signature: GraphSignature) -> None:
        self.signature = signature
        self.input_specs = {s.name: s for s in signature.inputs}
        self.tensors: dict[str, TensorInfo] = {}
        self.ops: list[OpInfo] = []
        self.inputs: list[str] = []
        self.value_of: dict[str, str] = {}  # fx node name -> tensor name (getitem -> element)
        self.owner_of_storage: dict[int, str] = {}  # fake storage id -> owning tensor
        self.constants: dict[str, str] = {}
        # Ops that draw random numbers or have side effects: an op order must keep theirs
        # (graph.meta["ordered_ops"], read by passes.ordering).
        self.ordered: list[str] = []

    # values without a producer ------------------------------------------------------------

    def placeholder(self, node: torch.fx.Node) -> None:
        spec = self.input_specs.get(node.name)
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return  # symbolic ints and other non-tensor inputs are not memory
        kind = spec.kind if spec is not None else TensorKind.INPUT
        owner = self.owner_of_storage.get(_storage_id(val) or -1)
        if owner is None:
            self._add_owner(node.name, val, kind)
        else:
            # The caller passed one tensor twice (input_ids as labels, say): one storage.
            self.tensors[node.name] = TensorInfo(
                name=node.name, shape=_shape(val), dtype=_dtype_name(val.dtype), nbytes=0,
                kind=kind, storage=owner,
            )
        self.inputs.append(node.name)
        self.value_of[node.name] = node.name

    def constant(self, node: torch.fx.Node, value: Any) -> None:
        val = node.meta.get("val", value)
        if not isinstance(val, torch.Tensor):
            return
        # A tensor constant lives in the module like a buffer, from before the first op.
        self._add_owner(node.name, val, TensorKind.BUFFER)
        self.inputs.append(node.name)
        self.value_of[node.name] = node.name
        self.constants[node.name] = str(node.target)

    # ops ------------------------------------------------------------------------------------

    def op(self, node: torch.fx.Node) -> None:
        inputs = self._input_tensors(node)
        val = node.meta.get("val")
        outputs: list[str] = []
        aliased = 0
        written = 0
        if isinstance(val, torch.Tensor):
            base = self._alias_base(node, 0, val, inputs)
            outputs.append(self._add_result(node.name, val, base))
            aliased += base is not None
        elif isinstance(val, (tuple, list)):
            unpacked = getitem_users(node)
            for i, v in enumerate(val):
                if not isinstance(v, torch.Tensor):
                    continue
                users = unpacked.get(i, [])
                tname = users[0] if users else f"{node.name}.{i}"
                base = self._alias_base(node, i, v, inputs)
                outputs.append(self._add_result(tname, v, base))
                aliased += base is not None
                for u in users:
                    self.value_of[u] = tname
        is_view_op = bool(outputs) and aliased == len(outputs) and not _writes(node)
        if not is_view_op:
            written = sum(self._logical_bytes(t) for t in outputs)
        read = 0 if is_view_op else sum(self._logical_bytes(t) for t in inputs)
        if torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ()) or node.is_impure():
            self.ordered.append(node.name)
        self.ops.append(
            OpInfo(
                name=node.name,
                target=_target_name(node.target),
                inputs=inputs,
                outputs=outputs,
                phase=self.signature.phases.get(node.name, Phase.FORWARD),
                flops=0 if is_view_op else op_flops(node),
                bytes_read=read,
                bytes_written=written,
                module=module_path(node),
            )
        )

    def _input_tensors(self, node: torch.fx.Node) -> list[str]:
        names: list[str] = []
        seen: set[str] = set()
        for arg in pytree.tree_leaves((node.args, node.kwargs)):
            if isinstance(arg, torch.fx.Node):
                tname = self.value_of.get(arg.name)
                if tname is not None and tname not in seen:
                    seen.add(tname)
                    names.append(tname)
        return names

    def _alias_base(
        self, node: torch.fx.Node, index: int, val: torch.Tensor, inputs: list[str]
    ) -> str | None:
        """The tensor whose storage output ``index`` of ``node`` shares, or None if it is new."""
        storage = _storage_id(val)
        arg = _schema_alias_arg(node, index)
        if isinstance(arg, torch.fx.Node) and arg.name in self.value_of:
            base = self.value_of[arg.name]
            owner = self.tensors[base].storage
            # Trust the schema unless the fake storages prove the kernel copied (a CompositeImplicit
            # op such as reshape may return a view or a copy).
            if storage is None or self.owner_of_storage.get(storage) == owner:
                return base
            if storage not in self.owner_of_storage:
                return None
        if storage is not None and storage in self.owner_of_storage:
            owner = self.owner_of_storage[storage]
            # Alias one of the op's own inputs when possible, so the view chain stays readable.
            for t in inputs:
                if self.tensors[t].storage == owner:
                    return t
            return owner
        return None

    def _add_result(self, tname: str, val: torch.Tensor, base: str | None) -> str:
        if base is None:
            self._add_owner(tname, val, TensorKind.TEMPORARY)
        else:
            self.tensors[tname] = TensorInfo(
                name=tname,
                shape=_shape(val),
                dtype=_dtype_name(val.dtype),
                nbytes=0,
                kind=TensorKind.TEMPORARY,
                storage=self.tensors[base].storage,
            )
        self.value_of.setdefault(tname, tname)
        return tname

    def _add_owner(self, tname: str, val: torch.Tensor, kind: TensorKind) -> None:
        self.tensors[tname] = TensorInfo(
            name=tname,
            shape=_shape(val),
            dtype=_dtype_name(val.dtype),
            nbytes=storage_nbytes(val),
            kind=kind,
        )
        storage = _storage_id(val)
        if storage is not None:
            self.owner_of_storage.setdefault(storage, tname)

    def _logical_bytes(self, tname: str) -> int:
        """Bytes an op touches when it reads/writes ``tname``: its elements, at most its storage."""
        t = self.tensors[tname]
        numel = 1
        for s in t.shape:
            numel *= s
        logical = numel * _itemsize(t.dtype)
        return min(logical, self.tensors[t.storage].nbytes) if t.is_view else logical

    # kinds and the Graph --------------------------------------------------------------------

    def finish(self, name: str) -> Graph:
        link_users(self.tensors, self.ops)
        phase_of = {op.name: op.phase for op in self.ops}
        # Storages read by a backward op through any alias.
        read_in_backward: set[str] = set()
        for t in self.tensors.values():
            if any(phase_of[u] is Phase.BACKWARD for u in t.users):
                read_in_backward.add(t.name)
                read_in_backward.add(t.storage)
        for t in self.tensors.values():
            if t.producer is None:
                continue
            produced_fw = phase_of[t.producer] is Phase.FORWARD
            if produced_fw and t.name in read_in_backward:
                t.kind = TensorKind.ACTIVATION
        outputs: list[str] = []
        grad_of: dict[str, str] = {}
        for spec in self.signature.outputs:
            tname = self.value_of.get(spec.node)
            if tname is None:
                continue
            if tname not in outputs:
                outputs.append(tname)
            for target in (tname, self.tensors[tname].storage):
                t = self.tensors[target]
                if t.kind not in PERSISTENT_KINDS:
                    t.kind = spec.kind
            if spec.kind is TensorKind.GRADIENT and spec.grad_of is not None:
                grad_of[tname] = spec.grad_of
        params = {s.name: s.source for s in self.signature.inputs if s.kind is TensorKind.PARAMETER}
        meta: dict[str, Any] = {
            "param_names": {n: q for n, q in params.items() if n in self.tensors},
            "buffer_names": {
                s.name: s.source
                for s in self.signature.inputs
                if s.kind is TensorKind.BUFFER and s.name in self.tensors
            },
            "input_names": {
                s.name: s.source
                for s in self.signature.inputs
                if s.kind is TensorKind.INPUT and s.name in self.tensors
            },
            "grad_of": grad_of,
            "num_parameters": sum(_numel(self.tensors[n].shape) for n in params if n in self.tensors),
            "parameter_bytes": sum(self.tensors[n].nbytes for n in params if n in self.tensors),
        }
        if self.constants:
            meta["constants"] = dict(self.constants)
        if self.ordered:
            meta["ordered_ops"] = list(self.ordered)
        return Graph(
            name=name,
            tensors=self.tensors,
            ops=self.ops,
            inputs=self.inputs,
            outputs=outputs,
            meta=meta,
        )


# -- per-node facts ------------------------------------------------------------------------------


def module_path(node: torch.fx.Node) -> str:
    """Qualified name of the module that issued ``node``, or "" when unknown."""
    custom = node.meta.get("custom")
    if isinstance(custom, dict) and MODULE_META_KEY in custom:
        return str(custom[MODULE_META_KEY])
    # Graphs from dynamo/export carry nn_module_stack (backward nodes: fwd_nn_module_stack),
    # an ordered {key: (qualified name, type)} from outermost to innermost.
    for key in ("nn_module_stack", "fwd_nn_module_stack"):
        stack = node.meta.get(key)
        if stack:
            qualified = list(stack.values())[-1][0]
            return str(qualified).removeprefix("L['self'].").removeprefix("L__self__.")
    return ""


@functools.cache
def _extra_flop_formulas() -> dict[Any, Callable[..., int]]:
    """FLOP formulas for ops torch's registry lacks but that match a registered one.

    The CPU flash-attention kernels take (query, key, value, ...) and (grad_out, query, key,
    value, ...) first, exactly like the CUDA flash ones the registry covers.
    """
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    table: dict[Any, Callable[..., int]] = {}
    pairs = [
        ("_scaled_dot_product_flash_attention_for_cpu", aten._scaled_dot_product_flash_attention),
        (
            "_scaled_dot_product_flash_attention_for_cpu_backward",
            aten._scaled_dot_product_flash_attention_backward,
        ),
    ]
    for name, like in pairs:
        packet = getattr(aten, name, None)
        if packet is not None and like in flop_registry:
            table[packet] = flop_registry[like]
    return table


def op_flops(node: torch.fx.Node) -> int:
    """FLOPs of ``node`` from torch.utils.flop_counter's formulas, evaluated on fake shapes.

    Ops without a formula (elementwise, reductions, copies) count 0: their cost is their bytes.
    """
    from torch.utils.flop_counter import flop_registry

    packet = getattr(node.target, "overloadpacket", None)
    if packet is None:
        return 0
    formula = flop_registry.get(packet)
    if formula is None:
        formula = _extra_flop_formulas().get(packet)
    if formula is None:
        return 0
    args, kwargs = pytree.tree_map_only(
        torch.fx.Node, lambda n: n.meta.get("val"), (node.args, node.kwargs)
    )
    try:
        return int(formula(*args, **kwargs, out_val=node.meta.get("val")))
    except Exception:  # noqa: BLE001 - a formula that cannot read these args counts nothing
        return 0


def storage_nbytes(val: torch.Tensor) -> int:
    """Bytes of the storage behind ``val`` (fake tensors size their storage like real kernels)."""
    try:
        return int(val.untyped_storage().nbytes())
    except Exception:  # noqa: BLE001 - tensors without storage (subclasses): count elements
        return _numel(val.shape) * val.element_size()


def _storage_id(val: torch.Tensor) -> int | None:
    try:
        return int(val.untyped_storage()._cdata)
    except Exception:  # noqa: BLE001
        return None


def _schema_alias_arg(node: torch.fx.Node, index: int) -> Any:
    """The argument that return ``index`` of ``node`` aliases per its schema, else None."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns:
        return None
    ret = schema.returns[min(index, len(schema.returns) - 1)]  # a Tensor[] return: one entry
    info = ret.alias_info
    if info is None or not info.before_set:
        return None
    for pos, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not (arg.alias_info.before_set & info.before_set):
            continue
        if arg.kwarg_only or pos >= len(node.args):
            return node.kwargs.get(arg.name)
        return node.args[pos]
    return None


def _writes(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(
        a.alias_info is not None and a.alias_info.is_write for a in schema.arguments
    )


def getitem_users(node: torch.fx.Node) -> dict[int, list[str]]:
    """Names of the getitem nodes reading each output index of a multi-output node."""
    found: dict[int, list[str]] = {}
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem:
            found.setdefault(int(user.args[1]), []).append(user.name)
    return found


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)  # "aten.mm.default"
    return getattr(target, "__name__", str(target))


def _shape(val: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in val.shape)


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _itemsize(dtype: str) -> int:
    return int(getattr(torch, dtype).itemsize)


__all__ = [
    "GraphSignature",
    "InputSpec",
    "MODULE_META_KEY",
    "OutputSpec",
    "annotate_graph",
    "getitem_users",
    "module_path",
    "op_flops",
    "storage_nbytes",
]
