"""Lower level of ADP-β: the objective ``h`` and its solvers (SPEC §1–§2, §5).

    x̂(b) = argmin_x  h(x, b) = ½‖B_b x − y‖² + R(x) + (μ₀/2)‖x‖²

``R`` is any :class:`regularisers.Regulariser` (its weight included; the default run uses
``SmoothedTV(weight=α, smoothing=γ)``, ``α Σ sqrt(|∇x|² + γ²)``).  ``y`` is one image ``(C, H, W)``
or a batch ``(N, C, H, W)`` blurred by the same kernel; for a batch ``h`` is the sum of the
per-image objectives (they are decoupled), so the stopping test below is on the whole batch.

Constants (closed form, circular ``B_b``; :class:`LowerLevel` ``.mu`` and ``.L``):

* strong convexity ``μ = μ₀ + min|b̂|² + λ_R``, ``λ_R = R.hessian_lower_bound()`` (0 for a convex
  ``R``, e.g. both TVs);
* smoothness ``L = max|b̂|² + L_R + μ₀``, ``L_R = R.lipschitz()`` (``8α/γ`` for the TVs).

Solvers (all warm-startable):

* :func:`fista` — accelerated gradient with the constant strong-convexity momentum
  ``(1 − √(μ/L)) / (1 + √(μ/L))``, step ``1/L``;
* :func:`accelerated_gradient` — Nesterov's accelerated gradient with the momentum
  ``(t_k − 1)/t_{k+1}``, ``t_{k+1} = (1 + √(1 + 4t_k²))/2`` (no knowledge of μ needed for
  the iteration itself, only for the stopping test);
* :func:`solve_lower` runs either and stops as soon as ``‖∇ₓh(x̃)‖ ≤ μ ε``, which by strong
  convexity guarantees ``‖x̃ − x̂‖ ≤ ε``; it reports whether the iteration cap was hit;
* :func:`solve_lower_fixed` — the paper protocol's solve (SPEC §5): a fixed number of iterations
  with a given step, no stopping test, no certificate; reports the final ``‖∇h‖``.
  :func:`hessian_norm_estimate` is the power iteration on ``∇²h`` that the paper's code uses for
  its step.

Implementation (speed, see ``benchmarks/bench_core.py``): the quadratic part of ``∇ₓh`` is one
FFT pair with ``μ₀`` and ``B_bᵀy`` folded into the spectrum; when autograd is not recording, the
regulariser's gradient is accumulated into the FFT output in place (``R.add_grad_``: for
``SmoothedTV`` with float parameters the fused TV stencils), :meth:`LowerLevel.hvp` caches
``R.curvature(x)`` of the last ``x`` for conjugate gradient, and the solver update is two fused
passes (``add`` with ``alpha``, ``lerp``).  When autograd records a graph through the inputs or
the regulariser's parameters, plain formulas run instead (differentiable, same values);
``tests/test_fast_paths.py`` pins the two paths together.  The solvers themselves run under
``torch.no_grad()``: their iterates are never differentiated through (hypergradients come from
implicit differentiation).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from maid import LowerSolve
from operators import Blur, _records_graph
from regularisers import Regulariser, tv_grad, tv_hvp, tv_value

__all__ = ["tv_value", "tv_grad", "tv_hvp", "LowerLevel", "LowerSolve", "fista", "accelerated_gradient",
           "solve_lower", "solve_lower_fixed", "hessian_norm_estimate", "SOLVERS"]


# --------------------------------------------------------------------------------------------
# the lower-level objective h(·, b)
# --------------------------------------------------------------------------------------------
class LowerLevel:
    """``h(x) = ½‖B_b x − y‖² + R(x) + (μ₀/2)‖x‖²`` for one kernel ``b`` (SPEC §1).

    ``y`` is ``(C, H, W)`` or ``(N, C, H, W)`` with ``C`` the kernel's channels.  ``B_bᵀy`` and the
    kernel spectrum are computed once here.  The quadratic part is applied in Fourier space in
    one go, ``B_bᵀ(B_b x − y) + μ₀x = F⁻¹((|b̂|² + μ₀) x̂ − (B_bᵀy)^)``, so one gradient costs one
    forward and one inverse FFT plus ``R``'s gradient, accumulated into the FFT output in place.
    :meth:`hvp` keeps ``R.curvature(x)`` for the last ``x`` it saw (for smoothed TV the per-pixel
    2×2 matrix ``α(I − ∇x∇xᵀ/w²)/w``; recomputed when ``x`` is another tensor or was modified in
    place), so the repeated products of conjugate gradient at a fixed ``x`` cost one FFT pair
    plus a short stencil.  When autograd records a graph through ``x`` (or ``v``) or through a
    parameter of ``R``, plain formulas are used instead, so ``grad``/``hvp`` stay differentiable.
    ``mu`` and ``L`` are computed from ``R``'s parameters here: build a new ``LowerLevel`` after
    changing them.
    """

    def __init__(self, b: torch.Tensor, y: torch.Tensor, regulariser: Regulariser, mu0: float = 0.0):
        if not isinstance(regulariser, Regulariser):
            raise TypeError(f"regulariser must be a regularisers.Regulariser (e.g. SmoothedTV(weight, "
                            f"smoothing)), got {type(regulariser).__name__}")
        if y.ndim not in (3, 4) or y.shape[-3] != b.shape[0]:
            raise ValueError(f"y must be (C, H, W) or (N, C, H, W) with C = {b.shape[0]} (the kernel's "
                             f"channels), got {tuple(y.shape)}")
        self.blur = Blur(b, y.shape[-2:])
        self.y = y
        self.regulariser = regulariser
        self.mu0 = float(mu0)
        self._params = tuple(regulariser.parameters().values())
        self.Bty = self.blur.A_adjoint(y)
        self.mu = self.mu0 + self.blur.min_singular_sq() + regulariser.hessian_lower_bound()
        nb = self.blur.norm()          # nb * nb (not nb ** 2): a huge kernel gives L = inf, not OverflowError
        self.L = nb * nb + regulariser.lipschitz() + self.mu0
        # quadratic part in Fourier space: multiplier |b̂|² + μ₀ (stored complex: a complex-by-
        # complex product is faster than mixed real/complex) and the spectrum of B_bᵀy
        self._quad_mult = (self.blur.power + self.mu0).to(self.blur.bhat.dtype)
        self._neg_Bty_hat = -torch.fft.rfft2(self.Bty)
        self._curv_key = None
        self._curv = None

    def _plain(self, *tensors) -> bool:
        """Autograd records through the inputs or ``R``'s parameters: use the plain formulas."""
        return _records_graph(*tensors, *self._params)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        r = self.blur.A(x) - self.y
        return 0.5 * (r * r).sum() + self.regulariser.value(x) + 0.5 * self.mu0 * (x * x).sum()

    def quadratic_grad(self, x: torch.Tensor) -> torch.Tensor:
        """``B_bᵀ(B_b x − y) + μ₀x``, the gradient of the quadratic part of ``h``, as one FFT pair:
        ``F⁻¹((|b̂|² + μ₀) x̂ − (B_bᵀy)^)``."""
        if _records_graph(x):
            return self.blur.A_adjoint_A(x) - self.Bty + self.mu0 * x
        X = torch.addcmul(self._neg_Bty_hat, self._quad_mult, torch.fft.rfft2(x))
        return torch.fft.irfft2(X, s=self.blur.shape)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        """``∇ₓh = B_bᵀ(B_b x − y) + ∇R(x) + μ₀x``."""
        if self._plain(x):
            return self.quadratic_grad(x) + self.regulariser.grad(x)
        return self.regulariser.add_grad_(self.quadratic_grad(x), x)

    def hvp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``∇²ₓₓh(x) v = B_bᵀB_b v + ∇²R(x) v + μ₀v``."""
        if self._plain(x, v):
            return self.blur.A_adjoint_A(v) + self.regulariser.hvp(x, v) + self.mu0 * v
        out = torch.fft.irfft2(self._quad_mult * torch.fft.rfft2(v), s=self.blur.shape)
        return self._curvature(x).add_hvp_(out, v)

    def _curvature(self, x: torch.Tensor):
        """``R.curvature(x)``, cached for the last ``x`` (same tensor object, same version, and the
        same versions of ``R``'s parameter tensors, so an in-place optimiser step invalidates it)."""
        versions = (x._version, *(p._version for p in self._params))
        if self._curv_key is None or self._curv_key[0] is not x or self._curv_key[1] != versions:
            self._curv = self.regulariser.curvature(x)
            self._curv_key = (x, versions)
        return self._curv


# --------------------------------------------------------------------------------------------
# solvers
# --------------------------------------------------------------------------------------------
def _accelerated(grad: Callable, x0: torch.Tensor, step: float, tol: float, max_iter: int,
                 momentum: Callable[[int], float]) -> LowerSolve:
    """Shared loop: ``x⁺ = y − step·∇h(y)``, ``y⁺ = x⁺ + β_k (x⁺ − x)``.

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
        x = torch.add(y, g, alpha=-step)                    # x⁺ = y − step·∇h(y)
        y = torch.lerp(x_prev, x, 1.0 + momentum(k))       # y⁺ = x⁺ + β(x⁺ − x), one pass
        x_prev = x
    raise AssertionError("unreachable")


def _fista_momentum(L: float, mu: float) -> Callable[[int], float]:
    """Constant momentum ``(1 − √(μ/L))/(1 + √(μ/L))``."""
    q = math.sqrt(max(mu, 0.0) / L)
    beta = (1 - q) / (1 + q)
    return lambda k: beta


def _nesterov_momentum(L: float, mu: float) -> Callable[[int], float]:
    """``(t_k − 1)/t_{k+1}``, ``t_{k+1} = (1 + √(1 + 4t_k²))/2``, ``t_0 = 1`` (``L``, ``μ`` unused)."""
    t = [1.0]

    def momentum(k):
        t_next = (1 + math.sqrt(1 + 4 * t[0] ** 2)) / 2
        m = (t[0] - 1) / t_next
        t[0] = t_next
        return m

    return momentum


def fista(grad: Callable, x0: torch.Tensor, L: float, mu: float, tol: float, max_iter: int) -> LowerSolve:
    """FISTA for a μ-strongly convex, L-smooth objective: step ``1/L``, constant momentum
    ``(1 − √(μ/L))/(1 + √(μ/L))``.  Stops when ``‖∇h‖ ≤ tol`` or after ``max_iter`` iterations."""
    return _accelerated(grad, x0, 1.0 / L, tol, max_iter, _fista_momentum(L, mu))


def accelerated_gradient(grad: Callable, x0: torch.Tensor, L: float, mu: float, tol: float,
                         max_iter: int) -> LowerSolve:
    """Nesterov's accelerated gradient, step ``1/L``, momentum ``(t_k − 1)/t_{k+1}``; ``mu`` is
    unused by the iteration (kept for a common signature).  Stops like :func:`fista`."""
    return _accelerated(grad, x0, 1.0 / L, tol, max_iter, _nesterov_momentum(L, mu))


SOLVERS = {"fista": fista, "agd": accelerated_gradient}
_MOMENTA = {"fista": _fista_momentum, "agd": _nesterov_momentum}


def _check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unknown lower-level solver {solver!r}; use one of {', '.join(SOLVERS)}")


def solve_lower(h: LowerLevel, x0: torch.Tensor, eps: float, max_iter: int, solver: str = "fista") -> LowerSolve:
    """Solve ``min h`` to accuracy ``‖x̃ − x̂‖ ≤ ε`` via the test ``‖∇ₓh(x̃)‖ ≤ μ ε``, warm-started at ``x0``."""
    _check_solver(solver)
    if not (math.isfinite(h.L) and math.isfinite(h.mu)):      # kernel too large for the dtype
        return LowerSolve(torch.full_like(x0, math.nan), 0, math.inf, False)
    with torch.no_grad():
        return SOLVERS[solver](h.grad, x0, h.L, h.mu, h.mu * eps, max_iter)


def solve_lower_fixed(h: LowerLevel, x0: torch.Tensor, iters: int, step: float, solver: str = "fista") -> LowerSolve:
    """``iters`` iterations of the accelerated scheme from ``x0`` with the step ``step`` in place of
    ``1/L``, without stopping test: the paper protocol's lower solve (SPEC §5; its TV baseline is
    100 iterations from ``x0 = y`` with a step 50–100× smaller than ``1/L``).

    The momentum is the solver's own with ``L`` replaced by ``1/step`` (``'fista'``:
    ``(1 − √(μ·step))/(1 + √(μ·step))``; ``'agd'``: the ``t_k`` sequence).  Returns the last
    extrapolated iterate with ``iters`` and its ``‖∇h‖`` (``iters + 1`` gradients are evaluated);
    ``converged`` is ``False`` (no accuracy is certified) unless ``∇h`` vanished exactly, and a
    non-finite gradient stops early (status ``'non_finite'``).  No step-size check is made: a
    step above ``2/L`` may diverge, as it would in the paper's code.
    """
    _check_solver(solver)
    if not (isinstance(iters, int) and iters >= 0):
        raise ValueError(f"iters must be a non-negative integer, got {iters!r}")
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"step must be a positive finite number, got {step!r}")
    with torch.no_grad():
        return _accelerated(h.grad, x0, step, 0.0, iters, _MOMENTA[solver](1.0 / step, h.mu))


def hessian_norm_estimate(h: LowerLevel, x: torch.Tensor, iters: int = 10, seed: int = 0) -> float:
    """Power-iteration estimate of ``‖∇²ₓₓh(x)‖`` (``iters`` Hessian-vector products from a seeded
    normal start): a lower estimate of the largest eigenvalue, what the paper's code uses for
    ``L`` (10 iterations).  Not a bound: use ``h.L`` for a guaranteed step ``1/L``."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype=x.dtype, device=x.device)
    lam = 0.0
    with torch.no_grad():
        for _ in range(iters):
            v = v / torch.linalg.vector_norm(v)
            w = h.hvp(x, v)
            lam = torch.linalg.vector_norm(w).item()
            v = w
    return lam
