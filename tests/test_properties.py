"""Property-based tests (hypothesis) of the linear operators over random sizes, kernels and
channel counts: adjointness, shapes, norms, and the kernel derivative.

Every test is derandomised (the same examples on every run, no example database written) with
at most 25 examples and no deadline; the tensors come from seeds drawn by hypothesis.  Adjointness tolerances: 1e-12
relative to ‖x‖‖y‖ (float64 FFTs of ≤ 20×20 images round at ~1e-15 per entry).
"""
import math

import torch
from hypothesis import given, settings, strategies as st

from conftest import rand
from operators import Blur, FiniteDifference, conv_operator_norm, h1_penalty, h1_penalty_grad, kernel_correlation

PROPS = settings(max_examples=25, derandomize=True, deadline=None, database=None)


@st.composite
def blur_case(draw, batch=False):
    """(kernel (C,1,k,k), image shape) with C ∈ 1..3, k ∈ {1,3,5,7}, k ≤ H, W ≤ 20, an optional
    batch dimension, and a seed for the random tensors."""
    C = draw(st.integers(1, 3))
    k = draw(st.sampled_from([1, 3, 5, 7]))
    H = draw(st.integers(k, 20))
    W = draw(st.integers(k, 20))
    N = draw(st.integers(1, 2)) if batch else None
    seed = draw(st.integers(0, 2**16))
    b = rand(C, 1, k, k, seed=seed)
    shape = (C, H, W) if N is None else (N, C, H, W)
    return b, shape, seed


def _inner(a, b):
    return (a * b).sum().item()


def _tol(*ts):
    return 1e-12 * math.prod(torch.linalg.vector_norm(t).item() for t in ts)


@PROPS
@given(blur_case(batch=True))
def test_blur_adjointness_and_shapes(case):
    """⟨B_b x, y⟩ = ⟨x, B_bᵀ y⟩, B_bᵀB_b x = B_bᵀ(B_b x), and every output has the input's shape
    (batched or not)."""
    b, shape, seed = case
    B = Blur(b, shape[-2:])
    x, y = rand(*shape, seed=seed + 1), rand(*shape, seed=seed + 2)
    Bx, Bty = B.A(x), B.A_adjoint(y)
    assert Bx.shape == shape and Bty.shape == shape
    assert abs(_inner(Bx, y) - _inner(x, Bty)) <= _tol(x, y) * max(1.0, B.norm())
    assert torch.allclose(B.A_adjoint_A(x), B.A_adjoint(Bx), atol=1e-12 * max(1.0, B.norm() ** 2))


@PROPS
@given(blur_case())
def test_blur_norm_and_smallest_singular_value_bound_every_vector(case):
    """sqrt(min|b̂|²)‖x‖ ≤ ‖B_b x‖ ≤ max|b̂|‖x‖ for random x, and both are attained: the dense
    matrix of B_b (columns B_b eᵢ) has exactly these extreme singular values (1e-10)."""
    b, shape, seed = case
    B = Blur(b[:1], shape[-2:])
    x = rand(1, *shape[-2:], seed=seed + 3)
    n = torch.linalg.vector_norm(B.A(x)).item()
    nx = torch.linalg.vector_norm(x).item()
    assert math.sqrt(B.min_singular_sq()) * nx * (1 - 1e-10) <= n <= B.norm() * nx * (1 + 1e-10)
    eye = torch.eye(shape[-2] * shape[-1]).reshape(-1, 1, *shape[-2:])
    M = B.A(eye).reshape(eye.shape[0], -1).T
    sv = torch.linalg.svdvals(M)
    assert math.isclose(sv.max().item(), B.norm(), rel_tol=1e-10)
    assert math.isclose(sv.min().item() ** 2, B.min_singular_sq(), rel_tol=1e-8, abs_tol=1e-12)


@PROPS
@given(C=st.integers(1, 3), H=st.integers(1, 12), W=st.integers(1, 12), seed=st.integers(0, 2**16),
       batch=st.booleans())
def test_finite_difference_adjointness_and_shapes(C, H, W, seed, batch):
    """⟨D x, (p_h, p_v)⟩ = ⟨x, Dᵀ(p_h, p_v)⟩ for any size (a single row or column included), with
    zero last column of D_h x and zero last row of D_v x (Neumann), and ‖D x‖² ≤ 8‖x‖²."""
    shape = (2, C, H, W) if batch else (C, H, W)
    x, ph, pv = rand(*shape, seed=seed), rand(*shape, seed=seed + 1), rand(*shape, seed=seed + 2)
    dh, dv = FiniteDifference.A(x)
    assert dh.shape == shape and dv.shape == shape
    assert (dh[..., :, -1] == 0).all() and (dv[..., -1, :] == 0).all()
    adj = FiniteDifference.A_adjoint(ph, pv)
    assert adj.shape == shape
    lhs = _inner(dh, ph) + _inner(dv, pv)
    assert abs(lhs - _inner(x, adj)) <= 1e-12 * torch.linalg.vector_norm(x).item() * \
        (torch.linalg.vector_norm(ph).item() + torch.linalg.vector_norm(pv).item()) * 3
    nd = (dh.square().sum() + dv.square().sum()).item()
    assert nd <= FiniteDifference.NORM_SQ_BOUND * x.square().sum().item() * (1 + 1e-12)


@PROPS
@given(blur_case(batch=True))
def test_kernel_correlation_is_the_adjoint_of_b_to_blur(case):
    """b ↦ B_b u is linear; kernel_correlation(w, u, k) is its adjoint: ⟨B_b u, w⟩ = ⟨b, corr(w, u)⟩,
    with the shape (C, 1, k, k) and a batch dimension summed over.  Tolerance 1e-11·k·‖b‖‖u‖‖w‖
    (|⟨B_b u, w⟩| ≤ ‖b‖₁‖u‖‖w‖ ≤ k‖b‖‖u‖‖w‖, times FFT rounding)."""
    b, shape, seed = case
    k = b.shape[-1]
    u, w = rand(*shape, seed=seed + 4), rand(*shape, seed=seed + 5)
    corr = kernel_correlation(w, u, k)
    assert corr.shape == b.shape
    lhs = _inner(Blur(b, shape[-2:]).A(u), w)
    assert abs(lhs - _inner(b, corr)) <= 10 * k * _tol(b, u, w)


@PROPS
@given(blur_case())
def test_conv_operator_norm_is_the_norm_of_kernel_to_blur(case):
    """conv_operator_norm(u, k) = max over channels of the largest singular value of the dense
    matrix δ ↦ B_δ u_c (k² columns), 1e-9; it lies in [‖u_c‖, k‖u_c‖] for the channel attaining it
    (the impulse δ gives ‖u‖; Young's inequality gives k‖u‖)."""
    b, shape, seed = case
    C, k = shape[0], b.shape[-1]
    u = rand(*shape, seed=seed + 6)
    best = 0.0
    for c in range(C):
        uc = u[c:c + 1]
        cols = [Blur(e.reshape(1, 1, k, k), shape[-2:]).A(uc).flatten() for e in torch.eye(k * k)]
        s = torch.linalg.matrix_norm(torch.stack(cols, 1), ord=2).item()
        nu = torch.linalg.vector_norm(uc).item()
        assert nu * (1 - 1e-10) <= s <= k * nu * (1 + 1e-10)
        best = max(best, s)
    assert math.isclose(conv_operator_norm(u, k), best, rel_tol=1e-9)


@PROPS
@given(C=st.integers(1, 3), k=st.sampled_from([1, 3, 5]), seed=st.integers(0, 2**16))
def test_h1_penalty_gradient_is_the_derivative(C, k, seed):
    """h1_penalty_grad equals the autograd gradient of h1_penalty (1e-12), the penalty is ≥ ‖b − b₀‖²
    and 0 at b = b₀, and it is quadratic: P(b₀ + 2d) = 4P(b₀ + d)."""
    b, b0 = rand(C, 1, k, k, seed=seed), rand(C, 1, k, k, seed=seed + 1)
    bb = b.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(h1_penalty(bb, b0), bb)
    assert torch.allclose(h1_penalty_grad(b, b0), g, atol=1e-12)
    d = b - b0
    P = h1_penalty(b, b0).item()
    assert P >= d.square().sum().item() * (1 - 1e-12)
    assert h1_penalty(b0, b0).item() == 0
    assert math.isclose(h1_penalty(b0 + 2 * d, b0).item(), 4 * P, rel_tol=1e-12)


@PROPS
@given(H=st.integers(2, 8), W=st.integers(2, 8), seed=st.integers(0, 2**16), which=st.sampled_from(["h", "v"]))
def test_finite_difference_adjoint_differentiable_in_either_field(H, W, seed, which):
    """Dᵀ(p_h, p_v) is linear, so its gradient with respect to the field that requires grad (only
    one of the two) is D applied to the outer gradient: ∂⟨Dᵀp, w⟩/∂p = D w (1e-12)."""
    ph, pv, w = rand(1, H, W, seed=seed), rand(1, H, W, seed=seed + 1), rand(1, H, W, seed=seed + 2)
    p = (ph if which == "h" else pv).requires_grad_(True)
    (g,) = torch.autograd.grad((FiniteDifference.A_adjoint(ph, pv) * w).sum(), p)
    dh, dv = FiniteDifference.A(w)
    expect = dh if which == "h" else dv
    mask = torch.ones_like(expect)            # Dᵀ ignores the last column of p_h / last row of p_v
    if which == "h":
        mask[..., :, -1] = 0
    else:
        mask[..., -1, :] = 0
    assert torch.allclose(g * mask, expect * mask, atol=1e-12)
