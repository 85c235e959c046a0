"""Fine-tune a (tiny, random-init) Llama with part of the step offloaded to host memory / NVMe.

    python examples/finetune_llama_offload.py --budget 0.6 --tiers host,nvme --steps 20

The plan decides what to keep, recompute, swap to the host pool or to files in the swap
directory, and where AdamW's states live (device, host, NVMe files) and where each update runs;
the compiled module trains like the original. Against a plain training loop, three lines change:
the optimizer goes to ``tierplan.compile``, and the loop steps ``compiled.optimizer``.
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
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    compiled = tp.compile(model, (), example_kwargs=kw, memory_budget=a.budget, optimizer=opt,
                          tiers=tuple(a.tiers.split(",")), time_limit=10, debug_dir=a.debug_dir)
    print(compiled.plan.summary(), f"\ngenerated source: {compiled.source_path}")
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(compiled.optimizer, T_max=a.steps)
    ids = kw["input_ids"]  # fine-tune on one fixed batch: the loss must fall
    for step in range(a.steps):
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(compiled.parameters(), 1.0)
        compiled.optimizer.step()
        compiled.optimizer.zero_grad()
        schedule.step()
        print(f"step {step:3d}  loss {loss.item():.4f}")
    print("optimizer states per tier:", compiled.optimizer.state_bytes())
    compiled.optimizer.close()  # removes the NVMe state files now (exit would too)


if __name__ == "__main__":
    main()
