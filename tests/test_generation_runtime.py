"""The generation runtime (tierplan.codegen.generate): greedy tokens identical to
``model.generate`` whatever tier the weights and the KV cache are on, the device peak it measures,
the swap files it leaves (none), and its errors; the hidden states between layers on either side."""
from __future__ import annotations

import copy
import gc
from pathlib import Path
from typing import Callable

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig, OPTForCausalLM

from tierplan.codegen import generate as gen
from tierplan.codegen.generate import TieredGenerator
from tierplan.passes.decoder import DecoderError, check_cache_capture, decoder_layers, layer_of
from tierplan.plans.generation import GenerationPolicy
from tierplan.zoo import load_model

BATCH, PROMPT, NEW = 2, 16, 32
ARCHS = ["gpt2-tiny", "llama-tiny", "opt-tiny"]
LAYERS = {"gpt2-tiny": "transformer.h", "llama-tiny": "model.layers", "opt-tiny": "model.decoder.layers"}


def _spread(model: torch.nn.Module) -> torch.nn.Module:
    # The default init (std 0.02) gives near-uniform logits and greedy decoding repeats one token,
    # which would check little; wider weights make every step's token depend on the whole cache.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "opt-tiny":
        model = OPTForCausalLM(OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                                         vocab_size=1000, max_position_embeddings=128, word_embed_proj_dim=64))
    else:
        model, _, _ = load_model(name, batch_size=BATCH, seq_len=PROMPT, training=False)
    return _spread(model)


def _reference(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    # No EOS (so nothing stops early and no processor touches the logits), the cache on, greedy.
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                          eos_token_id=None, pad_token_id=0, use_cache=True)


def _ids(vocab: int = 1000) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=ARCHS)
def case(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor]:
    model = _build(request.param)
    ids = _ids()
    return request.param, model, ids, _reference(model, ids)


def _policy(model: torch.nn.Module, weights: str | Callable[[int, str], str], kv_tiers: tuple[str, ...],
            attention: str = "device", *, gpu_batch: int = BATCH, num_gpu_batches: int = 1,
            block: int = 8, activations: str = "device") -> GenerationPolicy:
    def tier(i: int, name: str) -> str:
        return weights if isinstance(weights, str) else weights(i, name)

    tiers = {name: tier(i, name) for i, (name, _) in enumerate(model.named_parameters())}
    return GenerationPolicy(gpu_batch, num_gpu_batches, tiers, block, kv_tiers, attention, activations)


def _params_back(model: torch.nn.Module) -> bool:
    return all(p.device.type == "cpu" and p.numel() > 0 for p in model.parameters())


# -- identical tokens -----------------------------------------------------------------------------


def test_weights_streamed_from_host_cache_on_host(case):
    name, model, ids, ref = case
    with TieredGenerator(model, _policy(model, "host", ("host",) * 6)) as g:
        out = g.generate(ids, NEW)
        stats = g.stats
    assert torch.equal(out, ref)
    n_layers = len(decoder_layers(model)[1])
    assert stats.steps == NEW and stats.layer_loads == NEW * n_layers
    # The running layer and the prefetched one, never more.
    assert stats.max_layers_on_device == 2
    assert _params_back(model)


def test_weights_and_cache_on_nvme_attention_on_host(case, tmp_path, monkeypatch):
    name, model, ids, ref = case
    calls: list[torch.device] = []
    sdpa = gen.sdpa_attention_forward

    def spy(module, query, key, value, *args, **kwargs):
        calls.append(key.device)
        return sdpa(module, query, key, value, *args, **kwargs)

    monkeypatch.setattr(gen, "sdpa_attention_forward", spy)
    with TieredGenerator(model, _policy(model, "nvme", ("nvme",) * 6, "host"), swap_root=tmp_path) as g:
        out = g.generate(ids, NEW)
    assert torch.equal(out, ref)
    assert len(calls) == NEW * len(decoder_layers(model)[1])  # every layer's attention ran on the host
    assert model.config._attn_implementation == "sdpa"  # switched back
    assert list(tmp_path.iterdir()) == []
    assert _params_back(model)


@pytest.mark.parametrize("attention, kv_tiers, activations", [
    ("device", ("device", "host", "nvme") * 2, "device"),
    ("host", ("host", "nvme") * 3, "device"),
    ("host", ("host", "nvme") * 3, "host"),
])
def test_mixed_tiers_two_micro_batches(case, tmp_path, attention, kv_tiers, activations):
    name, model, ids, ref = case
    policy = _policy(model, lambda i, _: ("device", "host", "nvme")[i % 3], kv_tiers, attention,
                     gpu_batch=1, num_gpu_batches=2, activations=activations)
    with TieredGenerator(model, policy, swap_root=tmp_path) as g:
        out = g.generate(ids, NEW)
    assert torch.equal(out, ref)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("num_gpu_batches", [1, 2])
def test_activations_on_host(case, num_gpu_batches):
    _, model, ids, ref = case
    policy = _policy(model, "host", ("host",) * 6, gpu_batch=BATCH // num_gpu_batches,
                     num_gpu_batches=num_gpu_batches, activations="host")
    inputs: list[tuple[int, torch.Tensor]] = []
    hooks = [layer.register_forward_pre_hook(lambda _m, args, i=i: inputs.append((i, args[0])))
             for i, layer in enumerate(decoder_layers(model)[1])]
    try:
        with TieredGenerator(model, policy) as g:
            out = g.generate(ids, NEW)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(out, ref)
    hidden = model.config.hidden_size
    # Layer 0 gets the embedding output; every later one the previous layer's host buffer, one of
    # two (contiguous [batch, q, hidden], q the prompt's length in the prefill and 1 after).
    buffers = {t.untyped_storage().data_ptr() for i, t in inputs if i > 0}
    assert len(buffers) == 1  # tiny models have two layers: layer 0 writes buffer 0, layer 1 reads it
    assert all(t.untyped_storage().data_ptr() not in buffers for i, t in inputs if i == 0)
    shapes = [tuple(t.shape) for i, t in inputs if i > 0]
    assert shapes == [(BATCH, PROMPT, hidden)] + [(BATCH, 1, hidden)] * (NEW - 1)
    assert all(t.is_contiguous() for _, t in inputs)


def test_left_padded_prompt(tmp_path):
    model = _build("llama-tiny")
    ids, mask = _ids(), torch.ones(BATCH, PROMPT, dtype=torch.long)
    ids[0, :5], mask[0, :5] = 0, 0
    ref = _reference(model, ids, mask)
    policy = _policy(model, "host", ("nvme",) * 6, "host", gpu_batch=1, num_gpu_batches=2)
    with TieredGenerator(model, policy, swap_root=tmp_path) as g:
        assert torch.equal(g.generate(ids, NEW, attention_mask=mask), ref)


# -- the device peak ------------------------------------------------------------------------------


def test_streamed_device_peak_is_the_resident_peak_less_the_streamed_weights():
    torch.manual_seed(0)
    model = _spread(LlamaForCausalLM(LlamaConfig(
        hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=256, vocab_size=256, max_position_embeddings=128)))
    ids = _ids(256)
    per_layer = [0] * 8
    outside = 0
    for name, p in model.named_parameters():
        layer = layer_of(name, "model.layers")
        if layer is None:
            outside += p.numel() * p.element_size()
        else:
            per_layer[layer] += p.numel() * p.element_size()
    head_dim = 64 // 4
    kv_bytes = 8 * 2 * BATCH * 2 * (PROMPT + NEW) * head_dim * 4  # layers x K,V x batch x heads x pos x dim x fp32

    with TieredGenerator(model, _policy(model, "device", ("device",) * 6)) as g:
        ref, resident = g.measure_generate(ids, NEW)
    with TieredGenerator(model, _policy(model, "host", ("host",) * 6)) as g:
        out, streamed = g.measure_generate(ids, NEW)
    assert torch.equal(out, ref)
    assert resident >= sum(per_layer) + outside + kv_bytes
    # Streaming keeps two layers of eight on the device and no cache: everything else the
    # resident run held is gone, and the activations are the same.
    assert streamed <= resident - (sum(per_layer) - 2 * max(per_layer)) - kv_bytes
    # ... and the prefetched layer really is there next to the running one.
    assert streamed >= outside + 2 * max(per_layer)


def test_activations_on_host_lower_the_device_peak():
    # The hidden states dominate the layers' traffic: a long prompt, an MLP of 4 x hidden (its
    # intermediates make every in-layer moment outweigh the final norm's), weights and cache on
    # the host so that they are the same in every run.
    batch, prompt, new, hidden = 4, 128, 2, 64
    torch.manual_seed(0)
    model = _spread(LlamaForCausalLM(LlamaConfig(
        hidden_size=hidden, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=4 * hidden, vocab_size=256, max_position_embeddings=prompt + new)))
    ids = torch.randint(0, 256, (batch, prompt), generator=torch.Generator().manual_seed(1))
    block_hidden = batch * prompt * hidden * 4  # one layer's input (or output) for the block, fp32

    def peak(num_gpu_batches: int, activations: str) -> tuple[torch.Tensor, int]:
        policy = _policy(model, "host", ("host",) * 4, gpu_batch=batch // num_gpu_batches,
                         num_gpu_batches=num_gpu_batches, block=-(-(prompt + new) // 4), activations=activations)
        with TieredGenerator(model, policy) as g:
            return g.measure_generate(ids, new)

    n = 4
    ref, on_device = peak(n, "device")
    out, on_host = peak(n, "host")
    assert torch.equal(out, ref)
    # With activations on the device, micro-batch m of layer i > 0 runs next to the block's input
    # and the m outputs before it; on the host, next to its own input rows only (a copy: 1/n of
    # the block) and, in the last layer alone, the m outputs before it (that layer returns on the
    # device). Everything else is the same, so at every moment of layers 1.. the device holds at
    # least (n - 1) / n of the block's hidden states fewer: the last layer's margin; the others
    # save 2 (n - 1) / n (here the peak falls in one of them, and that is what it shows). Layer 0
    # (its input is the embedding output either way) is layer 1 less the block's input.
    assert on_device - on_host >= (n - 1) / n * block_hidden
    # One micro-batch saves nothing: its input is the whole block, copied in, and the tracker
    # counts the copy as it counts the device-resident input.
    ref, on_device = peak(1, "device")
    out, on_host = peak(1, "host")
    assert torch.equal(out, ref)
    assert on_host == on_device


# -- swap files -----------------------------------------------------------------------------------


def _nvme_model_and_policy() -> tuple[torch.nn.Module, GenerationPolicy]:
    model = _build("llama-tiny")
    return model, _policy(model, "nvme", ("nvme",) * 6)


def _failing_head(model: torch.nn.Module, at_call: int, error: BaseException,
                  seen: list[list[str]], swap_root: Path) -> None:
    """Make the LM head raise on its ``at_call``-th call, after noting the files under swap_root."""
    head, calls = model.lm_head, [0]
    forward = head.forward

    def boom(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == at_call:
            seen.append(sorted(str(p.relative_to(swap_root)) for p in swap_root.rglob("*")))
            raise error
        return forward(x)

    head.forward = boom


def test_swap_directory_removed_after_generate_and_close(tmp_path):
    model, policy = _nvme_model_and_policy()
    ids = _ids()
    ref = _reference(model, ids)
    seen: list[list[str]] = []
    g = TieredGenerator(model, policy, swap_root=tmp_path)
    _failing_head(model, 10**9, RuntimeError(), seen, tmp_path)  # never raises
    assert torch.equal(g.generate(ids, NEW), ref)
    left = list(tmp_path.rglob("*"))
    assert len(left) == 1 + len(list(model.parameters()))  # the swap directory and its weight files
    assert not any(p.name.startswith("cache-") for p in left)  # the cache's files went with the run
    g.close()
    assert list(tmp_path.iterdir()) == []
    assert _params_back(model)


def test_swap_files_removed_after_an_error_mid_generation(tmp_path):
    model, policy = _nvme_model_and_policy()
    ids = _ids()
    ref = _reference(model, ids)
    seen: list[list[str]] = []
    with TieredGenerator(model, policy, swap_root=tmp_path) as g:
        _failing_head(model, 3, RuntimeError("boom"), seen, tmp_path)
        with pytest.raises(RuntimeError, match="boom"):
            g.generate(ids, NEW)
        assert any("/cache-" in f and f.endswith("-k.bin") for f in seen[0])  # the cache was on NVMe
        assert not any(p.name.startswith("cache-") for p in tmp_path.rglob("*"))
        # The generator survives its generation's error: layers unwrapped, weights in place.
        del model.lm_head.forward
        assert torch.equal(g.generate(ids, NEW), ref)
    assert list(tmp_path.iterdir()) == []


def test_keyboard_interrupt_closes_the_generator(tmp_path):
    model, policy = _nvme_model_and_policy()
    g = TieredGenerator(model, policy, swap_root=tmp_path)
    _failing_head(model, 2, KeyboardInterrupt(), [], tmp_path)
    with pytest.raises(KeyboardInterrupt):
        g.generate(_ids(), NEW)
    assert g.closed
    assert list(tmp_path.iterdir()) == []
    assert _params_back(model)


def test_garbage_collection_removes_the_swap_directory(tmp_path):
    model, policy = _nvme_model_and_policy()
    g = TieredGenerator(model, policy, swap_root=tmp_path)
    g.generate(_ids(), 4)
    assert list(tmp_path.iterdir())
    del g
    gc.collect()
    assert list(tmp_path.iterdir()) == []
    assert _params_back(model)


# -- errors and structure -------------------------------------------------------------------------


def test_models_without_a_capturable_cache_are_refused():
    bert, _, _ = load_model("bert-tiny", batch_size=BATCH, seq_len=PROMPT, training=False)
    with pytest.raises(DecoderError, match="BertForMaskedLM"):
        TieredGenerator(bert, _policy(bert, "host", ("host",) * 6))
    with pytest.raises(DecoderError, match="Sequential"):
        check_cache_capture(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    mistral = MistralForCausalLM(MistralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, intermediate_size=64, vocab_size=100,
                                               sliding_window=8))
    with pytest.raises(DecoderError, match=r"MistralDecoderLayer at model\.layers\.0 .*sliding_attention"):
        check_cache_capture(mistral)


def test_policy_mismatches_are_clear_errors():
    model = _build("llama-tiny")
    with TieredGenerator(model, _policy(model, "host", ("host",) * 6, gpu_batch=1, num_gpu_batches=2)) as g:
        with pytest.raises(ValueError, match=r"batch of 3 sequences.*runs 2"):
            g.generate(torch.zeros(3, PROMPT, dtype=torch.long), NEW)
        with pytest.raises(ValueError, match="need 7 cache blocks"):
            g.generate(_ids(), NEW + 1)
    tiers = dict(_policy(model, "host", ("host",)).weight_tiers)
    tiers.pop("lm_head.weight")
    with pytest.raises(ValueError, match="lm_head.weight"):
        TieredGenerator(model, GenerationPolicy(2, 1, tiers, 8, ("host",) * 6))


@pytest.mark.parametrize("name", ARCHS)
def test_decoder_layers_and_layer_of(name):
    model = _build(name)
    prefix, layers = decoder_layers(model)
    assert prefix == LAYERS[name] and len(layers) == 2
    assert layer_of(f"{prefix}.1.mlp.weight", prefix) == 1
    assert layer_of(f"{prefix}.10.x", prefix) == 10
    assert layer_of("lm_head.weight", prefix) is None
    assert layer_of(f"{prefix}x.1.w", prefix) is None
    check_cache_capture(model)


# -- on a GPU (pytest -m cuda; bench/gpu_check.py runs them) ---------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("activations", ["device", "host"])
@pytest.mark.parametrize("num_gpu_batches", [1, 2])
def test_cuda_streams_weights_cache_and_hidden_states(case, tmp_path, activations, num_gpu_batches):
    # The CUDA paths: pinned staging and side-stream weight copies, cache blocks on pinned host
    # memory and NVMe files, the hidden states' non-blocking copies through pinned buffers.
    # Attention on the device (host attention would run another kernel than the reference's).
    name, model, ids, _ = case
    ref = _reference(copy.deepcopy(model).cuda(), ids.cuda()).cpu()
    policy = _policy(model, lambda i, _: ("device", "host", "nvme")[i % 3], ("device", "host", "nvme") * 2,
                     gpu_batch=BATCH // num_gpu_batches, num_gpu_batches=num_gpu_batches, activations=activations)
    with TieredGenerator(model, policy, device="cuda", swap_root=tmp_path) as g:
        out, peak = g.measure_generate(ids, NEW)
    assert torch.equal(out.cpu(), ref)
    assert peak > 0
    assert list(tmp_path.iterdir()) == []
    assert _params_back(model)
