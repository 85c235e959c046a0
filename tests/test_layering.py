"""Imports run one way: ir <- passes, cost models <- the plan contract <- solvers <- codegen, report
<- api, compile, cli (docs/architecture.md, "Which way imports run").

Every ``import`` in the package is read from the source (those inside functions and under
TYPE_CHECKING too), so a lazy import cannot hide a cycle the layering forbids.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tierplan

PACKAGE = Path(tierplan.__file__).parent

# Lower layers never import higher ones. Within a layer, imports are allowed unless a rule
# below forbids them.
LAYERS: dict[str, int] = {
    "tierplan.units": 0,
    "tierplan.ir": 0,
    "tierplan.passes": 1,
    "tierplan.cost_models": 1,
    "tierplan.models": 1,
    "tierplan.plans": 2,
    "tierplan.placement": 3,
    "tierplan.packing": 3,
    "tierplan.parallel": 3,
    "tierplan.generation": 3,
    "tierplan.formats": 3,
    "tierplan.codegen": 4,
    "tierplan.report": 4,
    "tierplan.passes.capture": 4,  # a front end: it runs the model; solvers take graphs
    "tierplan.api": 5,
    "tierplan.compile": 5,
    "tierplan.dynamo_backend": 5,
    "tierplan.cli": 5,
    "tierplan.zoo": 5,
    "tierplan.profiling": 5,
    "tierplan.generate": 5,
    "tierplan": 5,
}
SOLVERS = ("tierplan.placement", "tierplan.packing", "tierplan.parallel", "tierplan.generation")


def _layer_key(module: str) -> str:
    """The longest prefix of ``module`` that LAYERS names."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return key
    raise KeyError(module)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "tierplan")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "tierplan":
                continue
            out.add(node.module)
            # ``from tierplan.x import y`` may import the submodule tierplan.x.y
            out.update(f"{node.module}.{a.name}" for a in node.names
                       if (PACKAGE.parent / (node.module.replace(".", "/") + f"/{a.name}.py")).exists())
    return out


def _edges() -> list[tuple[str, str]]:
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _module_name(path)
        edges.extend((source, target) for target in sorted(_imports(path)) if target != source)
    return edges


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_table_covers_every_module():
    for path in PACKAGE.rglob("*.py"):
        _layer_key(_module_name(path))  # raises for a module no layer names


def test_no_module_imports_a_higher_layer():
    upward = [(s, t) for s, t in _edges() if LAYERS[_layer_key(t)] > LAYERS[_layer_key(s)]]
    assert not upward, "imports against the layering:\n" + "\n".join(f"  {s} -> {t}" for s, t in upward)


def test_solvers_import_no_other_solver_and_no_front_end():
    bad = []
    for source, target in _edges():
        mine = next((p for p in SOLVERS if _within(source, p)), None)
        if mine is None:
            continue
        other_solver = any(_within(target, p) for p in SOLVERS if p != mine)
        front_end = _within(target, "tierplan.passes.capture") or _within(target, "tierplan.zoo")
        if other_solver or front_end:
            bad.append((source, target))
    assert not bad, "\n".join(f"  {s} -> {t}" for s, t in bad)


@pytest.mark.parametrize("checker, allowed", [
    # The validator is the independent check: it shares no code with what it checks.
    ("tierplan.plans.validate", ("tierplan.ir", "tierplan.units", "tierplan.plans.plan",
                                 "tierplan.plans.check_update", "tierplan.plans.check_generation",
                                 "tierplan.plans.generation")),
    # The check of a generation plan reads its contract only.
    ("tierplan.plans.check_generation", ("tierplan.units", "tierplan.plans.plan", "tierplan.plans.generation")),
    # Its check of the optimizer step reads the update's contract and the validator's replay.
    ("tierplan.plans.check_update", ("tierplan.ir", "tierplan.units", "tierplan.plans.plan",
                                     "tierplan.plans.update", "tierplan.plans.validate")),
    # The report reads Plans only.
    ("tierplan.report", ("tierplan.ir", "tierplan.units", "tierplan.plans", "tierplan.report")),
])
def test_readers_of_plans_import_only_the_contract(checker, allowed):
    bad = [(s, t) for s, t in _edges()
           if _within(s, checker) and not any(_within(t, a) for a in allowed)]
    assert not bad, "\n".join(f"  {s} -> {t}" for s, t in bad)


def test_the_check_sees_function_level_imports(tmp_path):
    # The rule must fail where it should: a lazy upward import is still an import.
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from tierplan.cli.commands import main\n    return main\n")
    assert "tierplan.cli.commands" in _imports(module)
