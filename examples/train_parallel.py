"""Train a zoo model with a tierplan parallel plan applied by torch.distributed.

    torchrun --nproc-per-node 2 examples/train_parallel.py                 # plan picks dp/tp
    torchrun --nproc-per-node 2 examples/train_parallel.py --tp 2          # force a layout
    torchrun --nproc-per-node 2 examples/train_parallel.py --dp 2 --zero 3

On a machine without GPUs it runs on CPU with gloo. Every rank plans the same way (the search is
deterministic), so no plan has to be broadcast. Pipeline parallelism is left out here: a
transformers model is not a sequence of blocks, see ``tierplan.distributed.pipeline_stage``.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from tierplan.distributed import Layout, apply_plan, init_mesh
from tierplan.zoo import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--hardware", default="cpu")
    ap.add_argument("--dp", type=int)
    ap.add_argument("--tp", type=int)
    ap.add_argument("--zero", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if args.dp or args.tp:
        layout = Layout(dp=args.dp or world // (args.tp or 1), tp=args.tp or 1, zero=args.zero)
    else:
        from tierplan.planner.parallel import plan_parallel

        result = plan_parallel(args.model, args.hardware, world, seq_len=args.seq,
                               global_batch=args.batch * world, top=50)  # fmt: skip
        # This example applies DP and TP; take the best plan without pipeline stages.
        best = next(p for p in result.plans if p.config["pp"] == 1)
        layout = Layout.from_plan(best)
        if rank == 0:
            print(f"plan: {best.describe()}")
    mesh = init_mesh(layout)
    model, _, kwargs = load_model(args.model, batch_size=args.batch, seq_len=args.seq)
    model = apply_plan(model.to("cuda" if cuda else "cpu"), layout, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dp_rank = mesh["dp"].get_local_rank()
    for step in range(args.steps):
        g = torch.Generator().manual_seed(1000 * step + dp_rank)  # one batch per DP replica
        ids = torch.randint(0, kwargs["input_ids"].max().item() + 1, kwargs["input_ids"].shape, generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f} (dp{layout.dp} tp{layout.tp} zero{layout.zero})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
