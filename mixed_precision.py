"""Mixed precision for any MAID problem: float32 where it can be certified, float64 where it cannot.

    problem = MixedPrecisionProblem(low=problem_float32, high=problem_float64)
    result = maid(problem, theta0_float32, x0_float32, cfg)

``low`` and ``high`` are the same bilevel problem (SPEC §1) built from the same numbers in two
dtypes (``high``'s data are the exact float64 casts of ``low``'s).  θ stays in the low dtype
throughout; the lower-level iterate ``x`` is in whichever dtype its solve returned, and every
other method is dispatched on ``x``'s dtype:

* ``x`` in the low dtype: ``low``'s method, unchanged;
* ``x`` in the high dtype: ``high``'s method at ``θ`` cast exactly to the high dtype (the cast is
  cached, so ``high``'s own per-θ caches hit), with the vectors (``v``, ``q``, the CG right-hand
  side and warm start) cast to the high dtype; results of θ's shape (``upper_grad_theta``,
  ``mixed_vjp``) are cast back to θ's dtype, results of x's shape stay in the high dtype.

So the hypergradient at a float64 iterate (Hessian-vector products, conjugate gradient, the mixed
product) is the float64 problem's hypergradient at the same point, rounded once to θ's dtype.

**Which solves run in float64** (``solve_lower``):

* ``mixed_lower=True`` (default; what :func:`lower_level.solve_lower` supports): ``low.solve_lower``
  is given ``x0`` in the high dtype, which tells it that it may return a high-precision iterate.
  It runs float32 iterations while they make progress on its certificate and finishes in float64
  when ε is below what a float32 point can certify, returning that float64 iterate (see
  :func:`lower_level._accelerated_refined` for the rule and the proof).  Every certificate is then
  ``‖x − x̂‖ ≤ ε`` for the returned ``x`` itself, in either dtype.
* ``mixed_lower=False`` (a ``low`` whose solver only works in its own dtype): a solve whose ε is
  below ``promote_below`` runs ``high.solve_lower`` from ``x0`` cast up; any other runs
  ``low.solve_lower`` from ``x0`` cast down, and if that stops uncertified before its cap (finite
  ``grad_norm``, fewer than ``max_iter`` iterations: the low precision could not certify ε), the
  rest of the budget runs in the high dtype from its iterate and ``promote_below`` is raised to
  that ε, so later solves at that accuracy are promoted at once.

Counters (:attr:`stats`): ``solves``, ``promoted`` (returned a high-precision iterate),
``uncertified`` (returned ``converged=False``).
"""
from __future__ import annotations

import math

import torch

from maid import LowerSolve, conjugate_gradient

__all__ = ["MixedPrecisionProblem"]


class MixedPrecisionProblem:
    """``low`` and ``high`` (the same problem in two dtypes) seen as one MAID problem; see the
    module docstring for the dispatch rule.  ``low_dtype``/``high_dtype`` default to float32 and
    float64."""

    def __init__(self, low, high, low_dtype: torch.dtype = torch.float32, high_dtype: torch.dtype = torch.float64,
                 mixed_lower: bool = True, promote_below: float = 0.0):
        if torch.finfo(low_dtype).eps <= torch.finfo(high_dtype).eps:
            raise ValueError(f"low_dtype must be less precise than high_dtype, got {low_dtype} and {high_dtype}")
        self.low, self.high = low, high
        self.low_dtype, self.high_dtype = low_dtype, high_dtype
        self.mixed_lower = mixed_lower
        self.promote_below = float(promote_below)
        self.stats = {"solves": 0, "promoted": 0, "uncertified": 0}
        self._theta_casts: list = []

    # -- dispatch ----------------------------------------------------------------------------
    def _high_theta(self, theta: torch.Tensor) -> torch.Tensor:
        """θ cast to the high dtype, the same tensor object for the same θ (identity and version),
        so that ``high``'s caches keyed on θ (e.g. ``ADPBetaProblem.lower``) hit."""
        for t, version, cast in self._theta_casts:
            if t is theta and version == theta._version:
                return cast
        cast = theta.detach().to(self.high_dtype)
        self._theta_casts = [(theta, theta._version, cast)] + self._theta_casts[:3]
        return cast

    def is_high(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is a high-precision iterate (dispatched to ``high``)."""
        return x.dtype == self.high_dtype

    def _side(self, x: torch.Tensor, theta: torch.Tensor):
        return (self.high, self._high_theta(theta)) if self.is_high(x) else (self.low, theta)

    # -- lower level -------------------------------------------------------------------------
    def solve_lower(self, theta, x0, eps, max_iter):
        self.stats["solves"] += 1
        if self.mixed_lower:
            res = self.low.solve_lower(theta, x0.to(self.high_dtype), eps, max_iter)
        elif eps < self.promote_below:
            res = self.high.solve_lower(self._high_theta(theta), x0.to(self.high_dtype), eps, max_iter)
        else:
            res = self.low.solve_lower(theta, x0.to(self.low_dtype), eps, max_iter)
            if res.status == "max_iter" and res.iters < max_iter:
                self.promote_below = max(self.promote_below, eps)
                rest = self.high.solve_lower(self._high_theta(theta), res.x.to(self.high_dtype), eps,
                                             max_iter - res.iters)
                res = LowerSolve(rest.x, res.iters + rest.iters, rest.grad_norm, rest.converged)
        self.stats["promoted"] += int(self.is_high(res.x))
        self.stats["uncertified"] += int(not res.converged)
        return res

    def initial_x(self, theta):
        init = getattr(self.low, "initial_x", None)
        if init is None:
            raise ValueError("maid: give x0 (the lower level's starting point) or a low problem with initial_x(theta)")
        return init(theta)

    # -- products at the iterate's precision ---------------------------------------------------
    def hessian_vp(self, x, theta, v):
        p, t = self._side(x, theta)
        return p.hessian_vp(x, t, v.to(x.dtype))

    def mixed_vjp(self, x, theta, q):
        p, t = self._side(x, theta)
        return p.mixed_vjp(x, t, q.to(x.dtype)).to(theta.dtype)

    def solve_adjoint(self, x, theta, rhs, q0, delta, max_iter):
        p, t = self._side(x, theta)
        rhs, q0 = rhs.to(x.dtype), None if q0 is None else q0.to(x.dtype)
        own = getattr(p, "solve_adjoint", None)
        if own is not None:
            return own(x, t, rhs, q0, delta, max_iter)
        return conjugate_gradient(lambda v: p.hessian_vp(x, t, v), rhs, q0, delta, max_iter)

    # -- upper level ---------------------------------------------------------------------------
    def upper_loss(self, x, theta):
        p, t = self._side(x, theta)
        return p.upper_loss(x, t)

    def upper_grad_x(self, x, theta):
        p, t = self._side(x, theta)
        return p.upper_grad_x(x, t)

    def upper_grad_theta(self, x, theta):
        p, t = self._side(x, theta)
        return p.upper_grad_theta(x, t).to(theta.dtype)

    def error_constants(self, x, theta):
        p, t = self._side(x, theta)
        return p.error_constants(x, t)

    def a_posteriori_error(self, x, theta, q, target=0.0):
        p, t = self._side(x, theta)
        own = getattr(p, "a_posteriori_error", None)
        return (math.inf, 0) if own is None else own(x, t, q.to(x.dtype), target)

    def upper_lipschitz(self, x, theta):
        p, t = self._side(x, theta)
        own = getattr(p, "upper_lipschitz", None)
        return own(x, t) if own is not None else p.error_constants(x, t).L_g

    def metrics(self, x, theta):
        p, t = self._side(x, theta)
        own = getattr(p, "metrics", None)
        return {} if own is None else own(x, t)
