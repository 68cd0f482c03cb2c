"""Device descriptors, the cost model (against a real measured profile), descriptor calibration, system info."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgequee.bundle import load_bundle
from edgequee.cli import main
from edgequee.cost import CostModel, load_profile
from edgequee.devices import DEVICE_FORMAT, calibrate_descriptor, list_devices, load_device, read_descriptor
from edgequee.errors import DeviceError
from edgequee.meters import open_meter
from edgequee.profiler import profile_bundle, throttle_warning
from edgequee.sysinfo import cpu_temperature_c, parse_throttled

SHIPPED = ("rpi4", "rpi5", "coral-usb-rpi4", "coral-usb-rpi5", "x86-host-avx2", "x86-host-vnni")


# ------------------------------------------------------------------------------------------ descriptors


def test_shipped_descriptors_load_and_name_every_source() -> None:
    found = list_devices()
    assert set(SHIPPED) <= set(found)
    for name in SHIPPED:
        d = found[name]
        assert d.path is not None and d.path.stem == name
        for key, fig in d.figures().items():
            assert fig.status in ("measured", "estimated") and len(fig.source) > 10, (name, key)
        assert d.active_w.value > d.idle_w.value > 0
    assert found["rpi4"].throughput_gmacs["int8"].value > found["rpi4"].throughput_gmacs["fp32"].value
    assert found["coral-usb-rpi4"].precisions == ("int8",) and found["coral-usb-rpi4"].host == "rpi4"
    assert found["coral-usb-rpi4"].io_mb_per_s is not None
    # int8 pays with VNNI, not with AVX2 alone
    vnni, avx2 = found["x86-host-vnni"].throughput_gmacs, found["x86-host-avx2"].throughput_gmacs
    assert vnni["int8"].value > 3 * vnni["fp32"].value and avx2["int8"].value <= avx2["fp32"].value
    # round trip
    d = found["rpi5"]
    assert type(d).from_json(json.loads(json.dumps(d.to_json()))).to_json() == d.to_json()


def test_x86_host_is_this_machines_isa_class(monkeypatch: pytest.MonkeyPatch) -> None:
    import edgequee.sysinfo as sysinfo

    assert sysinfo.int8_class(["avx2", "avx512_vnni"], "x86_64") == "x86-vnni"
    assert sysinfo.int8_class(["avx2", "avx_vnni"], "x86_64") == "x86-vnni"
    assert sysinfo.int8_class(["avx2"], "x86_64") == "x86-avx2"
    assert sysinfo.int8_class(["asimddp"], "aarch64") == "arm-dotprod"
    assert sysinfo.int8_class([], "aarch64") == "arm"
    for cls, name in (("x86-vnni", "x86-host-vnni"), ("x86-avx2", "x86-host-avx2"), ("arm", "x86-host-avx2")):
        monkeypatch.setattr(sysinfo, "int8_class", lambda *a, c=cls: c)
        assert load_device("x86-host").name == name
    info = sysinfo.machine_info()
    assert {"processor", "cpu_flags", "int8_class", "runtime"} <= set(info)


def test_cpu_flags_reads_x86_and_arm_cpuinfo(tmp_path: Path) -> None:
    from edgequee.sysinfo import cpu_flags

    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\n")
    assert cpu_flags(str(x86)) == ["avx2", "avx512f", "avx512_vnni"]
    assert cpu_flags(str(arm)) == ["asimddp", "i8mm"]
    assert cpu_flags(str(tmp_path / "missing")) == []


def _write(tmp_path: Path, data: Any, name: str = "bad") -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("power_w"), "missing power_w"),
        (lambda d: d.update(format="edgequee-device/0"), "format"),
        (lambda d: d["throughput_gmacs"].update(int4=d["throughput_gmacs"]["int8"]), "unknown precision"),
        (lambda d: d["throughput_gmacs"]["fp32"].update(status="guessed"), "'measured' or 'estimated'"),
        (lambda d: d["throughput_gmacs"]["fp32"].update(source=""), "say where the figure comes from"),
        (lambda d: d["invoke_overhead_ms"].update(value=-1), "finite number >= 0"),
        (lambda d: d["throughput_gmacs"]["fp32"].update(value=0), "must be > 0"),
        (lambda d: d.update(threads=0), "threads"),
        (lambda d: d.update(colour="red"), "unknown field"),
    ],
)
def test_bad_descriptor_gives_one_line_error(tmp_path: Path, mutate: Any, message: str) -> None:
    data = load_device("rpi4").to_json()
    mutate(data)
    with pytest.raises(DeviceError, match=message) as e:
        read_descriptor(_write(tmp_path, data))
    assert "\n" not in str(e.value) and "bad.json" in str(e.value)


def test_descriptor_lookup_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DeviceError, match="not valid JSON"):
        read_descriptor(_write(tmp_path, "{nope"))
    with pytest.raises(DeviceError, match="no device descriptor 'pi9'; known: .*rpi4"):
        load_device("pi9")
    # a user directory shadows the shipped descriptors; a name/file mismatch is refused
    mine = load_device("rpi4").to_json()
    mine["title"] = "my overclocked Pi 4"
    user = tmp_path / "devices"
    user.mkdir()
    _write(user, mine, "rpi4")
    monkeypatch.setenv("EDGEQUEE_DEVICE_PROFILES", str(user))
    assert load_device("rpi4").title == "my overclocked Pi 4"
    _write(user, mine, "rpi4-copy")
    with pytest.raises(DeviceError, match="does not match the file name"):
        list_devices()


def test_devices_cli_lists_and_shows() -> None:
    r = CliRunner().invoke(main, ["devices"])
    assert r.exit_code == 0, r.output
    for name in SHIPPED:
        assert name in r.output
    r = CliRunner().invoke(main, ["devices", "show", "coral-usb-rpi5", "--json", "-"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["format"] == DEVICE_FORMAT and d["host"] == "rpi5"
    r = CliRunner().invoke(main, ["devices", "show", "nope"])
    assert r.exit_code == 1 and "no device descriptor 'nope'" in r.output


# ------------------------------------------------------------------------------------ calibration (math)


def _synthetic_profile(macs: list[int], ms_of: Any, precisions: tuple[str, ...] = ("fp32",)) -> dict[str, Any]:
    return {
        "device": "synthetic", "threads": 1, "created": "now",
        "blocks": [{"block": i, "precision": p, "latency_ms": {"p50_ms": ms_of(m, p)}}
                   for i, m in enumerate(macs) for p in precisions],
        "runtime_overhead_ms": {p: {"value": 0.02} for p in precisions},
        "transitions": [{"boundary": 1, "from": "fp32", "to": "int8", "elements": 1000,
                         "latency_ms": {"p50_ms": 0.003}}],
    }


class _Manifest:
    """Just what calibrate_descriptor reads of a manifest: blocks with MACs, and a model name."""

    def __init__(self, macs: list[int]):
        self.model = "synthetic"
        self.blocks = [type("B", (), {"macs": m})() for m in macs]


def test_calibrate_recovers_a_known_line() -> None:
    macs = [1_000_000, 2_000_000, 4_000_000, 8_000_000, 16_000_000]
    # 25 GMAC/s fp32, 50 GMAC/s int8, 0.01 ms per invoke
    prof = _synthetic_profile(macs, lambda m, p: 0.01 + m / ((25 if p == "fp32" else 50) * 1e6), ("fp32", "int8"))
    d = calibrate_descriptor(load_device("x86-host"), [(_Manifest(macs), prof)], name="fitted")  # type: ignore[list-item]
    assert d.name == "fitted" and d.path is None
    assert d.throughput_gmacs["fp32"].value == pytest.approx(25, rel=1e-3)
    assert d.throughput_gmacs["int8"].value == pytest.approx(50, rel=1e-3)
    assert d.throughput_gmacs["fp32"].status == "measured" and "fit" in d.throughput_gmacs["fp32"].source
    assert d.throughput_gmacs["fp16"].status == "estimated"  # not measured: kept from the base
    assert d.invoke_overhead_ms.value == pytest.approx(0.01 + 0.02, rel=1e-3)  # intercept + runtime gap
    assert d.transition_ns_per_element.value == pytest.approx(3.0)
    assert d.transition_ns_per_element.status == "measured"


def test_calibrate_equal_blocks_uses_the_ratio() -> None:
    macs = [10_000_000, 10_500_000, 9_800_000]  # too narrow a spread to fit a line
    prof = _synthetic_profile(macs, lambda m, p: m / 20e6)
    d = calibrate_descriptor(load_device("x86-host"), [(_Manifest(macs), prof)])  # type: ignore[list-item]
    assert d.throughput_gmacs["fp32"].value == pytest.approx(20, rel=1e-3)
    assert d.invoke_overhead_ms.value == pytest.approx(0.02)  # the gap alone
    with pytest.raises(DeviceError, match="no measured blocks"):
        calibrate_descriptor(load_device("x86-host"), [(_Manifest(macs), {"blocks": []})])  # type: ignore[list-item]


# ------------------------------------------------------------------------- cost model on a real profile


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory, converted: Any) -> Any:
    """A copy of the real converted bundle with a real host profile, metered by the modeled meter."""
    import shutil

    path = Path(shutil.copytree(converted.path, tmp_path_factory.mktemp("profiled") / "bundle"))
    bundle = load_bundle(path)
    meter = open_meter("modeled:idle=2,active=6")
    profile_bundle(bundle, "host", min_time_s=0.03, passes=2, meter=meter, energy_s=0.05, idle_s=0.01)
    return bundle


@pytest.mark.slow
def test_profile_measures_gaps_transitions_and_energy(profiled: Any) -> None:
    prof = load_profile(profiled, "host")
    m = profiled.manifest
    assert set(prof["runtime_overhead_ms"]) == set(m.precisions)
    expected = {(i, p, q) for i in range(1, m.num_exits) for p in m.precisions for q in m.precisions
                if (p == "int8") != (q == "int8")}
    assert {(t["boundary"], t["from"], t["to"]) for t in prof["transitions"]} == expected
    for t in prof["transitions"]:
        assert t["elements"] == math.prod(m.blocks[t["boundary"]].input_shape) and t["latency_ms"]["p50_ms"] > 0
    assert prof["energy"]["kind"] == "estimated" and prof["energy"]["idle"]["idle_w"] == 2
    for b in prof["blocks"]:
        e = b["energy"]
        assert e["meter"].startswith("modeled") and e["kind"] == "estimated"
        # the modeled meter draws 6 W while running: gross = 6 W x window / n, net = 4 W x window / n
        assert e["gross_mj_per_inference"] == pytest.approx(6e3 * e["window_s"] / e["n"], rel=1e-6)
        assert e["net_mj_per_inference"] == pytest.approx(4e3 * e["window_s"] / e["n"], rel=1e-6)
    assert {"before", "after"} == set(prof["health"]) and prof["peak_rss_mb"] > 0


@pytest.mark.slow
def test_cost_model_uses_measurements_where_it_has_them(profiled: Any) -> None:
    prof = load_profile(profiled, "host")
    m = profiled.manifest
    cm = CostModel.for_bundle(profiled, "host", descriptor="x86-host")
    once = prof["inference_overhead_ms"]
    assert set(once) == set(m.whole_model) and all(v["value"] >= 0 for v in once.values())
    for b in prof["blocks"]:
        c = cm.block(b["block"], b["precision"])
        gap = prof["runtime_overhead_ms"][b["precision"]]
        # the per-inference work (preprocessing, softmax) is priced once: in block 0, and in the whole model
        first = gap["per_inference_ms"] if b["block"] == 0 else 0.0
        assert c.latency_ms == pytest.approx(b["latency_ms"]["p50_ms"] + gap["value"] + first)
        assert c.latency_source.startswith("measured: profiles/host.json")
        scale = c.latency_ms / b["latency_ms"]["p50_ms"]
        assert c.energy_mj == pytest.approx(b["energy"]["net_mj_per_inference"] * scale)
        assert c.energy_source.startswith("estimated: estimated by modeled")
    t = next(t for t in prof["transitions"] if t["from"] == "fp32")
    c = cm.transition(t["boundary"], "fp32", "int8")
    assert c.latency_ms == t["latency_ms"]["p50_ms"] and c.latency_source.startswith("measured")
    assert cm.transition(1, "fp32", "fp16").latency_ms == 0  # float -> float: same input, nothing to convert
    assert cm.transition(0, "fp32", "int8").latency_ms == 0  # no boundary before the first block
    whole = cm.whole("fp32")
    assert whole.latency_ms == pytest.approx(prof["whole_model"]["fp32"]["latency_ms"]["p50_ms"] + once["fp32"]["value"])
    assert prof["runtime_overhead_ms"]["fp32"]["per_inference_ms"] == once["fp32"]["value"]
    path = cm.path(["fp32"] + ["int8"] * (m.num_exits - 1))
    expected = sum(cm.block(i, "int8" if i else "fp32").latency_ms for i in range(m.num_exits))
    assert path.latency_ms == pytest.approx(expected + cm.transition(1, "fp32", "int8").latency_ms)


@pytest.mark.slow
def test_cost_model_estimates_from_descriptors(profiled: Any) -> None:
    m = profiled.manifest
    rpi4 = load_device("rpi4")
    cm = CostModel.for_bundle(profiled, "rpi4")  # no rpi4 profile: every figure is estimated
    b = m.blocks[1]
    c = cm.block(1, "int8")
    assert c.latency_ms == pytest.approx(rpi4.invoke_overhead_ms.value + b.macs / (rpi4.throughput_gmacs["int8"].value * 1e6))
    assert c.energy_mj == pytest.approx(c.latency_ms * (rpi4.active_w.value - rpi4.idle_w.value))
    assert c.latency_source.startswith("estimated: rpi4") and c.energy_source.startswith("estimated")
    elements = math.prod(m.blocks[1].input_shape)
    assert cm.transition(1, "int8", "fp32").latency_ms == pytest.approx(
        elements * rpi4.transition_ns_per_element.value * 1e-6)
    # Coral: int8 on the TPU (one USB round trip per block + activations over the link), fp32 on the Pi 4
    coral = CostModel.for_bundle(profiled, "coral-usb-rpi4")
    tpu = load_device("coral-usb-rpi4")
    assert coral.block(1, "fp32").latency_ms == pytest.approx(cm.block(1, "fp32").latency_ms)
    nbytes = math.prod(b.input_shape) + math.prod(b.hidden_shape) + b.num_features
    assert coral.block(1, "int8").latency_ms == pytest.approx(
        tpu.invoke_overhead_ms.value + b.macs / (tpu.throughput_gmacs["int8"].value * 1e6)
        + nbytes / (tpu.io_mb_per_s.value * 1e3))
    # one whole-model invoke is far cheaper on the TPU than the same MACs split into blocks
    assert coral.whole("int8").latency_ms < coral.path(["int8"] * m.num_exits).latency_ms
    # the same bundle prices differently per device: cheapest whole-network precision
    cheapest = {d: min(("fp32", "int8"), key=lambda p, c=CostModel.for_bundle(profiled, d): c.path([p] * m.num_exits).latency_ms)
                for d in ("rpi4", "rpi5")}
    assert cheapest == {"rpi4": "int8", "rpi5": "int8"}


@pytest.mark.slow
def test_cost_model_objectives_and_errors(profiled: Any) -> None:
    m = profiled.manifest
    lat = CostModel.for_bundle(profiled, "rpi5", objective="latency")
    en = CostModel.for_bundle(profiled, "rpi5", objective="energy")
    mix = CostModel.for_bundle(profiled, "rpi5", objective="weighted", energy_weight=0.5)
    c = lat.block(0, "fp32")
    assert lat.value(c) == c.latency_ms and en.value(c) == c.energy_mj
    best = min((lat.path([p] * m.num_exits) for p in lat.precisions()), key=lambda x: x.latency_ms)
    assert mix.value(best) == pytest.approx(1.0)  # each half normalised by the cheapest whole network
    table = lat.step_table()
    assert len(table["block"]) == m.num_exits and set(table["block"][0]) == set(m.precisions)
    assert table["transition"][1]["fp32>int8"] > 0 and "fp32>fp16" in table["transition"][1]
    with pytest.raises(DeviceError, match="objective 'speed'"):
        CostModel.for_bundle(profiled, "rpi5", objective="speed")
    with pytest.raises(DeviceError, match="no device descriptor 'nowhere'"):
        CostModel.for_bundle(profiled, "nowhere")
    profile_only = CostModel.for_bundle(profiled, "host")  # no descriptor named host: latency only
    assert profile_only.block(0, "fp32").energy_mj is not None  # the profile was metered (modeled)
    unmetered = copy.deepcopy(load_profile(profiled, "host"))
    for b in unmetered["blocks"]:
        b.pop("energy")
    no_energy = CostModel(m, None, unmetered, objective="energy")
    with pytest.raises(DeviceError, match="no energy figures"):
        no_energy.value(no_energy.block(0, "fp32"))


@pytest.mark.slow
def test_cost_and_profile_cli(profiled: Any, tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["cost", str(profiled.path), "--device", "host,rpi4,coral-usb-rpi4",
                                  "--json", str(tmp_path / "cost.json")])
    assert r.exit_code == 0, r.output
    assert "cost model for coral-usb-rpi4" in r.output and "sources:" in r.output
    report = json.loads((tmp_path / "cost.json").read_text())
    assert set(report) == {"host", "rpi4", "coral-usb-rpi4"}
    assert report["rpi4"]["blocks"][0]["latency_source"].startswith("estimated")
    out = tmp_path / "host-fitted.json"
    r = CliRunner().invoke(main, ["devices", "calibrate", "x86-host", "--bundle", str(profiled.path),
                                  "--profile", "host", "--out", str(out)])
    assert r.exit_code == 0, r.output
    fitted = read_descriptor(out)
    assert fitted.name == "host" and fitted.throughput_gmacs["fp32"].status == "measured"
    r = CliRunner().invoke(main, ["profile", str(profiled.path), "--device", "cli", "--min-time", "0.02",
                                  "--passes", "1", "--no-transitions", "--meter", "bogus"])
    assert r.exit_code == 1 and "unknown meter 'bogus'" in r.output


# --------------------------------------------------------------------------------------------- sysinfo


def test_parse_throttled_recorded_outputs() -> None:
    # `vcgencmd get_throttled` output formats from the Raspberry Pi documentation.
    ok = parse_throttled("throttled=0x0\n")
    assert ok == {"raw": "0x0", "now": [], "since_boot": [], "throttled_now": False}
    bad = parse_throttled("throttled=0x50005")
    assert bad["now"] == ["under-voltage detected", "currently throttled"]
    assert bad["since_boot"] == ["under-voltage has occurred", "throttling has occurred"]
    assert bad["throttled_now"]
    past = parse_throttled("throttled=0x80000")
    assert past["now"] == [] and past["since_boot"] == ["soft temperature limit has occurred"]


def test_throttle_warning() -> None:
    quiet = {"health": {"before": {"throttled": parse_throttled("throttled=0x0"), "cpu_temperature_c": 55.0}}}
    assert throttle_warning(quiet) is None
    hot = {"health": {"after": {"throttled": parse_throttled("throttled=0x20002"), "cpu_temperature_c": 84.0}}}
    msg = throttle_warning(hot)
    assert msg is not None and "arm frequency capped" in msg and "84 °C" in msg and "profile again" in msg


def test_cpu_temperature_from_sysfs_layout(tmp_path: Path) -> None:
    for n, (kind, milli) in enumerate([("acpitz", "27800"), ("cpu-thermal", "61234")]):
        z = tmp_path / f"thermal_zone{n}"
        z.mkdir()
        (z / "type").write_text(kind + "\n")
        (z / "temp").write_text(milli + "\n")
    assert cpu_temperature_c(tmp_path) == pytest.approx(61.234)
    assert cpu_temperature_c(tmp_path / "missing") is None
