"""The price of a generation policy: its work per layer, its timed tasks, its peak bytes per tier.

Every formula is in docs/cost-model.md, "Generation". The schedule is FlexGen's loop (Sheng et al.
2023, Algorithm 1): for each step, for each layer, for each micro-batch, *load next, compute
current, store current*:

- when micro-batch 0 of layer i starts computing, the weights of the next layer (layer 0 of the
  next step after the last layer) are issued: their NVMe part read into host staging, then the
  whole streamed part copied to the device. So at most two layers' streamed weights are on the
  device: the one running and the one arriving;
- when a micro-batch starts computing, the cache of the next micro-batch (wrapping to the next
  layer) is issued the same way: its NVMe positions read, its host and NVMe positions copied in
  (attention on the device); with attention on the host nothing comes in but the NVMe part, read
  into host staging;
- after a micro-batch computes, its new positions that live off the device go out (d2h), and the
  NVMe part of them on to the drive;
- with the block's hidden states on the host (``activations="host"``), a micro-batch's input rows
  come in right before its layer (not in layer 0, which reads the embedding on the device) and its
  output rows go out right after it (not in the last layer, which the head reads), both on the
  compute stream, as the runtime does them.

Each resource runs its tasks one at a time in the order they are issued (a CUDA stream, a copy
queue, the drive); a task starts when its resource is free, its inputs have arrived and it has
been issued. The step's token exists when the head has run.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from tierplan.plans.generation import (
    ACT_IN, ACT_OUT, ATTENTION, ATTN_IN, HEAD, KV_IN, KV_OUT, KV_READ, KV_WRITE, LAYER, PROJECT, QKV_OUT, WEIGHT_IN,
    WEIGHT_READ, GenerationPolicy, GenerationRates, GenerationShape, GenerationTask,
)
from tierplan.plans.plan import DEVICE, HOST, NVME

HEAD_KERNELS = 4
SMALL_TENSOR_BYTES = 4096  # a step's scalars and index tensors beyond those counted per position  # final norm, LM head matmul, the pick of the next token, the embedding lookup


@dataclass(frozen=True)
class LayerWork:
    """One layer for one micro-batch of ``g`` sequences, ``q`` new positions each, attending over
    ``context`` positions (the new ones included)."""

    flops: float
    nbytes: float  # device memory traffic: the weights once, the activations, the cache read
    attention_flops: float
    attention_bytes: float  # the cache read by attention
    project_share: float  # the share of the dense work before attention (Q, K, V projections)


def layer_work(shape: GenerationShape, g: int, q: int, context: int, *, prefill: bool) -> LayerWork:
    s = shape
    numel = s.layer_bytes / s.dtype_bytes
    dense = 2.0 * g * q * numel
    # Causal prefill attends on average to half the prompt; a decode position to all of it.
    attended = (context + 1) / 2 if prefill else context
    attention_flops = 4.0 * g * s.heads * s.head_dim * q * attended
    attention_bytes = float(g * context * s.kv_bytes_per_token)
    activations = g * q * (8 * s.hidden + 2 * s.intermediate) * s.dtype_bytes
    project = s.hidden * s.head_dim * (s.heads + 2 * s.kv_heads) / numel
    return LayerWork(dense + attention_flops, s.layer_bytes + activations + attention_bytes,
                     attention_flops, attention_bytes, min(project, 1.0))


def head_seconds(shape: GenerationShape, rates: GenerationRates) -> tuple[float, float]:
    """(seconds, flops) of the final norm, LM head and pick for the block: one position each."""
    s = shape
    flops = 2.0 * s.batch * s.vocab * s.hidden
    nbytes = s.vocab * s.hidden * s.dtype_bytes + s.batch * s.vocab * 4
    return rates.device_seconds(flops, nbytes, HEAD_KERNELS), flops


def streamed_bytes(shape: GenerationShape, policy: GenerationPolicy, layer: int) -> dict[str, int]:
    """Bytes of ``layer``'s weights on each tier."""
    out = {DEVICE: 0, HOST: 0, NVME: 0}
    for name, nbytes in shape.layer_params:
        out[policy.weight_tiers[shape.param_name(layer, name)]] += nbytes
    return out


def streamed_tensors(shape: GenerationShape, policy: GenerationPolicy, layer: int) -> dict[str, int]:
    """How many of ``layer``'s weight tensors live on each tier (one copy each when streamed)."""
    out = {DEVICE: 0, HOST: 0, NVME: 0}
    for name, _ in shape.layer_params:
        out[policy.weight_tiers[shape.param_name(layer, name)]] += 1
    return out


def _steps(shape: GenerationShape) -> list[tuple[int, int, int]]:
    """(step, new positions, positions before it) of the prefill and each decode step: N new
    tokens take the prefill (which yields the first) and N - 1 decode steps."""
    p = shape.prompt_len
    return [(0, p, 0)] + [(s, 1, p + s - 1) for s in range(1, shape.new_tokens)]


@dataclass(frozen=True)
class _StepCosts:
    """What one layer of one micro-batch costs in one step (every layer and micro-batch alike)."""

    compute_s: float  # the layer on the device (without attention when it runs on the host)
    project_s: float  # of which the projections before attention (host attention only)
    compute_flops: float
    compute_bytes: int
    attention_s: float  # on the host CPU (host attention only)
    attention_flops: float
    attention_bytes: int
    kv_read: int  # the cache's NVMe positions read into host staging
    kv_in: int  # its host and NVMe positions copied to the device
    kv_out: int  # the new positions that live off the device, sent to the host
    kv_write: int  # their NVMe part, written to the drive
    qkv_out: int  # host attention: the new positions' Q, K and V sent to the host
    attn_in: int  # and the attention output sent back
    act: int  # hidden states on the host: the micro-batch's rows copied in before and out after


def _step_costs(shape: GenerationShape, policy: GenerationPolicy, rates: GenerationRates,
                q: int, before: int, prefill: bool) -> _StepCosts:
    s, pol, g, kvb = shape, policy, policy.gpu_batch, shape.kv_bytes_per_token
    after = before + q
    work = layer_work(s, g, q, after, prefill=prefill)
    on_host = pol.attention == HOST and not prefill
    pos = {t: (pol.kv_positions(t, before), pol.kv_positions(t, after)) for t in (HOST, NVME)}
    new_off = sum(b - a for a, b in pos.values())
    act = g * q * s.hidden * s.dtype_bytes if pol.activations == HOST else 0
    if on_host:
        flops, nbytes = work.flops - work.attention_flops, work.nbytes - work.attention_bytes
        dense_s = rates.device_seconds(flops, nbytes, rates.kernels_per_layer)
        return _StepCosts(
            compute_s=dense_s, project_s=dense_s * work.project_share,
            compute_flops=flops, compute_bytes=int(nbytes),
            attention_s=rates.cpu_seconds(work.attention_flops, work.attention_bytes),
            attention_flops=work.attention_flops, attention_bytes=int(work.attention_bytes),
            kv_read=g * kvb * pos[NVME][0], kv_in=0, kv_out=0,
            kv_write=g * kvb * (pos[NVME][1] - pos[NVME][0]),
            qkv_out=g * q * (s.heads + 2 * s.kv_heads) * s.head_dim * s.dtype_bytes,
            attn_in=g * q * s.heads * s.head_dim * s.dtype_bytes, act=act)
    return _StepCosts(
        compute_s=rates.device_seconds(work.flops, work.nbytes, rates.kernels_per_layer), project_s=0.0,
        compute_flops=work.flops, compute_bytes=int(work.nbytes), attention_s=0.0, attention_flops=0.0,
        attention_bytes=0, kv_read=g * kvb * pos[NVME][0], kv_in=g * kvb * (pos[HOST][0] + pos[NVME][0]),
        kv_out=g * kvb * new_off, kv_write=g * kvb * (pos[NVME][1] - pos[NVME][0]), qkv_out=0, attn_in=0, act=act)


def simulate(shape: GenerationShape, policy: GenerationPolicy, rates: GenerationRates, *,
             record: bool = True) -> tuple[list[GenerationTask], list[float]]:
    """The timed tasks of ``policy`` (none unless ``record``) and each step's end (its token)."""
    s, pol, k = shape, policy, policy.num_gpu_batches
    free: dict[str, float] = defaultdict(float)
    queue = {kind: rates.queue(kind) for kind in (WEIGHT_READ, WEIGHT_IN, KV_READ, KV_IN, KV_OUT, KV_WRITE,
                                                   LAYER, PROJECT, QKV_OUT, ATTENTION, ATTN_IN, HEAD, ACT_IN,
                                                   ACT_OUT)}
    tasks: list[GenerationTask] = []
    last_end = 0.0

    def run(kind: str, step: int, layer: int, mb: int, ready: float, seconds: float,
            nbytes: int = 0, flops: float = 0.0) -> float:
        nonlocal last_end
        if seconds <= 0.0:
            return ready
        resource = queue[kind]
        start = free[resource]
        start = ready if ready > start else start
        end = free[resource] = start + seconds
        last_end = end if end > last_end else last_end
        if record:
            tasks.append(GenerationTask(kind, resource, step, layer, mb, start, end, nbytes, flops))
        return end

    def copy(kind: str, step: int, layer: int, mb: int, ready: float, nbytes: int, count: int = 1) -> float:
        if nbytes <= 0:
            return ready
        return run(kind, step, layer, mb, ready, rates.copy_seconds(kind, nbytes, count), nbytes)

    layer_tiers = [streamed_bytes(s, pol, i) for i in range(s.layers)]
    layer_counts = [streamed_tensors(s, pol, i) for i in range(s.layers)]
    other_off = [b for n, b in s.other_params if pol.weight_tiers[n] != DEVICE]
    # Held on the device for the whole job, copied in (one copy per tensor) before it starts.
    other_ready = copy(WEIGHT_IN, 0, -1, -1, 0.0, sum(other_off), len(other_off))

    def load_weights(step: int, layer: int, issue: float) -> float:
        b, c = layer_tiers[layer], layer_counts[layer]
        staged = copy(WEIGHT_READ, step, layer, -1, issue, b[NVME], c[NVME])
        return copy(WEIGHT_IN, step, layer, -1, staged, b[HOST] + b[NVME], c[HOST] + c[NVME])

    steps = _steps(s)
    costs = [_step_costs(s, pol, rates, q, before, st == 0) for st, q, before in steps]
    on_host = [pol.attention == HOST and st > 0 for st, _, _ in steps]
    head_s, head_flops = head_seconds(s, rates)
    stored: dict[tuple[int, int], float] = {}  # (layer, mb) -> when its latest positions are home

    def load_cache(step: int, layer: int, mb: int, issue: float) -> float:
        c = costs[step]
        ready = max(issue, stored.get((layer, mb), 0.0))
        staged = copy(KV_READ, step, layer, mb, ready, c.kv_read)
        return copy(KV_IN, step, layer, mb, staged, c.kv_in)

    weights_ready = {(0, 0): load_weights(0, 0, other_ready)}
    cache_ready = load_cache(0, 0, 0, other_ready)
    head_end = other_ready
    step_end: list[float] = []
    compute = queue[LAYER]
    last_step, last_layer = len(steps) - 1, s.layers - 1
    for st in range(len(steps)):
        c = costs[st]
        for i in range(s.layers):
            for j in range(k):
                ready = max(weights_ready.pop((st, i)) if j == k - 1 else weights_ready[(st, i)], cache_ready,
                            head_end if i == 0 else 0.0)
                start = max(free[compute], ready)
                # Load next: the next layer's weights (at micro-batch 0), the next micro-batch's cache.
                nxt = (st, i, j + 1) if j + 1 < k else ((st, i + 1, 0) if i < last_layer else (st + 1, 0, 0))
                if j == 0 and nxt[0] <= last_step:
                    layer_next = (st, i + 1) if i < last_layer else (st + 1, 0)
                    weights_ready[layer_next] = load_weights(*layer_next, start)
                if nxt[0] <= last_step:
                    cache_ready = load_cache(*nxt, start)
                # Compute current (its hidden states in first, when they wait on the host).
                if i > 0:
                    ready = copy(ACT_IN, st, i, j, start, c.act)
                if on_host[st]:
                    projected = run(PROJECT, st, i, j, ready, c.project_s, flops=c.compute_flops * c.project_s / c.compute_s)
                    home = copy(QKV_OUT, st, i, j, projected, c.qkv_out)
                    attended = run(ATTENTION, st, i, j, home, c.attention_s, c.attention_bytes, c.attention_flops)
                    back = copy(ATTN_IN, st, i, j, attended, c.attn_in)
                    done = run(LAYER, st, i, j, back, c.compute_s - c.project_s,
                               flops=c.compute_flops * (1 - c.project_s / c.compute_s))
                else:
                    done = run(LAYER, st, i, j, ready, c.compute_s, c.compute_bytes, c.compute_flops)
                    home = copy(KV_OUT, st, i, j, done, c.kv_out)
                if i < last_layer:
                    copy(ACT_OUT, st, i, j, done, c.act)
                # Store current: the new positions' NVMe part goes on to the drive.
                stored[(i, j)] = copy(KV_WRITE, st, i, j, home, c.kv_write)
        head_end = run(HEAD, st, -1, -1, done, head_s, flops=head_flops)
        step_end.append(head_end)
    # The job ends when the last token is picked and the last cache write has landed.
    step_end[-1] = max(step_end[-1], last_end)
    return tasks, step_end


def working_bytes(shape: GenerationShape, g: int, rates: GenerationRates, activations: str = DEVICE) -> tuple[int, int]:
    """The device's working set in the prefill and in a decode step, the cache brought in aside:
    the block's hidden states, one micro-batch's layer temporaries (Q, K, V and the attention
    output, 4 x hidden per token, and three intermediate-sized tensors: an MLP's up and gate
    projections and its activation; GPT-2's tanh GELU holds its input, the tanh and the product at
    once), the new positions' K and V, the scores where attention is not fused, and the step's
    bookkeeping tensors (token ids, positions, the attention mask: int64 per position of every
    sequence, and SMALL_TENSOR_BYTES for the rest).

    The block's hidden states H (batch x positions x hidden): on the device, a layer's input and
    output, 2H beside the temporaries. On the host (``activations="host"``), a layer holds one
    micro-batch's rows in and out, M each, but the embedding's output stays whole through layer 0
    (its micro-batches read rows of it) and the last layer's outputs gather on the device for the
    head: H + 2M beside the temporaries, or 2H + M while the last layer's outputs are joined."""
    s, dt, kvb = shape, shape.dtype_bytes, shape.kv_bytes_per_token
    per_token = (4 * s.hidden + 3 * s.intermediate) * dt
    scores = 0 if rates.fused_attention else 1
    bookkeeping = 3 * s.batch * s.max_positions * 8 + SMALL_TENSOR_BYTES

    def hidden_and(q: int, temporaries: int) -> int:
        block, micro = s.batch * q * s.hidden * dt, g * q * s.hidden * dt
        if activations == HOST:
            return max(block + 2 * micro + temporaries, 2 * block + micro)
        return 2 * block + temporaries

    prefill = hidden_and(s.prompt_len, g * s.prompt_len * per_token + g * kvb * s.prompt_len
                         + scores * g * s.heads * s.prompt_len ** 2 * dt) + bookkeeping
    decode = hidden_and(1, g * per_token + scores * g * s.heads * s.max_positions * dt) + bookkeeping
    return prefill, decode


def host_activation_bytes(shape: GenerationShape, activations: str) -> int:
    """The host buffers the block's hidden states wait in between layers: two (a layer reads one and
    writes the other), each the block's rows at the longest step (the prompt)."""
    return 2 * shape.batch * shape.prompt_len * shape.hidden * shape.dtype_bytes if activations == HOST else 0


def peak_bytes(shape: GenerationShape, policy: GenerationPolicy, rates: GenerationRates) -> dict[str, int]:
    """The most bytes each tier holds during the job (docs/cost-model.md, "Generation")."""
    s, pol = shape, policy
    g, kvb, n = pol.gpu_batch, s.kv_bytes_per_token, s.max_positions
    sizes = {s.param_name(i, name): b for i in range(s.layers) for name, b in s.layer_params}
    weights = {t: sum(b for name, b in sizes.items() if pol.weight_tiers[name] == t) for t in (DEVICE, HOST, NVME)}
    other_off = sum(b for name, b in s.other_params if pol.weight_tiers[name] != DEVICE)
    for name, b in s.other_params:
        weights[pol.weight_tiers[name]] += b
    per_layer = [streamed_bytes(s, pol, i) for i in range(s.layers)]
    streamed = sorted((b[HOST] + b[NVME] for b in per_layer), reverse=True)[:2]
    staged = sorted((b[NVME] for b in per_layer), reverse=True)[:2]
    kv = {t: s.batch * s.layers * kvb * pol.kv_positions(t, n) for t in (DEVICE, HOST, NVME)}
    old = n - 1  # the positions a decode step reads from the cache at most
    off_device = pol.kv_positions(HOST, old) + pol.kv_positions(NVME, old)
    prefill, decode = working_bytes(s, g, rates, pol.activations)
    if pol.attention == DEVICE:
        decode += 2 * g * kvb * off_device + g * kvb * n  # the cache coming in, and assembled
    logits = s.batch * s.vocab * 4
    device = (weights[DEVICE] + other_off + sum(streamed) + kv[DEVICE] + max(prefill, decode) + logits)
    host = (weights[HOST] + kv[HOST] + sum(staged) + 2 * g * kvb * pol.kv_positions(NVME, old)
            + host_activation_bytes(s, pol.activations))
    if pol.attention == HOST:
        host += g * s.heads * n * 4 + g * kvb * n  # scores and the assembled cache, on the host
    return {DEVICE: int(device), HOST: int(host), NVME: int(weights[NVME] + kv[NVME])}


__all__ = ["LayerWork", "head_seconds", "host_activation_bytes", "layer_work", "peak_bytes", "simulate",
           "streamed_bytes", "streamed_tensors", "working_bytes"]
