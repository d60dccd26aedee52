"""lower_level.py: closed-form TV and h derivatives against autograd, constants, solver certificates."""
import math

import pytest
import torch
from conftest import rand

from lower_level import (LowerLevel, hessian_norm_estimate, solve_lower, solve_lower_fixed, tv_grad, tv_hvp,
                         tv_value)
from operators import gaussian_kernel, motion_kernel
from regularisers import AnisotropicTV, FieldsOfExperts, SmoothedTV


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


# --------------------------------------------------------------------------------------------
# other regularisers, batches, the paper protocol's fixed-step solve
# --------------------------------------------------------------------------------------------
def _dense(apply, shape):
    n = math.prod(shape)
    H = torch.stack([apply(e.reshape(shape)).flatten() for e in torch.eye(n)], 1)
    return 0.5 * (H + H.T)


@pytest.mark.parametrize("reg", [AnisotropicTV(0.1, 0.05),
                                 FieldsOfExperts(2, n_filters=3, size=3, weights=torch.tensor([1.0, -0.2, 0.5]),
                                                 smoothing=1e-2, scale=0.05, seed=1)])
def test_mu_and_L_bound_the_hessian_for_other_regularisers(reg):
    """With ``R`` anisotropic TV or a non-convex FoE (a negative weight), the dense Hessian of ``h``
    (built from ``hvp``) has its spectrum in ``[μ, L]``, ``μ = μ₀ + min|b̂|² + λ_R`` (λ_R < 0 for
    that FoE), ``L = max|b̂|² + L_R + μ₀``; its gradient and HVP equal autograd's (1e-10)."""
    b = motion_kernel(3, channels=2, dtype=torch.float64)
    h = LowerLevel(b, rand(2, 6, 5, seed=20), reg, mu0=0.5)
    x, v = 0.1 * rand(2, 6, 5, seed=21), rand(2, 6, 5, seed=22)
    ev = torch.linalg.eigvalsh(_dense(lambda e: h.hvp(x, e), x.shape))
    assert ev.min() >= h.mu - 1e-10 and ev.max() <= h.L + 1e-10
    xa = x.clone().requires_grad_(True)
    g = torch.autograd.grad(h.value(xa), xa, create_graph=True)[0]
    assert torch.allclose(h.grad(x), g, atol=1e-10)
    assert torch.allclose(h.hvp(x, v), torch.autograd.grad(g, xa, v)[0], atol=1e-10)


@pytest.mark.parametrize("reg", [SmoothedTV(0.05, 0.05),
                                 FieldsOfExperts(2, n_filters=2, size=3, smoothing=1e-2, scale=0.05, seed=2)])
def test_batched_y_is_the_sum_of_per_image_problems(reg):
    """``LowerLevel(b, y)`` with ``y`` (N, C, H, W): value = Σ per-image values, grad and hvp = the
    stacked per-image ones (1e-12), and a batched solve certifies the whole batch (‖x̃ − x̂‖ ≤ ε
    against per-image solutions to 1e-12)."""
    b = motion_kernel(3, channels=2, dtype=torch.float64)
    ys = torch.rand(3, 2, 8, 7, generator=torch.Generator().manual_seed(23))
    hs = LowerLevel(b, ys, reg, 0.1)
    singles = [LowerLevel(b, y, reg, 0.1) for y in ys]
    x, v = rand(3, 2, 8, 7, seed=24), rand(3, 2, 8, 7, seed=25)
    assert abs(hs.value(x) - sum(h.value(xi) for h, xi in zip(singles, x))) < 1e-10
    assert torch.allclose(hs.grad(x), torch.stack([h.grad(xi) for h, xi in zip(singles, x)]), atol=1e-12)
    assert torch.allclose(hs.hvp(x, v), torch.stack([h.hvp(xi, vi) for h, xi, vi in zip(singles, x, v)]), atol=1e-12)
    assert hs.mu == singles[0].mu and hs.L == singles[0].L
    eps = 1e-3
    res = solve_lower(hs, ys, eps, 10000)
    ref = torch.stack([solve_lower(h, y, 1e-12, 100000).x for h, y in zip(singles, ys)])
    assert res.converged and torch.linalg.vector_norm(res.x - ref) <= eps


def test_lower_level_rejects_bad_inputs():
    """A y whose channels differ from the kernel's and a non-regulariser are refused in one line."""
    b = motion_kernel(3, channels=2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"y must be \(C, H, W\) or \(N, C, H, W\) with C = 2"):
        LowerLevel(b, rand(3, 6, 6), SmoothedTV(0.1, 0.1))
    with pytest.raises(TypeError, match="regulariser must be"):
        LowerLevel(b, rand(2, 6, 6), 0.1)


@pytest.mark.parametrize("solver", ["fista", "agd"])
def test_fixed_step_solve_follows_the_written_recurrence(solver):
    """``solve_lower_fixed(h, x0, n, s)`` equals the accelerated recurrence written out here,
    ``x_{k+1} = y_k − s∇h(y_k)``, ``y_{k+1} = x_{k+1} + β_k(x_{k+1} − x_k)`` with
    ``β = (1 − √(μs))/(1 + √(μs))`` (fista) or ``(t_k − 1)/t_{k+1}`` (agd), run n times; it reports
    n iterations, the final ‖∇h‖ and no certificate (1e-12: same operations, other order)."""
    h, y = _small_problem()
    n, s = 7, 0.02 / h.L
    x_prev, yk, t = y, y, 1.0
    for _ in range(n):
        x = yk - s * h.grad(yk)
        if solver == "fista":
            q = math.sqrt(h.mu * s)
            beta = (1 - q) / (1 + q)
        else:
            t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
            beta, t = (t - 1) / t_next, t_next
        yk, x_prev = x + beta * (x - x_prev), x
    res = solve_lower_fixed(h, y, n, s, solver)
    assert torch.allclose(res.x, yk, atol=1e-12)
    assert res.iters == n and not res.converged and res.status == "max_iter"
    assert abs(res.grad_norm - torch.linalg.vector_norm(h.grad(res.x)).item()) < 1e-12


def test_fixed_step_with_a_small_step_is_far_from_converged():
    """The paper's TV baseline: 100 iterations from y with a step 75× below 1/L leave ‖∇h‖ far above
    what 100 iterations with 1/L reach (the point of reporting it), and both decrease h from y."""
    h, y = _small_problem(tv_weight=0.2, smoothing=0.02)
    small = solve_lower_fixed(h, y, 100, 1 / (75 * h.L))
    full = solve_lower_fixed(h, y, 100, 1 / h.L)
    assert small.grad_norm > 10 * full.grad_norm
    assert h.value(full.x) < h.value(small.x) < h.value(y)


def test_fixed_step_rejects_bad_arguments():
    h, y = _small_problem()
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="step must be a positive finite number"):
            solve_lower_fixed(h, y, 10, bad)
    with pytest.raises(ValueError, match="iters must be a non-negative integer"):
        solve_lower_fixed(h, y, -1, 0.1)
    with pytest.raises(ValueError, match="unknown lower-level solver"):
        solve_lower_fixed(h, y, 10, 0.1, "newton")


def test_hessian_norm_estimate_approaches_the_largest_eigenvalue():
    """The power iteration never exceeds the largest eigenvalue of the dense Hessian (up to
    rounding, 1e-10) and reaches it to 1e-3 after 300 iterations; 10 iterations (the paper's) are
    below ``h.L``."""
    h, y = _small_problem(tv_weight=0.2, smoothing=0.02)
    lam = torch.linalg.eigvalsh(_dense(lambda e: h.hvp(y, e), y.shape)).max().item()
    est10, est300 = hessian_norm_estimate(h, y, 10), hessian_norm_estimate(h, y, 300)
    assert est10 <= lam * (1 + 1e-10) and est300 <= lam * (1 + 1e-10) and est10 <= h.L
    assert est300 >= lam * (1 - 1e-3)
