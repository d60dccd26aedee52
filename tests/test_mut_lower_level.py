"""lower_level.py: properties that mutation testing found unchecked (tools/mutation_survivors.md).

The power-iteration estimate is seeded and a lower bound for every iteration count (dense Hessian);
zero fixed-step iterations leave ``x0``; the anchored gradient equals the plain one on odd and even
widths; no certificate without strong convexity; the float32 refined solve follows the float64
recurrence step for step before its first check."""
import math

import pytest
import torch
from conftest import rand
from test_lower_level import _dense, _small_problem

from lower_level import LowerLevel, fista, hessian_norm_estimate, solve_lower, solve_lower_fixed
from operators import motion_kernel
from regularisers import SmoothedTV


def test_hessian_norm_estimate_is_seeded_nondecreasing_and_below_the_top_eigenvalue():
    """Power iteration on a symmetric PSD ``A``: ``‖A v_k‖`` (``v_k`` normalised) never exceeds
    ``λ_max(A)`` and never decreases with ``k``; with zero iterations there is no estimate above
    0; the default is the paper's 10 iterations.  Reference: the dense Hessian built from ``hvp``.  The kernel is scaled by 0.5 so that
    ``λ_max < 1`` (a start value of 1 would exceed it).  The start vector comes from the seed alone:
    the global RNG state does not change the estimate, another seed does (at 2 iterations).
    Tolerance 1e-12 relative: the same products, only summation order differs."""
    b = 0.5 * motion_kernel(3, channels=2, dtype=torch.float64)
    y = rand(2, 7, 6, seed=30)
    h = LowerLevel(b, y, SmoothedTV(0.01, 0.1), mu0=0.01)
    lam = torch.linalg.eigvalsh(_dense(lambda e: h.hvp(y, e), y.shape)).max().item()
    assert lam < 1.0
    ests = [hessian_norm_estimate(h, y, k) for k in range(11)]
    assert all(0.0 <= e <= lam * (1 + 1e-12) for e in ests)
    assert all(a <= b * (1 + 1e-12) for a, b in zip(ests[1:], ests[2:]))
    assert hessian_norm_estimate(h, y) == ests[10]           # the paper's 10 iterations by default
    torch.manual_seed(1)
    first = hessian_norm_estimate(h, y, 2, seed=5)
    torch.manual_seed(2)
    assert hessian_norm_estimate(h, y, 2, seed=5) == first
    assert hessian_norm_estimate(h, y, 2, seed=6) != first


def test_fixed_step_solve_with_zero_iterations_returns_x0_and_its_gradient():
    """``iters = 0`` is allowed (non-negative): no step is taken, the result is ``x0`` with 0
    iterations and ``‖∇h(x0)‖`` (one gradient evaluated), uncertified."""
    h, y = _small_problem()
    res = solve_lower_fixed(h, y, 0, 0.5 / h.L)
    assert torch.equal(res.x, y) and res.iters == 0 and not res.converged
    assert res.grad_norm == pytest.approx(torch.linalg.vector_norm(h.grad(y)).item(), rel=1e-14)


@pytest.mark.parametrize("W", [6, 7])
def test_gradient_from_an_anchor_equals_the_plain_gradient(W):
    """``grad_from_anchor(d, a + d, c)`` with ``c = B_bᵀ(B_b a − y) + μ₀a`` is ``∇h(a + d)``, on an
    even and an odd width (the inverse real FFT needs the output size for odd widths).  Reference:
    :meth:`LowerLevel.grad` in float64; 1e-12 (same FFTs, other grouping)."""
    b = motion_kernel(3, channels=2, dtype=torch.float64)
    h = LowerLevel(b, rand(2, 5, W, seed=31), SmoothedTV(0.05, 0.05), mu0=0.1)
    a, d = rand(2, 5, W, seed=32), 0.1 * rand(2, 5, W, seed=33)
    c = h.quadratic_grad(a)
    assert torch.allclose(h.grad_from_anchor(d, a + d, c), h.grad(a + d), atol=1e-12)


def test_energy_bound_is_infinite_without_strong_convexity():
    """A zero kernel with ``μ₀ = 0`` and TV (convex, λ_R = 0) gives ``μ = 0`` exactly: then no bound
    on ``‖x − x̂‖`` follows from the gradient, and ``energy_bound`` is ∞ rather than a division by
    zero."""
    y = rand(1, 6, 6, seed=34)
    h = LowerLevel(torch.zeros(1, 1, 3, 3), y, SmoothedTV(0.1, 0.1), mu0=0.0)
    assert h.mu == 0.0
    assert h.energy_bound(h.grad(y)) == math.inf


@pytest.mark.parametrize("solver", ["fista", "agd"])
def test_float32_refined_solve_follows_the_float64_recurrence(solver):
    """The float32 solve (anchor + displacement) runs the same accelerated recurrence as the
    float64 one: before its first certificate check (ε = 1e-12 is never met in 6 iterations, and
    the stall window 20√(L/μ) is longer) its 6th iterate equals :func:`fista`'s (or the Nesterov
    scheme's) in float64 from the same start, to float32 accuracy (1e-5 relative: six steps of
    rounding ~1e-7 each, amplified by the momentum)."""
    h64, y = _small_problem()
    h32 = LowerLevel(h64.blur.b.float(), y.float(), SmoothedTV(0.05, 0.05), h64.mu0)
    ref = solve_lower(h64, y, 0.0, 6, solver) if solver == "agd" else fista(h64.grad, y, h64.L, h64.mu, 0.0, 6)
    res = solve_lower(h32, y.float(), 1e-12, 6, solver)
    assert res.iters == 6 and res.converged is False
    err = torch.linalg.vector_norm(res.x.double() - ref.x) / torch.linalg.vector_norm(ref.x - y)
    assert err < 1e-5


def test_float32_solve_reports_non_finite_data_as_non_finite():
    """A NaN in ``y`` makes the first gradient non-finite: the float32 (refined) solve returns at
    once, ``converged is False``, status ``'non_finite'``, 0 iterations, an iterate of x₀'s shape."""
    h, y = _small_problem()
    bad = y.float().clone()
    bad[1, 2, 3] = float("nan")
    res = solve_lower(LowerLevel(h.blur.b.float(), bad, SmoothedTV(0.05, 0.05), h.mu0), y.float(), 1e-3, 50)
    assert res.converged is False and res.status == "non_finite" and res.iters == 0
    assert res.x.shape == y.shape


def test_auto_certificate_is_energy_in_float32_and_the_plain_gradient_test_in_float64():
    """``certificate='auto'`` is documented as ``'energy'`` in lower precision and ``'gradient'`` in
    float64: the float32 'auto' solve stops at the same iterate (bit for bit, same iterations) as
    'energy', which here stops earlier than 'gradient' (so the two are told apart); in float64 'auto'
    is the plain gradient test ``‖∇h‖ ≤ με``, which evaluates no separate certificate
    (``h.certificate_evaluations`` stays 0)."""
    h64, y = _small_problem()
    runs = {}
    for cert in ("auto", "energy", "gradient"):
        h32 = LowerLevel(h64.blur.b.float(), y.float(), SmoothedTV(0.05, 0.05), h64.mu0)
        runs[cert] = solve_lower(h32, y.float(), 1e-3, 5000, certificate=cert)
        assert runs[cert].converged
    assert torch.equal(runs["auto"].x, runs["energy"].x) and runs["auto"].iters == runs["energy"].iters
    assert runs["energy"].iters < runs["gradient"].iters
    res = solve_lower(h64, y, 1e-3, 5000)
    assert res.converged and res.grad_norm <= h64.mu * 1e-3 and h64.certificate_evaluations == 0


def test_certificate_evaluations_accumulate_over_solves():
    """``h.certificate_evaluations`` counts every float64 check made on ``h``: the same float32 solve
    run twice from the same start makes the same checks, so the count doubles."""
    h64, y = _small_problem()
    h32 = LowerLevel(h64.blur.b.float(), y.float(), SmoothedTV(0.05, 0.05), h64.mu0)
    solve_lower(h32, y.float(), 1e-3, 5000)
    once = h32.certificate_evaluations
    solve_lower(h32, y.float(), 1e-3, 5000)
    assert once >= 1 and h32.certificate_evaluations == 2 * once


def test_unknown_solver_message_lists_the_solvers():
    """An unknown solver name is refused with the list of valid ones, comma-separated."""
    h, y = _small_problem()
    with pytest.raises(ValueError, match="unknown lower-level solver 'newton'; use one of fista, agd$"):
        solve_lower(h, y, 1e-3, 10, "newton")


def test_fixed_step_solve_at_an_exact_stationary_point_reports_converged():
    """``solve_lower_fixed`` reports ``converged`` only if ``∇h`` vanished exactly: with y = 0 and
    x₀ = 0 every term of ``∇h(0) = Bᵀ(B·0 − 0) + ∇TV(0) + μ₀·0`` is exactly 0 (TV's gradient at a
    constant image is 0), so it stops at once, converged, 0 iterations, x = x₀."""
    b = motion_kernel(3, channels=2, dtype=torch.float64)
    h = LowerLevel(b, torch.zeros(2, 6, 5), SmoothedTV(0.05, 0.05), mu0=0.1)
    res = solve_lower_fixed(h, torch.zeros(2, 6, 5), 5, 0.5 / h.L)
    assert res.converged and res.iters == 0 and res.grad_norm == 0.0 and not res.x.any()


def test_a_non_regulariser_is_refused_naming_its_type():
    """``LowerLevel(b, y, 0.1)`` (a number where a Regulariser belongs) is refused with one TypeError
    that names what was given (``float``)."""
    b = motion_kernel(3, channels=2, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"regulariser must be a regularisers.Regulariser .*, got float$"):
        LowerLevel(b, rand(2, 6, 6), 0.1)


@pytest.mark.parametrize("eps", [1e-2, 1e-3, 1e-4, 1e-5])
def test_float64_energy_solve_returns_only_points_its_certificate_proves(eps):
    """A float64 ``certificate='energy'`` solve reports ``converged`` only at a point whose energy bound
    (recomputed here) is ≤ ε: a check being due is not a pass (the schedule may check early); and the
    bound is evaluated only when due, far fewer times than there are iterations."""
    h, y = _small_problem()
    res = solve_lower(h, y, eps, 20000, certificate="energy")
    assert res.converged and h.energy_bound(h.grad(res.x)) <= eps
    assert 1 <= h.certificate_evaluations <= max(3, res.iters // 4)


def _learnable_tv_level(C=2, n=10, seed=20):
    """A float64 lower level with per-channel TV weight α (requires grad) and a motion blur."""
    alpha = torch.tensor([0.03, 0.05][:C], dtype=torch.float64, requires_grad=True)
    R = SmoothedTV(alpha, torch.full((C,), 0.02, dtype=torch.float64))
    b = motion_kernel(5, channels=C, dtype=torch.float64)
    y = rand(1, C, n, n, seed=seed)
    return LowerLevel(b, y, R, 0.01), alpha, y, b


def test_grad_is_differentiable_in_the_regulariser_parameters_with_a_plain_x():
    """With R's parameters recording a graph and a plain x, ``∇ₓh`` must be differentiable in α
    (the learnable-TV path): d/dα ⟨∇ₓh(x), w⟩ by autograd equals central finite differences of the
    same function of α (float64, step 1e-6, agreement 1e-7 relative)."""
    h, alpha, y, b = _learnable_tv_level()
    x, w = y + 0.1 * rand(*y.shape, seed=21), rand(*y.shape, seed=22)
    (d_auto,) = torch.autograd.grad((h.grad(x) * w).sum(), alpha)

    def phi(a):
        with torch.no_grad():
            R = SmoothedTV(a, torch.full((2,), 0.02, dtype=torch.float64))
            return (LowerLevel(b, y, R, 0.01).grad(x) * w).sum().item()

    for c in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[c] = 1e-6
        fd = (phi(alpha.detach() + e) - phi(alpha.detach() - e)) / 2e-6
        assert d_auto[c].item() == pytest.approx(fd, rel=1e-7)


def test_hvp_is_differentiable_in_v_when_v_records_a_graph():
    """``∇²h(x) v`` for a ``v`` that records a graph is differentiable in v, and by symmetry of the
    Hessian d/dv ⟨∇²h(x) v, w⟩ = ∇²h(x) w (float64, 1e-12 relative)."""
    h, _, y, _ = _learnable_tv_level()
    x = y + 0.1 * rand(*y.shape, seed=23)
    v = rand(*y.shape, seed=24).requires_grad_(True)
    w = rand(*y.shape, seed=25)
    (d,) = torch.autograd.grad((h.hvp(x.detach(), v) * w).sum(), v)
    with torch.no_grad():
        ref = h.hvp(x, w)
    torch.testing.assert_close(d, ref.detach(), rtol=1e-12, atol=1e-12 * ref.abs().max().item())


def test_non_finite_gradient_stops_with_the_iteration_count():
    """A gradient that becomes non-finite at iteration 3 stops the solve there: ``iters`` is 3 (an
    int the callers add up), not converged, the gradient norm non-finite."""
    calls = []

    def grad(x):
        calls.append(1)
        return x * (math.nan if len(calls) == 4 else 1.0)

    res = fista(grad, torch.ones(3, dtype=torch.float64), L=4.0, mu=0.1, tol=1e-12, max_iter=50)
    assert res.iters == 3 and isinstance(res.iters, int)
    assert not res.converged and not math.isfinite(res.grad_norm)
