"""PyTorch's own answer at the same budget: ``activation_memory_budget``, priced by tierplan.

``torch._functorch.config.activation_memory_budget`` is a fraction, not bytes: 1.0 is the default
min-cut partition (which already recomputes cheap pointwise ops), 0.0 saves as little as it can;
between them a 0/1 knapsack (``dp`` by default) picks what to save. This module runs torch's
partitioner (``min_cut_rematerialization_partition``) on a captured joint graph at a fraction,
reads the tensors its forward saves for the backward, and turns that into a tierplan Plan:

- every op of the graph runs once, in capture order;
- a storage the forward saves is kept on the device until its last backward reader;
- any other forward-made storage a backward op reads is re-created right before its first
  backward reader by re-running its producer (and, recursively, the producers of unsaved inputs),
  which is what torch's backward graph does (``reordering_to_mimic_autograd_engine`` places the
  recomputed nodes right before their first use);
- frees follow the same "free after the last use" rule as every tierplan plan, and the figures
  come from the planner's simulator, so the plan passes ``tierplan.validate`` like any other.

A user asks for bytes; torch takes a fraction. ``torch_budget_plan`` searches the fraction
(a few partitions, each a second or more on a 2k-node graph) for the largest one whose plan fits
the byte budget, and also records what the naive fraction (the budget as a share of torch's
default peak, at 1.0) gives: its overshoot is what a user setting the knob by hand would see.
The peak is not monotone in the fraction: at 0.0 torch saves only the inputs and its backward
re-runs the whole forward before the first gradient, so the peak comes back to keep-all's.

CSE is switched off for the partition (``config.cse``) so that torch's node names stay the IR's.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from tierplan.ir import PERSISTENT_KINDS, Graph, Phase, TensorKind
from tierplan.placement.keep_all import keep_all_plan
from tierplan.plans.plan import DEVICE, Decision, Plan, PlanError, Pricing, Step, compute, recompute
from tierplan.placement.schedule import insert_frees
from tierplan.placement.simulate import simulate
from tierplan.units import format_bytes


@dataclass
class TorchPartition:
    fraction: float
    saved: frozenset[str]  # joint node names the forward saves for the backward
    recomputed: frozenset[str]  # call_function nodes in both torch's forward and backward
    seconds: float  # time of torch's partitioner


def num_fwd_outputs(joint: Any) -> int:
    """Forward outputs of an AOTAutograd joint graph: its outputs are the forward's, then one
    gradient slot per primal input."""
    nodes = list(joint.graph.nodes)
    out = next(n for n in nodes if n.op == "output")
    values = out.args[0]
    if isinstance(values, (tuple, list)) and len(values) == 2 and isinstance(values[0], (tuple, list)):
        values = list(values[0]) + list(values[1])  # (fw_outs, grads) nesting
    primals = [n for n in nodes if n.op == "placeholder" and not _is_tangent(n)]
    count = len(values) - len(primals)
    if count < 1:
        raise PlanError(f"the joint graph has {len(values)} outputs for {len(primals)} primal inputs: "
                        "not an AOTAutograd joint graph")
    return count


def _is_tangent(node: Any) -> bool:
    desc = node.meta.get("desc")
    if desc is not None:
        return type(desc).__name__ == "TangentAOTInput"
    return node.name.startswith("tangents")


def torch_partition(joint: Any, fraction: float, *, n_fwd_outputs: int | None = None) -> TorchPartition:
    """Run torch's min-cut partitioner on a copy of ``joint`` with
    ``activation_memory_budget=fraction``; return what its forward saves and what it re-runs."""
    import torch
    from torch._functorch import config as functorch_config
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    n_fwd = num_fwd_outputs(joint) if n_fwd_outputs is None else n_fwd_outputs
    module = copy.deepcopy(joint)  # the partitioner edits the graph it is given
    started = time.perf_counter()
    with functorch_config.patch(activation_memory_budget=float(fraction), cse=False):
        fw, bw = min_cut_rematerialization_partition(module, None, num_fwd_outputs=n_fwd)
    seconds = time.perf_counter() - started
    fw_out = next(n for n in fw.graph.nodes if n.op == "output").args[0]
    saved = frozenset(n.name for n in list(fw_out)[n_fwd:] if isinstance(n, torch.fx.Node))
    fw_ops = {n.name for n in fw.graph.nodes if n.op == "call_function"}
    bw_ops = {n.name for n in bw.graph.nodes if n.op == "call_function"}
    return TorchPartition(float(fraction), saved, frozenset(fw_ops & bw_ops), seconds)


def plan_from_saved(
    graph: Graph,
    saved: Sequence[str] | frozenset[str],
    pricing: Pricing,
    *,
    keep_all: Plan,
    method: str = "torch-budget",
) -> Plan:
    """The plan that keeps the storages of ``saved`` (tensor names; views save their base) and
    recomputes every other forward-made storage the backward reads, right before its first
    backward reader (see the module docstring). ``keep_all``: the graph's keep-all plan, the
    reference of its overhead."""
    tensors = graph.tensors
    never_free = frozenset(
        [s for s in graph.storages() if tensors[s].kind in PERSISTENT_KINDS or s in graph.inputs]
        + [tensors[name].storage for name in graph.outputs]
    )
    kept = {tensors[n].storage for n in saved if n in tensors}
    # An op that also writes a graph output (the loss's nll_loss_forward also makes total_weight)
    # cannot run twice in a plan (the output's copy must survive): its other outputs are kept.
    for op in graph.ops:
        outs = [o for o in op.outputs if not tensors[o].is_view]
        if any(o in never_free for o in outs):
            kept.update(outs)
    phase_of = {op.name: op.phase for op in graph.ops}
    fwd_made = {
        s for s in graph.storages()
        if tensors[s].producer is not None and phase_of[tensors[s].producer] == Phase.FORWARD
        and s not in never_free
    }
    present: set[str] = set()  # forward-made storages re-created in the backward so far
    rerun: list[str] = []
    steps: list[Step] = []

    def missing(storage: str) -> bool:
        return storage in fwd_made and storage not in kept and storage not in present

    def ensure(storage: str) -> None:
        # Iterative post-order walk: producers of unsaved inputs first.
        stack: list[tuple[str, bool]] = [(storage, False)]
        while stack:
            s, expanded = stack.pop()
            if not missing(s):
                continue
            op = graph.op(tensors[s].producer)  # type: ignore[arg-type]
            if expanded:
                steps.append(recompute(op.name))
                rerun.append(op.name)
                present.update(o for o in op.outputs if not tensors[o].is_view)
                continue
            stack.append((s, True))
            for name in reversed(op.inputs):
                inner = tensors[name].storage
                if missing(inner):
                    stack.append((inner, False))

    for op in graph.ops:
        if op.phase != Phase.FORWARD:
            for name in op.inputs:
                ensure(tensors[name].storage)
        steps.append(compute(op.name))
    schedule = insert_frees(graph, steps, never_free)
    initial = {tensors[name].storage: DEVICE for name in graph.inputs}
    figures = simulate(graph, schedule, pricing, initial_tiers=initial)
    decisions = _decisions(graph, kept, set(rerun), never_free, method)
    return Plan(
        graph=graph, schedule=schedule, capacities=dict(pricing.capacities), channels=list(pricing.channels),
        op_time_s=dict(pricing.op_time_s), initial_tiers=initial, hardware=pricing.hardware,
        training=pricing.training, peak_bytes=dict(figures.peak_bytes), predicted_time_s=figures.time_s,
        compute_time_s=figures.compute_time_s, recompute_time_s=figures.recompute_time_s,
        exposed_transfer_s=figures.exposed_transfer_s, keep_all_time_s=keep_all.predicted_time_s,
        keep_all_peak_bytes=keep_all.keep_all_peak_bytes, method=method, decisions=decisions,
    )


def _decisions(graph: Graph, kept: set[str], rerun: set[str], never_free: frozenset[str],
               method: str) -> dict[str, Decision]:
    out: dict[str, Decision] = {}
    for storage in graph.storages():
        t = graph.tensors[storage]
        if storage in never_free and (t.kind in PERSISTENT_KINDS or storage in graph.inputs):
            out[storage] = Decision("persistent", DEVICE, f"a {t.kind.value} owned by the caller, "
                                    "resident on the device for the whole step")
        elif t.producer in rerun:
            out[storage] = Decision("recompute", DEVICE, f"not saved by torch's partitioner ({method}): "
                                    f"its backward re-runs {t.producer} before the first backward reader")
        elif storage in kept and t.kind == TensorKind.ACTIVATION:
            out[storage] = Decision("keep", DEVICE, f"saved for the backward by torch's partitioner "
                                    f"({method}), {format_bytes(t.nbytes)} on the device until its last reader")
        else:
            out[storage] = Decision("keep", DEVICE, f"a {t.kind.value}: lives on the device from its "
                                    "producer to its last reader")
    return out


@dataclass
class TorchBudgetResult:
    """The fastest torch plan found that fits the byte budget (``plan``; None when even the
    smallest fraction tried is over), every probe, and the naive fraction's overshoot."""

    plan: Plan | None
    fraction: float | None
    budget_bytes: int
    probes: list[tuple[float, int, float]] = field(default_factory=list)  # (fraction, peak, time_s)
    naive_fraction: float | None = None
    naive_peak_bytes: int | None = None
    min_plan: Plan | None = None  # the smallest-peak plan probed (for reporting "over")
    partition_s: float = 0.0

    @property
    def naive_overshoot(self) -> float | None:
        """Naive fraction's device peak over the budget (1.04 = 4% over), None if not probed."""
        if self.naive_peak_bytes is None:
            return None
        return self.naive_peak_bytes / self.budget_bytes


class TorchBudgetBaseline:
    """torch's activation_memory_budget on one captured joint graph, priced by tierplan.

    Partitions are cached by fraction, so several byte budgets of one model share the probes.
    """

    def __init__(self, graph: Graph, joint: Any, pricing: Pricing, *, keep_all: Plan | None = None) -> None:
        """``pricing``'s budget is not used: ``plan`` and ``fit`` take the budget of each call."""
        self.graph, self.joint, self.pricing = graph, joint, pricing
        self.keep_all = keep_all if keep_all is not None else keep_all_plan(graph, pricing)
        self.n_fwd = num_fwd_outputs(joint)
        self._saved: dict[float, TorchPartition] = {}
        self._plans: dict[tuple[float, int], Plan] = {}

    def partition(self, fraction: float) -> TorchPartition:
        f = round(float(fraction), 6)
        if f not in self._saved:
            self._saved[f] = torch_partition(self.joint, f, n_fwd_outputs=self.n_fwd)
        return self._saved[f]

    def plan(self, fraction: float, budget: int) -> Plan:
        f = round(float(fraction), 6)
        if (f, budget) not in self._plans:
            part = self.partition(f)
            self._plans[f, budget] = plan_from_saved(
                self.graph, part.saved, self.pricing.with_budget(budget), keep_all=self.keep_all,
                method=f"torch activation_memory_budget={f:g} (min-cut + knapsack), priced by tierplan",
            )
        return self._plans[f, budget]

    def fit(self, budget: int, *, probes: int = 6) -> TorchBudgetResult:
        """The fastest plan among at most ``probes`` fractions that fits ``budget``: 1.0 (torch's
        default), the naive fraction, then bisection above the largest fraction that fits."""
        started = sum(p.seconds for p in self._saved.values())
        result = TorchBudgetResult(plan=None, fraction=None, budget_bytes=budget)

        def probe(f: float) -> Plan:
            plan = self.plan(f, budget)
            result.probes.append((round(f, 6), plan.peak_bytes[DEVICE], plan.predicted_time_s))
            if plan.peak_bytes[DEVICE] <= budget and (
                    result.plan is None or plan.predicted_time_s < result.plan.predicted_time_s):
                result.plan, result.fraction = plan, round(f, 6)
            if result.min_plan is None or plan.peak_bytes[DEVICE] < result.min_plan.peak_bytes[DEVICE]:
                result.min_plan = plan
            return plan

        peaks: dict[float, int] = {}
        high = probe(1.0)
        peaks[1.0] = high.peak_bytes[DEVICE]
        if peaks[1.0] > budget:
            # What a user would set: the budget as a share of torch's default (1.0) peak.
            naive = round(min(max(budget / peaks[1.0], 0.0), 1.0), 3)
            plan = probe(naive)
            peaks[naive] = plan.peak_bytes[DEVICE]
            result.naive_fraction, result.naive_peak_bytes = naive, plan.peak_bytes[DEVICE]
        while len(peaks) < probes and peaks[1.0] > budget:
            fitting = [f for f, peak in peaks.items() if peak <= budget]
            if fitting:
                # The peak is not monotone in the fraction (0.0 re-runs the whole forward at the
                # start of the backward): refine above the largest fraction that fits.
                lo = max(fitting)
                hi = min(f for f in peaks if f > lo)
                if hi - lo < 0.01:
                    break
                f = round((lo + hi) / 2, 4)
            else:
                # Nothing fits yet: split the widest unexplored gap of [0, 1] (0.0 last).
                known = sorted(set(peaks) | {0.0})
                gaps = [(b - a, a, b) for a, b in zip(known, known[1:])]
                width, a, b = max(gaps)
                f = round((a + b) / 2, 4) if width > 0.02 else 0.0
                if f in peaks:
                    break
            peaks[f] = probe(f).peak_bytes[DEVICE]
        result.partition_s = sum(p.seconds for p in self._saved.values()) - started
        return result


def torch_budget_plan(graph: Graph, joint: Any, pricing: Pricing, *, probes: int = 6) -> TorchBudgetResult:
    """torch's activation_memory_budget at the fraction that fits ``pricing.budget``."""
    return TorchBudgetBaseline(graph, joint, pricing).fit(pricing.budget, probes=probes)
