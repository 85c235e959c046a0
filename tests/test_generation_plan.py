"""Generation plans: the search, its baselines, the independent check, the front end and the CLI."""
from __future__ import annotations

import dataclasses
import json
import time

import pytest

import tierplan
from tierplan.cli.commands import main
from tierplan.cost_models.hardware import load_hardware
from tierplan.generate import generation_baselines, generation_shape, plan_for
from tierplan.generation.baselines import midpoint_tiers, rounded_blocks, uniform_policy
from tierplan.generation.rates import generation_rates
from tierplan.generation.simulate import peak_bytes, simulate
from tierplan.plans.generation import (
    KV_IN, LAYER, WEIGHT_IN, GenerationPlan, GenerationPolicy,
)
from tierplan.plans.plan import DEVICE, HOST, NVME, PlanError
from tierplan.zoo import load_model

FLEXGEN_MACHINE = "docs/hardware/flexgen-t4.toml"


def _shape(name: str, *, batch: int, prompt: int, new: int):
    model, _, _ = load_model(name, batch_size=1, seq_len=1, training=False, fake=True)
    return generation_shape(model, batch=batch, prompt_len=prompt, new_tokens=new, name=name)


@pytest.fixture(scope="module")
def opt175b_plan() -> GenerationPlan:
    shape = _shape("opt-175b", batch=256, prompt=512, new=32)
    t0 = time.perf_counter()
    plan = plan_for(shape, hardware=FLEXGEN_MACHINE, tiers=("host", "nvme"), time_limit=60)
    plan.solve_s = time.perf_counter() - t0  # the whole call, validation included
    return plan


def test_opt175b_on_flexgens_machine_beats_flexgens_policy_priced_the_same(opt175b_plan):
    plan = opt175b_plan
    assert plan.solve_s <= 60.0
    tierplan.validate(plan)
    found = generation_baselines(plan)
    flexgen = found["flexgen"]
    assert isinstance(flexgen, GenerationPlan)
    assert plan.tokens_per_s >= flexgen.tokens_per_s
    # 325 GiB of weights and the cache of 256 sequences cannot sit on a 16 GB T4.
    assert isinstance(found["all-on-device"], str) and "device needs" in found["all-on-device"]
    assert plan.weight_share(DEVICE) < 0.05
    for tier, peak in plan.peak_bytes.items():
        assert peak <= plan.capacities[tier]


def test_the_check_replays_what_the_plan_claims(opt175b_plan):
    plan = opt175b_plan
    # A plan that claims less device memory than its streamed copies take is refused.
    low = dataclasses.replace(plan, peak_bytes={**plan.peak_bytes, DEVICE: plan.peak_bytes[DEVICE] // 100})
    with pytest.raises(PlanError, match="device: the replay finds"):
        tierplan.validate(low)
    # A layer computed before its streamed weights arrive is refused.
    tasks = list(plan.tasks)
    i = next(n for n, t in enumerate(tasks) if t.kind == WEIGHT_IN and t.layer == 3 and t.step == 1)
    layer = next(t for t in tasks if t.kind == LAYER and t.layer == 3 and t.step == 1)
    tasks[i] = dataclasses.replace(tasks[i], start_s=layer.start_s, end_s=layer.start_s + (tasks[i].end_s - tasks[i].start_s))
    with pytest.raises(PlanError, match="(before its streamed weights arrive|at once)"):
        tierplan.validate(dataclasses.replace(plan, tasks=tasks))
    # A missing cache copy is refused by its bytes.
    kv = [t for t in plan.tasks if t.kind != KV_IN or t.step != 2 or t.layer != 0]
    if len(kv) < len(plan.tasks):
        with pytest.raises(PlanError, match="cache read moves"):
            tierplan.validate(dataclasses.replace(plan, tasks=kv))
    # A policy on a tier the plan does not have is refused.
    tiers = {n: (NVME if t == HOST else t) for n, t in plan.policy.weight_tiers.items()}
    policy = dataclasses.replace(plan.policy, weight_tiers=tiers)
    with pytest.raises(PlanError):
        tierplan.validate(dataclasses.replace(plan, policy=policy, capacities={DEVICE: plan.capacities[DEVICE], HOST: 1}))


def test_a_plan_round_trips_through_json(opt175b_plan, tmp_path):
    path = tmp_path / "plan.json"
    small = dataclasses.replace(opt175b_plan, tasks=opt175b_plan.tasks)
    small.save(path)
    back = GenerationPlan.from_json(path.read_text())
    assert back.policy == small.policy and back.shape == small.shape
    assert back.tokens_per_s == pytest.approx(small.tokens_per_s)
    tierplan.validate(back)


def test_llama70b_larger_than_dram_plans_on_one_rtx4090():
    shape = _shape("llama-70b", batch=8, prompt=512, new=32)
    hw = load_hardware("rtx4090-host128")
    assert shape.weight_bytes > hw.tier(HOST).capacity_bytes  # the model is larger than the DRAM
    plan = plan_for(shape, hardware=hw, tiers=("host", "nvme"))
    tierplan.validate(plan)
    assert plan.weight_share(DEVICE) < 0.5
    assert plan.peak_bytes[HOST] <= hw.tier(HOST).capacity_bytes


def test_llama7b_with_a_128k_context_moves_the_cache_off_the_device():
    shape = _shape("llama-7b", batch=1, prompt=131072 - 32, new=32)
    assert shape.kv_bytes_per_token * shape.layers * shape.max_positions == 64 * 2**30  # anchors: 64 GiB
    plan = plan_for(shape, hardware="h100-sxm", tiers=("host",))
    tierplan.validate(plan)
    assert plan.kv_share(HOST) > 0
    assert isinstance(generation_baselines(plan)["all-on-device"], str)
    # With attention on the device the cache is split across device and host, the device full.
    on_device = plan_for(shape, hardware="h100-sxm", tiers=("host",), attention="device")
    tierplan.validate(on_device)
    assert 0 < on_device.kv_share(DEVICE) < 1 and on_device.kv_share(HOST) > 0
    assert on_device.peak_bytes[DEVICE] > 0.9 * on_device.capacities[DEVICE]
    assert on_device.tokens_per_s <= plan.tokens_per_s  # the search kept the faster place


def test_the_search_keeps_the_simulators_fastest_and_fits_the_budget():
    shape = _shape("gpt2", batch=4, prompt=256, new=8)
    rates = generation_rates(load_hardware("cpu"), 4)
    everything = peak_bytes(shape, uniform_policy(shape, DEVICE, DEVICE), rates)[DEVICE]
    plan = plan_for(shape, hardware="cpu", memory_budget=0.6, tiers=("host", "nvme"))
    tierplan.validate(plan)
    assert plan.capacities[DEVICE] == int(everything * 0.6)  # a fraction of the all-on-device peak
    assert plan.peak_bytes[DEVICE] <= plan.capacities[DEVICE]
    assert plan.weight_share(DEVICE) < 1.0
    # No policy of the baselines' is faster in the simulator than the one the search kept.
    for found in generation_baselines(plan).values():
        if isinstance(found, GenerationPlan):
            assert found.total_s >= plan.total_s * (1 - 1e-9)


def test_flexgens_rounding_rules():
    sizes = [("a", 10), ("b", 30), ("c", 60)]
    # Midpoints at 5%, 25% and 70% of the layer; NVMe first, then host, then device.
    assert midpoint_tiers(sizes, {NVME: 0.2, HOST: 0.3, DEVICE: 0.5}) == {"a": NVME, "b": HOST, "c": DEVICE}
    assert rounded_blocks(4, {DEVICE: 0.5, HOST: 0.3, NVME: 0.2}) == (DEVICE, DEVICE, HOST, NVME)


def test_the_simulator_overlaps_loads_with_compute():
    shape = _shape("llama-70b", batch=8, prompt=512, new=4)
    rates = generation_rates(load_hardware("rtx4090-host128"), 2)
    streamed = uniform_policy(shape, HOST, DEVICE)
    tasks, ends = simulate(shape, streamed, rates)
    loads = sum(t.end_s - t.start_s for t in tasks if t.kind == WEIGHT_IN)
    compute = sum(t.end_s - t.start_s for t in tasks if t.resource == "compute")
    assert ends[-1] < loads + compute  # overlapped, not one after the other
    assert ends[-1] >= max(loads, compute)


def test_a_policy_must_say_where_every_weight_lives():
    shape = _shape("gpt2-tiny", batch=2, prompt=8, new=4)
    with pytest.raises(PlanError, match="tier 'gpu'"):
        GenerationPolicy(1, 2, {"x": "gpu"}, 4, (DEVICE,))
    with pytest.raises(PlanError, match="attention on the host"):
        GenerationPolicy(1, 2, {}, 4, (DEVICE, HOST), attention=HOST)
    policy = uniform_policy(shape, DEVICE, DEVICE)
    plan = plan_for(shape, hardware="cpu", tiers=("host",))
    broken = dataclasses.replace(plan, policy=dataclasses.replace(policy, weight_tiers={
        n: t for n, t in list(policy.weight_tiers.items())[1:]}))
    with pytest.raises(PlanError, match="missing"):
        tierplan.validate(broken)


def test_plan_with_generate_reads_the_job_from_the_example(tmp_path):
    model, _, kwargs = load_model("llama-tiny", batch_size=2, seq_len=12, training=False)
    plan = tierplan.plan(model, (), example_kwargs=kwargs, hardware="cpu", training=False, generate=6,
                         tiers=("host",))
    assert isinstance(plan, GenerationPlan)
    assert (plan.shape.batch, plan.shape.prompt_len, plan.shape.new_tokens) == (2, 12, 6)
    assert set(tierplan.baselines(plan)) == {"all-on-device", "layer-streaming", "flexgen"}
    with pytest.raises(PlanError, match="training=False"):
        tierplan.plan(model, (), example_kwargs=kwargs, hardware="cpu", generate=6)


def test_a_model_without_a_cache_is_named():
    model, _, kwargs = load_model("bert-tiny", batch_size=1, seq_len=8, training=False)
    with pytest.raises(ValueError, match="Bert"):
        tierplan.plan(model, (), example_kwargs=kwargs, hardware="cpu", training=False, generate=4)


def test_learned_positions_bound_the_job():
    model, _, _ = load_model("gpt2-tiny", batch_size=1, seq_len=8, training=False, fake=True)
    with pytest.raises(PlanError, match="learned positions"):
        generation_shape(model, batch=1, prompt_len=120, new_tokens=20)


def test_cli_plans_generation_and_compares(tmp_path, capsys):
    out = tmp_path / "gen.json"
    trace = tmp_path / "gen.trace.json"
    plot = tmp_path / "gen.png"
    code = main(["plan", "gpt2", "--hardware", "cpu", "--generate", "8", "--prompt-len", "64", "--batch-size", "2",
                 "--tiers", "host,nvme", "--budget", "300MB", "--compare", "--json", str(out), "--trace", str(trace),
                 "--plot", str(plot), "--quiet"])
    assert plot.stat().st_size > 1000
    text = capsys.readouterr().out
    assert code == 0
    assert "generation plan for gpt2" in text and "flexgen" in text and "layer-streaming" in text
    plan = GenerationPlan.from_json(out.read_text())
    tierplan.validate(plan)
    assert plan.capacities[DEVICE] == 300 * 10**6
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(1 for e in events if e["ph"] == "X") == len(plan.tasks)


def test_cli_refuses_a_prompt_without_generate(capsys):
    assert main(["plan", "gpt2-tiny", "--prompt-len", "16"]) == 2
    assert "--generate" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "opt-tiny"])
def test_compiled_generation_runs_its_plan_within_the_budget(name, tmp_path):
    """compile(generate=True): greedy tokens equal transformers', the device peak measured by the
    storage tracker within the plan's prediction and the budget, with the cache off the device and
    weights streamed; then again with the host too small for the weights, so they go to NVMe."""
    import torch

    from tierplan.zoo import ZOO, build_transformers, with_layers

    entry = ZOO[name].config
    model, _, kwargs = build_transformers(with_layers(entry.make_config(), 8), entry.model_cls, entry.dtype, 2, 16,
                                          False)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # weights large enough that greedy tokens vary
            p.normal_(0, 0.3)
    model.eval()  # no dropout: greedy tokens are a function of the weights
    ids = kwargs["input_ids"]
    expected = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, use_cache=True,
                              min_new_tokens=32)
    hw = load_hardware("cpu")
    layer_bytes = None
    for host in (None, 600_000):
        machine = hw if host is None else hw.with_tier_capacity(HOST, host)
        compiled = tierplan.compile(model, (ids,), generate=True, hardware=machine, memory_budget=0.5,
                                    tiers=("host", "nvme"), training=False, debug_dir=tmp_path)
        tokens = compiled.generate(ids, 32, measure=True)
        plan = compiled.plan
        assert torch.equal(tokens, expected)
        assert compiled.last_device_peak <= plan.peak_bytes[DEVICE] <= plan.capacities[DEVICE]
        assert plan.weight_share(DEVICE) < 1.0 and plan.kv_share(DEVICE) < 1.0
        layer_bytes = plan.shape.layers * plan.shape.layer_bytes
        if host is not None:
            assert plan.weight_bytes_on(NVME) > 0 and plan.peak_bytes[HOST] <= host
    assert layer_bytes
    assert not any((tmp_path / "swap").glob("**/*.bin"))  # nothing left behind


def test_hidden_states_wait_on_the_host_when_only_that_fits():
    # The least device memory: every weight streamed and the cache on the host, one sequence per
    # micro-batch. Between that policy with the hidden states on the device and the same on the
    # host lies a budget only the second fits: the search must find it.
    shape = _shape("gpt2", batch=8, prompt=512, new=4)
    rates = generation_rates(load_hardware("cpu"), shape.dtype_bytes)
    tiers = {n: HOST for n, _ in shape.layer_params}
    lean = dataclasses.replace(uniform_policy(shape, HOST, HOST), gpu_batch=1, num_gpu_batches=8, attention=HOST)
    assert set(lean.weight_tiers[shape.param_name(0, n)] for n in tiers) == {HOST}
    on_device = peak_bytes(shape, lean, rates)
    on_host = peak_bytes(shape, dataclasses.replace(lean, activations=HOST), rates)
    block = shape.batch * shape.prompt_len * shape.hidden * shape.dtype_bytes
    assert on_device[DEVICE] - on_host[DEVICE] > block // 2  # the layer temporaries beside 2 blocks, gone
    assert on_host[HOST] - on_device[HOST] == 2 * block  # the two host buffers
    budget = (on_device[DEVICE] + on_host[DEVICE]) // 2
    plan = plan_for(shape, hardware="cpu", memory_budget=budget, tiers=("host",))
    assert plan.policy.activations == HOST
    assert plan.peak_bytes[DEVICE] <= budget < peak_bytes(shape, dataclasses.replace(plan.policy, activations=DEVICE),
                                                          rates)[DEVICE]
    assert any("hidden states" in r for r in plan.reasons)
    assert "hidden states between layers on the host" in plan.summary()
    # Each micro-batch's rows come in before every layer but the first and go out after every
    # layer but the last, on the compute stream.
    p, steps = plan.policy, shape.new_tokens
    acts = [t for t in plan.tasks if t.kind in ("act_in", "act_out")]
    assert len(acts) == 2 * steps * (shape.layers - 1) * p.num_gpu_batches
    assert {t.resource for t in acts} == {"compute"}
    assert all(t.layer > 0 for t in acts if t.kind == "act_in")
    assert all(t.layer < shape.layers - 1 for t in acts if t.kind == "act_out")
    # The check replays them: a copy in dropped, or one that starts before the rows went out, is refused.
    def chosen(t) -> bool:  # noqa: ANN001
        return t.kind == "act_in" and t.step == 1 and t.layer == 2 and t.micro_batch == 0

    with pytest.raises(PlanError, match="hidden states copied in and out"):
        tierplan.validate(dataclasses.replace(plan, tasks=[t for t in plan.tasks if not chosen(t)]))
    early = [dataclasses.replace(t, start_s=t.start_s - 1.0, end_s=t.end_s - 1.0) if chosen(t) else t
             for t in plan.tasks]
    with pytest.raises(PlanError, match="(before they arrive from the host|at once)"):
        tierplan.validate(dataclasses.replace(plan, tasks=early))
    # With the room of the device-side policy, the copies are not worth it.
    roomy = plan_for(shape, hardware="cpu", memory_budget=on_device[DEVICE] * 2, tiers=("host",))
    assert roomy.policy.activations == DEVICE
