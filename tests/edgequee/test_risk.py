"""Risk control: losses, bounds against independent computations, the scan, the guarantee on real traces,
policy storage in the bundle, the runtime's use of it, and the calibrate/inspect/run/bench commands."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from clirun import invoke, one_line_error

from edgequee import bundle as bundle_mod
from edgequee.bundle import Certificate, StoredPolicy, load_bundle, write_policy
from edgequee.calibrate import block_costs, compute_traces, knob_table
from edgequee.errors import BundleError, DataError
from edgequee.policies import ThresholdPolicy, Traces, from_stored, policy_from_bundle, to_stored
from edgequee.risk import hb_p_value, hb_ucb, loss_bound, sample_losses, scan, wsr_ucb
from edgequee.runtime import EdgeRunner

SAMPLE_NPZ = Path(__file__).resolve().parents[2] / "converters" / "zoo" / "cifar10_sample.npz"

# ------------------------------------------------------------------------------------------------------ losses

PROBS = np.array([[0.7, 0.3], [0.2, 0.8]])
FULL = np.array([[0.4, 0.6], [0.1, 0.9]])
LABELS = np.array([0, 1])


@pytest.mark.parametrize("risk, on, expected", [
    ("gap", "predictions", [-1.0, 0.0]),  # early right where the full model is wrong; both right
    ("consistency", "predictions", [1.0, 0.0]),
    ("gap", "distributions", [0.18 - 0.72, 0.08 - 0.02]),  # ‖p − e_y‖² − ‖p_L − e_y‖²
    ("consistency", "distributions", [0.98 - 0.32, 0.08 - 0.02]),  # against e of the full model's prediction
])
def test_sample_losses_by_hand(risk: str, on: str, expected: list[float]) -> None:
    np.testing.assert_allclose(sample_losses(PROBS, FULL, LABELS, risk, on), expected, atol=1e-12)


def test_consistency_needs_no_labels_and_gap_does() -> None:
    np.testing.assert_array_equal(sample_losses(PROBS, FULL, None, "consistency", "predictions"), [1.0, 0.0])
    with pytest.raises(DataError, match="the gap risk needs labels"):
        sample_losses(PROBS, FULL, None, "gap", "predictions")
    assert loss_bound("predictions") == 1 and loss_bound("distributions") == 2


# ------------------------------------------------------------------------------------------------------ bounds


def _binom_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


@pytest.mark.parametrize("risk, n, alpha", [(0.0, 100, 0.05), (0.03, 100, 0.05), (0.12, 200, 0.1), (0.5, 50, 0.6)])
def test_hb_p_value_against_direct_formulas(risk: float, n: int, alpha: float) -> None:
    k = math.ceil(n * risk)
    assert hb_p_value(risk, n, alpha, binary=True) == pytest.approx(_binom_cdf(k, n, alpha), rel=1e-9)
    a = min(risk, alpha)
    h = (a * math.log(a / alpha) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - alpha))
    expected = min(math.exp(-n * h), math.e * _binom_cdf(k, n, alpha))
    assert hb_p_value(risk, n, alpha) == pytest.approx(expected, rel=1e-9)
    assert hb_p_value(0.0, 100, 0.05, binary=True) == pytest.approx(0.95**100, rel=1e-12)


def test_hb_ucb_inverts_the_p_value() -> None:
    x = np.zeros(200)
    x[:10] = 1  # R̂ = 0.05, binary
    u = hb_ucb(x, 0.1)
    assert hb_p_value(0.05, 200, u, binary=True) == pytest.approx(0.1, abs=1e-6)
    assert hb_p_value(0.05, 200, u + 1e-4, binary=True) < 0.1 <= hb_p_value(0.05, 200, u - 1e-4, binary=True)
    # all-zero losses: the binomial bound is 1 − δ^(1/n)
    assert hb_ucb(np.zeros(100), 0.1) == pytest.approx(1 - 0.1 ** (1 / 100), rel=1e-6)


def _wsr_by_grid(x: np.ndarray, delta: float) -> float:
    """WSR for [0, 1] losses written out step by step, and the bound found on a fine μ grid."""
    n = len(x)
    mu_hat, sigma2, nu = [], [0.25], []
    for t in range(1, n + 1):
        mu_hat.append((0.5 + x[:t].sum()) / (t + 1))
        sigma2.append((0.25 + sum((x[s] - mu_hat[s]) ** 2 for s in range(t))) / (t + 1))
    for t in range(n):
        nu.append(min(math.sqrt(2 * math.log(1 / delta) / (n * sigma2[t])), 1.0))
    for mu in np.arange(0.0, 1.0, 1e-4):
        wealth = np.cumsum([math.log(1 - nu[t] * (x[t] - mu)) for t in range(n)])
        if wealth.max() >= math.log(1 / delta):
            return float(mu)
    return 1.0


def test_wsr_ucb_against_a_step_by_step_version() -> None:
    rng = np.random.default_rng(1)
    x = (rng.random(120) < 0.15).astype(float)
    assert wsr_ucb(x, 0.1) == pytest.approx(_wsr_by_grid(x, 0.1), abs=2e-4)
    assert wsr_ucb(x, 0.1) > x.mean()
    assert wsr_ucb(np.ones(50), 0.1) == 1.0


def test_hb_ucb_coverage_exactly() -> None:
    """0/1 losses: P(UCB < p) summed over every possible count k of Binomial(300, p) is ≤ δ."""
    n, p = 300, 0.2
    miss = 0.0
    for k in range(n + 1):
        x = np.zeros(n)
        x[:k] = 1
        if hb_ucb(x, 0.1) < p:
            miss += math.comb(n, k) * p**k * (1 - p) ** (n - k)
    assert 0.05 < miss <= 0.1  # exact binomial inversion: close to δ, never above


@pytest.mark.parametrize("bound_fn, values, probs", [
    (wsr_ucb, (0.0, 1.0), (0.8, 0.2)),
    (wsr_ucb, (-1.0, 0.0, 1.0), (0.05, 0.8, 0.15)),
    (hb_ucb, (-1.0, 0.0, 1.0), (0.05, 0.8, 0.15)),
])
def test_ucb_covers_the_mean(bound_fn, values: tuple[float, ...], probs: tuple[float, ...]) -> None:
    """Simulated coverage, P(UCB < true mean) ≤ δ, for 0/1 and for signed (gap-like) losses."""
    rng = np.random.default_rng(0)
    mean = float(np.dot(values, probs))
    misses = [bound_fn(rng.choice(values, size=300, p=probs), 0.1) < mean for _ in range(500)]
    assert np.mean(misses) <= 0.1


# -------------------------------------------------------------------------------------------------------- scan

KNOBS = np.array([math.inf, 0.9, 0.8, 0.7, 0.6])


def _losses(risks: list[float], n: int = 1000) -> np.ndarray:
    """0/1 losses whose per-knob means are exactly ``risks``."""
    out = np.zeros((len(risks), n))
    for k, r in enumerate(risks):
        out[k, : round(r * n)] = 1
    return out


def test_scan_stops_before_the_first_failing_knob() -> None:
    losses = _losses([0.0, 0.01, 0.08, 0.02, 0.03])  # knob 2 fails; knobs 3, 4 would pass on their own
    costs = np.array([10.0, 8, 6, 4, 2])[:, None] * np.ones((1, 1000))
    sel = scan(KNOBS, losses, costs, epsilon=0.05, delta=0.1, method="naive", bound=1)
    assert (sel.index, sel.knob, sel.empirical_risk, sel.feasible) == (1, 0.9, 0.01, True)
    assert sel.saving == pytest.approx(0.2)


def test_scan_every_knob_passes() -> None:
    sel = scan(KNOBS, _losses([0.0] * 5), None, epsilon=0.05, delta=0.1, method="crc", bound=1)
    assert sel.index == 4 and sel.feasible and "most aggressive" in sel.message and sel.saving == 0.0


def test_crc_threshold_is_the_papers() -> None:
    """CRC passes iff (n/(n+1))·R̂ + B/(n+1) ≤ ε: n = 99, B = 1, ε = 0.05 → R̂ ≤ 0.04."""
    knobs = KNOBS[:3]
    for r, ok in ((0.04, True), (0.0505, False)):
        losses = np.zeros((3, 99))
        losses[1:, : round(r * 99)] = 1
        sel = scan(knobs, losses, None, epsilon=0.05, delta=0.1, method="crc", bound=1)
        assert sel.index == (2 if ok else 0)
        assert sel.bound == pytest.approx(99 / 100 * losses[sel.index].mean() + 1 / 100)


@pytest.mark.parametrize("method", ["crc", "ucb-hb", "ucb-wsr", "ltt"])
def test_no_feasible_knob_keeps_the_safest_setting(method: str) -> None:
    """With 20 samples no method can certify ε = 0.01, not even at the safe end: flag and message, no exception."""
    sel = scan(KNOBS, np.zeros((5, 20)), None, epsilon=0.01, delta=0.1, method=method, bound=1)
    assert sel.index == 0 and sel.knob == math.inf and not sel.feasible
    assert f"no setting passes {method} at ε=0.01" in sel.message and "keeping the safest setting" in sel.message


def test_ltt_is_more_conservative_than_ucb_on_signed_losses() -> None:
    """LTT tests clipped losses max(ℓ, 0); UCB-WSR credits the negative ones (early exits that fix mistakes)."""
    rng = np.random.default_rng(0)
    risks = np.linspace(0, 0.2, 21)
    losses = np.stack([rng.choice([-1.0, 0.0, 1.0], size=2000, p=[0.08, 1 - 0.08 - (0.08 + r), 0.08 + r])
                       for r in risks])
    losses[0] = 0
    knobs = np.arange(21.0)
    ltt = scan(knobs, losses, None, epsilon=0.05, delta=0.1, method="ltt", bound=1)
    ucb = scan(knobs, losses, None, epsilon=0.05, delta=0.1, method="ucb-wsr", bound=1)
    assert ucb.index > ltt.index >= 0


def test_scan_rejects_bad_arguments() -> None:
    with pytest.raises(DataError, match="unknown method"):
        scan(KNOBS, np.zeros((5, 3)), None, epsilon=0.1, delta=0.1, method="ucb", bound=1)
    with pytest.raises(DataError, match="losses must be"):
        scan(KNOBS, np.zeros((4, 3)), None, epsilon=0.1, delta=0.1, method="crc", bound=1)


# ------------------------------------------------------------------------ the guarantee on the sample's traces


@pytest.fixture(scope="module")
def sample_traces(converted, sample) -> Traces:
    from edgequee.bundle import load_bundle as load

    return compute_traces(load(converted.path), sample.x_test, ["fp32"])


@pytest.mark.slow
def test_guarantee_on_real_traces(converted, sample, sample_traces: Traces) -> None:
    """300 random 500/500 splits of the 1000 shipped test images, gap risk on predictions, ε = 0.05, δ = 0.1.

    CRC: mean test risk ≤ ε. UCB-HB, UCB-WSR, LTT: the share of splits whose chosen knob has risk > ε on the pool
    (the distribution the calibration half is drawn from) is ≤ δ. Naive calibration violates far more often,
    so the check can fail; and the certified settings do exit early (saving > 0).
    """
    bundle = load_bundle(converted.path)
    _, cost = block_costs(bundle)
    table = knob_table(ThresholdPolicy("fp32"), sample_traces, cost, sample.y_test, "gap", "predictions")
    pool_risk = table.losses.mean(1)
    eps, delta = 0.05, 0.1
    rng = np.random.default_rng(0)
    test_risk: dict[str, list[float]] = {m: [] for m in ("naive", "crc", "ucb-hb", "ucb-wsr", "ltt")}
    violated = {m: 0 for m in test_risk}
    saving = {m: [] for m in test_risk}
    splits = 300
    for _ in range(splits):
        perm = rng.permutation(1000)
        cal, test = perm[:500], perm[500:]
        for m in test_risk:
            sel = scan(table.knobs, table.losses[:, cal], table.costs[:, cal], epsilon=eps, delta=delta, method=m,
                       bound=1)
            test_risk[m].append(table.losses[sel.index, test].mean())
            violated[m] += pool_risk[sel.index] > eps
            saving[m].append(sel.saving)
    assert np.mean(test_risk["crc"]) <= eps
    for m in ("ucb-hb", "ucb-wsr", "ltt"):
        assert violated[m] / splits <= delta, (m, violated[m])
    assert violated["naive"] / splits > 2 * delta
    assert all(np.mean(saving[m]) > 0.05 for m in saving), {m: np.mean(s) for m, s in saving.items()}


@pytest.mark.slow
def test_threshold_decisions_match_the_runtime(converted, sample, sample_traces: Traces) -> None:
    bundle = load_bundle(converted.path)
    _, cost = block_costs(bundle)
    policy = ThresholdPolicy("fp32", 0.8)
    d = policy.exits_for_knob(sample_traces, 0.8, cost)
    runner = EdgeRunner(bundle, policy)
    got = [runner.classify(im) for im in sample.x_test[:100]]
    assert [r.exit_index for r in got] == d.exit[:100].tolist()
    assert [r.class_id for r in got] == d.logits[:100].argmax(1).tolist()
    np.testing.assert_allclose(d.cost, np.cumsum(cost["fp32"])[d.exit])


# ------------------------------------------------------------------------------------------- policy storage


def _certificate(**kw) -> Certificate:
    base = dict(risk="gap", on="predictions", epsilon=0.05, delta=0.1, method="ucb-wsr", guarantee="P(risk ≤ ε) ≥ 1−δ",
                n_cal=500, knob="threshold", knob_value=0.9, empirical_risk=0.02, bound=0.04, expected_saving=0.3,
                cost="MACs", feasible=True, data_fingerprint="sha256:00", created="2026-01-01T00:00:00+00:00",
                edgequee_version="0.1.0")
    return Certificate(**{**base, **kw})


@pytest.mark.slow
def test_policy_storage_round_trip_and_crash_safety(bundle_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_bundle(bundle_copy).policy() is None
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    first = StoredPolicy("threshold", {"precision": "fp32", "threshold": 0.9}, "threshold", {"n_cal": 500},
                         _certificate(), arrays).certified()  # the certificate bound to this policy
    b = write_policy(load_bundle(bundle_copy), first)
    got = b.policy()
    assert got == first and np.array_equal(got.arrays["w"], arrays["w"])
    first_files = set(b.manifest.policy.files())
    assert {p.split("/")[0] for p in first_files} == {"policy"} and all((bundle_copy / f).is_file() for f in first_files)

    # a crash between writing the new files and replacing the manifest: the old policy stays in force
    second = StoredPolicy("threshold", {"precision": "fp32", "threshold": 0.7}, "threshold", None, None)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_mod, "write_json_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        write_policy(load_bundle(bundle_copy), second)
    monkeypatch.undo()
    after_crash = load_bundle(bundle_copy)
    assert after_crash.policy() == first
    stale = {f"policy/{p.name}" for p in (bundle_copy / "policy").iterdir()} - first_files
    assert len(stale) == 1  # the new spec, unreferenced

    # the next update replaces the policy and removes stale files; the superseded policy stays one generation
    # (a reader may have read the old manifest a moment ago), and goes with the update after
    b = write_policy(after_crash, second)
    assert b.policy() == second and b.manifest.policy.arrays_file is None
    assert {f"policy/{p.name}" for p in (bundle_copy / "policy").iterdir()} == set(b.manifest.policy.files()) | first_files
    b = write_policy(b, second)
    assert {f"policy/{p.name}" for p in (bundle_copy / "policy").iterdir()} == set(b.manifest.policy.files())


def test_stored_policy_round_trip_without_a_bundle() -> None:
    policy = ThresholdPolicy("int8", 0.75)
    stored = to_stored(policy, certificate=_certificate())
    again = StoredPolicy.from_json(json.loads(json.dumps(stored.to_json())))
    assert again == stored and repr(from_stored(again)) == repr(policy)
    assert to_stored(ThresholdPolicy()).params == {"precision": "fp32", "threshold": None}  # inf: strict JSON
    with pytest.raises(BundleError, match="the stored policy 'future-gate' is not registered"):
        from_stored(StoredPolicy("future-gate", {}))


@pytest.mark.slow
def test_corrupt_or_missing_policy_file(bundle_copy: Path) -> None:
    b = write_policy(load_bundle(bundle_copy), StoredPolicy("threshold", {"precision": "fp32", "threshold": 0.9}))
    spec = bundle_copy / b.manifest.policy.file
    spec.write_text(spec.read_text().replace("0.9", "0.1"))
    with pytest.raises(BundleError, match=r"policy/policy-\w+\.json sha256 mismatch.*re-run edgequee calibrate"):
        load_bundle(bundle_copy)
    spec.write_text("{not json")
    with pytest.raises(BundleError, match="stored policy .* is unreadable .*re-run edgequee calibrate"):
        load_bundle(bundle_copy, verify=False).policy()
    spec.unlink()
    with pytest.raises(BundleError, match=r"policy/policy-\w+\.json is missing; re-run edgequee calibrate"):
        load_bundle(bundle_copy)


@pytest.mark.slow
def test_runner_uses_the_stored_policy_and_warns_without_certificate(bundle_copy: Path, sample) -> None:
    plain = ThresholdPolicy("int8", 0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert EdgeRunner(bundle_copy).certificate is None  # default: no early exit, nothing to certify
    b = write_policy(load_bundle(bundle_copy), to_stored(plain))
    assert repr(policy_from_bundle(b)) == repr(plain)
    with pytest.warns(UserWarning, match="has no risk certificate") as record:
        runner = EdgeRunner(b)
        runner.set_policy(ThresholdPolicy("fp32", 0.5))
    assert len(record) == 1  # once per runner
    assert repr(EdgeRunner(b, plain).policy) == repr(plain)

    b = write_policy(b, to_stored(plain, certificate=_certificate(knob_value=0.9)).certified())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner = EdgeRunner(b)
    assert repr(runner.policy) == repr(plain)
    assert dataclasses.replace(runner.certificate, policy_sha256=None) == _certificate(knob_value=0.9)
    assert runner.classify(sample.x_test[0]).precision_path[0] == "int8"


# ------------------------------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_calibrate_then_inspect_run_bench(bundle_copy: Path, tmp_path: Path, sample) -> None:
    out = tmp_path / "cal.json"
    result = invoke("calibrate", bundle_copy, "--data", SAMPLE_NPZ, "--n-cal", "1000", "--policy", "threshold",
                     "--epsilon", "0.05", "--method", "crc", "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    cert = report["policy"]["certificate"]
    assert cert["method"] == "crc" and cert["n_cal"] == 1000 and cert["feasible"] and cert["delta"] is None
    assert 0 < cert["expected_saving"] < 1 and cert["empirical_risk"] <= 0.05 and cert["cost"] == "MACs"
    assert "certificate: gap risk on predictions ≤ ε=0.05 by crc" in result.stdout
    assert f"wrote {report['policy_file']}" in result.stdout

    inspected = json.loads(invoke("inspect", bundle_copy, "--json", "-").stdout)
    assert inspected["stored_policy"]["certificate"] == cert
    assert inspected["policy"]["file"] == report["policy_file"]
    text = invoke("inspect", bundle_copy).stdout
    assert f"policy: threshold (precision=fp32, threshold={cert['knob_value']})" in text and "by crc" in text

    npz = tmp_path / "few.npz"
    np.savez(npz, x_test=sample.x_test[:4])
    ran = invoke("run", bundle_copy, npz, "--json", "-")
    assert ran.exit_code == 0, ran.output
    assert "stored policy ThresholdPolicy(precision='fp32'" in ran.stderr and "certified gap risk ≤ 0.05" in ran.stderr
    runner = EdgeRunner(bundle_copy)
    assert [r["exit"] for r in json.loads(ran.stdout)["results"]] == [
        runner.classify(im).exit_index for im in sample.x_test[:4]]

    bench = invoke("bench", bundle_copy, "--data", SAMPLE_NPZ, "--n-images", "20", "--latency-samples", "3",
                    "--precisions", "fp32", "--thresholds", "inf", "--json", "-")
    assert bench.exit_code == 0, bench.output
    rows = json.loads(bench.stdout)["policies"]
    assert [r["name"] for r in rows] == ["threshold", "threshold (stored)"] and rows[1]["certified"]


@pytest.mark.slow
def test_calibrate_unlabeled(bundle_copy: Path, tmp_path: Path, sample) -> None:
    npz = tmp_path / "frames.npz"
    np.savez(npz, x_test=sample.x_test[:300])
    assert "the gap risk needs labels" in one_line_error(
        invoke("calibrate", bundle_copy, "--unlabeled", npz, "--risk", "gap", "--epsilon", "0.1"))
    assert "exactly one of them" in one_line_error(
        invoke("calibrate", bundle_copy, "--unlabeled", npz, "--data", SAMPLE_NPZ, "--epsilon", "0.1"))
    result = invoke("calibrate", bundle_copy, "--unlabeled", npz, "--epsilon", "0.1", "--method", "ucb-hb",
                     "--policy", "threshold", "--precision", "int8", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    cert = report["policy"]["certificate"]
    assert (cert["risk"], cert["method"], cert["n_cal"]) == ("consistency", "ucb-hb", 300)
    assert report["policy"]["calibration"]["labels"] is False
    assert report["policy"]["params"]["precision"] == "int8"


@pytest.mark.slow
def test_calibrate_infeasible_keeps_the_safest_setting(bundle_copy: Path) -> None:
    result = invoke("calibrate", bundle_copy, "--data", SAMPLE_NPZ, "--n-cal", "50", "--epsilon", "0.01",
                     "--method", "ltt", "--policy", "threshold")
    assert result.exit_code == 1, result.output  # stored, but the command says it certified nothing
    assert "keeping the safest setting" in result.stdout and "NO KNOB PASSED" in result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith("Error: no setting passed ltt at ε=0.01 on 50 images")
    stored = load_bundle(bundle_copy).policy()
    assert stored.params["threshold"] is None and stored.certificate and not stored.certificate.feasible
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert EdgeRunner(bundle_copy).policy.threshold == math.inf
