"""lower_level.py: closed-form TV and h derivatives against autograd, constants, solver certificates."""
import pytest
import torch
from conftest import rand

from lower_level import LowerLevel, solve_lower, tv_grad, tv_hvp, tv_value
from operators import gaussian_kernel, motion_kernel
from regularisers import SmoothedTV


def _small_problem(tv_weight=0.05, smoothing=0.05, mu0=1e-2, seed=0):
    x_true = torch.rand(2, 12, 10, generator=torch.Generator().manual_seed(seed))
    b = motion_kernel(3, channels=2, dtype=torch.float64)
    h = LowerLevel(b, x_true, SmoothedTV(tv_weight, smoothing), mu0)
    y = h.blur.A(x_true) + 0.01 * rand(2, 12, 10, seed=seed + 1)
    return LowerLevel(b, y, SmoothedTV(tv_weight, smoothing), mu0), y


@pytest.mark.parametrize("smoothing", [1e-2, 0.3])
def test_tv_gradient_and_hvp_against_autograd(smoothing):
    x, v = rand(3, 8, 9, seed=1), rand(3, 8, 9, seed=2)
    xa = x.clone().requires_grad_(True)
    g = torch.autograd.grad(tv_value(xa, smoothing), xa, create_graph=True)[0]
    hv = torch.autograd.grad((g * v).sum(), xa)[0]
    assert torch.allclose(tv_grad(x, smoothing), g, atol=1e-10)
    assert torch.allclose(tv_hvp(x, v, smoothing), hv, atol=1e-8)


def test_h_gradient_and_hvp_against_autograd():
    h, _ = _small_problem()
    x, v = rand(2, 12, 10, seed=3), rand(2, 12, 10, seed=4)
    xa = x.clone().requires_grad_(True)
    g = torch.autograd.grad(h.value(xa), xa, create_graph=True)[0]
    hv = torch.autograd.grad((g * v).sum(), xa)[0]
    assert torch.allclose(h.grad(x), g, atol=1e-10)
    assert torch.allclose(h.hvp(x, v), hv, atol=1e-8)


def test_strong_convexity_and_smoothness_constants_bound_the_hessian():
    h, _ = _small_problem(tv_weight=0.2, smoothing=0.02)
    x = rand(2, 12, 10, seed=5)
    n = x.numel()
    H = torch.stack([h.hvp(x, e.reshape(x.shape)).flatten() for e in torch.eye(n)], 1)
    ev = torch.linalg.eigvalsh(0.5 * (H + H.T))
    assert ev.min() >= h.mu - 1e-10
    assert ev.max() <= h.L + 1e-10


@pytest.mark.parametrize("solver", ["fista", "agd"])
@pytest.mark.parametrize("eps", [1e-1, 1e-3])
def test_solver_certificate_holds(solver, eps):
    """When the solver stops, ‖x̃ − x̂‖ ≤ ε against a high-accuracy solution."""
    h, y = _small_problem()
    x_hat = solve_lower(h, y, 1e-12, 100000, "fista")
    assert x_hat.converged
    res = solve_lower(h, torch.zeros_like(y), eps, 100000, solver)
    assert res.converged and res.grad_norm <= h.mu * eps
    assert torch.linalg.vector_norm(res.x - x_hat.x) <= eps
    assert res.iters > 0


def test_fista_warm_start_needs_fewer_iterations():
    h, y = _small_problem()
    cold = solve_lower(h, torch.zeros_like(y), 1e-6, 100000)
    warm = solve_lower(h, solve_lower(h, y, 1e-4, 100000).x, 1e-6, 100000)
    assert warm.iters < cold.iters


def test_iteration_cap_is_reported():
    h, y = _small_problem()
    res = solve_lower(h, torch.zeros_like(y), 1e-12, 5)
    assert not res.converged and res.iters == 5 and res.grad_norm > h.mu * 1e-12
    assert res.status == "max_iter"


def test_non_finite_is_reported_apart_from_the_cap():
    """A NaN in the data and a kernel too large for the dtype end as 'non_finite', not 'max_iter'."""
    h, y = _small_problem()
    bad = y.clone()
    bad[0, 3, 4] = float("nan")
    res = solve_lower(LowerLevel(h.blur.b, bad, SmoothedTV(0.05, 0.05), 1e-2), y, 1e-3, 50)
    assert res.status == "non_finite" and not res.converged
    huge = LowerLevel(1e200 * motion_kernel(3, channels=2, dtype=torch.float64), y, SmoothedTV(0.05, 0.05), 1e-2)
    assert huge.L == float("inf")                     # no OverflowError
    res = solve_lower(huge, y, 1e-3, 50)
    assert res.status == "non_finite" and res.iters == 0


def test_unknown_solver_rejected():
    h, y = _small_problem()
    with pytest.raises(ValueError, match="unknown lower-level solver"):
        solve_lower(h, y, 1e-3, 10, "newton")


def test_mu_and_L_are_sharp_without_tv():
    """With TV weight 0 the Hessian is BᵀB + μ₀I: its extreme eigenvalues (dense matrix, built from
    Hessian-vector products) are exactly μ = μ₀ + min|b̂|² and L = max|b̂|² + μ₀."""
    b = gaussian_kernel(3, 0.5, channels=1, dtype=torch.float64)
    h = LowerLevel(b, torch.zeros(1, 8, 6, dtype=torch.float64), SmoothedTV(0.0, 0.1), mu0=0.3)
    x = rand(1, 8, 6, seed=7)
    H = torch.stack([h.hvp(x, e.reshape(x.shape)).flatten() for e in torch.eye(x.numel(), dtype=torch.float64)], 1)
    ev = torch.linalg.eigvalsh(0.5 * (H + H.T))
    assert abs(ev.min().item() - h.mu) < 1e-12
    assert abs(ev.max().item() - h.L) < 1e-12
    assert h.mu > 0.3 + 1e-3      # this Gaussian has no spectral zero on an 8×6 grid: μ > μ₀
