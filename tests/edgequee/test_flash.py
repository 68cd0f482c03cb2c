"""edgequee flash against a real OpenSSH server on 127.0.0.1 (keys made at test time), with real bundles."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from clirun import invoke, one_line_error
from sshd import SshServer, find_sshd

from edgequee.bundle import load_bundle, sha256_file, write_policy
from edgequee.flash import FlashError, SshOptions, Target, flash, read_hosts, rollback, scan_bundle
from edgequee.policies import ThresholdPolicy, to_stored

REPO = Path(__file__).resolve().parents[2]
SAMPLE_NPZ = REPO / "converters" / "zoo" / "cifar10_sample.npz"


def _wait_unlocked(root: Path) -> None:
    """Block until no agent holds ROOT/.lock (an interrupted one exits once sshd sees the connection drop)."""
    with open(root / ".lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """sshd on a free port; missing sshd fails under CI=true (it is part of the set-up) and skips elsewhere."""
    if find_sshd() is None:
        why = "sshd is not installed (bash scripts/setup.sh installs openssh-server)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)
        pytest.skip(why)
    s = SshServer(tmp_path_factory.mktemp("sshd")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def bundles(converted, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two versions of one model: as converted, and after calibration stored a policy (a new manifest)."""
    top = tmp_path_factory.mktemp("bundles")
    first = Path(shutil.copytree(converted.path, top / "v1"))
    second = Path(shutil.copytree(converted.path, top / "v2"))
    write_policy(load_bundle(second), to_stored(ThresholdPolicy("int8", 0.9)))
    return first, second


@dataclass(frozen=True)
class Device:
    """A flash root on the test server: its path here, its TARGET, and flash/rollback with the test's ssh config."""

    root: Path
    target: str
    ssh: SshOptions

    def flash(self, bundle: Path, **kwargs: Any) -> dict[str, Any]:
        return flash(bundle, self.target, ssh=self.ssh, **kwargs)

    def current(self) -> str:
        return os.readlink(self.root / "current")


@pytest.fixture
def device(server: SshServer, tmp_path: Path) -> Device:
    root = tmp_path / "device"
    return Device(root, server.target(root), SshOptions(config=str(server.config)))


def _uploaded(report: dict[str, Any]) -> list[str]:
    return [f["path"] for f in report["files"] if f["action"] == "upload"]


# ------------------------------------------------------------------------------------------------ no server


def test_target_parsing() -> None:
    assert Target.parse("pi@raspberrypi.local") == Target("raspberrypi.local", "pi", None, "edgequee")
    assert Target.parse("pi@10.0.0.7:2222:/opt/eq") == Target("10.0.0.7", "pi", 2222, "/opt/eq")
    assert Target.parse("box:~/models") == Target("box", None, None, "~/models")
    assert Target.parse("me@[fe80::1]:22") == Target("fe80::1", "me", 22, "edgequee")
    assert str(Target.parse("pi@host")) == "pi@host:~/edgequee"
    assert str(Target.parse("me@[::1]:2200:/x")) == "me@[::1]:2200:/x"
    for bad in ("", "pi@", "-oProxyCommand=x", "a b"):
        with pytest.raises(FlashError, match="bad target"):
            Target.parse(bad)


def test_hosts_file(tmp_path: Path) -> None:
    f = tmp_path / "hosts"
    f.write_text("# lab\npi@a:2222\n\n  pi@b:/srv/eq  # second\n")
    assert [str(t) for t in read_hosts(f)] == ["pi@a:2222:~/edgequee", "pi@b:/srv/eq"]
    f.write_text("pi@a\nnot a target\n")
    with pytest.raises(FlashError, match=r"hosts:2: bad target"):
        read_hosts(f)


# ---------------------------------------------------------------------------------------------- with sshd


@pytest.mark.slow
def test_flash_happy_path_and_idempotent(device: Device, server: SshServer, bundles: tuple[Path, Path]) -> None:
    first, second = bundles
    root, target = device.root, device.target
    name = scan_bundle(first).name

    result = invoke("flash", first, target, "-F", server.config, "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"dry run: {name} → {target}" in result.stdout and "would upload 7 of 7 files" in result.stdout
    assert not (root / "bundles").exists()  # a dry run changes nothing

    result = invoke("flash", first, target, "-F", server.config)
    assert result.exit_code == 0, result.output
    assert f"{name} → {target}  (activated" in result.stdout
    assert "7 uploaded" in result.stdout and "sha256 verified on the device: 7/7" in result.stdout
    assert device.current() == f"bundles/{name}"
    deployed = load_bundle(root / "current")  # verifies every file's sha256 again, here
    assert deployed.manifest == load_bundle(first).manifest
    assert sorted(os.listdir(root / "bundles")) == [name]

    result = invoke("flash", first, target, "-F", server.config, "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["action"] == "unchanged" and report["uploaded_bytes"] == 0
    assert {f["action"] for f in report["files"]} == {"on device"}

    # A new version of the same model: only what changed travels, the rest is copied on the device.
    result = invoke("flash", second, target, "-F", server.config, "--json", "-")
    report = json.loads(result.stdout)
    moved = {f["path"]: f["action"] for f in report["files"]}
    assert {p for p, a in moved.items() if a == "upload"} == {"manifest.json"} | {
        p for p in moved if p.startswith("policy/")}
    assert report["action"] == "activated" and report["previous"] == name
    assert device.current() == f"bundles/{report['bundle']}"
    assert load_bundle(root / "current").policy() is not None


@pytest.mark.slow
def test_rollback_restores_previous_bundle(device: Device, server: SshServer, bundles: tuple[Path, Path]) -> None:
    first, second = bundles
    target = device.target
    for b in (first, second):
        device.flash(b)
    one, two = scan_bundle(first).name, scan_bundle(second).name
    assert device.current() == f"bundles/{two}"

    result = invoke("flash", "--rollback", target, "-F", server.config, "--dry-run")
    assert result.exit_code == 0 and f"would switch current → bundles/{one}" in result.stdout
    assert device.current() == f"bundles/{two}"
    result = invoke("flash", "--rollback", target, "-F", server.config)
    assert result.exit_code == 0, result.output
    assert f"rolled back: current → bundles/{one} (was {two})" in result.stdout
    assert device.current() == f"bundles/{one}"
    assert "no previous bundle to roll back to" in one_line_error(invoke("flash", "--rollback", target, "-F",
                                                                            server.config))
    # Flashing the newer one again is a switch: its verified copy is still on the device.
    report = device.flash(second)
    assert report["action"] == "switched" and report["uploaded_bytes"] == 0
    assert device.current() == f"bundles/{two}"


@pytest.mark.slow
def test_rollback_refuses_a_corrupted_previous_bundle(device: Device, bundles: tuple[Path, Path]) -> None:
    first, second = bundles
    root, target = device.root, device.target
    for b in (first, second):
        device.flash(b)
    one, two = scan_bundle(first).name, scan_bundle(second).name
    rotten = root / "bundles" / one / "blocks" / "blocks_int8.tflite"
    data = bytearray(rotten.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: bit rot on the device's storage
    rotten.write_bytes(bytes(data))

    with pytest.raises(FlashError, match=rf"the previous bundle {one} fails verification on the device: "
                                         r"blocks/blocks_int8.tflite \(sha256 mismatch\); not activated"):
        rollback(target, ssh=device.ssh)
    assert device.current() == f"bundles/{two}"
    assert load_bundle(root / "current")  # the other bundle's copy is intact (copies, not hard links)

    # Re-flashing the damaged bundle repairs it on the device: the good copy in the other bundle is used.
    report = device.flash(first)
    assert report["action"] == "activated" and report["uploaded_files"] == 0
    sources = {f["path"]: f.get("source") for f in report["files"]}
    assert sources["blocks/blocks_int8.tflite"] == two and sources["manifest.json"] == one
    assert device.current() == f"bundles/{one}" and load_bundle(root / "current")
    # With no good copy anywhere on the device, the file travels again.
    for b in (one, two):
        (root / "bundles" / b / "heads.npz").write_bytes(b"rotten")
    report = device.flash(first)
    assert _uploaded(report) == ["heads.npz"]
    assert load_bundle(root / "current")


@pytest.mark.slow
def test_file_corrupted_on_device_is_not_activated(device: Device, bundles: tuple[Path, Path]) -> None:
    first, second = bundles
    root = device.root
    device.flash(first)
    before = device.current()
    name = scan_bundle(second).name

    policy = load_bundle(second).manifest.policy.file  # type: ignore[union-attr]

    def corrupt(event: str, info: dict) -> None:  # after the upload, before the device verifies
        assert event == "staged"
        f = Path(info["partial"]) / policy
        f.write_bytes(f.read_bytes().replace(b"threshold", b"thresh0ld"))

    with pytest.raises(FlashError, match=rf"sha256 mismatch on the device for 1 file\(s\): {policy} \(expected "
                                         r"[0-9a-f]{12}, got [0-9a-f]{12}\); nothing was activated"):
        device.flash(second, on_event=corrupt)
    assert device.current() == before
    assert not (root / "bundles" / name).exists()
    partial = root / "bundles" / f"{name}.partial"
    assert (partial / "manifest.json").is_file() and not (partial / policy).exists()  # the bad copy is gone

    report = device.flash(second)
    assert report["action"] == "activated"
    assert _uploaded(report) == [policy]
    assert device.current() == f"bundles/{name}" and not partial.exists()


@pytest.mark.slow
def test_interrupted_transfer_leaves_previous_bundle_current(device: Device, server: SshServer,
                                                             bundles: tuple[Path, Path], tmp_path: Path) -> None:
    first, second = bundles
    root, target = device.root, device.target
    device.flash(first)
    before = device.current()
    big = Path(shutil.copytree(second, tmp_path / "with-images"))  # demo images travel along: 3.9 MB more
    (big / "demo").mkdir()
    shutil.copy(SAMPLE_NPZ, big / "demo" / "images.npz")
    name = scan_bundle(big).name
    partial = root / "bundles" / f"{name}.partial"

    slow = server.throttled_config(tmp_path / "slow_config", bytes_per_s=1_000_000)
    proc = subprocess.Popen([sys.executable, "-m", "edgequee.cli", "flash", str(big), target, "-F", str(slow)],
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        staged = partial / "demo" / "images.npz"
        deadline = time.monotonic() + 60
        while not (staged.exists() and staged.stat().st_size > 1_000_000):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the laptop dies: edgequee, ssh and the relay, mid-upload
        proc.wait()
    _wait_unlocked(root)
    assert 0 < staged.stat().st_size < SAMPLE_NPZ.stat().st_size
    assert device.current() == before and load_bundle(root / "current")
    assert not (root / "bundles" / name).exists()
    assert [e["bundle"] for e in json.loads((root / "history.json").read_text())] == [before.split("/")[1]]

    report = device.flash(big)  # resumes: staged files that verify are kept
    actions = {f["path"]: f["action"] for f in report["files"]}
    assert actions["demo/images.npz"] == "upload" and "staged" in actions.values()
    assert device.current() == f"bundles/{name}" and not partial.exists()
    assert sha256_file(root / "current" / "demo" / "images.npz") == sha256_file(SAMPLE_NPZ)


@pytest.mark.slow
def test_parallel_hosts_with_summary(server: SshServer, bundles: tuple[Path, Path], tmp_path: Path) -> None:
    first, _ = bundles
    name = scan_bundle(first).name
    roots = [tmp_path / "pi-a", tmp_path / "pi-b"]
    hosts = tmp_path / "hosts"
    hosts.write_text("\n".join([server.target(roots[0]), server.target(roots[1]),
                                f"{server.user}@127.0.0.1:1:/x", ""]))  # nothing listens on port 1
    result = invoke("flash", first, "--hosts", hosts, "-F", server.config, "--json", str(tmp_path / "r.json"))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == f"Error: 1 of 3 hosts failed: {server.user}@127.0.0.1:1:/x"
    table = result.stdout
    assert table.count(" ok ") == 2 and "FAILED" in table and "cannot reach" in table and "2 ok, 1 failed" in table
    for root in roots:
        assert os.readlink(root / "current") == f"bundles/{name}" and load_bundle(root / "current")
    results = json.loads((tmp_path / "r.json").read_text())["hosts"]
    assert [r["ok"] for r in results] == [True, True, False]

    hosts.write_text("\n".join(server.target(r) for r in roots))
    result = invoke("flash", first, "--hosts", hosts, "-F", server.config)
    assert result.exit_code == 0 and "2 ok, 0 failed" in result.stdout and result.stdout.count("unchanged") == 2


@pytest.mark.slow
def test_ssh_failures_are_one_line_with_the_fix(device: Device, server: SshServer, bundles: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    first, _ = bundles
    root, target = device.root, device.target
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    unknown = server.write_config(tmp_path / "unknown", known_hosts=empty)
    err = one_line_error(invoke("flash", first, target, "-F", unknown))
    assert (f"the host key of 127.0.0.1:{server.port} is not in known_hosts, and edgequee never accepts host keys "
            "by itself") in err
    assert f"ssh-keyscan -p {server.port} 127.0.0.1 >> ~/.ssh/known_hosts" in err
    assert not root.exists() and empty.read_text() == ""  # nothing reached the device, nothing was trusted

    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    changed = tmp_path / "changed_known_hosts"
    changed.write_text(f"[127.0.0.1]:{server.port} {' '.join(other.with_suffix('.pub').read_text().split()[:2])}\n")
    err = one_line_error(invoke("flash", first, target, "-F", server.write_config(tmp_path / "c", changed)))
    assert "has CHANGED" in err and f"ssh-keygen -R '[127.0.0.1]:{server.port}'" in err

    stranger = server.write_config(tmp_path / "stranger", identity=other)
    err = one_line_error(invoke("flash", first, target, "-F", stranger))
    assert "authentication failed" in err and "ssh-copy-id" in err

    err = one_line_error(invoke("flash", first, f"{server.user}@127.0.0.1:1:/x", "-F", server.config))
    assert "cannot reach" in err and "Connection refused" in err
    assert not root.exists()


@pytest.mark.slow
def test_install_runtime_offline_and_profile_remote(device: Device, server: SshServer, bundles: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    first, _ = bundles
    root, target = device.root, device.target
    wheels = tmp_path / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(wheels),
                           "numpy", "click"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = invoke("flash", first, target, "-F", server.config, "--install-runtime", "--wheels", wheels,
                     "--runtime-extras", "", "--json", "-")
    assert result.exit_code == 0, result.output
    rt = json.loads(result.stdout)["runtime"]
    assert rt["python"] == str(root / "venv" / "bin" / "python") and rt["source"] == "wheels (offline)"
    shipped = set(os.listdir(root / "wheels"))
    assert set(os.listdir(wheels)) < shipped and any(w.startswith("edgequee-0.1.0-") for w in shipped)
    out = subprocess.run([str(root / "venv" / "bin" / "edgequee"), "inspect", str(root / "current")],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "(format 1, verified)" in out.stdout, out.stderr

    # The profile runs on the device (here with this interpreter, which has a TFLite runtime) and comes back.
    local = tmp_path / "local"
    shutil.copytree(first, local)
    result = invoke("profile", local, "--device", "bench-pi", "--remote", target, "-F", server.config,
                     "--remote-python", sys.executable, "--min-time", "0.02", "--passes", "1", "--no-transitions")
    assert result.exit_code == 0, result.output
    pulled = local / "profiles" / "bench-pi.json"
    on_device = root / "current" / "profiles" / "bench-pi.json"
    assert json.loads(pulled.read_text()) == json.loads(on_device.read_text())
    assert json.loads(pulled.read_text())["device"] == "bench-pi"
    # The profile is now in both copies: flashing the local bundle again changes nothing.
    assert device.flash(local)["action"] == "unchanged"


@pytest.mark.slow
def test_convert_then_flash(device: Device, server: SshServer, sample, tmp_path: Path, require) -> None:
    require("onnx2tf")
    npz = tmp_path / "calib.npz"
    np.savez(npz, x_train=sample.x_train[:16], y_train=sample.y_train[:16], x_test=sample.x_test[:16],
             y_test=sample.y_test[:16], classes=np.array(sample.classes))
    out = tmp_path / "b"
    result = invoke("convert", REPO / "converters" / "zoo" / "resnet20_cifar10_exits.pt", "--out", out, "--calib",
                     npz, "--calib-images", 16, "--parity-images", 16, "--precisions", "fp32",
                     "--flash", device.target, "-F", server.config)
    assert result.exit_code == 0, result.output
    name = scan_bundle(out).name
    assert f"{name} → {device.target}  (activated" in result.stdout
    assert device.current() == f"bundles/{name}" and load_bundle(device.root / "current")
