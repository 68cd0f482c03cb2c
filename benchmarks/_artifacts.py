"""The artifacts the benchmarks share, made when missing so that every benchmark runs from a fresh clone.

``resnet56_bundle``: ResNet-56 (akamaster weights) with an exit after every 3 residual blocks and pool exit heads
trained on the frozen backbone (``converters.train.train_heads``, 30 epochs on the training split; the checkpoint is
cached at ``runs/resnet56_every3_pool.pt``), converted (fp32, fp16, int8 blocks, whole model fp32 and int8, int8
calibrated on 500 training images, parity on 1000 test images) at ``runs/resnet56.bundle``, and profiled on this
machine as ``host`` (``profiles/host.json``) when it has no profile yet.

Training and conversion run in a child process (``python benchmarks/_artifacts.py``): importing torch slows every
LiteRT invoke of the same process by 20-30 % on this project's VMs (see converters/quickstart.py), so a benchmark
that times must never import it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgequee.bundle import Bundle, load_bundle  # noqa: E402
from edgequee.profiler import profile_bundle  # noqa: E402

RUNS = ROOT / "runs"
DATA = ROOT.parent / "shared" / "data" / "cifar10.npz"
MODELS = ROOT.parent / "shared" / "models" / "akamaster_resnet_cifar10"
CHECKPOINT = RUNS / "resnet56_every3_pool.pt"
BUNDLE = RUNS / "resnet56.bundle"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def resnet56_bundle(data: str | Path = DATA, models: str | Path = MODELS, path: Path = BUNDLE,
                    profile: bool = True) -> Bundle:
    """``runs/resnet56.bundle``, made (in a child process) and profiled as ``host`` when missing."""
    path = Path(path)
    if not (path / "manifest.json").is_file():
        subprocess.run([sys.executable, __file__, "--data", str(data), "--models", str(models), "--bundle", str(path)],
                       check=True)
    bundle = load_bundle(path)
    if profile and not (bundle.profiles_dir / "host.json").is_file():
        log(f"profiling {path} on this machine as host")
        profile_bundle(bundle, "host")
        bundle = load_bundle(path)
    return bundle


def _make(data_path: Path, models: Path, path: Path, head_epochs: int = 30) -> None:
    """Train (or reuse) the exit heads and convert: the host side, torch imported."""
    from converters._registry import create_model
    from converters.convert import convert_model
    from converters.multiexit import load_checkpoint, save_checkpoint
    from converters.train import train_heads
    from edgequee.data import load_dataset

    data = load_dataset(data_path)
    if CHECKPOINT.is_file():
        model = load_checkpoint(CHECKPOINT)
    else:
        weights = sorted(models.glob("resnet56-*.th"))
        if not weights:
            sys.exit(f"no resnet56-*.th in {models}: pass --models DIR (the pretrained checkpoints folder)")
        model = create_model("resnet56", exits="every:3", head="pool", pretrained=weights[0])
        log(f"training pool exit heads on the frozen ResNet-56 ({len(data.x_train)} images, {head_epochs} epochs)")
        t0 = time.perf_counter()
        train_heads(model, data.x_train, data.y_train, epochs=head_epochs)
        CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model, CHECKPOINT, extra={"train_seconds": time.perf_counter() - t0})
    log(f"converting ResNet-56 into {path} (about 2 minutes)")
    convert_model(model, path, data.x_train[:500], parity_images=data.x_test[:1000], parity_labels=data.y_test[:1000],
                  overwrite=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Make runs/resnet56.bundle (and its exit heads) for the benchmarks.")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--models", type=Path, default=MODELS)
    ap.add_argument("--bundle", type=Path, default=BUNDLE)
    args = ap.parse_args()
    _make(args.data, args.models, args.bundle)
