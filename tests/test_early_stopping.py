"""ES-WMV and ES-EMV (early_stopping.py, SPEC §7): the running variances against the direct
formulas, the selected iterate and the patience rule on sequences with a known variance minimum,
float32 stability of the O(N) window update, and refused settings."""
import numpy as np
import pytest
import torch

from conftest import rand
from early_stopping import ExponentialVariance, WindowedVariance, make_detector


def direct_wmv(xs: np.ndarray, W: int) -> np.ndarray:
    """SPEC §7 as written: VAR_k = (1/W) Σ_{i=k−W+1..k} ‖x_i − x̄‖²/N, NaN for k < W (1-based k)."""
    K, N = xs.shape[0], xs[0].size
    out = np.full(K, np.nan)
    for k in range(W, K + 1):
        win = xs[k - W:k].reshape(W, -1)
        out[k - 1] = ((win - win.mean(0)) ** 2).sum() / (W * N)
    return out


def direct_emv(xs: np.ndarray, a: float) -> np.ndarray:
    """EMV_k as the closed-form weighted sums of SPEC §7's recursion (not the recursion itself):
    EMA_k = (1−a)^{k−1} x_1 + Σ_{j=2..k} a(1−a)^{k−j} x_j,
    EMV_k = Σ_{j=2..k} (1−a)^{k−j} a(1−a) ‖x_j − EMA_{j−1}‖² / N."""
    K = xs.shape[0]
    flat = xs.reshape(K, -1)
    N = flat.shape[1]
    emv = np.zeros(K)
    incr = np.zeros(K)
    for k in range(2, K + 1):
        w = np.array([(1 - a) ** (k - 2)] + [a * (1 - a) ** (k - 1 - j) for j in range(2, k)])
        ema_prev = w @ flat[:k - 1]
        incr[k - 1] = a * (1 - a) * ((flat[k - 1] - ema_prev) ** 2).sum() / N
        emv[k - 1] = sum((1 - a) ** (k - j) * incr[j - 1] for j in range(2, k + 1))
    return emv


def feed(det, xs):
    values, stops = [], []
    for x in xs:
        stops.append(det.update(x))
        values.append(np.nan if det.value is None else det.value)
    return np.array(values), stops


def test_wmv_matches_direct_formula_float64():
    """VAR_k from the O(N) sliding-window update equals SPEC §7's direct formula at every k of a
    random sequence (W = 7, 60 iterates, so the window wraps 7 times and the exact refresh runs).
    Reference: direct_wmv in float64.  Tolerance 1e-11 relative: both are float64 sums of ~10²
    terms of size 1; a wrong mean update or a dropped cross term is off by O(1)."""
    xs = rand(60, 2, 5, 4, seed=1) + 3.0
    values, _ = feed(WindowedVariance(window=7, patience=1000), xs)
    ref = direct_wmv(xs.numpy(), 7)
    assert np.isnan(values[:6]).all()
    np.testing.assert_allclose(values[6:], ref[6:], rtol=1e-11)


def test_wmv_float32_iterates_with_small_variance_stay_accurate():
    """Late DIP iterates: mean ≈ 0.5, per-entry spread 1e-3, so VAR ≈ 1e-6 ≈ 4e-6·‖x‖²/N.  Fed as
    float32 for 1500 iterations (W = 100), VAR_k matches the direct formula (float64, on the same
    float32 values) to 1e-4 relative at every k.  The raw-moment form Σ‖x‖² − W‖x̄‖² in float32
    would lose all digits here (its rounding, 6e-8·0.25, exceeds VAR itself); float64 accumulators
    plus the refresh every W keep the error at the float64 level of the differences."""
    xs = (0.5 + 1e-3 * rand(1500, 3, 8, 8, seed=2)).float()
    values, _ = feed(WindowedVariance(window=100, patience=10_000), xs)
    ref = direct_wmv(xs.double().numpy(), 100)
    np.testing.assert_allclose(values[99:], ref[99:], rtol=1e-4)


def test_emv_matches_direct_formula_and_bias_correction():
    """EMV_k from the detector's recursion equals the closed-form weighted sums (direct_emv) at
    every k, and the tracked value is EMV_k / (1 − (1−a)^{k−1}).  Also: with increments of constant
    size (x_k = EMA_{k−1} + r·v_k, ‖v_k‖ = 1) the corrected value is exactly constant,
    the steady state (1−a)r²/N of the recursion, which is what the correction is for.
    Tolerance 1e-10 relative: float64 sums of ≤ 40 terms."""
    a = 0.2
    xs = rand(40, 3, 4, seed=3)
    det = ExponentialVariance(alpha=a, patience=1000)
    emvs, values = [], []
    for x in xs:
        det.update(x)
        emvs.append(det.emv)
        values.append(np.nan if det.value is None else det.value)
    ref = direct_emv(xs.numpy(), a)
    np.testing.assert_allclose(emvs[1:], ref[1:], rtol=1e-10)
    k = np.arange(2, 41)
    np.testing.assert_allclose(values[1:], ref[1:] / (1 - (1 - a) ** (k - 1)), rtol=1e-10)
    assert np.isnan(values[0])

    steady = ExponentialVariance(alpha=a, patience=1000)
    ema, r = rand(5, seed=4), 0.3
    steady.update(ema)
    for k in range(2, 30):
        v = rand(5, seed=100 + k)
        x = ema + r * v / v.norm()
        steady.update(x)
        assert steady.value == pytest.approx((1 - a) * r**2 / 5, rel=1e-12)
        ema = (1 - a) * ema + a * x


def sequence_with_flat_block(k0: int, length: int, total: int) -> torch.Tensor:
    """x_k = c + s_k (−1)^k u: oscillations whose amplitude s_k shrinks linearly until the block
    x_{k0−length+1} = … = x_{k0} = c (s = 0) and grows again after it."""
    k = torch.arange(1, total + 1, dtype=torch.float64)
    s = torch.where(k <= k0 - length, 2 - k / k0, torch.where(k <= k0, 0.0, 1 + (k - k0) / 100))
    c, u = rand(2, 6, 6, seed=5), rand(2, 6, 6, seed=6)
    return c + (s * (-1) ** k)[:, None, None, None] * u


@pytest.mark.parametrize("kind", ["wmv", "emv"])
def test_known_minimum_detected_exactly_and_patience_respected(kind):
    """Oscillations shrinking to a block of W equal iterates ending at k0 = 150, growing after it:
    VAR_{k0} = 0 (ES-WMV) and the bias-corrected EMV decreases until k0 and jumps after it
    (ES-EMV), so the unique minimum is at k0 (checked: the tracked value decreases strictly up to
    k0 after EMV's start-up transient, which stays above it; for WMV also by the direct formula).  Then best() is (x_{k0}, k0), update returns False for
    every k < k0 + P and True from k0 + P on (P = 40) — a detector that counted patience from the
    first minimum, or stopped one late, fails."""
    W, P, k0 = 20, 40, 150
    xs = sequence_with_flat_block(k0, W, 260)
    det = make_detector(kind, window=W, patience=P, alpha=0.1)
    values, stops = feed(det, xs)
    start = W if kind == "wmv" else 40     # EMV oscillates with the EMA's transient at first
    assert (np.diff(values[start - 1:k0]) < 0).all()
    assert kind == "wmv" or np.nanmin(values[:start - 1]) > values[start - 1]
    x_star, k_star = det.best()
    assert k_star == k0
    assert torch.equal(x_star, xs[k0 - 1])
    first_stop = stops.index(True) + 1
    assert first_stop == k0 + P
    assert all(stops[first_stop - 1:])
    if kind == "wmv":
        assert np.nanargmin(direct_wmv(xs.numpy(), W)) + 1 == k0


def test_later_deeper_minimum_resets_patience_and_the_selection_is_final_after_the_stop():
    """Three flat blocks: a shallow one (spread 1e-3, VAR ≈ 1e-6) ending at 100, a deeper one
    (spread 1e-5) ending at 130 < 100 + P, and an exactly flat one (VAR = 0, the global minimum)
    ending at 250, after the stop.  The detector must not stop at 100 + P, must move k* to 130,
    stop exactly at 130 + P (P = 50, W = 10), and keep k* = 130 although the iterates fed after
    the stop reach a lower variance (a detector that kept tracking would report 250)."""
    W, P = 10, 50
    xs = rand(300, 4, 4, seed=6)
    xs[90:100] = xs[99] + 1e-3 * rand(10, 4, 4, seed=7)
    xs[120:130] = xs[129] + 1e-5 * rand(10, 4, 4, seed=8)
    xs[240:250] = xs[249]
    det = WindowedVariance(window=W, patience=P)
    values, stops = feed(det, xs)
    assert det.best()[1] == 130
    assert stops.index(True) + 1 == 130 + P
    assert np.nanargmin(values) + 1 == 250


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="wmv", window=1), "window"),
    (dict(kind="wmv", patience=0), "patience"),
    (dict(kind="emv", alpha=1.0), "strictly between"),
    (dict(kind="median"), "unknown early-stopping rule"),
])
def test_bad_settings_refused(kwargs, match):
    """Settings that make the detector meaningless are refused with a message naming them."""
    with pytest.raises(ValueError, match=match):
        make_detector(**kwargs)
