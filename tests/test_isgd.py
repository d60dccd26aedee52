"""ISGD (isgd.py): the schedules, the sampling, and convergence on a finite-sum bilevel problem
whose solution is known in closed form."""
import math

import torch
from conftest import rand

from isgd import ISGDConfig, isgd, power_schedule
from maid import BilevelProblem, LowerSolve


class ShiftProblem(BilevelProblem):
    """``x̂_i(θ) = argmin_x ½‖x − θ − a_i‖² = θ + a_i``, ``g = (1/B) Σ_i ½‖x_i − t_i‖²``, so
    ``F(θ) = (1/N) Σ_i ½‖θ + a_i − t_i‖²``, ``∇F(θ) = mean_i(θ + a_i − t_i)`` and
    ``θ* = mean_i(t_i − a_i)``.  The lower solve is exact (1 iteration per sample); ``batches``
    records every subset asked for."""

    def __init__(self, a, t, batches=None):
        self.a, self.t = a, t
        self.n_samples = a.shape[0]
        self.batches = [] if batches is None else batches

    def subset(self, idx):
        self.batches.append(list(idx))
        return ShiftProblem(self.a[idx], self.t[idx], self.batches)

    def solve_lower(self, theta, x0, eps, max_iter):
        return LowerSolve(theta + self.a, self.a.shape[0], 0.0, True)

    def upper_loss(self, x, theta):
        return 0.5 * ((x - self.t) ** 2).sum() / x.shape[0]

    def upper_grad_x(self, x, theta):
        return (x - self.t) / x.shape[0]

    def hessian_vp(self, x, theta, v):
        return v

    def mixed_vjp(self, x, theta, q):
        return -q.sum(0)           # ∂_θ⟨x − θ − a, q⟩


def _shift(n=6, d=3):
    return ShiftProblem(rand(n, d, seed=1), rand(n, d, seed=2))


def test_power_schedule_values():
    """α_k = α₀ (k+1)^−q exactly; q = 0 is constant."""
    s = power_schedule(2.0, 0.75)
    assert [s(k) for k in range(3)] == [2.0, 2.0 * 2 ** -0.75, 2.0 * 3 ** -0.75]
    assert {power_schedule(0.3, 0.0)(k) for k in range(5)} == {0.3}


def test_isgd_logs_the_schedules_it_used():
    P = _shift()
    res = isgd(P, torch.zeros(3), torch.zeros(6, 3), ISGDConfig(step0=0.5, eps0=0.1, p=0.5, q=0.6, batch_size=2,
                                                                max_steps=7))
    for k, r in enumerate(res.log):
        assert math.isclose(r["step"], 0.5 * (k + 1) ** -0.6) and math.isclose(r["eps"], 0.1 * (k + 1) ** -0.5)


def test_full_batch_isgd_is_gradient_descent_on_F():
    """Batch = N: every step is θ ← θ − α ∇F(θ) with the exact ∇F = mean(θ + a − t)."""
    P = _shift()
    res = isgd(P, torch.zeros(3), torch.zeros(6, 3), ISGDConfig(step0=0.3, batch_size=6, max_steps=5))
    theta = torch.zeros(3)
    for _ in range(5):
        theta = theta - 0.3 * (theta + P.a - P.t).mean(0)
    torch.testing.assert_close(res.theta, theta, rtol=1e-12, atol=1e-14)


def test_every_epoch_visits_each_sample_once():
    P = _shift(n=7)
    isgd(P, torch.zeros(3), torch.zeros(7, 3), ISGDConfig(batch_size=3, max_steps=9))
    epochs = [sum(P.batches[3 * e:3 * e + 3], []) for e in range(3)]   # 7 samples = batches of 3, 3, 1
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert epochs[0] != epochs[1]        # reshuffled


def test_decreasing_steps_converge_to_the_minimiser():
    """Batch 1, α_k = (k+1)^−0.75: SGD on a strongly convex quadratic; after 3000 steps the error is
    O(α_k) ≈ 2e-3·spread; tolerance 0.05 (fixed steps 1.0 would jump between sample minimisers,
    error ≈ spread ≈ 1)."""
    P = _shift(n=8)
    star = (P.t - P.a).mean(0)
    res = isgd(P, torch.zeros(3), torch.zeros(8, 3), ISGDConfig(step0=1.0, q=0.75, batch_size=1, max_steps=3000))
    assert torch.linalg.vector_norm(res.theta - star) < 0.05
    fixed = isgd(P, torch.zeros(3), torch.zeros(8, 3), ISGDConfig(step0=1.0, q=0.0, batch_size=1, max_steps=3000))
    assert torch.linalg.vector_norm(fixed.theta - star) > 0.2


def test_budget_stops_and_resume_continues_exactly():
    """Stop at the first step that reaches the budget (here each step costs 2 lower iterations, one
    per sample, and 1 CG iteration, H = I); a run resumed from a state equals one run."""
    P = _shift()
    cfg = ISGDConfig(step0=0.5, q=0.6, batch_size=2, max_steps=100, budget=11)
    res = isgd(P, torch.zeros(3), torch.zeros(6, 3), cfg)
    assert res.stop_reason == "budget" and res.state.computations == 12 and res.state.k == 4
    part = isgd(P, torch.zeros(3), torch.zeros(6, 3), ISGDConfig(step0=0.5, q=0.6, batch_size=2, max_steps=4))
    cont = isgd(P, config=ISGDConfig(step0=0.5, q=0.6, batch_size=2, max_steps=10), state=part.state)
    one = isgd(P, torch.zeros(3), torch.zeros(6, 3), ISGDConfig(step0=0.5, q=0.6, batch_size=2, max_steps=10))
    assert torch.equal(cont.theta, one.theta)
