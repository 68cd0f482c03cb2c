"""torch module → ONNX → onnx2tf (fp32, fp16) → TFLiteConverter (int8), one graph at a time.

Lessons from this toolchain (onnx2tf 1.28, tensorflow 2.21), each handled here:
- onnx2tf runs ``onnxsim`` as a *subprocess* (~3.4 s per call, three calls per model) and silently skips it when
  the command is not on PATH, which breaks the option-A shortcut. We simplify with onnxsim's Python API (and
  check that it succeeded), then pass ``not_use_onnxsim=True``: a block converts in ~1.2 s instead of ~13 s.
- ONNX outputs must be named explicitly: with torch's default names (``onnx::ReduceMean_66``) onnx2tf dropped a
  graph output that is also consumed inside the graph (the hidden state feeding the exit head).
- onnx2tf renames and reorders outputs (``Identity``/``Identity_1`` in float files, ``PartitionedCall:0`` … in
  int8 files, logits first): outputs are mapped to roles by shape, never by position or name.
- onnx2tf overwrites its input ONNX file and, for 3-channel inputs, wants
  ``calibration_image_sample_data_20x128x128x3_float32.npy`` in the working directory (else it tries to
  download one): every conversion runs in a scratch directory where that file is written from real images.
- int8 is done with TFLiteConverter on onnx2tf's SavedModel, calibrated with the real activations that reach
  the graph (per-channel weights, int8 input and outputs), so consecutive int8 blocks see the same ranges.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from edgequee.backend import make_interpreter
from edgequee.bundle import PrecisionArtifact, QuantParams, TensorSpec, sha256_file
from edgequee.errors import ConversionError

__all__ = ["BlockGraph", "WholeGraph", "export_tflite", "read_artifact", "ONNX_OPSET"]

log = logging.getLogger(__name__)
ONNX_OPSET = 17
_SAMPLE_NPY = "calibration_image_sample_data_20x128x128x3_float32.npy"


class BlockGraph(nn.Module):
    """What one block's graph computes: hidden → (next hidden, exit features); the last block → features."""

    def __init__(self, block: nn.Module, head_features: nn.Module, last: bool):
        super().__init__()
        self.block = block
        self.head_features = head_features
        self.last = last

    def forward(self, x: torch.Tensor):  # type: ignore[no-untyped-def]
        h = self.block(x)
        f = self.head_features(h)
        return f if self.last else (h, f)

    @property
    def output_names(self) -> list[str]:
        return ["features"] if self.last else ["hidden", "features"]


class WholeGraph(nn.Module):
    """The unsplit network: image → final logits (a baseline, as a user would deploy it without exits)."""

    def __init__(self, blocks: Sequence[nn.Module], final_head: nn.Module):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.head = final_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))

    output_names = ["logits"]


@contextlib.contextmanager
def _in_dir(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _quiet_tf() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def _to_onnx(module: nn.Module, example: torch.Tensor, names: list[str], path: Path) -> None:
    import onnx
    import onnxsim

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module, (example,), str(path), input_names=["input"], output_names=names, opset_version=ONNX_OPSET,
            dynamo=False,
        )
    simplified, ok = onnxsim.simplify(onnx.load(str(path)))
    if not ok:
        raise ConversionError(f"{path.name}: onnxsim could not validate the simplified graph; report this model")
    onnx.save(simplified, str(path))


def _write_onnx2tf_sample(workdir: Path, images_nhwc01: np.ndarray | None) -> None:
    """onnx2tf's 3-channel sample file, from real images (nearest-neighbour resized to 128x128)."""
    if images_nhwc01 is None or images_nhwc01.shape[-1] != 3:
        return
    imgs = images_nhwc01[:20]
    reps = np.ceil(20 / len(imgs)).astype(int)
    imgs = np.concatenate([imgs] * reps)[:20]
    h, w = imgs.shape[1:3]
    rows = (np.arange(128) * h // 128)[:, None]
    cols = (np.arange(128) * w // 128)[None, :]
    np.save(workdir / _SAMPLE_NPY, imgs[:, rows, cols].astype(np.float32))


def export_tflite(
    module: nn.Module,
    example_nchw: torch.Tensor,
    calib_nchw: np.ndarray,
    precisions: Sequence[str],
    workdir: Path,
    stem: str,
    dest: Path,
    sample_images_nhwc01: np.ndarray | None = None,
) -> dict[str, Path]:
    """Convert ``module`` to one .tflite per precision in ``dest``; returns precision → file.

    ``calib_nchw`` holds the real inputs that reach this graph (float32, NCHW, N ≥ 1); int8 is calibrated on them.
    """
    _quiet_tf()
    import onnx2tf

    unknown = set(precisions) - {"fp32", "fp16", "int8"}
    if unknown:
        raise ConversionError(f"unknown precision(s) {sorted(unknown)}; choose from fp32, fp16, int8")
    if "int8" in precisions and len(calib_nchw) == 0:
        raise ConversionError("int8 needs calibration data: pass --calib DATA with real images")
    scratch = workdir / stem
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    onnx_path = scratch / f"{stem}.onnx"
    names = list(module.output_names)  # type: ignore[arg-type]
    module.eval()
    with torch.no_grad():
        _to_onnx(module, example_nchw[:1], names, onnx_path)
    _write_onnx2tf_sample(scratch, sample_images_nhwc01)
    saved = scratch / "saved_model"
    with _in_dir(scratch):
        try:
            onnx2tf.convert(
                input_onnx_file_path=str(onnx_path),
                output_folder_path=str(saved),
                non_verbose=True,
                not_use_onnxsim=True,  # simplified above, in-process (see module docstring)
            )
        except Exception as e:  # onnx2tf raises bare Exceptions and SystemExit-like errors
            raise ConversionError(f"{stem}: onnx2tf failed ({type(e).__name__}: {e})") from e
    out: dict[str, Path] = {}
    produced = {"fp32": saved / f"{stem}_float32.tflite", "fp16": saved / f"{stem}_float16.tflite"}
    for p in precisions:
        target = dest / f"{stem}_{p}.tflite"
        if p == "int8":
            target.write_bytes(_int8_from_saved_model(saved, calib_nchw))
        else:
            if not produced[p].is_file():
                raise ConversionError(f"{stem}: onnx2tf did not write {produced[p].name}")
            shutil.copyfile(produced[p], target)
        out[p] = target
    shutil.rmtree(scratch, ignore_errors=True)
    return out


def _int8_from_saved_model(saved: Path, calib_nchw: np.ndarray) -> bytes:
    import tensorflow as tf

    calib = np.ascontiguousarray(np.transpose(calib_nchw, (0, 2, 3, 1)) if calib_nchw.ndim == 4 else calib_nchw)
    calib = calib.astype(np.float32)

    def representative() -> Iterator[list[np.ndarray]]:
        for i in range(len(calib)):
            yield [calib[i : i + 1]]

    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    try:
        return bytes(conv.convert())
    except Exception as e:
        raise ConversionError(f"{saved.parent.name}: int8 quantization failed ({type(e).__name__}: {e})") from e


def _spec(detail: dict, name_override: str | None = None) -> TensorSpec:  # type: ignore[type-arg]
    scale, zp = detail["quantization"]
    dtype = np.dtype(detail["dtype"]).name
    quant = QuantParams(float(scale), int(zp)) if dtype in ("int8", "uint8") and scale else None
    return TensorSpec(
        name_override or detail["name"], tuple(int(s) for s in detail["shape"]), dtype, quant
    )


def read_artifact(
    path: Path, bundle_root: Path, precision: str, expected: dict[str, tuple[int, ...]]
) -> PrecisionArtifact:
    """Describe a converted graph for the manifest, mapping its outputs to roles by shape.

    ``expected`` maps each role (hidden / features / logits) to its NHWC shape with batch 1.
    """
    interp = make_interpreter(path)
    ins = interp.get_input_details()
    if len(ins) != 1:
        raise ConversionError(f"{path.name}: expected 1 input, got {len(ins)}")
    outputs: dict[str, TensorSpec] = {}
    details = interp.get_output_details()
    for role, shape in expected.items():
        matches = [d for d in details if tuple(int(s) for s in d["shape"]) == tuple(shape)]
        if len(matches) != 1:
            got = [tuple(int(s) for s in d["shape"]) for d in details]
            raise ConversionError(
                f"{path.name}: cannot map output {role!r} {shape} by shape among {got}; "
                "give the hidden state and the exit features distinct shapes"
            )
        outputs[role] = _spec(matches[0])
    if len(details) != len(expected):
        raise ConversionError(f"{path.name}: {len(details)} outputs, expected {sorted(expected)}")
    return PrecisionArtifact(
        precision=precision,
        file=str(path.relative_to(bundle_root)),
        sha256=sha256_file(path),
        size_bytes=path.stat().st_size,
        input=_spec(ins[0]),
        outputs=outputs,
    )
