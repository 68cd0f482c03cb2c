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
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np

from . import __version__
from .bundle import Bundle, Certificate, PolicyKept, StoredPolicy, write_policy
from .cost import CostModel
from .data import check_labels
from .errors import BundleError, DataError, EdgequeeError
from .policies import KnobPolicy, ThresholdPolicy, Traces, from_stored, softmax, to_stored
from .progress import Progress
from .risk import loss_bound, sample_losses, scan
from .runtime import EdgeRunner

__all__ = ["FP32_REFERENCE", "compute_traces", "reference_probs", "block_costs", "fingerprint", "KnobTable",
           "knob_table", "calibrate_bundle", "calibrate_auto", "store_calibrated"]

FP32_REFERENCE = "fp32 full model (every block at fp32, no early exit)"
SAFE_REFERENCE = "the policy at its safe knob (no early exit)"


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
    device = device or _only_profile(bundle)
    if device is None:
        macs = np.asarray([b.macs for b in m.blocks], np.float64)
        return "MACs", {p: macs for p in m.precisions}
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


def reference_probs(traces: Traces) -> np.ndarray | None:
    """The risk reference: the fp32 full model's outputs (every block at fp32, the last exit), when traced."""
    fp32 = traces.logits.get("fp32")
    return None if fp32 is None else softmax(fp32[:, -1])


def knob_table(
    policy: KnobPolicy,
    traces: Traces,
    block_cost: Mapping[str, np.ndarray],
    labels: np.ndarray | None,
    risk: str,
    on: str,
    reference: np.ndarray | None = None,
) -> KnobTable:
    """Evaluate ``policy`` at every knob of its grid on the traces; losses are relative to ``reference`` (the full
    model's probabilities; default: the policy's own safe knob). With the fp32 full model as reference, a reduced
    precision's own error counts against ε."""
    missing = [p for p in policy.precisions if p not in block_cost]
    if missing:
        raise BundleError(f"no cost for precision {', '.join(missing)} (profile the bundle at it, or omit --device)")
    knobs = policy.knob_grid()
    full = softmax(policy.exits_for_knob(traces, knobs[0], block_cost).logits) if reference is None else reference
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
    policy: str = "auto",
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
    replace: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Calibrate ``policy``'s knob on ``images`` and (with ``write``) store policy + certificate in the bundle.

    When the bundle already stores a policy of that name (e.g. a trained gate), it is the starting point: its
    params and arrays are kept, ``params`` override them, and only the knob is tuned. A policy with a ``prepare``
    method (quee) computes its own traces and fits its predictors on part of the images; the knob is then
    calibrated, and the certificate computed, on the rest; ``augment`` (None: the policy's default) is the number
    of augmented copies of each image the gate is fitted on.
    Without labels only the consistency risk can be controlled (the full model's predictions are the reference).
    A calibration where no setting passes does not replace a certified policy already in the bundle unless
    ``replace`` (the report then says ``kept``).
    Returns a JSON-ready report: the selection, the certificate and the stored policy spec.
    """
    labels = _check_calibration_data(bundle, images, labels, risk)
    if policy == "auto":
        if params:
            raise DataError("--policy auto chooses the policy and its precision itself; for a given one use "
                            "--policy threshold --precision P (or --policy quee)")
        return calibrate_auto(bundle, images, labels, risk=risk, on=on, epsilon=epsilon, delta=delta, method=method,
                              device=device, objective=objective, augment=augment, num_threads=num_threads,
                              write=write, replace=replace, progress=progress)
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
        with_reference = [*base.precisions, *(["fp32"] if "fp32" in bundle.manifest.precisions else [])]
        traces = compute_traces(bundle, images, list(dict.fromkeys(with_reference)), num_threads=num_threads,
                                progress=progress)
    reference = reference_probs(traces)
    table = knob_table(base, traces, cost, labels, risk, on, reference)
    sel = scan(table.knobs, table.losses, table.costs, epsilon=epsilon, delta=delta, method=method,
               bound=loss_bound(on))
    tuned = _with_knob(base, sel.knob)
    refit = getattr(tuned, "with_conformal", None)  # conformal prediction sets (jei): q̂ for the exits at this knob
    if refit is not None and labels is not None:
        tuned = refit(traces, labels)
    data_fp = fingerprint(images, labels)
    certificate = _certificate(sel, risk, on, method, tuned, cost_name, data_fp, reference is not None)
    calibration = {"data_fingerprint": data_fp, "n_cal": sel.n_cal, "labels": labels is not None,
                   "device": device, "objective": cost_name}
    stored = to_stored(tuned, calibration=calibration, certificate=certificate)
    versus = None
    if device is not None:
        latency_cm = CostModel.for_bundle(bundle, device, objective="latency")
        versus = versus_best_whole(bundle, latency_cm, images, labels,
                                   expected_latency_ms(tuned, traces, latency_cm), num_threads=num_threads)  # type: ignore[arg-type]
    selection = dataclasses.asdict(sel) | {"knob": certificate.knob_value, "grid_size": len(table.knobs),
                                           "versus_best_whole": versus}
    return store_calibrated(bundle, stored, selection, write, replace)


def _certificate(sel: Any, risk: str, on: str, method: str, tuned: KnobPolicy, cost_name: str, data_fp: str,
                 fp32_reference: bool, compared: Mapping[str, Any] | None = None) -> Certificate:
    """What the risk scan ``sel`` proved about ``tuned`` (a ``risk.Selection``), as stored with the policy."""
    return Certificate(
        risk=risk, on=on, epsilon=sel.epsilon, delta=sel.delta, method=method, guarantee=sel.guarantee,
        n_cal=sel.n_cal, knob=tuned.knob, knob_value=tuned.params()[tuned.knob], empirical_risk=sel.empirical_risk,
        bound=sel.bound, expected_saving=sel.saving, cost=cost_name, feasible=sel.feasible, data_fingerprint=data_fp,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), edgequee_version=__version__,
        reference=FP32_REFERENCE if fp32_reference else SAFE_REFERENCE, compared=compared,
    )


def _check_calibration_data(bundle: Bundle, images: np.ndarray, labels: np.ndarray | None,
                            risk: str) -> np.ndarray | None:
    """The labels as int64 class indices of the bundle's model (``data.check_labels``), after the checks every
    calibration needs: an out-of-range label would count as an error at every knob and certify nonsense."""
    if labels is None and risk == "gap":
        raise DataError("the gap risk needs labels: calibrate unlabeled images with --risk consistency, "
                        "or pass labelled --data")
    if labels is not None and len(labels) != len(images):
        raise DataError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise DataError("no calibration images")
    m = bundle.manifest
    return None if labels is None else check_labels(labels, len(m.classes), "calibration labels", m.classes)


def _subset(traces: Traces, rows: np.ndarray) -> Traces:
    return Traces({p: a[rows] for p, a in traces.logits.items()})


def _only_profile(bundle: Bundle) -> str | None:
    """The device of the bundle's only profile (None with none or several)."""
    profiles = sorted(bundle.profiles_dir.glob("*.json")) if bundle.profiles_dir.is_dir() else []
    return profiles[0].stem if len(profiles) == 1 else None


def _with_knob(policy: KnobPolicy, value: float) -> KnobPolicy:
    """``policy`` rebuilt with its knob at ``value`` (learned arrays kept)."""
    return from_stored(dataclasses.replace(to_stored(policy), params={**policy.params(), policy.knob: value}))  # type: ignore[return-value]


def expected_latency_ms(policy: KnobPolicy, traces: Traces, latency_cm: CostModel) -> float:
    """Mean latency per image of ``policy`` (at its knob) on ``traces``, priced by a latency cost model; quee's
    paths include their hand-overs."""
    from .quee import QueePolicy, cost_arrays, path_costs

    if isinstance(policy, QueePolicy):
        return float(path_costs(policy.simulate(traces), *cost_arrays(latency_cm, policy.precisions)).mean())
    n = latency_cm.manifest.num_exits
    lat = {p: np.array([latency_cm.block(i, p).latency_ms for i in range(n)]) for p in policy.precisions}
    return float(policy.exits_for_knob(traces, getattr(policy, policy.knob), lat).cost.mean())


def versus_best_whole(bundle: Bundle, latency_cm: CostModel, images: np.ndarray, labels: np.ndarray | None,
                      expected_ms: float, *, num_threads: int = 1) -> dict[str, Any] | None:
    """The best whole model on the cost model's device (``bench.best_whole``: accuracy on ``images``, latency
    priced) and a policy's expected latency as a ratio to it; warns when the policy is not faster. None without
    labels or whole models."""
    from .bench import best_whole
    from .runtime import WholeModelRunner

    have = [p for p in bundle.manifest.whole_model if p in latency_cm.precisions()]
    if labels is None or not have:
        return None
    whole = {}
    for p in have:
        logits = WholeModelRunner(bundle, p, num_threads=num_threads).logits(images)
        whole[p] = {"accuracy": float((logits.argmax(1) == labels).mean()), "latency_ms": latency_cm.whole(p).latency_ms}
    best = best_whole(whole)
    ratio = expected_ms / best["latency_ms"]
    out = {"best_whole": best, "whole_model": whole, "expected_latency_ms": expected_ms, "ratio": ratio,
           "device": latency_cm.name}
    if ratio >= 1:
        out["warning"] = (f"the calibrated policy is expected at {expected_ms:.4g} ms on {latency_cm.name}, "
                          f"{ratio:.2f} × the whole {best['precision']} model ({best['latency_ms']:.4g} ms, "
                          f"{100 * best['accuracy']:.2f} %): ship the whole model, or calibrate with --policy auto, "
                          "more data or a larger ε")
        warnings.warn(out["warning"], stacklevel=3)
    return out


def calibrate_auto(
    bundle: Bundle,
    images: np.ndarray,
    labels: np.ndarray | None,
    *,
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
    replace: bool = False,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The cheapest policy on ``device`` that passes the risk test: nothing about precision is fixed in advance.

    Candidates: a max-softmax threshold at every precision the device makes worth running (``quee.choose_precisions``:
    fp32, and each reduced precision whose whole network costs ≥ 5 % less there), and QuEE over its path class
    (with labels). The images are split at random in two halves. On the **selection** half each candidate's knob is
    chosen by the requested risk test (QuEE fits its predictors on half of that half and chooses λ on the rest)
    and its expected cost there is measured with the device's cost model; the cheapest feasible candidate wins.
    Only the winner is then calibrated on the **certification** half, which no choice has seen, so its certificate
    is exactly the method's guarantee (choosing among candidates on the certification data itself would need a
    union bound over them). The risk reference is the fp32 full model throughout, so a reduced precision's own
    error counts against ε. The certificate's ``compared`` records every candidate and the best whole model (the
    cheapest whole model within 0.5 pt of fp32, ``bench.best_whole``; accuracy on the selection half, latency from
    the cost model) and the certified policy's expected latency as a ratio to it; it warns when that is ≥ 1.
    """
    from .quee import QueePolicy, choose_precisions, cost_arrays, path_costs, trace_paths

    labels = _check_calibration_data(bundle, images, labels, risk)
    if len(images) < 4:
        raise DataError(f"--policy auto splits the calibration images into a selection and a certification half; "
                        f"{len(images)} are too few (give hundreds)")
    device = device or _only_profile(bundle)
    if device is None:
        raise DataError("--policy auto picks the cheapest certified policy on a device: give --device (a profile in "
                        "BUNDLE/profiles, made by edgequee profile, or a descriptor such as rpi4)")
    cm = CostModel.for_bundle(bundle, device, objective=objective)
    cost_name, cost = block_costs(bundle, device, objective)
    latency_cm = cm if objective == "latency" else CostModel.for_bundle(bundle, device, objective="latency")
    precisions = choose_precisions(cm)
    perm = np.random.default_rng(seed).permutation(len(images))
    half = len(images) // 2
    sel, cert = np.sort(perm[:half]), np.sort(perm[half:])
    lab = (lambda rows: None) if labels is None else (lambda rows: labels[rows])  # noqa: E731
    traced = list(dict.fromkeys([*precisions, *(["fp32"] if "fp32" in bundle.manifest.precisions else [])]))
    const = compute_traces(bundle, images, traced, num_threads=num_threads, progress=progress)
    sel_traces, cert_traces = _subset(const, sel), _subset(const, cert)

    def evaluate(pol: Any, traces: Traces, y: np.ndarray | None) -> tuple[Any, KnobTable]:
        table = knob_table(pol, traces, cost, y, risk, on, reference_probs(traces))
        return scan(table.knobs, table.losses, table.costs, epsilon=epsilon, delta=delta, method=method,
                    bound=loss_bound(on)), table

    candidates: list[dict[str, Any]] = []
    policies: dict[str, Any] = {}
    for p in precisions:
        pol = ThresholdPolicy(p)
        s, table = evaluate(pol, sel_traces, lab(sel))
        name = f"threshold {p}"
        policies[name] = pol
        candidates.append({"candidate": name, "policy": "threshold", "precisions": [p], "knob": s.knob,
                           "feasible": s.feasible, "n": s.n_cal, "empirical_risk": s.empirical_risk,
                           "expected_cost": float(table.costs[s.index].mean()),
                           "expected_latency_ms": expected_latency_ms(_with_knob(pol, s.knob), sel_traces,
                                                                      latency_cm)})
    if labels is None:
        candidates.append({"candidate": "quee", "policy": "quee", "skipped": "quee learns error probabilities "
                                                                            "from labels; none given"})
    else:
        try:
            extra = {} if augment is None else {"augment": augment}
            fitted, q_traces, _, q_labels = QueePolicy().prepare(bundle, images[sel], labels[sel], device=device,
                                                                 objective=objective, num_threads=num_threads,
                                                                 progress=progress, **extra)
            s, table = evaluate(fitted, q_traces, q_labels)
            at_knob = fitted.with_lam(s.knob)
            policies["quee"] = fitted
            candidates.append({"candidate": "quee", "policy": "quee", "precisions": list(fitted.precisions),
                               "knob": s.knob, "feasible": s.feasible, "n": s.n_cal,
                               "empirical_risk": s.empirical_risk,  # cost with hand-overs, as the choice needs
                               "expected_cost": float(path_costs(at_knob.simulate(q_traces),
                                                                 *cost_arrays(cm, fitted.precisions)).mean()),
                               "expected_latency_ms": expected_latency_ms(at_knob, q_traces, latency_cm)})
        except EdgequeeError as e:
            candidates.append({"candidate": "quee", "policy": "quee", "skipped": str(e)})
    feasible = [c for c in candidates if c.get("feasible")]
    pool = feasible or [c for c in candidates if "skipped" not in c][:1]  # the first: fp32 when the bundle has it
    winner = min(pool, key=lambda c: c["expected_cost"])
    message = (f"{winner['candidate']} is the cheapest of {len(feasible)} feasible candidate(s) on the selection "
               f"half ({winner['expected_latency_ms']:.4g} ms expected on {device})" if feasible else
               f"no candidate passes {method} at ε={epsilon:g} on the selection half: keeping the fp32 full model")

    # the winner, calibrated afresh on the certification half
    chosen = policies[winner["candidate"]]
    y_cert = lab(cert)
    if isinstance(chosen, QueePolicy):
        cert_traces = trace_paths(bundle, images[cert], chosen.precisions, num_threads=num_threads,
                                  progress=progress, label="certification path traces")
    s, table = evaluate(chosen, cert_traces, y_cert)
    tuned = _with_knob(chosen, s.knob)
    certified_ms = expected_latency_ms(tuned, cert_traces, latency_cm)
    versus = versus_best_whole(bundle, latency_cm, images[sel], lab(sel), certified_ms, num_threads=num_threads)
    compared = {"rule": "each candidate's knob by the risk test on the selection half, its expected cost there; "
                        "the cheapest feasible one is calibrated afresh on the certification half",
                "n_select": int(len(sel)), "n_certify": int(len(cert)), "device": device, "objective": cost_name,
                "candidates": candidates, "winner": winner["candidate"], "message": message,
                "certified_expected_latency_ms": certified_ms,
                "best_whole": None if versus is None else versus["best_whole"],
                "certified_vs_best_whole": None if versus is None else versus["ratio"]}
    data_fp = fingerprint(images[cert], y_cert)
    certificate = _certificate(s, risk, on, method, tuned, cost_name, data_fp,
                               reference_probs(cert_traces) is not None, compared)
    calibration = {"data_fingerprint": data_fp, "n_cal": s.n_cal, "labels": labels is not None, "device": device,
                   "objective": cost_name, "policy": "auto"}
    stored = to_stored(tuned, calibration=calibration, certificate=certificate)
    selection = dataclasses.asdict(s) | {"knob": certificate.knob_value, "grid_size": len(table.knobs),
                                         "auto": compared, "versus_best_whole": versus}
    return store_calibrated(bundle, stored, selection, write, replace)


def store_calibrated(bundle: Bundle, stored: StoredPolicy, selection: dict[str, Any], write: bool,
                     replace: bool = True) -> dict[str, Any]:
    """Write ``stored``, its certificate bound to it, into the bundle (with ``write``; an infeasible one over a
    certified one only with ``replace``) and return calibrate's JSON-ready report."""
    stored = stored.certified()
    kept = None
    if write:
        try:
            bundle = write_policy(bundle, stored, replace_certified=replace)
        except PolicyKept as e:
            kept, write = f"{e}: no setting passed this time; pass --replace to store the safe setting instead", False
    return {
        "bundle": str(bundle.path),
        "written": write,
        "kept": kept,
        "policy_file": bundle.manifest.policy.file if write and bundle.manifest.policy else None,
        "selection": selection,
        "policy": stored.to_json(),
    }
