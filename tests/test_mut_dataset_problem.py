"""dataset_problem.py: what tests/test_dataset_problem.py leaves open (issue 16: mutation testing).

The finite-difference tests there check that the hypergradient is consistent with the problem as
built; they cannot see a wrong *model* (a weight without its exponential, a dropped μ₀ term in both
the gradient and the Hessian) or a wrong bookkeeping of the batched solvers.  Here each piece is
checked against an independent reference:

* the regulariser built from θ against its documented formula, written out with ``torch.diff`` and
  ``conv2d`` (TV: ``Σ_c w_c Σ_p sqrt(|∇x_c|² + γ_c²)``; FoE: ``e^c Σ_j w_j Σ_p (sqrt((K_j x)² + e^s) − e^s)``);
* ``∇ₓh`` and ``∇²ₓₓh v`` against autograd of ``h = ½‖A x − y‖² + R_θ(x) + (μ₀/2)‖x‖²``, the mixed
  product against central differences in θ (float64);
* μ and L against the FFT of the kernel (``min``/``max |b̂|²``, exact for circular blur);
* the batched FISTA and CG against one-problem-at-a-time loops written here and
  :func:`maid.conjugate_gradient` (same iteration, so iterates and counts agree to rounding);
* the per-image PSNR against scikit-image; the data-parallel split against one process, with the
  process group simulated by threads.
"""
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import rand
from skimage.metrics import peak_signal_noise_ratio

from dataset_problem import (DataParallelProblem, DatasetProblem, batched_cg, batched_fista, make_parametrisation,
                             per_sample_norm, psnr_per_image)
from maid import conjugate_gradient
from operators import Blur, gaussian_kernel
from regularisers import FieldsOfExperts


def _data(n=3, C=1, size=6, seed=0):
    x = torch.rand(n, C, size, size, generator=torch.Generator().manual_seed(seed))
    return x, x + 0.1 * rand(n, C, size, size, seed=seed + 1)


def _kernel(C=1):
    k = gaussian_kernel(3, 0.7, C, dtype=torch.float64)
    return k + 0.05 * rand(*k.shape, seed=11).abs()           # not symmetric: catches a flipped kernel


def _tv_formula(x, w, gamma):
    """``Σ_c w_c Σ_p sqrt(|∇x_c[p]|² + γ_c²)`` with forward differences, zero on the last column/row."""
    dh = torch.diff(x, dim=-1, append=x[..., -1:])
    dv = torch.diff(x, dim=-2, append=x[..., -1:, :])
    c = lambda p: p.view(1, -1, 1, 1)                         # noqa: E731
    return (c(w) * torch.sqrt(dh * dh + dv * dv + c(gamma) ** 2)).sum()


def _foe_formula(x, filters, logw, s, c):
    """``e^c Σ_j w_j Σ_p (sqrt((K_j x)_p² + e^s) − e^s)``, K_j the zero-mean filter, 'valid' correlation."""
    K = filters - filters.mean(dim=(1, 2, 3), keepdim=True)
    z = F.conv2d(x, K)
    return math.exp(c) * (logw.exp().view(1, -1, 1, 1) * (torch.sqrt(z * z + math.exp(s)) - math.exp(s))).sum()


# ------------------------------------------------------------------------------------------------
# the parametrisation: the regulariser built from θ is the documented one
# ------------------------------------------------------------------------------------------------
def test_tv_parametrisation_builds_the_documented_regulariser():
    """θ = (log w_c, log γ_c) per channel: R_θ equals the TV formula (1e-13 relative) at the initial
    θ (w = tv_weight, γ = tv_smoothing) and at a random θ with different values per channel."""
    par = make_parametrisation("tv", 2, tv_weight=0.07, tv_smoothing=0.03)
    assert par.names == ["log_weight", "log_smoothing"] and par.numel == 4
    x = rand(2, 2, 5, 6, seed=3)
    th0 = par.initial()
    torch.testing.assert_close(th0, torch.tensor([math.log(0.07)] * 2 + [math.log(0.03)] * 2), rtol=1e-15, atol=0)
    theta = th0 + 0.5 * rand(4, seed=4)
    for th in (th0, theta):
        ref = _tv_formula(x, th[:2].exp(), th[2:].exp())
        assert par.regulariser(th).value(x).item() == pytest.approx(ref.item(), rel=1e-13)
    assert par.kernel(theta) is None


def test_foe_parametrisation_builds_the_documented_regulariser():
    """θ = (filters, log weights, s, c): R_θ equals the FoE formula with the filters made zero-mean
    (1e-12 relative), at the initial θ (the seeded filters of :class:`regularisers.FieldsOfExperts`,
    weights 1, e^s = foe_smoothing, e^c = foe_scale: the same value as that class built directly) and
    at a random θ (filters not zero-mean, unequal weights).  Its gradient is the autograd gradient of
    the formula (1e-11)."""
    par = make_parametrisation("foe", 2, foe_filters=3, foe_size=3, foe_scale=0.2, foe_smoothing=0.05, seed=5)
    assert par.names == ["filters", "log_weights", "s", "c"]
    assert par.shapes == [(3, 2, 3, 3), (3,), (1,), (1,)] and par.numel == 54 + 3 + 2
    x = rand(2, 2, 7, 7, seed=6)
    th0 = par.initial()
    direct = FieldsOfExperts(2, 3, 3, smoothing=0.05, scale=0.2, seed=5)
    assert par.regulariser(th0).value(x).item() == pytest.approx(direct.value(x).item(), rel=1e-13)
    theta = th0 + 0.3 * rand(par.numel, seed=7)
    for th in (th0, theta):
        p = par.unflatten(th)
        ref = _foe_formula(x, p["filters"], p["log_weights"], p["s"].item(), p["c"].item())
        assert par.regulariser(th).value(x).item() == pytest.approx(ref.item(), rel=1e-12)
    xr = x.clone().requires_grad_()
    p = par.unflatten(theta)
    (g,) = torch.autograd.grad(_foe_formula(xr, p["filters"], p["log_weights"], p["s"].item(), p["c"].item()), xr)
    torch.testing.assert_close(par.regulariser(theta).grad(x), g, rtol=1e-11, atol=1e-13)


def test_parametrisation_blocks_kernel_and_copies():
    """``kernel0`` adds a last block in the parametrisation's dtype; ``unflatten`` returns each block
    in its shape and order; ``initial()`` is a fresh copy (changing it changes nothing); an unknown kind
    is refused with one line naming it."""
    k32 = _kernel(1).float()
    par = make_parametrisation("tv", 1, kernel0=k32)
    assert par.names == ["log_weight", "log_smoothing", "kernel"] and par.sizes == [1, 1, 9]
    th = par.initial()
    assert th.dtype == torch.float64
    torch.testing.assert_close(par.kernel(th), k32.double(), rtol=0, atol=0)
    th.add_(1.0)
    torch.testing.assert_close(par.kernel(par.initial()), k32.double(), rtol=0, atol=0)
    parts = par.unflatten(torch.arange(11.0))
    assert [tuple(v.shape) for v in parts.values()] == [(1,), (1,), (1, 1, 3, 3)]
    assert parts["kernel"].flatten().tolist() == list(range(2, 11))
    with pytest.raises(ValueError, match=r"^unknown regulariser 'bad'; use tv or foe$"):
        make_parametrisation("bad", 1)


@pytest.mark.parametrize("kind", ["tv", "foe"])
def test_parametrisation_keeps_the_requested_dtype(kind):
    """``dtype=float32`` gives a float32 θ (every block, the kernel too) and a float32 regulariser
    gradient on float32 images: no block silently in the default float64 (which would promote θ and
    the whole float32 training run to float64)."""
    par = make_parametrisation(kind, 1, foe_filters=2, foe_size=3, kernel0=_kernel(1), dtype=torch.float32)
    th = par.initial()
    assert th.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in par.unflatten(th).values())
    assert par.regulariser(th).grad(rand(1, 1, 6, 6, seed=9, dtype=torch.float32)).dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# the lower-level problem: gradient, Hessian, mixed product, μ and L
# ------------------------------------------------------------------------------------------------
def _problems():
    """Denoising (μ₀ = 0), fixed blur (μ₀ = 0.3), semi-blind (kernel in θ, μ₀ = 0.2), FoE denoising."""
    x, y = _data()
    k = _kernel()
    tv, foe = make_parametrisation("tv", 1), make_parametrisation("foe", 1, foe_filters=2, foe_size=3)
    semi = make_parametrisation("tv", 1, kernel0=k)
    return {"denoise": DatasetProblem(x, y, tv), "blur": DatasetProblem(x, y, tv, kernel=k, mu0=0.3),
            "semiblind": DatasetProblem(x, y, semi, mu0=0.2), "foe": DatasetProblem(x, y, foe)}


def _h(P, theta, x):
    """``Σ_i h_i(x_i) = ½‖A x − y‖² + R_θ(x) + (μ₀/2)‖x‖²`` written out (the reference objective)."""
    b = P.param.kernel(theta)
    b = P.fixed_kernel if b is None else b
    Ax = x if b is None else Blur(b, x.shape[-2:]).A(x)
    return 0.5 * ((Ax - P.y) ** 2).sum() + P.param.regulariser(theta).value(x) + 0.5 * P.mu0 * (x * x).sum()


@pytest.mark.parametrize("name", ["denoise", "blur", "semiblind", "foe"])
def test_lower_gradient_and_hessian_against_autograd_of_h(name):
    """``lower_grad`` = ∇ₓ of h (autograd of the written-out objective, 1e-11) and ``hessian_vp`` =
    the autograd Hessian-vector product (1e-10): the data term, R_θ and the μ₀ term each enter once."""
    P = _problems()[name]
    theta = P.param.initial() + 0.2 * rand(P.param.numel, seed=2)
    x, v = rand(3, 1, 6, 6, seed=3), rand(3, 1, 6, 6, seed=4)
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(_h(P, theta, xr), xr, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), xr)
    torch.testing.assert_close(P.lower_grad(x, theta, P.y), g.detach(), rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(P.hessian_vp(x, theta, v), hv, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("name", ["denoise", "blur", "semiblind", "foe"])
def test_mixed_product_against_central_differences_in_theta(name):
    """``mixed_vjp(x, θ, q)·d = d/dt ⟨∇ₓh(x, θ + t d), q⟩`` at t = 0, by central differences (h = 1e-6,
    float64: truncation O(h²) ≈ 1e-12, rounding ≈ 1e-10·|⟨∇h, q⟩|; tolerance 1e-7 relative to
    ‖mixed‖‖d‖) along 2 random directions.  For the semi-blind problem the kernel enters through the
    data term; for the fixed blur the data term does not depend on θ."""
    P = _problems()[name]
    theta = P.param.initial() + 0.2 * rand(P.param.numel, seed=5)
    x, q = rand(3, 1, 6, 6, seed=6), rand(3, 1, 6, 6, seed=7)
    z = P.mixed_vjp(x, theta, q)
    assert z.shape == theta.shape
    for s in range(2):
        d = rand(theta.numel(), seed=20 + s)
        f = lambda t: (P.lower_grad(x, theta + t * d, P.y) * q).sum().item()   # noqa: E731
        fd = (f(1e-6) - f(-1e-6)) / 2e-6
        assert abs(torch.dot(z, d).item() - fd) <= 1e-7 * z.norm().item() * d.norm().item()


def test_mixed_product_is_zero_when_theta_does_not_enter_the_gradient():
    """A problem whose θ has no effect on ∇ₓh along some block gives 0 there; with a zero q the
    product is exactly 0 (a tensor of θ's shape, not None)."""
    P = _problems()["blur"]
    theta = P.param.initial()
    z = P.mixed_vjp(rand(3, 1, 6, 6, seed=8), theta, torch.zeros(3, 1, 6, 6))
    assert z.shape == theta.shape and torch.equal(z, torch.zeros_like(theta))


def _fft_sq(b, size):
    """``|b̂|²`` of the kernel zero-padded to the image size (circular convolution's eigenvalues)."""
    pad = torch.zeros(b.shape[0], size, size, dtype=b.dtype)
    pad[:, :b.shape[-2], :b.shape[-1]] = b[:, 0]
    return torch.fft.fft2(pad).abs() ** 2


@pytest.mark.parametrize("name", ["denoise", "blur", "semiblind"])
def test_strong_convexity_and_smoothness_are_the_spectral_bounds(name):
    """μ = μ₀ + min|b̂|² and L = max|b̂|² + L_R + μ₀ (|b̂|² ≡ 1 for denoising), with b̂ the FFT of the
    zero-padded kernel (independent of :class:`operators.Blur`): 1e-12 relative.  Both are sharp
    bounds of the data part: the Rayleigh quotient of AᵀA at the extreme Fourier modes reaches them."""
    P = _problems()[name]
    theta = P.param.initial() + 0.1 * rand(P.param.numel, seed=9)
    b = P.param.kernel(theta)
    b = P.fixed_kernel if b is None else b
    sq = torch.ones(1) if b is None else _fft_sq(b, 6)
    _, _, mu, L = P._parts(theta)
    L_R = P.param.regulariser(theta).lipschitz()
    assert mu == pytest.approx(P.mu0 + sq.min().item(), rel=1e-12) == P.strong_convexity(theta)
    assert L == pytest.approx(sq.max().item() + L_R + P.mu0, rel=1e-12)
    ec = P.error_constants(y := P.y, theta)
    assert ec.mu == mu and ec.L_g == pytest.approx(2 / (36 * 3), rel=1e-15)
    assert math.isinf(ec.J_norm) and math.isinf(ec.L_J) and math.isinf(ec.L_Hinv) and y is P.y


def test_cached_parts_follow_in_place_changes_of_theta():
    """``_parts`` is cached per θ tensor and version: an in-place change of the kernel block, or a
    new tensor, gives the μ of the new kernel (reference: the FFT bound), and the same unchanged
    tensor returns the cached objects."""
    P = _problems()["semiblind"]
    theta = P.param.initial()
    mu1 = P.strong_convexity(theta)
    assert P._parts(theta) is P._parts(theta)
    with torch.no_grad():
        theta[2:] *= 0.5                                          # the kernel block scaled: |b̂|² × 1/4
    assert P.strong_convexity(theta) == pytest.approx(0.2 + 0.25 * (mu1 - 0.2), rel=1e-12)
    other = P.param.initial()
    other[2:] *= 2.0
    assert P.strong_convexity(other) == pytest.approx(0.2 + 4 * (mu1 - 0.2), rel=1e-12)


def test_solve_lower_on_a_non_finite_theta_reports_non_finite():
    """FoE scale e^c = ∞ (c = 1000) makes L infinite: the solve returns NaN iterates, 0 iterations, an
    infinite gradient norm and the status 'non_finite' without iterating."""
    P = _problems()["foe"]
    theta = P.param.initial()
    theta[-1] = 1e3
    low = P.solve_lower(theta, P.y.clone(), 1e-3, 50)
    assert low.status == "non_finite" and low.iters == 0 and low.grad_norm == math.inf
    assert low.x.shape == P.y.shape and bool(torch.isnan(low.x).all())


def test_adjoint_solve_meets_each_samples_residual_and_counts_like_one_cg_per_sample():
    """``solve_adjoint`` to δ: each sample's residual ‖rhs_i − H_i q_i‖ ≤ δ/√B; q_i and the summed
    iteration count equal the one-sample problem's solve to δ/√B (the same iteration: 1e-13, counts
    exact); and :func:`maid.conjugate_gradient` on each block alone to δ/√B (the same method in another
    arithmetic order) lands within 2(δ/√B)/μ of q_i (both are within (δ/√B)/μ of the exact solution),
    in the same number of iterations up to one per sample (a residual at the threshold)."""
    P = _problems()["blur"]
    theta = P.param.initial()
    x = P.solve_lower(theta, P.y.clone(), 1e-8, 2000).x
    rhs = P.upper_grad_x(x, theta)
    delta, tol = 1e-9, 1e-9 / math.sqrt(3)
    q, it, ok = P.solve_adjoint(x, theta, rhs, None, delta, 500)
    assert ok
    res = rhs - P.hessian_vp(x, theta, q)
    assert (per_sample_norm(res) <= tol).all()
    alone = cg = 0
    for i in range(3):
        qs, its, oks = P.subset([i]).solve_adjoint(x[i:i + 1], theta, rhs[i:i + 1], None, tol, 500)
        torch.testing.assert_close(q[i:i + 1], qs, rtol=1e-13, atol=1e-15)
        qi, iti, _ = conjugate_gradient(lambda v: P.hessian_vp(x[i:i + 1], theta, v), rhs[i:i + 1], None, tol, 500)
        assert (q[i:i + 1] - qi).norm().item() <= 2 * tol / P.strong_convexity(theta)
        alone, cg = alone + its, cg + iti
    assert it == alone and abs(it - cg) <= 3


# ------------------------------------------------------------------------------------------------
# the upper level
# ------------------------------------------------------------------------------------------------
def test_upper_loss_gradient_and_lipschitz_constant():
    """g = (1/B) Σ ‖x_i − x_i^true‖²/n: against the formula, its gradient against autograd (1e-14),
    and L_g = 2/(nB) exactly (∇g is linear: ‖∇g(x₁) − ∇g(x₂)‖ = L_g‖x₁ − x₂‖ to rounding)."""
    P = _problems()["denoise"]
    theta = P.param.initial()
    x1, x2 = rand(3, 1, 6, 6, seed=12), rand(3, 1, 6, 6, seed=13)
    ref = sum(((x1[i] - P.x_true[i]) ** 2).sum().item() / 36 for i in range(3)) / 3
    assert P.upper_loss(x1, theta).item() == pytest.approx(ref, rel=1e-14)
    xr = x1.clone().requires_grad_()
    (g,) = torch.autograd.grad(P.upper_loss(xr, theta), xr)
    torch.testing.assert_close(P.upper_grad_x(x1, theta), g, rtol=1e-14, atol=1e-16)
    Lg = P.upper_lipschitz(x1, theta)
    ratio = (P.upper_grad_x(x1, theta) - P.upper_grad_x(x2, theta)).norm() / (x1 - x2).norm()
    assert Lg == pytest.approx(ratio.item(), rel=1e-13) and Lg == pytest.approx(2 / (36 * 3), rel=1e-15)


def test_subset_is_the_problem_of_those_samples():
    """``subset(idx)`` keeps the parametrisation, the fixed kernel and μ₀ and takes the samples idx (in
    that order): its gradient equals the rows of the whole problem's gradient."""
    P = _problems()["blur"]
    S = P.subset([2, 0])
    assert S.param is P.param and S.fixed_kernel is P.fixed_kernel and S.mu0 == P.mu0 and S.n_samples == 2
    assert torch.equal(S.x_true, P.x_true[[2, 0]]) and torch.equal(S.y, P.y[[2, 0]]) and S.n == 36
    theta = P.param.initial()
    x = rand(3, 1, 6, 6, seed=14)
    torch.testing.assert_close(S.lower_grad(x[[2, 0]], theta, S.y), P.lower_grad(x, theta, P.y)[[2, 0]],
                               rtol=1e-14, atol=1e-15)
    assert P.chunk == 1 and S.chunk == 1


def test_psnr_per_image_against_scikit_image():
    """``10 log₁₀(1/mse_i)`` of the clipped image against each reference: equal to scikit-image's
    ``peak_signal_noise_ratio(ref_i, clip(x_i), data_range=1)`` per image (1e-12), images with values
    outside [0, 1] included."""
    x_true, _ = _data(n=3, C=2, size=7, seed=20)
    x = x_true + 0.3 * rand(3, 2, 7, 7, seed=21)                   # leaves [0, 1]: the clip matters
    got = psnr_per_image(x, x_true)
    assert got.shape == (3,)
    for i in range(3):
        ref = peak_signal_noise_ratio(x_true[i].numpy(), x[i].clamp(0, 1).numpy(), data_range=1.0)
        assert got[i].item() == pytest.approx(ref, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# the batched solvers against one problem at a time
# ------------------------------------------------------------------------------------------------
def _quadratics(B=4, n=5, seed=30):
    """Separable strongly convex quadratics h_i(x) = ½ Σ d_i x² − c_iᵀx with d_i ∈ [μ, L] = [0.5, 4]."""
    d = 0.5 + 3.5 * torch.rand(B, n, generator=torch.Generator().manual_seed(seed))
    d[:, 0], d[:, 1] = 0.5, 4.0
    c = rand(B, n, seed=seed + 1) * torch.tensor([1.0, 1e-3, 10.0, 1.0])[:B, None]  # different difficulties
    return d, c


def _fista_one(grad, x0, L, mu, tol, max_iter):
    """One problem: FISTA with the constant momentum (1 − √(μ/L))/(1 + √(μ/L)), stopped at the first
    k with ‖∇h(y_k)‖ ≤ tol (or k = max_iter); returns (y_k, k, ‖∇h(y_k)‖)."""
    beta = (1 - math.sqrt(mu / L)) / (1 + math.sqrt(mu / L))
    y, x_prev = x0.clone(), x0.clone()
    for k in range(max_iter + 1):
        g = grad(y)
        if g.norm().item() <= tol or k == max_iter:
            return y, k, g.norm().item()
        x = y - g / L
        y = x + beta * (x - x_prev)
        x_prev = x


@pytest.mark.parametrize("max_iter", [200, 7])
def test_batched_fista_equals_fista_on_each_problem(max_iter):
    """Per sample: the same iterate (1e-14) and stopping index as FISTA run alone; the summed count,
    the stacked ‖∇h‖ at the returned points, and ``converged`` (False when a sample hits the cap of 7,
    whose count is then 7)."""
    d, c = _quadratics()
    x0 = rand(4, 5, seed=32)
    tol = 1e-8
    low = batched_fista(lambda xs, idx: d[idx] * xs - c[idx], x0, 4.0, 0.5, tol, max_iter)
    total, norms = 0, []
    for i in range(4):
        yi, ki, gi = _fista_one(lambda v: d[i] * v - c[i], x0[i], 4.0, 0.5, tol, max_iter)
        torch.testing.assert_close(low.x[i], yi, rtol=0, atol=1e-14)
        total, norms = total + ki, norms + [gi]
    assert low.iters == total
    assert low.grad_norm == pytest.approx(math.sqrt(sum(g * g for g in norms)), rel=1e-12)
    assert low.converged == all(g <= tol for g in norms) == (max_iter == 200)
    assert torch.equal(x0, rand(4, 5, seed=32))                       # the start is not modified


def test_batched_fista_with_zero_or_negative_mu_uses_momentum_one():
    """μ ≤ 0 (no strong convexity known): momentum (1 − 0)/(1 + 0) = 1, the same iterates as μ = 0
    (a μ read as |μ| would differ)."""
    d, c = _quadratics()
    x0 = rand(4, 5, seed=33)
    grad = lambda xs, idx: d[idx] * xs - c[idx]                        # noqa: E731
    a = batched_fista(grad, x0, 4.0, -0.5, 1e-6, 40)
    y, k, _ = _fista_one(lambda v: d[0] * v - c[0], x0[0], 4.0, 0.0, 1e-6, 40)
    torch.testing.assert_close(a.x[0], y, rtol=0, atol=1e-14)
    assert a.iters >= k


def test_batched_fista_empty_stack_and_a_non_finite_sample():
    """No samples: the empty stack, 0 iterations, ‖∇h‖ = 0, converged.  A sample whose gradient is NaN
    is frozen at once (0 iterations) while the others run to their tolerance; the result is not
    converged and its status is 'non_finite'."""
    empty = batched_fista(lambda xs, idx: xs, torch.zeros(0, 5), 4.0, 0.5, 1e-8, 10)
    assert empty.x.shape == (0, 5) and (empty.iters, empty.grad_norm, empty.converged) == (0, 0.0, True)
    d, c = _quadratics()
    c = c.clone()
    c[1] = math.nan
    x0 = rand(4, 5, seed=34)
    low = batched_fista(lambda xs, idx: d[idx] * xs - c[idx], x0, 4.0, 0.5, 1e-8, 300)
    ref = sum(_fista_one(lambda v: d[i] * v - c[i], x0[i], 4.0, 0.5, 1e-8, 300)[1] for i in (0, 2, 3))
    assert low.iters == ref and not low.converged and low.status == "non_finite"
    assert torch.equal(low.x[1], x0[1]) and bool(torch.isfinite(low.x[[0, 2, 3]]).all())


def _blocks(B=3, n=6):
    Ms = []
    for i in range(B):
        G = rand(n, n, seed=40 + i)
        Ms.append(G @ G.T + (0.5 + 5 * i) * torch.eye(n))
    return torch.stack(Ms)


def test_batched_cg_equals_cg_per_block_with_per_sample_tolerances_and_warm_starts():
    """Per block against :func:`maid.conjugate_gradient` alone (the same iteration in another
    arithmetic order: solution 1e-10 relative, iteration count exact): with a tensor of tolerances (one per sample), and warm-started at a q0 (the residual is
    then rhs − H q0, not rhs)."""
    M = _blocks()
    rhs = rand(3, 6, seed=45)
    apply = lambda v, idx: torch.einsum("bij,bj->bi", M[idx], v)      # noqa: E731
    tol = torch.tensor([1e-4, 1e-9, 1e-6])
    q0 = 0.1 * rand(3, 6, seed=46)
    for start in (None, q0):
        q, it, ok = batched_cg(apply, rhs, start, tol, 100)
        total = 0
        for i in range(3):
            qi, iti, _ = conjugate_gradient(lambda v: M[i] @ v, rhs[i], None if start is None else start[i],
                                            tol[i].item(), 100)
            torch.testing.assert_close(q[i], qi, rtol=1e-10, atol=1e-12)
            total += iti
        assert ok and it == total
    assert torch.equal(q0, 0.1 * rand(3, 6, seed=46))                  # the warm start is not modified


def test_batched_cg_cap_non_finite_and_empty():
    """A cap below the iterations needed: not converged, B × cap iterations counted, each q the cap-th
    CG iterate (against conjugate_gradient with the same cap); a NaN right side: not converged, the
    other blocks still solved; an empty stack: nothing to do."""
    M = _blocks()
    rhs = rand(3, 6, seed=47)
    apply = lambda v, idx: torch.einsum("bij,bj->bi", M[idx], v)      # noqa: E731
    q, it, ok = batched_cg(apply, rhs, None, 1e-12, 2)
    assert not ok and it == 3 * 2
    for i in range(3):
        torch.testing.assert_close(q[i], conjugate_gradient(lambda v: M[i] @ v, rhs[i], None, 1e-12, 2)[0],
                                   rtol=1e-12, atol=1e-14)
    bad = rhs.clone()
    bad[0] = math.nan
    q, it, ok = batched_cg(apply, bad, None, 1e-10, 100)
    assert not ok
    torch.testing.assert_close(q[1:], torch.linalg.solve(M[1:], rhs[1:]), rtol=1e-8, atol=1e-10)
    q, it, ok = batched_cg(apply, torch.zeros(0, 6), None, 1e-10, 10)
    assert q.shape == (0, 6) and (it, ok) == (0, True)


# ------------------------------------------------------------------------------------------------
# data parallel, with the process group simulated by threads
# ------------------------------------------------------------------------------------------------
class _ThreadGroup:
    """A ``torch.distributed`` stand-in for ``world`` threads: ``all_gather`` and ``all_reduce`` (sum in
    rank order) through a shared slot list and a barrier; each thread's rank is thread-local."""

    def __init__(self, world):
        self.world, self.slots, self.barrier, self.local = world, [None] * world, threading.Barrier(world), \
            threading.local()

    def rank(self):
        return self.local.rank

    def _exchange(self, t):
        self.slots[self.rank()] = t.clone()
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out

    def all_gather(self, parts, t, group=None):
        for p, s in zip(parts, self._exchange(t)):
            p.copy_(s)

    def all_reduce(self, t, group=None):
        vals = self._exchange(t)
        total = vals[0].clone()
        for v in vals[1:]:
            total += v
        t.copy_(total)


def _run_ranks(world, fn, monkeypatch):
    group = _ThreadGroup(world)
    import torch.distributed as dist
    monkeypatch.setattr(dist, "get_rank", lambda g=None: g.rank(), raising=False)
    monkeypatch.setattr(dist, "get_world_size", lambda g=None: g.world, raising=False)
    monkeypatch.setattr(dist, "all_gather", lambda parts, t, group=None: group.all_gather(parts, t), raising=False)
    monkeypatch.setattr(dist, "all_reduce", lambda t, group=None: group.all_reduce(t), raising=False)
    out, errors = [None] * world, []

    def work(r):
        group.local.rank = r
        try:
            out[r] = fn(group)
        except BaseException as e:          # noqa: BLE001  (re-raised in the main thread)
            errors.append(e)
            group.barrier.abort()
    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize("world,B", [(2, 5), (3, 2)])
def test_data_parallel_equals_one_process(world, B, monkeypatch):
    """Each rank solves its slice (``tensor_split``; with 3 ranks and 2 samples one rank is empty):
    the gathered lower solve, adjoint solve and mixed product equal one process's (1e-12; the mixed
    product is a sum in another order), the iteration counts and convergence flags are the same, the
    other methods pass through, and ``subset`` stays data parallel.  Every rank gets the same answer."""
    x_true, y = _data(n=B, seed=50)
    k = _kernel()
    P = DatasetProblem(x_true, y, make_parametrisation("tv", 1, kernel0=k), mu0=0.1)
    theta = P.param.initial()
    low1 = P.solve_lower(theta, y.clone(), 1e-6, 500)
    rhs = P.upper_grad_x(low1.x, theta)
    q1, it1, ok1 = P.solve_adjoint(low1.x, theta, rhs, None, 1e-8, 300)
    z1 = P.mixed_vjp(low1.x, theta, q1)
    v = rand(*y.shape, seed=51)

    def fn(group):
        D = DataParallelProblem(P, group)
        assert D.n_samples == B and D.world == world
        low = D.solve_lower(theta, y.clone(), 1e-6, 500)
        q, it, ok = D.solve_adjoint(low1.x, theta, rhs, None, 1e-8, 300)
        z = D.mixed_vjp(low1.x, theta, q1)
        sub = D.subset([0])
        lsub = sub.solve_lower(theta, y[:1].clone(), 1e-6, 500)
        others = (D.hessian_vp(low1.x, theta, v), D.upper_loss(low1.x, theta), D.upper_grad_x(low1.x, theta),
                  D.upper_lipschitz(low1.x, theta), D.error_constants(low1.x, theta).mu)
        return low, (q, it, ok), z, (type(sub), lsub), others

    for low, (q, it, ok), z, (sub_type, lsub), others in _run_ranks(world, fn, monkeypatch):
        torch.testing.assert_close(low.x, low1.x, rtol=0, atol=1e-13)
        assert (low.iters, low.converged) == (low1.iters, low1.converged)
        assert low.grad_norm == pytest.approx(low1.grad_norm, rel=1e-12)
        torch.testing.assert_close(q, q1, rtol=0, atol=1e-13)
        assert (it, ok) == (it1, ok1)
        torch.testing.assert_close(z, z1, rtol=1e-12, atol=1e-15)
        assert sub_type is DataParallelProblem
        torch.testing.assert_close(lsub.x, P.subset([0]).solve_lower(theta, y[:1].clone(), 1e-6, 500).x,
                                   rtol=0, atol=1e-13)
        torch.testing.assert_close(others[0], P.hessian_vp(low1.x, theta, v), rtol=0, atol=0)
        assert others[1].item() == P.upper_loss(low1.x, theta).item()
        torch.testing.assert_close(others[2], P.upper_grad_x(low1.x, theta), rtol=0, atol=0)
        assert others[3] == P.upper_lipschitz(low1.x, theta) and others[4] == P.strong_convexity(theta)


def test_data_parallel_reports_a_failed_slice(monkeypatch):
    """A cap hit on one rank's slice makes every rank report 'not converged' (the flags are summed
    over ranks), with the iteration counts summed as in one process."""
    x_true, y = _data(n=4, seed=52)
    P = DatasetProblem(x_true, y, make_parametrisation("tv", 1))
    theta = P.param.initial()
    one = P.solve_lower(theta, y.clone(), 1e-12, 3)
    rhs = P.upper_grad_x(one.x, theta)
    q1 = P.solve_adjoint(one.x, theta, rhs, None, 1e-16, 2)

    def fn(group):
        D = DataParallelProblem(P, group)
        return D.solve_lower(theta, y.clone(), 1e-12, 3), D.solve_adjoint(one.x, theta, rhs, None, 1e-16, 2)
    for low, (q, it, ok) in _run_ranks(2, fn, monkeypatch):
        assert not low.converged and low.iters == one.iters == 4 * 3
        assert not ok and not q1[2] and it == q1[1] == 4 * 2

