"""tierplan.plan and the command line, end to end on small zoo models."""
from __future__ import annotations

import json

import pytest

import tierplan
from tierplan.cli import main
from tierplan.zoo import load_model


@pytest.fixture(scope="module")
def mlp_example():
    return load_model("mlp", training=True)


def test_plan_fits_and_validates(mlp_example) -> None:
    model, args, kwargs = mlp_example
    plan = tierplan.plan(model, args, example_kwargs=kwargs, hardware="cpu")
    replay = tierplan.validate(plan)
    assert plan.method.startswith("keep-all")
    assert replay.peak_bytes["device"] == plan.keep_all_peak_bytes
    assert plan.budget_bytes == tierplan.load_hardware("cpu").tier("device").capacity_bytes


def test_fractional_budget_is_a_fraction_of_keep_all(mlp_example) -> None:
    model, args, kwargs = mlp_example
    plan = tierplan.plan(model, args, example_kwargs=kwargs, hardware="cpu", memory_budget=0.9)
    assert plan.budget_bytes == int(0.9 * plan.keep_all_peak_bytes)
    replay = tierplan.validate(plan)
    assert replay.peak_bytes["device"] <= plan.budget_bytes
    assert plan.predicted_time_s >= plan.keep_all_time_s


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"memory_budget": "8 parsecs"}, r"memory_budget '8 parsecs' is not a byte quantity"),
        ({"memory_budget": 1.5}, r"must be in \(0, 1\]"),
        ({"memory_budget": "10TiB", "hardware": "cpu"}, r"exceeds the .* of device memory on cpu"),
        ({"hardware": "no-such-gpu"}, r"no-such-gpu"),
        ({"tiers": ("device",)}, r"tiers lists 'device'"),
    ],
)
def test_bad_settings_name_the_setting(mlp_example, options, message) -> None:
    model, args, kwargs = mlp_example
    with pytest.raises(ValueError, match=message):
        tierplan.plan(model, args, example_kwargs=kwargs, **options)


def test_cli_plan_show_explain_round_trip(tmp_path, capsys) -> None:
    out = tmp_path / "plan.json"
    assert main(["plan", "mlp", "--hardware", "cpu", "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "plan for MLP (training) on cpu" in printed
    assert "largest storages" in printed
    plan = tierplan.Plan.from_json(out)
    tierplan.validate(plan)
    assert main(["show", str(out)]) == 0
    assert "plan for MLP" in capsys.readouterr().out
    tensor = max(plan.graph.storages(), key=lambda s: plan.graph.tensors[s].nbytes)
    assert main(["explain", str(out), tensor]) == 0
    assert capsys.readouterr().out.startswith(f"{tensor}: ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "no-such-model"], "unknown model 'no-such-model'"),
        (["plan", "mlp", "--hardware", "no-such-gpu"], "no-such-gpu"),
        (["plan", "mlp", "--hardware", "cpu", "--budget", "8 parsecs"], "not a byte quantity"),
        (["plan", "mlp", "--hardware", "cpu", "--budget", "1KiB"], "budget"),
        (["show", "/nonexistent/plan.json"], "cannot read plan file"),
        (["hardware", "show", "no-such-gpu"], "no-such-gpu"),
        (["remat", "/nonexistent/graph.json", "--budget", "1MiB"], "graph.json"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(argv, message, capsys) -> None:
    assert main(argv + ([] if argv[0] != "plan" else ["--quiet"])) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("tierplan: error: ")
    assert message in lines[0]
    assert "Traceback" not in captured.err


def test_cli_unreadable_plan_file(tmp_path, capsys) -> None:
    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps([1, 2, 3]))
    assert main(["show", str(bad)]) == 2
    assert "not a plan object" in capsys.readouterr().err


def test_cli_hardware_list_and_calibrate(tmp_path, capsys) -> None:
    assert main(["hardware", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    names = {line.split()[0] for line in listed}
    assert {"h100-sxm", "h100-pcie", "h200", "a100-40gb-pcie", "a100-80gb-sxm", "l4", "rtx4090", "mi300x"} <= names
    out = tmp_path / "here.toml"
    assert main(["calibrate", "--quick", "--out", str(out)]) == 0
    hw = tierplan.load_hardware(out)
    assert hw.device.peak("float32") > 0
    assert "here.toml" in capsys.readouterr().out
