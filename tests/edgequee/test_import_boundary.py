"""edgequee works with torch, tensorflow and onnx unimportable: every module imports, and a bundle runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import edgequee

# Runs in a fresh interpreter. argv: [bundle npz] (optional): also classify with the bundle and run the CLI on it.
_SCRIPT = r"""
import importlib, importlib.abc, json, pkgutil, sys

BLOCKED = {"torch", "torchvision", "tensorflow", "tf_keras", "keras", "onnx", "onnx2tf", "onnxruntime", "onnxsim"}


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked by the import-boundary test")
        return None


sys.meta_path.insert(0, _Block())
try:
    import torch  # noqa: F401
    raise SystemExit("the blocker let torch through")
except ImportError:
    pass

import edgequee

report = {"modules": [m.name for m in pkgutil.walk_packages(edgequee.__path__, "edgequee.")]}
for name in report["modules"]:
    importlib.import_module(name)

from click.testing import CliRunner
from edgequee.cli import main

report["help_exit_codes"] = {c: CliRunner().invoke(main, [c, "--help"]).exit_code for c in main.commands}
if len(sys.argv) == 3:
    import numpy as np
    from edgequee.policies import ThresholdPolicy
    from edgequee.runtime import EdgeRunner

    bundle, npz = sys.argv[1:]
    images = np.load(npz)["x_test"][:5]
    report["class_ids"] = {
        p: [EdgeRunner(bundle, ThresholdPolicy(p)).classify(im).class_id for im in images] for p in ("fp32", "int8")
    }
    report["inspect_exit_code"] = CliRunner().invoke(main, ["inspect", bundle]).exit_code
report["heavy_modules_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps(report))
"""


def _run_blocked(*args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["heavy_modules_loaded"] == []
    return report


def test_every_module_imports_without_host_packages() -> None:
    report = _run_blocked()
    root = Path(edgequee.__file__).parent
    on_disk = {
        ".".join(("edgequee", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        for p in root.rglob("*.py")
    } - {"edgequee"}  # subpackages (edgequee.meters) count, as walk_packages lists them
    assert set(report["modules"]) == on_disk
    assert report["help_exit_codes"] and set(report["help_exit_codes"].values()) == {0}


@pytest.mark.slow
def test_bundle_runs_without_host_packages(converted, sample) -> None:
    from edgequee.policies import ThresholdPolicy
    from edgequee.runtime import EdgeRunner

    npz = Path(__file__).resolve().parents[2] / "converters" / "zoo" / "cifar10_sample.npz"
    report = _run_blocked(str(converted.path), str(npz))
    for p, ids in report["class_ids"].items():
        runner = EdgeRunner(converted.path, ThresholdPolicy(p))
        assert ids == [runner.classify(im).class_id for im in sample.x_test[:5]]
    assert report["inspect_exit_code"] == 0
