"""Hardening of the host commands: crafted checkpoints, silent random weights, the model-factory contract.

One test per fault (each fails on the code before the fix), plus one that edgequee's own checkpoints still load.
No real conversion runs here: the loaders are called directly or the CLI stops before converting.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from clirun import invoke, one_line_error

from edgequee.errors import ConversionError

REPO = Path(__file__).resolve().parents[2]
SAMPLE_NPZ = REPO / "converters" / "zoo" / "cifar10_sample.npz"
TRUST = "EDGEQUEE_TRUST_CHECKPOINTS=1"


@pytest.fixture
def torch(require: Callable[..., ModuleType]) -> ModuleType:
    return require("torch")


class _TouchOnUnpickle:
    """Unpickling this calls ``Path.touch(canary)``: stands in for any code a crafted pickle would run."""

    def __init__(self, canary: Path):
        self.canary = canary

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (pathlib.Path.touch, (pathlib.Path(self.canary),))


def test_crafted_checkpoint_runs_no_code_in_any_loader(torch: ModuleType, tmp_path: Path, monkeypatch) -> None:
    """Fault 1: torch.load(weights_only=False) ran a crafted .pt before edgequee looked at it."""
    from converters._registry import create_model
    from converters.jei import jei_policy
    from converters.multiexit import CHECKPOINT_FORMAT, load_checkpoint

    monkeypatch.delenv("EDGEQUEE_TRUST_CHECKPOINTS", raising=False)
    canary = tmp_path / "canary"
    model = create_model("resnet20", exits="stages", head="linear")
    crafted = tmp_path / "crafted.pt"
    # Otherwise a valid edgequee checkpoint, so every loader gets as far as it can.
    torch.save({"format": CHECKPOINT_FORMAT, "config": dict(model.config), "classes": list(model.classes),
                "input_spec": {}, "state_dict": model.state_dict(),
                "extra": {"jei": {"params": {}, "gates": []}, "payload": _TouchOnUnpickle(canary)}}, crafted)

    def refused(err: BaseException | str) -> None:
        msg = str(err)
        assert "\n" not in msg and TRUST in msg and "crafted.pt" in msg, msg
        assert not canary.exists(), "the crafted pickle ran"

    with pytest.raises(ConversionError) as e:
        load_checkpoint(crafted)
    refused(e.value)
    with pytest.raises(ConversionError) as e:
        jei_policy(crafted)
    refused(e.value)
    refused(one_line_error(invoke("convert", crafted, "--out", tmp_path / "bundle", "--calib", SAMPLE_NPZ)))
    assert not (tmp_path / "bundle").exists()
    refused(one_line_error(invoke("train", crafted, "--data", SAMPLE_NPZ, "--out", tmp_path / "t.pt",
                                    "--head-epochs", 0)))
    assert not (tmp_path / "t.pt").exists()

    # The escape hatch: trusting the file loads it the old way, and so runs the payload (proof it was live).
    monkeypatch.setenv("EDGEQUEE_TRUST_CHECKPOINTS", "1")
    assert load_checkpoint(crafted).num_exits == model.num_exits
    assert canary.exists()


def test_crafted_pretrained_weights_run_no_code(torch: ModuleType, tmp_path: Path) -> None:
    """--pretrained backbone weights (akamaster .th) are a pickle too: refused in one line, nothing runs."""
    canary = tmp_path / "canary"
    crafted = tmp_path / "resnet20.th"
    torch.save({"state_dict": {}, "payload": _TouchOnUnpickle(canary)}, crafted)
    line = one_line_error(invoke("convert", "resnet20", "--pretrained", crafted, "--out", tmp_path / "bundle",
                                 "--calib", SAMPLE_NPZ))
    assert "resnet20.th: cannot read as a torch checkpoint" in line and not canary.exists()


def test_edgequee_checkpoints_still_load_without_trust(torch: ModuleType, tmp_path: Path, monkeypatch) -> None:
    """Regression guard for fault 1's fix: what edgequee writes loads with weights_only=True (no allow-list)."""
    from converters._registry import create_model
    from converters.jei import jei_policy
    from converters.multiexit import load_checkpoint, read_checkpoint, save_checkpoint
    from edgequee.jei import JeiPolicy

    monkeypatch.delenv("EDGEQUEE_TRUST_CHECKPOINTS", raising=False)
    torch.manual_seed(0)
    model = create_model("resnet20", exits="stages", head="pool").eval()
    gates = np.arange(10, dtype=np.float64).reshape(2, 5) / 10
    policy = JeiPolicy("fp32", 0.5, arrays={"gates": gates}, trained={"lam": np.float64(0.2), "exit_cost": (0.3, 1.0)})
    # What train/jei put in "extra", with the numpy values and paths a report may carry: written as plain types.
    extra = {"train": {"job": {"out": tmp_path / "m.pt"}, "seconds": np.float32(1.5), "acc": np.array([0.5, 0.7]),
                       "n": np.int64(3), "cost": {"values": (0.4, 1.0)}},
             "jei": {"params": policy.params(), "gates": gates}}
    path = tmp_path / "m.pt"
    save_checkpoint(model, path, extra=extra)
    again = load_checkpoint(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), again(x)))
    ckpt = read_checkpoint(path)
    assert ckpt["extra"]["train"]["seconds"] == 1.5 and ckpt["extra"]["train"]["acc"] == [0.5, 0.7]
    assert ckpt["extra"]["train"]["job"]["out"] == str(tmp_path / "m.pt") and ckpt["input_spec"]["mean"] == (
        0.485, 0.456, 0.406)
    back = jei_policy(path)
    assert back is not None and np.array_equal(back.gates, gates) and back.trained["lam"] == 0.2
    # the shipped default (quickstart, tests) and the JEI policy lookup on it
    shipped = REPO / "converters" / "zoo" / "resnet20_cifar10_exits.pt"
    assert load_checkpoint(shipped).num_exits == 3 and jei_policy(shipped) is None
    # garbage is one clear line, not a KeyError from inside torch
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="cannot read as a torch checkpoint") as e:
        load_checkpoint(junk)
    assert "\n" not in str(e.value)


def test_convert_architecture_name_without_weights_is_refused(torch: ModuleType, tmp_path: Path,
                                                               monkeypatch) -> None:
    """Fault 2: `edgequee convert resnet20` without --pretrained silently converted random weights."""
    from converters import jobs

    def no_slow_work(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("reached the slow part")

    monkeypatch.setattr(jobs, "load_dataset", no_slow_work)
    monkeypatch.setattr(jobs, "convert_model", no_slow_work)
    out = tmp_path / "bundle"
    for name in ("resnet20", "mobilenetv2"):
        line = one_line_error(invoke("convert", name, "--out", out, "--calib", SAMPLE_NPZ))
        assert f"{name} is an architecture name with no weights" in line and "--pretrained FILE" in line
        assert "--random-init" in line
    assert not out.exists()
    assert "contradict" in one_line_error(invoke("convert", "resnet20", "--pretrained", tmp_path / "w.th",
                                                   "--random-init", "--out", out, "--calib", SAMPLE_NPZ))
    ckpt = REPO / "converters" / "zoo" / "resnet20_cifar10_exits.pt"
    assert "drop --random-init" in one_line_error(invoke("convert", ckpt, "--random-init", "--out", out,
                                                           "--calib", SAMPLE_NPZ))

    # --random-init is the explicit yes: the job goes on to convert (stopped here, before any real conversion).
    def stop(net: Any, *args: Any, **kwargs: Any) -> Any:
        raise ConversionError(f"stopped before converting {net.name}")

    monkeypatch.undo()
    monkeypatch.setattr(jobs, "convert_model", stop)
    line = one_line_error(invoke("convert", "resnet20", "--random-init", "--out", out, "--calib", SAMPLE_NPZ,
                                   "--calib-images", 4, "--parity-images", 4))
    assert "stopped before converting resnet20" in line


def _tiny(classes: Any, exits: str) -> Any:
    from torch import nn

    from converters.multiexit import ExitHead, MultiExitModel
    from edgequee.bundle import InputSpec

    def head(channels: int) -> ExitHead:
        return ExitHead(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)), nn.Linear(channels, len(classes)))

    blocks = [nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())]
    return MultiExitModel(blocks, [head(8), head(16)], name="fmnet", classes=classes, input_spec=InputSpec(32, 32),
                          config={"arch": "fmnet", "exits": exits})


def test_train_custom_factory_without_head(torch: ModuleType, tmp_path: Path) -> None:
    """Fault 3: `edgequee train NAME` for a @register_model factory without ``head`` died with a TypeError
    traceback (``fmnet() got an unexpected keyword argument 'head'``)."""
    from converters import _registry
    from converters.multiexit import load_checkpoint
    from converters.resnet_cifar import CIFAR10_CLASSES

    @_registry.register_model
    def fmnet(*, exits: str = "stages", classes: Any = CIFAR10_CLASSES, pretrained: Any = None) -> Any:  # no head=
        return _tiny(classes, exits)

    @_registry.register_model
    def fmnet_noclasses(*, exits: str = "stages") -> Any:  # no head=/pretrained=/classes=: cannot be rebuilt
        model = _tiny(CIFAR10_CLASSES, exits)
        model.config["arch"] = "fmnet_noclasses"
        return model

    try:
        out = tmp_path / "fm.pt"
        args = ("--data", SAMPLE_NPZ, "--head-epochs", 1, "--n-train", 64)
        result = invoke("train", "fmnet", "--out", out, *args)
        assert result.exit_code == 0, (result.output, result.exception)
        assert load_checkpoint(out).config == {"arch": "fmnet", "exits": "stages"}
        # asking for an option the factory does not take is one line naming the contract, before any training
        line = one_line_error(invoke("train", "fmnet", "--out", tmp_path / "x.pt", "--head", "linear", *args))
        assert "--head linear: model 'fmnet' takes no head= argument" in line and "@register_model factory" in line
        line = one_line_error(invoke("train", "fmnet_noclasses", "--out", tmp_path / "x.pt", "--pretrained",
                                       tmp_path / "w.th", *args))
        assert "model 'fmnet_noclasses' takes no pretrained= argument" in line
        line = one_line_error(invoke("train", "fmnet_noclasses", "--out", tmp_path / "y.pt", *args))
        assert "unexpected keyword argument 'classes'" in line and "@register_model factory" in line
        assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()
    finally:
        _registry._MODELS.pop("fmnet", None)
        _registry._MODELS.pop("fmnet_noclasses", None)
