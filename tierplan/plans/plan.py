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
from typing import TYPE_CHECKING, Any, Mapping

from tierplan.ir import Graph, TensorKind
from tierplan.units import format_bytes

if TYPE_CHECKING:
    from tierplan.plans.update import UpdatePlan

DEVICE = "device"
HOST = "host"
NVME = "nvme"
# The queue of a channel whose copies run on the compute stream itself (a memcpy on the CPU
# device's own thread): nothing overlaps them, so each one stalls the compute by its whole time.
COMPUTE_QUEUE = "compute"

FORMAT_VERSION = 1


class PlanError(ValueError):
    """A plan cannot be made, read or replayed; the message names the step, tensor or setting."""


class InternalError(RuntimeError):
    """A figure tierplan proved contradicts one it measured: a bug in tierplan, not in its input.

    Not a PlanError on purpose: the command line prints PlanErrors as the user's mistakes."""


# A plan and its proven lower bound are equal when they differ by at most BOUND_REL_TOL of the
# plan's step time plus BOUND_ABS_TOL_S: a plan that close is OPTIMAL, and a bound further above
# the plan is an InternalError. The relative part covers the round-off of summing the same op
# times in another order (~1e-15) and the 1e-6 of the overhead placement/bound.py shaves off
# SCIP's answer for its tolerances; the absolute part covers the 1e-9 s it also shaves (that is
# 1e-6 of a 1 ms step) and stays far below an op's launch time (~5 us).
BOUND_REL_TOL = 1e-6
BOUND_ABS_TOL_S = 1e-8

# The bound kind of plans saved before SolverReport recorded one (docs/cost-model.md, "Bound kinds").
BOUND_KIND_UNRECORDED = "unrecorded"


def _bound_slack_s(objective_s: float) -> float:
    return BOUND_REL_TOL * abs(objective_s) + BOUND_ABS_TOL_S


def meets_bound(objective_s: float, bound_s: float) -> bool:
    """Whether a step time of ``objective_s`` is at its lower bound ``bound_s`` (see BOUND_REL_TOL)."""
    return objective_s - bound_s <= _bound_slack_s(objective_s)


def bound_above(objective_s: float, bound_s: float) -> bool:
    """Whether the lower bound ``bound_s`` exceeds the step time ``objective_s`` by more than the
    tolerance (BOUND_REL_TOL): no real plan beats a proven bound, so that is a bug."""
    return bound_s - objective_s > _bound_slack_s(objective_s)


class InfeasibleBudget(PlanError):
    """No plan fits the memory budget; carries the smallest budget known to work (a search at it
    finds a plan again) and, when lower, the peak of the lowest plan found over the budget (a
    search at that peak may take another path and miss it)."""

    def __init__(self, message: str, *, budget_bytes: int, min_feasible_bytes: int | None,
                 closest_bytes: int | None = None) -> None:
        super().__init__(message)
        self.budget_bytes = budget_bytes
        self.min_feasible_bytes = min_feasible_bytes
        self.closest_bytes = closest_bytes


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
    A channel on ``COMPUTE_QUEUE`` copies on the compute stream: the copy starts at the compute
    clock and the clock advances by its whole time (exposed time, however early it is waited for).
    """

    src: str
    dst: str
    bandwidth: float  # bytes per second
    latency_s: float
    queue: str

    def seconds(self, nbytes: int) -> float:
        """The time of one transfer of ``nbytes`` on this channel."""
        return self.latency_s + nbytes / self.bandwidth

    @property
    def inline(self) -> bool:
        """Whether its copies run on the compute stream (nothing hides them)."""
        return self.queue == COMPUTE_QUEUE


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

    def channel(self, src: str, dst: str) -> Channel | None:
        """The copy channel from ``src`` to ``dst``, None when the setting has none."""
        return next((c for c in self.channels if (c.src, c.dst) == (src, dst)), None)

    def with_budget(self, budget: int) -> Pricing:
        """The same setting with another device budget."""
        return dataclasses.replace(self, capacities={**self.capacities, DEVICE: int(budget)})


@dataclass(frozen=True)
class SolverReport:
    """How a solver's plan was found and how far from the best it can be.

    ``bound_s`` is a proven lower bound on the step time of every plan of the planner's space
    (docs/architecture.md, "Bounds and gaps"); ``bound_kind`` is a short code for how it was
    proven (docs/cost-model.md, "Bound kinds", explains each; the plan holds the code only).
    Two gaps, neither clipped: ``gap`` = (plan - bound) / plan, a share of the step time, and
    ``overhead_gap`` = (plan - bound) / (plan - keep-all), the share of the plan's overhead over
    keep-all that is not proven unavoidable (None when the plan has no overhead but misses the
    bound). ``status`` is OPTIMAL only when the plan meets the bound (``meets_bound``). The
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
    overhead_gap: float | None = None
    bound_kind: str | None = None  # a code of docs/cost-model.md's "Bound kinds" table

    @classmethod
    def of(cls, status: str, objective_s: float, bound_s: float, solve_s: float, *,
           keep_all_s: float | None = None, **more: Any) -> SolverReport:
        """A report with both gaps between ``objective_s`` and ``bound_s`` computed (the
        overhead gap only when ``keep_all_s``, the keep-all step time, is given)."""
        overhead_gap = None if keep_all_s is None else _overhead_gap(objective_s, bound_s, keep_all_s)
        return cls(status=status, objective_s=objective_s, bound_s=bound_s, gap=_step_gap(objective_s, bound_s),
                   solve_s=solve_s, overhead_gap=overhead_gap, **more)

    def items(self) -> list[tuple[str, Any]]:
        """(field, value) for every field set, in declaration order (reports print these)."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.items())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, keep_all_s: float | None = None) -> SolverReport | None:
        """None for an empty dict; fields this version does not know are dropped. A report saved
        before bound kinds and overhead gaps were recorded gets BOUND_KIND_UNRECORDED and, given
        the plan's ``keep_all_s``, its overhead gap computed from its figures."""
        if not data:
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        report = cls(**{k: v for k, v in data.items() if k in known})
        if report.bound_s is None:
            return report
        if report.bound_kind is None:
            report = dataclasses.replace(report, bound_kind=BOUND_KIND_UNRECORDED)
        if report.overhead_gap is None and keep_all_s is not None and report.objective_s is not None:
            report = dataclasses.replace(
                report, overhead_gap=_overhead_gap(report.objective_s, report.bound_s, keep_all_s))
        return report


def _step_gap(objective_s: float, bound_s: float) -> float:
    """(plan - bound) / plan, unclipped; 0 for a plan that takes no time."""
    return 0.0 if objective_s == 0 else (objective_s - bound_s) / objective_s


def _overhead_gap(objective_s: float, bound_s: float, keep_all_s: float) -> float | None:
    """(plan - bound) / (plan - keep-all), unclipped. A plan at keep-all's time (up to round-off,
    where the quotient would be noise over noise) has no overhead: 0 when it meets its bound,
    else None (undefined: a bound below keep-all's time, which a proven bound never is)."""
    overhead = objective_s - keep_all_s
    if abs(overhead) <= _bound_slack_s(objective_s):
        return 0.0 if meets_bound(objective_s, bound_s) else None
    return (objective_s - bound_s) / overhead


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
    # The optimizer step planned after the schedule (a training plan made with an optimizer).
    update: UpdatePlan | None = None

    @property
    def step_time_s(self) -> float:
        """The whole step's predicted time: forward and backward, and the update when planned."""
        return self.update.step_time_s if self.update is not None else self.predicted_time_s

    @property
    def step_peak_bytes(self) -> dict[str, int]:
        """Peak bytes per tier over the whole step (with the model states when planned)."""
        return dict(self.update.peak_bytes) if self.update is not None else dict(self.peak_bytes)

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
        if self.update is not None:
            u = self.update
            counts = u.placement_counts()
            where = ", ".join(f"{n} on {tier}" for tier, n in counts.items() if n)
            lines.append(
                f"  optimizer {u.optimizer} ({u.precision}): states of {len(u.params)} parameters: {where}; "
                f"model state {format_bytes(u.model_state_bytes())} over all tiers")
            lines.append(
                "  whole step " + ", ".join(f"peak {tier} {format_bytes(b)}" for tier, b in u.peak_bytes.items())
                + f"; step time {u.step_time_s * 1e3:.3f} ms (update exposed {u.update_exposed_s * 1e3:.3f} ms)")
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
            "update": self.update.to_dict() if self.update is not None else None,
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
                solver=SolverReport.from_dict(data["solver"], keep_all_s=data["keep_all_time_s"]),
                decisions={k: Decision(**d) for k, d in data["decisions"].items()},
                update=_read_update(data.get("update")),
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



def _read_update(data: Mapping[str, Any] | None) -> UpdatePlan | None:
    from tierplan.plans.update import UpdatePlan  # update.py builds on this module's tiers

    return UpdatePlan.from_dict(data) if data else None


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
