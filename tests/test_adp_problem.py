"""adp_problem.py with the regulariser seam: any Regulariser in the lower level, L_H read from it,
the hypergradient of a non-default regulariser against finite differences."""
import math

import pytest
import torch
from conftest import rand

from adp_problem import ADPBetaProblem
from maid import hypergradient
from operators import Blur, gaussian_kernel, motion_kernel
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
