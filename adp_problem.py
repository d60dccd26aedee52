"""ADP-β for blind/semi-blind deblurring as a :class:`maid.BilevelProblem` (SPEC §1).

    lower:  x̂(b) = argmin_x ½‖B_b x − y‖² + R(x) + (μ₀/2)‖x‖²          (lower_level.py)
    upper:  g(x, b) = ‖A_up x − y‖² / n + β P(b − b₀),   n = number of entries of y

``P`` is the kernel penalty (``kernel_penalty``): ``'h1_squared'`` (default) ``P(d) = ‖d‖²_{H¹}``
(smooth), or ``'h1'`` ``P(d) = ‖d‖_{H¹}`` (unsquared, the paper's; not differentiable at ``b = b₀``,
where the subgradient 0 is used, see :func:`operators.h1_norm_grad`).  ``ADP.py`` runs the
unsquared penalty exactly instead: β = 0 here and ``β‖b − b₀‖_{H¹}`` as the prox of proximal MAID
(``ADP.build_composite``, :class:`prox.H1NormPenalty`).  ``P`` does not depend on
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
  on it (see README).  The a-posteriori bounds below (items 1–8) are the informative ones.
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

A-posteriori bound with local constants (:meth:`ADPBetaProblem.hypergradient_error_bound`,
issue 15).  The ω above is valid but 1e9× the true error: its ``L_{H⁻¹} = L_H/μ²`` uses the TV
third derivative at ``w = γ`` everywhere and ``1/μ`` (the worst frequency of ``B_b``) for every
vector.  The bound below measures errors in the norms that ``h`` itself provides.
``Q = B_bᵀB_b + (μ₀ + λ_R)I`` (circulant, ``λ_min(Q) = μ``) satisfies ``Q ⪯ ∇²h(x)`` for every x,
so ``‖H⁻¹ᐟ²v‖ ≤ ‖v‖_{Q⁻¹} := sqrt(vᵀQ⁻¹v)`` for ``H = H̃ = ∇²h(x̃)`` or ``Ĥ = ∇²h(x̂)``, and
``‖MᵀH⁻¹ᐟ²‖ ≤ ‖MᵀQ⁻¹ᐟ²‖`` for any M.  Notation: ``e = x̃ − x̂``, ``q̃`` the CG iterate,
``r = ∇ₓg(x̃) − H̃q̃`` its residual, ``q* = H̃⁻¹∇ₓg(x̃)``, ``q̂ = Ĥ⁻¹∇ₓg(x̂)``, ``r_y = B_b x̃ − y``,
``W(u) = ‖Q⁻¹ᐟ²C_u‖`` and ``W_B(u) = ‖Q⁻¹ᐟ²B_bᵀC_u‖`` (``C_u: δ ↦ B_δ u``; exact, k²×k²
eigenproblems: :func:`operators.conv_operator_norm` with the weights ``1/Q``, ``|b̂|²/Q``).

1. **Lower-level error in the energy norm.**  ``g_h = ∇h(x̃) = H̄e`` with ``H̄ = ∫₀¹∇²h(x̂ + te)dt ⪰ Q``,
   so ``eᵀH̄e = g_hᵀH̄⁻¹g_h ≤ ‖g_h‖²_{Q⁻¹} =: κ²`` (computed), hence ``‖e‖_Q ≤ κ``, ``‖e‖ ≤ E := κ/√μ``.
   (A solve certified by ``‖g_h‖ ≤ με`` or by the energy test has ``κ ≤ √μ ε``, ``E ≤ ε``.)
2. **Upper gradient change** ``v₁ = ∇ₓg(x̃) − ∇ₓg(x̂) = (2/n)A_upᵀA_up e``:
   ``‖v₁‖_{Q⁻¹} ≤ (2/n) m_A κ``, ``m_A = max_ω |â(ω)|²/Q(ω)`` (both circulant).
3. **Hessian change** ``Ĥ − H̃ = ∇²R(x̂) − ∇²R(x̃)``.  For ``SmoothedTV`` (``∇²R = αDᵀdiag(M_p)D``,
   ``M(d) = (I − nnᵀ)/w``, ``n = d/w``, ``w = sqrt(|d|² + γ²)``): the derivative of ``M`` is the
   third derivative of ``ψ(d) = w``, ``T = [3n⊗n⊗n − sym(I⊗n)]/w²``, whose norm (for a symmetric
   trilinear form, ``sup_{|u|=1}|T(u,u,u)| = 3t(1 − t²)/w²``, ``t = |u·n| < 1``) is ≤ ``(2/√3)/w²``.
   Per pixel ``s_p ≥ |(De)_p|`` and, w being 1-Lipschitz in d, ``w ≥ w_p := max(γ, w̃_p − s_p)``
   on the segment, so ``‖M(d̂_p) − M(d̃_p)‖ ≤ a_p|(De)_p|``, ``a_p := (2/√3)/w_p²``.  ``s_p``:
   ``|(Du)_p| ≤ 2‖u‖`` gives ``2E``; the TV part of ``eᵀH̄e ≤ κ²`` is
   ``Σ_p c_p|(De)_p|² ≤ κ²`` with ``c_p = αγ²/(w̃_p + s_p)³`` (``M ⪰ γ²/w³``, ``w ≤ w̃_p + s_p`` on the
   segment), which for one pixel gives ``αγ²s²/(w̃_p + s)³ ≤ κ²``: ``s_p`` = the smallest root of
   that equation when ``2E`` violates it, else ``2E``.  With ``f_p = α a_p|(Dq̃)_p|``,
   ``‖(Ĥ − H̃)q̃‖ ≤ √8‖f ⊙ |De|‖₂ ≤ √8 min(‖f ⊙ s‖₂, max_p f_p/√m_p)``, ``m_p = ½(c_p/κ² + 1/(8E²))``
   (Cauchy–Schwarz against ``Σ m_p|(De)_p|² ≤ ½(1 + ‖De‖²/(8E²)) ≤ 1``: the energy budget is spent
   once over all pixels, not once per pixel), and ``‖Ĥ − H̃‖ ≤ 8α max a_p s_p`` (``‖D‖² ≤ 8``).
   Any other ``R``: ``L_H E ‖q̃‖`` and ``L_H E``.
   ``V₃ := ‖(Ĥ − H̃)q̃‖/√μ ≥ ‖(Ĥ − H̃)q̃‖_{Q⁻¹}``.
4. **Adjoint.**  ``q* − q̂ = H̃⁻¹v₁ + Ĥ⁻¹(Ĥ − H̃)H̃⁻¹∇ₓg(x̂)`` and ``H̃⁻¹∇ₓg(x̂) = q̃ + u``,
   ``u = H̃⁻¹(r − v₁)``, with ``uᵀH̃u ≤ ‖r − v₁‖²_{Q⁻¹} ≤ T² := (‖r‖_{Q⁻¹} + ‖v₁‖_{Q⁻¹})²``.
   ``V₄ ≥ ‖(Ĥ − H̃)u‖_{Q⁻¹}`` is ``c₄T``, ``c₄`` the smaller of ``‖Ĥ − H̃‖/μ`` (``‖u‖ ≤ T/√μ``) and,
   for ``SmoothedTV``, ``√8 max_p(α a_p s_p/√m'_p)/√μ`` with ``m'_p = ½(αγ²/w̃_p³ + μ/8)``
   (Cauchy–Schwarz as in item 3 against ``uᵀH̃u ≥ Σ_p (αγ²/w̃_p³)|(Du)_p|²`` and
   ``uᵀH̃u ≥ μ‖u‖² ≥ (μ/8)‖Du‖²``; for ``γ ≪ α/μ`` this is ``√(γμ/8α)``× the first).  And
   ``K_J = W(r_y) + W_B(x̃) ≥ ‖J̃ᵀQ⁻¹ᐟ²‖`` (``J̃δ = B_δᵀr_y + B_bᵀB_δx̃``, flipping δ is an isometry):
   ``‖J̃ᵀ(q̃ − q̂)‖ = ‖J̃ᵀH̃⁻¹(v₁ − r) + J̃ᵀĤ⁻¹(Ĥ − H̃)(q̃ + H̃⁻¹(r − v₁))‖ ≤ K_J(‖v₁‖_{Q⁻¹} + ‖r‖_{Q⁻¹} + V₃ + V₄)``,
   and ``‖q̂ − q̃‖ ≤ Δq := (‖v₁‖_{Q⁻¹} + ‖r‖_{Q⁻¹} + V₃ + V₄)/√μ``.
5. **Mixed-product change** ``(J̃ − Ĵ)ᵀq̂ = corr(B_b q̂, e) + corr(B_b e, q̂)`` (exact, bilinear):
   with ``q̂ = q̃ + (q̂ − q̃)``, ``≤ 2W_B(q̃)κ + 2k‖B_b‖EΔq`` (Young for the remainder).
6. **Direct partial** (learned operator): ``(2/n)[K(e)ᵀr_y + K(x̃)ᵀB_b e − K(e)ᵀB_b e]`` (above)
   ``≤ (2/n)[(W(r_y) + W_B(x̃))κ + k‖B_b‖E²]``.

7. **Channel means** (``SmoothedTV``, whose Hessian annihilates constants: ``D1 = 0``).  Then
   ``H̃1_c = Ĥ1_c = (|b̂_c(0)|² + μ₀)1_c`` and both Hessians map mean-free images to mean-free
   images; ``(Ĥ − H̃)u = αDᵀ(·)`` is mean-free.  Writing ``r = r̄ + r⊥`` (per-channel means), the
   parts of item 4 that act on ``r⊥``, ``(Ĥ − H̃)q̃`` and ``(Ĥ − H̃)H̃⁻¹(r − v₁)`` only see ``P⊥J̃``,
   whose ``‖(P⊥J̃)ᵀQ⁻¹ᐟ²‖ ≤ K_J⊥`` uses the weights with the zero frequency removed, and
   ``J̃ᵀH̃⁻¹r̄ = mixed_vjp(x̃, r̄_c/(|b̂_c(0)|² + μ₀))`` is computed exactly.  So item 4 becomes
   ``K_J‖v₁‖_{Q⁻¹} + ‖J̃ᵀH̃⁻¹r̄‖ + K_J⊥(‖r⊥‖_{Q⁻¹} + V₃ + V₄)``.  This matters because an image's
   mean makes ``‖J̃‖`` large (``B_bᵀB_δ x̄ = x̄(Σδ)``), while CG residuals and Hessian changes have
   (almost) no mean.

``ω = (6) + (4) + (5) ≥ ‖z − ∇f‖`` for ``z = ∂_b g(x̃) − J̃ᵀq̃`` (MAID's ``z``), with no assumption
on how ``x̃`` and ``q̃`` were obtained (it is a-posteriori: κ and ``r`` are computed), in exact
arithmetic (evaluate in float64).  Cost: two gradients/HVPs, three FFTs, three 25×25 eigenproblems.

8. **Refined bound through a reference point** (:meth:`ADPBetaProblem.refined_error_terms`).
   Measured term by term (``benchmarks/bench_omega.py``), the slack of items 1–7 is in the
   Hessian change (item 3: 200–500× the actual ``‖(Ĥ − H̃)q̃‖_{Q⁻¹}``) and in ``K_J``: both are
   worst cases over every ``e`` in the ellipsoid ``eᵀH̄e ≤ κ²``, while the actual ``e`` points
   elsewhere.  Knowing ``e`` to first order removes that slack.  Newton steps: ``d`` ≈ ``H̃⁻¹∇h(x̃)``
   (CG to relative residual ``newton_rtol``), ``x' = x̃ − d`` (repeated ``newton_steps`` times from the
   new point); ``q'`` ≈ ``∇²h(x')⁻¹∇ₓg(x')`` (CG warm-started at ``q̃``, to ``adjoint_rtol`` times its
   initial residual); ``z' = ∂_b g(x') − J(x')ᵀq'``.  Items 1–7 hold at
   *any* pair ``(x', q')`` (they assume nothing about how it was obtained), so
   ``‖z' − ∇f‖ ≤ ω(x', q')`` and, by the triangle inequality,

       ‖z − ∇f‖ ≤ ‖z − z'‖ + ω(x', q') =: ω_ref        (and ω_ref ≤ ‖z − ∇f‖ + 2ω(x', q')).

   ``‖z − z'‖`` is computed; ``ω(x', q')`` is small because ``κ' = ‖∇h(x')‖_{Q⁻¹}`` is (Newton: the
   residual of ``d`` plus a second-order term) and ``r'`` is.  The returned bound is
   ``min(ω(x̃, q̃), ω_ref)``: both are bounds.  No property of ``d`` or ``q'`` is assumed (a poor
   Newton step only loosens the bound).  Cost: the ``newton_steps + 1`` CG solves (their iterations
   are returned; they are work on the cost axis) and items 1–7 twice.  Measured
   (``benchmarks/bench_omega.py``, defaults ``newton_rtol = adjoint_rtol = 1e-3``, one step):
   ``ω_ref/‖z − ∇f‖`` on the default run's 37 iterates median 1.06, max 1.48 (local ω: 137, 2.4e3),
   88 CG iterations per call; random 3×24×24 (36 points) median 3.0, max 10 (local ω: 3.7e3), 1.02
   and 1.04 with two Newton steps.  Looser tolerances are cheaper and looser: ``1e-2/1e-2`` random
   median 20, max 58; ``1e-1/1e-2`` random median 196 (default run 2.9, 43 CG iterations).
"""
from __future__ import annotations

import math

import torch

from lower_level import CERTIFICATES, LowerLevel, solve_lower
from maid import BilevelProblem, ErrorConstants, conjugate_gradient
from operators import Blur, FiniteDifference, conv_operator_norm, h1_norm, h1_norm_grad, h1_penalty, h1_penalty_grad, kernel_correlation
from regularisers import Regulariser, SmoothedTV

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

    # -- a-posteriori error bound with local constants (module docstring, items 1–6) ------------
    def hypergradient_error_terms(self, x, b, q) -> dict:
        """The terms of the a-posteriori bound on ``‖z − ∇f(b)‖`` at ``(x̃, b)`` with the CG iterate
        ``q̃ = q`` (module docstring, items 1–6): ``kappa`` (``‖e‖_Q`` bound), ``E`` (``‖e‖`` bound),
        ``cg_residual`` (``‖r‖_{Q⁻¹}``), ``adjoint``, ``mixed``, ``direct`` and their sum ``omega``."""
        h = self.lower(b)
        mu = h.mu
        if not mu > 0:
            return {"omega": math.inf}
        root_mu = math.sqrt(mu)
        kappa = h.q_inverse_norm(h.grad(x))
        E = kappa / root_mu
        Bn, k, n = h.blur.norm(), self.k, self.n
        inv_Q = 1.0 / h.Q_spectrum
        B_over_Q = h.blur.power * inv_Q
        Rr = h.q_inverse_norm(self.upper_grad_x(x, b) - h.hvp(x, q))
        V1 = (2 / n) * (self._A_up(b).power * inv_Q).max().item() * kappa
        r_y = h.blur.A(x) - self.y
        W_ry = conv_operator_norm(r_y, k, inv_Q)
        W_Bx = conv_operator_norm(x, k, B_over_Q)
        V3, V4_factor = self._hessian_change(x, q, kappa, E, mu)
        V4 = V4_factor * (Rr + V1)
        inner = V1 + Rr + V3 + V4
        dq = inner / root_mu
        if self._hessian_kills_constants():           # item 7: J̃'s mean part acts on r only, exactly
            r = self.upper_grad_x(x, b) - h.hvp(x, q)
            r_mean = r.mean(dim=(-2, -1), keepdim=True)
            mean_part = torch.linalg.vector_norm(self.mixed_vjp(x, b, r_mean.expand_as(r) / (
                h.blur.power[..., :1, :1] + h.mu0))).item()
            K_perp = (conv_operator_norm(r_y, k, _without_mean(inv_Q)) +
                      conv_operator_norm(x, k, _without_mean(B_over_Q)))
            adjoint = (W_ry + W_Bx) * V1 + mean_part + K_perp * (h.q_inverse_norm(r - r_mean) + V3 + V4)
        else:
            adjoint = (W_ry + W_Bx) * inner
        mixed = 2 * conv_operator_norm(q, k, B_over_Q) * kappa + 2 * k * Bn * E * dq
        direct = (2 / n) * ((W_ry + W_Bx) * kappa + k * Bn * E * E) if self.learned else 0.0
        return {"kappa": kappa, "E": E, "cg_residual": Rr, "upper_change": V1, "hessian_change": V3,
                "hessian_change_2": V4, "adjoint": adjoint, "mixed": mixed, "direct": direct,
                "omega": adjoint + mixed + direct}

    def hypergradient_error_bound(self, x, b, q) -> float:
        """``ω ≥ ‖z − ∇f(b)‖`` for ``z = ∂_b g(x̃, b) − J(x̃)ᵀq̃`` (the hypergradient MAID computes from
        ``x̃ = x`` and ``q̃ = q``), a-posteriori and with local constants (module docstring)."""
        return self.hypergradient_error_terms(x, b, q)["omega"]

    def refined_error_terms(self, x, b, q, newton_rtol: float = 1e-3, adjoint_rtol: float = 1e-3,
                            newton_steps: int = 1, max_iter: int = 1000) -> dict:
        """The refined bound of item 8 (module docstring) on ``‖z − ∇f(b)‖``, ``z = ∂_b g(x̃) − J(x̃)ᵀq̃``:
        ``shift`` (``‖z − z'‖``), ``omega_reference`` (``ω(x', q')``), ``omega_local`` (``ω(x̃, q̃)``),
        ``omega = min(omega_local, shift + omega_reference)``, ``kappa_reference`` (``κ'``), the CG
        iterations spent, ``newton_iterations`` and ``adjoint_iterations``, and the reference pair
        ``x_reference`` (``x'``) and ``q_reference`` (``q'``) as tensors.

        ``newton_steps`` Newton steps from x̃, each by CG to the residual ``newton_rtol·‖∇h‖`` at its
        start; ``q'`` by CG warm-started at ``q̃`` to ``adjoint_rtol`` times its initial residual
        ``‖∇ₓg(x') − ∇²h(x')q̃‖`` (so ``r'`` is small against what moved ``q̃``); ``max_iter`` caps each CG
        (a capped solve is still a valid reference point)."""
        for name, v in (("newton_rtol", newton_rtol), ("adjoint_rtol", adjoint_rtol)):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        if isinstance(newton_steps, bool) or not isinstance(newton_steps, int) or newton_steps < 1:
            raise ValueError(f"newton_steps must be a positive integer, got {newton_steps!r}")
        h = self.lower(b)
        if not h.mu > 0:
            return {"omega": math.inf, "newton_iterations": 0, "adjoint_iterations": 0}
        local = self.hypergradient_error_terms(x, b, q)["omega"]
        x_ref, newton_it = x, 0
        for _ in range(newton_steps):
            g_h = h.grad(x_ref)
            d, it, _ = conjugate_gradient(lambda v, at=x_ref: h.hvp(at, v), g_h, None,
                                          newton_rtol * torch.linalg.vector_norm(g_h).item(), max_iter)
            x_ref, newton_it = x_ref - d, newton_it + it
        gx_ref = self.upper_grad_x(x_ref, b)
        r0 = torch.linalg.vector_norm(gx_ref - h.hvp(x_ref, q)).item()
        q_ref, adjoint_it, _ = conjugate_gradient(lambda v: h.hvp(x_ref, v), gx_ref, q, adjoint_rtol * r0, max_iter)
        z = self.upper_grad_theta(x, b) - self.mixed_vjp(x, b, q)
        z_ref = self.upper_grad_theta(x_ref, b) - self.mixed_vjp(x_ref, b, q_ref)
        shift = torch.linalg.vector_norm(z - z_ref).item()
        at_ref = self.hypergradient_error_terms(x_ref, b, q_ref)
        return {"shift": shift, "omega_reference": at_ref["omega"], "kappa_reference": at_ref.get("kappa", math.inf),
                "omega_local": local, "omega": min(local, shift + at_ref["omega"]),
                "newton_iterations": newton_it, "adjoint_iterations": adjoint_it, "x_reference": x_ref,
                "q_reference": q_ref}

    def refined_error_bound(self, x, b, q, newton_rtol: float = 1e-3, adjoint_rtol: float = 1e-3,
                            newton_steps: int = 1) -> float:
        """``ω_ref ≥ ‖z − ∇f(b)‖`` of item 8 (module docstring): :meth:`hypergradient_error_bound` made
        tight by a Newton-corrected reference point, at the price of ``newton_steps + 1`` CG solves."""
        return self.refined_error_terms(x, b, q, newton_rtol, adjoint_rtol, newton_steps)["omega"]

    #: tolerances (newton_rtol, adjoint_rtol) tried in turn by :meth:`a_posteriori_error`: cheap first
    #: (default run: ω/‖z − ∇f‖ median 2.9 at 43 CG iterations per call), then the default (1.06, 88)
    A_POSTERIORI_TOLERANCES = ((1e-1, 1e-2), (1e-3, 1e-3))

    def a_posteriori_error(self, x, b, q, target: float = 0.0) -> tuple[float, int]:
        """maid's optional plug-in method: ``(ω, CG iterations)``, ``ω ≥ ‖z − ∇f(b)‖`` for any pair
        ``(x, q)``, made only as tight as ``target`` needs: the local bound (items 1–7, no CG) first;
        if it is above ``target``, the refined bound (item 8) with the tolerances of
        :data:`A_POSTERIORI_TOLERANCES` in turn, stopping at the first ``ω ≤ target``.  Every value
        tried is a bound, so the smallest is returned."""
        omega, iters = self.hypergradient_error_bound(x, b, q), 0
        for newton_rtol, adjoint_rtol in self.A_POSTERIORI_TOLERANCES:
            if omega <= target:
                break
            t = self.refined_error_terms(x, b, q, newton_rtol, adjoint_rtol)
            omega = min(omega, t["omega"])
            iters += int(t["newton_iterations"] + t["adjoint_iterations"])
        return omega, iters

    def _hessian_kills_constants(self) -> bool:
        """``∇²R(x)1_c = 0`` for every x and channel c and ``λ_R = 0`` (SmoothedTV: ``D1 = 0``)."""
        return isinstance(self.regulariser, SmoothedTV) and self.regulariser.hessian_lower_bound() == 0

    def _hessian_change(self, x, q, kappa: float, E: float, mu: float):
        """``(V₃, c₄)`` of items 3–4: ``V₃ ≥ ‖(Ĥ − H̃)q̃‖/√μ`` and ``V₄ = c₄(‖r‖_{Q⁻¹} + ‖v₁‖_{Q⁻¹})``, for
        every ``x̂`` with ``‖x̃ − x̂‖ ≤ E`` and ``(x̃ − x̂)ᵀH̄(x̃ − x̂) ≤ κ²``.  Per-pixel for
        :class:`SmoothedTV` with float parameters, else from ``R.hessian_lipschitz()``."""
        R = self.regulariser
        if not (isinstance(R, SmoothedTV) and not R.parameters()):
            L_H = R.hessian_lipschitz()
            return L_H * E * torch.linalg.vector_norm(q).item() / math.sqrt(mu), L_H * E / mu
        alpha, gamma = R.weight, R.smoothing
        dh, dv = FiniteDifference.A(x)
        w = torch.sqrt(dh * dh + dv * dv + gamma * gamma)
        s = _pixel_difference_bound(w, alpha, gamma, kappa, 2 * E)
        slope = (2 / math.sqrt(3)) / torch.clamp(w - s, min=gamma) ** 2       # a_p
        qh, qv = FiniteDifference.A(q)
        f = alpha * slope * torch.sqrt(qh * qh + qv * qv)
        per_pixel = torch.linalg.vector_norm(f * s).item()
        if kappa > 0:
            m = 0.5 * (alpha * gamma * gamma / (w + s) ** 3 / kappa**2 + 1 / (8 * E * E))
            per_pixel = min(per_pixel, torch.sqrt(f * f / m).max().item())
        root_mu = math.sqrt(mu)
        operator = 8 * alpha * (slope * s).max().item() / mu
        m_u = 0.5 * (alpha * gamma * gamma / w**3 + mu / 8)
        energy = math.sqrt(8) * (alpha * slope * s / torch.sqrt(m_u)).max().item() / root_mu
        return math.sqrt(8) * per_pixel / root_mu, min(operator, energy)

    def metrics(self, x, b):
        return {} if self.metrics_fn is None else self.metrics_fn(x)


def _without_mean(weight: torch.Tensor) -> torch.Tensor:
    """A real-FFT-grid weight with its zero frequency set to 0 (the per-channel mean removed)."""
    w = weight.clone()
    w[..., 0, 0] = 0
    return w


def _pixel_difference_bound(w, alpha: float, gamma: float, kappa: float, S: float, iters: int = 60):
    """Per pixel, a bound ``s_p ≥ |(De)_p|`` from ``|(De)_p| ≤ S`` and ``φ_p(|(De)_p|) ≤ κ²``,
    ``φ_p(s) = αγ²s²/(w_p + s)³`` (module docstring, item 3).

    ``φ_p`` increases on ``[0, 2w_p]`` and decreases after, so ``{s ≤ S: φ_p(s) ≤ κ²}`` is
    ``[0, S]`` when ``φ_p(S) ≤ κ²`` and ``[0, s₁]`` otherwise, ``s₁`` the root in
    ``[0, min(S, 2w_p)]`` (bisection, ``iters`` halvings; the upper end is kept, so ``s_p ≥ s₁``)."""
    def phi(t):
        return alpha * gamma * gamma * t * t / (w + t) ** 3

    S_t = torch.full_like(w, S)
    if kappa == 0:
        return torch.zeros_like(w)
    lo, hi = torch.zeros_like(w), torch.minimum(S_t, 2 * w)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = phi(mid) > kappa * kappa
        hi = torch.where(above, mid, hi)
        lo = torch.where(above, lo, mid)
    return torch.where(phi(S_t) <= kappa * kappa, S_t, hi)
