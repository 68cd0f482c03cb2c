"""The edgequee command line: thin click wrappers over library functions.

Host commands (train, convert, quickstart) import torch/tensorflow lazily inside the command, so the device
commands work with only numpy and a TFLite runtime installed. Results go to stdout (or --json FILE), progress
and diagnostics to stderr.
"""

from __future__ import annotations

import dataclasses
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
from .risk import METHODS, RISKS, TARGETS
from .report import bench_table, cost_table, device_text, devices_table, inspect_text, profile_table, quickstart_text

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


# ------------------------------------------------------------------------------------------- flash helpers


def _ssh_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the ssh options (flash, convert --flash, profile --remote); ``fn`` gets them as ``ssh=SshOptions``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, identity: str | None, ssh_config: str | None, ssh_option: tuple[str, ...],
                connect_timeout: int, **kwargs: Any) -> Any:
        from .flash import SshOptions

        return fn(*args, ssh=SshOptions(ssh_config, identity, ssh_option, connect_timeout), **kwargs)

    for option in (
        click.option("-i", "--identity", type=click.Path(exists=True, dir_okay=False), help="ssh private key (ssh -i)."),
        click.option("-F", "--ssh-config", type=click.Path(exists=True, dir_okay=False),
                     help="ssh config file instead of ~/.ssh/config (ssh -F)."),
        click.option("-o", "--ssh-option", multiple=True, metavar="KEY=VALUE",
                     help="Any ssh option (ssh -o), repeatable; these win over edgequee's own."),
        click.option("--connect-timeout", default=15, show_default=True, type=click.IntRange(min=1),
                     help="Seconds to wait for ssh to connect."),
    ):
        wrapper = option(wrapper)
    return wrapper


def _flash_report(bundle: str, target: str, **kwargs: Any) -> dict[str, Any]:
    """``edgequee.flash.flash`` with an upload progress bar."""
    from .flash import flash as flash_bundle

    with _progress("uploading") as cb:
        return flash_bundle(bundle, target, progress=cb, **kwargs)


def _then_flash(fn: Callable[..., Any]) -> Callable[..., Any]:
    """convert --flash TARGET: once the bundle (--out) is written, flash it to TARGET."""

    @functools.wraps(fn)
    def wrapper(*args: Any, flash_to: str | None, ssh: Any, **kwargs: Any) -> None:
        from .flash import flash_text

        fn(*args, **kwargs)
        if flash_to:
            click.echo(flash_text(_flash_report(kwargs["out"], flash_to, ssh=ssh)), err=kwargs.get("json_out") == "-")

    wrapper = click.option("--flash", "flash_to", metavar="TARGET",
                           help="Then flash the bundle to TARGET, [user@]host[:port][:PATH] (see edgequee flash).")(wrapper)
    return _ssh_options(wrapper)


def _given_options(ctx: click.Context, skip: set[str]) -> list[str]:
    """The options given on this command line (not defaults), as arguments to repeat elsewhere."""
    from click.core import ParameterSource

    out: list[str] = []
    for p in ctx.command.params:
        if (not isinstance(p, click.Option) or p.name in skip or p.name is None
                or ctx.get_parameter_source(p.name) is not ParameterSource.COMMANDLINE):
            continue
        value, name = ctx.params[p.name], max(p.opts, key=len)
        if p.is_flag:
            out += [name] if value else [max(p.secondary_opts, key=len)] if p.secondary_opts else []
        else:
            for v in value if p.multiple else [value]:
                out += [name, str(v)]
    return out


def _remote_profile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """profile --remote TARGET: run the same profile on the device over ssh and pull the profile back here."""

    @functools.wraps(fn)
    def wrapper(*args: Any, remote: str | None, remote_python: str | None, ssh: Any, **kwargs: Any) -> None:
        if remote is None:
            return fn(*args, **kwargs)
        from .flash import profile_remote

        bundle, device = kwargs["bundle"], kwargs["device"]
        skip = {"bundle", "device", "json_out", "remote", "remote_python", "identity", "ssh_config", "ssh_option",
                "connect_timeout"}
        report = profile_remote(bundle, remote, device, _given_options(click.get_current_context(), skip),
                                python=remote_python, ssh=ssh)
        _emit(report, profile_table(report) + f"\npulled profiles/{device}.json from {remote} into {bundle}",
              kwargs["json_out"])

    wrapper = click.option("--remote-python", metavar="PATH",
                           help="With --remote: the device's Python with edgequee  [default: ROOT/venv/bin/python]")(wrapper)
    wrapper = click.option("--remote", metavar="TARGET",
                           help="Profile on this device over ssh (the bundle must be flashed there) and copy "
                                "profiles/DEVICE.json back into BUNDLE.")(wrapper)
    return _ssh_options(wrapper)


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
@click.option("--method", default="heads", show_default=True, type=click.Choice(["heads", "jei"]),
              help="heads: exit heads alone; jei: JEI-DNN heads + gates learned jointly (--head-epochs = warm-up).")
@click.option("--cost-from", metavar="BUNDLE", help="jei: a bundle of the same backbone; its cost model prices exits.")
@click.option("--device", help="jei: the device whose costs the gates trade against (profile or descriptor name).")
@click.option("--objective", default="latency", show_default=True, type=click.Choice(["latency", "energy"]))
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(PRECISIONS),
              help="jei: the precision the policy will run at (prices the exits).")
@click.option("--lam", default=0.5, show_default=True, type=float, help="jei: λ in argmin_l CE_l + λ·cost_l.")
@click.option("--jei-loss", default="weighted", show_default=True, type=click.Choice(["weighted", "unweighted"]),
              help="jei: heads' loss weighted by the exit probability (the paper) or not (the official code).")
@click.option("--jei-epochs", default=10, show_default=True, help="jei: epochs of the alternating gate/head phases.")
@json_option
@_errors
def train(model: str, data: str, out: str, pretrained: str | None, exits: str, head: str, head_epochs: int,
          finetune_epochs: int, lr: float | None, n_train: int | None, seed: int, method: str, cost_from: str | None,
          device: str | None, objective: str, precision: str, lam: float, jei_loss: str, jei_epochs: int,
          json_out: str | None) -> None:
    """Train exit heads (or JEI heads and gates) on a (frozen, or jointly fine-tuned) backbone; MODEL is a name or a
    checkpoint."""
    from converters.jobs import TrainJob, run_training

    job = TrainJob(model=model, data=data, out=Path(out), pretrained=pretrained, exits=exits, head=head,
                   head_epochs=head_epochs, finetune_epochs=finetune_epochs, lr=lr, n_train=n_train, seed=seed,
                   method=method, cost_from=cost_from, device=device, objective=objective, precision=precision,
                   lam=lam, jei_loss=jei_loss, jei_epochs=jei_epochs)
    with _progress("training") as cb:
        report = run_training(job, progress=cb)
    accs = " ".join(f"{a:.1%}" for a in report["test_exit_accuracy"]) if report.get("test_exit_accuracy") else "n/a"
    text = f"saved {out}\ntest accuracy per exit: {accs}"
    if "jei" in report:
        v = report["jei"]["val"]
        text += (f"\njei gates (λ={lam:g}, {jei_loss}): validation accuracy {v['accuracy']:.1%} at "
                 f"{v['mean_cost']:.0%} of the full cost, ECE {v['ece']:.3f}, exits {v['exit_histogram']}")
    _emit(report, text, json_out)


@main.command()
@click.argument("model")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle directory to create.")
@click.option("--precisions", default="fp32,fp16,int8", show_default=True, callback=lambda c, p, v: _precisions(v))
@click.option("--calib", "calib", required=True, help="Real images for int8 calibration and parity (.npz/folder).")
@click.option("--calib-images", default=500, show_default=True, help="Calibration images (from the train split).")
@click.option("--parity-images", default=1000, show_default=True, help="Parity-check images (from the test split).")
@click.option("--pretrained", help="Backbone weights when MODEL is an architecture name.")
@click.option("--exits", default="stages", show_default=True, help="Exit placement when MODEL is a name.")
@click.option("--random-init", is_flag=True,
              help="MODEL is a name without --pretrained: convert random weights on purpose (else refused).")
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
@click.option("--edgetpu", is_flag=True,
              help="Also write one full-int8 model per block for a Coral, co-compiled with edgetpu_compiler if present.")
@json_option
@_errors
@_then_flash
def convert(model: str, out: str, precisions: tuple[str, ...], calib: str, calib_images: int, parity_images: int,
            pretrained: str | None, exits: str, random_init: bool, force: bool, edgetpu: bool,
            json_out: str | None) -> None:
    """Convert MODEL (checkpoint .pt or architecture name) into a bundle of per-block TFLite graphs."""
    from converters.jobs import convert_job

    with _progress("converting") as cb:
        bundle = convert_job(model, Path(out), calib, precisions=precisions, n_calib=calib_images,
                             n_parity=parity_images, pretrained=pretrained, exits=exits, random_init=random_init,
                             overwrite=force, edgetpu=edgetpu, progress=cb)
    tpu = bundle.manifest.conversion.get("edgetpu")
    if tpu is not None and not tpu["compiled"]:
        click.echo(f"warning: Edge TPU models left uncompiled: {tpu['why']}", err=True)
    _emit(bundle.manifest.to_json(), inspect_text(bundle), json_out)


@main.command()
@click.option("--out", default="edgequee-quickstart", show_default=True, type=click.Path(file_okay=False))
@threads_option
@json_option
@_errors
def quickstart(out: str, threads: int, json_out: str | None) -> None:
    """The shipped ResNet-20 with exits, end to end on shipped CIFAR-10 images: convert → profile → calibrate
    (auto: the cheapest certified policy on this machine) → bench against the best whole model."""
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
    report = {**b.manifest.to_json(), "manifest_sha256": b.manifest_sha256, "verified": b.verified}
    stored = b.policy()
    if stored is not None:
        report["stored_policy"] = stored.to_json()  # spec + certificate; manifest["policy"] names its files
    _emit(report, inspect_text(b), json_out)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--device", default="host", show_default=True,
              help="Name of the profile to write (a descriptor of that name, if any, feeds --meter modeled).")
@threads_option
@click.option("--delegate", default="xnnpack", show_default=True, type=click.Choice(["xnnpack", "none", "edgetpu"]),
              help="xnnpack; none for TFLite's builtin kernels; edgetpu runs int8 blocks on a Coral (the rest on "
                   "the CPU).")
@click.option("--meter", default="none", show_default=True,
              help="Energy meter: none | ina219[:bus=1,addr=0x40,shunt=0.1] | ina260[:bus=1,addr=0x40] | pi5-pmic | "
                   "rapl | csv:FILE | modeled[:idle=W,active=W].")
@click.option("--min-time", default=1.0, show_default=True, help="Minimum seconds of latency timing per graph.")
@click.option("--passes", default=3, show_default=True, type=click.IntRange(min=1),
              help="Interleaved timing passes over all graphs; each graph pools its passes within 5 % of its fastest.")
@click.option("--energy-time", default=5.0, show_default=True, help="Seconds of back-to-back invokes per graph under a meter.")
@click.option("--idle-time", default=10.0, show_default=True, help="Seconds of idle power measurement under a meter.")
@click.option("--no-transitions", is_flag=True, help="Skip timing the float/int8 hand-overs at block boundaries.")
@json_option
@_errors
@_remote_profile
def profile(bundle: str, device: str, threads: int, delegate: str, meter: str, min_time: float, passes: int,
            energy_time: float, idle_time: float, no_transitions: bool, json_out: str | None) -> None:
    """Measure every block × precision on this machine → BUNDLE/profiles/DEVICE.json."""
    from .devices import list_devices
    from .meters import open_meter
    from .profiler import profile_bundle

    b = load_bundle(bundle)
    desc = list_devices().get(device)
    power = (desc.idle_w.value, desc.active_w.value, str(desc.path)) if desc else None
    m = open_meter(meter, descriptor_power=power)
    with _progress("profiling") as cb:
        report = profile_bundle(b, device, num_threads=threads, delegate=delegate,
                                min_time_s=min_time, passes=passes, meter=m, energy_s=energy_time, idle_s=idle_time,
                                transitions=not no_transitions, progress=cb)
    _emit(report, profile_table(report) + f"\nwrote {b.profiles_dir / (device + '.json')}", json_out)


@main.group(invoke_without_command=True)
@json_option
@click.pass_context
@_errors
def devices(ctx: click.Context, json_out: str | None) -> None:
    """List device descriptors (device_profiles/ and $EDGEQUEE_DEVICE_PROFILES); see the subcommands."""
    if ctx.invoked_subcommand is not None:
        return
    from .devices import list_devices

    found = list_devices()
    _emit({n: d.to_json() for n, d in found.items()}, devices_table(found.values()), json_out)


@devices.command("show")
@click.argument("name")
@json_option
@_errors
def devices_show(name: str, json_out: str | None) -> None:
    """Every figure of one descriptor (NAME or a .json path), with its status and source."""
    from .devices import load_device

    d = load_device(name)
    _emit(d.to_json(), device_text(d), json_out)


@devices.command("calibrate")
@click.argument("base")
@click.option("--bundle", "bundles", multiple=True, required=True, type=click.Path(exists=True, file_okay=False),
              help="A bundle profiled on this device (repeatable: several bundles spread the block sizes).")
@click.option("--profile", "profile_name", default="host", show_default=True, help="Which BUNDLE/profiles/NAME.json.")
@click.option("--name", help="Name of the calibrated descriptor (default: the profile name).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Descriptor .json to write.")
@json_option
@_errors
def devices_calibrate(base: str, bundles: tuple[str, ...], profile_name: str, name: str | None, out: str,
                      json_out: str | None) -> None:
    """Fit BASE's throughput, overhead and transition cost to measured profiles; write a new descriptor."""
    from .cost import load_profile
    from .devices import calibrate_descriptor, load_device

    pairs = []
    for path in bundles:
        b = load_bundle(path, verify=False)
        prof = load_profile(b, profile_name)
        if prof is None:
            raise EdgequeeError(f"{path}: no profiles/{profile_name}.json; run edgequee profile {path} --device {profile_name}")
        pairs.append((b.manifest, prof))
    d = calibrate_descriptor(load_device(base), pairs, name=name or profile_name)
    write_json_atomic(Path(out), d.to_json())
    _emit(d.to_json(), device_text(d) + f"\nwrote {out}", json_out)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--device", "device_names", default="host", show_default=True,
              help="Comma-separated devices: a profile name in BUNDLE/profiles and/or a descriptor name.")
@click.option("--objective", default="latency", show_default=True, type=click.Choice(["latency", "energy", "weighted"]))
@click.option("--estimate-only", is_flag=True, help="Ignore measured profiles: price from the descriptors alone.")
@json_option
@_errors
def cost(bundle: str, device_names: str, objective: str, estimate_only: bool, json_out: str | None) -> None:
    """Price every block × precision of BUNDLE on each device (measured where profiled, else estimated)."""
    from .cost import CostModel

    b = load_bundle(bundle, verify=False)
    models = [CostModel.for_bundle(b, d.strip(), objective=objective, use_profile=not estimate_only)
              for d in device_names.split(",") if d.strip()]
    report = {cm.name: {"describe": cm.describe(), "blocks": cm.table(),
                        "whole_model": {p: dataclasses.asdict(cm.whole(p)) for p in cm.precisions()}}
              for cm in models}
    _emit(report, cost_table(models), json_out)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, help="Test data: .npz, image folder or torchvision:NAME.")
@click.option("--n-images", default=None, type=int, help="Use only the first N test images.")
@click.option("--latency-samples", default=500, show_default=True, type=click.IntRange(min=1), help="Images timed in the runtime loop per policy.")
@click.option("--precisions", default=None, callback=lambda c, p, v: _precisions(v) if v else None)
@click.option("--thresholds", default=None, help="Comma-separated max-softmax thresholds (inf = no early exit).")
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(min=1),
              help="Interleaved timing rounds over every policy and whole model; each point's median round is kept.")
@threads_option
@json_option
@click.option("--plot", type=click.Path(dir_okay=False), help="Write an accuracy–latency plot (PNG).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Write a self-contained HTML report (DIR/index.html): Pareto plots, exits, costs, certificate.")
@_errors
def bench(bundle: str, data: str, n_images: int | None, latency_samples: int, precisions: tuple[str, ...] | None,
          thresholds: str | None, rounds: int, threads: int, json_out: str | None, plot: str | None,
          report_dir: str | None) -> None:
    """Accuracy, measured latency and exit histogram of threshold policies vs the whole model."""
    from .bench import DEFAULT_THRESHOLDS, bench_bundle
    from .data import load_dataset
    from .errors import DataError
    from .policies import policy_from_bundle

    if n_images is not None and n_images < 1:
        raise DataError(f"--n-images must be at least 1, got {n_images}; omit it to use every test image")
    b = load_bundle(bundle)
    spec = b.manifest.input  # folders are resized and decoded to the model's input, labelled by its class names
    ds = load_dataset(data, (spec.height, spec.width), classes=b.manifest.classes,
                      channels=spec.channels).subset(n_test=n_images)
    ts = tuple(float(t) for t in thresholds.split(",")) if thresholds else DEFAULT_THRESHOLDS
    with _progress("benchmarking") as cb:
        report = bench_bundle(b, ds.x_test, ds.y_test, precisions=precisions, thresholds=ts, num_threads=threads,
                              latency_samples=latency_samples, rounds=rounds, progress=cb,
                              policy=policy_from_bundle(b))
    if plot:
        from .report import plot_bench

        plot_bench(report, Path(plot))
    if report_dir:
        from .html_report import write_html_report

        click.echo(f"wrote {write_html_report(report, b, Path(report_dir))}", err=True)
    _emit(report, bench_table(report), json_out)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--precision", default=None, type=click.Choice(PRECISIONS),
              help="Run a threshold policy at this precision  [default: the bundle's stored policy, else fp32]")
@click.option("--threshold", default=None, type=float,
              help="Max-softmax exit threshold  [default: the stored policy's, else inf = no early exit]")
@threads_option
@click.option("--edgetpu", "edgetpu", default=None, is_flag=False, flag_value="",
              help="Run int8 blocks on a Coral (optionally name it: --edgetpu usb:0); falls back to the CPU.")
@click.option("--require-certified", is_flag=True,
              help="Refuse to run unless the policy is the bundle's stored one with a valid, feasible certificate.")
@json_option
@_errors
def run(bundle: str, inputs: tuple[str, ...], precision: str | None, threshold: float | None, threads: int,
        edgetpu: str | None, require_certified: bool, json_out: str | None) -> None:
    """Classify images (files, folders or .npz) with the bundle, block by block."""
    from .runtime import EdgeRunner
    from .inputs import read_inputs

    b = load_bundle(bundle)
    policy = _threshold_policy(precision, threshold)
    given = policy is not None
    runner = EdgeRunner(b, policy, num_threads=threads, edgetpu=True if edgetpu == "" else (edgetpu or False))
    if (line := _certification(runner, given, require_certified)) is not None:
        click.echo(line, err=True)
    rows: list[dict[str, Any]] = []
    for item in read_inputs(inputs, b.manifest.input):  # a bad file is reported and skipped; exit code 1 at the end
        if item.image is None:
            click.echo(f"error: {item.error}", err=True)
            rows.append({"input": item.name, "error": item.error})
            continue
        r = runner.classify(item.image)
        rows.append({"input": item.name, "class_id": r.class_id, "class": b.manifest.classes[r.class_id],
                     "prob": float(r.probs[r.class_id]), "exit": r.exit_index,
                     "precision_path": list(r.precision_path), "latency_ms": r.latency_ms,
                     "prediction_set": None if r.prediction_set is None else
                     [b.manifest.classes[k] for k in r.prediction_set]})
    text = "\n".join(f"{r['input']}: {r['class']} ({r['prob']:.2f}) exit {r['exit']} "
                     f"[{'/'.join(r['precision_path'])}] {r['latency_ms']:.2f} ms"
                     + (f" set {{{', '.join(r['prediction_set'])}}}" if r["prediction_set"] is not None else "")
                     for r in rows if "error" not in r)
    _emit({"results": rows}, text, json_out)
    failed = [r["input"] for r in rows if "error" in r]
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(rows)} inputs could not be read ({', '.join(failed[:3])}"
                                   f"{', …' if len(failed) > 3 else ''}; reasons above): fix or remove them")


def _certification(runner: Any, given: bool, require: bool) -> str | None:
    """What certifies the policy ``runner`` runs, in a line for stderr (None for a policy given on the command
    line); with ``require`` an EdgequeeError unless it is the stored policy with a valid, feasible certificate."""
    cert, stored = runner.certificate, runner.stored_policy
    problem = stored.certificate_problem if stored is not None else None
    why = ("a policy given on the command line" if given else "the bundle stores no policy" if stored is None
           else problem or "no certificate" if cert is None else None if cert.feasible
           else "no setting passed its risk test")
    if require and why is not None:
        raise EdgequeeError(f"{runner.bundle.path}: the policy is not certified ({why}); run edgequee calibrate on it")
    if given or stored is None:
        return None
    return f"stored policy {runner.policy!r}, " + (f"NOT certified: {why}" if why else
                                                   f"certified {cert.risk} risk ≤ {cert.epsilon:g} ({cert.method})")


def _threshold_policy(precision: str | None, threshold: float | None) -> Any:
    """--precision/--threshold as a ThresholdPolicy, or None (the bundle's stored policy) when neither is given."""
    from .policies import ThresholdPolicy

    if precision is None and threshold is None:
        return None
    return ThresholdPolicy(precision or "fp32", math.inf if threshold is None else threshold)


@main.group()
def demo() -> None:
    """Demo apps on the device: the camera demo."""


@demo.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--source", default="picam", show_default=True,
              help="picam | v4l2:N | a video file | a folder of images.")
@click.option("--headless", is_flag=True, help="No window: write the annotated video and the log to --out.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder for annotated.mp4 (or frames/), frames.jsonl, summary.json.")
@click.option("--record", default="mp4", show_default=True, type=click.Choice(["mp4", "png"]),
              help="Annotated frames as an MP4 or as PNG files.")
@click.option("--precision", default=None, type=click.Choice(PRECISIONS),
              help="Run a threshold policy at this precision  [default: the bundle's stored policy, else fp32]")
@click.option("--threshold", default=None, type=float,
              help="Max-softmax exit threshold  [default: the stored policy's, else inf = no early exit]")
@threads_option
@click.option("--device", default="host", show_default=True,
              help="Cost model (BUNDLE/profiles/DEVICE.json, else its descriptor) that prices 'latency saved'.")
@click.option("--max-frames", type=click.IntRange(min=1), help="Stop after N frames.")
@click.option("--retries", default=3, show_default=True, type=click.IntRange(min=0),
              help="Reopen a lost camera this many times.")
@click.option("--backoff", default=0.5, show_default=True, type=click.FloatRange(min=0),
              help="Seconds before the first reopen (doubling).")
@click.option("--require-certified", is_flag=True,
              help="Refuse to run unless the policy is the bundle's stored one with a valid, feasible certificate.")
@json_option
@_errors
def camera(bundle: str, source: str, headless: bool, out: str | None, record: str, precision: str | None,
           threshold: float | None, threads: int, device: str, max_frames: int | None, retries: int, backoff: float,
           require_certified: bool, json_out: str | None) -> None:
    """Classify camera (or video, or image folder) frames with an overlay: exit, precision, latency, savings."""
    from .demo import open_source, run_demo, summary_text
    from .runtime import EdgeRunner

    if headless and not out:
        raise click.UsageError("--headless needs --out DIR (where the annotated video and the log go)")
    b = load_bundle(bundle)
    policy = _threshold_policy(precision, threshold)
    runner = EdgeRunner(b, policy, num_threads=threads)
    if (line := _certification(runner, policy is not None, require_certified)) is not None:
        click.echo(line, err=True)
    summary = run_demo(runner, open_source(source), out_dir=Path(out) if out else None, show=not headless,
                       record=record, max_frames=max_frames, retries=retries, backoff_s=backoff, device=device)
    _emit(summary, summary_text(summary), json_out)
    if summary["lost"]:
        raise click.ClickException(f"{summary['stopped']}; {summary['frames']} frame(s) logged")


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--data", help="Labelled calibration images: .npz (its test split), image folder or torchvision:NAME.")
@click.option("--unlabeled", help="Unlabeled images (folder or .npz) instead of --data: consistency risk against "
                                  "the full model's predictions.")
@click.option("--policy", "policy_name", default="auto", show_default=True,
              help="auto: the cheapest on --device of a max-softmax threshold at each precision and quee that passes "
                   "the risk test; or a registered policy with a scalar knob (threshold, quee, jei).")
@click.option("--precision", type=click.Choice(PRECISIONS), help="The threshold policy's precision  [default: fp32]")
@click.option("--risk", type=click.Choice(RISKS), help="gap needs labels  [default: gap; consistency with --unlabeled]")
@click.option("--on", "on", default="predictions", show_default=True, type=click.Choice(TARGETS),
              help="Risk on predictions (0/1) or on distributions (Brier).")
@click.option("--epsilon", type=float, help="ε: the largest tolerated risk (risk control; required unless quee's "
                                             "λ is chosen directly).")
@click.option("--delta", default=0.1, show_default=True, type=float,
              help="δ: the guarantee holds with probability ≥ 1−δ (ucb-hb, ucb-wsr, ltt).")
@click.option("--method", default="ucb-wsr", show_default=True, type=click.Choice([m for m in METHODS if m != "naive"]))
@click.option("--n-cal", type=click.IntRange(min=1), help="Use only the first N images.")
@click.option("--device", help="Device whose cost model prices the blocks (a profile in BUNDLE/profiles and/or a "
                                "descriptor)  [default: the only profile, else MACs]")
@click.option("--objective", default="latency", show_default=True, type=click.Choice(["latency", "energy", "weighted"]))
@click.option("--lam", type=click.FloatRange(min=0), help="quee: use this λ (no risk control, no certificate).")
@click.option("--target-accuracy", type=click.FloatRange(0, 1),
              help="quee: the cheapest λ reaching this accuracy on held-out calibration images (no risk control).")
@click.option("--budget-ms", type=click.FloatRange(min=0),
              help="quee: the most accurate λ within this mean latency on --device (no risk control).")
@click.option("--augment", type=click.IntRange(min=0),
              help="quee: label-preserving copies of each image its predictors are fitted on (mirror, then random "
                   "crop + mirror); 0 where a mirror changes the label  [default: 3]")
@click.option("--replace", is_flag=True,
              help="Store the result even when no setting passes and the bundle holds a certified policy.")
@threads_option
@json_option
@_errors
def calibrate(bundle: str, data: str | None, unlabeled: str | None, policy_name: str, precision: str | None,
              risk: str | None, on: str, epsilon: float | None, delta: float, method: str, n_cal: int | None,
              device: str | None, objective: str, lam: float | None, target_accuracy: float | None,
              budget_ms: float | None, augment: int | None, replace: bool, threads: int, json_out: str | None) -> None:
    """Tune the policy's exit knob so its risk (against the fp32 full model) stays ≤ ε; store the policy and its
    certificate in BUNDLE.

    auto (the default) stores the cheapest policy on --device that passes: a threshold at each precision worth running
    there, or quee, chosen on half of the images and certified on the other half. quee (learned, device-aware
    exit-or-precision gate) needs --data and --device; its predictors are fitted on half of the images and its λ
    chosen on the other half, by risk control (--epsilon) or directly (--lam, --target-accuracy or --budget-ms)."""
    import numpy as np

    from .calibrate import calibrate_bundle
    from .data import check_labels, load_dataset
    from .errors import DataError
    from .inputs import read_inputs
    from .report import calibrate_text

    if (data is None) == (unlabeled is None):
        raise DataError("give --data (labelled images) or --unlabeled (images only), exactly one of them")
    b = load_bundle(bundle)
    spec = b.manifest.input
    if data is not None:
        ds = load_dataset(data, (spec.height, spec.width), classes=b.manifest.classes,
                          channels=spec.channels).subset(n_test=n_cal)
        images, labels = ds.x_test, check_labels(ds.y_test, len(b.manifest.classes), data, b.manifest.classes)
    else:  # every image counts: a file that cannot be read stops calibration (Input.unwrap raises its DataError)
        from itertools import islice

        found = [item.unwrap() for item in islice(read_inputs([unlabeled], spec), n_cal)]
        if not found:
            raise DataError(f"{unlabeled}: no images found")
        images, labels = np.stack(found), None
    direct = [o for o, v in (("--lam", lam), ("--target-accuracy", target_accuracy), ("--budget-ms", budget_ms))
              if v is not None]
    if precision and policy_name in ("quee", "auto"):
        raise DataError(f"--precision is the threshold policy's; {policy_name} picks precisions from the device's "
                        "costs (for a fixed one: --policy threshold --precision P)")
    if augment is not None and policy_name not in ("quee", "auto"):
        raise DataError("--augment enlarges the data quee's predictors are fitted on; drop it for " + policy_name)
    if direct and (policy_name != "quee" or len(direct) > 1 or epsilon is not None):
        raise DataError(f"{', '.join(direct)}: choose quee's λ one way (only with --policy quee, without --epsilon)")
    if not direct and epsilon is None:
        raise DataError("give --epsilon (risk control)" + (", or --lam, --target-accuracy or --budget-ms"
                                                           if policy_name == "quee" else ""))
    if direct:
        from .quee import calibrate_quee

        if labels is None or device is None:
            raise DataError("quee needs labelled --data and a --device whose cost model prices its paths")
        with _progress("calibrating quee") as cb:
            report = calibrate_quee(b, images, labels, device=device, objective=objective, lam=lam,
                                    target_accuracy=target_accuracy, budget_ms=budget_ms, num_threads=threads,
                                    progress=cb, **({} if augment is None else {"augment": augment}))
        _emit(report, calibrate_text(report), json_out)
        return
    with _progress("calibrating") as cb:
        report = calibrate_bundle(
            b, images, labels, policy=policy_name, params={"precision": precision} if precision else None,
            risk=risk or ("gap" if labels is not None else "consistency"), on=on, epsilon=epsilon, delta=delta,
            method=method, device=device, objective=objective, augment=augment, replace=replace, num_threads=threads,
            progress=cb)
    _emit(report, calibrate_text(report), json_out)
    cert = report["policy"]["certificate"]
    if not cert["feasible"]:
        raise click.ClickException(
            f"no setting passed {cert['method']} at ε={cert['epsilon']:g} on {cert['n_cal']} images; "
            + (report["kept"] if report["kept"] else "stored the safest setting (no early exit), uncertified")
            + ": use more calibration images or a larger --epsilon")


# ------------------------------------------------------------------------------------------------- flash


@main.command()
@click.argument("args", nargs=-1, metavar="BUNDLE TARGET")
@click.option("--hosts", type=click.Path(exists=True, dir_okay=False),
              help="A file of targets, one per line ('#' comments): flash them all in parallel.")
@click.option("--rollback", "to_previous", is_flag=True,
              help="Switch current back to the previous bundle (verified first); give TARGET only.")
@click.option("--dry-run", is_flag=True, help="Show what would move and what is already on the device; change nothing.")
@click.option("--keep", default=3, show_default=True, type=click.IntRange(min=1),
              help="Bundles kept on the device, current included.")
@click.option("--install-runtime", is_flag=True,
              help="Also create or refresh ROOT/venv on the device with edgequee and --runtime-extras.")
@click.option("--wheels", type=click.Path(exists=True, file_okay=False),
              help="With --install-runtime, for offline devices: install only from these wheels (plus a wheel of "
                   "this edgequee), e.g. made with pip download --platform.")
@click.option("--runtime-extras", default="device", show_default=True,
              help="edgequee extras in the device venv, comma-separated ('' for none; device,camera for the demo).")
@click.option("--system-site-packages", is_flag=True,
              help="Let the device venv see the system's Python packages (e.g. apt's python3-picamera2).")
@click.option("--jobs", default=8, show_default=True, type=click.IntRange(min=1), help="Hosts at once with --hosts.")
@_ssh_options
@json_option
@_errors
def flash(args: tuple[str, ...], hosts: str | None, to_previous: bool, dry_run: bool, keep: int,
          install_runtime: bool, wheels: str | None, runtime_extras: str, system_site_packages: bool, jobs: int,
          ssh: Any, json_out: str | None) -> None:
    """Deploy BUNDLE to TARGET over ssh: verified on the device, switched atomically, with rollback.

    TARGET is [user@]host[:port][:PATH], the port 1-65535, PATH starting with / or ~ (default ~/edgequee). There
    the bundle goes to bundles/<model>@<hash>/ and ROOT/current points at it; run it with edgequee run ROOT/current ...
    ssh runs with your ~/.ssh/config, keys and known_hosts, in batch mode (key login, no prompts).
    """
    from .flash import Runtime, flash_hosts, flash_text, hosts_table, read_hosts, rollback, rollback_text, run_hosts

    want = (0 if hosts else 1) + (0 if to_previous else 1)
    if len(args) != want:
        raise click.UsageError("give " + " ".join((["BUNDLE"] if not to_previous else [])
                                                  + (["TARGET"] if not hosts else [])) + " (or --hosts FILE for TARGET)"
                               if want else "--rollback --hosts FILE takes no BUNDLE or TARGET")
    if wheels and not install_runtime:
        raise click.UsageError("--wheels goes with --install-runtime")
    runtime = Runtime(tuple(e.strip() for e in runtime_extras.split(",") if e.strip()),
                      Path(wheels) if wheels else None, system_site_packages) if install_runtime else None
    if hosts:
        targets = read_hosts(hosts)
        if to_previous:
            results = run_hosts(lambda t: rollback(t, dry_run=dry_run, ssh=ssh), targets, jobs)
        else:
            results = flash_hosts(args[0], targets, jobs=jobs, keep=keep, dry_run=dry_run, ssh=ssh, runtime=runtime)
        _emit({"hosts": results}, hosts_table(results), json_out)
        failed = [r["target"] for r in results if not r["ok"]]
        if failed:
            raise click.ClickException(f"{len(failed)} of {len(results)} hosts failed: {', '.join(failed)}")
    elif to_previous:
        report = rollback(args[0], dry_run=dry_run, ssh=ssh)
        _emit(report, rollback_text(report), json_out)
    else:
        report = _flash_report(args[0], args[1], keep=keep, dry_run=dry_run, ssh=ssh, runtime=runtime)
        _emit(report, flash_text(report), json_out)


if __name__ == "__main__":
    main()
