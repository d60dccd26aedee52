"""Presets (files of constants in presets/) and the paper-protocol options of ADP.py they use:
the upper level over the channels, the unsquared H¹ penalty and the fixed-iteration TV baseline.

All in-process on 32×32 (or smaller) data in float64; no driver run."""
import glob
import math
import os

import pytest
import torch

import ADP
import config
from imaging import make_data
from operators import Blur, h1_penalty

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ADP.py's presets (dip_*/train_* are the other drivers', tested with them)
PRESETS = sorted(p for p in glob.glob(os.path.join(ROOT, "presets", "*.py"))
                 if not os.path.basename(p).startswith(("dip_", "train_")))
CPU = torch.device("cpu")


def preset(name):
    return config.load_preset(os.path.join(ROOT, "presets", name), ADP.DEFAULTS, ADP.RENAMED)


def small_case(overrides, size=32):
    cfg = config.resolve(ADP.DEFAULTS, dict(overrides, size_x=size, size_y=size, device="cpu"))
    return cfg, *make_data(cfg, ADP._IMAGES, CPU, torch.float64)


@pytest.mark.parametrize("path", PRESETS, ids=[os.path.basename(p) for p in PRESETS])
def test_every_preset_is_a_valid_configuration(path):
    """Each preset names only ADP.py settings, with their types, and passes ADP.validate."""
    values = config.load_preset(path, ADP.DEFAULTS, ADP.RENAMED)
    assert values
    ADP.validate(config.resolve(ADP.DEFAULTS, values))


def test_paper_preset_has_the_papers_numbers():
    """SPEC §4.2/§5: 400×300 (height×width), σ = 5/255, anisotropic TV with the effective weight
    e⁻⁶ and γ² = 10⁻⁴, 100-iteration TV baseline with the ×100 step rule, learned operator, data
    term over the channels, β = 100 on the unsquared H¹ norm, ε₀ = 1, ε_min = 10⁻⁶, 41 upper
    iterations, α₀ = 10⁻⁶, η = η_paper² = 10⁻⁸."""
    p = preset("paper.py")
    assert (p["size_y"], p["size_x"]) == (400, 300) and p["noise_level"] == 5 / 255
    assert p["regulariser"] == "tv_aniso" and p["tv_weight"] == math.exp(-6)
    assert p["tv_smoothing"] ** 2 == pytest.approx(1e-4, rel=1e-15)
    assert (p["baseline_iters"], p["baseline_lipschitz_factor"]) == (100, 100.0)
    assert (p["upper_operator"], p["upper_normalisation"], p["kernel_penalty"], p["beta"]) == \
        ("learned", "channels", "h1", 100.0)
    assert (p["eps0"], p["threshold"], p["upper_iter"], p["step"], p["eta"]) == (1.0, 1e-6, 41, 1e-6, 1e-8)


def test_upper_level_over_the_channels_is_the_papers_g():
    """With upper_normalisation='channels' and the unsquared penalty, c·g (c = upper_scale = n/C)
    equals the paper's ‖B_b x − y‖²/C + β‖b − b₀‖_{H¹} computed directly, at a kernel b ≠ b₀; the
    hypergradient pieces scale by c too (∇ₓg and ∂_b g), so MAID's step maps as step·c."""
    cfg, x_true, b0, y = small_case(dict(upper_normalisation="channels", kernel_penalty="h1", beta=100.0,
                                             upper_operator="learned"))
    c = ADP.upper_scale(cfg, y)
    assert c == y.numel() / 3
    b = b0 + 1e-3 * torch.randn(b0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x_true.clone()
    P = ADP.build_problem(cfg, y, b0)
    r = Blur(b, y.shape[-2:]).A(x) - y
    g_paper = (r * r).sum() / 3 + 100.0 * torch.sqrt(h1_penalty(b, b0))
    assert (c * P.upper_loss(x, b)).item() == pytest.approx(g_paper.item(), rel=1e-12)
    # the same problem in the n-normalisation with β/c: identical g and derivatives
    Q = ADP.build_problem(dict(cfg, upper_normalisation="n", beta=100.0 / c), y, b0)
    assert P.upper_loss(x, b).item() == pytest.approx(Q.upper_loss(x, b).item(), rel=1e-14)
    m = ADP.maid_config(cfg, c)
    assert m.step0 == pytest.approx(cfg["step"] * c, rel=1e-15) and m.delta0 == pytest.approx(cfg["delta0"] / c)


def test_unsquared_h1_gradient_and_subgradient_at_b0():
    """∂_b g with kernel_penalty='h1' matches a central finite difference of g in float64 at b ≠ b₀
    (rel. 1e-6: the O(h²) error of a smooth function with h = 1e-6 relative to ‖b − b₀‖ ≈ 1e-3);
    at b = b₀ it is the squared-penalty problem's ∂_b g with β = 0 (subgradient 0 of the norm)."""
    from conftest import fd_directional
    cfg, x_true, b0, y = small_case(dict(kernel_penalty="h1", beta=0.05), size=16)
    P = ADP.build_problem(cfg, y, b0)
    gen = torch.Generator().manual_seed(1)
    b = b0 + 1e-3 * torch.randn(b0.shape, generator=gen, dtype=torch.float64)
    x = x_true.clone()
    d = torch.randn(b0.shape, generator=gen, dtype=torch.float64)
    fd = fd_directional(lambda t: P.upper_loss(x, t), b, d, h=1e-7)
    assert torch.sum(P.upper_grad_theta(x, b) * d).item() == pytest.approx(fd, rel=1e-6)
    plain = ADP.build_problem(dict(cfg, kernel_penalty="h1_squared", beta=0.0), y, b0)
    assert torch.equal(P.upper_grad_theta(x, b0), plain.upper_grad_theta(x, b0))
    assert P.upper_loss(x, b).item() - plain.upper_loss(x, b).item() == \
        pytest.approx(0.05 * math.sqrt(h1_penalty(b, b0).item()), rel=1e-9)


def test_paper_baseline_step_and_under_convergence():
    """The paper's step rule on our data: L̃ with the regulariser ×100 is 50–100× the L̃ without
    it (SPEC §5: "a step 50–100× smaller"); 100 iterations with it end much farther from the
    minimiser x̂(b₀) than 100 iterations with the ×1 step, and farther than the converged baseline
    (which is within its certified ε of x̂)."""
    cfg, x_true, b0, y = small_case(preset("paper.py"))
    s100 = ADP.baseline_step(cfg, b0, y)
    s1 = ADP.baseline_step(dict(cfg, baseline_lipschitz_factor=1.0), b0, y)
    assert 50 <= s1 / s100 <= 100
    P = ADP.build_problem(cfg, y, b0)
    x_hat = ADP.solve_baseline(P, dict(cfg, baseline_iters=0, baseline_eps=1e-8), b0, y).x
    paper = ADP.solve_baseline(P, cfg, b0, y, s100)
    fast = ADP.solve_baseline(P, cfg, b0, y, s1)
    conv = ADP.solve_baseline(P, dict(cfg, baseline_iters=0), b0, y)
    assert paper.iters == fast.iters == 100 and not paper.converged
    err = lambda r: torch.linalg.vector_norm(r.x - x_hat).item()  # noqa: E731
    assert err(conv) <= cfg["baseline_eps"] < err(paper)
    assert err(fast) < 0.1 * err(paper)
