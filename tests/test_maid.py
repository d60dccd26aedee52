"""maid.py + adp_problem.py: CG, hypergradient vs finite differences, MAID behaviour, plug-in interface."""
import math

import pytest
import torch

from adp_problem import ADPBetaProblem
from lower_level import fista, tv_grad, tv_hvp, tv_value
from maid import LowerSolve
from maid import (BilevelProblem, ErrorConstants, MAIDConfig, conjugate_gradient, error_bound, hypergradient,
                  inexact_gradient_descent, maid, sufficient_decrease)
from operators import Blur, gaussian_kernel, motion_kernel

torch.set_default_dtype(torch.float64)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _deblur_problem(upper_operator="learned", C=2, H=12, W=10, k=3, seed=0, beta=1e-3):
    g = torch.Generator().manual_seed(seed)
    x_true = torch.rand(C, H, W, generator=g)
    b_true = gaussian_kernel(k, 0.7, channels=C, dtype=torch.float64)
    y = Blur(b_true, (H, W)).A(x_true) + 0.01 * torch.randn(C, H, W, generator=g)
    b0 = motion_kernel(k, channels=C, dtype=torch.float64)
    p = ADPBetaProblem(y, b0, alpha=0.02, gamma=0.05, beta=beta, mu0=1e-2, upper_operator=upper_operator)
    return p, y, b0, x_true


def _f(p, b, x0):
    """Upper objective with the lower level solved to high accuracy."""
    res = p.solve_lower(b, x0, 1e-11, 200000)
    assert res.converged
    return p.upper_loss(res.x, b).item(), res.x


def test_conjugate_gradient_reaches_tolerance():
    M = _rand(30, 30, seed=1)
    H = M @ M.T + 0.1 * torch.eye(30)
    rhs = _rand(30, seed=2)
    q, it, ok = conjugate_gradient(lambda v: H @ v, rhs, None, 1e-9, 1000)
    assert ok and torch.linalg.vector_norm(rhs - H @ q) <= 1e-9
    q2, it2, ok2 = conjugate_gradient(lambda v: H @ v, rhs, q, 1e-9, 1000)   # warm start: done at once
    assert ok2 and it2 == 0
    _, it3, ok3 = conjugate_gradient(lambda v: H @ v, rhs, None, 1e-14, 3)
    assert not ok3 and it3 == 3


@pytest.mark.parametrize("upper_operator", ["learned", "known"])
def test_hypergradient_matches_finite_differences(upper_operator):
    p, y, b0, _ = _deblur_problem(upper_operator)
    b = b0 + 0.05 * _rand(*b0.shape, seed=3)
    _, x_hat = _f(p, b, y)
    z, _, _, ok = hypergradient(p, x_hat, b, None, 1e-12, 10000)
    assert ok
    h = 1e-5
    z_fd = torch.zeros_like(b)
    for idx in range(b.numel()):
        e = torch.zeros(b.numel())
        e[idx] = h
        e = e.reshape(b.shape)
        z_fd.view(-1)[idx] = (_f(p, b + e, x_hat)[0] - _f(p, b - e, x_hat)[0]) / (2 * h)
    rel = (torch.linalg.vector_norm(z - z_fd) / torch.linalg.vector_norm(z_fd)).item()
    assert rel < 1e-3, rel


def test_learned_upper_operator_has_direct_partial():
    """With A_up = B_b, ∂_b g ≠ 0 beyond the H¹ term; with A_up = A it is only the H¹ term."""
    p_l, y, b0, _ = _deblur_problem("learned", beta=0.0)
    p_k, *_ = _deblur_problem("known", beta=0.0)
    b = b0 + 0.05 * _rand(*b0.shape, seed=4)
    assert torch.linalg.vector_norm(p_l.upper_grad_theta(y, b)) > 0
    assert torch.linalg.vector_norm(p_k.upper_grad_theta(y, b)) == 0


def test_sufficient_decrease_test():
    # exact values (ε = 0): a plain Armijo test
    assert sufficient_decrease(0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1e-4, 1.0, 1.0)
    assert not sufficient_decrease(1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1e-4, 1.0, 1.0)
    # the same decrease is not enough once the accuracy margin 2‖∇g‖ε + L_g ε² exceeds it
    assert not sufficient_decrease(0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 0.06, 1e-4, 1.0, 1.0)


def _maid_deblur_run(**kw):
    p, y, b0, _ = _deblur_problem("learned", H=16, W=16)
    cfg = MAIDConfig(eps0=1.0, delta0=1e-4, step0=100.0, max_iter=25, descent_check=False, eps_min=1e-8,
                     lower_max_iter=100000, **kw)
    return p, y, maid(p, b0.clone(), y.clone(), cfg)


def test_maid_accepted_steps_decrease_exact_upper_objective_and_eps_adapts():
    p, y, res = _maid_deblur_run()
    log = res.log
    assert res.stop_reason in ("max_iter", "eps_min")
    assert log[-1]["lower_cap_hits"] == 0
    # replay the accepted kernels and evaluate f accurately
    thetas, s = [], None
    accepted = [r["accepted"] for r in log]
    assert any(accepted) and not all(accepted), accepted
    # ε shrinks by τ after a failed line search and grows by ν after a success
    eps_prev = 1.0
    for r in log:
        ratio = r["eps"] / eps_prev
        assert math.isclose(ratio, 1.05 if r["accepted"] else 0.5, rel_tol=1e-12), (ratio, r)
        eps_prev = r["eps"]
    # exact f along the run: re-run with a callback that records the accepted kernels
    kernels = []
    p2, y2, b0, _ = _deblur_problem("learned", H=16, W=16)
    cfg = MAIDConfig(eps0=1.0, delta0=1e-4, step0=100.0, max_iter=25, descent_check=False, eps_min=1e-8,
                     lower_max_iter=100000)
    maid(p2, b0.clone(), y2.clone(), cfg, callback=lambda rec, st: kernels.append(st.theta.clone()))
    f_vals = [_f(p2, b0, y2)[0]] + [_f(p2, b, y2)[0] for b in kernels]
    for a, b, r in zip(f_vals[:-1], f_vals[1:], log):
        if r["accepted"]:
            assert b < a
        else:
            assert b == a
    assert f_vals[-1] < f_vals[0]


def test_lower_and_cg_iterations_are_counted_monotonically():
    _, _, res = _maid_deblur_run()
    li = [r["lower_iters"] for r in res.log]
    ci = [r["cg_iters"] for r in res.log]
    assert all(b > a for a, b in zip(li, li[1:]))
    assert all(b >= a for a, b in zip(ci, ci[1:])) and ci[-1] > 0


def test_descent_check_tightens_until_omega_small_or_capped():
    """At ε₀ = 1 the (worst-case) ω exceeds (1 − η)‖z‖, so the check must tighten ε (and δ) by τ,
    up to max_tightenings; the logged ε is then ε₀ τ^t times ν (accepted) or τ (rejected)."""
    p, y, b0, _ = _deblur_problem("learned")
    cfg = MAIDConfig(eps0=1.0, max_iter=1, descent_check=False, lower_max_iter=100000)
    r0 = maid(p, b0.clone(), y.clone(), cfg).log[0]
    assert r0["omega"] > (1 - cfg.eta) * r0["grad_norm"]          # premise: ω too large at ε₀
    cfg = MAIDConfig(eps0=1.0, max_iter=2, descent_check=True, max_tightenings=3, lower_max_iter=100000)
    r = maid(p, b0.clone(), y.clone(), cfg).log[0]
    t = r["tightenings"]
    assert 1 <= t <= 3 and (r["descent_ok"] or t == 3)
    assert r["descent_ok"] == (r["omega"] <= (1 - cfg.eta) * r["grad_norm"])
    assert math.isclose(r["eps"], cfg.tau**t * (cfg.nu if r["accepted"] else cfg.tau), rel_tol=1e-12)
    assert r["omega"] > 0 and math.isfinite(r["omega"])


def test_error_bound_is_infinite_without_strong_convexity():
    c = ErrorConstants(mu=0.0, L_g=1.0, J_norm=1.0, L_J=1.0, L_Hinv=1.0)
    assert error_bound(1e-3, 1e-3, c, 1.0) == math.inf


@pytest.mark.parametrize("upper_operator", ["learned", "known"])
def test_line_search_uses_upper_lipschitz_not_error_constants(upper_operator):
    """``upper_lipschitz`` is the ``L_g`` of ``error_constants``; MAID evaluates the full constants
    once per descent check (here: once per iteration) and only ``L_g`` at the trial points."""
    p, y, b0, _ = _deblur_problem(upper_operator)
    x = p.solve_lower(b0, y.clone(), 1e-8, 100000).x
    assert p.upper_lipschitz(x, b0) == p.error_constants(x, b0).L_g > 0
    calls = {"ec": 0, "ul": 0, "inside_ec": False}
    ec, ul = p.error_constants, p.upper_lipschitz

    def counted_ec(*a):
        calls["ec"] += 1
        calls["inside_ec"] = True
        try:
            return ec(*a)
        finally:
            calls["inside_ec"] = False

    def counted_ul(*a):
        calls["ul"] += not calls["inside_ec"]       # MAID's own calls, not error_constants' internal one
        return ul(*a)

    p.error_constants, p.upper_lipschitz = counted_ec, counted_ul
    res = maid(p, b0.clone(), y.clone(), MAIDConfig(eps0=1e-3, max_iter=4, descent_check=False, lower_max_iter=100000))
    trials = sum(r["backtracks"] + 1 for r in res.log)
    assert calls["ec"] == len(res.log) and calls["ul"] == trials


def test_inexact_gradient_descent_keeps_accuracy_and_step_fixed():
    p, y, b0, _ = _deblur_problem("learned")
    res = inexact_gradient_descent(p, b0.clone(), y.clone(), eps=1e-3, step=10.0, max_iter=5)
    assert len(res.log) == 5 and all(r["accepted"] for r in res.log)
    assert all(r["eps"] == 1e-3 and r["step"] == 10.0 for r in res.log)


def test_accepted_candidate_is_not_solved_again():
    """Fixed step: one lower solve per upper step (plus the first); MAID: after an accepted step
    the next iteration reuses the candidate's solve (ε only grew), after a rejection it re-solves."""
    p, y, b0, _ = _deblur_problem("learned")
    calls = []
    solve = p.solve_lower
    p.solve_lower = lambda *a: calls.append(a[2]) or solve(*a)
    inexact_gradient_descent(p, b0.clone(), y.clone(), eps=1e-3, step=10.0, max_iter=6)
    assert len(calls) == 7
    calls.clear()
    res = maid(p, b0.clone(), y.clone(), MAIDConfig(eps0=1.0, delta0=1e-4, step0=100.0, max_iter=12,
                                                    descent_check=False, lower_max_iter=100000))
    acc = [r["accepted"] for r in res.log]
    expected = 1 + sum(r["backtracks"] + 1 for r in res.log) + sum(not a for a in acc[:-1])
    assert len(calls) == expected and any(acc) and not all(acc)


class ShiftedQuadratic(BilevelProblem):
    """f(θ) = ½(x̂ − 5)² with x̂ = θ (h(x, θ) = ½(x − θ)²): a scalar problem to probe MAID's
    handling of NaN/Inf; subclasses break one piece."""

    def solve_lower(self, theta, x0, eps, max_iter):
        return LowerSolve(theta.clone(), 1, 0.0, True)

    def upper_loss(self, x, theta):
        return 0.5 * ((x - 5) ** 2).sum()

    def upper_grad_x(self, x, theta):
        return x - 5

    def hessian_vp(self, x, theta, v):
        return v

    def mixed_vjp(self, x, theta, q):
        return -q

    def error_constants(self, x, theta):
        return ErrorConstants(1.0, 1.0, 1.0, 0.0, 0.0)


def test_non_finite_hypergradient_stops_and_keeps_last_good_state():
    class Exploding(ShiftedQuadratic):
        """The mixed term (so the hypergradient) is NaN once x > 2."""

        def mixed_vjp(self, x, theta, q):
            return torch.where(x > 2, torch.full_like(q, math.nan), -q)

    res = maid(Exploding(), torch.tensor([0.0]), torch.tensor([0.0]),
               MAIDConfig(step0=1.0, nu_step=1.0, descent_check=False, max_iter=50, eps0=1e-3))
    assert res.stop_reason == "non_finite"
    assert len(res.log) == 1 and res.log[0]["accepted"]          # θ: 0 → 5, then z(5) = NaN
    assert res.theta.item() == 5.0 and torch.isfinite(res.x).all()


def test_descent_check_tightens_by_tau_until_omega_below_z():
    """ShiftedQuadratic has ω = ε + δ and ‖z‖ = |θ − 5| = 5 at θ = 0: from ε₀ = δ₀ = 8 the check
    must re-solve at ε = 8, 4, 2 (ω = 16, 8, 4) and stop at the first ω ≤ (1 − η)‖z‖."""
    p = ShiftedQuadratic()
    calls = []
    solve = p.solve_lower
    p.solve_lower = lambda *a: calls.append(a[2]) or solve(*a)
    cfg = MAIDConfig(eps0=8.0, delta0=8.0, tau=0.5, nu=1.05, step0=1.0, max_iter=1, descent_check=True,
                     max_tightenings=10)
    r = maid(p, torch.tensor([0.0]), torch.tensor([0.0]), cfg).log[0]
    assert r["tightenings"] == 2 and r["descent_ok"]
    assert calls[:3] == [8.0, 4.0, 2.0] and r["omega"] == pytest.approx(4.0)
    factor = 1.05 if r["accepted"] else 0.5                # then ν or τ on the tightened accuracies
    assert r["eps"] == pytest.approx(2.0 * factor) and r["delta"] == pytest.approx(2.0 * factor)


def test_non_finite_trial_point_is_a_failed_trial_not_a_stop():
    """A line-search trial whose lower solve ends non-finite (or whose θ is Inf) is rejected and
    the search backtracks; it does not stop MAID or raise."""
    class Overflowing(ShiftedQuadratic):
        """Like the ADP lower level: an Inf θ raises (operators.check_kernel), and for |θ| > 20
        the solve 'overflows' (status non_finite) although the x it returns is finite (and even
        looks optimal), as when FISTA meets a NaN gradient at a finite point."""

        def solve_lower(self, theta, x0, eps, max_iter):
            if not torch.isfinite(theta).all():
                raise ValueError("kernel contains NaN or Inf")
            if theta.abs().max() > 20:
                return LowerSolve(torch.full_like(theta, 5.0), 0, math.nan, False)
            return super().solve_lower(theta, x0, eps, max_iter)

    cfg = MAIDConfig(step0=10.0, rho=0.5, max_backtracks=5, descent_check=False, max_iter=3, eps0=1e-3)
    res = maid(Overflowing(), torch.tensor([0.0]), torch.tensor([0.0]), cfg)
    first = res.log[0]        # trials θ = 50, 25 (non-finite), 12.5 (f rises), 6.25 (accepted)
    assert first["accepted"] and first["backtracks"] == 3 and first["lower_cap_hits"] == 0
    assert res.stop_reason == "max_iter" and abs(res.log[0]["upper_loss"] - 0.5 * 1.25**2) < 1e-12
    z0 = torch.tensor([0.0], dtype=torch.float64)                     # θ − 1e308·z overflows to −Inf
    res = maid(Overflowing(), z0, z0.clone(), MAIDConfig(step0=1e308, descent_check=False, max_iter=1, eps0=1e-3))
    assert not res.log[0]["accepted"] and res.log[0]["backtracks"] == cfg.max_backtracks - 1


# ------------------------------------------------------------------------------------------
# the plug-in interface: learn the TV weight α of a 1-channel denoising problem
# ------------------------------------------------------------------------------------------
class TVWeightLearning(BilevelProblem):
    """θ = (α,); h(x, α) = ½‖x − y‖² + α R_γ(x) (μ = 1); g(x) = ‖x − x_clean‖²."""

    def __init__(self, y, x_clean, gamma=0.05):
        self.y, self.xc, self.gamma = y, x_clean, gamma

    def _grad_h(self, alpha):
        return lambda x: x - self.y + alpha * tv_grad(x, self.gamma)

    def solve_lower(self, theta, x0, eps, max_iter):
        a = theta.item()
        return fista(self._grad_h(a), x0, 1 + 8 * a / self.gamma, 1.0, eps, max_iter)

    def upper_loss(self, x, theta):
        return ((x - self.xc) ** 2).sum()

    def upper_grad_x(self, x, theta):
        return 2 * (x - self.xc)

    def hessian_vp(self, x, theta, v):
        return v + theta.item() * tv_hvp(x, v, self.gamma)

    def mixed_vjp(self, x, theta, q):
        return (tv_grad(x, self.gamma) * q).sum().reshape(1)

    def error_constants(self, x, theta):
        return ErrorConstants(mu=1.0, L_g=2.0, J_norm=math.inf, L_J=math.inf, L_Hinv=math.inf)


def test_maid_learns_tv_weight_through_the_interface():
    g = torch.Generator().manual_seed(7)
    xc = torch.zeros(1, 24, 24)
    xc[:, 6:18, 6:18] = 1.0
    xc[:, 10:14, 2:22] = 0.5
    y = xc + 0.15 * torch.randn(1, 24, 24, generator=g)
    prob = TVWeightLearning(y, xc)

    def f(a):
        x = prob.solve_lower(torch.tensor([a]), y, 1e-10, 100000).x
        return prob.upper_loss(x, None).item()

    grid = torch.linspace(0.01, 0.4, 40)
    a_best = grid[int(torch.tensor([f(a.item()) for a in grid]).argmin())].item()
    a0 = 0.01
    res = maid(prob, torch.tensor([a0]), y.clone(),
               MAIDConfig(eps0=1e-2, step0=1e-3, max_iter=60, descent_check=False, lower_max_iter=100000))
    a_fin = res.theta.item()
    assert f(a_fin) < f(a0)
    assert abs(a_fin - a_best) < 0.02, (a_fin, a_best)


# ------------------------------------------------------------------------------------------
# the a-posteriori bound ω and the direct partial ∂_b g of the learned upper operator
# ------------------------------------------------------------------------------------------
def _omega_parts(p, x, b, eps, delta):
    """``(ω, ω without the direct-partial term L_{θx}ε + ½L'_{θx}ε², the constants)``."""
    c = p.error_constants(x, b)
    gxn = torch.linalg.vector_norm(p.upper_grad_x(x, b)).item()
    c0 = ErrorConstants(c.mu, c.L_g, c.J_norm, c.L_J, c.L_Hinv)
    return error_bound(eps, delta, c, gxn), error_bound(eps, delta, c0, gxn), c


@pytest.mark.parametrize("upper_operator", ["learned", "known"])
@pytest.mark.parametrize("C,k", [(1, 3), (3, 5)])
def test_error_bound_holds_for_certified_lower_solve(upper_operator, C, k):
    """z at a loose (ε, δ) (lower level stopped by its certificate ‖∇ₓh‖ ≤ με, CG at residual δ)
    against ∇f from a lower level and CG solved to ~1e-12: ‖z − ∇f‖ ≤ ω.  The direct-partial
    term of ω is positive for A_up = B_b and exactly 0 for A_up = A."""
    p, y, b0, _ = _deblur_problem(upper_operator, C=C, H=16, W=16, k=k)
    b = b0 + 0.05 * _rand(*b0.shape, seed=3)
    _, x_hat = _f(p, b, y)
    grad_f, _, _, ok = hypergradient(p, x_hat, b, None, 1e-12, 100000)
    assert ok
    for eps, delta in [(1e-1, 1e-1), (1e-2, 1e-3)]:
        low = p.solve_lower(b, y, eps, 100000)
        assert low.converged and torch.linalg.vector_norm(low.x - x_hat) <= eps
        z, _, _, ok = hypergradient(p, low.x, b, None, delta, 100000)
        assert ok
        err = torch.linalg.vector_norm(z - grad_f).item()
        omega, omega_paper, c = _omega_parts(p, low.x, b, eps, delta)
        assert err <= omega, (err, omega)
        if upper_operator == "learned":
            assert c.L_gtheta > 0 and c.L_gtheta_jac > 0
            assert omega - omega_paper >= c.L_gtheta * eps > 0
        else:
            assert c.L_gtheta == 0 and c.L_gtheta_jac == 0 and omega == omega_paper


@pytest.mark.parametrize("C,k", [(1, 3), (3, 5)])
def test_error_bound_needs_direct_partial_term_for_learned_operator(C, k):
    """ω must hold for every x̃ with ‖x̃ − x̂‖ ≤ ε.  Take x̃ = x̂ + ε v with v the direction in which
    ∂_b g(·, b) changes most (power iteration on its Jacobian), CG solved exactly (δ ≈ 0), and a
    strongly convex lower level (μ₀ = 100, small α/γ²) so that the paper's terms of ω are small:
    then ‖z − ∇f‖ exceeds ω without the term L_{θx}ε + ½L'_{θx}ε² many times over, while the full
    ω still bounds it.  Also checks the closed-form constants against the actual error of ∂_b g."""
    from torch.autograd.functional import jvp, vjp
    g = torch.Generator().manual_seed(0)
    H = W = 16
    x_true = torch.rand(C, H, W, generator=g)
    y = Blur(gaussian_kernel(k, 0.7, channels=C, dtype=torch.float64), (H, W)).A(x_true) \
        + 0.01 * torch.randn(C, H, W, generator=g)
    b0 = motion_kernel(k, channels=C, dtype=torch.float64)
    p = ADPBetaProblem(y, b0, alpha=2e-3, gamma=0.1, beta=1e-3, mu0=100.0, upper_operator="learned")
    b = b0 + 0.05 * _rand(*b0.shape, seed=3)
    _, x_hat = _f(p, b, y)
    grad_f, _, _, ok = hypergradient(p, x_hat, b, None, 1e-13, 100000)
    assert ok

    def dgtheta(x):
        return p.upper_grad_theta(x, b)

    v = _rand(*x_hat.shape, seed=5)
    for _ in range(30):                       # power iteration on GᵀG, G = ∂ₓ∂_b g(x̂, b)
        v = v / torch.linalg.vector_norm(v)
        _, Gv = jvp(dgtheta, x_hat, v)
        _, v = vjp(dgtheta, x_hat, Gv)
    v = v / torch.linalg.vector_norm(v)
    eps, delta = 1e-2, 1e-12
    x_t = x_hat + (eps - 1e-10) * v           # ‖x̃ − x̂(b)‖ ≤ ε (x̂ itself is accurate to 1e-11)
    z, _, _, ok = hypergradient(p, x_t, b, None, delta, 100000)
    assert ok
    err = torch.linalg.vector_norm(z - grad_f).item()
    omega, omega_paper, c = _omega_parts(p, x_t, b, eps, delta)
    # the closed-form constants bound the error of the direct partial, and nearly sharply here
    d_err = torch.linalg.vector_norm(dgtheta(x_t) - dgtheta(x_hat)).item()
    d_bound = c.L_gtheta * eps + 0.5 * c.L_gtheta_jac * eps**2
    assert 0.5 * d_bound < d_err <= d_bound, (d_err, d_bound)
    assert err > 5 * omega_paper, (err, omega_paper)     # the paper's ω alone is not a bound here
    assert err <= omega, (err, omega)
