"""The graph IR the planner sees.

A captured torch.fx graph is reduced to two tables: tensors (what occupies memory) and ops (what
reads and writes them, in a valid topological order). Everything else in tierplan reads these
tables; nothing here imports torch, so a Graph can be saved, reloaded and planned on a machine
that never saw the model.

Storage aliasing: a view (``aten.view``, ``aten.t``, ``aten.expand``, ...) produces a tensor that
shares its base's storage. Such a tensor has ``storage`` set to the name of the tensor that owns
the storage, and memory is counted once per storage, never per alias.
"""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable


class TensorKind(str, enum.Enum):
    PARAMETER = "parameter"
    BUFFER = "buffer"  # module buffers (e.g. position ids): persistent, not trained
    INPUT = "input"  # the batch (and the backward seed of the loss)
    ACTIVATION = "activation"  # produced in the forward, read by the backward
    TEMPORARY = "temporary"  # produced and consumed within one phase
    OUTPUT = "output"  # forward outputs the caller receives (the loss, logits)
    GRADIENT = "gradient"  # gradients of parameters, graph outputs of the backward
    OPTIMIZER_STATE = "optimizer_state"


# Kinds whose storage exists before the first op and after the last one: the caller owns them.
PERSISTENT_KINDS = frozenset(
    {TensorKind.PARAMETER, TensorKind.BUFFER, TensorKind.INPUT, TensorKind.OPTIMIZER_STATE}
)


class Phase(str, enum.Enum):
    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"
    nbytes: int  # bytes of this tensor's own storage; 0 when it aliases another tensor's
    kind: TensorKind
    producer: str | None = None  # name of the op that writes it; None for graph inputs
    users: list[str] = field(default_factory=list)  # names of the ops that read it, in order
    storage: str = ""  # name of the tensor owning the storage; itself when not a view

    def __post_init__(self) -> None:
        if not self.storage:
            self.storage = self.name
        self.shape = tuple(self.shape)
        self.kind = TensorKind(self.kind)

    @property
    def is_view(self) -> bool:
        return self.storage != self.name


@dataclass
class OpInfo:
    name: str
    target: str  # e.g. "aten.mm.default"
    inputs: list[str]  # tensor names read, without repeats
    outputs: list[str]  # tensor names written
    phase: Phase = Phase.FORWARD
    flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    module: str = ""  # qualified name of the nn.Module that issued it, when known
    block: int | None = None  # index of the repeated block it belongs to, if any

    def __post_init__(self) -> None:
        self.phase = Phase(self.phase)


@dataclass
class BlockInfo:
    """Ops that form one repetition of a repeated structure (e.g. one transformer layer)."""

    index: int
    ops: list[str]
    template: int  # index of the first block with the same structure


class GraphError(ValueError):
    """A Graph is malformed; the message names the tensor or op at fault."""


@dataclass
class Graph:
    name: str
    tensors: dict[str, TensorInfo]
    ops: list[OpInfo]  # a valid topological order: the order of capture
    inputs: list[str]
    outputs: list[str]
    blocks: list[BlockInfo] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # free-form facts from capture

    def __post_init__(self) -> None:
        self._op_index = {op.name: i for i, op in enumerate(self.ops)}

    # -- lookups ---------------------------------------------------------------------------

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GraphError(
                f"graph {self.name!r} has no tensor named {name!r}; "
                f"see Graph.tensors for the {len(self.tensors)} names it has"
            ) from None

    def op(self, name: str) -> OpInfo:
        try:
            return self.ops[self._op_index[name]]
        except KeyError:
            raise GraphError(f"graph {self.name!r} has no op named {name!r}") from None

    def op_position(self, name: str) -> int:
        self.op(name)
        return self._op_index[name]

    def storage_bytes(self, name: str) -> int:
        """Bytes of the storage behind tensor ``name`` (its base's, for a view)."""
        return self.tensors[self.tensor(name).storage].nbytes

    def storages(self) -> list[str]:
        """Names of the tensors that own a storage, in insertion order."""
        return [t.name for t in self.tensors.values() if not t.is_view]

    def tensors_of_kind(self, *kinds: TensorKind) -> list[TensorInfo]:
        return [t for t in self.tensors.values() if t.kind in kinds]

    def total_bytes(self, *kinds: TensorKind) -> int:
        return sum(t.nbytes for t in self.tensors_of_kind(*kinds))

    def ops_in_phase(self, phase: Phase) -> list[OpInfo]:
        return [op for op in self.ops if op.phase == phase]

    # -- checks ----------------------------------------------------------------------------

    def check(self) -> None:
        """Raise GraphError unless every reference resolves and the op order is topological."""
        produced: set[str] = set(self.inputs)
        for name in self.inputs:
            self.tensor(name)
        for t in self.tensors.values():
            if t.storage not in self.tensors:
                raise GraphError(f"tensor {t.name!r} aliases unknown storage {t.storage!r}")
            if self.tensors[t.storage].is_view:
                raise GraphError(f"tensor {t.name!r} aliases {t.storage!r}, itself a view")
        for op in self.ops:
            for name in op.inputs:
                if name not in produced:
                    raise GraphError(
                        f"op {op.name!r} reads {name!r} before any op or graph input produces it"
                    )
            for name in op.outputs:
                self.tensor(name)
                produced.add(name)
        for name in self.outputs:
            if name not in produced:
                raise GraphError(f"graph output {name!r} is never produced")

    # -- serialization ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tensors": [_tensor_to_dict(t) for t in self.tensors.values()],
            "ops": [_op_to_dict(op) for op in self.ops],
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "blocks": [asdict(b) for b in self.blocks],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Graph:
        tensors = [TensorInfo(**t) for t in data["tensors"]]
        return cls(
            name=data["name"],
            tensors={t.name: t for t in tensors},
            ops=[OpInfo(**op) for op in data["ops"]],
            inputs=list(data["inputs"]),
            outputs=list(data["outputs"]),
            blocks=[BlockInfo(**b) for b in data.get("blocks", [])],
            meta=dict(data.get("meta", {})),
        )


def _tensor_to_dict(t: TensorInfo) -> dict[str, Any]:
    d = asdict(t)
    d["shape"] = list(t.shape)
    d["kind"] = t.kind.value
    return d


def _op_to_dict(op: OpInfo) -> dict[str, Any]:
    d = asdict(op)
    d["phase"] = op.phase.value
    return d


def link_users(tensors: dict[str, TensorInfo], ops: Iterable[OpInfo]) -> None:
    """Fill ``producer`` and ``users`` of every tensor from the ops' inputs and outputs."""
    for t in tensors.values():
        t.producer, t.users = None, []
    for op in ops:
        for name in op.outputs:
            tensors[name].producer = op.name
        for name in op.inputs:
            tensors[name].users.append(op.name)
