"""TI INA260 and INA219 current/power monitors over I2C (smbus2), sampled by a thread at the chip's conversion rate.

Register maps and scales are from the TI datasheets: INA260 SBOS656C §8.6 (registers 00h config, 01h current,
02h bus voltage, 03h power, FEh manufacturer id = 5449h, FFh die id; current 1.25 mA/LSB two's complement, bus
voltage 1.25 mV/LSB, power 10 mW/LSB) and INA219 SBOS448G §8.6 (00h config, 01h shunt voltage 10 µV/LSB two's
complement at every PGA setting, 02h bus voltage BD12..BD0 in bits 15..3 at 4 mV/LSB with CNVR in bit 1 and
OVF in bit 0, 05h calibration). The chips send a register's most significant byte first (SBOS448G §8.5.6), while
SMBus read/write_word_data is little-endian, so every word is byte-swapped on the way in and out.
"""

from __future__ import annotations

import numpy as np

from .base import MeterError, PowerTrace, SampledMeter

__all__ = ["Ina219Meter", "Ina260Meter"]

# INA260 configuration (SBOS656C §8.6.1): bits 14..12 keep their reset value 110b; AVG (11..9) = 000b, one sample;
# VBUSCT (8..6) = 000b, 140 µs (the bus voltage barely moves); ISHCT (5..3) = 011b, 588 µs; MODE (2..0) = 111b,
# shunt and bus continuous. A fresh (I, V) pair every 0.728 ms (~1.4 kHz), and each current reading covers 81 % of
# the time, so short bursts between two reads are not missed as with the 140 µs setting. The power register
# (03h, 10 mW/LSB) is coarser than V·I from the current and bus voltage registers, so P is computed here.
INA260_CONFIG = 0x6000 | 0b000 << 9 | 0b000 << 6 | 0b011 << 3 | 0b111
INA260_PERIOD_S = 140e-6 + 588e-6
INA260_MANUFACTURER_ID = 0x5449  # "TI"
INA260_DIE_ID = 0x227  # bits 15..4 of register FFh; bits 3..0 are the die revision

# INA219 configuration (SBOS448G §8.6.2.1): BRNG (13) = 1, 32 V range; PG (12..11) = 11b, ÷8 = ±320 mV shunt
# range; BADC (10..7) and SADC (6..3) = 0011b, 12-bit single conversions of 532 µs (9-bit conversions are faster
# but 8× coarser); MODE = 111b, shunt and bus continuous. This equals the power-on value 399Fh; it is written
# anyway in case something else changed it. A fresh pair every 1.064 ms (~940 Hz).
INA219_CONFIG = 1 << 13 | 0b11 << 11 | 0b0011 << 7 | 0b0011 << 3 | 0b111
INA219_PERIOD_S = 2 * 532e-6
INA219_SHUNT_FULL_SCALE_V = 0.32  # at PG = ÷8


def swap16(word: int) -> int:
    """An SMBus word (little-endian) ↔ the chip's big-endian register word."""
    return ((word & 0xFF) << 8) | (word >> 8)


def _signed16(value: int) -> int:
    return value - 0x10000 if value & 0x8000 else value


def ina260_amps(reg: int) -> float:
    """INA260 current register (01h): two's complement, 1.25 mA/LSB."""
    return _signed16(reg) * 1.25e-3


def ina260_volts(reg: int) -> float:
    """INA260 bus voltage register (02h): unsigned, 1.25 mV/LSB."""
    return reg * 1.25e-3


def ina219_shunt_volts(reg: int) -> float:
    """INA219 shunt voltage register (01h): two's complement (sign-extended), 10 µV/LSB at every PGA setting."""
    return _signed16(reg) * 10e-6


def ina219_bus_volts(reg: int) -> float:
    """INA219 bus voltage register (02h): BD12..BD0 in bits 15..3, 4 mV/LSB (bit 1 CNVR, bit 0 OVF are flags)."""
    return (reg >> 3) * 4e-3


def _open_smbus(bus: int) -> object:
    try:
        import smbus2
    except ImportError:
        raise MeterError(
            "smbus2 is not installed (needed for INA219/INA260): pip install smbus2 (or 'edgequee[meters]')"
        ) from None
    try:
        return smbus2.SMBus(bus)
    except FileNotFoundError:
        raise MeterError(
            f"no /dev/i2c-{bus}: enable I2C (sudo raspi-config nonint do_i2c 0) or pass the right bus=N"
        ) from None
    except PermissionError:
        raise MeterError(f"/dev/i2c-{bus} is not accessible: add this user to the i2c group or run as root") from None


class _InaMeter(SampledMeter):
    """Shared I2C plumbing: ``i2c`` is an smbus2.SMBus-like object (opened on bus ``bus`` when not given)."""

    chip = ""

    def __init__(self, bus: int = 1, addr: int = 0x40, *, i2c: object | None = None, **shown: object) -> None:
        options = {"bus": bus, "addr": f"0x{addr:02x}", **shown}
        self.name = f"{self.chip}({','.join(f'{k}={v}' for k, v in options.items())})"
        self.addr = addr
        self._i2c = i2c if i2c is not None else _open_smbus(bus)
        try:
            self._configure()
        except OSError as e:
            raise MeterError(
                f"no {self.chip} answers at 0x{addr:02x} on I2C bus {bus} ({e}): check the wiring and "
                f"the address (i2cdetect -y {bus})"
            ) from None

    def _read(self, reg: int) -> int:
        return swap16(self._i2c.read_word_data(self.addr, reg))  # type: ignore[attr-defined]

    def _write(self, reg: int, value: int) -> None:
        self._i2c.write_word_data(self.addr, reg, swap16(value))  # type: ignore[attr-defined]

    def _configure(self) -> None:
        raise NotImplementedError

    def _trace(self, t: np.ndarray, rows: np.ndarray) -> PowerTrace:
        volts, amps = rows[:, 0], rows[:, 1]
        return PowerTrace(self.name, self.kind, t, watts=volts * amps, volts=volts, amps=amps)


class Ina260Meter(_InaMeter):
    """INA260 (integrated 2 mΩ shunt, up to 15 A): put it in the supply line of the device under test."""

    chip = "ina260"
    interval_s = INA260_PERIOD_S

    def _configure(self) -> None:
        maker, die = self._read(0xFE), self._read(0xFF) >> 4
        if (maker, die) != (INA260_MANUFACTURER_ID, INA260_DIE_ID):
            raise MeterError(
                f"the chip at 0x{self.addr:02x} is not an INA260 (manufacturer id 0x{maker:04x}, die id 0x{die:03x}): "
                "check addr= (an INA219 has no id registers: use --meter ina219)"
            )
        self._write(0x00, INA260_CONFIG)

    def _sample(self) -> tuple[float, float]:
        amps = ina260_amps(self._read(0x01))
        return ina260_volts(self._read(0x02)), amps


class Ina219Meter(_InaMeter):
    """INA219 with an external shunt of ``shunt`` ohms (0.1 Ω on the common breakouts: ±3.2 A at most).

    Current is the shunt voltage over ``shunt``, computed here, so the calibration register (05h) and the chip's
    own current/power registers, whose LSBs it sets, are not used.
    """

    chip = "ina219"
    interval_s = INA219_PERIOD_S

    def __init__(self, bus: int = 1, addr: int = 0x40, shunt: float = 0.1, *, i2c: object | None = None) -> None:
        if not shunt > 0:
            raise MeterError(f"ina219 shunt={shunt} ohm: give the shunt resistance, e.g. ina219:shunt=0.1")
        self.shunt = shunt
        super().__init__(bus, addr, i2c=i2c, shunt=shunt)

    def _configure(self) -> None:
        self._write(0x00, INA219_CONFIG)
        if self._read(0x00) != INA219_CONFIG:
            raise MeterError(f"the chip at 0x{self.addr:02x} did not take the INA219 configuration: check addr=")

    def _sample(self) -> tuple[float, float]:
        shunt_volts = ina219_shunt_volts(self._read(0x01))
        if abs(shunt_volts) >= INA219_SHUNT_FULL_SCALE_V:
            raise MeterError(
                f"{self.name}: shunt voltage at full scale (±320 mV, i.e. over "
                f"{INA219_SHUNT_FULL_SCALE_V / self.shunt:.2f} A): use a smaller shunt and set shunt= to it"
            )
        return ina219_bus_volts(self._read(0x02)), shunt_volts / self.shunt
