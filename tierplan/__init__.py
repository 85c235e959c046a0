"""tierplan: a memory-placement compiler for PyTorch.

    plan = tierplan.plan(model, example_inputs, hardware="h100-sxm", memory_budget="6GiB")
    print(plan.summary())
    tierplan.validate(plan)
"""
from tierplan.api import Baselines, baselines, plan, plan_graph
from tierplan.compile import compile
from tierplan.cost_models.hardware import Hardware, HardwareError, load_hardware
from tierplan.dynamo_backend import backend
from tierplan.ir import Graph
from tierplan.passes.capture import CaptureError, capture
from tierplan.plans.plan import InfeasibleBudget, Plan, PlanError
from tierplan.plans.validate import validate

__all__ = [
    "Baselines",
    "CaptureError",
    "Graph",
    "Hardware",
    "HardwareError",
    "InfeasibleBudget",
    "Plan",
    "PlanError",
    "backend",
    "baselines",
    "capture",
    "compile",
    "load_hardware",
    "plan",
    "plan_graph",
    "validate",
]
