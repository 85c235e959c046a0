"""Model profiles for the parallel planner, from a zoo name or a model config.

    profile = profile_zoo_model("llama-70b")
    profile = profile_transformers(GPT2Config(n_layer=48, n_embd=1600, n_head=25), seq_len=1024)
    result = plan_parallel(profile, "h100-sxm", 64)  # tierplan.parallel.search

The layers of a transformer are identical, so a copy of the model with ``layers`` (default 2) of
them is built on the meta device and captured on fake tensors at batch 1 (seconds, where all 80
layers of a Llama-2-70B shape take ~30 s); ``tierplan.parallel.profile.profile_graph`` measures
that graph and scales it to the real layer count the config gives. This is the front end's half
of profiling: the parallel planner itself never builds or captures a model.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tierplan.parallel.profile import Architecture, ModelProfile, profile_graph
from tierplan.passes.blocks import detect_blocks
from tierplan.passes.capture import capture
from tierplan.zoo import ZOO, ZooError, build_transformers, with_layers

__all__ = ["DEFAULT_LAYERS", "profile_captured", "profile_transformers", "profile_zoo_model"]

DEFAULT_LAYERS = 2  # the fewest in which passes.blocks finds a repeated block


def profile_captured(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    arch: Architecture,
    *,
    seq_len: int,
    name: str,
) -> ModelProfile:
    """Capture one training step of ``model`` (batch 1, sequence ``seq_len``; a few of the real
    model's layers, usually on the meta device) and profile it as the model ``arch`` describes."""
    captured = capture(model, args, example_kwargs=kwargs, training=True, name=name)
    graph = detect_blocks(captured.graph)
    return profile_graph(graph, arch, seq_len=seq_len, capture_seconds=captured.seconds)


def profile_zoo_model(
    name: str, *, seq_len: int | None = None, layers: int = DEFAULT_LAYERS
) -> ModelProfile:
    """The profile of zoo model ``name`` at ``seq_len`` tokens (default: the entry's)."""
    entry = ZOO.get(name)
    if entry is None:
        raise ZooError(f"unknown model {name!r}; known: {', '.join(ZOO)}")
    s = entry.seq_len if seq_len is None else int(seq_len)
    try:
        arch = Architecture.from_config(entry.model_config())
    except ValueError as exc:
        raise ZooError(f"{name}: the parallel planner profiles transformers; {exc}") from exc
    model, args, kwargs = entry.build(1, s, fake=True, training=True,
                                      layers=min(layers, arch.num_layers))  # fmt: skip
    return profile_captured(model, args, kwargs, arch, seq_len=s, name=name)


def profile_transformers(
    config: Any,
    *,
    seq_len: int,
    model_cls: str = "AutoModelForCausalLM",
    dtype: torch.dtype | None = None,
    layers: int = DEFAULT_LAYERS,
    name: str | None = None,
) -> ModelProfile:
    """The profile of a transformers model given by its config object (left unchanged), e.g. a
    ``GPT2Config`` of your own sizes. ``model_cls`` names the model class (an auto class by
    default); ``dtype`` defaults to the config's, else float32."""
    arch = Architecture.from_config(config)
    small = with_layers(config, min(layers, arch.num_layers))
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):  # configs loaded from JSON name it
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model, args, kwargs = build_transformers(small, model_cls, dtype, 1, seq_len, training=True)
    model.train(True)
    name = name or getattr(config, "model_type", None) or type(config).__name__
    return profile_captured(model, args, kwargs, arch, seq_len=seq_len, name=name)
