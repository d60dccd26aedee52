"""Lower level of ADP-β: smoothed total variation, the objective ``h`` and its solvers (SPEC §1–§2).

    x̂(b) = argmin_x  h(x, b) = ½‖B_b x − y‖² + α R_γ(x) + (μ₀/2)‖x‖²

``R_γ(x) = Σ_{c,p} sqrt(|∇x_c[p]|² + γ²)``: isotropic in the two spatial differences of each
channel, **channels not coupled**, forward differences with Neumann boundary
(:class:`operators.FiniteDifference`).  Value, gradient and Hessian-vector product are closed
form; the tests check them against autograd in float64.

Constants (closed form, circular ``B_b``):

* strong convexity ``μ = μ₀ + min|b̂|²`` (the TV Hessian is positive semidefinite);
* smoothness ``L = max|b̂|² + 8α/γ + μ₀`` (``‖D‖² ≤ 8`` and ``∇²R_γ ⪯ DᵀD/γ``).

Solvers (both warm-startable, both stop as soon as ``‖∇ₓh(x̃)‖ ≤ μ ε``, which by strong convexity
guarantees ``‖x̃ − x̂‖ ≤ ε``, and both report whether the iteration cap was hit):

* :func:`fista` — accelerated gradient with the constant strong-convexity momentum
  ``(1 − √(μ/L)) / (1 + √(μ/L))``;
* :func:`accelerated_gradient` — Nesterov's accelerated gradient with the momentum
  ``(t_k − 1)/t_{k+1}``, ``t_{k+1} = (1 + √(1 + 4t_k²))/2`` (no knowledge of μ needed for
  the iteration itself, only for the stopping test).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from operators import Blur, FiniteDifference

__all__ = ["tv_value", "tv_grad", "tv_hvp", "LowerLevel", "LowerSolve", "fista",
           "accelerated_gradient", "solve_lower"]


# --------------------------------------------------------------------------------------------
# smoothed total variation R_γ
# --------------------------------------------------------------------------------------------
def _tv_weight(dh, dv, gamma):
    """``w = sqrt(|∇x|² + γ²)`` per pixel and channel."""
    return torch.sqrt(dh * dh + dv * dv + gamma * gamma)


def tv_value(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """``R_γ(x) = Σ sqrt(|∇x|² + γ²)``."""
    dh, dv = FiniteDifference.A(x)
    return _tv_weight(dh, dv, gamma).sum()


def tv_grad(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """``∇R_γ(x) = Dᵀ(∇x / w)``."""
    dh, dv = FiniteDifference.A(x)
    w = _tv_weight(dh, dv, gamma)
    return FiniteDifference.A_adjoint(dh / w, dv / w)


def tv_hvp(x: torch.Tensor, v: torch.Tensor, gamma: float) -> torch.Tensor:
    """``∇²R_γ(x) v = Dᵀ[ Dv/w − ∇x (∇x·Dv)/w³ ]``."""
    dh, dv = FiniteDifference.A(x)
    w = _tv_weight(dh, dv, gamma)
    eh, ev = FiniteDifference.A(v)
    s = (dh * eh + dv * ev) / (w * w)
    return FiniteDifference.A_adjoint((eh - dh * s) / w, (ev - dv * s) / w)


# --------------------------------------------------------------------------------------------
# the lower-level objective h(·, b)
# --------------------------------------------------------------------------------------------
class LowerLevel:
    """``h(x) = ½‖B_b x − y‖² + α R_γ(x) + (μ₀/2)‖x‖²`` for one kernel ``b`` (SPEC §1).

    ``B_bᵀy`` and the kernel spectrum are computed once here, so one gradient costs one
    forward and one inverse FFT plus the TV stencil.
    """

    def __init__(self, b: torch.Tensor, y: torch.Tensor, alpha: float, gamma: float, mu0: float = 0.0):
        self.blur = Blur(b, y.shape[-2:])
        self.y = y
        self.alpha, self.gamma, self.mu0 = float(alpha), float(gamma), float(mu0)
        self.Bty = self.blur.A_adjoint(y)
        self.mu = self.mu0 + self.blur.min_singular_sq()
        self.L = self.blur.norm() ** 2 + FiniteDifference.NORM_SQ_BOUND * self.alpha / self.gamma + self.mu0

    def value(self, x: torch.Tensor) -> torch.Tensor:
        r = self.blur.A(x) - self.y
        return 0.5 * (r * r).sum() + self.alpha * tv_value(x, self.gamma) + 0.5 * self.mu0 * (x * x).sum()

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        """``∇ₓh = B_bᵀ(B_b x − y) + α∇R_γ(x) + μ₀x``."""
        return self.blur.A_adjoint_A(x) - self.Bty + self.alpha * tv_grad(x, self.gamma) + self.mu0 * x

    def hvp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``∇²ₓₓh(x) v = B_bᵀB_b v + α∇²R_γ(x) v + μ₀v``."""
        return self.blur.A_adjoint_A(v) + self.alpha * tv_hvp(x, v, self.gamma) + self.mu0 * v


# --------------------------------------------------------------------------------------------
# solvers
# --------------------------------------------------------------------------------------------
@dataclass
class LowerSolve:
    """Result of a lower-level solve: the iterate, iterations used, final ‖∇h‖, and whether the
    stopping test ``‖∇h‖ ≤ μ ε`` was met (``False`` means the iteration cap was hit)."""

    x: torch.Tensor
    iters: int
    grad_norm: float
    converged: bool


def _accelerated(grad: Callable, x0: torch.Tensor, L: float, tol: float, max_iter: int,
                 momentum: Callable[[int], float]) -> LowerSolve:
    """Shared loop: ``x⁺ = y − ∇h(y)/L``, ``y⁺ = x⁺ + β_k (x⁺ − x)``.

    The stopping test is evaluated on the extrapolated point ``y`` whose gradient the step
    needs anyway, and ``y`` is returned when it passes, so each iteration costs one gradient.
    """
    x_prev = x0
    y = x0
    for k in range(max_iter + 1):
        g = grad(y)
        gn = torch.linalg.vector_norm(g).item()
        if not math.isfinite(gn):
            return LowerSolve(y, k, gn, False)
        if gn <= tol:
            return LowerSolve(y, k, gn, True)
        if k == max_iter:
            return LowerSolve(y, k, gn, False)
        x = y - g / L
        y = x + momentum(k) * (x - x_prev)
        x_prev = x
    raise AssertionError("unreachable")


def fista(grad: Callable, x0: torch.Tensor, L: float, mu: float, tol: float, max_iter: int) -> LowerSolve:
    """FISTA for a μ-strongly convex, L-smooth objective: constant momentum
    ``(1 − √(μ/L))/(1 + √(μ/L))``.  Stops when ``‖∇h‖ ≤ tol`` or after ``max_iter`` iterations."""
    q = math.sqrt(max(mu, 0.0) / L)
    beta = (1 - q) / (1 + q)
    return _accelerated(grad, x0, L, tol, max_iter, lambda k: beta)


def accelerated_gradient(grad: Callable, x0: torch.Tensor, L: float, mu: float, tol: float,
                         max_iter: int) -> LowerSolve:
    """Nesterov's accelerated gradient, momentum ``(t_k − 1)/t_{k+1}``; ``mu`` is unused by the
    iteration (kept for a common signature).  Stops like :func:`fista`."""
    t = [1.0]

    def momentum(k):
        t_next = (1 + math.sqrt(1 + 4 * t[0] ** 2)) / 2
        m = (t[0] - 1) / t_next
        t[0] = t_next
        return m

    return _accelerated(grad, x0, L, tol, max_iter, momentum)


SOLVERS = {"fista": fista, "agd": accelerated_gradient}


def solve_lower(h: LowerLevel, x0: torch.Tensor, eps: float, max_iter: int, solver: str = "fista") -> LowerSolve:
    """Solve ``min h`` to accuracy ``‖x̃ − x̂‖ ≤ ε`` via the test ``‖∇ₓh(x̃)‖ ≤ μ ε``, warm-started at ``x0``."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown lower-level solver {solver!r}; use one of {', '.join(SOLVERS)}")
    return SOLVERS[solver](h.grad, x0, h.L, h.mu, h.mu * eps, max_iter)
