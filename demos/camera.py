"""The camera demo from Python. The app itself is ``edgequee.demo`` (inside the package, so that
``edgequee demo camera`` works from an installed wheel; demos/ is not installed); this script shows its API.

    python demos/camera.py BUNDLE                  # headless, on a video made from the shipped CIFAR-10 sample
                                                   # (written to camera-demo/, with the outputs)
    python demos/camera.py BUNDLE v4l2:0 [OUT]     # a USB webcam (or picam, a video file, a folder of images)

Without OUT a live source opens a window (needs a display and opencv-python); with OUT it runs headless and
writes OUT/annotated.mp4, OUT/frames.jsonl and OUT/summary.json. The policy is the bundle's stored one if it
has one, else an int8 (or its lowest precision) max-softmax threshold of 0.9.
"""

import sys
from pathlib import Path

import numpy as np

from edgequee import EdgeRunner, load_bundle
from edgequee.demo import open_source, run_demo, summary_text, write_video
from edgequee.policies import ThresholdPolicy

SAMPLE = Path(__file__).resolve().parents[1] / "converters" / "zoo" / "cifar10_sample.npz"


def main(bundle_path: str, source: str | None = None, out: str | None = None) -> None:
    bundle = load_bundle(bundle_path)
    policy = None if bundle.manifest.policy else ThresholdPolicy(bundle.manifest.precisions[-1], 0.9)
    runner = EdgeRunner(bundle, policy, num_threads=2)
    if source is None:
        with np.load(SAMPLE) as z:
            images = z["x_test"][:300]
        out = out or "camera-demo"
        Path(out).mkdir(parents=True, exist_ok=True)
        source = str(write_video(images, Path(out) / "input_cifar10.mp4", (128, 96), fps=10))
    summary = run_demo(runner, open_source(source), out_dir=Path(out) if out else None, show=out is None)
    print(summary_text(summary))


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
