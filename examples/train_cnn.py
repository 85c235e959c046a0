"""Train the zoo's small CNN on random images under a device budget, eager vs compiled.

    python examples/train_cnn.py --steps 50 --budget 0.75
"""
from __future__ import annotations

import argparse
import copy

import torch

import tierplan as tp
from tierplan.zoo import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--budget", type=float, default=0.75)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--side", type=int, default=16)
    a = ap.parse_args()
    model, (x,), kw = load_model("cnn", batch_size=a.batch, seq_len=a.side)
    eager = copy.deepcopy(model)
    compiled = tp.compile(model, (x,), example_kwargs=kw, memory_budget=a.budget, time_limit=5)
    print(compiled.plan.summary(), f"\ngenerated source: {compiled.source_path}")
    opt_c = torch.optim.SGD(compiled.parameters(), lr=0.05, momentum=0.9)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for step in range(a.steps):
        x = torch.randn(x.shape, generator=g)
        y = (x.mean(dim=(1, 2, 3)) > 0).long()  # a learnable label
        for module, opt in ((compiled, opt_c), (eager, opt_e)):
            loss = module(x, labels=y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if module is compiled:
                lc = loss.item()
        if step % 10 == 0 or step == a.steps - 1:
            print(f"step {step:3d}  eager {loss.item():.4f}  compiled {lc:.4f}")


if __name__ == "__main__":
    main()
