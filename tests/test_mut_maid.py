"""maid.py: properties that mutation testing found unchecked (tools/mutation_survivors.md).

The problems are scalar or 2-vector quadratics with ``x̂ = θ`` and ``f(θ) = ½‖θ − 5‖²`` (so
``∇f = θ − 5`` exactly, the reference for every hypergradient below); spies record what MAID
passes to the problem."""
import math

import pytest
import torch
from test_maid import ShiftedQuadratic

from maid import BilevelProblem, ErrorConstants, LowerSolve, MAIDConfig, config_dict, inexact_gradient_descent


class Quadratic(ShiftedQuadratic):
    """``h(x, θ) = ½‖x − θ‖²`` (solved exactly), ``g = ½‖x − 5‖²``: ``∇f(θ) = θ − 5``.  Records the
    accuracy and cap of every lower solve and adjoint solve."""

    def __init__(self):
        self.lower_calls, self.adjoint_calls = [], []

    def solve_lower(self, theta, x0, eps, max_iter):
        self.lower_calls.append((eps, max_iter))
        return ShiftedQuadratic.solve_lower(self, theta, x0, eps, max_iter)

    def solve_adjoint(self, x, theta, rhs, q0, delta, max_iter):
        self.adjoint_calls.append((delta, max_iter))
        return rhs.clone(), 1, True                       # ∇²ₓₓh = I


def test_inexact_gradient_descent_passes_its_accuracies_and_caps_unchanged():
    """Fixed accuracy means fixed: every lower solve gets ``(ε, lower_max_iter)`` and every adjoint
    solve ``(δ, cg_max_iter)``, with δ absolute (not capped by ``0.1‖∇ₓg‖``: here ‖∇ₓg‖ = 0.02 at
    θ₀, so a relative cap would give 0.002 < δ = 0.003); ``δ`` defaults to ε and the caps to the
    documented 1000."""
    p = Quadratic()
    inexact_gradient_descent(p, torch.tensor([4.98]), torch.tensor([4.98]), eps=0.01, step=0.5, max_iter=3,
                             delta=0.003, lower_max_iter=17, cg_max_iter=7)
    assert p.lower_calls and set(p.lower_calls) == {(0.01, 17)}
    assert p.adjoint_calls and set(p.adjoint_calls) == {(0.003, 7)}
    p = Quadratic()
    inexact_gradient_descent(p, torch.tensor([4.98]), torch.tensor([4.98]), eps=0.01, step=0.5, max_iter=2)
    assert set(p.lower_calls) == {(0.01, 1000)} and set(p.adjoint_calls) == {(0.01, 1000)}


def test_inexact_gradient_descent_spends_its_budget_even_on_a_tiny_hypergradient():
    """``grad_tol = 0``: IGD stops for the budget, not for convergence, even where ‖z‖ = 1e-12 (below
    MAID's default ``grad_tol`` 1e-10).  With α = ½ each step halves ``θ − 5`` exactly (powers of
    two), so z never rounds to 0 in 3 steps; the iterates are ``5 − 1e-12·2⁻ᵏ`` (reference: the
    exact gradient descent recurrence, to the float64 spacing 1e-15 at 5)."""
    theta0 = torch.tensor([5.0 - 1e-12])
    res = inexact_gradient_descent(Quadratic(), theta0, theta0.clone(), eps=1e-3, step=0.5, max_iter=3)
    assert res.stop_reason == "max_iter" and len(res.log) == 3
    assert abs(res.theta.item() - (5.0 - (5.0 - theta0.item()) / 8)) < 2e-15


def test_default_upper_lipschitz_is_error_constants_L_g_at_the_same_point():
    """``BilevelProblem.upper_lipschitz(x, θ)`` defaults to ``error_constants(x, θ).L_g`` at that
    very ``(x, θ)``: with ``L_g = 1 + 2‖x‖ + 3‖θ‖`` (a point-dependent constant) it returns the
    formula's value (exact)."""
    class PointDependent(Quadratic):
        def error_constants(self, x, theta):
            L_g = 1 + 2 * x.norm().item() + 3 * theta.norm().item()
            return ErrorConstants(1.0, L_g, 1.0, 0.0, 0.0)

    x, theta = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0])
    assert PointDependent().upper_lipschitz(x, theta) == 1 + 2 * 5.0 + 3 * 2.0


def test_problem_without_error_constants_says_L_g_is_required():
    """The base class's ``error_constants`` refuses with a message naming ``L_g`` and the test that
    needs it (a user implementing the interface learns what is missing)."""
    with pytest.raises(NotImplementedError, match="L_g.*sufficient-decrease"):
        BilevelProblem().error_constants(torch.zeros(1), torch.zeros(1))


def test_config_dict_round_trips():
    """``config_dict`` is a plain dict of every field: ``MAIDConfig(**config_dict(c)) == c``, and the
    values are the configuration's (a saved log can reproduce the run)."""
    cfg = MAIDConfig(eps0=0.3, tau=0.25, max_iter=7, cg_rel_tol=None)
    d = config_dict(cfg)
    assert isinstance(d, dict) and MAIDConfig(**d) == cfg and d["tau"] == 0.25


def test_accelerated_gradient_with_given_L_takes_the_written_first_step():
    """With ``L`` and ``μ`` given there is no backtracking: one iteration from ``x₀`` is
    ``x₁ = x₀ − ∇h(x₀)/L``, ``y₁ = x₁ + β(x₁ − x₀)``, ``β = (1 − √(μ/L))/(1 + √(μ/L))`` (no restart:
    ``⟨∇h(x₀), x₁ − x₀⟩ = −‖∇h‖²/L < 0``), and ``y₁`` is returned at the cap.  ``L = 40`` is 10× the
    true smoothness 4 of ``h = ½Σλᵢ(xᵢ − cᵢ)²``, ``λ ∈ [1, 4]``, so a backtracking solver would pick
    another step.  Reference: the recurrence in float64 (1e-15)."""
    from maid import AcceleratedGradient

    lam, c = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, -2.0, 0.5])
    res = AcceleratedGradient(lambda x, th: 0.5 * (lam * (x - c) ** 2).sum(), mu=1.0, L=40.0)(
        torch.zeros(1), torch.zeros(3), 1e-12, 1)
    x1 = -lam * (-c) / 40.0
    q = math.sqrt(1.0 / 40.0)
    assert res.iters == 1 and torch.allclose(res.x, x1 + (1 - q) / (1 + q) * x1, rtol=0, atol=1e-15)


def test_autodiff_problem_default_constants_use_the_given_mu():
    """Without ``constants=...``, ``AutodiffProblem.error_constants`` reports ``μ`` as given (a number
    or a function of θ) and 0 when not given (no strong convexity claimed), ``L_g`` as given, and
    ∞ for the unknown ``‖J‖``, ``L_J``, ``L_{H⁻¹}`` (so ω = ∞)."""
    from maid import AutodiffProblem

    def h(x, th):
        return 0.5 * ((x - th) ** 2).sum()

    x, th = torch.zeros(2), torch.ones(2)
    for mu, expected in [(2.5, 2.5), (lambda t: 3.0 * t.sum().item(), 6.0), (None, 0.0)]:
        c = AutodiffProblem(h, h, mu=mu, L_g=1.5).error_constants(x, th)
        assert c.mu == expected and c.L_g == 1.5
        assert c.J_norm == c.L_J == c.L_Hinv == math.inf


@pytest.mark.filterwarnings("ignore:AcceleratedGradient without mu:RuntimeWarning")
@pytest.mark.parametrize("mu", [None, 0.01])
def test_accelerated_gradient_follows_its_recurrence_with_gradient_restart(mu):
    """With ``L`` given, :class:`maid.AcceleratedGradient` is the recurrence of its docstring:
    ``x⁺ = y − ∇h(y)/L``, momentum ``β`` (strongly convex with μ, else Nesterov's ``t_k``), and the
    O'Donoghue–Candès restart ``β = 0, t = 1`` whenever ``⟨∇h(y), x⁺ − x⟩ > 0``.  On
    ``h = ½Σλᵢxᵢ²`` with κ = 100 and μ below the true 1 (so the momentum overshoots) the restart
    fires within 40 iterations (asserted, so the rule is exercised); the 40th point equals the
    recurrence written out here (float64, 1e-13: the same operations)."""
    from maid import AcceleratedGradient

    lam = torch.logspace(0, 2, 8)
    h = lambda x, th: 0.5 * (lam * x * x).sum()              # noqa: E731
    x0, L, n = torch.ones(8), 100.0, 40
    x_prev, y, t, restarts = x0, x0, 1.0, 0
    for _ in range(n):
        g = lam * y
        x = y - g / L
        if torch.dot(g, x - x_prev) > 0:
            beta, t, restarts = 0.0, 1.0, restarts + 1
        elif mu is not None:
            q = math.sqrt(mu / L)
            beta = (1 - q) / (1 + q)
        else:
            t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
            beta, t = (t - 1) / t_next, t_next
        y, x_prev = x + beta * (x - x_prev), x
    res = AcceleratedGradient(h, mu=mu, L=L)(torch.zeros(1), x0, 1e-30, n)
    assert restarts >= 1 and res.iters == n
    assert torch.allclose(res.x, y, rtol=0, atol=1e-13)


def test_accelerated_gradient_backtracking_step_satisfies_the_descent_lemma():
    """Without ``L`` the first step's constant is found by backtracking until the descent lemma
    ``h(x₁) ≤ h(x₀) − ‖∇h(x₀)‖²/(2L)`` holds.  With μ not given the first momentum is
    ``(t₀ − 1)/t₁ = 0``, so one iteration returns ``x₁ = x₀ − ∇h(x₀)/L`` and ``L = ‖∇h‖/‖x₁ − x₀‖`` is
    read off the step.  On ``h = 2(x − c)²`` (λ = 4) the lemma holds iff ``L ≥ 4``; the power-iteration
    start is 4 and the first trial ``0.9·4`` must be refused.  Checked with that L (1e-12 for
    rounding)."""
    import warnings
    from maid import AcceleratedGradient

    c = torch.tensor([1.5])
    h = lambda x, th: 2.0 * ((x - c) ** 2).sum()            # noqa: E731
    x0 = torch.zeros(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = AcceleratedGradient(h)(torch.zeros(1), x0, 1e-12, 1)
    g = 4.0 * (x0 - c)
    L = (g.norm() / (res.x - x0).norm()).item()
    assert res.iters == 1 and L >= 4.0 * (1 - 1e-12)
    assert h(res.x, None).item() <= h(x0, None).item() - g.norm().item() ** 2 / (2 * L) + 1e-12


def test_mixed_product_is_zero_when_the_lower_gradient_ignores_theta():
    """``h(x, θ) = ½‖x‖² + ‖θ‖²``: ``∇ₓh = x`` does not depend on θ, so ``∇²_{θx}hᵀq = 0`` (analytic) — a
    zero tensor of θ's shape, not an autograd error — and ``∇²ₓₓh v = v``."""
    from maid import AutodiffProblem

    p = AutodiffProblem(lambda x, th: 0.5 * (x * x).sum() + (th * th).sum(), lambda x, th: (x * x).sum())
    x, th, q = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, -1.0]), torch.tensor([1.0, -1.0, 2.0])
    assert torch.equal(p.mixed_vjp(x, th, q), torch.zeros(2))
    assert torch.equal(p.hessian_vp(x, th, q), q)


class Minimal:
    """The required methods only (no base class: no ``upper_lipschitz``, ``metrics``,
    ``solve_adjoint``, ``initial_x``), ``x̂ = θ``, ``f = ½‖θ − 5‖²``."""

    solve_lower = Quadratic.solve_lower
    upper_loss, upper_grad_x = Quadratic.upper_loss, Quadratic.upper_grad_x
    hessian_vp, mixed_vjp, error_constants = Quadratic.hessian_vp, Quadratic.mixed_vjp, Quadratic.error_constants

    def __init__(self):
        self.lower_calls = []

    def upper_grad_theta(self, x, theta):
        return torch.zeros_like(theta)


def test_optional_methods_are_optional_and_used_where_given():
    """A duck-typed problem with only the required methods runs (``L_g`` then from
    ``error_constants``, no metric columns, CG for the adjoint) and reaches θ = 5 (∇f = θ − 5),
    logging ``iter`` = 1, 2, … and the cumulative CG iterations;
    given ``metrics``, its columns appear in every record; given ``upper_lipschitz``, the line
    search evaluates it at the trial point ``(x̃⁺, θ⁺)`` (here x̃⁺ = θ⁺, recorded)."""
    from maid import maid

    cfg = MAIDConfig(step0=1.0, eps0=1e-3, max_iter=5, descent_check=False)
    res = maid(Minimal(), torch.tensor([1.0]), torch.tensor([1.0]), cfg)
    assert res.stop_reason == "converged" and res.theta.item() == pytest.approx(5.0, abs=1e-12)
    assert "dist" not in res.log[0] and [r["iter"] for r in res.log] == list(range(1, len(res.log) + 1))
    assert 0 < res.log[-1]["cg_iters"] <= res.state.cg_iters      # cumulative (the last z is not logged)

    seen = []

    class WithOptional(Minimal):
        def metrics(self, x, theta):
            return {"dist": abs(theta.item() - 5.0)}

        def upper_lipschitz(self, x, theta):
            seen.append((x.clone(), theta.clone()))
            return 1.0

    res = maid(WithOptional(), torch.tensor([1.0]), torch.tensor([1.0]), cfg)
    assert [r["dist"] for r in res.log] == [abs(5.0 - 5.0)] * len(res.log) and res.log
    assert seen and all(torch.equal(x, th) for x, th in seen)
    assert any(th.item() != 1.0 for _, th in seen)             # trial points, not only θ₀


@pytest.mark.parametrize("value", [torch.tensor(1.0), "1.0", True])
def test_upper_lipschitz_of_a_wrong_type_is_refused(value):
    """``upper_lipschitz`` must return a real number: a tensor, a string or a bool raises one
    TypeError naming the method (a bool is a Real in Python but never a Lipschitz constant)."""
    from maid import maid

    class Wrong(Minimal):
        def upper_lipschitz(self, x, theta):
            return value

    with pytest.raises(TypeError, match="Wrong.upper_lipschitz must return a float"):
        maid(Wrong(), torch.tensor([1.0]), torch.tensor([1.0]), MAIDConfig(step0=1.0, max_iter=2))


def test_prox_of_a_wrong_shape_is_refused_naming_the_shape():
    """A prox whose result does not have θ's shape raises one ValueError naming the prox class, the
    expected shape and the shape it got."""
    from maid import maid

    class BadProx:
        def value(self, theta):
            return 0.0

        def prox(self, v, step):
            return torch.zeros(3)

    with pytest.raises(ValueError, match=r"BadProx.prox must return a tensor of the shape of theta \(1,\), got .*3"):
        maid(Minimal(), torch.tensor([1.0]), torch.tensor([1.0]), MAIDConfig(step0=1.0, max_iter=2), prox=BadProx())


def test_default_step_at_a_stationary_start_converges_without_dividing_by_zero():
    """``step0 = None`` sets α₀ = 1/‖z₀‖; at θ₀ = 5, the minimiser, z₀ = 0 exactly, so MAID must stop
    'converged' at once (α₀ = 1 by convention) instead of dividing by zero."""
    from maid import maid

    res = maid(Quadratic(), torch.tensor([5.0]), torch.tensor([5.0]), MAIDConfig(descent_check=False))
    assert res.stop_reason == "converged" and res.theta.item() == 5.0 and res.log == []


def test_caps_are_counted_and_warned_once():
    """A lower solver that always stops at its cap (finite ‖∇h‖, not converged) makes every solve a
    cap hit: ``lower_cap_hits`` in the log equals the number of solves so far, one RuntimeWarning
    names ``lower_max_iter``; a non-converged CG adds one ``cg_cap_hits`` per hypergradient; the
    adjoint solve is warm-started from the previous ``q`` (None only the first time)."""
    from maid import maid

    class Capped(Quadratic):
        q0s = []

        def solve_lower(self, theta, x0, eps, max_iter):
            self.lower_calls.append((eps, max_iter))
            return LowerSolve(theta.clone(), max_iter, 1e-3, False)

        def solve_adjoint(self, x, theta, rhs, q0, delta, max_iter):
            self.q0s.append(q0)
            return rhs.clone(), max_iter, False

    p = Capped()
    cfg = MAIDConfig(step0=0.5, nu_step=1.0, eps0=1e-3, max_iter=3, descent_check=False, lower_max_iter=4,
                     cg_max_iter=2)
    with pytest.warns(RuntimeWarning, match="lower_max_iter=4") as rec:
        res = maid(p, torch.tensor([1.0]), torch.tensor([1.0]), cfg)
    assert sum("lower_max_iter" in str(w.message) for w in rec) == 1
    assert res.log[-1]["lower_cap_hits"] == len(p.lower_calls) and res.log[-1]["lower_iters"] == 4 * len(p.lower_calls)
    assert [r["cg_cap_hits"] for r in res.log] == [1, 2, 3]
    assert p.q0s[0] is None and all(torch.is_tensor(q) for q in p.q0s[1:]) and len(p.q0s) == 3


@pytest.mark.parametrize("method,value,expected", [
    ("solve_adjoint", lambda x, t, rhs, q0, d, m: (torch.zeros(2), 1, True), r"\.solve_adjoint returned shape \(2,\), "
                                                                              r"expected the shape of x \(1,\)"),
    ("solve_lower", lambda t, x0, e, m: LowerSolve(torch.zeros(2), 1, 0.0, True), r"\.solve_lower returned shape "
                                                                                   r"\(2,\), expected the shape of x"),
])
def test_wrong_shapes_from_solvers_are_named(method, value, expected):
    """A lower or adjoint solve returning an x/q of the wrong shape raises one ValueError naming the
    method, the shape it returned and the shape of x expected."""
    from maid import maid

    broken = type("Broken", (Quadratic,), {method: lambda self, *a: value(*a)})()
    with pytest.raises(ValueError, match=expected):
        maid(broken, torch.tensor([1.0]), torch.tensor([1.0]), MAIDConfig(step0=1.0, max_iter=2))


def test_rejected_step_logs_the_upper_loss_at_the_kept_point():
    """When every line search fails (the mixed term has the wrong sign, so z points uphill), θ stays
    at θ₀ = 1 and each record's ``upper_loss`` is ``g(x̃, θ₀) = ½(1 − 5)² = 8`` (not, e.g., ‖∇ₓg‖ = 4)."""
    from maid import maid

    class Uphill(Quadratic):
        def mixed_vjp(self, x, theta, q):
            return q

    with pytest.warns(RuntimeWarning, match="without accepting"):
        res = maid(Uphill(), torch.tensor([1.0]), torch.tensor([1.0]),
                   MAIDConfig(step0=1.0, eps0=1e-3, max_iter=3, patience=2, descent_check=False))
    assert res.log and not any(r["accepted"] for r in res.log)
    assert all(r["upper_loss"] == 8.0 for r in res.log)


@pytest.mark.parametrize("field", ["max_backtracks", "max_iter", "lower_max_iter", "cg_max_iter", "patience"])
def test_integer_settings_below_one_are_refused_by_name(field):
    """Each count must be a positive integer: 0 raises one ValueError naming the field and the rule."""
    with pytest.raises(ValueError, match=rf"{field} must be a positive integer, got 0"):
        MAIDConfig(**{field: 0}).validate()


@pytest.mark.parametrize("value", [0.0, 1.0, -0.5])
def test_cg_rel_tol_outside_the_open_unit_interval_is_refused(value):
    """``cg_rel_tol`` must lie strictly between 0 and 1 (0 asks CG for an exact solve, ≥ 1 lets ``q = 0``
    pass): refused with one ValueError stating the rule."""
    with pytest.raises(ValueError, match=rf"cg_rel_tol must lie strictly between 0 and 1, got {value}"):
        MAIDConfig(cg_rel_tol=value).validate()


def test_hypergradient_caps_the_adjoint_residual_relative_to_the_upper_gradient():
    """``hypergradient(..., rel_delta=r)`` solves the adjoint to ``min(δ, r‖∇ₓg‖)``: at x = 4.98,
    ‖∇ₓg‖ = 0.02, so r = 0.1 gives 0.002 < δ = 0.01 (and ``rel_delta=None`` keeps δ); z is then
    ``−q = −(x − 5)`` for this problem (∇²ₓₓh = I, ∇²_{θx}h = −I), i.e. exact."""
    from maid import hypergradient

    p, x, th = Quadratic(), torch.tensor([4.98]), torch.tensor([4.98])
    z, q, _, ok = hypergradient(p, x, th, None, 0.01, 50, rel_delta=0.1)
    hypergradient(p, x, th, None, 0.01, 50)
    assert [d for d, _ in p.adjoint_calls] == [pytest.approx(0.002, rel=1e-12), 0.01]
    assert ok and torch.allclose(z, th - 5, rtol=0, atol=1e-15)


def test_negative_max_tightenings_is_refused_by_name():
    """``max_tightenings`` may be 0 (no tightening) but not negative: one ValueError naming it."""
    MAIDConfig(max_tightenings=0).validate()
    with pytest.raises(ValueError, match=r"max_tightenings must be an integer ≥ 0, got -1"):
        MAIDConfig(max_tightenings=-1).validate()
