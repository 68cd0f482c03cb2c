"""edgequee calibrate: exit traces → per-knob losses and costs → a risk-controlled knob → policy + certificate.

Works for any registered policy with a scalar knob (``policies.KnobPolicy``). Traces are the real TFLite logits of
every exit (``EdgeRunner.all_exits``), one pass per precision the policy uses. The cost of a sample is the sum of
the per-block costs of the blocks it ran, from the device's cost model (``block_costs``: measured in
``BUNDLE/profiles/<device>.json`` where profiled, else estimated from the device descriptor; MACs without a
device). The full model — the reference of every risk — is the policy at its safe knob.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np

from . import __version__
from .bundle import Bundle, Certificate, StoredPolicy, write_policy
from .cost import CostModel
from .errors import BundleError, DataError, EdgequeeError
from .policies import KnobPolicy, ThresholdPolicy, Traces, from_stored, softmax, to_stored
from .progress import Progress
from .risk import loss_bound, sample_losses, scan
from .runtime import EdgeRunner

__all__ = ["compute_traces", "block_costs", "fingerprint", "KnobTable", "knob_table", "calibrate_bundle",
           "store_calibrated"]


def compute_traces(
    bundle: Bundle,
    images: np.ndarray,
    precisions: Sequence[str],
    *,
    num_threads: int = 1,
    chunk: int = 256,
    progress: Progress | None = None,
) -> Traces:
    """Every exit's logits for every image, each block at one precision, for each of ``precisions``."""
    runner = EdgeRunner(bundle, ThresholdPolicy(precisions[0]), num_threads=num_threads)  # not the stored gate
    steps = len(precisions) * -(-len(images) // chunk)
    out, done = {}, 0
    for p in precisions:
        parts = []
        for start in range(0, len(images), chunk):
            parts.append(runner.all_exits(images[start:start + chunk], [p] * bundle.manifest.num_exits))
            done += 1
            if progress:
                progress(done, steps, f"{p} traces")
        out[p] = np.concatenate(parts)
    return Traces(out)


def block_costs(bundle: Bundle, device: str | None = None, objective: str = "latency") -> tuple[str, dict[str, np.ndarray]]:
    """(what the cost is, {precision: cost of each block (L,)}) from ``device``'s cost model (``edgequee.cost``):
    measured where the bundle's profile has it, else estimated from the device descriptor. Without a device: the
    bundle's only profile, else MACs."""
    m = bundle.manifest
    if device is None:
        profiles = sorted(bundle.profiles_dir.glob("*.json")) if bundle.profiles_dir.is_dir() else []
        if len(profiles) != 1:
            macs = np.asarray([b.macs for b in m.blocks], np.float64)
            return "MACs", {p: macs for p in m.precisions}
        device = profiles[0].stem
    cm = CostModel.for_bundle(bundle, device, objective=objective)
    unit = {"latency": "ms", "energy": "mJ net of idle", "weighted": "normalised"}[objective]
    costs = {p: np.array([cm.value(cm.block(i, p)) for i in range(m.num_exits)]) for p in cm.precisions()}
    return f"{objective} on {device} ({unit}; {cm.describe()})", costs


def fingerprint(images: np.ndarray, labels: np.ndarray | None = None) -> str:
    """sha256 of the calibration images (and labels): shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for a in (images, labels):
        if a is not None:
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class KnobTable:
    """Per-sample losses and costs of a policy at each knob of its grid (safe end first): (K,), (K, N), (K, N)."""

    knobs: np.ndarray
    losses: np.ndarray
    costs: np.ndarray


def knob_table(
    policy: KnobPolicy,
    traces: Traces,
    block_cost: Mapping[str, np.ndarray],
    labels: np.ndarray | None,
    risk: str,
    on: str,
) -> KnobTable:
    """Evaluate ``policy`` at every knob of its grid on the traces; losses are relative to the safe knob's outputs."""
    missing = [p for p in policy.precisions if p not in block_cost]
    if missing:
        raise BundleError(f"no cost for precision {', '.join(missing)} (profile the bundle at it, or omit --device)")
    knobs = policy.knob_grid()
    full = softmax(policy.exits_for_knob(traces, knobs[0], block_cost).logits)
    losses, costs = [], []
    for k in knobs:
        d = policy.exits_for_knob(traces, k, block_cost)
        losses.append(sample_losses(softmax(d.logits), full, labels, risk, on))
        costs.append(d.cost)
    return KnobTable(knobs, np.stack(losses), np.stack(costs))


def calibrate_bundle(
    bundle: Bundle,
    images: np.ndarray,
    labels: np.ndarray | None,
    *,
    policy: str = "threshold",
    params: Mapping[str, Any] | None = None,
    risk: str = "gap",
    on: str = "predictions",
    epsilon: float,
    delta: float = 0.1,
    method: str = "ucb-wsr",
    device: str | None = None,
    objective: str = "latency",
    augment: int | None = None,
    num_threads: int = 1,
    write: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Calibrate ``policy``'s knob on ``images`` and (with ``write``) store policy + certificate in the bundle.

    When the bundle already stores a policy of that name (e.g. a trained gate), it is the starting point: its
    params and arrays are kept, ``params`` override them, and only the knob is tuned. A policy with a ``prepare``
    method (quee) computes its own traces and fits its predictors on part of the images; the knob is then
    calibrated, and the certificate computed, on the rest; ``augment`` (None: the policy's default) is the number
    of augmented copies of each image the gate is fitted on.
    Without labels only the consistency risk can be controlled (the full model's predictions are the reference).
    Returns a JSON-ready report: the selection, the certificate and the stored policy spec.
    """
    if labels is None and risk == "gap":
        raise DataError("the gap risk needs labels: calibrate unlabeled images with --risk consistency, "
                        "or pass labelled --data")
    if labels is not None and len(labels) != len(images):
        raise DataError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise DataError("no calibration images")
    current = bundle.policy()  # a stored policy of this name (e.g. a trained gate) is the starting point
    spec = current if current is not None and current.name == policy else StoredPolicy(policy, {})
    base = from_stored(dataclasses.replace(spec, params={**spec.params, **dict(params or {})}))
    if not isinstance(base, KnobPolicy):
        raise EdgequeeError(f"policy {policy!r} has no scalar knob to calibrate (it needs knob, safe_knob, "
                            "knob_grid, exits_for_knob and params)")
    cost_name, cost = block_costs(bundle, device, objective)
    prepare = getattr(base, "prepare", None)  # learned gates fitted here first (quee: path traces, predictors)
    if prepare is None and augment:
        raise DataError(f"augmented copies enlarge the data a learned gate is fitted on; {policy} fits nothing")
    if prepare is not None:  # the knob is then chosen on the images the gate was not fitted on
        extra = {} if augment is None else {"augment": augment}
        base, traces, images, labels = prepare(bundle, images, labels, device=device, objective=objective,
                                               num_threads=num_threads, progress=progress, **extra)
    else:
        traces = compute_traces(bundle, images, base.precisions, num_threads=num_threads, progress=progress)
    table = knob_table(base, traces, cost, labels, risk, on)
    sel = scan(table.knobs, table.losses, table.costs, epsilon=epsilon, delta=delta, method=method,
               bound=loss_bound(on))
    tuned = from_stored(dataclasses.replace(to_stored(base), params={**base.params(), base.knob: sel.knob}))
    refit = getattr(tuned, "with_conformal", None)  # conformal prediction sets (jei): q̂ for the exits at this knob
    if refit is not None and labels is not None:
        tuned = refit(traces, labels)
    data_fp = fingerprint(images, labels)
    certificate = Certificate(
        risk=risk, on=on, epsilon=sel.epsilon, delta=sel.delta, method=method, guarantee=sel.guarantee,
        n_cal=sel.n_cal, knob=base.knob, knob_value=tuned.params()[base.knob], empirical_risk=sel.empirical_risk,
        bound=sel.bound, expected_saving=sel.saving, cost=cost_name, feasible=sel.feasible,
        data_fingerprint=data_fp, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        edgequee_version=__version__,
    )
    calibration = {"data_fingerprint": data_fp, "n_cal": sel.n_cal, "labels": labels is not None,
                   "device": device, "objective": cost_name}
    stored = to_stored(tuned, calibration=calibration, certificate=certificate)
    selection = dataclasses.asdict(sel) | {"knob": certificate.knob_value, "grid_size": len(table.knobs)}
    return store_calibrated(bundle, stored, selection, write)


def store_calibrated(bundle: Bundle, stored: StoredPolicy, selection: dict[str, Any], write: bool) -> dict[str, Any]:
    """Write ``stored`` into the bundle (with ``write``) and return calibrate's JSON-ready report."""
    if write:
        bundle = write_policy(bundle, stored)
    return {
        "bundle": str(bundle.path),
        "written": write,
        "policy_file": bundle.manifest.policy.file if write and bundle.manifest.policy else None,
        "selection": selection,
        "policy": stored.to_json(),
    }
