"""Accuracy control (issue 15): the energy certificate is a bound on ‖x − x̂‖, float32 solves are
certified by a float64 evaluation of the stored iterate, and the local error constants of ω bound
the true hypergradient error."""
import math

import pytest
import torch
from conftest import rand

from lower_level import LowerLevel, fista, solve_lower
from operators import Blur, gaussian_kernel, motion_kernel
from regularisers import AnisotropicTV, FieldsOfExperts, SmoothedTV


def _problem(C=3, H=32, W=32, k=5, noise=0.02, seed=0, R=None, mu0=1e-2, dtype=torch.float64):
    """A blurred, noisy random image with a motion kernel; returns (h, b, y) in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    x_true = torch.rand(C, H, W, generator=g, dtype=torch.float64)
    b = motion_kernel(k, channels=C, dtype=torch.float64)
    y = Blur(b, (H, W)).A(x_true) + noise * torch.randn(C, H, W, generator=g, dtype=torch.float64)
    R = SmoothedTV(0.005, 0.01) if R is None else R
    b, y = b.to(dtype), y.to(dtype)
    return LowerLevel(b, y, R, mu0), b, y


def _reference(h, x0, eps=1e-11):
    res = solve_lower(h, x0, eps, 200000)
    assert res.converged
    return res.x


# --------------------------------------------------------------------------------------------
# the energy certificate
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("W", [9, 10], ids=["odd_width", "even_width"])
def test_energy_bound_equals_the_dense_quadratic_form(W):
    """``energy_bound(g)² μ = gᵀQ⁻¹g`` with ``Q = B_bᵀB_b + (μ₀ + λ_R)I`` built as a dense matrix
    from ``Blur.A`` on basis vectors (independent of the Parseval weights; odd and even widths,
    where the real FFT's last column counts once or twice).  Tolerance 1e-10 relative (a
    solve with a condition number ≤ 1e3).  Also ``≤ ‖g‖/μ``."""
    h, b, y = _problem(C=2, H=7, W=W, k=3, R=FieldsOfExperts(2, n_filters=2, size=3, weights=torch.tensor([1.0, -0.2]),
                                                               smoothing=1.0, scale=0.01), mu0=0.05)
    assert h.regulariser.hessian_lower_bound() < 0          # λ_R enters Q
    n = y.numel()
    E = torch.eye(n).reshape(n, *y.shape)
    BtB = h.blur.A_adjoint_A(E).reshape(n, n)
    Q = BtB + (h.mu0 + h.regulariser.hessian_lower_bound()) * torch.eye(n)
    assert torch.linalg.eigvalsh(Q).min().item() == pytest.approx(h.mu, rel=1e-10)
    g = rand(*y.shape, seed=2)
    ref = (g.reshape(-1) @ torch.linalg.solve(Q, g.reshape(-1))).item() / h.mu
    assert h.energy_bound(g) ** 2 == pytest.approx(ref, rel=1e-10)
    assert h.energy_bound(g) <= torch.linalg.vector_norm(g).item() / h.mu


@pytest.mark.parametrize("make_R", [lambda: SmoothedTV(0.02, 0.01), lambda: AnisotropicTV(0.02, 0.01),
                                    lambda: SmoothedTV(0.0, 0.01)], ids=["tv", "tv_aniso", "quadratic"])
def test_energy_bound_bounds_the_true_error_and_is_attained_for_a_quadratic(make_R):
    """For 30 points ``x = x̂ + e`` (random directions, sizes 1e-4 … 1, smooth and rough), the
    certificate ``sqrt(∇h(x)ᵀQ⁻¹∇h(x)/μ)`` is ≥ ``‖x − x̂‖`` (reference ``x̂``: solved to 1e-11, so the
    comparison carries ≤ 1e-11 of slack; a test point fails when the bound is < (1 − 1e-6)·error).
    For a quadratic ``h`` (TV weight 0, ``H = Q``) and ``e`` the eigenvector of the dense ``Q`` with
    eigenvalue μ the bound is attained (ratio 1 to 1e-6): it cannot be made smaller."""
    h, b, y = _problem(C=2, H=12, W=10, k=3, R=make_R())
    x_hat = _reference(h, y)
    worst = math.inf
    for s in range(30):
        e = rand(*y.shape, seed=s)
        if s % 2:
            e = Blur(gaussian_kernel(3, 1.0, channels=2), y.shape[-2:]).A(e)       # smooth error
        e = e * (10.0 ** (-4 + 4 * (s % 5) / 4) / torch.linalg.vector_norm(e))
        bound = h.energy_bound(h.grad(x_hat + e))
        worst = min(worst, bound / torch.linalg.vector_norm(e).item())
    assert worst >= 1 - 1e-6
    if h.regulariser.weight == 0:
        n = y.numel()
        Q = h.blur.A_adjoint_A(torch.eye(n).reshape(n, *y.shape)).reshape(n, n) + h.mu0 * torch.eye(n)
        e = 1e-2 * torch.linalg.eigh(Q).eigenvectors[:, 0].reshape(y.shape)
        ratio = h.energy_bound(h.grad(x_hat + e)) / torch.linalg.vector_norm(e).item()
        assert ratio == pytest.approx(1.0, rel=1e-6)


def test_energy_certificate_in_float64_stops_no_later_and_is_accurate():
    """``certificate='energy'`` in float64 runs the same iterates as ``'gradient'`` and stops no
    later (the test is never looser); both results are within ε of the reference ``x̂``.  The
    problem is chosen so that energy stops strictly earlier (its bound is ≈ 0.4× ``‖∇h‖/μ``)."""
    h, b, y = _problem()
    x_hat = _reference(h, y)
    eps = 1e-4
    grad = solve_lower(h, y, eps, 10000, certificate="gradient")
    energy = solve_lower(h, y, eps, 10000, certificate="energy")
    assert grad.converged and energy.converged
    assert energy.iters < grad.iters
    for r in (grad, energy):
        assert torch.linalg.vector_norm(r.x - x_hat).item() <= eps
    with pytest.raises(ValueError, match="unknown certificate"):
        solve_lower(h, y, eps, 10, certificate="exact")


# --------------------------------------------------------------------------------------------
# float32 solves certified in float64
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("certificate", ["gradient", "energy"])
@pytest.mark.parametrize("eps", [3e-4, 1e-4])
def test_float32_solve_is_certified_where_plain_float32_stalls(certificate, eps):
    """3×32×32, μ ≈ 0.01: plain float32 FISTA cannot get its computed ``‖∇h‖`` below ``μ ε``
    (rounding floor ~1e-7‖x‖ ≈ 3e-6 > μ ε) and runs to its cap; the refined float32 solve is
    certified well before the cap, its iterate is float32, and its distance to the float64
    reference ``x̂`` (solved to 1e-11) is ≤ ε — the certificate's claim, checked independently.
    Its ``grad_norm`` is the float64 gradient of the stored iterate (recomputed here, 1e-9)."""
    h32, b, y = _problem(dtype=torch.float32)
    h64 = LowerLevel(b.double(), y.double(), h32.regulariser, h32.mu0)
    x_hat = _reference(h64, y.double())
    with torch.no_grad():
        plain = fista(h32.grad, y, h32.L, h32.mu, h32.mu * eps, 3000)
    assert not plain.converged
    res = solve_lower(h32, y, eps, 3000, certificate=certificate)
    assert res.converged and res.iters < 1000 and res.x.dtype == torch.float32
    x64 = res.x.double()
    assert torch.linalg.vector_norm(x64 - x_hat).item() <= eps
    assert res.grad_norm == pytest.approx(torch.linalg.vector_norm(h64.grad(x64)).item(), rel=1e-9)
    assert 1 <= h32.certificate_evaluations <= 6


def test_float32_solve_below_the_float32_floor_stops_early_uncertified_but_accurate():
    """ε = 1e-7 is below what any float32 point can certify here (the float32 grid around ``x̂`` is
    ~1e-6 away).  The solve stops long before the cap (stall detection: no halving of ``‖∇h‖``
    over two windows of 20√(L/μ) iterations), says ``converged=False`` with a finite float64
    ``grad_norm`` (MAID's 'max_iter' status), and its iterate is within 1e-5 of ``x̂`` (measured
    1.8e-6, the grid's own distance; plain float32 FISTA stalls at 6e-5)."""
    h32, b, y = _problem(dtype=torch.float32)
    x_hat = _reference(LowerLevel(b.double(), y.double(), h32.regulariser, h32.mu0), y.double())
    res = solve_lower(h32, y, 1e-7, 20000)
    assert not res.converged and res.status == "max_iter" and res.iters < 5000
    assert torch.linalg.vector_norm(res.x.double() - x_hat).item() <= 1e-5


def test_float64_twin_of_a_float32_foe_matches_a_float64_build():
    """The float64 twin casts ``b``, ``y`` and the regulariser's parameters (``Regulariser.to``):
    for a float32 FoE lower level its gradient equals that of the same FoE built in float64 from
    the same (float32-rounded) numbers, to 1e-12; the original float32 regulariser is untouched."""
    R32 = FieldsOfExperts(3, n_filters=2, size=3, dtype=torch.float32)
    h32, b, y = _problem(C=3, H=10, W=9, k=3, R=R32, dtype=torch.float32)
    twin = h32.float64_twin()
    assert twin.y.dtype == torch.float64 and R32.filters.dtype == torch.float32
    R64 = FieldsOfExperts(3, n_filters=2, size=3, filters=R32.filters.double(), weights=R32.weights.double(),
                          smoothing=math.exp(R32.log_smoothing.item()), scale=math.exp(R32.log_scale.item()))
    h64 = LowerLevel(b.double(), y.double(), R64, h32.mu0)
    x = rand(*y.shape, seed=3)
    assert torch.allclose(twin.grad(x), h64.grad(x), rtol=0, atol=1e-12)
    assert twin.mu == pytest.approx(h64.mu, rel=1e-15) and h32.float64_twin() is twin
