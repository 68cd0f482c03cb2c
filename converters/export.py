"""torch module → ONNX → onnx2tf SavedModel per block → one multi-signature TFLite file per precision.

Lessons from this toolchain (onnx2tf 1.28, tensorflow 2.21), each handled here:
- onnx2tf runs ``onnxsim`` as a *subprocess* (~3.4 s per call, three calls per model) and silently skips it when
  the command is not on PATH, which breaks the option-A shortcut. We simplify with onnxsim's Python API (and
  check that it succeeded), then pass ``not_use_onnxsim=True``: a block converts in ~1.2 s instead of ~13 s.
- ONNX outputs must be named explicitly: with torch's default names (``onnx::ReduceMean_66``) onnx2tf dropped a
  graph output that is also consumed inside the graph (the hidden state feeding the exit head).
- onnx2tf renames and reorders outputs in its .tflite files (``Identity``/``Identity_1`` in float files,
  ``PartitionedCall:0`` … in int8 files, logits first). We only take its SavedModel (whose signature keeps the
  ONNX output names), compose the blocks into one SavedModel with a signature each (input ``input``, outputs
  ``hidden``/``features``/``logits``) and convert that with TFLiteConverter at every precision, so the runtime
  addresses tensors by the names we gave them.
- onnx2tf overwrites its input ONNX file and, for 3-channel inputs, wants
  ``calibration_image_sample_data_20x128x128x3_float32.npy`` in the working directory (else it tries to
  download one): every conversion runs in a scratch directory where that file is written from real images.
- int8 is calibrated, per signature, with the real activations that reach each block (per-channel weights, int8
  input and outputs), so consecutive int8 blocks see the same ranges and the int8 tensor passes through.
- One file per precision (every block a signature) lets one interpreter run all blocks on one XNNPACK thread
  pool; one interpreter per block cost a thread wake-up per block at 2 threads (see edgequee/bundle.py).
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

__all__ = ["BlockGraph", "WholeGraph", "nhwc", "to_saved_model", "export_tflite", "read_artifacts", "ONNX_OPSET"]

log = logging.getLogger(__name__)
ONNX_OPSET = 17
_SAMPLE_NPY = "calibration_image_sample_data_20x128x128x3_float32.npy"


class BlockGraph(nn.Module):
    """What one block's graph computes: hidden → (next hidden, exit features, exit logits); the last block has no
    hidden output. Float runtimes read the in-graph logits; int8 ones apply the float classifier to the features."""

    def __init__(self, block: nn.Module, head: nn.Module, last: bool):
        super().__init__()
        self.block = block
        self.head = head
        self.last = last

    def forward(self, x: torch.Tensor):  # type: ignore[no-untyped-def]
        h = self.block(x)
        f = self.head.features(h)
        logits = self.head.classifier(f)
        return (f, logits) if self.last else (h, f, logits)

    @property
    def output_names(self) -> list[str]:
        return ["features", "logits"] if self.last else ["hidden", "features", "logits"]


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


def nhwc(t: torch.Tensor) -> np.ndarray:
    """A torch activation (NCHW, or (N, F)) as the contiguous NHWC numpy array the TFLite graphs exchange."""
    a = t.detach().numpy()
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1) if a.ndim == 4 else a)


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


def to_saved_model(
    module: nn.Module,
    example_nchw: torch.Tensor,
    workdir: Path,
    stem: str,
    sample_images_nhwc01: np.ndarray | None = None,
) -> Path:
    """torch → ONNX (simplified in-process) → onnx2tf SavedModel (NHWC I/O); returns the SavedModel directory."""
    _quiet_tf()
    import onnx2tf

    scratch = workdir / stem
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    onnx_path = scratch / f"{stem}.onnx"
    module.eval()
    with torch.no_grad():
        _to_onnx(module, example_nchw[:1], list(module.output_names), onnx_path)  # type: ignore[arg-type]
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
    if not (saved / "saved_model.pb").is_file():
        raise ConversionError(f"{stem}: onnx2tf wrote no SavedModel")
    return saved


def _compose(saved: dict[str, Path], out: Path) -> Path:
    """One SavedModel with a signature per part (``{signature: onnx2tf SavedModel}``), input renamed ``input``."""
    import tensorflow as tf

    root = tf.Module()
    root.parts = []
    signatures = {}
    for key, path in saved.items():
        loaded = tf.saved_model.load(str(path))
        root.parts.append(loaded)
        fn = loaded.signatures["serving_default"]
        ((in_name, spec),) = fn.structured_input_signature[1].items()

        def call(x, fn=fn, in_name=in_name):  # type: ignore[no-untyped-def]
            return fn(**{in_name: x})

        signatures[key] = tf.function(call, input_signature=[tf.TensorSpec(spec.shape, spec.dtype, name="input")])
        signatures[key] = signatures[key].get_concrete_function()
    tf.saved_model.save(root, str(out), signatures=signatures)
    return out


def export_tflite(
    saved: dict[str, Path],
    calib_nhwc: dict[str, np.ndarray],
    precisions: Sequence[str],
    workdir: Path,
    dest_stem: Path,
) -> dict[str, Path]:
    """Write ``{dest_stem}_{precision}.tflite`` for each precision, every part one signature; returns the files.

    ``calib_nhwc[signature]`` holds the real float inputs that reach that part (NHWC, N ≥ 1): int8 calibration.
    fp16 stores weights as float16 (dequantized at load; XNNPACK may run fp16 arithmetic where the CPU has it).
    """
    _quiet_tf()
    import tensorflow as tf

    unknown = set(precisions) - {"fp32", "fp16", "int8"}
    if unknown:
        raise ConversionError(f"unknown precision(s) {sorted(unknown)}; choose from fp32, fp16, int8")
    if "int8" in precisions and any(len(v) == 0 for v in calib_nhwc.values()):
        raise ConversionError("int8 needs calibration data: pass --calib DATA with real images")
    composed = _compose(saved, workdir / f"{dest_stem.name}_composed")
    out: dict[str, Path] = {}
    for p in precisions:
        conv = tf.lite.TFLiteConverter.from_saved_model(str(composed), signature_keys=list(saved))
        if p == "fp16":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.target_spec.supported_types = [tf.float16]
        elif p == "int8":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = _representative(calib_nhwc)
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = tf.int8
            conv.inference_output_type = tf.int8
        try:
            flat = bytes(conv.convert())
        except Exception as e:
            raise ConversionError(f"{dest_stem.name}: TFLite conversion at {p} failed ({type(e).__name__}: {e})") from e
        target = dest_stem.with_name(f"{dest_stem.name}_{p}.tflite")
        target.write_bytes(flat)
        out[p] = target
    shutil.rmtree(composed, ignore_errors=True)
    return out


def _representative(calib_nhwc: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
    """Samples for TFLite's calibrator: (signature, {"input": one NHWC float32 sample}) for every part."""

    def gen() -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        for key, x in calib_nhwc.items():
            x = np.ascontiguousarray(x, np.float32)
            for i in range(len(x)):
                yield key, {"input": x[i : i + 1]}

    return gen


def _spec(detail: dict, name: str) -> TensorSpec:  # type: ignore[type-arg]
    scale, zp = detail["quantization"]
    dtype = np.dtype(detail["dtype"]).name
    quant = QuantParams(float(scale), int(zp)) if dtype in ("int8", "uint8") and scale else None
    return TensorSpec(name, tuple(int(s) for s in detail["shape"]), dtype, quant)


def read_artifacts(path: Path, bundle_root: Path, precision: str, roles: dict[str, Sequence[str]]) -> dict[str, PrecisionArtifact]:
    """Describe each signature of a converted file for the manifest: ``roles[signature]`` lists its outputs."""
    interp = make_interpreter(path)
    sha, size = sha256_file(path), path.stat().st_size
    found = interp.get_signature_list()
    out = {}
    for key, wanted in roles.items():
        if key not in found or sorted(found[key]["outputs"]) != sorted(wanted) or found[key]["inputs"] != ["input"]:
            raise ConversionError(f"{path.name}: signature {key!r} is {found.get(key)}, expected input + {sorted(wanted)}")
        runner = interp.get_signature_runner(key)
        outs = runner.get_output_details()
        out[key] = PrecisionArtifact(
            precision=precision,
            file=str(path.relative_to(bundle_root)),
            sha256=sha,
            size_bytes=size,
            input=_spec(runner.get_input_details()["input"], "input"),
            outputs={role: _spec(outs[role], role) for role in wanted},
            signature=key,
        )
    return out
