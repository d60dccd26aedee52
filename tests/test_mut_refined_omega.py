"""The refined a-posteriori bound of :class:`adp_problem.ADPBetaProblem` (module docstring, item 8):
``ω_ref = ‖z − z'‖ + ω(x', q')`` with the Newton-corrected reference pair ``(x', q')``.

Truth: ``∇f(b) = ∂_b g(x̂) − Ĵᵀq̂`` with ``x̂`` the lower level solved to ``‖x̂ − x̂_true‖ ≤ 1e-11`` and
``q̂`` by CG to relative residual 1e-14 (float64).  Checked: soundness ``ω_ref ≥ ‖z − ∇f‖`` on random
and image problems (hypothesis, derandomised, bounded examples), the provable two-sided bracket
``‖z − ∇f‖ ≤ ω_ref ≤ ‖z − ∇f‖ + 2ω(x', q')``, each term against a dense reference (tiny problem:
the Newton step with the autograd Hessian, ``z'`` with the dense ``J(x')``), and each of the two
terms against what it bounds on a problem built to make it dominant.
"""
import math
import os

import pytest
import torch
from conftest import rand
from hypothesis import Phase, given, settings, strategies as st
from test_mut_adp_problem import C, H, K, W, _Dense, _point, _problem

from adp_problem import ADPBetaProblem
from imaging import load_image
from maid import conjugate_gradient, hypergradient
from operators import Blur, gaussian_kernel, motion_kernel
from regularisers import SmoothedTV

PROPS = settings(max_examples=25, derandomize=True, deadline=None, database=None,
                 phases=[Phase.explicit, Phase.generate])      # no shrinking: a failure reports at once
IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "images")


def _nrm(t) -> float:
    return torch.linalg.vector_norm(t).item()


def _make(x_true, k, op, alpha, gamma, mu0, seed):
    """Motion-blurred noisy data of ``x_true`` (Gaussian blur, noise 0.02), ``b₀`` the motion kernel,
    ``b`` a random perturbation of it."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = x_true.shape
    a = gaussian_kernel(k, 0.8, channels=c, dtype=torch.float64)
    y = Blur(a, (h, w)).A(x_true) + 0.02 * torch.randn(c, h, w, generator=g, dtype=torch.float64)
    b0 = motion_kernel(k, channels=c, dtype=torch.float64)
    p = ADPBetaProblem(y, b0, SmoothedTV(alpha, gamma), 0.1, mu0=mu0, upper_operator=op,
                       known_kernel=a if op == "known" else None)
    return p, b0 + 0.02 * torch.randn(b0.shape, generator=g, dtype=torch.float64), y


def _true_gradient(p, b, y):
    """``∇f(b)`` from tightly solved ``x̂`` and ``q̂`` (both solves asserted to reach their tolerance)."""
    low = p.solve_lower(b, y, 1e-11, 100000)
    assert low.status != "max_iter"
    x_hat, h = low.x, p.lower(b)
    gx = p.upper_grad_x(x_hat, b)
    q_hat, _, ok = conjugate_gradient(lambda v: h.hvp(x_hat, v), gx, None, 1e-14 * _nrm(gx), 50000)
    assert ok
    return p.upper_grad_theta(x_hat, b) - p.mixed_vjp(x_hat, b, q_hat)


def _check_bracket(p, b, y, eps, delta_rel, grad_f=None):
    """``‖z − ∇f‖ ≤ ω_ref ≤ ‖z − ∇f‖ + 2ω(x', q')`` and ``ω_ref ≤ ω_local``; returns ``(ω_ref, error)``."""
    grad_f = _true_gradient(p, b, y) if grad_f is None else grad_f
    x = p.solve_lower(b, y, eps, 200000).x
    z, q, _, _ = hypergradient(p, x, b, None, delta_rel * _nrm(p.upper_grad_x(x, b)), 10000)
    t = p.refined_error_terms(x, b, q)
    err = _nrm(z - grad_f)
    assert t["omega"] >= err
    assert t["omega"] <= err + 2 * t["omega_reference"] + 1e-12 * _nrm(z)
    assert t["omega"] <= t["omega_local"]
    return t["omega"], err


@st.composite
def random_case(draw):
    """A random problem: C ∈ 1..3, H, W ∈ 8..16, k ∈ {3, 5}, either upper operator, α, γ, μ₀ over
    up to 1.5 orders of magnitude each (the reference solves must reach 1e-11 in float64: ‖∇h‖ ≤ μ·1e-11
    is above rounding for μ₀ ≥ 3e-3), and a lower accuracy / relative CG tolerance."""
    c, h, w = draw(st.integers(1, 3)), draw(st.integers(8, 16)), draw(st.integers(8, 16))
    k = draw(st.sampled_from([3, 5]))
    op = draw(st.sampled_from(["learned", "known"]))
    alpha = draw(st.sampled_from([0.002, 0.005, 0.02, 0.05]))
    gamma = draw(st.sampled_from([0.01, 0.03, 0.1]))
    mu0 = draw(st.sampled_from([3e-3, 1e-2, 1e-1]))
    eps = draw(st.sampled_from([1e-2, 1e-3, 1e-4]))
    delta_rel = draw(st.sampled_from([0.3, 1e-2, 1e-5]))
    seed = draw(st.integers(0, 2**16))
    x_true = torch.rand(c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x_true[..., : h // 2, :] += 0.5                                   # an edge
    return _make(x_true, k, op, alpha, gamma, mu0, seed), eps, delta_rel


@PROPS
@given(random_case())
def test_refined_bound_brackets_the_true_error_on_random_problems(case):
    (p, b, y), eps, delta_rel = case
    _check_bracket(p, b, y, eps, delta_rel)


@pytest.mark.parametrize("name,top,left,op", [("astronaut.png", 40, 100, "learned"), ("chelsea.png", 30, 60, "known"),
                                              ("coffee.png", 60, 20, "known"), ("rocket.jpg", 90, 70, "learned")])
def test_refined_bound_brackets_the_true_error_on_image_crops(name, top, left, op):
    """24×24 colour crops of the bundled images at the default run's α, γ, μ₀ (0.005, 0.01, 1e-2),
    at ε = 1e-2 and 1e-3 and the default's CG tolerance (relative ~1e-2)."""
    img = load_image(os.path.join(IMAGES, name), 128, 128, 3, IMAGES).to(torch.float64)
    p, b, y = _make(img[:, top:top + 24, left:left + 24].contiguous(), 5, op, 0.005, 0.01, 1e-2, 0)
    grad_f = _true_gradient(p, b, y)
    for eps in (1e-2, 1e-3):
        _check_bracket(p, b, y, eps, 1e-2, grad_f)


def test_refined_bound_is_within_a_small_factor_where_the_reference_is_accurate():
    """On a 3×32×32 crop at ε = 1e-2 (the default run's starting accuracy), where the local bound
    ω(x̃, q̃) is ≥ 100× the true error, ``ω_ref ≤ 3‖z − ∇f‖``: ``ω(x', q')`` after the Newton step is
    below the true error (the bracket gives ``ω_ref ≤ err + 2ω(x', q')``)."""
    img = load_image(os.path.join(IMAGES, "astronaut.png"), 128, 128, 3, IMAGES).to(torch.float64)
    p, b, y = _make(img[:, 30:62, 90:122].contiguous(), 5, "known", 0.005, 0.01, 1e-2, 1)
    grad_f = _true_gradient(p, b, y)
    x = p.solve_lower(b, y, 1e-2, 200000).x
    z, q, _, _ = hypergradient(p, x, b, None, 1e-2 * _nrm(p.upper_grad_x(x, b)), 10000)
    t = p.refined_error_terms(x, b, q)
    err = _nrm(z - grad_f)
    assert t["omega_local"] >= 100 * err
    assert err <= t["omega"] <= 3 * err


def test_terms_against_dense_newton_step_and_dense_jacobian():
    """Tiny problem, tight tolerances: ``x' = x̃ − H̃⁻¹∇h(x̃)`` (autograd Hessian, dense solve),
    ``q' = ∇²h(x')⁻¹∇ₓg(x')`` (dense), ``shift = ‖z − z'‖`` with ``z' = ∂_b g(x') − J(x')ᵀq'`` (dense J),
    ``omega_reference = ω(x', q')`` and ``κ'``, ``omega_local = ω(x̃, q̃)``, ``omega`` their minimum."""
    p, b, y = _problem("learned")
    x, q = _point(p, b, y)
    t = p.refined_error_terms(x, b, q, newton_rtol=1e-13, adjoint_rtol=1e-13)
    d = _Dense(p, b, x, q)
    h = p.lower(b)
    x_ref = x - torch.linalg.solve(d.H, h.grad(x).reshape(-1)).reshape(C, H, W)
    assert _nrm(t["x_reference"] - x_ref) <= 1e-9 * _nrm(x_ref)
    d2 = _Dense(p, b, x_ref, q)
    q_ref = torch.linalg.solve(d2.H, p.upper_grad_x(x_ref, b).reshape(-1)).reshape(C, H, W)
    assert _nrm(t["q_reference"] - q_ref) <= 1e-9 * _nrm(q_ref)
    z = p.upper_grad_theta(x, b) - (d.J.T @ q.reshape(-1)).reshape(b.shape)
    z_ref = p.upper_grad_theta(x_ref, b) - (d2.J.T @ q_ref.reshape(-1)).reshape(b.shape)
    assert t["shift"] == pytest.approx(_nrm(z - z_ref), rel=1e-8)
    at_ref = p.hypergradient_error_terms(t["x_reference"], b, t["q_reference"])
    assert t["omega_reference"] == at_ref["omega"]
    assert t["kappa_reference"] == at_ref["kappa"]
    assert t["omega_local"] == p.hypergradient_error_bound(x, b, q)
    assert t["omega"] == min(t["omega_local"], t["shift"] + t["omega_reference"])
    assert p.refined_error_bound(x, b, q, 1e-13, 1e-13) == t["omega"]
    assert p.refined_error_bound(x, b, q) == p.refined_error_terms(x, b, q)["omega"]     # the same defaults
    assert t["newton_iterations"] > 0 and t["adjoint_iterations"] > 0
    two = p.refined_error_terms(x, b, q, newton_rtol=1e-13, adjoint_rtol=1e-13, newton_steps=2)
    d3 = _Dense(p, b, x_ref, q)
    x_two = x_ref - torch.linalg.solve(d3.H, h.grad(x_ref).reshape(-1)).reshape(C, H, W)
    assert _nrm(two["x_reference"] - x_two) <= 1e-9 * _nrm(x_two)
    assert two["newton_iterations"] > t["newton_iterations"]


def test_cg_tolerances_are_relative_to_the_initial_residuals():
    """Default tolerances: the Newton CG stops at ``newton_rtol·‖∇h(x̃)‖`` and the adjoint CG, warm-started
    at q̃, at ``adjoint_rtol·‖∇ₓg(x') − ∇²h(x')q̃‖`` — the same iterates and counts as
    :func:`maid.conjugate_gradient` called with those absolute tolerances."""
    p, b, y = _problem("known")
    x, q = _point(p, b, y)
    h = p.lower(b)
    for rtol in (1e-2, 1e-5):
        t = p.refined_error_terms(x, b, q, newton_rtol=rtol, adjoint_rtol=rtol)
        g = h.grad(x)
        d, it, ok = conjugate_gradient(lambda v: h.hvp(x, v), g, None, rtol * _nrm(g), 1000)
        assert ok and it == t["newton_iterations"]
        assert torch.equal(t["x_reference"], x - d)
        xr = t["x_reference"]
        gx = p.upper_grad_x(xr, b)
        r0 = _nrm(gx - h.hvp(xr, q))
        qr, it, ok = conjugate_gradient(lambda v: h.hvp(xr, v), gx, q, rtol * r0, 1000)
        assert ok and it == t["adjoint_iterations"] and torch.equal(qr, t["q_reference"])
        assert _nrm(gx - h.hvp(xr, qr)) <= 1.01 * rtol * r0


def test_each_term_bounds_what_it_stands_for_where_it_dominates():
    """``ω(x', q') ≥ ‖z' − ∇f‖`` where it dominates (a loose adjoint tolerance 0.5 leaves q' poor), and
    ``shift ≥ ‖z − ∇f‖ − ω(x', q')`` where the shift dominates (tight tolerances, loose x̃, q̃)."""
    p, b, y = _make(0.5 + rand(2, 12, 12, seed=4).clamp(-1, 1) * 0.3, 3, "learned", 0.02, 0.01, 1e-2, 2)
    grad_f = _true_gradient(p, b, y)
    x = p.solve_lower(b, y, 1e-3, 200000).x
    z, q, _, _ = hypergradient(p, x, b, None, 1e-3 * _nrm(p.upper_grad_x(x, b)), 10000)
    loose = p.refined_error_terms(x, b, q, newton_rtol=1e-10, adjoint_rtol=0.5)
    z_ref = p.upper_grad_theta(loose["x_reference"], b) - p.mixed_vjp(loose["x_reference"], b, loose["q_reference"])
    assert loose["omega_reference"] > loose["shift"]
    assert loose["omega_reference"] >= _nrm(z_ref - grad_f)
    x = p.solve_lower(b, y, 1e-2, 200000).x
    z, q, _, _ = hypergradient(p, x, b, None, 0.3 * _nrm(p.upper_grad_x(x, b)), 10000)
    tight = p.refined_error_terms(x, b, q, newton_rtol=1e-10, adjoint_rtol=1e-10)
    err = _nrm(z - grad_f)
    assert tight["shift"] > 10 * tight["omega_reference"]
    assert tight["shift"] >= err - tight["omega_reference"]
    assert tight["omega"] >= err


def test_bad_tolerances_and_zero_mu():
    """Non-positive or non-finite tolerances are refused; ω = inf when μ = 0 (a kernel with a spectral
    zero and μ₀ = 0), as for the local bound."""
    p, b, y = _problem("known")
    x, q = _point(p, b, y)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="newton_rtol"):
            p.refined_error_terms(x, b, q, newton_rtol=bad)
        with pytest.raises(ValueError, match="adjoint_rtol"):
            p.refined_error_terms(x, b, q, adjoint_rtol=bad)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="newton_steps"):
            p.refined_error_terms(x, b, q, newton_steps=bad)
    zero = torch.zeros(C, 1, K, K, dtype=torch.float64)
    zero[:, 0, 1, 0] = zero[:, 0, 1, 1] = 0.5           # b̂ = 0 at the Nyquist column (W even), μ₀ = 0
    p0 = ADPBetaProblem(y, zero, SmoothedTV(0.05, 0.05), 0.1, mu0=0.0)
    assert p0.refined_error_bound(x, zero, q) == math.inf
