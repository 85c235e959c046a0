"""fp16 mixed precision in tierplan.compile: the planned backward starts from the dynamic loss
scale, and compiled.optimizer unscales into fp32 masters, skips overflowing steps and clips the
true gradients. The reference is the same recipe done by hand in eager fp16."""
from __future__ import annotations

import copy

import pytest
import torch

import tierplan
from tierplan.codegen.optimizer import DynamicLossScale
from tierplan.plans.plan import HOST
from tierplan.zoo import load_model


def _fp16_model():
    model, args, kwargs = load_model("gpt2-tiny", batch_size=2, seq_len=32)
    return model.eval().half(), args, kwargs


def _compiled(model, args, kwargs, lr=1e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    return tierplan.compile(model, args, example_kwargs=kwargs, optimizer=opt, precision="fp16-mixed",
                            memory_budget=0.9, time_limit=2)


class _ByHand:
    """Eager fp16 with fp32 masters: loss x scale backward, gradients / scale into the masters."""

    def __init__(self, model, lr=1e-3) -> None:
        self.model = copy.deepcopy(model)
        self.masters = [p.detach().float().clone() for p in self.model.parameters()]
        self.opt = torch.optim.AdamW(self.masters, lr=lr, weight_decay=0.01)

    def step(self, args, kwargs, scale: float, clip: float | None = None) -> torch.Tensor:
        """One step; returns the norm of the unscaled gradients."""
        loss = self.model(*args, **kwargs).loss
        (loss * scale).backward()
        params = list(self.model.parameters())
        # torch.nn.utils.clip_grad_norm_'s norm and factor, of the unscaled fp32 gradients; the
        # factor is applied with the unscale, in one multiplication, as the optimizer does.
        norm = torch.nn.utils.get_total_norm([p.grad.float() * (1.0 / scale) for p in params])
        factor = min(1.0, clip / (float(norm) + 1e-6)) if clip is not None else 1.0
        for p, master in zip(params, self.masters):
            master.grad = p.grad.float() * (factor / scale)
        self.opt.step()
        self.model.zero_grad()
        with torch.no_grad():
            for p, master in zip(self.model.parameters(), self.masters):
                p.copy_(master)
        return norm


def test_fp16_mixed_steps_equal_the_recipe_by_hand():
    model, args, kwargs = _fp16_model()
    ref = _ByHand(model)
    compiled = _compiled(model, args, kwargs)
    assert compiled.plan.update.precision == "fp16-mixed"
    assert compiled.plan.update.placement_counts()[HOST] > 0  # some masters updated on the host
    scale = compiled.optimizer.loss_scale
    assert scale.scale == 2.0**16
    for _ in range(5):
        compiled(*args, **kwargs).loss.backward()
        grad = next(model.parameters()).grad
        assert grad.dtype == torch.float16
        compiled.optimizer.step()
        compiled.optimizer.zero_grad()
        ref.step(args, kwargs, 2.0**16)
    assert scale.skipped_steps == 0 and scale.clean_steps == 5
    state = compiled.optimizer.state_dict()
    assert state["loss_scale"]["scale"] == 2.0**16
    for i, (p, master) in enumerate(zip(model.parameters(), ref.masters)):
        assert state["state"][i]["master"].dtype == torch.float32
        torch.testing.assert_close(state["state"][i]["master"], master, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(p, master.half(), rtol=0, atol=0)


def test_an_overflowing_step_is_skipped_and_the_scale_backs_off():
    model, args, kwargs = _fp16_model()
    compiled = _compiled(model, args, kwargs)
    before = [p.detach().clone() for p in model.parameters()]
    compiled.optimizer.loss_scale.scale = 2.0**60  # fp16 gradients overflow at this scale
    compiled(*args, **kwargs).loss.backward()
    assert not all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    compiled.optimizer.step()
    compiled.optimizer.zero_grad()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)  # skipped: nothing moved, no state made
    assert compiled.optimizer.loss_scale.scale == 2.0**59 and compiled.optimizer.loss_scale.skipped_steps == 1
    assert compiled.optimizer.state_dict()["state"] == {}
    compiled.optimizer.loss_scale.scale = 2.0**10
    compiled(*args, **kwargs).loss.backward()
    compiled.optimizer.step()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_clip_grad_norm_clips_the_true_gradients():
    model, args, kwargs = _fp16_model()
    ref = _ByHand(model)
    compiled = _compiled(model, args, kwargs)
    for _ in range(3):
        compiled(*args, **kwargs).loss.backward()
        norm = compiled.optimizer.clip_grad_norm_(0.05)
        compiled.optimizer.step()
        compiled.optimizer.zero_grad()
        want = ref.step(args, kwargs, 2.0**16, clip=0.05)
        torch.testing.assert_close(norm, want, rtol=1e-5, atol=0)
        assert float(norm) > 0.05  # so the clip acted
    state = compiled.optimizer.state_dict()["state"]
    for i, master in enumerate(ref.masters):
        torch.testing.assert_close(state[i]["master"], master, rtol=1e-5, atol=1e-7)


def test_the_loss_scale_round_trips_and_is_checked():
    model, args, kwargs = _fp16_model()
    compiled = _compiled(model, args, kwargs)
    compiled.optimizer.loss_scale.scale = 1024.0
    compiled.optimizer.loss_scale.clean_steps = 7
    saved = compiled.optimizer.state_dict()
    other = _compiled(copy.deepcopy(model), args, kwargs)
    other.optimizer.load_state_dict(saved)
    assert other.optimizer.loss_scale.scale == 1024.0 and other.optimizer.loss_scale.clean_steps == 7
    scale = DynamicLossScale(scale=4.0, growth_interval=2)
    for found_inf, want in ((False, 4.0), (False, 8.0), (True, 4.0), (False, 4.0)):
        scale.update(found_inf)
        assert scale.scale == want
    with pytest.raises(ValueError, match="finite positive"):
        DynamicLossScale(scale=float("inf"))


def test_fp16_mixed_needs_an_optimizer_and_is_refused_by_the_backend():
    model, args, kwargs = _fp16_model()
    with pytest.raises(ValueError, match="needs optimizer="):
        tierplan.compile(model, args, example_kwargs=kwargs, precision="fp16-mixed")
    with pytest.raises(ValueError, match="does not run precision='fp16-mixed'"):
        tierplan.backend(precision="fp16-mixed", optimizer=torch.optim.AdamW(model.parameters()))
