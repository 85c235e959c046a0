"""Every field of a training plan, applied by ``tierplan.parallel.pipeline.parallelize``, trains a
small GPT-2 as one process does: 4 and 8 gloo processes (CPU), 3 SGD steps, losses and parameters
within 1e-5 relative of the single-process run.

The layouts are the search's (``plan_parallel`` for ``gpt2-tiny`` on 4 and 8 CPU devices): its top
plans, one of each kind it emits (dp x tp x pp, ZeRO stage, micro-batches, offload, sequence
parallelism), pp2 x dp2 x tp2 on 8 processes, and plans the search prices under a fixed layout
(``layout=``) for recompute. Each world size is one ``mp.spawn`` whose processes run every case in
turn, a new mesh each.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gloo_harness import BATCH, SEQ, ranked_plans, spawn_ranks
from tierplan.parallel.executor import Layout

RTOL, ATOL = 1e-5, 1e-6  # relative agreement; ATOL only for parameters that are ~0
VOCAB = 128
STEPS, LR = 3, 0.5
LAYERS = 2  # gpt2-tiny's: the plans' recompute counts are per stage of these layers

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test on Linux")


def _gpt2(layers: int = LAYERS) -> nn.Module:
    """GPT-2 from a config: n_embd 64, 4 heads (TP 4 splits them), vocab 128, no dropout, tied
    embeddings, random weights from a fixed seed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=layers, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def _data() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def _reference(layers: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = _gpt2(layers)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ids = _data()
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.named_parameters(remove_duplicate=False)}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _trained(gpt: nn.Module, trainer: Any) -> dict[str, torch.Tensor]:
    """This rank's trained parameters whole, by the model's names (a pipeline stage: its own).
    FSDP2 modules are gathered first (``unshard``), as the forward does; then TP's DTensors."""
    from torch.distributed.fsdp import FSDPModule

    fsdp = [m for m in trainer.module.modules() if isinstance(m, FSDPModule)]
    for m in fsdp:
        m.unshard()
    owned = {id(p) for p in trainer.module.parameters()}
    full = {k: _full(v).detach().clone() for k, v in gpt.named_parameters(remove_duplicate=False)
            if id(v) in owned}  # fmt: skip
    for m in fsdp:
        m.reshard()
    return full


def _check(name: str, losses: list[float], ref_losses: list[float],
           params: dict[str, torch.Tensor], ref_params: dict[str, torch.Tensor]) -> tuple[float, float]:  # fmt: skip
    assert len(losses) == len(ref_losses), f"{name}: {len(losses)} losses"
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= RTOL * abs(b), f"{name}: step {i} loss {a!r} != {b!r} (single process)"
    assert params, f"{name}: no parameters compared"
    for k, v in params.items():
        torch.testing.assert_close(v, ref_params[k], rtol=RTOL, atol=ATOL,
                                   msg=lambda m, k=k: f"{name}: parameter {k}: {m}")  # fmt: skip
    loss_dev = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    param_dev = max(((v - ref_params[k]).abs() / ref_params[k].abs().clamp_min(ATOL / RTOL)).max().item()
                    for k, v in params.items())  # fmt: skip
    return loss_dev, param_dev


def _run(config: dict[str, Any], layers: int) -> tuple[list[float], dict[str, torch.Tensor], Layout]:
    from tierplan.parallel.executor import init_mesh
    from tierplan.parallel.pipeline import parallelize

    layout = Layout.from_plan(config)
    mesh = init_mesh(layout, "cpu")
    gpt = _gpt2(layers)
    trainer = parallelize(gpt, layout, mesh)
    opt = torch.optim.SGD(trainer.parameters(), lr=LR)
    ids = _data()
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        losses.append(trainer.step(ids, ids))
        opt.step()
    return losses, _trained(gpt, trainer), layout


def _worker(rank: int, world: int, port: int, out: str, cases: list[tuple[str, dict[str, Any], int]]) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    log = []
    try:
        torch.set_num_threads(1)
        refs: dict[int, tuple[list[float], dict[str, torch.Tensor]]] = {}
        for name, config, layers in cases:
            if layers not in refs:
                refs[layers] = _reference(layers)
            ref_losses, ref_params = refs[layers]
            t = time.perf_counter()
            losses, params, layout = _run(config, layers)
            loss_dev, param_dev = _check(name, losses, ref_losses, params, ref_params)
            log.append(f"{name} [{layout}] {time.perf_counter() - t:.1f}s: loss rel dev {loss_dev:.1e}, "
                       f"param rel dev {param_dev:.1e} ({len(params)} tensors)")  # fmt: skip
        Path(out, f"rank{rank}").write_text("ok\n" + "\n".join(log))
    except BaseException:
        Path(out, f"rank{rank}").write_text(traceback.format_exc())
    finally:
        dist.destroy_process_group()


def _features(c: dict[str, Any]) -> set[tuple]:
    """What a plan exercises in the executor; plans adding nothing new run the same code."""
    pipe = c["pp"] > 1
    return {("mesh", c["dp"], c["tp"], c["pp"]), ("zero", c["zero"], pipe, c["tp"] > 1), ("micro", c["num_micro"] > 1, pipe),
            ("offload", c["offload_optimizer"], c["offload_params"], pipe), ("sp", c["sequence_parallel"], pipe),
            ("schedule", c["schedule"], c["virtual"])}  # fmt: skip


def _name(c: dict[str, Any]) -> str:
    from tierplan.parallel.types import ParallelPlan

    return ParallelPlan("train", c, None, None, 0).describe()  # type: ignore[arg-type]


def _cases(world: int, top: int) -> list[tuple[str, dict[str, Any], int]]:
    """The search's ``top`` plans, then, in rank order, each plan exercising something the ones
    before did not (a mesh shape, a ZeRO stage, micro-batches, offload, SP, with and without a
    pipeline)."""
    seen: set[tuple] = set()
    cases = []
    for i, c in enumerate(ranked_plans(world)):
        if i < top or not _features(c) <= seen:
            seen |= _features(c)
            cases.append((f"#{i} {_name(c)}", c, LAYERS))
    return cases


def _fixed(world: int, layout: str, layers: int = LAYERS, **change: Any) -> tuple[str, dict[str, Any], int]:
    """The search's best plan under a fixed ``layout`` (``change`` edits it: a schedule the
    2-layer profile cannot take, run on a deeper model)."""
    plans = ranked_plans(world, layout)
    assert plans, f"the search found no plan for {layout!r} on {world} devices"
    c = {**plans[0], **change}
    return (f"[{layout}] {_name(c)}" + (f" on {layers} layers" if layers != LAYERS else ""), c, layers)


def test_from_plan_carries_every_field() -> None:
    config = {"dp": 2, "tp": 2, "pp": 2, "zero": 1, "micro_batch": 2, "num_micro": 4,
              "schedule": "interleaved", "virtual": 2, "recompute": {"full": 1, "none": 1},
              "recompute_by_stage": {"first": {"full": 1, "none": 1}, "last": {"selective": 2}},
              "offload_optimizer": True, "offload_params": False, "sequence_parallel": True}  # fmt: skip
    layout = Layout.from_plan(config)
    assert (layout.dp, layout.tp, layout.pp, layout.zero) == (2, 2, 2, 1)
    assert (layout.micro_batch, layout.num_micro, layout.schedule, layout.virtual) == (2, 4, "interleaved", 2)
    assert layout.sp and layout.offload_optimizer and not layout.offload_params
    assert layout.recompute_options(0, 2) == ["full", "none"]
    assert layout.recompute_options(1, 2) == ["selective", "selective"]
    assert layout.recompute_options(0, 3) == ["full", "none", "none"]
    with pytest.raises(ValueError):
        layout.recompute_options(1, 1)
    # Every plan the search emits converts, every field carried.
    for c in ranked_plans(8):
        layout = Layout.from_plan(c)
        assert layout.world_size == 8 and layout.sp == c["sequence_parallel"]
        assert (layout.offload_optimizer, layout.offload_params) == (c["offload_optimizer"], c["offload_params"])
        assert layout.num_micro == c["num_micro"] and layout.micro_batch == c["micro_batch"]


def test_recompute_reruns_the_chosen_cells() -> None:
    """One process: each option checkpoints its cell (its layers run again in the backward), and
    the gradients do not change."""
    from tierplan.parallel.executor import apply_recompute, find_blocks

    ids = _data()
    options = ["none", "full", "attn", "mlp", "selective"]
    model = _gpt2(layers=5)
    model.config.use_cache = False  # apply_plan does it: a replay must not write the KV cache again
    blocks = find_blocks(model)
    apply_recompute(blocks, options)
    calls: dict[str, int] = {}
    for name, mod in model.named_modules():
        if name.endswith(("c_attn", "c_fc")):
            mod.register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    model(input_ids=ids, labels=ids).loss.backward()
    again = {o: (calls[f"transformer.h.{i}.attn.c_attn"], calls[f"transformer.h.{i}.mlp.c_fc"])
             for i, o in enumerate(options)}  # fmt: skip
    assert again == {"none": (1, 1), "full": (2, 2), "attn": (2, 1), "mlp": (1, 2), "selective": (2, 1)}
    plain = _gpt2(layers=5)
    plain(input_ids=ids, labels=ids).loss.backward()
    for (k, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow  # ~40 s on 2 cores (CI runs slow tests too)
def test_four_processes_run_the_searchs_plans() -> None:
    """World 4: the search's top plans and one of each other kind (dp4, dp2 x tp2 + SP, tp4,
    pp2 with dp2 or tp2, ZeRO 0-3, micro-batches, offload), recompute mixes it prices under a
    fixed layout, and the interleaved schedule (on 4 layers: the 2-layer profile cannot take it)."""
    cases = _cases(4, top=4)
    cases.append(_fixed(4, "dp2 tp2 rc[fullx1,selectivex1] mb4x1 zero3"))
    cases.append(_fixed(4, "pp2 dp2 rc[attnx1] zero3 offload[optimizer+params]"))
    cases.append(_fixed(4, "dp4 rc[mlp] mb1x2 zero1"))
    cases.append(_fixed(4, "pp2 dp2 zero2 mb1x4", layers=4, schedule="interleaved", virtual=2))
    spawn_ranks(_worker, 4, cases)


@pytest.mark.slow  # ~70 s on 2 cores
def test_eight_processes_run_pp_dp_tp() -> None:
    """World 8: pp2 x dp2 x tp2 (+SP) as the search ranks it (and with recompute and offload),
    then the search's top plans (dp4 x tp2, dp2 x tp4). The other kinds run on 4 processes above:
    8 processes on a 2-core runner cost a minute and a half."""
    cases = [_fixed(8, "pp2 dp2 tp2"), _fixed(8, "pp2 dp2 tp2 rc[selective] zero3 offload[optimizer+params]")]
    cases += [(f"#{i} {_name(c)}", c, LAYERS) for i, c in enumerate(ranked_plans(8)[:3])]
    spawn_ranks(_worker, 8, cases)
