"""early_stopping.py: properties that mutation testing found unchecked (tools/mutation_survivors.md).

References: the variances recomputed from their definitions (module docstring) on the stored
iterates in float64, at every iteration, across the window's periodic exact refresh."""
import math

import pytest
import torch
from conftest import rand

from early_stopping import ExponentialVariance, WindowedVariance, make_detector


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_windowed_variance_equals_its_definition_at_every_iteration(dtype):
    """``VAR_k = (1/W) Σ ‖x_i − x̄_k‖² / N`` over the last W = 3 iterates, undefined (None) for k < W,
    equal to the float64 recomputation from the iterates as fed (1e-12 relative; float32 iterates
    are accumulated in float64) for k = 3 … 14 (the window is refreshed every 3 replacements)."""
    det = WindowedVariance(window=3, patience=100)
    xs = [(1.0 + 0.1 * k) * rand(2, 3, 4, seed=k).to(dtype) for k in range(14)]
    for k, x in enumerate(xs, start=1):
        det.update(x)
        if k < 3:
            assert det.value is None
            continue
        w = torch.stack([v.double() for v in xs[k - 3:k]])
        ref = ((w - w.mean(0)) ** 2).sum().item() / (3 * x.numel())
        assert det.value == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exponential_variance_equals_its_bias_corrected_recursion(dtype):
    """ES-EMV with a = 0.3: ``EMA₁ = x₁``, ``EMV_{k+1} = (1−a)EMV_k + a(1−a)‖x_{k+1} − EMA_k‖²/N``,
    ``EMA_{k+1} = (1−a)EMA_k + a x_{k+1}``, tracked value ``EMV_k/(1 − (1−a)^{k−1})`` from k = 2 (None
    at k = 1); written out here in float64 (1e-12 relative)."""
    a = 0.3
    det = ExponentialVariance(alpha=a, patience=100)
    xs = [rand(5, seed=10 + k).to(dtype) for k in range(8)]
    ema, emv = None, 0.0
    for k, x in enumerate(xs, start=1):
        det.update(x)
        xd = x.double()
        if ema is None:
            ema = xd.clone()
            assert det.value is None
            continue
        emv = (1 - a) * emv + a * (1 - a) * ((xd - ema) ** 2).sum().item() / xd.numel()
        ema = (1 - a) * ema + a * xd
        assert det.value == pytest.approx(emv / (1 - (1 - a) ** (k - 1)), rel=1e-12)


def test_minimum_is_selected_and_patience_stops():
    """Iterates whose windowed variance falls then rises: ``best()`` is the newest iterate of the
    window with the smallest VAR (for W = 2, VAR = gap²/4), and ``update`` returns True exactly from
    ``k* + P`` on (P = 2)."""
    det = WindowedVariance(window=2, patience=2)
    steps = [0.0, 4.0, 6.0, 7.0, 7.5, 9.5, 13.5]         # gaps 4, 2, 1, 0.5, 2, 4: VAR ∝ gap²
    out = [det.update(torch.tensor([s])) for s in steps]
    x_best, k_best = det.best()
    assert k_best == 5 and x_best.item() == 7.5
    assert out == [False] * 6 + [True]
    assert det.min_value == pytest.approx(0.5 ** 2 / 4, rel=1e-12)     # VAR of {a, b} = (b − a)²/4


def test_to_moves_every_stored_tensor():
    """``to(device)`` moves the window, accumulators and x* (here to the 'meta' device, which keeps
    shapes only) and returns the detector itself."""
    det = WindowedVariance(window=2, patience=5)
    for k in range(3):
        det.update(rand(4, seed=k))
    assert det.to("meta") is det
    assert det.best()[0].device.type == "meta" and det._buf.device.type == "meta"
    assert det._mean.device.type == "meta"


def test_make_detector_builds_the_named_rule_with_its_settings():
    """``make_detector`` passes window/alpha and patience through; an unknown kind or bad setting
    is refused in one line naming it."""
    w = make_detector("wmv", window=5, patience=7)
    e = make_detector("emv", patience=3, alpha=0.25)
    assert isinstance(w, WindowedVariance) and (w.window, w.patience) == (5, 7)
    assert isinstance(e, ExponentialVariance) and (e.alpha, e.patience) == (0.25, 3)
    d, e = make_detector("wmv"), make_detector("emv")
    assert (d.window, d.patience) == (100, 1000) and (e.alpha, e.patience) == (0.1, 1000)
    assert WindowedVariance(3, 1).patience == 1                 # the smallest patience is 1
    with pytest.raises(ValueError, match="strictly between 0 and 1, got 0.0"):
        ExponentialVariance(0.0)
    with pytest.raises(ValueError, match="unknown early-stopping rule 'sgd'; use one of wmv, emv"):
        make_detector("sgd")
    with pytest.raises(ValueError, match="patience must be a positive integer, got 0"):
        WindowedVariance(3, 0)
    with pytest.raises(ValueError, match="window must be an integer ≥ 2, got 1"):
        WindowedVariance(1, 3)
    assert math.isinf(WindowedVariance(3, 3).min_value) and WindowedVariance(3, 3).best() == (None, None)
    assert WindowedVariance(3, 3).value is None and ExponentialVariance().value is None   # undefined before x₁


def test_ties_keep_the_earlier_iterate():
    """Equal variances: the selection keeps the first iterate that reached the minimum (W = 2, the
    gaps 2, 1, 1, 3 give VAR 1, ¼, ¼, 9/4: the minimum is reached at k = 3 and again at k = 4)."""
    det = WindowedVariance(window=2, patience=10)
    for s in (0.0, 2.0, 3.0, 4.0, 7.0):
        det.update(torch.tensor([s]))
    assert det.best()[1] == 3 and det.best()[0].item() == 3.0


def test_class_defaults_are_the_spec_values():
    """SPEC §7: ES-WMV defaults W = 100, P = 1000; ES-EMV a = 0.1 with the same patience.  The
    classes' own defaults (not only make_detector's) must be these values."""
    w, e = WindowedVariance(), ExponentialVariance()
    assert (w.window, w.patience) == (100, 1000)
    assert (e.alpha, e.patience) == (0.1, 1000)


def _drifting_iterates(n, shape, spike_every):
    """float32 iterates ``c + 1e-3·noise`` (per-entry variance ~1e-6) with a spike of height 1e3
    at every ``spike_every``-th iterate: when a spike leaves the window, M₂ falls from ~1e6·N to
    ~1e-6·W·N, so the O(N) update loses ~ε₆₄·1e6·N, i.e. ~1e-3 relative (module docstring)."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(shape, generator=g)
    for k in range(1, n + 1):
        x = base + 1e-3 * torch.randn(shape, generator=g)
        if k % spike_every == 0:
            x = x + 1e3
        yield x.to(torch.float32)


def test_windowed_variance_refresh_cancels_drift_over_ten_thousand_float32_iterates():
    """Exact refresh every W replacements: after each completed pass over the ring buffer
    (k = 2W, 3W, …) the tracked VAR equals the float64 two-pass variance of the stored window to
    1e-12 relative, through 10⁴ float32 iterates with a spike leaving the window every 5W
    iterates (each of which costs the running update ~1e-3 relative: without the refresh, or with
    it one slot early, the error shows at 1e-12); and the exact refresh (O(WN)) runs once per
    W replacements, ⌊K/W⌋ − 1 times in K updates, never while the window fills (amortised O(N))."""
    W, K = 8, 10_000
    det = WindowedVariance(window=W, patience=K + 1)
    calls = []
    refresh = det._refresh
    det._refresh = lambda: (calls.append(det.k), refresh())[1]
    window = []
    worst = 0.0
    for k, x in enumerate(_drifting_iterates(K, (16,), spike_every=5 * W), start=1):
        det.update(x)
        window = (window + [x.double()])[-W:]
        if k % W == 0:
            w = torch.stack(window)
            ref = ((w - w.mean(0)) ** 2).sum().item() / (W * x.numel())
            worst = max(worst, abs(det.value - ref) / ref)
    assert worst <= 1e-12
    assert calls == list(range(2 * W, K + 1, W))


def test_accumulators_stay_float64_under_a_float32_default():
    """DIP runs with the package's float32 default dtype: the window's mean and M₂ must still be
    accumulated in float64 (module docstring), so VAR equals the float64 two-pass variance of the
    float32 iterates to 1e-12 relative (float32 accumulators would be off by ~1e-7)."""
    torch.set_default_dtype(torch.float32)
    try:
        det = WindowedVariance(window=4, patience=100)
        xs = [(3.0 + 1e-2 * rand(6, 5, seed=k)).to(torch.float32) for k in range(7)]
        for x in xs:
            det.update(x)
        assert det._mean.dtype == torch.float64
    finally:
        torch.set_default_dtype(torch.float64)
    w = torch.stack([v.double() for v in xs[-4:]])
    ref = ((w - w.mean(0)) ** 2).sum().item() / (4 * xs[0].numel())
    assert det.value == pytest.approx(ref, rel=1e-12)
