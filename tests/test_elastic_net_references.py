"""The elastic net of the 1D experiment (elastic_net.py) against SPEC §4.1 and written-out
references: the data, the objective, the proximal-gradient solver's step, stopping rule and
counters, the restricted Hessian, the warm-started adjoint solve, the evaluation helper, and
the unrolled LISTA baseline against its own recurrence.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import rand
from elastic_net import (ElasticNetBilevel, gaussian_operator, grid, lista_step, make_data, pg_operators,
                         run_lista, truth)


def _small(n=30, alpha1=0.02, alpha2=0.05, step=0.1, **kw):
    t = grid(n, 2.0 / n)
    A = gaussian_operator(n)
    y = A @ truth(t) + 0.005 * rand(n, seed=1)
    return ElasticNetBilevel(A, y, alpha1, alpha2, step, **kw), A, y


# ------------------------------------------------------------------------------------------
# data (SPEC §4.1)
# ------------------------------------------------------------------------------------------
def test_default_data_is_spec_4_1():
    """Defaults: 200 points t_i = −1 + h/2 + ih with h = 0.01 (t₀ = −0.995, t₁₉₉ = 0.995), A_ij =
    exp(−(i − j)²/50)/(5√(2π)), y = A x_true + 0.005·N(0, I) from Generator(0), float64."""
    t, x_true, A, y = make_data()
    assert t.shape == (200,) and t.dtype == torch.float64
    assert math.isclose(t[0].item(), -0.995, abs_tol=1e-15) and math.isclose(t[-1].item(), 0.995, abs_tol=1e-12)
    assert torch.allclose(t[1:] - t[:-1], torch.full((199,), 0.01), atol=1e-15)
    i = torch.arange(200, dtype=torch.float64)
    assert torch.allclose(A, torch.exp(-(i[:, None] - i[None, :]) ** 2 / 50) / (5 * math.sqrt(2 * math.pi)),
                          rtol=1e-15, atol=0)
    noise = torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(y - A @ x_true, 0.005 * noise, atol=1e-15)
    assert torch.equal(x_true, truth(t))


def test_truth_levels_and_right_open_jumps():
    """1[t>−0.6] − 0.7·1[t>−0.5] − 0.3·1[t>0] + 0.7·1[t>0.2] − 0.7·1[t>0.5]: levels 0, 1, 0.3, 0, 0.7,
    0 on the six pieces, and at each breakpoint itself the value of the piece on its left."""
    t = torch.tensor([-0.8, -0.55, -0.2, 0.1, 0.3, 0.7, -0.6, -0.5, 0.0, 0.2, 0.5])
    expect = torch.tensor([0.0, 1.0, 0.3, 0.0, 0.7, 0.0, 0.0, 1.0, 0.3, 0.0, 0.7])
    assert torch.allclose(truth(t), expect, atol=1e-15)


def test_dtype_follows_the_argument():
    t, x_true, A, y = make_data(n=20, dtype=torch.float32)
    assert t.dtype == x_true.dtype == A.dtype == y.dtype == torch.float32
    assert grid(5, dtype=torch.float32).dtype == torch.float32


# ------------------------------------------------------------------------------------------
# the lower level
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(alpha1=0.1, alpha2=0.0), dict(alpha1=-0.1, alpha2=0.1),
                                dict(alpha1=0.1, alpha2=0.1, step=0.0)])
def test_invalid_parameters_refused(kw):
    with pytest.raises(ValueError, match=r"need alpha2 > 0 \(strong convexity\), alpha1 >= 0, step > 0"):
        ElasticNetBilevel(torch.eye(3), torch.ones(3), **kw)


def test_zero_l1_weight_is_ridge():
    """α₁ = 0 is allowed: the lower level is ridge regression, x̂ = (BᵀB + α₂I)⁻¹Bᵀy (1e-9)."""
    p, A, y = _small(alpha1=0.0)
    res = p.solve_lower(A, torch.zeros_like(y), 1e-10, 100000)
    ref = torch.linalg.solve(A.T @ A + 0.05 * torch.eye(len(y)), A.T @ y)
    assert res.converged and torch.allclose(res.x, ref, atol=1e-9)


def test_lower_value_is_the_elastic_net_objective():
    """h(x, B) = ½‖Bx − y‖² + α₁‖x‖₁ + (α₂/2)‖x‖², written out (1e-13)."""
    p, A, y = _small()
    x = rand(len(y), seed=2)
    r = A @ x - y
    ref = 0.5 * (r @ r) + 0.02 * x.abs().sum() + 0.5 * 0.05 * (x @ x)
    assert math.isclose(p.lower_value(x, A).item(), ref.item(), rel_tol=1e-13)


def test_lower_operators_step_and_lipschitz_bound():
    """L = ‖BᵀB‖_∞ + α₂ (max absolute row sum), t = min(step, 1/L); with step = 10 > 1/L the
    solver's step is 1/L, and M = (1 − tα₂)I − tBᵀB, c = tBᵀy, λ = tα₁."""
    p, A, y = _small(step=10.0)
    B = A + 0.01 * rand(*A.shape, seed=3)
    M, c, lam, L, t = p.lower_operators(B)
    BtB = B.T @ B
    assert math.isclose(L, BtB.abs().sum(1).max().item() + 0.05, rel_tol=1e-14)
    assert math.isclose(t, 1 / L, rel_tol=1e-14)
    assert torch.allclose(M, (1 - t * 0.05) * torch.eye(len(y)) - t * BtB, atol=1e-14)
    assert torch.allclose(c, t * B.T @ y, atol=1e-14) and math.isclose(lam, t * 0.02)
    p2, *_ = _small(step=0.1)
    assert p2.lower_operators(B)[4] == 0.1 < 1 / L


def test_solver_stops_at_the_first_certified_iterate_and_counts():
    """The solver is x_{k+1} = S_λ(M x_k + c) (replayed here), reports k = the number of steps and
    grad_norm = (1 + Lt)/t·‖x_k − x_{k−1}‖, and stops at the first k where that is ≤ α₂ε.  The
    problem's counters: solves +1 per solve, uncertified +1 per capped solve."""
    p, A, y = _small()
    eps = 1e-6
    res = p.solve_lower(A, torch.zeros_like(y), eps, 100000)
    M, c, lam, L, t = p.lower_operators(A)
    factor = (1 + L * t) / t
    xs = [torch.zeros_like(y)]
    for _ in range(res.iters):
        xs.append(F.softshrink(M @ xs[-1] + c, lam))
    bounds = [factor * torch.dist(a, b).item() for a, b in zip(xs[:-1], xs[1:])]
    assert res.converged and torch.allclose(res.x, xs[-1], atol=1e-14)
    assert math.isclose(res.grad_norm, bounds[-1], rel_tol=1e-12)
    assert bounds[-1] <= 0.05 * eps and all(bd > 0.05 * eps for bd in bounds[:-1])
    assert (p.solves, p.uncertified) == (1, 0)
    capped = p.solve_lower(A, torch.zeros_like(y), 1e-14, 3)
    assert capped.iters == 3 and not capped.converged and torch.allclose(capped.x, xs[3], atol=1e-14)
    assert (p.solves, p.uncertified) == (2, 1)


def test_solver_gives_nan_and_counts_when_L_overflows():
    p, A, y = _small()
    res = p.solve_lower(1e200 * A, torch.zeros_like(y), 1e-3, 10)
    assert res.status == "non_finite" and res.iters == 0 and torch.isnan(res.x).all()
    assert p.solves == 1


def test_accurate_upper_is_accurate_and_not_counted():
    """accurate_upper's default ε = 1e-10 gives f within 1e-9 of a solve to 1e-13, from x₀ = 0 or a
    given x₀, and leaves the solve counters as they were."""
    p, A, y = _small()
    ref = p.solve_lower(A, torch.zeros_like(y), 1e-13, 200000)
    f_ref = p.upper_loss(ref.x, A).item()
    p.solves, p.uncertified = 5, 2
    f, res = p.accurate_upper(A)
    assert abs(f - f_ref) < 1e-9 and torch.dist(res.x, ref.x) <= 1e-10
    f2, res2 = p.accurate_upper(A, x0=ref.x)
    assert abs(f2 - f_ref) < 1e-9 and res2.iters <= 2
    assert (p.solves, p.uncertified) == (5, 2)


# ------------------------------------------------------------------------------------------
# the adjoint pieces and the constants
# ------------------------------------------------------------------------------------------
def test_restricted_hessian_is_the_support_block():
    """hessian_vp(x, B, ·) as a dense matrix is P_S(BᵀB + α₂I)P_S with S the support of x (1e-13)."""
    p, A, y = _small()
    x = rand(len(y), seed=4)
    x[::3] = 0
    m = (x != 0).double()
    H = torch.stack([p.hessian_vp(x, A, e) for e in torch.eye(len(y))], 1)
    ref = m[:, None] * (A.T @ A + 0.05 * torch.eye(len(y))) * m[None, :]
    assert torch.allclose(H, ref, atol=1e-13)
    assert torch.equal(p.support(x), m)


def test_adjoint_solve_warm_starts_on_the_support():
    """solve_adjoint solves (BᵀB + α₂I)_SS q_S = rhs_S with q = 0 off S; warm-started at its own
    solution (plus junk off S, which is projected away) it needs 0 iterations."""
    p, A, y = _small()
    x = rand(len(y), seed=5)
    x[1::4] = 0
    m = (x != 0).double()
    rhs = rand(len(y), seed=6)
    q, it, ok = p.solve_adjoint(x, A, rhs, None, 1e-11, 1000)
    S = m.bool()
    ref = torch.zeros_like(rhs)
    ref[S] = torch.linalg.solve((A.T @ A + 0.05 * torch.eye(len(y)))[S][:, S], rhs[S])
    assert ok and it > 0 and torch.allclose(q, ref, atol=1e-9)
    junk = q + (1 - m) * 7.0
    q2, it2, ok2 = p.solve_adjoint(x, A, rhs, junk, 1e-9, 1000)
    assert ok2 and it2 == 0 and torch.equal(q2[~S], torch.zeros_like(q2[~S]))


def test_error_constants_mu_and_inverse_hessian_lipschitz():
    """μ = α₂ (h is α₂-strongly convex) and L_{H⁻¹} = 0 (the support Hessian does not depend on x)."""
    p, A, y = _small()
    c = p.error_constants(rand(len(y), seed=7), A)
    assert c.mu == 0.05 and c.L_Hinv == 0.0


def test_metrics_support_and_reconstruction_error():
    p, A, y = _small(x_true=torch.ones(30))
    x = torch.zeros(30)
    x[:4] = 2.0
    assert p.metrics(x, A) == {"support": 4, "recon_err": pytest.approx(math.sqrt(4 + 26))}
    assert "recon_err" not in _small()[0].metrics(x, A)


# ------------------------------------------------------------------------------------------
# LISTA against its recurrence
# ------------------------------------------------------------------------------------------
def test_run_lista_is_repeated_lista_steps_with_fed_back_output():
    """run_lista(steps=3, layers=2) equals three lista_step calls with the output fed back; its log
    has iter 1…3, the step's training loss, lower_iters = 2k and non-decreasing times."""
    p, A, y = _small()
    B, x = A.clone(), torch.zeros_like(y)
    losses = []
    for _ in range(3):
        B, x, loss = lista_step(p, B, x, 2, 0.05)
        losses.append(loss)
    B_run, x_run, log, stop = run_lista(p, A, torch.zeros_like(y), 3, 2, 0.05)
    assert stop == "max_iter" and torch.allclose(B_run, B, atol=1e-14) and torch.allclose(x_run, x, atol=1e-14)
    assert [r["iter"] for r in log] == [1, 2, 3] and [r["lower_iters"] for r in log] == [2, 4, 6]
    assert [r["upper_loss"] for r in log] == pytest.approx(losses, rel=1e-12)
    assert all(b["time"] >= a["time"] >= 0 for a, b in zip(log[:-1], log[1:]))
    assert log[-1]["support"] == int((x != 0).sum())


def test_lista_step_is_sgd_on_the_unrolled_loss():
    """lista_step: x_L = Φ^L(x₀) with Φ(x) = S_λ(Mx + c) for step ``problem.step`` (no 1/L clamp),
    loss ½‖A x_L − y‖², B ← B − lr·∇_B loss (autograd through the written recurrence here)."""
    p, A, y = _small()
    B0 = A + 0.01 * rand(*A.shape, seed=8)
    x0 = 0.1 * rand(len(y), seed=9)
    Bv = B0.clone().requires_grad_(True)
    M, c, lam = pg_operators(Bv, y, 0.02, 0.05, 0.1)
    x = x0
    for _ in range(3):
        x = F.softshrink(M @ x + c, lam)
    loss = 0.5 * ((A @ x - y) ** 2).sum()
    (g,) = torch.autograd.grad(loss, Bv)
    B1, x1, l1 = lista_step(p, B0, x0, 3, 0.2)
    assert math.isclose(l1, loss.item(), rel_tol=1e-12)
    assert torch.allclose(B1, B0 - 0.2 * g, atol=1e-13) and torch.allclose(x1, x.detach(), atol=1e-14)


def test_run_lista_stops_on_callback_and_on_non_finite():
    """A callback returning True stops after that step ('callback'); a learning rate that blows B
    up stops with 'non_finite' and returns the last finite (B, x)."""
    p, A, y = _small()
    _, _, log, stop = run_lista(p, A, torch.zeros_like(y), 5, 2, 0.05, callback=lambda rec, st: rec["iter"] == 2)
    assert stop == "callback" and len(log) == 2
    B, x, log, stop = run_lista(p, A, torch.zeros_like(y), 50, 5, 1e200)
    assert stop == "non_finite" and torch.isfinite(B).all() and torch.isfinite(x).all()
    assert len(log) < 50


def test_operator_norm_bound_in_the_constants():
    """‖B‖ in L_J = 2‖B‖ and ‖J‖ is the documented cheap bound min(‖B‖_F, √(‖B‖₁‖B‖_∞)) — checked
    on a non-symmetric B whose column and row sums differ (so ‖B‖₁ ≠ ‖B‖_∞) and where the second
    term is the smaller; it is ≥ the spectral norm."""
    p, A, y = _small()
    B = torch.eye(30) + torch.diag(torch.full((29,), 0.5), 1)
    B[0, :] += 0.3
    one, inf = B.abs().sum(0).max().item(), B.abs().sum(1).max().item()
    assert one != inf and math.sqrt(one * inf) < torch.linalg.matrix_norm(B).item()
    c = p.error_constants(torch.ones(30), B)
    assert math.isclose(c.L_J, 2 * math.sqrt(one * inf), rel_tol=1e-14)
    assert c.L_J >= 2 * torch.linalg.matrix_norm(B, ord=2).item()
