"""Render a Plan into the Python source of a program that runs it.

The program is one function, ``step(ctx, *flat_inputs)``, whose body follows ``plan.schedule``
line for line: a compute or recompute step is a call of the captured fx node's op
(``aten.mm.default(t, primals_3)``) with its arguments (fx values by name, everything else as a
literal); a transfer is ``ctx.start`` at its start step and ``ctx.wait`` at its wait step; a free
from the device is ``del`` of every name bound to that storage. Python frees a storage when its
last name goes, which is what makes ``del`` at the planned step the plan's free.

Tiers: storages on nvme live in swap files; every other off-device tier (host, and a CXL memory
expander's ``cxl``, which the CPU addresses as memory) is host memory, so the program keeps them
in the host pool (``runtime.in_host_pool``).

Dynamic shapes: a graph traced with symbolic sizes takes them as inputs and computes sizes with
scalar ops (``add_36 = operator.add(1, s0)``); the program binds those results like tensors, and
checks at its start that each size input has the value the plan was made at.

Views: the plan moves and frees storages, the program names tensors. When a storage comes back to
the device (a prefetch lands, or the op that makes it is recomputed), every view of it that the
program still reads is rebuilt over it with the geometry recorded at capture (``alias``), since
the view ops that made them are not re-run.

Split programs (``emit(..., split=(tangents, num_fwd_outputs))``, used by ``tierplan.backend``):
the same schedule becomes a generator. It runs up to the first step that needs a late input (the
backward's tangents), yields the forward outputs there, receives the tangents, and runs the rest;
its return value is the gradients. Every local of the frame (saved activations, transfers in
flight, the host-pool slots they use) carries across the yield unchanged, so the plan's schedule
is run exactly, only paused. A forward output is yielded as the device tensor it was made as: the
caller holds it from then on, so a plan that frees or offloads a forward output from the device
before the split cannot free it (the program still runs correctly; that output's memory stays).

Arenas (``emit(..., arena=True)``, see ``arena.py``): every storage the plan allocates on the
device is a view of one byte buffer that the program allocates when it starts
(``_arena = ctx.new_arena()``) at a static offset packed by lifetime; an op writes into its slot
through its ``.out`` overload and a transfer to the device lands in its slot. Gradients (graph
outputs the plan counts until the end of the step) are in the arena too, so they keep that run's
arena alive until the caller drops them. Ops without a usable out overload, the other graph
outputs (the loss, logits: the caller may keep them across runs) and caller-owned tensors stay
outside the arena (``Program.arena`` lists every allocation and where it went).

Gradient reports (``emit(..., gradients={output index: key})``, used by ``tierplan.compile`` with
``update_in_backward=True``): right after the step that computes one of those graph outputs (a
parameter's final gradient) the program calls ``ctx.gradient_ready(key, grad)``, so a host update
can start while the rest of the backward runs. Without ``gradients`` the source is unchanged.

The source is rendered by the jinja2 template ``templates/program.py.j2``.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jinja2
import torch
import torch.fx

from tierplan.codegen.arena import ArenaLayout, out_variant, plan_arena
from tierplan.codegen.runtime import Layout, in_host_pool
from tierplan.ir import PERSISTENT_KINDS, TensorKind
from tierplan.passes.annotate import getitem_users
from tierplan.packing.pack import Buffer, pack_greedy
from tierplan.plans.plan import DEVICE, NVME, Plan, Step, StepKind
from tierplan.units import format_bytes

_TEMPLATES = Path(__file__).parent / "templates"
_RESERVED = {"ctx", "torch", "aten", "alias", "step", "DEVICE", "CONSTANTS", "TARGETS", "_", "_arena"}
_HOST_ALIGNMENT = 64  # bytes; every dtype's alignment, and a cache line


class EmitError(ValueError):
    """The plan or graph cannot be rendered; the message names the step, op or tensor."""


@dataclass
class Program:
    """A rendered program and what its loader and caller need to know about it."""

    source: str
    inputs: list[str]  # the parameter names of ``step``: the placeholders of the graph, in order
    outputs: list[str | None]  # the graph's flat outputs, by tensor name (None stays None)
    line_steps: dict[int, str]  # source line (1-based) -> "step 12 (compute addmm)"
    layout: Layout
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: list[Callable[..., Any]] = field(default_factory=list)
    # Per output: True when the plan leaves it off the device (a host-memory tier or nvme), so the
    # program returns a view of the host pool, the caller's host tensor or a read of its swap file,
    # which the caller must copy before the next run.
    outputs_on_host: list[bool] = field(default_factory=list)
    offdevice_inputs: list[str] = field(default_factory=list)  # placeholders starting off the device
    # Split programs only: the placeholders sent in at the yield (tangents), and the graph outputs
    # yielded there (the forward outputs); ``outputs`` are then what the generator returns.
    late_inputs: list[str] = field(default_factory=list)
    yielded: list[str | None] = field(default_factory=list)
    split_step: int | None = None  # schedule index the yield precedes
    arena: ArenaLayout | None = None  # arena programs: where every device allocation lives


@dataclass(frozen=True)
class _Geometry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


def emit(
    plan: Plan, gm: torch.fx.GraphModule, *, title: str | None = None,
    split: tuple[list[str], int] | None = None, arena: bool = False,
    gradients: dict[int, Any] | None = None,
) -> Program:
    """The program of ``plan`` over ``gm``, the fx graph the plan's graph was captured from
    (``Captured.joint``: each IR op is one of its nodes, by name).

    ``split=(late_inputs, num_fwd_outputs)`` renders a generator (see the module docstring):
    ``late_inputs`` are placeholders (the tangents) that arrive at the yield, and the first
    ``num_fwd_outputs`` graph outputs are yielded there. ``arena=True`` places the device
    allocations in one arena (see the module docstring and ``arena.py``). ``gradients`` maps flat
    graph output indices to the keys of their ``ctx.gradient_ready`` reports."""
    return _Emitter(plan, gm, split, arena=arena, gradients=gradients).render(
        title or f"plan for {plan.graph.name}")


class _Emitter:
    def __init__(
        self, plan: Plan, gm: torch.fx.GraphModule, split: tuple[list[str], int] | None = None,
        *, arena: bool = False, gradients: dict[int, Any] | None = None,
    ) -> None:
        self.plan = plan
        self.gradients = dict(gradients or {})
        self.reports: dict[str, Any] = {}  # tensor name -> its report's key, until it is computed
        self.use_arena = arena
        self.arena: ArenaLayout | None = None
        self.late: list[str] = list(split[0]) if split else []
        self.num_yielded = split[1] if split else 0
        self.split = split is not None
        self.stashed: dict[str, str] = {}  # forward output -> the name that keeps it for the yield
        self.deferred: list[tuple[str, str]] = []  # prologue lines of late inputs
        self.graph = plan.graph
        self.gm = gm
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.value_of: dict[str, str] = {}  # fx node name -> IR tensor name
        # op -> the name bound to each result slot: a tensor, or a scalar (see ``_is_scalar``);
        # None where the program binds nothing (the slot is unused or not a value).
        self.outputs_of: dict[str, list[str | None]] = {}
        self.geometry: dict[str, _Geometry] = {}
        self.targets: list[Callable[..., Any]] = []
        self._index_values()
        self.aliases: dict[str, list[str]] = {}  # storage -> tensors over it (itself first)
        for t in self.graph.tensors.values():
            self.aliases.setdefault(t.storage, []).append(t.name)
        self.reads = self._read_steps()
        self.bound: set[str] = set()
        self.dropped: dict[str, set[str]] = {}  # storage -> names deleted at its last free
        self.host_named: dict[str, str] = {}  # caller-owned storage starting on host -> its name
        self.on_host: set[str] = set()  # storages resident on a host-memory tier (static tracking)
        self.on_nvme: set[str] = set()  # storages that have a swap file
        self.offdevice_inputs: list[str] = []  # caller-owned storages the plan starts off the device
        self.body: list[tuple[str, str]] = []  # (code, step label)

    # -- the fx graph -------------------------------------------------------------------------

    def _index_values(self) -> None:
        """Name every fx value the way annotate names IR tensors (getitem -> the element)."""
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self.value_of[node.name] = node.name
                self._record_geometry(node.name, node.meta.get("val"))
            elif node.op == "call_function" and node.target is not operator.getitem:
                val = node.meta.get("val")
                if isinstance(val, (tuple, list)):
                    slots: list[str | None] = []
                    users = getitem_users(node)
                    for i, v in enumerate(val):
                        slots.append(self._index_slot(node, i, v, users.get(i, [])))
                    self.outputs_of[node.name] = slots
                else:
                    self.value_of[node.name] = node.name
                    self._record_geometry(node.name, val)
                    bound = isinstance(val, torch.Tensor) or _is_scalar(val)
                    self.outputs_of[node.name] = [node.name if bound else None]

    def _index_slot(self, node: torch.fx.Node, index: int, val: Any, users: list[str]) -> str | None:
        """The name of element ``index`` of the tuple ``node`` returns (its first getitem's, as
        annotate names it), or None when it is neither a tensor nor a scalar."""
        if isinstance(val, torch.Tensor):
            name = users[0] if users else f"{node.name}.{index}"
            self._record_geometry(name, val)
        elif _is_scalar(val) and users:
            # A scalar element (a SymInt size of a flash-attention output): later nodes read it.
            name = users[0]
        else:
            return None
        for u in users:
            self.value_of[u] = name
        return name

    def _record_geometry(self, name: str, val: Any) -> None:
        if isinstance(val, torch.Tensor):
            self.geometry[name] = _Geometry(
                val.dtype, tuple(int(s) for s in val.shape), tuple(int(s) for s in val.stride()),
                int(val.storage_offset()),
            )

    def _read_steps(self) -> dict[str, list[int]]:
        """Tensor name -> schedule indices of the compute and recompute steps that read it
        (len(schedule) for the graph's return)."""
        reads: dict[str, list[int]] = {}
        for i, s in enumerate(self.plan.schedule):
            if s.op is not None:
                for t in self.graph.op(s.op).inputs:
                    reads.setdefault(t, []).append(i)
        for t in self.graph.outputs:
            reads.setdefault(t, []).append(len(self.plan.schedule))
        return reads

    # -- names and literals -------------------------------------------------------------------

    @staticmethod
    def var(tensor: str) -> str:
        name = tensor.replace(".", "_out")
        return name + "_" if name in _RESERVED or not name.isidentifier() else name

    def literal(self, x: Any) -> str:
        if isinstance(x, torch.fx.Node):
            if x.name not in self.value_of:
                raise EmitError(f"fx value {x.name!r} is not a tensor the program names")
            return self.var(self.value_of[x.name])
        if isinstance(x, (list, tuple)):
            items = ", ".join(self.literal(v) for v in x)
            return f"({items},)" if isinstance(x, tuple) and len(x) == 1 else (
                f"({items})" if isinstance(x, tuple) else f"[{items}]"
            )
        if isinstance(x, dict):
            return "{" + ", ".join(f"{k!r}: {self.literal(v)}" for k, v in x.items()) + "}"
        if isinstance(x, torch.device):
            return "DEVICE"  # the capture device becomes the run device
        if isinstance(x, (torch.dtype, torch.layout, torch.memory_format)):
            return str(x)  # "torch.float32", "torch.strided", "torch.contiguous_format"
        if isinstance(x, float) and not math.isfinite(x):
            return f"float({str(x)!r})"
        if x is None or isinstance(x, (bool, int, float, str)):
            return repr(x)
        raise EmitError(f"cannot write argument {x!r} of type {type(x).__name__} as a literal")

    def call(self, node: torch.fx.Node) -> str:
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            text = str(target)
            fn = text if text.startswith("aten.") else f"torch.ops.{text}"
        else:
            self.targets.append(target)
            fn = f"TARGETS[{len(self.targets) - 1}]"
        args = [self.literal(a) for a in node.args]
        args += [f"{k}={self.literal(v)}" for k, v in node.kwargs.items()]
        return f"{fn}({', '.join(args)})"

    def alias_line(self, name: str, over: str) -> str:
        g = self.geometry.get(name)
        if g is None:
            raise EmitError(f"no recorded geometry for tensor {name!r}; cannot rebuild it")
        return (f"{self.var(name)} = alias({over}, {g.dtype}, {g.shape}, {g.stride}, {g.offset})")

    # -- the schedule -------------------------------------------------------------------------

    def line(self, code: str, label: str) -> None:
        self.body.append((code, label))

    def render(self, title: str) -> Program:
        plan = self.plan
        inputs = [n.name for n in self.gm.graph.nodes if n.op == "placeholder"]
        constants = [n.name for n in self.gm.graph.nodes if n.op == "get_attr"]
        self.bound = (set(inputs) - set(self.late)) | set(constants)
        self.check_symbolic_inputs()
        early_body = self.body
        for storage, tier in plan.initial_tiers.items():
            # The prologue of an input that arrives at the yield runs right after it.
            self.body = self.deferred if storage in self.late else early_body
            if tier == DEVICE:
                continue
            if storage not in self.bound:
                raise EmitError(
                    f"the plan starts {storage} on {tier}; code generation supports only "
                    f"caller-owned graph inputs starting off the device (on a host-memory tier "
                    f"such as host or cxl, or on nvme)"
                )
            self.offdevice_inputs.append(storage)
            if tier == NVME:
                # The caller's tensor (in host memory) is written to the swap file the program
                # reads it from: the plan keeps it on NVMe between uses.
                self.on_nvme.add(storage)
                self.line(f"ctx.stage_file({storage!r}, {self.var(storage)})  # starts on nvme", "prologue")
                self.line(f"del {self.var(storage)}", "prologue")
                self.bound.discard(storage)
                continue
            # The caller passes it in host memory (a host-memory tier: host DRAM, or CXL memory,
            # which the CPU addresses like DRAM); the program's device copy comes and goes.
            self.host_named[storage] = f"_host_{self.var(storage)}"
            self.on_host.add(storage)
            self.line(f"{self.host_named[storage]} = {self.var(storage)}  # starts on {tier}", "prologue")
            self.line(f"del {self.var(storage)}", "prologue")
            self.bound.discard(storage)
        self.body = early_body
        self.reports = self.gradient_reports()
        split_at = self.split_step() if self.split else None
        if self.use_arena:
            self.arena = self.plan_arena()
            self.line(f"_arena = ctx.new_arena()  # {format_bytes(self.arena.arena_bytes)}, this run's: "
                      f"every device allocation of the plan below that says 'arena'", "prologue")
        random_recomputed = {
            s.op for s in plan.schedule if s.kind == StepKind.RECOMPUTE and _is_random(self.nodes[s.op])
        }
        phase = None
        for index, s in enumerate(plan.schedule):
            label = f"step {index} ({s.describe()})"
            if index == split_at:
                self.yield_line(label)
            if s.op is not None:
                op = self.graph.op(s.op)
                if op.phase != phase:
                    phase = op.phase
                    self.line(f"# -- {phase.value} --", label)
                self.op_step(index, s, label, s.op in random_recomputed)
            elif s.kind == StepKind.START_TRANSFER:
                self.start_step(index, s, label)
            elif s.kind == StepKind.WAIT_TRANSFER:
                self.wait_step(index, s, label)
            else:
                self.free_step(s, label)
        if self.split and split_at == len(plan.schedule):
            self.yield_line("end of schedule")
        out_node = self.gm.graph.output_node()
        outputs: list[str | None] = []
        for v in _flat(out_node.args[0]):
            outputs.append(None if v is None else self.value_of[v.name])
        yielded: list[str | None] = []
        if self.split:
            yielded, outputs = outputs[: self.num_yielded], outputs[self.num_yielded :]
        returned: list[str] = []
        on_host: list[bool] = []
        for name in outputs:
            info = self.graph.tensors.get(name) if name is not None else None
            storage = info.storage if info is not None else None
            if name is None or name in self.bound:  # a tensor on the device, or a scalar
                returned.append("None" if name is None else self.var(name))
                on_host.append(False)
            elif storage in self.on_host:
                over = self.host_named.get(storage) or f"ctx.host_bytes({storage!r})"
                returned.append(self.alias_line(name, over).split(" = ", 1)[1])
                on_host.append(True)
            elif storage in self.on_nvme:
                # Read back into host memory for the caller (after the step's last op).
                returned.append(self.alias_line(name, f"ctx.read_file({storage!r}, {self.graph.tensors[storage].nbytes})").split(" = ", 1)[1])
                on_host.append(True)
            else:
                raise EmitError(f"graph output {name} is on no tier at the end of the plan")

        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(_TEMPLATES)), trim_blocks=True, lstrip_blocks=True,
            keep_trailing_newline=True, undefined=jinja2.StrictUndefined,
        )
        source = env.get_template("program.py.j2").render(
            title=title, summary=plan.summary().splitlines(),
            inputs=[self.var(n) for n in inputs if n not in self.late],
            constants=constants, n_steps=len(plan.schedule), body=[code for code, _ in self.body],
            outputs=returned,
        )
        lines = source.splitlines()
        first = next(i for i, ln in enumerate(lines) if ln.strip().startswith("# ---- schedule:")) + 2
        line_steps = {first + i: label for i, (_, label) in enumerate(self.body)}
        constants_values = {}
        for name in constants:
            target = str(self.nodes[name].target)
            constants_values[name] = _getattr_path(self.gm, target)
        return Program(
            source=source, inputs=inputs, outputs=outputs, outputs_on_host=on_host,
            offdevice_inputs=list(self.offdevice_inputs), line_steps=line_steps,
            late_inputs=list(self.late), yielded=yielded, split_step=split_at,
            layout=self.layout(), constants=constants_values, targets=list(self.targets),
            arena=self.arena,
        )

    def gradient_reports(self) -> dict[str, Any]:
        """Tensor name -> report key of the graph outputs in ``gradients`` that an op computes (a
        gradient that is a graph input is not reported: its update runs in step())."""
        flat = _flat(self.gm.graph.output_node().args[0])
        reports: dict[str, Any] = {}
        for index, key in self.gradients.items():
            if not 0 <= index < len(flat):
                raise EmitError(f"gradient report of output {index}: the graph has {len(flat)} outputs")
            v = flat[index]
            if v is not None and v.op == "call_function" and v.name in self.value_of:
                reports.setdefault(self.value_of[v.name], key)
        return reports

    def check_symbolic_inputs(self) -> None:
        """A graph traced with dynamic shapes takes its sizes as inputs (SymInt placeholders),
        but the plan (tensor sizes, transfer bytes, host slots, the views rebuilt after a
        transfer) was made at one value of each: the program checks it runs at those values."""
        for node in self.gm.graph.nodes:
            if node.op != "placeholder" or node.name in self.late:
                continue
            val = node.meta.get("val")
            if not isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                continue
            planned = getattr(val.node, "hint", None)
            if planned is None:
                raise EmitError(
                    f"input {node.name} is a symbolic size ({val}) without a value to plan at; "
                    f"code generation needs graphs traced at concrete sizes"
                )
            self.line(f"ctx.check_planned({node.name!r}, {self.var(node.name)}, {planned!r})", "prologue")

    def op_step(self, index: int, s: Step, label: str, random_replay: bool) -> None:
        node = self.nodes.get(s.op or "")
        if node is None:
            raise EmitError(f"{label}: the fx graph has no node {s.op!r}")
        op = self.graph.op(node.name)
        # Outputs the recompute discards are bound to ``_`` and deleted right after the call: the
        # plan holds its own copy (or none), and counts the re-run's value as scratch of the step.
        slots = [None if n in s.discard else n for n in self.outputs_of[node.name]]
        if len(slots) == 1 and not isinstance(node.meta.get("val"), (tuple, list)):
            target = self.var(slots[0]) if slots[0] else "_"
        else:
            target = ", ".join(self.var(n) if n else "_" for n in slots) + ("," if len(slots) == 1 else "")
        call = self.call(node)
        note = op.module or ""
        if self.arena is not None:
            call, where = self.arena_call(index, node, slots, call)
            note = f"{note}; {where}" if note and where else (note or where)
        if s.kind == StepKind.RECOMPUTE:
            reasons = {self._reason(t) for t in op.outputs} - {""}
            self.line(f"# recompute {node.name}: {'; '.join(sorted(reasons)) or 'planned'}", label)
            if random_replay:
                # A random op must draw the same numbers again: replay the RNG state it started from.
                call = f"ctx.replay_rng(_rng_{node.name}, lambda: {call})"
        elif random_replay:
            self.line(f"_rng_{node.name} = ctx.rng_state()  # {node.name} is recomputed later", label)
        self.line(f"{target} = {call}" + (f"  # {note}" if note else ""), label)
        if None in slots:
            self.line("del _  # a discarded output: `_` would hold it until its next use", label)
        produced = [n for n in slots if n]
        self.bound.update(produced)
        for t in produced:
            if s.kind == StepKind.COMPUTE and t in self.reports:
                self.line(f"ctx.gradient_ready({self.reports.pop(t)!r}, {self.var(t)})  # final: its update may start",
                          label)
        for t in produced:
            if t in self.to_stash and t not in self.stashed:
                # Yielded to the caller at the split, whatever the plan does with it later.
                self.stashed[t] = f"_yield_{self.var(t)}"
                self.line(f"{self.stashed[t]} = {self.var(t)}", label)
        # Views of a storage this op re-creates that the program still reads are rebuilt over it.
        for t in produced:
            info = self.graph.tensors.get(t)
            if info is None or info.is_view:
                continue
            for view in sorted(self.dropped.pop(t, set()) - set(produced)):
                if self._read_after(view, index):
                    self.line(self.alias_line(view, self.var(t)), label)
                    self.bound.add(view)

    # -- the split (generator programs) --------------------------------------------------------

    @property
    def to_stash(self) -> set[str]:
        if not self.split:
            return set()
        if not hasattr(self, "_to_stash"):
            out_node = self.gm.graph.output_node()
            flat = _flat(out_node.args[0])[: self.num_yielded]
            self._to_stash = {self.value_of[v.name] for v in flat if v is not None}
        return self._to_stash

    def split_step(self) -> int:
        """The first schedule index that reads (or moves) a late input; every forward output must
        be produced before it."""
        late = {self.graph.tensors[n].storage for n in self.late if n in self.graph.tensors}
        at = len(self.plan.schedule)
        for i, s in enumerate(self.plan.schedule):
            reads = self.graph.op(s.op).inputs if s.op is not None else [s.tensor or ""]
            if any(self.graph.tensors[t].storage in late for t in reads if t in self.graph.tensors):
                at = i
                break
        for i, s in enumerate(self.plan.schedule[at:], start=at):
            if s.kind == StepKind.COMPUTE and set(self.graph.op(s.op or "").outputs) & self.to_stash:
                raise EmitError(
                    f"step {i} ({s.describe()}) makes a forward output after step {at}, which "
                    f"needs the backward's inputs; the plan cannot be split into a forward and a "
                    f"backward"
                )
        return at

    def yield_line(self, label: str) -> None:
        values = []
        out_node = self.gm.graph.output_node()
        for v in _flat(out_node.args[0])[: self.num_yielded]:
            if v is None:
                values.append("None")
                continue
            name = self.value_of[v.name]
            if name in self.stashed:
                values.append(self.stashed[name])
            elif name in self.bound:
                values.append(self.var(name))  # a graph input returned as is
            else:
                raise EmitError(f"forward output {name} is not on the device at the split ({label})")
        late = ", ".join(self.var(n) for n in self.late)
        self.line("# ---- forward ends: the outputs go to the caller, the backward's inputs come in ----", label)
        # handoff() yields detached aliases: the objects the caller gets (and autograd attaches
        # the backward to) are not the ones this paused frame holds, so dropping the outputs
        # without a backward frees the run.
        yielded = f"ctx.handoff({', '.join(values)})"
        self.line(f"[{late}] = yield {yielded}" if late else f"yield {yielded}", label)
        for name in list(self.stashed.values()):
            self.line(f"del {name}", label)
        self.bound.update(n for n in self.late if not any(c == f"del {self.var(n)}" for c, _ in self.deferred))
        self.body.extend((code, label) for code, _ in self.deferred)

    def start_step(self, index: int, s: Step, label: str) -> None:
        storage = self.graph.tensors[s.tensor or ""].storage
        nbytes = self.graph.tensors[storage].nbytes
        if DEVICE not in (s.src, s.dst):
            raise EmitError(
                f"{label}: {storage} moves {s.src} -> {s.dst}; generated programs copy only between "
                f"the device and another tier"
            )
        handle = f"_to_{s.dst}_{self.var(storage)}"
        decision = self.plan.decisions.get(storage)
        why = f"{decision.fate}: {decision.reason}" if decision else "no decision recorded"
        self.line(f"# {storage} ({format_bytes(nbytes)}) {s.src} -> {s.dst}; {why}", label)
        if s.src == DEVICE:
            source = next((n for n in self.aliases[storage] if n in self.bound), None)
            if source is None:
                raise EmitError(f"{label}: no name of {storage} is bound on the device")
            src_expr = self.var(source)
            placed = self.arena.live(storage, index) if self.arena is not None else None
            if placed is not None and placed.in_arena:
                src_expr = f"_arena[{placed.offset}:{placed.offset + nbytes}], raw=True"
        else:
            src_expr = self.host_named.get(storage, "None") if in_host_pool(s.src) else "None"
        into = ""
        placed = self.arena.at(index, storage) if self.arena is not None and s.dst == DEVICE else None
        if placed is not None and placed.in_arena:
            into = f", into=_arena[{placed.offset}:{placed.offset + nbytes}]"
        if src_expr.endswith(", raw=True"):
            src_expr, into = src_expr.removesuffix(", raw=True"), ", raw=True"
        self.line(f"{handle} = ctx.start({storage!r}, {src_expr}, {s.src!r}, {s.dst!r}, {nbytes}{into})", label)

    def wait_step(self, index: int, s: Step, label: str) -> None:
        storage = self.graph.tensors[s.tensor or ""].storage
        handle = f"_to_{s.dst}_{self.var(storage)}"
        if s.dst != DEVICE:
            (self.on_host if in_host_pool(s.dst) else self.on_nvme).add(storage)
            self.line(f"ctx.wait({handle})", label)
            return
        self.line(self.alias_line(storage, f"ctx.wait({handle})"), label)
        self.bound.add(storage)
        for view in sorted(self.dropped.pop(storage, set()) - {storage}):
            if self._read_after(view, index):
                self.line(self.alias_line(view, self.var(storage)), label)
                self.bound.add(view)
        self.line(f"del {handle}", label)

    def free_step(self, s: Step, label: str) -> None:
        storage = self.graph.tensors[s.tensor or ""].storage
        if in_host_pool(s.tier or DEVICE):
            self.on_host.discard(storage)
            self.line(f"# {storage} leaves {s.tier} (its host-pool slot is free for reuse)", label)
            return
        if s.tier == NVME:
            self.on_nvme.discard(storage)
            self.line(f"ctx.drop_file({storage!r})", label)
            return
        info = self.graph.tensors[storage]
        owned = info.kind in PERSISTENT_KINDS or storage in self.graph.inputs
        if owned and storage not in self.offdevice_inputs:
            raise EmitError(
                f"{label}: the plan frees caller-owned {info.kind.value} {storage} from the device; "
                f"code generation can free only what the program itself allocated"
            )
        names = sorted(n for n in self.aliases[storage] if n in self.bound)
        if not names:
            raise EmitError(f"{label}: nothing named {storage} is bound on the device")
        self.line(f"del {', '.join(self.var(n) for n in names)}", label)
        self.bound.difference_update(names)
        self.dropped[storage] = set(names)

    # -- the arena ------------------------------------------------------------------------------

    def plan_arena(self) -> ArenaLayout:
        # Gradients go in the arena: the run's arena is the caller's until it drops them. Other
        # graph outputs (the loss, logits) stay outside: a caller may keep them across runs, and
        # would keep a whole arena alive with them.
        out_node = self.gm.graph.output_node()
        outputs = [self.value_of.get(v.name) for v in _flat(out_node.args[0]) if v is not None]
        keep_out = {
            self.graph.tensors[t].storage for t in outputs
            if t in self.graph.tensors and self.graph.tensors[t].kind is not TensorKind.GRADIENT
        }
        return plan_arena(self.plan, keep_out=keep_out, op_placeable=self._op_placeable)

    def _op_placeable(self, op: str) -> str | None:
        """None when every output of ``op`` can be written into the arena by its out overload."""
        node = self.nodes.get(op)
        if node is None:
            return "not in the fx graph"
        found = out_variant(node.target)
        if isinstance(found, str):
            return found
        slots = self.outputs_of.get(op, [])
        if not slots or any(t is None for t in slots):
            return "an output is not a tensor"
        if len(slots) != len(found.outs):
            return "its outputs do not map to the out overload's"
        for t in slots:
            info = self.graph.tensors.get(t or "")
            if info is None:
                return f"output {t} is not a tensor the plan tracks"
            if info.is_view:
                return f"output {t} is a view"
            g = self.geometry.get(t or "")
            if g is None:
                return f"no recorded geometry for output {t}"
            extent = g.offset + sum((n - 1) * st for n, st in zip(g.shape, g.stride)) + 1
            if all(g.shape) and extent * g.dtype.itemsize > info.nbytes:
                return f"output {t} reaches past its storage"
        if len(node.args) > len(node.target._schema.arguments):
            return "more arguments than its schema"
        return None

    def arena_call(self, index: int, node: torch.fx.Node, slots: list[str | None], call: str) -> tuple[str, str]:
        """The call of ``node`` at schedule ``index`` writing into its arena slots, and a note;
        ``call`` (the functional call) and the reason when its outputs are outside the arena."""
        assert self.arena is not None
        placed = [self.arena.at(index, t) for t in slots if t is not None and t in self.graph.tensors
                  and not self.graph.tensors[t].is_view]
        placed = [p for p in placed if p is not None]
        if not placed:
            return call, ""  # allocates nothing on the device (views, or nothing the plan counts)
        if not any(p.in_arena for p in placed) or any(p.how not in ("out", "transfer") and
                                                      not p.how.startswith("a graph output") for p in placed):
            return call, f"outside the arena: {placed[0].how}"
        found = out_variant(node.target)
        assert not isinstance(found, str)
        values = dict(zip((a.name for a in node.target._schema.arguments), node.args))
        values.update(node.kwargs)
        parts: list[str] = []
        positional = True
        for name in found.args:
            if name not in values:
                positional = positional and name not in found.positional
                continue
            if name in found.positional and positional:
                parts.append(self.literal(values[name]))
            else:
                positional = False
                parts.append(f"{name}={self.literal(values[name])}")
        spans = []
        for out_name, t, p in zip(found.outs, slots, placed):
            g = self.geometry[t or ""]
            if not p.in_arena:  # a graph output: its own allocation, outside the arena
                parts.append(f"{out_name}=torch.empty_strided({g.shape}, {g.stride}, dtype={g.dtype}, "
                             f"device=DEVICE)")
                spans.append(f"{t} outside")
                continue
            assert p.offset is not None and p.offset % g.dtype.itemsize == 0
            parts.append(f"{out_name}=alias(_arena, {g.dtype}, {g.shape}, {g.stride}, "
                         f"{p.offset // g.dtype.itemsize + g.offset})")
            spans.append(f"[{p.offset}, {p.offset + p.nbytes})")
        overload = str(found.overload)
        fn = overload if overload.startswith("aten.") else f"torch.ops.{overload}"
        return f"{fn}({', '.join(parts)})", f"arena {' '.join(spans)}"

    def _read_after(self, tensor: str, index: int) -> bool:
        return any(i > index for i in self.reads.get(tensor, []))

    def _reason(self, tensor: str) -> str:
        d = self.plan.decisions.get(self.graph.tensors[tensor].storage)
        return d.reason if d else ""

    # -- other tiers ----------------------------------------------------------------------------

    def layout(self) -> Layout:
        """Static host-pool slots (packed by lifetime over the host-memory tiers: host, and any
        other off-device tier but nvme, see ``in_host_pool``) and the copy queues."""
        opened: dict[str, int] = {}
        spans: dict[str, tuple[int, int]] = {}
        n = len(self.plan.schedule)
        for i, s in enumerate(self.plan.schedule):
            if s.kind == StepKind.START_TRANSFER and in_host_pool(s.dst or DEVICE):
                opened.setdefault(self.graph.tensors[s.tensor or ""].storage, i)
            elif s.kind == StepKind.FREE and in_host_pool(s.tier or DEVICE):
                storage = self.graph.tensors[s.tensor or ""].storage
                if storage in opened:
                    start = opened.pop(storage)
                    lo, hi = spans.get(storage, (start, i + 1))
                    spans[storage] = (min(lo, start), max(hi, i + 1))
        for storage, start in opened.items():
            lo, _ = spans.get(storage, (start, n + 1))
            spans[storage] = (min(lo, start), n + 1)
        buffers = [
            Buffer(s, lo, hi, max(self.graph.tensors[s].nbytes, 1), _HOST_ALIGNMENT)
            for s, (lo, hi) in spans.items()
        ]
        slots: dict[str, tuple[int, int]] = {}
        pool = 0
        if buffers:
            packing = pack_greedy(buffers)
            slots = {str(b.id): (packing.offsets[b.id], self.graph.tensors[str(b.id)].nbytes) for b in buffers}
            pool = packing.arena_bytes
        queues = {f"{c.src}->{c.dst}": c.queue for c in self.plan.channels}
        arena = self.arena.arena_bytes if self.arena is not None else 0
        return Layout(host_slots=slots, host_pool_bytes=pool, queues=queues, arena_bytes=arena)


def load(program: Program, path: str | Path, device: torch.device | str) -> Callable[..., Any]:
    """Write ``program`` to ``path`` and return its ``step`` function.

    The code is compiled with ``path`` as its file name, so tracebacks and debuggers show the
    generated lines, and a failure can be mapped back to its plan step (``runtime.run_step``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(program.source)
    namespace: dict[str, Any] = {"__name__": f"tierplan_generated_{path.stem}", "__file__": str(path)}
    exec(compile(program.source, str(path), "exec"), namespace)  # noqa: S102 - our own output
    dev = torch.device(device)
    namespace["DEVICE"] = dev
    namespace["CONSTANTS"] = {k: v.to(dev) for k, v in program.constants.items()}
    namespace["TARGETS"] = list(program.targets)
    return namespace["step"]


def _flat(x: Any) -> list[Any]:
    if isinstance(x, (list, tuple)):
        return [v for item in x for v in _flat(item)]
    return [x]


def _is_scalar(val: Any) -> bool:
    """A value an fx node computes that is a number, not a tensor: under dynamic shapes the graph
    does size arithmetic (``add_36 = operator.add(1, s0)``, ``sym_size``) whose results later
    ops take as arguments, so the program must bind them like tensors (they hold no memory)."""
    return isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, bool, int, float))


def _is_random(node: torch.fx.Node) -> bool:
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def _getattr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


__all__ = ["EmitError", "Program", "emit", "load"]
