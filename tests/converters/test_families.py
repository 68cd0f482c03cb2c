"""Model families, registry, exit heads, akamaster key mapping, checkpoints and head training (all small, CPU)."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections import OrderedDict

import numpy as np
import pytest

try:
    import torch
    from torch import nn
except ImportError:  # host-only test: a skip is allowed outside CI only
    if os.environ.get("CI", "").lower() == "true":
        raise
    pytest.skip("torch is not installed (pip install 'edgequee[host]')", allow_module_level=True)

from converters import resnet_cifar
from converters._registry import create_model, list_models
from converters.heads import list_heads
from converters.multiexit import load_checkpoint, save_checkpoint
from converters.resnet_cifar import OptionAShortcut, slice_pad_shortcut
from converters.train import evaluate, finetune_joint, train_heads
from edgequee.errors import ConversionError, DataError


def _small(name: str, **kwargs):
    if name == "mobilenetv2":
        kwargs.setdefault("width", 0.25)
    return create_model(name, **kwargs)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("model_name", list_models())
@pytest.mark.parametrize("exits", ["stages", "every:4"])
def test_forward_shapes(model_name: str, exits: str) -> None:
    model = _small(model_name, exits=exits)
    x = model.normalize(torch.from_numpy(_images(2)))
    assert x.shape == (2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        hidden = model.hidden_states(x)
    assert len(logits) == model.num_exits == len(hidden) - 1 >= 3
    assert all(lg.shape == (2, 10) for lg in logits)
    for h, head in zip(hidden[1:], model.heads):
        assert head.features(h).ndim == 2
    assert model.config["arch"] == model_name and model.config["exits"] == exits
    assert "pretrained" not in model.config


@pytest.mark.parametrize("model_name", list_models())
def test_registry_rebuilds_from_config(model_name: str) -> None:
    model = _small(model_name, exits="every:2", head="linear")
    config = dict(model.config)
    again = create_model(config.pop("arch"), **config)
    assert again.num_exits == model.num_exits
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_resnet56_every3_has_nine_exits() -> None:
    assert create_model("resnet56", exits="every:3").num_exits == 9
    assert create_model("resnet20", exits="every:2").num_exits == 5  # 9 units: 2+2+2+2+1


def test_bad_names_list_the_valid_ones() -> None:
    with pytest.raises(ConversionError, match="valid models: .*resnet20"):
        create_model("resnet21")
    with pytest.raises(ConversionError, match="valid heads: " + ", ".join(list_heads())):
        create_model("resnet20", head="mlp")
    for bad in ("every:0", "every:10", "every:x", "blocks"):
        with pytest.raises(ConversionError, match="'stages' or 'every:K'"):
            create_model("resnet20", exits=bad)
    with pytest.raises(ConversionError, match="no pretrained weights"):
        create_model("mobilenetv2", pretrained=True)


@pytest.mark.parametrize("cin,planes,size", [(16, 32, 32), (32, 64, 16)])
def test_fixed_conv_shortcut_equals_slice_pad(cin: int, planes: int, size: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, cin, size, size) * 5
    shortcut = OptionAShortcut(cin, planes)
    assert torch.equal(shortcut(x), slice_pad_shortcut(x, planes))
    assert not list(shortcut.parameters()) and not shortcut.state_dict()  # fixed, not trained, not saved


class _AkamasterBlock(nn.Module):
    """Independent re-statement of akamaster's BasicBlock (slice + pad shortcut), to check the key mapping."""

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.planes, self.down = planes, stride != 1

    def forward(self, x):  # type: ignore[no-untyped-def]
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (slice_pad_shortcut(x, self.planes) if self.down else x))


class _AkamasterResNet20(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for s, planes in enumerate((16, 32, 64), 1):
            strides = [2 if s > 1 and i == 0 else 1 for i in range(3)]
            blocks = [_AkamasterBlock(cin if i == 0 else planes, planes, st) for i, st in enumerate(strides)]
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
            cin = planes
        self.linear = nn.Linear(64, 10)

    def forward(self, x):  # type: ignore[no-untyped-def]
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(x.mean((2, 3)))


def _akamaster_file(tmp_path, net: nn.Module):  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith(("running_mean", "bias")):
                t.copy_(torch.randn_like(t) * 0.1)
            elif name.endswith(("running_var", "bn1.weight", "bn2.weight")):
                t.copy_(torch.rand_like(t) + 0.5)
    sd = OrderedDict(("module." + k, v) for k, v in net.state_dict().items() if "num_batches_tracked" not in k)
    path = tmp_path / "resnet20-test.th"
    # The real files are pre-1.6 (non-zip) pickles: write the same format.
    torch.save({"state_dict": sd, "best_prec1": 91.0}, path, _use_new_zipfile_serialization=False)
    return path


@pytest.mark.parametrize("exits", ["stages", "every:2", "every:9"])
def test_akamaster_checkpoint_maps_into_blocks(tmp_path, exits: str) -> None:
    ref = _AkamasterResNet20().eval()
    path = _akamaster_file(tmp_path, ref)
    model = create_model("resnet20", exits=exits, pretrained=path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x)[-1], ref(x), atol=1e-5)
    with pytest.raises(ConversionError, match="not a resnet32 checkpoint"):
        create_model("resnet32", pretrained=path)


def test_download_failure_is_one_clear_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EDGEQUEE_CACHE", str(tmp_path))

    def offline(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ConversionError) as err:
        create_model("resnet56", pretrained=True)
    msg = str(err.value)
    assert "\n" not in msg and resnet_cifar.default_cfgs["resnet56"]["url"] in msg and "pretrained=PATH" in msg


@pytest.mark.parametrize("model_name", ["resnet20", "mobilenetv2"])
def test_checkpoint_round_trip(tmp_path, model_name: str) -> None:
    model = _small(model_name, exits="every:3", head="pool")
    path = tmp_path / "m.pt"
    save_checkpoint(model, path, extra={"note": "test"})
    again = load_checkpoint(path)
    assert again.config == model.config and again.classes == model.classes
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.eval()(x), again(x)))


def _frozen_state(model) -> dict:  # type: ignore[no-untyped-def]
    last = model.num_exits - 1
    sd = model.state_dict()
    return {k: v.clone() for k, v in sd.items() if not k.startswith("heads.") or k.startswith(f"heads.{last}.")}


@pytest.mark.parametrize("max_cache_bytes", [1 << 30, 0])  # cached, then streaming
def test_train_heads_lowers_loss_and_freezes_backbone(max_cache_bytes: int) -> None:
    torch.manual_seed(0)
    model = create_model("resnet20", exits="stages")
    x, y = _images(96), np.random.default_rng(1).integers(0, 10, 96)
    before = _frozen_state(model)
    xt, yt = model.normalize(torch.from_numpy(x)), torch.from_numpy(y)
    with torch.no_grad():
        ce_before = [nn.functional.cross_entropy(lg, yt).item() for lg in model(xt)]
    calls = []
    metrics = train_heads(
        model, x, y, epochs=4, lr=1e-2, batch_size=32, max_cache_bytes=max_cache_bytes,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert metrics["exits"] == [0, 1] and metrics["cached"] == bool(max_cache_bytes)
    first, last = metrics["loss_history"][0], metrics["loss_history"][-1]
    assert all(b < a for a, b in zip(first, last))
    with torch.no_grad():  # the heads as stored (standardisation folded back in) are the ones that learned
        ce_after = [nn.functional.cross_entropy(lg, yt).item() for lg in model(xt)]
    assert ce_after[0] < ce_before[0] and ce_after[1] < ce_before[1] and ce_after[2] == pytest.approx(ce_before[2])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())
    assert calls[-1][0] == calls[-1][1]
    acc = evaluate(model, x, y, batch_size=40)
    assert len(acc) == 3 and all(0.0 <= a <= 1.0 for a in acc)


def test_finetune_joint_runs_and_updates_everything() -> None:
    model = create_model("resnet20", exits="stages")
    x, y = _images(16), np.random.default_rng(2).integers(0, 10, 16)
    before = model.blocks[0].stem.conv1.weight.clone()
    metrics = finetune_joint(model, x, y, epochs=2, lr=0.05, batch_size=8, max_batches=3, exit_weights=[1, 1, 2])
    assert metrics["batches"] == 3 and len(metrics["loss_history"][0]) == 3
    assert not torch.equal(before, model.blocks[0].stem.conv1.weight)
    assert not model.training
    with pytest.raises(DataError, match="exit_weights"):
        finetune_joint(model, x, y, epochs=1, exit_weights=[1, 1])
    with pytest.raises(DataError, match="expected uint8"):
        evaluate(model, x.astype(np.float32), y)


