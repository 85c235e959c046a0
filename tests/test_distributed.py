"""Parallel plans applied with torch.distributed on 2 and 4 gloo processes (CPU) match the
single-process run: a small custom net, and a small GPT-2 (``transformers.GPT2LMHeadModel``)
under FSDP2 (dp 2, dp 4), tensor parallelism (tp 2, tp 4, dp 2 x tp 2) and a 2-stage pipeline.

The layouts come from ``plan_parallel`` (the planner's ranked plans for ``gpt2-tiny`` on 2 and 4
CPU devices), computed once in the test process; each world size is one ``mp.spawn`` whose
processes run every layout in turn (a new mesh each) and compare losses and parameters with a
single-process reference run, within 1e-5 relative.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gloo_harness import BATCH, SEQ, ranked_plans, spawn_ranks
from tierplan.parallel.executor import Layout, auto_tp_plan, find_blocks

RTOL, ATOL = 1e-5, 1e-6  # relative agreement; ATOL only for parameters that are ~0


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, d: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


STEPS, LR = 2, 0.05


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=g), torch.randn(8, 1, generator=g)


def _model() -> Net:
    torch.manual_seed(0)
    return Net()


def _reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = _data()
    losses = []
    for _ in range(STEPS):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * abs(b)


def _check(name: str, losses: list[float], ref_losses: list[float],
           params: dict[str, torch.Tensor], ref_params: dict[str, torch.Tensor]) -> str:  # fmt: skip
    """Assert agreement; returns the largest deviations, for the log."""
    assert len(losses) == len(ref_losses), f"{name}: {len(losses)} losses"
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        assert _close(a, b), f"{name}: step {i} loss {a!r} != {b!r} (single process)"
    assert params, f"{name}: no parameters compared"
    for k, v in params.items():
        torch.testing.assert_close(v, ref_params[k], rtol=RTOL, atol=ATOL,
                                   msg=lambda m, k=k: f"{name}: parameter {k}: {m}")  # fmt: skip
    loss_dev = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    param_dev = max((v - ref_params[k]).abs().max().item() for k, v in params.items())
    return f"loss rel dev {loss_dev:.1e}, param abs dev {param_dev:.1e} ({len(params)} tensors)"


# -- the custom net: FSDP2, TP (nn.Linear) and 2 pipeline stages on 2 processes ------------------


def _net_fsdp_tp(rank: int) -> None:
    import torch.distributed as dist

    from tierplan.parallel.executor import apply_plan, init_mesh

    ref_losses, ref_state = _reference()
    x, y = _data()
    # FSDP2 (ZeRO-3) over dp = 2: each rank trains on its half of the batch.
    layout = Layout(dp=2, zero=3)
    model = apply_plan(_model(), layout, init_mesh(layout, "cpu"))
    half = slice(rank * 4, rank * 4 + 4)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = nn.functional.mse_loss(model(x[half]), y[half])
        opt.zero_grad()
        loss.backward()
        opt.step()
        lt = loss.detach().clone()  # the full-batch loss is the mean over the DP ranks
        dist.all_reduce(lt)
        losses.append(lt.item() / dist.get_world_size())
    state = {k: _full(v) for k, v in model.state_dict().items()}
    _check("net fsdp", losses, ref_losses, state, ref_state)
    # Tensor parallel over tp = 2: both ranks see the whole batch.
    layout = Layout(tp=2)
    model = apply_plan(_model(), layout, init_mesh(layout, "cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    _check("net tp", losses, ref_losses, {k: _full(v) for k, v in model.state_dict().items()}, ref_state)


def _net_pp(rank: int) -> None:
    """pp = 2, 1F1B over 2 micro-batches: a block per rank, the head on the last stage."""
    import torch.distributed as dist

    from tierplan.parallel.executor import init_mesh
    from tierplan.parallel.pipeline import pipeline_stage

    ref_losses, ref_state = _reference()
    x, y = _data()
    layout = Layout.from_plan({"dp": 1, "tp": 1, "pp": 2, "zero": 0, "num_micro": 2,
                               "schedule": "1f1b", "virtual": 1})  # fmt: skip
    mesh = init_mesh(layout, "cpu")
    model = _model()
    schedule, stage = pipeline_stage(find_blocks(model), layout, mesh, tail=model.head,
                                     loss_fn=nn.functional.mse_loss)  # fmt: skip
    opt = torch.optim.SGD(stage.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        mb_losses: list[torch.Tensor] = []
        if rank == 0:
            schedule.step(x)
        else:
            schedule.step(target=y, losses=mb_losses)
        opt.step()
        # The last stage holds the micro-batch losses; the full-batch MSE is their mean.
        lt = torch.stack(mb_losses).mean().detach() if mb_losses else torch.zeros(())
        dist.broadcast(lt, src=1)
        losses.append(lt.item())
    # The stage module shares its parameters with ``model``: compare those by the model's names.
    owned = {id(p) for p in stage.parameters()}
    params = {k: v.detach() for k, v in model.named_parameters() if id(v) in owned}
    _check("net pp", losses, ref_losses, params, ref_state)


# -- a small GPT-2 ----------------------------------------------------------------------------------

VOCAB = 128
GPT_STEPS, GPT_LR = 3, 0.5


def _gpt2() -> nn.Module:
    """GPT-2 from a config: 2 layers, n_embd 64, 4 heads (so TP 4 splits them), vocab 128, no
    dropout, tied embeddings, random weights from a fixed seed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def _gpt2_data() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def _gpt2_reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    model = _gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=GPT_LR)
    ids = _gpt2_data()
    losses = []
    for _ in range(GPT_STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.named_parameters()}


def _gpt2_spmd(layout: Layout, mesh: Any) -> tuple[list[float], dict[str, torch.Tensor]]:
    """TP and/or FSDP2 by ``apply_plan``; each DP replica trains on its slice of the batch."""
    import torch.distributed as dist

    from tierplan.parallel.executor import apply_plan

    model = apply_plan(_gpt2(), layout, mesh)
    dp_rank, per = mesh["dp"].get_local_rank(), BATCH // layout.dp
    ids = _gpt2_data()[dp_rank * per : (dp_rank + 1) * per]
    opt = torch.optim.SGD(model.parameters(), lr=GPT_LR)
    losses = []
    for _ in range(GPT_STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        # Every replica has as many tokens: the full-batch loss is the mean over DP ranks.
        lt = loss.detach().clone()
        dist.all_reduce(lt, group=mesh["dp"].get_group())
        losses.append(lt.item() / layout.dp)
    full = _full_params(model)
    # The sharded parameters' own global view (what a full state dict / checkpoint reads) is the
    # same, but for the one gap that FSDP2 x TP leaves (see _full_params).
    both = layout.dp > 1 and layout.tp > 1
    for k, v in model.named_parameters():
        if not (both and k.endswith("attn.c_attn.bias")):
            assert torch.equal(_full(v), full[k]), f"{k}: the sharded view differs from the gathered one"
    return losses, full


def _full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter whole. Under FSDP2 the parameters are gathered first (``unshard``), as the
    forward does; then TP's DTensors are assembled. (Under dp x tp, ``full_tensor()`` of the
    FSDP-sharded ``c_attn.bias`` comes out permuted: FSDP2 composes its dim-0 shard with TP's
    ``_StridedShard(0, 3)`` on the same dim into placements that do not describe the layout.)"""
    from torch.distributed.fsdp import FSDPModule

    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp:
        m.unshard()
    full = {k: _full(v).detach().clone() for k, v in model.named_parameters()}
    for m in fsdp:
        m.reshard()
    return full


def _gpt2_pp(layout: Layout, mesh: Any) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Pipeline stages by ``build_stages``: the embeddings on the first stage, the blocks split
    evenly, the final norm and LM head on the last; ``Schedule1F1B`` over the plan's
    micro-batches. GPT-2 ties the LM head to the token embedding, which lives on both the first
    and the last stage: the library finds it (``Stages.tied``) and ``sync_tied_grads`` sums its
    gradient over the two stages before the step (Megatron's embedding all-reduce)."""
    import torch.distributed as dist

    from tierplan.parallel.executor import sync_tied_grads, tied_group
    from tierplan.parallel.pipeline import build_stages, lm_loss, split_model

    if layout.dp != 1 or layout.tp != 1 or layout.pp != 2:
        raise ValueError(f"this test runs 2 pipeline stages alone, not {layout}")
    gpt = _gpt2()
    rank, last = mesh["pp"].get_local_rank(), layout.pp - 1
    parts = split_model(gpt)  # embeddings first, blocks on hidden states, ln_f + LM head last
    stages = build_stages(parts.blocks, layout, mesh, head=parts.head, tail=parts.tail, loss_fn=lm_loss)
    group = tied_group(layout, mesh)
    tied = gpt.transformer.wte.weight
    assert gpt.lm_head.weight is tied and [p is tied for p in stages.tied_params()] == [True]
    opt = torch.optim.SGD(stages.module.parameters(), lr=GPT_LR)
    ids = _gpt2_data()
    losses = []
    for _ in range(GPT_STEPS):
        opt.zero_grad()
        mb_losses: list[torch.Tensor] = []
        if rank == 0:
            stages.schedule.step(ids)
        else:
            stages.schedule.step(target=ids, losses=mb_losses)
        sync_tied_grads(stages.tied_params(), group)
        opt.step()
        lt = torch.stack(mb_losses).mean().detach() if mb_losses else torch.zeros(())
        dist.broadcast(lt, group=mesh["pp"].get_group(), group_src=last)
        losses.append(lt.item())
    owned = {id(p) for p in stages.module.parameters()}
    return losses, {k: v.detach() for k, v in gpt.named_parameters() if id(v) in owned}


def _worker(rank: int, world: int, port: int, out: str, cases: list[tuple[str, dict[str, Any]]],
            net: bool) -> None:  # fmt: skip
    import torch.distributed as dist

    from tierplan.parallel.executor import init_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    log = []
    try:
        torch.set_num_threads(1)
        if net:
            t = time.perf_counter()
            _net_fsdp_tp(rank)
            _net_pp(rank)
            log.append(f"net fsdp/tp/pp {time.perf_counter() - t:.1f}s")
        ref_losses, ref_params = _gpt2_reference()
        assert ref_losses[-1] < ref_losses[0], ref_losses  # it trains: a wrong step would show
        for name, config in cases:
            t = time.perf_counter()
            layout = Layout.from_plan(config)
            mesh = init_mesh(layout, "cpu")
            run = _gpt2_pp if layout.pp > 1 else _gpt2_spmd
            losses, params = run(layout, mesh)
            dev = _check(f"gpt2 {name}", losses, ref_losses, params, ref_params)
            log.append(f"gpt2 {name} {time.perf_counter() - t:.1f}s: {dev}")
        Path(out, f"rank{rank}").write_text("ok\n" + "\n".join(log))
    except BaseException:
        Path(out, f"rank{rank}").write_text(traceback.format_exc())
    finally:
        dist.destroy_process_group()


def _planned(world: int, **degrees: int) -> dict[str, Any]:
    """The best-ranked plan on ``world`` CPU devices with these degrees (dp, tp, pp, zero)."""
    for config in ranked_plans(world):
        if all(config[k] == v for k, v in degrees.items()):
            return config
    warnings.warn(f"plan_parallel ranked no plan with {degrees} on {world} devices; using it as given")
    config = {"dp": 1, "tp": 1, "pp": 1, "zero": 0, "num_micro": 1, "schedule": "none", "virtual": 1}
    config.update(degrees)
    if config["pp"] > 1:
        config.update(num_micro=2 * config["pp"], schedule="1f1b")
    return config


def test_layout_and_helpers() -> None:
    model = _model()
    assert len(find_blocks(model)) == 2
    plan = auto_tp_plan(model)
    assert set(plan) == {"blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"}
    layout = Layout.from_plan({"dp": 4, "tp": 8, "pp": 2, "zero": 1, "num_micro": 8,
                               "schedule": "interleaved", "virtual": 2})  # fmt: skip
    assert layout.world_size == 64 and layout.virtual == 2
    assert not layout.sp and layout.recompute == () and not layout.offload  # absent: off


def test_tp_that_does_not_divide_the_kv_heads_is_refused_by_name() -> None:
    from tierplan.parallel.executor import apply_plan

    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, vocab_size=64)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="tp4 does not divide the model's 2 KV heads"):
        apply_plan(model, Layout(tp=4), mesh=None)  # refused before the mesh is touched


def test_auto_tp_plan_gpt2() -> None:
    """GPT-2's Conv1D layers: c_attn (fused q|k|v) and c_fc column-wise, both c_proj row-wise."""
    from tierplan.parallel.executor import Conv1DColwise, Conv1DRowwise

    gpt = _gpt2()
    assert [type(b).__name__ for b in find_blocks(gpt)] == ["GPT2Block", "GPT2Block"]
    colwise, rowwise = type(Conv1DColwise()), type(Conv1DRowwise())
    plan = auto_tp_plan(gpt)
    assert len(plan) == 8
    for i in range(2):
        p = f"transformer.h.{i}"
        c_attn, c_fc = plan[f"{p}.attn.c_attn"], plan[f"{p}.mlp.c_fc"]
        assert isinstance(c_attn, colwise) and c_attn.fused == 3
        assert isinstance(c_fc, colwise) and c_fc.fused == 1
        assert isinstance(plan[f"{p}.attn.c_proj"], rowwise)
        assert isinstance(plan[f"{p}.mlp.c_proj"], rowwise)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test on Linux")
def test_two_processes_match_single_process() -> None:
    """World 2: the custom net (FSDP2, TP, PP), then GPT-2 as the planner ranks it: FSDP2 over
    dp 2, TP over tp 2, and 2 pipeline stages (1F1B)."""
    cases = [
        ("fsdp2 dp2", _planned(2, dp=2, tp=1, pp=1, zero=3)),
        ("tp2", _planned(2, dp=1, tp=2, pp=1)),
        ("pp2", _planned(2, dp=1, tp=1, pp=2)),
    ]
    spawn_ranks(_worker, 2, cases, True)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test on Linux")
def test_four_processes_match_single_process() -> None:
    """World 4: GPT-2 under FSDP2 over dp 4, TP over tp 4, and FSDP2 x TP (dp 2 x tp 2)."""
    cases = [
        ("fsdp2 dp4", _planned(4, dp=4, tp=1, pp=1, zero=3)),
        ("tp4", _planned(4, dp=1, tp=4, pp=1)),
        ("fsdp2 dp2 x tp2", _planned(4, dp=2, tp=2, pp=1, zero=3)),
    ]
    spawn_ranks(_worker, 4, cases, False)
