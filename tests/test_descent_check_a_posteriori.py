"""maid's descent check with a problem's a-posteriori error bound (``a_posteriori_error``; issue 15):
the decision's τᵗω prediction, the cost accounting, the bound's soundness along a MAID run, and
the refined bound making the check pass where the constants' ω cannot."""
import math

import pytest
import torch
from test_maid import _deblur_problem, _f

from maid import ErrorConstants, MAIDConfig, descent_check_decision, maid

_HUGE = ErrorConstants(mu=1e-6, L_g=1.0, J_norm=1e6, L_J=1e6, L_Hinv=1e6)   # ω of the constants ≫ ‖z‖


@pytest.mark.parametrize("omega, z, expected", [
    (0.2, 1.0, "ok"),                      # ω ≤ (1 − η)‖z‖ already
    (1.0, 0.3, "tighten"),                 # τ² ω = 0.25 ≤ 0.3: two tightenings suffice
    (1.0, 1e-4, "skip: unreachable"),      # τ¹⁰ ω ≈ 9.8e-4 > 1e-4
])
def test_a_posteriori_prediction_scales_omega_by_tau(omega, z, expected):
    """With an a-posteriori ω the decision predicts ``τᵗω`` (the constants are not consulted: with
    huge constants the worst-case prediction would say 'unreachable' in every case)."""
    args = (omega, z, 1e-2, 1e-2, _HUGE, 1.0, 1e-4, 0.5, 10, 1e-9)
    assert descent_check_decision(*args, a_posteriori=True) == expected
    if expected != "ok":
        assert descent_check_decision(*args) == "skip: unreachable"


def test_a_posteriori_prediction_respects_eps_min():
    """Two tightenings from ε = 1e-2 reach 2.5e-3: refused ('needs eps < eps_min') with
    eps_min = 5e-3, allowed with eps_min = 1e-3."""
    base = (1.0, 0.3, 1e-2, 1e-2, _HUGE, 1.0, 1e-4, 0.5, 10)
    assert descent_check_decision(*base, 5e-3, a_posteriori=True) == "skip: needs eps < eps_min"
    assert descent_check_decision(*base, 1e-3, a_posteriori=True) == "tighten"


class _Spy:
    """The ADP problem, recording every a-posteriori call (``(ω, iterations, x, b, q)``)."""

    def __init__(self, p, zero_cost=False):
        self.p, self.calls, self.zero_cost = p, [], zero_cost

    def __getattr__(self, name):
        return getattr(self.p, name)

    def a_posteriori_error(self, x, b, q, target):
        omega, it = self.p.a_posteriori_error(x, b, q, target)
        self.calls.append((omega, it, x.clone(), b.clone(), q.clone()))
        return omega, 0 if self.zero_cost else it


def _run(problem, iters=6):
    _, y, b0, _ = _deblur_problem()
    cfg = MAIDConfig(eps0=1e-2, max_iter=iters, eps_min=1e-7, descent_check=True, lower_max_iter=20000,
                     cg_max_iter=2000)
    return maid(problem, b0.clone(), y.clone(), cfg)


def test_descent_check_uses_the_refined_bound_counts_its_cost_and_it_bounds_the_true_error():
    """Along a MAID run with the check on (float64, 2×12×10 deblurring):

    * the refined bound is asked for (the constants' ω is far above ‖z‖ here), every check passes
      ('ok…') and every logged ω is that bound (≤ (1 − η)‖z‖);
    * its CG iterations are counted: the same run with the spy reporting 0 iterations follows the
      same trajectory and its ``cg_iters`` is lower by exactly their sum;
    * at every call, ω ≥ ‖z − ∇f(b)‖ with ∇f from a lower level solved to 1e-11 and a dense-free
      exact adjoint (CG to 1e-13).
    """
    p, y, b0, _ = _deblur_problem()
    spy = _Spy(p)
    res = _run(spy)
    assert spy.calls and len(res.log) >= 3
    for r in res.log:
        assert r["check"].startswith("ok"), r["check"]
        assert r["omega"] <= (1 - 1e-4) * r["grad_norm"]
    free = _Spy(_deblur_problem()[0], zero_cost=True)
    res0 = _run(free)
    assert [r["upper_loss"] for r in res0.log] == [r["upper_loss"] for r in res.log]
    assert res.log[-1]["cg_iters"] - res0.log[-1]["cg_iters"] == sum(c[1] for c in spy.calls) > 0
    for omega, _, x, b, q in spy.calls[:3]:
        _, x_hat = _f(p, b, x)
        from maid import conjugate_gradient
        q_hat, _, ok = conjugate_gradient(lambda v: p.hessian_vp(x_hat, b, v), p.upper_grad_x(x_hat, b), None,
                                          1e-13, 20000)
        assert ok
        grad_f = p.upper_grad_theta(x_hat, b) - p.mixed_vjp(x_hat, b, q_hat)
        z = p.upper_grad_theta(x, b) - p.mixed_vjp(x, b, q)
        assert torch.linalg.vector_norm(z - grad_f).item() <= omega


def test_problem_without_the_method_keeps_the_constants_omega():
    """A problem without ``a_posteriori_error`` is checked with the constants' ω as before (here the
    check cannot pass: 'skip: …'), and a malformed return is refused naming the method."""
    p, y, b0, _ = _deblur_problem()

    class Plain:
        def __getattr__(self, name):
            if name == "a_posteriori_error":
                raise AttributeError(name)
            return getattr(p, name)

    res = _run(Plain(), iters=2)
    assert all(r["check"].startswith("skip") for r in res.log)

    class Bad(_Spy):
        def a_posteriori_error(self, x, b, q, target):
            return 0.1

    with pytest.raises(TypeError, match="a_posteriori_error must return"):
        _run(Bad(p), iters=1)


def test_decision_boundary_is_omega_at_most_one_minus_eta_times_z():
    """``ω = (1 − η)‖z‖`` exactly passes ('ok'); ``ω`` between ``(1 − η)‖z‖`` and ``(1 + η)‖z‖``
    does not (η = ½ so the numbers are exact)."""
    base = (1e-2, 1e-2, _HUGE, 1.0, 0.5, 0.5, 10, 1e-9)
    assert descent_check_decision(0.5, 1.0, *base, a_posteriori=True) == "ok"
    assert descent_check_decision(0.75, 1.0, *base, a_posteriori=True) == "tighten"


@pytest.mark.parametrize("bad", [0.1, (0.1,), (0.1, 2, 3), (True, 3), ("0.1", 3), (0.1, True), (0.1, 2.0)])
def test_checked_problem_refuses_a_malformed_a_posteriori_return(bad):
    """maid's check of a plug-in problem: ``a_posteriori_error`` must return ``(float, int)``."""
    from maid import _Checked
    p, y, b0, _ = _deblur_problem()

    class Bad(_Spy):
        def a_posteriori_error(self, x, b, q, target):
            return bad

    with pytest.raises(TypeError, match="a_posteriori_error must return"):
        _Checked(Bad(p), b0, y).a_posteriori_error(y, b0, y, 0.5)


def test_checked_problem_without_the_method_reports_no_bound_and_no_cost():
    from maid import _Checked
    p, y, b0, _ = _deblur_problem()
    p.a_posteriori_error = None
    assert _Checked(p, b0, y).a_posteriori_error(y, b0, y, 0.5) == (math.inf, 0)


def test_adp_a_posteriori_error_is_as_tight_as_the_target_needs():
    """``ADPBetaProblem.a_posteriori_error``: with ``target = ∞`` the local bound and no CG; with
    ``target = 0`` the minimum of the local bound and the refined bound at both tolerance pairs of
    ``A_POSTERIORI_TOLERANCES``, with the CG iterations of both; with a target met by the first
    refined bound, that bound and its iterations only."""
    p, y, b0, _ = _deblur_problem()
    b = b0 + 0.01
    x = p.solve_lower(b, y.clone(), 1e-3, 100000).x
    q = torch.zeros_like(x) + 0.01
    local = p.hypergradient_error_bound(x, b, q)
    assert p.a_posteriori_error(x, b, q, math.inf) == (local, 0)
    (n1, a1), (n2, a2) = p.A_POSTERIORI_TOLERANCES
    t1, t2 = p.refined_error_terms(x, b, q, n1, a1), p.refined_error_terms(x, b, q, n2, a2)
    cost = lambda t: t["newton_iterations"] + t["adjoint_iterations"]  # noqa: E731
    assert p.a_posteriori_error(x, b, q, 0.0) == (min(local, t1["omega"], t2["omega"]), cost(t1) + cost(t2))
    assert t1["omega"] < local and cost(t1) > 0
    assert p.a_posteriori_error(x, b, q, t1["omega"]) == (t1["omega"], cost(t1))
    # the default target is 0 ("as tight as it gets"), also where the local bound is already below 1
    from maid import conjugate_gradient
    xa = p.solve_lower(b, x, 1e-8, 100000).x
    qa, _, _ = conjugate_gradient(lambda v: p.hessian_vp(xa, b, v), p.upper_grad_x(xa, b), None, 1e-10, 5000)
    tight = p.a_posteriori_error(xa, b, qa, 0.0)
    assert p.hypergradient_error_bound(xa, b, qa) < 1 and tight[1] > 0
    assert p.a_posteriori_error(xa, b, qa) == tight


@pytest.mark.parametrize("z", [1.2, 1.0])
def test_one_tightening_is_found_when_it_suffices(z):
    """ω = 1, τ = ½, η = ½: one tightening predicts ½ ≤ (1 − η)‖z‖ (strictly for ‖z‖ = 1.2, with
    equality for ‖z‖ = 1), and ε·τ = 5e-3 ≥ ε_min = 4e-3 allows it (two would not: 2.5e-3)."""
    assert descent_check_decision(1.0, z, 1e-2, 1e-2, _HUGE, 1.0, 0.5, 0.5, 10, 4e-3, a_posteriori=True) == "tighten"
