"""Camera demo: frames from a Pi camera, a USB webcam, a video file or an image folder → EdgeRunner → overlay.

The app lives here, in the package, because ``edgequee demo camera`` must work from an installed wheel and
``demos/`` is not part of it; ``demos/camera.py`` is the runnable example script that calls ``run_demo``.
Device side: numpy, a TFLite runtime, and OpenCV (the ``camera`` extra) imported only when a demo starts;
picamera2 is imported only for ``--source picam``.

Live sources (picam, v4l2:N) are read in a thread that keeps only the newest frame; a lost camera is reopened
``retries`` times with exponential backoff, then the demo stops cleanly, log kept. Files and folders are read in
the loop, frame by frame, none dropped. Each frame is center-cropped to the model's aspect ratio, resized to the
bundle's input size, turned BGR→RGB and handed to ``EdgeRunner.classify`` (its uint8 path).

Per-frame times in the JSONL log (ms): ``read`` (decoding a file frame; for live sources, waiting for a newer
frame), ``pre`` (crop, resize, BGR→RGB), ``runtime`` (EdgeRunner's own measure: its input table, the blocks and
exit heads, the gate, softmax), ``post`` = ``draw`` (the overlay) + ``write`` (encoding or showing the frame),
``total`` (the whole iteration) and ``overhead`` = total − runtime: what the demo itself costs. The overlay
shows the previous frame's post time and energy, since both are known only after the frame is drawn.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import itertools
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from ._lazy import require
from .bundle import Bundle, InputSpec, Manifest, write_json_atomic
from .cost import CostModel
from .data import IMAGE_SUFFIXES
from .errors import DataError, DeviceError
from .runtime import EdgeRunner, Result

__all__ = ["Source", "PicamSource", "VideoSource", "FolderSource", "open_source", "FramePrep", "Overlay",
           "EnergySource", "run_demo", "summary_text", "write_video"]

# Energy (mJ) used between two wall-clock instants (time.time(), the clock of edgequee.meters), None if unknown.
EnergySource = Callable[[float, float], "float | None"]
LOG_NAME, SUMMARY_NAME, VIDEO_NAME, FRAMES_DIR = "frames.jsonl", "summary.json", "annotated.mp4", "frames"
_PRECISION_BGR = {"fp32": (230, 160, 60), "fp16": (200, 200, 40), "int8": (40, 160, 250)}


def _cv2() -> ModuleType:
    return require("cv2", extra="camera")


# ------------------------------------------------------------------------------------------------ sources


class Source(Protocol):
    """Where frames come from: uint8 H×W×3 BGR arrays (OpenCV's order)."""

    name: str
    live: bool  # a camera: read in a thread keeping the newest frame; reopened when lost
    fps: float | None

    def open(self) -> None:
        """Start the source; raise DeviceError/DataError when it cannot be opened."""
        ...

    def read(self) -> np.ndarray | None:
        """The next frame, or None at the end (files) or on failure (cameras)."""
        ...

    def close(self) -> None: ...


class PicamSource:
    """A Raspberry Pi CSI camera through picamera2 (from apt: python3-picamera2)."""

    live = True

    def __init__(self, size: tuple[int, int] = (640, 480)):
        try:
            self._picamera2 = importlib.import_module("picamera2")
        except ImportError as e:
            raise DeviceError(
                f"picamera2 is not importable ({e}): on Raspberry Pi OS run `sudo apt install python3-picamera2` "
                "and create the venv with `python3 -m venv --system-site-packages`"
            ) from e
        self.name, self.size, self.fps = "picam", size, None
        self._cam: Any = None

    def open(self) -> None:
        try:
            self._cam = self._picamera2.Picamera2()
            # libcamera's "RGB888" stores each pixel as B, G, R bytes: the array is BGR, OpenCV's order.
            self._cam.configure(self._cam.create_preview_configuration(main={"format": "RGB888", "size": self.size}))
            self._cam.start()
        except Exception as e:  # picamera2 raises IndexError, RuntimeError, … when no camera answers
            self.close()
            raise DeviceError(f"picam: cannot start the camera ({type(e).__name__}: {e}); is it connected?") from e

    def read(self) -> np.ndarray | None:
        try:
            return self._cam.capture_array()
        except Exception:  # a camera unplugged mid-run raises from libcamera; the reader reopens it
            return None

    def close(self) -> None:
        if self._cam is not None:
            try:
                self._cam.close()
            finally:
                self._cam = None


class VideoSource:
    """OpenCV VideoCapture: a V4L2 webcam (``target`` = its /dev/videoN index; live) or a video file."""

    def __init__(self, target: int | Path, size: tuple[int, int] = (640, 480)):
        self.live = isinstance(target, int)
        self.target, self.size, self.fps = target, size, None
        self.name = f"v4l2:{target}" if self.live else str(target)
        self._cap: Any = None

    def open(self) -> None:
        cv2 = _cv2()
        webcam = isinstance(self.target, int)
        if webcam:
            cap = cv2.VideoCapture(self.target, cv2.CAP_V4L2)
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*"MJPG"))
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.size[0])
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.size[1])
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        else:
            cap = cv2.VideoCapture(str(self.target))
        if not cap.isOpened():
            cap.release()
            if webcam:
                raise DeviceError(f"{self.name}: cannot open /dev/video{self.target} (plugged in? in group video?)")
            raise DataError(f"{self.name}: cannot open this video (missing, or not a format OpenCV's FFmpeg reads)")
        self._cap = cap
        self.fps = float(cap.get(cv2.CAP_PROP_FPS)) or None

    def read(self) -> np.ndarray | None:
        ok, frame = self._cap.read()
        return frame if ok else None

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class FolderSource:
    """The images of a folder (recursively, sorted by path); undecodable files are skipped and listed."""

    live = False

    def __init__(self, path: Path):
        self.path, self.name, self.fps = Path(path), str(path), None
        self.skipped: list[str] = []
        self._files: collections.deque[Path] = collections.deque()

    def open(self) -> None:
        files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{self.path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self._files = collections.deque(files)

    def read(self) -> np.ndarray | None:
        cv2 = _cv2()
        while self._files:
            f = self._files.popleft()
            img = cv2.imread(str(f), cv2.IMREAD_COLOR)
            if img is not None:
                return img
            self.skipped.append(str(f))
        return None

    def close(self) -> None:
        self._files.clear()


def open_source(spec: str) -> Source:
    """``picam`` | ``v4l2:N`` | a video file | a folder of images → a Source (not opened yet)."""
    if spec == "picam":
        return PicamSource()
    if spec.startswith("v4l2:"):
        index = spec[5:]
        if not index.isdigit():
            raise DataError(f"{spec}: expected v4l2:N with N the camera index (0 for /dev/video0)")
        return VideoSource(int(index))
    path = Path(spec)
    if path.is_dir():
        return FolderSource(path)
    if path.is_file():
        return VideoSource(path)
    raise DataError(f"{spec}: no such file or folder (give picam, v4l2:N, a video file or a folder of images)")


class _FileReader:
    """Files and folders: every frame, in order, read in the loop."""

    def __init__(self, source: Source):
        self.source, self.dropped, self.lost = source, 0, False
        source.open()
        self.stopped = "end of source"

    def next(self) -> np.ndarray | None:
        return self.source.read()

    def close(self) -> None:
        self.source.close()


class _LatestFrame:
    """A live source read in a thread that keeps only the newest frame; reopened with backoff when lost."""

    def __init__(self, source: Source, retries: int, backoff_s: float):
        self.source, self.retries, self.backoff_s = source, retries, backoff_s
        self.dropped, self.lost, self.stopped = 0, False, ""
        self._frame: np.ndarray | None = None
        self._done = False
        self._cond = threading.Condition()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"edgequee-capture-{source.name}", daemon=True)
        self._thread.start()

    def _open(self) -> str | None:
        """Open the source; None on success, else why not."""
        try:
            self.source.open()
            return None
        except Exception as e:  # DeviceError, or whatever a camera stack raises
            self.source.close()
            return str(e)

    def _reconnect(self, why: str) -> bool:
        for k in range(self.retries):
            if self._halt.wait(self.backoff_s * 2**k):
                return False
            self.source.close()
            why = self._open() or ""
            if not why:
                return True
        self.lost = True
        self.stopped = f"source lost ({why}) after {self.retries} retries"
        return False

    def _run(self) -> None:
        try:
            why = self._open()
            if why is not None and not self._reconnect(why):
                return
            while not self._halt.is_set():
                frame = self.source.read()
                if frame is None:
                    if not self._reconnect(f"{self.source.name} returned no frame"):
                        return
                    continue
                with self._cond:
                    self.dropped += self._frame is not None
                    self._frame = frame
                    self._cond.notify()
        finally:
            with self._cond:
                self._done = True
                self._cond.notify()

    def next(self) -> np.ndarray | None:
        with self._cond:
            self._cond.wait_for(lambda: self._frame is not None or self._done)
            frame, self._frame = self._frame, None
            return frame

    def close(self) -> None:
        self._halt.set()
        self._thread.join(timeout=5)
        self.source.close()
        if not self.stopped:
            self.stopped = "stopped"


# ------------------------------------------------------------------------------------- frames and overlay


class FramePrep:
    """BGR frame of any size → the bundle's uint8 RGB input: center crop to its aspect ratio, area resize."""

    def __init__(self, spec: InputSpec):
        if spec.channels != 3:
            raise DataError(f"the camera demo feeds RGB frames; this bundle wants {spec.channels} channel(s)")
        self.size = (spec.width, spec.height)
        self._cv2 = _cv2()

    def crop_box(self, shape: Sequence[int]) -> tuple[int, int, int, int]:
        """(x0, y0, width, height) of the centered crop with the model's aspect ratio."""
        h, w = shape[:2]
        aspect = self.size[0] / self.size[1]
        cw, ch = (round(h * aspect), h) if w / h > aspect else (w, round(w / aspect))
        return (w - cw) // 2, (h - ch) // 2, cw, ch

    def __call__(self, bgr: np.ndarray) -> np.ndarray:
        cv2 = self._cv2
        x0, y0, cw, ch = self.crop_box(bgr.shape)
        crop = bgr[y0 : y0 + ch, x0 : x0 + cw]
        if (cw, ch) != self.size:
            crop = cv2.resize(crop, self.size, interpolation=cv2.INTER_AREA)
        return cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)


@dataclass
class _Savings:
    """Running "saved vs the whole model": MACs from the manifest; latency priced by the device's cost model
    (its measured profile BUNDLE/profiles/<device>.json, else its descriptor's estimate), when there is one."""

    cum_macs: list[int]
    cost: CostModel | None
    cost_label: str | None
    macs_used: float = 0.0
    frames: int = 0
    ms_used: float = 0.0
    ms_whole: float = 0.0
    _priced: dict[tuple[str, ...], tuple[float, float]] = field(default_factory=dict)

    @classmethod
    def for_bundle(cls, bundle: Bundle, device: str) -> "_Savings":
        try:
            cost = CostModel.for_bundle(bundle, device)
        except DeviceError:  # neither a profile nor a descriptor of that name
            return cls(bundle.manifest.cumulative_macs(), None, None)
        how = "profile" if cost.profile is not None else "estimate"
        return cls(bundle.manifest.cumulative_macs(), cost, f"{device} {how}")

    def add(self, r: Result) -> None:
        self.frames += 1
        self.macs_used += self.cum_macs[r.exit_index]
        if self.cost is None:
            return
        priced = self._priced.get(r.precision_path)
        if priced is None:
            try:
                priced = (self.cost.path(r.precision_path).latency_ms, self.cost.whole(r.precision_path[0]).latency_ms)
            except DeviceError:  # the device cannot price a precision this policy runs
                self.cost = self.cost_label = None
                return
            self._priced[r.precision_path] = priced
        self.ms_used += priced[0]
        self.ms_whole += priced[1]

    @property
    def compute(self) -> float:
        return 1.0 - self.macs_used / (self.frames * self.cum_macs[-1]) if self.frames else 0.0

    @property
    def latency(self) -> float | None:
        return 1.0 - self.ms_used / self.ms_whole if self.cost is not None and self.ms_whole else None


@dataclass
class _FrameView:
    """What the overlay shows for one frame."""

    result: Result
    pre_ms: float
    post_ms: float | None
    fps: float | None
    energy_mj: float | None
    metered: bool
    savings: _Savings


class Overlay:
    """Draws the result panel on a copy of the frame, upscaled to at least ``min_height`` pixels for legibility."""

    def __init__(self, manifest: Manifest, prep: FramePrep, min_height: int = 480):
        self.manifest, self.prep, self.min_height = manifest, prep, min_height
        self._cv2 = _cv2()

    def _upscale(self, bgr: np.ndarray) -> tuple[np.ndarray, float]:
        cv2 = self._cv2
        h, w = bgr.shape[:2]
        s = max(1.0, self.min_height / h)
        if s == 1.0:
            return bgr.copy(), s
        interp = cv2.INTER_NEAREST if s >= 4 else cv2.INTER_LINEAR  # tiny inputs: crisp pixels, not blur
        return cv2.resize(bgr, (round(w * s), round(h * s)), interpolation=interp), s

    def label(self, r: Result) -> str:
        """Class and confidence, or the conformal set when the result carries one (``prediction_set``: class ids)."""
        classes = self.manifest.classes
        pset = getattr(r, "prediction_set", None)
        if pset is not None:
            return "{" + ", ".join(classes[c] for c in pset) + "}"
        return f"{classes[r.class_id]} {100 * float(r.probs[r.class_id]):.0f}%"

    def lines(self, v: _FrameView) -> list[str]:
        r, n = v.result, self.manifest.num_exits
        post = "-" if v.post_ms is None else f"{v.post_ms:.2f}"
        fps = "-" if v.fps is None else f"{v.fps:.1f}"
        if v.energy_mj is not None:
            energy = f"energy {v.energy_mj:.2f} mJ/frame"
        else:
            energy = "energy: n/a (waiting for meter)" if v.metered else "energy: n/a (no meter)"
        saved = [f"saved vs whole model: {100 * v.savings.compute:.0f}% MACs"]
        lat = v.savings.latency
        if lat is not None:
            saved.append(f"  {100 * lat:.0f}% latency ({v.savings.cost_label})")
        runs = [(p, len(list(g))) for p, g in itertools.groupby(r.precision_path)]
        return [
            self.label(r),
            f"exit {r.exit_index + 1}/{n} @ " + " > ".join(p if k == 1 else f"{p} x{k}" for p, k in runs),
            f"pre {v.pre_ms:.2f} | blocks {r.latency_ms:.2f} | post {post} ms",
            f"FPS {fps}",
            energy,
            *saved,
        ]

    def draw(self, bgr: np.ndarray, v: _FrameView) -> np.ndarray:
        cv2 = self._cv2
        img, s = self._upscale(bgr)
        h, w = img.shape[:2]
        x0, y0, cw, ch = self.prep.crop_box(bgr.shape)
        cv2.rectangle(img, (round(x0 * s), round(y0 * s)), (round((x0 + cw) * s) - 1, round((y0 + ch) * s) - 1),
                      (255, 255, 255), max(1, h // 240))
        font, texts = cv2.FONT_HERSHEY_SIMPLEX, self.lines(v)
        k = h / 480
        widest = max(cv2.getTextSize(t, font, 0.9 if i == 0 else 0.55, 1)[0][0] for i, t in enumerate(texts))
        k = min(k, 0.95 * w / (widest + 20))  # narrow frames: smaller text rather than clipped text
        scales = [0.9 * k] + [0.55 * k] * (len(texts) - 1)
        step = [round(34 * k)] + [round(24 * k)] * (len(texts) - 1)
        pad = round(10 * k)
        width = round(widest * k) + 2 * pad
        top = h - sum(step) - 2 * pad
        panel = img[max(top, 0) : h, 0 : min(width, w)]
        panel //= 3  # darken: white text stays legible on any image
        y = top + pad
        for t, sc, st, i in zip(texts, scales, step, range(len(texts))):
            y += st
            color = (80, 255, 120) if i == 0 else (255, 255, 255)
            cv2.putText(img, t, (pad, y - round(6 * k)), font, sc, color, max(1, round(2 * k if i == 0 else k)),
                        cv2.LINE_AA)
        self._exit_bar(img, v.result, k)
        return img

    def _exit_bar(self, img: np.ndarray, r: Result, k: float) -> None:
        """One square per exit, top right: filled (colour = precision) for the blocks that ran."""
        cv2 = self._cv2
        n, side, gap = self.manifest.num_exits, round(18 * k), round(6 * k)
        x = img.shape[1] - n * (side + gap) - gap
        y = gap
        cv2.rectangle(img, (x - gap, 0), (img.shape[1] - 1, y + side + gap), (0, 0, 0), -1)
        for i in range(n):
            p1, p2 = (x + i * (side + gap), y), (x + i * (side + gap) + side, y + side)
            if i < len(r.precision_path):
                cv2.rectangle(img, p1, p2, _PRECISION_BGR.get(r.precision_path[i], (200, 200, 200)), -1)
            cv2.rectangle(img, p1, p2, (255, 255, 255), 1)


# -------------------------------------------------------------------------------------------------- output


class _Recorder:
    """Annotated frames → an MP4 (mp4v), or PNG files when asked or when no MP4 writer opens."""

    def __init__(self, out_dir: Path, fmt: str, fps: float, notes: list[str]):
        self.out_dir, self.fmt, self.fps, self.notes = out_dir, fmt, fps, notes
        self._writer: Any = None
        self.written = 0

    @property
    def path(self) -> Path:
        return self.out_dir / (VIDEO_NAME if self.fmt == "mp4" else FRAMES_DIR)

    def write(self, frame: np.ndarray) -> None:
        cv2 = _cv2()
        if self.fmt == "mp4" and self._writer is None:
            h, w = frame.shape[:2]
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter.fourcc(*"mp4v"), self.fps, (w, h))
            if not self._writer.isOpened():
                self._writer = None
                self.fmt = "png"
                self.notes.append(f"could not open an MP4 (mp4v) writer; wrote PNG frames to {self.path} instead")
        if self._writer is not None:
            self._writer.write(frame)
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            png = self.path / f"{self.written:06d}.png"
            if not cv2.imwrite(str(png), frame):
                raise DeviceError(f"cannot write {png} (disk full or read-only?)")
        self.written += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()


class _Window:
    """An OpenCV window; q or Esc closes it."""

    TITLE = "edgequee camera demo"

    def __init__(self) -> None:
        if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise DeviceError("no display (DISPLAY/WAYLAND_DISPLAY unset): use --headless --out DIR")
        self._cv2 = _cv2()

    def show(self, frame: np.ndarray) -> bool:
        """Show ``frame``; False once the user asked to quit."""
        cv2 = self._cv2
        try:
            cv2.imshow(self.TITLE, frame)
        except cv2.error as e:
            raise DeviceError(f"this OpenCV cannot open windows ({str(e).strip()[:80]}…): use --headless --out "
                              "DIR, or install opencv-python instead of opencv-python-headless") from e
        return cv2.waitKey(1) & 0xFF not in (ord("q"), 27)

    def close(self) -> None:
        self._cv2.destroyAllWindows()


# ---------------------------------------------------------------------------------------------------- loop


@dataclass
class _Totals:
    """Per-frame times kept for the summary (a float each, so hours of frames stay small)."""

    ms: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    energy_mj: list[float] = field(default_factory=list)

    def add(self, times: dict[str, float], energy_mj: float | None) -> None:
        for k, v in times.items():
            self.ms[k].append(v)
        if energy_mj is not None:
            self.energy_mj.append(energy_mj)


def run_demo(
    runner: EdgeRunner,
    source: Source,
    *,
    out_dir: Path | None = None,
    show: bool = False,
    record: str = "mp4",
    max_frames: int | None = None,
    retries: int = 3,
    backoff_s: float = 0.5,
    device: str = "host",
    energy: EnergySource | None = None,
) -> dict[str, Any]:
    """Classify frames from ``source`` until it ends, is lost, ``max_frames`` or the user quits; return the summary.

    With ``out_dir``: the annotated video (``record`` = mp4, or png frames), ``frames.jsonl`` (one line per
    frame, written as it goes) and ``summary.json``. ``show`` opens a window. ``energy`` is a meter hook (see
    ``EnergySource``); ``device``'s cost model (its measured profile, else its descriptor) prices "latency saved".
    """
    manifest = runner.manifest
    prep = FramePrep(manifest.input)
    overlay = Overlay(manifest, prep)
    window = _Window() if show else None
    savings = _Savings.for_bundle(runner.bundle, device)
    notes: list[str] = []
    totals = _Totals()
    exits = np.zeros(manifest.num_exits, np.int64)
    log = recorder = None
    reader = _LatestFrame(source, retries, backoff_s) if source.live else _FileReader(source)
    done_at: collections.deque[float] = collections.deque(maxlen=11)
    post_ms = energy_mj = None
    n = 0
    t_begin = time.perf_counter()
    try:
        if out_dir is not None:
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            log = open(out_dir / LOG_NAME, "w", buffering=1)  # line-buffered: each frame on disk as it is logged
            recorder = _Recorder(out_dir, record, source.fps or 15.0, notes)
        while max_frames is None or n < max_frames:
            w0, t0 = time.time(), time.perf_counter()
            frame = reader.next()
            if frame is None:
                break
            t1 = time.perf_counter()
            rgb = prep(frame)
            t2 = time.perf_counter()
            r = runner.classify(rgb)
            t3 = time.perf_counter()
            savings.add(r)
            exits[r.exit_index] += 1
            fps = (len(done_at) - 1) / (done_at[-1] - done_at[0]) if len(done_at) > 1 else None
            view = _FrameView(r, (t2 - t1) * 1e3, post_ms, fps, energy_mj, energy is not None, savings)
            annotated = overlay.draw(frame, view)
            t4 = time.perf_counter()
            if recorder is not None:
                recorder.write(annotated)
            if window is not None and not window.show(annotated):
                reader.stopped = "closed by the user"
                break
            t5 = time.perf_counter()
            done_at.append(t5)
            energy_mj = energy(w0, time.time()) if energy is not None else None
            post_ms = (t5 - t3) * 1e3
            times = {"read": t1 - t0, "pre": t2 - t1, "runtime": r.latency_ms / 1e3, "draw": t4 - t3,
                     "write": t5 - t4, "post": t5 - t3, "total": t5 - t0, "overhead": t5 - t0 - r.latency_ms / 1e3}
            times = {k: v * 1e3 for k, v in times.items()}
            totals.add(times, energy_mj)
            if log is not None:
                log.write(json.dumps(_log_line(n, w0, r, manifest, times, energy_mj)) + "\n")
            n += 1
        else:
            reader.stopped = f"max frames ({max_frames})"
    except KeyboardInterrupt:
        reader.stopped = "interrupted"
    finally:
        reader.close()
        if recorder is not None:
            recorder.close()
        if window is not None:
            window.close()
        if log is not None:
            log.close()
    seconds = time.perf_counter() - t_begin
    summary = _summary(runner, source, reader, n, seconds, totals, exits, savings, notes)
    if out_dir is not None and recorder is not None:
        summary["outputs"] = {"log": str(out_dir / LOG_NAME), "summary": str(out_dir / SUMMARY_NAME)}
        if recorder.written:
            summary["outputs"]["video" if recorder.fmt == "mp4" else "frames"] = str(recorder.path)
        write_json_atomic(out_dir / SUMMARY_NAME, summary)
    return summary


def _log_line(n: int, wall: float, r: Result, manifest: Manifest, times: dict[str, float],
              energy_mj: float | None) -> dict[str, Any]:
    cum = manifest.cumulative_macs()
    return {
        "frame": n, "time": round(wall, 6), "class_id": r.class_id, "class": manifest.classes[r.class_id],
        "confidence": round(float(r.probs[r.class_id]), 5), "exit": r.exit_index,
        "precision_path": list(r.precision_path), **{f"{k}_ms": round(v, 4) for k, v in times.items()},
        "energy_mj": energy_mj, "compute_fraction": cum[r.exit_index] / cum[-1],
    }


def _summary(runner: EdgeRunner, source: Source, reader: _FileReader | _LatestFrame, n: int, seconds: float,
             totals: _Totals, exits: np.ndarray, savings: _Savings, notes: list[str]) -> dict[str, Any]:
    def stats(v: list[float]) -> dict[str, float] | None:
        return {"mean": float(np.mean(v)), "p50": float(np.median(v))} if v else None

    skipped = getattr(source, "skipped", [])
    if skipped:
        notes.append(f"skipped {len(skipped)} undecodable image(s): {', '.join(skipped[:3])}")
    total_ms = sum(totals.ms["total"])
    return {
        "source": source.name,
        "bundle": str(runner.bundle.path),
        "model": runner.manifest.model,
        "policy": repr(runner.policy),
        "certificate": dataclasses.asdict(cert) if (cert := runner.certificate) is not None else None,
        "frames": n,
        "dropped": reader.dropped,
        "lost": reader.lost,
        "stopped": reader.stopped,
        "seconds": seconds,
        "mean_fps": n / total_ms * 1e3 if total_ms else None,
        "ms": {k: stats(v) for k, v in totals.ms.items()},
        "exit_histogram": exits.tolist(),
        "compute_saved": savings.compute if n else None,
        "latency_saved": savings.latency,
        "latency_priced_by": savings.cost_label,
        "energy_mj_per_frame": stats(totals.energy_mj),
        "notes": notes,
    }


def summary_text(s: dict[str, Any]) -> str:
    """The summary as a few lines for the terminal."""
    ms = s["ms"]
    fps = "-" if s["mean_fps"] is None else f"{s['mean_fps']:.1f}"
    cert = s["certificate"]
    lines = [f"camera demo: {s['frames']} frames from {s['source']} in {s['seconds']:.1f} s ({fps} FPS from frame "
             f"times, {s['dropped']} dropped); stopped: {s['stopped']}",
             f"policy {s['policy']}: " + (f"certified {cert['risk']} risk ≤ {cert['epsilon']:g} ({cert['method']})"
                                         if cert else "no risk certificate")]
    if s["frames"]:
        def f(k: str) -> str:
            return f"{ms[k]['mean']:.3f} / {ms[k]['p50']:.3f}"

        lines += [
            f"per frame, mean / p50 ms: runtime {f('runtime')}, demo overhead {f('overhead')} "
            f"(read {ms['read']['mean']:.3f}, pre {ms['pre']['mean']:.3f}, overlay {ms['draw']['mean']:.3f}, "
            f"write/show {ms['write']['mean']:.3f}), "
            f"total {f('total')}",
            "exits taken: " + " ".join(f"{i}:{c}" for i, c in enumerate(s["exit_histogram"])),
            f"compute saved vs whole model: {100 * s['compute_saved']:.1f} % of MACs"
            + ("" if s["latency_saved"] is None
               else f"; latency saved (priced by the {s['latency_priced_by']}): {100 * s['latency_saved']:.1f} %"),
            "energy: " + ("n/a (no meter)" if s["energy_mj_per_frame"] is None
                          else f"{s['energy_mj_per_frame']['mean']:.3f} mJ/frame"),
        ]
    lines += s["notes"]
    if "outputs" in s:
        lines.append("wrote " + ", ".join(s["outputs"].values()))
    return "\n".join(lines)


def write_video(images_rgb: np.ndarray, path: Path, size: tuple[int, int], fps: float = 30.0) -> Path:
    """Write RGB images as an mp4v video of ``size`` (W, H) frames, each image scaled (nearest) into the centre.

    A way to make a demo source from a dataset (e.g. the shipped CIFAR-10 sample).
    """
    cv2 = _cv2()
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise DeviceError(f"{path}: cannot open an mp4v video writer")
    try:
        for im in images_rgb:
            s = min(w / im.shape[1], h / im.shape[0])
            iw, ih = round(im.shape[1] * s), round(im.shape[0] * s)
            frame = np.zeros((h, w, 3), np.uint8)
            x0, y0 = (w - iw) // 2, (h - ih) // 2
            frame[y0 : y0 + ih, x0 : x0 + iw] = cv2.resize(im[:, :, ::-1], (iw, ih), interpolation=cv2.INTER_NEAREST)
            writer.write(frame)
    finally:
        writer.release()
    return Path(path)
