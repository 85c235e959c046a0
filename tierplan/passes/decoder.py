"""The structure of a causal LM, read without running it: its decoder layers, which layer a
parameter belongs to, and whether it can run with a KV cache the generation runtime owns.

The generation runtime (``tierplan.codegen.generate``) streams weights one decoder layer at a time
and hands the model its own ``Cache`` object. It relies on three facts checked here:

- the model has one ``ModuleList`` of decoder layers, all of one class, as many as the config's
  layer count (GPT-2's ``transformer.h``, Llama's ``model.layers``, OPT's ``model.decoder.layers``):
  these are what it wraps, loads and releases;
- its forward takes a cache (``cache``, or the older ``past_key_values``) and ``use_cache``, and
  it is not an encoder-decoder (their cache is a pair of caches, and cross-attention keys do not
  grow one position per step);
- every layer is full attention whose attention module writes the cache under its own layer's
  index (``layer_idx == i`` in layer ``i``): the runtime lays the cache out per decoder layer and
  fetches layer ``i + 1``'s blocks while layer ``i`` runs. Sliding-window, chunked, linear or
  shared-KV layers keep a different cache and are refused.

Reads modules and configs only; imports torch alone (the package's layer 1).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch


class DecoderError(ValueError):
    """The model is not a decoder the generation runtime can run; the message names the module."""


def text_config(model: torch.nn.Module) -> Any:
    """The model's (text, decoder-side) Hugging Face config, or None."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text = getattr(config, "get_text_config", None)
    return get_text(decoder=True) if callable(get_text) else config


def _layer_count(model: torch.nn.Module) -> int:
    config = text_config(model)
    if config is None:
        raise DecoderError(
            f"{type(model).__name__} (the model itself) has no `config`: the decoder layers are "
            f"found from a Hugging Face config's num_hidden_layers (or n_layer)"
        )
    for attr in ("num_hidden_layers", "n_layer"):
        n = getattr(config, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    raise DecoderError(
        f"{type(model).__name__} (the model itself): its config {type(config).__name__} has no "
        f"num_hidden_layers or n_layer, so its decoder layers cannot be told apart"
    )


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The qualified name and the ``ModuleList`` of the model's repeated decoder layers: the one
    ModuleList whose children all have one class and whose length is the config's layer count."""
    n = _layer_count(model)
    found = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == n
        and len({type(child) for child in module}) == 1
    ]
    if len(found) == 1:
        return found[0]
    if not found:
        lists = [f"{name} ({len(m)} x {', '.join(sorted({type(c).__name__ for c in m}))})"
                 for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
        raise DecoderError(
            f"{type(model).__name__}: no ModuleList of {n} decoder layers of one class (the config's "
            f"layer count); its ModuleLists: {', '.join(lists) if lists else 'none'}"
        )
    raise DecoderError(
        f"{type(model).__name__}: {len(found)} ModuleLists of {n} layers of one class "
        f"({', '.join(name for name, _ in found)}); the runtime needs exactly one stack of decoder "
        f"layers (an encoder-decoder has two)"
    )


def kv_geometry(model: torch.nn.Module) -> tuple[int, int]:
    """(key/value heads, head dimension) of the model's attention, from its config: what one
    cache position of one sequence holds per layer, for K and for V alike."""
    config = text_config(model)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        raise DecoderError(f"{type(model).__name__} (the model itself): its config names no num_attention_heads")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(kv_heads), int(head_dim)


def layer_of(param_name: str, layers_prefix: str) -> int | None:
    """Which decoder layer ``param_name`` belongs to (``"model.layers.3.mlp.up_proj.weight"``
    under ``"model.layers"`` is 3); None for the rest (embeddings, final norm, head)."""
    head = layers_prefix + "." if layers_prefix else ""
    if not param_name.startswith(head):
        return None
    index, _, rest = param_name[len(head):].partition(".")
    return int(index) if index.isdigit() and rest else None


def _forward_parameters(model: torch.nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # a forward without a signature (a C function)
        return set()


def _layer_kinds(config: Any, n: int) -> list[str]:
    """The attention kind of every layer, read as transformers reads it to build a cache
    (``layer_types``, else a sliding window or chunk size for all layers)."""
    kinds = getattr(config, "layer_types", None)
    if kinds is not None:
        return list(kinds)
    if getattr(config, "sliding_window", None) is not None:
        return ["sliding_attention"] * n
    if getattr(config, "attention_chunk_size", None) is not None:
        return ["chunked_attention"] * n
    return ["full_attention"] * n


def check_cache_capture(model: torch.nn.Module) -> None:
    """Raise DecoderError, naming the module (class and qualified name), unless the model can run
    with a KV cache the runtime owns: a decoder-only causal LM whose forward takes a cache, with
    one stack of full-attention layers each writing the cache under its own index."""
    cls = type(model).__name__
    config = text_config(model)
    if not isinstance(model, torch.nn.Module) or config is None:
        raise DecoderError(
            f"{cls} (the model itself) is not a Hugging Face causal LM (no `config`): the "
            f"generation runtime runs a transformers *ForCausalLM model with its own KV cache"
        )
    if getattr(model.config, "is_encoder_decoder", False):
        raise DecoderError(
            f"{cls} (the model itself) is an encoder-decoder: its cache is a pair (self- and "
            f"cross-attention) the runtime does not lay out; use a decoder-only causal LM"
        )
    accepted = _forward_parameters(model)
    if not {"cache", "past_key_values"} & accepted or "use_cache" not in accepted:
        raise DecoderError(
            f"{cls} (the model itself): its forward takes no cache (`cache` or `past_key_values`, "
            f"and `use_cache`), so there is no KV cache to capture; the runtime needs a causal LM "
            f"(a *ForCausalLM or *LMHeadModel class)"
        )
    prefix, layers = decoder_layers(model)
    if getattr(config, "add_cross_attention", False):
        raise DecoderError(
            f"{type(layers[0]).__name__} at {prefix}.0 has cross-attention (config.add_cross_attention): "
            f"its keys come from an encoder, not from a growing cache"
        )
    for i, kind in enumerate(_layer_kinds(config, len(layers))):
        if kind != "full_attention":
            raise DecoderError(
                f"{type(layers[i]).__name__} at {prefix}.{i} is a {kind!r} layer: the runtime's cache "
                f"holds every position of full-attention layers only"
            )
    for i, layer in enumerate(layers):
        indices = {m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        if indices != {i}:
            seen = f"layer_idx {sorted(indices)}" if indices else "no attention module with a layer_idx"
            raise DecoderError(
                f"{type(layer).__name__} at {prefix}.{i} has {seen}: the runtime needs the attention "
                f"of decoder layer {i} to write the cache as layer {i}"
            )


__all__ = ["DecoderError", "check_cache_capture", "decoder_layers", "kv_geometry", "layer_of", "text_config"]
