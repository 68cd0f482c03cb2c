"""CIFAR ResNet-20/32/44/56 (He et al. 2015, "option A" shortcuts) as multi-exit models.

Architecture and weights: Yerlan Idelbayev's ``akamaster/pytorch_resnet_cifar10`` (BSD-2-Clause), re-implemented
from its description; module names inside each unit match the checkpoint's so the keys map one to one.

The network is ``stem (conv1, bn1, relu)`` then ``3n`` BasicBlocks ("units") in three stages of 16/32/64 channels.
``exits="stages"`` puts an exit after each stage; ``exits="every:K"`` after every K units (the stem goes into block 0,
the last block ends the network and its head is the pretrained avgpool + linear classifier).

Edge-friendly rewrite: the option-A shortcut ``x[:, :, ::2, ::2]`` zero-padded by ``planes // 4`` channels on each
side is computed as a fixed 1×1 stride-2 convolution whose weight is the 0/1 selection matrix. It is exactly the same
function (each output is one input value plus exact zeros) and converts to a single TFLite CONV_2D, which XNNPACK and
the int8 kernels handle, instead of a strided slice + pad that falls off the delegate.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.request
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgequee.bundle import InputSpec
from edgequee.errors import ConversionError

from ._registry import register_model
from .heads import DEFAULT_HEAD, make_exit_heads
from .multiexit import MultiExitModel, partition_exits

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_INPUT_SPEC",
    "OptionAShortcut",
    "BasicBlock",
    "slice_pad_shortcut",
    "load_akamaster",
    "download_pretrained",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
]

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# The akamaster weights were trained on x/255 normalised with ImageNet statistics.
CIFAR10_INPUT_SPEC = InputSpec(
    height=32, width=32, channels=3, scale=1.0 / 255.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
)


def _selection_weight(in_planes: int, planes: int) -> torch.Tensor:
    pad = planes // 4
    if in_planes + 2 * pad != planes:
        raise ConversionError(f"option-A shortcut: {in_planes} -> {planes} channels is not a pad of {pad} each side")
    weight = torch.zeros(planes, in_planes, 1, 1)
    for c in range(in_planes):
        weight[pad + c, c, 0, 0] = 1.0
    return weight


class OptionAShortcut(nn.Module):
    """Option-A shortcut as a fixed 1×1 stride-2 conv with a 0/1 selection weight (a buffer, never trained)."""

    def __init__(self, in_planes: int, planes: int):
        super().__init__()
        # Not persistent: a constant of the architecture, rebuilt by the constructor, not a checkpoint entry.
        self.register_buffer("weight", _selection_weight(in_planes, planes), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, stride=2)


def slice_pad_shortcut(x: torch.Tensor, planes: int) -> torch.Tensor:
    """The original option-A shortcut (strided slice + channel zero-pad); the reference for ``OptionAShortcut``."""
    pad = planes // 4
    return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad))


class BasicBlock(nn.Module):
    """Two 3×3 conv+BN, residual add, ReLU. Child names match the akamaster checkpoint."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif stride == 2:
            self.shortcut = OptionAShortcut(in_planes, planes)
        else:
            raise ConversionError(f"BasicBlock: unsupported stride {stride} for {in_planes} -> {planes} channels")
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _stem() -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(conv1=nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False), bn1=nn.BatchNorm2d(16), relu=nn.ReLU())
    )


def _units(n: int) -> list[tuple[str, nn.Module]]:
    """The 3n BasicBlocks, named ``layer{stage}_{index}`` (checkpoint key ``layer{stage}.{index}``)."""
    units: list[tuple[str, nn.Module]] = []
    in_planes = 16
    for stage, planes in enumerate((16, 32, 64), start=1):
        for i in range(n):
            stride = 2 if stage > 1 and i == 0 else 1
            units.append((f"layer{stage}_{i}", BasicBlock(in_planes, planes, stride)))
            in_planes = planes
    return units


def _akamaster_key(key: str, last_head: int) -> str | None:
    """Our state-dict key → the akamaster checkpoint key (None: not in the checkpoint, e.g. early exit heads)."""
    m = re.fullmatch(r"blocks\.\d+\.stem\.(.+)", key)
    if m:
        return m.group(1)
    m = re.fullmatch(r"blocks\.\d+\.layer(\d)_(\d+)\.(.+)", key)
    if m:
        return f"layer{m.group(1)}.{m.group(2)}.{m.group(3)}"
    m = re.fullmatch(rf"heads\.{last_head}\.classifier\.(.+)", key)
    if m:
        return f"linear.{m.group(1)}"
    return None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        # The legacy (pre-1.6) pickle holds only tensors, an OrderedDict and a float: weights_only is enough.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file (expected an akamaster ResNet .th checkpoint)") from None
    except Exception as e:  # noqa: BLE001 — any unpickling failure means "not this format"
        first = (str(e).strip().splitlines() or [""])[0]  # torch's weights_only refusal runs to many lines
        raise ConversionError(f"{path}: cannot read as a torch checkpoint ({type(e).__name__}: {first})") from e
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        got = type(ckpt).__name__
        raise ConversionError(f"{path}: expected a dict with 'state_dict' (akamaster format), got {got}")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_akamaster(model: MultiExitModel, path: Path | str) -> MultiExitModel:
    """Load an akamaster ``.th`` checkpoint (``module.`` prefix, no num_batches_tracked) into ``model`` in place.

    Backbone and final classifier come from the file; early exit heads keep their initial weights.
    """
    path = Path(path)
    src = _read_state_dict(path)
    last_head = model.num_exits - 1
    loaded, missing = {}, []
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        src_key = _akamaster_key(key, last_head)
        if src_key is None:
            continue
        if src_key not in src:
            missing.append(src_key)
        elif src[src_key].shape != value.shape:
            raise ConversionError(
                f"{path}: {src_key} has shape {tuple(src[src_key].shape)}, {model.name} expects {tuple(value.shape)}"
            )
        else:
            loaded[key] = src[src_key]
    unexpected = sorted(set(src) - {_akamaster_key(k, last_head) for k in loaded})
    if missing or unexpected:
        raise ConversionError(
            f"{path}: not a {model.name} checkpoint ({len(missing)} missing keys, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}); pass the file matching the architecture"
        )
    model.load_state_dict(loaded, strict=False)
    log.info("loaded %d tensors from %s into %s", len(loaded), path, model.name)
    return model


def _cache_dir() -> Path:
    return Path(os.environ.get("EDGEQUEE_CACHE", Path.home() / ".cache" / "edgequee")) / "pretrained"


def download_pretrained(arch: str, cache_dir: Path | None = None, timeout_s: float = 30.0) -> Path:
    """Download (once) the akamaster checkpoint for ``arch`` and return its local path; sha256-prefix checked."""
    cfg = default_cfgs.get(arch)
    if cfg is None:
        raise ConversionError(f"no pretrained weights for {arch!r}; available: {', '.join(sorted(default_cfgs))}")
    path = (cache_dir or _cache_dir()) / cfg["file"]
    if path.is_file() and _sha256(path).startswith(cfg["sha256_prefix"]):
        return path
    url = cfg["url"]
    tmp = path.with_name(f".{path.name}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=timeout_s) as r, open(tmp, "wb") as f:
            f.write(r.read())
    except Exception as e:  # noqa: BLE001 — every failure gets the same actionable message
        tmp.unlink(missing_ok=True)
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise ConversionError(
            f"could not download {arch} weights from {url} ({reason}); fetch the file by hand and pass "
            f"pretrained=PATH"
        ) from e
    if not _sha256(tmp).startswith(cfg["sha256_prefix"]):
        tmp.unlink(missing_ok=True)
        raise ConversionError(f"{url}: downloaded file fails its sha256 check (want {cfg['sha256_prefix']}…)")
    tmp.replace(path)
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _create_resnet(
    arch: str,
    n: int,
    *,
    exits: str,
    head: str,
    classes: Sequence[str],
    pretrained: bool | str | Path | None,
) -> MultiExitModel:
    units = _units(n)
    groups = partition_exits(exits, len(units), stage_ends=(n, 2 * n, 3 * n))
    blocks = []
    for b, group in enumerate(groups):
        children = [("stem", _stem())] if b == 0 else []
        children += [units[i] for i in group]
        blocks.append(nn.Sequential(OrderedDict(children)))
    heads = make_exit_heads(blocks, head, len(classes), CIFAR10_INPUT_SPEC)
    model = MultiExitModel(
        blocks,
        heads,
        name=arch,
        classes=classes,
        input_spec=CIFAR10_INPUT_SPEC,
        config={"arch": arch, "exits": exits, "head": head},
    )
    if pretrained:
        if len(classes) != len(CIFAR10_CLASSES):
            raise ConversionError(f"{arch}: pretrained weights are for the 10 CIFAR-10 classes, got {len(classes)}")
        path = download_pretrained(arch) if pretrained is True else Path(pretrained)
        load_akamaster(model, path)
    return model.eval()


_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"


def _cfg(n: int, file: str, top1: float) -> dict[str, Any]:
    return {"n": n, "file": file, "url": _URL + file, "sha256_prefix": file[-11:-3], "top1_cifar10": top1}


default_cfgs: dict[str, dict[str, Any]] = {
    "resnet20": _cfg(3, "resnet20-12fca82f.th", 91.78),
    "resnet32": _cfg(5, "resnet32-d509ac18.th", 92.78),
    "resnet44": _cfg(7, "resnet44-014dd654.th", 93.10),
    "resnet56": _cfg(9, "resnet56-4bfd9763.th", 93.62),
}


def _entry(arch: str, exits: str, head: str, classes: Sequence[str], pretrained: Any) -> MultiExitModel:
    return _create_resnet(
        arch, default_cfgs[arch]["n"], exits=exits, head=head, classes=classes, pretrained=pretrained
    )


@register_model
def resnet20(
    *, exits: str = "stages", head: str = DEFAULT_HEAD, classes: Sequence[str] = CIFAR10_CLASSES,
    pretrained: bool | str | Path | None = None,
) -> MultiExitModel:
    """CIFAR ResNet-20 (0.27 M params). ``pretrained``: akamaster ``.th`` path, or True to download it."""
    return _entry("resnet20", exits, head, classes, pretrained)


@register_model
def resnet32(
    *, exits: str = "stages", head: str = DEFAULT_HEAD, classes: Sequence[str] = CIFAR10_CLASSES,
    pretrained: bool | str | Path | None = None,
) -> MultiExitModel:
    """CIFAR ResNet-32 (0.46 M params). ``pretrained``: akamaster ``.th`` path, or True to download it."""
    return _entry("resnet32", exits, head, classes, pretrained)


@register_model
def resnet44(
    *, exits: str = "stages", head: str = DEFAULT_HEAD, classes: Sequence[str] = CIFAR10_CLASSES,
    pretrained: bool | str | Path | None = None,
) -> MultiExitModel:
    """CIFAR ResNet-44 (0.66 M params). ``pretrained``: akamaster ``.th`` path, or True to download it."""
    return _entry("resnet44", exits, head, classes, pretrained)


@register_model
def resnet56(
    *, exits: str = "stages", head: str = DEFAULT_HEAD, classes: Sequence[str] = CIFAR10_CLASSES,
    pretrained: bool | str | Path | None = None,
) -> MultiExitModel:
    """CIFAR ResNet-56 (0.85 M params). ``pretrained``: akamaster ``.th`` path, or True to download it."""
    return _entry("resnet56", exits, head, classes, pretrained)
