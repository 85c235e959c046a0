"""Apply a parallel plan with torch.distributed's own machinery (no home-made runtime).

    # in a script launched by torchrun
    layout = Layout.from_plan(plan)               # every field the search priced
    mesh = init_mesh(layout)                      # a DeviceMesh ("pp", "dp", "tp") on this world
    trainer = pipeline.parallelize(model, layout, mesh)   # stages, TP+SP, recompute, FSDP2 / DDP
    # ... loop: opt.zero_grad(); loss = trainer.step(ids, ids); opt.step()
    # (without a pipeline, ``apply_plan(model, layout, mesh)`` and the usual loop also work)

What each field of a training plan (``ParallelPlan.config``) becomes:
- ``dp``, ``tp``, ``pp``: a 3-D ``DeviceMesh`` ("pp", "dp", "tp"), TP innermost, then DP, then
  PP (Megatron's order, the cost model's). Each pipeline stage's module is TP-parallelized on the
  "tp" submesh and FSDP2-sharded (or DDP-replicated) on the "dp" submesh.
- TP: ``parallelize_module`` on "tp" with ``ColwiseParallel`` / ``RowwiseParallel`` per linear
  (``auto_tp_plan`` reads the usual names: q/k/v/gate/up/fc1 column-wise, o/down/fc2 row-wise;
  pass ``tp_plan`` otherwise). GPT-2's ``Conv1D`` (a linear stored transposed, weight
  ``[in, out]``) gets ``Conv1DColwise`` / ``Conv1DRowwise``: the same styles with the shard
  dimensions swapped. Its fused ``c_attn`` (output ``[q | k | v]``) is sharded
  ``_StridedShard(1, split_factor=3)``, so each rank holds ``[q_r | k_r | v_r]`` (whole heads of
  each) while the DTensor's global view stays the original weight; ``apply_plan`` then sets the
  attention's ``split_size`` to the local width. Known gap, FSDP2 x TP only: FSDP2 then shards
  ``c_attn.bias`` on the same dim as TP's ``_StridedShard`` and labels it
  ``(_StridedShard(0, dp), _StridedShard(0, 3))``, which does not describe the layout, so that
  tensor's ``full_tensor()`` (and a full or resharded checkpoint of it) comes out permuted.
  Training is exact; to read it whole, ``unshard()`` the FSDP modules and assemble the TP
  DTensors.
- ``sequence_parallel``: DTensor sequence parallelism inside the blocks (``_sp_plan``): norms
  ``SequenceParallel`` on Shard(1), each module holding a column-wise layer all-gathers its
  hidden-states input (Shard(1) -> Replicate, a DTensor redistribute in a pre-hook), row-wise layers
  ``output_layouts=Shard(1)`` (reduce-scatter instead of all-reduce). The first block of each
  model / stage keeps its rank's slice of the sequence, the last all-gathers it, so embeddings,
  head and pipeline sends see whole sequences (one all-gather per stage more than Megatron, which
  also splits the embedding output and the head input). The hidden states are found as a
  module's first positional argument or its ``hidden_states=`` keyword: GPT-2 (tested against
  one process) and Llama-style layers (run by the example, not compared).
- ``recompute`` / ``recompute_by_stage``: ``torch.utils.checkpoint`` (non-reentrant) on the
  ``forward`` of the cell each block's option names (``apply_recompute``): "full" the block,
  "attn" / "mlp" that cell, "selective" the attention cell under a selective-checkpoint policy
  that keeps the matmul outputs and recomputes the rest (the attention core: scores, softmax,
  weighted sum), "none" nothing. The counts are per stage: the "first" mix on every stage but
  the last, the "last" mix there; the options are laid out heaviest first; a stage with more
  blocks than the mix counts runs the rest without recompute. Checkpointing the ``forward``
  (not ``__call__``) keeps FSDP2's hooks outside the replay; a transformers model's KV cache is
  turned off (``config.use_cache``), as the replay would write it twice.
- ``zero`` 3: FSDP2 ``fully_shard`` on every block, then the root, ``reshard_after_forward=True``.
- ``zero`` 2: ``fully_shard`` with ``reshard_after_forward=False`` (FSDP2's SHARD_GRAD_OP:
  parameters stay gathered from forward to backward; gradients reduce-scattered each
  micro-batch).
- ``zero`` 1, as close as FSDP2 allows: as ZeRO 2, and over the micro-batches of a step the
  gradients are accumulated unsharded and reduced once after the last
  (``set_requires_gradient_sync`` / ``set_reshard_after_backward`` off until then). With a
  pipeline, torch's schedules do this for FSDP stages whatever the ZeRO stage: ZeRO 2 and 3
  there also reduce once per step and keep a stage's parameters gathered across its
  micro-batches (``reshard_after_forward`` still applies within one). FSDP2 has no replicated-gradient, sharded-optimizer
  mode: after the step's reduce-scatter each rank keeps a gradient shard (ZeRO 2's memory), not
  the whole gradient ZeRO 1 keeps; the traffic is ZeRO 1's (one reduction per step).
- ``zero`` 0: ``DistributedDataParallel`` over "dp" when that is all (tp 1, pp 1, no offload);
  with TP, a pipeline or offload, FSDP2 with ``reshard_after_forward=False`` (DDP does not take
  DTensor parameters nor pipeline stages here).
- ``offload_optimizer`` / ``offload_params``: FSDP2 ``CPUOffloadPolicy`` (also with dp 1: FSDP2
  over a 1-rank "dp" mesh). FSDP2 offloads parameters, gradients and the optimizer step
  together, so ``offload[optimizer]`` also moves the parameters to the host (it has no
  optimizer-only offload). On a CPU-only gloo run the policy is applied but moves nothing
  (``pin_memory`` off without an accelerator).
- ``micro_batch`` x ``num_micro``: with a pipeline, the schedule's micro-batches; without one,
  gradient accumulation in ``pipeline.Trainer.step`` (each micro-batch's loss over
  ``num_micro``; DDP ``no_sync`` until the last). ``Trainer`` checks that the replica's batch
  is ``micro_batch x num_micro``.
- ``pp``, ``schedule``, ``virtual``: ``torch.distributed.pipelining`` (``pipeline.build_stages``):
  the blocks split evenly over the "pp" ranks, ``virtual`` chunks per rank (chunk c on rank
  c % pp), ``Schedule1F1B`` or ``ScheduleInterleaved1F1B``.
- Weights tied across stages (GPT-2's ``wte`` and LM head): ``build_stages`` finds the
  parameters both the head and the tail hold; ``Trainer.step`` sums their gradients over the
  first and last stage (``tied_group``, ``sync_tied_grads``) before the optimizer step.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "Conv1DColwise",
    "Conv1DRowwise",
    "Layout",
    "apply_plan",
    "auto_tp_plan",
    "find_blocks",
    "apply_recompute",
    "init_mesh",
    "shard",
    "sync_tied_grads",
    "tied_group",
    "uses_ddp",
]

_COLWISE = re.compile(r"(^|\.)(q_proj|k_proj|v_proj|gate_proj|up_proj|w1|w3|fc1|c_fc|query|key|value|wq|wk|wv)$")
_ROWWISE = re.compile(r"(^|\.)(o_proj|down_proj|w2|fc2|out_proj|wo|dense_4h_to_h)$")
# GPT-2 (and its relatives) name their Conv1D layers c_attn (fused q|k|v), c_fc, c_proj.
_CONV1D_COLWISE = re.compile(r"(^|\.)(c_attn|c_fc)$")
_CONV1D_ROWWISE = re.compile(r"(^|\.)c_proj$")


Mix = tuple[tuple[str, int], ...]  # recompute option -> blocks of a stage taking it, in order

# The order blocks of a stage take their recompute options: the heaviest first (any order prices
# the same; a fixed one makes every rank agree).
_RECOMPUTE_ORDER = ("full", "mlp", "attn", "selective", "none")


def _mix(d: dict[str, int] | None) -> Mix:
    d = d or {}
    return tuple((k, int(d[k])) for k in _RECOMPUTE_ORDER if d.get(k))


@dataclass(frozen=True)
class Layout:
    """Every field of a training plan the executor applies (``from_plan`` reads a search plan).

    ``recompute`` is the mix of a stage's blocks (option -> count; the first stage's, used for
    every stage but the last), ``recompute_last`` the last pipeline stage's when it differs.
    ``micro_batch`` 0 means "the per-replica batch over ``num_micro``"."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 3
    num_micro: int = 1
    micro_batch: int = 0
    schedule: str = "1f1b"  # "1f1b", "interleaved" or "none"
    virtual: int = 1
    sp: bool = False
    recompute: Mix = ()
    recompute_last: Mix | None = None
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def offload(self) -> bool:
        return self.offload_optimizer or self.offload_params

    @staticmethod
    def from_plan(plan: Any) -> Layout:
        """From a ``ParallelPlan`` (or its ``config`` dict): every field the search priced."""
        c = plan.config if hasattr(plan, "config") else plan
        tp = c.get("tp", 1)
        by_stage = c.get("recompute_by_stage") or {}
        first = _mix(by_stage.get("first", c.get("recompute")))
        last = _mix(by_stage["last"]) if "last" in by_stage else None
        return Layout(
            dp=c.get("dp", 1), tp=tp, pp=c.get("pp", 1), zero=c.get("zero", 3),
            num_micro=c.get("num_micro", 1), micro_batch=c.get("micro_batch", 0),
            schedule=c.get("schedule", "1f1b"), virtual=c.get("virtual", 1),
            sp=bool(c.get("sequence_parallel", False)) and tp > 1,
            recompute=first, recompute_last=last if last != first else None,
            offload_optimizer=bool(c.get("offload_optimizer", False)),
            offload_params=bool(c.get("offload_params", False)),
        )  # fmt: skip

    def recompute_options(self, stage: int, blocks: int) -> list[str]:
        """The recompute option of each of pipeline stage ``stage``'s ``blocks`` blocks (all its
        virtual chunks, in order). The search counts a stage's layers; a stage with more blocks
        than the mix names runs the rest without recompute."""
        mix = self.recompute_last if stage == self.pp - 1 and self.recompute_last is not None else self.recompute
        options = [name for name, n in mix for _ in range(n)]
        if len(options) > blocks:
            raise ValueError(f"the recompute mix {dict(mix)} names {len(options)} blocks; the stage has {blocks}")
        return options + ["none"] * (blocks - len(options))


def init_mesh(layout: Layout, device_type: str | None = None) -> Any:
    """A DeviceMesh of shape (pp, dp, tp) over the current world, TP innermost (ranks on one
    node), as the cost model lays them out. The process group must be initialized."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if world != layout.world_size:
        raise ValueError(
            f"the plan needs {layout.world_size} processes (dp{layout.dp} x tp{layout.tp} x "
            f"pp{layout.pp}); this world has {world}"
        )
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(device_type, (layout.pp, layout.dp, layout.tp),
                            mesh_dim_names=("pp", "dp", "tp"))  # fmt: skip


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the longest ``nn.ModuleList`` (or numbered ``nn.Sequential``)."""
    best: list[nn.Module] = []
    for mod in model.modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) > len(best):
            kids = list(mod)
            if kids and all(type(k) is type(kids[0]) for k in kids):
                best = kids
    return best


def _is_conv1d(mod: nn.Module) -> bool:
    """transformers' ``Conv1D``: ``y = x @ weight + bias`` with ``weight`` of shape [in, out]."""
    return (type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and hasattr(mod, "nx")
            and tuple(mod.weight.shape) == (mod.nx, mod.nf))  # fmt: skip


@lru_cache(maxsize=None)
def _conv1d_styles() -> tuple[type, type]:
    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    from torch.distributed.tensor.placement_types import _StridedShard

    def _shard(module: nn.Module, name: str, placement: Any, mesh: Any, src: int | None) -> None:
        param = getattr(module, name, None)
        if param is None:
            return
        dist_param = distribute_tensor(param, mesh, [placement], src_data_rank=src)
        module.register_parameter(name, nn.Parameter(dist_param, requires_grad=param.requires_grad))

    class _Conv1DColwise(ColwiseParallel):
        """``ColwiseParallel`` for a transposed linear: weight ``Shard(1)``, bias ``Shard(0)``.

        ``fused=k`` when the output is k concatenated projections (GPT-2's ``c_attn``, k = 3):
        each is split over the ranks (``_StridedShard``), so the local output is
        ``[q_r | k_r | v_r]``. The caller must make the module that splits the output use the
        local width (``apply_plan`` does it for ``split_size``)."""

        def __init__(self, *, fused: int = 1, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            if fused > 1 and not self.use_local_output:
                raise ValueError("a fused Conv1D's caller splits its output: use_local_output=True")
            self.fused = fused

        def _partition_conv1d_fn(self, name: str, module: nn.Module, mesh: Any) -> None:
            k = self.fused
            _shard(module, "weight", _StridedShard(1, split_factor=k) if k > 1 else Shard(1),
                   mesh, self.src_data_rank)  # fmt: skip
            _shard(module, "bias", _StridedShard(0, split_factor=k) if k > 1 else Shard(0),
                   mesh, self.src_data_rank)  # fmt: skip

        def _prepare_output_fn_fused(self, mod: nn.Module, outputs: Any, mesh: Any) -> Any:
            # addmm on a _StridedShard weight yields _StridedShard on the last dim: already the
            # wanted [q_r | k_r | v_r] per rank (a redistribute would only renormalize dims).
            (p,) = outputs.placements
            k = self.fused
            if getattr(p, "dim", None) != outputs.ndim - 1 or getattr(p, "split_factor", 0) != k:
                raise RuntimeError(f"fused Conv1D output placed {p}, expected _StridedShard(-1, {k})")
            return outputs.to_local()

        def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
            if not _is_conv1d(module):
                return super()._apply(module, device_mesh)
            if self.fused > 1:
                out_fn = self._prepare_output_fn_fused
            else:
                out_fn = partial(self._prepare_output_fn, self.output_layouts, self.use_local_output)
            return distribute_module(
                module, device_mesh, self._partition_conv1d_fn,
                partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                out_fn,
            )  # fmt: skip

    class _Conv1DRowwise(RowwiseParallel):
        """``RowwiseParallel`` for a transposed linear: weight ``Shard(0)``, bias replicated."""

        def _partition_conv1d_fn(self, name: str, module: nn.Module, mesh: Any) -> None:
            _shard(module, "weight", Shard(0), mesh, self.src_data_rank)
            _shard(module, "bias", Replicate(), mesh, self.src_data_rank)

        def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
            if not _is_conv1d(module):
                return super()._apply(module, device_mesh)
            self.desired_input_layouts = (Shard(-1),)
            return distribute_module(
                module, device_mesh, self._partition_conv1d_fn,
                partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
            )  # fmt: skip

    return _Conv1DColwise, _Conv1DRowwise


def Conv1DColwise(*, fused: int = 1, **kwargs: Any) -> Any:  # noqa: N802 (a style, like the torch ones)
    """Column-wise TP style for transformers' ``Conv1D`` (``fused=3`` for GPT-2's ``c_attn``)."""
    return _conv1d_styles()[0](fused=fused, **kwargs)


def Conv1DRowwise(**kwargs: Any) -> Any:  # noqa: N802
    """Row-wise TP style for transformers' ``Conv1D`` (GPT-2's ``c_proj``)."""
    return _conv1d_styles()[1](**kwargs)


def _fused_parts(model: nn.Module, name: str, mod: nn.Module) -> int:
    """How many projections a fused Conv1D concatenates: its width over the parent's
    ``split_size`` (GPT-2's attention: 3 for self-attention's c_attn, 2 for cross-attention)."""
    parent = model.get_submodule(name.rpartition(".")[0])
    split = getattr(parent, "split_size", None)
    return mod.nf // split if isinstance(split, int) and split > 0 and mod.nf % split == 0 else 1


def auto_tp_plan(model: nn.Module) -> dict[str, Any]:
    """Megatron's pairing by name: input projections column-wise, output projections row-wise.
    Covers ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2: c_attn, c_fc column-wise, c_proj
    row-wise)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, Any] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            if _COLWISE.search(name):
                plan[name] = ColwiseParallel()
            elif _ROWWISE.search(name):
                plan[name] = RowwiseParallel()
        elif _is_conv1d(mod):
            if _CONV1D_COLWISE.search(name) or _COLWISE.search(name):
                plan[name] = Conv1DColwise(fused=_fused_parts(model, name, mod))
            elif _CONV1D_ROWWISE.search(name) or _ROWWISE.search(name):
                plan[name] = Conv1DRowwise()
    return plan


def _localize_fused(model: nn.Module, plan: dict[str, Any], tp: int) -> None:
    """After sharding a fused projection, the module that splits its output must split the local
    width: GPT-2's attention does ``c_attn(x).split(self.split_size, dim=2)``."""
    for name, style in plan.items():
        if getattr(style, "fused", 1) <= 1:
            continue
        parent = model.get_submodule(name.rpartition(".")[0])
        split = getattr(parent, "split_size", None)
        if not isinstance(split, int) or split % tp:
            raise ValueError(f"{name} is fused; split_size {split!r} does not divide by tp={tp}")
        parent.split_size = split // tp


_NORM = re.compile(r"(LayerNorm|RMSNorm)$")
_ATTN = re.compile(r"(^|\.)(attn|self_attn|attention|self_attention)$")
_MLP = re.compile(r"(^|\.)(mlp|feed_forward|ffn)$")


def _names(model: nn.Module, blocks: list[nn.Module]) -> list[str]:
    where = {id(m): n for n, m in model.named_modules()}
    missing = [b for b in blocks if id(b) not in where]
    if missing:
        raise ValueError(f"{len(missing)} blocks are not submodules of the model")
    return [where[id(b)] for b in blocks]


def _sp_plan(model: nn.Module, blocks: list[nn.Module], tp_plan: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Megatron's sequence parallelism inside the blocks, on top of ``tp_plan`` (its row-wise
    styles changed in place): the residual stream between the TP regions is split on the
    sequence dim (Shard(1)), norms run on their shard (``SequenceParallel``), row-wise layers
    reduce-scatter (``output_layouts=Shard(1)``) instead of all-reducing. Returns the styles to
    add and the modules holding a column-wise layer, whose hidden-states input must be
    all-gathered first (``_sp_boundaries``)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import RowwiseParallel, SequenceParallel

    plan: dict[str, Any] = {}
    gathers: list[str] = []
    prefixes = tuple(n + "." for n in _names(model, blocks))
    for name, style in tp_plan.items():
        if not name.startswith(prefixes):
            continue
        parent = name.rpartition(".")[0]
        if isinstance(style, RowwiseParallel):
            style.output_layouts = (Shard(1),)
            style.use_local_output = True
        elif parent not in gathers:  # column-wise: its caller gathers the sequence first
            gathers.append(parent)
    for name, mod in model.named_modules():
        if name.startswith(prefixes) and _NORM.search(type(mod).__name__):
            plan[name] = SequenceParallel(use_local_output=True)
    return plan, gathers


def _sp_boundaries(model: nn.Module, blocks: list[nn.Module], gathers: list[str], tp_mesh: Any) -> None:
    """Enter the sequence-parallel region at the first block (keep this rank's slice of the
    sequence) and leave it after the last (all-gather), so what runs around the blocks (the
    embeddings, the head, a pipeline send) sees whole sequences; inside, all-gather the hidden
    states entering each module of ``gathers`` (attention, MLP), given by position (GPT-2) or
    as ``hidden_states=`` (Llama)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def to(h: torch.Tensor, src: Any, dst: Any) -> torch.Tensor:
        return DTensor.from_local(h, tp_mesh, [src], run_check=False).redistribute(tp_mesh, [dst]).to_local()

    def on_hidden(src: Any, dst: Any) -> Callable[..., tuple[tuple, dict]]:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (to(args[0], src, dst), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": to(kwargs["hidden_states"], src, dst)}

        return hook

    def leave(mod: nn.Module, args: tuple, out: Any) -> Any:
        if isinstance(out, tuple):
            return (to(out[0], Shard(1), Replicate()), *out[1:])
        return to(out, Shard(1), Replicate())

    # A wrapper that computes something from the whole sequence before its block (the pipeline's
    # rotary-embedding wrapper) names the module where the region starts.
    first, last = (getattr(b, "sp_region", b) for b in (blocks[0], blocks[-1]))
    first.register_forward_pre_hook(on_hidden(Replicate(), Shard(1)), with_kwargs=True)
    last.register_forward_hook(leave)
    for name in gathers:
        model.get_submodule(name).register_forward_pre_hook(on_hidden(Shard(1), Replicate()), with_kwargs=True)


def _save_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """Selective recompute's policy: keep the projections' outputs, recompute the rest (the
    attention core: scores, softmax, weighted sum), as Megatron's selective recompute does."""
    from torch.utils.checkpoint import CheckpointPolicy

    mm = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
    return CheckpointPolicy.MUST_SAVE if op in mm else CheckpointPolicy.PREFER_RECOMPUTE


_CACHE_KWARGS = ("cache", "layer_past", "past_key_value", "past_key_values")


def _checkpoint(module: nn.Module, selective: bool = False) -> None:
    """Recompute ``module``'s forward in the backward (``torch.utils.checkpoint``, non-reentrant,
    so FSDP2's and DTensor's hooks and autograd compose with it). The forward is replaced on the
    instance: parameter names, and so checkpoints, do not change."""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    inner = module.forward
    extra: dict[str, Any] = {}
    if selective:
        extra["context_fn"] = partial(create_selective_checkpoint_contexts, _save_matmuls)

    def forward(*args: Any, **kwargs: Any) -> Any:
        # The replay would write a KV cache a second time (and attend to it): training runs
        # without one, as transformers' own gradient checkpointing does.
        for k in _CACHE_KWARGS:
            if kwargs.get(k) is not None:
                kwargs[k] = None
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        return checkpoint(inner, *args, use_reentrant=False, **extra, **kwargs)

    module.forward = forward  # type: ignore[method-assign]


def _child(block: nn.Module, pattern: re.Pattern[str], what: str) -> nn.Module:
    for name, mod in block.named_modules():
        if name and pattern.search(name):
            return mod
    raise ValueError(f"recompute {what!r}: no {what} module in {type(block).__name__}")


def apply_recompute(blocks: list[nn.Module], options: list[str]) -> None:
    """Activation checkpointing per block: "full" the whole block, "attn" / "mlp" that cell,
    "selective" the attention cell keeping its matmul outputs (the core is recomputed), "none"
    nothing."""
    if len(options) != len(blocks):
        raise ValueError(f"{len(options)} recompute options for {len(blocks)} blocks")
    for block, option in zip(blocks, options):
        if option == "full":
            _checkpoint(block)
        elif option in ("attn", "selective"):
            _checkpoint(_child(block, _ATTN, "attention"), selective=option == "selective")
        elif option == "mlp":
            _checkpoint(_child(block, _MLP, "mlp"))
        elif option != "none":
            raise ValueError(f"unknown recompute option {option!r}")


def uses_ddp(layout: Layout) -> bool:
    """Plain data parallelism runs as DDP; everything else data-parallel as FSDP2."""
    return layout.dp > 1 and layout.zero == 0 and layout.tp == 1 and layout.pp == 1 and not layout.offload


def apply_plan(
    model: nn.Module,
    layout: Layout,
    mesh: Any,
    *,
    tp_plan: dict[str, Any] | None = None,
    blocks: list[nn.Module] | None = None,
    recompute: list[str] | None = None,
) -> nn.Module:
    """Apply TP (+SP), recompute, then data parallelism (FSDP2 or DDP) to ``model`` in place;
    returns the module to train. ``blocks`` default to ``find_blocks(model)``, ``recompute``
    (one option per block) to ``layout.recompute_options(0, len(blocks))``. Pipeline parallelism
    splits the model first and applies this to each stage (``pipeline.pipeline_stage``)."""
    blocks = blocks if blocks is not None else find_blocks(model)
    recompute = recompute if recompute is not None else layout.recompute_options(0, len(blocks))
    config = getattr(model, "config", None)
    if any(o != "none" for o in recompute) and getattr(config, "use_cache", False):
        config.use_cache = False  # a transformers model passes its cache positionally to blocks
    if layout.tp > 1:
        from torch.distributed.tensor.parallel import parallelize_module

        kv_heads = getattr(config, "num_key_value_heads", None)
        if kv_heads and kv_heads % layout.tp:
            # The search prices tp > KV heads as Megatron does (each KV head replicated over
            # tp / kv_heads ranks); DTensor's column-wise split of k/v cannot express that.
            raise ValueError(
                f"tp{layout.tp} does not divide the model's {kv_heads} KV heads: the executor shards "
                f"k_proj/v_proj by heads and cannot replicate KV heads; choose tp <= {kv_heads} "
                f"dividing it")
        plan = tp_plan if tp_plan is not None else auto_tp_plan(model)
        if not plan:
            raise ValueError("TP > 1 but no linear layer matched; pass tp_plan={fqn: style}")
        gathers: list[str] = []
        if layout.sp:
            norms, gathers = _sp_plan(model, blocks, plan)
            plan = {**plan, **norms}
        parallelize_module(model, mesh["tp"], plan)
        _localize_fused(model, plan, layout.tp)
        if layout.sp:
            _sp_boundaries(model, blocks, gathers, mesh["tp"])
    apply_recompute(blocks, recompute)
    if uses_ddp(layout):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, process_group=mesh["dp"].get_group())
    if layout.dp > 1 or layout.offload:
        shard(model, blocks, layout, mesh["dp"])
    return model


def shard(model: nn.Module, blocks: list[nn.Module], layout: Layout, dp_mesh: Any) -> None:
    """FSDP2 ``fully_shard`` on every block, then the root, over the "dp" mesh. ZeRO 3 reshards
    the parameters after the forward; ZeRO 0-2 keep them gathered until the backward (see the
    module docstring for ZeRO 1). Offload adds ``CPUOffloadPolicy``."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    # pin_memory needs an accelerator; on a CPU-only machine the policy is a no-op move.
    policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if layout.offload else OffloadPolicy()
    reshard = layout.zero >= 3
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, offload_policy=policy)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard, offload_policy=policy)


def tied_group(layout: Layout, mesh: Any) -> Any:
    """The process group of this rank's first and last pipeline stage (same dp and tp
    coordinates): the two holders of a weight tied across the pipeline. Every rank calls this
    (``new_group`` is collective); None without a pipeline."""
    if layout.pp == 1:
        return None
    ranks = mesh.mesh  # (pp, dp, tp) -> global rank
    mine = None
    for d in range(layout.dp):
        for t in range(layout.tp):
            pair = [int(ranks[0, d, t]), int(ranks[-1, d, t])]
            group = dist.new_group(pair)
            if dist.get_rank() in pair:
                mine = group
    return mine


def sync_tied_grads(params: list[nn.Parameter], group: Any) -> None:
    """Sum the gradients of weights tied across pipeline stages (GPT-2's token embedding on the
    first stage, its LM head on the last) so both copies take the same step (Megatron's
    embedding all-reduce). Under FSDP2 both hold the same dp shard, so local shards add up."""
    if group is None:
        return
    for p in params:
        if p.grad is None:
            continue
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        with torch.no_grad():
            dist.all_reduce(g, group=group)
