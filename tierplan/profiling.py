"""Model profiles for the parallel planner, from a zoo name, a model file or a model config.

    profile = profile_zoo_model("llama-70b")
    profile = profile_transformers(GPT2Config(n_layer=48, n_embd=1600, n_head=25), seq_len=1024)
    result = plan_parallel(profile, "h100-sxm", 64)  # tierplan.parallel.search

    # any of: a zoo name, path/to/file.py:factory, a transformers config.json or its directory
    profile = profile_model("path/to/config.json", seq_len=2048, precision="bf16")
    result = plan_model("llama-7b", "a100-80gb-sxm", 64, global_batch=512, layout="tp8 pp2")

The layers of a transformer are identical, so a copy of the model with ``layers`` (default 2) of
them is built on the meta device and captured on fake tensors at batch 1 (seconds, where all 80
layers of a Llama-2-70B shape take ~30 s); ``tierplan.parallel.profile.profile_graph`` measures
that graph and scales it to the real layer count the config gives. This is the front end's half
of profiling: the parallel planner itself never builds or captures a model.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from tierplan.cost_models.hardware import Hardware
from tierplan.parallel.calibration import SEQ_LEN as CALIBRATION_SEQ_LEN
from tierplan.parallel.calibration import VOCAB as CALIBRATION_VOCAB
from tierplan.parallel.calibration import PublishedRun
from tierplan.parallel.profile import Architecture, ModelProfile, profile_graph
from tierplan.parallel.search import ParallelResult, plan_parallel
from tierplan.parallel.types import Layout
from tierplan.passes.blocks import detect_blocks
from tierplan.passes.capture import capture
from tierplan.passes.target_kernels import TargetKernels
from tierplan.zoo import (
    ZOO,
    TransformersConfig,
    ZooError,
    build_transformers,
    load_model,
    with_layers,
)

__all__ = [
    "DEFAULT_LAYERS",
    "PRECISIONS",
    "Target",
    "plan_model",
    "profile_captured",
    "profile_config_file",
    "profile_factory",
    "profile_model",
    "profile_transformers",
    "profile_zoo_model",
    "published_run_profile",
    "published_run_profiles",
]

DEFAULT_LAYERS = 2  # the fewest in which passes.blocks finds a repeated block

# What a profile is captured for: a hardware (preset name, TOML path, Hardware) or its kernels;
# None keeps the tracing CPU's kernels. A GPU target records its fused attention (flash /
# memory-efficient, in the model's dtype) where the CPU records the math path's seq x seq scores.
Target = str | Path | Hardware | TargetKernels | None

# --precision: the parameters' bytes and the compute dtype of the profile.
PRECISIONS: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The sequence a config.json is profiled at when none is given: its position limit, at most this.
DEFAULT_CONFIG_SEQ = 4096


def _dtype(precision: str | torch.dtype | None) -> torch.dtype | None:
    """A ``--precision`` name ("bf16"), a torch dtype name ("bfloat16") or a dtype, as a dtype."""
    if precision is None or isinstance(precision, torch.dtype):
        return precision
    if precision in PRECISIONS:
        return PRECISIONS[precision]
    if isinstance(named := getattr(torch, str(precision), None), torch.dtype) and named.is_floating_point:
        return named
    raise ZooError(f"unknown precision {precision!r}; give one of {', '.join(PRECISIONS)}")


def profile_captured(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    arch: Architecture,
    *,
    seq_len: int,
    name: str,
    target: Target = None,
) -> ModelProfile:
    """Capture one training step of ``model`` (batch 1, sequence ``seq_len``; a few of the real
    model's layers, usually on the meta device) with ``target``'s kernels and profile it as the
    model ``arch`` describes."""
    _settle_loss(model)
    captured = capture(model, args, example_kwargs=kwargs, training=True, name=name, target=target)
    graph = detect_blocks(captured.graph)
    return profile_graph(graph, arch, seq_len=seq_len, capture_seconds=captured.seconds)


def _settle_loss(model: nn.Module) -> None:
    """A transformers causal LM whose class name names no loss (``GPT2LMHeadModel``) computes
    the causal-LM loss transformers falls back to, without warning that it guessed."""
    if not hasattr(model, "loss_type") or getattr(model, "loss_type", None) is not None:
        return
    wanted = getattr(getattr(model, "config", None), "loss_type", None)
    if not wanted:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        )

        if type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            wanted = "ForCausalLM"
    if wanted:
        model.loss_type = wanted


def profile_zoo_model(
    name: str,
    *,
    seq_len: int | None = None,
    layers: int = DEFAULT_LAYERS,
    precision: str | torch.dtype | None = None,
    target: Target = None,
) -> ModelProfile:
    """The profile of zoo model ``name`` at ``seq_len`` tokens (default: the entry's), in
    ``precision`` ("bf16", "fp16", "fp32"; default: the entry's dtype), captured with
    ``target``'s kernels (default: the CPU's)."""
    entry = ZOO.get(name)
    if entry is None:
        raise ZooError(f"unknown model {name!r}; known: {', '.join(ZOO)}")
    s = entry.seq_len if seq_len is None else int(seq_len)
    dtype = _dtype(precision)
    if dtype is not None and isinstance(entry.config, TransformersConfig):
        entry = dataclasses.replace(entry, config=dataclasses.replace(entry.config, dtype=dtype))
    try:
        arch = Architecture.from_config(entry.model_config())
    except ValueError as exc:
        raise ZooError(f"{name}: the parallel planner profiles transformers; {exc}") from exc
    model, args, kwargs = entry.build(1, s, fake=True, training=True,
                                      layers=min(layers, arch.num_layers))  # fmt: skip
    if dtype is not None and not isinstance(entry.config, TransformersConfig):
        model, args, kwargs = _cast(model, args, kwargs, dtype)
    return profile_captured(model, args, kwargs, arch, seq_len=s, name=name, target=target)


def _cast(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dtype: torch.dtype
) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
    """The model's floating-point parameters and buffers, and floating-point inputs, in ``dtype``
    (token ids and labels stay integers)."""

    def cast(x: Any) -> Any:
        return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    return model.to(dtype), tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _is_config_spec(spec: str) -> bool:
    path = Path(spec)
    return spec.endswith(".json") or (path.is_dir() and (path / "config.json").is_file())


def profile_model(
    spec: str,
    *,
    seq_len: int | None = None,
    precision: str | torch.dtype | None = None,
    layers: int = DEFAULT_LAYERS,
    target: Target = None,
) -> ModelProfile:
    """The profile of any model the command line names: a zoo name, ``path/to/file.py:factory``
    (``profile_factory``) or a transformers ``config.json`` or a directory holding one
    (``profile_config_file``), at ``seq_len`` tokens in ``precision`` ("bf16", "fp16", "fp32"),
    captured with ``target``'s kernels (a hardware; default: the CPU's). Nothing is downloaded:
    models are built with random weights on the meta device."""
    if spec in ZOO:
        return profile_zoo_model(spec, seq_len=seq_len, layers=layers, precision=precision, target=target)
    if _is_config_spec(spec):
        return profile_config_file(spec, seq_len=seq_len, precision=precision, layers=layers,
                                   target=target)  # fmt: skip
    path, sep, _ = spec.rpartition(":")
    if sep and path.endswith(".py"):
        return profile_factory(spec, seq_len=seq_len, precision=precision, target=target)
    raise ZooError(f"unknown model {spec!r}; known models: {', '.join(ZOO)}; or give "
                   f"path/to/file.py:factory, or a transformers config.json (or its directory)")  # fmt: skip


def _transformers_config(path: Path) -> Any:
    """The transformers config object a config.json describes (read locally, nothing fetched)."""
    try:
        import transformers as tf
        from transformers.models.auto.configuration_auto import (
            CONFIG_MAPPING,
            CONFIG_MAPPING_NAMES,
        )
    except ImportError as exc:  # pragma: no cover - an optional dependency
        raise ZooError("reading a config.json needs the `transformers` package: pip install "
                       "'tierplan[transformers]'") from exc  # fmt: skip

    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ZooError(f"cannot read model config {str(path)!r}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ZooError(f"model config {str(path)!r} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ZooError(f"{path} names no model_type: not a transformers config.json (it says which "
                       f"architecture, e.g. \"model_type\": \"llama\")")  # fmt: skip
    model_type = data["model_type"]
    if model_type not in CONFIG_MAPPING_NAMES:
        close = [k for k in CONFIG_MAPPING_NAMES if model_type.replace("-", "_") in k][:8]
        raise ZooError(f"{path}: model_type {model_type!r} is not one transformers "
                       f"{tf.__version__} knows" + (f" (close: {', '.join(close)})" if close else ""))  # fmt: skip
    try:
        return CONFIG_MAPPING[model_type].from_dict(data)
    except Exception as exc:  # a malformed field: transformers' own message says which
        raise ZooError(f"{path}: transformers cannot build a {model_type} config from it: {exc}") from exc


def _model_class(config: Any, path: Path) -> tuple[str, str | None]:
    """The transformers class a training step with labels runs (a masked LM for an encoder that
    has one, else a causal LM, else a sequence-to-sequence head; the config's ``architectures``
    first if it names one of those), and the ``loss_type`` to set."""
    from transformers.models.auto import modeling_auto as auto

    mt = config.model_type
    causal = (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(mt), "ForCausalLM")
    masked = (auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES.get(mt), "ForMaskedLM")
    # An encoder with both heads (BERT, RoBERTa) trains as a masked LM unless it says it decodes.
    heads = [causal, masked] if getattr(config, "is_decoder", False) else [masked, causal]
    heads.append((auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.get(mt), None))
    heads = [(c, loss) for c, loss in heads if isinstance(c, str)]
    named = getattr(config, "architectures", None) or []
    for cls, loss in heads:
        if cls in named:
            return cls, loss
    if heads:
        return heads[0]
    raise ZooError(f"{path}: transformers has no language-model head for model_type {mt!r} (causal "
                   f"LM, masked LM or sequence-to-sequence); the parallel planner profiles a "
                   f"training step with labels")  # fmt: skip


def profile_config_file(
    spec: str | Path,
    *,
    seq_len: int | None = None,
    precision: str | torch.dtype | None = None,
    layers: int = DEFAULT_LAYERS,
    target: Target = None,
) -> ModelProfile:
    """The profile of the transformers model a ``config.json`` (or a directory holding one)
    describes, any architecture transformers knows, built with random weights on the meta
    device. ``seq_len`` defaults to the config's position limit, at most 4096; ``precision`` to
    the config's dtype, else fp32."""
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ZooError(f"model config {str(spec)!r} does not exist; give a transformers config.json "
                       f"or the directory holding one")  # fmt: skip
    config = _transformers_config(path)
    cls, loss = _model_class(config, path)
    if loss is not None:
        config.loss_type = loss  # what labels= computes (silences transformers' guess)
    if seq_len is None:
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        seq_len = min(int(limit), DEFAULT_CONFIG_SEQ) if limit else 2048
    try:
        Architecture.from_config(config)
    except ValueError as exc:
        raise ZooError(f"{path}: the parallel planner profiles transformers; {exc}") from exc
    name = path.parent.name if path.name == "config.json" and path.parent.name else path.stem
    return profile_transformers(config, seq_len=int(seq_len), model_cls=cls, dtype=_dtype(precision),
                                layers=layers, name=name or config.model_type, target=target)  # fmt: skip


def _batch_and_seq(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int] | None:
    """(batch, sequence) of a factory's example: the first input of rank >= 2 (token ids)."""
    for x in (*args, *kwargs.values()):
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            return int(x.shape[0]), int(x.shape[1])
    return None


def profile_factory(
    spec: str,
    *,
    seq_len: int | None = None,
    precision: str | torch.dtype | None = None,
    target: Target = None,
) -> ModelProfile:
    """The profile of the model ``path/to/file.py:factory`` builds (called with batch_size=1,
    seq_len, training=True, fake=True, whichever it declares). The model must hold its
    architecture as ``model.config`` (a transformers config, or any object naming hidden size,
    heads, layers and vocabulary as those do), and its example must be one batch-1 sequence.
    The whole model is captured (a factory may build fewer layers than its config names: the
    config's count is the real one)."""
    model, args, kwargs = load_model(spec, batch_size=1, seq_len=seq_len, training=True, fake=True)
    config = getattr(model, "config", None)
    if config is None:
        raise ZooError(f"{spec}: the parallel planner needs the model's architecture; give the "
                       f"model a `config` attribute naming hidden_size, num_attention_heads, "
                       f"num_hidden_layers and vocab_size (a transformers config does)")  # fmt: skip
    try:
        arch = Architecture.from_config(config)
    except ValueError as exc:
        raise ZooError(f"{spec}: {exc}") from exc
    shape = _batch_and_seq(args, kwargs)
    if shape is None:
        raise ZooError(f"{spec}: the example holds no [batch, sequence] input (token ids) to read "
                       f"the sequence length from")  # fmt: skip
    batch, seq = shape
    if batch != 1:
        raise ZooError(f"{spec}: the example has batch {batch}; the parallel planner profiles batch "
                       f"1 (let the factory take batch_size)")  # fmt: skip
    if seq_len is not None and seq != int(seq_len):
        raise ZooError(f"{spec}: the example has {seq} tokens, not --seq-len {seq_len} (let the "
                       f"factory take seq_len)")  # fmt: skip
    dtype = _dtype(precision)
    if dtype is not None:
        model, args, kwargs = _cast(model, args, kwargs, dtype)
    model.train(True)
    path = spec.rpartition(":")[0]
    return profile_captured(model, args, kwargs, arch, seq_len=seq, name=Path(path).stem, target=target)


def _with_layers(config: Any, n: int, total: int) -> Any:
    """``zoo.with_layers``, and for a transformers config holding per-layer lists (``layer_types``
    of Qwen2, Gemma, ...: validated against the layer count) those lists cut to ``n`` too."""
    data = config.to_dict() if hasattr(config, "to_dict") and hasattr(config, "from_dict") else None
    per_layer = [k for k, v in (data or {}).items() if isinstance(v, list) and len(v) == total]
    if data is None or not per_layer or n == total:
        return with_layers(config, n)
    for k in per_layer:
        data[k] = data[k][:n]
    for k in ("num_hidden_layers", "n_layer", "num_layers"):
        if k in data:
            data[k] = n
    small = type(config).from_dict(data)
    for k, v in vars(config).items():  # what to_dict leaves out (loss_type, ...)
        if k not in data and not k.startswith("_") and not hasattr(small, k):
            setattr(small, k, v)
    return small


def profile_transformers(
    config: Any,
    *,
    seq_len: int,
    model_cls: str = "AutoModelForCausalLM",
    dtype: torch.dtype | None = None,
    layers: int = DEFAULT_LAYERS,
    name: str | None = None,
    target: Target = None,
) -> ModelProfile:
    """The profile of a transformers model given by its config object (left unchanged), e.g. a
    ``GPT2Config`` of your own sizes. ``model_cls`` names the model class (an auto class by
    default); ``dtype`` defaults to the config's, else float32."""
    dtype = _dtype(dtype)
    arch = Architecture.from_config(config)
    small = _with_layers(config, min(layers, arch.num_layers), arch.num_layers)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):  # configs loaded from JSON name it
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model, args, kwargs = build_transformers(small, model_cls, dtype, 1, seq_len, training=True)
    model.train(True)
    name = name or getattr(config, "model_type", None) or type(config).__name__
    return profile_captured(model, args, kwargs, arch, seq_len=seq_len, name=name, target=target)


def plan_model(
    model: str | ModelProfile,
    hardware: str | Hardware,
    gpus: int,
    *,
    seq_len: int | None = None,
    precision: str | torch.dtype | None = None,
    layout: Layout | str | None = None,
    target: Target | bool = True,
    **options: Any,
) -> ParallelResult:
    """``plan_parallel`` for any model ``profile_model`` takes (a zoo name,
    ``path/to/file.py:factory``, a transformers config.json) or a profile: profiles it at
    ``seq_len`` in ``precision`` and searches, restricted to ``layout``'s fields when given.
    ``options`` go to ``plan_parallel`` (serve, global_batch, prompt, generate, top);
    ``seq_len`` and ``precision`` are a profile's own when given one. The model is captured with
    ``hardware``'s kernels (``target=True``), or ``target``'s, or the CPU's (``target=None``)."""
    if not isinstance(model, ModelProfile):
        kernels = hardware if target is True else (None if target is False else target)
        model = profile_model(model, seq_len=seq_len, precision=precision, target=kernels)
    return plan_parallel(model, hardware, gpus, layout=layout, **options)


def published_run_profile(run: PublishedRun, hardware: Hardware) -> ModelProfile:
    """A published run's GPT model (``tierplan.parallel.calibration``) profiled: a GPT2Config of
    its shape in fp16 (Megatron's GPT: learned positions, GELU MLP of 4h, tied embeddings),
    captured with the hardware's kernels; 2 layers are captured and scaled to the real count."""
    import transformers

    cfg = transformers.GPT2Config(n_layer=run.layers, n_embd=run.hidden, n_head=run.heads,
                                  vocab_size=CALIBRATION_VOCAB, n_positions=CALIBRATION_SEQ_LEN)  # fmt: skip
    return profile_transformers(cfg, seq_len=CALIBRATION_SEQ_LEN, model_cls="GPT2LMHeadModel",
                                dtype=torch.float16, name=f"gpt-{run.name}", target=hardware)  # fmt: skip


def published_run_profiles(runs: Iterable[PublishedRun], hardware: Hardware) -> dict[str, ModelProfile]:
    """The profile of each run, by its name (capture once, price as often as a fit needs)."""
    return {r.name: published_run_profile(r, hardware) for r in runs}
