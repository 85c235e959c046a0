"""Fine-tune a (tiny, random-init) Llama with part of the step offloaded to host memory / NVMe.

    python examples/finetune_llama_offload.py --budget 0.6 --tiers host,nvme --steps 20

The plan decides what to keep, recompute, swap to the host pool or to files in the swap
directory; the compiled module trains like the original (AdamW, gradients in .grad).
"""
from __future__ import annotations

import argparse

import torch

import tierplan as tp
from tierplan.zoo import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--budget", type=float, default=0.75)
    ap.add_argument("--tiers", default="host,nvme")
    ap.add_argument("--debug-dir", default=None)
    a = ap.parse_args()
    model, _, kw = load_model("llama-tiny", batch_size=2, seq_len=32)
    model.eval()  # no dropout in the fine-tuning step
    compiled = tp.compile(model, (), example_kwargs=kw, memory_budget=a.budget,
                          tiers=tuple(a.tiers.split(",")), time_limit=10, debug_dir=a.debug_dir)
    print(compiled.plan.summary(), f"\ngenerated source: {compiled.source_path}")
    opt = torch.optim.AdamW(compiled.parameters(), lr=3e-3)
    ids = kw["input_ids"]  # fine-tune on one fixed batch: the loss must fall
    for step in range(a.steps):
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"step {step:3d}  loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
