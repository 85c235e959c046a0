"""Generation's front end: a causal LM -> its GenerationShape -> a validated GenerationPlan, and
``GenerationModule``, what ``tierplan.compile(..., generate=True)`` returns.

The model is read, not run: its decoder layers and parameters (``passes/decoder.py``) and its
config's sizes, so a model built on the meta device (``tierplan plan opt-175b --generate 32``)
plans without memory. The plan is made for one job, batch x prompt x new tokens;
``GenerationModule.generate`` plans each new job shape once and runs it with
``codegen/generate.py``'s ``TieredGenerator``.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tierplan.api import Budget, resolve_budget
from tierplan.codegen.generate import TieredGenerator
from tierplan.cost_models.hardware import Hardware, load_hardware
from tierplan.generation.baselines import baseline_plans, uniform_policy
from tierplan.generation.rates import generation_rates
from tierplan.generation.search import plan_generation
from tierplan.generation.simulate import peak_bytes
from tierplan.passes.decoder import DecoderError, check_cache_capture, decoder_layers
from tierplan.plans.generation import GenerationPlan, GenerationShape
from tierplan.plans.plan import DEVICE, PlanError
from tierplan.plans.validate import validate
from tierplan.zoo import with_layers

DEFAULT_TIME_LIMIT_S = 60.0


def _config_int(config: Any, *names: str, default: int | None = None) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    if default is None:
        raise DecoderError(f"{type(config).__name__} has none of {', '.join(names)}: tierplan cannot size "
                           "the model's layers for generation")
    return default


def generation_shape(model: torch.nn.Module, *, batch: int, prompt_len: int, new_tokens: int,
                     name: str | None = None) -> GenerationShape:
    """The numbers generation is priced with, read from ``model`` (real or on the meta device)."""
    check_cache_capture(model)
    prefix, layers = decoder_layers(model)
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    per_layer = [[(n, p.numel() * p.element_size()) for n, p in layer.named_parameters()] for layer in layers]
    for i, params in enumerate(per_layer[1:], start=1):
        if params != per_layer[0]:
            raise DecoderError(f"{type(model).__name__}: layer {i} of {prefix} ({type(layers[i]).__name__}) has other "
                               "parameters than layer 0; tierplan places every layer alike")
    inside = {f"{prefix}.{i}.{n}" for i in range(len(layers)) for n, _ in per_layer[0]}
    other = [(n, p.numel() * p.element_size()) for n, p in model.named_parameters() if n not in inside]
    first = next(model.parameters())
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model")
    heads = _config_int(config, "num_attention_heads", "n_head")
    limit = _config_int(config, "max_position_embeddings", "n_positions", default=1 << 30)
    # Learned positions (GPT-2's wpe, OPT's embed_positions, offset by 2) end at the table's end;
    # rotary positions do not, and long-context deployments run them past the trained length.
    learned = any(isinstance(m, torch.nn.Embedding) and m.num_embeddings in (limit, limit + 2)
                  for m in model.modules())
    if learned and prompt_len + new_tokens > limit:
        raise PlanError(f"prompt {prompt_len} + {new_tokens} new tokens is more than {type(model).__name__}'s "
                        f"{limit} learned positions (config.max_position_embeddings)")
    return GenerationShape(
        model=name or type(model).__name__, layers=len(layers), hidden=hidden, heads=heads,
        kv_heads=_config_int(config, "num_key_value_heads", default=heads),
        head_dim=_config_int(config, "head_dim", default=hidden // heads),
        intermediate=_config_int(config, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden),
        vocab=_config_int(config, "vocab_size"), dtype_bytes=first.element_size(), layers_prefix=prefix,
        layer_params=tuple(per_layer[0]), other_params=tuple(other), prompt_len=prompt_len,
        new_tokens=new_tokens, batch=batch, ops_per_layer=ops_per_layer(model),
    )


# A small copy of the model's config: the same layer code at sizes that run in milliseconds.
_SMALL_SIZES = {"hidden_size": 64, "n_embd": 64, "d_model": 64, "word_embed_proj_dim": 64, "intermediate_size": 128,
                "ffn_dim": 128, "n_inner": 128, "num_attention_heads": 4, "n_head": 4, "head_dim": 16, "vocab_size": 128,
                "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


def ops_per_layer(model: torch.nn.Module) -> int:
    """The aten ops one decoder layer dispatches in a decode step (what each costs the runtime
    beyond its roofline): a decode step of a small copy of the model's config with 2 layers less
    one with 1. 0 when the model cannot be rebuilt from its config (then an assumed count prices it)."""
    from transformers import DynamicCache

    config = copy.deepcopy(model.config)
    heads = getattr(config, "num_attention_heads", None)
    for name, value in _SMALL_SIZES.items():
        if hasattr(config, name):
            setattr(config, name, value)
    if getattr(config, "num_key_value_heads", None) and heads:
        config.num_key_value_heads = 4 if model.config.num_key_value_heads == heads else 2
    counts = []
    try:
        for layers in (1, 2):
            small = with_layers(config, layers)
            small.use_cache = True
            copy_model = type(model)(small).to(next(model.parameters()).dtype).eval()
            ids = torch.zeros(1, 4, dtype=torch.long)
            cache = DynamicCache()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                copy_model(input_ids=ids, past_key_values=cache, use_cache=True)
                counter = _OpCounter()
                with counter:
                    copy_model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
            counts.append(counter.ops)
    except Exception:  # a model that cannot be rebuilt small: priced with the assumed count
        return 0
    return max(0, counts[1] - counts[0])


def capacities_for(hardware: Hardware, budget: int, tiers: Sequence[str]) -> dict[str, int]:
    capacities = {DEVICE: budget}
    if "nvme" in tiers and "host" not in tiers:
        raise PlanError("tiers=('nvme',): NVMe is read and written through host staging buffers; give "
                        "tiers=('host', 'nvme') and, to keep data off the host, a hardware with less host "
                        "memory (Hardware.with_tier_capacity('host', ...), --host-memory)")
    for tier in tiers:
        if tier == DEVICE:
            raise PlanError("tiers lists 'device': name only the slower tiers a plan may use, e.g. host,nvme")
        capacities[tier] = hardware.tier(tier).capacity_bytes
    return capacities


def plan_for(shape: GenerationShape, *, hardware: str | Path | Hardware = "h100-sxm", memory_budget: Budget = None,
             tiers: Sequence[str] = ("host",), time_limit: float | None = None, attention: str | None = None,
             on_candidate: Callable[[str], None] | None = None) -> GenerationPlan:
    """The validated plan of one job. ``memory_budget`` as ``tierplan.plan``'s; a fraction is of
    the all-on-device policy's device peak. ``attention`` fixes where attention runs ("device",
    "host"); None searches both."""
    if attention not in (None, "device", "host"):
        raise PlanError(f"attention={attention!r}: give 'device', 'host' or None (search both)")
    hw = hardware if isinstance(hardware, Hardware) else load_hardware(hardware)
    rates = generation_rates(hw, shape.dtype_bytes, shape.ops_per_layer)
    everything = peak_bytes(shape, uniform_policy(shape, DEVICE, DEVICE), rates)[DEVICE]
    budget = resolve_budget(memory_budget, keep_all_peak=everything, device_bytes=hw.tier(DEVICE).capacity_bytes,
                            hardware=hw.name)
    plan = plan_generation(shape, rates, capacities_for(hw, budget, tiers), hardware=hw.name,
                           time_limit_s=DEFAULT_TIME_LIMIT_S if time_limit is None else time_limit,
                           attention=attention, on_candidate=on_candidate)
    validate(plan)
    return plan


def generation_baselines(plan: GenerationPlan) -> dict[str, GenerationPlan | str]:
    """The baselines of ``plan``'s job in its setting, each validated, or why it cannot run."""
    out = baseline_plans(plan.shape, plan.rates, plan.capacities, hardware=plan.hardware)
    for result in out.values():
        if isinstance(result, GenerationPlan):
            validate(result)
    return out


def job_of(example_inputs: Sequence[Any], example_kwargs: dict[str, Any] | None) -> tuple[int, int]:
    """(batch, prompt length) of the example's token ids."""
    ids = (example_kwargs or {}).get("input_ids")
    if ids is None and example_inputs:
        ids = example_inputs[0]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise PlanError("generation needs example token ids of shape [batch, prompt length], as the first "
                        "example input or input_ids=")
    return int(ids.shape[0]), int(ids.shape[1])


class GenerationModule:
    """``compiled.generate(input_ids, max_new_tokens)``: greedy tokens with the model's weights and
    cache placed by a plan for that job (planned once per batch x prompt x new tokens)."""

    def __init__(self, model: torch.nn.Module, *, hardware: str | Path | Hardware, memory_budget: Budget,
                 tiers: Sequence[str], time_limit: float | None = None, swap_root: str | Path | None = None,
                 device: str | torch.device | None = None) -> None:
        check_cache_capture(model)
        self.model = model
        self.hardware = hardware if isinstance(hardware, Hardware) else load_hardware(hardware)
        self.memory_budget, self.tiers, self.time_limit = memory_budget, tuple(tiers), time_limit
        self.swap_root, self.device = swap_root, device
        self.plans: dict[tuple[int, int, int], GenerationPlan] = {}
        self.plan: GenerationPlan | None = None
        self.last_device_peak: int | None = None

    def plan_job(self, batch: int, prompt_len: int, new_tokens: int) -> GenerationPlan:
        key = (batch, prompt_len, new_tokens)
        if key not in self.plans:
            shape = generation_shape(self.model, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens)
            self.plans[key] = plan_for(shape, hardware=self.hardware, memory_budget=self.memory_budget,
                                       tiers=self.tiers, time_limit=self.time_limit)
        self.plan = self.plans[key]
        return self.plan

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, measure: bool = False) -> torch.Tensor:
        """[batch, prompt + max_new_tokens] token ids; ``measure`` also records the device peak
        (a storage tracker on the CPU) in ``last_device_peak``."""
        plan = self.plan_job(int(input_ids.shape[0]), int(input_ids.shape[1]), max_new_tokens)
        with TieredGenerator(self.model, plan.policy, device=self.device, swap_root=self.swap_root) as generator:
            if measure:
                tokens, self.last_device_peak = generator.measure_generate(input_ids, max_new_tokens)
                return tokens
            return generator.generate(input_ids, max_new_tokens)


__all__ = ["GenerationModule", "generation_baselines", "generation_shape", "job_of", "plan_for"]
