"""Plans applied with torch.distributed on 2 gloo processes match single-process numerics."""
from __future__ import annotations

import os
import socket
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from tierplan.distributed import Layout, auto_tp_plan, find_blocks


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


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    import torch.distributed as dist

    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        # Each DP rank saw half the batch: the full-batch loss is the mean over ranks.
        lt = loss.detach().clone()
        dist.all_reduce(lt)
        losses.append(lt.item() / dist.get_world_size())
    return losses


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from tierplan.distributed import apply_plan, init_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        ref_losses, ref_state = _reference()
        x, y = _data()
        report = []
        # FSDP2 (ZeRO-3) over dp = 2: each rank trains on its half of the batch.
        layout = Layout(dp=2, zero=3)
        model = apply_plan(_model(), layout, init_mesh(layout, "cpu"))
        half = slice(rank * 4, rank * 4 + 4)
        losses = _train(model, x[half], y[half])
        report.append(("fsdp", losses, {k: _full(v) for k, v in model.state_dict().items()}))
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
        report.append(("tp", losses, {k: _full(v) for k, v in model.state_dict().items()}))
        for name, losses, state in report:
            for a, b in zip(losses, ref_losses):
                assert abs(a - b) < 1e-5, f"{name}: loss {a} != {b}"
            for k, v in ref_state.items():
                assert torch.allclose(state[k], v, atol=1e-5), f"{name}: parameter {k} differs"
        Path(out, f"rank{rank}").write_text("ok")
    except Exception:
        Path(out, f"rank{rank}").write_text(traceback.format_exc())
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_layout_and_helpers() -> None:
    model = _model()
    assert len(find_blocks(model)) == 2
    plan = auto_tp_plan(model)
    assert set(plan) == {"blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"}
    layout = Layout.from_plan({"dp": 4, "tp": 8, "pp": 2, "zero": 1, "num_micro": 8,
                               "schedule": "interleaved", "virtual": 2})
    assert layout.world_size == 64 and layout.virtual == 2


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test on Linux")
def test_fsdp2_and_tp_match_single_process() -> None:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
        for r in range(2):
            assert Path(out, f"rank{r}").read_text() == "ok", Path(out, f"rank{r}").read_text()


def _pp_worker(rank: int, port: int, out: str) -> None:
    """Pipeline parallelism (pp = 2, 1F1B over 2 micro-batches): blocks split over the ranks,
    the head on the last stage; losses and parameters match the single-process run."""
    import torch.distributed as dist

    from tierplan.distributed import init_mesh, pipeline_stage

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        ref_losses, ref_state = _reference()
        x, y = _data()
        layout = Layout.from_plan({"dp": 1, "tp": 1, "pp": 2, "zero": 0, "num_micro": 2,
                                   "schedule": "1f1b", "virtual": 1})
        mesh = init_mesh(layout, "cpu")
        model = _model()
        schedule, stage = pipeline_stage(find_blocks(model), layout, mesh, tail=model.head,
                                         loss_fn=nn.functional.mse_loss)
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
        for a, b in zip(losses, ref_losses):
            assert abs(a - b) < 1e-5, f"pp: loss {a} != {b}"
        # Stage r's module holds block r (and the head on the last stage): nn.Sequential names
        # its children 0, 1, ...; map them back to the reference model's names.
        names = [f"blocks.{rank}"] + (["head"] if rank == 1 else [])
        for k, v in stage.state_dict().items():
            idx, rest = k.split(".", 1)
            ref = ref_state[f"{names[int(idx)]}.{rest}"]
            assert torch.allclose(v, ref, atol=1e-5), f"pp: parameter {k} differs"
        Path(out, f"rank{rank}").write_text("ok")
    except Exception:
        Path(out, f"rank{rank}").write_text(traceback.format_exc())
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test on Linux")
def test_pipeline_two_stages_match_single_process() -> None:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_pp_worker, args=(_free_port(), out), nprocs=2, join=True)
        for r in range(2):
            assert Path(out, f"rank{r}").read_text() == "ok", Path(out, f"rank{r}").read_text()
