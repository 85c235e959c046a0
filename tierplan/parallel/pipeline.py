"""Pipeline stages, and one training step over a whole layout (``parallelize``).

    layout = Layout.from_plan(plan)
    mesh = init_mesh(layout)                                   # ("pp", "dp", "tp")
    trainer = parallelize(model, layout, mesh, loss_fn=lm_loss)
    opt = torch.optim.AdamW(trainer.parameters())
    for ids in batches:                                        # the global batch, on every rank
        opt.zero_grad()
        loss = trainer.step(ids, ids)                          # the global batch's mean loss
        opt.step()

``parallelize`` cuts the model into stages when ``pp > 1`` (``split_model``: GPT-2 and Llama-style
transformers models; pass ``parts`` otherwise), applies TP (+SP), recompute and FSDP2 / DDP to
each stage with ``executor.apply_plan``, and ``Trainer.step`` runs the plan's micro-batches (a
pipelining schedule, or gradient accumulation without a pipeline), sums the gradients of
weights tied across stages, and returns the loss. See ``executor`` for what each field becomes.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from tierplan.parallel.executor import Layout, apply_plan, find_blocks, sync_tied_grads, tied_group

__all__ = ["PipelineParts", "Stages", "Trainer", "build_stages", "lm_loss", "parallelize", "pipeline_stage",
           "split_model"]  # fmt: skip


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, the mean over the batch's predicted tokens (transformers')."""
    vocab = logits.shape[-1]
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1))


# -- cutting a transformers model into stages -------------------------------------------------------


class _GPT2Embed(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.wte, self.wpe = model.transformer.wte, model.transformer.wpe

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))


class _Hidden(nn.Module):
    """A block on hidden states alone (causal attention without a mask)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.block(h)
        return out[0] if isinstance(out, tuple) else out


class _Head(nn.Module):
    def __init__(self, norm: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))


class _Embed(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.embed_tokens = inner.embed_tokens

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)


class _RotaryLayer(nn.Module):
    """A decoder layer that computes the rotary embedding it needs (positions 0..s-1)."""

    def __init__(self, layer: nn.Module, rotary: nn.Module) -> None:
        super().__init__()
        self.layer, self.rotary = layer, rotary

    @property
    def sp_region(self) -> nn.Module:
        # Sequence parallelism starts inside: the rotary embedding needs the whole sequence.
        return self.layer

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        out = self.layer(h, position_embeddings=self.rotary(h, pos), position_ids=pos)
        return out[0] if isinstance(out, tuple) else out


@dataclass
class PipelineParts:
    """A model as ``head`` (first stage), ``blocks`` (split evenly) and ``tail`` (last stage),
    each a module on tensors: ids -> hidden -> ... -> logits."""

    head: nn.Module | None
    blocks: list[nn.Module]
    tail: nn.Module | None


def split_model(model: nn.Module) -> PipelineParts:
    """GPT-2 (token + position embeddings first; ``ln_f`` and the LM head last) and Llama-style
    models (``model.embed_tokens`` / ``layers`` / ``norm``, each layer computing its rotary
    embedding). A tied LM head stays tied: ``build_stages`` finds it and ``Trainer`` syncs it."""
    if hasattr(model, "transformer") and hasattr(model.transformer, "h"):
        tr = model.transformer
        return PipelineParts(_GPT2Embed(model), [_Hidden(b) for b in tr.h], _Head(tr.ln_f, model.lm_head))
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers") and hasattr(inner, "embed_tokens"):
        blocks = [_RotaryLayer(layer, inner.rotary_emb) for layer in inner.layers]
        return PipelineParts(_Embed(inner), blocks, _Head(inner.norm, model.lm_head))
    raise ValueError(f"cannot cut {type(model).__name__} into pipeline stages: pass parts=PipelineParts(...)")


# -- stages ------------------------------------------------------------------------------------------


@dataclass
class Stages:
    """This rank's pipeline stage(s): the schedule, the module(s) to train, and where the
    weights tied across the first and last stage live on this rank (module, attribute)."""

    schedule: Any
    module: nn.Module
    tied: list[tuple[nn.Module, str]] = field(default_factory=list)

    def tied_params(self) -> list[nn.Parameter]:
        # Read at each step: FSDP2 replaces parameters (by attribute) when it shards them.
        return [getattr(m, a) for m, a in self.tied]


def _locations(module: nn.Module | None, ids: set[int]) -> list[tuple[nn.Module, str]]:
    if module is None:
        return []
    return [(m, n) for m in module.modules() for n, p in m._parameters.items() if p is not None and id(p) in ids]


def build_stages(
    blocks: list[nn.Module],
    layout: Layout,
    mesh: Any,
    *,
    head: nn.Module | None = None,
    tail: nn.Module | None = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    tp_plan: Callable[[nn.Module], dict[str, Any]] | None = None,
) -> Stages:
    """``pipeline_stage`` plus the tied weights; ``tp_plan`` maps a stage module to its TP plan
    (default ``auto_tp_plan``)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    pp_mesh = mesh["pp"]
    rank, size = pp_mesh.get_local_rank(), layout.pp
    v = max(1, layout.virtual)
    chunks = size * v
    if len(blocks) % chunks:
        raise ValueError(f"{len(blocks)} blocks do not split into {chunks} pipeline chunks")
    per = len(blocks) // chunks
    # Weights in both the head and the tail (GPT-2's wte / lm_head): located before FSDP2
    # replaces them, on the parts this rank holds.
    shared = {id(p) for p in head.parameters()} & {id(p) for p in tail.parameters()} if head and tail else set()
    options = layout.recompute_options(rank, per * v)
    stages, modules, tied = [], [], []
    # Chunk c lives on rank c % size (Megatron's interleaving); with virtual = 1 chunk c = rank.
    for i, c in enumerate(range(rank, chunks, size)):
        parts: list[nn.Module] = []
        own = blocks[c * per : (c + 1) * per]
        if c == 0 and head is not None:
            parts.append(head)
            tied += _locations(head, shared)
        parts += own
        if c == chunks - 1 and tail is not None:
            parts.append(tail)
            tied += _locations(tail, shared)
        module = nn.Sequential(*parts).to(device)
        plan = tp_plan(module) if tp_plan is not None else None
        module = apply_plan(module, layout, mesh, tp_plan=plan, blocks=own,
                            recompute=options[i * per : (i + 1) * per])  # fmt: skip
        modules.append(module)
        stages.append(PipelineStage(module, c, chunks, torch.device(device), group=pp_mesh.get_group()))
    if v > 1:
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches=layout.num_micro, loss_fn=loss_fn)
    else:
        schedule = Schedule1F1B(stages[0], n_microbatches=layout.num_micro, loss_fn=loss_fn)
    return Stages(schedule, modules[0] if len(modules) == 1 else nn.ModuleList(modules), tied)


def pipeline_stage(
    blocks: list[nn.Module],
    layout: Layout,
    mesh: Any,
    *,
    head: nn.Module | None = None,
    tail: nn.Module | None = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Any, nn.Module]:
    """Build this rank's pipeline stage(s) and the schedule with ``torch.distributed.pipelining``.

    ``blocks`` are split evenly over ``layout.pp`` ranks (``layout.virtual`` chunks per rank for
    the interleaved schedule); ``head`` runs before the first block on the first stage, ``tail``
    after the last one on the last stage. Each stage module gets TP (+SP) on the "tp" mesh,
    the plan's recompute and FSDP2 on the "dp" mesh (``apply_plan``). Returns ``(schedule,
    stage_module)``: call ``schedule.step(x)`` on the first stage, ``schedule.step(target=y,
    losses=[])`` on the last, ``schedule.step()`` elsewhere. Weights tied across stages need
    ``sync_tied_grads``: ``build_stages`` returns them, ``Trainer`` syncs them.
    """
    s = build_stages(blocks, layout, mesh, head=head, tail=tail, loss_fn=loss_fn, device=device)
    return s.schedule, s.module


# -- the training step -------------------------------------------------------------------------------


@dataclass
class Trainer:
    """Runs one training step of a layout: give ``step`` the global batch on every rank."""

    layout: Layout
    mesh: Any
    module: nn.Module  # this rank's model (or stage modules): its parameters are the optimizer's
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    stages: Stages | None = None
    tied_group: Any = None

    def parameters(self) -> Any:
        return self.module.parameters()

    def local(self, batch: torch.Tensor) -> torch.Tensor:
        """This DP replica's slice of the global batch (dim 0)."""
        d, rank = self.layout.dp, self.mesh["dp"].get_local_rank()
        if batch.shape[0] % (d * self.layout.num_micro):
            raise ValueError(f"a batch of {batch.shape[0]} does not split into dp{d} x {self.layout.num_micro} micro-batches")
        per = batch.shape[0] // d
        mb = self.layout.micro_batch
        if mb and per != mb * self.layout.num_micro:
            raise ValueError(f"the plan runs micro-batches of {mb} x {self.layout.num_micro}; this replica has {per}")
        return batch[rank * per : (rank + 1) * per]

    def step(self, inputs: torch.Tensor, target: torch.Tensor) -> float:
        """Forward and backward over the plan's micro-batches; leaves the gradients (synced over
        DP and tied weights) for ``optimizer.step()``. Returns the global batch's mean loss, the
        same on every rank."""
        x, y = self.local(inputs), self.local(target)
        loss = self._pipeline(x, y) if self.stages is not None else self._accumulate(x, y)
        t = torch.tensor(loss, dtype=torch.float64)
        dist.all_reduce(t, group=self.mesh["dp"].get_group())  # each replica has as many tokens
        return t.item() / self.layout.dp

    def _accumulate(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Gradient accumulation over ``num_micro`` micro-batches. ZeRO-1 (FSDP2) and DDP sync the
        gradients once, after the last; ZeRO-2/3 reduce-scatter each micro-batch's."""
        from torch.distributed.fsdp import FSDPModule

        m, total = self.layout.num_micro, 0.0
        for i, (xs, ys) in enumerate(zip(x.chunk(m), y.chunk(m))):
            last = i == m - 1
            ctx = nullcontext()
            if isinstance(self.module, FSDPModule) and self.layout.zero <= 1:
                self.module.set_requires_gradient_sync(last)
                self.module.set_reshard_after_backward(last)
            elif hasattr(self.module, "no_sync") and not last:
                ctx = self.module.no_sync()
            with ctx:
                out = self.module(xs)
                loss = self.loss_fn(getattr(out, "logits", out), ys) / m
                loss.backward()
            total += loss.item()
        return total

    def _pipeline(self, x: torch.Tensor, y: torch.Tensor) -> float:
        assert self.stages is not None
        pp_rank, last = self.mesh["pp"].get_local_rank(), self.layout.pp - 1
        losses: list[torch.Tensor] = []
        if pp_rank == 0:
            self.stages.schedule.step(x)
        elif pp_rank == last:
            self.stages.schedule.step(target=y, losses=losses)
        else:
            self.stages.schedule.step()
        sync_tied_grads(self.stages.tied_params(), self.tied_group)
        # The last stage holds the micro-batch losses; the replica's mean is theirs.
        lt = torch.stack(losses).mean().detach().double() if losses else torch.zeros((), dtype=torch.float64)
        dist.broadcast(lt, group=self.mesh["pp"].get_group(), group_src=last)
        return lt.item()


def parallelize(
    model: nn.Module,
    layout: Layout,
    mesh: Any,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lm_loss,
    parts: PipelineParts | None = None,
    tp_plan: Callable[[nn.Module], dict[str, Any]] | None = None,
    device: torch.device | str = "cpu",
) -> Trainer:
    """Apply every field of ``layout`` to ``model`` (every rank builds the same model and
    calls this); returns the ``Trainer`` that runs its steps. ``loss_fn(logits, target)``."""
    if layout.pp == 1:
        plan = tp_plan(model) if tp_plan is not None else None
        module = apply_plan(model.to(device), layout, mesh, tp_plan=plan, blocks=find_blocks(model))
        return Trainer(layout, mesh, module, loss_fn)
    parts = parts if parts is not None else split_model(model)
    stages = build_stages(parts.blocks, layout, mesh, head=parts.head, tail=parts.tail, loss_fn=loss_fn,
                          device=device, tp_plan=tp_plan)  # fmt: skip
    return Trainer(layout, mesh, stages.module, loss_fn, stages, tied_group(layout, mesh))
