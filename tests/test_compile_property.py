"""Property: random small models compile on the default CPU hardware at several budgets, every
plan validates (compile validates what it runs), and the compiled step gives eager's loss and
gradients. Budgets the planner cannot meet must say so with the smallest budget it can meet."""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import tierplan
from tierplan.plans.plan import InfeasibleBudget

BUDGETS = [None, 0.8, 0.6]


class _Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _RandomNet(nn.Module):
    """Linear layers of random widths, random activations and norms, some residual blocks, and
    a cross-entropy loss: a random graph of the ops real models are made of."""

    def __init__(self, rng: random.Random, features: int, classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = features
        for _ in range(rng.randint(2, 5)):
            out = rng.choice([16, 32, 48, 64])
            layers += [nn.Linear(width, out), rng.choice([nn.ReLU(), nn.GELU(), nn.Tanh(), nn.SiLU()])]
            if rng.random() < 0.5:
                layers.append(nn.LayerNorm(out))
            if rng.random() < 0.5:
                layers.append(_Residual(nn.Sequential(nn.Linear(out, out), nn.GELU(), nn.Linear(out, out))))
            width = out
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(x), labels)


@pytest.mark.parametrize("seed", range(4))
def test_random_models_compile_validate_and_match_eager(seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    features, classes, batch = rng.choice([8, 24]), rng.choice([3, 10]), rng.choice([16, 64])
    model = _RandomNet(rng, features, classes)
    x, y = torch.randn(batch, features), torch.randint(0, classes, (batch,))
    model.zero_grad()
    expected = model(x, y)
    expected.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    planned = 0
    for budget in BUDGETS:
        try:
            compiled = tierplan.compile(model, (x, y), memory_budget=budget, time_limit=1)
        except InfeasibleBudget as exc:
            assert budget is not None and exc.min_feasible_bytes is not None
            assert exc.min_feasible_bytes > exc.budget_bytes
            continue
        planned += 1
        assert compiled.plan.peak_bytes["device"] <= compiled.plan.budget_bytes
        model.zero_grad()
        loss = compiled(x, y)
        loss.backward()
        torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    assert planned >= 2  # keep-all and at least one budget below it
