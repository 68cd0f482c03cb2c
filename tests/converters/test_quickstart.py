"""The README's first command, end to end: the shipped model converted, profiled, calibrated and benchmarked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgequee.bundle import load_bundle


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path: Path, require: Any) -> None:
    require("torch")
    require("onnx2tf")
    from converters.quickstart import run_quickstart
    from edgequee.calibrate import FP32_REFERENCE
    from edgequee.report import quickstart_text

    seen = []
    report = run_quickstart(tmp_path / "qs", progress=lambda done, total, what: seen.append((done, total)))
    json.dumps(report)  # JSON-ready, as `quickstart --json` writes it
    assert seen[-1][0] == seen[-1][1]
    bundle = load_bundle(report["bundle"])
    stored = bundle.policy()
    assert stored is not None and stored.certificate is not None
    cert = stored.certificate
    assert (cert.risk, cert.epsilon, cert.delta, cert.method, cert.n_cal) == ("gap", 0.02, 0.1, "ucb-wsr", 500)
    assert cert.reference == FP32_REFERENCE and cert.compared["winner"] and cert.compared["n_select"] == 500
    assert (bundle.profiles_dir / "host.json").is_file()
    rows = report["bench"]["policies"]
    stored_rows = [r for r in rows if r["name"].endswith("(stored)")]
    assert len(stored_rows) == 1 and stored_rows[0]["certified"]
    assert report["bench"]["n_images"] == 1000
    # the verdict: the certified policy and the best whole model, both measured in the bench
    best, certified = report["best_whole"], report["certified"]
    assert best == report["bench"]["best_whole"] and set(best) >= {"precision", "accuracy", "latency_ms"}
    assert best["latency_ms"] == report["bench"]["whole_model"][best["precision"]]["latency_ms"]
    assert certified["policy"] == stored.name and certified["params"] == dict(stored.params)
    assert (certified["accuracy"], certified["latency_ms"]) == (stored_rows[0]["accuracy"],
                                                               stored_rows[0]["mean_latency_ms"])
    text = quickstart_text(report)
    assert "certificate: gap risk" in text and "(stored)" in text
    assert text.splitlines()[-1].startswith("certified policy: ") and f"({best['precision']})" in text
