"""The allocation-free fast paths of operators.py / lower_level.py agree with the plain formulas.

Without autograd, ``FiniteDifference``, ``tv_grad``, ``tv_hvp`` and ``LowerLevel.grad/hvp`` write
into preallocated buffers (``out=``, in-place updates, the quadratic part in Fourier space, a
cached TV curvature in ``hvp``); with autograd recording they use the plain, differentiable
formulas.  These tests pin the two paths to each other, including odd shapes, batch
dimensions, in-place modification of the point of the cached curvature, and TV weight 0.
"""
import pytest
import torch
from conftest import rand

from lower_level import LowerLevel, tv_grad, tv_hvp, tv_value
from operators import FiniteDifference, gaussian_kernel
from regularisers import SmoothedTV

SHAPES = [(3, 9, 11), (2, 3, 7, 5), (2, 5, 1), (2, 1, 6), (1, 2, 2)]


def _graph(t):
    """A copy that autograd records (forces the differentiable path)."""
    return t.clone().requires_grad_(True)


@pytest.mark.parametrize("shape", SHAPES)
def test_finite_difference_fast_path_matches_differentiable_path(shape):
    x = rand(*shape, seed=1)
    for fast, ref in zip(FiniteDifference.A(x), FiniteDifference.A(_graph(x))):
        assert torch.equal(fast, ref.detach())
    ph, pv = rand(*shape, seed=2), rand(*shape, seed=3)      # last column/row not zero
    fast = FiniteDifference.A_adjoint(ph, pv)
    ref = FiniteDifference.A_adjoint(_graph(ph), _graph(pv)).detach()
    assert torch.allclose(fast, ref, atol=1e-14)
    dh, dv = FiniteDifference.A(x)                              # adjointness of the fast pair
    assert abs((dh * ph).sum() + (dv * pv).sum() - (x * fast).sum()) < 1e-10


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("smoothing", [1e-2, 0.5])
def test_tv_fast_paths_match_differentiable_paths(shape, smoothing):
    x, v = rand(*shape, seed=4), rand(*shape, seed=5)
    assert torch.allclose(tv_grad(x, smoothing), tv_grad(_graph(x), smoothing).detach(), atol=1e-12)
    assert torch.allclose(tv_hvp(x, v, smoothing), tv_hvp(_graph(x), v, smoothing).detach(), atol=1e-10)
    xa = _graph(x)                                              # and against autograd itself
    g = torch.autograd.grad(tv_value(xa, smoothing), xa, create_graph=True)[0]
    assert torch.allclose(tv_grad(x, smoothing), g.detach(), atol=1e-12)
    assert torch.allclose(tv_hvp(x, v, smoothing), torch.autograd.grad(g, xa, v)[0], atol=1e-9)


def test_tv_grad_stays_differentiable():
    x = _graph(rand(2, 6, 7, seed=6))
    v = rand(2, 6, 7, seed=7)
    (g,) = torch.autograd.grad((tv_grad(x, 0.1) * v).sum(), x)
    assert torch.allclose(g, tv_hvp(x.detach(), v, 0.1), atol=1e-10)


SMOOTHING = 0.05


def _lower(tv_weight=0.05, mu0=1e-2, shape=(2, 10, 9)):
    b = gaussian_kernel(3, 0.7, channels=shape[-3])
    b = b + 0.1 * rand(*b.shape, seed=8)                       # not symmetric, not normalised
    return LowerLevel(b, rand(*shape, seed=9), SmoothedTV(tv_weight, SMOOTHING), mu0)


@pytest.mark.parametrize("tv_weight", [0.0, 0.05])
@pytest.mark.parametrize("xshape", [(2, 10, 9), (3, 2, 10, 9)])
def test_lower_level_fast_paths_match_plain_formulas(tv_weight, xshape):
    h = _lower(tv_weight)
    x, v = rand(*xshape, seed=10), rand(*xshape, seed=11)
    blur = h.blur
    quad = blur.A_adjoint(blur.A(x) - h.y) + h.mu0 * x
    assert torch.allclose(h.quadratic_grad(x), quad, atol=1e-12)
    assert torch.allclose(h.grad(x), quad + tv_weight * tv_grad(x, SMOOTHING), atol=1e-12)
    assert torch.allclose(h.grad(x), h.grad(_graph(x)).detach(), atol=1e-12)
    hv = blur.A_adjoint_A(v) + tv_weight * tv_hvp(x, v, SMOOTHING) + h.mu0 * v
    assert torch.allclose(h.hvp(x, v), hv, atol=1e-12)
    assert torch.allclose(h.hvp(x, v), h.hvp(_graph(x), v).detach(), atol=1e-12)


def test_hvp_curvature_cache_follows_x():
    h = _lower()
    x, v = rand(2, 10, 9, seed=12), rand(2, 10, 9, seed=13)
    ref = lambda z: h.blur.A_adjoint_A(v) + h.regulariser.weight * tv_hvp(z, v, SMOOTHING) + h.mu0 * v  # noqa: E731
    first = h.hvp(x, v)
    assert torch.allclose(h.hvp(x, v), first, atol=0)                  # cached, same answer
    x.mul_(3.0).add_(1.0)                                              # in-place change: recomputed
    assert torch.allclose(h.hvp(x, v), ref(x), atol=1e-12)
    x2 = rand(2, 10, 9, seed=14)                                      # another tensor: recomputed
    assert torch.allclose(h.hvp(x2, v), ref(x2), atol=1e-12)
    assert torch.allclose(h.hvp(x, v), ref(x), atol=1e-12)             # and back


def test_hvp_result_is_not_aliased_to_cached_buffers():
    h = _lower()
    x, v = rand(2, 10, 9, seed=15), rand(2, 10, 9, seed=16)
    a = h.hvp(x, v)
    a_copy = a.clone()
    b = h.hvp(x, 2 * v)
    assert torch.equal(a, a_copy) and torch.allclose(b, 2 * a, atol=1e-12)
    g = h.grad(x)
    g_copy = g.clone()
    h.grad(2 * x)
    assert torch.equal(g, g_copy)


def test_hvp_curvature_cache_follows_regulariser_parameters():
    """An in-place change of the regulariser's parameters (an optimiser step, ``project_``) at the
    same ``x`` invalidates the cached curvature: the product equals a freshly built ``LowerLevel``'s
    (1e-12); a stale cache would return the first product."""
    from regularisers import FieldsOfExperts
    R = FieldsOfExperts(2, n_filters=2, size=3, smoothing=1e-2, scale=0.1, seed=3)
    b = gaussian_kernel(3, 0.7, channels=2)
    h = LowerLevel(b, rand(2, 10, 9, seed=17), R, 1e-2)
    x, v = rand(2, 10, 9, seed=18), rand(2, 10, 9, seed=19)
    first = h.hvp(x, v)
    with torch.no_grad():
        R.filters.mul_(2.0)
    second = h.hvp(x, v)
    assert not torch.allclose(first, second)
    assert torch.allclose(second, LowerLevel(b, h.y, R, 1e-2).hvp(x, v), atol=1e-12)
