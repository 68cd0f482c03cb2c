"""`edgequee quickstart`: the shipped multi-exit ResNet-20 converted, profiled, calibrated and benchmarked in minutes.

The default model (zoo/resnet20_cifar10_exits.pt) was made by the project's own trainer; the exact command is in
zoo/README.md. The images (zoo/cifar10_sample.npz) are real CIFAR-10: 256 training images for int8 calibration
and the first 2000 test images. The first 1000 give the parity report and calibrate with risk control
(``calibrate --policy auto``: the cheapest policy on this host, of a max-softmax threshold at each precision worth
running here and QuEE, whose gap to the fp32 full model is ≤ 2 points with probability ≥ 90 %, UCB-WSR; 500 of
them choose the policy, the other 500 certify it. With 250 + 250 no int8 policy could be certified: int8's own
disagreements with fp32 widen the bound). The other 1000 are benchmarked: the certified policy and every whole
model in the same interleaved rounds. Nothing fixes the precision: where int8 pays (VNNI, every Pi) the certified
policy runs int8 blocks.

Conversion runs here (host side: torch, onnx2tf); profile, calibrate and bench run as ``edgequee`` commands in a
fresh interpreter, as they would on the device, joined to the conversion only by the bundle. Not for tidiness:
importing torch slowed every LiteRT invoke in the same process by 20-30 % on this project's VMs (whole ResNet-56
int8 0.52 vs 0.41 ms, fifteen interleaved rounds; importing tensorflow or onnx2tf did not), which would have
priced and timed everything in the quickstart wrongly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from edgequee.bundle import is_bundle_dir, load_bundle
from edgequee.data import Dataset, load_dataset, save_npz
from edgequee.errors import EdgequeeError

from .convert import convert_model
from .multiexit import load_checkpoint

__all__ = ["ZOO", "DEFAULT_MODEL", "SAMPLE_DATA", "CALIBRATION_IMAGES", "run_quickstart", "device_command"]

ZOO = Path(__file__).parent / "zoo"
DEFAULT_MODEL = ZOO / "resnet20_cifar10_exits.pt"
SAMPLE_DATA = ZOO / "cifar10_sample.npz"
CALIBRATION_IMAGES = 1000  # the first test images of SAMPLE_DATA; the rest are benchmarked


def device_command(workdir: Path, *args: str) -> dict[str, Any]:
    """``edgequee ARGS --json FILE`` in a fresh interpreter (no torch imported), FILE in ``workdir``: its JSON
    report. A failure raises the command's own one-line error."""
    report = Path(workdir) / f".{args[0]}-report.json"
    proc = subprocess.run([sys.executable, "-m", "edgequee", *args, "--json", str(report)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
        raise EdgequeeError(f"edgequee {args[0]} failed: " + (errors[-1][7:] if errors else proc.stderr.strip()[-500:]))
    try:
        return json.loads(report.read_text())
    finally:
        report.unlink(missing_ok=True)


MARKER = ".edgequee-quickstart"  # in OUT: the folder is the quickstart's own, and may be overwritten


def _claim(out: Path) -> Path:
    """``out`` made or reused as the quickstart's folder; a folder holding anything else is refused, never
    overwritten (a bundle of an earlier quickstart counts as the quickstart's own)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise EdgequeeError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not is_bundle_dir(out / "bundle"):
        raise EdgequeeError(f"{out} holds files that the quickstart did not write; edgequee will not overwrite "
                            "them: choose another --out (or an empty or new folder)")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by edgequee quickstart: its files here are replaced on every run\n")
    return out


def run_quickstart(out: Path, num_threads: int = 1, progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """convert → profile (host) → calibrate (auto) → bench; returns the combined report. ``out/bundle`` is
    replaced; ``out/calibration.npz`` and ``out/test.npz`` hold the two image sets the device steps read."""
    out = _claim(Path(out))
    data = load_dataset(SAMPLE_DATA)
    model = load_checkpoint(DEFAULT_MODEL)
    steps = ["convert", "profile", "calibrate", "bench"]

    def phase(k: int) -> Callable[..., None]:
        def cb(done: int, total: int, label: str = "") -> None:
            if progress:
                progress(k * 100 + int(100 * done / max(total, 1)), 100 * len(steps), f"{steps[k]}: {label}")

        return cb

    t0 = time.perf_counter()
    cal, test = slice(0, CALIBRATION_IMAGES), slice(CALIBRATION_IMAGES, None)
    bundle = convert_model(model, out / "bundle", data.x_train, parity_images=data.x_test[cal],
                           parity_labels=data.y_test[cal], overwrite=True, num_threads=num_threads, progress=phase(0))
    splits = {}
    for name, rows in (("calibration", cal), ("test", test)):
        splits[name] = out / f"{name}.npz"
        save_npz(splits[name], Dataset(data.x_train, data.y_train, data.x_test[rows], data.y_test[rows],
                                       data.classes))
    b, threads = str(bundle.path), str(num_threads)
    t1 = time.perf_counter()
    phase(1)(0, 1, "edgequee profile (fresh process)")
    profile = device_command(out, "profile", b, "--device", "host", "--threads", threads, "--min-time", "0.3")
    phase(1)(1, 1)
    t2 = time.perf_counter()
    phase(2)(0, 1, "edgequee calibrate --policy auto (fresh process)")
    calibration = device_command(out, "calibrate", b, "--data", str(splits["calibration"]), "--policy", "auto",
                                 "--risk", "gap", "--epsilon", "0.02", "--delta", "0.1", "--method", "ucb-wsr",
                                 "--device", "host", "--threads", threads)
    phase(2)(1, 1)
    t3 = time.perf_counter()
    phase(3)(0, 1, "edgequee bench (fresh process)")
    bench = device_command(out, "bench", b, "--data", str(splits["test"]), "--latency-samples", "300",
                           "--rounds", "9", "--threads", threads)  # 3 rounds: ±10 % between neighbouring policies
    phase(3)(1, 1)
    t4 = time.perf_counter()
    bundle = load_bundle(bundle.path)
    stored = next(row for row in bench["policies"] if row["name"].endswith("(stored)"))
    return {
        "bundle": str(bundle.path),
        "convert_seconds": t1 - t0,
        "profile_seconds": t2 - t1,
        "calibrate_seconds": t3 - t2,
        "bench_seconds": t4 - t3,
        "total_seconds": t4 - t0,
        "parity": bundle.manifest.to_json()["parity"],
        "profile": profile,
        "calibration": calibration,
        "bench": bench,
        "best_whole": bench["best_whole"],
        "certified": {"policy": calibration["policy"]["name"], "params": calibration["policy"]["params"],
                      "precision": stored["precision"], "accuracy": stored["accuracy"],
                      "latency_ms": stored["mean_latency_ms"], "certified": stored["certified"]},
    }
