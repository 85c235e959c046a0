"""The training time model against published runs: Narayanan et al. 2021 (Megatron-LM,
"Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", SC21), Table 1.

Each row is a GPT model (sequence 2048, vocabulary 51,200) trained on DGX A100 nodes (8 A100
80 GB, NVSwitch, 8 x 200 Gb/s HDR InfiniBand) in fp16 with full activation recomputation, at the
paper's tensor / pipeline / data-parallel degrees and global batch; the paper reports achieved
TFLOP/s per GPU counted with its formula (``paper_flops``). ``calibration_table`` profiles each
shape through the ordinary front end (a GPT2Config, 2 captured layers scaled to the real count,
no downloads), prices it at the paper's layout with ``TrainSearch.evaluate`` and counts the
predicted step the paper's way; ``fit_training_efficiency`` finds the one fitted constant, the
device's ``training_efficiency`` (the fraction of the single-kernel compute rate a whole training
step sustains), that minimizes the mean error. The fitted value lives in the hardware preset
(``presets/a100-80gb-sxm.toml``), not here.

    rows = calibration_table()            # on the a100-80gb-sxm preset
    print(format_calibration(rows))       # model, GPUs, TP, PP, DP, batch, published, predicted
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable

from tierplan.cost_models.hardware import Hardware, load_hardware
from tierplan.parallel.profile import ModelProfile
from tierplan.parallel.training import TrainSearch
from tierplan.parallel.types import Layout, ParallelPlan, cluster_for

__all__ = [
    "CALIBRATION_HARDWARE",
    "MEGATRON_TABLE1",
    "CalibrationRow",
    "PublishedRun",
    "calibration_table",
    "fit_training_efficiency",
    "format_calibration",
    "mean_error",
    "paper_flops",
    "predict",
    "with_training_efficiency",
]

SEQ_LEN = 2048  # all Table 1 models
VOCAB = 51200  # 51,200: a multiple of 1024, as the paper pads it
CALIBRATION_HARDWARE = "a100-80gb-sxm"  # DGX A100: 8 GPUs per node, one HDR port per GPU
SOURCE = "Narayanan et al. 2021, Table 1"


@dataclass(frozen=True)
class PublishedRun:
    """One published training run: the model's shape, its layout and the throughput achieved.

    ``micro_batch`` and ``virtual`` (layers of a device in ``virtual`` interleaved chunks; 1 =
    plain 1F1B) are not columns of Table 1: they are the values of Megatron-LM's reproduction
    script for the table (``examples/sc21/run_table_1.sh``: MBS and
    ``--num-layers-per-virtual-pipeline-stage``), as recalled, unverified against the file.
    Every one makes the micro-batch count a multiple of the pipeline depth, as the interleaved
    schedule needs.
    """

    name: str
    heads: int
    hidden: int
    layers: int
    tp: int
    pp: int
    gpus: int
    global_batch: int
    tflops: float  # achieved TFLOP/s per GPU, as published
    micro_batch: int = 1
    virtual: int = 1

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def schedule(self) -> str:
        if self.pp == 1:
            return "none"
        return "interleaved" if self.virtual > 1 else "1f1b"

    def layout_text(self) -> str:
        """The layout in ``--layout`` syntax (micro-batch x count, recompute)."""
        sched = {"none": "", "1f1b": " 1F1B", "interleaved": f" interleaved(v={self.virtual})"}[self.schedule]
        m = self.global_batch // (self.dp * self.micro_batch)
        return (f"dp{self.dp} tp{self.tp} pp{self.pp}{sched} zero0 "
                f"mb{self.micro_batch}x{m} rc[full]")  # fmt: skip


# Narayanan et al. 2021, Table 1 (design/anchors.md): name, heads, hidden, layers, TP, PP, GPUs,
# global batch, achieved TFLOP/s per GPU; then micro-batch and virtual stages (see PublishedRun).
MEGATRON_TABLE1: tuple[PublishedRun, ...] = (
    PublishedRun("1.7B", 24, 2304, 24, 1, 1, 32, 512, 137, micro_batch=16),
    PublishedRun("3.6B", 32, 3072, 30, 2, 1, 64, 512, 138, micro_batch=16),
    PublishedRun("7.5B", 32, 4096, 36, 4, 1, 128, 512, 142, micro_batch=16),
    PublishedRun("18.4B", 48, 6144, 40, 8, 1, 256, 1024, 135, micro_batch=8),
    PublishedRun("39.1B", 64, 8192, 48, 8, 2, 512, 1536, 138, micro_batch=4),
    PublishedRun("76.1B", 80, 10240, 60, 8, 4, 1024, 1792, 140, micro_batch=2, virtual=3),
    PublishedRun("145.6B", 96, 12288, 80, 8, 8, 1536, 2304, 148, micro_batch=2, virtual=2),
    PublishedRun("310.1B", 128, 16384, 96, 8, 16, 1920, 2160, 155, micro_batch=1, virtual=2),
    PublishedRun("529.6B", 128, 20480, 105, 8, 35, 2520, 2520, 163, micro_batch=1, virtual=3),
    PublishedRun("1008B", 160, 25600, 128, 8, 64, 3072, 3072, 163, micro_batch=1, virtual=2),
)


def paper_flops(run: PublishedRun, seq_len: int = SEQ_LEN, vocab: int = VOCAB) -> float:
    """FLOPs of one iteration as the paper counts them (its Eq. 3): 96 B s l h^2 (1 + s/(6h) +
    V/(16 l h)): forward, backward and the recompute forward of every layer's GEMMs (24 B s h^2
    + 4 B s^2 h each) plus the logit layer's forward and backward (6 B s V h)."""
    b, s, l, h = run.global_batch, seq_len, run.layers, run.hidden
    return 96 * b * s * l * h**2 * (1 + s / (6 * h) + vocab / (16 * l * h))


@dataclass(frozen=True)
class CalibrationRow:
    """One run: published and predicted TFLOP/s per GPU (the paper's count), and the plan."""

    run: PublishedRun
    predicted: float  # TFLOP/s per GPU
    plan: ParallelPlan

    @property
    def error(self) -> float:
        """predicted / published - 1."""
        return self.predicted / self.run.tflops - 1


def predict(run: PublishedRun, profile: ModelProfile, hardware: Hardware) -> CalibrationRow:
    """Price ``run`` at its layout (ZeRO 0, full recompute on every layer) on ``run.gpus``
    devices of ``hardware`` and count its throughput as the paper does. A layout that does not
    fit the model's memory is priced anyway (the plan's ``fits`` says so)."""
    cluster, _ = cluster_for(hardware, run.gpus)
    search = TrainSearch(profile, hardware, cluster, run.gpus, run.global_batch,
                         layout=Layout(text=run.layout_text(), recompute=(("full", None),)))  # fmt: skip
    plan = search.evaluate(t=run.tp, pp=run.pp, d=run.dp, b=run.micro_batch, schedule=run.schedule,
                           v=run.virtual, zero=0, offload_optimizer=False, offload_params=False,
                           over_capacity=True)  # fmt: skip
    assert plan is not None  # over_capacity prices every layout
    tflops = paper_flops(run, profile.seq_len, profile.vocab) / (plan.step_time * run.gpus) / 1e12
    return CalibrationRow(run=run, predicted=tflops, plan=plan)


def calibration_table(
    hardware: str | Hardware = CALIBRATION_HARDWARE,
    runs: Iterable[PublishedRun] = MEGATRON_TABLE1,
    *,
    profiles: dict[str, ModelProfile],
) -> list[CalibrationRow]:
    """Every run priced on ``hardware`` (default: the A100 80 GB SXM preset) with its profile
    (by run name: ``tierplan.profiling.published_run_profiles`` captures them; the search takes
    profiles, never models)."""
    hw = load_hardware(hardware) if isinstance(hardware, str) else hardware
    runs = tuple(runs)
    return [predict(r, profiles[r.name], hw) for r in runs]


def mean_error(rows: Iterable[CalibrationRow]) -> float:
    """Mean |predicted / published - 1| (APEX's metric: 10.7% for its simulator)."""
    errors = [abs(r.error) for r in rows]
    return sum(errors) / len(errors)


def with_training_efficiency(hardware: Hardware, value: float) -> Hardware:
    """A copy of ``hardware`` whose device sustains ``value`` of its compute rate in training."""
    return dataclasses.replace(hardware, device=dataclasses.replace(hardware.device, training_efficiency=value))


def fit_training_efficiency(
    hardware: str | Hardware = CALIBRATION_HARDWARE,
    runs: Iterable[PublishedRun] = MEGATRON_TABLE1,
    *,
    profiles: dict[str, ModelProfile],
    lo: float = 0.3, hi: float = 1.0, tol: float = 1e-4,
) -> tuple[float, float]:
    """The ``training_efficiency`` in [lo, hi] minimizing the mean error over ``runs``, and
    that error. Golden-section search: the mean absolute error of predictions that all scale
    the same way with the constant is unimodal in it."""
    hw = load_hardware(hardware) if isinstance(hardware, str) else hardware
    runs = tuple(runs)

    def err(x: float) -> float:
        return mean_error(calibration_table(with_training_efficiency(hw, x), runs, profiles=profiles))

    g = (5**0.5 - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = err(c), err(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = err(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = err(d)
    best = (a + b) / 2
    return best, err(best)


def format_calibration(rows: list[CalibrationRow]) -> str:
    """The table: model, GPUs, TP, PP, DP, batch, micro-batch, schedule, published and predicted
    TFLOP/s per GPU, the error; then the mean error."""
    head = (f"{'model':>7} {'GPUs':>5} {'TP':>3} {'PP':>3} {'DP':>3} {'batch':>5} {'mb':>3} "
            f"{'schedule':>11} {'published':>9} {'predicted':>9} {'error':>7}")  # fmt: skip
    lines = [head]
    for r in rows:
        run = r.run
        sched = run.schedule if run.virtual == 1 else f"interl. v{run.virtual}"
        lines.append(f"{run.name:>7} {run.gpus:>5} {run.tp:>3} {run.pp:>3} {run.dp:>3} "
                     f"{run.global_batch:>5} {run.micro_batch:>3} {sched:>11} {run.tflops:>9.0f} "
                     f"{r.predicted:>9.1f} {r.error:>+7.1%}"
                     + ("" if r.plan.fits else "  (does not fit)"))  # fmt: skip
    lines.append(f"mean |predicted/published - 1| over {len(rows)} runs: {mean_error(rows):.1%} "
                 f"(TFLOP/s per GPU as {SOURCE} counts them)")  # fmt: skip
    return "\n".join(lines)
