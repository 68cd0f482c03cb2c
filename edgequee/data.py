"""Datasets: an .npz, an image folder (one sub-folder per class), or a torchvision dataset when online.

Everything comes back as uint8 NHWC images (RGB, or grayscale with one channel) and int64 labels, the form the
converter, runtime and bench use. Labelled data meant for a model goes through ``check_labels`` against the model's
classes; ``load_dataset(..., classes=MODEL_CLASSES)`` labels folders and class-named .npz files by the model's class
names.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ._lazy import require
from .errors import DataError

__all__ = ["Dataset", "load_dataset", "save_npz", "read_image", "npz_array", "check_labels", "crop_flip",
           "augmented_copies", "IMAGE_SUFFIXES"]

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


def _names(classes: Sequence[str], limit: int = 20) -> str:
    """Class names for a one-line message: all of them, or the first ``limit`` and how many more."""
    shown = ", ".join(str(c) for c in list(classes)[:limit])
    return shown + (f", … ({len(classes) - limit} more)" if len(classes) > limit else "")


def check_labels(labels: np.ndarray, num_classes: int | None, where: str,
                 classes: Sequence[str] | None = None) -> np.ndarray:
    """``labels`` as int64 class indices, checked: 1-D, numeric, no NaN, whole numbers, in ``[0, num_classes)``.

    ``num_classes`` is the model's (``len(manifest.classes)``) wherever labelled data meets a model; None checks
    only that labels are non-negative class indices. ``where`` (the data set, or the split) starts every message;
    ``classes`` (the model's names) are listed when a label is out of range. Raises DataError naming the fix.
    """
    y = np.asarray(labels)
    if y.dtype == object:
        raise DataError(f"{where}: labels are an object array; save them as integer class indices "
                        "(np.asarray(labels, np.int64))")
    if y.ndim != 1:
        hint = "; one-hot or per-class scores? save y.argmax(1)" if y.ndim == 2 else ""
        raise DataError(f"{where}: labels must be a 1-D array of class indices (N,), got shape {y.shape}{hint}")
    if y.dtype.kind not in "biuf":
        raise DataError(f"{where}: labels must be integer class indices, got dtype {y.dtype}; "
                        "save them as np.int64 (class names go in a separate classes array)")
    if y.dtype.kind == "f":
        nan = np.flatnonzero(np.isnan(y))
        if len(nan):
            raise DataError(f"{where}: {len(nan)} label(s) are NaN (first at index {nan[0]}); every image needs an "
                            "integer class index: fix or drop those images")
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if len(bad):
            raise DataError(f"{where}: labels must be whole class indices, got {y[bad[0]].item()!r} at index {bad[0]} "
                            f"({len(bad)} such); save integer labels (np.int64)")
        if len(y) and (y.min() < np.iinfo(np.int64).min or y.max() > np.iinfo(np.int64).max):
            raise DataError(f"{where}: labels out of the int64 range; save integer class indices")
    y = y.astype(np.int64)
    lo, hi = 0, num_classes
    bad = np.flatnonzero((y < lo) | (y >= hi)) if hi is not None else np.flatnonzero(y < lo)
    if len(bad):
        if hi is None:
            raise DataError(f"{where}: {len(bad)} of {len(y)} labels are negative (e.g. {y[bad[0]]} at index "
                            f"{bad[0]}); labels are class indices 0, 1, …: fix or drop those images")
        named = f" ({_names(classes)})" if classes is not None else ""
        raise DataError(f"{where}: {len(bad)} of {len(y)} labels are outside 0..{hi - 1} (e.g. {y[bad[0]]} at index "
                        f"{bad[0]}); the model has {hi} classes{named}: relabel the data as indices into them")
    return y


def _class_index(names: Sequence[str], classes: Sequence[str]) -> list[int | None]:
    """The model's index for each of ``names``: by class name, else a name that is an index ("0".."K-1") is taken
    as that index; None where neither."""
    by_name = {c: i for i, c in enumerate(classes)}
    out: list[int | None] = []
    for n in names:
        if n in by_name:
            out.append(by_name[n])
        elif n.isdigit() and int(n) < len(classes):
            out.append(int(n))
        else:
            out.append(None)
    return out


def load_dataset(spec: str | os.PathLike[str], image_size: tuple[int, int] | None = None, *,
                 classes: Sequence[str] | None = None, channels: int = 3) -> Dataset:
    """Load ``spec``: ``path.npz``, an image folder, or ``torchvision:NAME[:ROOT]`` (downloads when online).

    An image folder has one sub-folder per class; all its images are the test split. ``image_size`` (H, W) resizes
    folder images and ``channels`` (1: grayscale, 3: RGB) is what they are decoded to; .npz and torchvision data are
    returned as stored.

    ``classes`` are the class names of the model the data is for (``bundle.manifest.classes``). With them, labels
    are indices into the model's classes and the returned ``classes`` are the model's: a folder's sub-folders are
    looked up by name (or by index, for sub-folders named "0".."K-1"), so a folder with only some of the classes is
    labelled right, and an unknown sub-folder is an error; an .npz with a ``classes`` array is relabelled by name
    (its classes may come in another order than the model's); a class of the data the model lacks is an error.
    An .npz without ``classes`` (and torchvision data) must already use the model's indices. Without ``classes``
    a folder's sorted sub-folder names are the class order.
    """
    s = str(spec)
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if s.startswith("torchvision:"):
        return _load_torchvision(s)
    path = Path(s)
    if path.is_dir():
        return _load_folder(path, image_size, classes, channels)
    if path.suffix == ".npz" and path.is_file():
        return _load_npz(path, classes)
    raise DataError(
        f"{s}: not found or not a dataset; pass an .npz (x_test, y_test[, x_train, y_train, classes]), "
        "an image folder with one sub-folder per class, or torchvision:cifar10"
    )


def npz_array(z: np.lib.npyio.NpzFile, path: Path, key: str) -> np.ndarray:
    """``z[key]`` of the .npz at ``path``, an object array or a corrupt archive being a one-line DataError."""
    try:
        return z[key]
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DataError(f"{path}: {key} is an object array (pickled Python objects), which edgequee does not "
                            "load; save it as a plain array: labels np.int64, images np.uint8, class names "
                            "np.asarray(names, dtype=str)") from e
        raise DataError(f"{path}: cannot read {key} ({e}); re-save the .npz") from e
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # a truncated or corrupt archive
        raise DataError(f"{path}: cannot read {key} ({type(e).__name__}: {e}); re-save the .npz") from e


def _load_npz(path: Path, model_classes: Sequence[str] | None = None) -> Dataset:
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read ({e}); is it a numpy .npz file?") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds a single array, not an .npz archive; save it with "
                        "np.savez(path, x_test=images, y_test=labels)")
    with z:
        if "x_test" not in z or "y_test" not in z:
            raise DataError(f"{path}: needs arrays x_test and y_test (has {', '.join(z.files)})")
        x_test, y_test = npz_array(z, path, "x_test"), npz_array(z, path, "y_test")
        x_train = npz_array(z, path, "x_train") if "x_train" in z else x_test[:0]
        y_train = npz_array(z, path, "y_train") if "y_train" in z else y_test[:0]
        stored = npz_array(z, path, "classes") if "classes" in z else None
    for name, x in (("x_test", x_test), ("x_train", x_train)):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            hint = ("; save pixels as np.uint8 0-255 (floats in 0-1: (x * 255).round().astype(np.uint8))"
                    if x.dtype.kind in "fiu" and x.ndim == 4 else "")
            raise DataError(f"{path}: {name} must be uint8 (N, H, W, C) images with C = 3 (RGB) or 1 (grayscale), "
                            f"values 0-255, got {x.dtype} {x.shape}{hint}")
    if len(x_test) == 0 and len(x_train) == 0:
        raise DataError(f"{path}: holds no images (x_test and x_train are empty); save at least one test image")
    names = _npz_classes(stored, path) if stored is not None else None
    n = len(names) if names is not None else None
    of_names = f" (its classes array has {n} names)" if n is not None else ""
    y_test = check_labels(y_test, n, f"{path}: y_test{of_names}")
    y_train = check_labels(y_train, n, f"{path}: y_train{of_names}")
    for xs, ys, name in ((x_test, y_test, "test"), (x_train, y_train, "train")):
        if len(xs) != len(ys):
            raise DataError(f"{path}: x_{name} has {len(xs)} images but y_{name} has {len(ys)} labels")
    if names is None:
        n_classes = int(max(y_test.max(initial=0), y_train.max(initial=0))) + 1
        names = tuple(str(i) for i in range(n_classes))
        if model_classes is not None:  # plain indices: they must be the model's
            return Dataset(x_train, check_labels(y_train, len(model_classes), f"{path}: y_train", model_classes),
                           x_test, check_labels(y_test, len(model_classes), f"{path}: y_test", model_classes),
                           tuple(model_classes))
        return Dataset(x_train, y_train, x_test, y_test, names)
    if model_classes is None:
        return Dataset(x_train, y_train, x_test, y_test, names)
    index = _class_index(names, model_classes)
    if all(i is None for i in index):
        raise DataError(f"{path}: its classes ({_names(names)}) share none with the model's ({_names(model_classes)});"
                        " use data of the model's classes, named as the model names them")
    used = np.unique(np.concatenate([y_test, y_train]))
    unknown = [names[k] for k in used if index[k] is None]
    if unknown:
        raise DataError(f"{path}: classes {_names(unknown)} are not classes of the model ({_names(model_classes)}); "
                        "drop those images or rename the classes to the model's")
    remap = np.array([-1 if i is None else i for i in index], np.int64)
    return Dataset(x_train, remap[y_train], x_test, remap[y_test], tuple(model_classes))


def _npz_classes(stored: np.ndarray, path: Path) -> tuple[str, ...]:
    if stored.ndim != 1 or stored.dtype.kind not in "USiu":
        raise DataError(f"{path}: classes must be a 1-D array of class names, got {stored.dtype} {stored.shape}; "
                        "save np.asarray(names, dtype=str)")
    names = tuple(c.decode() if isinstance(c, bytes) else str(c) for c in stored.tolist())
    if len(set(names)) != len(names):
        dup = sorted({c for c in names if names.count(c) > 1})
        raise DataError(f"{path}: class name(s) {_names(dup)} appear more than once in classes; give each class "
                        "one name")
    return names


def _load_folder(path: Path, image_size: tuple[int, int] | None, model_classes: Sequence[str] | None = None,
                 channels: int = 3) -> Dataset:
    try:
        folders = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))  # not .git
    except OSError as e:
        raise DataError(f"{path}: cannot list this folder ({e.strerror or e}); fix its permissions") from e
    if not folders:
        raise DataError(f"{path}: no class sub-folders; lay images out as {path}/<class>/<image>.jpg")
    if model_classes is None:
        classes, index = tuple(folders), list(range(len(folders)))
    else:
        classes, found = tuple(model_classes), _class_index(folders, model_classes)
        unknown = [f for f, i in zip(folders, found) if i is None]
        if unknown:
            raise DataError(f"{path}: sub-folder(s) {_names(unknown)} are not classes of the model; name each "
                            f"sub-folder after one of its {len(classes)} classes ({_names(classes)}) or its index "
                            f"0..{len(classes) - 1}")
        index = [i for i in found if i is not None]
    images, labels, files = [], [], []
    for label, name in zip(index, folders):
        try:
            entries = sorted((path / name).iterdir())
        except OSError as e:
            raise DataError(f"{path / name}: cannot list this folder ({e.strerror or e}); fix its permissions") from e
        for f in entries:
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            images.append(read_image(f, image_size, channels))
            labels.append(label)
            files.append(f)
    if not images:
        raise DataError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
    sizes = [im.shape[:2] for im in images]
    if len(set(sizes)) > 1:
        other = next(k for k, s in enumerate(sizes) if s != sizes[0])
        raise DataError(
            f"{path}: images differ in size ({files[0].name} is {sizes[0][0]}x{sizes[0][1]}, {files[other]} is "
            f"{sizes[other][0]}x{sizes[other][1]}); resize them to one size, or load the folder with edgequee bench "
            "or calibrate, which resize folder images to the model's input size (in Python: "
            "load_dataset(folder, image_size=(H, W)))")
    x = np.ascontiguousarray(np.stack(images))
    y = np.asarray(labels, np.int64)
    return Dataset(x[:0], y[:0], x, y, classes)


def read_image(path: str | os.PathLike[str], size: tuple[int, int] | None = None, channels: int = 3) -> np.ndarray:
    """Decode an image file to uint8 H×W×3 RGB (``channels=3``) or H×W×1 grayscale (``channels=1``), resized (area
    interpolation) to ``size`` (H, W) if given. Raises DataError naming the file when it cannot be read or decoded."""
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    cv2 = require("cv2", extra="camera")
    path = Path(path)
    try:  # cv2.imread returns None for an unreadable file and for an undecodable one alike: tell them apart first
        with open(path, "rb"):
            pass
    except PermissionError as e:
        raise DataError(f"permission denied: {path}; fix its permissions (e.g. chmod a+r {path})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror or e}); give a readable image file") from e
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: cannot decode this image; remove or re-save it")
    if size is not None and img.shape[:2] != tuple(size):
        img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    if channels == 1:
        return np.ascontiguousarray(img.reshape(*img.shape[:2], 1))
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
