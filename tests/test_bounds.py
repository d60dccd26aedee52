"""Bounds that MAID's safety and its descent check rest on, checked two-sided where they are exact.

* ω (maid.error_bound): every term is shown to be *necessary* — on a scalar problem built so that
  the true error ``|z − ∇f|`` equals that one term (all other terms vanish), ω must be at least
  the error and, since it is then attained, not larger.  Dropping a term, or shrinking or growing
  its coefficient, fails.
* the sufficient-decrease test (maid.sufficient_decrease): its left side bounds ``f(θ⁺) − f(θ)``
  and on a quadratic upper level with curvature ±L_g in the error directions the bound is
  attained, so the test accepts exactly the steps whose *exact* decrease is ≥ ηα‖z‖².
* the closed-form constants of ADP-β (adp_problem.py) and of the elastic net (elastic_net.py):
  ``L_g``, ``‖J‖``, ``L_J`` against dense matrices on configurations where they are attained;
  ``μ`` and ``L`` of the lower level two-sided.
"""
import math

import pytest
import torch

from conftest import rand
from adp_problem import ADPBetaProblem
from elastic_net import ElasticNetBilevel
from lower_level import LowerLevel
from maid import BilevelProblem, ErrorConstants, error_bound, hypergradient, sufficient_decrease
from operators import Blur, gaussian_kernel, motion_kernel
from regularisers import SmoothedTV


# ------------------------------------------------------------------------------------------
# ω: each term attained on a scalar problem
# ------------------------------------------------------------------------------------------
def _omega_reference(eps, delta, c: ErrorConstants, gxn):
    """SPEC §3's ω plus the direct-partial term, written out independently of maid.py."""
    first = c.L_g * c.J_norm / c.mu + c.L_Hinv * gxn * c.J_norm + c.L_J * gxn / c.mu
    return (first * eps + c.J_norm * delta / c.mu + c.L_J * c.L_g * eps**2 / c.mu
            + c.L_gtheta * eps + 0.5 * c.L_gtheta_jac * eps**2)


@pytest.mark.parametrize("seed", range(5))
def test_error_bound_equals_its_formula(seed):
    """error_bound against the formula written out here, on random positive constants of very
    different sizes (so no term hides behind another); float64 rounding only (rel 1e-13)."""
    g = torch.Generator().manual_seed(seed)
    v = (10.0 ** (4 * torch.rand(10, generator=g, dtype=torch.float64) - 2)).tolist()
    c = ErrorConstants(mu=v[0], L_g=v[1], J_norm=v[2], L_J=v[3], L_Hinv=v[4], L_gtheta=v[5], L_gtheta_jac=v[6])
    eps, delta, gxn = v[7], v[8], v[9]
    ref = _omega_reference(eps, delta, c, gxn)
    assert math.isclose(error_bound(eps, delta, c, gxn), ref, rel_tol=1e-13)


class ScalarProblem(BilevelProblem):
    """A one-dimensional bilevel problem at θ = 0 whose pieces are polynomials with chosen
    coefficients (θ enters only through J and ∂_θg, all that the hypergradient at θ = 0 needs):

        ∇ₓh(x) = μx + (κ/2)x²   (x̂ = 0),   ∇²ₓₓh(x) = μ + κx,   J(x) = ∂_θ∇ₓh = a x − j,
        ∇ₓg(x) = l x + s,   ∂_θg(x) = m (x − c) + (m₂/2)(x − c)².

    The adjoint solve returns ``q̃ = (∇ₓg(x) + r)/∇²ₓₓh(x)``: a residual of exactly ``r`` (the CG
    error that δ bounds), placed by the test.  Exact hypergradient at θ = 0:
    ``∇f = ∂_θg(0) − J(0) q̂``, ``q̂ = s/μ``.
    """

    def __init__(self, mu, kappa=0.0, a=0.0, j=0.0, l=0.0, s=0.0, m=0.0, m2=0.0, c=0.0, r=0.0):
        self.mu, self.kappa, self.a, self.j, self.l, self.s = mu, kappa, a, j, l, s
        self.m, self.m2, self.c, self.r = m, m2, c, r

    def upper_grad_x(self, x, theta):
        return self.l * x + self.s

    def upper_grad_theta(self, x, theta):
        d = x - self.c
        return self.m * d + 0.5 * self.m2 * d * d

    def hessian_vp(self, x, theta, v):
        return (self.mu + self.kappa * x) * v

    def mixed_vjp(self, x, theta, q):
        return (self.a * x - self.j) * q

    def solve_adjoint(self, x, theta, rhs, q0, delta, max_iter):
        assert abs(self.r) <= delta
        return (rhs + self.r) / (self.mu + self.kappa * x), 1, True

    def exact_hypergradient(self):
        return 0.5 * self.m2 * self.c**2 - self.m * self.c + self.j * self.s / self.mu


def _error_and_omega(p: ScalarProblem, x_tilde: float, eps: float, delta: float, consts: dict):
    x = torch.tensor([x_tilde])
    z, *_ = hypergradient(p, x, torch.zeros(1), None, delta, 10)
    err = abs(z.item() - p.exact_hypergradient())
    gxn = abs(p.upper_grad_x(x, None).item())
    return err, error_bound(eps, delta, ErrorConstants(mu=p.mu, **consts), gxn)


def test_omega_delta_term_is_attained():
    """x̃ = x̂, CG residual exactly δ: |z − ∇f| = |j|δ/μ = (‖J‖/μ)δ, the only nonzero term."""
    mu, j, s, delta = 0.4, 3.0, 2.0, 1e-3
    err, omega = _error_and_omega(ScalarProblem(mu, j=j, s=s, r=delta), 0.0, 0.0, delta,
                                  dict(L_g=0.0, J_norm=j, L_J=0.0, L_Hinv=0.0))
    assert math.isclose(err, j * delta / mu, rel_tol=1e-9)
    assert err <= omega <= err * (1 + 1e-9), (err, omega)


def test_omega_Lg_J_over_mu_term_is_attained():
    """∇ₓg = l x, J = −j constant, x̃ = ε: |z − ∇f| = l|j|ε/μ = (L_g‖J‖/μ)ε, the only term."""
    mu, j, l, eps = 0.3, 2.0, 5.0, 1e-2
    err, omega = _error_and_omega(ScalarProblem(mu, j=j, l=l), eps, eps, 0.0,
                                  dict(L_g=l, J_norm=j, L_J=0.0, L_Hinv=0.0))
    assert math.isclose(err, l * j * eps / mu, rel_tol=1e-9)
    assert err <= omega <= err * (1 + 1e-9), (err, omega)


def test_omega_inverse_hessian_term_is_attained_to_first_order():
    """∇²ₓₓh = μ + κx, so x ↦ (∇²ₓₓh)⁻¹ has Lipschitz constant κ/μ² on [0, ε]; with ∇ₓg = s,
    J = −j, x̃ = ε: |z − ∇f| = |j s| κε/(μ(μ + κε)) = L_{H⁻¹}‖∇ₓg‖‖J‖ε · μ/(μ + κε).  With
    κε/μ = 1e-4 the error is within 1e-4 (relative) of that term, the only one in ω."""
    mu, kappa, j, s = 0.5, 2.0, 3.0, 1.5
    eps = 1e-4 * mu / kappa
    err, omega = _error_and_omega(ScalarProblem(mu, kappa=kappa, j=j, s=s), eps, eps, 0.0,
                                  dict(L_g=0.0, J_norm=j, L_J=0.0, L_Hinv=kappa / mu**2))
    assert err <= omega <= err * (1 + 2e-4), (err, omega)


def test_omega_LJ_gradient_term_is_attained():
    """J(x) = a x (so J(x̂) = 0, L_J = |a|), ∇ₓg = s, x̃ = ε: |z − ∇f| = |a s|ε/μ = (L_J‖∇ₓg‖/μ)ε.
    (The ‖J‖ of the other terms is ‖J(x̃)‖ = |a|ε and multiplies L_g = 0 and δ = 0.)"""
    mu, a, s, eps = 0.7, 4.0, 2.5, 1e-2
    err, omega = _error_and_omega(ScalarProblem(mu, a=a, s=s), eps, eps, 0.0,
                                  dict(L_g=0.0, J_norm=a * eps, L_J=a, L_Hinv=0.0))
    assert math.isclose(err, a * s * eps / mu, rel_tol=1e-9)
    assert err <= omega <= err * (1 + 1e-9), (err, omega)


def test_omega_second_order_term_is_attained():
    """J(x) = a(x − ε) and ∇ₓg = l(x − ε) both vanish at x̃ = ε, so z = 0 while
    ∇f = −J(0) q̂ = −a l ε²/μ: |z − ∇f| = (L_J L_g/μ)ε², the only nonzero term of ω."""
    mu, a, l, eps = 0.6, 3.0, 2.0, 5e-2
    p = ScalarProblem(mu, a=a, j=a * eps, l=l, s=-l * eps)
    err, omega = _error_and_omega(p, eps, eps, 0.0, dict(L_g=l, J_norm=0.0, L_J=a, L_Hinv=0.0))
    assert math.isclose(err, a * l * eps**2 / mu, rel_tol=1e-9)
    assert err <= omega <= err * (1 + 1e-9), (err, omega)


def test_omega_direct_partial_terms_are_attained():
    """∂_θg(x) = m x (L_{θx} = |m|): error |m|ε.  ∂_θg(x) = (m₂/2)(x − ε)² (flat at x̃ = ε,
    L_{θx} = 0, L'_{θx} = |m₂|): error |m₂|ε²/2.  Each is the only term of ω."""
    mu, m, m2, eps = 0.5, 3.0, 7.0, 1e-2
    err, omega = _error_and_omega(ScalarProblem(mu, m=m), eps, eps, 0.0,
                                  dict(L_g=0.0, J_norm=0.0, L_J=0.0, L_Hinv=0.0, L_gtheta=m))
    assert math.isclose(err, m * eps, rel_tol=1e-9) and err <= omega <= err * (1 + 1e-9)
    err, omega = _error_and_omega(ScalarProblem(mu, m2=m2, c=eps), eps, eps, 0.0,
                                  dict(L_g=0.0, J_norm=0.0, L_J=0.0, L_Hinv=0.0, L_gtheta_jac=m2))
    assert math.isclose(err, 0.5 * m2 * eps**2, rel_tol=1e-9) and err <= omega <= err * (1 + 1e-9)


# ------------------------------------------------------------------------------------------
# the sufficient-decrease test against the exact objective difference
# ------------------------------------------------------------------------------------------
def _worst_case_pair(L, eps, a=1.3, p=0.4, q=0.8, drop=3.0):
    """Upper level ``g(x, θ) = a x₁ − (L/2)x₁² + (L/2)x₂² + φ(θ)`` (``∇ₓg`` is L-Lipschitz; curvature
    −L along e₁, +L along e₂; ``φ(θ⁺) − φ(θ) = −drop``, the part of the decrease that the step in θ
    makes) and lower solutions placed ε from the solver's output, in the worst direction allowed
    by ``‖x̃ − x̂‖ ≤ ε``:

    * old point: ``x̃ = (p, 0)`` (∇g = (a − Lp, 0)), ``x̂ = x̃ − ε sign(a − Lp) e₁``, so
      ``f(θ) = g(x̂) = g(x̃) − ‖∇g(x̃)‖ε − Lε²/2`` exactly;
    * new point: ``x̃⁺ = (a/L, q)`` (∇g = (0, Lq)), ``x̂⁺ = x̃⁺ + ε sign(q) e₂``, so
      ``f(θ⁺) = g(x̂⁺) = g(x̃⁺) + ‖∇g(x̃⁺)‖ε + Lε²/2`` exactly.

    Returns the arguments of sufficient_decrease at the two points and the exact ``f(θ⁺) − f(θ)``."""
    def g(x1, x2, phi):
        return a * x1 - 0.5 * L * x1**2 + 0.5 * L * x2**2 + phi

    gx_old = abs(a - L * p)
    x1_hat = p - eps * math.copysign(1.0, a - L * p)
    gx_new = abs(L * q)
    x2_hat = q + eps * math.copysign(1.0, q)
    f_diff = g(a / L, x2_hat, -drop) - g(x1_hat, 0.0, 0.0)
    return (g(a / L, q, -drop), gx_new, L, g(p, 0.0, 0.0), gx_old, L), f_diff


@pytest.mark.parametrize("L,eps,z_norm", [(2.0, 1e-2, 0.3), (0.5, 3e-2, 4.0)])
def test_sufficient_decrease_accepts_exactly_the_certified_decreases(L, eps, z_norm):
    """On the worst case of :func:`_worst_case_pair` the test's left side equals the exact
    ``f(θ⁺) − f(θ)``.  With ηα‖z‖² set 1e-9 (relative) on either side of the exact decrease, the
    test accepts iff the exact decrease is at least ηα‖z‖²: a bound with a margin dropped, or
    with ‖z‖ for ‖z‖² (‖z‖ ≠ 1 here), accepts a step it must reject or rejects one it may accept."""
    args, f_diff = _worst_case_pair(L, eps)
    assert f_diff < 0
    step = 0.7
    for factor, expect in [(1 - 1e-9, True), (1 + 1e-9, False)]:
        eta = -f_diff * factor / (step * z_norm**2)      # −ηα‖z‖² = f_diff·factor
        accepted = sufficient_decrease(*args, eps, eta, step, z_norm)
        assert accepted == expect, (factor, accepted)
        assert accepted == (f_diff <= -eta * step * z_norm**2)


def test_sufficient_decrease_margins_are_each_needed():
    """Margins on one side only: on the worst case, the old-point margin ‖∇g‖ε + L_gε²/2 alone
    (new point exact, ε-terms there zero via ‖∇g⁺‖ = 0 and L⁺ = 0 passed) still decides exactly,
    so the L_g ε²/2 of the old point cannot be dropped or halved; likewise the new point's."""
    L, eps, a, p = 2.0, 5e-2, 1.3, 0.4
    g_old, gx_old = a * p - 0.5 * L * p**2, abs(a - L * p)
    f_old = g_old - gx_old * eps - 0.5 * L * eps**2       # g at x̂ = x̃ − ε sign(∇g) e₁
    g_new = f_old - 1e-3                                   # new point exact: f(θ⁺) = g_new
    f_diff = g_new - f_old
    for factor, expect in [(1 - 1e-9, True), (1 + 1e-9, False)]:
        eta = -f_diff * factor / 1.0
        assert sufficient_decrease(g_new, 0.0, 0.0, g_old, gx_old, L, eps, eta, 1.0, 1.0) == expect
    # new-point margin alone: old point exact (f = g_old), new point worst case along e₂
    q = 0.8
    g_new, gx_new = 0.5 * L * q**2, L * q
    f_new = g_new + gx_new * eps + 0.5 * L * eps**2
    g_old = f_new + 1e-3
    f_diff = f_new - g_old
    for factor, expect in [(1 - 1e-9, True), (1 + 1e-9, False)]:
        eta = -f_diff * factor
        assert sufficient_decrease(g_new, gx_new, L, g_old, 0.0, 0.0, eps, eta, 1.0, 1.0) == expect


# ------------------------------------------------------------------------------------------
# closed-form constants of ADP-β
# ------------------------------------------------------------------------------------------
def _adp(y, b0, upper_operator="learned", weight=0.02, smoothing=0.05, beta=1e-3, mu0=1e-2):
    return ADPBetaProblem(y, b0, SmoothedTV(weight, smoothing), beta, mu0, upper_operator)


def _dense_J(b, x, y):
    """``J = ∂_b∇ₓh(x, b)`` as a dense (N × Ck²) matrix, column by column from its definition
    ``J δ = B_δᵀ(B_b x − y) + B_bᵀ B_δ x`` (operators.Blur only; not adp_problem.mixed_vjp)."""
    shape = x.shape[-2:]
    Bb = Blur(b, shape)
    r = Bb.A(x) - y
    cols = []
    for e in torch.eye(b.numel()):
        Bd = Blur(e.reshape(b.shape), shape)
        cols.append((Bd.A_adjoint(r) + Bb.A_adjoint(Bd.A(x))).flatten())
    return torch.stack(cols, 1)


def _spectral_norm(M):
    return torch.linalg.matrix_norm(M, ord=2).item()


@pytest.mark.parametrize("upper_operator", ["learned", "known"])
def test_adp_upper_lipschitz_is_exact(upper_operator):
    """``∇ₓg = (2/n)A_upᵀ(A_up x − y)`` is affine with matrix (2/n)A_upᵀA_up: L_g must equal that
    matrix's largest eigenvalue (dense, from differences of upper_grad_x); 1e-10 relative."""
    C, H, W = 1, 8, 7
    y = rand(C, H, W, seed=1)
    b0 = gaussian_kernel(3, 0.6, channels=C, dtype=torch.float64)
    b = b0 + 0.1 * rand(*b0.shape, seed=2)
    p = _adp(y, b0, upper_operator)
    x0 = torch.zeros(C, H, W)
    g0 = p.upper_grad_x(x0, b)
    G = torch.stack([(p.upper_grad_x(e.reshape(x0.shape), b) - g0).flatten() for e in torch.eye(x0.numel())], 1)
    lam = torch.linalg.eigvalsh(0.5 * (G + G.T)).max().item()
    c = p.error_constants(rand(C, H, W, seed=3), b)
    assert math.isclose(c.L_g, lam, rel_tol=1e-10), (c.L_g, lam)
    assert math.isclose(p.upper_lipschitz(x0, b), lam, rel_tol=1e-10)


def test_adp_J_norm_data_term_attained_at_x_zero():
    """At x = 0: J δ = −B_δᵀy, whose norm is ‖C_y‖ = the ‖C_r‖ term of the bound (the other term
    has ‖C_x‖ = 0).  The bound must be ≥ the dense norm and, here, equal to it (1e-9)."""
    C, H, W, k = 1, 9, 8, 3
    y = rand(C, H, W, seed=4)
    b = motion_kernel(k, channels=C, dtype=torch.float64)
    x = torch.zeros(C, H, W)
    exact = _spectral_norm(_dense_J(b, x, y))
    J = _adp(y, b).error_constants(x, b).J_norm
    assert exact <= J * (1 + 1e-12) and J <= exact * (1 + 1e-9), (J, exact)


def test_adp_J_norm_operator_term_attained_for_constant_image():
    """y = B_b x with x constant (r = 0): J δ = B_bᵀB_δ x = (Σδ) x (b sums to 1), whose norm is
    k‖x‖ = ‖B_b‖‖C_x‖, the second term of the bound, attained.  Dropping it leaves 0."""
    C, H, W, k = 1, 9, 8, 3
    b = gaussian_kernel(k, 0.8, channels=C, dtype=torch.float64)
    x = torch.full((C, H, W), 0.6)
    y = Blur(b, (H, W)).A(x)
    exact = _spectral_norm(_dense_J(b, x, y))
    assert math.isclose(exact, k * torch.linalg.vector_norm(x).item(), rel_tol=1e-9)
    J = _adp(y, b).error_constants(x, b).J_norm
    assert exact <= J * (1 + 1e-12) and J <= exact * (1 + 1e-9), (J, exact)


def test_adp_J_lipschitz_constant_attained_by_constant_direction():
    """``J(x) − J(x′): δ ↦ B_δᵀB_b e + B_bᵀB_δ e``, e = x − x′.  For a constant e and a non-negative
    b (‖B_b‖ = Σb = 2 here, so that ‖B_b‖ and 1/‖B_b‖ differ) this is δ ↦ 2(Σb)(Σδ)e, of norm
    2k‖B_b‖‖e‖: L_J must be at least that and (it is) not more — so L_J = k‖B_b‖ fails."""
    C, H, W, k = 1, 8, 8, 5
    b = 2 * gaussian_kernel(k, 1.2, channels=C, dtype=torch.float64)      # ‖B_b‖ = Σb = 2
    y = rand(C, H, W, seed=5)
    x = rand(C, H, W, seed=6)
    e = torch.full_like(x, 0.3)
    diff = _spectral_norm(_dense_J(b, x + e, y) - _dense_J(b, x, y)) / torch.linalg.vector_norm(e).item()
    L_J = _adp(y, b).error_constants(x, b).L_J
    assert diff <= L_J * (1 + 1e-12) and L_J <= diff * (1 + 1e-9), (L_J, diff)


def test_adp_direct_partial_constants():
    """Learned operator: ∂_b g(x) = β∇P + (2/n)K(x)ᵀ(B_b x − y) is quadratic in x, so
    ∂_b g(x + e) + ∂_b g(x − e) − 2∂_b g(x) = (4/n)K(e)ᵀB_b e exactly; for a constant e its norm is
    (4/n)k‖B_b‖‖e‖² = L'_{θx}‖e‖² (attained: L'_{θx} = (4/n)k‖B_b‖ exactly, ‖B_b‖ = 2 here).  And
    L_{θx} = (2/n)·(the ‖J‖ bound), as derived in adp_problem's docstring.  Known operator: ∂_b g is
    the penalty's gradient alone, both constants 0."""
    C, H, W, k = 1, 8, 8, 3
    b = 2 * gaussian_kernel(k, 0.8, channels=C, dtype=torch.float64)
    y, x = rand(C, H, W, seed=7), rand(C, H, W, seed=8)
    e = torch.full_like(x, 0.4)
    p = _adp(y, b)
    c = p.error_constants(x, b)
    n = y.numel()
    assert math.isclose(c.L_gtheta, 2 / n * c.J_norm, rel_tol=1e-14)
    assert math.isclose(c.L_gtheta_jac, 4 / n * k * 2.0, rel_tol=1e-12)
    d = p.upper_grad_theta(x + e, b) + p.upper_grad_theta(x - e, b) - 2 * p.upper_grad_theta(x, b)
    second = torch.linalg.vector_norm(d).item() / torch.linalg.vector_norm(e).item() ** 2
    assert math.isclose(second, c.L_gtheta_jac, rel_tol=1e-9), (second, c.L_gtheta_jac)
    ck = _adp(y, b, "known").error_constants(x, b)
    assert ck.L_gtheta == 0.0 and ck.L_gtheta_jac == 0.0


def test_lower_level_mu_and_L_two_sided_with_tv():
    """h = ½‖B_b x − y‖² + α R_γ(x) + (μ₀/2)‖x‖² with b the identity kernel, at a constant x
    (∇x = 0): ∇²h = (1 + μ₀)I + (α/γ)DᵀD.  λ_min = 1 + μ₀ = μ (DᵀD is singular on constants) and
    λ_max = 1 + μ₀ + (α/γ)λ_max(DᵀD) with λ_max(DᵀD) = 8cos²(π/2N) on an N×N grid (Neumann),
    1 % below the bound 8 at N = 16: μ exact, L within 1 % of the dense Hessian's top eigenvalue."""
    N, alpha, gamma, mu0 = 16, 0.05, 0.1, 0.2
    b = torch.zeros(1, 1, 3, 3)
    b[0, 0, 1, 1] = 1.0
    h = LowerLevel(b, torch.zeros(1, N, N), SmoothedTV(alpha, gamma), mu0)
    x = torch.full((1, N, N), 0.5)
    Hm = torch.stack([h.hvp(x, e.reshape(x.shape)).flatten() for e in torch.eye(N * N)], 1)
    ev = torch.linalg.eigvalsh(0.5 * (Hm + Hm.T))
    assert math.isclose(ev.min().item(), h.mu, rel_tol=1e-10), (ev.min().item(), h.mu)
    top = 1 + mu0 + alpha / gamma * 8 * math.cos(math.pi / (2 * N)) ** 2
    assert math.isclose(ev.max().item(), top, rel_tol=1e-10)
    assert ev.max().item() <= h.L <= 1.01 * ev.max().item(), (h.L, ev.max().item())


# ------------------------------------------------------------------------------------------
# closed-form constants of the elastic net
# ------------------------------------------------------------------------------------------
def _circulant(n, width=1.5):
    i = torch.arange(n, dtype=torch.float64)
    d = torch.minimum((i[:, None] - i[None, :]).abs(), n - (i[:, None] - i[None, :]).abs())
    return 2.0 * torch.exp(-d**2 / (2 * width**2))


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_elastic_net_upper_lipschitz_is_exact(scale):
    """∇ₓg = scale·Aᵀ(Ax − y): L_g = scale·‖A‖² = λ_max(scale·AᵀA), two-sided (1e-10), with
    ‖A‖ ≈ 4 so that ‖A‖ and ‖A‖² differ."""
    n = 20
    A = _circulant(n) + 0.1 * rand(n, n, seed=1)
    p = ElasticNetBilevel(A, rand(n, seed=2), 0.1, 0.05, scale=scale)
    x0 = torch.zeros(n)
    G = torch.stack([p.upper_grad_x(e, A) - p.upper_grad_x(x0, A) for e in torch.eye(n)], 1)
    lam = torch.linalg.eigvalsh(0.5 * (G + G.T)).max().item()
    assert torch.linalg.matrix_norm(A, ord=2).item() > 2
    assert math.isclose(p.error_constants(x0, A).L_g, lam, rel_tol=1e-10)
    assert math.isclose(p.upper_lipschitz(x0, A), lam, rel_tol=1e-10)


def _elastic_net_J(p, B, x):
    """Dense ``J = ∂_B∇ₓh(x, B)`` restricted to the support (rows) as an (n × n²) matrix, from
    ``J E = [Eᵀ(Bx − y) + BᵀE x]_S``."""
    m = (x != 0).to(x.dtype)
    r = B @ x - p.y
    cols = [m * (E.T @ r + B.T @ (E @ x)) for E in torch.eye(B.numel()).reshape(-1, *B.shape)]
    return torch.stack(cols, 1)


def test_elastic_net_J_bounds_attained():
    """With a symmetric circulant B (‖B‖ = its row sum, so the cheap bound on ‖B‖ is exact):
    y = Bx makes ‖J‖ = ‖B‖‖x‖, the bound's second term (attained by E = u xᵀ/‖x‖); and for
    e = x − x′ along B's top eigenvector ‖J(x) − J(x′)‖ = 2‖B‖‖e‖ = L_J‖e‖.  Both two-sided."""
    n = 12
    B = _circulant(n)
    x = torch.full((n,), 0.5) + 0.05 * rand(n, seed=3)
    p = ElasticNetBilevel(B, B @ x, 0.1, 0.05)
    c = p.error_constants(x, B)
    exact = _spectral_norm(_elastic_net_J(p, B, x))
    assert exact <= c.J_norm * (1 + 1e-12) and c.J_norm <= exact * (1 + 1e-9), (c.J_norm, exact)
    e = torch.full((n,), 0.2)                     # top eigenvector of a circulant: the constant
    diff = _spectral_norm(_elastic_net_J(p, B, x + e) - _elastic_net_J(p, B, x)) / torch.linalg.vector_norm(e).item()
    assert diff <= c.L_J * (1 + 1e-12) and c.L_J <= diff * (1 + 1e-9), (c.L_J, diff)
