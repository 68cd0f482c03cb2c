"""Exit heads, selected by name: what turns a block's hidden state (N, C, H, W) into class logits.

Every head is an ``ExitHead(features, classifier)``. ``features`` is an ``nn.Sequential`` made only of ops that
convert cleanly to TFLite through ONNX → onnx2tf (AveragePool/MaxPool with fixed kernels, GlobalAveragePool,
Concat, Flatten); ``classifier`` is one ``nn.Linear`` that runs in float numpy on the device.

- ``"linear"``: global average pool + Linear (the classic, weak early exit).
- ``"pool"``: SDN-style feature reduction: average- *and* max-pool to a fixed 4×4 grid, concatenated, flattened, then
  Linear (2·C·16 inputs). Keeps coarse spatial layout and peak responses, which early feature maps need. Default:
  on frozen pretrained ResNet-56 (``exits="every:3"``, JPEG CIFAR-10 test set) its 8 trained exits reach
  62/66/67/72/74/76/81/84 % against 38/41/44/53/56/59/72/82 % for ``"linear"`` (2×2 grid: 48/49/54/64/67/69/79/84 %).

Both heads' ``features`` are parameter-free, so ``converters.train.train_heads`` can run the backbone once and cache
``features(h)`` (a few hundred to a few thousand floats per image) instead of whole feature maps.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from edgequee.bundle import InputSpec
from edgequee.errors import ConversionError

from .multiexit import ExitHead

__all__ = ["HEADS", "DEFAULT_HEAD", "make_head", "make_final_head", "make_exit_heads", "MixedPool", "list_heads"]

DEFAULT_HEAD = "pool"


class MixedPool(nn.Module):
    """Average- and max-pool (N, C, H, W) to a fixed grid and concatenate: (N, 2C, grid, grid).

    Uses fixed-kernel AvgPool2d/MaxPool2d (kernel = stride = H // grid), not AdaptiveAvgPool, so it exports to plain
    ONNX AveragePool/MaxPool. XNNPACK takes no quantized AVERAGE_POOL_2D: in int8 graphs that op runs on TFLite's
    reference kernel and splits each block into two XNNPACK partitions. Tried: the average as a depthwise
    convolution with constant weights 1/(kh·kw) (identical function, one partition). On ResNet-56's int8 blocks,
    timed interleaved on a VNNI host, it made no difference beyond the ±5 % noise (the 8×8-window blocks looked
    slower, the 2×2/4×4 ones faster, and a repeat reversed it), so the plain pool stays.
    """

    def __init__(self, height: int, width: int, grid: int):
        super().__init__()
        if height % grid or width % grid:
            raise ConversionError(f"pool head: feature map {height}x{width} is not divisible into a {grid}x{grid} grid")
        kernel = (height // grid, width // grid)
        self.avg = nn.AvgPool2d(kernel, stride=kernel)
        self.max = nn.MaxPool2d(kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.avg(x), self.max(x)], dim=1)


def _global_avg_pool() -> nn.Sequential:
    # AdaptiveAvgPool2d(1) exports as ONNX GlobalAveragePool.
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def _linear_head(channels: int, height: int, width: int, num_classes: int) -> ExitHead:
    return ExitHead(_global_avg_pool(), nn.Linear(channels, num_classes))


def _largest_grid(size: int, wanted: int) -> int:
    return max(g for g in range(1, min(size, wanted) + 1) if size % g == 0)


def _pool_head(channels: int, height: int, width: int, num_classes: int, grid: int = 4) -> ExitHead:
    g = min(_largest_grid(height, grid), _largest_grid(width, grid))
    features = nn.Sequential(MixedPool(height, width, g), nn.Flatten(1))
    return ExitHead(features, nn.Linear(2 * channels * g * g, num_classes))


HeadFactory = Callable[[int, int, int, int], ExitHead]

HEADS: dict[str, HeadFactory] = {
    "linear": _linear_head,
    "pool": _pool_head,
}


def list_heads() -> list[str]:
    """Names accepted by ``make_head`` (and by the families' ``head=`` argument)."""
    return sorted(HEADS)


def make_head(kind: str, channels: int, height: int, width: int, num_classes: int) -> ExitHead:
    """Build an early-exit head of type ``kind`` for a (channels, height, width) hidden state."""
    try:
        factory = HEADS[kind]
    except KeyError:
        raise ConversionError(f"unknown exit head {kind!r}; valid heads: {', '.join(list_heads())}") from None
    return factory(channels, height, width, num_classes)


def make_final_head(channels: int, num_classes: int) -> ExitHead:
    """The network's own classifier: global average pool + Linear (pretrained weights load into it)."""
    return ExitHead(_global_avg_pool(), nn.Linear(channels, num_classes))


def make_exit_heads(blocks: Sequence[nn.Module], head: str, num_classes: int, spec: InputSpec) -> list[ExitHead]:
    """One ``head``-type exit per block, sized from the block's output shape; the last is ``make_final_head``."""
    heads = []
    with torch.no_grad():
        h = torch.zeros(1, spec.channels, spec.height, spec.width)
        for i, block in enumerate(blocks):
            h = block.eval()(h)
            _, c, height, width = h.shape
            if i == len(blocks) - 1:
                heads.append(make_final_head(c, num_classes))
            else:
                heads.append(make_head(head, c, height, width, num_classes))
    return heads
