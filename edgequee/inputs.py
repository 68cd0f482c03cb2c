"""Inputs for `edgequee run`: image files, folders of images, or .npz files, as uint8 images of the bundle's size
and channels (RGB, or grayscale for a 1-channel model)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ._lazy import require
from .bundle import InputSpec
from .data import IMAGE_SUFFIXES, npz_array, read_image
from .errors import DataError

__all__ = ["Input", "read_inputs"]


@dataclass(frozen=True)
class Input:
    """One input: its name and its image, or (``image`` None) why it could not be read."""

    name: str
    image: np.ndarray | None
    error: str | None = None

    def unwrap(self) -> np.ndarray:
        """The image; a DataError with the reason when it could not be read (for callers that stop at a bad file)."""
        if self.image is None:
            raise DataError(self.error or f"{self.name}: cannot be read")
        return self.image


def read_inputs(inputs: Sequence[str], spec: InputSpec) -> Iterator[Input]:
    """An ``Input`` for every image of ``inputs`` (files, folders searched recursively, .npz files), decoded to
    uint8 H×W×C with the bundle's channels and resized to its input size.

    A path that does not exist is a mistake in the arguments: DataError at once, before any image is read. A file
    that cannot be read, decoded or fitted (and an .npz or folder without usable images) is one ``Input`` with
    ``error`` set, and reading goes on: ``edgequee run`` reports it and classifies the rest, callers that need
    every image use ``Input.unwrap``.
    """
    missing = [item for item in inputs if not Path(item).exists()]
    if missing:
        raise DataError(f"{missing[0]}: no such file or folder (give image files, folders or .npz)")
    return _read(inputs, spec)


def _read(inputs: Sequence[str], spec: InputSpec) -> Iterator[Input]:
    size = (spec.height, spec.width)
    for item in inputs:
        path = Path(item)
        if path.suffix == ".npz" and not path.is_dir():
            try:
                images = _npz_images(path, spec)
            except DataError as e:
                yield Input(str(path), None, str(e))
                continue
            for i, img in enumerate(images):
                yield Input(f"{path.name}[{i}]", _fit(img, spec))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
            if not files:
                yield Input(str(path), None, f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this "
                                             "folder or below it")
            for f in files:
                yield _image_file(f, size, spec.channels)
        else:
            yield _image_file(path, size, spec.channels)


def _image_file(path: Path, size: tuple[int, int], channels: int) -> Input:
    try:
        return Input(str(path), read_image(path, size, channels))
    except DataError as e:
        return Input(str(path), None, str(e))


def _npz_images(path: Path, spec: InputSpec) -> np.ndarray:
    """The .npz's images (x_test, else its first array), checked once for the whole file."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read images from this .npz ({e}); save them with "
                        "np.savez(path, x_test=images)") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds a single array, not an .npz archive; save it with np.savez(path, x_test=images)")
    with z:
        if not z.files:
            raise DataError(f"{path}: holds no arrays; save images with np.savez(path, x_test=images)")
        key = "x_test" if "x_test" in z else z.files[0]
        images = npz_array(z, path, key)
    _check(images, spec, f"{path}[{key}]", batch=True)
    if len(images) == 0:
        raise DataError(f"{path}: {key} holds no images")
    return images


def _describe(spec: InputSpec) -> str:
    return "grayscale" if spec.channels == 1 else spec.color


def _check(img: np.ndarray, spec: InputSpec, name: str, *, batch: bool = False) -> None:
    shape = "N×H×W" if batch else "H×W"
    if img.dtype != np.uint8 or img.ndim != 3 + batch or img.shape[-1] != spec.channels:
        raise DataError(f"{name}: expected uint8 {shape}×{spec.channels} {_describe(spec)} images (the model takes "
                        f"{spec.channels} channel{'s' if spec.channels > 1 else ''}), got {img.dtype} {img.shape}")


def _fit(img: np.ndarray, spec: InputSpec, name: str = "image") -> np.ndarray:
    """``img`` (uint8 H×W×C, the bundle's channels) resized to the bundle's input size."""
    _check(img, spec, name)
    if img.shape[:2] != (spec.height, spec.width):
        cv2 = require("cv2", extra="camera")
        img = cv2.resize(img, (spec.width, spec.height), interpolation=cv2.INTER_AREA)
        img = img.reshape(spec.height, spec.width, spec.channels)  # OpenCV drops a single channel
    return np.ascontiguousarray(img)
