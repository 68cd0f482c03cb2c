"""Energy meters: parsers fed with recorded output, register decoding, RAPL from a sysfs-like tree, integration."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgequee.errors import DeviceError
from edgequee.meters import (
    CsvLogMeter,
    Ina219Meter,
    Ina260Meter,
    MeterError,
    ModeledMeter,
    PmicMeter,
    PowerTrace,
    RaplMeter,
    energy_per_inference,
    now,
    open_meter,
)
from edgequee.meters import ina as ina_module
from edgequee.meters.ina import ina219_bus_volts, ina219_shunt_volts, ina260_amps, ina260_volts, swap16
from edgequee.meters.pmic import parse_pmic_adc

DATA = Path(__file__).resolve().parents[1] / "data"

# `vcgencmd pmic_read_adc` on a Raspberry Pi 5 Model B Rev 1.0 under load, captured verbatim by the Zeus project
# (github.com/ml-energy/zeus, tests/device/machine/test_rpi.py @ 09de54d, Apache-2.0).
PMIC_TEXT = (DATA / "pi5_pmic_read_adc.txt").read_text()
PMIC_PAIRS = {  # rail: (volts, amps), read off the capture by hand
    "3V7_WL_SW": (3.69977600, 0.09368929),
    "3V3_SYS": (3.31003300, 0.08783370),
    "1V8_SYS": (1.80512600, 0.18054710),
    "DDR_VDD2": (1.10476100, 0.22543980),
    "DDR_VDDQ": (0.60146460, 0.06666720),
    "1V1_SYS": (1.11025500, 0.17566740),
    "0V8_SW": (0.80146440, 0.37670900),
    "VDD_CORE": (0.86173300, 6.22421000),
    "3V3_DAC": (3.31318300, 0.00006105),
    "3V3_ADC": (3.30677300, 0.00036630),
    "0V8_AON": (0.80029220, 0.00305250),
    "HDMI": (5.08664000, 0.02417580),
}
PMIC_TOTAL_W = sum(v * a for v, a in PMIC_PAIRS.values())  # 7.24 W, 5.36 W of it VDD_CORE


# --- Raspberry Pi 5 PMIC ---------------------------------------------------------------------------------------


def test_pmic_pairs_rails_by_name_and_sums_v_times_i() -> None:
    watts = parse_pmic_adc(PMIC_TEXT)
    assert set(watts) == set(PMIC_PAIRS)  # EXT5V_V and BATT_V have no current: left out
    assert watts["VDD_CORE"] == pytest.approx(0.861733 * 6.22421)
    assert sum(watts.values()) == pytest.approx(PMIC_TOTAL_W)
    assert 7.23 < PMIC_TOTAL_W < 7.25


def test_pmic_on_a_pi4_says_it_needs_a_pi5() -> None:
    with pytest.raises(MeterError, match="Raspberry Pi 5 only"):
        parse_pmic_adc('error=2 error_msg="Command not registered"\n')


def test_pmic_meter_records_and_measures_idle() -> None:
    meter = PmicMeter(interval=0.005, read=lambda: PMIC_TEXT)
    with meter:
        time.sleep(0.03)
    assert meter.trace is not None and meter.trace.kind == "measured" and len(meter.trace.t) >= 2
    np.testing.assert_allclose(meter.trace.watts, PMIC_TOTAL_W)
    idle = meter.measure_idle(0.03)
    assert idle["idle_w"] == pytest.approx(PMIC_TOTAL_W) and idle["source"] == "measured by pi5-pmic(interval=0.005s)"


# --- INA260 / INA219 register decoding (expected values worked out by hand from the datasheets' formats) ----------


def test_smbus_words_are_byte_swapped_register_words() -> None:
    assert swap16(0xA00F) == 0x0FA0 and swap16(swap16(0x1234)) == 0x1234


def test_ina260_registers() -> None:
    assert ina260_volts(0x0FA0) == pytest.approx(5.0)  # 4000 × 1.25 mV
    assert ina260_volts(0x7FFF) == pytest.approx(40.95875)  # full-scale register, 40.96 V − 1 LSB
    assert ina260_amps(0x0320) == pytest.approx(1.0)  # 800 × 1.25 mA
    assert ina260_amps(0xF9C0) == pytest.approx(-2.0)  # two's complement of 1600
    assert ina260_amps(0x8000) == pytest.approx(-40.96)


def test_ina219_registers() -> None:
    # datasheet-style worked example: −320 mV → 32000 = 0111 1101 0000 0000, complement + 1 → 1000 0011 0000 0000
    assert ina219_shunt_volts(0x8300) == pytest.approx(-0.32)
    assert ina219_shunt_volts(0x7D00) == pytest.approx(0.32)
    assert ina219_shunt_volts(0x1388) == pytest.approx(0.05)  # 5000 × 10 µV
    assert ina219_bus_volts(0x1F40 << 3) == pytest.approx(32.0)  # full scale: 8000 (1F40h) × 4 mV
    assert ina219_bus_volts(0x2712) == pytest.approx(5.0)  # 1250 << 3 with CNVR (bit 1) set: flags are not data
    assert ina219_bus_volts(0x2713) == pytest.approx(5.0)  # ... nor is OVF (bit 0)


class FakeSMBus:
    """Stands in for smbus2.SMBus only: registers hold big-endian chip words, the wire gives SMBus (LE) words."""

    def __init__(self, registers: dict[int, int], fail: bool = False) -> None:
        self.registers, self.fail = dict(registers), fail
        self.writes: list[tuple[int, int, int]] = []

    def read_word_data(self, addr: int, reg: int) -> int:
        if self.fail:
            raise OSError(121, "Remote I/O error")
        return ((self.registers[reg] & 0xFF) << 8) | (self.registers[reg] >> 8)

    def write_word_data(self, addr: int, reg: int, word: int) -> None:
        self.writes.append((addr, reg, word))
        self.registers[reg] = ((word & 0xFF) << 8) | (word >> 8)


INA260_REGS = {0xFE: 0x5449, 0xFF: 0x2270, 0x01: 0x0320, 0x02: 0x0FA0}  # TI, INA260 rev 0, 1 A, 5 V


def test_ina260_configures_for_fast_conversions_and_samples_v_i_p() -> None:
    bus = FakeSMBus(INA260_REGS)
    meter = Ina260Meter(bus=1, addr=0x41, i2c=bus)
    # AVG 1, VBUSCT 140 µs, ISHCT 588 µs, continuous, reserved bits 14..12 at their reset value; sent LSB first
    assert bus.writes == [(0x41, 0x00, 0x1F60)] and bus.registers[0x00] == 0x601F
    meter.start()
    t0 = now()
    time.sleep(0.03)
    t1 = now()
    trace = meter.stop()
    np.testing.assert_allclose(trace.volts, 5.0)
    np.testing.assert_allclose(trace.amps, 1.0)
    e = energy_per_inference(trace, t0, t1, 10, idle_w=2.0)
    assert e["energy_j"] == pytest.approx(5.0 * (t1 - t0))
    assert e["net_j_per_inference"] == pytest.approx(3.0 * (t1 - t0) / 10)
    assert e["meter"] == "ina260(bus=1,addr=0x41)" and e["kind"] == "measured" and e["samples"] >= 2


def test_ina260_refuses_another_chip_and_a_silent_bus() -> None:
    with pytest.raises(MeterError, match="not an INA260"):
        Ina260Meter(i2c=FakeSMBus(INA260_REGS | {0xFF: 0x2260}))  # an INA226's die id
    with pytest.raises(MeterError, match=r"no ina260 answers at 0x40 on I2C bus 1 .*i2cdetect -y 1"):
        Ina260Meter(i2c=FakeSMBus(INA260_REGS, fail=True))


def test_ina219_current_from_shunt_voltage_and_resistance() -> None:
    bus = FakeSMBus({0x01: 0x1388, 0x02: 0x2712})  # 50 mV over the shunt, 5 V bus
    meter = Ina219Meter(shunt=0.1, i2c=bus)
    assert bus.registers[0x00] == 0x399F  # 32 V, ÷8, 12-bit shunt and bus, continuous
    with meter:
        time.sleep(0.02)
    assert meter.trace is not None
    np.testing.assert_allclose(meter.trace.amps, 0.5)
    np.testing.assert_allclose(meter.trace.watts, 2.5)
    assert meter.name == "ina219(bus=1,addr=0x40,shunt=0.1)"


def test_ina219_shunt_at_full_scale_is_an_error() -> None:
    bus = FakeSMBus({0x01: 0x1388, 0x02: 0x2712})
    meter = Ina219Meter(shunt=0.1, i2c=bus)
    meter.start()
    bus.registers[0x01] = 0x7D00  # +320 mV: the register saturates, the current is unknown
    time.sleep(0.01)
    with pytest.raises(MeterError, match="failed while sampling: .*full scale.*smaller shunt"):
        meter.stop()  # the sampling thread's error, raised in the caller's thread
    with pytest.raises(MeterError, match="full scale"):
        meter.start()  # the first reading is taken at once


def test_ina_without_smbus2_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "smbus2", None)  # import smbus2 → ImportError, installed or not
    with pytest.raises(MeterError, match=r"pip install smbus2"):
        open_meter("ina260")


# --- RAPL from a directory laid out like /sys/class/powercap -------------------------------------------------------


def _zone(root: Path, zone: str, name: str, energy_uj: int, max_uj: int = 262143328850) -> Path:
    d = root / zone
    d.mkdir(parents=True)
    (d / "name").write_text(name + "\n")
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


@pytest.fixture
def powercap() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:  # not under tmp_path: that one is closed to other users
        root = Path(d)
        root.chmod(0o755)  # so the unprivileged user of the permission test can look inside
        _zone(root, "intel-rapl:0", "package-0", 1_000_000_000 - 1_000_000, max_uj=1_000_000_000)
        _zone(root, "intel-rapl:0:0", "core", 500_000)
        _zone(root, "intel-rapl:0:1", "dram", 7_000_000)
        _zone(root, "intel-rapl:1", "package-1", 10_000_000)
        _zone(root, "intel-rapl:2", "psys", 0)  # platform domain: overlaps the packages, never summed
        _zone(root, "intel-rapl-mmio:0", "package-0", 0)  # the same package through MMIO: not read
        yield root


def _run_rapl(meter: RaplMeter, root: Path, after: dict[str, int]) -> PowerTrace:
    meter.start()  # interval is long: the only readings are at start and stop
    for zone, uj in after.items():
        (root / zone / "energy_uj").write_text(f"{uj}\n")
    return meter.stop()


def test_rapl_sums_packages_across_a_wraparound(powercap: Path) -> None:
    meter = RaplMeter(powercap, interval=1000)
    assert meter.name == "rapl(package-0+package-1)"
    # package-0 wraps at 1000 J: 999 J → 2 J is 3 J; package-1 10 J → 15 J is 5 J; core (inside package-0) ignored
    trace = _run_rapl(meter, powercap, {"intel-rapl:0": 2_000_000, "intel-rapl:1": 15_000_000, "intel-rapl:0:0": 9})
    assert trace.joules is not None and trace.joules[-1] == pytest.approx(8.0)
    e = energy_per_inference(trace, trace.t[0], trace.t[-1], 4, idle_w=0.0)
    assert e["gross_j_per_inference"] == pytest.approx(2.0) and e["source"] == "measured by rapl(package-0+package-1)"


def test_rapl_includes_dram_on_request(powercap: Path) -> None:
    meter = open_meter(f"rapl:dram=1,interval=1000,root={powercap}")
    assert isinstance(meter, RaplMeter) and meter.name == "rapl(package-0+package-1+dram)"
    trace = _run_rapl(meter, powercap, {"intel-rapl:0:1": 8_500_000})
    assert trace.joules is not None and trace.joules[-1] == pytest.approx(1.5)


def test_rapl_absent_says_so(tmp_path: Path) -> None:
    with pytest.raises(MeterError, match="no RAPL package domain"):
        RaplMeter(tmp_path / "powercap")


@contextlib.contextmanager
def _unprivileged() -> Iterator[None]:
    """Act as user nobody for file access: root reads every file, so the permission case needs another user."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_rapl_unreadable_counter_names_the_fix(powercap: Path) -> None:
    (powercap / "intel-rapl:0" / "energy_uj").chmod(0o000)  # as on Linux >= 5.10 for anyone but root
    with _unprivileged(), pytest.raises(MeterError, match=r"not readable \(root-only since Linux 5.10\).*chmod"):
        RaplMeter(powercap)


# --- energy integration on synthetic traces with known answers ------------------------------------------------------


def _watts(t: list[float] | np.ndarray, p: list[float] | np.ndarray) -> PowerTrace:
    return PowerTrace("synthetic", "measured", np.asarray(t, float), watts=np.asarray(p, float))


def test_constant_power() -> None:
    e = energy_per_inference(_watts([0, 1, 2, 3, 4], [5.0] * 5), 0.5, 3.5, 6, idle_w=2.0)
    assert e["energy_j"] == pytest.approx(15.0) and e["mean_power_w"] == pytest.approx(5.0)
    assert e["gross_j_per_inference"] == pytest.approx(2.5) and e["net_j_per_inference"] == pytest.approx(1.5)
    assert e["samples"] == 3 and e["sample_rate_hz"] == pytest.approx(1.0) and e["window_s"] == pytest.approx(3.0)


def test_ramp_with_window_edges_between_samples() -> None:
    t = np.linspace(0.0, 10.0, 11)  # P = 1 + 2t: the edges at 2.25 and 7.6 fall between samples
    e = energy_per_inference(_watts(t, 1 + 2 * t), 2.25, 7.6, 1)
    assert e["energy_j"] == pytest.approx((7.6 - 2.25) + (7.6**2 - 2.25**2))  # ∫(1 + 2t) dt


def test_step_inside_the_window() -> None:
    trace = _watts([0.0, 4.0, 4.0 + 1e-9, 10.0], [2.0, 2.0, 6.0, 6.0])  # 2 W until t = 4, then 6 W
    e = energy_per_inference(trace, 1.0, 9.0, 4, idle_w=2.0)
    assert e["energy_j"] == pytest.approx(2.0 * 3 + 6.0 * 5, abs=1e-6)
    assert e["net_j_per_inference"] == pytest.approx(4.0 * 5 / 4, abs=1e-6)


def test_counter_trace_is_interpolated_at_the_edges() -> None:
    trace = PowerTrace("counter", "measured", np.array([0.0, 2.0, 4.0]), joules=np.array([0.0, 6.0, 12.0]))
    assert energy_per_inference(trace, 1.0, 3.0, 2)["energy_j"] == pytest.approx(6.0)


def test_window_outside_the_trace_is_an_error() -> None:
    with pytest.raises(MeterError, match=r"synthetic recorded \[0.000, 4.000\] but the run window is"):
        energy_per_inference(_watts([0, 4], [1, 1]), 3.0, 5.0, 1)
    with pytest.raises(ValueError):
        energy_per_inference(_watts([0, 4], [1, 1]), 2.0, 1.0, 1)


def test_a_trace_holds_watts_or_joules() -> None:
    with pytest.raises(Exception, match="watts or joules"):
        PowerTrace("x", "measured", np.zeros(2))


# --- CSV logs from external meters ----------------------------------------------------------------------------------


def test_csv_unix_seconds_and_watts(tmp_path: Path) -> None:
    log = tmp_path / "um25c.csv"
    log.write_text("timestamp,watts\n1700000002,4.0\n1700000000,4.0\n1700000004,8.0\n")  # out of order on purpose
    meter = open_meter(f"csv:{log}")
    assert isinstance(meter, CsvLogMeter)
    with meter:
        pass
    assert meter.trace is not None
    e = energy_per_inference(meter.trace, 1700000001.0, 1700000003.0, 2)
    assert e["energy_j"] == pytest.approx(4.0 + 5.0)  # 4 W for 1 s, then 4 → 6 W over the next second
    assert e["meter"] == "csv(um25c.csv)"


def test_csv_iso_timestamps_with_volts_and_amps(tmp_path: Path) -> None:
    log = tmp_path / "meter.csv"
    log.write_text(
        "Time;Voltage (V);Current (A)\n"
        "2024-05-01T12:00:00Z;5.0;1.0\n2024-05-01T14:00:10+02:00;5.0;1.0\n2024-05-01T12:00:20+00:00;5.0;2.0\n"
    )
    trace = CsvLogMeter(log).stop()
    start = 1714564800.0  # 2024-05-01T12:00:00Z
    np.testing.assert_allclose(trace.t - start, [0, 10, 20])
    assert energy_per_inference(trace, start, start + 20, 1)["energy_j"] == pytest.approx(50 + 75)


def test_csv_window_not_covered_and_bad_logs(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text("timestamp,watts\n100,1\n200,1\n")
    with pytest.raises(MeterError, match=r"csv\(log.csv\) recorded \[100.000, 200.000\].*keep the meter recording"):
        energy_per_inference(CsvLogMeter(log).stop(), 150.0, 250.0, 1)
    log.write_text("when,what\n100,1\n")
    with pytest.raises(MeterError, match="needs a timestamp column and watts"):
        CsvLogMeter(log).stop()
    log.write_text("timestamp,watts\nyesterday,1\n")
    with pytest.raises(MeterError, match="unix seconds or ISO 8601"):
        CsvLogMeter(log).stop()
    with pytest.raises(MeterError, match="does not exist"):
        open_meter(f"csv:{tmp_path / 'missing.csv'}")


# --- the modeled meter and open_meter -------------------------------------------------------------------------------


def test_modeled_meter_is_an_estimate_from_the_descriptor() -> None:
    meter = open_meter("modeled", descriptor_power=(2.7, 6.4, "device_profiles/rpi4.json"))
    assert isinstance(meter, ModeledMeter)
    idle = meter.measure_idle()
    assert idle["idle_w"] == 2.7 and idle["kind"] == "estimated"
    meter.start()
    t0 = now()
    t1 = t0 + 1e-3
    while now() < t1:
        pass
    e = energy_per_inference(meter.stop(), t0, t1, 2, idle["idle_w"])
    assert e["kind"] == "estimated" and e["source"].startswith(
        "estimated by modeled(idle=2.7W,active=6.4W from device_"
    )
    assert e["net_j_per_inference"] == pytest.approx((6.4 - 2.7) * (t1 - t0) / 2)
    assert ModeledMeter(1.0, 2.0).name == "modeled(idle=1W,active=2W from the --meter spec)"


def test_open_meter_spellings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert open_meter("none") is None
    modeled = open_meter("modeled:idle=2.7,active=6.4")
    assert isinstance(modeled, ModeledMeter) and (modeled.idle_w, modeled.active_w) == (2.7, 6.4)
    monkeypatch.setattr(ina_module, "_open_smbus", lambda bus: FakeSMBus({}))  # the bus only; parsing is real
    ina = open_meter("ina219:bus=3,addr=0x41,shunt=0.05")
    assert isinstance(ina, Ina219Meter) and ina.name == "ina219(bus=3,addr=0x41,shunt=0.05)"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("watts-up", "unknown meter 'watts-up': choose one of none, ina219"),
        ("ina219:gain=8", r"ina219 takes options bus=…, addr=…, shunt=…, not 'gain=8'"),
        ("ina260:addr=forty", r"ina260: 'addr=forty' is not a valid value; e.g. ina260:bus=1,addr=0x40"),
        ("rapl:dram=maybe", "not a valid value"),
        ("pi5-pmic:interval", "pi5-pmic takes options interval=…"),
        ("modeled:idle=3", "modeled needs both figures"),
        ("modeled:idle=3,active=2", "need 0 <= idle <= active"),
        ("csv:", "csv needs the log file"),
    ],
)
def test_open_meter_errors(spec: str, message: str) -> None:
    with pytest.raises(MeterError, match=message) as info:
        open_meter(spec)
    assert isinstance(info.value, DeviceError) and "\n" not in str(info.value)
