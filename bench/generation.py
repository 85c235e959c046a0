"""Benchmark of generation with weights and the KV cache placed across tiers.

    python3 bench/generation.py [--quick]

Table 1 (predicted, one run): model x machine x policy {tierplan, flexgen, layer-streaming,
all-on-device}, every policy priced by the same simulator and validated: tokens/s (batch x new
tokens over the whole job, FlexGen's throughput), time to first token, time per decode step, the
batching (micro-batches x sequences), where attention runs (attn) and where the hidden states wait
between layers (acts), peak per tier, and the planning time. A policy that cannot
run says why. The machines are hardware files (FlexGen's T4 machine in docs/hardware, presets
otherwise), so these are predictions for them, not measurements; FlexGen's published 0.69 tokens/s
for OPT-175B on its machine is shown beside them.

Table 2 (measured here, on this CPU): 8-layer versions of gpt2-tiny, llama-tiny and opt-tiny
generate 32 tokens with tierplan.compile(generate=True) at half the all-on-device peak, weights
streamed and the cache off the device: tokens against transformers' greedy decoding, the device
peak measured by the storage tracker beside the plan's, and the measured generation time beside
the predicted one (the cpu preset's figures).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import tierplan  # noqa: E402
from tierplan.cost_models.hardware import load_hardware  # noqa: E402
from tierplan.generate import generation_baselines, generation_shape, plan_for  # noqa: E402
from tierplan.plans.generation import GenerationPlan  # noqa: E402
from tierplan.plans.plan import DEVICE, HOST, NVME  # noqa: E402
from tierplan.units import format_bytes  # noqa: E402
from tierplan.zoo import ZOO, build_transformers, load_model, with_layers  # noqa: E402

FLEXGEN = str(ROOT / "docs" / "hardware" / "flexgen-t4.toml")
PUBLISHED = {("opt-175b", "flexgen-t4"): 0.69}  # Sheng et al. 2023, OPT-175B, prompt 512, 32 tokens, no compression

# model, machine, host memory override, tiers, batch, prompt, new tokens
JOBS = [
    ("opt-175b", FLEXGEN, None, ("host", "nvme"), 256, 512, 32),
    ("opt-30b", FLEXGEN, None, ("host", "nvme"), 64, 512, 32),
    ("llama-70b", "rtx4090-host128", None, ("host", "nvme"), 8, 512, 32),
    ("llama-7b", "h100-sxm", None, ("host",), 1, 131072 - 32, 32),
]
QUICK = JOBS[:1] + JOBS[3:]


def _row(model: str, machine: str, name: str, p: GenerationPlan | str, solve_s: float | None) -> list[str]:
    if isinstance(p, str):
        return [model, machine, name, "-", "-", "-", "-", "-", "-", "-", "-", "-", f"cannot run: {p}"]
    peaks = " / ".join(format_bytes(p.peak_bytes.get(t, 0)) for t in (DEVICE, HOST, NVME))
    shares = " / ".join(f"{p.weight_share(t):.0%}" for t in (DEVICE, HOST, NVME))
    cache = " / ".join(f"{p.kv_share(t):.0%}" for t in (DEVICE, HOST, NVME))
    return [model, machine, name, f"{p.tokens_per_s:.4g}", f"{p.ttft_s:.4g} s", f"{p.decode_s_per_token:.4g} s",
            f"{p.policy.num_gpu_batches}x{p.policy.gpu_batch}", shares, cache, p.policy.attention,
            p.policy.activations, peaks,
            f"{solve_s:.1f} s" if solve_s is not None else ""]


def predicted_table(jobs: list[tuple]) -> None:
    header = ["model", "machine", "policy", "tokens/s", "1st token", "decode step", "batch", "weights d/h/n",
              "cache d/h/n", "attn", "acts", "peak device / host / nvme", "plan s"]
    rows = []
    for model_name, machine, host, tiers, batch, prompt, new in jobs:
        hw = load_hardware(machine)
        if host is not None:
            hw = hw.with_tier_capacity(HOST, host)
        model, _, _ = load_model(model_name, batch_size=1, seq_len=1, training=False, fake=True)
        shape = generation_shape(model, batch=batch, prompt_len=prompt, new_tokens=new, name=model_name)
        t0 = time.perf_counter()
        plan = plan_for(shape, hardware=hw, tiers=tiers, time_limit=60)
        solve = time.perf_counter() - t0
        rows.append(_row(model_name, hw.name, "tierplan", plan, solve))
        for name, found in generation_baselines(plan).items():
            rows.append(_row(model_name, hw.name, name, found, None))
        published = PUBLISHED.get((model_name, hw.name))
        if published is not None:
            rows.append([model_name, hw.name, "flexgen (published, measured)", f"{published:.4g}", *[""] * 9])
        print(f"# {model_name}, batch {batch}, prompt {prompt}, {new} new tokens on {hw.name}: planned in {solve:.1f} s",
              file=sys.stderr)
    _print(header, rows)


def measured_table() -> None:
    header = ["model", "host", "weights d/h/n", "cache d/h/n", "attn", "acts", "tokens equal", "device peak measured",
              "predicted", "budget", "time measured", "predicted"]
    rows = []
    hw = load_hardware("cpu")
    for name in ("gpt2-tiny", "llama-tiny", "opt-tiny"):
        entry = ZOO[name].config
        model, _, kwargs = build_transformers(with_layers(entry.make_config(), 8), entry.model_cls, entry.dtype,
                                              2, 16, False)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
        model.eval()
        ids = kwargs["input_ids"]
        expected = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None,
                                  use_cache=True)
        # The host as the cpu preset has it, then too small for the weights (they go to NVMe),
        # then too small for them and the cache (both go to NVMe).
        for host in (None, 600_000, 400_000):
            machine = hw if host is None else hw.with_tier_capacity(HOST, host)
            compiled = tierplan.compile(model, (ids,), generate=True, hardware=machine, memory_budget=0.5,
                                        tiers=("host", "nvme"), training=False)
            compiled.generate(ids, 32)  # plans; the timed runs below reuse the plan
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                tokens = compiled.generate(ids, 32)
                times.append(time.perf_counter() - t0)
            compiled.generate(ids, 32, measure=True)
            plan = compiled.plan
            rows.append([
                name, "preset" if host is None else format_bytes(host), " / ".join(f"{plan.weight_share(t):.0%}" for t in (DEVICE, HOST, NVME)),
                " / ".join(f"{plan.kv_share(t):.0%}" for t in (DEVICE, HOST, NVME)), plan.policy.attention,
                plan.policy.activations, str(torch.equal(tokens, expected)), format_bytes(compiled.last_device_peak),
                format_bytes(plan.peak_bytes[DEVICE]), format_bytes(plan.capacities[DEVICE]),
                f"{sorted(times)[1] * 1e3:.1f} ms", f"{plan.total_s * 1e3:.1f} ms"])
    _print(header, rows)


def _print(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="OPT-175B and the 128k-context job only")
    args = parser.parse_args()
    print("Table 1: predicted (same simulator for every policy; validated)\n")
    predicted_table(QUICK if args.quick else JOBS)
    print("Table 2: measured on this CPU (cpu preset), 8-layer tiny models, 32 new tokens, budget 0.5 of all-on-device\n")
    measured_table()


if __name__ == "__main__":
    main()
