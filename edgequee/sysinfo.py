"""What the machine a profile was measured on is, and whether it was in a state to be measured (temperature,
throttling). Linux sysfs and, on a Raspberry Pi, ``vcgencmd``; everything degrades to "unknown" elsewhere."""

from __future__ import annotations

import os
import platform
import resource
import shutil
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["cpu_name", "cpu_flags", "int8_class", "cpu_temperature_c", "parse_throttled", "read_throttled", "peak_rss_mb",
           "machine_info"]

# The ISA features that decide how fast XNNPACK's int8 (and fp16) kernels are. x86: AVX-512 VNNI / AVX-VNNI give
# int8 dot products (int8 3.7-4x faster than fp32 on this project's VNNI VMs; without them int8 was slower than
# fp32 on an AVX2-only VM of the same kind). Arm: asimddp (SDOT/UDOT: Pi 5's Cortex-A76 has it, Pi 4's A72 does
# not), i8mm (int8 matrix multiply), asimdhp (fp16 arithmetic).
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm", "asimdhp", "sve")

# vcgencmd get_throttled bits (Raspberry Pi documentation, "vcgencmd": get_throttled).
THROTTLED_BITS = {
    0: "under-voltage detected",
    1: "arm frequency capped",
    2: "currently throttled",
    3: "soft temperature limit active",
    16: "under-voltage has occurred",
    17: "arm frequency capping has occurred",
    18: "throttling has occurred",
    19: "soft temperature limit has occurred",
}
_NOW = (0, 1, 2, 3)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """Which of ``INT8_FLAGS`` this CPU reports (x86 "flags", Arm "Features" in /proc/cpuinfo); [] where unknown."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in INT8_FLAGS if flag in have]
    except OSError:
        pass
    return []


def int8_class(flags: list[str] | None = None, arch: str | None = None) -> str:
    """The machine's int8 class from its flags: "x86-vnni" (int8 pays), "x86-avx2" (it does not), "arm-dotprod",
    "arm" or "unknown"."""
    flags = cpu_flags() if flags is None else flags
    arch = (arch or platform.machine()).lower()
    if arch in ("x86_64", "amd64", "i686", "x86"):
        return "x86-vnni" if {"avx512_vnni", "avx_vnni"} & set(flags) else "x86-avx2"
    if arch in ("aarch64", "arm64") or arch.startswith("arm"):
        return "arm-dotprod" if "asimddp" in flags else "arm"
    return "unknown"


def cpu_temperature_c(root: str | os.PathLike[str] = "/sys/class/thermal") -> float | None:
    """The CPU thermal zone's temperature (the first zone whose type names the CPU/SoC, else zone 0)."""
    zones = sorted(Path(root).glob("thermal_zone*"))
    if not zones:
        return None

    def kind(z: Path) -> str:
        try:
            return (z / "type").read_text().strip().lower()
        except OSError:
            return ""

    cpu = [z for z in zones if any(k in kind(z) for k in ("cpu", "soc", "x86_pkg", "k10temp"))]
    for z in cpu or zones[:1]:
        try:
            return int((z / "temp").read_text().strip()) / 1000.0
        except (OSError, ValueError):
            continue
    return None


def parse_throttled(text: str) -> dict[str, Any]:
    """``throttled=0x50005`` → {"raw": "0x50005", "now": [...], "since_boot": [...], "throttled_now": bool}."""
    value = text.strip().split("=", 1)[-1].strip()
    bits = int(value, 16)
    flags = [name for bit, name in THROTTLED_BITS.items() if bits >> bit & 1]
    now = [THROTTLED_BITS[b] for b in _NOW if bits >> b & 1]
    return {"raw": value, "now": now, "since_boot": [f for f in flags if f not in now], "throttled_now": bool(now)}


def read_throttled() -> dict[str, Any] | None:
    """``vcgencmd get_throttled`` parsed, or None where there is no vcgencmd (not a Raspberry Pi)."""
    exe = shutil.which("vcgencmd")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "get_throttled"], capture_output=True, text=True, timeout=5, check=True).stdout
        return parse_throttled(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 20) if platform.system() == "Darwin" else r / 1024


def machine_info() -> dict[str, Any]:
    """What a timing depends on: CPU model, the ISA features of ``INT8_FLAGS`` it has, its int8 class, cores, and the
    TFLite runtime with its version."""
    from .backend import runtime_name
    from .errors import DeviceError

    try:
        runtime = runtime_name()
    except DeviceError:  # no runtime installed: still describe the machine
        runtime = "none"
    flags = cpu_flags()
    return {"arch": platform.machine(), "system": platform.system(), "cpu_count": os.cpu_count(),
            "processor": cpu_name(), "cpu_flags": flags, "int8_class": int8_class(flags),
            "runtime": runtime, "python": platform.python_version()}
