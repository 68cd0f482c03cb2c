"""The command line through click's CliRunner: exit codes, stdout/stderr, JSON output."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Callable

import numpy as np
import pytest
from clirun import invoke, one_line_error

from edgequee.bundle import Manifest, load_bundle
from edgequee.cli import main
from edgequee.policies import ThresholdPolicy
from edgequee.runtime import EdgeRunner

SAMPLE_NPZ = Path(__file__).resolve().parents[2] / "converters" / "zoo" / "cifar10_sample.npz"


@pytest.mark.parametrize("command", sorted(main.commands))
def test_help_on_every_command(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Usage: edgequee {command} ")
    summary = " ".join((main.commands[command].help or "").split())[:40]
    assert summary and summary in " ".join(result.stdout.split())


def test_top_level_help_and_version() -> None:
    result = invoke("-h")
    assert result.exit_code == 0 and all(name in result.stdout for name in main.commands)
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == "edgequee, version 0.1.0"


def test_inspect_not_a_bundle(tmp_path: Path) -> None:
    assert "no manifest.json; is this an edgequee bundle?" in one_line_error(invoke("inspect", tmp_path))


@pytest.mark.slow
def test_inspect_text(converted) -> None:
    result = invoke("inspect", converted.path)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"bundle {converted.path}  (format 1, verified)" in out
    model = converted.model
    assert f"model {model.name}: {model.num_exits} blocks, 10 classes, input 32x32x3 RGB (NHWC)" in out
    assert "precisions: fp32, fp16, int8; whole model: fp32, int8" in out
    assert "parity on 200 images" in out


@pytest.mark.slow
def test_inspect_json_to_stdout(converted) -> None:
    result = invoke("inspect", converted.path, "--json", "-")
    assert result.exit_code == 0, result.output
    assert Manifest.from_json(json.loads(result.stdout)) == load_bundle(converted.path).manifest


@pytest.mark.slow
def test_inspect_corrupt_bundle(bundle_copy: Path) -> None:
    path = bundle_copy / "whole" / "whole_int8.tflite"
    path.write_bytes(path.read_bytes()[:-1])
    assert "whole/whole_int8.tflite sha256 mismatch" in one_line_error(invoke("inspect", bundle_copy))
    assert invoke("inspect", bundle_copy, "--no-verify").exit_code == 0


@pytest.mark.slow
def test_profile(converted, bundle_copy: Path) -> None:
    result = invoke("profile", bundle_copy, "--device", "pi5", "--min-time", "0.01")
    assert result.exit_code == 0, result.output
    written = bundle_copy / "profiles" / "pi5.json"
    profile = json.loads(written.read_text())
    assert profile["device"] == "pi5" and profile["energy"]["source"] == "not measured"
    assert {b["latency_ms"]["source"] for b in profile["blocks"]} == {"measured"}
    assert len(profile["blocks"]) == 3 * converted.model.num_exits
    assert "energy: not measured" in result.stdout and f"wrote {written}" in result.stdout
    assert "profiling" in result.stderr  # the progress bar goes to stderr
    assert "profiles: pi5" in invoke("inspect", bundle_copy).stdout


@pytest.mark.slow
def test_bench_json_and_plot(converted, tmp_path: Path, require: Callable[..., ModuleType]) -> None:
    require("matplotlib")
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    result = invoke("bench", converted.path, "--data", SAMPLE_NPZ, "--n-images", "20", "--latency-samples", "3",
                     "--precisions", "fp32,int8", "--thresholds", "0.5,inf", "--json", out, "--plot", plot)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["n_images"] == 20 and report["latency_samples"] == 3
    assert set(report["whole_model"]) == {"fp32", "int8"} and set(report["split_overhead"]) == {"fp32", "int8"}
    assert [(p["precision"], p["threshold"]) for p in report["policies"]] == [
        ("fp32", 0.5), ("fp32", None), ("int8", 0.5), ("int8", None)]
    assert "whole fp32" in result.stdout and "split overhead" in result.stdout
    assert f"wrote {out}" in result.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bench_with_no_latency_samples_is_a_clean_error(converted) -> None:
    """--latency-samples 0 is refused (or handled); never a traceback."""
    result = invoke("bench", converted.path, "--data", SAMPLE_NPZ, "--n-images", "10", "--latency-samples", "0",
                     "--precisions", "fp32", "--thresholds", "inf")
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def test_bench_rejects_unknown_precision(tmp_path: Path) -> None:
    result = invoke("bench", tmp_path, "--data", SAMPLE_NPZ, "--precisions", "fp32,fp64")
    assert result.exit_code == 2
    assert "Invalid value for '--precisions': 'fp64': choose from fp32, fp16, int8" in result.stderr


@pytest.fixture
def png_files(sample, tmp_path: Path, require: Callable[..., ModuleType]) -> list[Path]:
    cv2 = require("cv2", extra="camera")
    files = []
    for n in range(3):
        f = tmp_path / f"img{n}.png"
        assert cv2.imwrite(str(f), np.ascontiguousarray(sample.x_test[n][:, :, ::-1]))
        files.append(f)
    return files


@pytest.mark.slow
def test_run_png_files(converted, sample, png_files: list[Path]) -> None:
    result = invoke("run", converted.path, *png_files, "--json", "-")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    runner = EdgeRunner(converted.path)
    assert [r["input"] for r in rows] == [str(f) for f in png_files]
    assert [r["class_id"] for r in rows] == [runner.classify(im).class_id for im in sample.x_test[:3]]
    n = converted.model.num_exits
    assert all(r["exit"] == n - 1 and r["precision_path"] == ["fp32"] * n for r in rows)
    assert all(r["class"] == sample.classes[r["class_id"]] and 0 < r["prob"] <= 1 for r in rows)


@pytest.mark.slow
def test_run_early_exit_text(converted, sample, png_files: list[Path]) -> None:
    result = invoke("run", converted.path, *png_files, "--precision", "int8", "--threshold", "0")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    runner = EdgeRunner(converted.path, ThresholdPolicy("int8", 0.0))
    for line, f, image in zip(lines, png_files, sample.x_test):
        name = sample.classes[runner.classify(image).class_id]
        assert line.startswith(f"{f}: {name} (") and " exit 0 [int8] " in line and line.endswith(" ms")
    assert len(lines) == 3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nope.png", "nope.npz"])
def test_run_missing_input(converted, tmp_path: Path, name: str) -> None:
    assert f"{name}: " in one_line_error(invoke("run", converted.path, tmp_path / name))


@pytest.mark.parametrize(
    "model, message",
    [("missing.pt", "missing.pt: no such checkpoint (make one with edgequee train)"),
     ("resnet21", "'resnet21' is neither a checkpoint file nor a model (")],
)
def test_convert_unknown_model(tmp_path: Path, require: Callable[..., ModuleType], model: str, message: str) -> None:
    require("torch")
    out = tmp_path / "bundle"
    line = one_line_error(invoke("convert", tmp_path / model if model.endswith(".pt") else model,
                                   "--out", out, "--calib", SAMPLE_NPZ))
    assert message in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
