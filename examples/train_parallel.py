"""Train a zoo model with a tierplan parallel plan applied by torch.distributed.

    torchrun --nproc-per-node 4 examples/train_parallel.py                 # the search's best plan
    torchrun --nproc-per-node 8 examples/train_parallel.py --model gpt2-tiny --rank 3   # its 4th
    torchrun --nproc-per-node 8 examples/train_parallel.py --model gpt2-tiny --layout "pp2 dp2 tp2"
    torchrun --nproc-per-node 4 examples/train_parallel.py --layout "dp2 tp2 rc[full] offload[optimizer]"

On a machine without GPUs it runs on CPU with gloo. Every rank plans the same way (the search is
deterministic), so no plan has to be broadcast. ``--layout`` fixes fields of the plan
(``tierplan whatif``'s grammar); the search fills in the rest. Every field of the chosen plan is
applied by ``tierplan.parallel.pipeline.parallelize`` (see ``tierplan.parallel.executor`` for what
each becomes): a ("pp", "dp", "tp") mesh, pipeline stages (``Schedule1F1B`` / interleaved) cut
from the transformers model (embeddings first, norm and LM head last), TP with sequence
parallelism, the plan's recompute, FSDP2 per ZeRO stage with CPU offload, micro-batches, and
the gradient sync of GPT-2's LM head tied to its token embedding across the first and last stage.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from tierplan.parallel.executor import Layout, init_mesh
from tierplan.parallel.pipeline import parallelize
from tierplan.zoo import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--hardware", default="cpu")
    ap.add_argument("--layout", help='fields to fix, e.g. "pp2 dp2 tp2 zero3 rc[full]"')
    ap.add_argument("--rank", type=int, default=0, help="run the plan ranked this (0: the best)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2, help="sequences per device")
    ap.add_argument("--seq", type=int, default=32)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = "cuda" if cuda else "cpu"

    from tierplan.parallel.search import plan_parallel
    from tierplan.profiling import profile_zoo_model

    global_batch = args.batch * world
    profile = profile_zoo_model(args.model, seq_len=args.seq)
    result = plan_parallel(profile, args.hardware, world, global_batch=global_batch, top=args.rank + 1,
                           layout=args.layout)  # fmt: skip
    if len(result.plans) <= args.rank:
        raise SystemExit(f"no plan ranked {args.rank}: {getattr(result, 'reason', '')}")
    plan = result.plans[args.rank]
    layout = Layout.from_plan(plan)
    if rank == 0:
        print(f"plan: {plan.describe()}")
    mesh = init_mesh(layout, device)
    torch.manual_seed(0)  # every rank builds the same model (a pipeline stage keeps its part)
    model, _, kwargs = load_model(args.model, batch_size=global_batch, seq_len=args.seq)
    trainer = parallelize(model, layout, mesh, device=device)
    opt = torch.optim.AdamW(trainer.parameters(), lr=1e-3)
    vocab = kwargs["input_ids"].max().item() + 1
    for step in range(args.steps):
        g = torch.Generator().manual_seed(1000 * step)  # the global batch, the same on every rank
        ids = torch.randint(0, vocab, (global_batch, args.seq), generator=g).to(device)
        opt.zero_grad()
        loss = trainer.step(ids, ids)
        opt.step()
        if rank == 0:
            print(f"step {step}: loss {loss:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
