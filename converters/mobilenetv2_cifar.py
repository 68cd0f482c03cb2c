"""MobileNetV2 (Sandler et al. 2018) for 32×32 inputs, as a multi-exit model. No pretrained weights.

CIFAR variant: the stem conv has stride 1 and the second stage (24 channels) keeps stride 1, so the feature maps are
32→32→16→8→4 instead of ImageNet's 224→7. The 17 inverted-residual blocks are the "units": ``exits="stages"`` puts
an exit after each resolution (32, 16, 8, 4 px), ``exits="every:K"`` after every K units. The stem goes into block 0;
the final 1×1 conv (to 1280 channels) goes into the last block, whose head is global average pool + Linear.

``act="relu6"`` (default, as in the paper) or ``"relu"``: ReLU6 clips activations at 6, which fixes int8 ranges to
[0, 6] and tends to quantize *worse* than plain ReLU with calibrated ranges; prefer ``"relu"`` when training from
scratch for int8 deployment.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from edgequee.errors import ConversionError

from ._registry import register_model
from .heads import DEFAULT_HEAD, make_exit_heads
from .multiexit import MultiExitModel, partition_exits
from .resnet_cifar import CIFAR10_CLASSES, CIFAR10_INPUT_SPEC

__all__ = ["InvertedResidual", "mobilenetv2"]

_ACTS = {"relu6": nn.ReLU6, "relu": nn.ReLU}


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8 without going below 90 % of ``v`` (the reference MobileNet rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int, act: str | None) -> nn.Sequential:
    layers: list[tuple[str, nn.Module]] = [
        ("conv", nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False)),
        ("bn", nn.BatchNorm2d(cout)),
    ]
    if act is not None:
        layers.append(("act", _ACTS[act]()))
    return nn.Sequential(OrderedDict(layers))


class InvertedResidual(nn.Module):
    """1×1 expand (if t > 1) → 3×3 depthwise → 1×1 linear projection, residual add when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int, act: str):
        super().__init__()
        hidden = cin * expand_ratio
        layers: list[tuple[str, nn.Module]] = []
        if expand_ratio != 1:
            layers.append(("expand", _conv_bn(cin, hidden, 1, 1, 1, act)))
        layers.append(("dw", _conv_bn(hidden, hidden, 3, stride, hidden, act)))
        layers.append(("project", _conv_bn(hidden, cout, 1, 1, 1, None)))
        self.body = nn.Sequential(OrderedDict(layers))
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x):  # type: ignore[no-untyped-def]
        out = self.body(x)
        return x + out if self.use_residual else out


# (expansion t, output channels c, repeats n, first stride s); strides 1 where ImageNet has 2 in the stem and stage 2.
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# Exclusive unit indices where the 32, 16, 8 and 4 px resolutions end.
_STAGE_ENDS = (3, 6, 13, 17)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _create_mobilenetv2(
    *, exits: str, head: str, classes: Sequence[str], width: float, act: str
) -> MultiExitModel:
    if act not in _ACTS:
        raise ConversionError(f"mobilenetv2: act={act!r}; valid: {', '.join(sorted(_ACTS))}")
    if not width > 0:
        raise ConversionError(f"mobilenetv2: width={width}; expected a positive multiplier such as 0.5 or 1.0")
    cin = _make_divisible(32 * width)
    units: list[tuple[str, nn.Module]] = []
    for t, c, n, s in _SETTINGS:
        cout = _make_divisible(c * width)
        for i in range(n):
            units.append((f"ir{len(units)}", InvertedResidual(cin, cout, s if i == 0 else 1, t, act)))
            cin = cout
    last_channels = _make_divisible(1280 * max(1.0, width))
    groups = partition_exits(exits, len(units), _STAGE_ENDS)
    blocks = []
    for b, group in enumerate(groups):
        children = [("stem", _conv_bn(3, _make_divisible(32 * width), 3, 1, 1, act))] if b == 0 else []
        children += [units[i] for i in group]
        if b == len(groups) - 1:
            children.append(("final", _conv_bn(cin, last_channels, 1, 1, 1, act)))
        blocks.append(nn.Sequential(OrderedDict(children)))
    heads = make_exit_heads(blocks, head, len(classes), CIFAR10_INPUT_SPEC)
    model = MultiExitModel(
        blocks,
        heads,
        name="mobilenetv2",
        classes=classes,
        input_spec=CIFAR10_INPUT_SPEC,
        config={"arch": "mobilenetv2", "exits": exits, "head": head, "width": width, "act": act},
    )
    _init_weights(model)
    return model.eval()


default_cfgs: dict[str, dict[str, Any]] = {"mobilenetv2": {"url": None}}  # no pretrained weights


@register_model
def mobilenetv2(
    *,
    exits: str = "stages",
    head: str = DEFAULT_HEAD,
    classes: Sequence[str] = CIFAR10_CLASSES,
    width: float = 1.0,
    act: str = "relu6",
    pretrained: bool | str | Path | None = None,
) -> MultiExitModel:
    """CIFAR MobileNetV2 (2.2 M params at width 1.0), randomly initialised; train it with converters.train."""
    if pretrained:
        raise ConversionError("mobilenetv2 has no pretrained weights; train it (edgequee train) or pick a resnet")
    return _create_mobilenetv2(exits=exits, head=head, classes=classes, width=width, act=act)
