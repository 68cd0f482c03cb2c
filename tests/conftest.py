"""Shared fixtures: the shipped CIFAR-10 sample and one real conversion (fp32, fp16, int8) per test session."""

from __future__ import annotations

import importlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_NPZ = REPO / "converters" / "zoo" / "cifar10_sample.npz"
TRAINED_CHECKPOINT = REPO / "converters" / "zoo" / "resnet20_cifar10_exits.pt"


def _require(module: str, extra: str = "host") -> ModuleType:
    """Import an optional module: skip the test when it is missing, except under CI=true, where it fails."""
    if os.environ.get("CI", "").lower() == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install 'edgequee[{extra}]')")


@pytest.fixture(scope="session")
def require() -> Callable[..., ModuleType]:
    """``require(module, extra="host")``: the module, or a skip outside CI (a failure under CI=true)."""
    return _require


@dataclass(frozen=True)
class Sample:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]


@pytest.fixture(scope="session")
def sample() -> Sample:
    """The real CIFAR-10 images shipped with the repo, read with numpy alone: 256 train and the first 1000 of its
    2000 test images (the quickstart calibrates on those 1000 and benchmarks on the other 1000)."""
    with np.load(SAMPLE_NPZ) as z:
        return Sample(z["x_train"], z["y_train"], z["x_test"][:1000], z["y_test"][:1000],
                      tuple(str(c) for c in z["classes"]))


@dataclass(frozen=True)
class Converted:
    """A bundle converted once per session, with the torch model it came from."""

    path: Path
    model: Any  # converters.multiexit.MultiExitModel
    torch_logits: np.ndarray  # (1000, num_exits, num_classes) on sample.x_test
    trained: bool  # the shipped trained checkpoint (else a random-init ResNet-20)

    def torch_accuracy(self, labels: np.ndarray, exit_index: int = -1) -> float:
        return float((self.torch_logits[:, exit_index].argmax(1) == labels).mean())


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory, sample: Sample) -> Converted:
    """ResNet-20 with stage exits, converted for real at fp32, fp16 and int8 (about 40 s)."""
    torch = _require("torch")
    _require("onnx2tf")
    _require("tensorflow")
    from converters._registry import create_model
    from converters.convert import convert_model
    from converters.multiexit import load_checkpoint

    trained = TRAINED_CHECKPOINT.is_file()
    if trained:
        model = load_checkpoint(TRAINED_CHECKPOINT)
    else:
        torch.manual_seed(0)
        model = create_model("resnet20", exits="stages", head="linear")
    model.eval()
    path = tmp_path_factory.mktemp("converted") / "bundle"
    convert_model(
        model,
        path,
        calib_images=sample.x_train[:64],
        parity_images=sample.x_test[:200],
        parity_labels=sample.y_test[:200],
    )
    with torch.no_grad():
        x = model.normalize(torch.from_numpy(sample.x_test))
        logits = torch.stack(model(x), 1).numpy()
    return Converted(path, model, logits, trained)


@pytest.fixture
def bundle_copy(converted: Converted, tmp_path: Path) -> Path:
    """A private copy of the converted bundle, for tests that modify it."""
    return Path(shutil.copytree(converted.path, tmp_path / "bundle"))
