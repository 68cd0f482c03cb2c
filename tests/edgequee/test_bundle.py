"""The bundle format: JSON round trip, verification on load, atomic writes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from edgequee.bundle import (
    FORMAT_VERSION,
    BlockEntry,
    BlockParity,
    ChainedParity,
    InputSpec,
    Manifest,
    ParityReport,
    PrecisionArtifact,
    QuantParams,
    TensorSpec,
    load_bundle,
    save_heads,
    sha256_file,
    staging_dir,
    write_bundle,
)
from edgequee.errors import BundleError


def _artifact(root: Path, rel: str, precision: str, outputs: dict[str, tuple[int, ...]],
              input_shape: tuple[int, ...] = (1, 8, 8, 3)) -> PrecisionArtifact:
    f = root / rel
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(f"stand-in graph {rel}".encode() * 8)
    q = QuantParams(0.05, -3) if precision == "int8" else None
    dtype = "int8" if q else "float32"
    return PrecisionArtifact(
        precision,
        rel,
        sha256_file(f),
        f.stat().st_size,
        TensorSpec("input", input_shape, dtype, q),
        {role: TensorSpec(role, shape, dtype, q) for role, shape in outputs.items()},
    )


def _fake_bundle(root: Path, model: str = "tiny") -> Manifest:
    """Write a two-block bundle's files into ``root`` (bytes stand in for graphs: load_bundle only hashes them)."""
    blocks = []
    for i in range(2):
        outputs = {"features": (1, 4), "logits": (1, 3)} | ({} if i == 1 else {"hidden": (1, 8, 8, 4)})
        arts = {p: _artifact(root, f"blocks/block{i:02d}_{p}.tflite", p, outputs, (1, 8, 8, 3 if i == 0 else 4))
                for p in ("fp32", "int8")}
        blocks.append(
            BlockEntry(i, f"block{i:02d}", 100 * (i + 1), 10, (1, 8, 8, 3 if i == 0 else 4),
                       (1, 8, 8, 4) if i == 0 else None, 4, arts)
        )
    heads = [(np.full((3, 4), i, np.float32), np.arange(3, dtype=np.float32)) for i in range(2)]
    parity = ParityReport(
        5,
        (0.4, 0.6),
        (BlockParity(0, "fp32", 1.0, 1e-6, 2e-6), BlockParity(1, "fp32", 1.0, None, 3e-6),
         BlockParity(0, "int8", 0.8, 1e-2, 2e-2), BlockParity(1, "int8", 1.0, None, 3e-2)),
        (ChainedParity("fp32", (1.0, 1.0), (0.4, 0.6)), ChainedParity("int8", (0.8, 1.0), None)),
    )
    return Manifest(
        model=model,
        classes=("a", "b", "c"),
        input=InputSpec(8, 8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        blocks=tuple(blocks),
        heads_sha256=save_heads(root / "heads.npz", heads),
        whole_model={"fp32": _artifact(root, "whole/whole_fp32.tflite", "fp32", {"logits": (1, 3)})},
        parity=parity,
        conversion={"precisions": ["fp32", "int8"], "seconds": {"total_s": 1.5}},
    )


def _publish(dest: Path, model: str = "tiny") -> Manifest:
    stage = staging_dir(dest)
    manifest = _fake_bundle(stage, model)
    write_bundle(stage, manifest, dest)
    return manifest


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(bundle: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_manifest_json_round_trip(tmp_path: Path) -> None:
    m = _fake_bundle(tmp_path)
    assert Manifest.from_json(json.loads(json.dumps(m.to_json()))) == m


def test_manifest_properties(tmp_path: Path) -> None:
    m = _fake_bundle(tmp_path)
    assert m.num_exits == 2
    assert m.precisions == ("fp32", "int8")
    assert m.cumulative_macs() == [100, 300]
    assert m.format_version == FORMAT_VERSION
    assert m.parity is not None and m.parity.min_isolated_agreement("fp32") == 1.0
    with pytest.raises(BundleError, match="no chained parity for fp16"):
        m.parity.chained_for("fp16")


def test_write_then_load(tmp_path: Path) -> None:
    dest = tmp_path / "bundle"
    stage = staging_dir(dest)
    manifest = _fake_bundle(stage)
    bundle = write_bundle(stage, manifest, dest)
    assert bundle.path == dest and not stage.exists()
    # no staging or temp files left beside it; the (empty, unlocked) lock file stays, as flock's files do
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle.lock", "bundle"]
    loaded = load_bundle(dest)
    assert loaded.manifest == manifest
    (w0, b0), (w1, _) = loaded.heads()
    np.testing.assert_array_equal(w1, np.ones((3, 4), np.float32))
    assert w0.dtype == b0.dtype == np.float32 and b0.tolist() == [0, 1, 2]
    assert loaded.file(manifest.blocks[0].artifacts["int8"]) == dest / "blocks" / "block00_int8.tflite"


def test_block_artifact_unknown_precision(tmp_path: Path) -> None:
    dest = tmp_path / "bundle"
    _publish(dest)
    with pytest.raises(BundleError, match=r"block 1 has no fp16 graph \(has fp32, int8\)"):
        load_bundle(dest).block_artifact(1, "fp16")


def test_write_refuses_existing_dest_and_keeps_it(tmp_path: Path) -> None:
    dest = tmp_path / "bundle"
    old = _publish(dest, "old")
    stage = staging_dir(dest)
    with pytest.raises(BundleError, match="exists; pass --force"):
        write_bundle(stage, _fake_bundle(stage, "new"), dest)
    assert load_bundle(dest).manifest == old


def test_write_overwrite_replaces_and_leaves_nothing_behind(tmp_path: Path) -> None:
    dest = tmp_path / "bundle"
    _publish(dest, "old")
    stage = staging_dir(dest)
    new = _fake_bundle(stage, "new")
    write_bundle(stage, new, dest, overwrite=True)
    assert load_bundle(dest).manifest == new
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle.lock", "bundle"]


def test_write_verifies_staging_before_publishing(tmp_path: Path) -> None:
    dest = tmp_path / "bundle"
    stage = staging_dir(dest)
    manifest = _fake_bundle(stage)
    (stage / "blocks" / "block01_int8.tflite").unlink()
    with pytest.raises(BundleError, match="block01_int8.tflite is missing"):
        write_bundle(stage, manifest, dest)
    assert not dest.exists()


def test_written_files_follow_umask(tmp_path: Path) -> None:
    """A published bundle is readable by whoever the umask allows (e.g. a service user on the device)."""
    old_umask = os.umask(0o022)
    try:
        dest = tmp_path / "bundle"
        _publish(dest)
    finally:
        os.umask(old_umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (dest, dest / "manifest.json", dest / "heads.npz")}
    unreadable = {name: oct(mode) for name, mode in modes.items() if mode & 0o044 != 0o044}
    assert not unreadable, f"not group/other-readable under umask 022: {unreadable}"


def _corrupt_block(b: Path) -> None:
    _flip_byte(b / "blocks" / "block01_int8.tflite")


def _delete_block(b: Path) -> None:
    (b / "blocks" / "block01_int8.tflite").unlink()


def _corrupt_heads(b: Path) -> None:
    _flip_byte(b / "heads.npz")


def _future_version(b: Path) -> None:
    _edit_manifest(b, lambda d: d.update(format_version=FORMAT_VERSION + 1))


def _drop_blocks_key(b: Path) -> None:
    _edit_manifest(b, lambda d: d.pop("blocks"))


def _truncate_json(b: Path) -> None:
    path = b / "manifest.json"
    path.write_text(path.read_text()[:100])


def _json_list(b: Path) -> None:
    (b / "manifest.json").write_text("[]")


def _no_manifest(b: Path) -> None:
    (b / "manifest.json").unlink()


@pytest.mark.parametrize(
    "damage, message",
    [
        (_corrupt_block, r"blocks/block01_int8.tflite sha256 mismatch \(manifest [0-9a-f]{8}, file [0-9a-f]{8}\)"),
        (_delete_block, r"blocks/block01_int8.tflite is missing"),
        (_corrupt_heads, r"heads.npz sha256 mismatch"),
        (_future_version, rf"format_version {FORMAT_VERSION + 1}, this edgequee reads {FORMAT_VERSION}"),
        (_drop_blocks_key, "manifest.json: blocks is missing"),
        (_truncate_json, r"manifest.json: not valid JSON"),
        (_json_list, r"manifest.json"),  # valid JSON, but not an object
        (_no_manifest, r"no manifest.json; is this an edgequee bundle"),
    ],
)
def test_load_detects_damage(tmp_path: Path, damage: Callable[[Path], None], message: str) -> None:
    dest = tmp_path / "bundle"
    _publish(dest)
    damage(dest)
    with pytest.raises(BundleError, match=message):
        load_bundle(dest)


def test_load_without_verify_skips_hashes(tmp_path: Path) -> None:
    dest = tmp_path / "bundle"
    manifest = _publish(dest)
    _corrupt_block(dest)
    assert load_bundle(dest, verify=False).manifest == manifest


@pytest.mark.slow
def test_converted_bundle_loads_and_round_trips(converted) -> None:
    bundle = load_bundle(converted.path)
    m = bundle.manifest
    assert m.num_exits == converted.model.num_exits
    assert m.precisions == ("fp32", "fp16", "int8")
    assert set(m.whole_model) == {"fp32", "int8"}
    assert Manifest.from_json(json.loads(json.dumps(m.to_json()))) == m
    assert json.loads((converted.path / "manifest.json").read_text()) == json.loads(json.dumps(m.to_json()))


@pytest.mark.slow
def test_converted_bundle_detects_flipped_byte(bundle_copy: Path) -> None:
    target = bundle_copy / "blocks" / "blocks_fp16.tflite"
    _flip_byte(target)
    with pytest.raises(BundleError, match=r"blocks/blocks_fp16.tflite sha256 mismatch"):
        load_bundle(bundle_copy)
    target.unlink()
    with pytest.raises(BundleError, match=r"blocks/blocks_fp16.tflite is missing"):
        load_bundle(bundle_copy)
