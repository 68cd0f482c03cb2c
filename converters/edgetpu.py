"""The Coral Edge TPU step of `edgequee convert --edgetpu`: one full-int8 file per block, co-compiled in order.

The Edge TPU runs one model per invoke, fully int8 (int8 input and outputs), and partitions a graph once: the
first op it cannot map and everything after it run on the CPU. So the converter writes each block as its own
single-graph int8 file (calibrated on the same real activations as the CPU int8 blocks, so the int8 hidden
state passes between blocks unchanged), then runs ``edgetpu_compiler`` once over all of them **in execution
order**: co-compiled models share the 8 MB parameter cache, and the compiler fills it in the order given.

``edgetpu_compiler`` exists for x86-64 Debian/Ubuntu only (Coral's apt repository, package edgetpu-compiler).
Without it the bundle still gets the uncompiled int8 blocks (they run on the CPU, and compile later) and the
conversion report says so. The compiler's stdout is parsed per model: ops mapped to the Edge TPU vs the CPU,
on-chip/off-chip parameter memory; a block that maps no op to the TPU fails the conversion.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from edgequee.backend import make_interpreter
from edgequee.bundle import PrecisionArtifact, sha256_file
from edgequee.errors import ConversionError

from .export import export_tflite, read_artifacts

__all__ = ["CompiledModel", "parse_compiler_output", "compile_edgetpu", "export_edgetpu_blocks", "COMPILER"]

COMPILER = "edgetpu_compiler"
INSTALL_HINT = ("install it on an x86-64 Debian/Ubuntu host from Coral's apt repository (package edgetpu-compiler, "
                "https://coral.ai/docs/edgetpu/compiler/) and convert again with --edgetpu")


@dataclass
class CompiledModel:
    """One model's section of the compiler's report."""

    input_model: str
    output_model: str | None = None
    on_chip_bytes: float | None = None
    off_chip_bytes: float | None = None
    subgraphs: int | None = None
    total_ops: int | None = None
    tpu_ops: int | None = None
    cpu_ops: int | None = None
    operators: list[dict[str, Any]] = field(default_factory=list)


_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_FIELDS = {
    "Output model": ("output_model", str),
    "On-chip memory used for caching model parameters": ("on_chip_bytes", "size"),
    "Off-chip memory used for streaming uncached model parameters": ("off_chip_bytes", "size"),
    "Number of Edge TPU subgraphs": ("subgraphs", int),
    "Total number of operations": ("total_ops", int),
    "Number of operations that will run on Edge TPU": ("tpu_ops", int),
    "Number of operations that will run on CPU": ("cpu_ops", int),
}
_OPERATOR = re.compile(r"^([A-Z][A-Z0-9_]*)\s+(\d+)\s+(\S.*)$")


def _size(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)\s*([KMG]?i?B)", text.strip())
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_compiler_output(text: str) -> tuple[str | None, list[CompiledModel]]:
    """(compiler version, one CompiledModel per "Input model:" section) from edgetpu_compiler's stdout.

    Where the compiler prints no "will run on CPU" line, every op was mapped: tpu_ops = total_ops, cpu_ops = 0.
    The operator table (``-s``) is kept per model as {"op", "count", "status"}.
    """
    version = None
    models: list[CompiledModel] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("Edge TPU Compiler version"):
            version = line.rsplit(" ", 1)[-1]
            continue
        key, sep, value = line.partition(":")
        if sep and key == "Input model":
            models.append(CompiledModel(value.strip()))
            continue
        if not models:
            continue
        if sep and key in _FIELDS:
            attr, kind = _FIELDS[key]
            setattr(models[-1], attr, _size(value) if kind == "size" else kind(value.strip()))
            continue
        op = _OPERATOR.match(line)
        if op and op.group(1) != "Operator":
            models[-1].operators.append({"op": op.group(1), "count": int(op.group(2)), "status": op.group(3).strip()})
    for m in models:
        if m.tpu_ops is None and m.total_ops is not None:
            m.tpu_ops, m.cpu_ops = m.total_ops, 0
    return version, models


def compile_edgetpu(files: Sequence[Path], out_dir: Path, compiler: str | None = None) -> dict[str, Any]:
    """Co-compile ``files`` (in execution order) into ``out_dir``; returns the report for the manifest.

    Returns {"compiled": False, "why": ...} when the compiler is not installed. Raises ConversionError when it
    fails, or when a block maps no operation to the Edge TPU (it would run wholly on the CPU, slower than the
    CPU int8 graph because of the extra hand-over).
    """
    exe = compiler or shutil.which(COMPILER)
    if exe is None:
        return {"compiled": False, "why": f"{COMPILER} not found on PATH; {INSTALL_HINT}"}
    cmd = [exe, "-s", "-o", str(out_dir), *map(str, files)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConversionError(f"{COMPILER} could not run ({e}); {INSTALL_HINT}") from e
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ConversionError(f"{COMPILER} failed (exit {proc.returncode}): {last[0]}")
    version, models = parse_compiler_output(proc.stdout)
    if len(models) != len(files):
        raise ConversionError(f"{COMPILER} reported {len(models)} models for {len(files)} inputs; see its output:\n"
                              f"{proc.stdout[-2000:]}")
    for f, m in zip(files, models):
        if not m.tpu_ops:
            raise ConversionError(f"{Path(f).name}: the Edge TPU compiler mapped no operation to the TPU "
                                  f"({m.cpu_ops} on the CPU); this block cannot run on a Coral")
    return {"compiled": True, "compiler_version": version, "command": " ".join(cmd[:4]) + " <blocks in order>",
            "models": [m.__dict__ for m in models]}


def _tensor_named(art: PrecisionArtifact, path: Path, key: str) -> PrecisionArtifact:
    """``art`` addressed by tensor names instead of a signature (compiled models are run as plain graphs)."""
    interp = make_interpreter(path)
    names = {d["index"]: d["name"] for d in interp.get_tensor_details()}
    runner = interp.get_signature_runner(key)
    ins = runner.get_input_details()
    outs = runner.get_output_details()

    def rename(spec: Any, index: int) -> Any:
        return type(spec)(names[index], spec.shape, spec.dtype, spec.quant)

    return PrecisionArtifact(
        precision=art.precision, file=art.file, sha256=art.sha256, size_bytes=art.size_bytes,
        input=rename(art.input, ins["input"]["index"]),
        outputs={role: rename(spec, outs[role]["index"]) for role, spec in art.outputs.items()},
        signature=None,
    )


def export_edgetpu_blocks(
    saved: Mapping[str, Path],
    calib_nhwc: Mapping[str, np.ndarray],
    roles: Mapping[str, Sequence[str]],
    workdir: Path,
    bundle_root: Path,
) -> tuple[dict[str, PrecisionArtifact], dict[str, Any]]:
    """Per-block full-int8 files under ``bundle_root/edgetpu``, compiled when the compiler exists.

    Returns ({block key: artifact}, report). Artifacts point at the compiled ``*_edgetpu.tflite`` files when
    compiled, else at the plain int8 files.
    """
    out_dir = bundle_root / "edgetpu"
    out_dir.mkdir(exist_ok=True)
    plain = {}
    for key, path in saved.items():  # one conversion per block: the compiler wants one graph per model
        plain[key] = export_tflite({key: path}, {key: calib_nhwc[key]}, ["int8"], workdir, out_dir / key)["int8"]
    report = compile_edgetpu(list(plain.values()), out_dir)
    for log in out_dir.glob("*.log"):  # parsed into the report; the bundle ships only what runs
        log.unlink()
    arts = {}
    for key, f in plain.items():
        art = read_artifacts(f, bundle_root, "int8", {key: roles[key]})[key]
        art = _tensor_named(art, f, key)
        if report["compiled"]:
            compiled = out_dir / f"{f.stem}_edgetpu.tflite"
            if not compiled.is_file():
                raise ConversionError(f"{COMPILER} wrote no {compiled.name}; see the conversion report")
            art = PrecisionArtifact(precision="int8", file=str(compiled.relative_to(bundle_root)),
                                    sha256=sha256_file(compiled), size_bytes=compiled.stat().st_size,
                                    input=art.input, outputs=art.outputs, signature=None)
            f.unlink()  # the bundle ships what runs
        arts[key] = art
    return arts, report
