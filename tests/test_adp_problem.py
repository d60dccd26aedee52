"""adp_problem.py with the regulariser seam: any Regulariser in the lower level, L_H read from it,
the hypergradient of a non-default regulariser against finite differences."""
import math

import pytest
import torch
from conftest import fd_directional, rand

from adp_problem import ADPBetaProblem
from maid import hypergradient
from operators import Blur, gaussian_kernel, h1_norm, h1_norm_grad, h1_penalty, motion_kernel
from regularisers import AnisotropicTV, FieldsOfExperts, SmoothedTV


def _data(C=1, H=8, W=7, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_true = torch.rand(C, H, W, generator=g)
    y = Blur(gaussian_kernel(k, 0.7, channels=C, dtype=torch.float64), (H, W)).A(x_true)
    return y + 0.01 * rand(C, H, W, seed=seed + 1), motion_kernel(k, channels=C, dtype=torch.float64)


class _ScaledTV(SmoothedTV):
    """Smoothed TV whose Hessian-Lipschitz constant is a marker value."""

    def hessian_lipschitz(self):
        return 123.0


def test_error_constants_read_hessian_lipschitz_from_the_regulariser():
    """``L_{H⁻¹} = L_H/μ²`` with ``L_H = R.hessian_lipschitz()``: a marker value comes through
    exactly, and for SmoothedTV it is 48√8 α/γ² (the previous hard-wired constant)."""
    y, b0 = _data()
    for R, L_H in ((_ScaledTV(0.02, 0.05), 123.0), (SmoothedTV(0.02, 0.05), 48 * math.sqrt(8) * 0.02 / 0.05**2)):
        p = ADPBetaProblem(y, b0, R, beta=1e-3, mu0=1e-2)
        c = p.error_constants(y, b0)
        assert c.L_Hinv == pytest.approx(L_H / p.lower(b0).mu ** 2, rel=1e-15)
        assert p.lower(b0).regulariser is R


def test_non_regulariser_is_refused():
    y, b0 = _data()
    with pytest.raises(TypeError, match="regulariser must be a regularisers.Regulariser"):
        ADPBetaProblem(y, b0, 0.02, 1e-3)


@pytest.mark.parametrize("make", [lambda: AnisotropicTV(0.02, 0.05),
                                  lambda: FieldsOfExperts(1, n_filters=2, size=3, smoothing=1e-2, scale=0.02)],
                         ids=["tv_aniso", "foe"])
def test_hypergradient_with_other_regularisers_matches_finite_differences(make):
    """MAID's hypergradient (CG to 1e-12 at a lower solution to 1e-11) equals central differences
    of ``f(b) = g(x̂(b), b)`` for anisotropic TV and FoE lower levels.  Step 1e-5; each f carries
    an error ≲ ‖∇ₓg‖·1e-11, so the difference quotient is off by ≲ 1e-6·‖∇ₓg‖ plus O(h²): about
    1e-7 relative here (measured 6e-8 and 1e-8); tolerance 1e-5.  A dropped term (the mixed product
    or the direct partial) changes z by O(1) relative."""
    y, b0 = _data()
    p = ADPBetaProblem(y, b0, make(), beta=1e-3, mu0=1e-2)
    b = b0 + 0.05 * rand(*b0.shape, seed=3)

    def f(bb, x0):
        res = p.solve_lower(bb, x0, 1e-11, 200000)
        assert res.converged
        return p.upper_loss(res.x, bb).item(), res.x

    _, x_hat = f(b, y)
    z, _, _, ok = hypergradient(p, x_hat, b, None, 1e-12, 10000)
    assert ok
    z_fd = torch.zeros_like(b)
    for i in range(b.numel()):
        e = torch.zeros(b.numel())
        e[i] = 1e-5
        e = e.reshape(b.shape)
        z_fd.view(-1)[i] = (f(b + e, x_hat)[0] - f(b - e, x_hat)[0]) / 2e-5
    rel = (torch.linalg.vector_norm(z - z_fd) / torch.linalg.vector_norm(z_fd)).item()
    assert rel < 1e-5


# --------------------------------------------------------------------------------------------
# kernel_penalty = "h1" (unsquared H¹ norm)
# --------------------------------------------------------------------------------------------
def test_h1_norm_and_its_gradient_against_autograd_and_finite_differences():
    """Away from ``b₀``: ``h1_norm = sqrt(h1_penalty)`` (independent formula, 1e-14 relative) and
    ``h1_norm_grad`` equals autograd of ``sqrt(h1_penalty)`` (1e-12) and a central difference along a
    random direction (step 1e-6: error O(h²‖∇³‖) + 1e-10, tolerance 1e-7).  A gradient that forgot
    the 1/(2‖d‖) chain factor or the ``DᵀD`` part fails all three by O(1)."""
    b0 = motion_kernel(5, channels=3, dtype=torch.float64)
    b = b0 + 0.03 * rand(*b0.shape, seed=4)
    assert h1_norm(b, b0).item() == pytest.approx(math.sqrt(h1_penalty(b, b0).item()), rel=1e-14)
    bb = b.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(torch.sqrt(h1_penalty(bb, b0)), bb)
    g = h1_norm_grad(b, b0)
    assert torch.allclose(g, g_ref, rtol=0, atol=1e-12)
    d = rand(*b.shape, seed=5)
    fd = fd_directional(lambda t: h1_norm(t, b0), b, d)
    assert abs(fd - (g * d).sum().item()) < 1e-7


def test_h1_norm_at_b0_subgradient_and_tiny_differences():
    """At ``b = b₀`` the value is 0 and the returned subgradient is 0; the convexity inequality
    ``‖b‖ ≥ ‖b'‖ + ⟨∇‖b'‖, b − b'⟩`` holds for 50 random pairs, including ``b' = b₀`` (checks that
    what is returned is a subgradient).  In float32 a difference of 1e-25 (whose squares underflow)
    still gives the exact homogeneous value ``1e-25·‖u‖_{H¹}`` and a gradient of unit dual size,
    equal to the gradient at ``u`` (scale invariance) to float32 rounding."""
    b0 = motion_kernel(3, channels=2, dtype=torch.float64)
    assert h1_norm(b0, b0).item() == 0.0 and torch.count_nonzero(h1_norm_grad(b0, b0)) == 0
    for s in range(50):
        b = b0 + rand(*b0.shape, seed=10 + s)
        bp = b0 if s % 5 == 0 else b0 + rand(*b0.shape, seed=100 + s)
        lhs = h1_norm(b, b0).item()
        rhs = h1_norm(bp, b0).item() + (h1_norm_grad(bp, b0) * (b - bp)).sum().item()
        assert lhs >= rhs - 1e-12
    u = rand(*b0.shape, seed=7).float()
    zero = torch.zeros_like(u)
    tiny = h1_norm(1e-25 * u, zero).item()
    assert tiny == pytest.approx(1e-25 * h1_norm(u, zero).item(), rel=1e-5)
    assert torch.allclose(h1_norm_grad(1e-25 * u, zero), h1_norm_grad(u, zero), atol=1e-5)


def test_unsquared_h1_problem_hypergradient_matches_finite_differences():
    """With ``kernel_penalty='h1'``: the upper loss is the data term plus ``β‖b − b₀‖_{H¹}``
    (compared with the squared problem minus its penalty), and MAID's hypergradient away from
    ``b₀`` equals the central difference of ``f(b) = g(x̂(b), b)`` along a random direction
    (lower level to 1e-11, CG to 1e-12; step 1e-5, so the quotient carries ≲ 1e-6 relative error;
    tolerance 1e-5 relative).  With β = 0.05 the penalty's gradient is about half of ``z``, so
    using the squared gradient (or dropping it) fails by O(1).  Unknown names are refused."""
    y, b0 = _data()
    R = SmoothedTV(0.02, 0.05)
    p = ADPBetaProblem(y, b0, R, beta=0.05, mu0=1e-2, kernel_penalty="h1")
    q = ADPBetaProblem(y, b0, R, beta=0.05, mu0=1e-2)
    b = b0 + 0.05 * rand(*b0.shape, seed=3)
    x = rand(*y.shape, seed=8)
    data = q.upper_loss(x, b) - 0.05 * h1_penalty(b, b0)
    assert p.upper_loss(x, b).item() == pytest.approx((data + 0.05 * h1_norm(b, b0)).item(), rel=1e-14)

    def f(bb):
        res = p.solve_lower(bb, y, 1e-11, 200000)
        assert res.converged
        return p.upper_loss(res.x, bb).item()

    x_hat = p.solve_lower(b, y, 1e-11, 200000).x
    z, _, _, ok = hypergradient(p, x_hat, b, None, 1e-12, 10000)
    assert ok
    d = rand(*b.shape, seed=9)
    fd = fd_directional(f, b, d, h=1e-5)
    zd = (z * d).sum().item()
    assert abs(fd - zd) <= 1e-5 * abs(zd)
    pen = 0.05 * (h1_norm_grad(b, b0) * d).sum().item()
    assert abs(pen) > 0.1 * abs(zd)
    with pytest.raises(ValueError, match="unknown kernel_penalty"):
        ADPBetaProblem(y, b0, R, beta=0.05, kernel_penalty="l1")


def h1_norm_grad(b, b0):
    from operators import h1_norm_grad
    return h1_norm_grad(b, b0)
