"""The optimizer step of a plan, as data: where each parameter's master weight and optimizer
states live, where its update runs, and the timed tasks that carry it out.

A training Plan's schedule ends at the gradients. ``UpdatePlan`` is the rest of the step, planned
against that schedule's replay (docs/architecture.md, "The optimizer step"): for each parameter,
in the order its gradient is ready, a chain of tasks on the machine's resources

- ``grad_out``: the gradient's copy device -> host (a PCIe queue of the plan's channels);
- ``grad_read``: the gradient's read from NVMe, where the schedule offloaded it there;
- ``read_states`` / ``write_states``: the master weight and states read from NVMe into a host
  staging buffer and written back after the update (the NVMe drive's read and write queues);
- ``update``: the optimizer's arithmetic, on the host CPU (``HOST_CPU``) or on the device's
  compute stream (``COMPUTE_QUEUE``), which is busy with the schedule until its end;
- ``weight_in`` / ``weight_out``: the updated weight back to its home: host -> device for a
  weight that lives on the device, a write to NVMe for one that lives there (a weight whose home
  is host memory is written in place by the CPU update).

The step ends when the schedule and every task have ended. Each task's duration follows from its
bytes and FLOPs and the rates recorded here, so ``tierplan.plans.check_update`` re-derives them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from tierplan.plans.plan import COMPUTE_QUEUE, DEVICE, HOST, NVME, PlanError

HOST_CPU = "host-cpu"  # the host CPU's cores, one queue: updates run one parameter at a time
NVME_READ = "nvme:read"  # the NVMe drive's reads (the activation schedule's nvme->device copies too)
NVME_WRITE = "nvme:write"  # its writes (and the schedule's device->nvme copies)
NVME_QUEUE = "nvme"  # both, on a drive whose link is not full duplex

# Parameters that may hold host staging buffers (a gradient landed from the device, states read
# from NVMe) at once: one being read, one being updated, one being written back.
STAGING_SLOTS = 3

OPTIMIZERS = ("adamw", "adam", "sgd")
PRECISIONS = ("fp32", "bf16", "bf16-mixed", "fp16-mixed")
STATE_TIERS = (DEVICE, HOST, NVME)

# Task kinds, in chain order.
GRAD_OUT = "grad_out"
GRAD_READ = "grad_read"
READ_STATES = "read_states"
UPDATE = "update"
WRITE_STATES = "write_states"
WEIGHT_IN = "weight_in"
WEIGHT_OUT = "weight_out"
TASK_KINDS = (GRAD_OUT, GRAD_READ, READ_STATES, UPDATE, WRITE_STATES, WEIGHT_IN, WEIGHT_OUT)


@dataclass(frozen=True)
class ParamState:
    """One trained parameter's model state, in bytes, and the arithmetic of its update.

    ``master_bytes`` is the fp32 master weight mixed precision keeps (0 otherwise; a host update
    of a parameter without one keeps an fp32 host copy, ``host_master_bytes``); ``state_bytes``
    the optimizer's per-parameter states (Adam's m and v, SGD's momentum buffer)."""

    param: str  # the parameter's storage in the plan's graph
    grad: str | None  # its gradient's storage (None: the graph computes none, nothing to update)
    numel: int
    weight_bytes: int
    grad_bytes: int
    master_bytes: int
    state_bytes: int
    flops: int  # one update's arithmetic
    state_files: int = 0  # tensors written per parameter when its states live on NVMe (one file each)

    @property
    def host_master_bytes(self) -> int:
        """The master a host update runs on: the mixed-precision master, else an fp32 copy."""
        return self.master_bytes or 4 * self.numel

    def resident_bytes(self, tier: str) -> int:
        """Bytes of master and states that live on ``tier`` between steps when placed there
        (a device update of a parameter without a master updates it in place)."""
        return self.state_bytes + (self.master_bytes if tier == DEVICE else self.host_master_bytes)

    def model_state_bytes(self, tier: str) -> int:
        """Weight, gradient, master and states: ZeRO's per-parameter count (16 B for mixed Adam)."""
        return self.weight_bytes + self.grad_bytes + self.resident_bytes(tier)

    def update_bytes(self, tier: str) -> int:
        """Memory traffic of one update on ``tier``: the gradient and the master and states read,
        the master and states written, and the weight written (in its compute dtype)."""
        return self.grad_bytes + 2 * self.resident_bytes(tier) + self.weight_bytes


@dataclass(frozen=True)
class UpdateRates:
    """The machine figures task durations are priced with (docs/cost-model.md, "Optimizer step")."""

    cpu_flops: float  # the host's fp32 FLOP/s
    dram_bandwidth: float  # the host's memory bandwidth, bytes/s
    device_bandwidth: float  # the device's effective memory bandwidth, bytes/s
    device_launch_s: float  # one device update's fixed cost (its kernel launches)
    nvme_read_bandwidth: float = 0.0
    nvme_write_bandwidth: float = 0.0
    nvme_latency_s: float = 0.0
    nvme_duplex: bool = True  # reads and writes run at once (else one queue, NVME_QUEUE)
    file_s: float = 0.0  # per swap file read or written (open, hand-off, close)
    param_update_s: float = 0.0  # per parameter updated: the optimizer's step call and bookkeeping
    # A CPU-only machine: the "device" is the host's cores, so a host update runs on the compute
    # stream (after the schedule), not beside it.
    shared_cpu: bool = False

    @property
    def host_update_resource(self) -> str:
        return COMPUTE_QUEUE if self.shared_cpu else HOST_CPU

    def nvme_resource(self, direction: str) -> str:
        """The queue of an NVMe read (NVME_READ) or write (NVME_WRITE) on this drive."""
        return direction if self.nvme_duplex else NVME_QUEUE


@dataclass(frozen=True)
class UpdateTask:
    """One timed piece of one parameter's update on one resource."""

    param: str
    kind: str  # one of TASK_KINDS
    resource: str  # a queue of the plan's channels, COMPUTE_QUEUE, HOST_CPU, NVME_READ or NVME_WRITE
    start_s: float
    end_s: float
    nbytes: int = 0
    flops: int = 0


@dataclass
class UpdatePlan:
    """Where every parameter's master and states live, where its update runs, and when.

    ``peak_bytes`` are the whole step's: the schedule's peak per tier plus the resident states
    and, on the host, the most staging buffers (gradients landed from the device, states read
    from NVMe) in use at once. ``step_time_s`` is the whole step's predicted time."""

    optimizer: str
    precision: str
    params: list[ParamState]
    states_tier: dict[str, str]  # param -> DEVICE, HOST or NVME
    update_on: dict[str, str]  # param -> DEVICE or HOST
    tasks: list[UpdateTask]
    rates: UpdateRates
    peak_bytes: dict[str, int] = field(default_factory=dict)
    step_time_s: float = 0.0
    update_exposed_s: float = 0.0  # step_time_s minus the schedule's own time
    method: str = ""
    solve_s: float = 0.0
    # How the runtime runs it: updates only after the schedule ends (tierplan's TieredOptimizer,
    # stepped after loss.backward(), as ZeRO-Offload's and ZeRO-Infinity's are), or overlapped
    # with the backward as gradients arrive; and how many parameters may hold host staging at
    # once (1: read, update and write one parameter after another).
    overlap_backward: bool = False
    staging_slots: int = STAGING_SLOTS

    def param(self, name: str) -> ParamState:
        for ps in self.params:
            if ps.param == name:
                return ps
        raise PlanError(f"the update plan has no parameter {name!r}")

    def bytes_on(self, tier: str) -> int:
        """Master and state bytes resident on ``tier``."""
        return sum(ps.resident_bytes(tier) for ps in self.params if self.states_tier[ps.param] == tier)

    def model_state_bytes(self) -> int:
        """Weights, gradients, masters and states over all tiers (ZeRO's model state)."""
        return sum(ps.model_state_bytes(self.states_tier[ps.param]) for ps in self.params)

    def placement_counts(self) -> dict[str, int]:
        """How many parameters keep their states on each tier."""
        counts = {tier: 0 for tier in STATE_TIERS}
        for tier in self.states_tier.values():
            counts[tier] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer, "precision": self.precision,
            "params": [asdict(ps) for ps in self.params],
            "states_tier": self.states_tier, "update_on": self.update_on,
            "tasks": [[t.param, t.kind, t.resource, t.start_s, t.end_s, t.nbytes, t.flops] for t in self.tasks],
            "rates": asdict(self.rates), "peak_bytes": self.peak_bytes,
            "step_time_s": self.step_time_s, "update_exposed_s": self.update_exposed_s,
            "method": self.method, "solve_s": self.solve_s,
            "overlap_backward": self.overlap_backward, "staging_slots": self.staging_slots,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UpdatePlan:
        return cls(
            optimizer=data["optimizer"], precision=data["precision"],
            params=[ParamState(**p) for p in data["params"]],
            states_tier=dict(data["states_tier"]), update_on=dict(data["update_on"]),
            tasks=[UpdateTask(*t) for t in data["tasks"]],
            rates=UpdateRates(**data["rates"]),
            peak_bytes={k: int(v) for k, v in data["peak_bytes"].items()},
            step_time_s=float(data["step_time_s"]), update_exposed_s=float(data["update_exposed_s"]),
            method=data["method"], solve_s=float(data["solve_s"]),
            overlap_backward=bool(data["overlap_backward"]), staging_slots=int(data["staging_slots"]),
        )


def check_choice(optimizer: str, precision: str) -> None:
    """PlanError naming the setting when ``optimizer`` or ``precision`` is not one tierplan plans."""
    if optimizer not in OPTIMIZERS:
        raise PlanError(f"optimizer={optimizer!r} is not supported; give one of {', '.join(OPTIMIZERS)} "
                        f"or 'none' to plan the forward and backward only")
    if precision not in PRECISIONS:
        raise PlanError(f"precision={precision!r} is not supported; give one of {', '.join(PRECISIONS)}")
