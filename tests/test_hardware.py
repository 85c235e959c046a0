"""Hardware descriptions: presets load and agree with their sources, user files extend them, and
every kind of bad input gets a one-line error naming the file and the key."""
from __future__ import annotations

import dataclasses
import re
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierplan.cost_models.hardware import (
    PEAK_FLOPS_KEYS,
    Hardware,
    HardwareError,
    describe_hardware,
    list_parts,
    list_presets,
    load_hardware,
    write_hardware_toml,
)

MACHINES = [
    "a100-40gb-pcie", "a100-80gb-sxm", "a10g", "b200", "cpu", "gb200", "gh200", "h100-pcie",
    "h100-sxm", "h100-sxm-cxl", "h200", "l4", "l40s", "mi250x", "mi300x", "rtx4090", "rtx4090-host128", "t4",
    "v100",
]  # fmt: skip
GiB = 2**30


def preset_texts() -> dict[str, str]:
    folder = resources.files("tierplan.cost_models") / "presets"
    return {
        e.name: e.read_text(encoding="utf-8") for e in folder.iterdir() if e.name.endswith(".toml")
    }


def write(tmp_path: Path, text: str, name: str = "my-gpu.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def h100_with(tmp_path: Path, text: str) -> Path:
    return write(tmp_path, f'extends = "h100-sxm"\n{text}\n')


def error_of(ref: str | Path) -> str:
    with pytest.raises(HardwareError) as info:
        load_hardware(ref)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


# -- presets -------------------------------------------------------------------------------------


def test_presets_are_listed() -> None:
    assert list_presets() == MACHINES
    assert {"host-ddr5-server", "nvme-gen4", "nvme-gen5"} <= set(list_parts())
    assert len(preset_texts()) >= 10


@pytest.mark.parametrize("name", MACHINES)
def test_preset_is_consistent(name: str) -> None:
    hw = load_hardware(name)
    assert hw.name == name and hw.description and hw.sources
    assert set(hw.tiers) >= {"device", "host", "nvme"}
    assert hw.tiers["device"].capacity_bytes == hw.device.memory_bytes
    assert hw.tiers["device"].read_bandwidth == hw.device.memory_bandwidth
    assert hw.tiers["host"].capacity_bytes == hw.host.dram_bytes
    for tier in hw.tiers.values():
        assert tier.capacity_bytes > 0 and tier.read_bandwidth > 0 and tier.write_bandwidth > 0
        assert tier.latency_s >= 0
    for link in [*hw.links.values(), hw.cluster.intra_node, hw.cluster.inter_node]:
        if link is not None:
            assert link.bandwidth > 0 and link.latency_s >= 0
            assert link.bandwidth_both_ways() <= link.bandwidth
    down, up = hw.link("device", "host"), hw.link("host", "device")
    assert (down.src, down.dst, up.src, up.dst) == ("device", "host", "host", "device")
    assert [l.dst for l in hw.route("device", "nvme")] == ["host", "nvme"]
    # An NVMe drive is slower than the host link, which is slower than device memory.
    assert hw.tiers["nvme"].read_bandwidth < down.bandwidth <= hw.device.memory_bandwidth
    assert hw.tiers["nvme"].capacity_bytes > hw.device.memory_bytes or hw.device.kind == "cpu"
    d = hw.device
    # A 16-bit rate: bf16, or fp16 alone on GPUs without bf16 tensor cores (t4, v100).
    half = "bfloat16" if "bfloat16" in d.peak_flops else "float16"
    assert {"float32", half} <= set(d.peak_flops) <= set(PEAK_FLOPS_KEYS)
    assert 0 < d.compute_efficiency <= 1 and 0 < d.memory_efficiency <= 1
    assert 0 <= d.launch_overhead_s < 1e-3
    assert d.peak_flops[half] >= d.peak_flops["float32"]
    if d.kind != "cpu":
        assert d.peak_flops[half] >= 8 * d.peak_flops["float32"] / 4  # tensor cores
        if "tf32" in d.peak_flops:  # no TF32 units on Volta, Turing, CDNA 2
            assert d.peak_flops["tf32"] >= d.peak_flops["float32"]
        else:
            assert not d.allow_tf32
        assert hw.host.cpu_flops > 0 and hw.host.cores > 0
    assert hw.cluster.world_size >= 1
    describe_hardware(hw)


def test_preset_figures_match_the_anchors() -> None:
    """Spot checks against design/anchors.md."""
    h100 = load_hardware("h100-sxm")
    assert h100.device.memory_bandwidth == pytest.approx(3.35e12)
    assert h100.device.peak_flops["bfloat16"] == pytest.approx(989.5e12)
    assert h100.device.memory_bytes == 80 * GiB
    assert h100.cluster.intra_node.bandwidth == pytest.approx(450e9)  # 900 GB/s both directions
    assert h100.cluster.inter_node.bandwidth == pytest.approx(50e9)  # NDR 400 Gb/s
    assert h100.cluster.gpus_per_node == 8
    h200 = load_hardware("h200")
    assert h200.device.memory_bandwidth == pytest.approx(4.8e12)
    assert h200.device.memory_bytes == 141 * GiB
    assert h200.device.peak_flops == h100.device.peak_flops
    assert load_hardware("a100-80gb-sxm").device.memory_bandwidth == pytest.approx(2.039e12)
    a100_40 = load_hardware("a100-40gb-pcie")
    assert a100_40.device.memory_bandwidth == pytest.approx(1.555e12)
    assert "float8" not in a100_40.device.peak_flops
    pcie4 = a100_40.link("host", "device")
    assert pcie4.bandwidth == pytest.approx(25e9)
    assert pcie4.concurrent_bandwidth == pytest.approx(11e9)
    rtx = load_hardware("rtx4090")
    assert rtx.device.memory_bandwidth == pytest.approx(1.008e12)
    assert rtx.device.peak_flops["bfloat16"] == pytest.approx(165.2e12)
    assert rtx.cluster.gpus_per_node == 1
    assert load_hardware("l4").tiers["nvme"].read_bandwidth == pytest.approx(7.45e9)
    assert load_hardware("h100-sxm").tiers["nvme"].read_bandwidth == pytest.approx(14.5e9)


def test_every_preset_number_has_a_source_comment() -> None:
    # key = 3.35e12  or  key = "3.35 TB/s", then maybe a comment
    quantity = re.compile(
        r"""^\s*[\w-]+\s*=\s*(?:[-+]?\d[\d_.eE+-]*|"[-+]?[\d.]+(?:[eE][-+]?\d+)?\s*[A-Za-zµ/]*")"""
        r"""\s*(#.*)?$"""
    )
    checked = 0
    for file, text in preset_texts().items():
        for number, line in enumerate(text.splitlines(), 1):
            match = quantity.match(line)
            if match:
                checked += 1
                assert match.group(1), f"{file}:{number} has a number without a source: {line!r}"
    assert checked > 150


@pytest.mark.parametrize("name", MACHINES)
def test_preset_round_trips_through_toml(name: str, tmp_path: Path) -> None:
    hw = load_hardware(name)
    assert load_hardware(write_hardware_toml(hw, tmp_path / f"{name}.toml")) == hw


# -- user files ----------------------------------------------------------------------------------


def test_user_file_extends_a_preset(tmp_path: Path) -> None:
    path = write(tmp_path, """
extends = "h100-sxm"
include = ["nvme-gen4"]
description = "an H100 with half its memory"

[device]
memory_bytes = "40 GiB"
allow_tf32 = true

[links.device-host]
bandwidth = "30 GB/s"

[tiers.cxl]
capacity_bytes = "512 GiB"
read_bandwidth = "64 GB/s"
write_bandwidth = "64 GB/s"
latency_s = "400 ns"

[links.host-cxl]
src = "host"
dst = "cxl"
bandwidth = "64 GB/s"
""")
    hw = load_hardware(path)
    base = load_hardware("h100-sxm")
    assert hw.name == "my-gpu"  # the file's stem: names are not inherited
    assert hw.description == "an H100 with half its memory"
    assert hw.device.memory_bytes == 40 * GiB == hw.tiers["device"].capacity_bytes
    assert hw.device.allow_tf32 and hw.device.peak_flops == base.device.peak_flops
    assert hw.link("device", "host").bandwidth == 30e9
    assert hw.link("device", "host").concurrent_bandwidth == 22e9  # the rest of the link inherited
    assert hw.tiers["nvme"].read_bandwidth == pytest.approx(7.45e9)  # gen4 replaced gen5
    assert hw.tiers["cxl"].latency_s == pytest.approx(400e-9)
    assert [l.name for l in hw.route("device", "cxl")] == ["device-host", "host-cxl"]
    assert hw.cluster == base.cluster
    assert set(base.sources) <= set(hw.sources)
    assert load_hardware(str(path)) == hw


def test_user_file_extends_a_file_by_relative_path(tmp_path: Path) -> None:
    write(tmp_path, 'extends = "l4"\nname = "b"\n[device]\nmemory_bandwidth = 1e12\n', "b.toml")
    (tmp_path / "sub").mkdir()
    path = write(tmp_path / "sub", 'extends = "../b.toml"\n[cluster]\nnodes = 4\n', "top.toml")
    hw = load_hardware(path)
    assert hw.name == "top" and hw.device.memory_bandwidth == 1e12 and hw.cluster.world_size == 4


def test_units_are_parsed(tmp_path: Path) -> None:
    hw = load_hardware(write(tmp_path, """
extends = "cpu"
[device]
memory_bytes = "1.5 GB"
memory_bandwidth = "400 Gb/s"
launch_overhead_s = "2.5 us"
[device.peak_flops]
float32 = "1.5 TFLOPS"
bfloat16 = 3e12
"""))
    d = hw.device
    assert d.memory_bytes == 1_500_000_000 and d.memory_bandwidth == 50e9
    assert d.launch_overhead_s == pytest.approx(2.5e-6)
    assert d.peak_flops["float32"] == 1.5e12 and d.peak_flops["bfloat16"] == 3e12


def test_asymmetric_link_declared_per_direction(tmp_path: Path) -> None:
    hw = load_hardware(write(tmp_path, """
extends = "a100-40gb-pcie"
[links.device-host]
bandwidth = "20 GB/s"
[links.host-to-device]
src = "host"
dst = "device"
bandwidth = "26 GB/s"
"""))
    assert hw.link("device", "host").bandwidth == 20e9
    assert hw.link("host", "device").bandwidth == 26e9
    assert hw.route("nvme", "device")[-1].name == "host-to-device"


# -- helpers on Hardware -------------------------------------------------------------------------


def test_link_and_tier_errors() -> None:
    hw = load_hardware("h100-sxm")
    with pytest.raises(HardwareError, match="no direct link between 'device' and 'nvme'.*route"):
        hw.link("device", "nvme")
    with pytest.raises(HardwareError, match="no tier 'cxl'; its tiers are device, host, nvme"):
        hw.link("device", "cxl")
    assert hw.route("host", "host") == []


def test_with_device_capacity() -> None:
    hw = load_hardware("h100-sxm")
    budget = hw.with_device_capacity(6 * GiB)
    assert budget.tiers["device"].capacity_bytes == 6 * GiB
    assert budget.device == hw.device and hw.tiers["device"].capacity_bytes == 80 * GiB
    assert hw.with_tier_capacity("nvme", 10**12).tiers["nvme"].capacity_bytes == 10**12
    with pytest.raises(HardwareError, match="exceeds the 80.00 GiB"):
        hw.with_device_capacity(81 * GiB)
    with pytest.raises(HardwareError, match="positive int"):
        hw.with_device_capacity(0)


def test_describe_hardware() -> None:
    text = describe_hardware(load_hardware("h100-sxm"))
    for needle in ("h100-sxm", "3.35 TB/s", "80.00 GiB", "device", "host", "nvme", "NVLink",
                   "22 GB/s each way when both run", "8 device(s) per node"):  # fmt: skip
        assert needle in text


# -- errors --------------------------------------------------------------------------------------


def test_unknown_preset() -> None:
    message = error_of("h1000")
    assert "unknown hardware preset 'h1000'" in message
    assert "h100-sxm" in message and "TOML" in message and "extends" in message


def test_missing_file(tmp_path: Path) -> None:
    assert "no hardware file at" in error_of(tmp_path / "nope.toml")


def test_malformed_toml(tmp_path: Path) -> None:
    path = write(tmp_path, 'extends = "h100-sxm"\n[device\nname = "x"\n')
    message = error_of(path)
    assert str(path) in message and "not valid TOML" in message and "line 2" in message


def test_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, 'extends = "h100-sxm"\n[device]\nmemory_bandwidth = "fast"\n')
    message = error_of(path)
    assert str(path) in message and "[device] memory_bandwidth" in message
    assert "expected a bandwidth" in message and "'fast'" in message
    message = error_of(write(tmp_path, 'extends = "h100-sxm"\n[cluster]\nnodes = "two"\n'))
    assert "[cluster] nodes: expected a positive integer" in message
    message = error_of(write(tmp_path, 'extends = "h100-sxm"\n[device]\nallow_tf32 = "yes"\n'))
    assert "[device] allow_tf32: expected true or false" in message
    message = error_of(write(tmp_path, 'extends = "h100-sxm"\ndevice = 3\n'))
    assert "[device] must be a table" in message


def test_negative_bandwidth(tmp_path: Path) -> None:
    path = write(tmp_path, 'extends = "h100-sxm"\n[links.device-host]\nbandwidth = -1\n')
    message = error_of(path)
    assert str(path) in message and "[links.device-host] bandwidth: must be positive" in message
    message = error_of(write(tmp_path, 'extends = "h100-sxm"\n[tiers.nvme]\nlatency_s = "-5 us"\n'))
    assert "[tiers.nvme] latency_s: must be zero or positive" in message
    message = error_of(h100_with(tmp_path, "[device]\ncompute_efficiency = 1.5"))
    assert "[device] compute_efficiency: expected a number in (0, 1]" in message


def test_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'extends = "h100-sxm"\n[links.device-host]\nbandwith = "1 GB/s"\n')
    message = error_of(path)
    assert str(path) in message and "unknown key 'bandwith' in [links.device-host]" in message
    assert "did you mean 'bandwidth'" in message
    message = error_of(write(tmp_path, 'extends = "h100-sxm"\n[device.peak_flops]\nfp16 = 1e12\n'))
    assert "unknown key 'fp16' in [device.peak_flops]" in message and "float16" in message
    assert "unknown key 'gpu'" in error_of(write(tmp_path, 'extends = "h100-sxm"\ngpu = 1\n'))


def test_unknown_unit(tmp_path: Path) -> None:
    message = error_of(h100_with(tmp_path, '[device]\nmemory_bytes = "80 GiBs"'))
    assert "[device] memory_bytes" in message and "known units" in message


def test_missing_required_fields(tmp_path: Path) -> None:
    path = write(tmp_path, '[device]\nname = "x"\n')
    assert "missing required table [host]" in error_of(path)
    path = write(tmp_path, """
[device]
name = "x"
memory_bytes = "1 GiB"
peak_flops = { float32 = 1e9 }
[host]
dram_bytes = "1 GiB"
dram_bandwidth = "1 GB/s"
cpu_flops = 1e9
""")
    message = error_of(path)
    assert str(path) in message and "[device] is missing required key 'memory_bandwidth'" in message
    path = write(tmp_path, 'extends = "h100-sxm"\n[tiers.cxl]\ncapacity_bytes = "1 TiB"\n')
    assert "[tiers.cxl] is missing required key 'read_bandwidth'" in error_of(path)
    path = write(tmp_path, 'extends = "h100-sxm"\n[links.x]\nsrc = "host"\ndst = "nvme"\n')
    assert "[links.x] is missing required key 'bandwidth'" in error_of(path)


def test_inconsistent_files(tmp_path: Path) -> None:
    path = h100_with(tmp_path, '[links.x]\nsrc = "host"\ndst = "cxl"\nbandwidth = 1e9')
    assert "[links.x] dst: 'cxl' is not a tier" in error_of(path)
    path = write(tmp_path, 'extends = "h100-sxm"\n[tiers.device]\ncapacity_bytes = "100 GiB"\n')
    message = error_of(path)
    assert "[tiers.device] capacity_bytes (100.00 GiB) exceeds [device] memory_bytes (80.00 GiB)" in (
        message
    )
    path = h100_with(tmp_path, '[links.device-host]\nconcurrent_bandwidth = "60 GB/s"')
    assert "concurrent_bandwidth (60 GB/s) exceeds bandwidth (50 GB/s)" in error_of(path)


def test_part_is_not_a_machine_and_loops_are_caught(tmp_path: Path) -> None:
    assert "is a part" in error_of("nvme-gen5")
    write(tmp_path, 'extends = "b.toml"\n', "a.toml")
    write(tmp_path, 'extends = "a.toml"\n', "b.toml")
    assert "extends/include loop" in error_of(tmp_path / "a.toml")
    path = write(tmp_path, 'extends = "h100-sxm"\ninclude = ["nvme-gen9"]\n')
    message = error_of(path)
    assert str(path) in message and "unknown hardware preset 'nvme-gen9'" in message


def test_hardware_is_plain_data() -> None:
    hw = load_hardware("h100-sxm")
    assert isinstance(hw, Hardware)
    with pytest.raises(dataclasses.FrozenInstanceError):
        hw.name = "x"  # type: ignore[misc]


@settings(max_examples=40, deadline=None)
@given(
    capacity=st.integers(min_value=1, max_value=80 * GiB),
    bandwidth=st.floats(min_value=1e-3, max_value=1e15, allow_nan=False),
    latency=st.floats(min_value=0, max_value=1.0, allow_nan=False),
    efficiency=st.floats(min_value=1e-6, max_value=1.0),
)
def test_any_figures_round_trip_exactly(
    tmp_path_factory: pytest.TempPathFactory,
    capacity: int,
    bandwidth: float,
    latency: float,
    efficiency: float,
) -> None:
    hw = load_hardware("h100-sxm").with_device_capacity(capacity)
    link = dataclasses.replace(hw.links["device-host"], bandwidth=bandwidth, latency_s=latency,
                               concurrent_bandwidth=None)  # fmt: skip
    device = dataclasses.replace(hw.device, compute_efficiency=efficiency)
    hw = dataclasses.replace(hw, device=device, links={**hw.links, "device-host": link})
    path = tmp_path_factory.mktemp("rt") / "hw.toml"
    assert load_hardware(write_hardware_toml(hw, path)) == hw


# -- the machines users have, and the CXL tier ---------------------------------------------------

NEW_MACHINES = ["b200", "gb200", "gh200", "l40s", "a10g", "t4", "v100", "mi250x", "h100-sxm-cxl"]


def test_at_least_sixteen_machines() -> None:
    machines, parts = list_presets(), list_parts()
    assert len(machines) >= 16 and set(NEW_MACHINES) <= set(machines)
    assert not set(machines) & set(parts)  # parts (host-*, nvme-*, cxl-*) are not machines
    assert "cxl-type3" in parts and "is a part" in error_of("cxl-type3")
    assert machines == sorted(machines)  # by name: h100-sxm before h100-sxm-cxl


@pytest.mark.parametrize("name", [*NEW_MACHINES, "cxl-type3"])
def test_new_preset_numbers_have_sources(name: str) -> None:
    """Every numeric assignment of the new files has a comment saying where it comes from."""
    text = preset_texts()[f"{name}.toml"]
    numeric = re.compile(r"""^\s*[\w-]+\s*=\s*(?:[-+]?\d|"[-+]?[\d.]+\s*[A-Za-zµ/]*")""")
    numbers = 0
    for number, line in enumerate(text.splitlines(), 1):
        if numeric.match(line):
            numbers += 1
            comment = line.partition("#")[2].strip()
            where = f"{name}.toml:{number}"
            assert len(comment) >= 8, f"{where} has a number without a source: {line!r}"
            if comment.startswith("assumed"):  # an assumption says why
                assert comment.startswith("assumed: "), f"{where}: 'assumed: <why>': {line!r}"
    assert numbers >= 5 or name == "h100-sxm-cxl"  # that one is h100-sxm plus the cxl part
    if name != "cxl-type3":
        hw = load_hardware(name)
        assert hw.name == name and hw.sources and describe_hardware(hw)


def test_new_preset_figures() -> None:
    """Spot checks against the datasheets cited in the files."""
    b200 = load_hardware("b200")
    assert b200.device.peak_flops["bfloat16"] == pytest.approx(2.25e15)  # 36 PF sparse / 8 / 2
    assert b200.device.memory_bytes == 180 * GiB and b200.device.memory_bandwidth == 8e12
    assert b200.cluster.intra_node.bandwidth == pytest.approx(900e9)  # NVLink 5: 1.8 TB/s total
    gb200 = load_hardware("gb200")
    assert gb200.device.peak_flops["bfloat16"] == pytest.approx(2.5e15)
    assert gb200.host.dram_bandwidth == pytest.approx(512e9) and gb200.cluster.gpus_per_node == 2
    gh200 = load_hardware("gh200")
    assert gh200.device.peak_flops == load_hardware("h100-sxm").device.peak_flops
    assert gh200.device.memory_bytes == 96 * GiB
    mi250x = load_hardware("mi250x")  # one GCD of two
    assert mi250x.device.memory_bytes == 64 * GiB
    assert mi250x.device.peak_flops["bfloat16"] == pytest.approx(383e12 / 2)
    assert load_hardware("l40s").device.peak_flops["float8"] == pytest.approx(733e12)
    assert load_hardware("a10g").cluster.gpus_per_node == 8
    t4, v100 = load_hardware("t4"), load_hardware("v100")
    assert t4.device.peak_flops["float16"] == pytest.approx(65e12)
    assert v100.device.peak_flops["float16"] == pytest.approx(125e12)
    assert t4.link("host", "device").bandwidth < load_hardware("l4").link("host", "device").bandwidth


@pytest.mark.parametrize("name", ["t4", "v100", "mi250x"])
def test_missing_dtypes_are_left_out(name: str) -> None:
    """No bf16 (t4, v100), TF32 or FP8 units: no peak, so pricing one is a HardwareError that
    names the dtype, as for fp8 on an A100."""
    from tierplan.cost_models.compute import peak_key

    d = load_hardware(name).device
    assert "float8" not in d.peak_flops and "tf32" not in d.peak_flops and not d.allow_tf32
    assert peak_key("float32", tensor_core=True, allow_tf32=d.allow_tf32) == "float32"
    missing = "float8" if name == "mi250x" else "bfloat16"
    assert missing not in d.peak_flops
    with pytest.raises(HardwareError, match=f"no peak_flops entry for '{missing}'"):
        d.peak(missing)


def test_nvlink_c2c_host_link_is_much_faster_than_pcie() -> None:
    from tierplan.cost_models.transfer import tier_bandwidth

    h100 = load_hardware("h100-sxm")
    for name in ("gb200", "gh200"):
        hw = load_hardware(name)
        link = hw.link("device", "host")
        assert "NVLink-C2C" in link.description and link.bandwidth == pytest.approx(450e9)
        assert link.bandwidth_both_ways() == link.bandwidth  # duplex, no PCIe-style drop
        assert link.bandwidth >= 8 * h100.link("device", "host").bandwidth
        assert tier_bandwidth(hw, "host", "device") >= 8 * tier_bandwidth(h100, "host", "device")


def test_cxl_tier_sits_between_host_and_nvme() -> None:
    from tierplan.placement.pricing import tier_capacities, transfer_channels

    hw = load_hardware("h100-sxm-cxl")
    assert set(hw.tiers) == {"device", "host", "cxl", "nvme"}
    assert [l.name for l in hw.route("device", "cxl")] == ["device-host", "host-cxl"]
    channels = {(c.src, c.dst): c for c in transfer_channels(hw, ("host", "cxl", "nvme"))}
    for out, back in ((("device", t), (t, "device")) for t in ("host", "cxl", "nvme")):
        # Every tier is reached over the device's PCIe link: one queue each way for all three.
        assert channels[out].queue == "device-host:from-device"
        assert channels[back].queue == "device-host:to-device"
    for pair in ((("device", "host"), ("device", "cxl"), ("device", "nvme")),
                 (("host", "device"), ("cxl", "device"), ("nvme", "device"))):  # fmt: skip
        host, cxl, nvme = (channels[p] for p in pair)
        assert host.bandwidth > cxl.bandwidth > nvme.bandwidth
        assert host.latency_s < cxl.latency_s < nvme.latency_s
    capacities = tier_capacities(hw, ("host", "cxl", "nvme"))
    assert capacities["cxl"] == 512 * GiB
    # The CXL tier is the only tier h100-sxm lacks: no other figure of it changes.
    base = load_hardware("h100-sxm")
    assert hw.device == base.device and hw.host == base.host and hw.cluster == base.cluster
    with pytest.raises(HardwareError, match="no tier 'cxl'"):
        tier_capacities(base, ("host", "cxl"))


def test_user_file_adds_the_cxl_part(tmp_path: Path) -> None:
    path = write(tmp_path, 'extends = "b200"\ninclude = ["cxl-type3"]\n', "b200-cxl.toml")
    hw = load_hardware(path)
    assert hw.name == "b200-cxl" and hw.tiers["cxl"].capacity_bytes == 512 * GiB
    assert [l.name for l in hw.route("cxl", "device")] == ["host-cxl", "device-host"]
    assert hw.device == load_hardware("b200").device
    assert load_hardware(write_hardware_toml(hw, tmp_path / "rt.toml")) == hw


def test_plan_with_a_cxl_tier_validates() -> None:
    import tierplan
    from tierplan.passes.capture import capture
    from tierplan.zoo import load_model

    model, args, kwargs = load_model("gpt2-tiny", training=True)
    graph = capture(model, tuple(args), example_kwargs=kwargs, training=True).graph
    hw = load_hardware("h100-sxm-cxl")
    tiers = ("host", "cxl", "nvme")
    plan = tierplan.plan_graph(graph, hardware=hw, memory_budget=0.5, tiers=tiers, time_limit=5, optimizer="none")
    assert set(plan.capacities) == {"device", *tiers}
    tierplan.validate(plan)
    # With host DRAM taken (a 4 KiB budget), what leaves the device goes to cxl, the next tier.
    squeezed = hw.with_tier_capacity("host", 4096)
    plan = tierplan.plan_graph(graph, hardware=squeezed, memory_budget=0.5, tiers=tiers,
                               time_limit=5, optimizer="none")  # fmt: skip
    replay = tierplan.validate(plan)
    assert replay.peak_bytes["device"] <= plan.budget_bytes
    assert replay.peak_bytes["cxl"] > 0 and replay.peak_bytes.get("nvme", 0) == 0
