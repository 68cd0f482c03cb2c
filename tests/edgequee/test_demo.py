"""The camera demo (headless, on a video and an image folder made from the shipped CIFAR-10 images, with the real
converted bundle) and the HTML bench report."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import pytest
from clirun import invoke

from edgequee.bundle import load_bundle

SAMPLE_NPZ = Path(__file__).resolve().parents[2] / "converters" / "zoo" / "cifar10_sample.npz"
N_FRAMES = 40


def _log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def cv2(require: Callable[..., ModuleType]) -> ModuleType:
    return require("cv2", extra="camera")


@pytest.fixture
def video(cv2: ModuleType, sample, tmp_path: Path) -> Path:
    """128x96 frames, each a CIFAR test image scaled 3x (nearest) into the centre, black bars left and right."""
    from edgequee.demo import write_video

    return write_video(sample.x_test[:N_FRAMES], tmp_path / "cifar.mp4", (128, 96), fps=10)


@pytest.fixture
def profiled(bundle_copy: Path) -> Path:
    """The bundle with a real int8 latency profile of this machine (profiles/host.json)."""
    from edgequee.profiler import profile_bundle

    profile_bundle(load_bundle(bundle_copy), "host", min_time_s=0.02, precisions=("int8",))
    return bundle_copy


def test_demo_modules_import_without_cv2_or_matplotlib() -> None:
    code = ("import sys, edgequee.demo, edgequee.html_report, edgequee.cli; "
            "print(sorted(m for m in ('cv2', 'matplotlib', 'picamera2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_headless_video(cv2: ModuleType, converted, sample, profiled: Path, video: Path, tmp_path: Path) -> None:
    from edgequee.cost import CostModel
    from edgequee.policies import ThresholdPolicy
    from edgequee.runtime import EdgeRunner

    out = tmp_path / "out"
    result = invoke("demo", "camera", profiled, "--source", video, "--headless", "--out", out,
                     "--precision", "int8", "--threshold", "0.8", "--json", "-")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    log = _log(out / "frames.jsonl")
    n_exits = converted.model.num_exits

    # one line per frame, each self-consistent
    assert [r["frame"] for r in log] == list(range(N_FRAMES))
    for r in log:
        assert r["class"] == sample.classes[r["class_id"]] and 0.1 <= r["confidence"] <= 1
        assert 0 <= r["exit"] < n_exits and r["precision_path"] == ["int8"] * (r["exit"] + 1)
        assert 0 < r["runtime_ms"] < r["total_ms"]
        assert r["overhead_ms"] == pytest.approx(r["total_ms"] - r["runtime_ms"], abs=1e-3)
        assert r["post_ms"] == pytest.approx(r["draw_ms"] + r["write_ms"], abs=1e-3)
        parts = r["read_ms"] + r["pre_ms"] + r["runtime_ms"] + r["post_ms"]
        assert parts <= r["total_ms"] + 1e-3 and r["total_ms"] - parts < 0.5 * r["total_ms"] + 1.0
        assert r["energy_mj"] is None
    times = [r["time"] for r in log]
    assert times == sorted(times)

    # the frames went through crop + resize + BGR→RGB: same answers as on the original images (mp4 is lossy)
    runner = EdgeRunner(converted.path, ThresholdPolicy("int8", 0.8))
    ref = [runner.classify(im).class_id for im in sample.x_test[:N_FRAMES]]
    assert np.mean([r["class_id"] == c for r, c in zip(log, ref)]) >= 0.7

    # latencies agree with the measured profile, priced by the cost model for the paths actually taken
    cost = CostModel.for_bundle(load_bundle(profiled), "host")
    expected = [cost.path(r["precision_path"]).latency_ms for r in log]
    ratio = np.median([r["runtime_ms"] for r in log]) / np.median(expected)
    assert 0.3 < ratio < 5, ratio

    # the summary adds up
    exits = np.bincount([r["exit"] for r in log], minlength=n_exits).tolist()
    assert summary["frames"] == N_FRAMES and summary["exit_histogram"] == exits and not summary["lost"]
    assert summary["stopped"] == "end of source" and summary["dropped"] == 0
    assert summary["compute_saved"] == pytest.approx(1 - np.mean([r["compute_fraction"] for r in log]))
    assert summary["latency_priced_by"] == "host profile" and -1 < summary["latency_saved"] < 1
    assert summary["ms"]["runtime"]["mean"] == pytest.approx(np.mean([r["runtime_ms"] for r in log]), rel=1e-3)
    assert summary["mean_fps"] == pytest.approx(1e3 / np.mean([r["total_ms"] for r in log]), rel=1e-3)
    assert summary["outputs"]["video"] == str(out / "annotated.mp4")

    # the annotated video: every frame, upscaled, with the overlay drawn over the picture
    cap = cv2.VideoCapture(str(out / "annotated.mp4"))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    assert len(frames) == N_FRAMES and frames[0].shape == (480, 640, 3)
    annotated = frames[5]
    assert cv2.imwrite(str(tmp_path / "annotated_frame.png"), annotated)
    cap = cv2.VideoCapture(str(video))
    for _ in range(6):
        ok, raw = cap.read()
    raw = cv2.resize(raw, (640, 480), interpolation=cv2.INTER_NEAREST)
    diff = np.abs(annotated.astype(np.int16) - raw.astype(np.int16)).mean(-1)
    assert annotated.std() > 20
    assert diff[330:, :200].mean() > 25  # the text panel, bottom left
    assert diff[:30, -150:].mean() > 25  # the exit squares, top right
    assert diff[60:300, 300:540].mean() < 12  # the picture itself is left alone


@pytest.mark.slow
def test_image_folder_is_exact(cv2: ModuleType, converted, sample, tmp_path: Path) -> None:
    """PNG frames are lossless: centre crop + area resize of a 2x nearest upscale gives back the very image."""
    from edgequee.demo import FolderSource, FramePrep, run_demo
    from edgequee.policies import ThresholdPolicy
    from edgequee.runtime import EdgeRunner

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    n = 24
    prep = FramePrep(load_bundle(converted.path).manifest.input)
    for i, im in enumerate(sample.x_test[:n]):
        canvas = np.full((64, 80, 3), 255, np.uint8)
        canvas[:, 8:72] = cv2.resize(np.ascontiguousarray(im[:, :, ::-1]), (64, 64), interpolation=cv2.INTER_NEAREST)
        assert np.array_equal(prep(canvas), im)  # crop, resize and BGR→RGB undo exactly what was done here
        assert cv2.imwrite(str(folder / ("sub" if i % 2 else "") / f"img{i:02d}.png"), canvas)
    (folder / "zz_broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("ignored")
    runner = EdgeRunner(converted.path, ThresholdPolicy("fp32", 0.9))
    out = tmp_path / "out"
    summary = run_demo(runner, FolderSource(folder), out_dir=out, record="png")
    log = _log(out / "frames.jsonl")
    order = sorted(folder.rglob("img*.png"))  # the folder is read sorted by path
    images = [sample.x_test[int(p.stem[3:])] for p in order]
    assert [r["class_id"] for r in log] == [runner.classify(im).class_id for im in images]
    assert [r["exit"] for r in log] == [runner.classify(im).exit_index for im in images]
    assert summary["frames"] == n and sorted(p.name for p in (out / "frames").iterdir())[-1] == f"{n - 1:06d}.png"
    assert any("skipped 1 undecodable image(s)" in note and "zz_broken.png" in note for note in summary["notes"])
    png = cv2.imread(str(out / "frames" / "000000.png"))
    assert png.shape == (480, 600, 3) and png.std() > 20


@pytest.mark.slow
def test_lost_camera_keeps_the_log(cv2: ModuleType, converted, video: Path, tmp_path: Path) -> None:
    """A live source that goes away mid-run is reopened with backoff, then the demo stops cleanly, log kept."""
    from edgequee.demo import VideoSource, run_demo
    from edgequee.runtime import EdgeRunner

    class UnpluggedAfterOpen(VideoSource):
        """The real video, read as a live camera whose device node is gone after the first open."""

        def open(self) -> None:
            super().open()
            self.target.unlink(missing_ok=True)

    source = UnpluggedAfterOpen(video)
    source.live = True
    out = tmp_path / "out"
    summary = run_demo(EdgeRunner(converted.path), source, out_dir=out, retries=2, backoff_s=0.05)
    assert summary["lost"] and "cannot open this video" in summary["stopped"]
    assert summary["stopped"].endswith("after 2 retries")
    log = _log(out / "frames.jsonl")
    assert len(log) == summary["frames"] > 0
    assert summary["frames"] + summary["dropped"] == N_FRAMES  # the newest frame wins; none is lost unaccounted
    assert summary["seconds"] >= 0.05 + 0.1  # both backoffs were waited
    assert json.loads((out / "summary.json").read_text())["frames"] == len(log)


@pytest.mark.slow
def test_camera_that_never_opens_is_a_clean_error(cv2: ModuleType, converted, tmp_path: Path) -> None:
    index = next(i for i in range(60, 100) if not os.path.exists(f"/dev/video{i}"))
    out = tmp_path / "out"
    result = invoke("demo", "camera", converted.path, "--source", f"v4l2:{index}", "--headless", "--out", out,
                     "--retries", "1", "--backoff", "0.01")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: source lost (v4l2:{index}: cannot open /dev/video{index} (plugged in? in group video?)) after 1 "
        "retries; 0 frame(s) logged")
    assert (out / "frames.jsonl").read_text() == ""
    assert json.loads((out / "summary.json").read_text())["lost"] is True


@pytest.mark.slow
def test_source_errors(cv2: ModuleType, converted, tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\0" * 4096)
    result = invoke("demo", "camera", converted.path, "--source", bad, "--headless", "--out", tmp_path / "o")
    assert result.exit_code == 1 and "cannot open this video" in result.stderr
    result = invoke("demo", "camera", converted.path, "--source", tmp_path / "missing.mp4", "--headless", "--out",
                     tmp_path / "o")
    assert result.exit_code == 1 and "no such file or folder" in result.stderr
    assert invoke("demo", "camera", converted.path, "--source", bad, "--headless").exit_code == 2


def _embedded_pngs(page: str, cv2: ModuleType) -> list[np.ndarray]:
    found = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return [cv2.imdecode(np.frombuffer(base64.b64decode(b), np.uint8), cv2.IMREAD_COLOR) for b in found]


@pytest.mark.slow
def test_bench_html_report(cv2: ModuleType, require: Callable[..., ModuleType], profiled: Path,
                           tmp_path: Path) -> None:
    require("matplotlib")
    report_dir = tmp_path / "report"
    result = invoke("bench", profiled, "--data", SAMPLE_NPZ, "--n-images", "30", "--latency-samples", "3",
                     "--precisions", "fp32,int8", "--thresholds", "0.5,0.9,inf", "--report", report_dir,
                     "--json", tmp_path / "bench.json")
    assert result.exit_code == 0, result.output
    assert f"wrote {report_dir / 'index.html'}" in result.stderr
    page = (report_dir / "index.html").read_text()
    bench = json.loads((tmp_path / "bench.json").read_text())

    # self-contained: every image inline, nothing fetched
    assert not re.search(r'(src|href)="(?!data:)', page) and "<script" not in page and "<link" not in page
    pngs = _embedded_pngs(page, cv2)
    assert len(pngs) == 2  # accuracy vs latency, exit histograms (no energy in this report)
    for img in pngs:
        assert img is not None and img.shape[0] > 200 and img.shape[1] > 500 and img.std() > 10

    # every policy and baseline in the table, the Pareto front marked
    rows = re.findall(r"<tr(?: class=\"pareto\")?><td class=\"l\">([^<]+)</td><td class=\"l\">([^<]+)</td>", page)
    want = [(f"whole model {p}", "-") for p in bench["whole_model"]]
    want += [(f"threshold {p['precision']}", "inf" if p["threshold"] is None else f"{p['threshold']:g}")
             for p in bench["policies"]]
    assert rows[: len(want)] == want
    assert 'class="pareto"' in page

    # the cost table from profiles/host.json, with the profile's own numbers
    profile = json.loads((profiled / "profiles" / "host.json").read_text())
    assert "<h3>host " in page and "<th>int8 ms</th>" in page
    from edgequee.cost import CostModel

    cost = CostModel.for_bundle(load_bundle(profiled), "host")
    for b in profile["blocks"]:
        assert f"<td>{cost.block(b['block'], 'int8').latency_ms:.4g}</td>" in page
    assert "no certificate (no stored policy" in page


@pytest.mark.slow
def test_html_report_shows_the_certificate(cv2: ModuleType, require: Callable[..., ModuleType], converted,
                                           bundle_copy: Path, sample, tmp_path: Path) -> None:
    require("matplotlib")
    from edgequee.bench import bench_bundle
    from edgequee.calibrate import calibrate_bundle
    from edgequee.html_report import write_html_report

    calibrate_bundle(load_bundle(bundle_copy), sample.x_test[:300], sample.y_test[:300], policy="threshold",
                     risk="gap", epsilon=0.05, method="crc")
    bundle = load_bundle(bundle_copy)
    report = bench_bundle(bundle, sample.x_test[300:330], sample.y_test[300:330], precisions=("fp32",),
                          thresholds=(0.9,), latency_samples=2)
    page = write_html_report(report, bundle, tmp_path / "r").read_text()
    cert = bundle.policy().certificate
    assert "Risk certificate" in page and "no certificate" not in page
    for field in ("risk", "method", "n_cal", "data_fingerprint"):
        assert f'<td class="l">{field}</td><td class="l">{getattr(cert, field)}</td>' in page
    assert f'<td class="l">knob_value</td><td class="l">{cert.knob_value:.4g}</td>' in page
    assert "No device profile in this bundle" in page
