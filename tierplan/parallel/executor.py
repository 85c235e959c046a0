"""Apply a parallel plan with torch.distributed's own machinery (no home-made runtime).

    # in a script launched by torchrun
    layout = Layout.from_plan(plan)               # or Layout(dp=2, tp=4, zero=3)
    mesh = init_mesh(layout)                      # a DeviceMesh ("dp", "tp") on this world
    model = apply_plan(model, layout, mesh)       # TP via DTensor, then FSDP2 / DDP
    # ... the usual loop: loss.backward(); optimizer.step()

What each knob becomes:
- TP: ``torch.distributed.tensor.parallel.parallelize_module`` on the mesh's "tp" dimension with
  a plan of ``ColwiseParallel`` / ``RowwiseParallel`` per linear (``auto_tp_plan`` reads the
  usual names: q/k/v/gate/up/fc1 column-wise, o/down/fc2 row-wise; pass ``tp_plan`` otherwise).
  GPT-2's ``Conv1D`` (a linear stored transposed, weight ``[in, out]``) gets ``Conv1DColwise`` /
  ``Conv1DRowwise``: the same styles with the shard dimensions swapped. Its fused ``c_attn``
  (output ``[q | k | v]``) is sharded ``_StridedShard(1, split_factor=3)``, so each rank holds
  ``[q_r | k_r | v_r]`` (whole heads of each) while the DTensor's global view stays the
  original weight (``full_tensor()`` and checkpoints are unchanged); ``apply_plan`` then sets
  the attention's ``split_size`` to the local width. Known gap, FSDP2 x TP only: FSDP2 then
  shards ``c_attn.bias`` on the same dim as TP's ``_StridedShard`` and labels it
  ``(_StridedShard(0, dp), _StridedShard(0, 3))``, which does not describe the layout, so that
  tensor's ``full_tensor()`` (and a full or resharded checkpoint of it) comes out permuted.
  Training is exact (the forward gathers with FSDP's own all-gather); to read it whole,
  ``unshard()`` the FSDP modules and assemble the TP DTensors.
  Sequence parallelism, which the cost model assumes with TP, is not applied here: it needs the
  norms wrapped as ``SequenceParallel`` with model-specific layouts (see the report).
- ZeRO 3: FSDP2 ``fully_shard`` on every block, then the root, ``reshard_after_forward=True``.
- ZeRO 1 and 2: ``fully_shard`` with ``reshard_after_forward=False`` (parameters stay gathered
  between forward and backward: FSDP2's SHARD_GRAD_OP; FSDP2 has no optimizer-only sharding, so
  stage 1 runs as stage 2, which uses no more memory).
- ZeRO 0 with DP > 1: ``DistributedDataParallel`` (TP = 1) or ``fully_shard`` otherwise.
- PP: ``torch.distributed.pipelining`` (``pipeline_stage``): the model's blocks are split
  evenly over the "pp" mesh dimension, and a ``Schedule1F1B`` / ``ScheduleInterleaved1F1B``
  (per the plan) drives the micro-batches.
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
    "init_mesh",
    "pipeline_stage",
]

_COLWISE = re.compile(r"(^|\.)(q_proj|k_proj|v_proj|gate_proj|up_proj|w1|w3|fc1|c_fc|query|key|value|wq|wk|wv)$")
_ROWWISE = re.compile(r"(^|\.)(o_proj|down_proj|w2|fc2|out_proj|wo|dense_4h_to_h)$")
# GPT-2 (and its relatives) name their Conv1D layers c_attn (fused q|k|v), c_fc, c_proj.
_CONV1D_COLWISE = re.compile(r"(^|\.)(c_attn|c_fc)$")
_CONV1D_ROWWISE = re.compile(r"(^|\.)c_proj$")


@dataclass(frozen=True)
class Layout:
    """The part of a plan that decides how processes are arranged and modules wrapped."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 3
    num_micro: int = 1
    schedule: str = "1f1b"  # "1f1b", "interleaved" or "none"
    virtual: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @staticmethod
    def from_plan(plan: Any) -> Layout:
        """From a ``ParallelPlan`` (or its ``config`` dict)."""
        c = plan.config if hasattr(plan, "config") else plan
        return Layout(dp=c["dp"], tp=c["tp"], pp=c["pp"], zero=c["zero"],
                      num_micro=c.get("num_micro", 1), schedule=c.get("schedule", "1f1b"),
                      virtual=c.get("virtual", 1))  # fmt: skip


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


def apply_plan(
    model: nn.Module,
    layout: Layout,
    mesh: Any,
    *,
    tp_plan: dict[str, Any] | None = None,
    blocks: list[nn.Module] | None = None,
) -> nn.Module:
    """Apply TP then data parallelism (FSDP2 or DDP) to ``model`` in place; returns the module
    to train. Pipeline parallelism splits the model first (``pipeline_stage``)."""
    if layout.tp > 1:
        from torch.distributed.tensor.parallel import parallelize_module

        plan = tp_plan if tp_plan is not None else auto_tp_plan(model)
        if not plan:
            raise ValueError("TP > 1 but no linear layer matched; pass tp_plan={fqn: style}")
        parallelize_module(model, mesh["tp"], plan)
        _localize_fused(model, plan, layout.tp)
    if layout.dp > 1:
        if layout.zero == 0 and layout.tp == 1:
            from torch.nn.parallel import DistributedDataParallel

            group = mesh["dp"].get_group()
            return DistributedDataParallel(model, process_group=group)
        from torch.distributed.fsdp import fully_shard

        dp_mesh = mesh["dp"]
        reshard = layout.zero >= 3
        for block in blocks if blocks is not None else find_blocks(model):
            fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard)
    return model


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
    after the last one on the last stage. Returns ``(schedule, stage_module)``: call
    ``schedule.step(x)`` on the first stage, ``schedule.step(target=y, losses=[])`` on the last,
    ``schedule.step()`` elsewhere.
    """
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    pp_mesh = mesh["pp"]
    rank, size = pp_mesh.get_local_rank(), layout.pp
    chunks = size * max(1, layout.virtual)
    if len(blocks) % chunks:
        raise ValueError(f"{len(blocks)} blocks do not split into {chunks} pipeline chunks")
    per = len(blocks) // chunks
    stages, modules = [], []
    # Chunk c lives on rank c % size (Megatron's interleaving); with virtual = 1 chunk c = rank.
    for c in range(rank, chunks, size):
        parts: list[nn.Module] = []
        if c == 0 and head is not None:
            parts.append(head)
        parts += blocks[c * per : (c + 1) * per]
        if c == chunks - 1 and tail is not None:
            parts.append(tail)
        module = nn.Sequential(*parts).to(device)
        modules.append(module)
        stages.append(PipelineStage(module, c, chunks, torch.device(device),
                                    group=pp_mesh.get_group()))  # fmt: skip
    if layout.virtual > 1:
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches=layout.num_micro, loss_fn=loss_fn)
    else:
        schedule = Schedule1F1B(stages[0], n_microbatches=layout.num_micro, loss_fn=loss_fn)
    return schedule, modules[0] if len(modules) == 1 else nn.ModuleList(modules)
