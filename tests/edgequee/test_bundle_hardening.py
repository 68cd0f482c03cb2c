"""A bundle is a sealed artifact: confinement, schema, transactions and certificates bound to their policy.

Each test reproduces one fault found by probing the tool as a careful user and an attacker would (issue 16):
it failed, or harmed a file outside the bundle, before the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from clirun import invoke, one_line_error

from edgequee.bundle import (
    MANIFEST,
    Bundle,
    load_bundle,
    staging_dir,
    write_bundle,
    write_policy,
    write_profile,
)
from edgequee.calibrate import calibrate_bundle
from edgequee.cost import load_profile
from edgequee.errors import BundleError, DeviceError, EdgequeeError
from edgequee.policies import ThresholdPolicy, to_stored
from edgequee.runtime import EdgeRunner

REPO = Path(__file__).resolve().parents[2]
SAMPLE_NPZ = REPO / "converters" / "zoo" / "cifar10_sample.npz"


def _canaries(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"notes.txt": b"my notes\n", "policy-0123456789ab.json": b"{}\n", "id_rsa": b"PRIVATE KEY\n"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def _intact(folder: Path, files: dict[str, bytes]) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)
    for name, data in files.items():
        assert (folder / name).read_bytes() == data


def _edit_manifest(bundle: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    m = json.loads((bundle / MANIFEST).read_text())
    edit(m)
    (bundle / MANIFEST).write_text(json.dumps(m))


def _store_threshold(bundle: Path, threshold: float = 0.9) -> Bundle:
    return write_policy(load_bundle(bundle), to_stored(ThresholdPolicy("fp32", threshold)))


def _calibrate(bundle: Path, n: int, epsilon: float = 0.1, method: str = "ucb-wsr", **kw: Any) -> dict[str, Any]:
    with np.load(SAMPLE_NPZ) as z:
        x, y = z["x_test"][:n], z["y_test"][:n]
    return calibrate_bundle(load_bundle(bundle), x, y, policy="threshold", epsilon=epsilon, method=method, **kw)


# ------------------------------------------------------------------------------------- confinement: writes


def test_symlinked_policy_folder_is_refused_and_its_target_untouched(bundle_copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    files = _canaries(outside)
    (bundle_copy / "policy").symlink_to(outside, target_is_directory=True)
    with pytest.raises(BundleError, match="policy is a symlink; a bundle holds plain files only"):
        _store_threshold(bundle_copy)
    _intact(outside, files)


def test_symlinked_profiles_folder_is_refused_and_its_target_untouched(bundle_copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    files = _canaries(outside)
    b = load_bundle(bundle_copy)  # loaded before the link was planted, as by a long-running profile
    (bundle_copy / "profiles").symlink_to(outside, target_is_directory=True)
    with pytest.raises(BundleError, match="profiles is a symlink"):
        write_profile(b, "host", {"blocks": []})
    _intact(outside, files)


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "a/b", "..", ".hidden", ""])
def test_profile_device_names_cannot_leave_profiles(bundle_copy: Path, name: str) -> None:
    result = invoke("profile", bundle_copy, "--device", name, "--min-time", "0.01", "--passes", "1")
    assert "is not a plain name" in one_line_error(result)
    assert not (bundle_copy / "profiles").exists() and not (bundle_copy.parent / "x.json").exists()


def test_convert_force_never_deletes_a_folder_that_is_not_a_bundle(bundle_copy: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    files = _canaries(notes)
    stage = staging_dir(notes)
    shutil.copytree(bundle_copy, stage, dirs_exist_ok=True)
    with pytest.raises(BundleError, match="is not an edgequee bundle .* will not delete it"):
        write_bundle(stage, load_bundle(bundle_copy).manifest, notes, overwrite=True)
    _intact(notes, files)
    link = tmp_path / "link"
    link.symlink_to(bundle_copy, target_is_directory=True)
    with pytest.raises(BundleError, match="a symlink"):
        write_bundle(stage, load_bundle(bundle_copy).manifest, link, overwrite=True)
    assert load_bundle(bundle_copy)


def test_convert_cli_refuses_a_folder_that_is_not_a_bundle_before_any_work(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    files = _canaries(notes)
    result = invoke("convert", REPO / "converters" / "zoo" / "resnet20_cifar10_exits.pt", "--out", notes,
                     "--calib", SAMPLE_NPZ, "--force")
    assert "is not an edgequee bundle" in one_line_error(result)
    _intact(notes, files)


def test_quickstart_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from converters.quickstart import run_quickstart

    notes = tmp_path / "notes"
    files = _canaries(notes)
    with pytest.raises(EdgequeeError, match="holds files that the quickstart did not write"):
        run_quickstart(notes)
    _intact(notes, files)


# -------------------------------------------------------------------------------------- confinement: reads


@pytest.mark.parametrize("bad", ["../outside.tflite", "/etc/passwd", "blocks/../../outside.tflite", "./heads.npz"])
def test_manifest_paths_outside_the_bundle_are_refused(bundle_copy: Path, tmp_path: Path, bad: str) -> None:
    target = tmp_path / "outside.tflite"
    shutil.copy(bundle_copy / "whole" / "whole_fp32.tflite", target)
    sha = hashlib.sha256(target.read_bytes()).hexdigest()

    def edit(m: dict[str, Any]) -> None:
        m["whole_model"]["fp32"]["file"], m["whole_model"]["fp32"]["sha256"] = bad, sha

    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match="whole_model.fp32.file .*(absolute|leaves the bundle)"):
        load_bundle(bundle_copy)
    assert "whole_model.fp32.file" in one_line_error(invoke("inspect", bundle_copy))


def test_a_symlinked_file_in_the_bundle_is_refused(bundle_copy: Path, tmp_path: Path) -> None:
    secret = tmp_path / "id_rsa"
    secret.write_bytes((bundle_copy / "heads.npz").read_bytes())  # same bytes: the sha256 matches
    (bundle_copy / "heads.npz").unlink()
    (bundle_copy / "heads.npz").symlink_to(secret)
    with pytest.raises(BundleError, match="heads.npz is a symlink"):
        load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="is a symlink"):
        load_bundle(bundle_copy, verify=False)


def test_the_bundle_root_may_be_a_symlink(bundle_copy: Path, tmp_path: Path) -> None:
    current = tmp_path / "current"  # as on a flashed device: ROOT/current -> bundles/<model>@<hash>
    current.symlink_to(bundle_copy, target_is_directory=True)
    assert load_bundle(current).manifest.num_exits == load_bundle(bundle_copy).manifest.num_exits


# ------------------------------------------------------------------------------------------------ schema


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(m: dict[str, Any]) -> None:
        node: Any = m
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = keys[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return edit


@pytest.mark.parametrize("edit, field", [
    (_set("input.std", [0, 0, 0]), "input.std[0] is 0"),
    (_set("input.std", [0.2, 0.2]), "input.std has 2 values for 3 channel(s)"),
    (_set("input.mean", [math.nan, 0, 0]), "input.mean[0] is nan"),
    (_set("input.height", 31), "blocks[0].input_shape is [1, 32, 32, 3], must be [1, 31, 32, 3]"),
    (_set("input.height", "32"), "input.height must be an integer"),
    (_set("blocks", []), "blocks is empty"),
    (_set("blocks.0.artifacts.fp32.file", 5), "blocks[0].artifacts.fp32.file must be a bundle-relative path"),
    (_set("blocks.0.artifacts.fp32.sha256", 5), "blocks[0].artifacts.fp32.sha256 must be 64 lowercase hex"),
    (_set("classes", ["airplane", "automobile"]), "outputs.logits.shape ends in 10, the manifest says 2 classes"),
    (_set("classes", []), "classes is empty"),
    (_set("blocks.1.index", 7), "blocks[1].index is 7, must be 1"),
    (_set("blocks.0.hidden_shape", None), "blocks[0].hidden_shape must be null for the last block only"),
    (_set("heads_sha256", None), "heads_sha256 must be 64 lowercase hex"),
    (_set("parity.isolated", []), "parity.isolated lacks block 0"),
    (_set("input", [32, 32]), "input must be a JSON object"),
    (_set("policy", {"file": "../x.json", "sha256": "0" * 64}), "policy.file '../x.json' leaves the bundle"),
])
def test_bad_manifests_are_one_line_errors(bundle_copy: Path, edit: Callable[..., None], field: str) -> None:
    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError) as e:
        load_bundle(bundle_copy)
    assert field in str(e.value) and "\n" not in str(e.value)
    for command in ("inspect", "run"):
        args = ["run", bundle_copy, SAMPLE_NPZ] if command == "run" else ["inspect", bundle_copy]
        assert field in one_line_error(invoke(*args))


def test_fuzzed_manifests_never_raise_anything_but_a_bundle_error(bundle_copy: Path) -> None:
    """Every field of a real manifest replaced by values of the wrong kind: a BundleError, or a bundle that loads."""
    original = json.loads((bundle_copy / MANIFEST).read_text())
    paths: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for k, v in items:
            p = f"{prefix}.{k}" if prefix else str(k)
            paths.append(p)
            if p.count(".") < 5 and not p.startswith("conversion"):
                walk(v, p)

    walk(original, "")
    rng = np.random.default_rng(0)
    values = [None, 5, -1, 0.5, math.nan, math.inf, "x", "", [], {}, [1, 2], True, "../x", "0" * 64]
    for p in rng.choice(paths, size=min(250, len(paths)), replace=False):
        (bundle_copy / MANIFEST).write_text(json.dumps(original))
        _edit_manifest(bundle_copy, _set(p, values[rng.integers(len(values))]))
        try:
            b = load_bundle(bundle_copy)
        except BundleError as e:
            assert "\n" not in str(e)
            continue
        b.heads()  # what still loads is usable


def test_nan_heads_are_refused(bundle_copy: Path) -> None:
    with np.load(bundle_copy / "heads.npz") as z:
        heads = {k: z[k] for k in z.files}
    heads["w0"][0, 0] = np.nan
    np.savez(bundle_copy / "heads.npz", **heads)
    _edit_manifest(bundle_copy, _set("heads_sha256", hashlib.sha256((bundle_copy / "heads.npz").read_bytes()).hexdigest()))
    assert "heads.npz head 0 holds NaN or inf weights" in one_line_error(invoke("run", bundle_copy, SAMPLE_NPZ))


def test_bad_policy_specs_are_one_line_errors(bundle_copy: Path) -> None:
    b = _store_threshold(bundle_copy)
    entry = b.manifest.policy
    original = json.loads((bundle_copy / entry.file).read_text())
    for edit, field in [({"params": {"precision": "fp32", "threshold": math.nan}}, "params.threshold is NaN"),
                        ({"knob": "nope"}, "knob 'nope' is not one of the params"),
                        ({"extra": 1}, "unknown fields ['extra']")]:
        spec = {**original, **edit}
        raw = json.dumps(spec).encode()
        (bundle_copy / entry.file).write_bytes(raw)
        _edit_manifest(bundle_copy, _set("policy.sha256", hashlib.sha256(raw).hexdigest()))
        assert field in one_line_error(invoke("run", bundle_copy, SAMPLE_NPZ))


def test_bad_profiles_are_one_line_errors(bundle_copy: Path) -> None:
    b = load_bundle(bundle_copy)
    write_profile(b, "host", {"blocks": [{"block": 0, "precision": "fp32", "latency_ms": {"p50_ms": math.nan}}]})
    with pytest.raises(DeviceError, match=r"blocks\[0\].latency_ms.p50_ms is nan"):
        load_profile(b, "host")
    write_profile(b, "host", {"blocks": [{"block": 9, "precision": "fp32", "latency_ms": {"p50_ms": 1.0}}]})
    assert "blocks[0].block is 9" in one_line_error(invoke("cost", bundle_copy, "--device", "host"))


# ----------------------------------------------------------------------------------------- certificates


def _edit_stored_threshold(bundle: Path, value: float) -> None:
    """What a hand edit does: the threshold changed, the file's sha256 in the manifest updated to match."""
    entry = load_bundle(bundle).manifest.policy
    spec = json.loads((bundle / entry.file).read_text())
    spec["params"]["threshold"] = value
    raw = json.dumps(spec).encode()
    (bundle / entry.file).write_bytes(raw)
    _edit_manifest(bundle, _set("policy.sha256", hashlib.sha256(raw).hexdigest()))


@pytest.mark.slow
def test_an_edited_threshold_is_no_longer_certified(bundle_copy: Path) -> None:
    report = _calibrate(bundle_copy, 1000, epsilon=0.05)
    cert = report["policy"]["certificate"]
    assert cert["feasible"] and cert["policy_sha256"] == load_bundle(bundle_copy).policy().spec_sha256()
    assert load_bundle(bundle_copy).policy().certificate is not None
    _edit_stored_threshold(bundle_copy, 0.0)
    stored = load_bundle(bundle_copy).policy()
    assert stored.certificate is None and "differ from what the certificate was computed for" in stored.certificate_problem
    with pytest.warns(UserWarning, match="the stored one is not valid"):
        assert EdgeRunner(bundle_copy).certificate is None
    assert "NOT VALID" in invoke("inspect", bundle_copy).stdout
    ran = invoke("run", bundle_copy, SAMPLE_NPZ, "--require-certified")
    assert "not certified" in one_line_error(ran)


@pytest.mark.slow
def test_an_infeasible_calibration_keeps_the_certified_policy(bundle_copy: Path) -> None:
    good = _calibrate(bundle_copy, 1000, epsilon=0.05)["policy"]
    result = invoke("calibrate", bundle_copy, "--data", SAMPLE_NPZ, "--n-cal", "10", "--epsilon", "0.05",
                     "--policy", "threshold")
    assert result.exit_code == 1 and result.stderr.strip().splitlines()[-1].startswith("Error: no setting passed")
    assert "kept the certified policy" in result.stderr
    assert load_bundle(bundle_copy).policy().to_json() == good
    replaced = invoke("calibrate", bundle_copy, "--data", SAMPLE_NPZ, "--n-cal", "10", "--epsilon", "0.05",
                       "--policy", "threshold", "--replace")
    assert replaced.exit_code == 1 and "stored the safest setting" in replaced.stderr.strip().splitlines()[-1]
    stored = load_bundle(bundle_copy).policy()
    assert stored.certificate is not None and not stored.certificate.feasible


@pytest.mark.slow
def test_one_calibration_image_is_warned_about(bundle_copy: Path) -> None:
    result = invoke("calibrate", bundle_copy, "--data", SAMPLE_NPZ, "--n-cal", "1", "--epsilon", "0.9",
                     "--method", "crc", "--policy", "threshold")
    assert result.exit_code == 0, result.output
    assert "WARNING: only 1 calibration images at ε=0.9" in result.stdout and "use at least 12 images" in result.stdout
    few = invoke("calibrate", bundle_copy, "--data", SAMPLE_NPZ, "--n-cal", "20", "--epsilon", "0.02",
                  "--policy", "threshold", "--replace")
    assert "ucb-wsr cannot certify anything with 20 calibration images" in few.stdout


# ---------------------------------------------------------------------------------------- transactions

_WRITER = """
import sys
import numpy as np
from edgequee.bundle import load_bundle, write_policy
from edgequee.policies import ThresholdPolicy, to_stored
for k in range(int(sys.argv[2])):
    write_policy(load_bundle(sys.argv[1]), to_stored(ThresholdPolicy("fp32", float(sys.argv[3]) + k * 1e-4)))
"""


def test_concurrent_writers_and_readers_never_see_a_broken_bundle(bundle_copy: Path) -> None:
    """Two processes storing policies as fast as they can while this one loads the bundle and its policy."""
    for trial in range(3):
        procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(bundle_copy), "25", str(t)])
                 for t in (0.5 + trial / 10, 0.7 + trial / 10)]
        reads = 0
        while any(p.poll() is None for p in procs):
            stored = load_bundle(bundle_copy).policy()
            assert stored is None or stored.name == "threshold"
            reads += 1
        assert [p.returncode for p in procs] == [0, 0] and reads > 0
        b = load_bundle(bundle_copy)
        assert b.policy() is not None
        assert len(list((bundle_copy / "policy").iterdir())) <= 2  # the current policy and the one before


@pytest.mark.slow
def test_concurrent_calibrate_commands_leave_a_loadable_bundle(bundle_copy: Path) -> None:
    for trial in range(2):
        procs = [subprocess.Popen([sys.executable, "-m", "edgequee", "calibrate", str(bundle_copy), "--data",
                                   str(SAMPLE_NPZ), "--n-cal", "300", "--policy", "threshold", "--epsilon", eps],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for eps in ("0.05", "0.1")]
        while any(p.poll() is None for p in procs):
            load_bundle(bundle_copy).policy()  # `run` during a calibrate
        assert [p.wait() for p in procs] == [0, 0], [p.stderr.read() for p in procs]
        cert = load_bundle(bundle_copy).policy().certificate
        assert cert is not None and cert.epsilon in (0.05, 0.1)
        assert invoke("calibrate", bundle_copy, "--data", SAMPLE_NPZ, "--n-cal", "300", "--policy", "threshold",
                       "--epsilon", "0.1").exit_code == 0


def test_a_calibration_of_a_replaced_bundle_is_refused(bundle_copy: Path, tmp_path: Path) -> None:
    old = load_bundle(bundle_copy)
    _edit_manifest(bundle_copy, _set("model", "another"))  # what convert --force did meanwhile
    with pytest.raises(BundleError, match="was replaced while this ran"):
        write_policy(old, to_stored(ThresholdPolicy("fp32", 0.9)))


_KILLER = """
import os, shutil, signal, sys
from pathlib import Path
import edgequee.bundle as B
kill_at, mode = int(sys.argv[2]), sys.argv[3]
calls = [0]
def dying(fn):
    def wrapper(*a, **k):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return wrapper
os.replace = dying(os.replace)
shutil.rmtree = dying(shutil.rmtree)
Path.unlink = dying(Path.unlink)
if mode == "rename":
    B._exchange = lambda a, b: False  # the two-rename fallback (no renameat2)
else:
    B._exchange = dying(B._exchange)
dest = Path(sys.argv[1])
if mode == "policy":
    from edgequee.policies import ThresholdPolicy, to_stored
    B.write_policy(B.load_bundle(dest), to_stored(ThresholdPolicy("fp32", 0.8)))
else:
    stage = B.staging_dir(dest)
    shutil.copytree(dest, stage, dirs_exist_ok=True, copy_function=shutil.copy)
    B.write_bundle(stage, B.load_bundle(dest).manifest, dest, overwrite=True)
print(calls[0])
"""


@pytest.mark.parametrize("mode", ["policy", "exchange", "rename"])
def test_kill_9_at_every_write_step_leaves_a_loadable_bundle(bundle_copy: Path, mode: str) -> None:
    _store_threshold(bundle_copy, 0.95)

    def run(kill_at: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", _KILLER, str(bundle_copy), str(kill_at), mode],
                              capture_output=True, text=True)

    steps = int(run(0).stdout)
    assert steps >= 2
    for k in range(1, steps + 1):
        proc = run(k)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        # a reader right after the crash, then the next writer, which also removes the dead writer's debris
        assert load_bundle(bundle_copy).policy() is not None or mode != "policy"
        _store_threshold(bundle_copy, 0.9)
        siblings = sorted(p.name for p in bundle_copy.parent.iterdir() if p.name.startswith(".bundle."))
        if mode != "policy":
            assert run(0).returncode == 0  # a writer after the crash cleans up beside the bundle
            siblings = sorted(p.name for p in bundle_copy.parent.iterdir() if p.name.startswith(".bundle."))
        assert siblings in ([".bundle.lock"], []), siblings
        debris = [p.name for p in bundle_copy.rglob(".*")]
        assert debris == [], debris


def test_stale_scratch_of_a_killed_convert_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    import tempfile

    from converters.convert import _scratch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"edgequee-convert-{int(dead.stdout)}-abc"
    (stale / "sub").mkdir(parents=True)
    alive = tmp_path / f"edgequee-convert-{os.getppid()}-abc"
    alive.mkdir()
    with _scratch() as work:
        assert Path(work).name.startswith(f"edgequee-convert-{os.getpid()}-")
    assert not stale.exists() and alive.exists()


def test_a_stale_staging_folder_beside_the_bundle_is_removed(bundle_copy: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = bundle_copy.parent / f".bundle.tmp-{int(dead.stdout)}-xyz"
    shutil.copytree(bundle_copy, stale)
    stage = staging_dir(bundle_copy)
    shutil.copytree(bundle_copy, stage, dirs_exist_ok=True)
    write_bundle(stage, load_bundle(bundle_copy).manifest, bundle_copy, overwrite=True)
    assert not stale.exists() and load_bundle(bundle_copy)


def test_run_require_certified_refuses_an_uncalibrated_bundle(bundle_copy: Path) -> None:
    assert "not certified" in one_line_error(invoke("run", bundle_copy, SAMPLE_NPZ, "--require-certified"))
