"""Bad data and inputs: every fault is a one-line error naming the fix, or the correct result; never a traceback,
never a silent wrong number. One test per fault, each written against the fault first (it failed before the fix).

The CLI tests run `edgequee bench/calibrate/run` through click's CliRunner on the session's real converted bundle
(the ``converted``/``bundle_copy`` fixtures): ResNet-20 on the CIFAR-10 classes, 32×32×3 RGB.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import pytest
from clirun import invoke, one_line_error

from edgequee.bundle import InputSpec
from edgequee.data import check_labels, load_dataset, read_image
from edgequee.errors import DataError
from edgequee.inputs import _fit, read_inputs

REPO = Path(__file__).resolve().parents[2]
# The fastest bench that still runs every stage: one precision, no early exit, 2 images timed in 1 round.
FAST_BENCH = ("--latency-samples", "2", "--rounds", "1", "--precisions", "fp32", "--thresholds", "inf")
GRAY = InputSpec(32, 32, channels=1, mean=(0.0,), std=(1.0,), color="grayscale")


def _bench_json(bundle: Path, data: Path) -> dict[str, Any]:
    result = invoke("bench", bundle, "--data", data, *FAST_BENCH, "--json", "-")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def cv2(require: Callable[..., ModuleType]) -> ModuleType:
    return require("cv2", extra="camera")


def _png(cv2: Any, path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]) if rgb.ndim == 3 and rgb.shape[2] == 3 else rgb)
    return path


def _npz(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


# ------------------------------------------------------------------------------------------------- labels


@pytest.mark.slow
@pytest.mark.parametrize("shift, shown", [(100, "outside 0..9"), (-1, "negative")])
def test_bench_refuses_labels_outside_the_models_classes(converted, sample, tmp_path: Path, shift: int,
                                                         shown: str) -> None:
    """Was: y+100 or -1 benched as 0.00 % accuracy with exit code 0."""
    y = sample.y_test[:40] + shift if shift > 0 else np.full(40, shift)
    data = _npz(tmp_path / "bad.npz", x_test=sample.x_test[:40], y_test=y)
    line = one_line_error(invoke("bench", converted.path, "--data", data, *FAST_BENCH))
    assert "bad.npz: y_test" in line and shown in line and ("airplane" in line or "class indices" in line)


@pytest.mark.slow
def test_bench_bundle_refuses_labels_outside_the_models_classes(converted, sample) -> None:
    """bench_bundle itself checks labels against the model's classes (library callers, not only the CLI)."""
    from edgequee.bench import bench_bundle
    from edgequee.bundle import load_bundle

    with pytest.raises(DataError, match=r"bench labels: 10 of 10 labels are outside 0\.\.9 .*airplane"):
        bench_bundle(load_bundle(converted.path), sample.x_test[:10], sample.y_test[:10] + 100)


@pytest.mark.slow
@pytest.mark.parametrize("shift", [100, -1])
def test_calibrate_refuses_labels_outside_the_models_classes(bundle_copy: Path, sample, tmp_path: Path,
                                                             shift: int) -> None:
    """Was: calibrate certified a threshold from labels no prediction can match, and stored it."""
    y = sample.y_test[:300] + shift if shift > 0 else np.full(300, shift)
    data = _npz(tmp_path / "bad.npz", x_test=sample.x_test[:300], y_test=y)
    result = invoke("calibrate", bundle_copy, "--data", data, "--policy", "threshold", "--precision", "int8",
                     "--epsilon", "0.05", "--method", "crc")
    assert "bad.npz: y_test" in one_line_error(result)
    assert not (bundle_copy / "policy").exists()


@pytest.mark.slow
def test_nan_labels(converted, sample, tmp_path: Path) -> None:
    """Was: ValueError traceback (cannot convert float NaN to integer) in the .npz loader."""
    y = sample.y_test[:20].astype(np.float64)
    y[3] = np.nan
    data = _npz(tmp_path / "nan.npz", x_test=sample.x_test[:20], y_test=y)
    line = one_line_error(invoke("bench", converted.path, "--data", data, *FAST_BENCH))
    assert "nan.npz: y_test: 1 label(s) are NaN (first at index 3)" in line


@pytest.mark.slow
def test_two_dimensional_labels(converted, sample, tmp_path: Path) -> None:
    """Was: a numpy broadcasting traceback in bench (one-hot labels (N, 10))."""
    data = _npz(tmp_path / "onehot.npz", x_test=sample.x_test[:20], y_test=np.eye(10)[sample.y_test[:20]])
    line = one_line_error(invoke("bench", converted.path, "--data", data, *FAST_BENCH))
    assert "must be a 1-D array of class indices (N,), got shape (20, 10)" in line and "argmax" in line


def test_fractional_labels(sample, tmp_path: Path) -> None:
    """Float labels with fractions were truncated silently by astype(int64)."""
    data = _npz(tmp_path / "frac.npz", x_test=sample.x_test[:4], y_test=np.array([0.0, 1.5, 2.0, 3.0]))
    with pytest.raises(DataError, match=r"frac.npz: y_test: labels must be whole class indices, got 1.5 at index 1"):
        load_dataset(data)
    np.testing.assert_array_equal(check_labels(np.array([0.0, 2.0]), 3, "x"), [0, 2])  # whole floats are fine


@pytest.mark.slow
def test_object_array_npz(converted, sample, tmp_path: Path) -> None:
    """Was: ValueError traceback 'Object arrays cannot be loaded when allow_pickle=False'."""
    data = _npz(tmp_path / "obj.npz", x_test=sample.x_test[:20], y_test=np.array(list(sample.y_test[:20]), object))
    line = one_line_error(invoke("bench", converted.path, "--data", data, *FAST_BENCH))
    assert "obj.npz: y_test is an object array" in line and "np.int64" in line


def test_npz_labels_beyond_its_own_classes(sample, tmp_path: Path) -> None:
    """An .npz whose labels index past its own classes array was loaded with the classes array ignored."""
    data = _npz(tmp_path / "few.npz", x_test=sample.x_test[:3], y_test=np.array([0, 1, 2]),
                classes=np.array(["cat", "dog"]))
    with pytest.raises(DataError, match=r"few.npz: y_test \(its classes array has 2 names\): 1 of 3 labels are "
                                        r"outside 0\.\.1"):
        load_dataset(data)


# ---------------------------------------------------------------------------------------- class names


@pytest.mark.slow
def test_partial_class_folder_is_labelled_by_name(converted, sample, cv2, tmp_path: Path) -> None:
    """Was: a folder with only cat/, dog/, ship/ got labels 0, 1, 2 (sorted folder order), so 0.00 % and exit 0."""
    keep = np.flatnonzero(np.isin(sample.y_test[:300], [3, 5, 8]))
    for n in keep:
        _png(cv2, tmp_path / "folder" / sample.classes[sample.y_test[n]] / f"{n:03d}.png", sample.x_test[n])
    npz = _npz(tmp_path / "same.npz", x_test=sample.x_test[keep], y_test=sample.y_test[keep])
    from_folder, from_npz = _bench_json(converted.path, tmp_path / "folder"), _bench_json(converted.path, npz)
    assert from_folder["n_images"] == from_npz["n_images"] == len(keep)
    for p in from_npz["whole_model"]:
        assert from_folder["whole_model"][p]["accuracy"] == from_npz["whole_model"][p]["accuracy"]
    assert from_folder["exit_accuracy"] == from_npz["exit_accuracy"]
    assert [r["accuracy"] for r in from_folder["policies"]] == [r["accuracy"] for r in from_npz["policies"]]
    if converted.trained:
        assert from_npz["whole_model"]["fp32"]["accuracy"] > 0.5


def test_folder_named_by_class_index(sample, cv2, tmp_path: Path) -> None:
    """Sub-folders named "3", "5" (the model's class indices) label their images 3 and 5."""
    classes = sample.classes
    for n, label in enumerate([3, 5, 5]):
        _png(cv2, tmp_path / str(label) / f"{n}.png", sample.x_test[n])
    ds = load_dataset(tmp_path, classes=classes)
    assert ds.y_test.tolist() == [3, 5, 5] and ds.classes == classes


def test_hidden_folders_are_not_classes(sample, cv2, tmp_path: Path) -> None:
    """A notebook's .ipynb_checkpoints/ (or .git/) beside the class folders is not an unknown class."""
    _png(cv2, tmp_path / "cat" / "a.png", sample.x_test[0])
    (tmp_path / ".ipynb_checkpoints").mkdir()
    ds = load_dataset(tmp_path, classes=("airplane", "cat"))
    assert ds.y_test.tolist() == [1]


@pytest.mark.slow
def test_unknown_class_folder_name(converted, sample, cv2, tmp_path: Path) -> None:
    """Was: a folder named zebra/ was benched as class 0 (airplane), 0.00 % and exit 0."""
    _png(cv2, tmp_path / "data" / "cat" / "a.png", sample.x_test[0])
    _png(cv2, tmp_path / "data" / "zebra" / "b.png", sample.x_test[1])
    line = one_line_error(invoke("bench", converted.path, "--data", tmp_path / "data", *FAST_BENCH))
    assert "sub-folder(s) zebra are not classes of the model" in line
    assert "airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck" in line and "0..9" in line


@pytest.mark.slow
def test_npz_classes_share_nothing_with_the_model(converted, sample, tmp_path: Path) -> None:
    """Was: an .npz of classes c0..c9 was benched against the model's airplane..truck as if they were the same."""
    data = _npz(tmp_path / "foreign.npz", x_test=sample.x_test[:20], y_test=sample.y_test[:20],
                classes=np.array([f"c{i}" for i in range(10)]))
    line = one_line_error(invoke("bench", converted.path, "--data", data, *FAST_BENCH))
    assert "foreign.npz: its classes (c0, c1" in line and "share none with the model's (airplane" in line


def test_npz_classes_in_another_order_are_remapped_by_name(sample, tmp_path: Path) -> None:
    """Chosen behaviour: an .npz naming the model's classes in another order is relabelled by name; a class the
    model lacks is refused. (Was: its indices were taken as the model's, so every label was wrong.)"""
    order = np.array([9, 2, 0, 4, 1, 3, 8, 5, 7, 6])  # the npz's class k is the model's class order[k]
    inverse = np.argsort(order)
    data = _npz(tmp_path / "shuffled.npz", x_test=sample.x_test[:50], y_test=inverse[sample.y_test[:50]],
                classes=np.asarray(sample.classes)[order])
    ds = load_dataset(data, classes=sample.classes)
    np.testing.assert_array_equal(ds.y_test, sample.y_test[:50])
    assert ds.classes == sample.classes
    extra = _npz(tmp_path / "extra.npz", x_test=sample.x_test[:2], y_test=np.array([0, 1]),
                 classes=np.array(["cat", "zebra"]))
    with pytest.raises(DataError, match=r"extra.npz: classes zebra are not classes of the model"):
        load_dataset(extra, classes=sample.classes)


# ------------------------------------------------------------------------------------------------- channels


def test_one_channel_png_decodes_to_one_channel(sample, cv2, tmp_path: Path) -> None:
    """Was: read_image always decoded 3 channels (no channels argument), so a 1-channel model could not be fed."""
    gray = cv2.cvtColor(np.ascontiguousarray(sample.x_test[0]), cv2.COLOR_RGB2GRAY)  # (32, 32)
    gray_png = _png(cv2, tmp_path / "g" / "cat" / "gray.png", gray)
    color_png = _png(cv2, tmp_path / "g" / "cat" / "color.png", sample.x_test[1])
    img = read_image(gray_png, channels=1)
    assert img.shape == (32, 32, 1) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[:, :, 0], gray)  # PNG is lossless
    assert read_image(color_png, channels=1).shape == (32, 32, 1)  # a colour file becomes grayscale
    assert read_image(gray_png, (16, 16), channels=1).shape == (16, 16, 1)  # resizing keeps the channel axis
    assert read_image(gray_png).shape == (32, 32, 3)  # the default stays RGB
    assert load_dataset(tmp_path / "g", (16, 16), channels=1).x_test.shape == (2, 16, 16, 1)
    got = list(read_inputs([str(tmp_path / "g")], InputSpec(16, 16, channels=1, mean=(0.0,), std=(1.0,))))
    assert [x.image.shape for x in got if x.image is not None] == [(16, 16, 1)] * 2


def test_fit_message_for_a_one_channel_model(sample) -> None:
    """Was: 'expected uint8 H×W×1 RGB' for a grayscale model."""
    with pytest.raises(DataError) as e:
        _fit(sample.x_test[0], GRAY, "x.npz[0]")
    assert "expected uint8 H×W×1 grayscale" in str(e.value) and "RGB" not in str(e.value)
    assert _fit(np.zeros((64, 48, 1), np.uint8), GRAY, "y").shape == (32, 32, 1)  # resized, channel kept


def test_mixed_sizes_message_names_no_missing_flag(sample, cv2, tmp_path: Path) -> None:
    """Was: 'pass an image size (e.g. --image-size 32x32)', a flag no command has."""
    _png(cv2, tmp_path / "a" / "0.png", sample.x_test[0])
    _png(cv2, tmp_path / "a" / "1.png", cv2.resize(sample.x_test[1], (40, 40)))
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path)
    assert "--image-size" not in str(e.value) and "images differ in size" in str(e.value)
    assert "edgequee bench or calibrate, which resize folder images to the model's input size" in str(e.value)


# ---------------------------------------------------------------------------------------------- permissions

_PERMISSION_CHECK = """
import sys
from edgequee.data import load_dataset, read_image
from edgequee.errors import DataError
for call in (lambda: read_image(sys.argv[1]), lambda: load_dataset(sys.argv[2])):
    try:
        call()
    except DataError as e:
        print(e)
"""


def test_unreadable_image_is_a_permission_error(sample, cv2, tmp_path: Path) -> None:
    """Was: 'cannot decode this image; remove or re-save it' for a file that is fine but unreadable (chmod 000).

    root reads a chmod 000 file anyway: as root the check runs in a subprocess without CAP_DAC_OVERRIDE (setpriv),
    and is skipped where that is not possible."""
    f = _png(cv2, tmp_path / "data" / "cat" / "locked.png", sample.x_test[0])
    f.chmod(0)
    try:
        cmd = [sys.executable, "-c", _PERMISSION_CHECK, str(f), str(tmp_path / "data")]
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root (chmod 000 does not stop root) and no setpriv to drop that")
            drop = "-dac_override,-dac_read_search"
            cmd = [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}", *cmd]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, cwd=REPO)
        if os.geteuid() == 0 and proc.returncode != 0 and "setpriv" in proc.stderr:
            pytest.skip(f"running as root and setpriv cannot drop CAP_DAC_OVERRIDE here: {proc.stderr.strip()}")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.strip().splitlines()
        want = f"permission denied: {f}; fix its permissions"
        assert len(lines) == 2 and all(line.startswith(want) for line in lines), proc.stdout
    finally:
        f.chmod(0o644)


# ---------------------------------------------------------------------------------------------- edgequee run


@pytest.mark.slow
def test_run_continues_past_a_bad_file(converted, sample, cv2, tmp_path: Path) -> None:
    """Was: the first undecodable file aborted the run: no other results, no --json file."""
    good = [_png(cv2, tmp_path / f"img{n}.png", sample.x_test[n]) for n in range(2)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    out = tmp_path / "run.json"
    result = invoke("run", converted.path, good[0], broken, junk, good[1], "--json", out)
    assert result.exit_code == 1, result.output
    rows = json.loads(out.read_text())["results"]
    assert [r["input"] for r in rows] == [str(good[0]), str(broken), str(junk), str(good[1])]
    assert rows[1] == {"input": str(broken), "error": f"{broken}: cannot decode this image; remove or re-save it"}
    assert set(rows[2]) == {"input", "error"} and "junk.npz: cannot read images from this .npz" in rows[2]["error"]
    assert all("class" in rows[k] and "error" not in rows[k] for k in (0, 3))
    assert result.stdout.count("exit ") == 2  # both good images classified
    err = result.stderr.strip().splitlines()
    assert f"error: {broken}: cannot decode this image; remove or re-save it" in err
    assert err[-1] == (f"Error: 2 of 4 inputs could not be read ({broken}, {junk}; reasons above): fix or remove "
                       "them")


@pytest.mark.slow
def test_calibrate_unlabeled_stops_at_a_bad_file(bundle_copy: Path, sample, cv2, tmp_path: Path) -> None:
    """Chosen behaviour: calibration must see every image it is given, so a bad file stops it (one line)."""
    for n in range(3):
        _png(cv2, tmp_path / "imgs" / f"{n}.png", sample.x_test[n])
    (tmp_path / "imgs" / "1b.png").write_bytes(b"not a png")
    result = invoke("calibrate", bundle_copy, "--unlabeled", tmp_path / "imgs", "--policy", "threshold",
                     "--precision", "int8", "--epsilon", "0.05")
    assert "1b.png: cannot decode this image" in one_line_error(result)


# ------------------------------------------------------------------------------------------- bench, 0 images


@pytest.mark.slow
@pytest.mark.parametrize("how, message", [
    (("--n-images", "0"), "--n-images must be at least 1, got 0"),
    (("--n-images", "-1"), "--n-images must be at least 1, got -1"),  # was: silently benched all but the last
    ((), "no test images to benchmark"),  # an .npz whose test split is empty
])
def test_bench_with_zero_images(converted, sample, tmp_path: Path, how: tuple[str, ...], message: str) -> None:
    n = 0 if not how else 10
    data = _npz(tmp_path / "d.npz", x_test=sample.x_test[:n], y_test=sample.y_test[:n],
                x_train=sample.x_train[:2], y_train=sample.y_train[:2])
    assert message in one_line_error(invoke("bench", converted.path, "--data", data, *how, *FAST_BENCH))
