"""Latency measurement, device profiles and the accuracy–latency benchmark."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from edgequee.bench import best_whole, bench_bundle, exits_for_threshold, measure_interleaved
from edgequee.bundle import load_bundle
from edgequee.errors import DataError, InternalError
from edgequee.policies import ThresholdPolicy
from edgequee.runtime import EdgeRunner
from edgequee.profiler import PROFILE_FORMAT, measure_latency, profile_bundle, undisturbed_passes


def test_measure_latency_trivial_callable() -> None:
    calls = []
    stats = measure_latency(lambda: calls.append(1), warmup_s=0.01, min_time_s=0.05, max_time_s=1.0)
    assert stats.source == "measured"
    assert stats.n >= 3 and stats.rounds >= 1 and len(calls) > stats.n  # warm-up calls are not counted
    assert 0 <= stats.p50_ms <= stats.p90_ms <= stats.p99_ms < 5.0


def test_measure_latency_reports_milliseconds() -> None:
    stats = measure_latency(lambda: time.sleep(0.002), warmup_s=0.01, min_time_s=0.1, max_time_s=0.5, rel_tol=1.0)
    assert 2.0 <= stats.p50_ms < 20.0 and 2.0 <= stats.mean_ms < 20.0
    assert stats.stable and stats.rounds >= 3  # rel_tol=1.0: stable once three rounds exist


def test_measure_latency_stops_at_max_time() -> None:
    t0 = time.perf_counter()
    stats = measure_latency(lambda: None, warmup_s=0.0, min_time_s=10.0, max_time_s=0.3)
    assert time.perf_counter() - t0 < 2.0 and stats.rounds <= 5


def test_exits_for_threshold() -> None:
    max_probs = np.array([[0.9, 0.95, 0.99], [0.3, 0.85, 0.9], [0.2, 0.3, 0.4], [0.1, 0.2, 0.95]])
    assert exits_for_threshold(max_probs, 0.8).tolist() == [0, 1, 2, 2]  # the last exit is always taken
    assert exits_for_threshold(max_probs, 0.0).tolist() == [0, 0, 0, 0]
    assert exits_for_threshold(max_probs, math.inf).tolist() == [2, 2, 2, 2]


def test_undisturbed_passes_are_those_near_the_fastest() -> None:
    rng = np.random.default_rng(0)
    medians = 0.4 * (1 + 0.01 * rng.standard_normal(16))  # sixteen passes of placement noise
    slow = [1, 4, 6, 7, 11, 12, 13, 15]  # outside load slowed half of them, 25-35 %
    medians[slow] *= rng.uniform(1.25, 1.35, len(slow))
    kept = undisturbed_passes(medians)
    assert kept == [k for k in range(16) if k not in slow]
    assert undisturbed_passes([0.3]) == [0]
    assert undisturbed_passes([0.3, 0.31, 0.5]) == [0, 1]  # within 5 % of the fastest, not of the median


def test_latency_pools_each_graphs_undisturbed_passes() -> None:
    from edgequee.profiler import _latency_entries

    def one_pass(ms: float) -> tuple[list[float], int, bool]:
        return [ms * 1e-3] * 5, 1, True

    slow = {0: {1, 4}, 1: {2, 3, 5}, 2: set()}  # spells of outside load, different for every graph
    timed = [[one_pass(base * (1.3 if k in slow[g] else 1.0)) for k in range(6)]
             for g, base in enumerate((0.4, 2.0, 0.7))]
    timed[2][3] = one_pass(0.7 * 1.01)  # placement noise: kept
    entries = _latency_entries(timed)
    assert [e["passes_pooled"] for e in entries] == [[0, 2, 3, 5], [0, 1, 4], list(range(6))]
    assert [e["latency_ms"]["p50_ms"] for e in entries] == pytest.approx([0.4, 2.0, 0.7], rel=0.02)
    assert entries[1]["pass_p50_ms"] == pytest.approx([2.0, 2.0, 2.6, 2.6, 2.0, 2.6])


@pytest.mark.slow
def test_profile_bundle_writes_measured_profile(bundle_copy: Path) -> None:
    bundle = load_bundle(bundle_copy)
    seen = []
    profile = profile_bundle(bundle, "host", min_time_s=0.01, precisions=("int8",),
                             progress=lambda done, total, what: seen.append((done, total)))
    on_disk = json.loads((bundle_copy / "profiles" / "host.json").read_text())
    assert on_disk == json.loads(json.dumps(profile))
    assert profile["format"] == PROFILE_FORMAT and profile["device"] == "host"
    assert profile["energy"]["source"] == "not measured"
    m = bundle.manifest
    assert [(b["block"], b["precision"]) for b in profile["blocks"]] == [(i, "int8") for i in range(m.num_exits)]
    assert set(profile["whole_model"]) == set(m.whole_model)
    stats = [b["latency_ms"] for b in profile["blocks"]] + [w["latency_ms"] for w in profile["whole_model"].values()]
    for s in stats:
        assert s["source"] == "measured" and 0 < s["p50_ms"] <= s["p99_ms"] and s["n"] > 0
    assert [b["macs"] for b in profile["blocks"]] == [b.macs for b in m.blocks]
    assert seen[-1][0] == seen[-1][1] >= 3 * len(stats)  # three interleaved passes of graphs and runtime loop
    assert profile["passes"] == 3
    assert all(len(b["pass_p50_ms"]) == 3 and b["passes_pooled"] == undisturbed_passes(b["pass_p50_ms"])
               for b in profile["blocks"])
    gap = profile["runtime_overhead_ms"]["int8"]
    assert gap["value"] >= 0 and gap["loop_p50_ms"] > 0 and gap["source"].startswith("measured")
    assert len(gap["loop_pass_p50_ms"]) == 3 and gap["passes_pooled"] == undisturbed_passes(gap["loop_pass_p50_ms"])
    assert profile["transitions"] == []  # one precision: nothing to hand over between
    load_bundle(bundle_copy)  # profiles are not part of the verified content


@pytest.mark.slow
def test_bench_bundle_report(converted, sample) -> None:
    bundle = load_bundle(converted.path)
    n, thresholds = 30, (0.0, 0.5, math.inf)
    report = bench_bundle(bundle, sample.x_test[:n], sample.y_test[:n], thresholds=thresholds, latency_samples=4)
    json.dumps(report)  # JSON-ready
    assert report["n_images"] == n and report["latency_samples"] == 4
    num_exits = bundle.manifest.num_exits
    for p in ("fp32", "int8"):
        whole = report["whole_model"][p]
        assert 0 <= whole["accuracy"] <= 1 and whole["latency_ms"] > 0
        assert report["split_overhead"][p] > 0
    assert len(report["policies"]) == 3 * len(thresholds)
    for pol in report["policies"]:
        assert pol["name"] == "threshold" and pol["precision"] in ("fp32", "fp16", "int8")
        assert 0 <= pol["accuracy"] <= 1 and pol["mean_latency_ms"] > 0
        assert len(pol["exit_histogram"]) == num_exits and sum(pol["exit_histogram"]) == n
        if pol["threshold"] == 0.0:
            assert pol["exit_histogram"][0] == n
        if pol["threshold"] is None:  # inf: no early exit, the last exit's accuracy
            assert pol["exit_histogram"][-1] == n
            assert pol["accuracy"] == report["exit_accuracy"][pol["precision"]][-1]
    assert {pol["threshold"] for pol in report["policies"]} == {0.0, 0.5, None}
    # the yardstick: the best whole model measured in the same run, every policy as a ratio to it
    best = report["best_whole"]
    assert best == {**best_whole(report["whole_model"]), "rule": best["rule"]}
    for pol in report["policies"]:
        assert pol["latency_vs_best_whole"] == pytest.approx(pol["mean_latency_ms"] / best["latency_ms"])
    assert report["rounds"] == 3 and {"processor", "cpu_flags", "int8_class", "runtime"} <= set(report["machine"])


def test_best_whole_is_the_cheapest_within_half_a_point_of_fp32() -> None:
    whole = {"fp32": {"accuracy": 0.850, "latency_ms": 3.3}, "int8": {"accuracy": 0.846, "latency_ms": 0.8}}
    assert best_whole(whole)["precision"] == "int8"  # 0.4 pt below fp32: what a user would ship
    whole["int8"]["accuracy"] = 0.844
    assert best_whole(whole)["precision"] == "fp32"  # 0.6 pt below: int8 costs too much accuracy
    whole["int8"] = {"accuracy": 0.86, "latency_ms": 4.0}
    assert best_whole(whole)["precision"] == "fp32"  # more accurate but slower
    assert best_whole({"fp16": {"accuracy": 0.8, "latency_ms": 1.0}})["precision"] == "fp16"
    with pytest.raises(DataError, match="no whole-model"):
        best_whole({})


@pytest.mark.slow
def test_measure_interleaved_checks_the_runtime_answers(converted, sample) -> None:
    bundle = load_bundle(converted.path)
    images = sample.x_test[:5]
    policy = ThresholdPolicy("int8", 0.5)
    runner = EdgeRunner(bundle, policy)
    expected = np.array([(r.exit_index, r.class_id) for r in map(runner.classify, images)])
    seen: list[str] = []
    got = measure_interleaved(bundle, {"p": (policy, expected), "w": ("int8", None)}, images, rounds=2,
                              progress=seen.append)
    assert set(got) == {"p", "w"} and all(v > 0 for v in got.values())
    assert seen == ["p (round 1/2)", "w (round 1/2)", "p (round 2/2)", "w (round 2/2)"]
    wrong = expected.copy()
    wrong[0, 1] = (wrong[0, 1] + 1) % 10
    with pytest.raises(InternalError, match="disagree"):
        measure_interleaved(bundle, {"p": (policy, wrong)}, images, rounds=1)


@pytest.mark.slow
def test_bench_bundle_without_fp32_blocks(bundle_copy: Path, sample) -> None:
    """A bundle converted without fp32 blocks (edgequee convert --precisions fp16,int8) can be benchmarked."""
    path = bundle_copy / "manifest.json"
    data = json.loads(path.read_text())
    for block in data["blocks"]:
        del block["artifacts"]["fp32"]
    path.write_text(json.dumps(data))
    bundle = load_bundle(bundle_copy)
    assert bundle.manifest.precisions == ("fp16", "int8")
    report = bench_bundle(bundle, sample.x_test[:10], sample.y_test[:10], thresholds=(math.inf,), latency_samples=2)
    assert [p["precision"] for p in report["policies"]] == ["fp16", "int8"]
