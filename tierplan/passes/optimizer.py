"""Append an optimizer step to a training graph: its states, and one update op per parameter.

The update is in place, as in ``torch.optim``: each op reads the parameter, its gradient and its
states and writes the parameter and the states. The written values are new tensor names that
alias the old storages (nbytes 0, ``storage`` = the parameter or state), the IR's way of saying
"in place", so liveness counts every storage once.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

from tierplan.ir import Graph, GraphError, OpInfo, Phase, TensorInfo, TensorKind, link_users


@dataclass(frozen=True)
class OptimizerSpec:
    states: tuple[str, ...]  # names of the per-parameter state tensors
    flops_per_element: int  # arithmetic per parameter element of one update


def optimizer_spec(optimizer: str, *, momentum: float = 0.9, weight_decay: float = 0.0) -> OptimizerSpec:
    """States and per-element FLOPs of ``optimizer``, counted from torch.optim's update rules.

    AdamW (decoupled decay): p *= 1 - lr*wd (1); m = b1*m + (1-b1)*g (3); v = b2*v + (1-b2)*g*g
    (4); denom = sqrt(v) / sqrt(bias_correction2) + eps (3); p -= step_size * m / denom (3):
    14 FLOPs per element; the bias corrections are per-tensor scalars.
    Adam: the same without the decoupled decay (13), plus g += wd*p (2) when wd != 0.
    SGD: p -= lr*g (2); with momentum, buf = momentum*buf + g (2) first; wd != 0 adds g += wd*p (2).
    """
    name = optimizer.lower()
    decay = 2 if weight_decay else 0
    if name == "adamw":
        return OptimizerSpec(("exp_avg", "exp_avg_sq"), 14)
    if name == "adam":
        return OptimizerSpec(("exp_avg", "exp_avg_sq"), 13 + decay)
    if name == "sgd":
        if momentum:
            return OptimizerSpec(("momentum_buffer",), 4 + decay)
        return OptimizerSpec((), 2 + decay)
    raise ValueError(f"unknown optimizer {optimizer!r}; known: adamw, adam, sgd")


def add_optimizer_step(
    graph: Graph,
    optimizer: str = "adamw",
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    state_dtype: str = "float32",
) -> Graph:
    """A copy of ``graph`` with OPTIMIZER_STATE tensors and one OPTIMIZER op per parameter.

    Needs a training graph: ``graph.meta["grad_of"]`` maps each gradient to its parameter.
    States are ``state_dtype`` (fp32, as torch.optim keeps them for fp32 parameters and as mixed
    precision keeps them for bf16/fp16 ones) and have the parameter's shape.
    """
    spec = optimizer_spec(optimizer, momentum=momentum, weight_decay=weight_decay)
    if any(op.phase is Phase.OPTIMIZER for op in graph.ops):
        raise GraphError(f"graph {graph.name!r} already has an optimizer step")
    grad_of: dict[str, str] = graph.meta.get("grad_of", {})
    if not grad_of:
        raise GraphError(
            f"graph {graph.name!r} has no gradients (meta['grad_of'] is empty); capture it with "
            f"training=True before adding an optimizer step"
        )
    state_size = _itemsize(state_dtype)
    tensors = {n: replace(t, users=list(t.users)) for n, t in graph.tensors.items()}
    ops = [replace(op, inputs=list(op.inputs), outputs=list(op.outputs)) for op in graph.ops]
    inputs = list(graph.inputs)
    meta = copy.deepcopy(graph.meta)
    param_names: dict[str, str] = meta.get("param_names", {})
    state_of: dict[str, str] = {}
    grad_for = {param: grad for grad, param in grad_of.items()}
    op_names = {op.name for op in ops}

    for param in [n for n in graph.inputs if n in grad_for]:
        p = tensors[param]
        if p.kind is not TensorKind.PARAMETER:
            continue  # a gradient of a user input needs no update
        grad = grad_for[param]
        numel = _numel(p.shape)
        states = []
        for state in spec.states:
            name = _fresh(f"{param}.{state}", tensors)
            tensors[name] = TensorInfo(
                name=name, shape=p.shape, dtype=state_dtype, nbytes=numel * state_size,
                kind=TensorKind.OPTIMIZER_STATE,
            )
            inputs.append(name)  # the optimizer owns it across steps, like a parameter
            state_of[name] = param
            states.append(name)
        # The updates are written in place: new names aliasing the old storages.
        written = []
        for old in [param, *states]:
            name = _fresh(f"{old}.updated", tensors)
            tensors[name] = replace(tensors[old], name=name, nbytes=0, storage=tensors[old].storage,
                                    producer=None, users=[])
            written.append(name)
        param_bytes = numel * _itemsize(p.dtype)
        grad_t = tensors[grad]
        op_name = _fresh(f"{optimizer.lower()}_step.{param}", op_names)
        op_names.add(op_name)
        ops.append(
            OpInfo(
                name=op_name,
                target=f"optimizer.{optimizer.lower()}",
                inputs=[param, grad, *states],
                outputs=written,
                phase=Phase.OPTIMIZER,
                flops=spec.flops_per_element * numel,
                bytes_read=param_bytes + _numel(grad_t.shape) * _itemsize(grad_t.dtype)
                + len(states) * numel * state_size,
                bytes_written=param_bytes + len(states) * numel * state_size,
                module=param_names.get(param, "").rpartition(".")[0],
            )
        )

    link_users(tensors, ops)
    meta["optimizer"] = optimizer.lower()
    meta["optimizer_state_of"] = state_of
    result = Graph(
        name=graph.name,
        tensors=tensors,
        ops=ops,
        inputs=inputs,
        outputs=list(graph.outputs),
        blocks=copy.deepcopy(graph.blocks),
        meta=meta,
    )
    result.check()
    return result


def _fresh(name: str, taken: dict[str, object] | set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


_ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
    "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
}


def _itemsize(dtype: str) -> int:
    try:
        return _ITEMSIZE[dtype]
    except KeyError:
        raise GraphError(f"unknown dtype {dtype!r}; known: {', '.join(_ITEMSIZE)}") from None


__all__ = ["OptimizerSpec", "add_optimizer_step", "optimizer_spec"]
