"""The edgequee command line: thin click wrappers over library functions.

Host commands (train, convert, quickstart) import torch/tensorflow lazily inside the command, so the device
commands work with only numpy and a TFLite runtime installed. Results go to stdout (or --json FILE), progress
and diagnostics to stderr.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from . import __version__
from .bundle import PRECISIONS, json_default, load_bundle, write_json_atomic
from .errors import EdgequeeError
from .report import bench_table, inspect_text, profile_table, quickstart_text

# --------------------------------------------------------------------------------------------------- helpers


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one-line click errors (exit code 1); never a traceback for user mistakes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (EdgequeeError, ImportError) as e:
            raise click.ClickException(str(e)) from e

    return wrapper


@contextmanager
def _progress(label: str) -> Iterator[Callable[..., None]]:
    """A progress callback ``cb(done, total[, label])`` drawing a click progress bar on stderr."""
    state: dict[str, Any] = {}

    def cb(done: int, total: int, what: str = "") -> None:
        bar = state.get("bar")
        if bar is None:
            bar = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True,
                                    item_show_func=lambda s: s)
            bar.__enter__()
            state["bar"], state["pos"] = bar, 0
        bar.update(done - state["pos"], what or None)
        state["pos"] = done

    try:
        yield cb
    finally:
        if "bar" in state:
            state["bar"].__exit__(None, None, None)


def _emit(report: dict[str, Any], text: str, json_out: str | None) -> None:
    """Print ``text`` (or the JSON itself with --json -), and write JSON to --json FILE."""
    if json_out == "-":
        click.echo(json.dumps(report, indent=1, default=json_default))
        return
    click.echo(text)
    if json_out:
        write_json_atomic(Path(json_out), report)
        click.echo(f"wrote {json_out}", err=True)


def _precisions(value: str) -> tuple[str, ...]:
    out = tuple(p.strip() for p in value.split(",") if p.strip())
    bad = [p for p in out if p not in PRECISIONS]
    if bad or not out:
        raise click.BadParameter(f"{','.join(bad) or value!r}: choose from {', '.join(PRECISIONS)} (comma-separated)")
    return out


json_option = click.option("--json", "json_out", metavar="FILE", help="Also write the numbers as JSON (- for stdout).")
threads_option = click.option("--threads", default=1, show_default=True, help="TFLite interpreter threads.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgequee")
def main() -> None:
    """edgequee: dynamic (early-exit, mixed-precision) networks on edge devices."""


# ---------------------------------------------------------------------------------------------- host side


@main.command()
@click.argument("model")
@click.option("--data", required=True, help="Training data: .npz, image folder or torchvision:NAME.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write (.pt).")
@click.option("--pretrained", help="Backbone weights (e.g. an akamaster .th) when MODEL is an architecture name.")
@click.option("--exits", default="stages", show_default=True, help="Exit placement: stages | every:K.")
@click.option("--head", default="pool", show_default=True, help="Exit head type (see converters/heads.py).")
@click.option("--head-epochs", default=30, show_default=True, help="Epochs of exit-head training on cached features.")
@click.option("--finetune-epochs", default=0, show_default=True, help="Epochs of joint fine-tuning (0 = frozen).")
@click.option("--lr", default=None, type=float, help="Learning rate (default: 1e-3 heads, 0.01 fine-tuning).")
@click.option("--n-train", default=None, type=int, help="Use only the first N training images.")
@click.option("--seed", default=0, show_default=True)
@json_option
@_errors
def train(model: str, data: str, out: str, pretrained: str | None, exits: str, head: str, head_epochs: int,
          finetune_epochs: int, lr: float | None, n_train: int | None, seed: int, json_out: str | None) -> None:
    """Train exit heads on a (frozen, or jointly fine-tuned) backbone; MODEL is a name or a checkpoint."""
    from converters.jobs import TrainJob, run_training

    job = TrainJob(model=model, data=data, out=Path(out), pretrained=pretrained, exits=exits, head=head,
                   head_epochs=head_epochs, finetune_epochs=finetune_epochs, lr=lr, n_train=n_train, seed=seed)
    with _progress("training") as cb:
        report = run_training(job, progress=cb)
    accs = " ".join(f"{a:.1%}" for a in report["test_exit_accuracy"]) if report.get("test_exit_accuracy") else "n/a"
    _emit(report, f"saved {out}\ntest accuracy per exit: {accs}", json_out)


@main.command()
@click.argument("model")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle directory to create.")
@click.option("--precisions", default="fp32,fp16,int8", show_default=True, callback=lambda c, p, v: _precisions(v))
@click.option("--calib", "calib", required=True, help="Real images for int8 calibration and parity (.npz/folder).")
@click.option("--calib-images", default=500, show_default=True, help="Calibration images (from the train split).")
@click.option("--parity-images", default=1000, show_default=True, help="Parity-check images (from the test split).")
@click.option("--pretrained", help="Backbone weights when MODEL is an architecture name.")
@click.option("--exits", default="stages", show_default=True, help="Exit placement when MODEL is a name.")
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
@json_option
@_errors
def convert(model: str, out: str, precisions: tuple[str, ...], calib: str, calib_images: int, parity_images: int,
            pretrained: str | None, exits: str, force: bool, json_out: str | None) -> None:
    """Convert MODEL (checkpoint .pt or architecture name) into a bundle of per-block TFLite graphs."""
    from converters.jobs import convert_job

    with _progress("converting") as cb:
        bundle = convert_job(model, Path(out), calib, precisions=precisions, n_calib=calib_images,
                                  n_parity=parity_images, pretrained=pretrained, exits=exits, overwrite=force,
                                  progress=cb)
    _emit(bundle.manifest.to_json(), inspect_text(bundle), json_out)


@main.command()
@click.option("--out", default="edgequee-quickstart", show_default=True, type=click.Path(file_okay=False))
@threads_option
@json_option
@_errors
def quickstart(out: str, threads: int, json_out: str | None) -> None:
    """The shipped ResNet-20 with exits, end to end: convert → profile → bench, on shipped CIFAR-10 images."""
    from converters.quickstart import run_quickstart

    with _progress("quickstart") as cb:
        report = run_quickstart(Path(out), num_threads=threads, progress=cb)
    _emit(report, quickstart_text(report), json_out)


# -------------------------------------------------------------------------------------------- device side


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--no-verify", is_flag=True, help="Skip sha256 checks.")
@json_option
@_errors
def inspect(bundle: str, no_verify: bool, json_out: str | None) -> None:
    """Show a bundle: blocks, precisions, files, parity, profiles."""
    b = load_bundle(bundle, verify=not no_verify)
    _emit(b.manifest.to_json(), inspect_text(b), json_out)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--device", default="host", show_default=True, help="Name of the profile to write.")
@threads_option
@click.option("--no-xnnpack", is_flag=True, help="Use the builtin kernels instead of the XNNPACK delegate.")
@click.option("--min-time", default=1.0, show_default=True, help="Minimum seconds of timing per graph.")
@json_option
@_errors
def profile(bundle: str, device: str, threads: int, no_xnnpack: bool, min_time: float, json_out: str | None) -> None:
    """Measure latency of every block × precision on this machine → BUNDLE/profiles/DEVICE.json."""
    from .profiler import profile_bundle

    b = load_bundle(bundle)
    with _progress("profiling") as cb:
        report = profile_bundle(b, device, num_threads=threads, use_xnnpack=not no_xnnpack, min_time_s=min_time,
                                progress=cb)
    _emit(report, profile_table(report) + f"\nwrote {b.profiles_dir / (device + '.json')}", json_out)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, help="Test data: .npz, image folder or torchvision:NAME.")
@click.option("--n-images", default=None, type=int, help="Use only the first N test images.")
@click.option("--latency-samples", default=500, show_default=True, type=click.IntRange(min=1), help="Images timed in the runtime loop per policy.")
@click.option("--precisions", default=None, callback=lambda c, p, v: _precisions(v) if v else None)
@click.option("--thresholds", default=None, help="Comma-separated max-softmax thresholds (inf = no early exit).")
@threads_option
@json_option
@click.option("--plot", type=click.Path(dir_okay=False), help="Write an accuracy–latency plot (PNG).")
@_errors
def bench(bundle: str, data: str, n_images: int | None, latency_samples: int, precisions: tuple[str, ...] | None,
          thresholds: str | None, threads: int, json_out: str | None, plot: str | None) -> None:
    """Accuracy, measured latency and exit histogram of threshold policies vs the whole model."""
    from .bench import DEFAULT_THRESHOLDS, bench_bundle
    from .data import load_dataset

    b = load_bundle(bundle)
    ds = load_dataset(data, (b.manifest.input.height, b.manifest.input.width)).subset(n_test=n_images)
    ts = tuple(float(t) for t in thresholds.split(",")) if thresholds else DEFAULT_THRESHOLDS
    with _progress("benchmarking") as cb:
        report = bench_bundle(b, ds.x_test, ds.y_test, precisions=precisions, thresholds=ts, num_threads=threads,
                              latency_samples=latency_samples, progress=cb)
    if plot:
        from .report import plot_bench

        plot_bench(report, Path(plot))
    _emit(report, bench_table(report), json_out)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(PRECISIONS))
@click.option("--threshold", default=math.inf, show_default=True, help="Max-softmax exit threshold.")
@threads_option
@json_option
@_errors
def run(bundle: str, inputs: tuple[str, ...], precision: str, threshold: float, threads: int,
        json_out: str | None) -> None:
    """Classify images (files, folders or .npz) with the bundle, block by block."""
    from .policies import ThresholdPolicy
    from .runtime import EdgeRunner
    from .inputs import read_inputs

    b = load_bundle(bundle)
    runner = EdgeRunner(b, ThresholdPolicy(precision, threshold), num_threads=threads)
    rows = []
    for name, image in read_inputs(inputs, b.manifest.input):
        r = runner.classify(image)
        rows.append({"input": name, "class_id": r.class_id, "class": b.manifest.classes[r.class_id],
                     "prob": float(r.probs[r.class_id]), "exit": r.exit_index,
                     "precision_path": list(r.precision_path), "latency_ms": r.latency_ms})
    text = "\n".join(f"{r['input']}: {r['class']} ({r['prob']:.2f}) exit {r['exit']} "
                     f"[{'/'.join(r['precision_path'])}] {r['latency_ms']:.2f} ms" for r in rows)
    _emit({"results": rows}, text, json_out)


if __name__ == "__main__":
    main()
