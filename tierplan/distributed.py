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
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Layout", "apply_plan", "auto_tp_plan", "find_blocks", "init_mesh", "pipeline_stage"]

_COLWISE = re.compile(r"(^|\.)(q_proj|k_proj|v_proj|gate_proj|up_proj|w1|w3|fc1|c_fc|query|key|value|wq|wk|wv)$")
_ROWWISE = re.compile(r"(^|\.)(o_proj|down_proj|w2|fc2|out_proj|wo|dense_4h_to_h)$")


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


def auto_tp_plan(model: nn.Module) -> dict[str, Any]:
    """Megatron's pairing by name: input projections column-wise, output projections row-wise."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, Any] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if _COLWISE.search(name):
            plan[name] = ColwiseParallel()
        elif _ROWWISE.search(name):
            plan[name] = RowwiseParallel()
    return plan


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
