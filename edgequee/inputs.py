"""Inputs for `edgequee run`: image files, folders of images, or .npz files, as uint8 RGB of the bundle's size."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ._lazy import require
from .bundle import InputSpec
from .data import IMAGE_SUFFIXES, read_image
from .errors import DataError

__all__ = ["read_inputs"]


def read_inputs(inputs: Sequence[str], spec: InputSpec) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, uint8 H×W×C RGB image) for every input, resized to the bundle's input size."""
    for item in inputs:
        path = Path(item)
        if path.suffix == ".npz":
            for i, img in enumerate(_npz_images(path)):
                yield f"{path.name}[{i}]", _fit(img, spec, f"{path}[{i}]")
        elif path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
                yield str(f), read_image(f, (spec.height, spec.width))
        elif path.is_file():
            yield str(path), read_image(path, (spec.height, spec.width))
        else:
            raise DataError(f"{item}: no such file or folder (give image files, folders or .npz)")


def _npz_images(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            key = "x_test" if "x_test" in z else z.files[0]
            return z[key]
    except (OSError, ValueError, IndexError) as e:
        raise DataError(f"{path}: cannot read images from this .npz ({e})") from e


def _fit(img: np.ndarray, spec: InputSpec, name: str) -> np.ndarray:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != spec.channels:
        raise DataError(f"{name}: expected uint8 H×W×{spec.channels} RGB, got {img.dtype} {img.shape}")
    if img.shape[:2] != (spec.height, spec.width):
        cv2 = require("cv2", extra="camera")
        img = cv2.resize(img, (spec.width, spec.height), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img)
