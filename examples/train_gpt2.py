"""Train GPT-2 (built from a config, random init) on generated token data, eager and compiled.

    python examples/train_gpt2.py                    # 120 steps of a 4-layer GPT-2 at 0.75: ~1.5 min on 2 CPU cores
    python examples/train_gpt2.py --tiny --steps 30                  # seconds

The data is a fixed random "language": each next token is a function of the previous one plus
noise, so the loss falls. Both runs start from the same weights and see the same batches; the
script prints both loss curves and both device peaks.
"""
from __future__ import annotations

import argparse
import copy

import torch
import transformers

import tierplan
from tierplan.codegen.measure import StorageTracker


def batches(vocab: int, batch: int, seq: int, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, vocab, (vocab,), generator=g)
    for _ in range(steps):
        ids = torch.empty(batch, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(1, seq):
            noise = torch.rand(batch, generator=g) < 0.1
            ids[:, t] = torch.where(noise, torch.randint(0, vocab, (batch,), generator=g), table[ids[:, t - 1]])
        yield ids


def peak_of(fn, device: torch.device, exclude: list[torch.Tensor]) -> int:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - base
    # What the step allocates on the device tier: parameters and the host pool are not counted.
    with StorageTracker(exclude=exclude) as t:
        fn()
    return t.peak_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--budget", type=float, default=0.75, help="fraction of the keep-all device peak")
    ap.add_argument("--tiny", action="store_true", help="2 layers, 64 wide, vocab 1000")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--tiers", default="host")
    ap.add_argument("--debug-dir", default=None, help="where to write the generated source")
    ap.add_argument("--arena", action="store_true", help="place every planned device tensor at a packed offset in one arena per run")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000) if a.tiny else dict(n_layer=4, n_embd=256, n_head=4, vocab_size=4096)
    cfg = transformers.GPT2Config(**size, n_positions=max(128, a.seq), resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, use_cache=False,
                                  bos_token_id=size["vocab_size"] - 1, eos_token_id=size["vocab_size"] - 1)
    torch.manual_seed(0)
    eager = transformers.GPT2LMHeadModel(cfg).to(device)
    model = copy.deepcopy(eager)
    data = list(batches(cfg.vocab_size, a.batch, a.seq, a.steps))
    example = data[0].to(device)
    compiled = tierplan.compile(model, (), example_kwargs={"input_ids": example, "labels": example},
                          memory_budget=a.budget, tiers=tuple(a.tiers.split(",")), time_limit=10,
                          debug_dir=a.debug_dir, arena=a.arena)
    print(compiled.plan.summary())
    if a.arena:
        print(compiled.program.arena.summary())
    print(f"generated source: {compiled.source_path}")
    opts = {"eager": torch.optim.AdamW(eager.parameters(), lr=1e-3),
            "compiled": torch.optim.AdamW(compiled.parameters(), lr=1e-3)}
    peaks = {"eager": 0, "compiled": 0}
    excluded = [*eager.parameters(), *model.parameters(), compiled.host_pool]
    for step, ids in enumerate(data):
        ids = ids.to(device)
        losses = {}
        for label, run in (("eager", lambda: eager(input_ids=ids, labels=ids).loss),
                           ("compiled", lambda: compiled(input_ids=ids, labels=ids).loss)):
            def one() -> None:
                loss = run()
                loss.backward()
                losses[label] = loss.item()
            peaks[label] = max(peaks[label], peak_of(one, device, excluded))
            opts[label].step()
            opts[label].zero_grad(set_to_none=True)
        if step % max(1, a.steps // 20) == 0 or step == a.steps - 1:
            print(f"step {step:4d}  eager {losses['eager']:.4f}  compiled {losses['compiled']:.4f}")
    print(f"peak allocated in a step: eager {peaks['eager'] / 2**20:.2f} MiB, "
          f"compiled {peaks['compiled'] / 2**20:.2f} MiB"
          f"{' (its per-run arena included)' if a.arena else ''}, parameters excluded; the plan's device peak, "
          f"parameters on the device included: {compiled.plan.peak_bytes['device'] / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
