"""Risk control for any gate with a scalar knob (Fast yet Safe, arXiv 2405.20915). numpy only: runs on the device.

Losses are per sample and relative to the full model (the policy at the safe end of its knob):

============================  ===============================================  ==========  ===
risk / on                     loss                                             labels      B
============================  ===============================================  ==========  ===
gap / predictions             1[ŷ≠y] − 1[ŷ_L≠y]                                 needed      1
gap / distributions           ‖p̂−e_y‖² − ‖p̂_L−e_y‖²  (Brier)                    needed      2
consistency / predictions     1[ŷ≠ŷ_L]                                          not needed  1
consistency / distributions   ‖p̂−e_{ŷ_L}‖² − ‖p̂_L−e_{ŷ_L}‖²                     not needed  2
============================  ===============================================  ==========  ===

Knob grids are ordered from the safe end (never exit early, loss 0) to the aggressive end. Every method scans
from the safe end and stops before the first knob that fails its test, so a bumpy risk curve never lets it jump
past a failing knob:

- ``naive``: R̂ ≤ ε (no guarantee; the baseline).
- ``crc``: (n/(n+1))·R̂ + B/(n+1) ≤ ε (conformal risk control: E[R] ≤ ε over calibration draws).
- ``ucb-hb`` / ``ucb-wsr``: an upper confidence bound R⁺ < ε, so P(R ≤ ε) ≥ 1−δ. Hoeffding–Bentkus (Bates et al.)
  needs losses in [0, B]; signed losses ℓ = ℓ⁺ − ℓ⁻ are bounded as UCB_{δ/2}(ℓ⁺) − LCB_{δ/2}(ℓ⁻).
  Waudby-Smith–Ramdas' betting bound takes signed losses in [−B, B] directly.
- ``ltt``: Learn then Test, fixed-sequence testing of H_k: R(λ_k) > ε with Hoeffding–Bentkus p-values on the
  clipped losses max(ℓ, 0)/B (conservative for signed losses, as in the paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import DataError

__all__ = [
    "RISKS",
    "TARGETS",
    "METHODS",
    "loss_bound",
    "sample_losses",
    "hb_p_value",
    "hb_ucb",
    "wsr_ucb",
    "Selection",
    "scan",
]

RISKS = ("gap", "consistency")
TARGETS = ("predictions", "distributions")
METHODS = ("naive", "crc", "ucb-hb", "ucb-wsr", "ltt")
_GUARANTEE = {
    "naive": "none (empirical risk ≤ ε on the calibration set)",
    "crc": "E[risk] ≤ ε over calibration draws (conformal risk control)",
    "ucb-hb": "P(risk ≤ ε) ≥ 1−δ (Hoeffding–Bentkus upper confidence bound)",
    "ucb-wsr": "P(risk ≤ ε) ≥ 1−δ (Waudby-Smith–Ramdas upper confidence bound)",
    "ltt": "P(risk ≤ ε) ≥ 1−δ (Learn then Test, fixed-sequence Hoeffding–Bentkus tests)",
}


def loss_bound(on: str) -> float:
    """B: the losses lie in [−B, B] (1 for predictions, 2 for Brier distributions)."""
    _check_choice(on, TARGETS, "on")
    return 1.0 if on == "predictions" else 2.0


def sample_losses(
    probs: np.ndarray, full_probs: np.ndarray, labels: np.ndarray | None, risk: str, on: str
) -> np.ndarray:
    """Per-sample loss (N,) of outputs ``probs`` (N, C) against the full model's ``full_probs`` (N, C).

    ``labels`` (N,) are needed for the gap risk only; consistency uses the full model's predictions instead.
    """
    _check_choice(risk, RISKS, "risk")
    _check_choice(on, TARGETS, "on")
    if probs.shape != full_probs.shape or probs.ndim != 2:
        raise DataError(f"probs {probs.shape} and full_probs {full_probs.shape} must both be (N, C)")
    if risk == "gap":
        if labels is None:
            raise DataError("the gap risk needs labels; use --risk consistency for unlabeled data")
        target = np.asarray(labels)
        if target.shape != probs.shape[:1]:
            raise DataError(f"labels {target.shape} do not match {len(probs)} samples")
    else:
        target = full_probs.argmax(1)
    rows = np.arange(len(probs))
    if on == "predictions":
        wrong = probs.argmax(1) != target
        if risk == "consistency":
            return wrong.astype(np.float64)
        return wrong.astype(np.float64) - (full_probs.argmax(1) != target)
    p, q = probs.astype(np.float64), full_probs.astype(np.float64)
    # ‖p − e_t‖² = ‖p‖² − 2 p_t + 1
    brier_p = (p * p).sum(1) - 2 * p[rows, target] + 1
    brier_q = (q * q).sum(1) - 2 * q[rows, target] + 1
    return brier_p - brier_q


# ----------------------------------------------------------------------------------------------------- bounds


def _log_binom_pmf(a: int, b: int, n: int, p: float) -> np.ndarray:
    """log P(Binomial(n, p) = k) for k = a..b, by the ratio recurrence from k = a."""
    first = math.lgamma(n + 1) - math.lgamma(a + 1) - math.lgamma(n - a + 1) + a * math.log(p) + (n - a) * math.log1p(-p)
    k = np.arange(a, b, dtype=np.float64)
    steps = np.log((n - k) / (k + 1)) + (math.log(p) - math.log1p(-p))
    return first + np.concatenate([[0.0], np.cumsum(steps)])


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) ≤ k), summing the shorter tail in log space."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    if k <= n * p:
        return float(np.exp(_logsumexp(_log_binom_pmf(0, k, n, p))))
    return float(-np.expm1(_logsumexp(_log_binom_pmf(k + 1, n, n, p))))


def _logsumexp(v: np.ndarray) -> float:
    m = float(v.max())
    return m + math.log(float(np.exp(v - m).sum()))


def _kl_bernoulli(a: float, b: float) -> float:
    """h(a, b) = a log(a/b) + (1−a) log((1−a)/(1−b)), with 0 log 0 = 0."""
    out = 0.0
    if a > 0:
        out += a * math.log(a / b)
    if a < 1:
        out += (1 - a) * math.log((1 - a) / (1 - b))
    return out


def hb_p_value(risk: float, n: int, alpha: float, binary: bool = False) -> float:
    """Hoeffding–Bentkus p-value of H0: E[loss] > alpha, from the mean ``risk`` of n losses in [0, 1].

    p = min(exp(−n·h(min(R̂, α), α)), e·P(Bin(n, α) ≤ ⌈nR̂⌉)); for 0/1 losses the exact binomial P(Bin(n, α) ≤ nR̂).
    """
    if not 0 < alpha < 1:
        return 1.0 if alpha <= 0 else 0.0
    k = math.ceil(n * risk - 1e-9)
    tail = _binom_cdf(k, n, alpha)
    if binary:
        return tail
    hoeffding = math.exp(-n * _kl_bernoulli(min(max(risk, 0.0), alpha), alpha))
    return min(hoeffding, math.e * tail, 1.0)


def _hb_ucb01(x: np.ndarray, delta: float) -> float:
    """Upper confidence bound on the mean of losses in [0, 1]: the largest α whose HB p-value is ≥ δ."""
    n, r = len(x), float(x.mean())
    binary = bool(np.all((x == 0) | (x == 1)))
    if hb_p_value(r, n, 1 - 1e-12, binary) >= delta:
        return 1.0
    lo, hi = r, 1.0
    for _ in range(40):  # p-value falls as α rises above R̂
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if hb_p_value(r, n, mid, binary) >= delta else (lo, mid)
    return hi


def hb_ucb(losses: np.ndarray, delta: float, bound: float = 1.0) -> float:
    """Hoeffding–Bentkus UCB (level 1−δ) on the mean of losses in [−bound, bound].

    Non-negative losses: HB on ℓ/B. Signed losses: UCB_{δ/2}(ℓ⁺) − LCB_{δ/2}(ℓ⁻), each part in [0, B].
    """
    x = np.asarray(losses, np.float64) / bound
    _check_bounded(x, -1.0)
    if x.min() >= 0:
        return bound * _hb_ucb01(x, delta)
    upper = _hb_ucb01(np.maximum(x, 0), delta / 2)
    lower = 1 - _hb_ucb01(1 - np.maximum(-x, 0), delta / 2)
    return bound * (upper - lower)


def wsr_ucb(losses: np.ndarray, delta: float, bound: float = 1.0) -> float:
    """Waudby-Smith–Ramdas betting UCB (level 1−δ) on the mean of losses in [−bound, bound], floored at 0.

    μ̂_t = (½ + Σ_{s≤t} x_s)/(t+1), σ̂²_t = (¼ + Σ_{s≤t}(x_s − μ̂_s)²)/(t+1), ν_t = min(√(2 log(1/δ)/(n σ̂²_{t−1})), 1/B)
    with σ̂²_0 = ¼; the bound is the μ where max_t Σ_{s≤t} log(1 − ν_s(x_s − μ)) = log(1/δ).
    """
    x = np.asarray(losses, np.float64)
    _check_bounded(x / bound, -1.0)
    n = len(x)
    t = np.arange(1, n + 1)
    mu_hat = (0.5 + np.cumsum(x)) / (t + 1)
    sigma2 = np.empty(n)
    sigma2[0] = 0.25
    sigma2[1:] = ((0.25 + np.cumsum((x - mu_hat) ** 2)) / (t + 1))[:-1]
    nu = np.minimum(np.sqrt(2 * math.log(1 / delta) / (n * sigma2)), 1 / bound)
    threshold = math.log(1 / delta)

    def capital(mu: float) -> float:
        with np.errstate(divide="ignore"):  # log(0) = −inf: a bet that lost everything
            return float(np.cumsum(np.log1p(-nu * (x - mu))).max())

    lo, hi = 0.0, bound * (1 - 1e-9)
    if capital(hi) < threshold:
        return bound
    if capital(lo) >= threshold:
        return 0.0
    for _ in range(40):  # capital rises with μ
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if capital(mid) < threshold else (lo, mid)
    return hi


def _check_bounded(x: np.ndarray, lo: float) -> None:
    if x.size == 0:
        raise DataError("no calibration samples")
    if x.min() < lo - 1e-9 or x.max() > 1 + 1e-9:
        raise DataError(f"losses outside the declared bound: [{x.min():.3g}, {x.max():.3g}] (scaled by B)")


# ------------------------------------------------------------------------------------------------------ scan


@dataclass(frozen=True)
class Selection:
    """The knob a method picked: index into the grid, its calibration risk, bound and cost saving."""

    method: str
    epsilon: float
    delta: float | None  # None for naive and crc (no confidence level)
    index: int
    knob: float
    empirical_risk: float
    bound: float | None  # the statistic tested at the chosen knob (adjusted risk, UCB or p-value)
    saving: float  # 1 − mean cost at the knob ÷ mean cost at the safe end, on the calibration set
    n_cal: int
    feasible: bool
    message: str
    caution: str | None = None  # set when n_cal is too small for the certificate to mean much (sample_caution)

    @property
    def guarantee(self) -> str:
        return _GUARANTEE[self.method]


def scan(
    knobs: np.ndarray,
    losses: np.ndarray,
    costs: np.ndarray | None,
    *,
    epsilon: float,
    delta: float,
    method: str,
    bound: float,
) -> Selection:
    """Pick the most aggressive knob reachable from the safe end (index 0) with every knob on the way passing.

    ``losses`` and ``costs`` are (K, n): per-sample loss and cost at each of the K knobs (safe → aggressive).
    When even the safe end fails the test, the safe end is returned with ``feasible=False`` and a message.
    """
    _check_choice(method, METHODS, "method")
    losses = np.asarray(losses, np.float64)
    if losses.ndim != 2 or losses.shape[0] != len(knobs) or losses.shape[1] == 0:
        raise DataError(f"losses must be (K={len(knobs)}, n>0), got {losses.shape}")
    if not 0 < epsilon < bound:
        raise DataError(f"epsilon must be in (0, {bound:g}), got {epsilon}")
    if not 0 < delta < 1:
        raise DataError(f"delta must be in (0, 1), got {delta}")
    n = losses.shape[1]
    risks = losses.mean(1)
    test = _TESTS[method]
    chosen, stat = -1, None
    for k in range(len(knobs)):
        if k == 0 or not np.array_equal(losses[k], losses[k - 1]):  # neighbouring knobs often decide alike
            ok, s = test(losses[k], risks[k], epsilon, delta, bound)
        if not ok:
            break
        chosen, stat = k, s
    feasible = chosen >= 0
    if not feasible:
        _, stat = test(losses[0], risks[0], epsilon, delta, bound)
        message = (f"no setting passes {method} at ε={epsilon:g}" + ("" if method in ("naive", "crc") else f", δ={delta:g}")
                   + f" with n_cal={n} (statistic at the safe end {stat:.4g}); keeping the safest setting "
                   "(no early exit): use more calibration data or a larger ε")
    elif chosen == len(knobs) - 1:
        message = "every setting passes: the most aggressive one is certified"
    else:
        message = f"setting {chosen + 1} of {len(knobs)} from the safe end passes"
    k = max(chosen, 0)
    saving = 0.0
    if costs is not None:
        c = np.asarray(costs, np.float64)
        saving = float(1 - c[k].mean() / c[0].mean())
    return Selection(method, float(epsilon), None if method in ("naive", "crc") else float(delta), k,
                     float(knobs[k]), float(risks[k]), None if stat is None else float(stat), saving, n,
                     feasible, message, sample_caution(n, epsilon, delta, method, bound))


MIN_ALLOWED_ERRORS = 10  # below n·ε/B of this, one image more or less decides what the certificate says


def sample_caution(n: int, epsilon: float, delta: float, method: str, bound: float = 1.0) -> str | None:
    """Why ``n`` calibration samples are too few for ``method`` at ε, or None.

    Too few when even zero observed losses fail the test (nothing can ever be certified), or when the data allow
    fewer than ``MIN_ALLOWED_ERRORS`` losses at ε (n·ε/B < 10): then the statistic rests on a handful of images;
    CRC with one image and ε = 0.9 certifies exiting everything at the first block."""
    test = _TESTS[method]
    need = math.ceil(MIN_ALLOWED_ERRORS * bound / epsilon)
    if not test(np.zeros(n), 0.0, epsilon, delta, bound)[0]:
        m = n
        while m < 10**7 and not test(np.zeros(m), 0.0, epsilon, delta, bound)[0]:
            m *= 2
        return (f"{method} cannot certify anything with {n} calibration images at ε={epsilon:g}: even zero errors "
                f"fail its test (it needs more than {m // 2}); use at least {max(need, m)} images or a larger ε")
    if n * epsilon / bound < MIN_ALLOWED_ERRORS:
        return (f"only {n} calibration images at ε={epsilon:g}: the certificate allows {n * epsilon / bound:.2g} "
                f"errors in all, so a single image decides it; use at least {need} images")
    return None


Test = Callable[[np.ndarray, float, float, float, float], "tuple[bool, float]"]


def _naive(x: np.ndarray, r: float, eps: float, delta: float, b: float) -> tuple[bool, float]:
    return r <= eps, r


def _crc(x: np.ndarray, r: float, eps: float, delta: float, b: float) -> tuple[bool, float]:
    n = len(x)
    adjusted = n / (n + 1) * r + b / (n + 1)
    return adjusted <= eps, adjusted


def _ucb_hb(x: np.ndarray, r: float, eps: float, delta: float, b: float) -> tuple[bool, float]:
    u = hb_ucb(x, delta, b)
    return u < eps, u


def _ucb_wsr(x: np.ndarray, r: float, eps: float, delta: float, b: float) -> tuple[bool, float]:
    u = wsr_ucb(x, delta, b)
    return u < eps, u


def _ltt(x: np.ndarray, r: float, eps: float, delta: float, b: float) -> tuple[bool, float]:
    clipped = np.maximum(x, 0) / b
    p = hb_p_value(float(clipped.mean()), len(x), eps / b, bool(np.all((clipped == 0) | (clipped == 1))))
    return p <= delta, p


_TESTS: dict[str, Test] = {"naive": _naive, "crc": _crc, "ucb-hb": _ucb_hb, "ucb-wsr": _ucb_wsr, "ltt": _ltt}


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise DataError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")
