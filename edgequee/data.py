"""Datasets: an .npz, an image folder (one sub-folder per class), or a torchvision dataset when online.

Everything comes back as uint8 NHWC RGB images and int64 labels, the form the converter, runtime and bench use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._lazy import require
from .errors import DataError

__all__ = ["Dataset", "load_dataset", "save_npz", "read_image", "crop_flip", "augmented_copies", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm"}
_TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "svhn": "SVHN", "mnist": "MNIST"}


@dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> "Dataset":
        """The first n images of each split (the shipped .npz files are pre-shuffled, so this is balanced)."""
        return Dataset(self.x_train[:n_train], self.y_train[:n_train], self.x_test[:n_test], self.y_test[:n_test], self.classes)


def load_dataset(spec: str | os.PathLike[str], image_size: tuple[int, int] | None = None) -> Dataset:
    """Load ``spec``: ``path.npz``, an image folder, or ``torchvision:NAME[:ROOT]`` (downloads when online).

    An image folder has one sub-folder per class (sorted names = class order); all its images are the test split.
    ``image_size`` (H, W) resizes folder images; .npz and torchvision data are returned as stored.
    """
    s = str(spec)
    if s.startswith("torchvision:"):
        return _load_torchvision(s)
    path = Path(s)
    if path.is_dir():
        return _load_folder(path, image_size)
    if path.suffix == ".npz" and path.is_file():
        return _load_npz(path)
    raise DataError(
        f"{s}: not found or not a dataset; pass an .npz (x_test, y_test[, x_train, y_train, classes]), "
        "an image folder with one sub-folder per class, or torchvision:cifar10"
    )


def _load_npz(path: Path) -> Dataset:
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read ({e}); is it a numpy .npz file?") from e
    with z:
        if "x_test" not in z or "y_test" not in z:
            raise DataError(f"{path}: needs arrays x_test and y_test (has {', '.join(z.files)})")
        x_test, y_test = z["x_test"], z["y_test"]
        x_train = z["x_train"] if "x_train" in z else x_test[:0]
        y_train = z["y_train"] if "y_train" in z else y_test[:0]
        n_classes = int(max(y_test.max(initial=0), y_train.max(initial=0))) + 1
        classes = tuple(str(c) for c in z["classes"]) if "classes" in z else tuple(str(i) for i in range(n_classes))
    for name, x in (("x_test", x_test), ("x_train", x_train)):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise DataError(f"{path}: {name} must be uint8 (N, H, W, C) RGB 0-255, got {x.dtype} {x.shape}")
    for xs, ys, name in ((x_test, y_test, "test"), (x_train, y_train, "train")):
        if len(xs) != len(ys):
            raise DataError(f"{path}: x_{name} has {len(xs)} images but y_{name} has {len(ys)} labels")
    return Dataset(x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64), classes)


def _load_folder(path: Path, image_size: tuple[int, int] | None) -> Dataset:
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{path}: no class sub-folders; lay images out as {path}/<class>/<image>.jpg")
    images, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((path / name).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            images.append(read_image(f, image_size))
            labels.append(label)
    if not images:
        raise DataError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
    if len({im.shape for im in images}) > 1:
        raise DataError(f"{path}: images differ in size; pass an image size (e.g. --image-size 32x32) to resize them")
    x = np.ascontiguousarray(np.stack(images))
    y = np.asarray(labels, np.int64)
    return Dataset(x[:0], y[:0], x, y, tuple(classes))


def read_image(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image file to uint8 H×W×3 RGB, resized (area interpolation) to ``size`` (H, W) if given."""
    cv2 = require("cv2", extra="camera")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: cannot decode this image; remove or re-save it")
    if size is not None and img.shape[:2] != tuple(size):
        img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img[:, :, ::-1])  # OpenCV decodes BGR


def _load_torchvision(spec: str) -> Dataset:
    parts = spec.split(":", 2)
    name = parts[1].lower()
    root = Path(parts[2]) if len(parts) > 2 else Path.home() / ".cache" / "edgequee" / "datasets"
    if name not in _TORCHVISION:
        raise DataError(f"unknown torchvision dataset {name!r}; supported: {', '.join(sorted(_TORCHVISION))}")
    datasets = require("torchvision.datasets", extra="host")
    cls = getattr(datasets, _TORCHVISION[name])
    try:
        if name == "svhn":
            train, test = cls(root, split="train", download=True), cls(root, split="test", download=True)
        else:
            train, test = cls(root, train=True, download=True), cls(root, train=False, download=True)
    except Exception as e:  # torchvision raises URLError, RuntimeError, … when offline
        raise DataError(f"could not download {name} into {root} ({e}); offline? pass a local .npz instead") from e

    def arrays(ds) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
        x = np.asarray(ds.data)
        x = x.transpose(0, 2, 3, 1) if name == "svhn" else x
        x = x[..., None] if x.ndim == 3 else x
        y = np.asarray(getattr(ds, "targets", getattr(ds, "labels", None)), np.int64)
        return np.ascontiguousarray(x, np.uint8), y

    xtr, ytr = arrays(train)
    xte, yte = arrays(test)
    classes = tuple(getattr(test, "classes", [str(i) for i in range(int(yte.max()) + 1)]))
    return Dataset(xtr, ytr, xte, yte, classes)


def save_npz(path: Path, data: Dataset) -> None:
    """Write ``data`` as a compressed .npz in the format ``load_dataset`` reads (atomically)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez_compressed(
        tmp, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test,
        classes=np.asarray(data.classes),
    )
    os.replace(tmp, path)


def crop_flip(images: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """CIFAR-style augmentation of a uint8 NHWC batch: zero-pad by ``pad``, crop back at a random offset, flip
    horizontally with probability 1/2 (per image)."""
    n, h, w = images.shape[:3]
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = rng.integers(0, 2 * pad + 1, (n, 1)) + np.arange(h)
    cols = rng.integers(0, 2 * pad + 1, (n, 1)) + np.arange(w)
    cols = np.where(rng.random((n, 1)) < 0.5, cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def augmented_copies(images: np.ndarray, copies: int, *, seed: int = 0) -> np.ndarray:
    """``copies`` label-preserving variants of every image, (copies × N, H, W, C) copy after copy: the mirror image
    first, then ``crop_flip`` draws. For enlarging the data a learned gate is fitted on, not for measuring risk;
    wrong where a mirror changes the label (digits, text)."""
    if copies <= 0:
        return images[:0]
    rng = np.random.default_rng(seed)
    out = [np.ascontiguousarray(images[:, :, ::-1])]
    out += [crop_flip(images, rng) for _ in range(copies - 1)]
    return np.concatenate(out)
