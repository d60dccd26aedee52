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

Implementation (speed, see ``benchmarks/bench_core.py``): when autograd is not recording, the TV
stencils write into preallocated buffers and fuse their products into in-place updates, the
quadratic part of ``∇ₓh`` is one FFT pair with ``μ₀`` and ``B_bᵀy`` folded into the spectrum,
:meth:`LowerLevel.hvp` caches the TV curvature of the last ``x`` for conjugate gradient, and
the solver update is two fused passes (``add`` with ``alpha``, ``lerp``).  When autograd records
a graph through the inputs, the plain formulas above run instead (differentiable, same
values); ``tests/test_fast_paths.py`` pins the two paths together.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from maid import LowerSolve
from operators import Blur, FiniteDifference, _records_graph

__all__ = ["tv_value", "tv_grad", "tv_hvp", "LowerLevel", "LowerSolve", "fista",
           "accelerated_gradient", "solve_lower"]


# --------------------------------------------------------------------------------------------
# smoothed total variation R_γ
# --------------------------------------------------------------------------------------------
def _tv_weight(dh, dv, gamma):
    """``w = sqrt(|∇x|² + γ²)`` per pixel and channel."""
    return torch.sqrt(dh * dh + dv * dv + gamma * gamma)


def _inv_weight(dh, dv, gamma, scale=1.0):
    """``scale / w = scale / sqrt(|∇x|² + γ²)`` in three passes, one allocation (no autograd)."""
    c = 1.0 / (scale * scale)
    t = torch.addcmul(torch.tensor(gamma * gamma * c, dtype=dh.dtype, device=dh.device), dh, dh, value=c)
    return t.addcmul_(dv, dv, value=c).rsqrt_()


def _sub_div_(out, ph, pv):
    """``out += Dᵀ(ph, pv)`` in place, for fields whose last column (``ph``) / last row (``pv``)
    is zero, as every field built from :meth:`FiniteDifference.A` here is:
    ``Dᵀ(ph, pv) = −ph − pv + ph[·, j−1] + pv[i−1, ·]``."""
    out.sub_(ph).sub_(pv)
    out[..., :, 1:] += ph[..., :, :-1]
    out[..., 1:, :] += pv[..., :-1, :]
    return out


def _sub_div_scaled_(out, dh, dv, a):
    """``out += Dᵀ(a·dh, a·dv)`` in place (same zero last column/row as :func:`_sub_div_`),
    with the products fused into the four updates instead of materialised."""
    out.addcmul_(dh, a, value=-1).addcmul_(dv, a, value=-1)
    out[..., :, 1:].addcmul_(dh[..., :, :-1], a[..., :, :-1])
    out[..., 1:, :].addcmul_(dv[..., :-1, :], a[..., :-1, :])
    return out


def tv_value(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """``R_γ(x) = Σ sqrt(|∇x|² + γ²)``."""
    dh, dv = FiniteDifference.A(x)
    return _tv_weight(dh, dv, gamma).sum()


def tv_grad(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """``∇R_γ(x) = Dᵀ(∇x / w)``."""
    if _records_graph(x):
        dh, dv = FiniteDifference.A(x)
        w = _tv_weight(dh, dv, gamma)
        return FiniteDifference.A_adjoint(dh / w, dv / w)
    return _add_tv_grad_(torch.zeros_like(x), x, gamma)


def _add_tv_grad_(out, x, gamma, scale=1.0):
    """``out += scale·∇R_γ(x) = scale·Dᵀ(∇x/w)`` in place (no autograd)."""
    dh, dv = FiniteDifference.A(x)
    return _sub_div_scaled_(out, dh, dv, _inv_weight(dh, dv, gamma, scale))


def tv_hvp(x: torch.Tensor, v: torch.Tensor, gamma: float) -> torch.Tensor:
    """``∇²R_γ(x) v = Dᵀ[ Dv/w − ∇x (∇x·Dv)/w³ ]``."""
    if _records_graph(x, v):
        dh, dv = FiniteDifference.A(x)
        w = _tv_weight(dh, dv, gamma)
        eh, ev = FiniteDifference.A(v)
        s = (dh * eh + dv * ev) / (w * w)
        return FiniteDifference.A_adjoint((eh - dh * s) / w, (ev - dv * s) / w)
    return _tv_hvp_into(torch.zeros_like(v), _TVCurvature(x, gamma), v)


class _TVCurvature:
    """What ``∇²R_γ(x)`` needs from ``x``, built once per ``x`` and reused for every product
    (conjugate gradient applies the Hessian many times at a fixed ``x``).

    With ``d = ∇x`` and ``w² = |d|² + γ²``, ``∇²R_γ(x) v = Dᵀ[M e]``, ``e = Dv``, where per pixel
    ``M = (I − ddᵀ/w²)/w = [[d_v² + γ², −d_h d_v], [−d_h d_v, d_h² + γ²]] / w³`` (symmetric 2×2,
    written without the cancellation of ``1 − n²``); stored scaled by ``scale`` as
    ``m11, m12, m22``."""

    def __init__(self, x, gamma, scale=1.0):
        dh, dv = FiniteDifference.A(x)
        r3 = _inv_weight(dh, dv, gamma)
        r3.mul_(r3.square()).mul_(scale)                                     # scale / w³
        g2 = torch.tensor(gamma * gamma, dtype=x.dtype, device=x.device)
        self.m11 = torch.addcmul(g2, dv, dv).mul_(r3)
        self.m22 = torch.addcmul(g2, dh, dh).mul_(r3)
        self.m12 = dh.mul_(dv).mul_(r3).neg_()


def _tv_hvp_into(out, c: _TVCurvature, v):
    """``out += scale·∇²R_γ(x) v`` in place (``c`` holds the per-``x`` quantities)."""
    eh, ev = FiniteDifference.A(v)
    ph = torch.mul(eh, c.m11).addcmul_(ev, c.m12)
    pv = ev.mul_(c.m22).addcmul_(eh, c.m12)
    return _sub_div_(out, ph, pv)


# --------------------------------------------------------------------------------------------
# the lower-level objective h(·, b)
# --------------------------------------------------------------------------------------------
class LowerLevel:
    """``h(x) = ½‖B_b x − y‖² + α R_γ(x) + (μ₀/2)‖x‖²`` for one kernel ``b`` (SPEC §1).

    ``B_bᵀy`` and the kernel spectrum are computed once here.  The quadratic part is applied in
    Fourier space in one go, ``B_bᵀ(B_b x − y) + μ₀x = F⁻¹((|b̂|² + μ₀) x̂ − (B_bᵀy)^)``, so one
    gradient costs one forward and one inverse FFT plus the TV stencil, which is accumulated
    into the FFT output in place.  :meth:`hvp` keeps the TV curvature of the last ``x`` it saw
    (the per-pixel 2×2 matrix ``α(I − ∇x∇xᵀ/w²)/w``; recomputed when ``x`` is another tensor or
    was modified in place), so the repeated products of conjugate gradient at a fixed ``x`` cost
    one FFT pair plus a short stencil.  When autograd records a graph through ``x`` (or ``v``),
    the plain formulas are used instead, so ``grad``/``hvp`` stay differentiable.
    """

    def __init__(self, b: torch.Tensor, y: torch.Tensor, alpha: float, gamma: float, mu0: float = 0.0):
        self.blur = Blur(b, y.shape[-2:])
        self.y = y
        self.alpha, self.gamma, self.mu0 = float(alpha), float(gamma), float(mu0)
        self.Bty = self.blur.A_adjoint(y)
        self.mu = self.mu0 + self.blur.min_singular_sq()
        nb = self.blur.norm()          # nb * nb (not nb ** 2): a huge kernel gives L = inf, not OverflowError
        self.L = nb * nb + FiniteDifference.NORM_SQ_BOUND * self.alpha / self.gamma + self.mu0
        # quadratic part in Fourier space: multiplier |b̂|² + μ₀ (stored complex: a complex-by-
        # complex product is faster than mixed real/complex) and the spectrum of B_bᵀy
        self._quad_mult = (self.blur.power + self.mu0).to(self.blur.bhat.dtype)
        self._neg_Bty_hat = -torch.fft.rfft2(self.Bty)
        self._curv_key = None
        self._curv = None

    def value(self, x: torch.Tensor) -> torch.Tensor:
        r = self.blur.A(x) - self.y
        return 0.5 * (r * r).sum() + self.alpha * tv_value(x, self.gamma) + 0.5 * self.mu0 * (x * x).sum()

    def quadratic_grad(self, x: torch.Tensor) -> torch.Tensor:
        """``B_bᵀ(B_b x − y) + μ₀x``, the gradient of the quadratic part of ``h``, as one FFT pair:
        ``F⁻¹((|b̂|² + μ₀) x̂ − (B_bᵀy)^)``."""
        if _records_graph(x):
            return self.blur.A_adjoint_A(x) - self.Bty + self.mu0 * x
        X = torch.addcmul(self._neg_Bty_hat, self._quad_mult, torch.fft.rfft2(x))
        return torch.fft.irfft2(X, s=self.blur.shape)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        """``∇ₓh = B_bᵀ(B_b x − y) + α∇R_γ(x) + μ₀x``."""
        if _records_graph(x):
            return self.quadratic_grad(x) + self.alpha * tv_grad(x, self.gamma)
        out = self.quadratic_grad(x)
        return out if self.alpha == 0 else _add_tv_grad_(out, x, self.gamma, self.alpha)

    def hvp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``∇²ₓₓh(x) v = B_bᵀB_b v + α∇²R_γ(x) v + μ₀v``."""
        if _records_graph(x, v):
            return self.blur.A_adjoint_A(v) + self.alpha * tv_hvp(x, v, self.gamma) + self.mu0 * v
        out = torch.fft.irfft2(self._quad_mult * torch.fft.rfft2(v), s=self.blur.shape)
        return _tv_hvp_into(out, self._curvature(x), v)

    def _curvature(self, x: torch.Tensor) -> _TVCurvature:
        """TV curvature at ``x``, cached for the last ``x`` (same tensor object, same version)."""
        if self._curv_key is None or self._curv_key[0] is not x or self._curv_key[1] != x._version:
            self._curv = _TVCurvature(x, self.gamma, self.alpha)
            self._curv_key = (x, x._version)
        return self._curv


# --------------------------------------------------------------------------------------------
# solvers
# --------------------------------------------------------------------------------------------
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
        x = torch.add(y, g, alpha=-1.0 / L)                 # x⁺ = y − ∇h(y)/L
        y = torch.lerp(x_prev, x, 1.0 + momentum(k))       # y⁺ = x⁺ + β(x⁺ − x), one pass
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
    if not (math.isfinite(h.L) and math.isfinite(h.mu)):      # kernel too large for the dtype
        return LowerSolve(torch.full_like(x0, math.nan), 0, math.inf, False)
    return SOLVERS[solver](h.grad, x0, h.L, h.mu, h.mu * eps, max_iter)
