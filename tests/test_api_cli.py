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


# -- the report, pictures and errors of the CLI ---------------------------------------------------


def test_cli_plan_writes_plot_trace_and_compare(tmp_path, capsys) -> None:
    plan_path, plot, trace = tmp_path / "plan.json", tmp_path / "m.png", tmp_path / "t.json"
    argv = ["plan", "gpt2-tiny", "--hardware", "rtx4090", "--budget", "0.6", "--time-limit", "5",
            "--json", str(plan_path), "--plot", str(plot), "--trace", str(trace), "--compare"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out
    for needle in ("peak per tier", "overhead", "repeated blocks", "largest storages",
                   "compared with the baselines", "keep-all", "swap-all", "written: "):
        assert needle in out, needle
    # stderr is not a terminal here: progress comes as plain lines, one per phase start and end.
    progress = captured.err.strip().splitlines()
    assert progress and all(line.startswith("[tierplan] ") for line in progress), captured.err
    assert plot.read_bytes()[:4] == b"\x89PNG"
    events = json.loads(trace.read_text())["traceEvents"]
    plan = tierplan.Plan.from_json(plan_path)
    computed = [e["name"] for e in events if e["ph"] == "X" and e.get("cat") in ("compute", "recompute")]
    assert computed == [s.op for s in plan.schedule if s.op is not None]
    # A saved plan draws the same pictures.
    assert main(["show", str(plan_path), "--trace", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["traceEvents"] == events


def test_cli_quiet_prints_no_progress(capsys) -> None:
    assert main(["plan", "mlp", "--hardware", "cpu", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def saved_plan(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    assert main(["plan", "mlp", "--hardware", "cpu", "--json", str(path), "--quiet"]) == 0
    return path


def test_cli_explain_unknown_tensor_lists_close_names(saved_plan, capsys) -> None:
    plan = tierplan.Plan.from_json(saved_plan)
    name = next(n for n in plan.graph.tensors if n.startswith("mm"))
    assert main(["explain", str(saved_plan), name + "x"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "has no tensor" in lines[0] and "close names:" in lines[0]
    assert name in lines[0]


def test_cli_explain_accepts_a_parameter_path(saved_plan, capsys) -> None:
    plan = tierplan.Plan.from_json(saved_plan)
    tensor, path = next(iter(plan.graph.meta["param_names"].items()))
    assert main(["explain", str(saved_plan), path]) == 0
    assert capsys.readouterr().out.startswith(f"{tensor}: ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan"], "required: model"),
        (["plan", "mlp", "--batch-size", "x"], "invalid int value"),
        (["plan", "mlp", "--no-such-option"], "unrecognized arguments"),
        (["frobnicate"], "invalid choice"),
        (["plan", "missing_file.py:factory"], "does not exist"),
        (["plan", "mlp", "--hardware", "cpu", "--plot", "p.jpg"], "--plot"),
        (["plan", "mlp", "--hardware", "cpu", "--trace", "/no/such/dir/t.json"], "does not exist"),
        (["plan", "mlp", "--hardware", "cpu", "--tiers", "device"], "tiers lists 'device'"),
        (["explain", "/nonexistent/plan.json", "x"], "cannot read plan file"),
        (["pack", "/nonexistent/buffers.csv"], ""),
    ],
)
def test_cli_usage_errors_are_one_line(argv, message, capsys) -> None:
    assert main(argv + (["--quiet"] if argv[0] == "plan" and len(argv) > 1 else [])) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("tierplan: error: ") and message in lines[0]
    assert captured.out == ""


def test_cli_impossible_budget_says_what_would_fit(capsys) -> None:
    assert main(["plan", "mlp", "--hardware", "cpu", "--budget", "1KiB", "--quiet"]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "give --budget" in line


def test_cli_debug_shows_the_traceback() -> None:
    with pytest.raises(ValueError, match="not a byte quantity"):
        main(["plan", "mlp", "--hardware", "cpu", "--budget", "8 parsecs", "--quiet", "--debug"])


def test_cli_internal_errors_are_one_line_too(monkeypatch, capsys) -> None:
    import tierplan.cli.commands as cli

    def broken(args):
        raise KeyError("boom")

    monkeypatch.setattr(cli, "cmd_show", broken)
    assert main(["show", "whatever.json"]) == cli.INTERNAL_ERROR
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and line.startswith("tierplan: internal error: KeyError") and "--debug" in line


def test_cli_emit_writes_the_generated_module(tmp_path, capsys) -> None:
    import importlib.util

    if importlib.util.find_spec("tierplan.codegen.emit") is None:
        pytest.skip("code generation is not in this checkout")
    out = tmp_path / "gen"
    assert main(["plan", "mlp", "--hardware", "cpu", "--budget", "0.9", "--emit", str(out), "--quiet"]) == 0
    (source,) = out.glob("*.py")
    compile(source.read_text(), str(source), "exec")
    assert str(source) in capsys.readouterr().out


def test_cli_whatif_bad_gpu_counts(capsys) -> None:
    import importlib.util

    if importlib.util.find_spec("tierplan.parallel.whatif") is None:
        pytest.skip("what-if is not in this checkout")
    assert main(["whatif", "gpt2", "--hardware", "h100-sxm", "--gpus", "eight"]) == 2
    assert "--gpus" in capsys.readouterr().err


# -- errors in the user's own code, and arguments checked before the capture ----------------------


def _user_file(tmp_path, name: str, body: str):
    import textwrap

    path = tmp_path / name
    path.write_text(textwrap.dedent(body).lstrip())
    return path


def _line_of(path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("tierplan: error: ") and "Traceback" not in captured.err
    assert "internal error" not in lines[0] and "bug in tierplan" not in lines[0]
    return lines[0]


def test_cli_factory_that_raises_is_a_user_error(tmp_path, capsys) -> None:
    path = _user_file(tmp_path, "raising_factory.py", """
        def load_weights():
            raise ValueError("no checkpoint at weights.pt")

        def make():
            return load_weights()
    """)
    assert main(["plan", f"{path}:make", "--hardware", "cpu", "--quiet"]) == 2
    line = _one_error_line(capsys)
    assert f"{path}:make" in line
    assert "ValueError: no checkpoint at weights.pt" in line
    assert f"raising_factory.py:{_line_of(path, 'raise ValueError')}" in line


def test_cli_model_file_that_fails_at_import_is_a_user_error(tmp_path, capsys) -> None:
    path = _user_file(tmp_path, "broken_module.py", """
        import os

        SETTING = os.environ["TIERPLAN_TEST_NO_SUCH_VARIABLE"]

        def make():
            pass
    """)
    assert main(["plan", f"{path}:make", "--hardware", "cpu", "--quiet"]) == 2
    line = _one_error_line(capsys)
    assert f"{path}:make" in line and "KeyError" in line and "TIERPLAN_TEST_NO_SUCH_VARIABLE" in line
    assert f"broken_module.py:{_line_of(path, 'SETTING =')}" in line


def test_cli_syntax_error_in_model_file_names_the_line(tmp_path, capsys) -> None:
    path = _user_file(tmp_path, "bad_syntax.py", """
        import torch

        def make(:
            pass
    """)
    assert main(["plan", f"{path}:make", "--hardware", "cpu", "--quiet"]) == 2
    line = _one_error_line(capsys)
    assert "SyntaxError" in line and f"bad_syntax.py:{_line_of(path, 'def make(')}" in line


def test_cli_forward_that_raises_names_the_model_code(tmp_path, capsys) -> None:
    path = _user_file(tmp_path, "bad_forward.py", """
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 4)

            def forward(self, x):
                y = self.lin(x)
                raise NotImplementedError("forward is not written yet")

        def make():
            return Net(), (torch.randn(2, 4),)
    """)
    assert main(["plan", f"{path}:make", "--hardware", "cpu", "--quiet"]) == 2
    line = _one_error_line(capsys)
    assert f"{path}:make" in line and "NotImplementedError: forward is not written yet" in line
    assert f"bad_forward.py:{_line_of(path, 'raise NotImplementedError')}" in line


def test_cli_tracer_failure_in_user_model_names_its_line(tmp_path, capsys) -> None:
    path = _user_file(tmp_path, "bad_shapes.py", """
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 4)

            def forward(self, x):
                return (self.lin(x) @ torch.ones(3, 3)).sum()

        def make():
            return Net(), (torch.randn(2, 4),)
    """)
    assert main(["plan", f"{path}:make", "--hardware", "cpu", "--quiet"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # torch logs the failed meta kernel
    assert line.startswith("tierplan: error: cannot capture Net")
    assert f"bad_shapes.py:{_line_of(path, 'return (self.lin(x)')}" in line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--budget", "6GB/s"], "memory_budget '6GB/s' is not a byte quantity"),
        (["--budget", "abc"], "memory_budget 'abc' is not a byte quantity"),
        (["--budget", "-1"], "memory_budget=-1 resolves to -1 bytes; it must be positive"),
        (["--budget", "0"], "it must be positive"),
        (["--budget", "1.5"], r"memory_budget=1.5: a float is a fraction of the keep-all peak and must be in (0, 1]"),
        (["--budget", "10TiB"], "memory_budget 10.00 TiB exceeds the"),
        (["--tiers", "host,floppy"], "floppy"),
        (["--tiers", "device"], "tiers lists 'device'"),
        (["--time-limit", "0"], "--time-limit 0: give a positive number of seconds"),
        (["--time-limit", "-5"], "--time-limit -5"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--plot", "memory.jpg"], "--plot"),
    ],
)
def test_cli_bad_arguments_are_refused_before_capture(monkeypatch, capsys, extra, message) -> None:
    import tierplan.passes.capture
    import tierplan.zoo

    def must_not_run(*args, **kwargs):
        raise AssertionError("the model was loaded or captured before the arguments were checked")

    monkeypatch.setattr(tierplan.zoo, "load_model", must_not_run)
    monkeypatch.setattr(tierplan.passes.capture, "capture", must_not_run)
    assert main(["plan", "llama-70b", "--hardware", "cpu", "--quiet", *extra]) == 2
    line = _one_error_line(capsys)
    assert message in line


def test_cli_late_budget_messages_match_the_early_ones(mlp_example, capsys) -> None:
    # The same settings, given to the API (which checks them after capture), read the same.
    model, args, kwargs = mlp_example
    for budget, cli in (("6GB/s", "6GB/s"), (-1, "-1"), (1.5, "1.5")):
        with pytest.raises(ValueError) as late:
            tierplan.plan(model, args, example_kwargs=kwargs, hardware="cpu", memory_budget=budget)
        assert main(["plan", "mlp", "--hardware", "cpu", "--quiet", "--budget", cli]) == 2
        assert _one_error_line(capsys) == f"tierplan: error: {late.value}"


def test_cli_valid_fraction_passes_the_early_check(monkeypatch, capsys) -> None:
    import tierplan.zoo

    def stop(*args, **kwargs):
        raise KeyError("reached the capture")

    monkeypatch.setattr(tierplan.zoo, "load_model", stop)
    # A fraction in (0, 1] cannot be resolved before the capture, but it is valid: we get there.
    assert main(["plan", "llama-70b", "--hardware", "cpu", "--budget", "0.5", "--quiet"]) == 1
    assert "internal error: KeyError" in capsys.readouterr().err


def test_cli_tierplan_errors_under_a_user_factory_stay_internal(tmp_path, monkeypatch, capsys) -> None:
    import tierplan.passes.capture

    path = _user_file(tmp_path, "fine_model.py", """
        import torch

        def make():
            return torch.nn.Linear(3, 2), (torch.randn(4, 3),)
    """)

    def broken_capture(*args, **kwargs):
        raise KeyError("a bug in the capture")

    monkeypatch.setattr(tierplan.passes.capture, "capture", broken_capture)
    assert main(["plan", f"{path}:make", "--hardware", "cpu", "--inference", "--quiet"]) == 1
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and line.startswith("tierplan: internal error: KeyError")
