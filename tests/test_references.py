"""Numbers the package reports, checked against independent references.

* PSNR (imaging.psnr_ssim) against ``10 log₁₀(1/MSE)`` written out here and against
  scikit-image's ``peak_signal_noise_ratio``; SSIM against a direct implementation of Wang et
  al.'s formula (Gaussian window σ = 1.5, K₁ = 0.01, K₂ = 0.03, data range 1) and scikit-image.
* Smoothed TV (regularisers.SmoothedTV / AnisotropicTV) against values computed by hand.
* load_image against PIL's pixels of a file written here; make_data against the forward model
  ``y = (true blur) x + σ n`` with ``n`` drawn from the seed.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import rand
from imaging import load_image, make_data, psnr_ssim
from operators import Blur, gaussian_kernel, make_kernel
from regularisers import AnisotropicTV, SmoothedTV
from adp_problem import ADPBetaProblem
from operators import h1_penalty


def _pair(C=3, H=24, W=20, noise=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(C, H, W, generator=g, dtype=torch.float64)
    return ref + noise * torch.randn(C, H, W, generator=g, dtype=torch.float64), ref


# ------------------------------------------------------------------------------------------
# PSNR and SSIM
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("C,noise", [(1, 0.05), (3, 0.2)])
def test_psnr_is_ten_log_one_over_mse_of_clipped_estimate(C, noise):
    """PSNR = 10 log₁₀(1²/MSE) with MSE over all entries of clip(x, 0, 1) − ref (data range 1,
    not 255: that would add 20 log₁₀255 ≈ 48 dB); the estimate has entries outside [0, 1], which
    must be clipped.  deepinv's metric adds 1e-8 to MSE (capping PSNR at 80 dB), which moves it by
    at most 10 log₁₀(e)·1e-8/MSE dB: that is the tolerance against the formula and against
    scikit-image's peak_signal_noise_ratio (plus 1e-9 for rounding)."""
    from skimage.metrics import peak_signal_noise_ratio

    x, ref = _pair(C=C, noise=noise)
    assert (x < 0).any() and (x > 1).any()
    xc = x.clamp(0, 1)
    mse = ((xc - ref) ** 2).mean().item()
    tol = 10 * math.log10(math.e) * 1e-8 / mse + 1e-9
    p, _ = psnr_ssim(x, ref)
    assert math.isclose(p, 10 * math.log10(1.0 / mse), abs_tol=tol)
    sk = peak_signal_noise_ratio(ref.numpy(), xc.numpy(), data_range=1.0)
    assert math.isclose(p, sk, abs_tol=tol)


def test_psnr_of_a_known_error():
    """A constant error of 0.1 on every pixel: MSE = 0.01, PSNR = 20 dB (to deepinv's 1e-8
    regularisation of MSE: 4.4e-6 dB)."""
    ref = torch.full((3, 16, 16), 0.5)
    p, s = psnr_ssim(ref + 0.1, ref)
    assert math.isclose(p, 20.0, abs_tol=5e-6)
    assert s < 1


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. (2004) SSIM, written out: Gaussian-weighted local means, variances and
    covariance (σ = 1.5, truncated at 3.5σ: an 11×11 window; population statistics), the map
    ``(2μₓμᵧ + C₁)(2σₓᵧ + C₂) / ((μₓ² + μᵧ² + C₁)(σₓ² + σᵧ² + C₂))`` with ``C₁ = (0.01)²``,
    ``C₂ = (0.03)²`` (data range 1), averaged over the pixels at least 5 from the border and over
    channels.  x, y: (H, W, C)."""
    from scipy.ndimage import gaussian_filter

    def blur(a):
        return gaussian_filter(a, sigma=1.5, truncate=3.5, mode="reflect")

    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for c in range(x.shape[2]):
        a, b = x[..., c], y[..., c]
        ma, mb = blur(a), blur(b)
        va, vb, cov = blur(a * a) - ma * ma, blur(b * b) - mb * mb, blur(a * b) - ma * mb
        smap = (2 * ma * mb + c1) * (2 * cov + c2) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
        vals.append(smap[5:-5, 5:-5].mean())
    return float(np.mean(vals))


@pytest.mark.parametrize("C,noise", [(1, 0.05), (3, 0.3)])
def test_ssim_matches_its_formula_and_scikit_image(C, noise):
    """SSIM of clip(x, 0, 1) against ref equals the formula above (1e-10) and scikit-image's
    structural_similarity with the same documented settings; SSIM(ref, ref) = 1."""
    from skimage.metrics import structural_similarity

    x, ref = _pair(C=C, noise=noise, seed=2)
    _, s = psnr_ssim(x, ref)
    a = x.clamp(0, 1).numpy().transpose(1, 2, 0)
    b = ref.numpy().transpose(1, 2, 0)
    assert math.isclose(s, _ssim_reference(a, b), abs_tol=1e-10), (s, _ssim_reference(a, b))
    sk = structural_similarity(a, b, data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5,
                               use_sample_covariance=False)
    assert math.isclose(s, sk, abs_tol=1e-12)
    assert math.isclose(psnr_ssim(ref, ref)[1], 1.0, abs_tol=1e-12)


# ------------------------------------------------------------------------------------------
# smoothed TV against values computed by hand
# ------------------------------------------------------------------------------------------
# x = [[0, 3], [4, 0]]: forward differences with Neumann boundary (0 on the last column/row)
#   pixel (0,0): d_h = 3, d_v = 4;  (0,1): d_h = 0, d_v = −3;  (1,0): d_h = −4, d_v = 0;  (1,1): 0, 0
_X = torch.tensor([[[0.0, 3.0], [4.0, 0.0]]])


def test_isotropic_tv_value_by_hand():
    """α Σ sqrt(d_h² + d_v² + γ²) = α(√(25 + γ²) + √(9 + γ²) + √(16 + γ²) + γ); with γ → 0 this
    is α(5 + 3 + 4) = 12α.  A second channel (2·x) is not coupled to the first: it adds the same
    sum with the gradients doubled.  Exact up to rounding (1e-13)."""
    alpha, gamma = 0.7, 0.1
    g2 = gamma**2
    one = math.sqrt(25 + g2) + math.sqrt(9 + g2) + math.sqrt(16 + g2) + gamma
    two = math.sqrt(100 + g2) + math.sqrt(36 + g2) + math.sqrt(64 + g2) + gamma
    assert math.isclose(SmoothedTV(alpha, gamma).value(_X).item(), alpha * one, rel_tol=1e-13)
    x2 = torch.cat([_X, 2 * _X])
    assert math.isclose(SmoothedTV(alpha, gamma).value(x2).item(), alpha * (one + two), rel_tol=1e-13)
    assert math.isclose(SmoothedTV(1.0, 1e-9).value(_X).item(), 12.0, rel_tol=1e-8)


def test_anisotropic_tv_value_by_hand():
    """α Σ [sqrt(d_h² + γ²) + sqrt(d_v² + γ²)] = α(2√(9 + γ²) + 2√(16 + γ²) + 4γ) (1e-13)."""
    alpha, gamma = 0.3, 0.2
    ref = alpha * (2 * math.sqrt(9 + gamma**2) + 2 * math.sqrt(16 + gamma**2) + 4 * gamma)
    assert math.isclose(AnisotropicTV(alpha, gamma).value(_X).item(), ref, rel_tol=1e-13)


def test_isotropic_tv_gradient_by_hand():
    """∇R = Dᵀ(∇x/w), w = sqrt(|∇x|² + γ²): at γ → 0 on _X the unit fields are (3,4)/5 at (0,0),
    (0,−1) at (0,1), (−1,0) at (1,0), 0 at (1,1), and Dᵀ(p_h, p_v)[i,j] = p_h[i,j−1] − p_h[i,j] +
    p_v[i−1,j] − p_v[i,j] (only existing differences) gives
    [[−3/5 − 4/5, 3/5 + 1], [4/5 + 1, −1 − 1]] = [[−1.4, 1.6], [1.8, −2]] (1e-8: γ = 1e-9)."""
    g = SmoothedTV(1.0, 1e-9).grad(_X)
    assert torch.allclose(g, torch.tensor([[[-1.4, 1.6], [1.8, -2.0]]]), atol=1e-8)


# ------------------------------------------------------------------------------------------
# image input and data
# ------------------------------------------------------------------------------------------
def _write_png(tmp_path, H=6, W=7, seed=0):
    a = (np.random.default_rng(seed).integers(0, 256, size=(H, W, 3))).astype(np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(a, "RGB").save(path)
    return str(path), a


def test_load_image_native_size_is_the_pixels_over_255(tmp_path):
    """At its own size a colour PNG loads as its 8-bit pixels / 255 (exact: resizing to the same
    grid is the identity), channel-first; grey is the ITU-R 601 luma 0.299R + 0.587G + 0.114B,
    rounded to 8 bits as PIL stores it (±0.5/255)."""
    path, a = _write_png(tmp_path)
    x = load_image(path, 6, 7, 3, str(tmp_path))
    assert x.shape == (3, 6, 7) and x.dtype == torch.float64
    assert torch.allclose(x, torch.from_numpy(a.transpose(2, 0, 1) / 255.0), atol=1e-12)
    g = load_image(path, 6, 7, 1, str(tmp_path))
    luma = (a.astype(np.float64) @ np.array([0.299, 0.587, 0.114])) / 255.0
    assert g.shape == (1, 6, 7)
    assert np.abs(g[0].numpy() - luma).max() <= 0.5 / 255 + 1e-12


def test_load_image_downscaling_keeps_block_means(tmp_path):
    """Halving a piecewise-constant image (2×2 blocks of one random value) gives back the block
    values up to the anti-aliasing filter, which mixes in the neighbouring blocks: the mean
    brightness is kept to 1e-2 and the mean absolute deviation from the blocks is below 0.05
    (random 8-bit blocks differ by ~0.33 on average, so a shifted or transposed image fails)."""
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, size=(8, 10, 3)).astype(np.uint8)
    big = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)
    path = tmp_path / "blocks.png"
    Image.fromarray(big, "RGB").save(path)
    x = load_image(str(path), 8, 10, 3, str(tmp_path)).numpy().transpose(1, 2, 0)
    target = small / 255.0
    assert abs(x.mean() - target.mean()) < 1e-2
    assert np.abs(x - target).mean() < 0.05


@pytest.mark.parametrize("setting", ["motion", "gaussian", "disc", "semiblind"])
def test_make_data_is_the_forward_model(tmp_path, setting):
    """y = (true blur) x_true + σ n with n = torch.randn(shape, Generator(seed)) in float64:
    recovering n from (y − blur x_true)/σ must give that draw (1e-10); the blur is b₀ (of the
    setting's kind) except semiblind, where b₀ is the motion kernel and the data are further
    blurred by the Gaussian 5×5 of σ = semiblind_sigma."""
    path, _ = _write_png(tmp_path, H=16, W=18, seed=3)
    cfg = dict(image=path, size_y=16, size_x=18, channels=3, setting=setting, kernel_size=5, blur_sigma=1.0,
               semiblind_sigma=0.5, noise_level=0.02, seed=7)
    x_true, b0, y = make_data(cfg, str(tmp_path), torch.device("cpu"), torch.float64)
    assert torch.equal(x_true, load_image(path, 16, 18, 3, str(tmp_path)))
    kind = "motion" if setting == "semiblind" else setting
    assert torch.equal(b0, make_kernel(kind, 5, 3, sigma=1.0, dtype=torch.float64))
    clean = Blur(b0, (16, 18)).A(x_true)
    if setting == "semiblind":
        clean = Blur(gaussian_kernel(5, 0.5, channels=3, dtype=torch.float64), (16, 18)).A(clean)
    n = torch.randn(x_true.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert torch.allclose((y - clean) / 0.02, n, atol=1e-10)


# ------------------------------------------------------------------------------------------
# ADP-β's upper level against its formula (SPEC §1)
# ------------------------------------------------------------------------------------------
def _upper_case(seed=0):
    C, H, W = 2, 9, 8
    y, x = rand(C, H, W, seed=seed), rand(C, H, W, seed=seed + 1)
    b0 = gaussian_kernel(3, 0.7, channels=C, dtype=torch.float64)
    b = b0 + 0.05 * rand(*b0.shape, seed=seed + 2)
    a = make_kernel("disc", 3, C, dtype=torch.float64)
    return y, x, b0, b, a


@pytest.mark.parametrize("operator", ["learned", "known", "known_kernel"])
def test_adp_upper_loss_and_gradient_are_the_formula(operator):
    """g(x, b) = ‖A_up x − y‖²/n + β‖b − b₀‖²_{H¹} and ∇ₓg = (2/n)A_upᵀ(A_up x − y), with A_up = B_b
    (learned), B_{b₀} (known) or B_a (known with known_kernel = a), written out with Blur (1e-12).
    At b ≠ b₀ the three differ, so using the wrong operator fails."""
    y, x, b0, b, a = _upper_case()
    beta = 0.3
    if operator == "learned":
        p, A = ADPBetaProblem(y, b0, SmoothedTV(0.01, 0.1), beta, 0.0, "learned"), Blur(b, y.shape[-2:])
    elif operator == "known":
        p, A = ADPBetaProblem(y, b0, SmoothedTV(0.01, 0.1), beta, 0.0, "known"), Blur(b0, y.shape[-2:])
    else:
        p = ADPBetaProblem(y, b0, SmoothedTV(0.01, 0.1), beta, 0.0, "known", known_kernel=a)
        A = Blur(a, y.shape[-2:])
    r = A.A(x) - y
    n = y.numel()
    g = (r * r).sum().item() / n + beta * h1_penalty(b, b0).item()
    assert math.isclose(p.upper_loss(x, b).item(), g, rel_tol=1e-12)
    assert torch.allclose(p.upper_grad_x(x, b), 2 / n * A.A_adjoint(r), atol=1e-12)
    assert math.isclose(p.upper_lipschitz(x, b), 2 / n * A.norm() ** 2, rel_tol=1e-12)


def test_adp_defaults_and_metrics():
    """Defaults: μ₀ = 0 (μ = min|b̂|² exactly), the learned operator; metrics(x, b) is metrics_fn(x)
    and {} without one."""
    y, x, b0, b, _ = _upper_case(3)
    p = ADPBetaProblem(y, b0, SmoothedTV(0.01, 0.1), 0.1)
    assert p.learned and math.isclose(p.lower(b).mu, Blur(b, y.shape[-2:]).min_singular_sq(), rel_tol=1e-12)
    assert p.metrics(x, b) == {}
    q = ADPBetaProblem(y, b0, SmoothedTV(0.01, 0.1), 0.1, metrics_fn=lambda z: {"mean": z.mean().item()})
    assert q.metrics(x, b) == {"mean": x.mean().item()}


def test_adp_bad_arguments_refused_with_reason():
    y, _, b0, _, _ = _upper_case()
    with pytest.raises(ValueError, match="unknown upper_operator 'both'; use 'learned' or 'known'"):
        ADPBetaProblem(y, b0, SmoothedTV(0.01, 0.1), 0.1, upper_operator="both")
    with pytest.raises(TypeError, match="got float"):
        ADPBetaProblem(y, b0, 0.01, 0.1)
