"""MAID — the Method of Adaptive Inexact Descent — for any bilevel problem (SPEC §2–§3).

    min_θ f(θ) = g(x̂(θ), θ),    x̂(θ) = argmin_x h(x, θ),   h μ-strongly convex in x.

This module knows nothing about images.  A problem is any object implementing
:class:`BilevelProblem`; MAID only calls these methods:

``solve_lower(theta, x0, eps, max_iter) -> LowerSolve``
    an ``x̃`` with ``‖x̃ − x̂(θ)‖ ≤ ε`` (warm-started at ``x0``), iterations used, and whether
    the accuracy was certified: ``LowerSolve.status`` is ``'converged'``, ``'max_iter'`` (cap hit,
    finite ``grad_norm``: MAID counts it as ``lower_cap_hits`` and warns) or ``'non_finite'``
    (non-finite ``grad_norm``: a line-search trial then fails; at the current θ MAID stops).
``upper_loss(x, theta)``, ``upper_grad_x(x, theta)``, ``upper_grad_theta(x, theta)``
    ``g``, ``∇ₓg`` and the direct partial ``∂_θg`` (zero when g does not depend on θ directly).
``hessian_vp(x, theta, v)``
    ``∇²ₓₓh(x, θ) v``.
``mixed_vjp(x, theta, q)``
    ``∇²_{θx}h(x, θ)ᵀ q = ∂_θ⟨∇ₓh(x, θ), q⟩`` (one vector-Jacobian product, shape of θ).
``error_constants(x, theta) -> ErrorConstants``
    ``μ``, ``L_g``, ``‖J‖``, ``L_J``, ``L_{H⁻¹}`` and, when ``g`` depends on θ directly through a
    term that also depends on x, ``L_{θx}`` and ``L'_{θx}`` (both default 0).  ``L_g`` (Lipschitz
    constant of ``∇ₓg`` in x) is **required**: the sufficient-decrease test uses it.  The others
    only enter the bound ``ω`` of the descent check; use ``math.inf`` for any you cannot bound
    (ω is then ∞ and logged so).

Optional: ``solve_adjoint(x, theta, rhs, q0, delta, max_iter)`` (default: conjugate gradient
on ``hessian_vp``), ``upper_lipschitz(x, theta) -> float`` (``L_g`` alone, which the line search
needs at every trial point; default: ``error_constants(x, theta).L_g`` — give a cheaper one when
the other constants are costly) and ``metrics(x, theta) -> dict`` (extra columns of the log,
e.g. PSNR).

Everything is evaluated on tensors of whatever device and dtype the problem uses.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch


__all__ = ["LowerSolve", "BilevelProblem", "ErrorConstants", "conjugate_gradient", "hypergradient", "error_bound",
           "sufficient_decrease", "MAIDConfig", "MAIDState", "MAIDResult", "maid",
           "inexact_gradient_descent"]


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


def hypergradient(problem, x, theta, q0, delta: float, cg_max_iter: int):
    """``z = ∂_θg(x̃, θ) − ∇²_{θx}h(x̃, θ)ᵀ q̃`` with ``∇²ₓₓh q̃ = ∇ₓg(x̃, θ)`` solved to residual δ.

    Returns ``(z, q̃, cg_iterations, cg_converged)``.
    """
    rhs = problem.upper_grad_x(x, theta)
    q, it, ok = problem.solve_adjoint(x, theta, rhs, q0, delta, cg_max_iter)
    z = problem.upper_grad_theta(x, theta) - problem.mixed_vjp(x, theta, q)
    return z, q, it, ok


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
# SPEC §3: MAID
# --------------------------------------------------------------------------------------------
@dataclass
class MAIDConfig:
    """MAID parameters (SPEC §3).  Defaults follow the MAID/ADP papers' code where it states them.

    ``descent_check``: enforce ``ω ≤ (1 − η)‖z‖`` by tightening ε, δ (at most
    ``max_tightenings`` times per iteration).  ω is always computed and logged; with worst-case
    constants it can exceed ‖z‖ by orders of magnitude, in which case tightening only makes
    the lower level expensive — safety never depends on it, because the sufficient-decrease
    test is rigorous on its own.
    """

    eps0: float = 0.1
    delta0: float | None = None          # None: δ = ε
    step0: float = 0.1
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

    def validate(self, names: dict | None = None) -> None:
        """Raise ``ValueError`` for an invalid setting; ``names`` maps field names to the caller's
        option names for the message (e.g. ``{"rho": "maid_rho"}``)."""
        def bad(name, what, v):
            raise ValueError(f"{(names or {}).get(name, name)} must {what}, got {v!r}")

        for name in ("eps0", "step0", "eta", "eps_min"):
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
        for name in ("max_backtracks", "max_iter", "lower_max_iter", "cg_max_iter"):
            if int(getattr(self, name)) < 1:
                bad(name, "be a positive integer", getattr(self, name))


@dataclass
class MAIDState:
    """Everything needed to continue a run exactly: the iterate, warm starts, accuracies, step,
    counters and the log so far.  ``torch.save``-able; pass it back to :func:`maid` to resume."""

    theta: torch.Tensor
    x: torch.Tensor
    q: torch.Tensor | None
    eps: float
    delta: float
    step: float
    k: int = 0
    lower_iters: int = 0
    cg_iters: int = 0
    lower_cap_hits: int = 0
    cg_cap_hits: int = 0
    elapsed: float = 0.0
    log: list = field(default_factory=list)
    x_eps: float | None = None   # accuracy of the solve that produced x at theta (None: no such solve)


@dataclass
class MAIDResult:
    theta: torch.Tensor
    x: torch.Tensor
    log: list
    stop_reason: str
    state: MAIDState


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
                warnings.warn(f"a lower-level solve stopped at lower_max_iter={self.cfg.lower_max_iter} before "
                              f"certifying ‖x̃ − x̂‖ ≤ ε={eps:.3g}; the sufficient-decrease test is not rigorous for "
                              f"such solves (their number is logged as lower_cap_hits)", RuntimeWarning,
                              stacklevel=3)
            self.s.lower_cap_hits += 1
        return res

    def hypergradient(self, x, theta, q0, delta):
        z, q, it, ok = hypergradient(self.p, x, theta, q0, delta, self.cfg.cg_max_iter)
        self.s.cg_iters += it
        self.s.cg_cap_hits += int(not ok)
        return z, q


def _upper_lipschitz(problem, x, theta) -> float:
    """``L_g`` from ``problem.upper_lipschitz`` if the problem has it, else from its error constants."""
    f = getattr(problem, "upper_lipschitz", None)
    return f(x, theta) if f is not None else problem.error_constants(x, theta).L_g


def _upper_terms(problem, x, theta, L_g: float | None = None):
    """``(g, ‖∇ₓg‖, L_g)`` at ``(x, θ)``: what the sufficient-decrease test needs at one point
    (``L_g`` computed unless given)."""
    g = problem.upper_loss(x, theta).item()
    gx = _norm(problem.upper_grad_x(x, theta))
    return g, gx, _upper_lipschitz(problem, x, theta) if L_g is None else L_g


def maid(problem, theta0: torch.Tensor | None = None, x0: torch.Tensor | None = None,
         config: MAIDConfig | None = None, state: MAIDState | None = None,
         callback: Callable[[dict, MAIDState], bool | None] | None = None,
         fixed_step: bool = False) -> MAIDResult:
    """Run MAID from ``(theta0, x0)``, or continue from ``state``.

    ``callback(record, state)`` is called after every upper iteration with the log record just
    appended; returning ``True`` stops the run (reason ``'callback'``).  With
    ``fixed_step=True`` the method is inexact gradient descent (see
    :func:`inexact_gradient_descent`).  Stop reasons: ``'eps_min'``, ``'max_iter'``,
    ``'non_finite'``, ``'callback'``.
    """
    cfg = config or MAIDConfig()
    cfg.validate()
    if state is None:
        if theta0 is None or x0 is None:
            raise ValueError("give either (theta0, x0) or a state to resume from")
        state = MAIDState(theta=theta0.clone(), x=x0.clone(), q=None, eps=cfg.eps0,
                          delta=cfg.eps0 if cfg.delta0 is None else cfg.delta0, step=cfg.step0)
    s = state
    count = _Counter(problem, s, cfg)
    stop = "max_iter"
    while s.k < cfg.max_iter:
        if s.eps < cfg.eps_min:
            stop = "eps_min"
            break
        t0 = time.perf_counter()
        theta = s.theta
        # 1. lower solve + hypergradient, tightened until ω ≤ (1 − η)‖z‖ (descent direction).
        # The accepted candidate was already solved at this θ (at most lower_max_iter iterations);
        # it is reused unless the accuracy asked for now is tighter.
        tightenings = 0
        x, q, x_eps = s.x, s.q, s.x_eps
        while True:
            if x_eps is None or x_eps > s.eps:
                low = count.lower(theta, x, s.eps)
                if low.status == "non_finite":
                    stop = "non_finite"
                    break
                x, x_eps = low.x, s.eps
            z, q = count.hypergradient(x, theta, q, s.delta)
            if not _finite(x, z, q):
                stop = "non_finite"
                break
            zn = _norm(z)
            gxn = _norm(problem.upper_grad_x(x, theta))
            consts = problem.error_constants(x, theta)
            omega = error_bound(s.eps, s.delta, consts, gxn)
            descent_ok = omega <= (1 - cfg.eta) * zn
            if fixed_step or not cfg.descent_check or descent_ok or tightenings >= cfg.max_tightenings:
                break
            s.eps *= cfg.tau
            s.delta *= cfg.tau
            tightenings += 1
        if stop == "non_finite":
            break
        s.x, s.q, s.x_eps = x, q, x_eps
        g_old, gx_old, Lg_old = _upper_terms(problem, x, theta, consts.L_g)
        if not math.isfinite(g_old):
            stop = "non_finite"
            break
        # 2. backtracking line search with the inexact sufficient-decrease test
        accepted, backtracks, step = False, 0, s.step
        theta_new = x_new = None
        for i in range(1 if fixed_step else cfg.max_backtracks):
            step = s.step * cfg.rho**i
            cand = theta - step * z
            backtracks = i
            if not _finite(cand):                       # a non-finite trial point is a failed trial
                continue
            low_new = count.lower(cand, x, s.eps)
            if low_new.status == "non_finite" or not _finite(low_new.x):
                continue
            g_new, gx_new, Lg_new = _upper_terms(problem, low_new.x, cand)
            if not math.isfinite(g_new):
                continue
            if fixed_step or sufficient_decrease(g_new, gx_new, Lg_new, g_old, gx_old, Lg_old,
                                                 s.eps, cfg.eta, step, zn):
                accepted, theta_new, x_new = True, cand, low_new.x
                break
        if fixed_step and not accepted:       # the only trial point was not finite
            stop = "non_finite"
            break
        # 3. update
        if accepted:
            s.theta, s.x, s.x_eps = theta_new, x_new, s.eps
            g_rep = g_new
            if not fixed_step:
                s.eps *= cfg.nu
                s.delta *= cfg.nu
                s.step = cfg.nu_step * step
        else:
            g_rep = g_old
            s.eps *= cfg.tau
            s.delta *= cfg.tau
        s.k += 1
        s.elapsed += time.perf_counter() - t0
        record = dict(iter=s.k, upper_loss=g_rep, eps=s.eps, delta=s.delta, step=step, accepted=accepted,
                      backtracks=backtracks, tightenings=tightenings, grad_norm=zn, omega=omega,
                      descent_ok=descent_ok, lower_iters=s.lower_iters, cg_iters=s.cg_iters,
                      lower_cap_hits=s.lower_cap_hits, cg_cap_hits=s.cg_cap_hits, time=s.elapsed)
        record.update(problem.metrics(s.x, s.theta))
        s.log.append(record)
        if callback is not None and callback(record, s):
            stop = "callback"
            break
    else:
        stop = "max_iter"
    return MAIDResult(s.theta, s.x, s.log, stop, s)


def inexact_gradient_descent(problem, theta0, x0, eps: float, step: float, max_iter: int,
                             delta: float | None = None, lower_max_iter: int = 1000,
                             cg_max_iter: int = 1000, callback=None) -> MAIDResult:
    """Fixed accuracy, fixed step: ``θ_{k+1} = θ_k − α z_k`` with ``z_k`` computed at ``(ε, δ)``.

    Runs on exactly MAID's machinery (same counters, same log); with a small ε it is the
    "IFT" baseline (implicit differentiation with a high-accuracy lower level).
    """
    cfg = MAIDConfig(eps0=eps, delta0=delta, step0=step, max_iter=max_iter, eps_min=0.5 * eps,
                     lower_max_iter=lower_max_iter, cg_max_iter=cg_max_iter, descent_check=False)
    return maid(problem, theta0, x0, cfg, callback=callback, fixed_step=True)


def config_dict(cfg: MAIDConfig) -> dict:
    return asdict(cfg)
