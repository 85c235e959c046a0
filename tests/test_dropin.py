"""tierplan.compile and tierplan.backend as drop-ins over transformers architectures: the model's
own outputs (``.loss``, ``.logits`` and every other field) and its gradients equal eager's over
three training steps (batches of 8 then 5 sequences, then a shorter sequence), under a budget that makes the planner move tensors; plus the
signature cache (new shapes, train/eval, grad mode, the recompile limit, ``dynamic=True``)."""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import pytest
import torch

import tierplan
from tierplan.compile import RecompileLimitExceeded

transformers = pytest.importorskip("transformers")

VOCAB = 128
BUDGET = 0.7  # of each graph's keep-all peak: every model below then recomputes or swaps


def _gpt2() -> torch.nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, use_cache=False))


def _llama() -> torch.nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, use_cache=False))


def _bert() -> torch.nn.Module:
    return transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=64))


def _t5() -> torch.nn.Module:
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, decoder_start_token_id=0, pad_token_id=0, use_cache=False))


def _vit() -> torch.nn.Module:
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=5))


def _text_batch(batch: int, seq: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (batch, seq))
    return {"input_ids": ids, "labels": ids}


def _t5_batch(batch: int, seq: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(1, VOCAB, (batch, seq)),
            "labels": torch.randint(1, VOCAB, (batch, seq // 2))}


def _image_batch(batch: int, _: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, 16, 16), "labels": torch.randint(0, 5, (batch,))}


ARCHITECTURES: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[int, int], dict[str, torch.Tensor]]]] = {
    "gpt2": (_gpt2, _text_batch),
    "llama": (_llama, _text_batch),
    "bert": (_bert, _text_batch),
    "t5": (_t5, _t5_batch),
    "vit": (_vit, _image_batch),
}
SHAPES = [(8, 16), (5, 16), (5, 12)]  # (batch, sequence): the last, shorter batch, then a shorter sequence


def _assert_same_output(out: Any, ref: Any) -> None:
    assert type(out) is type(ref)
    fields = [k for k, v in ref.items() if isinstance(v, torch.Tensor)]
    assert "loss" in fields and "logits" in fields, fields
    for key in fields:
        torch.testing.assert_close(out[key].detach(), ref[key].detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, key=key: f"{key}: {m}")


def _assert_same_grads(compiled_model: torch.nn.Module, eager_model: torch.nn.Module) -> None:
    eager = dict(eager_model.named_parameters())
    for name, p in compiled_model.named_parameters():
        ref = eager[name].grad
        if ref is None:
            assert p.grad is None or not bool(p.grad.any()), name
            continue
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def _train_at_new_shapes(
    arch: str, wrap: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.nn.Module],
) -> tuple[Any, set[tuple[tuple[int, ...], ...]]]:
    """One SGD step per shape of SHAPES on a compiled copy and an eager copy of ``arch``, checking
    outputs and gradients at each; the wrapped module and the distinct input shapes it saw."""
    build, batch_of = ARCHITECTURES[arch]
    torch.manual_seed(0)
    eager = build().eval()  # dropout off: eager and compiled must draw nothing random
    model = copy.deepcopy(eager)
    batches = [batch_of(*shape) for shape in SHAPES]
    compiled = wrap(model, batches[0])
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, eager)]
    for batch in batches:  # one step per shape: each is a new signature
        out = compiled(**batch)
        out.loss.backward()
        ref = eager(**batch)
        ref.loss.backward()
        _assert_same_output(out, ref)
        _assert_same_grads(model, eager)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    return compiled, {tuple(tuple(v.shape) for v in b.values()) for b in batches}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_compile_returns_the_models_outputs_and_grads_at_new_shapes(arch: str) -> None:
    def wrap(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.nn.Module:
        return tierplan.compile(model, (), example_kwargs=batch, memory_budget=BUDGET, time_limit=2)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the second shape is planned with a warning (tested below)
        compiled, signatures = _train_at_new_shapes(arch, wrap)
    plans = [s.plan for s in compiled.specializations.values()]
    assert len(plans) == len(signatures) > 1 and all(p.training for p in plans)
    assert not plans[0].method.startswith("keep-all"), plans[0].method


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_backend_returns_the_models_outputs_and_grads_at_new_shapes(arch: str) -> None:
    torch._dynamo.reset()
    tp = tierplan.backend(memory_budget=BUDGET, time_limit=2)

    def wrap(model: torch.nn.Module, _: dict[str, torch.Tensor]) -> torch.nn.Module:
        return torch.compile(model, backend=tp)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train_at_new_shapes(arch, wrap)
    assert any(g.kind == "training" for g in tp.graphs)
    assert any(not p.method.startswith("keep-all") for p in tp.plans), [p.method for p in tp.plans]


def _compiled_gpt2(**options: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    eager = _gpt2().eval()
    model = copy.deepcopy(eager)
    compiled = tierplan.compile(model, (), example_kwargs=_text_batch(8, 16), memory_budget=BUDGET,
                                time_limit=2, **options)
    return compiled, eager


def test_new_shape_is_planned_with_a_warning_and_the_limit_is_an_error() -> None:
    compiled, _ = _compiled_gpt2(recompile_limit=2)
    with pytest.warns(UserWarning, match=r"new signature.*int64\[5, 16\]"):
        compiled(**_text_batch(5, 16))
    assert len(compiled.specializations) == 2
    compiled(**_text_batch(8, 16))  # planned already: no new plan
    assert len(compiled.specializations) == 2
    with pytest.raises(RecompileLimitExceeded, match=r"recompile_limit=2.*int64\[3, 16\].*dynamic=True"):
        compiled(**_text_batch(3, 16))


def test_dynamic_runs_smaller_shapes_under_the_largest_plans_decisions() -> None:
    compiled, eager = _compiled_gpt2(dynamic=True)
    largest = compiled.plan
    moved = {s: d for s, d in largest.decisions.items() if d.fate in ("recompute", "swap")}
    assert moved, "the budget must make the planner move something"
    batch = _text_batch(5, 12)
    with pytest.warns(UserWarning, match="reusing the decisions"):
        out = compiled(**batch)
    plan = compiled.plan
    assert plan.method.startswith("the decisions of")
    assert plan.budget_bytes == largest.budget_bytes
    assert plan.peak_bytes["device"] <= largest.budget_bytes
    same = [s for s, d in moved.items() if s in plan.decisions]
    assert same and all(plan.decisions[s].fate == moved[s].fate for s in same)
    out.loss.backward()
    ref = eager(**batch)
    ref.loss.backward()
    _assert_same_output(out, ref)
    _assert_same_grads(compiled.model, eager)


def test_eval_and_no_grad_run_an_inference_plan() -> None:
    compiled, eager = _compiled_gpt2()
    batch = _text_batch(8, 16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compiled(**batch)
    assert not compiled.plan.training and not compiled.training_step
    with torch.no_grad():
        _assert_same_output(out, eager(**batch))
    compiled.train()
    assert compiled.model.training  # train()/eval() reach the wrapped model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(**batch)
    assert compiled.active.signature.module_training and compiled.plan.training


def test_an_output_that_is_not_a_tensor_comes_back_as_none_with_a_warning() -> None:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, use_cache=True)).eval()
    batch = _text_batch(2, 8)
    with pytest.warns(UserWarning, match=r"cache.*DynamicCache.*use_cache=False"):
        compiled = tierplan.compile(model, (), example_kwargs=batch, time_limit=2)
    out = compiled(**batch)
    assert out.past_key_values is None and out.logits.shape == (2, 8, VOCAB)
