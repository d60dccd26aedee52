"""elastic_net.py: properties that mutation testing found unchecked (tools/mutation_survivors.md).

References: SPEC §4.1's grid written out, the upper objective by hand and its gradient by
autograd, the float64 problem for the float32 one, and the documented contract of the solver
(certificate, counters, non-finite iterates) and of run_lista's log."""
import math
import time

import pytest
import torch

from conftest import rand
from elastic_net import ElasticNetBilevel, gaussian_operator, grid, pg_operators, run_lista, truth


def _problem(n=12, alpha1=0.02, alpha2=0.05, dtype=torch.float64, **kw):
    t = grid(n, 2.0 / n, dtype)
    A = gaussian_operator(n, dtype)
    y = A @ truth(t) + 0.005 * rand(n, seed=1).to(dtype)
    return ElasticNetBilevel(A, y, alpha1, alpha2, **kw), A, y


def test_grid_defaults_are_spec_4_1():
    """``grid()`` alone: 200 points ``t_i = −1 + h/2 + ih``, h = 0.01: t₀ = −0.995, t₁₉₉ = 0.995."""
    t = grid()
    assert t.shape == (200,) and t.dtype == torch.float64
    assert t[0].item() == pytest.approx(-0.995, abs=1e-15) and t[-1].item() == pytest.approx(0.995, abs=1e-14)
    assert torch.allclose(t.diff(), torch.full((199,), 0.01), atol=1e-15)
    i = torch.arange(200.0)
    ref = torch.exp(-(i[:, None] - i[None, :]) ** 2 / 50) / (5 * math.sqrt(2 * math.pi))
    assert torch.allclose(gaussian_operator(), ref, rtol=1e-14, atol=0)       # A_ij, n = 200
    assert ElasticNetBilevel(ref, t, 0.1, 0.1).step == 0.1                      # the paper's step


def test_scaled_upper_loss_and_its_gradient():
    """``g(x) = scale·½‖Ax − y‖²`` by hand for scale = 2/n (SPEC §1's normalisation), and
    ``upper_grad_x`` is its gradient (autograd, 1e-12)."""
    n = 12
    p, A, y = _problem(n, scale=2.0 / n)
    x = rand(n, seed=3).requires_grad_(True)
    g = p.upper_loss(x, A)
    assert g.item() == pytest.approx(((A @ x - y) ** 2).sum().item() / n, rel=1e-13)
    (ref,) = torch.autograd.grad(g, x)
    assert torch.allclose(p.upper_grad_x(x.detach(), A), ref, rtol=1e-12, atol=1e-14)


def test_float32_problem_stays_float32_and_matches_float64():
    """A float32 problem runs in float32 (M, c of one step, the solution) and its certified
    solution agrees with the float64 one to float32 accuracy (ε = 1e-4 and rounding, 1e-3 here)."""
    p64, A64, _ = _problem()
    p32, A32, y32 = _problem(dtype=torch.float32)
    M, c, _ = pg_operators(A32, y32, 0.02, 0.05, 0.1)
    assert M.dtype == c.dtype == torch.float32
    r32 = p32.solve_lower(A32, torch.zeros_like(y32), 1e-4, 10_000)
    r64 = p64.solve_lower(A64, torch.zeros(12), 1e-8, 100_000)
    assert r32.converged and r32.x.dtype == torch.float32
    assert torch.dist(r32.x.double(), r64.x).item() <= 1e-3
    h32, h64 = p32.hypergradient_direct(r32.x, A32), p64.hypergradient_direct(r64.x, A64)
    assert h32.dtype == torch.float32 and torch.dist(h32.double(), h64).item() <= 1e-2 * h64.norm().item()


def test_exact_fixed_point_is_certified_even_for_zero_tolerance():
    """With α₁ so large that x̂ = 0 (|Bᵀy|_∞ ≤ α₁), the step from x₀ = 0 returns 0 exactly:
    ``‖x⁺ − x‖ = 0`` certifies ``‖x⁺ − x̂‖ ≤ 0``, so even ε = 0 converges after one step."""
    p, A, y = _problem(alpha1=10.0)
    res = p.solve_lower(A, torch.zeros_like(y), 0.0, 50)
    assert res.converged and res.iters == 1 and res.grad_norm == 0.0 and not res.x.any()


def test_zero_iteration_budget_returns_the_start_uncertified():
    """``max_iter = 0``: no step, ``x₀`` returned, no certificate (grad_norm = ∞), counted as a
    solve that hit its cap."""
    p, A, y = _problem()
    x0 = rand(12, seed=4)
    res = p.solve_lower(A, x0, 1e-3, 0)
    assert res.iters == 0 and res.converged is False and math.isinf(res.grad_norm) and torch.equal(res.x, x0)
    assert (p.solves, p.uncertified) == (1, 1)
    assert p.solve_lower(A, x0, 1e-3, 10_000).converged is True
    assert (p.solves, p.uncertified) == (2, 1)                      # a certified solve adds no count


def test_non_finite_iterate_stops_the_solve_and_counts():
    """A start with an Inf entry makes ‖x⁺ − x‖ non-finite: the solve stops after that step and
    reports a non-finite, uncertified result; counters +1 each."""
    p, A, y = _problem()
    x0 = torch.zeros(12)
    x0[3] = math.inf
    res = p.solve_lower(A, x0, 1e-3, 50)
    assert res.iters == 1 and not res.converged and res.status == "non_finite"
    assert (p.solves, p.uncertified) == (1, 1)


def test_overflowing_L_counts_every_solve():
    """Each solve refused for a non-finite ``L`` (B too large for the dtype) is counted."""
    p, A, y = _problem()
    for _ in range(3):
        res = p.solve_lower(1e200 * A, torch.zeros_like(y), 1e-3, 10)
        assert res.status == "non_finite" and res.converged is False
    assert p.solves == 3


def test_run_lista_stops_when_only_B_becomes_non_finite():
    """The loss at ``B_k`` is finite but the step with an infinite learning rate makes ``B_{k+1}``
    non-finite: the run stops at once with 'non_finite' and returns the finite ``B₀``."""
    p, A, y = _problem()
    B, x, log, stop = run_lista(p, A, torch.zeros_like(y), 3, 2, math.inf)
    assert stop == "non_finite" and log == [] and torch.equal(B, A)


def test_run_lista_time_is_cumulative_wall_time_from_zero():
    """``time`` in the log is the wall time spent in the LISTA steps so far: non-decreasing, and
    never more than the wall time of the whole call (it starts at 0)."""
    p, A, y = _problem()
    t0 = time.perf_counter()
    _, _, log, _ = run_lista(p, A, torch.zeros_like(y), 3, 2, 0.05)
    wall = time.perf_counter() - t0
    times = [r["time"] for r in log]
    assert 0 < times[0] <= times[1] <= times[2] <= wall
