"""The host pipeline: multi-exit torch model → verified bundle (per-block TFLite × precisions + parity).

Stages: split (one BlockGraph per block) → export (ONNX → onnx2tf → TFLite, int8 calibrated on the real
activations reaching each block) → check parity against torch → write the bundle atomically.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from edgequee.bundle import (
    PRECISIONS,
    BlockEntry,
    Bundle,
    Manifest,
    ParityReport,
    PrecisionArtifact,
    check_replaceable,
    save_heads,
    staging_dir,
    write_bundle,
)
from edgequee.errors import ConversionError
from edgequee.locking import remove_stale
from edgequee.progress import Progress

from .edgetpu import export_edgetpu_blocks
from .export import BlockGraph, WholeGraph, export_tflite, nhwc, read_artifacts, to_saved_model
from .multiexit import MultiExitModel
from .parity import chained_parity, isolated_parity, torch_exit_logits

__all__ = ["convert_model", "count_macs", "FP32_MIN_AGREEMENT"]


# fp32 graphs must reproduce torch; anything below this isolated exit agreement is a conversion bug.
FP32_MIN_AGREEMENT = 0.999


def count_macs(module: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(multiply-accumulates, parameters) of one forward pass of ``module`` on ``example`` (batch 1)."""
    macs = 0

    def hook(m: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
            macs += output.numel() * k
        elif isinstance(m, nn.Linear):
            macs += output.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            module(example[:1])
    finally:
        for h in handles:
            h.remove()
    return macs, sum(p.numel() for p in module.parameters())


def _nhwc_shape(t: torch.Tensor) -> tuple[int, ...]:
    s = tuple(t.shape)
    return (1, s[2], s[3], s[1]) if len(s) == 4 else (1,) + s[1:]


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "onnx", "onnxsim", "onnx2tf", "tensorflow", "ai-edge-litert", "numpy"):
        try:
            out[pkg] = version(pkg)
        except Exception:
            out[pkg] = "not installed"
    return out


SCRATCH_PREFIX = "edgequee-convert-"


def _scratch() -> tempfile.TemporaryDirectory[str]:
    """The converter's scratch folder in the system temp folder, named with this pid; the scratch folders of
    conversions that were killed (dead pids) are removed first."""
    remove_stale(Path(tempfile.gettempdir()), SCRATCH_PREFIX)
    return tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")


def convert_model(
    model: MultiExitModel,
    dest: Path,
    calib_images: np.ndarray,
    *,
    parity_images: np.ndarray | None = None,
    parity_labels: np.ndarray | None = None,
    precisions: Sequence[str] = PRECISIONS,
    whole_precisions: Sequence[str] = ("fp32", "int8"),
    overwrite: bool = False,
    edgetpu: bool = False,
    num_threads: int = 1,
    progress: Progress | None = None,
) -> Bundle:
    """Convert ``model`` into a bundle at ``dest``.

    Args:
        calib_images: uint8 NHWC RGB images; int8 graphs are calibrated on the activations they produce.
        parity_images / parity_labels: uint8 images (and labels) for the parity report; defaults to calib_images.
        edgetpu: also write one full-int8 model per block for a Coral and co-compile them (converters/edgetpu.py).
    """
    precisions = [p for p in PRECISIONS if p in precisions]
    if not precisions:
        raise ConversionError("no precisions to convert; pass some of fp32, fp16, int8")
    if calib_images.dtype != np.uint8 or calib_images.ndim != 4:
        raise ConversionError(f"calibration images must be uint8 NHWC, got {calib_images.dtype} {calib_images.shape}")
    if len(calib_images) == 0 and ("int8" in precisions or "int8" in whole_precisions):
        raise ConversionError("int8 needs calibration data: pass --calib DATA with real images")
    dest = Path(dest)
    if os.path.lexists(dest):
        check_replaceable(dest, overwrite)  # before minutes of work: never a folder that is not a bundle
    model.eval()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    stage = staging_dir(dest)
    try:
        (stage / "blocks").mkdir()
        (stage / "whole").mkdir()
        n_graphs = len(model.blocks) + (1 if whole_precisions else 0)
        with torch.no_grad(), _scratch() as tmp:
            work = Path(tmp)
            x_cal = model.normalize(torch.from_numpy(calib_images))
            sample01 = calib_images[:20].astype(np.float32) / 255.0
            saved, calib, roles, meta = {}, {}, {}, []
            h = x_cal
            for i, (block, head) in enumerate(zip(model.blocks, model.heads)):
                key = f"block{i:02d}"
                last = i == len(model.blocks) - 1
                graph = BlockGraph(block, head, last).eval()
                saved[key] = to_saved_model(graph, h[:1], work, key, sample01 if i == 0 else None)
                calib[key] = nhwc(h)
                roles[key] = graph.output_names
                h_next = block(h)
                macs, params = count_macs(nn.Sequential(block, head), h[:1])
                feat = head.features(h_next[:1])
                meta.append((key, macs, params, _nhwc_shape(h), None if last else _nhwc_shape(h_next), feat.shape[1]))
                h = h_next
                if progress:
                    progress(i + 1, n_graphs, f"exported block {i}")
            files = export_tflite(saved, calib, precisions, work, stage / "blocks" / "blocks")
            arts = {p: read_artifacts(f, stage, p, roles) for p, f in files.items()}
            tpu: dict[str, PrecisionArtifact] = {}
            tpu_report: dict[str, object] = {}
            if edgetpu:
                t0 = time.perf_counter()
                tpu, tpu_report = export_edgetpu_blocks(saved, calib, roles, work, stage)
                timings["edgetpu_s"] = time.perf_counter() - t0
            blocks = [
                BlockEntry(index=i, name=key, macs=macs, params=params, input_shape=ishape, hidden_shape=hshape,
                           num_features=int(nfeat), artifacts={p: arts[p][key] for p in precisions},
                           edgetpu=tpu.get(key))
                for i, (key, macs, params, ishape, hshape, nfeat) in enumerate(meta)
            ]
            timings["blocks_s"] = time.perf_counter() - t_start
            whole = {}
            if whole_precisions:
                t0 = time.perf_counter()
                wg = WholeGraph(list(model.blocks), model.heads[-1]).eval()
                wsaved = {"whole": to_saved_model(wg, x_cal[:1], work, "whole", sample01)}
                files = export_tflite(wsaved, {"whole": nhwc(x_cal)}, whole_precisions, work, stage / "whole" / "whole")
                whole = {p: read_artifacts(f, stage, p, {"whole": ["logits"]})["whole"] for p, f in files.items()}
                timings["whole_s"] = time.perf_counter() - t0
                if progress:
                    progress(n_graphs, n_graphs, "converted whole model")
        heads = [(hd.classifier.weight.detach().numpy(), hd.classifier.bias.detach().numpy()) for hd in model.heads]
        manifest = Manifest(
            model=model.name,
            classes=model.classes,
            input=model.input_spec,
            blocks=tuple(blocks),
            heads_sha256=save_heads(stage / "heads.npz", heads),
            whole_model=whole,
        )
        t0 = time.perf_counter()
        par_x = parity_images if parity_images is not None else calib_images
        par_y = parity_labels if parity_images is not None else None
        draft = Bundle(stage, manifest)
        isolated = isolated_parity(model, draft, par_x, precisions, num_threads, progress)
        ref = torch_exit_logits(model, par_x)
        chained = chained_parity(draft, ref, par_x, par_y, precisions, num_threads)
        torch_acc = tuple(float(a) for a in (ref.argmax(2) == par_y[:, None]).mean(0)) if par_y is not None else None
        parity = ParityReport(len(par_x), torch_acc, tuple(isolated), tuple(chained))
        timings["parity_s"] = time.perf_counter() - t0
        if "fp32" in precisions and parity.min_isolated_agreement("fp32") < FP32_MIN_AGREEMENT:
            bad = [p for p in isolated if p.precision == "fp32" and p.exit_agreement < FP32_MIN_AGREEMENT]
            raise ConversionError(
                f"fp32 parity failed: block {bad[0].block} exit agrees with torch on {bad[0].exit_agreement:.2%} "
                f"of {len(par_x)} images (need {FP32_MIN_AGREEMENT:.1%}); the conversion is wrong, report this model"
            )
        timings["total_s"] = time.perf_counter() - t_start
        conversion = {
            "seconds": timings,
            "calibration_images": int(len(calib_images)),
            "precisions": list(precisions),
            "tools": _versions(),
            "host": f"{platform.machine()} {platform.system()} python {platform.python_version()}",
            "model_config": model.config,
        }
        if edgetpu:
            conversion["edgetpu"] = tpu_report
        manifest = dataclasses.replace(manifest, parity=parity, conversion=conversion)
        return write_bundle(stage, manifest, dest, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
