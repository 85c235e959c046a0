"""The public entry points: ``tierplan.plan`` for a model, ``plan_graph`` for a captured graph,
``baselines`` for the policies a plan is measured against."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from tierplan.cost_models.hardware import Hardware, load_hardware
from tierplan.ir import Graph, TensorKind
from tierplan.passes.blocks import detect_blocks
from tierplan.passes.capture import capture
from tierplan.passes.liveness import liveness
from tierplan.placement.optimizer_step import plan_step, step_baselines
from tierplan.placement.pricing import machine_pricing
from tierplan.placement.reorder import plan_in_orders
from tierplan.placement.reuse import plan_by_decisions
from tierplan.placement.solve import solve
from tierplan.placement.update import update_rates
from tierplan.plans.generation import GenerationPlan
from tierplan.plans.plan import InfeasibleBudget, Plan, PlanError
from tierplan.plans.update import check_choice
from tierplan.plans.validate import validate
from tierplan.units import format_bytes, parse_bytes

Budget = int | float | str | None

# The dtype the model computes in under each precision ("fp32" keeps the model's own).
COMPUTE_DTYPE = {"bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16,
                 "fp32": torch.float32}


def plan(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    *,
    example_kwargs: dict[str, Any] | None = None,
    hardware: str | Path | Hardware = "h100-sxm",
    memory_budget: Budget = None,
    training: bool = True,
    tiers: Sequence[str] = ("host",),
    time_limit: float | None = None,
    optimizer: str | None = "adamw",
    precision: str | None = None,
    generate: int | None = None,
    reorder: bool = False,
    update_in_backward: bool = False,
) -> Plan | GenerationPlan:
    """Capture ``model`` on ``example_inputs`` and plan it on ``hardware`` within ``memory_budget``.

    ``memory_budget``: bytes (int), a string with a unit ("6GiB", "500MB"), a float in (0, 1]
    meaning that fraction of the keep-all plan's device peak, or None for the whole device memory.
    With ``training=True`` the loss is the model's output, or the ``loss`` field of it. The model
    is captured with ``hardware``'s kernels (a GPU's fused attention; see ``capture``'s ``target``).

    A training plan includes the optimizer step: ``optimizer`` is "adamw" (default), "adam",
    "sgd", or "none"/None for forward and backward only; ``precision`` is "fp32", "bf16",
    "bf16-mixed" (bf16 compute and gradients, fp32 master weights and states) or "fp16-mixed",
    by default the one the model's parameters imply (bf16 weights: "bf16-mixed"). "bf16-mixed" of
    an fp32 model is captured under ``torch.autocast(bfloat16)`` (torch AMP: the fp32 weights are
    the masters); any other precision whose compute dtype differs from the model's is captured on
    a cast copy of the model (bf16 or fp16 weights with fp32 masters beside them, as ZeRO).

    With ``generate=N`` (and ``training=False``) the plan is a GenerationPlan for greedy
    generation of N tokens after the example's token ids (batch x prompt length): where every
    weight and every block of the KV cache lives over the prefill and the N - 1 decode steps, how
    the batch is split into micro-batches, and where attention runs (``tierplan.generate``). The
    model is read, not captured; a float budget is a fraction of the all-on-device peak.

    With ``reorder=True`` the op order is chosen too: the capture order and up to three orders
    with a lower keep-all peak (within data dependencies, the phases and the order of random draws
    and in-place writes) are each planned in a share of the time limit, and the fastest plan is
    kept (``placement.reorder``); its graph runs the ops in that order.

    ``update_in_backward=True`` plans host updates that start as the backward makes their
    gradients (ZeRO-Offload's overlap), as ``tierplan.compile(..., update_in_backward=True)`` runs
    them; by default the update starts when the backward ends, as a plain ``optimizer.step()``.
    """
    if generate is not None:
        from tierplan.generate import generation_shape, job_of, plan_for

        if training:
            raise PlanError("generate= plans inference: pass training=False")
        if reorder:
            raise PlanError("reorder=True orders a captured graph's ops; generate= plans a decoder's layers: "
                            "drop one of them")
        if generate < 1:
            raise PlanError(f"generate={generate}: give the number of new tokens, at least 1")
        batch, prompt = job_of(example_inputs, example_kwargs)
        shape = generation_shape(model, batch=batch, prompt_len=prompt, new_tokens=generate)
        return plan_for(shape, hardware=hardware, memory_budget=memory_budget, tiers=tiers, time_limit=time_limit)
    hw = hardware if isinstance(hardware, Hardware) else load_hardware(hardware)
    model, example_inputs, example_kwargs, optimizer, precision = in_precision(
        model, example_inputs, example_kwargs, optimizer=optimizer, precision=precision, training=training)
    captured = capture(model, tuple(example_inputs), example_kwargs=example_kwargs, training=training,
                       target=hw, autocast=autocast_dtype(precision, model_dtype(model)))
    return plan_graph(
        captured.graph, hardware=hw, memory_budget=memory_budget, training=training,
        tiers=tiers, time_limit=time_limit, optimizer=optimizer or "none", precision=precision,
        reorder=reorder, update_in_backward=update_in_backward,
    )


def in_precision(
    model: torch.nn.Module, args: Sequence[Any], kwargs: dict[str, Any] | None, *, optimizer: str | None,
    precision: str | None, training: bool,
) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any] | None, str | None, str | None]:
    """The model and inputs to capture for ``precision`` (a cast copy when it computes in another
    dtype than the model, unless it runs under autocast: ``autocast_dtype``), with the resolved
    optimizer and precision (``resolve_optimizer``)."""
    optimizer, precision = resolve_optimizer(optimizer, precision, model_dtype(model), training=training)
    if (precision is not None and COMPUTE_DTYPE[precision] != model_dtype(model)
            and autocast_dtype(precision, model_dtype(model)) is None):
        return (*cast_copy(model, args, kwargs, COMPUTE_DTYPE[precision]), optimizer, precision)
    return model, tuple(args), kwargs, optimizer, precision


def autocast_dtype(precision: str | None, param_dtype: torch.dtype) -> torch.dtype | None:
    """bf16 when an fp32 model runs ``precision="bf16-mixed"``: under ``torch.autocast``, its fp32
    weights being the master weights (torch AMP); None otherwise. A bf16 model runs bf16-mixed
    ZeRO's way instead: bf16 weights, fp32 masters beside them. fp16-mixed of an fp32 model runs
    on a cast copy (its loss scale is applied to fp16 gradients)."""
    return torch.bfloat16 if precision == "bf16-mixed" and param_dtype == torch.float32 else None


def resolve_optimizer(optimizer: str | None, precision: str | None, param_dtype: torch.dtype, *,
                      training: bool) -> tuple[str | None, str | None]:
    """(optimizer, precision) to plan with, None for no optimizer step; PlanError names a bad one."""
    if optimizer is None or str(optimizer).lower() == "none" or not training:
        return None, None
    optimizer = str(optimizer).lower()
    if precision is None:
        precision = {torch.bfloat16: "bf16-mixed", torch.float16: "fp16-mixed"}.get(param_dtype, "fp32")
    check_choice(optimizer, precision)
    return optimizer, precision


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return floating[0] if floating else torch.float32


def cast_copy(model: torch.nn.Module, args: Sequence[Any], kwargs: dict[str, Any] | None,
               dtype: torch.dtype) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any] | None]:
    """A copy of ``model`` and its floating inputs in ``dtype``: what it computes under that
    precision. The caller's model is left as it is."""
    def cast(value: Any) -> Any:
        return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    copied = copy.deepcopy(model).to(dtype)
    return copied, tuple(cast(a) for a in args), (
        {k: cast(v) for k, v in kwargs.items()} if kwargs is not None else None)


def plan_graph(
    graph: Graph,
    *,
    hardware: str | Path | Hardware = "h100-sxm",
    memory_budget: Budget = None,
    training: bool = True,
    tiers: Sequence[str] = ("host",),
    time_limit: float | None = None,
    optimizer: str | None = "adamw",
    precision: str | None = None,
    reorder: bool = False,
    update_in_backward: bool = False,
    op_times: Mapping[str, float] | None = None,
) -> Plan:
    """Plan an already captured graph (see ``plan``); the plan is validated before it is returned.

    ``op_times``: seconds per op name measured on the machine the plan is for
    (``tierplan.cost_models.measured.measure_op_times``); they replace the roofline for those ops.

    The precision defaults to the one the graph's parameters imply; a precision whose compute
    dtype differs from them is refused (``plan`` casts a copy of the model instead)."""
    hw = hardware if isinstance(hardware, Hardware) else load_hardware(hardware)
    if not graph.blocks:
        graph = detect_blocks(graph)
    # The dtype the graph computes in: its autocast dtype when captured under autocast.
    dtype = getattr(torch, graph.meta["autocast"]) if "autocast" in graph.meta else _graph_param_dtype(graph)
    optimizer, precision = resolve_optimizer(optimizer, precision, dtype, training=training and
                                             bool(graph.meta.get("grad_of")))
    if precision is not None and COMPUTE_DTYPE[precision] != dtype:
        raise PlanError(f"precision={precision!r} computes in {COMPUTE_DTYPE[precision]}, but graph "
                        f"{graph.name} computes in {dtype}; capture the model in that dtype, or plan "
                        f"the model with tierplan.plan, which casts a copy (or captures under autocast)")
    pricing = machine_pricing(graph, hw, tiers=tiers, training=training, measured_op_s=op_times)
    live = liveness(graph)
    budget = resolve_budget(memory_budget, keep_all_peak=live.peak, device_bytes=pricing.budget, hardware=hw.name)
    priced = pricing.with_budget(budget)

    def plan_in(ordered: Graph, seconds: float | None) -> Plan:
        known = live if ordered is graph else None  # the liveness computed above is capture order's
        if optimizer is None:  # no optimizer asked for, or no gradients to update
            return solve(ordered, priced, time_limit_s=seconds, live=known)
        return plan_step(ordered, priced, update_rates(hw), optimizer=optimizer, precision=str(precision),
                         time_limit_s=seconds, live=known, overlap_backward=update_in_backward)

    plan = (plan_in_orders(graph, plan_in, budget=budget, time_limit_s=time_limit) if reorder
            else plan_in(graph, time_limit))
    validate(plan)  # every plan returned is checked by the independent replay
    return plan


def _graph_param_dtype(graph: Graph) -> torch.dtype:
    for name in graph.inputs:
        t = graph.tensors[name]
        if t.kind is TensorKind.PARAMETER and t.dtype in ("float32", "bfloat16", "float16", "float64"):
            return getattr(torch, t.dtype)
    return torch.float32


class Baselines(dict):
    """``{policy: Plan or None}``; ``reasons[policy]`` says why a None policy cannot run."""

    def __init__(self, plans: dict[str, Plan | None], reasons: dict[str, str]) -> None:
        super().__init__(plans)
        self.reasons = reasons


def baselines(plan: Plan | GenerationPlan) -> Baselines:
    """The policies ``plan`` is measured against, priced by the same cost model and validated:
    keep-all, checkpoint-blocks and swap-all with the states on the device, zero-offload and
    zero-infinity (see ``placement.optimizer_step``) for a plan with an optimizer step;
    all-on-device, layer-streaming and FlexGen's policy for a GenerationPlan
    (``generation.baselines``)."""
    if isinstance(plan, GenerationPlan):
        from tierplan.generate import generation_baselines

        found_generation = generation_baselines(plan)
        return Baselines({k: v if isinstance(v, GenerationPlan) else None for k, v in found_generation.items()},
                         {k: v for k, v in found_generation.items() if isinstance(v, str)})
    found = step_baselines(plan)
    for candidate in found.plans.values():
        if candidate is not None:
            validate(candidate)
    return Baselines(found.plans, found.reasons)


def plan_graph_or_smallest(
    graph: Graph,
    *,
    hardware: str | Path | Hardware,
    memory_budget: Budget,
    training: bool,
    tiers: Sequence[str],
    time_limit: float | None,
    optimizer: str | None = None,
    precision: str | None = None,
    reorder: bool = False,
    update_in_backward: bool = False,
    op_times: Mapping[str, float] | None = None,
) -> tuple[Plan, str]:
    """``plan_graph``, except that a fractional budget the graph cannot meet plans it at the
    smallest budget the planner can meet; the note (else "") says so.

    A fraction is relative to each graph's keep-all peak, and a small graph (the loss after a
    graph break; a new, smaller shape of a compiled model) may have little to move: the caller
    asked for "this share of whatever it needs", so the nearest plan is better than a failure in
    the middle of a run. A budget in bytes is a hard limit and stays an error.
    """
    kw = dict(hardware=hardware, training=training, tiers=tiers, time_limit=time_limit, optimizer=optimizer,
              precision=precision, reorder=reorder, update_in_backward=update_in_backward, op_times=op_times)
    try:
        return plan_graph(graph, memory_budget=memory_budget, **kw), ""
    except InfeasibleBudget as exc:
        if not isinstance(memory_budget, float) or exc.min_feasible_bytes is None:
            raise
        note = (f"memory_budget={memory_budget} ({format_bytes(exc.budget_bytes)}) is infeasible "
                f"for {graph.name}; planned at the smallest feasible budget, "
                f"{format_bytes(exc.min_feasible_bytes)}")
        return plan_graph(graph, memory_budget=exc.min_feasible_bytes, **kw), note


def plan_graph_like(
    graph: Graph,
    previous: Plan,
    *,
    hardware: str | Path | Hardware,
    tiers: Sequence[str] = ("host",),
    source: str,
) -> Plan | None:
    """Plan ``graph`` (the model of ``previous`` at other, no larger shapes) by the decisions of
    ``previous``, within its budget in bytes and without a search; None where that plan does not
    fit (plan it with ``plan_graph`` then). ``source`` names ``previous`` in the plan's method."""
    hw = hardware if isinstance(hardware, Hardware) else load_hardware(hardware)
    if not graph.blocks:
        graph = detect_blocks(graph)
    pricing = machine_pricing(graph, hw, tiers=tiers, training=previous.training)
    plan = plan_by_decisions(graph, pricing.with_budget(previous.budget_bytes), previous.decisions,
                             source=source, live=liveness(graph))
    if plan is not None:
        validate(plan)
    return plan

def resolve_budget(budget: Budget, *, keep_all_peak: int, device_bytes: int, hardware: str) -> int:
    """The device budget in bytes; see ``plan`` for the forms it accepts."""
    if budget is None:
        return device_bytes
    if isinstance(budget, bool):
        raise PlanError(f"memory_budget={budget!r}: give bytes, a size such as '6GiB', or a fraction")
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise PlanError(
                f"memory_budget={budget}: a float is a fraction of the keep-all peak and must be in "
                f"(0, 1]; give bytes (int) or a size string such as '6GiB' for an absolute budget"
            )
        resolved = int(budget * keep_all_peak)
    elif isinstance(budget, int):
        resolved = budget
    elif isinstance(budget, str):
        try:
            resolved = parse_bytes(budget, setting="memory_budget")
        except ValueError as exc:
            raise PlanError(str(exc)) from None
    else:
        raise PlanError(f"memory_budget of type {type(budget).__name__} is not supported")
    if resolved <= 0:
        raise PlanError(f"memory_budget={budget!r} resolves to {resolved} bytes; it must be positive")
    if resolved > device_bytes:
        raise PlanError(
            f"memory_budget {format_bytes(resolved)} exceeds the {format_bytes(device_bytes)} of device "
            f"memory on {hardware}; lower the budget or pick hardware with more memory"
        )
    return resolved

