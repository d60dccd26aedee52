"""regularisers.py: properties that mutation testing found unchecked (tools/mutation_survivors.md).

References: derivatives by hand (a quartic regulariser), autograd of the value in float64, the
documented frequency-grid bound recomputed with full complex FFTs and an M chosen by hand, and
the documented messages of the parameter checks."""
import math

import pytest
import torch
from conftest import rand

from regularisers import FieldsOfExperts, Regulariser, SmoothedTV, AnisotropicTV


class _Quartic(Regulariser):
    """``R_θ(x) = θ Σ x⁴/4`` given by its value only (autograd fallback): ``∇R = θx³``,
    ``∇²R v = 3θx² ⊙ v``."""

    def __init__(self, theta):
        self.theta = theta

    def value(self, x):
        return self.theta * (x ** 4).sum() / 4

    def parameters(self):
        return {"theta": self.theta}


def test_fallback_gradient_is_differentiable_in_a_recorded_input():
    """With ``x`` recorded by autograd the fallback ``∇R(x) = θx³`` keeps its graph to ``x``:
    ``∂ₓ⟨∇R(x), u⟩ = 3θx² ⊙ u`` (by hand, 1e-12)."""
    theta = torch.tensor(0.7)
    x = rand(2, 4, 5, seed=1).requires_grad_(True)
    u = rand(2, 4, 5, seed=2)
    g = _Quartic(theta).grad(x)
    assert torch.allclose(g, theta * x.detach() ** 3, rtol=1e-12, atol=0)
    (dg,) = torch.autograd.grad((g * u).sum(), x)
    assert torch.allclose(dg, 3 * theta * x.detach() ** 2 * u, rtol=1e-12, atol=0)


def test_fallback_hvp_is_differentiable_in_the_parameters():
    """With only a parameter θ recorded, the fallback ``∇²R(x)v = 3θx² ⊙ v`` keeps its graph to θ:
    ``∂_θ⟨∇²R(x)v, u⟩ = Σ 3x² v u`` (by hand, 1e-12); the mixed products of the upper level need it."""
    theta = torch.tensor(0.7, requires_grad=True)
    x, v, u = rand(2, 4, 5, seed=3), rand(2, 4, 5, seed=4), rand(2, 4, 5, seed=5)
    hv = _Quartic(theta).hvp(x, v)
    assert torch.allclose(hv, 3 * theta.detach() * x ** 2 * v, rtol=1e-12, atol=0)
    (dtheta,) = torch.autograd.grad((hv * u).sum(), theta)
    assert dtheta.item() == pytest.approx((3 * x ** 2 * v * u).sum().item(), rel=1e-12)


@pytest.fixture
def float32_default():
    """The package's runtime default dtype (float32) for one test; the suite's float64 after."""
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(torch.float64)


def test_float64_tv_derivatives_keep_float64_accuracy_under_a_float32_default(float32_default):
    """The lower level's certificate evaluates ``∇R`` in float64 inside a float32 session: the fused
    TV gradient and curvature of float64 images must carry ``γ²`` in float64, i.e. agree with
    autograd of the float64 value to 1e-12 relative.  ``|∇x| ~ 1e-3 ≪ γ = 0.1`` makes ``γ²``
    dominate ``w``, so ``γ²`` rounded to float32 (relative error ~1e-8) would show."""
    R = SmoothedTV(0.7, 0.1)
    x = 1e-3 * rand(2, 6, 5, seed=6)
    v = rand(2, 6, 5, seed=7)
    xr = x.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(R.value(xr), xr, create_graph=True)
    (h_ref,) = torch.autograd.grad((g_ref * v).sum(), xr)
    g, hv = R.grad(x), R.hvp(x, v)
    assert g.dtype == hv.dtype == torch.float64
    assert (g - g_ref).abs().max() <= 1e-12 * g_ref.abs().max()
    assert (hv - h_ref).abs().max() <= 1e-12 * h_ref.abs().max()


def test_parameter_checks_name_the_parameter():
    """Bad weights/smoothings are refused in one line naming the parameter and the rule; a
    per-channel smoothing with one zero entry is refused like a zero float (``L_R = 8α/γ``)."""
    with pytest.raises(ValueError, match="TV weight must be non-negative and finite"):
        SmoothedTV(-1.0, 0.1)
    with pytest.raises(ValueError, match="TV smoothing must be positive and finite"):
        SmoothedTV(1.0, torch.tensor([0.1, 0.0]))
    with pytest.raises(ValueError, match="TV smoothing must be positive and finite"):
        AnisotropicTV(1.0, 0.0)
    assert SmoothedTV(torch.tensor([0.0, 1.0]), 0.1).lipschitz() == pytest.approx(80.0)   # α = 0 allowed


@pytest.mark.parametrize("kw", [dict(smoothing=math.inf), dict(smoothing=math.nan), dict(smoothing=-1.0),
                                dict(scale=math.inf), dict(scale=0.0), dict(scale=math.nan)])
def test_foe_refuses_non_positive_or_non_finite_smoothing_and_scale(kw):
    """``e^s`` and ``e^c`` need a positive finite smoothing and scale: anything else is refused in
    one line naming both."""
    with pytest.raises(ValueError, match="FoE smoothing and scale must be positive and finite"):
        FieldsOfExperts(1, n_filters=1, size=3, **kw)


def test_foe_refuses_even_filters_naming_their_shape():
    with pytest.raises(ValueError, match=r"FoE filters must have shape \(K, C, k, k\) with k odd, got \(2, 1, 4, 4\)"):
        FieldsOfExperts(filters=torch.zeros(2, 1, 4, 4))


def test_foe_defaults_are_spec_6():
    """SPEC §6: 10 filters of 7×7 over all input channels (3 by default: RGB), zero-mean and of unit
    norm at initialisation, unit weights, 'valid' boundary."""
    R = FieldsOfExperts()
    assert tuple(R.filters.shape) == (10, 3, 7, 7) and R.padding == "valid"
    assert R.filters.mean(dim=(1, 2, 3)).abs().max() < 1e-12
    assert torch.allclose(torch.linalg.vector_norm(R.filters, dim=(1, 2, 3)), torch.ones(10))
    assert torch.equal(R.weights, torch.ones(10))


def test_to_converts_and_moves_every_parameter():
    """``to(dtype, device)`` returns a copy whose every parameter (by the names of ``parameters()``,
    which are the attributes) is in the new dtype / on the new device ('meta' keeps shapes only),
    and leaves the original alone."""
    R = FieldsOfExperts(2, n_filters=2, size=3, seed=3)
    r32 = R.to(dtype=torch.float32)
    assert all(t.dtype == torch.float32 for t in r32.parameters().values())
    assert all(getattr(r32, name) is t for name, t in r32.parameters().items())
    assert r32.weights.dtype == r32.filters.dtype == torch.float32
    assert all(t.dtype == torch.float64 for t in R.parameters().values())
    rm = R.to(device="meta")
    assert all(t.device.type == "meta" for t in rm.parameters().values())
    assert set(rm.parameters()) == {"filters", "weights", "log_smoothing", "log_scale"}


def _trig_poly_max(f, w, M):
    """``max_ω P(ω)``, ``P = Σ_j |w_j| Σ_c |f̂_{j,c}(ω)|²`` on the full M×M grid (complex FFT)."""
    spec = torch.fft.fft2(f, s=(M, M)).abs() ** 2
    return (w.abs()[:, None, None] * spec.sum(1)).sum(0).max().item()


@pytest.mark.parametrize("k, grid_factor, M", [(3, 0.15, 128), (5, 0.15, 256), (7, 0.15, 256), (3, 0.5, 64)])
def test_filter_bank_bound_is_the_documented_bernstein_bound(k, grid_factor, M):
    """``P̄ = max_grid P / (1 − 2πd/M)``, ``d = k − 1``, M the smallest power of two ≥ 64 with
    ``2πd/M ≤ grid_factor`` (chosen by hand here: 2π·2/64 = 0.196 > 0.15 ≥ 2π·2/128 = 0.098, etc.),
    to 1e-12; and it bounds P on a 1024×1024 grid (validity of the degree used)."""
    w = torch.tensor([0.5, -1.5, 2.0])
    R = FieldsOfExperts(2, n_filters=3, size=k, weights=w, seed=k)
    f = R.filters.detach()
    d = k - 1
    expected = _trig_poly_max(f, w, M) / (1 - 2 * math.pi * d / M)
    assert R.filter_bank_norm_bound(grid_factor) == pytest.approx(expected, rel=1e-12)
    assert R.filter_bank_norm_bound(grid_factor) >= _trig_poly_max(f, w, 1024)


def test_filter_bank_bound_of_one_by_one_filters_is_exact():
    """1×1 filters: ``P(ω) = Σ_j |w_j| ‖f_j‖²`` is constant, and the bound is that constant."""
    f = torch.tensor([[[[2.0]], [[-1.0]]], [[[0.5]], [[0.5]]]])
    w = torch.tensor([1.0, -3.0])
    R = FieldsOfExperts(filters=f, weights=w, channels=2)
    assert R.filter_bank_norm_bound() == pytest.approx(1.0 * 5.0 + 3.0 * 0.5, rel=1e-14)
