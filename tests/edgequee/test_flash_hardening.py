"""Hardening of edgequee flash, one test per fault: strict TARGET parsing, no symlinks or outside paths in a
bundle (host and device agent), and a manifest that must match the bundle's name. The end-to-end tests use the
real sshd of test_flash.py (its fixtures are imported from there)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
from clirun import invoke, one_line_error
from test_flash import (  # noqa: F401  (fixtures, used by name)
    Device,
    bundles,
    device,
    server,
)

from edgequee import _flash_agent as agent
from edgequee import flash as flash_mod
from edgequee.flash import FlashError, SshOptions, Target, rollback, scan_bundle

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- canary 7d1c0ffee5 -----END OPENSSH PRIVATE KEY-----\n"


def _files_holding(top: Path, needle: bytes) -> list[Path]:
    """Every regular file under ``top`` (links not followed) whose bytes contain ``needle``."""
    found = []
    for d, _, names in os.walk(top):
        for n in names:
            p = Path(d) / n
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                found.append(p)
    return found


def _canary(tmp_path: Path) -> Path:
    key = tmp_path / "outside" / "id_ed25519"
    key.parent.mkdir()
    key.write_bytes(SECRET)
    return key


def _write_manifest(bundle: Path, manifest: dict[str, Any]) -> None:
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1))


# ------------------------------------------------------------------------------------- TARGET, no server


def test_port_then_empty_path_means_the_default_root() -> None:
    # was: root '22:' (deployed to ~/22:)
    assert Target.parse("host:22:") == Target("host", None, 22, "edgequee")
    assert str(Target.parse("pi@host:22:")) == "pi@host:22:~/edgequee"
    assert Target.parse("host:") == Target("host", None, None, "edgequee")


def test_port_zero_is_refused() -> None:
    # was: ':0' and 'host::0' became port 22 (no port) with root '0'
    for spec, why in (("host:0", "port 0 is out of range"), ("host::0", "an empty port"), (":0", "no host")):
        with pytest.raises(FlashError, match=f"bad target '{spec}': {why}") as e:
            Target.parse(spec)
        assert "expected [user@]host[:port][:path]" in str(e.value) and "\n" not in str(e.value)


def test_port_out_of_range_is_refused() -> None:
    for spec in ("host:70000", "host:65536", "pi@10.0.0.7:99999:/opt/eq"):
        with pytest.raises(FlashError, match=r"port \d+ is out of range \(1-65535\)"):
            Target.parse(spec)
    assert Target.parse("host:65535").port == 65535 and Target.parse("host:1").port == 1
    with pytest.raises(FlashError, match="out of range"):
        Target("host", None, 0)  # constructed directly, too


def test_non_numeric_port_is_not_taken_for_a_directory() -> None:
    # was: 'host:notaport' deployed to ~/notaport
    with pytest.raises(FlashError, match=r"'notaport' is neither a port \(1-65535\) nor a path starting with / or "
                                         r"~ \(write host:~/notaport for a folder in the home\)"):
        Target.parse("host:notaport")
    for spec in ("host:22x", "host:22:models", "pi@host:2222:opt/eq"):
        with pytest.raises(FlashError, match="bad target"):
            Target.parse(spec)
    assert Target.parse("host:~/notaport") == Target("host", None, None, "~/notaport")
    assert Target.parse("host:22:/srv/eq") == Target("host", None, 22, "/srv/eq")


def test_empty_host_is_refused() -> None:
    for spec in ("", "   ", ":22", ":/srv/eq", "pi@", "pi@:22", "[]:22", "pi@:/x"):
        with pytest.raises(FlashError, match="bad target .*(no host|it is empty|not an IPv6)"):
            Target.parse(spec)
    with pytest.raises(FlashError, match="no host"):
        Target("")


@pytest.mark.slow
def test_target_shell_metacharacters_are_refused_or_passed_safely(server, bundle_copy: Path,  # noqa: F811
                                                                  tmp_path: Path, monkeypatch) -> None:
    for spec in ("pi@host;touch x", "pi@$(touch x)", "pi@`touch x`", "pi@ho st", "a;b@host", "$(id)@host",
                 "`id`@host", "pi@host%h", "-oProxyCommand=touch x", "pi@-oProxyCommand=x"):
        with pytest.raises(FlashError, match="bad target"):
            Target.parse(spec)
    # In the path, anything goes: it travels in the JSON request, never through a shell.
    tricks = tmp_path / "inj"
    root = f"{tmp_path}/dev ice;touch {tricks}1;$(touch {tricks}2)`touch {tricks}3`'\"\\"
    target = f"{server.user}@127.0.0.1:{server.port}:{root}"
    assert Target.parse(target).root == root
    argvs = []
    real_popen = subprocess.Popen

    def recording_popen(args, *a, **kw):  # type: ignore[no-untyped-def]
        argvs.append(list(args))
        return real_popen(args, *a, **kw)

    monkeypatch.setattr(flash_mod.subprocess, "Popen", recording_popen)
    report = flash_mod.flash(bundle_copy, target, ssh=SshOptions(config=str(server.config)))
    assert report["action"] == "activated"
    assert argvs and all(a[-3:] == ["--", "127.0.0.1", f"python3 -c {shlex.quote(flash_mod._BOOTSTRAP)}"]
                         for a in argvs)
    assert not any(root in arg or "touch" in arg for a in argvs for arg in a)
    assert os.readlink(Path(root) / "current") == f"bundles/{report['bundle']}"  # the literal directory
    assert not any(Path(f"{tricks}{i}").exists() for i in (1, 2, 3))


# ------------------------------------------------------------------------------------ bundles on the host


@pytest.mark.slow
def test_symlinked_file_in_bundle_never_reaches_the_device(server, device: Device, bundle_copy: Path,  # noqa: F811
                                                           tmp_path: Path) -> None:
    # was: rglob + is_file() followed the link and the key was uploaded into the deployed bundle
    key = _canary(tmp_path)
    (bundle_copy / "notes").mkdir()
    (bundle_copy / "notes" / "readme.txt").symlink_to(key)
    err = one_line_error(invoke("flash", bundle_copy, device.target, "-F", server.config))
    assert f"{bundle_copy}: notes/readme.txt is a symlink (file link to {key})" in err
    assert "replace the symlink with the file or re-convert the bundle" in err
    with pytest.raises(FlashError, match="notes/readme.txt is a symlink"):
        device.flash(bundle_copy, dry_run=True)
    assert not device.root.exists() or not _files_holding(device.root, SECRET)

    # A vouched file replaced by a link to an identical copy outside is refused too (not sent from outside).
    (bundle_copy / "notes" / "readme.txt").unlink()
    outside = tmp_path / "outside" / "heads.npz"
    os.replace(bundle_copy / "heads.npz", outside)
    (bundle_copy / "heads.npz").symlink_to(outside)
    with pytest.raises(FlashError, match="heads.npz is a symlink"):
        device.flash(bundle_copy)
    assert not (device.root / "bundles").exists() or not list((device.root / "bundles").iterdir())


@pytest.mark.slow
def test_symlinked_directory_in_bundle_is_refused(server, device: Device, bundle_copy: Path,  # noqa: F811
                                                  tmp_path: Path) -> None:
    key = _canary(tmp_path)
    (bundle_copy / "demo").symlink_to(key.parent, target_is_directory=True)
    err = one_line_error(invoke("flash", bundle_copy, device.target, "-F", server.config))
    assert f"demo is a symlink (directory link to {key.parent})" in err and "re-convert" in err
    assert not device.root.exists() or not _files_holding(device.root, SECRET)
    # a link deeper down, in a real directory, is found as well
    (bundle_copy / "demo").unlink()
    (bundle_copy / "demo" / "deep").mkdir(parents=True)
    (bundle_copy / "demo" / "deep" / "keys").symlink_to(key.parent, target_is_directory=True)
    with pytest.raises(FlashError, match="demo/deep/keys is a symlink"):
        scan_bundle(bundle_copy)


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["../x.tflite", "ABSOLUTE"])
def test_manifest_entry_outside_the_bundle_is_refused_on_the_host(device: Device, bundle_copy: Path,  # noqa: F811
                                                                  tmp_path: Path, entry: str) -> None:
    # was: load_bundle verified the outside file, the host did not send it, and the device blamed its storage
    outside = tmp_path / "x.tflite"  # bundle_copy is tmp_path/bundle: ../x.tflite is this file
    outside.write_bytes((bundle_copy / "blocks" / "blocks_fp32.tflite").read_bytes())
    rel = str(outside) if entry == "ABSOLUTE" else entry
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    art = manifest["blocks"][0]["artifacts"]["fp32"]
    art["file"], art["sha256"] = rel, hashlib.sha256(outside.read_bytes()).hexdigest()
    _write_manifest(bundle_copy, manifest)
    why = "is an absolute path" if entry == "ABSOLUTE" else "has '..' in it"
    with pytest.raises(FlashError, match=rf"the manifest lists the file '{re.escape(rel)}', which {why}; "
                                         ".*re-convert the bundle"):
        device.flash(bundle_copy)
    assert not device.root.exists()  # refused before any connection


@pytest.mark.slow
def test_load_bundle_failing_is_a_one_line_error(bundle_copy: Path, monkeypatch) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    del manifest["blocks"][0]["artifacts"]["fp32"]["input"]
    _write_manifest(bundle_copy, manifest)
    err = one_line_error(invoke("flash", bundle_copy, "pi@127.0.0.1:1:/x", "--dry-run"))
    assert "manifest.json" in err and "re-convert" in err
    # Whatever load_bundle raises (a KeyError from an older reader, an OSError) is one line that names the fix.
    for exc, says in ((KeyError("input"), "is malformed (KeyError: 'input'); re-convert the bundle"),
                      (PermissionError(13, "Permission denied"), "cannot read the bundle")):
        def boom(path: Any, exc: Exception = exc) -> Any:
            raise exc

        monkeypatch.setattr(flash_mod, "load_bundle", boom)
        err = one_line_error(invoke("flash", bundle_copy, "pi@127.0.0.1:1:/x", "--dry-run"))
        assert says in err, err


# --------------------------------------------------------------------------------- the device agent itself


class _Channel:
    """The agent's side of the wire, in-process: requests in, replies recorded."""

    def __init__(self, *incoming: dict[str, Any]):
        self.incoming, self.sent = list(incoming), []

    def recv(self) -> dict[str, Any]:
        return self.incoming.pop(0)

    def send(self, **msg: Any) -> None:
        self.sent.append(msg)


def test_agent_refuses_an_unsafe_path_as_a_malformed_bundle(tmp_path: Path) -> None:
    for rel in ("../x.tflite", "/etc/passwd", "blocks/../../x", "a//b", "./x"):
        with pytest.raises(agent.AgentError, match="the bundle is malformed: it names the path") as e:
            agent._safe_rel(rel)
        assert repr(rel) in str(e.value) and "storage" not in str(e.value) and "Re-convert" in str(e.value)

    # A request listing such a path is refused before the device root is touched.
    root = tmp_path / "device"
    req = {"op": "flash", "root": str(root), "bundle": "m@" + "0" * 12, "manifest_sha256": "0" * 64, "keep": 3,
           "files": [{"path": "../x.tflite", "size": 1, "sha256": "0" * 64}]}
    with pytest.raises(agent.AgentError, match=r"malformed: it names the path '../x.tflite', which has '..'"):
        agent.op_flash(_Channel(), req)
    assert not root.exists()

    # A staged bundle whose manifest names ../x.tflite (everything else verifying): malformed, not a storage failure.
    top = tmp_path / "staged"
    top.mkdir()
    (tmp_path / "x.tflite").write_bytes(b"tflite")
    sha = hashlib.sha256(b"tflite").hexdigest()
    (top / "manifest.json").write_text(json.dumps({"blocks": [{"file": "../x.tflite", "sha256": sha}]}))
    files = [{"path": "manifest.json", "sha256": agent.sha256_of(str(top / "manifest.json")), "size": 0}]
    with pytest.raises(agent.AgentError, match="malformed") as e:
        agent._verify(str(top), files)
    assert "../x.tflite" in str(e.value) and "storage" not in str(e.value)
    # and rollback's check of a deployed copy says so too
    bad = agent.Root(str(tmp_path)).verify_manifest(str(top), "m@" + files[0]["sha256"][:12])
    assert bad == ["../x.tflite (an unsafe path: it has '..' in it; the bundle is malformed)"]


def test_agent_never_follows_a_symlink_in_a_bundle(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.tflite"
    victim.write_bytes(b"not yours")
    sha = hashlib.sha256(b"not yours").hexdigest()
    top = tmp_path / "bundle.partial"
    top.mkdir()
    (top / "blocks").symlink_to(outside, target_is_directory=True)
    (top / "heads.npz").symlink_to(victim)
    # planning does not trust what is behind a link; writing or copying through one is refused
    assert not agent._matches(str(top), "blocks/victim.tflite", sha)
    assert not agent._matches(str(top), "heads.npz", sha)
    with pytest.raises(agent.AgentError, match=r"blocks is a symlink on the device and edgequee never follows"):
        agent._create(str(top), "blocks/victim.tflite")
    with pytest.raises(agent.AgentError, match="heads.npz is a symlink"):
        agent._copy(str(victim), str(top), "heads.npz")
    assert agent._read_bundle_json(str(top), "blocks/victim.tflite", "default") == "default"
    # verifying refuses (and removes the links, never what they point at)
    files = [{"path": "blocks/victim.tflite", "sha256": sha, "size": 9}]
    with pytest.raises(agent.AgentError, match="a symlink or special file, and edgequee never follows symlinks"):
        agent._verify(str(top), files)
    assert not (top / "blocks").exists() and not (top / "heads.npz").is_symlink()
    assert victim.read_bytes() == b"not yours" and os.listdir(outside) == ["victim.tflite"]


@pytest.mark.slow
def test_symlinked_directory_in_a_staged_bundle_is_not_written_through(device: Device, bundle_copy: Path,  # noqa: F811
                                                                       tmp_path: Path) -> None:
    # was: _stage kept a symlinked directory in .partial and the upload wrote into what it pointed at
    name = scan_bundle(bundle_copy).name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    partial = device.root / "bundles" / f"{name}.partial"
    partial.mkdir(parents=True)
    (partial / "blocks").symlink_to(elsewhere, target_is_directory=True)
    report = device.flash(bundle_copy)
    assert report["action"] == "activated"
    assert os.listdir(elsewhere) == ["keep.txt"]
    deployed = device.root / "bundles" / name
    assert (deployed / "blocks").is_dir() and not (deployed / "blocks").is_symlink()
    assert not [p for p in deployed.rglob("*") if p.is_symlink()]


# ---------------------------------------------------------------------------------- manifest against name


@pytest.mark.slow
def test_manifest_that_does_not_match_the_bundle_name_is_refused(device: Device,  # noqa: F811
                                                                 bundle_copy: Path) -> None:
    local = scan_bundle(bundle_copy)
    target = Target.parse(device.target)

    def push(lb: flash_mod.LocalBundle, on_event: Any = None) -> dict[str, Any]:
        return flash_mod._flash(lb, target, 3, False, device.ssh, None, None, on_event, None)

    # A name that is not its manifest's (was: deployed and activated under the wrong name)
    forged = dataclasses.replace(local, name=local.name.split("@")[0] + "@000000000000")
    with pytest.raises(FlashError, match=r"manifest mismatch for bundle .*@000000000000: its name says the "
                                         r"manifest's sha256 starts 000000000000, the request says "
                                         r"[0-9a-f]{12} and the manifest.json listed is [0-9a-f]{12}"):
        push(forged)
    assert not (device.root / "bundles").exists() or not list((device.root / "bundles").iterdir())
    assert local.manifest_sha256.startswith(local.name.split("@")[1]) and len(local.manifest_sha256) == 64

    # The manifest swapped while on the way (after upload, before verification): named as what it is
    other = json.loads((bundle_copy / "manifest.json").read_text())
    other["model"] = "someone-else"

    def swap(event: str, info: dict) -> None:
        (Path(info["partial"]) / "manifest.json").write_text(json.dumps(other))

    with pytest.raises(FlashError, match=rf"manifest mismatch on the device for {re.escape(local.name)}: the "
                                         r"manifest.json "
                                         r"received has sha256 [0-9a-f]{12}, not "
                                         f"{local.manifest_sha256[:12]}.*nothing was activated"):
        push(local, swap)
    assert not (device.root / "current").exists()
    assert push(local)["action"] == "activated"  # the real one goes through


@pytest.mark.slow
def test_rollback_refuses_a_manifest_swapped_on_the_device(device: Device,  # noqa: F811
                                                           bundles: tuple[Path, Path]) -> None:  # noqa: F811
    first, second = bundles
    for b in (first, second):
        device.flash(b)
    one, two = scan_bundle(first).name, scan_bundle(second).name
    m = device.root / "bundles" / one / "manifest.json"
    swapped = json.loads(m.read_text())
    swapped["model"] = swapped["model"] + "-evil"  # every file it lists still verifies
    m.write_text(json.dumps(swapped))
    # was: rolled back to a bundle whose manifest is not the one it is named for
    with pytest.raises(FlashError, match=rf"the previous bundle {re.escape(one)} fails verification on the device: "
                                         r"manifest.json \(its sha256 [0-9a-f]{12} is not the one the bundle is named "
                                         r"for: the manifest was changed or swapped\); not activated"):
        rollback(device.target, ssh=device.ssh)
    assert device.current() == f"bundles/{two}"
    entries = json.loads((device.root / "history.json").read_text())
    assert [e["manifest_sha256"] for e in entries] == [scan_bundle(b).manifest_sha256 for b in (first, second)]
