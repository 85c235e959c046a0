"""Hand-built graphs for the planner tests and bench: transformer-shaped training graphs and
random layered forward/backward graphs, built directly as tierplan Graphs."""
from __future__ import annotations

import random

from tierplan.ir import BlockInfo, Graph, OpInfo, Phase, TensorInfo, TensorKind, link_users
from tierplan.plans.plan import Channel

MB = 1_000_000


class _Builder:
    def __init__(self) -> None:
        self.tensors: dict[str, TensorInfo] = {}
        self.ops: list[OpInfo] = []
        self.times: dict[str, float] = {}

    def tensor(self, name: str, nbytes: int, kind: TensorKind, storage: str = "") -> str:
        self.tensors[name] = TensorInfo(name, (max(nbytes // 4, 1),), "float32", nbytes, kind, storage=storage)
        return name

    def op(self, name: str, inputs: list[str], outputs: list[str], seconds: float,
           phase: Phase = Phase.FORWARD, block: int | None = None) -> None:
        self.ops.append(OpInfo(name, "aten.test.default", list(dict.fromkeys(inputs)), outputs, phase, block=block))
        self.times[name] = seconds

    def graph(self, name: str, inputs: list[str], outputs: list[str], blocks: list[BlockInfo] | None = None) -> Graph:
        link_users(self.tensors, self.ops)
        g = Graph(name, self.tensors, self.ops, inputs=inputs, outputs=outputs, blocks=blocks or [])
        g.check()
        return g


def transformer(layers: int = 4, hidden: int = 4 * MB, seed: int | None = None,
                mm_s: float = 1e-3) -> tuple[Graph, dict[str, float]]:
    """A pre-norm MLP-block stack: per layer norm (2 outputs), mm, gelu, a view, mm, residual add;
    its mirrored backward; weights as parameters, weight gradients as outputs."""
    rng = random.Random(seed)
    b = _Builder()
    scale = (lambda: 1.0) if seed is None else (lambda: rng.uniform(0.5, 2.0))
    b.tensor("x0", hidden, TensorKind.INPUT)
    b.tensor("dloss", 4, TensorKind.INPUT)
    inputs, outputs, blocks = ["x0", "dloss"], [], []
    x = "x0"
    for k in range(layers):
        w1 = b.tensor(f"w1_{k}", hidden // 2, TensorKind.PARAMETER)
        w2 = b.tensor(f"w2_{k}", hidden // 2, TensorKind.PARAMETER)
        inputs += [w1, w2]
        a1 = b.tensor(f"a1_{k}", hidden, TensorKind.ACTIVATION)
        mean = b.tensor(f"mean_{k}", hidden // 64, TensorKind.ACTIVATION)
        h1 = b.tensor(f"h1_{k}", 4 * hidden, TensorKind.ACTIVATION)
        h2 = b.tensor(f"h2_{k}", 4 * hidden, TensorKind.ACTIVATION)
        h2v = b.tensor(f"h2v_{k}", 0, TensorKind.ACTIVATION, storage=h2)
        h3 = b.tensor(f"h3_{k}", hidden, TensorKind.TEMPORARY)
        xn = b.tensor(f"x{k + 1}", hidden, TensorKind.ACTIVATION)
        ops = [f"ln_{k}", f"mm1_{k}", f"gelu_{k}", f"view_{k}", f"mm2_{k}", f"add_{k}"]
        b.op(ops[0], [x], [a1, mean], 0.1 * mm_s * scale(), block=k)
        b.op(ops[1], [a1, w1], [h1], mm_s * scale(), block=k)
        b.op(ops[2], [h1], [h2], 0.2 * mm_s * scale(), block=k)
        b.op(ops[3], [h2], [h2v], 0.0, block=k)
        b.op(ops[4], [h2v, w2], [h3], mm_s * scale(), block=k)
        b.op(ops[5], [x, h3], [xn], 0.05 * mm_s * scale(), block=k)
        blocks.append(BlockInfo(k, ops, template=0))
        x = xn
    b.tensor("loss", 4, TensorKind.OUTPUT)
    b.op("loss", [x], ["loss"], 0.01 * mm_s)
    g = b.tensor("g_out", hidden, TensorKind.TEMPORARY)
    b.op("loss_bwd", [x, "dloss"], [g], 0.05 * mm_s, Phase.BACKWARD)
    for k in reversed(range(layers)):
        dh2 = b.tensor(f"dh2_{k}", 4 * hidden, TensorKind.TEMPORARY)
        dw2 = b.tensor(f"dw2_{k}", hidden // 2, TensorKind.GRADIENT)
        dh1 = b.tensor(f"dh1_{k}", 4 * hidden, TensorKind.TEMPORARY)
        dw1 = b.tensor(f"dw1_{k}", hidden // 2, TensorKind.GRADIENT)
        da1 = b.tensor(f"da1_{k}", hidden, TensorKind.TEMPORARY)
        dx = b.tensor(f"dx_{k}", hidden, TensorKind.TEMPORARY)
        b.op(f"mm2_bwd_in_{k}", [g, f"w2_{k}"], [dh2], mm_s, Phase.BACKWARD)
        b.op(f"mm2_bwd_w_{k}", [f"h2v_{k}", g], [dw2], mm_s, Phase.BACKWARD)
        b.op(f"gelu_bwd_{k}", [f"h1_{k}", dh2], [dh1], 0.2 * mm_s, Phase.BACKWARD)
        b.op(f"mm1_bwd_w_{k}", [f"a1_{k}", dh1], [dw1], mm_s, Phase.BACKWARD)
        b.op(f"mm1_bwd_in_{k}", [dh1, f"w1_{k}"], [da1], mm_s, Phase.BACKWARD)
        xin = "x0" if k == 0 else f"x{k}"
        b.op(f"ln_bwd_{k}", [xin, f"mean_{k}", da1, g], [dx], 0.2 * mm_s, Phase.BACKWARD)
        outputs += [dw1, dw2]
        g = dx
    graph = b.graph(f"transformer{layers}", inputs, ["loss"] + outputs, blocks)
    return graph, b.times


def random_layered(n_fwd: int, seed: int, max_fanin: int = 3) -> tuple[Graph, dict[str, float]]:
    """A random forward DAG (each node reads 1..max_fanin earlier nodes, mostly recent ones)
    and its backward: grad_i reads node i's inputs and the grads of node i's readers."""
    rng = random.Random(seed)
    b = _Builder()
    b.tensor("inp", MB, TensorKind.INPUT)
    preds: dict[int, list[int]] = {}
    for i in range(n_fwd):
        if i == 0:
            preds[i] = []
        else:
            k = rng.randint(1, min(max_fanin, i))
            preds[i] = sorted(set([i - 1] + [rng.randint(max(0, i - 6), i - 1) for _ in range(k - 1)]))
        b.tensor(f"f{i}", rng.randint(1, 8) * MB, TensorKind.ACTIVATION)
        b.op(f"f{i}", [f"f{p}" for p in preds[i]] or ["inp"], [f"f{i}"], rng.uniform(0.2, 2.0) * 1e-3)
    readers: dict[int, list[int]] = {i: [] for i in range(n_fwd)}
    for i, ps in preds.items():
        for p in ps:
            readers[p].append(i)
    b.tensor("loss", 4, TensorKind.OUTPUT)
    b.op("loss", [f"f{n_fwd - 1}"], ["loss"], 1e-5)
    outputs = ["loss"]
    for i in reversed(range(n_fwd)):
        kind = TensorKind.GRADIENT if i == 0 else TensorKind.TEMPORARY
        b.tensor(f"g{i}", b.tensors[f"f{i}"].nbytes, kind)
        reads = [f"f{p}" for p in preds[i]] + [f"g{r}" for r in readers[i]]
        if not reads:
            reads = [f"f{i}"]
        b.op(f"g{i}", reads, [f"g{i}"], rng.uniform(0.4, 4.0) * 1e-3, Phase.BACKWARD)
    outputs.append("g0")
    return b.graph(f"random{n_fwd}_{seed}", ["inp"], outputs), b.times


def channels(bandwidth: float = 10e9, latency_s: float = 5e-6) -> list[Channel]:
    return [
        Channel("device", "host", bandwidth, latency_s, "d2h"),
        Channel("host", "device", bandwidth, latency_s, "h2d"),
    ]


def param_heavy(layers: int = 4, weight: int = 16 * MB, act: int = MB, mm_s: float = 1e-3,
                training: bool = True) -> tuple[Graph, dict[str, float]]:
    """A chain of matmuls whose weights dwarf its activations (the ZeRO-Offload / FlexGen case):
    h_{k+1} = h_k @ w_k; with ``training`` the backward produces dh_k and dw_k (a gradient, a
    graph output), else the last activation is the output (inference)."""
    b = _Builder()
    b.tensor("h0", act, TensorKind.INPUT)
    inputs, outputs = ["h0"], []
    for k in range(layers):
        w = b.tensor(f"w_{k}", weight, TensorKind.PARAMETER)
        inputs.append(w)
        b.tensor(f"h{k + 1}", act, TensorKind.ACTIVATION if training else TensorKind.TEMPORARY)
        b.op(f"mm_{k}", [f"h{k}", w], [f"h{k + 1}"], mm_s)
    if not training:
        b.tensors[f"h{layers}"].kind = TensorKind.OUTPUT
        return b.graph(f"param_heavy_inference{layers}", inputs, [f"h{layers}"]), b.times
    b.tensor("loss", 4, TensorKind.OUTPUT)
    b.tensor("dh", act, TensorKind.TEMPORARY)
    b.op("loss", [f"h{layers}"], ["loss"], 0.01 * mm_s)
    b.op("loss_bwd", [f"h{layers}"], ["dh"], 0.01 * mm_s, Phase.BACKWARD)
    g = "dh"
    for k in reversed(range(layers)):
        dw = b.tensor(f"dw_{k}", weight, TensorKind.GRADIENT)
        b.op(f"mm_bwd_w_{k}", [f"h{k}", g], [dw], mm_s, Phase.BACKWARD)
        outputs.append(dw)
        if k:
            dh = b.tensor(f"dh{k}", act, TensorKind.TEMPORARY)
            b.op(f"mm_bwd_in_{k}", [g, f"w_{k}"], [dh], mm_s, Phase.BACKWARD)
            g = dh
    return b.graph(f"param_heavy{layers}", inputs, ["loss"] + outputs), b.times


def random_training(seed: int, layers: int = 3, ops_per_layer: int = 3, with_params: bool = True,
                    views: bool = True, blocks: bool = True) -> tuple[Graph, dict[str, float]]:
    """A random training graph shaped like a real one: ``layers`` repeats of one random layer
    template (forward ops reading 1-2 earlier values of the layer or its input, some with a
    parameter, some with a second small output like layer norm's mean, some read through a view),
    a loss, and the mirrored backward: per forward op a grad-input op reading the forward
    activations it needs and the grads of its readers, and a weight-grad op (a gradient output)
    when it has a parameter. Sizes and times are random per op (the template's structure repeats,
    so the block structure is real)."""
    rng = random.Random(seed)
    b = _Builder()
    b.tensor("x0", rng.randint(1, 4) * MB, TensorKind.INPUT)
    b.tensor("dloss", 4, TensorKind.INPUT)
    inputs, outputs, block_list = ["x0", "dloss"], ["loss"], []
    # The template: for op j, which earlier values it reads (-1: the layer's input), its traits.
    template = []
    for j in range(ops_per_layer):
        k = rng.randint(1, min(2, j + 1))
        reads = sorted(set([j - 1] + [rng.randint(-1, j - 1) for _ in range(k - 1)]))
        template.append(dict(reads=reads, param=with_params and rng.random() < 0.5,
                             aux=rng.random() < 0.3, view=views and rng.random() < 0.3))
    nodes = []  # (op name, main output, read-as name, aux, param, reads (node indices))
    prev = -1  # node index of the layer input (-1: x0)

    def value(i: int) -> str:
        return "x0" if i < 0 else nodes[i][2]

    for layer in range(layers):
        first = len(nodes)
        names = []
        for j, spec in enumerate(template):
            i = len(nodes)
            reads = [prev if r < 0 else first + r for r in spec["reads"]]
            out = b.tensor(f"f{i}", rng.randint(1, 8) * MB, TensorKind.ACTIVATION)
            outs = [out]
            aux = None
            if spec["aux"]:
                aux = b.tensor(f"m{i}", rng.randint(1, 4) * MB // 16, TensorKind.ACTIVATION)
                outs.append(aux)
            ins = [value(r) for r in reads]
            param = None
            if spec["param"]:
                param = b.tensor(f"w{i}", rng.randint(1, 4) * MB // 2, TensorKind.PARAMETER)
                inputs.append(param)
                ins.append(param)
            b.op(f"op{i}", ins, outs, rng.uniform(0.2, 2.0) * 1e-3, block=layer if blocks else None)
            names.append(f"op{i}")
            read_as = out
            if spec["view"]:
                read_as = b.tensor(f"v{i}", 0, TensorKind.ACTIVATION, storage=out)
                b.op(f"view{i}", [out], [read_as], 0.0, block=layer if blocks else None)
                names.append(f"view{i}")
            nodes.append((f"op{i}", out, read_as, aux, param, reads))
        block_list.append(BlockInfo(layer, names, template=0))
        prev = len(nodes) - 1
    b.tensor("loss", 4, TensorKind.OUTPUT)
    b.op("loss", [value(prev)], ["loss"], 1e-5)
    readers: dict[int, list[int]] = {i: [] for i in range(-1, len(nodes))}
    for i, node in enumerate(nodes):
        for r in node[5]:
            readers[r].append(i)
    grad: dict[int, str] = {}
    for i in reversed(range(len(nodes))):
        _, out, read_as, aux, param, reads = nodes[i]
        gs = [grad[r] for r in readers[i] if r in grad]
        if i == prev:
            gs.append("dloss")
        if not gs:
            gs = ["dloss"]
        acts = [value(r) for r in reads if rng.random() < 0.8] or [read_as]
        bwd_in = acts + ([aux] if aux else []) + ([param] if param else []) + gs
        g = b.tensor(f"g{i}", b.tensors[out].nbytes, TensorKind.TEMPORARY)
        b.op(f"g{i}", bwd_in, [g], rng.uniform(0.4, 4.0) * 1e-3, Phase.BACKWARD)
        grad[i] = g
        if param:
            dw = b.tensor(f"dw{i}", b.tensors[param].nbytes, TensorKind.GRADIENT)
            b.op(f"gw{i}", acts + gs, [dw], rng.uniform(0.4, 4.0) * 1e-3, Phase.BACKWARD)
            outputs.append(dw)
    # The input's gradient, so that every grad is read.
    dx = b.tensor("dx0", b.tensors["x0"].nbytes, TensorKind.GRADIENT)
    b.op("gx0", [grad[r] for r in readers[-1]] or ["dloss"], [dx], 1e-4, Phase.BACKWARD)
    outputs.append(dx)
    return b.graph(f"random_training_{seed}", inputs, outputs, block_list if blocks else []), b.times
