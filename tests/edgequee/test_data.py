"""Datasets (.npz, image folders) and `edgequee run` inputs, on the shipped real CIFAR-10 images."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import pytest

from edgequee.bundle import InputSpec
from edgequee.data import Dataset, augmented_copies, crop_flip, load_dataset, save_npz
from edgequee.errors import DataError
from edgequee.inputs import read_inputs

SAMPLE_NPZ = Path(__file__).resolve().parents[2] / "converters" / "zoo" / "cifar10_sample.npz"
SPEC = InputSpec(32, 32)


@pytest.fixture
def cv2(require: Callable[..., ModuleType]) -> ModuleType:
    return require("cv2", extra="camera")


def _write_folder(cv2: Any, root: Path, images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> None:
    for n, (img, label) in enumerate(zip(images, labels)):
        d = root / classes[label]
        d.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(d / f"{n:03d}.png"), np.ascontiguousarray(img[:, :, ::-1]))  # RGB → OpenCV's BGR


def test_load_shipped_npz(sample) -> None:
    ds = load_dataset(SAMPLE_NPZ)
    assert ds.x_train.shape == (256, 32, 32, 3) and ds.x_test.shape == (2000, 32, 32, 3)
    assert ds.x_test.dtype == np.uint8 and ds.y_test.dtype == ds.y_train.dtype == np.int64
    assert ds.classes == sample.classes and ds.classes[0] == "airplane" and len(ds.classes) == 10
    np.testing.assert_array_equal(ds.x_test[:1000], sample.x_test)  # the fixture keeps the first 1000
    assert set(np.unique(ds.y_test)) == set(range(10))
    sub = ds.subset(n_train=5, n_test=7)
    assert len(sub.x_train) == len(sub.y_train) == 5 and len(sub.x_test) == len(sub.y_test) == 7


def test_save_npz_round_trip(sample, tmp_path: Path) -> None:
    ds = Dataset(sample.x_train[:4], sample.y_train[:4], sample.x_test[:6], sample.y_test[:6], sample.classes)
    path = tmp_path / "small.npz"
    save_npz(path, ds)
    again = load_dataset(path)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(again, field), getattr(ds, field))
    assert again.classes == ds.classes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.npz"]


def test_npz_without_train_split_or_classes(sample, tmp_path: Path) -> None:
    path = tmp_path / "test_only.npz"
    np.savez(path, x_test=sample.x_test[:5], y_test=np.array([0, 3, 1, 3, 2]))
    ds = load_dataset(path)
    assert ds.x_train.shape == (0, 32, 32, 3) and ds.classes == ("0", "1", "2", "3")


def test_image_folder(cv2, sample, tmp_path: Path) -> None:
    images, labels = sample.x_test[:12], sample.y_test[:12]
    _write_folder(cv2, tmp_path, images, labels, sample.classes)
    ds = load_dataset(tmp_path)
    present = sorted({sample.classes[y] for y in labels})
    assert ds.classes == tuple(present) and len(ds.x_train) == 0
    # Folder order is class by class, then file name: rebuild that order from the originals.
    order = sorted(range(12), key=lambda n: (sample.classes[labels[n]], n))
    np.testing.assert_array_equal(ds.x_test, images[order])  # PNG is lossless, colours stay RGB
    assert [ds.classes[y] for y in ds.y_test] == [sample.classes[labels[n]] for n in order]


def test_image_folder_resize(cv2, sample, tmp_path: Path) -> None:
    big = np.stack([cv2.resize(im, (40, 48)) for im in sample.x_test[:3]])
    _write_folder(cv2, tmp_path, big, np.zeros(3, np.int64), ("cat",))
    ds = load_dataset(tmp_path, image_size=(32, 32))
    assert ds.x_test.shape == (3, 32, 32, 3) and ds.classes == ("cat",)
    assert load_dataset(tmp_path).x_test.shape == (3, 48, 40, 3)


def test_image_folder_of_mixed_sizes(cv2, sample, tmp_path: Path) -> None:
    _write_folder(cv2, tmp_path, sample.x_test[:2], np.array([0, 1]), ("a", "b"))
    cv2.imwrite(str(tmp_path / "b" / "big.png"), cv2.resize(sample.x_test[2], (40, 40)))
    with pytest.raises(DataError, match=r"images differ in size \(.*\); resize them to one size, or load the folder"):
        load_dataset(tmp_path)
    assert load_dataset(tmp_path, image_size=(32, 32)).x_test.shape == (3, 32, 32, 3)


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _junk(path: Path) -> Path:
    path.write_bytes(b"not a zip")
    return path


def _dirs(root: Path, *parts: str) -> Path:
    (root.joinpath(*parts)).mkdir(parents=True)
    return root / parts[0]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d, s: d / "nothing.npz", "nothing.npz: not found or not a dataset"),
        (lambda d, s: _npz(d / "no_test.npz", x_train=s.x_train[:2], y_train=s.y_train[:2]),
         r"needs arrays x_test and y_test \(has x_train, y_train\)"),
        (lambda d, s: _npz(d / "float.npz", x_test=s.x_test[:2].astype(np.float32), y_test=s.y_test[:2]),
         r"x_test must be uint8 \(N, H, W, C\)"),
        (lambda d, s: _npz(d / "short.npz", x_test=s.x_test[:3], y_test=s.y_test[:2]),
         "x_test has 3 images but y_test has 2 labels"),
        (lambda d, s: _junk(d / "junk.npz"), "junk.npz: cannot read"),
        (lambda d, s: _dirs(d, "empty"), "no class sub-folders"),
        (lambda d, s: _dirs(d, "noimg", "cat"), "no images"),
    ],
)
def test_bad_datasets(sample, tmp_path: Path, make: Callable[..., Path], message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_dataset(make(tmp_path, sample))


def test_unknown_torchvision_dataset() -> None:
    with pytest.raises(DataError, match="unknown torchvision dataset 'imagenet'; supported: cifar10, cifar100"):
        load_dataset("torchvision:imagenet")


def test_undecodable_image(cv2, tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png: cannot decode this image"):
        load_dataset(tmp_path)


def test_read_inputs(cv2, sample, tmp_path: Path) -> None:
    _write_folder(cv2, tmp_path / "folder", sample.x_test[:2], np.array([0, 0]), ("x",))
    cv2.imwrite(str(tmp_path / "big.jpg"), cv2.resize(sample.x_test[2], (64, 64)))
    npz = _npz(tmp_path / "few.npz", x_test=sample.x_test[3:5], y_test=sample.y_test[3:5])
    got = list(read_inputs([str(tmp_path / "folder"), str(tmp_path / "big.jpg"), str(npz)], SPEC))
    names = [item.name for item in got]
    assert names[:2] == [str(tmp_path / "folder" / "x" / f"{n:03d}.png") for n in range(2)]
    assert names[2:] == [str(tmp_path / "big.jpg"), "few.npz[0]", "few.npz[1]"]
    assert all(item.error is None and item.unwrap().shape == (32, 32, 3) and item.unwrap().dtype == np.uint8
               for item in got)
    np.testing.assert_array_equal(got[0].image, sample.x_test[0])
    np.testing.assert_array_equal(got[4].image, sample.x_test[4])
    with pytest.raises(DataError, match="nope.png: no such file or folder"):
        list(read_inputs([str(tmp_path / "nope.png")], SPEC))


def test_read_inputs_bad_npz(tmp_path: Path) -> None:
    """A missing .npz input is a DataError at once; an unreadable one is an input with an error naming the file
    (edgequee run reports it and goes on), which ``unwrap`` raises."""
    _junk(tmp_path / "junk.npz")
    with pytest.raises(DataError, match="nope.npz"):
        read_inputs([str(tmp_path / "nope.npz")], SPEC)
    (item,) = read_inputs([str(tmp_path / "junk.npz")], SPEC)
    assert item.image is None and item.error is not None and "junk.npz: cannot read images" in item.error
    with pytest.raises(DataError, match="junk.npz"):
        item.unwrap()


def test_crop_flip_and_augmented_copies_keep_the_pixels() -> None:
    x = load_dataset(SAMPLE_NPZ).x_test[:8]
    rng = np.random.default_rng(0)
    same = crop_flip(x, rng, pad=0)  # no room to move: each image is itself or its mirror
    assert same.shape == x.shape and same.dtype == np.uint8
    assert all(np.array_equal(o, i) or np.array_equal(o, i[:, ::-1]) for o, i in zip(same, x))
    assert any(not np.array_equal(o, i) for o, i in zip(same, x))
    moved = crop_flip(x, rng, pad=4)
    assert moved.shape == x.shape and not np.array_equal(moved, x)
    copies = augmented_copies(x, 3, seed=1)
    assert copies.shape == (24, *x.shape[1:]) and np.array_equal(copies[:8], x[:, :, ::-1])
    assert np.array_equal(copies, augmented_copies(x, 3, seed=1))  # seeded: cacheable
    assert augmented_copies(x, 0).shape == (0, *x.shape[1:])
