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
import weakref
from typing import Callable

import torch

from maid import LowerSolve
from operators import Blur, _records_graph
from regularisers import Regulariser, tv_grad, tv_hvp, tv_value

__all__ = ["tv_value", "tv_grad", "tv_hvp", "LowerLevel", "LowerSolve", "fista", "accelerated_gradient",
           "solve_lower", "solve_lower_fixed", "hessian_norm_estimate", "SOLVERS", "CERTIFICATES"]


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
        lam_R = regulariser.hessian_lower_bound()
        self.mu = self.mu0 + self.blur.min_singular_sq() + lam_R
        nb = self.blur.norm()          # nb * nb (not nb ** 2): a huge kernel gives L = inf, not OverflowError
        self.L = nb * nb + regulariser.lipschitz() + self.mu0
        # Q = B_bᵀB_b + (μ₀ + λ_R)I ⪯ ∇²h(x) for every x: its spectrum and largest eigenvalue
        # (energy certificate, :meth:`energy_bound`)
        self._Q_spectrum = self.blur.power + (self.mu0 + lam_R)
        self.Q_max = nb * nb + self.mu0 + lam_R
        self._twin = None
        self.certificate_evaluations = 0
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

    def grad_from_anchor(self, d: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``∇ₓh(x) = c + (B_bᵀB_b + μ₀)d + ∇R(x)`` for ``x = a + d``, given ``c = B_bᵀ(B_b a − y) + μ₀a``
        at an anchor ``a`` (computed accurately elsewhere) and the displacement ``d`` (no autograd).

        The same value as :meth:`grad`, with a different rounding: in :meth:`grad` the quadratic
        part ``Qx − B_bᵀy`` is a difference of terms of size ``‖Qx‖`` (≈ ‖x‖) whose result is small
        near the solution, so its float32 rounding error is ~``1e-7‖x‖`` (3e-5 on the default
        3×256×256 image, above the tolerance ``μ ε`` = 1e-5 at ε = 1e-3); here the FFT acts on the
        small ``d`` and the error is ~``1e-7(‖d‖ + ‖c‖)``.  ``x`` is where ``∇R`` is evaluated (the
        stored point ``a + d`` rounded to the dtype)."""
        out = torch.fft.irfft2(self._quad_mult * torch.fft.rfft2(d), s=self.blur.shape).add_(c)
        return self.regulariser.add_grad_(out, x)

    def energy_bound(self, g: torch.Tensor) -> float:
        """``sqrt(gᵀQ⁻¹g / μ)`` with ``g = ∇ₓh(x)`` and ``Q = B_bᵀB_b + (μ₀ + λ_R)I``: a bound on
        ``‖x − x̂‖`` never larger than ``‖g‖/μ`` and often much smaller (the certificate
        ``'energy'`` of :func:`solve_lower`).

        Proof.  ``g = ∇h(x) − ∇h(x̂) = H̄(x − x̂)`` with ``H̄ = ∫₀¹ ∇²h(x̂ + t(x − x̂)) dt``, and
        ``∇²h(z) = B_bᵀB_b + μ₀I + ∇²R(z) ⪰ Q`` because ``∇²R ⪰ λ_R I`` (:meth:`Regulariser.
        hessian_lower_bound`).  So ``H̄ ⪰ Q ≻ 0`` (``λ_min(Q) = μ``), hence ``H̄⁻¹ ⪯ Q⁻¹`` and

            μ‖x − x̂‖² ≤ (x − x̂)ᵀH̄(x − x̂) = gᵀH̄⁻¹g ≤ gᵀQ⁻¹g.

        (``gᵀQ⁻¹g ≤ ‖g‖²/μ`` gives back the gradient test.)  ``Q`` is diagonal in Fourier space
        (circular ``B_b``): ``gᵀQ⁻¹g = (1/HW) Σ_ω |ĝ(ω)|²/(|b̂(ω)|² + μ₀ + λ_R)`` (Parseval; the
        real FFT stores the columns ``1 … ⌈W/2⌉−1`` once for two conjugate frequencies, so they
        count twice).  The gain over ``‖g‖/μ`` is large when ``g`` lives where ``|b̂|²`` is large,
        as rounding noise does.  Evaluate in float64 for a certificate (the rounding of the
        evaluation, ~1e-16 relative to ``‖Qx‖``, is then far below any ``μ ε`` in use)."""
        if not self.mu > 0:
            return math.inf
        return self.q_inverse_norm(g) / math.sqrt(self.mu)

    @property
    def Q_spectrum(self) -> torch.Tensor:
        """``|b̂(ω)|² + μ₀ + λ_R`` on the real-FFT grid: the eigenvalues of ``Q`` (see :meth:`energy_bound`)."""
        return self._Q_spectrum

    def q_inverse_norm(self, v: torch.Tensor) -> float:
        """``‖v‖_{Q⁻¹} = sqrt(vᵀQ⁻¹v)`` (Parseval on the real FFT, see :meth:`energy_bound`); ``v`` of
        the shape of ``y``."""
        V = torch.fft.rfft2(v)
        H, W = self.blur.shape
        weight = torch.full((V.shape[-1],), 2.0, dtype=self._Q_spectrum.dtype, device=V.device)
        weight[0] = 1.0
        if W % 2 == 0:
            weight[-1] = 1.0
        quad = ((V.real.square() + V.imag.square()) / self._Q_spectrum * weight).sum().item() / (H * W)
        return math.sqrt(max(quad, 0.0))

    def float64_twin(self) -> "LowerLevel":
        """The same ``h`` with ``b``, ``y`` and ``R``'s parameters cast exactly to float64 (on the CPU
        when the data live on MPS, which has no float64); ``self`` if already float64.  Built once.
        Used to certify iterates of a float32 solve (:func:`solve_lower`)."""
        if self.y.dtype == torch.float64:
            return self
        if self._twin is None:
            dev = torch.device("cpu") if self.y.device.type == "mps" else self.y.device
            f64 = dict(dtype=torch.float64, device=dev)
            self._twin = LowerLevel(self.blur.b.to(**f64), self.y.to(**f64), self.regulariser.to(**f64), self.mu0)
        return self._twin

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
                 momentum: Callable[[int], float], certificate: "_Certificate | None" = None) -> LowerSolve:
    """Shared loop: ``x⁺ = y − step·∇h(y)``, ``y⁺ = x⁺ + β_k (x⁺ − x)``.

    The stopping test is evaluated on the extrapolated point ``y`` whose gradient the step
    needs anyway, and ``y`` is returned when it passes, so each iteration costs one gradient.
    The test is ``‖∇h(y)‖ ≤ tol``, or, with a ``certificate``, its bound when it is due.
    """
    x_prev = x0
    y = x0
    for k in range(max_iter + 1):
        g = grad(y)
        gn = torch.linalg.vector_norm(g).item()
        if not math.isfinite(gn):
            return LowerSolve(y, k, gn, False)
        if certificate is None:
            if gn <= tol:
                return LowerSolve(y, k, gn, True)
        elif certificate.due(gn) and certificate.bound(g, gn) <= certificate.eps:
            return LowerSolve(y, k, gn, True)
        if k == max_iter:
            return LowerSolve(y, k, gn, False)
        x = torch.add(y, g, alpha=-step)                    # x⁺ = y − step·∇h(y)
        y = torch.lerp(x_prev, x, 1.0 + momentum(k))       # y⁺ = x⁺ + β(x⁺ − x), one pass
        x_prev = x
    raise AssertionError("unreachable")


class _Certificate:
    """A bound on ``‖x − x̂‖`` from ``g = ∇h(x)`` and when to evaluate it (:func:`solve_lower`).

    ``h`` is the lower level the bound is evaluated on (float64: for a float32 solve its
    :meth:`LowerLevel.float64_twin`).  ``kind``: ``'gradient'`` ``‖g‖/μ``; ``'energy'``
    ``min(‖g‖/μ, sqrt(gᵀQ⁻¹g/μ))`` (:meth:`LowerLevel.energy_bound`, one extra FFT, computed only
    when ``‖g‖/μ > ε``; the minimum only guards rounding, the energy bound is never larger).

    Schedule (cost only, never validity): ``bound/‖g‖`` lies in ``[1/sqrt(μ Q_max), 1/μ]``; the
    check is due when ``‖g‖ ≤ μ ε`` (the gradient test would pass), or when ``‖g‖·ratio ≤ ε`` with
    ``ratio`` the last measured ``bound/‖g‖`` (at first the lower end, so no passing point is
    skipped before the first check) and ``‖g‖`` has fallen below 0.9× its value at the last
    failed check.  So in float64 ``'energy'`` stops no later than ``'gradient'`` on the same
    iterates.  ``evaluations`` counts the checks.
    """

    def __init__(self, h: LowerLevel, eps: float, kind: str):
        self.h, self.eps, self.kind = h, eps, kind
        # μ = 0: no bound exists (ratio and every bound ∞), so the solve runs to its cap uncertified
        if not h.mu > 0:
            self.ratio = math.inf
        else:
            self.ratio = 1.0 / h.mu if kind == "gradient" else 1.0 / math.sqrt(h.mu * h.Q_max)
        self.last = math.inf
        self.evaluations = 0

    def due(self, gn: float, eps: float | None = None) -> bool:
        """Whether a check is due for the target ``eps`` (default: the certificate's ε; the float32
        phase of :func:`_accelerated_refined` schedules for its hand-over level instead)."""
        eps = self.eps if eps is None else eps
        return gn <= self.h.mu * eps or (gn * self.ratio <= eps and gn < 0.9 * self.last)

    def bound(self, g: torch.Tensor, gn_estimate: float) -> float:
        """The bound for ``g`` (accurate: float64); ``gn_estimate`` is the loop's ``‖g‖`` that
        :meth:`due` saw (for the next schedule)."""
        self.evaluations += 1
        bound = torch.linalg.vector_norm(g).item() / self.h.mu if self.h.mu > 0 else math.inf
        if self.kind == "energy" and bound > self.eps:
            bound = min(bound, self.h.energy_bound(g))
        if gn_estimate > 0:
            self.ratio = bound / gn_estimate
        self.last = gn_estimate
        return bound


def _stall_window(h: LowerLevel) -> int:
    """Iterations without halving the best ``‖∇h‖`` after which a low-precision solve is declared
    stalled: ``⌈5√(L/μ)⌉`` (in exact arithmetic the accelerated scheme contracts ``h − h*`` by
    ``(1 − √(μ/L))`` per iteration, a factor ``e⁻⁵`` over the window); ∞ when μ = 0."""
    return max(1, math.ceil(5 * math.sqrt(h.L / h.mu))) if h.mu > 0 else math.inf


LOW_PRECISION_STATS = {"solves": 0, "float64_fallbacks": 0, "float64_iterations": 0, "unreachable": 0,
                       "float64_returns": 0, "stalls": 0}
"""Counters of :func:`_accelerated_refined` over the process (reset by the caller): low-precision
solves, solves whose remaining iterations ran in float64 (``float64_fallbacks``; their iterations
``float64_iterations``), solves that stopped uncertified because no point of the low-precision grid
is provably within ε of ``x̂`` (``unreachable``), mixed solves (float64 ``x0``) that returned
their float64 iterate (``float64_returns``), and hand-overs to float64 made on a stall rather than
by the reach rule (``stalls``: each one wasted one or two stall windows of float32 iterations)."""


_FLOOR_PROBE = 8
"""Iteration of a float32 solve at which, if no check has been made yet, one is made anyway so that
the float32 gradient error (the switch test of :func:`_accelerated_refined`) is measured early: by
then the iterate has moved off the float32 start, so the rounding of ``anchor + d`` is in it."""

_REACH_FACTOR = 2.0
"""The float32 phase of :func:`_accelerated_refined` hands over to float64 once its certified bound
is within this factor of what float32 points can show (:func:`_rounding_reach` plus the float32
gradient error).  Measured on the default run's solves (3×256×256, reach 3.3e-4): the float32
iterates stall at a bound of 4.9e-4 ≈ 1.5 × reach; a hand-over at 6e-4 (≈ 1.8×) cost 53 float32 + 34
float64 iterations at ε = 5.8e-5, one at 1e-3 (3×) 38 + 48, float64 alone 93."""

_REACH_HINTS: dict = {}
"""Cache of :func:`_rounding_reach`, keyed by the data tensor ``y`` (identity, checked through a weak
reference, version, shape, dtype), ``μ₀`` and the certificate kind (:func:`_reach_key`): the reach depends on the grid and on ``∇²h``
near the solution, which change little from one kernel to the next, so one evaluation serves the
solves of a run.  A float32 phase that stalls at a bound ``B`` above ``2 × reach`` raises the entry
to ``B/2`` (the history of the previous solves: the next solves hand over at ``B`` at once).  It
only schedules the hand-over to float64; no certificate depends on it."""


def _reach_key(h: LowerLevel, certificate: _Certificate) -> tuple:
    return (id(h.y), h.y._version, tuple(h.y.shape), h.y.dtype, h.mu0, certificate.kind)


def _cached_reach(h: LowerLevel, certificate: _Certificate) -> float | None:
    """The cached reach for ``h``'s data, or None (an entry whose ``y`` is gone, or another tensor
    at the same address, does not count)."""
    entry = _REACH_HINTS.get(_reach_key(h, certificate))
    return entry[1] if entry is not None and entry[0]() is h.y else None


def _cache_reach(h: LowerLevel, certificate: _Certificate, reach: float) -> None:
    if len(_REACH_HINTS) >= 16:
        _REACH_HINTS.clear()
    _REACH_HINTS[_reach_key(h, certificate)] = (weakref.ref(h.y), reach)


def _rounding_reach(h: LowerLevel, certificate: _Certificate, x: torch.Tensor, eps: float = 0.0) -> float:
    """What a certificate evaluated at a float32 point can show near ``x`` (a point of the float32
    grid): the bound (:func:`_bound_of`) of ``∇h(x + u) − ∇h(x) ≈ ∇²h u``, evaluated in float64,
    with ``u`` uniform in ``[−s/2, s/2]`` per entry (``s`` the float32 spacing at ``x``, a fixed
    seed), i.e. the response of the certificate to one rounding to the grid.

    Why it is the floor: a float32 point ``x̃`` near ``x̂`` is off by the rounding ``ρ = x̃ − x̂`` of
    ``x̂``, so its certificate evaluates ``∇h(x̃) ≈ ∇²h ρ``, which has this size even at the best
    float32 point (on the default run ~3.3e-4 while ``‖ρ‖`` ≈ 5.6e-6: the TV curvature ``α/γ`` at
    flat pixels amplifies the rounding, and the energy norm weighs it by ``1/μ`` where the blur
    vanishes).  A hint for the schedule only (cached in :data:`_REACH_HINTS`).

    Not evaluated (nor cached) when ``ε ≥ 2 × cap``, ``cap = L‖s‖/(2μ)`` (``‖∇h(x + u) − ∇h(x)‖ ≤
    L‖u‖ ≤ L‖s‖/2`` and every bound is ``≤ ‖·‖/μ``): ``cap`` is returned, which cannot move the
    hand-over below ε.  So the first evaluation is made at the start of a solve that needs it,
    typically a warm start near ``x̂`` (at a noisy ``y`` the TV curvature, hence the reach, is lower:
    3×32×32 blocks, 1.4e-5 at ``y`` against a float32 stall at 4.9e-5)."""
    h64 = certificate.h
    reach = _cached_reach(h, certificate)
    if reach is None:
        xa = x.to(device=h64.y.device).abs()      # the float64 twin's device (the CPU for MPS data)
        spacing = torch.nextafter(xa, torch.tensor(math.inf, dtype=x.dtype, device=xa.device)) - xa
        cap = h.L * torch.linalg.vector_norm(spacing.double()).item() / (2 * h.mu) if h.mu > 0 else math.inf
        if eps >= _REACH_FACTOR * cap:
            return cap
        gen = torch.Generator().manual_seed(0)
        u = torch.rand(x.shape, generator=gen, dtype=torch.float64).to(h64.y.device) - 0.5
        x64 = x.to(dtype=torch.float64, device=h64.y.device)
        dg = h64.grad(x64 + u * spacing.to(dtype=torch.float64, device=h64.y.device)) - h64.grad(x64)
        reach = _bound_of(certificate, dg)
        _cache_reach(h, certificate, reach)
    return reach


def _accelerated_refined(h: LowerLevel, x0: torch.Tensor, max_iter: int, momentum: Callable[[int], float],
                         certificate: _Certificate, keep_float64: bool = False) -> LowerSolve:
    """The accelerated scheme of :func:`_accelerated` in a low precision (float32), with the
    iterate held as ``anchor + d`` and certified in float64; the remaining iterations switch to
    float64 once float32 has done what it can.  The returned iterate is in the low precision,
    or, with ``keep_float64`` (a float64 ``x0``, see :func:`solve_lower`), in float64 when the
    float64 phase ran.

    * **Gradient.** ``∇h(anchor + d) = c + (B_bᵀB_b + μ₀)d + ∇R(x)`` (:meth:`LowerLevel.grad_from_anchor`),
      ``c`` the quadratic part at the anchor computed in float64, ``x = fl(anchor + d)``: its
      rounding error is ~1e-7 of ``‖d‖ + ‖c‖``, not of ``‖x‖``.
    * **Iterate.** The updates act on ``d`` (``d⁺ = d_y − ∇h/L``, momentum on ``d``), which is small,
      so steps far below the float32 spacing of ``x`` (≈ 3e-8 at 0.5) still accumulate.
    * **Certificate** (when :class:`_Certificate` says it is due for the phase's target, at the cap,
      on a stall, or once at iteration :data:`_FLOOR_PROBE`): the stored point ``x̃ = fl(anchor + d)``
      is cast to float64 (exactly) and ``g = ∇h(x̃)`` is evaluated there; the bound then holds for
      ``x̃`` as stored.  If it fails, the iteration is refined: the anchor moves to ``x̃`` (its
      float64 quadratic part just computed), ``d`` to 0, and the step uses the float64 ``g``.
    * **Hand-over to float64** (a schedule, never a proof).  A float32 point cannot be certified
      much below its *reach* ``r = r_round + r_grad``: ``r_round`` (:func:`_rounding_reach`) is the
      certificate's response to one rounding to the float32 grid, and ``r_grad`` the bound of the
      float32 gradient error ``g₃₂ − g`` at the last check (near ``x̂`` the float32 iteration drives
      ``g₃₂`` to ~0, so the exact gradient it reaches is ~``−(g₃₂ − g)``).  So the float32 phase
      aims at ``max(ε, 2r)`` (:data:`_REACH_FACTOR`) and hands over at a failed check whose bound
      is ``≤ 2r``, or ``≤ 4r`` and above 0.7× the previous check's (a plateau: near the reach the
      float32 ``‖∇h‖`` stops falling, so such checks are made every quarter stall window), or when
      ``‖∇h‖`` has not halved over two stall windows of ``5√(L/μ)`` iterations (then the cached
      reach is raised to half the bound met: the next solves hand over there at once).  The
      remaining iterations run :func:`_accelerated`'s recurrence with a float64 iterate
      (:func:`_float64_finish`) from the checked point ``fl₃₂(anchor + d)`` cast to float64, where
      the float64 gradient was just evaluated (momentum kept).  No float32 iterations are spent at
      the reach: on the default run the float32 phase stalled for two windows (~220 iterations) at
      a bound of ~4.9e-4 before this rule.  A float64 ``x0`` (``keep_float64``) already within
      ``2r_round`` of ``x̂`` by its own certificate skips the float32 phase (its rounding would undo
      the accuracy).
    * **Float64 phase.** Its iterate is float64 but its steps are float32: a float64 anchor plus a
      float32 displacement, stepped with the linearised gradient ``∇h(a) + ∇²h(a)d`` (float32
      Hessian-vector products), re-anchored with an exact float64 gradient at every check
      (:func:`_float64_finish`).
    * **Certificate of the float64 phase** (at anchors, with their exact float64 gradients). With
      ``keep_float64`` the float64 iterate ``x₆₄`` is returned when ``B(x₆₄) ≤ ε`` (``B`` the certificate's bound, :class:`_Certificate`, valid for
      any float64 point).  Otherwise the returned point is ``x̃ = fl(x₆₄)``, certified by the
      triangle inequality ``‖x̃ − x̂‖ ≤ B(x₆₄) + ‖x̃ − x₆₄‖`` with the rounding distance computed
      exactly in float64.
    * **Unreachable ε** (float32 return only).  ``fl`` rounds each entry to the nearest float32
      number, so ``x̃`` is the float32 point nearest to ``x₆₄`` and, the distance to the float32
      grid ``G`` being 1-Lipschitz, ``dist(x̂, G) ≥ ‖x̃ − x₆₄‖ − ‖x₆₄ − x̂‖ ≥ ‖x̃ − x₆₄‖ − B(x₆₄)``.
      When this exceeds ε, *no* float32 point lies within ε of ``x̂``: the solve stops uncertified
      (``converged=False``, finite ``grad_norm``: MAID's ``'max_iter'``), counted in
      ``LOW_PRECISION_STATS['unreachable']``.  (The grid is ~``1.7e-8·sqrt(n)`` away for values in
      [0.5, 1): 7.6e-6 on 3×256×256.)  With ``keep_float64`` this cannot happen.

    ``grad_norm`` is always the float64 ``‖∇h(x̃)‖`` of the returned point.
    """
    h64 = certificate.h
    eps = certificate.eps
    step = 1.0 / h.L
    dtype, dev = h.y.dtype, h.y.device
    LOW_PRECISION_STATS["solves"] += 1

    def up(t):
        return t.to(dtype=torch.float64, device=h64.y.device)

    def quadratic_and_grad(x):
        q64 = h64.quadratic_grad(up(x))
        return q64, h64.regulariser.add_grad_(q64.clone(), up(x))

    start = x0.to(dtype=dtype, device=dev)
    reach = _rounding_reach(h, certificate, start, eps)
    finish = dict(max_iter=max_iter, step=step, momentum=momentum, certificate=certificate, dtype=dtype, dev=dev,
                  keep_float64=keep_float64)
    if keep_float64 and eps < _REACH_FACTOR * reach:
        x64 = up(x0)
        g0 = h64.grad(x64)
        gn0 = torch.linalg.vector_norm(g0).item()
        if not math.isfinite(gn0):
            return LowerSolve(x64, 0, gn0, False)
        bound0 = certificate.bound(g0, gn0)
        if bound0 <= eps or max_iter == 0:
            return LowerSolve(x64, 0, gn0, bound0 <= eps)
        if bound0 <= _REACH_FACTOR * reach:
            LOW_PRECISION_STATS["float64_fallbacks"] += 1
            return _float64_finish(h, h64, x64, x64, g0, 0, **finish)

    anchor = start
    c = h64.quadratic_grad(up(start)).to(dtype=dtype, device=dev)
    d_prev = torch.zeros_like(start)
    d = d_prev
    window = _stall_window(h)
    evaluations0 = certificate.evaluations
    grad_error = 0.0
    best, k_best, k_refined = math.inf, 0, -1
    last_bound, k_checked = math.inf, 0
    for k in range(max_iter + 1):
        x = anchor + d
        g = h.grad_from_anchor(d, x, c)
        gn = torch.linalg.vector_norm(g).item()
        if not math.isfinite(gn):
            return LowerSolve(x, k, gn, False)
        if gn < 0.5 * best:
            best, k_best = gn, k
        stalled = k - k_best >= window
        probe = k == _FLOOR_PROBE and k_refined < 0 and certificate.evaluations == evaluations0
        handover = _REACH_FACTOR * (reach + grad_error)
        # near the hand-over the float32 ‖∇h‖ stops falling, so the schedule alone would wait for a stall
        near = last_bound <= 2 * handover and k - k_checked >= max(1, window // 4)
        if certificate.due(gn, max(eps, handover)) or stalled or probe or near or k == max_iter:
            q64, g64 = quadratic_and_grad(x)
            gn64 = torch.linalg.vector_norm(g64).item()
            bound = certificate.bound(g64, gn)
            if bound <= eps:
                return LowerSolve(x, k, gn64, True)
            if k == max_iter or not math.isfinite(gn64):
                return LowerSolve(x, k, gn64, False)
            grad_error = _bound_of(certificate, up(g) - g64)
            handover = _REACH_FACTOR * (reach + grad_error)
            reached = bound <= handover or (bound <= 2 * handover and bound > 0.7 * last_bound)
            last_bound, k_checked = bound, k
            if reached or (stalled and k_best <= k_refined):
                if not reached:                     # float32 stalled above the predicted reach: learn it
                    LOW_PRECISION_STATS["stalls"] += 1
                    _cache_reach(h, certificate, max(reach, bound / _REACH_FACTOR))
                LOW_PRECISION_STATS["float64_fallbacks"] += 1
                return _float64_finish(h, h64, up(x), up(anchor) + up(d_prev), g64, k, **finish)
            d_prev = d_prev - d                     # the previous iterate relative to the new anchor
            anchor, c, d = x, q64.to(dtype=dtype, device=dev), torch.zeros_like(d)
            g = g64.to(dtype=dtype, device=dev)
            k_refined = k
            if stalled:                             # a fresh window to show that refining helped
                best, k_best = gn64, k
        d_next = torch.add(d, g, alpha=-step)
        d = torch.lerp(d_prev, d_next, 1.0 + momentum(k))
        d_prev = d_next
    raise AssertionError("unreachable")


def _bound_of(certificate: _Certificate, v: torch.Tensor) -> float:
    """The certificate's bound of a float64 vector ``v`` as if it were a gradient (no schedule
    update, not counted): ``‖v‖/μ``, or ``min(‖v‖/μ, sqrt(vᵀQ⁻¹v/μ))`` for ``'energy'``."""
    h = certificate.h
    if not h.mu > 0:
        return math.inf
    bound = torch.linalg.vector_norm(v).item() / h.mu
    return min(bound, h.energy_bound(v)) if certificate.kind == "energy" else bound


def _float64_finish(h: LowerLevel, h64: LowerLevel, y: torch.Tensor, x_prev: torch.Tensor, g: torch.Tensor, k0: int,
                    max_iter: int, step: float, momentum: Callable[[int], float], certificate: _Certificate,
                    dtype: torch.dtype, dev, keep_float64: bool = False) -> LowerSolve:
    """Iterations ``k0 … max_iter`` of the accelerated recurrence with a float64 iterate, from the
    extrapolated point ``y`` (float64 gradient ``g`` at ``y``, whose check at ``k0`` has just failed)
    and the previous iterate ``x_prev``.  Returns a float64 point itself with ``keep_float64``,
    certified by ``B(y) ≤ ε``; otherwise ``fl(y)`` in ``dtype``, certified by the triangle
    inequality or declared unreachable (see :func:`_accelerated_refined`).

    **Linearised steps in float32.**  The iterate is a float64 anchor ``a`` plus float32
    displacements (``y = a + d_y``, ``x_prev = a + d_x``), and the steps use the model gradient
    ``∇h(a) + ∇²h(a) d_y``: ``∇h(a)`` computed in float64 at the anchor, the Hessian-vector product
    in float32 (``h.hvp`` at ``fl₃₂(a)``, one FFT pair and a stencil: the cost of a float32
    gradient).  The anchor moves to ``y`` (exact float64 gradient there, ``d_y`` to 0, momentum
    kept) whenever a check is due and at least every ``⌈5√(L/μ)⌉/4`` iterations, which keeps
    ``d_y`` small: the model's error ``∫(∇²h(a + t d_y) − ∇²h(a))d_y`` is second order in ``d_y``
    (~1e-9 near the end of a default-run solve, far below the gradients of ~1e-6 being resolved),
    and the float32 rounding acts on ``∇²h d_y``, not on ``x``.  The model only steers the
    iteration: **every certificate is evaluated at an anchor, with its exact float64 gradient**, so
    the bound is the same proof as in a float64 solve.  (Measured: the same iteration counts as
    float64 steps, at the cost of float32 ones plus one float64 gradient per anchor.)"""
    period = max(1, _stall_window(h) // 4)
    anchor = y

    def low(t):
        return t.to(dtype=dtype, device=dev)

    def up(t):
        return t.to(dtype=torch.float64, device=h64.y.device)

    a_low, g_anchor = low(anchor), low(g)
    d_y, d_x = torch.zeros_like(a_low), low(x_prev - anchor)
    g_step, k_anchor = g_anchor, k0
    for k in range(k0, max_iter + 1):
        LOW_PRECISION_STATS["float64_iterations"] += int(k > k0)
        if k > k0:                                  # at k0 the caller's check of y has just failed
            g_step = h.hvp(a_low, d_y).add_(g_anchor)
            gn = torch.linalg.vector_norm(g_step).item()
            due = (math.isfinite(gn) and certificate.due(gn)) or k == max_iter
            if due or k - k_anchor >= period or not math.isfinite(gn):
                anchor = anchor + up(d_y)           # re-anchor at y: its exact float64 gradient
                g = h64.grad(anchor)
                gn64 = torch.linalg.vector_norm(g).item()
                if not math.isfinite(gn64):
                    return LowerSolve(anchor if keep_float64 else low(anchor), k, gn64, False)
                d_x, d_y = d_x - d_y, torch.zeros_like(d_y)
                a_low, g_anchor, k_anchor = low(anchor), low(g), k
                g_step = g_anchor
            if due:
                done = _float64_check(h64, anchor, g, gn, k == max_iter, certificate, dtype, dev, keep_float64)
                if done is not None:
                    return LowerSolve(done[0], k, done[1], done[2])
        d_next = torch.add(d_y, g_step, alpha=-step)
        d_y = torch.lerp(d_x, d_next, 1.0 + momentum(k))
        d_x = d_next
    raise AssertionError("unreachable")


def _float64_check(h64: LowerLevel, y: torch.Tensor, g: torch.Tensor, gn: float, last: bool,
                   certificate: _Certificate, dtype: torch.dtype, dev, keep_float64: bool):
    """The certificate at the float64 point ``y`` (exact gradient ``g``; ``gn`` the schedule's norm):
    ``(x, grad_norm, converged)`` to return, or ``None`` to go on (see :func:`_float64_finish`)."""
    bound = certificate.bound(g, gn)
    if keep_float64:
        if bound <= certificate.eps or last:
            LOW_PRECISION_STATS["float64_returns"] += 1
            return y, torch.linalg.vector_norm(g).item(), bound <= certificate.eps
        return None
    x_low = y.to(dtype=dtype)
    rounding = torch.linalg.vector_norm(x_low.double() - y).item()
    unreachable = rounding - bound > certificate.eps
    if bound + rounding <= certificate.eps or unreachable or last:
        LOW_PRECISION_STATS["unreachable"] += int(unreachable)
        gn_low = torch.linalg.vector_norm(h64.grad(x_low.double())).item()
        return x_low.to(device=dev), gn_low, bound + rounding <= certificate.eps
    return None


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


CERTIFICATES = ("auto", "gradient", "energy")


def _is_low_precision(dtype: torch.dtype) -> bool:
    return torch.finfo(dtype).eps > torch.finfo(torch.float64).eps


def solve_lower(h: LowerLevel, x0: torch.Tensor, eps: float, max_iter: int, solver: str = "fista",
                certificate: str = "auto") -> LowerSolve:
    """Solve ``min h`` to a certified accuracy ``‖x̃ − x̂‖ ≤ ε``, warm-started at ``x0``.

    ``certificate``: ``'gradient'`` stops on ``‖∇ₓh(x̃)‖ ≤ μ ε`` (SPEC §2); ``'energy'`` on
    ``sqrt(∇hᵀQ⁻¹∇h/μ) ≤ ε`` (:meth:`LowerLevel.energy_bound`; never looser than the gradient
    test, often 2× tighter); ``'auto'`` (default) is ``'gradient'`` in float64 and ``'energy'`` in
    lower precision.

    **float64** iterates run :func:`fista`/:func:`accelerated_gradient` unchanged.  **float32**
    (any dtype less precise than float64) runs :func:`_accelerated_refined`: float32 iterations
    on a displacement from a float64-computed anchor, certified by evaluating ``∇h`` of the
    stored float32 iterate in float64.  Why: in plain float32 the computed ``‖∇h‖`` has a rounding
    floor of ~1e-7‖x‖ (3e-5 on the default image), so ``‖∇h‖ ≤ μ ε`` = 1e-5 at ε = 1e-3 is never
    met and solves ran to the cap uncertified; and even the exact gradient of the best float32
    points is ≈ 1.1e-5 there, so only the energy bound (≈ 5e-4 at those points) certifies
    ε = 1e-3.  ``LowerSolve.grad_norm`` is then the float64 ``‖∇h(x̃)‖``;
    ``h.certificate_evaluations`` counts the float64 checks (not counted as iterations).
    Limit: the refinement removes the rounding floor of the quadratic part only; a regulariser
    whose gradient is a sum of large cancelling terms near ``x̂`` (e.g. a Fields of Experts prior
    with unnormalised filters) keeps a floor of ~1e-7 of their size; below it the solve hands over
    to its float64 phase (before the switch existed: FoE 2×3×3 filters, ``L/μ`` = 8e4, ε = 1e-4:
    float64 certified in 4005 iterations, float32 stopped uncertified after 20689).

    The precision is ``h``'s (a float64 ``h`` casts ``x0`` to float64).  **Mixed** (a float32 ``h``
    and a float64 ``x0``, what :class:`mixed_precision.MixedPrecisionProblem` asks for): the same
    float32 iterations, but once float32 cannot certify ε (ε below the reach of float32 points,
    :func:`_accelerated_refined`) the float64 iterate itself is returned, certified by
    ``B(x₆₄) ≤ ε``; the returned ``x`` is float32 when a float32 point was certified and float64
    otherwise.  So every ε is certifiable, also below the float32 grid distance.
    """
    _check_solver(solver)
    if certificate not in CERTIFICATES:
        raise ValueError(f"unknown certificate {certificate!r}; use one of {', '.join(CERTIFICATES)}")
    if not (math.isfinite(h.L) and math.isfinite(h.mu)):      # kernel too large for the dtype
        return LowerSolve(torch.full_like(x0, math.nan), 0, math.inf, False)
    low = _is_low_precision(h.y.dtype)
    keep_float64 = low and x0.dtype == torch.float64
    if not low:
        x0 = x0.to(dtype=h.y.dtype)
    kind = ("energy" if low else "gradient") if certificate == "auto" else certificate
    with torch.no_grad():
        if not low and kind == "gradient":
            return SOLVERS[solver](h.grad, x0, h.L, h.mu, h.mu * eps, max_iter)
        momentum = _MOMENTA[solver](h.L, h.mu)
        cert = _Certificate(h.float64_twin() if low else h, eps, kind)
        try:
            if low:
                return _accelerated_refined(h, x0, max_iter, momentum, cert, keep_float64)
            return _accelerated(h.grad, x0, 1.0 / h.L, math.nan, max_iter, momentum, cert)
        finally:
            h.certificate_evaluations += cert.evaluations


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
