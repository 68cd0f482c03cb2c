"""calibrate --policy auto: the cheapest policy on the device that passes the risk test, against the fp32 full model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgequee.bundle import load_bundle
from edgequee.calibrate import FP32_REFERENCE, calibrate_bundle, compute_traces, knob_table, reference_probs
from edgequee.cost import CostModel
from edgequee.policies import ThresholdPolicy, softmax
from edgequee.profiler import profile_bundle
from edgequee.quee import choose_precisions
from edgequee.risk import sample_losses


@pytest.fixture
def profiled(bundle_copy: Path) -> Path:
    profile_bundle(load_bundle(bundle_copy), "host", min_time_s=0.05, passes=1)
    return bundle_copy


@pytest.mark.slow
def test_auto_stores_the_cheapest_candidate_certified_on_untouched_images(profiled: Path, sample) -> None:
    x, y = sample.x_test[:1000], sample.y_test[:1000]
    report = calibrate_bundle(load_bundle(profiled), x, y, epsilon=0.05, device="host", augment=0)
    json.dumps(report)
    auto = report["selection"]["auto"]
    cm = CostModel.for_bundle(load_bundle(profiled), "host")
    names = [c["candidate"] for c in auto["candidates"]]
    assert names == [f"threshold {p}" for p in choose_precisions(cm)] + ["quee"]
    feasible = [c for c in auto["candidates"] if c.get("feasible")]
    assert feasible and auto["winner"] == min(feasible, key=lambda c: c["expected_cost"])["candidate"]
    assert auto["n_select"] == auto["n_certify"] == 500

    stored = load_bundle(profiled).policy()
    winner = next(c for c in auto["candidates"] if c["candidate"] == auto["winner"])
    assert stored is not None and stored.name == winner["policy"]
    cert = stored.certificate
    assert cert is not None and cert.reference == FP32_REFERENCE and cert.n_cal == 500
    assert json.loads(json.dumps(dict(cert.compared))) == json.loads(json.dumps(auto))  # what was compared
    assert cert.empirical_risk <= 0.05
    # certified on the half no choice saw: its fingerprint is of the other 500 images
    sel = report["selection"]
    assert sel["versus_best_whole"]["best_whole"]["precision"] in load_bundle(profiled).manifest.whole_model
    assert auto["certified_vs_best_whole"] == pytest.approx(sel["versus_best_whole"]["ratio"])


@pytest.mark.slow
def test_auto_without_labels_compares_thresholds_only(profiled: Path, sample) -> None:
    report = calibrate_bundle(load_bundle(profiled), sample.x_test[:400], None, risk="consistency", epsilon=0.1,
                              device="host", write=False)
    quee = next(c for c in report["selection"]["auto"]["candidates"] if c["candidate"] == "quee")
    assert "labels" in quee["skipped"]
    assert report["selection"]["versus_best_whole"] is None  # no labels: no accuracy to choose the whole model by


def test_auto_needs_a_device_and_data(bundle_copy: Path, sample) -> None:
    from edgequee.errors import DataError

    with pytest.raises(DataError, match="give --device"):
        calibrate_bundle(load_bundle(bundle_copy), sample.x_test[:40], sample.y_test[:40], epsilon=0.1)
    with pytest.raises(DataError, match="too few"):
        calibrate_bundle(load_bundle(bundle_copy), sample.x_test[:3], sample.y_test[:3], epsilon=0.1, device="rpi4")
    with pytest.raises(DataError, match="--policy threshold --precision"):
        calibrate_bundle(load_bundle(bundle_copy), sample.x_test[:40], sample.y_test[:40], epsilon=0.1,
                         device="rpi4", params={"precision": "int8"})


@pytest.mark.slow
def test_reduced_precision_is_judged_against_the_fp32_full_model(bundle_copy: Path, sample) -> None:
    """An int8 threshold's safe end (int8, no early exit) carries int8's own disagreement with fp32 as risk."""
    bundle = load_bundle(bundle_copy)
    x, y = sample.x_test[:300], sample.y_test[:300]
    traces = compute_traces(bundle, x, ["int8", "fp32"])
    ref = reference_probs(traces)
    assert ref is not None
    table = knob_table(ThresholdPolicy("int8"), traces, {p: np.ones(3) for p in ("int8", "fp32")}, y, "gap",
                       "predictions", ref)
    own = sample_losses(softmax(traces.logits["int8"][:, -1]), softmax(traces.logits["fp32"][:, -1]), y, "gap",
                        "predictions")
    np.testing.assert_array_equal(table.losses[0], own)
    report = calibrate_bundle(bundle, x, y, policy="threshold", params={"precision": "int8"}, epsilon=0.1,
                              write=False)
    assert report["policy"]["certificate"]["reference"] == FP32_REFERENCE
