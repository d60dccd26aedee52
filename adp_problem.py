"""ADP-β for blind/semi-blind deblurring as a :class:`maid.BilevelProblem` (SPEC §1).

    lower:  x̂(b) = argmin_x ½‖B_b x − y‖² + R(x) + (μ₀/2)‖x‖²          (lower_level.py)
    upper:  g(x, b) = ‖A_up x − y‖² / n + β P(b − b₀),   n = number of entries of y

``P`` is the kernel penalty (``kernel_penalty``): ``'h1_squared'`` (default) ``P(d) = ‖d‖²_{H¹}``
(smooth), or ``'h1'`` ``P(d) = ‖d‖_{H¹}`` (unsquared, the paper's; not differentiable at ``b = b₀``,
where the subgradient 0 is used, see :func:`operators.h1_norm_grad`).  ``P`` does not depend on
``x``, so none of the error-bound constants below depends on the choice.

``A_up`` is the learned operator ``B_b`` (``upper_operator='learned'``, the default, what the
paper's 2D experiments do) or a fixed known operator ``A = B_a`` (``upper_operator='known'``,
the ADP formulation of Dittmer et al.).  With ``A_up = B_b`` the upper level depends on ``b``
directly and ``∂_b g`` enters the hypergradient.  ``R`` is any :class:`regularisers.Regulariser`
(weight included), e.g. ``make_regulariser('tv', tv_weight, tv_smoothing)``.

Derivatives (``r = B_b x − y``, ``corr(w, u)`` = :func:`operators.kernel_correlation`):

* ``∇ₓg = (2/n) A_upᵀ(A_up x − y)``
* ``∂_b g = β ∇P(b − b₀) + [A_up = B_b] (2/n) corr(r, x)``
* ``∇²_{bx}hᵀ q = ∂_b⟨B_bᵀ(B_b x − y), q⟩ = corr(B_b q, x) + corr(r, q)``

Error-bound constants (SPEC §3; closed form, circular boundaries, all documented as bounds):

* ``μ = μ₀ + min|b̂|²``, ``L_g = (2/n) ‖A_up‖²``;
* ``‖J‖ ≤ ‖C_r‖ + ‖B_b‖ ‖C_x‖`` where ``C_u: δ ↦ B_δ u`` on k×k kernels (exact norm, see
  :func:`operators.conv_operator_norm`), because ``J δ = B_δᵀ r + B_bᵀ B_δ x``;
* ``L_J = 2k‖B_b‖`` (Young: ``‖B_δ u‖ ≤ ‖δ‖₁‖u‖ ≤ k‖δ‖₂‖u‖``);
* ``L_{H⁻¹} = L_H/μ²`` with ``L_H = R.hessian_lipschitz()`` (the Hessian of ``h`` in ``x`` varies
  only through ``R``; for ``SmoothedTV`` ``48√8 α/γ²``, derived in its docstring).  These
  worst-case bounds are loose for images (ω ≫ ‖z‖); the 2D driver logs ω but does not tighten
  on it (see README).
* direct partial (only ``A_up = B_b``; 0 for the known operator, whose ``∂_b g`` is the H¹ term
  alone): ``L_{θx} = (2/n)(‖C_r‖ + ‖B_b‖ ‖C_x‖)`` (= (2/n) × the ``‖J‖`` bound) and
  ``L'_{θx} = (4/n) k ‖B_b‖``, so that ``‖∂_b g(x̃) − ∂_b g(x̂)‖ ≤ L_{θx} ε + ½L'_{θx} ε²``.
  Derivation: ``∂_b g(x) = β∇H¹ + (2/n) K(x)ᵀ(B_b x − y)`` with ``K(u): δ ↦ B_δ u`` (block
  diagonal over channels: each channel has its own kernel).  With ``e = x̃ − x̂``, exactly
  ``∂_b g(x̃) − ∂_b g(x̂) = (2/n)[K(e)ᵀr + K(x̃)ᵀB_b e − K(e)ᵀB_b e]``, ``r = B_b x̃ − y``;
  ``‖K(e)ᵀr‖ ≤ ‖C_r‖‖e‖`` (``⟨B_δ e, r⟩ = ⟨e, B_{δ̃} r⟩`` with ``δ̃`` the flipped kernel, an
  isometry of the centred k×k support), ``‖K(x̃)ᵀB_b e‖ ≤ ‖C_x‖‖B_b‖‖e‖`` and
  ``‖K(e)ᵀB_b e‖ ≤ k‖B_b‖‖e‖²`` (Young, per channel).  ``‖C_r‖ ≤ k‖r‖`` and ``‖C_x‖ ≤ k‖x̃‖``
  (each of the k² columns of ``C_u`` is a circular shift of ``u``), so this is at least as
  tight as ``(2/n) k (‖r‖ + ‖B_b‖‖x̃‖ + ‖B_b‖ε) ε``.
"""
from __future__ import annotations

import math

from lower_level import CERTIFICATES, LowerLevel, solve_lower
from maid import BilevelProblem, ErrorConstants
from operators import Blur, conv_operator_norm, h1_norm, h1_norm_grad, h1_penalty, h1_penalty_grad, kernel_correlation
from regularisers import Regulariser

UPPER_OPERATORS = ("learned", "known")
KERNEL_PENALTIES = {"h1_squared": (h1_penalty, h1_penalty_grad), "h1": (h1_norm, h1_norm_grad)}


class ADPBetaProblem(BilevelProblem):
    """Bilevel deblurring problem; ``theta`` is the kernel ``b`` of shape (C, 1, k, k).

    ``regulariser`` is the lower level's ``R`` (weight included), ``beta`` the H¹ weight of the
    upper level, ``kernel_penalty`` its form (``'h1_squared'`` or ``'h1'``, module docstring),
    ``mu0`` the Tikhonov term, ``solver`` the lower-level solver (``'fista'`` or
    ``'agd'``) and ``certificate`` its stopping certificate (:func:`lower_level.solve_lower`:
    ``'auto'``, ``'gradient'`` or ``'energy'``), ``metrics_fn(x) -> dict`` extra log columns.
    """

    def __init__(self, y, b0, regulariser, beta, mu0=0.0, upper_operator="learned", known_kernel=None,
                 solver="fista", metrics_fn=None, kernel_penalty="h1_squared", certificate="auto"):
        if upper_operator not in UPPER_OPERATORS:
            raise ValueError(f"unknown upper_operator {upper_operator!r}; use 'learned' or 'known'")
        if not isinstance(kernel_penalty, str) or kernel_penalty not in KERNEL_PENALTIES:
            raise ValueError(f"unknown kernel_penalty {kernel_penalty!r}; use 'h1_squared' (β‖b − b₀‖²_H¹) "
                             f"or 'h1' (β‖b − b₀‖_H¹)")
        if not isinstance(regulariser, Regulariser):
            raise TypeError(f"regulariser must be a regularisers.Regulariser (e.g. make_regulariser('tv', "
                            f"tv_weight, tv_smoothing)), got {type(regulariser).__name__}")
        self.y, self.b0 = y, b0
        self.regulariser, self.beta, self.mu0 = regulariser, beta, mu0
        self.learned = upper_operator == "learned"
        self.kernel_penalty = kernel_penalty
        self._penalty, self._penalty_grad = KERNEL_PENALTIES[kernel_penalty]
        self.A = None if self.learned else Blur(b0 if known_kernel is None else known_kernel, y.shape[-2:])
        self.n = y.numel()
        self.k = b0.shape[-1]
        self.solver = solver
        if certificate not in CERTIFICATES:
            raise ValueError(f"unknown certificate {certificate!r}; use one of {', '.join(CERTIFICATES)}")
        self.certificate = certificate
        self.metrics_fn = metrics_fn
        self._cache = (None, None)

    # -- lower level -------------------------------------------------------------------------
    def lower(self, b) -> LowerLevel:
        """The lower-level objective ``h(·, b)``, cached for the last kernel seen."""
        if self._cache[0] is not b:
            self._cache = (b, LowerLevel(b, self.y, self.regulariser, self.mu0))
        return self._cache[1]

    def solve_lower(self, b, x0, eps, max_iter):
        return solve_lower(self.lower(b), x0, eps, max_iter, self.solver, self.certificate)

    def hessian_vp(self, x, b, v):
        return self.lower(b).hvp(x, v)

    def mixed_vjp(self, x, b, q):
        blur = self.lower(b).blur
        r = blur.A(x) - self.y
        return kernel_correlation(blur.A(q), x, self.k) + kernel_correlation(r, q, self.k)

    # -- upper level -------------------------------------------------------------------------
    def _A_up(self, b) -> Blur:
        return self.lower(b).blur if self.learned else self.A

    def upper_loss(self, x, b):
        r = self._A_up(b).A(x) - self.y
        return (r * r).sum() / self.n + self.beta * self._penalty(b, self.b0)

    def upper_grad_x(self, x, b):
        A = self._A_up(b)
        return (2 / self.n) * A.A_adjoint(A.A(x) - self.y)

    def upper_grad_theta(self, x, b):
        grad = self.beta * self._penalty_grad(b, self.b0)
        if self.learned:
            grad = grad + (2 / self.n) * kernel_correlation(self.lower(b).blur.A(x) - self.y, x, self.k)
        return grad

    def upper_lipschitz(self, x, b):
        """``L_g = (2/n)‖A_up‖²`` (what the line search needs; without the k²×k² eigenproblems of
        :meth:`error_constants`)."""
        return 2 / self.n * self._A_up(b).norm() ** 2

    def error_constants(self, x, b):
        """Closed-form constants of MAID's ω at ``(x̃, b)`` (see the module docstring).

        With the learned operator, ``∂_b g`` depends on ``x`` and its error enters ω through
        ``L_{θx} = (2/n)(‖C_r‖ + ‖B_b‖‖C_x̃‖)`` and ``L'_{θx} = (4/n)k‖B_b‖``; with the known
        operator both are 0.
        """
        h = self.lower(b)
        Bn = h.blur.norm()
        r = h.blur.A(x) - self.y
        J = conv_operator_norm(r, self.k) + Bn * conv_operator_norm(x, self.k)
        L_H = self.regulariser.hessian_lipschitz()
        L_gt, L_gt_jac = ((2 / self.n) * J, (4 / self.n) * self.k * Bn) if self.learned else (0.0, 0.0)
        L_Hinv = L_H / h.mu**2 if h.mu > 0 else math.inf
        return ErrorConstants(mu=h.mu, L_g=self.upper_lipschitz(x, b), J_norm=J, L_J=2 * self.k * Bn,
                              L_Hinv=L_Hinv, L_gtheta=L_gt, L_gtheta_jac=L_gt_jac)

    def metrics(self, x, b):
        return {} if self.metrics_fn is None else self.metrics_fn(x)
