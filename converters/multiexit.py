"""The multi-exit model API every family implements, and its checkpoint format.

A ``MultiExitModel`` is an ordered list of blocks, each followed by an exit head:

    image ─ block0 ─ h1 ─ block1 ─ h2 ─ … ─ block{L-1} ─ h{L}
                      │           │                       │
                    head0       head1                  head{L-1}   (the last head is the model's own classifier)

A head is ``features`` (hidden → vector, e.g. pooling) followed by ``classifier`` (one nn.Linear). The converter
puts blocks and head features into TFLite graphs; the classifier runs in float numpy on the device (see
edgequee/bundle.py for why). Tensors are NCHW in torch; the bundle is NHWC.

Bring your own model: build ``MultiExitModel(blocks, heads, name=..., classes=..., input_spec=...)`` from the
modules of your network (each block must take exactly the previous block's output), then ``save_checkpoint``
it and ``edgequee convert`` the checkpoint. See README "Bring your own model".
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from edgequee.bundle import InputSpec
from edgequee.errors import ConversionError, InternalError

__all__ = ["ExitHead", "MultiExitModel", "save_checkpoint", "load_checkpoint", "read_checkpoint", "partition_exits",
           "CHECKPOINT_FORMAT", "TRUST_CHECKPOINTS_ENV"]

CHECKPOINT_FORMAT = "edgequee-multiexit/1"

# A checkpoint is a pickle, and unpickling an untrusted one can run any code. ``read_checkpoint`` therefore loads
# with ``weights_only=True`` (tensors, dicts, lists, tuples, str, numbers, bool, None: everything ``save_checkpoint``
# writes, so nothing needs allow-listing); this variable set to 1 lifts that for files from a source you trust.
TRUST_CHECKPOINTS_ENV = "EDGEQUEE_TRUST_CHECKPOINTS"


class ExitHead(nn.Module):
    """features (hidden → flat vector) then a float Linear classifier."""

    def __init__(self, features: nn.Module, classifier: nn.Linear):
        super().__init__()
        if not isinstance(classifier, nn.Linear):
            raise ConversionError(f"an exit head's classifier must be nn.Linear, got {type(classifier).__name__}")
        self.features = features
        self.classifier = classifier

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(h))


class MultiExitModel(nn.Module):
    """Blocks with one exit head after each; ``forward`` returns the logits of every exit."""

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        heads: Sequence[ExitHead],
        *,
        name: str,
        classes: Sequence[str],
        input_spec: InputSpec,
        config: dict[str, Any] | None = None,
    ):
        super().__init__()
        if len(blocks) != len(heads) or not blocks:
            raise ConversionError(f"need one exit head per block, got {len(blocks)} blocks and {len(heads)} heads")
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        self.name = name
        self.classes = tuple(classes)
        self.input_spec = input_spec
        # Everything the family's factory needs to rebuild this model (see load_checkpoint).
        self.config = dict(config or {})

    @property
    def num_exits(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        logits = []
        for block, head in zip(self.blocks, self.heads):
            x = block(x)
            logits.append(head(x))
        return logits

    def hidden_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[x, h1, …, hL]: the input of every block and the last block's output."""
        out = [x]
        for block in self.blocks:
            out.append(block(out[-1]))
        return out

    def normalize(self, images_uint8_nhwc: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC RGB images → the float NCHW tensor block 0 expects (InputSpec's scale/mean/std)."""
        s = self.input_spec
        x = images_uint8_nhwc.float() * s.scale
        mean = torch.tensor(s.mean, dtype=torch.float32)
        std = torch.tensor(s.std, dtype=torch.float32)
        return ((x - mean) / std).permute(0, 3, 1, 2).contiguous()


def _plain(value: Any, where: str) -> Any:
    """``value`` as the plain types ``torch.load(weights_only=True)`` accepts (numpy → Python, Path → str)."""
    if isinstance(value, np.generic):  # before float/str: np.float64 and np.str_ subclass them, yet pickle as numpy
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value), where)
    if isinstance(value, dict):
        return {k if isinstance(k, (str, int)) else str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise ConversionError(
        f"{where}: a {type(value).__name__} cannot go into a checkpoint; save plain types (dict, list, tuple, str, "
        "number, bool, None, tensor, numpy array)"
    )


def save_checkpoint(model: MultiExitModel, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Save a model the registry can rebuild: family config + weights + metadata (+ e.g. training metrics).

    Only plain types are written (numpy values become Python numbers and lists), so ``read_checkpoint`` loads the
    file with ``weights_only=True``.
    """
    if "arch" not in model.config:
        raise ConversionError(
            "model.config has no 'arch'; a checkpoint must name a registered architecture "
            "(bring-your-own models: register a factory with converters.register_model)"
        )
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": _plain(model.config, "model.config"),
        "classes": _plain(list(model.classes), "classes"),
        "input_spec": _plain(dataclasses.asdict(model.input_spec), "input_spec"),
        "state_dict": model.state_dict(),
        "extra": _plain(extra or {}, "extra"),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _trusted() -> bool:
    return os.environ.get(TRUST_CHECKPOINTS_ENV, "").strip().lower() in ("1", "true", "yes")


def read_checkpoint(path: Path | str) -> Any:
    """The unpickled content of a torch file, loaded with ``weights_only=True``: a crafted pickle cannot run code.

    A file that needs more than tensors and plain types (an old or foreign checkpoint) is refused with a
    ConversionError naming the escape hatch: ``EDGEQUEE_TRUST_CHECKPOINTS=1`` for files from a trusted source.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such checkpoint (make one with edgequee train)")
    trusted = _trusted()
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as e:
        if trusted:
            raise ConversionError(f"{path}: cannot read as a torch checkpoint ({_one_line(e)})") from None
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise ConversionError(
                f"{path}: refused to unpickle (it needs {found.group(1)}; edgequee checkpoints hold only tensors and "
                f"plain types); if you trust where this file came from, rerun with {TRUST_CHECKPOINTS_ENV}=1 to load "
                "it anyway"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(e), re.DOTALL)
        why = " ".join(detail.group(1).split()) if detail else _one_line(e)
        raise ConversionError(
            f"{path}: cannot read as a torch checkpoint with weights_only ({why}); if it is a checkpoint from a "
            f"source you trust, rerun with {TRUST_CHECKPOINTS_ENV}=1 to load it anyway"
        ) from None
    except Exception as e:  # noqa: BLE001 — not a zip, truncated, not a pickle: all mean "not a checkpoint"
        raise ConversionError(f"{path}: cannot read as a torch checkpoint ({_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def load_checkpoint(path: Path, factory: Callable[..., MultiExitModel] | None = None) -> MultiExitModel:
    """Rebuild a model saved by ``save_checkpoint`` (through the registry unless ``factory`` is given)."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConversionError(f"{path}: not an edgequee multi-exit checkpoint ({CHECKPOINT_FORMAT})")
    config = dict(ckpt["config"])
    if factory is None:
        from ._registry import create_model

        model = create_model(config.pop("arch"), **config, classes=ckpt["classes"])
    else:
        model = factory(**config, classes=ckpt["classes"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model


def partition_exits(exits: str, num_units: int, stage_ends: Sequence[int]) -> list[range]:
    """Group a family's ``num_units`` repeated units (residual blocks, …) into blocks, one exit after each.

    ``exits`` is ``"stages"`` (one block per stage; ``stage_ends`` are the exclusive unit indices where stages end)
    or ``"every:K"`` (K units per block; the last block takes the remainder). Returns the unit range of each block.
    """
    if exits == "stages":
        ends = list(stage_ends)
    elif exits.startswith("every:") and exits[6:].isdigit() and 1 <= int(exits[6:]) <= num_units:
        k = int(exits[6:])
        ends = list(range(k, num_units, k)) + [num_units]
    else:
        raise ConversionError(
            f"exits={exits!r}: expected 'stages' or 'every:K' with 1 <= K <= {num_units} (this model has "
            f"{num_units} units)"
        )
    if not ends or ends[-1] != num_units or sorted(set(ends)) != ends:
        raise InternalError(f"bad stage ends {ends} for {num_units} units")
    starts = [0] + ends[:-1]
    return [range(s, e) for s, e in zip(starts, ends)]
