"""The host jobs behind `edgequee train` and `edgequee convert`: resolve the model and data, call the library."""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from edgequee.bundle import Bundle
from edgequee.data import load_dataset
from edgequee.errors import ConversionError, DataError

from ._registry import create_model, is_model, list_models
from .convert import convert_model
from .multiexit import MultiExitModel, load_checkpoint, save_checkpoint
from .train import evaluate, finetune_joint, train_heads

__all__ = ["load_model", "TrainJob", "run_training", "convert_job"]

Progress = Callable[..., None]


def load_model(spec: str, pretrained: str | None = None, exits: str = "stages", head: str | None = None) -> MultiExitModel:
    """A checkpoint file (.pt from `edgequee train`), or a registered architecture built with these options."""
    path = Path(spec)
    if path.suffix == ".pt" or path.is_file():
        if pretrained or head:
            raise ConversionError(f"{spec} is a checkpoint: --pretrained/--head apply only to architecture names")
        return load_checkpoint(path)
    if not is_model(spec):
        raise ConversionError(f"{spec!r} is neither a checkpoint file nor a model ({', '.join(list_models())})")
    kwargs: dict[str, Any] = {"exits": exits, "pretrained": pretrained}
    if head:
        kwargs["head"] = head
    return create_model(spec, **kwargs)


@dataclass(frozen=True)
class TrainJob:
    model: str
    data: str
    out: Path
    pretrained: str | None = None
    exits: str = "stages"
    head: str = "pool"
    head_epochs: int = 30
    finetune_epochs: int = 0
    lr: float | None = None
    n_train: int | None = None
    seed: int = 0


def run_training(job: TrainJob, progress: Progress | None = None) -> dict[str, Any]:
    """Exit heads on the frozen backbone (cached features), then optional joint fine-tuning; save a checkpoint."""
    t0 = time.perf_counter()
    data = load_dataset(job.data).subset(n_train=job.n_train)
    if len(data.x_train) == 0:
        raise DataError(f"{job.data}: no training images (x_train); training needs a train split")
    is_ckpt = Path(job.model).is_file()
    model = load_model(job.model, None if is_ckpt else job.pretrained, job.exits, None if is_ckpt else job.head)
    report: dict[str, Any] = {"job": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(job).items()}}
    if job.head_epochs > 0:
        report["heads"] = train_heads(model, data.x_train, data.y_train, epochs=job.head_epochs,
                                      lr=job.lr or 1e-3, seed=job.seed, progress=progress)
    if job.finetune_epochs > 0:
        report["finetune"] = finetune_joint(model, data.x_train, data.y_train, epochs=job.finetune_epochs,
                                            lr=job.lr or 0.01, seed=job.seed, progress=progress)
    if len(data.x_test):
        report["test_exit_accuracy"] = evaluate(model, data.x_test, data.y_test)
    report["seconds"] = time.perf_counter() - t0
    report["command"] = shlex.join(["edgequee"] + sys.argv[1:]) if Path(sys.argv[0]).name == "edgequee" else None
    save_checkpoint(model, job.out, extra={"train": report})
    return report


def convert_job(
    model: str | MultiExitModel,
    out: Path,
    data: str,
    *,
    precisions: Sequence[str],
    n_calib: int = 500,
    n_parity: int = 1000,
    pretrained: str | None = None,
    exits: str = "stages",
    overwrite: bool = False,
    num_threads: int = 1,
    progress: Progress | None = None,
) -> Bundle:
    """Calibrate int8 on the first ``n_calib`` training images (test images when there is no train split) and
    check parity on the first ``n_parity`` test images."""
    net = model if isinstance(model, MultiExitModel) else load_model(model, pretrained, exits)
    ds = load_dataset(data, (net.input_spec.height, net.input_spec.width))
    calib = ds.x_train[:n_calib] if len(ds.x_train) else ds.x_test[:n_calib]
    return convert_model(net, out, calib, parity_images=ds.x_test[:n_parity], parity_labels=ds.y_test[:n_parity],
                         precisions=precisions, overwrite=overwrite, num_threads=num_threads, progress=progress)
