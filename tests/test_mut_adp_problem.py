"""The a-posteriori hypergradient error bound of :class:`adp_problem.ADPBetaProblem` (issue 15's local
ω, module docstring items 1–7) checked term by term against dense references (issue 16: mutation testing).

Every reference is built here from explicit matrices on a tiny float64 problem (2 channels, 5×6
pixels, 3×3 kernels: n = 60 unknowns): ``B_b`` and ``C_u: δ ↦ B_δ u`` column by column, ``Q =
B_bᵀB_b + μ₀I`` and ``Q^{-1/2}`` by an eigendecomposition, Q⁻¹-norms by dense solves, Hessians of
``h`` by autograd of its value, ``J̃`` from the defining formula ``J̃δ = B_δᵀr_y + B_bᵀB_δx̃``.  The
bound's per-pixel TV part (items 3–4) is recomputed pixel by pixel in Python floats, with the root
of ``αγ²s²/(w + s)³ = κ²`` from ``scipy.optimize.brentq``.  Tolerance 1e-9 relative: the references
differ from the FFT implementation only by rounding (measured ≤ 1e-13).
"""
import math

import pytest
import torch
from conftest import rand
from scipy.optimize import brentq

from adp_problem import ADPBetaProblem, _pixel_difference_bound, _without_mean
from operators import Blur, gaussian_kernel, motion_kernel
from regularisers import AnisotropicTV, SmoothedTV

C, H, W, K = 2, 5, 6, 3
N = C * H * W
REL = 1e-9


def _problem(op="learned", R=None, mu0=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_true = 0.2 * torch.rand(C, H, W, generator=g, dtype=torch.float64)
    x_true[..., W // 2:] += 1.0                          # a vertical edge: pixels with large |∇x|
    a = gaussian_kernel(K, 0.8, channels=C, dtype=torch.float64)
    y = Blur(a, (H, W)).A(x_true) + 0.02 * torch.randn(C, H, W, generator=g, dtype=torch.float64)
    b0 = motion_kernel(K, channels=C, dtype=torch.float64)
    R = SmoothedTV(0.05, 0.05) if R is None else R
    p = ADPBetaProblem(y, b0, R, 0.1, mu0=mu0, upper_operator=op, known_kernel=a if op == "known" else None)
    b = b0 + 0.02 * torch.randn(b0.shape, generator=g, dtype=torch.float64)
    return p, b, y


def _dense(op):
    """The matrix of a linear map on (C, H, W) tensors."""
    eye = torch.eye(N, dtype=torch.float64)
    return torch.stack([op(eye[i].reshape(C, H, W)).reshape(-1) for i in range(N)], 1)


def _conv_columns(u, pre=lambda v: v):
    """The dense ``pre ∘ C_u`` (N × C·K²): column j is ``pre(B_δ u)`` for the j-th unit kernel δ."""
    cols = []
    for j in range(C * K * K):
        d = torch.zeros(C, 1, K, K, dtype=torch.float64)
        d.view(-1)[j] = 1.0
        cols.append(pre(Blur(d, (H, W)).A(u)).reshape(-1))
    return torch.stack(cols, 1)


def _mean_projector():
    """``P⊥``: removes each channel's mean."""
    blocks = torch.eye(H * W, dtype=torch.float64) - 1.0 / (H * W)
    return torch.block_diag(*[blocks] * C)


def _norm2(M):
    return torch.linalg.matrix_norm(M, ord=2).item()


class _Dense:
    """Dense objects of the bound at ``(x̃, b, q̃)``."""

    def __init__(self, p, b, x, q):
        h = p.lower(b)
        self.B = _dense(h.blur.A)
        self.A = self.B if p.learned else _dense(p.A.A)
        self.Q = self.B.T @ self.B + p.mu0 * torch.eye(N, dtype=torch.float64)
        ev, V = torch.linalg.eigh(self.Q)
        self.mu = ev.min().item()
        self.Q_isqrt = V @ torch.diag(ev.rsqrt()) @ V.T
        self.H = torch.autograd.functional.hessian(lambda v: h.value(v.reshape(C, H, W)), x.reshape(-1))
        xv, yv, qv = x.reshape(-1), p.y.reshape(-1), q.reshape(-1)
        grad_h = self.B.T @ (self.B @ xv - yv) + p.mu0 * xv + p.regulariser.grad(x).reshape(-1)
        self.kappa = self.qnorm(grad_h)
        self.r = (2 / p.n) * self.A.T @ (self.A @ xv - yv) - self.H @ qv        # CG residual
        r_y = (self.B @ xv - yv).reshape(C, H, W)
        Bt = lambda v: (self.B.T @ v.reshape(-1)).reshape(C, H, W)            # noqa: E731
        self.W_ry = _norm2(self.Q_isqrt @ _conv_columns(r_y))
        self.W_Bx = _norm2(self.Q_isqrt @ _conv_columns(x, Bt))
        self.W_Bq = _norm2(self.Q_isqrt @ _conv_columns(q, Bt))
        P = _mean_projector()
        self.K_perp = _norm2(P @ self.Q_isqrt @ _conv_columns(r_y)) + _norm2(P @ self.Q_isqrt @ _conv_columns(x, Bt))
        self.J = self._jacobian(x, r_y, Bt)
        r_mean = (self.r.reshape(C, H * W).mean(1, keepdim=True).expand(C, H * W)).reshape(-1)
        self.r_mean, self.r_perp = r_mean, self.r - r_mean
        self.mean_part = torch.linalg.vector_norm(self.J.T @ torch.linalg.solve(self.H, r_mean)).item()
        AtA = self.Q_isqrt @ self.A.T @ self.A @ self.Q_isqrt
        self.m_A = torch.linalg.eigvalsh(AtA).max().item()

    def qnorm(self, v):
        return math.sqrt((v @ torch.linalg.solve(self.Q, v)).item())

    @staticmethod
    def _jacobian(x, r_y, Bt):
        """``J̃`` (N × C·K²) column by column from ``J̃δ = B_δᵀr_y + B_bᵀB_δx̃``."""
        cols = []
        for j in range(C * K * K):
            d = torch.zeros(C, 1, K, K, dtype=torch.float64)
            d.view(-1)[j] = 1.0
            Bd = Blur(d, (H, W))
            cols.append((Bd.A_adjoint(r_y) + Bt(Bd.A(x))).reshape(-1))
        return torch.stack(cols, 1)


def _grad_field(u):
    """Forward differences with Neumann boundary, by hand: ``(d_h, d_v)``, 0 on the last column/row."""
    dh, dv = torch.zeros_like(u), torch.zeros_like(u)
    dh[..., :, :-1] = u[..., :, 1:] - u[..., :, :-1]
    dv[..., :-1, :] = u[..., 1:, :] - u[..., :-1, :]
    return dh, dv


def _pixel_root(w, alpha, gamma, kappa, S):
    """Reference ``s_p`` (item 3): ``S`` when ``φ(S) ≤ κ²``, else the root of ``φ(s) = κ²`` on
    ``[0, min(S, 2w)]`` (``φ`` increases there), by Brent's method to 1e-15 relative."""
    phi = lambda t: alpha * gamma * gamma * t * t / (w + t) ** 3          # noqa: E731
    if kappa == 0:
        return 0.0
    if phi(S) <= kappa * kappa:
        return S
    return brentq(lambda t: phi(t) - kappa * kappa, 0.0, min(S, 2 * w), xtol=1e-300, rtol=1e-15)


def _tv_hessian_change_reference(x, q, alpha, gamma, kappa, E, mu):
    """``(V₃, c₄)`` of items 3–4 for SmoothedTV, pixel by pixel in Python floats (module docstring)."""
    dh, dv = _grad_field(x)
    qh, qv = _grad_field(q)
    rows = []
    for idx in range(x.numel()):
        w = math.sqrt(dh.view(-1)[idx].item() ** 2 + dv.view(-1)[idx].item() ** 2 + gamma**2)
        s = _pixel_root(w, alpha, gamma, kappa, 2 * E)
        a = (2 / math.sqrt(3)) / max(gamma, w - s) ** 2
        f = alpha * a * math.hypot(qh.view(-1)[idx].item(), qv.view(-1)[idx].item())
        m = 0.5 * (alpha * gamma**2 / (w + s) ** 3 / kappa**2 + 1 / (8 * E * E))
        m_u = 0.5 * (alpha * gamma**2 / w**3 + mu / 8)
        rows.append((w, s, a, f, m, m_u))
    per_pixel = min(math.sqrt(sum((f * s) ** 2 for _, s, _, f, _, _ in rows)),
                    max(f / math.sqrt(m) for *_, f, m, _ in rows))
    operator = 8 * alpha * max(a * s for _, s, a, *_ in rows) / mu
    energy = math.sqrt(8) * max(alpha * a * s / math.sqrt(m_u) for _, s, a, _, _, m_u in rows) / math.sqrt(mu)
    regimes = {s == 2 * E for _, s, *_ in rows} | ({"operator"} if operator < energy else set())
    return math.sqrt(8) * per_pixel / math.sqrt(mu), min(operator, energy), regimes


def _point(p, b, y, seed=3):
    """An arbitrary ``(x̃, q̃)`` (the bound is a-posteriori and holds for any pair): x̃ a loose lower solve
    plus noise (then flat pixels have ``s_p`` at the root and the edge pixels ``s_p = 2E``)."""
    x = p.solve_lower(b, y, 1e-2, 100000).x + 1e-4 * rand(C, H, W, seed=seed)
    return x, 0.1 * rand(C, H, W, seed=seed + 1)


@pytest.mark.parametrize("op,mu0,alpha,gamma", [("learned", 1e-3, 0.05, 0.05), ("known", 1e-3, 0.05, 0.05),
                                                ("learned", 1.0, 0.05, 0.5)],
                         ids=["learned", "known", "large_mu0_gamma"])
def test_every_term_of_the_local_bound_against_dense_references(op, mu0, alpha, gamma):
    """Items 1–7 with SmoothedTV: ``κ = ‖∇h(x̃)‖_{Q⁻¹}``, ``E = κ/√μ`` (μ = λ_min of the dense Q),
    ``‖r‖_{Q⁻¹}`` of the CG residual ``r = ∇ₓg(x̃) − H̃q̃`` (H̃ by autograd), ``‖v₁‖`` bound
    ``(2/n) λ_max(Q^{-1/2}A_upᵀA_upQ^{-1/2}) κ`` (with the known kernel's A for ``op='known'``),
    ``(V₃, c₄)`` from the pixel-by-pixel reference, and adjoint / mixed / direct / ω assembled from
    dense ``‖Q^{-1/2}C_u‖``, ``‖Q^{-1/2}B_bᵀC_u‖``, ``‖P⊥Q^{-1/2}·‖`` and the exact mean part
    ``‖J̃ᵀH̃⁻¹r̄‖`` (dense solve with H̃).  In the first two cases both regimes of ``s_p`` (root and
    ``2E``) occur and ``c₄`` is the energy form; with μ₀ = 1, γ = 0.5 it is the operator form ``‖Ĥ − H̃‖/μ``."""
    p, b, y = _problem(op, SmoothedTV(alpha, gamma), mu0)
    x, q = _point(p, b, y)
    t = p.hypergradient_error_terms(x, b, q)
    d = _Dense(p, b, x, q)
    h = p.lower(b)
    assert h.mu == pytest.approx(d.mu, rel=REL)
    assert t["kappa"] == pytest.approx(d.kappa, rel=REL)
    assert t["E"] == pytest.approx(d.kappa / math.sqrt(d.mu), rel=REL)
    assert t["cg_residual"] == pytest.approx(d.qnorm(d.r), rel=REL)
    assert t["upper_change"] == pytest.approx((2 / p.n) * d.m_A * d.kappa, rel=REL)
    V3, c4, regimes = _tv_hessian_change_reference(x, q, alpha, gamma, d.kappa, t["E"], d.mu)
    assert regimes == ({True, "operator"} if mu0 == 1.0 else {True, False})
    assert t["hessian_change"] == pytest.approx(V3, rel=REL)
    V4 = c4 * (t["cg_residual"] + t["upper_change"])
    assert t["hessian_change_2"] == pytest.approx(V4, rel=REL)
    V1, Rr = t["upper_change"], t["cg_residual"]
    adjoint = (d.W_ry + d.W_Bx) * V1 + d.mean_part + d.K_perp * (d.qnorm(d.r_perp) + V3 + V4)
    assert t["adjoint"] == pytest.approx(adjoint, rel=REL)
    Bn = h.blur.norm()
    assert Bn == pytest.approx(_norm2(d.B), rel=REL)
    dq = (V1 + Rr + V3 + V4) / math.sqrt(d.mu)
    mixed = 2 * d.W_Bq * d.kappa + 2 * K * Bn * t["E"] * dq
    assert t["mixed"] == pytest.approx(mixed, rel=REL)
    direct = (2 / p.n) * ((d.W_ry + d.W_Bx) * d.kappa + K * Bn * t["E"] ** 2) if op == "learned" else 0.0
    assert t["direct"] == pytest.approx(direct, rel=REL, abs=0.0)
    assert t["omega"] == pytest.approx(adjoint + mixed + direct, rel=REL)
    assert p.hypergradient_error_bound(x, b, q) == t["omega"]


def test_generic_regulariser_uses_the_global_hessian_lipschitz_constant():
    """Any R other than SmoothedTV with float parameters (here AnisotropicTV): ``V₃ = L_H E‖q̃‖/√μ``,
    ``c₄ = L_H E/μ`` and no mean splitting: adjoint ``= (W(r_y) + W_B(x̃))(‖v₁‖ + ‖r‖ + V₃ + V₄)``."""
    R = AnisotropicTV(0.05, 0.05)
    p, b, y = _problem("learned", R)
    x, q = _point(p, b, y)
    t = p.hypergradient_error_terms(x, b, q)
    d = _Dense(p, b, x, q)
    L_H, E = R.hessian_lipschitz(), d.kappa / math.sqrt(d.mu)
    V3 = L_H * E * torch.linalg.vector_norm(q).item() / math.sqrt(d.mu)
    V4 = L_H * E / d.mu * (t["cg_residual"] + t["upper_change"])
    assert t["hessian_change"] == pytest.approx(V3, rel=REL)
    assert t["hessian_change_2"] == pytest.approx(V4, rel=REL)
    inner = t["upper_change"] + d.qnorm(d.r) + V3 + V4
    assert t["adjoint"] == pytest.approx((d.W_ry + d.W_Bx) * inner, rel=REL)


def test_smoothed_tv_with_learnable_parameters_takes_the_generic_hessian_change():
    """SmoothedTV whose weight/smoothing are tensors (learnable) uses ``L_H`` (the per-pixel formula is
    for float parameters) but still splits the channel means (its Hessian annihilates constants)."""
    R = SmoothedTV(torch.full((C,), 0.05, dtype=torch.float64), torch.full((C,), 0.05, dtype=torch.float64))
    p, b, y = _problem("learned", R)
    x, q = _point(p, b, y)
    t = p.hypergradient_error_terms(x, b, q)
    d = _Dense(p, b, x, q)
    E = d.kappa / math.sqrt(d.mu)
    assert t["hessian_change"] == pytest.approx(R.hessian_lipschitz() * E * torch.linalg.vector_norm(q).item()
                                                / math.sqrt(d.mu), rel=REL)
    adjoint = ((d.W_ry + d.W_Bx) * t["upper_change"] + d.mean_part
               + d.K_perp * (d.qnorm(d.r_perp) + t["hessian_change"] + t["hessian_change_2"]))
    assert t["adjoint"] == pytest.approx(adjoint, rel=REL)


def test_bound_and_its_terms_hold_against_a_tightly_solved_reference():
    """At ``x̂`` (lower solve to 1e-12) and ``q̂ = Ĥ⁻¹∇ₓg(x̂)`` (dense solve): ``‖x̃ − x̂‖_Q ≤ κ``,
    ``‖x̃ − x̂‖ ≤ E``, ``‖(Ĥ − H̃)q̃‖ ≤ √μ V₃``, ``‖(Ĥ − H̃)u‖_{Q⁻¹} ≤ V₄`` (``u = H̃⁻¹(r − v₁)``) and
    ``ω ≥ ‖z − ∇f(b)‖`` with ``∇f = ∂_b g(x̂) − Ĵᵀq̂`` (dense Ĵ) and MAID's ``z``.  And the bound is
    not vacuous there: at ``(x̂, q̂)`` itself ω < 1e-6 (κ and the residual vanish up to the solve)."""
    p, b, y = _problem("learned")
    h = p.lower(b)
    x_hat = p.solve_lower(b, y, 1e-12, 200000).x
    dh_ = _Dense(p, b, x_hat, torch.zeros_like(y))
    g_hat = (2 / p.n) * dh_.B.T @ (dh_.B @ x_hat.reshape(-1) - y.reshape(-1))
    q_hat = torch.linalg.solve(dh_.H, g_hat).reshape(C, H, W)
    grad_f = p.upper_grad_theta(x_hat, b) - (dh_.J.T @ q_hat.reshape(-1)).reshape(b.shape)
    assert p.hypergradient_error_bound(x_hat, b, q_hat) < 1e-6
    for s in (1e-3, 1e-2):
        x = x_hat + s * rand(C, H, W, seed=7)
        q = q_hat + s * rand(C, H, W, seed=8)
        t = p.hypergradient_error_terms(x, b, q)
        d = _Dense(p, b, x, q)
        e = (x - x_hat).reshape(-1)
        assert math.sqrt((e @ d.Q @ e).item()) <= t["kappa"]
        assert torch.linalg.vector_norm(e).item() <= t["E"]
        dH = dh_.H - d.H
        assert torch.linalg.vector_norm(dH @ q.reshape(-1)).item() <= math.sqrt(d.mu) * t["hessian_change"]
        v1 = (2 / p.n) * d.A.T @ d.A @ e
        u = torch.linalg.solve(d.H, d.r - v1)
        assert d.qnorm(dH @ u) <= t["hessian_change_2"]
        z = p.upper_grad_theta(x, b) - p.mixed_vjp(x, b, q)
        assert torch.linalg.vector_norm(z - grad_f).item() <= t["omega"]
    assert h is p.lower(b)


def test_bound_grows_with_the_cg_residual():
    """For ``q̃ = q* + t d`` (``q* = H̃⁻¹∇ₓg(x̃)``) the CG residual is ``−tH̃d``: ``‖r‖_{Q⁻¹}`` is linear
    in t and ω is non-decreasing in t (every term is a non-negative combination of ‖r‖-norms and
    t-independent constants, except the mixed term's ``W_B(q̃)``, which grows too for large t)."""
    p, b, y = _problem("learned")
    x = y + 0.01 * rand(C, H, W, seed=3)
    d = _Dense(p, b, x, torch.zeros_like(y))
    g = (2 / p.n) * d.B.T @ (d.B @ x.reshape(-1) - y.reshape(-1))
    q_star = torch.linalg.solve(d.H, g).reshape(C, H, W)
    dirn = rand(C, H, W, seed=9)
    ts = [0.0, 1e-3, 1e-2, 1e-1, 1.0]
    terms = [p.hypergradient_error_terms(x, b, q_star + t * dirn) for t in ts]
    res = [tt["cg_residual"] for tt in terms]
    assert res[0] < 1e-12
    for t, r in zip(ts[1:], res[1:]):
        assert r == pytest.approx(t * res[-1], rel=1e-9)
    omegas = [tt["omega"] for tt in terms]
    assert all(o1 < o2 for o1, o2 in zip(omegas, omegas[1:]))


def test_zero_hessian_change_and_known_operator_zero_direct_term():
    """Exact zero cases: ``_hessian_change`` with κ = E = 0 (x̃ = x̂ exactly) gives ``(0, 0)``; the
    known operator's ``∂_b g`` does not depend on x, so its direct term is exactly 0; μ = 0 (a kernel
    with a spectral zero, μ₀ = 0) gives ω = inf."""
    p, b, y = _problem("learned")
    x, q = _point(p, b, y)
    assert p._hessian_change(x, q, 0.0, 0.0, p.lower(b).mu) == (0.0, 0.0)
    pk, bk, yk = _problem("known")
    xk, qk = _point(pk, bk, yk)
    assert pk.hypergradient_error_terms(xk, bk, qk)["direct"] == 0.0
    zero = torch.zeros(C, 1, K, K, dtype=torch.float64)
    zero[:, 0, 1, 0] = zero[:, 0, 1, 1] = 0.5           # b̂ = 0 at the Nyquist column (W even)
    p0 = ADPBetaProblem(y, zero, SmoothedTV(0.05, 0.05), 0.1, mu0=0.0)
    assert p0.lower(zero).mu == 0.0
    assert p0.hypergradient_error_bound(x, zero, q) == math.inf


def test_pixel_difference_bound_is_the_root_to_machine_precision():
    """``_pixel_difference_bound``: ``s_p = S`` exactly where ``φ_p(S) ≤ κ²``; elsewhere ``s_p`` is the
    upper end of the bisection bracket, so ``φ_p(s_p) > κ²`` (the inequality it bounds) and
    ``|s_p − s₁| ≤ 2⁻⁵⁸·min(S, 2w_p) + 10⁻¹⁴ s₁`` (60 halvings of the bracket ``[0, min(S, 2w_p)]``;
    rounding of φ near the root and brentq's accuracy) against the brentq root ``s₁``, also when
    ``S ≫ 2w_p`` (the bracket's upper end is then ``2w_p``, where ``φ_p`` peaks: with γ = 1e-3, S = 1e3 a bracket [0, min(S, 2/w_p)]
    would leave an error of 1e-9 relative); κ = 0 gives 0."""
    regimes = set()
    for alpha, gamma, kappa, Ss in ((0.05, 0.05, 2e-3, (0.08, 3.0)), (0.05, 1e-3, 2e-6, (1.6e-3, 1e3))):
        w = gamma * torch.tensor([1.0, 1.02, 1.2, 2.0, 6.0, 20.0, 100.0], dtype=torch.float64)
        for S in Ss:
            s = _pixel_difference_bound(w, alpha, gamma, kappa, S)
            phi = alpha * gamma**2 * s**2 / (w + s) ** 3
            for i, wi in enumerate(w.tolist()):
                ref = _pixel_root(wi, alpha, gamma, kappa, S)
                if ref == S:
                    assert s[i].item() == S
                else:
                    assert phi[i].item() >= kappa**2 * (1 - 1e-13)      # rounding of φ
                    assert -1e-14 * ref <= s[i].item() - ref <= 2.0**-58 * min(S, 2 * wi) + 1e-14 * ref
            regimes |= set((s == S).tolist())
        assert (_pixel_difference_bound(w, alpha, gamma, 0.0, 1.0) == 0).all()
    assert regimes == {True, False}                        # both regimes occur


def test_without_mean_zeroes_only_the_zero_frequency_and_copies():
    """``_without_mean(weight)``: the (0, 0) entry of each channel is 0, every other entry unchanged, and
    the input is not modified (it is ``1/Q``, reused by the caller)."""
    wt = torch.rand(C, H, W // 2 + 1, dtype=torch.float64) + 1
    before = wt.clone()
    out = _without_mean(wt)
    assert torch.equal(wt, before)
    assert (out[:, 0, 0] == 0).all()
    mask = torch.ones_like(wt, dtype=torch.bool)
    mask[:, 0, 0] = False
    assert torch.equal(out[mask], wt[mask])
