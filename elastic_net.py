"""The elastic-net lower level of the 1D ADP experiment and its implicit hypergradient (SPEC §4.1).

    x̂(B) = argmin_x  h(x, B) = ½‖Bx − y‖² + α₁‖x‖₁ + (α₂/2)‖x‖²          (lower level)
    min_B  f(B) = g(x̂(B)),    g(x) = ½‖A x − y‖²                           (upper level, β = 0)

(times an optional constant ``scale``, see :class:`ElasticNetBilevel`).

``θ = B`` is an n×n matrix, ``x`` an n-vector, ``A`` the known forward operator (``A_up = A``).
This module is the ONE place where the elastic net lives: the proximal-gradient step
:func:`prox_grad_step` is used both by the certified solver :meth:`ElasticNetBilevel.solve_lower`
(ADP IFT and ADP-MAID) and by the unrolled network :func:`lista_step` (ADP LISTA); the
support-restricted hypergradient is what MAID's generic machinery (``maid.hypergradient``)
computes from the methods of :class:`ElasticNetBilevel`.

Proximal gradient (ISTA) with step ``t``, smooth part ``s(x) = ½‖Bx − y‖² + (α₂/2)‖x‖²``:

    x⁺ = S_{tα₁}( x − t (BᵀB x − Bᵀy + α₂ x) ),   S_λ(u) = sign(u) max(|u| − λ, 0).

Stopping certificate.  With the gradient mapping ``G = (x − x⁺)/t``, optimality of the prox gives
``G − ∇s(x) + ∇s(x⁺) ∈ ∂F(x⁺)`` (``F = h(·, B)``), so ``dist(0, ∂F(x⁺)) ≤ (1 + L t)‖G‖`` with
``L = ‖BᵀB‖ + α₂`` the Lipschitz constant of ``∇s``.  ``F`` is ``α₂``-strongly convex, hence
``‖x⁺ − x̂‖ ≤ dist(0, ∂F(x⁺))/α₂``; the solver stops when ``(1 + L t)‖G‖/α₂ ≤ ε`` and returns
``x⁺``.  ``L`` is bounded from above by ``‖BᵀB‖_∞ + α₂`` (max absolute row sum; for a symmetric
matrix ``‖M‖₂ ≤ ‖M‖_∞``), which only makes the certificate more conservative.

Hypergradient (implicit differentiation on the support ``S = {i : x̃_i ≠ 0}``, where ``h`` is
smooth in ``x_S``).  ``H = (BᵀB + α₂I)_SS``,

    H v_S = (∇ₓg)_S = (Aᵀ(Ax̃ − y))_S,   v = 0 off S,
    ∇_B f = −[(Bx̃ − y) vᵀ + (Bv) x̃ᵀ].

In MAID's interface: ``hessian_vp`` is ``P_S(BᵀB + α₂I)P_S``, ``solve_adjoint`` runs
``maid.conjugate_gradient`` on that operator with the right-hand side and the warm start projected
onto ``S``, and ``mixed_vjp(x, B, q) = ∂_B⟨∇ₓh(x, B), q⟩ = (Bx − y)qᵀ + (Bq)xᵀ``, so that
``z = ∂_B g − mixed_vjp = −[(Bx̃ − y)qᵀ + (Bq)x̃ᵀ]`` is the formula above.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from maid import BilevelProblem, ErrorConstants, LowerSolve, conjugate_gradient

__all__ = ["grid", "truth", "gaussian_operator", "make_data", "pg_operators", "prox_grad_step", "ElasticNetBilevel",
           "lista_step", "run_lista"]


# --------------------------------------------------------------------------------------------
# data of SPEC §4.1
# --------------------------------------------------------------------------------------------
def grid(n: int = 200, h: float = 0.01, dtype=torch.float64) -> torch.Tensor:
    """``t_i = −1 + h/2 + i h``, ``i = 0 … n−1``."""
    return -1 + h / 2 + h * torch.arange(n, dtype=dtype)


def truth(t: torch.Tensor) -> torch.Tensor:
    """``1[t>−0.6] − 0.7·1[t>−0.5] − 0.3·1[t>0] + 0.7·1[t>0.2] − 0.7·1[t>0.5]``."""
    s = lambda c: (t > c).to(t.dtype)  # noqa: E731
    return s(-0.6) - 0.7 * s(-0.5) - 0.3 * s(0.0) + 0.7 * s(0.2) - 0.7 * s(0.5)


def gaussian_operator(n: int = 200, dtype=torch.float64) -> torch.Tensor:
    """``A_ij = exp(−(i − j)²/50) / (5√(2π))`` (a Gaussian blur of standard deviation 5 samples)."""
    i = torch.arange(n, dtype=dtype)
    return torch.exp(-((i[:, None] - i[None, :]) ** 2) / 50) / (5 * math.sqrt(2 * math.pi))


def make_data(n: int = 200, h: float = 0.01, noise: float = 0.005, seed: int = 0, dtype=torch.float64):
    """``(t, x_true, A, y)`` with ``y = A x_true + noise·N(0, I)`` drawn from ``torch.Generator(seed)``."""
    t = grid(n, h, dtype)
    x_true = truth(t)
    A = gaussian_operator(n, dtype)
    gen = torch.Generator().manual_seed(seed)
    y = A @ x_true + noise * torch.randn(n, generator=gen, dtype=dtype)
    return t, x_true, A, y


# --------------------------------------------------------------------------------------------
# the lower level: one proximal-gradient step (shared by the solver and by LISTA)
# --------------------------------------------------------------------------------------------
def pg_operators(B: torch.Tensor, y: torch.Tensor, alpha1: float, alpha2: float, step: float,
                 BtB: torch.Tensor | None = None):
    """``(M, c, λ)`` of one ISTA step ``x ↦ S_λ(Mx + c)`` on the elastic net with step ``t``:
    ``M = (1 − tα₂)I − tBᵀB``, ``c = tBᵀy``, ``λ = tα₁`` (differentiable in ``B``: LISTA uses it).
    ``BtB``: ``BᵀB`` if the caller has it already."""
    BtB = B.T @ B if BtB is None else BtB
    M = (1 - step * alpha2) * torch.eye(B.shape[1], dtype=B.dtype, device=B.device) - step * BtB
    return M, step * (B.T @ y), step * alpha1


def prox_grad_step(x: torch.Tensor, M: torch.Tensor, c: torch.Tensor, lam: float) -> torch.Tensor:
    """``x⁺ = S_λ(Mx + c) = S_{tα₁}(x − t(BᵀBx − Bᵀy + α₂x))`` — one proximal-gradient step.

    No in-place operations, so autograd can differentiate through it (LISTA)."""
    return F.softshrink(torch.addmv(c, M, x), lam)


def _abs_sum_max(M: torch.Tensor, dim: int) -> float:
    """Max absolute column (``dim=0``: ``‖M‖₁``) or row (``dim=1``: ``‖M‖_∞``) sum.  Written out, not
    ``torch.linalg.matrix_norm``, whose different summation order changes the last bits of ``L`` and
    so, through the stopping tolerance, the chaotic fixed-step IFT trajectory of ADP_1D.py."""
    return M.abs().sum(dim=dim).max().item()


def _sym_norm_bound(M: torch.Tensor) -> float:
    """``‖M‖₂ ≤ ‖M‖_∞`` for symmetric ``M`` (max absolute row sum)."""
    return _abs_sum_max(M, 1)


def _spectral_norm_bound(B: torch.Tensor) -> float:
    """``‖B‖₂ ≤ min(‖B‖_F, √(‖B‖₁‖B‖_∞))`` — a cheap upper bound (no SVD in the loops)."""
    return min(torch.linalg.matrix_norm(B).item(), math.sqrt(_abs_sum_max(B, 0) * _abs_sum_max(B, 1)))


class ElasticNetBilevel(BilevelProblem):
    """ADP with an elastic-net lower level, ``θ = B`` (n×n), ``A_up = A`` (SPEC §4.1).

    ``solve_lower`` is proximal gradient with step ``step`` (default 0.1, the paper's), warm-started,
    stopped by the certificate ``(1 + Lt)‖G‖/α₂ ≤ ε`` (module docstring); it returns ``x⁺`` and the
    number of proximal-gradient steps taken.  If ``step`` exceeds ``1/L`` for the current ``B``
    (never the case near ``B = A``, where ``L ≈ 1``) the solver uses ``1/L`` instead, so it cannot
    diverge.  (``maid`` reuses an accepted candidate's solve, so each IFT step is ONE warm-started
    solve of at most ``lower_max_iter`` iterations.)

    ``x_true`` (optional) adds the reconstruction error ``‖x − x_true‖`` to MAID's log.

    ``scale`` multiplies the upper objective: ``g(x) = scale · ½‖Ax − y‖²`` (SPEC §4.1: ``scale = 1``;
    ``scale = 2/n`` gives SPEC §1's normalisation ``‖Ax − y‖²/n``).  A fixed-step method with step
    ``α`` on ``scale·g`` is the same as step ``scale·α`` on ``g``.
    """

    def __init__(self, A: torch.Tensor, y: torch.Tensor, alpha1: float, alpha2: float, step: float = 0.1,
                 x_true: torch.Tensor | None = None, scale: float = 1.0):
        if not (alpha2 > 0 and alpha1 >= 0 and step > 0):
            raise ValueError("need alpha2 > 0 (strong convexity), alpha1 >= 0, step > 0")
        self.A, self.y = A, y
        self.alpha1, self.alpha2, self.step = float(alpha1), float(alpha2), float(step)
        self.x_true = x_true
        self.scale = float(scale)
        self.AtA = A.T @ A
        self.Aty = A.T @ y
        self.L_g = self.scale * torch.linalg.matrix_norm(A, ord=2).item() ** 2  # s‖A‖², exact (one SVD)
        self.solves = 0  # solves run
        self.uncertified = 0  # of which hit max_iter before the certificate

    # ---------------------------------------------------------------- lower level
    def lower_value(self, x, theta) -> torch.Tensor:
        """``h(x, B) = ½‖Bx − y‖² + α₁‖x‖₁ + (α₂/2)‖x‖²``."""
        r = theta @ x - self.y
        return 0.5 * r.dot(r) + self.alpha1 * x.abs().sum() + 0.5 * self.alpha2 * x.dot(x)

    def lower_operators(self, theta):
        """``(M, c, λ, L, t)``: the proximal-gradient map ``x ↦ S_λ(Mx + c)`` (:func:`pg_operators`) for
        the step actually used ``t = min(step, 1/L)``, with ``L = ‖BᵀB‖_∞ + α₂ ≥ ‖BᵀB‖₂ + α₂``."""
        BtB = theta.T @ theta
        L = _sym_norm_bound(BtB) + self.alpha2
        t = min(self.step, 1.0 / L)
        M, c, lam = pg_operators(theta, self.y, self.alpha1, self.alpha2, t, BtB)
        return M, c, lam, L, t

    def solve_lower(self, theta, x0, eps: float, max_iter: int) -> LowerSolve:
        """Proximal gradient from ``x0`` until ``(1 + Lt)‖G‖/α₂ ≤ ε`` (then ``‖x⁺ − x̂(B)‖ ≤ ε``) or
        ``max_iter`` steps.  ``LowerSolve.grad_norm`` is the bound ``(1 + Lt)‖G‖`` on
        ``dist(0, ∂h(x⁺))``; ``iters`` counts proximal-gradient steps.  ``self.solves`` and
        ``self.uncertified`` count the solves actually run and those that hit ``max_iter``."""
        M, cv, lam, L, t = self.lower_operators(theta)
        if not math.isfinite(L):       # B too large for the dtype: t = 1/L = 0, no step possible
            self.solves += 1
            return LowerSolve(torch.full_like(x0, math.nan), 0, math.inf, False)
        factor = (1 + L * t) / t  # dist(0, ∂h(x⁺)) ≤ factor · ‖x − x⁺‖
        tol = self.alpha2 * eps / factor  # stop when ‖x − x⁺‖ ≤ tol
        x = x0
        dist = math.inf
        k = 0
        converged = False
        while k < max_iter:
            xp = prox_grad_step(x, M, cv, lam)
            k += 1
            dist = torch.dist(x, xp).item()
            x = xp
            if dist <= tol:
                converged = True
                break
            if not math.isfinite(dist):
                break
        gn = factor * dist
        self.solves += 1
        self.uncertified += int(not converged)
        return LowerSolve(x, k, gn, converged)

    # ---------------------------------------------------------------- upper level
    def upper_loss(self, x, theta) -> torch.Tensor:
        """``g(x) = scale · ½‖Ax − y‖²``."""
        r = self.A @ x - self.y
        return 0.5 * self.scale * r.dot(r)

    def upper_grad_x(self, x, theta) -> torch.Tensor:
        """``∇ₓg = scale · Aᵀ(Ax − y)``."""
        return self.scale * (self.AtA @ x - self.Aty)

    # ---------------------------------------------------------------- hypergradient pieces
    @staticmethod
    def support(x) -> torch.Tensor:
        """Indicator (as 0/1 of ``x``'s dtype) of ``S = {i : x_i ≠ 0}``."""
        return (x != 0).to(x.dtype)

    def hessian_vp(self, x, theta, v) -> torch.Tensor:
        """``P_S (BᵀB + α₂I) P_S v`` — the Hessian of ``h`` in ``x_S`` (zero rows/columns off ``S``)."""
        return self._restricted_hessian_vp(theta, self.support(x), v)

    def _restricted_hessian_vp(self, theta, m, v) -> torch.Tensor:
        """``P_S (BᵀB + α₂I) P_S v`` with ``m`` the 0/1 indicator of ``S``."""
        mv = m * v
        return m * (theta.T @ (theta @ mv) + self.alpha2 * mv)

    def solve_adjoint(self, x, theta, rhs, q0, delta: float, max_iter: int):
        """Conjugate gradient for ``(BᵀB + α₂I)_SS q_S = rhs_S`` (``q = 0`` off ``S``) to residual ``≤ δ``,
        warm-started at ``P_S q0`` (``q0`` may be ``None`` or live on an older support)."""
        m = self.support(x)
        q0 = None if q0 is None else m * q0
        return conjugate_gradient(lambda v: self._restricted_hessian_vp(theta, m, v), m * rhs, q0, delta, max_iter)

    def mixed_vjp(self, x, theta, q) -> torch.Tensor:
        """``∂_B⟨∇ₓh(x, B), q⟩ = ∂_B⟨Bx − y, Bq⟩ = (Bx − y)qᵀ + (Bq)xᵀ`` (the ℓ₁ and α₂ terms do not
        depend on ``B``)."""
        return torch.outer(theta @ x - self.y, q) + torch.outer(theta @ q, x)

    def hypergradient_direct(self, x, theta) -> torch.Tensor:
        """The SPEC's formula with a dense solve on the support (reference for tests):
        ``−[(Bx − y)vᵀ + (Bv)xᵀ]``, ``(BᵀB + α₂I)_SS v_S = (∇ₓg)_S``."""
        S = (x != 0).nonzero().flatten()
        v = torch.zeros_like(x)
        if S.numel():
            BS = theta[:, S]
            H = BS.T @ BS + self.alpha2 * torch.eye(S.numel(), dtype=x.dtype, device=x.device)
            v[S] = torch.linalg.solve(H, self.upper_grad_x(x, theta)[S])
        return -self.mixed_vjp(x, theta, v)

    def upper_lipschitz(self, x, theta) -> float:
        """``L_g = scale·‖A‖²`` (fixed: ``A`` does not depend on ``B``)."""
        return self.L_g

    def error_constants(self, x, theta) -> ErrorConstants:
        """Constants of MAID's bound ``ω`` (SPEC §3) at ``(x̃, B)``.

        * ``μ = α₂`` — ``h`` is α₂-strongly convex (``BᵀB ⪰ 0``); a valid, not sharp, bound.
        * ``L_g = scale·‖A‖²`` (exact, computed once): ``∇²g = scale·AᵀA``.
        * ``‖J‖ ≤ ‖Bx − y‖ + ‖B‖‖x‖`` for ``J E = [Eᵀ(Bx − y) + BᵀE x]_S`` (``E`` in Frobenius norm);
          ``‖B‖`` by the bound ``min(‖B‖_F, √(‖B‖₁‖B‖_∞))``.
        * ``L_J = 2‖B‖``: ``J(x) − J(x′) : E ↦ [EᵀB(x − x′) + BᵀE(x − x′)]_S``.
        * ``L_{H⁻¹} = 0``: ``H = (BᵀB + α₂I)_SS`` does not depend on ``x`` while the support is fixed.
          Where ``x̃`` and ``x̂`` have different supports ``x̂`` is not differentiable in ``B`` and no
          finite constant exists: ``ω`` is only a bound on the region of constant support (the
          SPEC's "the elastic net is smooth there"). Safety of MAID never relies on ω: the
          sufficient-decrease test only needs ``‖x̃ − x̂‖ ≤ ε`` and ``L_g``.
        """
        nB = _spectral_norm_bound(theta)
        r = torch.linalg.vector_norm(theta @ x - self.y).item()
        J = r + nB * torch.linalg.vector_norm(x).item()
        return ErrorConstants(mu=self.alpha2, L_g=self.L_g, J_norm=J, L_J=2 * nB, L_Hinv=0.0)

    def metrics(self, x, theta) -> dict:
        out = {"support": int((x != 0).sum().item())}
        if self.x_true is not None:
            out["recon_err"] = torch.linalg.vector_norm(x - self.x_true).item()
        return out

    # ---------------------------------------------------------------- evaluation
    def accurate_upper(self, theta, x0=None, eps: float = 1e-10, max_iter: int = 200_000):
        """``(f(B), x̂)`` with the lower level solved to ``‖x̃ − x̂‖ ≤ eps`` (for evaluation, not counted)."""
        saved = self.solves, self.uncertified
        x0 = torch.zeros_like(self.y) if x0 is None else x0
        res = self.solve_lower(theta, x0, eps, max_iter)
        self.solves, self.uncertified = saved
        return self.upper_loss(res.x, theta).item(), res


# --------------------------------------------------------------------------------------------
# ADP LISTA: unrolled proximal gradient, differentiated by autograd
# --------------------------------------------------------------------------------------------
def lista_step(problem: ElasticNetBilevel, B: torch.Tensor, x0: torch.Tensor, layers: int, lr: float):
    """One LISTA training step: ``x_L = Φ_B^L(x0)`` with ``Φ_B`` = :func:`prox_grad_step` (step
    ``problem.step``, not clamped to ``1/L``: the unrolled network is fixed), loss ``g(x_L) = ½‖A x_L − y‖²``, ``B ← B − lr ∇_B g(x_L)`` by autograd.

    Returns ``(B_new, x_L (detached), loss)``; the caller feeds ``x_L`` back as the next ``x0``.
    """
    Bv = B.detach().requires_grad_(True)
    M, c, lam = pg_operators(Bv, problem.y, problem.alpha1, problem.alpha2, problem.step)
    x = x0
    for _ in range(layers):
        x = prox_grad_step(x, M, c, lam)
    loss = problem.upper_loss(x, Bv)
    (grad,) = torch.autograd.grad(loss, Bv)
    return (B - lr * grad).detach(), x.detach(), loss.item()


def run_lista(problem: ElasticNetBilevel, B0, x0, steps: int, layers: int, lr: float, callback=None):
    """``steps`` LISTA steps from ``(B0, x0)``, output fed back.  Log per step: ``upper_loss`` (the
    training loss at ``B_k``), cumulative ``lower_iters`` (``layers`` per step) and wall ``time``
    (callback excluded).  ``callback(record, None)`` (MAID's callback signature; LISTA has no
    MAID state) returning ``True`` stops early.
    Returns ``(B, x, log, stop_reason)``; a non-finite loss stops with ``'non_finite'``, keeping the
    last finite ``(B, x)``."""
    B, x, log, elapsed = B0.clone(), x0.clone(), [], 0.0
    for k in range(steps):
        t0 = time.perf_counter()
        B_new, x_new, loss = lista_step(problem, B, x, layers, lr)
        elapsed += time.perf_counter() - t0
        if not (math.isfinite(loss) and torch.isfinite(B_new).all()):
            return B, x, log, "non_finite"
        B, x = B_new, x_new
        rec = dict(iter=k + 1, upper_loss=loss, lower_iters=(k + 1) * layers, time=elapsed)
        rec.update(problem.metrics(x, B))
        log.append(rec)
        if callback is not None and callback(rec, None):
            return B, x, log, "callback"
    return B, x, log, "max_iter"
