"""The host jobs behind `edgequee train` and `edgequee convert`: resolve the model and data, call the library."""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from edgequee.bundle import Bundle, write_policy
from edgequee.data import load_dataset
from edgequee.errors import ConversionError, DataError
from edgequee.policies import to_stored

from ._registry import FACTORY_CONTRACT, check_arguments, create_model, factory_parameters, is_model, list_models
from .convert import convert_model
from .heads import DEFAULT_HEAD
from .jei import exit_costs, jei_policy, train_jei
from .multiexit import MultiExitModel, load_checkpoint, save_checkpoint
from .train import evaluate, finetune_joint, train_heads

__all__ = ["load_model", "TrainJob", "run_training", "convert_job"]

Progress = Callable[..., None]


# The architecture options of `edgequee train/convert` and the values that mean "not given" (the CLI defaults): a
# factory that does not declare an option gets it only when the user asked for something else (then: an error).
_OPTION_DEFAULTS: dict[str, tuple[Any, ...]] = {"exits": ("stages",), "head": (None, DEFAULT_HEAD),
                                                "pretrained": (None,)}


def _is_checkpoint(spec: str) -> bool:
    path = Path(spec)
    return path.suffix == ".pt" or path.is_file()


def load_model(spec: str, pretrained: str | None = None, exits: str = "stages", head: str | None = None) -> MultiExitModel:
    """A checkpoint file (.pt from `edgequee train`), or a registered architecture built with these options.

    The options go only to a factory that declares them (``converters._registry.FACTORY_CONTRACT``); a non-default
    value for an option the factory does not declare is a one-line ConversionError."""
    path = Path(spec)
    if _is_checkpoint(spec):
        if pretrained or head:
            raise ConversionError(f"{spec} is a checkpoint: --pretrained/--head apply only to architecture names")
        return load_checkpoint(path)
    if not is_model(spec):
        raise ConversionError(f"{spec!r} is neither a checkpoint file nor a model ({', '.join(list_models())})")
    accepted = factory_parameters(spec)
    given: dict[str, Any] = {"exits": exits, "pretrained": pretrained, "head": head}
    kwargs: dict[str, Any] = {}
    for option, value in given.items():
        if accepted is None or option in accepted:
            if option != "head" or value:
                kwargs[option] = value
        elif value not in _OPTION_DEFAULTS[option]:
            raise ConversionError(f"--{option} {value}: model {spec!r} takes no {option}= argument ({FACTORY_CONTRACT})")
    return create_model(spec, **kwargs)


def _check_rebuildable(model: MultiExitModel, spec: str) -> None:
    """Before any training: the checkpoint ``run_training`` will save must be one ``load_checkpoint`` can rebuild."""
    config = dict(model.config)
    arch = config.pop("arch", None)
    if arch is None:
        raise ConversionError(f"model {spec!r} has no 'arch' in its config, so its checkpoint could not be rebuilt; "
                              f"return MultiExitModel(..., config={{'arch': {spec!r}, ...}}) ({FACTORY_CONTRACT})")
    check_arguments(str(arch), {**config, "classes": model.classes})


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
    method: str = "heads"  # heads | jei (JEI-DNN gates and heads on the frozen backbone: converters/jei.py)
    cost_from: str | None = None  # jei: a bundle of the same backbone whose cost model prices the exits
    device: str | None = None  # jei: the device of that cost model
    objective: str = "latency"
    precision: str = "fp32"  # jei: the precision the policy will run at
    lam: float = 0.5
    jei_loss: str = "weighted"
    jei_epochs: int = 10


def run_training(job: TrainJob, progress: Progress | None = None) -> dict[str, Any]:
    """Exit heads on the frozen backbone (cached features), then optional joint fine-tuning; save a checkpoint."""
    t0 = time.perf_counter()
    data = load_dataset(job.data).subset(n_train=job.n_train)
    if len(data.x_train) == 0:
        raise DataError(f"{job.data}: no training images (x_train); training needs a train split")
    is_ckpt = _is_checkpoint(job.model)
    model = load_model(job.model, None if is_ckpt else job.pretrained, job.exits, None if is_ckpt else job.head)
    if not is_ckpt:
        _check_rebuildable(model, job.model)
    report: dict[str, Any] = {"job": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(job).items()}}
    extra: dict[str, Any] = {}
    if job.method == "jei":
        if job.finetune_epochs or not job.cost_from or not job.device:
            raise DataError("--method jei needs --cost-from BUNDLE --device NAME and keeps the backbone frozen "
                            "(no --finetune-epochs)")
        cost = exit_costs(model, job.cost_from, job.device, precision=job.precision, objective=job.objective)
        report["jei"] = train_jei(model, data.x_train, data.y_train, cost, lam=job.lam, loss=job.jei_loss,
                                  warmup_epochs=job.head_epochs, epochs=job.jei_epochs, lr=job.lr or 1e-4,
                                  seed=job.seed, progress=progress)
        extra["jei"] = report["jei"]["policy"]
    elif job.method != "heads":
        raise DataError(f"--method {job.method!r}: choose heads or jei")
    elif job.head_epochs > 0:
        report["heads"] = train_heads(model, data.x_train, data.y_train, epochs=job.head_epochs,
                                      lr=job.lr or 1e-3, seed=job.seed, progress=progress)
    if job.finetune_epochs > 0:
        report["finetune"] = finetune_joint(model, data.x_train, data.y_train, epochs=job.finetune_epochs,
                                            lr=job.lr or 0.01, seed=job.seed, progress=progress)
    if len(data.x_test):
        report["test_exit_accuracy"] = evaluate(model, data.x_test, data.y_test)
    report["seconds"] = time.perf_counter() - t0
    report["command"] = shlex.join(["edgequee"] + sys.argv[1:]) if Path(sys.argv[0]).name == "edgequee" else None
    save_checkpoint(model, job.out, extra={"train": report, **extra})
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
    random_init: bool = False,
    overwrite: bool = False,
    edgetpu: bool = False,
    num_threads: int = 1,
    progress: Progress | None = None,
) -> Bundle:
    """Calibrate int8 on the first ``n_calib`` training images (test images when there is no train split) and
    check parity on the first ``n_parity`` test images. A checkpoint with JEI gates (``edgequee train --method
    jei``) also gets its ``jei`` policy stored in the bundle (uncertified: ``edgequee calibrate`` certifies it).

    An architecture name without ``pretrained`` weights would convert random weights: refused unless
    ``random_init`` (a checkpoint carries its own weights and takes neither)."""
    if isinstance(model, str):
        _check_weights(model, pretrained, random_init)
    jei = jei_policy(model) if isinstance(model, str) else None
    if jei is not None and jei.precision not in precisions:
        raise ConversionError(f"{model} holds JEI gates for {jei.precision}: add it to --precisions")
    net = model if isinstance(model, MultiExitModel) else load_model(model, pretrained, exits)
    ds = load_dataset(data, (net.input_spec.height, net.input_spec.width))
    calib = ds.x_train[:n_calib] if len(ds.x_train) else ds.x_test[:n_calib]
    bundle = convert_model(net, out, calib, parity_images=ds.x_test[:n_parity], parity_labels=ds.y_test[:n_parity],
                           precisions=precisions, overwrite=overwrite, edgetpu=edgetpu, num_threads=num_threads,
                           progress=progress)
    return bundle if jei is None else write_policy(bundle, to_stored(jei))


def _check_weights(spec: str, pretrained: str | None, random_init: bool) -> None:
    """convert: a checkpoint carries its weights; an architecture name needs --pretrained or an explicit
    --random-init (no silent conversion of random weights)."""
    if _is_checkpoint(spec):
        if random_init:
            raise ConversionError(f"{spec} is a checkpoint with its own weights: drop --random-init")
        return
    if not is_model(spec):
        return  # load_model names the valid models
    if pretrained and random_init:
        raise ConversionError("--pretrained and --random-init contradict each other: give one")
    if not pretrained and not random_init:
        raise ConversionError(
            f"{spec} is an architecture name with no weights: pass --pretrained FILE, or a checkpoint from "
            "edgequee train as MODEL, or --random-init to convert random weights on purpose"
        )
