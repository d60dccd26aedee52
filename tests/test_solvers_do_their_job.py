"""The solvers do what they are for, at the rate they are for (not only "they stop").

* FISTA reaches ‖∇h‖ ≤ tol within C·√(L/μ)·log(‖∇h(x₀)‖/tol) iterations (C = 1.5; theory for
  the constant-momentum method gives a constant near 1, measured ≤ 0.83 on these problems), on a
  diagonal quadratic and on the TV-regularised lower level of ADP-β.  Without momentum (gradient
  descent) the count is ~(L/μ)·log(…), far over.
* Nesterov's accelerated gradient is ≥ 10× faster than the gradient-descent count.
* Conjugate gradient meets the classical bound ½√κ·log(2√κ‖r₀‖/δ) + 1 (residual form).
* Fixed-step IFT (maid.inexact_gradient_descent) moves θ by exactly −α z at each step and the
  exact upper objective falls.
"""
import math

import pytest
import torch

from conftest import rand
from adp_problem import ADPBetaProblem
from elastic_net import ElasticNetBilevel, gaussian_operator, truth, grid
from lower_level import LowerLevel, accelerated_gradient, fista, solve_lower
from maid import conjugate_gradient, hypergradient, inexact_gradient_descent
from operators import Blur, gaussian_kernel, motion_kernel
from regularisers import SmoothedTV

C_FISTA = 1.5


def _diagonal_quadratic(n=60, kappa=1e4, seed=0):
    """h(x) = ½ Σ λᵢ(xᵢ − cᵢ)², λ log-spaced in [1, κ]: μ = 1, L = κ."""
    lam = torch.logspace(0, math.log10(kappa), n)
    c = rand(n, seed=seed)
    return (lambda x: lam * (x - c)), c


@pytest.mark.parametrize("kappa,eps", [(1e2, 1e-8), (1e4, 1e-4), (1e4, 1e-8)])
def test_fista_iterations_scale_with_sqrt_condition_number(kappa, eps):
    """FISTA on a quadratic with μ = 1, L = κ stops with ‖∇h‖ ≤ ε‖∇h(x₀)‖ after at most
    1.5·√κ·log(1/ε) iterations; its returned point is within tol/μ of the minimiser."""
    grad, c = _diagonal_quadratic(kappa=kappa)
    x0 = torch.zeros_like(c)
    tol = eps * torch.linalg.vector_norm(grad(x0)).item()
    bound = C_FISTA * math.sqrt(kappa) * math.log(1 / eps)
    res = fista(grad, x0, kappa, 1.0, tol, int(bound))
    assert res.converged and res.iters <= bound, (res.iters, bound)
    assert torch.linalg.vector_norm(res.x - c).item() <= tol


def test_accelerated_gradient_beats_gradient_descent_rate():
    """Nesterov's method (momentum (t_k − 1)/t_{k+1}, no μ) on the κ = 10⁴ quadratic reaches
    ε = 1e-4 in under a tenth of gradient descent's κ·log(1/ε) ≈ 9.2e4 iterations (measured 225)."""
    kappa, eps = 1e4, 1e-4
    grad, c = _diagonal_quadratic(kappa=kappa)
    x0 = torch.zeros_like(c)
    tol = eps * torch.linalg.vector_norm(grad(x0)).item()
    cap = int(0.1 * kappa * math.log(1 / eps))
    res = accelerated_gradient(grad, x0, kappa, 1.0, tol, cap)
    assert res.converged, res.iters


@pytest.mark.parametrize("solver", ["fista", "agd"])
def test_tv_lower_level_solved_at_accelerated_rate(solver):
    """The TV lower level (α = 0.02, γ = 0.05, μ₀ = 1e-2, κ = L/μ ≈ 4e2) from x₀ = 0 to
    ε = 1e-6: FISTA within 1.5·√κ·log(‖∇h(x₀)‖/(με)); AGD within a tenth of κ·log(…).  The result
    is certified (‖∇h‖ ≤ με) and the objective is below its value at x₀."""
    g = torch.Generator().manual_seed(0)
    x_true = torch.rand(2, 16, 16, generator=g)
    b = gaussian_kernel(3, 0.7, channels=2, dtype=torch.float64)
    y = Blur(b, (16, 16)).A(x_true) + 0.01 * torch.randn(2, 16, 16, generator=g)
    h = LowerLevel(b, y, SmoothedTV(0.02, 0.05), 1e-2)
    x0 = torch.zeros_like(y)
    eps = 1e-6
    log_term = math.log(torch.linalg.vector_norm(h.grad(x0)).item() / (h.mu * eps))
    kappa = h.L / h.mu
    cap = C_FISTA * math.sqrt(kappa) * log_term if solver == "fista" else 0.1 * kappa * log_term
    res = solve_lower(h, x0, eps, int(cap), solver)
    assert res.converged, (res.iters, cap)
    assert torch.linalg.vector_norm(h.grad(res.x)).item() <= h.mu * eps
    assert h.value(res.x) < h.value(x0)


def test_conjugate_gradient_meets_its_convergence_bound():
    """CG on an SPD matrix with condition number κ = 10⁴ and well-spread spectrum: the residual is
    ≤ δ within ½√κ·log(2√κ‖r₀‖/δ) + 1 iterations (from ‖e_k‖_A ≤ 2((√κ−1)/(√κ+1))^k‖e₀‖_A and
    ‖r‖ ≤ √λ_max ‖e‖_A ≤ √κ·… ); steepest descent would need ~κ/2·log(…)."""
    n, kappa = 200, 1e4
    Q, _ = torch.linalg.qr(rand(n, n, seed=1))
    lam = torch.logspace(0, math.log10(kappa), n)
    H = Q @ torch.diag(lam) @ Q.T
    rhs = rand(n, seed=2)
    delta = 1e-8 * torch.linalg.vector_norm(rhs).item()
    bound = 0.5 * math.sqrt(kappa) * math.log(2 * math.sqrt(kappa) * torch.linalg.vector_norm(rhs).item() / delta) + 1
    q, it, ok = conjugate_gradient(lambda v: H @ v, rhs, None, delta, int(bound))
    assert ok and it <= bound, (it, bound)
    assert torch.linalg.vector_norm(rhs - H @ q).item() <= delta
    # warm start from a point with residual r₀: same bound with ‖r₀‖
    q0 = q + 1e-3 * rand(n, seed=3)
    r0 = torch.linalg.vector_norm(rhs - H @ q0).item()
    q2, it2, ok2 = conjugate_gradient(lambda v: H @ v, rhs, q0, delta, 10 * n)
    assert ok2 and it2 <= 0.5 * math.sqrt(kappa) * math.log(2 * math.sqrt(kappa) * r0 / delta) + 1
    assert torch.linalg.vector_norm(rhs - H @ q2).item() <= delta


# ------------------------------------------------------------------------------------------
# fixed-step IFT moves θ along −z and the exact objective falls
# ------------------------------------------------------------------------------------------
def _record_thetas():
    thetas = []
    return thetas, (lambda rec, st: thetas.append(st.theta.clone()))


def _adp_problem():
    g = torch.Generator().manual_seed(0)
    C, H, W, k = 1, 12, 12, 3
    x_true = torch.rand(C, H, W, generator=g)
    y = Blur(gaussian_kernel(k, 0.7, channels=C, dtype=torch.float64), (H, W)).A(x_true) \
        + 0.01 * torch.randn(C, H, W, generator=g)
    b0 = motion_kernel(k, channels=C, dtype=torch.float64)
    return ADPBetaProblem(y, b0, SmoothedTV(0.02, 0.05), 1e-3, 1e-2, "learned"), y, b0


def _f_exact(p, b, x0):
    res = p.solve_lower(b, x0, 1e-11, 100000)
    assert res.converged
    return p.upper_loss(res.x, b).item()


def test_ift_steps_are_minus_step_times_hypergradient_and_loss_falls():
    """ADP-β (learned operator), IFT with ε = 1e-8, step 50, 4 steps: θ₁ = θ₀ − α z₀ with z₀ the
    hypergradient at θ₀ computed here from the same warm start and accuracies (1e-12); every
    step moves θ by α‖z_k‖ (> 0, the logged grad_norm) and the exact f (lower level to 1e-11)
    decreases strictly at each step."""
    p, y, b0 = _adp_problem()
    step, eps, delta = 50.0, 1e-8, 1e-8
    thetas, cb = _record_thetas()
    res = inexact_gradient_descent(p, b0.clone(), y.clone(), eps, step, 4, delta=delta, lower_max_iter=100000,
                                   cg_max_iter=100000, callback=cb)
    assert len(thetas) == 4 and all(r["accepted"] for r in res.log)
    low = p.solve_lower(b0, y.clone(), eps, 100000)
    z0, *_ = hypergradient(p, low.x, b0, None, delta, 100000)
    assert torch.allclose(thetas[0], b0 - step * z0, rtol=0, atol=1e-12)
    prev = b0
    for th, rec in zip(thetas, res.log):
        moved = torch.linalg.vector_norm(th - prev).item()
        assert moved > 0 and math.isclose(moved, step * rec["grad_norm"], rel_tol=1e-10)
        prev = th
    f = [_f_exact(p, b, y) for b in [b0] + thetas]
    assert all(b < a for a, b in zip(f[:-1], f[1:])), f


def test_ift_on_the_elastic_net_follows_exact_gradient_descent():
    """1D elastic net (SPEC §4.1 data on 40 points): IFT with ε = 1e-10 is gradient descent on f:
    each θ_{k+1} − θ_k equals −α∇f(θ_k) with ∇f from the support formula at a lower level solved
    to 1e-12 (agreement 1e-6 relative, the ε-error of the hypergradient), and the upper loss at
    the accurately solved lower level falls at every step."""
    n = 40
    t = grid(n, 0.05)
    A = gaussian_operator(n)
    y = A @ truth(t) + 0.005 * rand(n, seed=4)
    p = ElasticNetBilevel(A, y, 0.02, 0.027)
    thetas, cb = _record_thetas()
    step = 0.1
    inexact_gradient_descent(p, A.clone(), torch.zeros(n), 1e-10, step, 3, lower_max_iter=100000, callback=cb)
    prev = A
    f_prev, res = p.accurate_upper(A, eps=1e-12)
    for th in thetas:
        grad_f = p.hypergradient_direct(res.x, prev)
        assert torch.linalg.vector_norm(grad_f) > 0
        rel = (torch.linalg.vector_norm(th - (prev - step * grad_f)) / torch.linalg.vector_norm(step * grad_f)).item()
        assert rel < 1e-6, rel
        f_new, res = p.accurate_upper(th, eps=1e-12)
        assert f_new < f_prev
        prev, f_prev = th, f_new


# ------------------------------------------------------------------------------------------
# maid.AcceleratedGradient (the plug-in default solver) and maid.power_iteration
# ------------------------------------------------------------------------------------------
def _quadratic_value(kappa=1e4, n=60, seed=0):
    """h(x, θ) = ½ Σ λᵢ(xᵢ − cᵢ)² with λ log-spaced in [1, κ] (θ unused)."""
    lam = torch.logspace(0, math.log10(kappa), n)
    c = rand(n, seed=seed)
    return (lambda x, theta: 0.5 * (lam * (x - c) ** 2).sum()), lam, c


@pytest.mark.parametrize("mu,L", [(1.0, 1e4), (None, 1e4), (1.0, None), (None, None)])
def test_accelerated_gradient_rate_and_certificate(mu, L):
    """maid.AcceleratedGradient on the κ = 10⁴ quadratic to ‖∇h‖ ≤ 1e-8‖∇h(x₀)‖, with or without μ
    (strongly convex momentum or Nesterov's t-sequence, both with gradient restart) and with L
    given or found by backtracking: at most 1.5·√κ·log(1e8) iterations (measured ≤ 0.85), the
    certificate ‖∇h‖ ≤ (μ or 1)·ε met, and the iterate within ε of the minimiser (μ = 1)."""
    import warnings
    from maid import AcceleratedGradient

    h, lam, c = _quadratic_value()
    x0 = torch.zeros_like(c)
    eps = 1e-8 * torch.linalg.vector_norm(lam * c).item()
    solver = AcceleratedGradient(h, mu=mu, L=L)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = solver(torch.zeros(1), x0, eps, int(C_FISTA * 100 * math.log(1e8)))
    assert res.converged, res.iters
    assert res.grad_norm <= eps and torch.linalg.vector_norm(lam * (res.x - c)).item() <= eps
    assert torch.linalg.vector_norm(res.x - c).item() <= eps


def test_accelerated_gradient_warns_once_without_mu_and_caps():
    """Without μ the stopping test certifies only for 1-strongly convex h: one RuntimeWarning,
    not repeated; a cap is reported as not converged with the iterations used; a non-finite
    objective gives status 'non_finite'."""
    import warnings
    from maid import AcceleratedGradient

    h, lam, c = _quadratic_value(kappa=1e2)
    solver = AcceleratedGradient(h, L=1e2)
    with pytest.warns(RuntimeWarning, match="without mu"):
        solver(torch.zeros(1), torch.zeros_like(c), 1e-3, 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = solver(torch.zeros(1), torch.zeros_like(c), 1e-14, 3)
    assert not res.converged and res.iters == 3 and res.status == "max_iter"
    bad = AcceleratedGradient(lambda x, th: (x * float("nan")).sum(), mu=1.0, L=1.0)
    assert bad(torch.zeros(1), torch.ones(3), 1e-3, 10).status == "non_finite"


def test_power_iteration_estimates_the_top_eigenvalue_from_below():
    """On diag(1, …, 10) (gap 0.9): the estimates increase with the number of iterations, stay
    ≤ λ_max = 10, and after 300 iterations are within 1e-9 of it; the same seed gives the same
    estimate; a zero operator gives 0 and an overflowing one ∞."""
    from maid import power_iteration

    d = torch.arange(1.0, 11.0)
    like = torch.zeros(10)
    est = [power_iteration(lambda v: d * v, like, iters=k) for k in (1, 5, 20, 300)]
    assert all(a <= b + 1e-12 for a, b in zip(est[:-1], est[1:])) and est[-1] <= 10 + 1e-12
    assert abs(est[-1] - 10) < 1e-9 and est[0] < 9.9
    assert power_iteration(lambda v: d * v, like, iters=7, seed=3) == power_iteration(lambda v: d * v, like,
                                                                                        iters=7, seed=3)
    assert power_iteration(lambda v: 0 * v, like) == 0
    assert power_iteration(lambda v: 1e308 * 1e308 * v, like) == math.inf
