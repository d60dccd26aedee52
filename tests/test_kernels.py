"""Blur kernels by their moments and geometry (operators.py), not by their own code.

A kernel is a discrete probability distribution on the offsets ``(i, j) ∈ [−κ, κ]²`` (row i,
column j, κ = (k − 1)/2).  Its moments and support are computed here from the tensor and compared
with what the kernel is meant to be: a Gaussian's variance per axis σ², a disc's support
``{i² + j² ≤ r²}``, a motion line's direction.  The blur of an impulse shows the kernel's
orientation in the image (``B_b`` is a convolution, so it copies the kernel around the impulse).
"""
import math

import pytest
import torch

from operators import Blur, disc_kernel, gaussian_kernel, make_kernel, motion_kernel


def _offsets(k):
    t = torch.arange(k, dtype=torch.float64) - k // 2
    return t[:, None].expand(k, k), t[None, :].expand(k, k)      # row offset i, column offset j


def _moments(b2d):
    """``(E[i], E[j], E[i²], E[j²], E[ij])`` of a k×k kernel read as a distribution."""
    i, j = _offsets(b2d.shape[-1])
    w = b2d / b2d.sum()
    return tuple((w * m).sum().item() for m in (i, j, i * i, j * j, i * j))


def _sampled_gaussian_variance(sigma, k):
    """Variance of the 1D distribution ∝ exp(−t²/2σ²) on t = −κ…κ, summed directly (the 2D
    isotropic kernel factorises, so this is its per-axis variance)."""
    t = torch.arange(k, dtype=torch.float64) - k // 2
    w = torch.exp(-t**2 / (2 * sigma**2))
    return ((w * t**2).sum() / w.sum()).item()


@pytest.mark.parametrize("sigma", [0.9, 1.5, 2.5])
def test_gaussian_second_moment_is_sigma_squared(sigma):
    """On a grid of ±6σ (truncated mass ~e⁻¹⁸) the sampled Gaussian's per-axis variance equals σ²
    up to the discretisation error, which Poisson summation puts at ≈ 8π²σ²·exp(−2π²σ²)
    relative (4e-6 at σ = 0.9; tolerance 1e-4); first moments and the covariance E[ij] are 0 (isotropic, centred).  An exponent
    exp(−r²/2σ) would give variance σ, far from σ² for σ ≠ 1."""
    k = 2 * math.ceil(6 * sigma) + 1
    b = gaussian_kernel(k, sigma, channels=2, dtype=torch.float64)
    assert torch.equal(b[0], b[1])
    mi, mj, ii, jj, ij = _moments(b[0, 0])
    assert abs(mi) < 1e-14 and abs(mj) < 1e-14 and abs(ij) < 1e-14
    assert math.isclose(ii, sigma**2, rel_tol=1e-4) and math.isclose(jj, sigma**2, rel_tol=1e-4), (ii, sigma**2)
    assert math.isclose(ii, _sampled_gaussian_variance(sigma, k), rel_tol=1e-12)


def test_gaussian_entries_are_samples_of_the_density():
    """Every entry ratio b[i,j]/b[0,0] equals exp(−(i² + j²)/(2σ²)) (1e-12), on a small truncated
    kernel where the variance is far from σ² (so the moment test alone would not see the shape)."""
    sigma, k = 1.3, 5
    b = gaussian_kernel(k, sigma, channels=1, dtype=torch.float64)[0, 0]
    i, j = _offsets(k)
    assert torch.allclose(b / b[k // 2, k // 2], torch.exp(-(i**2 + j**2) / (2 * sigma**2)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("k,count", [(5, 21), (7, 37), (9, 69)])
def test_disc_support_has_radius_half_the_size(k, count):
    """Default radius r = k/2: the support is exactly {i² + j² ≤ k²/4}, counted by hand —
    k = 5: 25 minus the 4 corners (8 > 6.25) = 21; k = 7: 49 minus 12 offsets with i² + j² ∈ {13, 18}
    = 37; k = 9: 81 minus 12 (i² + j² ∈ {25, 32}, with (±4, ±3), (±3, ±4), (±4, ±4)) = 69.  The
    entries are uniform (1/count), so the mass within radius r is 1 and the farthest support
    offset lies within r but beyond r − 1."""
    b = disc_kernel(k, channels=1, dtype=torch.float64)[0, 0]
    i, j = _offsets(k)
    r2 = i**2 + j**2
    support = b > 0
    assert support.sum().item() == count
    assert torch.equal(support, r2 <= k * k / 4)
    assert torch.allclose(b[support], torch.full((count,), 1.0 / count), rtol=1e-14)
    far = r2[support].max().sqrt().item()
    assert k / 2 - 1 < far <= k / 2


def test_disc_radius_argument():
    """An explicit radius r keeps exactly the offsets with i² + j² ≤ r² (r = 1: the 5-point cross)."""
    b = disc_kernel(5, radius=1.0, channels=1, dtype=torch.float64)[0, 0]
    i, j = _offsets(5)
    assert torch.equal(b > 0, i**2 + j**2 <= 1) and (b > 0).sum() == 5


@pytest.mark.parametrize("direction,cov_sign,var_i,var_j", [("diagonal", 1, 2.0, 2.0), ("vertical", 0, 2.0, 0.0),
                                                           ("horizontal", 0, 0.0, 2.0)])
def test_motion_line_direction_by_moments(direction, cov_sign, var_i, var_j):
    """A 5-pixel line through the centre: along its direction the offsets are −2…2 (variance
    (4+1+0+1+4)/5 = 2), across it 0.  Diagonal means top-left to bottom-right: rows and columns
    grow together, E[ij] = +2 (an anti-diagonal line would give −2); vertical/horizontal: E[ij] = 0."""
    b = motion_kernel(5, direction, channels=1, dtype=torch.float64)[0, 0]
    mi, mj, ii, jj, ij = _moments(b)
    assert abs(mi) < 1e-15 and abs(mj) < 1e-15
    assert math.isclose(ii, var_i, abs_tol=1e-14) and math.isclose(jj, var_j, abs_tol=1e-14)
    assert math.isclose(ij, 2.0 * cov_sign, abs_tol=1e-14)
    assert (b > 0).sum() == 5


@pytest.mark.parametrize("kind,expected", [("motion", [(t, t) for t in range(-2, 3)]),
                                           ("motion_vertical", [(t, 0) for t in range(-2, 3)]),
                                           ("motion_horizontal", [(0, t) for t in range(-2, 3)])])
def test_blurred_impulse_shows_the_line(kind, expected):
    """B_b applied to an impulse at p₀ is the kernel placed around p₀ (convolution): the blurred
    point must light up exactly the pixels p₀ + (i, j) of the named line, each with 1/5."""
    b = make_kernel(kind, 5, 1, dtype=torch.float64)
    x = torch.zeros(1, 11, 12)
    p0 = (5, 6)
    x[0, p0[0], p0[1]] = 1.0
    out = Blur(b, (11, 12)).A(x)[0]
    lit = {(int(r) - p0[0], int(c) - p0[1]) for r, c in (out.abs() > 1e-12).nonzero().tolist()}
    assert lit == set(expected)
    for i, j in expected:
        assert math.isclose(out[p0[0] + i, p0[1] + j].item(), 0.2, rel_tol=1e-12)


def test_blurred_impulse_of_gaussian_has_variance_sigma_squared():
    """The blurred impulse of a Gaussian kernel, read as a distribution over the image, has
    per-axis variance σ² (within the discretisation error, 1e-9 relative at σ = 1.4; tolerance 1e-6) — the kernel's geometry survives
    the FFT embedding and centring of Blur."""
    sigma = 1.4
    k = 2 * math.ceil(6 * sigma) + 1
    H = W = 24
    x = torch.zeros(1, H, W)
    x[0, 12, 11] = 1.0
    out = Blur(gaussian_kernel(k, sigma, channels=1, dtype=torch.float64), (H, W)).A(x)[0]
    r = torch.arange(H, dtype=torch.float64)[:, None] - 12
    c = torch.arange(W, dtype=torch.float64)[None, :] - 11
    w = out / out.sum()
    assert abs((w * r).sum().item()) < 1e-12 and abs((w * c).sum().item()) < 1e-12
    assert math.isclose((w * r * r).sum().item(), sigma**2, rel_tol=1e-6)
    assert math.isclose((w * c * c).sum().item(), sigma**2, rel_tol=1e-6)


# ------------------------------------------------------------------------------------------
# the documented interface: dtype, defaults, bad input
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["motion", "motion_vertical", "motion_horizontal", "gaussian", "disc"])
def test_kernel_dtype_follows_the_argument(kind):
    """A kernel asked for in float32 is float32 (the tests' default dtype is float64, so a dtype
    that is not passed through shows), with the same values as in float64 (1e-7)."""
    b32 = make_kernel(kind, 5, 2, dtype=torch.float32)
    b64 = make_kernel(kind, 5, 2, dtype=torch.float64)
    assert b32.dtype == torch.float32 and b64.dtype == torch.float64
    assert torch.allclose(b32.double(), b64, atol=1e-7)


def test_documented_defaults():
    """Defaults as documented: 5×5 kernels for 3 channels, the diagonal motion line, σ = 1, the
    disc of radius 5/2 (21 pixels); make_kernel's σ defaults to 1 as well."""
    m, g, d = motion_kernel(), gaussian_kernel(), disc_kernel()
    for b in (m, g, d):
        assert b.shape == (3, 1, 5, 5)
    assert torch.allclose(m[0, 0].double(), torch.eye(5) / 5)
    i, j = _offsets(5)
    ref = torch.exp(-(i**2 + j**2) / 2)
    assert torch.allclose(g[0, 0].double(), ref / ref.sum(), atol=1e-7)
    assert (d[0, 0] > 0).sum() == 21
    assert torch.equal(make_kernel("gaussian", 5, 3), gaussian_kernel(5, 1.0, 3))


@pytest.mark.parametrize("kind", ["motion", "gaussian", "disc"])
def test_size_one_kernel_is_the_impulse(kind):
    """k = 1 is a valid (odd) size: the identity blur."""
    assert torch.equal(make_kernel(kind, 1, 2, dtype=torch.float64), torch.ones(2, 1, 1, 1))


@pytest.mark.parametrize("shape,match", [((1, 1, 3, 5), "shape"), ((1, 2, 3, 3), "shape"), ((3, 3, 3), "shape"),
                                         ((1, 1, 4, 4), "odd, got 4")])
def test_malformed_kernel_rejected_with_its_reason(shape, match):
    """Blur refuses a kernel that is not (C, 1, k, k) with k odd, saying which rule is broken."""
    with pytest.raises(ValueError, match=match):
        Blur(torch.ones(shape), (9, 9))


def test_non_finite_kernel_rejected():
    b = disc_kernel(3, channels=1, dtype=torch.float64)
    b[0, 0, 1, 1] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        Blur(b, (9, 9))


@pytest.mark.parametrize("sigma", [0.0, -1.0, math.inf, math.nan])
def test_bad_gaussian_sigma_rejected(sigma):
    with pytest.raises(ValueError, match="sigma must be a positive finite number"):
        gaussian_kernel(5, sigma)


def test_unknown_kernel_kind_lists_the_valid_ones():
    with pytest.raises(ValueError, match="motion, motion_vertical, motion_horizontal, gaussian, disc"):
        make_kernel("boxcar", 5, 1)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_kernel_larger_than_one_image_side_rejected(shape):
    """A 7×7 kernel does not fit a 6-pixel side, whichever side it is."""
    with pytest.raises(ValueError, match="larger than the image"):
        Blur(disc_kernel(7, channels=1, dtype=torch.float64), shape)
