"""MAID — the Method of Adaptive Inexact Descent — a plug-in bilevel optimiser (SPEC §2–§3).

    min_θ f(θ) = g(x̂(θ), θ),    x̂(θ) = argmin_x h(x, θ),   h μ-strongly convex in x.

This module knows nothing about images.  There are two ways to state a problem.

**Minimal (autodiff).** :class:`AutodiffProblem` takes the values ``h(x, θ)`` and ``g(x, θ)``
as torch functions, optionally a lower-level solver, and gets every derivative MAID needs
by autograd (double backward, as jaxopt and hypertorch do)::

    problem = AutodiffProblem(lower_objective=h, upper_objective=g, x_init=y, mu=1.0)
    result = maid(problem, theta0)              # MAIDConfig() defaults
    result.theta, result.stop_reason

The default lower solver is :class:`AcceleratedGradient` (backtracking on the smoothness
constant, so no ``L`` is needed); its certificate ``‖x̃ − x̂‖ ≤ ε`` needs ``μ`` (see there).
``L_g`` (Lipschitz constant of ``∇ₓg`` in x), when not given, is estimated by power
iteration on the autograd Hessian of ``g`` (an estimate, not a bound: the sufficient-decrease
test is then only as rigorous as the estimate).  Without the constants of ω (below) the
descent check is skipped (ω = ∞) and the run relies on the sufficient-decrease test alone.

**Full interface.** Any object with these methods (closed forms are an optimisation; the
base class :class:`BilevelProblem` documents them; ``adp_problem.ADPBetaProblem`` and
``elastic_net.ElasticNetBilevel`` implement them):

``solve_lower(theta, x0, eps, max_iter) -> LowerSolve``
    an ``x̃`` with ``‖x̃ − x̂(θ)‖ ≤ ε`` (warm-started at ``x0``), iterations used, and whether
    the accuracy was certified: ``LowerSolve.status`` is ``'converged'``, ``'max_iter'`` (cap hit,
    finite ``grad_norm``: MAID counts it as ``lower_cap_hits`` and warns) or ``'non_finite'``
    (non-finite ``grad_norm``: a line-search trial then fails; at the current θ MAID stops).
``upper_loss(x, theta)``, ``upper_grad_x(x, theta)``, ``upper_grad_theta(x, theta)``
    ``g`` (a scalar tensor), ``∇ₓg`` (shape of x) and the direct partial ``∂_θg`` (shape of θ;
    zero when g does not depend on θ directly).
``hessian_vp(x, theta, v)``
    ``∇²ₓₓh(x, θ) v`` (shape of x).
``mixed_vjp(x, theta, q)``
    ``∇²_{θx}h(x, θ)ᵀ q = ∂_θ⟨∇ₓh(x, θ), q⟩`` (one vector-Jacobian product, shape of θ).
``error_constants(x, theta) -> ErrorConstants``
    ``μ``, ``L_g``, ``‖J‖``, ``L_J``, ``L_{H⁻¹}`` and, when ``g`` depends on θ directly through a
    term that also depends on x, ``L_{θx}`` and ``L'_{θx}`` (both default 0).  ``L_g`` is
    **required**: the sufficient-decrease test uses it.  The others only enter the bound ``ω``
    of the descent check; use ``math.inf`` for any you cannot bound (ω is then ∞: the check is
    skipped and the record says so).

Optional: ``solve_adjoint(x, theta, rhs, q0, delta, max_iter)`` (default: conjugate gradient
on ``hessian_vp``), ``upper_lipschitz(x, theta) -> float`` (``L_g`` alone, which the line search
needs at every trial point; default: ``error_constants(x, theta).L_g`` — give a cheaper one when
the other constants are costly), ``metrics(x, theta) -> dict`` (extra columns of the log,
e.g. PSNR), ``initial_x(theta)`` (the lower level's starting point when ``maid`` gets no
``x0``) and ``a_posteriori_error(x, theta, q, target) -> (omega, cg_iterations)``: a bound
``ω ≥ ‖z − ∇f(θ)‖`` for the hypergradient ``z = ∂_θg(x, θ) − (∂²_{θx}h)ᵀq`` computed from this
very pair, valid for any ``(x, q)`` (a-posteriori), and the CG iterations it spent (added to the
cost); ``target = (1 − η)‖G‖`` is what the check needs, so a problem may stop refining its bound
once ``ω ≤ target``.  The descent check asks for it only when the constants' ω does not already pass, uses the
smaller of the two, and predicts ``ω(τᵗε, τᵗδ) ≈ τᵗω`` for an a-posteriori ω (it is then
recomputed after each tightening).  ``ADPBetaProblem`` provides it (its refined bound).

Every value a problem returns is checked once per call (type and shape only, no arithmetic):
a wrong one raises one ``TypeError``/``ValueError`` naming the method (:class:`_Checked`).

**Why MAID stops** (``MAIDResult.stop_reason``): ``'converged'`` (``‖z_k‖ ≤ grad_tol``, so
``‖∇f(θ_k)‖ ≤ grad_tol + ω``), ``'eps_min'`` (ε below ``eps_min``), ``'max_iter'`` (budget),
``'no_progress'`` (``patience`` consecutive rejected line searches, or a rejected line search
none of whose trial points differed from θ in floating point: θ − αz rounds to θ),
``'non_finite'`` (NaN/Inf at the current point; the last good state is kept) and
``'callback'``.  Stopping for ``eps_min`` or ``no_progress`` without one accepted step warns
(``RuntimeWarning``): θ has not moved.

**When the descent check runs** (SPEC §3 step 1, :func:`descent_check_decision`): it asks
``ω ≤ (1 − η)‖z‖`` by tightening ``ε, δ ← τε, τδ``.  It is used only where ω is finite and
informative; it is skipped (and the record's ``check`` says why) when ω is ∞/NaN, when even
the remaining tightenings cannot bring ω below ``(1 − η)‖z‖`` (predicted from the current
constants before any lower-level work: ω is a polynomial in ``(ε, δ)`` with non-negative
coefficients, evaluated at ``τᵗε, τᵗδ``), or when the accuracy it would need is below
``eps_min`` (tightening would only end the run).  The sufficient-decrease test is rigorous on
its own, so skipping the check never makes an accepted step unsafe.

Everything is evaluated on tensors of whatever device and dtype the problem uses.
"""
from __future__ import annotations

import math
import numbers
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch


__all__ = ["LowerSolve", "BilevelProblem", "ErrorConstants", "AutodiffProblem", "AcceleratedGradient",
           "power_iteration", "conjugate_gradient", "hypergradient", "error_bound", "sufficient_decrease",
           "descent_check_decision", "MAIDConfig", "MAIDState", "MAIDResult", "STOP_REASONS", "maid",
           "init_state", "hypergradient_step", "line_search", "update", "inexact_gradient_descent"]


def _norm(t: torch.Tensor) -> float:
    return torch.linalg.vector_norm(t).item()


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.sum(a * b).item()
# --------------------------------------------------------------------------------------------
# the interface
# --------------------------------------------------------------------------------------------
@dataclass
class LowerSolve:
    """Result of a lower-level solve: the iterate, iterations used, final ‖∇h‖, and whether the
    stopping test ``‖∇h‖ ≤ μ ε`` was met (``False`` means the iteration cap was hit)."""

    x: torch.Tensor
    iters: int
    grad_norm: float
    converged: bool

    @property
    def status(self) -> str:
        """``'converged'``, ``'max_iter'`` (cap hit, finite iterate) or ``'non_finite'`` (NaN/Inf met)."""
        if self.converged:
            return "converged"
        return "max_iter" if math.isfinite(self.grad_norm) else "non_finite"


@dataclass
class ErrorConstants:
    """Constants of the a-posteriori bound ω (SPEC §3) at the current point ``(x̃, θ)``.

    ``L_gtheta`` and ``L_gtheta_jac`` bound the error of the direct partial ``∇_θg`` (see
    :func:`error_bound`): together they must satisfy, for every ``x`` with ``‖x − x̃‖ ≤ ε``,

        ‖∇_θg(x̃, θ) − ∇_θg(x, θ)‖ ≤ L_{θx} ε + ½ L'_{θx} ε²,

    e.g. ``L_{θx} ≥ ‖∂ₓ∇_θg(x̃, θ)‖`` and ``L'_{θx}`` a Lipschitz constant of ``x ↦ ∂ₓ∇_θg(x, θ)``
    (Taylor), or ``L_{θx}`` a global Lipschitz constant of ``x ↦ ∇_θg(x, θ)`` and ``L'_{θx} = 0``.
    ``L_{θx} + ½L'_{θx}ε`` is thus a Lipschitz constant of ``x ↦ ∇_θg(x, θ)`` between ``x̃`` and the
    ε-ball around it.  Both default to 0, which is exact when ``∇_θg`` does not depend on ``x``
    (``g`` independent of θ, or only through a penalty on θ alone).
    """

    mu: float        # strong convexity of h in x
    L_g: float       # Lipschitz constant of ∇ₓg in x
    J_norm: float    # ‖J‖, J = ∂_θ∇ₓh(x̃, θ)
    L_J: float       # Lipschitz constant of J in x
    L_Hinv: float    # Lipschitz constant of x ↦ ∇²ₓₓh(x, θ)⁻¹
    L_gtheta: float = 0.0      # L_{θx}: ‖∂ₓ∇_θg(x̃, θ)‖ (or a Lipschitz constant of x ↦ ∇_θg(x, θ))
    L_gtheta_jac: float = 0.0  # L'_{θx}: Lipschitz constant of x ↦ ∂ₓ∇_θg(x, θ)


class BilevelProblem:
    """Base class documenting the interface MAID needs (see the module docstring)."""

    def solve_lower(self, theta, x0, eps: float, max_iter: int) -> LowerSolve:
        raise NotImplementedError

    def upper_loss(self, x, theta) -> torch.Tensor:
        raise NotImplementedError

    def upper_grad_x(self, x, theta) -> torch.Tensor:
        raise NotImplementedError

    def upper_grad_theta(self, x, theta) -> torch.Tensor:
        return torch.zeros_like(theta)

    def hessian_vp(self, x, theta, v) -> torch.Tensor:
        raise NotImplementedError

    def mixed_vjp(self, x, theta, q) -> torch.Tensor:
        raise NotImplementedError

    def error_constants(self, x, theta) -> ErrorConstants:
        raise NotImplementedError("error_constants must return at least L_g (the Lipschitz constant of "
                                  "∇ₓg in x), which the sufficient-decrease test needs")

    def upper_lipschitz(self, x, theta) -> float:
        """``L_g`` at ``(x, θ)``, the Lipschitz constant of ``∇ₓg`` in x (the sufficient-decrease test
        needs it at every trial point; override when :meth:`error_constants` is expensive)."""
        return self.error_constants(x, theta).L_g

    def solve_adjoint(self, x, theta, rhs, q0, delta: float, max_iter: int):
        """Solve ``∇²ₓₓh q = rhs`` to residual ``≤ δ``; returns ``(q, iters, converged)``."""
        return conjugate_gradient(lambda v: self.hessian_vp(x, theta, v), rhs, q0, delta, max_iter)

    def metrics(self, x, theta) -> dict:
        return {}


# --------------------------------------------------------------------------------------------
# SPEC §2: the inexact hypergradient
# --------------------------------------------------------------------------------------------
def conjugate_gradient(apply_H: Callable, rhs: torch.Tensor, q0: torch.Tensor | None, delta: float,
                       max_iter: int):
    """Conjugate gradient for ``H q = rhs`` (H symmetric positive definite), warm-started at
    ``q0``, stopped when ``‖rhs − H q‖ ≤ δ``.  Returns ``(q, iterations, converged)``."""
    q = torch.zeros_like(rhs) if q0 is None else q0.clone()
    r = rhs - apply_H(q) if q0 is not None else rhs.clone()
    p = r.clone()
    rr = _dot(r, r)
    for k in range(max_iter + 1):
        if math.sqrt(rr) <= delta:
            return q, k, True
        if k == max_iter or not math.isfinite(rr):
            return q, k, False
        Hp = apply_H(p)
        a = rr / _dot(p, Hp)
        q = q + a * p
        r = r - a * Hp
        rr_new = _dot(r, r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    raise AssertionError("unreachable")


def hypergradient(problem, x, theta, q0, delta: float, cg_max_iter: int, rel_delta: float | None = None):
    """``z = ∂_θg(x̃, θ) − ∇²_{θx}h(x̃, θ)ᵀ q̃`` with ``∇²ₓₓh q̃ = ∇ₓg(x̃, θ)`` solved to residual
    ``δ' = min(δ, rel_delta ‖∇ₓg(x̃, θ)‖)`` (``δ' = δ`` when ``rel_delta`` is None).

    The relative cap: ``q = 0`` already has residual ``‖∇ₓg‖``, so a ``δ ≥ ‖∇ₓg‖`` lets CG return
    ``q = 0`` and ``z = ∂_θg`` alone, which carries no information on ``∇f``.  ``δ' ≤ δ``, so every
    bound stated with δ still holds.  Returns ``(z, q̃, cg_iterations, cg_converged)``.
    """
    return _hypergradient(problem, x, theta, q0, delta, cg_max_iter, rel_delta)[:4]


def _hypergradient(problem, x, theta, q0, delta, cg_max_iter, rel_delta):
    """:func:`hypergradient` plus the residual tolerance ``δ'`` it used."""
    rhs = problem.upper_grad_x(x, theta)
    if rel_delta is not None:
        delta = min(delta, rel_delta * _norm(rhs))
    q, it, ok = problem.solve_adjoint(x, theta, rhs, q0, delta, cg_max_iter)
    z = problem.upper_grad_theta(x, theta) - problem.mixed_vjp(x, theta, q)
    return z, q, it, ok, delta


def error_bound(eps: float, delta: float, c: ErrorConstants, grad_x_g_norm: float) -> float:
    """A bound on ``‖z − ∇f(θ)‖`` when ``‖x̃ − x̂(θ)‖ ≤ ε`` and the CG residual is ``≤ δ``:

        ω(ε, δ) = c ε + (‖J‖/μ) δ + (L_J L_g/μ) ε²  +  L_{θx} ε + ½ L'_{θx} ε²,
        c = L_g‖J‖/μ + L_{H⁻¹}‖∇ₓg(x̃)‖‖J‖ + L_J‖∇ₓg(x̃)‖/μ.

    With ``z = ∇_θg(x̃) − J(x̃)ᵀq̃`` and ``∇f = ∇_θg(x̂) − J(x̂)ᵀq̂`` (``q̂ = ∇²ₓₓh(x̂)⁻¹∇ₓg(x̂)``),

        z − ∇f = [∇_θg(x̃) − ∇_θg(x̂)] − [J(x̃)ᵀ(q̃ − q̂) + (J(x̃) − J(x̂))ᵀq̂].

    The first three terms (the MAID paper's ω) bound the second bracket.  The last two bound the
    first bracket, the error of the direct partial ``∇_θg`` (:class:`ErrorConstants`): it is zero
    when ``g`` depends on θ only through a penalty on θ alone (then ``L_{θx} = L'_{θx} = 0`` and ω
    is the paper's), but not when the upper level uses a θ-dependent operator on ``x`` — ADP-β
    with ``A_up = B_b`` — where leaving it out makes ω too small to be a bound.
    """
    if not c.mu > 0:                  # no strong convexity: no bound
        return math.inf
    cc = c.L_g * c.J_norm / c.mu + c.L_Hinv * grad_x_g_norm * c.J_norm + c.L_J * grad_x_g_norm / c.mu
    direct = c.L_gtheta * eps + 0.5 * c.L_gtheta_jac * eps**2
    return cc * eps + c.J_norm / c.mu * delta + c.L_J * c.L_g / c.mu * eps**2 + direct


def sufficient_decrease(g_new: float, gx_new_norm: float, L_g_new: float,
                        g_old: float, gx_old_norm: float, L_g_old: float,
                        eps: float, eta: float, step: float, z_norm: float) -> bool:
    """Inexact sufficient-decrease test (SPEC §3, step 2):

        [g(x̃⁺) + ‖∇ₓg(x̃⁺)‖ε + L_g ε²/2] − [g(x̃_k) − ‖∇ₓg(x̃_k)‖ε − L_g ε²/2] ≤ −η α ‖z_k‖².

    The left side bounds ``f(θ⁺) − f(θ_k)`` from above whenever ``‖x̃ − x̂‖ ≤ ε`` at both points,
    so an accepted step decreases the exact upper objective.
    """
    upper_new = g_new + gx_new_norm * eps + 0.5 * L_g_new * eps**2
    lower_old = g_old - gx_old_norm * eps - 0.5 * L_g_old * eps**2
    return upper_new - lower_old <= -eta * step * z_norm**2




# --------------------------------------------------------------------------------------------
# the minimal interface: values in, derivatives by autograd
# --------------------------------------------------------------------------------------------
def power_iteration(apply: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor, iters: int = 20,
                    seed: int = 0) -> float:
    """``‖A v_k‖`` for the normalised power iterate ``v_k`` of a symmetric PSD operator ``A``:
    an estimate of ``λ_max(A)`` from below (it increases towards ``λ_max`` with ``k``).  The start
    vector is a seeded Gaussian, so the estimate is reproducible."""
    g = torch.Generator(device=like.device).manual_seed(seed)
    v = torch.randn(like.shape, generator=g, dtype=like.dtype, device=like.device)
    v = v / torch.linalg.vector_norm(v)
    lam = 0.0
    for _ in range(iters):
        Av = apply(v)
        lam = _norm(Av)
        if not lam > 0 or not math.isfinite(lam):
            return lam if math.isfinite(lam) else math.inf
        v = Av / lam
    return lam


def _grad(out: torch.Tensor, leaf: torch.Tensor, grad_outputs=None, **kw) -> torch.Tensor:
    """``∂ leaf`` of ``⟨out, grad_outputs⟩`` by autograd; zero where ``out`` does not depend on ``leaf``."""
    if not out.requires_grad:
        return torch.zeros_like(leaf)
    g, = torch.autograd.grad(out, leaf, grad_outputs=grad_outputs, allow_unused=True, **kw)
    return torch.zeros_like(leaf) if g is None else g


def _value_and_grad_x(fn: Callable, x: torch.Tensor, theta: torch.Tensor):
    """``(fn(x, θ), ∇ₓ fn(x, θ))`` by one backward pass (no graph kept)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        val = fn(xg, theta.detach())
        grad = _grad(val, xg)
    return val.detach(), grad


def _constant_or_call(c, theta) -> float | None:
    """A constant given as a number or as a function of θ (``None`` stays ``None``)."""
    return None if c is None else float(c(theta) if callable(c) else c)


class AcceleratedGradient:
    """Default lower-level solver of :class:`AutodiffProblem`: accelerated gradient on ``h(·, θ)``
    with gradients by autograd, warm-started, stopped by the certificate ``‖∇ₓh(x̃)‖ ≤ μ ε``
    (⇒ ``‖x̃ − x̂‖ ≤ ε`` by μ-strong convexity).

    Iteration (the test point ``y`` is returned when it passes, as in ``lower_level.fista``)::

        x⁺ = y − ∇h(y)/L,   y⁺ = x⁺ + β (x⁺ − x)

    * ``L``: the smoothness constant of ``h(·, θ)`` if given (number or function of θ; then no
      backtracking), else backtracking: ``L`` doubles until ``h(x⁺) ≤ h(y) − ‖∇h(y)‖²/(2L)``
      (the descent lemma, which holds once ``L`` ≥ the local Lipschitz constant), and each
      step first tries ``0.9 L`` so that ``L`` follows θ down as well as up (one extra value of
      ``h`` per iteration).  The first ``L`` is a power-iteration estimate on the autograd
      Hessian at ``x0``; each later solve starts from half the last ``L``.
    * ``β = (1 − √(μ/L))/(1 + √(μ/L))`` when ``μ`` is given (strongly convex momentum), else
      Nesterov's ``(t_k − 1)/t_{k+1}``; restarted (β = 0, ``t = 1``) whenever
      ``⟨∇h(y), x⁺ − x⟩ > 0`` (O'Donoghue–Candès gradient restart), so the iteration is robust
      to a wrong or missing μ.
    * ``μ`` (number or function of θ) is what makes the stopping test a certificate.  Without
      it the test is ``‖∇h‖ ≤ ε``, which certifies ``‖x̃ − x̂‖ ≤ ε`` only when h is at least
      1-strongly convex (e.g. a data term ``½‖x − y‖²`` plus a convex regulariser); a warning
      says so once.
    """

    def __init__(self, objective: Callable, mu=None, L=None, power_iters: int = 10):
        self.h, self.mu, self.L, self.power_iters = objective, mu, L, power_iters
        self._L_last: float | None = None
        self._warned = False

    def _start_L(self, theta, x0) -> float:
        if self._L_last is not None:
            return 0.5 * self._L_last
        hvp = _hvp_closure(self.h, x0, theta)
        return max(power_iteration(hvp, x0, self.power_iters), 1e-12)

    def __call__(self, theta, x0, eps: float, max_iter: int) -> LowerSolve:
        mu = _constant_or_call(self.mu, theta)
        L_given = _constant_or_call(self.L, theta)
        if mu is None and not self._warned:
            warnings.warn("AcceleratedGradient without mu stops on ‖∇h‖ ≤ ε, a certificate of ‖x̃ − x̂‖ ≤ ε only "
                          "if h is 1-strongly convex; pass mu=... for a certificate", RuntimeWarning, stacklevel=2)
            self._warned = True
        tol = (1.0 if mu is None else mu) * eps
        L = L_given if L_given is not None else self._start_L(theta, x0)
        x_prev, y, t = x0.detach(), x0.detach(), 1.0
        for k in range(max_iter + 1):
            hy, gy = _value_and_grad_x(self.h, y, theta)
            gn = _norm(gy)
            if not (math.isfinite(gn) and math.isfinite(hy.item())):
                return LowerSolve(y, k, math.nan, False)
            if gn <= tol or k == max_iter:
                self._L_last = L
                return LowerSolve(y, k, gn, gn <= tol)
            x, L = self._step(theta, y, hy.item(), gy, gn, L, L_given is not None)
            if _dot(gy, x - x_prev) > 0:                    # gradient restart
                beta, t = 0.0, 1.0
            elif mu is not None:
                q = math.sqrt(min(mu / L, 1.0))
                beta = (1 - q) / (1 + q)
            else:
                t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
                beta, t = (t - 1) / t_next, t_next
            y = x + beta * (x - x_prev)
            x_prev = x
        raise AssertionError("unreachable")

    def _step(self, theta, y, hy: float, gy, gn: float, L: float, fixed: bool):
        """``x⁺ = y − ∇h(y)/L``; unless ``L`` was given, first tried with ``0.9 L`` (so ``L`` can
        decrease), then doubled until the descent lemma holds.  Once the decrease it asks for,
        ``‖∇h‖²/(2L)``, is below the rounding of ``h``'s value the test says nothing and ``L`` is kept."""
        rounding = 1e-12 * (abs(hy) + 1.0)
        if fixed or gn * gn / (2 * L) <= 100 * rounding:
            return y - gy / L, L
        L *= 0.9
        while True:
            x = y - gy / L
            hx = self.h(x, theta.detach()).item()
            if hx <= hy - gn * gn / (2 * L) + rounding or L > 1e300:
                return x, L
            L *= 2.0


def _hvp_closure(fn: Callable, x: torch.Tensor, theta: torch.Tensor) -> Callable:
    """``v ↦ ∇²ₓₓ fn(x, θ) v`` by double backward on one graph of ``∇ₓ fn`` (kept for reuse)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        grad = _grad(fn(xg, theta.detach()), xg, create_graph=True)

    def apply(v):
        with torch.enable_grad():
            return _grad(grad, xg, v, retain_graph=True)

    return apply


class AutodiffProblem(BilevelProblem):
    """A bilevel problem stated by its objective values; every product MAID needs by autograd.

    Arguments (``h = lower_objective``, ``g = upper_objective``, both ``(x, θ) -> scalar tensor``
    written with differentiable torch operations):

    * ``lower_solver(theta, x0, eps, max_iter) -> LowerSolve`` certifying ``‖x̃ − x̂(θ)‖ ≤ ε``;
      default :class:`AcceleratedGradient` on ``h`` with ``mu`` and ``L`` below.
    * ``x_init``: the lower level's starting point (``maid`` uses it when given no ``x0``).
    * ``mu``, ``L``: strong convexity and smoothness of ``h(·, θ)`` (numbers or functions of θ;
      optional, see :class:`AcceleratedGradient`).  ``mu`` also enters ω.
    * ``L_g``: Lipschitz constant of ``∇ₓg`` in x (number or function of θ).  If omitted it is
      **estimated** by power iteration on the autograd Hessian ``∇²ₓₓg`` at the current point
      ``(x̃_k, θ_k)`` once per upper iteration (in :meth:`error_constants`), and the running
      maximum over the run is used at every trial point.  Exact for quadratic ``g`` (e.g.
      ``‖x − x_true‖²/n``: ``2/n``); for non-quadratic ``g`` an estimate, so the decrease
      test is then as rigorous as that estimate.
    * ``constants(x, theta) -> ErrorConstants``: the constants of ω, if known; by default
      ``μ`` as given (0 when not given) and ``‖J‖ = L_J = L_{H⁻¹} = ∞``, so ω = ∞ and MAID
      skips the descent check (module docstring).
    * ``metrics(x, theta) -> dict``: extra log columns.

    Products (``x, θ`` detached; one graph of ``∇ₓh(x, θ)`` with ``create_graph=True`` is kept
    for the last ``(x, θ)`` seen, so conjugate gradient reuses it):

    * ``hessian_vp``: ``∇²ₓₓh v = ∂ₓ⟨∇ₓh(x, θ), v⟩``;
    * ``mixed_vjp``: ``∇²_{θx}hᵀq = ∂_θ⟨∇ₓh(x, θ), q⟩``;
    * ``upper_grad_x``, ``upper_grad_theta``: one backward pass of ``g`` each (a θ that ``g``
      does not use gives a zero partial).
    """

    def __init__(self, lower_objective: Callable, upper_objective: Callable, lower_solver: Callable | None = None,
                 *, x_init: torch.Tensor | None = None, mu=None, L=None, L_g=None,
                 constants: Callable | None = None, metrics: Callable | None = None, power_iters: int = 20):
        self.h, self.g = lower_objective, upper_objective
        self.lower_solver = lower_solver or AcceleratedGradient(lower_objective, mu=mu, L=L)
        self.x_init, self.mu, self.L_g = x_init, mu, L_g
        self._constants, self._metrics, self.power_iters = constants, metrics, power_iters
        self._graph_key = None
        self._graph = None
        self.L_g_estimate = 0.0          # running maximum of the power-iteration estimates

    def initial_x(self, theta):
        if self.x_init is None:
            raise ValueError("AutodiffProblem has no x_init: pass x_init=... or give maid an x0")
        return self.x_init

    def solve_lower(self, theta, x0, eps, max_iter):
        return self.lower_solver(theta, x0, eps, max_iter)

    # -- upper level -------------------------------------------------------------------------
    def upper_loss(self, x, theta):
        with torch.no_grad():
            return self.g(x, theta)

    def upper_grad_x(self, x, theta):
        return _value_and_grad_x(self.g, x, theta)[1]

    def upper_grad_theta(self, x, theta):
        with torch.enable_grad():
            tg = theta.detach().requires_grad_(True)
            return _grad(self.g(x.detach(), tg), tg)

    # -- second-order products of h ------------------------------------------------------------
    def _grad_graph(self, x, theta):
        """``(x_leaf, θ_leaf, ∇ₓh)`` with a graph through both leaves, cached for the last (x, θ)."""
        key = (x, x._version, theta, theta._version)
        if self._graph_key is None or any(a is not b for a, b in zip(key, self._graph_key)):
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                tg = theta.detach().requires_grad_(True)
                grad = _grad(self.h(xg, tg), xg, create_graph=True)
            self._graph_key, self._graph = key, (xg, tg, grad)
        return self._graph

    def _vjp(self, x, theta, v, wrt: int):
        xg, tg, grad = self._grad_graph(x, theta)
        leaf = (xg, tg)[wrt]
        with torch.enable_grad():
            return _grad(grad, leaf, v, retain_graph=True)

    def hessian_vp(self, x, theta, v):
        return self._vjp(x, theta, v, 0)

    def mixed_vjp(self, x, theta, q):
        return self._vjp(x, theta, q, 1)

    # -- constants -----------------------------------------------------------------------------
    def _estimate_L_g(self, x, theta) -> float:
        hvp = _hvp_closure(self.g, x, theta)
        self.L_g_estimate = max(self.L_g_estimate, power_iteration(hvp, x, self.power_iters))
        return self.L_g_estimate

    def upper_lipschitz(self, x, theta):
        given = _constant_or_call(self.L_g, theta)
        if given is not None:
            return given
        return self.L_g_estimate if self.L_g_estimate > 0 else self._estimate_L_g(x, theta)

    def error_constants(self, x, theta):
        if self._constants is not None:
            return self._constants(x, theta)
        L_g = _constant_or_call(self.L_g, theta)
        if L_g is None:
            L_g = self._estimate_L_g(x, theta)
        mu = _constant_or_call(self.mu, theta)
        return ErrorConstants(mu=0.0 if mu is None else mu, L_g=L_g, J_norm=math.inf, L_J=math.inf,
                              L_Hinv=math.inf)

    def metrics(self, x, theta):
        return {} if self._metrics is None else self._metrics(x, theta)


# --------------------------------------------------------------------------------------------
# what a problem returns: type and shape checks, once per call, naming the method
# --------------------------------------------------------------------------------------------
def _is_default_adjoint(problem) -> bool:
    meth = getattr(type(problem), "solve_adjoint", None)
    return meth is None or meth is BilevelProblem.solve_adjoint


class _Checked:
    """The problem seen through type/shape checks (no arithmetic is changed).  ``θ`` and ``x``
    keep the shapes of ``θ₀`` and ``x₀``; each method's result is checked where MAID receives it
    and a wrong one raises one ``TypeError``/``ValueError`` naming the method."""

    def __init__(self, problem, theta0: torch.Tensor, x0: torch.Tensor):
        self.p, self.name = problem, type(problem).__name__
        self.theta_shape, self.x_shape = theta0.shape, x0.shape

    def _tensor(self, meth: str, out, shape, what: str):
        if not torch.is_tensor(out):
            raise TypeError(f"{self.name}.{meth} must return a torch.Tensor of the shape of {what} "
                            f"{tuple(shape)}, got {type(out).__name__}")
        if out.shape != shape:
            raise ValueError(f"{self.name}.{meth} returned shape {tuple(out.shape)}, expected the shape of "
                             f"{what} {tuple(shape)}")
        return out

    def solve_lower(self, theta, x0, eps, max_iter):
        res = self.p.solve_lower(theta, x0, eps, max_iter)
        if not isinstance(res, LowerSolve):
            raise TypeError(f"{self.name}.solve_lower must return a maid.LowerSolve(x, iters, grad_norm, converged), "
                            f"got {type(res).__name__}")
        self._tensor("solve_lower", res.x, self.x_shape, "x")
        return res

    def upper_loss(self, x, theta):
        out = self.p.upper_loss(x, theta)
        if not torch.is_tensor(out):
            raise TypeError(f"{self.name}.upper_loss must return a scalar torch.Tensor, got {type(out).__name__}")
        if out.numel() != 1:
            raise ValueError(f"{self.name}.upper_loss must return a scalar tensor, got shape {tuple(out.shape)}")
        return out

    def upper_grad_x(self, x, theta):
        return self._tensor("upper_grad_x", self.p.upper_grad_x(x, theta), self.x_shape, "x")

    def upper_grad_theta(self, x, theta):
        return self._tensor("upper_grad_theta", self.p.upper_grad_theta(x, theta), self.theta_shape, "theta")

    def hessian_vp(self, x, theta, v):
        return self._tensor("hessian_vp", self.p.hessian_vp(x, theta, v), self.x_shape, "x")

    def mixed_vjp(self, x, theta, q):
        return self._tensor("mixed_vjp", self.p.mixed_vjp(x, theta, q), self.theta_shape, "theta")

    def solve_adjoint(self, x, theta, rhs, q0, delta, max_iter):
        if _is_default_adjoint(self.p):           # CG on the checked product (same arithmetic)
            return conjugate_gradient(lambda v: self.hessian_vp(x, theta, v), rhs, q0, delta, max_iter)
        q, it, ok = self.p.solve_adjoint(x, theta, rhs, q0, delta, max_iter)
        return self._tensor("solve_adjoint", q, self.x_shape, "x"), it, ok

    def error_constants(self, x, theta):
        out = self.p.error_constants(x, theta)
        if not isinstance(out, ErrorConstants):
            raise TypeError(f"{self.name}.error_constants must return a maid.ErrorConstants, got {type(out).__name__}")
        return out

    def upper_lipschitz(self, x, theta) -> float:
        f = getattr(self.p, "upper_lipschitz", None)
        out = f(x, theta) if f is not None else self.error_constants(x, theta).L_g
        if isinstance(out, bool) or not isinstance(out, numbers.Real):
            raise TypeError(f"{self.name}.upper_lipschitz must return a float, got {type(out).__name__}")
        return out

    def a_posteriori_error(self, x, theta, q, target):
        f = getattr(self.p, "a_posteriori_error", None)
        if f is None:
            return math.inf, 0
        out = f(x, theta, q, target)
        if (not isinstance(out, tuple) or len(out) != 2 or isinstance(out[0], bool)
                or not isinstance(out[0], numbers.Real) or isinstance(out[1], bool) or not isinstance(out[1], int)):
            raise TypeError(f"{self.name}.a_posteriori_error must return (omega: float, cg_iterations: int), got {out!r}")
        return float(out[0]), out[1]

    def metrics(self, x, theta) -> dict:
        f = getattr(self.p, "metrics", None)
        out = {} if f is None else f(x, theta)
        if not isinstance(out, dict):
            raise TypeError(f"{self.name}.metrics must return a dict, got {type(out).__name__}")
        return out


def descent_check_decision(omega: float, z_norm: float, eps: float, delta: float, consts: ErrorConstants,
                           grad_x_g_norm: float, eta: float, tau: float, tightenings_left: int,
                           eps_min: float, a_posteriori: bool = False) -> str:
    """What the descent check (SPEC §3 step 1) does with ``ω`` and ``‖z‖`` at ``(ε, δ)``:

    * ``'ok'``: ``ω ≤ (1 − η)‖z‖`` — z is a descent direction, nothing to do;
    * ``'skip: omega not finite'``: ω = ∞ or NaN (some constant unknown or unbounded);
    * ``'skip: unreachable'``: even ``t = tightenings_left`` more tightenings leave the predicted
      ``ω(τᵗε, τᵗδ) > (1 − η)‖z‖``.  The prediction evaluates :func:`error_bound` with today's
      constants at the tightened accuracies (ω is a polynomial in ``(ε, δ)`` with non-negative
      coefficients, so it shrinks by at most ``τ`` per tightening in its linear terms), before
      any lower-level work is spent;
    * ``'skip: needs eps < eps_min'``: the fewest tightenings ``t`` predicted to suffice give
      ``τᵗε < ε_min``: tightening would only stop the run at the next iteration;
    * ``'tighten'``: otherwise (``t ≥ 1`` tightenings predicted to suffice and allowed).

    ``‖z‖`` and the constants change a little when the lower level is re-solved, so the
    prediction is re-made after every tightening.  With ``a_posteriori`` (ω from the problem's
    :meth:`a_posteriori_error`, not from the constants) the prediction is ``τᵗω``: an a-posteriori
    bound scales with the errors it measures, which tightening shrinks by ``τ``.
    """
    target = (1 - eta) * z_norm
    if omega <= target:
        return "ok"
    if not math.isfinite(omega):
        return "skip: omega not finite"
    for t in range(1, tightenings_left + 1):
        f = tau**t
        predicted = omega * f if a_posteriori else error_bound(eps * f, delta * f, consts, grad_x_g_norm)
        if predicted <= target:
            return "tighten" if eps * f >= eps_min else "skip: needs eps < eps_min"
    return "skip: unreachable"


# --------------------------------------------------------------------------------------------
# SPEC §3: MAID
# --------------------------------------------------------------------------------------------
STOP_REASONS = ("converged", "eps_min", "max_iter", "no_progress", "non_finite", "callback")


@dataclass
class MAIDConfig:
    """MAID parameters (SPEC §3).  Defaults follow the MAID/ADP papers' code where it states them.

    ``descent_check``: enforce ``ω ≤ (1 − η)‖z‖`` by tightening ε, δ (at most
    ``max_tightenings`` times per iteration), where ω is finite and informative
    (:func:`descent_check_decision`; the log's ``check`` column says what happened).  ω is
    always computed and logged.  Safety never depends on the check, because the
    sufficient-decrease test is rigorous on its own.

    ``grad_tol``: stop (``'converged'``) when ``‖z_k‖ ≤ grad_tol`` (absolute; ``‖∇f‖ ≤ grad_tol + ω``).
    The default ``1e-10`` is a floor at which float64 hypergradients are noise for objectives
    of order one; set it to your problem's scale.  ``patience``: stop (``'no_progress'``) after
    this many consecutive rejected line searches (ε has then shrunk by ``τ^patience``).

    ``cg_rel_tol``: CG stops at residual ``min(δ, cg_rel_tol·‖∇ₓg(x̃)‖)`` (:func:`hypergradient`):
    an absolute δ at or above ``‖∇ₓg‖`` is met by ``q = 0`` and gives ``z = ∂_θg`` — with the
    default ``δ₀ = ε₀ = 0.1`` and a normalised upper loss (``‖∇ₓg‖ ~ 1e-3``) this made ``z = 0``.
    """

    eps0: float = 0.1
    delta0: float | None = None          # None: δ = ε
    step0: float | None = None           # None: 1/‖z₀‖ (the first trial moves θ by 1)
    rho: float = 0.5
    tau: float = 0.5
    nu: float = 1.05
    nu_step: float = 10 / 9
    eta: float = 1e-4
    max_backtracks: int = 5
    eps_min: float = 1e-6
    max_iter: int = 100
    lower_max_iter: int = 1000
    cg_max_iter: int = 1000
    descent_check: bool = True
    max_tightenings: int = 10
    grad_tol: float = 1e-10
    patience: int = 20
    cg_rel_tol: float | None = 0.1       # None: δ is absolute only (as in inexact_gradient_descent)

    def validate(self, names: dict | None = None) -> None:
        """Raise ``ValueError`` for an invalid setting; ``names`` maps field names to the caller's
        option names for the message (e.g. ``{"rho": "maid_rho"}``)."""
        def bad(name, what, v):
            raise ValueError(f"{(names or {}).get(name, name)} must {what}, got {v!r}")

        for name in ("eps0", "eta", "eps_min") + (("step0",) if self.step0 is not None else ()):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                bad(name, "be a positive finite number", v)
        if self.delta0 is not None and not (math.isfinite(self.delta0) and self.delta0 > 0):
            bad("delta0", "be a positive finite number", self.delta0)
        for name in ("rho", "tau"):
            if not 0 < getattr(self, name) < 1:
                bad(name, "lie strictly between 0 and 1", getattr(self, name))
        for name in ("nu", "nu_step"):
            if not getattr(self, name) >= 1:
                bad(name, "be ≥ 1", getattr(self, name))
        for name in ("max_backtracks", "max_iter", "lower_max_iter", "cg_max_iter", "patience"):
            if int(getattr(self, name)) < 1:
                bad(name, "be a positive integer", getattr(self, name))
        if self.cg_rel_tol is not None and not 0 < self.cg_rel_tol < 1:
            bad("cg_rel_tol", "lie strictly between 0 and 1", self.cg_rel_tol)
        if not (math.isfinite(self.grad_tol) and self.grad_tol >= 0):
            bad("grad_tol", "be a finite number ≥ 0", self.grad_tol)
        if int(self.max_tightenings) < 0:
            bad("max_tightenings", "be an integer ≥ 0", self.max_tightenings)


@dataclass
class MAIDState:
    """Everything needed to continue a run exactly: the iterate, warm starts, accuracies, step,
    counters and the log so far.  ``torch.save``-able; pass it back to :func:`maid` to resume."""

    theta: torch.Tensor
    x: torch.Tensor
    q: torch.Tensor | None
    eps: float
    delta: float
    step: float | None            # None until the first hypergradient (MAIDConfig.step0 = None)
    k: int = 0
    lower_iters: int = 0
    cg_iters: int = 0
    lower_cap_hits: int = 0
    cg_cap_hits: int = 0
    elapsed: float = 0.0
    log: list = field(default_factory=list)
    x_eps: float | None = None   # accuracy of the solve that produced x at theta (None: no such solve)
    rejected_in_row: int = 0     # consecutive rejected line searches (for 'no_progress')


@dataclass
class MAIDResult:
    theta: torch.Tensor
    x: torch.Tensor
    log: list
    stop_reason: str
    state: MAIDState


def _caller_level() -> int:
    """The ``stacklevel`` that makes a warning issued in this module point at the first frame
    outside it (the user's call of :func:`maid`, whatever the depth of the internal calls)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def _finite(*ts) -> bool:
    return all(bool(torch.isfinite(t).all()) if torch.is_tensor(t) else math.isfinite(t) for t in ts)


class _Counter:
    """Wraps the problem's solvers so every lower-level and CG iteration is counted once."""

    def __init__(self, problem, state: MAIDState, cfg: MAIDConfig):
        self.p, self.s, self.cfg = problem, state, cfg

    def lower(self, theta, x0, eps):
        res = self.p.solve_lower(theta, x0, eps, self.cfg.lower_max_iter)
        self.s.lower_iters += res.iters
        if res.status == "max_iter":          # a non-finite solve is not a cap hit: the caller handles it
            if self.s.lower_cap_hits == 0:
                where = (f"at lower_max_iter={self.cfg.lower_max_iter}" if res.iters >= self.cfg.lower_max_iter else
                         f"after {res.iters} of lower_max_iter={self.cfg.lower_max_iter} iterations (the solver "
                         f"found ε below what its dtype can certify)")
                warnings.warn(f"a lower-level solve stopped {where} before certifying ‖x̃ − x̂‖ ≤ ε={eps:.3g}; the "
                              f"sufficient-decrease test is not rigorous for such solves (their number is logged as "
                              f"lower_cap_hits)", RuntimeWarning, stacklevel=_caller_level())
            self.s.lower_cap_hits += 1
        return res

    def a_posteriori(self, x, theta, q, target: float) -> float:
        """The problem's a-posteriori ω at ``(x, q)`` (``math.inf`` when it has none: the counter wraps
        :class:`_Checked`, which says so); its CG iterations are counted."""
        omega, it = self.p.a_posteriori_error(x, theta, q, target)
        self.s.cg_iters += it
        return omega

    def hypergradient(self, x, theta, q0, delta):
        z, q, it, ok, delta_used = _hypergradient(self.p, x, theta, q0, delta, self.cfg.cg_max_iter,
                                                 self.cfg.cg_rel_tol)
        self.s.cg_iters += it
        self.s.cg_cap_hits += int(not ok)
        return z, q, delta_used


def _upper_terms(problem, x, theta, L_g: float | None = None):
    """``(g, ‖∇ₓg‖, L_g)`` at ``(x, θ)``: what the sufficient-decrease test needs at one point
    (``L_g`` computed unless given)."""
    g = problem.upper_loss(x, theta).item()
    gx = _norm(problem.upper_grad_x(x, theta))
    return g, gx, problem.upper_lipschitz(x, theta) if L_g is None else L_g


@dataclass
class _Direction:
    """Step 1's output at the current θ: the solve, the hypergradient and the check's verdict."""

    x: torch.Tensor
    q: torch.Tensor
    x_eps: float
    z: torch.Tensor
    z_norm: float
    omega: float
    consts: ErrorConstants
    descent_ok: bool
    tightenings: int
    check: str
    G_norm: float = math.nan      # ‖G‖ at the current step (= ‖z‖ without a prox)


@dataclass
class _Trial:
    """Step 2's output: the last trial step, whether it was accepted, and the accepted point."""

    accepted: bool
    step: float
    backtracks: int
    theta: torch.Tensor | None = None
    x: torch.Tensor | None = None
    g: float | None = None
    finite_trials: int = 0        # trials with a finite θ⁺
    r: float = 0.0                # r(θ⁺) of the last trial (composite objective)
    r_old: float = 0.0            # r(θ_k)
    moved: bool = False           # some finite θ⁺ differed from θ in floating point


class _Composite:
    """The non-smooth part ``r`` of ``F = f + r`` (SPEC §3, issue 17), or nothing (``prox=None``).

    ``prox`` is any object with ``value(θ) -> float`` (``r(θ)``, ``math.inf`` outside its domain)
    and ``prox(v, step) -> tensor`` (``prox_{step·r}(v) = argmin_u ½‖u − v‖² + step·r(u)``; e.g.
    :mod:`prox`).  Without one the trial point is ``θ − αz`` and the "gradient mapping" is ``z``
    itself, with exactly today's arithmetic."""

    def __init__(self, prox):
        self.p = prox

    def value(self, theta) -> float:
        return 0.0 if self.p is None else float(self.p.value(theta))

    def trial(self, theta, z, z_norm: float, step: float):
        """``(θ⁺, ‖G‖)``: ``θ⁺ = prox_{αr}(θ − αz)`` and ``G = (θ − θ⁺)/α``."""
        if self.p is None:
            return theta - step * z, z_norm
        cand = self.p.prox(theta - step * z, step)
        if not torch.is_tensor(cand) or cand.shape != theta.shape:
            raise ValueError(f"{type(self.p).__name__}.prox must return a tensor of the shape of theta "
                             f"{tuple(theta.shape)}, got {getattr(cand, 'shape', type(cand).__name__)}")
        return cand, _norm(theta - cand) / step


def init_state(problem, theta0: torch.Tensor, x0: torch.Tensor | None, cfg: MAIDConfig) -> MAIDState:
    """The state at ``(θ₀, x₀)``: accuracies ``ε₀``, ``δ₀`` (``= ε₀`` unless given), step ``α₀``.
    ``x₀`` defaults to ``problem.initial_x(θ₀)``."""
    if x0 is None:
        init = getattr(problem, "initial_x", None)
        if init is None:
            raise ValueError("maid: give x0 (the lower level's starting point) or a problem with initial_x(theta)")
        x0 = init(theta0)
    if not torch.is_tensor(x0):
        raise TypeError(f"maid: x0 must be a torch.Tensor, got {type(x0).__name__}")
    return MAIDState(theta=theta0.clone(), x=x0.clone(), q=None, eps=cfg.eps0,
                     delta=cfg.eps0 if cfg.delta0 is None else cfg.delta0, step=cfg.step0)


def hypergradient_step(problem, s: MAIDState, cfg: MAIDConfig, count: _Counter, check: bool,
                       comp: _Composite | None = None):
    """SPEC §3 step 1: ``x̃_k`` at accuracy ε (reusing the accepted candidate's solve unless a
    tighter ε is asked for), ``z_k`` at δ, and the descent check (tighten ε, δ by τ while
    :func:`descent_check_decision` says so), stated for the gradient mapping
    ``G = (θ − prox_{αr}(θ − αz))/α`` at the current step α (``G = z`` without a prox).  Returns a
    :class:`_Direction`, or ``None`` on a non-finite solve or hypergradient (the state is then
    left at the last good point)."""
    comp = comp or _Composite(None)
    theta, tightenings = s.theta, 0
    x, q, x_eps = s.x, s.q, s.x_eps
    while True:
        if x_eps is None or x_eps > s.eps:
            low = count.lower(theta, x, s.eps)
            if low.status == "non_finite":
                return None
            x, x_eps = low.x, s.eps
        z, q, delta = count.hypergradient(x, theta, q, s.delta)
        if not _finite(x, z, q):
            return None
        zn = _norm(z)
        if s.step is None:                      # MAIDConfig.step0 = None: a first move of length 1
            s.step = 1.0 / zn if zn > 0 else 1.0
        Gn = comp.trial(theta, z, zn, s.step)[1]
        gxn = _norm(problem.upper_grad_x(x, theta))
        consts = problem.error_constants(x, theta)
        omega = error_bound(s.eps, delta, consts, gxn)
        target = (1 - cfg.eta) * Gn
        a_post = False
        if check and not omega <= target:
            refined = count.a_posteriori(x, theta, q, target)
            if refined < omega:
                omega, a_post = refined, True
        descent_ok = omega <= target
        verdict = "off" if not check else descent_check_decision(
            omega, Gn, s.eps, delta, consts, gxn, cfg.eta, cfg.tau, cfg.max_tightenings - tightenings, cfg.eps_min,
            a_post)
        if verdict != "tighten":
            break
        s.eps *= cfg.tau
        s.delta *= cfg.tau
        tightenings += 1
    if verdict == "ok" and tightenings:
        verdict = f"ok after {tightenings} tightenings"
    elif verdict == "skip: unreachable" and tightenings == cfg.max_tightenings:
        verdict = "capped"
    return _Direction(x, q, x_eps, z, zn, omega, consts, descent_ok, tightenings, verdict, Gn)


def line_search(problem, s: MAIDState, cfg: MAIDConfig, count: _Counter, d: _Direction, upper_old: tuple,
                fixed_step: bool, comp: _Composite | None = None) -> _Trial:
    """SPEC §3 step 2: trials ``θ⁺ = prox_{αr}(θ_k − α z_k)``, ``α = α_k ρⁱ``, ``i < M`` (one trial
    with ``fixed_step``; ``θ⁺ = θ_k − α z_k`` without a prox), each solved at ``ε_k`` from ``x̃_k``
    and accepted by :func:`sufficient_decrease` on the composite objective (``r`` added exactly
    to both sides, ``‖G‖`` in place of ``‖z‖``; see :func:`maid`).  A trial with a non-finite
    θ⁺, solve or loss fails (the search backtracks)."""
    comp = comp or _Composite(None)
    g_old, gx_old, Lg_old = upper_old
    r_old = comp.value(s.theta) if comp.p is not None else 0.0
    trial = _Trial(False, s.step, 0)
    for i in range(1 if fixed_step else cfg.max_backtracks):
        step = s.step * cfg.rho**i
        cand, Gn = comp.trial(s.theta, d.z, d.z_norm, step)
        trial.step, trial.backtracks = step, i
        if not _finite(cand):                       # a non-finite trial point is a failed trial
            continue
        trial.finite_trials += 1
        trial.moved = trial.moved or not torch.equal(cand, s.theta)
        low_new = count.lower(cand, d.x, s.eps)
        if low_new.status == "non_finite" or not _finite(low_new.x):
            continue
        g_new, gx_new, Lg_new = _upper_terms(problem, low_new.x, cand)
        if not math.isfinite(g_new):
            continue
        if comp.p is None:
            ok = sufficient_decrease(g_new, gx_new, Lg_new, g_old, gx_old, Lg_old, s.eps, cfg.eta, step, Gn)
        else:
            r_new = comp.value(cand)
            trial.r = r_new
            ok = sufficient_decrease(g_new + r_new, gx_new, Lg_new, g_old + r_old, gx_old, Lg_old,
                                     s.eps, cfg.eta, step, Gn)
        if fixed_step or ok:
            trial.accepted, trial.theta, trial.x, trial.g = True, cand, low_new.x, g_new
            break
    trial.r_old = r_old
    return trial


def update(problem, s: MAIDState, cfg: MAIDConfig, d: _Direction, trial: _Trial, g_old: float,
           fixed_step: bool, check: bool, t0: float, composite: bool = False) -> dict:
    """SPEC §3 step 3: accepted — ``θ_{k+1} = θ⁺``, ``ε, δ ← νε, νδ``, ``α ← ν_α α``; rejected —
    ``θ`` kept, ``ε, δ ← τε, τδ``.  Appends and returns the iteration's log record."""
    if trial.accepted:
        s.theta, s.x, s.x_eps = trial.theta, trial.x, s.eps
        s.rejected_in_row = 0
        if not fixed_step:
            s.eps *= cfg.nu
            s.delta *= cfg.nu
            s.step = cfg.nu_step * trial.step
    else:
        s.rejected_in_row += 1
        s.eps *= cfg.tau
        s.delta *= cfg.tau
    s.k += 1
    s.elapsed += time.perf_counter() - t0
    record = dict(iter=s.k, upper_loss=trial.g if trial.accepted else g_old, eps=s.eps, delta=s.delta,
                  step=trial.step, accepted=trial.accepted, backtracks=trial.backtracks, tightenings=d.tightenings,
                  grad_norm=d.z_norm, omega=d.omega, descent_ok=d.descent_ok, lower_iters=s.lower_iters,
                  cg_iters=s.cg_iters, lower_cap_hits=s.lower_cap_hits, cg_cap_hits=s.cg_cap_hits, time=s.elapsed)
    if check:
        record["check"] = d.check
    if composite:                 # F = g + r at the (new) iterate, and ‖G‖ at the step of step 1
        record["objective"] = record["upper_loss"] + (trial.r if trial.accepted else trial.r_old)
        record["grad_map_norm"] = d.G_norm
    record.update(problem.metrics(s.x, s.theta))
    s.log.append(record)
    return record


def _iteration(problem, s: MAIDState, cfg: MAIDConfig, count: _Counter, fixed_step: bool, check: bool,
               comp: _Composite):
    """One upper iteration (steps 1–3).  Returns ``(stop_reason or None, record or None)``."""
    t0 = time.perf_counter()
    d = hypergradient_step(problem, s, cfg, count, check, comp)
    if d is None:
        return "non_finite", None
    s.x, s.q, s.x_eps = d.x, d.q, d.x_eps
    if d.G_norm <= cfg.grad_tol:
        return "converged", None
    upper_old = _upper_terms(problem, d.x, s.theta, d.consts.L_g)
    if not math.isfinite(upper_old[0]):
        return "non_finite", None
    trial = line_search(problem, s, cfg, count, d, upper_old, fixed_step, comp)
    if fixed_step and not trial.accepted:       # the only trial point was not finite
        return "non_finite", None
    record = update(problem, s, cfg, d, trial, upper_old[0], fixed_step, check, t0, comp.p is not None)
    stalled = trial.finite_trials > 0 and not trial.moved      # θ − αz rounds to θ for every trial
    if not trial.accepted and (s.rejected_in_row >= cfg.patience or stalled):
        return "no_progress", record
    return None, record


def _check_theta(theta0) -> None:
    if not torch.is_tensor(theta0):
        raise TypeError(f"maid: theta0 must be a torch.Tensor, got {type(theta0).__name__} "
                        f"(e.g. torch.tensor([{theta0!r}], dtype=torch.float64))")


def _warn_if_never_moved(stop: str, s: MAIDState) -> None:
    if stop in ("eps_min", "no_progress") and not any(r["accepted"] for r in s.log):
        warnings.warn(f"MAID stopped ({stop}) after {s.k} iterations without accepting a step: θ is θ₀ "
                      f"(try a smaller step0 or eps0, or check upper_grad_theta/mixed_vjp)", RuntimeWarning,
                      stacklevel=_caller_level())


def maid(problem, theta0: torch.Tensor | None = None, x0: torch.Tensor | None = None,
         config: MAIDConfig | None = None, state: MAIDState | None = None,
         callback: Callable[[dict, MAIDState], bool | None] | None = None,
         fixed_step: bool = False, prox=None) -> MAIDResult:
    """Run MAID from ``(theta0, x0)`` (``x0`` defaults to ``problem.initial_x(theta0)``), or
    continue from ``state``.

    Each iteration: :func:`hypergradient_step` (SPEC §3 step 1), :func:`line_search` (step 2),
    :func:`update` (step 3).  ``callback(record, state)`` is called after every upper iteration
    with the log record just appended; returning ``True`` stops the run (reason ``'callback'``).
    With ``fixed_step=True`` the method is inexact gradient descent (see
    :func:`inexact_gradient_descent`).  Stop reasons: :data:`STOP_REASONS` (module docstring).

    **Inexact proximal MAID** (``prox`` given: an object with ``value(θ)`` and ``prox(v, α)``, e.g.
    :mod:`prox`): ``min_θ F(θ) = f(θ) + r(θ)`` with r convex, possibly non-smooth.  Trial points
    ``θ⁺ = prox_{αr}(θ − αz)``, gradient mapping ``G = (θ − θ⁺)/α``, and the test

        [g(x̃⁺) + ‖∇ₓg(x̃⁺)‖ε + L_gε²/2 + r(θ⁺)] − [g(x̃) − ‖∇ₓg(x̃)‖ε − L_gε²/2 + r(θ)] ≤ −ηα‖G‖².

    Derivation: ``‖x̃ − x̂‖ ≤ ε`` and the L_g-smoothness of g in x give
    ``|g(x̃, θ) − f(θ)| ≤ ‖∇ₓg(x̃)‖ε + L_gε²/2`` (Taylor at x̃), so the first bracket bounds
    ``F(θ⁺)`` from above and the second bounds ``F(θ)`` from below, r being evaluated exactly;
    an accepted step thus decreases the exact F by at least ``ηα‖G‖²``.  This is the
    proximal-gradient sufficient decrease (for exact ``z = ∇f`` and ``α ≤ 1/L_f`` the prox
    inequality ``r(θ⁺) ≤ r(θ) − ⟨G − z, θ − θ⁺⟩`` and the descent lemma give
    ``F(θ⁺) ≤ F(θ) − α(1 − αL_f/2)‖G‖²``, so small steps pass when ε, δ are small).  With ``r = 0``,
    ``G = z`` and the test is SPEC §3's; ``prox=None`` runs today's arithmetic exactly.  ε, δ and
    α adapt as in MAID.  The descent check compares ω with ``‖G‖`` at the current step:
    since ``prox`` is non-expansive, the gradient mapping built from ``∇f`` differs from G by at
    most ω, so ``ω ≤ (1 − η)‖G‖`` keeps it non-zero and aligned.  'converged' means
    ``‖G‖ ≤ grad_tol``.  The log adds ``objective`` (``g + r`` at the iterate) and
    ``grad_map_norm``.  An inexact prox (returned point not the exact minimiser) keeps the test
    valid, since both sides are evaluated at the point actually returned.
    """
    cfg = config or MAIDConfig()
    cfg.validate()
    if state is None:
        if theta0 is None:
            raise ValueError("give either theta0 (and x0, or a problem with initial_x) or a state to resume from")
        _check_theta(theta0)
        state = init_state(problem, theta0, x0, cfg)
    s = state
    checked = _Checked(problem, s.theta, s.x)
    count = _Counter(checked, s, cfg)
    comp = _Composite(prox)
    check = cfg.descent_check and not fixed_step
    stop = "max_iter"
    while s.k < cfg.max_iter:
        if s.eps < cfg.eps_min:
            stop = "eps_min"
            break
        reason, record = _iteration(checked, s, cfg, count, fixed_step, check, comp)
        if record is not None and callback is not None and callback(record, s):
            reason = reason or "callback"
        if reason is not None:
            stop = reason
            break
    _warn_if_never_moved(stop, s)
    return MAIDResult(s.theta, s.x, s.log, stop, s)


def inexact_gradient_descent(problem, theta0, x0, eps: float, step: float, max_iter: int,
                             delta: float | None = None, lower_max_iter: int = 1000,
                             cg_max_iter: int = 1000, callback=None) -> MAIDResult:
    """Fixed accuracy, fixed step: ``θ_{k+1} = θ_k − α z_k`` with ``z_k`` computed at ``(ε, δ)``.

    Runs on exactly MAID's machinery (same counters, same log); with a small ε it is the
    "IFT" baseline (implicit differentiation with a high-accuracy lower level).  It stops
    only for the budget, a non-finite value or the callback (``grad_tol = 0``), and its CG
    tolerance is the absolute δ as given (``cg_rel_tol = None``: a fixed-accuracy method).
    """
    cfg = MAIDConfig(eps0=eps, delta0=delta, step0=step, max_iter=max_iter, eps_min=0.5 * eps,
                     lower_max_iter=lower_max_iter, cg_max_iter=cg_max_iter, descent_check=False, grad_tol=0.0,
                     cg_rel_tol=None)
    return maid(problem, theta0, x0, cfg, callback=callback, fixed_step=True)


def config_dict(cfg: MAIDConfig) -> dict:
    return asdict(cfg)
