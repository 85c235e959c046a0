"""The model zoo: models built from configs with random weights (nothing is ever downloaded).

Every entry builds ``(model, example_args, example_kwargs)`` for a batch size and sequence
length, either with real (random) weights on the CPU or on the meta device (``fake=True``), where
even a Llama-2-70B shape costs no memory; ``tierplan.passes.capture`` traces meta models on fake
tensors. Training examples pass labels, so the model returns a loss (transformers models return
``.loss``, the in-repo ones a scalar).

Every entry holds its model's config as data (``ZooEntry.config``): an ``MLPConfig``, a
``CNNConfig``, a ``TinyTransformerConfig`` or a ``TransformersConfig`` (a transformers config
class and the fields that differ from its defaults). ``ZooEntry.build(layers=n)`` builds a copy of
a transformer with ``n`` of its identical layers, which is what ``tierplan.profiling`` captures.

``load_model`` also accepts ``path/to/file.py:factory``: a function returning
``(model, example_inputs)`` or ``(model, example_inputs, example_kwargs)``; it is called with
whichever of ``batch_size``, ``seq_len``, ``training``, ``fake`` it declares.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import inspect
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Union

import torch
import torch.nn.functional as F
from torch import nn

from tierplan.models.tiny_transformer import TinyTransformer, TinyTransformerConfig

Example = tuple[nn.Module, tuple[Any, ...], dict[str, Any]]


class ZooError(ValueError):
    """An unknown model name, a missing file or factory, or a factory returning the wrong thing."""


class UserCodeError(ZooError):
    """An exception raised by the user's own code: importing a model file, calling its factory, or
    (raised by the command line) the model's forward during capture. ``location`` is
    ``path:LINE (in function)`` of the innermost frame in the user's file, when there is one."""

    def __init__(self, message: str, *, location: str | None = None) -> None:
        super().__init__(message)
        self.location = location

    @staticmethod
    def location_in(exc: BaseException, path: Path, *, innermost: bool = False) -> str | None:
        """``path:LINE (in function)`` of the innermost frame of ``exc``'s traceback that runs
        the file ``path`` (a syntax error: the line it points at), or None; with ``innermost``,
        None unless that is the innermost frame of all."""
        target = _resolved(path)
        found = None
        for frame, lineno in traceback.walk_tb(exc.__traceback__):
            ours = _resolved(frame.f_code.co_filename) == target
            if ours:
                found = f"{path}:{lineno} (in {frame.f_code.co_name})"
            elif innermost:
                found = None
        if (found is None and isinstance(exc, SyntaxError) and exc.filename and exc.lineno
                and _resolved(exc.filename) == target):
            found = f"{path}:{exc.lineno}"
        return found

    @staticmethod
    def raised_in_tierplan(exc: BaseException) -> bool:
        """Whether the innermost frame of ``exc``'s traceback is tierplan's own code."""
        innermost = None
        for frame, _ in traceback.walk_tb(exc.__traceback__):
            innermost = frame.f_code.co_filename
        return innermost is not None and _resolved(innermost).is_relative_to(_TIERPLAN_DIR)

    @staticmethod
    def describe(exc: BaseException) -> str:
        """``Type: message`` on one line (``Type`` alone when the message is empty)."""
        # A syntax error's str() repeats the file and line, which the caller says better.
        message = exc.msg if isinstance(exc, SyntaxError) and exc.msg else str(exc)
        text = " ".join(message.split())
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _resolved(path: str | Path) -> Path:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # pragma: no cover - a path that cannot be resolved
        return Path(path)


_TIERPLAN_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class MLPConfig:
    d_in: int = 784
    hidden: int = 1024
    depth: int = 3
    classes: int = 10


@dataclass(frozen=True)
class CNNConfig:
    classes: int = 10
    width: int = 32


@dataclass(frozen=True)
class TransformersConfig:
    """A transformers model as data: its config class and the fields that differ from that class's
    defaults, its model class, the loss ``labels=`` computes and the weights' dtype. Classes are
    held by name so that importing the zoo does not import transformers (an optional dependency)."""

    config_cls: str
    model_cls: str
    loss_type: str
    dtype: torch.dtype
    fields: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def make_config(self) -> Any:
        """The transformers config object the model is built from."""
        cfg = getattr(_transformers(), self.config_cls)(**self.fields)
        cfg.loss_type = self.loss_type  # what labels= computes (silences transformers' guess)
        return cfg


ModelConfig = Union[MLPConfig, CNNConfig, TinyTransformerConfig, TransformersConfig]


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    config: ModelConfig
    batch_size: int  # defaults used when the caller gives none
    seq_len: int  # tokens for language models; image side for the CNN; unused by the MLP

    def model_config(self) -> Any:
        """What the model class is built from: a transformers entry's config object (this imports
        transformers), else ``config`` itself."""
        if isinstance(self.config, TransformersConfig):
            return self.config.make_config()
        return self.config

    def build(
        self,
        batch_size: int | None = None,
        seq_len: int | None = None,
        *,
        fake: bool = False,
        training: bool = True,
        layers: int | None = None,
    ) -> Example:
        """The model and a batch for it; with ``layers``, a copy of a transformer with that many
        layers (the rest of its config unchanged)."""
        b = self.batch_size if batch_size is None else int(batch_size)
        s = self.seq_len if seq_len is None else int(seq_len)
        if b < 1 or s < 1:
            raise ZooError(f"{self.name}: batch_size and seq_len must be positive, got {b}, {s}")
        with _building(fake):
            model, args, kwargs = _build(self.config, b, s, training, layers)
        model.train(training)
        return model, args, kwargs


@contextlib.contextmanager
def _building(fake: bool) -> Iterator[None]:
    """Build on the meta device (no storage) when fake; else with a fixed seed, leaving the
    caller's random state untouched."""
    if fake:
        with torch.device("meta"):
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            yield


# -- in-repo models ------------------------------------------------------------------------------


class MLP(nn.Module):
    """A classifier on flat features; returns the cross-entropy loss when given labels."""

    def __init__(self, d_in: int = 784, hidden: int = 1024, depth: int = 3, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(d_in, hidden), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        layers.append(nn.Linear(hidden, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.net(x)
        return logits if labels is None else F.cross_entropy(logits, labels)


class CNN(nn.Module):
    """A small conv net (conv-BN-ReLU stages, pooling, a linear head) for 3-channel images."""

    def __init__(self, classes: int = 10, width: int = 32) -> None:
        super().__init__()

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            )

        self.features = nn.Sequential(
            stage(3, width),
            stage(width, width),
            nn.MaxPool2d(2),
            stage(width, 2 * width),
            stage(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.head(self.features(x).flatten(1))
        return logits if labels is None else F.cross_entropy(logits, labels)


def _tiny_transformer(config: TinyTransformerConfig, batch: int, seq: int, training: bool) -> Example:
    cfg = dataclasses.replace(config, max_seq_len=max(seq, config.max_seq_len))
    model = TinyTransformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    return model, (ids,), ({"labels": ids.clone()} if training else {})


# -- transformers models -------------------------------------------------------------------------


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - an optional dependency
        raise ZooError(
            "this zoo entry needs the `transformers` package: pip install 'tierplan[transformers]'"
        ) from exc
    return transformers


def build_transformers(
    config: Any, model_cls: str, dtype: torch.dtype, batch: int, seq: int, training: bool
) -> Example:
    """A transformers model of ``config`` (a config object) with random weights, and a batch of
    token ids (labels too when training). ``model_cls`` names the class: ``GPT2LMHeadModel``, or an
    auto class such as ``AutoModelForCausalLM``. Build under ``torch.device("meta")`` for a fake
    model. No KV cache: training or a single forward pass."""
    tf = _transformers()
    config = copy.deepcopy(config)  # the caller's config stays as it was
    config.use_cache = False
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and seq > limit:
        raise ZooError(f"seq_len={seq} exceeds the model's {limit} positions")
    cls = getattr(tf, model_cls)
    model = (cls.from_config(config) if model_cls.startswith("Auto") else cls(config)).to(dtype)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    kwargs: dict[str, Any] = {"input_ids": ids}
    if training:
        # Causal LMs shift labels internally; the MLM predicts every token. A separate tensor,
        # as data collators hand it over.
        kwargs["labels"] = ids.clone()
    return model, (), kwargs


def _gpt2(**fields: Any) -> TransformersConfig:
    return TransformersConfig("GPT2Config", "GPT2LMHeadModel", "ForCausalLM", torch.float32, fields)


def _gpt3(**fields: Any) -> TransformersConfig:
    """GPT-3's shapes in GPT-2's layout (the same block, learned positions, tied embeddings), bf16."""
    return TransformersConfig("GPT2Config", "GPT2LMHeadModel", "ForCausalLM", torch.bfloat16,
                              {"n_positions": 2048, **fields})


def _llama(dtype: torch.dtype = torch.bfloat16, **fields: Any) -> TransformersConfig:
    base = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
    return TransformersConfig("LlamaConfig", "LlamaForCausalLM", "ForCausalLM", dtype, {**base, **fields})


def _opt(dtype: torch.dtype = torch.float16, **fields: Any) -> TransformersConfig:
    """OPT (Zhang et al. 2022, Table 1), fp16 as released; the learned positions cover 2048 tokens."""
    base = dict(vocab_size=50272, max_position_embeddings=2048, do_layer_norm_before=True)
    hidden = fields.get("hidden_size", 768)
    return TransformersConfig("OPTConfig", "OPTForCausalLM", "ForCausalLM", dtype,
                              {**base, "word_embed_proj_dim": hidden, "ffn_dim": 4 * hidden, **fields})


def _bert(**fields: Any) -> TransformersConfig:
    return TransformersConfig("BertConfig", "BertForMaskedLM", "ForMaskedLM", torch.float32, fields)


# -- building from a config -----------------------------------------------------------------------


def _build(config: ModelConfig, batch: int, seq: int, training: bool, layers: int | None) -> Example:
    if isinstance(config, TransformersConfig):
        cfg = config.make_config()
        cfg = cfg if layers is None else with_layers(cfg, layers)
        return build_transformers(cfg, config.model_cls, config.dtype, batch, seq, training)
    if isinstance(config, TinyTransformerConfig):
        cfg = config if layers is None else with_layers(config, layers)
        return _tiny_transformer(cfg, batch, seq, training)
    if layers is not None:
        raise ZooError(f"a {type(config).__name__} model has no repeated layers to count")
    if isinstance(config, MLPConfig):
        model: nn.Module = MLP(**dataclasses.asdict(config))
        x = torch.randn(batch, config.d_in)
    else:
        model, x = CNN(**dataclasses.asdict(config)), torch.randn(batch, 3, seq, seq)
    kwargs = {"labels": torch.randint(0, config.classes, (batch,))} if training else {}
    return model, (x,), kwargs


def with_layers(config: Any, n: int) -> Any:
    """A copy of a transformer's config (a transformers config object or a config dataclass) with
    ``n`` layers; the original is left as it was."""
    names = [a for a in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(config, a)]
    if not names:
        raise ZooError(f"{type(config).__name__} has no layer count to change")
    if dataclasses.is_dataclass(config):
        return dataclasses.replace(config, **{a: n for a in names})
    config = copy.deepcopy(config)
    for a in names:
        setattr(config, a, n)
    return config


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("mlp", "4-layer MLP classifier, 784 -> 3 x 1024 -> 10 (2.9M params)", MLPConfig(), 64, 1),
        ZooEntry("cnn", "4-stage conv-BN-ReLU net on 3x32x32 images (65k params)", CNNConfig(), 32, 32),
        ZooEntry(
            "tiny-transformer",
            "in-repo decoder-only transformer, 4 layers, d_model 128 (0.9M params)",
            TinyTransformerConfig(),
            8,
            128,
        ),
        ZooEntry("gpt2", "GPT-2 small, 12 layers, 768 hidden (124M params)", _gpt2(), 8, 1024),
        ZooEntry(
            "gpt2-medium",
            "GPT-2 medium, 24 layers, 1024 hidden (355M params)",
            _gpt2(n_layer=24, n_embd=1024, n_head=16),
            4,
            1024,
        ),
        ZooEntry(
            "gpt2-large",
            "GPT-2 large, 36 layers, 1280 hidden (774M params)",
            _gpt2(n_layer=36, n_embd=1280, n_head=20),
            2,
            1024,
        ),
        ZooEntry(
            "llama-7b",
            "Llama-2-7B shape, 32 layers, 4096 hidden, bf16 (6.7B params)",
            _llama(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32, intermediate_size=11008),
            1,
            4096,
        ),
        ZooEntry(
            "llama-13b",
            "Llama-2-13B shape, 40 layers, 5120 hidden, bf16 (13B params)",
            _llama(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                   num_key_value_heads=40, intermediate_size=13824),
            1,
            4096,
        ),
        ZooEntry(
            "llama-70b",
            "Llama-2-70B shape, 80 layers, 8192 hidden, GQA 64/8 heads, bf16 (69B params)",
            _llama(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                   num_key_value_heads=8, intermediate_size=28672),
            1,
            4096,
        ),
        ZooEntry(
            "gpt3-13b",
            "GPT-3 13B shape (Brown et al. 2020, Table 2.1: 40 layers, 40 heads of 128; hidden "
            "5120, as 40 x 128, where the table prints 5140), bf16 (12.9B params)",
            _gpt3(n_layer=40, n_embd=5120, n_head=40),
            1,
            2048,
        ),
        ZooEntry(
            "gpt3-175b",
            "GPT-3 175B shape (Brown et al. 2020, Table 2.1: 96 layers, 12288 hidden, 96 heads), "
            "bf16 (175B params)",
            _gpt3(n_layer=96, n_embd=12288, n_head=96),
            1,
            2048,
        ),
        ZooEntry(
            "opt-30b",
            "OPT-30B shape (Zhang et al. 2022, Table 1: 48 layers, 56 heads, hidden 7168), fp16 (30B params)",
            _opt(hidden_size=7168, num_hidden_layers=48, num_attention_heads=56),
            1,
            2048,
        ),
        ZooEntry(
            "opt-66b",
            "OPT-66B shape (Zhang et al. 2022, Table 1: 64 layers, 72 heads, hidden 9216), fp16 (66B params)",
            _opt(hidden_size=9216, num_hidden_layers=64, num_attention_heads=72),
            1,
            2048,
        ),
        ZooEntry(
            "opt-175b",
            "OPT-175B shape (Zhang et al. 2022, Table 1: 96 layers, 96 heads, hidden 12288), fp16 (175B params)",
            _opt(hidden_size=12288, num_hidden_layers=96, num_attention_heads=96),
            1,
            2048,
        ),
        ZooEntry("bert-base", "BERT-base masked LM, 12 layers, 768 hidden (110M params)",
                 _bert(), 32, 512),
        ZooEntry(
            "bert-large",
            "BERT-large masked LM, 24 layers, 1024 hidden (335M params)",
            _bert(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096),
            16,
            512,
        ),
        ZooEntry(
            "gpt2-tiny",
            "GPT-2 test config, 2 layers, 64 hidden",
            _gpt2(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128,
                  bos_token_id=0, eos_token_id=0),
            2,
            32,
        ),
        ZooEntry(
            "llama-tiny",
            "Llama test config, 2 layers, 64 hidden, GQA 4/2 heads",
            _llama(dtype=torch.float32, hidden_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                   vocab_size=1000, max_position_embeddings=128),
            2,
            32,
        ),
        ZooEntry(
            "opt-tiny",
            "OPT test config, 2 layers, 64 hidden",
            _opt(dtype=torch.float32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 ffn_dim=128, vocab_size=1000, max_position_embeddings=128),
            2,
            32,
        ),
        ZooEntry(
            "bert-tiny",
            "BERT test config, 2 layers, 64 hidden",
            _bert(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, vocab_size=1000, max_position_embeddings=128),
            2,
            32,
        ),
    ]
}


def list_models() -> list[str]:
    return list(ZOO)


def load_model(
    spec: str,
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    training: bool = True,
    fake: bool = False,
) -> Example:
    """``(model, example_args, example_kwargs)`` for a zoo name or ``path/to/file.py:factory``."""
    if spec in ZOO:
        return ZOO[spec].build(batch_size, seq_len, fake=fake, training=training)
    path, sep, func = spec.rpartition(":")
    if not sep or not path.endswith(".py"):
        raise ZooError(
            f"unknown model {spec!r}; known models: {', '.join(ZOO)}; or give "
            f"path/to/file.py:factory"
        )
    factory = _load_factory(Path(path), func)
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a callable without a signature (a C function): no options
        accepted = {}  # type: ignore[assignment]
    offered = {"batch_size": batch_size, "seq_len": seq_len, "training": training, "fake": fake}
    kwargs = {k: v for k, v in offered.items() if k in accepted and v is not None}
    try:
        result = factory(**kwargs)
    except Exception as exc:
        # The user's code failed: say so, and where in their file. An exception whose innermost
        # frame is tierplan's own code (the factory called into tierplan) is left as it is.
        if UserCodeError.raised_in_tierplan(exc):
            raise
        location = UserCodeError.location_in(exc, Path(path))
        at = f" at {location}" if location else ""
        raise UserCodeError(
            f"{spec}: the factory raised {UserCodeError.describe(exc)}{at}; fix the factory, or "
            f"rerun with --debug for the traceback",
            location=location,
        ) from exc
    return _normalize(result, spec)


def _load_factory(path: Path, func: str) -> Callable[..., Any]:
    if not path.is_file():
        raise ZooError(f"model file {str(path)!r} does not exist")
    if not func.isidentifier():
        raise ZooError(f"{func!r} is not a function name; write path/to/file.py:factory")
    module_name = f"tierplan_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ZooError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        location = UserCodeError.location_in(exc, path)
        at = f" at {location}" if location else ""
        raise UserCodeError(
            f"{path}:{func}: importing {path} raised {UserCodeError.describe(exc)}{at}; fix the "
            f"file, or rerun with --debug for the traceback",
            location=location,
        ) from exc
    factory = getattr(module, func, None)
    if not callable(factory):
        functions = [n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")]
        raise ZooError(
            f"{str(path)!r} has no function {func!r}; it defines: {', '.join(functions) or 'none'}"
        )
    return factory


def _normalize(result: Any, spec: str) -> Example:
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise ZooError(
            f"{spec} returned {type(result).__name__}; it must return (model, example_inputs) "
            f"or (model, example_inputs, example_kwargs)"
        )
    model, args = result[0], result[1]
    kwargs = result[2] if len(result) == 3 else {}
    if not isinstance(model, nn.Module):
        raise ZooError(f"{spec} returned a {type(model).__name__} as the model; expected an nn.Module")
    if isinstance(args, torch.Tensor):
        args = (args,)
    elif isinstance(args, list):
        args = tuple(args)
    elif not isinstance(args, tuple):
        raise ZooError(f"{spec}: example_inputs must be a tensor, tuple or list, got {type(args).__name__}")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise ZooError(f"{spec}: example_kwargs must be a dict, got {type(kwargs).__name__}")
    return model, args, kwargs


__all__ = [
    "CNN", "CNNConfig", "MLP", "MLPConfig", "ModelConfig", "TransformersConfig", "UserCodeError", "ZOO",
    "ZooEntry", "ZooError", "build_transformers", "list_models", "load_model", "with_layers",
]
