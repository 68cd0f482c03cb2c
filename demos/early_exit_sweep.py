"""Classify a folder or .npz of images at every precision and a few exit thresholds; print accuracy and latency.

    python demos/early_exit_sweep.py BUNDLE converters/zoo/cifar10_sample.npz

Uses only the public device-side API (numpy + a TFLite runtime).
"""

import sys

import numpy as np

from edgequee import EdgeRunner, load_bundle
from edgequee.data import load_dataset
from edgequee.policies import ThresholdPolicy


def main(bundle_path: str, data_path: str, n: int = 300) -> None:
    bundle = load_bundle(bundle_path)
    data = load_dataset(data_path).subset(n_test=n)
    runner = EdgeRunner(bundle)
    for precision in bundle.manifest.precisions:
        for threshold in (0.8, 0.95, float("inf")):
            runner.set_policy(ThresholdPolicy(precision, threshold))
            results = [runner.classify(img) for img in data.x_test]
            acc = np.mean([r.class_id == y for r, y in zip(results, data.y_test)])
            lat = np.mean([r.latency_ms for r in results])
            exits = np.bincount([r.exit_index for r in results], minlength=bundle.manifest.num_exits)
            print(f"{precision} threshold {threshold:>5}: accuracy {acc:.1%}, {lat:.3f} ms/image, exits {exits.tolist()}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
