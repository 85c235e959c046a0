"""Train a zoo model with a tierplan parallel plan applied by torch.distributed.

    torchrun --nproc-per-node 2 examples/train_parallel.py                 # plan picks dp/tp
    torchrun --nproc-per-node 2 examples/train_parallel.py --tp 2          # force a layout
    torchrun --nproc-per-node 2 examples/train_parallel.py --dp 2 --zero 3
    torchrun --nproc-per-node 2 examples/train_parallel.py --pp 2          # pipeline, 1F1B
    torchrun --nproc-per-node 2 examples/train_parallel.py --model gpt2-tiny --tp 2   # GPT-2 Conv1D TP
    torchrun --nproc-per-node 2 examples/train_parallel.py --model gpt2-tiny --pp 2

On a machine without GPUs it runs on CPU with gloo. Every rank plans the same way (the search is
deterministic), so no plan has to be broadcast. With ``--pp`` (or a plan with pp > 1) the
transformers model is cut into pipeline stages by ``tierplan.parallel.executor.pipeline_stage``: the
embedding on the first stage, the decoder layers split evenly (each wrapped to compute its own
rotary embedding; causal attention without a mask), the final norm and head on the last stage,
and ``Schedule1F1B`` drives ``num_micro`` micro-batches. GPT-2 (``gpt2*``) is cut the same way
(token + position embeddings first, ``ln_f`` and the LM head last); its LM head is tied to the
token embedding, so that weight lives on the first and the last stage and its gradient is summed
over the pipeline group before each step (Megatron's embedding all-reduce).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from tierplan.parallel.executor import Layout, apply_plan, init_mesh
from tierplan.zoo import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--hardware", default="cpu")
    ap.add_argument("--dp", type=int)
    ap.add_argument("--tp", type=int)
    ap.add_argument("--pp", type=int)
    ap.add_argument("--micro", type=int, default=2, help="micro-batches per step with --pp")
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
    if args.pp:
        layout = Layout(pp=args.pp, dp=world // args.pp, zero=0, num_micro=args.micro)
        if layout.dp != 1:
            raise SystemExit("--pp runs pipeline stages only: use as many processes as stages")
        return _train_pipeline(args, layout, rank)
    if args.dp or args.tp:
        layout = Layout(dp=args.dp or world // (args.tp or 1), tp=args.tp or 1, zero=args.zero)
    else:
        from tierplan.parallel.search import plan_parallel
        from tierplan.profiling import profile_zoo_model

        profile = profile_zoo_model(args.model, seq_len=args.seq)
        result = plan_parallel(profile, args.hardware, world, global_batch=args.batch * world, top=50)
        # This example applies DP x TP, or pipeline stages alone: take the best such plan.
        best = next(p for p in result.plans
                    if p.config["pp"] == 1 or p.config["pp"] == world)  # fmt: skip
        layout = Layout.from_plan(best)
        if rank == 0:
            print(f"plan: {best.describe()}")
        if layout.pp > 1:
            return _train_pipeline(args, layout, rank)
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


class _Embed(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.embed_tokens = inner.embed_tokens

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)


class _GPT2Embed(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.wte, self.wpe = model.transformer.wte, model.transformer.wpe

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))


class _GPT2Block(torch.nn.Module):
    """One GPT2Block on hidden states alone (causal SDPA without a mask)."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.block(h)
        return out[0] if isinstance(out, tuple) else out


class _GPT2Head(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.ln_f, self.lm_head = model.transformer.ln_f, model.lm_head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(h))


class _Layer(torch.nn.Module):
    """One decoder layer that computes the rotary embedding it needs (positions 0..s-1)."""

    def __init__(self, layer: torch.nn.Module, rotary: torch.nn.Module) -> None:
        super().__init__()
        self.layer, self.rotary = layer, rotary

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        out = self.layer(h, position_embeddings=self.rotary(h, pos), position_ids=pos)
        return out[0] if isinstance(out, tuple) else out


class _Head(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.norm, self.lm_head = model.model.norm, model.lm_head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def _train_pipeline(args: argparse.Namespace, layout: Layout, rank: int) -> None:
    from tierplan.parallel.executor import pipeline_stage

    mesh = init_mesh(layout, "cpu")
    torch.manual_seed(0)  # every rank builds the same model and keeps its stage
    model, _, kwargs = load_model(args.model, batch_size=args.batch, seq_len=args.seq)
    tied = None
    if hasattr(model, "transformer") and hasattr(model.transformer, "h"):  # GPT-2
        blocks = [_GPT2Block(b) for b in model.transformer.h]
        head, tail = _GPT2Embed(model), _GPT2Head(model)
        if model.lm_head.weight is model.transformer.wte.weight:
            tied = model.transformer.wte.weight
    else:
        inner = model.model
        blocks = [_Layer(layer, inner.rotary_emb) for layer in inner.layers]
        head, tail = _Embed(inner), _Head(model)
    schedule, stage = pipeline_stage(blocks, layout, mesh, head=head, tail=tail, loss_fn=_lm_loss)
    if tied is not None and layout.pp > 2:
        raise SystemExit("tied embeddings are synchronized for 2 pipeline stages only")
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-3)
    vocab = kwargs["input_ids"].max().item() + 1
    last = rank == layout.pp - 1
    for step in range(args.steps):
        g = torch.Generator().manual_seed(1000 * step)
        ids = torch.randint(0, vocab, kwargs["input_ids"].shape, generator=g)
        opt.zero_grad()
        losses: list[torch.Tensor] = []
        if rank == 0:
            schedule.step(ids)
        elif last:
            schedule.step(target=ids, losses=losses)
        else:
            schedule.step()
        if tied is not None:  # first and last stage each hold the tied embedding: sum its grad
            dist.all_reduce(tied.grad, group=mesh["pp"].get_group())
        opt.step()
        if last:
            loss = torch.stack(losses).mean().item()
            print(f"step {step}: loss {loss:.4f} (pp{layout.pp} 1F1B, {layout.num_micro} micro-batches)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
