"""TieredOptimizer: placed optimizer states give the plain optimizer's results, and clean up."""
from __future__ import annotations

import copy
import gc
import io
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest
import torch

from tierplan.codegen.optimizer import (
    DEVICE,
    HOST,
    NVME,
    SUPPORTED_OPTIMIZERS,
    StatePlacement,
    TieredOptimizer,
    UnsupportedOptimizer,
    optimizer_hyperparameters,
    optimizer_name,
)

PLACEMENTS = {
    "device-device": StatePlacement(DEVICE, DEVICE),
    "host-host": StatePlacement(HOST, HOST),
    "nvme-host": StatePlacement(NVME, HOST),
    "host-device": StatePlacement(HOST, DEVICE),
    "nvme-device": StatePlacement(NVME, DEVICE),
}

OPTIMIZERS: dict[str, Callable[[list], torch.optim.Optimizer]] = {
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1),
    "adam": lambda groups: torch.optim.Adam(groups, lr=1e-2),
    "sgd": lambda groups: torch.optim.SGD(groups, lr=1e-2, momentum=0.9),
}


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 32),
        torch.nn.LayerNorm(32),
        torch.nn.GELU(),
        torch.nn.Linear(32, 6),
    ).to(dtype)


def gpt2() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()  # eval: no dropout, deterministic


def groups(model: torch.nn.Module) -> list[dict]:
    """Two groups, as in real training: no weight decay (and a larger lr) for biases and norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0, "lr": 2e-2}]


def mlp_loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 12, generator=g, dtype=next(model.parameters()).dtype)
    y = torch.randn(8, 6, generator=g, dtype=x.dtype)
    return torch.nn.functional.mse_loss(model(x), y)


def gpt2_loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 128, (2, 16), generator=g)
    return model(input_ids=ids, labels=ids).loss


def roundtrip(state_dict: dict) -> dict:
    """A checkpoint as it comes back from disk, sharing no tensor with the optimizer."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.8**step)


def assert_same_params(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def train_and_compare(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, int], torch.Tensor],
    make_optimizer: Callable[[list], torch.optim.Optimizer],
    placement_of: Callable[[int, torch.Tensor], StatePlacement],
    swap_root: Path,
    steps: int = 10,
    reload_at: int = 5,
) -> None:
    reference = copy.deepcopy(model)
    eager = make_optimizer(groups(reference))
    eager_lr = schedule(eager)

    def tiered_over(model: torch.nn.Module) -> TieredOptimizer:
        wrapped = make_optimizer(groups(model))
        placements = {p: placement_of(i, p) for i, p in enumerate(model.parameters())}
        return TieredOptimizer(wrapped, placements, swap_root=swap_root)

    tiered = tiered_over(model)
    lr = schedule(tiered)
    for step in range(steps):
        if step == reload_at:
            checkpoint = roundtrip(tiered.state_dict())
            lr_state = lr.state_dict()
            tiered.close()
            tiered = tiered_over(model)
            lr = schedule(tiered)
            lr.load_state_dict(lr_state)
            tiered.load_state_dict(checkpoint)
        for net, opt, sched in ((model, tiered, lr), (reference, eager, eager_lr)):
            opt.zero_grad()
            loss_fn(net, step).backward()
            opt.step()
            sched.step()
        assert tiered.param_groups[0]["lr"] == eager.param_groups[0]["lr"]
        assert_same_params(model, reference)
    tiered.close()


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_matches_eager_with_scheduler_and_reload(optimizer: str, placement: str, tmp_path: Path) -> None:
    train_and_compare(
        mlp(), mlp_loss, OPTIMIZERS[optimizer], lambda i, p: PLACEMENTS[placement], tmp_path
    )


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_gpt2_mixed_placements_match_eager(optimizer: str, tmp_path: Path) -> None:
    kinds = list(PLACEMENTS.values())
    train_and_compare(
        gpt2(), gpt2_loss, OPTIMIZERS[optimizer], lambda i, p: kinds[i % len(kinds)], tmp_path,
        steps=4, reload_at=2,
    )


def test_param_groups_are_shared(tmp_path: Path) -> None:
    model = mlp()
    wrapped = torch.optim.AdamW(groups(model), lr=1e-3)
    tiered = TieredOptimizer(wrapped, swap_root=tmp_path)
    assert tiered.param_groups is wrapped.param_groups
    tiered.param_groups[1]["lr"] = 0.5
    assert wrapped.param_groups[1]["lr"] == 0.5
    assert optimizer_hyperparameters(wrapped)["weight_decay"] == wrapped.param_groups[0]["weight_decay"]
    assert "params" not in optimizer_hyperparameters(tiered)


def mixed(i: int, p: torch.Tensor) -> StatePlacement:
    return [StatePlacement(NVME, HOST), StatePlacement(HOST, DEVICE), StatePlacement(NVME, DEVICE),
            StatePlacement(HOST, HOST), StatePlacement(DEVICE, DEVICE)][i % 5]


def test_state_dict_interoperates_with_plain_adamw(tmp_path: Path) -> None:
    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(groups(model), lr=1e-2, weight_decay=0.1)

    def placed(model: torch.nn.Module) -> TieredOptimizer:
        ps = list(model.parameters())
        return TieredOptimizer(make(model), {p: mixed(i, p) for i, p in enumerate(ps)}, swap_root=tmp_path)

    tiered_model, plain_model = mlp(), mlp()
    tiered, plain = placed(tiered_model), make(plain_model)
    for step in range(3):
        for net, opt in ((tiered_model, tiered), (plain_model, plain)):
            opt.zero_grad()
            mlp_loss(net, step).backward()
            opt.step()
    assert_same_params(tiered_model, plain_model)

    # Tiered -> plain: a plain AdamW loads the tiered checkpoint and takes the same next step.
    plain_from_tiered_model = copy.deepcopy(tiered_model)
    plain_from_tiered = make(plain_from_tiered_model)
    tiered_sd = roundtrip(tiered.state_dict())
    assert set(tiered_sd["state"]) == set(plain.state_dict()["state"])
    plain_from_tiered.load_state_dict(tiered_sd)
    # Plain -> tiered: a fresh tiered optimizer loads the plain checkpoint.
    tiered_from_plain_model = copy.deepcopy(plain_model)
    tiered_from_plain = placed(tiered_from_plain_model)
    tiered_from_plain.load_state_dict(roundtrip(plain.state_dict()))

    runs = [(plain_model, plain), (plain_from_tiered_model, plain_from_tiered),
            (tiered_from_plain_model, tiered_from_plain)]
    for net, opt in runs:
        opt.zero_grad()
        mlp_loss(net, 3).backward()
        opt.step()
    assert_same_params(plain_from_tiered_model, plain_model)
    assert_same_params(tiered_from_plain_model, plain_model)
    plain_sd = plain.state_dict()
    for index, state in tiered_from_plain.state_dict()["state"].items():
        assert state.keys() == plain_sd["state"][index].keys()
        for key in state:
            torch.testing.assert_close(state[key], plain_sd["state"][index][key], rtol=0, atol=0)
    tiered.close()
    tiered_from_plain.close()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_gradient_accumulation_and_clipping(optimizer: str, tmp_path: Path) -> None:
    model, reference = mlp(), mlp()
    tiered = TieredOptimizer(
        OPTIMIZERS[optimizer](groups(model)),
        {p: mixed(i, p) for i, p in enumerate(model.parameters())},
        swap_root=tmp_path,
    )
    eager = OPTIMIZERS[optimizer](groups(reference))
    for step in range(4):
        for net, opt in ((model, tiered), (reference, eager)):
            opt.zero_grad()
            for micro in range(2):
                (mlp_loss(net, 10 * step + micro) / 2).backward()
            norm = torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=0.05)
            assert norm > 0.05  # the clip does act
            opt.step()
        assert_same_params(model, reference)
    tiered.close()


def test_closure_is_called_with_grad_and_its_loss_returned(tmp_path: Path) -> None:
    model, reference = mlp(), mlp()
    tiered = TieredOptimizer(
        torch.optim.Adam(model.parameters()), {p: StatePlacement(NVME, HOST) for p in model.parameters()},
        swap_root=tmp_path,
    )
    eager = torch.optim.Adam(reference.parameters())

    def closure_for(net: torch.nn.Module, opt: torch.optim.Optimizer) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = mlp_loss(net, 0)
            loss.backward()
            return loss
        return closure

    with torch.no_grad():
        loss = tiered.step(closure_for(model, tiered))
    assert torch.equal(loss, eager.step(closure_for(reference, eager)))
    assert_same_params(model, reference)
    tiered.close()


@pytest.mark.parametrize(
    "placement", [StatePlacement(HOST, HOST), StatePlacement(NVME, HOST), StatePlacement(DEVICE, DEVICE),
                  StatePlacement(HOST, DEVICE)],
    ids=["host-host", "nvme-host", "device-device", "host-device"],
)
def test_bf16_params_with_fp32_masters(placement: StatePlacement, tmp_path: Path) -> None:
    model, reference = mlp(dtype=torch.bfloat16), mlp(dtype=torch.bfloat16)

    def tiered_over(net: torch.nn.Module) -> TieredOptimizer:
        return TieredOptimizer(
            torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1),
            {p: placement for p in net.parameters()}, master_dtype=torch.float32, swap_root=tmp_path,
        )

    tiered = tiered_over(model)
    # The reference: fp32 copies updated by a plain AdamW on the bf16 grads cast to fp32.
    masters = [torch.nn.Parameter(p.detach().float().clone()) for p in reference.parameters()]
    eager = torch.optim.AdamW(masters, lr=1e-2, weight_decay=0.1)
    for step in range(6):
        if step == 3:
            checkpoint = roundtrip(tiered.state_dict())
            saved = checkpoint["state"]
            assert len(saved) == len(masters)
            for i, master in enumerate(masters):
                assert saved[i]["master"].dtype == torch.float32
                torch.testing.assert_close(saved[i]["master"], master.detach(), rtol=1e-5, atol=1e-7)
                assert saved[i]["exp_avg"].dtype == torch.float32
            tiered.close()
            tiered = tiered_over(model)
            tiered.load_state_dict(checkpoint)
        tiered.zero_grad()
        mlp_loss(model, step).backward()
        tiered.step()

        eager.zero_grad()
        mlp_loss(reference, step).backward()
        for master, p in zip(masters, reference.parameters()):
            master.grad = p.grad.float()
        eager.step()
        with torch.no_grad():
            for master, p in zip(masters, reference.parameters()):
                p.copy_(master)
                p.grad = None
        assert_same_params(model, reference)
    for i, master in enumerate(masters):
        torch.testing.assert_close(
            tiered.state_dict()["state"][i]["master"], master.detach(), rtol=1e-5, atol=1e-7
        )
    tiered.close()


def nvme_tiered(model: torch.nn.Module, swap_root: Path, update: str = HOST) -> TieredOptimizer:
    return TieredOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        {p: StatePlacement(NVME, update) for p in model.parameters()},
        swap_root=swap_root,
    )


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        optimizer.zero_grad()
        mlp_loss(model, step).backward()
        optimizer.step()


@pytest.mark.parametrize("update", [HOST, DEVICE])
def test_nvme_states_live_in_files_only(update: str, tmp_path: Path) -> None:
    model = mlp()
    tiered = nvme_tiered(model, tmp_path, update)
    swap_dir = tiered.swap_dir
    assert swap_dir is not None and swap_dir.parent == tmp_path
    train(model, tiered, range(2))
    n = sum(p.numel() for p in model.parameters())
    count = len(list(model.parameters()))
    # Nothing in memory between steps: no state tensor, no master; all bytes in files.
    assert tiered.state_bytes() == {DEVICE: 0, HOST: 0, NVME: n * 4 * (3 if update == HOST else 2) + 4 * count}
    for p in model.parameters():
        assert not any(isinstance(v, torch.Tensor) for v in tiered.state[p].values())
    files = sorted(swap_dir.iterdir())
    assert sum(f.stat().st_size for f in files) == tiered.state_bytes()[NVME]
    assert not [f for f in files if f.name.endswith(".tmp")]
    tiered.close()
    assert not swap_dir.exists()
    tiered.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        tiered.step()


def test_nvme_directory_removed_when_collected(tmp_path: Path) -> None:
    model = mlp()
    tiered = nvme_tiered(model, tmp_path)
    train(model, tiered, range(1))
    swap_dir = tiered.swap_dir
    assert swap_dir is not None and any(swap_dir.iterdir())
    del tiered
    gc.collect()
    assert not swap_dir.exists()
    assert not list(tmp_path.iterdir())


def _nvme_script(tmp_path: Path, ending: str) -> str:
    """A script that steps a TieredOptimizer with NVMe states once, prints its swap directory and
    file count, then runs ``ending``."""
    return textwrap.dedent(
        f"""
        import torch
        from tierplan.codegen.optimizer import NVME, HOST, StatePlacement, TieredOptimizer
        model = torch.nn.Linear(4, 4)
        opt = TieredOptimizer(torch.optim.AdamW(model.parameters()),
                              {{p: StatePlacement(NVME, HOST) for p in model.parameters()}},
                              swap_root={str(tmp_path)!r})
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        print(opt.swap_dir, len(list(opt.swap_dir.iterdir())), flush=True)
        """
    ) + ending + "\n"


def test_nvme_directory_removed_at_interpreter_exit(tmp_path: Path) -> None:
    script = _nvme_script(tmp_path, "keep = [opt]  # still referenced at exit")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    swap_dir, count = out.stdout.split()
    assert int(count) > 0
    assert not Path(swap_dir).exists()


@pytest.mark.parametrize("error", ["RuntimeError('the training script failed')", "KeyboardInterrupt"])
def test_nvme_directory_removed_when_the_script_dies(error: str, tmp_path: Path) -> None:
    # An uncaught error or Ctrl-C (KeyboardInterrupt) ends the interpreter: the files go with it.
    script = _nvme_script(tmp_path, f"raise {error}")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    swap_dir, count = out.stdout.split()
    assert int(count) > 0
    assert not Path(swap_dir).exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_step_raising_midway_keeps_files_consistent(
    error: type[BaseException], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = mlp()
    tiered = nvme_tiered(model, tmp_path)
    train(model, tiered, range(1))
    swap_dir = tiered.swap_dir
    assert swap_dir is not None
    before = roundtrip(tiered.state_dict())

    real_step = tiered._scratch.step
    calls = []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise error("injected")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(tiered._scratch, "step", failing_step)
    tiered.zero_grad()
    mlp_loss(model, 1).backward()
    with pytest.raises(error, match="injected"):
        tiered.step()
    # Two parameters were updated, the third raised: the files hold whole old or new states and
    # nothing was left in memory.
    assert tiered.state_bytes()[HOST] == 0
    after = tiered.state_dict()["state"]
    steps = [int(after[i]["step"]) for i in sorted(after)]
    assert steps == [2, 2] + [1] * (len(steps) - 2)
    for i in range(2, len(steps)):
        for key, value in before["state"][i].items():
            torch.testing.assert_close(after[i][key], value, rtol=0, atol=0)
    monkeypatch.undo()
    tiered.step()  # recovers: the remaining parameters can still be updated
    tiered.close()
    assert not swap_dir.exists()
    assert not list(tmp_path.iterdir())


class MyOpt(torch.optim.SGD):
    pass


class NotAnOptimizer:
    pass


@pytest.mark.parametrize("cls", [MyOpt, NotAnOptimizer, torch.optim.RMSprop])
def test_unsupported_optimizers_are_named(cls: type) -> None:
    with pytest.raises(UnsupportedOptimizer) as info:
        optimizer_name(cls)
    message = str(info.value)
    assert f"{cls.__module__}.{cls.__qualname__}" in message
    assert "optimizer=None" in message
    for supported in SUPPORTED_OPTIMIZERS.values():
        assert supported.__qualname__ in message
    assert isinstance(info.value, ValueError)


def test_supported_names_and_wrapping_errors(tmp_path: Path) -> None:
    model = mlp()
    assert [optimizer_name(c) for c in SUPPORTED_OPTIMIZERS.values()] == list(SUPPORTED_OPTIMIZERS)
    assert optimizer_name(torch.optim.Adam(model.parameters())) == "adam"
    with pytest.raises(UnsupportedOptimizer, match="MyOpt"):
        TieredOptimizer(MyOpt(model.parameters(), lr=0.1))
    stranger = torch.nn.Parameter(torch.zeros(3, 7))
    with pytest.raises(ValueError, match=r"\(3, 7\)"):
        TieredOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), {stranger: StatePlacement()})
    first = next(model.parameters())
    with pytest.raises(ValueError, match=re.escape(f"parameter 0 (shape {tuple(first.shape)})")):
        TieredOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), {first: StatePlacement(DEVICE, HOST)})
    with pytest.raises(ValueError):
        StatePlacement("disk", HOST)
    tiered = TieredOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), {first: StatePlacement(HOST, HOST)})
    assert tiered.placement(first) == StatePlacement(HOST, HOST)
    assert tiered.placement(list(model.parameters())[1]) == StatePlacement()
    with pytest.raises(ValueError, match=r"\(3, 7\)"):
        tiered.placement(stranger)
    assert tiered.swap_dir is None  # no NVMe placement, no directory


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_state_bytes_per_tier(placement: str, tmp_path: Path) -> None:
    model = mlp()
    chosen = PLACEMENTS[placement]
    tiered = TieredOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-3), {p: chosen for p in model.parameters()},
        swap_root=tmp_path,
    )
    n = sum(p.numel() for p in model.parameters())
    count = len(list(model.parameters()))
    masters = n * 4 if chosen.update == HOST else 0
    expected = {DEVICE: 0, HOST: 0, NVME: 0}
    expected[chosen.states] = masters
    assert tiered.state_bytes() == expected
    train(model, tiered, range(1))
    # AdamW: exp_avg and exp_avg_sq of each fp32 element, and a 4-byte step counter per tensor.
    expected[chosen.states] = masters + n * 4 * 2 + 4 * count
    assert tiered.state_bytes() == expected
    if chosen.states != DEVICE:
        # Host and NVMe states are not aliases of anything on the device.
        for p in model.parameters():
            for value in tiered.state[p].values():
                if isinstance(value, torch.Tensor):
                    assert value.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
    tiered.close()


def test_mixed_state_bytes_and_host_copies_are_distinct(tmp_path: Path) -> None:
    model = mlp()
    ps = list(model.parameters())
    tiered = TieredOptimizer(
        torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9),
        {p: mixed(i, p) for i, p in enumerate(ps)}, swap_root=tmp_path,
    )
    train(model, tiered, range(1))
    expected = {DEVICE: 0, HOST: 0, NVME: 0}
    for i, p in enumerate(ps):
        chosen = mixed(i, p)
        per_param = p.numel() * 4 * (2 if chosen.update == HOST else 1)  # momentum (+ master)
        expected[chosen.states] += per_param
    assert tiered.state_bytes() == expected
    for i, p in enumerate(ps):
        if mixed(i, p).update == HOST:
            master = tiered._slot(p).master
            if master is not None:
                assert master.data_ptr() != p.data_ptr()
                torch.testing.assert_close(master, p.detach(), rtol=0, atol=0)
    tiered.close()


def test_existing_state_is_adopted_and_added_groups_work(tmp_path: Path) -> None:
    model, reference = mlp(), mlp()
    wrapped = torch.optim.AdamW(model.parameters(), lr=1e-2)
    eager = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    train(model, wrapped, range(2))
    train(reference, eager, range(2))
    tiered = TieredOptimizer(
        wrapped, {p: StatePlacement(NVME, HOST) for p in model.parameters()}, swap_root=tmp_path
    )
    assert not wrapped.state  # moved to its tiers, not kept twice
    assert tiered.state_bytes()[NVME] > 0
    extra, extra_ref = torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(5))
    tiered.add_param_group({"params": [extra], "lr": 0.1})
    eager.add_param_group({"params": [extra_ref], "lr": 0.1})
    assert tiered.placement(extra) == StatePlacement()
    for step in range(2, 4):
        for net, opt, p in ((model, tiered, extra), (reference, eager, extra_ref)):
            opt.zero_grad()
            (mlp_loss(net, step) + p.pow(2).sum()).backward()
            opt.step()
        assert_same_params(model, reference)
        torch.testing.assert_close(extra, extra_ref, rtol=0, atol=0)
    tiered.close()
