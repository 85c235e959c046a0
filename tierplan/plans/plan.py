"""The Plan: what runs where and when, as data.

A Plan is an ordered schedule of steps over a captured Graph: compute an op, recompute an op,
start a transfer of a tensor's storage between two tiers, wait for that transfer, free a storage
from a tier. It carries everything needed to replay it without the model or the solver (the graph,
the tiers' capacities, the transfer channels, the time of every op) and the planner's predictions
(peak bytes per tier, step time and its parts), so that ``tierplan.validate`` can check it
independently and a saved plan can be reopened and explained.
"""
from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from tierplan.ir import Graph, TensorKind
from tierplan.units import format_bytes

DEVICE = "device"
HOST = "host"
NVME = "nvme"

FORMAT_VERSION = 1


class PlanError(ValueError):
    """A plan cannot be made, read or replayed; the message names the step, tensor or setting."""


class InfeasibleBudget(PlanError):
    """No plan fits the memory budget; carries the smallest budget known to work."""

    def __init__(self, message: str, *, budget_bytes: int, min_feasible_bytes: int | None) -> None:
        super().__init__(message)
        self.budget_bytes = budget_bytes
        self.min_feasible_bytes = min_feasible_bytes


class StepKind(str, enum.Enum):
    COMPUTE = "compute"
    RECOMPUTE = "recompute"
    START_TRANSFER = "start_transfer"
    WAIT_TRANSFER = "wait_transfer"
    FREE = "free"


@dataclass(frozen=True)
class Step:
    """One entry of the schedule.

    compute / recompute: ``op``. start_transfer: ``tensor``, ``src``, ``dst``.
    wait_transfer: ``tensor``, ``dst`` (the compute stream waits until the copy has landed).
    free: ``tensor``, ``tier`` (its storage leaves that tier).

    A recompute may ``discard`` outputs the plan does not need from it: the re-run writes them to
    scratch memory released when the step ends, and a copy of the storage already on the device
    (the dropout mask a kept unit holds while the dropout is re-run for its other output) stays
    as it is. That is what lets a plan re-run an op one of whose outputs it keeps.
    """

    kind: StepKind
    op: str | None = None
    tensor: str | None = None
    src: str | None = None
    dst: str | None = None
    tier: str | None = None
    discard: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind in (StepKind.COMPUTE, StepKind.RECOMPUTE):
            extra = f" (discards {', '.join(self.discard)})" if self.discard else ""
            return f"{self.kind.value} {self.op}{extra}"
        if self.kind == StepKind.START_TRANSFER:
            return f"start_transfer {self.tensor} {self.src}->{self.dst}"
        if self.kind == StepKind.WAIT_TRANSFER:
            return f"wait_transfer {self.tensor} ->{self.dst}"
        return f"free {self.tensor} from {self.tier}"

    def to_list(self) -> list[Any]:
        """Compact JSON form: [kind, field, ...] with only the fields the kind uses."""
        if self.kind in (StepKind.COMPUTE, StepKind.RECOMPUTE):
            return [self.kind.value, self.op] + ([list(self.discard)] if self.discard else [])
        if self.kind == StepKind.START_TRANSFER:
            return [self.kind.value, self.tensor, self.src, self.dst]
        if self.kind == StepKind.WAIT_TRANSFER:
            return [self.kind.value, self.tensor, self.dst]
        return [self.kind.value, self.tensor, self.tier]

    @classmethod
    def from_list(cls, item: list[Any]) -> Step:
        kind = StepKind(item[0])
        if kind in (StepKind.COMPUTE, StepKind.RECOMPUTE):
            return cls(kind, op=item[1], discard=tuple(item[2]) if len(item) > 2 else ())
        if kind == StepKind.START_TRANSFER:
            return cls(kind, tensor=item[1], src=item[2], dst=item[3])
        if kind == StepKind.WAIT_TRANSFER:
            return cls(kind, tensor=item[1], dst=item[2])
        return cls(kind, tensor=item[1], tier=item[2])


def compute(op: str) -> Step:
    return Step(StepKind.COMPUTE, op=op)


def recompute(op: str, discard: tuple[str, ...] = ()) -> Step:
    return Step(StepKind.RECOMPUTE, op=op, discard=tuple(discard))


def start_transfer(tensor: str, src: str, dst: str) -> Step:
    return Step(StepKind.START_TRANSFER, tensor=tensor, src=src, dst=dst)


def wait_transfer(tensor: str, dst: str) -> Step:
    return Step(StepKind.WAIT_TRANSFER, tensor=tensor, dst=dst)


def free(tensor: str, tier: str) -> Step:
    return Step(StepKind.FREE, tensor=tensor, tier=tier)


@dataclass(frozen=True)
class Channel:
    """A one-direction copy queue between two tiers: transfers on it run one after another.

    Time of one transfer: latency_s + nbytes / bandwidth (the α-β model of docs/cost-model.md).
    Channels with the same ``queue`` share it (a half-duplex link has one queue both ways).
    """

    src: str
    dst: str
    bandwidth: float  # bytes per second
    latency_s: float
    queue: str

    def seconds(self, nbytes: int) -> float:
        """The time of one transfer of ``nbytes`` on this channel."""
        return self.latency_s + nbytes / self.bandwidth


@dataclass(frozen=True)
class Pricing:
    """The setting a plan is priced in: what each tier may hold, the copy channels, each op's
    time, the machine's name and the mode. Every plan of one setting (the solver's, keep-all,
    the baselines, torch's) is priced with the same value, so their figures compare.

    ``capacities[DEVICE]`` is the device budget; the other entries are the slower tiers the
    plan may use.
    """

    capacities: Mapping[str, int]
    channels: tuple[Channel, ...]
    op_time_s: Mapping[str, float]
    hardware: str
    training: bool

    def __post_init__(self) -> None:
        # Owned copies: a Pricing is a value that no caller's later edits change.
        object.__setattr__(self, "capacities", {k: int(v) for k, v in self.capacities.items()})
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "op_time_s", dict(self.op_time_s))

    @property
    def budget(self) -> int:
        return self.capacities[DEVICE]

    def with_budget(self, budget: int) -> Pricing:
        """The same setting with another device budget."""
        return dataclasses.replace(self, capacities={**self.capacities, DEVICE: int(budget)})


@dataclass(frozen=True)
class SolverReport:
    """How a solver's plan was found and how far from the best it can be.

    ``bound_s`` is a proven lower bound on the step time of every plan of the planner's space
    (docs/architecture.md, "Bounds and gaps"); ``gap`` is the plan's distance to it, as a share
    of the plan's step time. ``status`` is OPTIMAL only when the plan meets that bound. The
    ``model_*`` fields are CP-SAT's own on its per-unit model (which covers fewer plans).
    """

    status: str
    objective_s: float | None = None  # the plan's (or the model's) step time
    bound_s: float | None = None
    gap: float | None = None
    solve_s: float | None = None
    model_status: str | None = None
    bound_step: str | None = None  # the op where the proven bound was found
    model_objective_s: float | None = None
    model_bound_s: float | None = None

    @classmethod
    def of(cls, status: str, objective_s: float, bound_s: float, solve_s: float, **more: Any) -> SolverReport:
        """A report with the gap between ``objective_s`` and ``bound_s`` computed."""
        gap = 0.0 if objective_s <= 0 else max(0.0, (objective_s - bound_s) / objective_s)
        return cls(status, objective_s, bound_s, gap, solve_s, **more)

    def items(self) -> list[tuple[str, Any]]:
        """(field, value) for every field set, in declaration order (reports print these)."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.items())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SolverReport | None:
        """None for an empty dict; fields this version does not know are dropped."""
        if not data:
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Decision:
    """What the planner decided for one tensor, and why (read by ``Plan.explain``)."""

    fate: str  # "keep", "recompute", "swap", "persistent"
    tier: str
    reason: str


@dataclass
class Plan:
    graph: Graph
    schedule: list[Step]
    capacities: dict[str, int]  # tier -> bytes available to the plan (device: the budget)
    channels: list[Channel]
    op_time_s: dict[str, float]  # predicted time of one run of each op
    initial_tiers: dict[str, str]  # storage -> tier, for storages that exist before step 0
    hardware: str
    training: bool
    # Predictions of the planner; tierplan.validate recomputes them independently.
    peak_bytes: dict[str, int] = field(default_factory=dict)
    predicted_time_s: float = 0.0
    compute_time_s: float = 0.0
    recompute_time_s: float = 0.0
    exposed_transfer_s: float = 0.0
    keep_all_time_s: float = 0.0
    keep_all_peak_bytes: int = 0
    method: str = ""
    solver: SolverReport | None = None  # None for plans no solver made (keep-all, baselines)
    decisions: dict[str, Decision] = field(default_factory=dict)

    @property
    def budget_bytes(self) -> int:
        return self.capacities[DEVICE]

    @property
    def pricing(self) -> Pricing:
        """The setting this plan was priced in (to price other plans the same way)."""
        return Pricing(capacities=dict(self.capacities), channels=tuple(self.channels),
                       op_time_s=dict(self.op_time_s), hardware=self.hardware, training=self.training)

    @property
    def overhead_s(self) -> float:
        """Predicted step time above the keep-all plan's (recompute + exposed transfers)."""
        return self.predicted_time_s - self.keep_all_time_s

    def channel(self, src: str, dst: str) -> Channel:
        for ch in self.channels:
            if ch.src == src and ch.dst == dst:
                return ch
        known = ", ".join(f"{c.src}->{c.dst}" for c in self.channels) or "none"
        raise PlanError(f"the plan has no transfer channel {src}->{dst} (it has: {known})")

    # -- reading -----------------------------------------------------------------------------

    def explain(self, tensor_name: str) -> str:
        """Why ``tensor_name`` was kept, recomputed, swapped, or left where its owner put it."""
        t = self.graph.tensor(tensor_name)
        decision = self.decisions.get(t.storage)
        size = format_bytes(self.graph.storage_bytes(t.name))
        head = f"{t.name}: {t.kind.value} {t.dtype}{list(t.shape)}, {size}"
        if t.is_view:
            head += f" (a view of {t.storage})"
        if decision is None:
            return f"{head}\n  no decision recorded: the plan does not place this storage"
        return f"{head}\n  {decision.fate} on {decision.tier}: {decision.reason}"

    def summary(self) -> str:
        lines = [
            f"plan for {self.graph.name} ({'training' if self.training else 'inference'}) "
            f"on {self.hardware}, method {self.method}",
            f"  ops {len(self.graph.ops)}, steps {len(self.schedule)}, "
            f"device budget {format_bytes(self.budget_bytes)}",
        ]
        for tier, peak in self.peak_bytes.items():
            cap = self.capacities.get(tier)
            of = f" of {format_bytes(cap)}" if cap is not None else ""
            lines.append(f"  peak {tier}: {format_bytes(peak)}{of}")
        lines.append(
            f"  predicted step time {self.predicted_time_s * 1e3:.3f} ms "
            f"(compute {self.compute_time_s * 1e3:.3f}, recompute {self.recompute_time_s * 1e3:.3f}, "
            f"exposed transfers {self.exposed_transfer_s * 1e3:.3f}); "
            f"overhead over keep-all {self.overhead_s * 1e3:.3f} ms"
        )
        if self.solver is not None:
            lines.append("  solver " + ", ".join(f"{k} {_fmt_value(v)}" for k, v in self.solver.items()))
        params = self.graph.total_bytes(TensorKind.PARAMETER)
        lines.append(f"  parameters {format_bytes(params)}, keep-all peak {format_bytes(self.keep_all_peak_bytes)}")
        return "\n".join(lines)

    # -- JSON round trip --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "tierplan.plan",
            "version": FORMAT_VERSION,
            "graph": self.graph.to_dict(),
            "schedule": [s.to_list() for s in self.schedule],
            "capacities": self.capacities,
            "channels": [asdict(c) for c in self.channels],
            "op_time_s": self.op_time_s,
            "initial_tiers": self.initial_tiers,
            "hardware": self.hardware,
            "training": self.training,
            "peak_bytes": self.peak_bytes,
            "predicted_time_s": self.predicted_time_s,
            "compute_time_s": self.compute_time_s,
            "recompute_time_s": self.recompute_time_s,
            "exposed_transfer_s": self.exposed_transfer_s,
            "keep_all_time_s": self.keep_all_time_s,
            "keep_all_peak_bytes": self.keep_all_peak_bytes,
            "method": self.method,
            "solver": self.solver.to_dict() if self.solver is not None else {},
            "decisions": {k: asdict(d) for k, d in self.decisions.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if data.get("format") != "tierplan.plan":
            raise PlanError("not a tierplan plan: the JSON has no \"format\": \"tierplan.plan\" field")
        if data.get("version") != FORMAT_VERSION:
            raise PlanError(
                f"plan format version {data.get('version')} is not supported "
                f"(this tierplan reads version {FORMAT_VERSION}); re-plan with this version"
            )
        try:
            return cls(
                graph=Graph.from_dict(data["graph"]),
                schedule=[Step.from_list(s) for s in data["schedule"]],
                capacities={k: int(v) for k, v in data["capacities"].items()},
                channels=[Channel(**c) for c in data["channels"]],
                op_time_s={k: float(v) for k, v in data["op_time_s"].items()},
                initial_tiers=dict(data["initial_tiers"]),
                hardware=data["hardware"],
                training=bool(data["training"]),
                peak_bytes={k: int(v) for k, v in data["peak_bytes"].items()},
                predicted_time_s=data["predicted_time_s"],
                compute_time_s=data["compute_time_s"],
                recompute_time_s=data["recompute_time_s"],
                exposed_transfer_s=data["exposed_transfer_s"],
                keep_all_time_s=data["keep_all_time_s"],
                keep_all_peak_bytes=data["keep_all_peak_bytes"],
                method=data["method"],
                solver=SolverReport.from_dict(data["solver"]),
                decisions={k: Decision(**d) for k, d in data["decisions"].items()},
            )
        except (KeyError, IndexError, AttributeError, TypeError, ValueError) as exc:
            raise PlanError(f"malformed plan JSON: {type(exc).__name__}: {exc}") from None

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), separators=(",", ":")))

    @classmethod
    def from_json(cls, path: str | Path) -> Plan:
        data = read_json(path, "plan file")
        if not isinstance(data, dict):
            raise PlanError(f"plan file {path} holds a JSON {type(data).__name__}, not a plan object")
        return cls.from_dict(data)



def read_json(path: str | Path, what: str) -> Any:
    """The JSON in ``path``; PlanError names ``what`` and the path when it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise PlanError(f"cannot read {what} {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise PlanError(f"{what} {path} is not JSON: {exc}") from None


def _fmt_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
