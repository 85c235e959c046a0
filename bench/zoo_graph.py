"""A zoo model's training step as the benches plan it: captured on fake tensors, its repeated
blocks found (as ``tierplan.plan_graph`` does), its ops priced on a machine."""
from __future__ import annotations

from typing import Any


def training_graph(name: str, batch: int, seq: int, hardware: Any) -> tuple[Any, Any, dict[str, float]]:
    """(the capture, its graph with blocks, op times on ``hardware``) for ``name``."""
    # Imported here: the synthetic-graph benches run without the zoo's dependencies.
    from tierplan.cost_models.compute import graph_op_times
    from tierplan.passes.blocks import detect_blocks
    from tierplan.passes.capture import capture
    from tierplan.zoo import load_model

    model, args, kwargs = load_model(name, batch_size=batch, seq_len=seq, training=True, fake=True)
    captured = capture(model, args, example_kwargs=kwargs, training=True)
    graph = detect_blocks(captured.graph)
    return captured, graph, graph_op_times(graph, hardware)
