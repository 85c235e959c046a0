"""A machine's figures as generation prices them (docs/cost-model.md, "Generation")."""
from __future__ import annotations

from tierplan.cost_models.hardware import Hardware, HardwareError, compute_precision
from tierplan.cost_models.transfer import tier_route
from tierplan.plans.generation import GenerationRates
from tierplan.plans.plan import DEVICE, HOST, NVME

# Kernels one decoder layer launches per micro-batch when the model's own count is unknown: two
# norms, the Q/K/V and output projections, attention, two or three MLP matmuls, the activation and
# two residual adds. The front end counts the model's real ops (GenerationShape.ops_per_layer:
# 37 for GPT-2, 40 for OPT, 72 to 76 for Llama in transformers 5.25's eager code).
KERNELS_PER_LAYER = 12


def generation_rates(hardware: Hardware, dtype_bytes: int, kernels_per_layer: int = 0) -> GenerationRates:
    """The rates a model with ``dtype_bytes``-byte weights and ``kernels_per_layer`` ops per
    decoder layer (0: KERNELS_PER_LAYER) is priced at on ``hardware``."""
    precision = compute_precision(hardware, dtype_bytes)
    device = precision.device
    key = precision.dtype if dtype_bytes == 2 else "float32"
    if key not in device.peak_flops:
        raise HardwareError(f"hardware {hardware.name!r}: device {device.name!r} has no {key!r} peak "
                            "under [device.peak_flops] to price generation with")
    cpu = device.kind == "cpu"
    to_device, to_host = tier_route(hardware, HOST, DEVICE), tier_route(hardware, DEVICE, HOST)
    link = to_device.links[0] if to_device.links else None
    runtime = hardware.runtime
    issue = runtime.inline_copy_s if cpu else runtime.stream_copy_s
    nvme = hardware.tiers.get(NVME)
    nvme_link = next((lk for lk in hardware.links.values() if NVME in (lk.src, lk.dst)), None)
    nvme_read = tier_route(hardware, NVME, HOST) if nvme else None
    nvme_write = tier_route(hardware, HOST, NVME) if nvme else None
    return GenerationRates(
        device_flops=device.peak_flops[key] * device.compute_efficiency,
        device_bandwidth=device.memory_bandwidth * device.memory_efficiency,
        kernel_s=device.launch_overhead_s + runtime.op_issue_s,
        kernels_per_layer=kernels_per_layer or KERNELS_PER_LAYER,
        h2d_bandwidth=to_device.bandwidth, d2h_bandwidth=to_host.bandwidth,
        pcie_latency_s=to_device.latency_s + issue,
        pcie_duplex=link.duplex if link is not None else True,
        nvme_read_bandwidth=nvme_read.bandwidth if nvme_read else float("inf"),
        nvme_write_bandwidth=nvme_write.bandwidth if nvme_write else float("inf"),
        nvme_latency_s=(nvme_read.latency_s + runtime.file_copy_s) if nvme_read else 0.0,
        nvme_duplex=nvme_link.duplex if nvme_link is not None else True,
        cpu_flops=hardware.host.cpu_flops, dram_bandwidth=hardware.host.dram_bandwidth,
        fused_attention=not cpu, shared_cpu=cpu,
    )


__all__ = ["KERNELS_PER_LAYER", "generation_rates"]
