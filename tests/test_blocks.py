"""Repeated-block detection: tandem repeats of op tokens, forward and backward of a layer together."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from tierplan.ir import Phase
from tierplan.passes.blocks import Repeat, detect_blocks, find_repeats
from tierplan.passes.capture import capture
from tierplan.zoo import load_model


def _layer_of(module: str, marker: str) -> int | None:
    """The layer index in a module path such as 'transformer.h.7.attn' (marker 'h')."""
    parts = module.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == marker and b.isdigit():
            return int(b)
    return None


def _check_layers(graph, marker: str, layers: int) -> None:
    """Each block holds forward and backward ops, mostly of the layer with its index."""
    assert len(graph.blocks) == layers
    assert {b.template for b in graph.blocks} == {0}
    assert len({len(b.ops) for b in graph.blocks}) == 1  # identical structure
    for block in graph.blocks:
        ops = [graph.op(n) for n in block.ops]
        assert all(op.block == block.index for op in ops)
        for phase in (Phase.FORWARD, Phase.BACKWARD):
            found = Counter(_layer_of(op.module, marker) for op in ops if op.phase is phase)
            found.pop(None, None)
            (layer, n), *_ = found.most_common(1)
            assert layer == block.index, (phase, found)
            assert n >= 0.9 * sum(found.values()), (phase, found)


@pytest.fixture(scope="module")
def gpt2():
    model, args, kwargs = load_model("gpt2", batch_size=1, seq_len=64, training=True, fake=True)
    return capture(model, args, example_kwargs=kwargs).graph


def test_gpt2_has_twelve_repeated_blocks(gpt2):
    _check_layers(detect_blocks(gpt2), "h", 12)


def test_detection_does_not_need_module_names(gpt2):
    anonymous = replace(gpt2, ops=[replace(op, module="") for op in gpt2.ops])
    with_names = detect_blocks(gpt2)
    without = detect_blocks(anonymous)
    assert len(without.blocks) == 12
    fw = lambda g: [[n for n in b.ops if g.op(n).phase is Phase.FORWARD] for b in g.blocks]  # noqa: E731
    assert fw(without) == fw(with_names)
    # Backward ops are matched to their layer by data flow alone.
    for a, b in zip(with_names.blocks, without.blocks):
        assert len(set(a.ops) & set(b.ops)) >= 0.9 * len(a.ops)


def test_detect_blocks_is_pure(gpt2):
    before = gpt2.to_dict()
    detect_blocks(gpt2)
    assert gpt2.to_dict() == before


@pytest.mark.parametrize(
    "name,marker,layers",
    [("tiny-transformer", "blocks", 4), ("llama-tiny", "layers", 2), ("bert-tiny", "layer", 2)],
)
def test_small_transformers(name, marker, layers):
    model, args, kwargs = load_model(name, batch_size=2, seq_len=16, training=True, fake=True)
    graph = detect_blocks(capture(model, args, example_kwargs=kwargs).graph)
    _check_layers(graph, marker, layers)


def test_inference_graph_blocks_are_forward_only():
    model, args, kwargs = load_model("gpt2-tiny", training=False, fake=True)
    graph = detect_blocks(capture(model, args, example_kwargs=kwargs, training=False).graph)
    assert len(graph.blocks) == 2
    assert all(graph.op(n).phase is Phase.FORWARD for b in graph.blocks for n in b.ops)


def test_a_net_without_repeated_layers_has_no_blocks():
    model, args, kwargs = load_model("cnn", batch_size=2, training=True, fake=True)
    graph = detect_blocks(capture(model, args, example_kwargs=kwargs).graph)
    assert graph.blocks == []
    assert all(op.block is None for op in graph.ops)


def test_find_repeats_on_token_sequences():
    unit = [1, 2, 3, 4]
    seq = np.array([9, 8] + unit * 5 + [7], dtype=np.int64)
    assert find_repeats(seq) == [Repeat(start=2, period=4, count=5)]
    # Two groups: an "encoder" of 3 x (5 6 7) and a "decoder" of 4 x (1 2 3 4).
    seq = np.array([5, 6, 7] * 3 + [0] + unit * 4, dtype=np.int64)
    assert sorted(find_repeats(seq), key=lambda r: r.start) == [
        Repeat(0, 3, 3), Repeat(10, 4, 4)
    ]
    # Nothing repeats.
    assert find_repeats(np.arange(50, dtype=np.int64)) == []
    # A unit needs a heavy op when heavy flags are given.
    seq = np.array(unit * 3, dtype=np.int64)
    assert find_repeats(seq, heavy=np.zeros(12, dtype=bool)) == []
    assert find_repeats(seq, heavy=np.array([True, False, False, False] * 3)) == [Repeat(0, 4, 3)]


def test_find_repeats_prefers_the_smallest_period_covering_most():
    seq = np.array([1, 2, 3] * 8, dtype=np.int64)  # also periodic with 6, 12
    assert find_repeats(seq) == [Repeat(0, 3, 8)]
