"""reorder=True: the op order chosen with the plan (tierplan.placement.reorder over the orders of
tierplan.passes.ordering), on abstract graphs and on captured models whose programs must still
compute what eager does."""
from __future__ import annotations

import json

import pytest
import torch

from tierplan.cli.commands import main
from tierplan.cli.remat import plan_abstract
from tierplan.formats.node_link import load_abstract
from tierplan.formats.random_graphs import check_topological, instance, layered_graph, standard_spec
from tierplan.ir import GraphError, Phase
from tierplan.passes.liveness import peak_bytes
from tierplan.passes.ordering import check_order, dependencies, order_free_first, order_lpmf, reorder_graph
from tierplan.placement.reorder import CAPTURE, candidate_orders, plan_in_orders
from tierplan.plans.plan import DEVICE, InfeasibleBudget, StepKind
from test_ordering import make_graph

F, B = Phase.FORWARD, Phase.BACKWARD


def _abstract(tmp_path, n: int):
    data = layered_graph(standard_spec(n))
    path = tmp_path / f"layered_{n}.json"
    path.write_text(json.dumps(data))
    return data, path


def test_reorder_plans_a_layered_graph_below_its_capture_order_cost(tmp_path):
    # The 100-node instance holds 0.89 of its capture-order peak in a BFS order improved by hill
    # climbing: at 0.9 that order needs no recompute, where the capture order needs some.
    data, path = _abstract(tmp_path, 100)
    graph, times, ids = load_abstract(path)
    budget = int(0.9 * peak_bytes(graph))
    in_capture = plan_abstract(graph, times, budget, 20.0)
    reordered = plan_abstract(graph, times, budget, 20.0, reorder=True)
    assert any(s.kind == StepKind.RECOMPUTE for s in in_capture.schedule)
    assert reordered.graph.meta["op_order"] != CAPTURE
    assert "op order" in reordered.method
    assert reordered.predicted_time_s < in_capture.predicted_time_s
    assert reordered.peak_bytes[DEVICE] <= budget
    # Its computes are a topological order of the file's graph (checked on the file's own edges).
    computes = [ids[s.op] for s in reordered.schedule if s.kind == StepKind.COMPUTE]
    assert computes != [ids[op.name] for op in graph.ops]
    check_topological(computes, instance(data).preds)


def test_when_no_order_has_a_plan_the_closest_one_is_raised(tmp_path):
    """Every order refused with the same smallest sure budget: the error raised is the order's
    whose search came closest (its lowest plan's peak), not merely the first."""
    _, path = _abstract(tmp_path, 100)
    graph, _, _ = load_abstract(path)
    budget = int(0.8 * peak_bytes(graph))
    closest = iter([95, 90, 97, 93, 99, 94])  # one per order planned, in turn

    def refuse(ordered, seconds):
        raise InfeasibleBudget(f"order {ordered.meta.get('op_order', CAPTURE)}", budget_bytes=budget,
                               min_feasible_bytes=100, closest_bytes=next(closest))

    with pytest.raises(InfeasibleBudget) as info:
        plan_in_orders(graph, refuse, budget=budget, time_limit_s=1.0)
    orders = len(candidate_orders(graph, budget=budget))
    assert orders >= 2 and info.value.closest_bytes == min([95, 90, 97, 93, 99, 94][:orders])


def test_candidates_hold_fewer_bytes_than_the_capture_order(tmp_path):
    _, path = _abstract(tmp_path, 100)
    graph, _, _ = load_abstract(path)
    budget = int(0.9 * peak_bytes(graph))
    found = candidate_orders(graph, budget=budget)
    assert found[0].method == CAPTURE and len(found) >= 2
    assert len({c.ops for c in found}) == len(found)  # distinct
    for c in found[1:]:
        check_order(graph, c.ops)
        assert c.keep_all_peak == peak_bytes(graph, list(c.ops)) <= found[0].keep_all_peak


def test_orders_keep_the_phases_and_the_order_of_random_draws():
    # Memory-greedy sorts run an op that allocates nothing first: without the phase barrier
    # "grad_early" (a backward op reading only an input) and without the chain "draw2" (a random
    # op reading only an input, allocating little) would run before "fwd" and "draw1".
    g = make_graph(
        {"x": 8, "seed": 8},
        [
            ("fwd", "aten.mm.default", ["x"], {"h": 1000}, F),
            ("draw1", "aten.bernoulli.default", ["h"], {"m1": 500}, F),
            ("draw2", "aten.bernoulli.default", ["x"], {"m2": 1}, F),
            ("loss", "aten.sum.default", ["m1", "m2"], {"l": 4}, F),
            ("grad_early", "aten.mul.Tensor", ["seed"], {"g0": 0}, B),
            ("grad", "aten.mul.Tensor", ["seed", "g0", "m1"], {"g1": 4}, B),
        ],
        ["l", "g1"],
    )
    g.meta["ordered_ops"] = ["draw1", "draw2"]
    for order in (order_lpmf(g), order_free_first(g), *(c.ops for c in candidate_orders(g))):
        pos = {name: i for i, name in enumerate(order)}
        assert max(pos[n] for n in ("fwd", "draw1", "draw2", "loss")) < pos["grad_early"], order
        assert pos["draw1"] < pos["draw2"], order
    unconstrained = make_graph({"x": 8, "seed": 8}, [
        ("fwd", "aten.mm.default", ["x"], {"h": 1000}, F),
        ("draw1", "aten.bernoulli.default", ["h"], {"m1": 500}, F),
        ("draw2", "aten.bernoulli.default", ["x"], {"m2": 1}, F),
        ("loss", "aten.sum.default", ["m1", "m2"], {"l": 4}, F),
    ], ["l"])
    assert order_lpmf(unconstrained).index("draw2") < order_lpmf(unconstrained).index("draw1")
    assert len(dependencies(g).preds[4]) > 0  # the barrier: grad_early waits for the forward


def test_an_order_against_the_dependencies_is_refused_by_name():
    g = make_graph({"x": 8}, [
        ("a", "aten.mm.default", ["x"], {"y": 8}, F),
        ("b", "aten.bernoulli.default", ["x"], {"z": 8}, F),
        ("c", "aten.bernoulli.default", ["x"], {"w": 8}, F),
    ], ["y", "z", "w"])
    g.meta["ordered_ops"] = ["b", "c"]
    with pytest.raises(GraphError, match="'c' before 'b'"):
        reorder_graph(g, ["a", "c", "b"], "by hand")
    with pytest.raises(GraphError, match="never runs op 'c'"):
        reorder_graph(g, ["a", "b"], "by hand")
    moved = reorder_graph(g, ["b", "a", "c"], "by hand")
    assert [op.name for op in moved.ops] == ["b", "a", "c"] and moved.meta["op_order"] == "by hand"
    assert [op.name for op in g.ops] == ["a", "b", "c"]  # the original is unchanged


@pytest.fixture(scope="module")
def captured_models():
    from tierplan.passes.capture import capture
    from tierplan.zoo import load_model

    out = {}
    for name, (batch, seq) in {"cnn": (4, 16), "gpt2-tiny": (2, 32), "llama-tiny": (2, 32)}.items():
        model, args, kwargs = load_model(name, batch_size=batch, seq_len=seq)
        if name != "cnn":
            model.eval()  # no dropout: eager and the program draw nothing random (cnn: BN in train)
        out[name] = (model, args, kwargs, capture(model, args, example_kwargs=kwargs))
    return out


@pytest.mark.parametrize("name", ["cnn", "gpt2-tiny", "llama-tiny"])
def test_programs_of_reordered_plans_match_eager(name, captured_models):
    from tierplan.api import plan_graph
    from tierplan.compile import compile_plan

    model, args, kwargs, captured = captured_models[name]
    graph = captured.graph
    budget = int(0.75 * peak_bytes(graph))
    orders = candidate_orders(graph, budget=budget)[1:]
    assert orders, f"{name}: no order holds fewer bytes above 0.75 of the peak than capture's"
    for candidate in orders:
        ordered = reorder_graph(graph, candidate.ops, candidate.method)
        plan = plan_graph(ordered, hardware="cpu", memory_budget=budget, tiers=("host",), time_limit=2,
                          optimizer="none")
        assert [op.name for op in plan.graph.ops] == list(candidate.ops)
        compiled = compile_plan(model, captured, plan)
        loss = compiled(*args, **kwargs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        out = model(*args, **kwargs)
        expected = out if isinstance(out, torch.Tensor) else out.loss
        expected.backward()
        torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
        for n, p in model.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
        model.zero_grad()


def test_compile_with_reorder_runs_and_matches_eager(captured_models):
    import tierplan

    model, args, kwargs, captured = captured_models["gpt2-tiny"]
    compiled = tierplan.compile(model, args, example_kwargs=kwargs, hardware="cpu", memory_budget=0.75,
                                time_limit=4, reorder=True)
    assert "op order" in compiled.plan.method
    loss = compiled(*args, **kwargs).loss
    expected = model(*args, **kwargs).loss
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)


def test_cli_remat_reorder_and_generate_refusal(tmp_path, capsys):
    _, path = _abstract(tmp_path, 100)
    graph, _, _ = load_abstract(path)
    budget = int(0.9 * peak_bytes(graph))
    assert main(["remat", str(path), "--budget", str(budget), "--time-limit", "10", "--reorder"]) == 0
    out = capsys.readouterr().out
    assert "op order" in out and "+0.00%" in out
    assert main(["plan", "gpt2-tiny", "--generate", "4", "--reorder", "--quiet"]) != 0
    assert "--reorder" in capsys.readouterr().err


def test_reordered_programs_draw_the_same_dropout_masks_as_eager():
    from tierplan.api import plan_graph
    from tierplan.compile import compile_plan
    from tierplan.passes.capture import capture
    from tierplan.zoo import load_model

    model, args, kwargs = load_model("gpt2-tiny", batch_size=2, seq_len=32)
    model.train()  # dropout on: the program must draw the masks eager draws, in its order
    captured = capture(model, args, example_kwargs=kwargs)
    graph = captured.graph
    assert len(graph.meta["ordered_ops"]) > 2
    budget = int(0.75 * peak_bytes(graph))
    orders = candidate_orders(graph, budget=budget)[1:]
    assert orders
    ordered = reorder_graph(graph, orders[0].ops, orders[0].method)
    plan = plan_graph(ordered, hardware="cpu", memory_budget=budget, tiers=("host",), time_limit=2,
                      optimizer="none")
    assert_draws_and_grads_equal_eager(compile_plan(model, captured, plan), model, args, kwargs)


def assert_draws_and_grads_equal_eager(compiled, model, args, kwargs) -> None:
    """One training step of ``compiled`` (a plan's program of a transformers LM) and one of the
    eager model from the same random state: the same loss and gradients, so the same dropout
    masks drawn in the same order (1e-5)."""
    torch.manual_seed(1)
    loss = compiled(*args, **kwargs)  # the loss (compile_plan returns the graph's output)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.manual_seed(1)
    expected = model(*args, **kwargs).loss
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
