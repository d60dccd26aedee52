"""operators.py: kernels, adjointness of B_b and D, kernel derivatives, H¹ penalty."""
import pytest
import torch
from conftest import rand

from operators import (Blur, FiniteDifference, conv_operator_norm, disc_kernel, gaussian_kernel, h1_penalty,
                       h1_penalty_grad, kernel_correlation, make_kernel, motion_kernel)


@pytest.mark.parametrize("kind", ["motion", "motion_vertical", "motion_horizontal", "gaussian", "disc"])
def test_kernels_normalised_and_shaped(kind):
    b = make_kernel(kind, 5, 3, sigma=0.8, dtype=torch.float64)
    assert b.shape == (3, 1, 5, 5)
    assert torch.allclose(b.sum(dim=(1, 2, 3)), torch.ones(3))
    assert (b >= 0).all()


def test_motion_is_diagonal_line():
    b = motion_kernel(5, channels=1, dtype=torch.float64)[0, 0]
    assert torch.allclose(b, torch.eye(5) / 5)


@pytest.mark.parametrize("bad", [4, 0, -3])
def test_even_or_nonpositive_kernel_size_rejected(bad):
    with pytest.raises(ValueError, match="odd"):
        gaussian_kernel(bad, 1.0)


def test_kernel_larger_than_image_rejected():
    with pytest.raises(ValueError, match="larger than the image"):
        Blur(disc_kernel(9, channels=1), (6, 6))


@pytest.mark.parametrize("shape", [(3, 16, 16), (2, 3, 12, 17)])
def test_blur_adjointness(shape):
    b = rand(3, 1, 5, 5, seed=1)
    B = Blur(b, shape[-2:])
    x, y = rand(*shape, seed=2), rand(*shape, seed=3)
    lhs, rhs = (B.A(x) * y).sum(), (x * B.A_adjoint(y)).sum()
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs).clamp_min(1)
    assert torch.allclose(B.A_adjoint_A(x), B.A_adjoint(B.A(x)), atol=1e-12)


def test_blur_matches_direct_circular_convolution():
    """B_b x = Σ_j b[j] x[p − j + κ] (centred circular convolution), checked by explicit sums."""
    b = rand(2, 1, 3, 3, seed=4)
    x = rand(2, 7, 6, seed=5)
    out = Blur(b, (7, 6)).A(x)
    ref = torch.zeros_like(x)
    for i in range(3):
        for j in range(3):
            ref += b[:, 0, i, j, None, None] * torch.roll(x, shifts=(i - 1, j - 1), dims=(1, 2))
    assert torch.allclose(out, ref, atol=1e-12)


def test_blur_norm_and_min_singular_value_are_exact():
    b = gaussian_kernel(5, 1.0, channels=1, dtype=torch.float64)
    B = Blur(b, (8, 8))
    M = torch.stack([B.A(e.reshape(1, 8, 8)).flatten() for e in torch.eye(64)], dim=1)
    s = torch.linalg.svdvals(M)
    assert abs(B.norm() - s.max()) < 1e-10
    assert abs(B.min_singular_sq() - s.min() ** 2) < 1e-10


def test_finite_difference_adjointness():
    x = rand(3, 9, 11, seed=6)
    ph, pv = rand(3, 9, 11, seed=7), rand(3, 9, 11, seed=8)
    dh, dv = FiniteDifference.A(x)
    lhs = (dh * ph).sum() + (dv * pv).sum()
    rhs = (x * FiniteDifference.A_adjoint(ph, pv)).sum()
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)
    assert (dh[..., -1] == 0).all() and (dv[..., -1, :] == 0).all()


def test_finite_difference_norm_bound():
    x = rand(1, 10, 10, seed=9)
    for _ in range(200):  # power iteration on DᵀD
        x = FiniteDifference.A_adjoint(*FiniteDifference.A(x))
        x = x / x.norm()
    lam = (FiniteDifference.A_adjoint(*FiniteDifference.A(x)) * x).sum()
    assert lam <= FiniteDifference.NORM_SQ_BOUND


def test_kernel_correlation_is_gradient_wrt_kernel():
    u, w = rand(2, 3, 10, 9, seed=10), rand(2, 3, 10, 9, seed=11)  # batch dimension summed
    b = rand(3, 1, 5, 5, seed=12).requires_grad_(True)
    (Blur(b, (10, 9)).A(u) * w).sum().backward()
    assert torch.allclose(kernel_correlation(w, u, 5), b.grad, atol=1e-12)


def test_conv_operator_norm_exact():
    u = rand(2, 8, 9, seed=13)
    k = 3
    best = 0.0
    for c in range(2):
        cols = []
        for e in torch.eye(k * k):
            d = torch.zeros(2, 1, k, k)
            d[c, 0] = e.reshape(k, k)
            cols.append(Blur(d, (8, 9)).A(u)[c].flatten())
        best = max(best, torch.linalg.svdvals(torch.stack(cols, 1)).max().item())
    assert abs(conv_operator_norm(u, k) - best) < 1e-9


def test_h1_penalty_and_gradient():
    b, b0 = rand(3, 1, 5, 5, seed=14), rand(3, 1, 5, 5, seed=15)
    bb = b.clone().requires_grad_(True)
    h1_penalty(bb, b0).backward()
    assert torch.allclose(h1_penalty_grad(b, b0), bb.grad, atol=1e-12)
    d = b - b0
    assert h1_penalty(b, b0) >= (d * d).sum()
    assert h1_penalty(b0, b0) == 0


def test_gaussian_with_vanishing_sigma_is_the_impulse():
    """2σ² underflows for σ = 1e-300: the σ → 0 limit (a unit impulse), not 0/0 = NaN."""
    g = gaussian_kernel(5, 1e-300, channels=2, dtype=torch.float64)
    delta = torch.zeros(2, 1, 5, 5, dtype=torch.float64)
    delta[:, :, 2, 2] = 1
    assert torch.equal(g, delta)
