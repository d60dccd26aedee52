"""isgd.py: what tests/test_isgd.py leaves open (issue 16: mutation testing) — the accuracies and caps
each step asks of the problem (ε_k √|S_k| for the lower level, (δ₀/ε₀) ε_k / √|S_k| for the adjoint),
the warm starts, the cap and non-finite counters, the projection, every field of the step record, the
stop reasons, and the validation of the settings.  References: the schedules by their formula
(SPEC §6, isgd.py's docstring), and the exact shift problem of tests/test_isgd.py, whose hypergradient
is ``mean_{i∈S}(θ + a_i − t_i)`` in closed form."""
import math
import time

import pytest
import torch
from conftest import rand
from test_isgd import ShiftProblem

from isgd import ISGDConfig, ISGDState, isgd
from maid import LowerSolve


class Recording(ShiftProblem):
    """The shift problem, logging every call's accuracy, cap and warm start.  ``lower_status`` and
    ``cg_ok`` (functions of the call number) make a solve report a cap hit or a non-finite value."""

    def __init__(self, a, t, log=None, lower_status=None, cg_ok=None, project=None):
        super().__init__(a, t)
        self.log = {"lower": [], "adjoint": []} if log is None else log
        self.lower_status, self.cg_ok = lower_status, cg_ok
        if project is not None:
            self.project = project

    def subset(self, idx):
        sub = Recording(self.a[idx], self.t[idx], self.log, self.lower_status, self.cg_ok)
        sub.idx = list(idx)
        return sub

    def solve_lower(self, theta, x0, eps, max_iter):
        n = len(self.log["lower"])
        self.log["lower"].append(dict(idx=self.idx, eps=eps, max_iter=max_iter, x0=x0.clone(), theta=theta.clone()))
        status = self.lower_status(n) if self.lower_status else "converged"
        x = theta + self.a
        if status == "non_finite":
            return LowerSolve(torch.full_like(x, math.nan), 5, math.nan, False)
        return LowerSolve(x, 3 * x.shape[0], 0.0 if status == "converged" else 1.0, status == "converged")

    def solve_adjoint(self, x, theta, rhs, q0, delta, max_iter):
        n = len(self.log["adjoint"])
        self.log["adjoint"].append(dict(idx=self.idx, delta=delta, max_iter=max_iter, q0=q0.clone()))
        ok = self.cg_ok(n) if self.cg_ok else True
        return rhs.clone(), 2, ok                       # H = I: q = rhs exactly


def _rec(n=7, d=3, **kw):
    return Recording(rand(n, d, seed=1), rand(n, d, seed=2), **kw)


def _cfg(**kw):
    base = dict(step0=0.5, eps0=0.1, p=0.5, q=0.6, batch_size=3, max_steps=5)
    base.update(kw)
    return ISGDConfig(**base)


def test_accuracies_and_caps_asked_of_the_problem_follow_the_schedules():
    """Step k on a batch of size b (7 samples, batches 3, 3, 1, 3, 3): the lower level is asked for
    ε_k √b with ε_k = ε₀ (k+1)^−p and the cap ``lower_max_iter``; the adjoint for the residual
    (δ₀/ε₀) ε_k / √b with the cap ``cg_max_iter`` (SPEC §6: per-sample accuracies ε_k and δ_k = (δ₀/ε₀)ε_k
    on the stacked system); with ``delta0=None`` the ratio is 1.  Checked to 1e-15 relative against
    the formulas."""
    for delta0, ratio in ((1e-4, 1e-4 / 0.1), (None, 1.0)):
        P = _rec()
        isgd(P, torch.zeros(3), torch.zeros(7, 3), _cfg(delta0=delta0, lower_max_iter=17, cg_max_iter=23))
        sizes = [len(c["idx"]) for c in P.log["lower"]]
        assert sizes == [3, 3, 1, 3, 3]
        for k, (lo, ad) in enumerate(zip(P.log["lower"], P.log["adjoint"])):
            eps_k = 0.1 * (k + 1) ** -0.5
            b = sizes[k]
            assert lo["eps"] == pytest.approx(eps_k * math.sqrt(b), rel=1e-15) and lo["max_iter"] == 17
            assert ad["delta"] == pytest.approx(ratio * eps_k / math.sqrt(b), rel=1e-15) and ad["max_iter"] == 23
            assert ad["idx"] == lo["idx"]


def test_warm_starts_are_each_samples_last_iterate_and_adjoint():
    """Every lower solve starts from the x̃_i that the last solve of sample i returned (x0_i before
    the first visit), and every adjoint solve from its last q̃_i (0 before the first visit), per sample
    across epochs; the state keeps them after the run."""
    P = _rec()
    x0 = rand(7, 3, seed=5)
    res = isgd(P, torch.zeros(3), x0, _cfg(max_steps=6))
    x_last, q_last = x0.clone(), torch.zeros(7, 3)
    theta = torch.zeros(3)                       # the recursion θ ← θ − α_k mean_S(θ + a − t), by hand
    for k, (lo, ad) in enumerate(zip(P.log["lower"], P.log["adjoint"])):
        idx = lo["idx"]
        torch.testing.assert_close(lo["x0"], x_last[idx], rtol=0, atol=0)
        torch.testing.assert_close(ad["q0"], q_last[idx], rtol=0, atol=0)
        torch.testing.assert_close(lo["theta"], theta, rtol=0, atol=1e-14)   # rounding of the mean
        x_last[idx] = lo["theta"] + P.a[idx]                                  # what the solve returned
        q_last[idx] = (x_last[idx] - P.t[idx]) / len(idx)               # ∇ₓg of the batch (H = I)
        theta = lo["theta"] - 0.5 * (k + 1) ** -0.6 * (x_last[idx] - P.t[idx]).mean(0)
    torch.testing.assert_close(res.state.x, x_last, rtol=0, atol=0)
    torch.testing.assert_close(res.state.q, q_last, rtol=0, atol=0)
    torch.testing.assert_close(res.theta, theta, rtol=0, atol=1e-14)


def test_every_field_of_the_step_record():
    """The record of step k: ``iter`` = k+1, ``epoch`` (1 for the first ⌈7/3⌉ = 3 steps, then 2),
    ``batch_loss`` = g of the batch at the solve (before the step), ``step`` = α_k, ``eps`` = ε_k,
    ``grad_norm`` = ‖z_k‖ with z_k = mean_{i∈S}(θ_k + a_i − t_i), the cumulative lower (3 per sample
    here) and CG (2 per step) iteration counts, their sum, the cap-hit counters, and a time that
    never decreases.  References: the closed forms of the shift problem."""
    P = _rec()
    res = isgd(P, torch.zeros(3), torch.zeros(7, 3), _cfg(max_steps=5))
    lower = cg = 0
    times = []
    for k, (r, lo) in enumerate(zip(res.log, P.log["lower"])):
        idx = lo["idx"]
        x = lo["theta"] + P.a[idx]
        z = (x - P.t[idx]).mean(0)
        lower, cg = lower + 3 * len(idx), cg + 2
        assert r["iter"] == k + 1 and r["epoch"] == (1 if k < 3 else 2)
        assert r["batch_loss"] == pytest.approx(0.5 * ((x - P.t[idx]) ** 2).sum().item() / len(idx), rel=1e-14)
        assert r["step"] == pytest.approx(0.5 * (k + 1) ** -0.6, rel=1e-15)
        assert r["eps"] == pytest.approx(0.1 * (k + 1) ** -0.5, rel=1e-15)
        assert r["grad_norm"] == pytest.approx(torch.linalg.vector_norm(z).item(), rel=1e-14)
        assert (r["lower_iters"], r["cg_iters"], r["computations"]) == (lower, cg, lower + cg)
        assert (r["lower_cap_hits"], r["cg_cap_hits"]) == (0, 0)
        times.append(r["time"])
    assert times == sorted(times) and times[0] > 0
    s = res.state
    assert (s.k, s.epoch, s.lower_iters, s.cg_iters, s.computations) == (5, 2, lower, cg, lower + cg)
    second_epoch = sum((c["idx"] for c in P.log["lower"][3:]), [])      # steps 4 and 5: 6 of the 7
    assert len(s.order) == 1 and sorted(s.order + second_epoch) == list(range(7))


class Penalised(Recording):
    """The recording shift problem with a penalty on θ in the upper level: g = (1/B) Σ ½‖x_i − t_i‖²
    + ½ρ‖θ‖², so ∇_θg = ρθ and z = mean_S(θ + a − t) + ρθ."""

    rho = 0.7

    def subset(self, idx):
        sub = Penalised(self.a[idx], self.t[idx], self.log)
        sub.idx = list(idx)
        return sub

    def upper_loss(self, x, theta):
        return super().upper_loss(x, theta) + 0.5 * self.rho * (theta * theta).sum()

    def upper_grad_theta(self, x, theta):
        return self.rho * theta


def test_loss_and_step_use_the_direct_theta_dependence_of_g():
    """With g depending on θ directly, the record's ``batch_loss`` is g(x̃, θ_k) with its ½ρ‖θ_k‖² term
    and the step uses z = ∂_θg − Jᵀq = mean_S(θ + a − t) + ρθ (reference: the recursion by hand)."""
    P = Penalised(rand(7, 3, seed=1), rand(7, 3, seed=2))
    theta0 = rand(3, seed=3)
    res = isgd(P, theta0, torch.zeros(7, 3), _cfg(max_steps=3))
    theta = theta0.clone()
    for k, (r, lo) in enumerate(zip(res.log, P.log["lower"])):
        idx = lo["idx"]
        x = theta + P.a[idx]
        g = 0.5 * ((x - P.t[idx]) ** 2).sum().item() / len(idx) + 0.5 * 0.7 * (theta * theta).sum().item()
        assert r["batch_loss"] == pytest.approx(g, rel=1e-14)
        theta = theta - 0.5 * (k + 1) ** -0.6 * ((x - P.t[idx]).mean(0) + 0.7 * theta)
    torch.testing.assert_close(res.theta, theta, rtol=1e-14, atol=1e-15)


def test_cap_hits_are_counted_and_the_step_still_taken():
    """A lower solve that hits its cap (status 'max_iter', finite) and an adjoint solve that does
    not converge are counted (``lower_cap_hits``, ``cg_cap_hits``), and the step is taken anyway."""
    P = _rec(lower_status=lambda n: "max_iter" if n in (1, 3) else "converged", cg_ok=lambda n: n != 2)
    res = isgd(P, torch.zeros(3), torch.zeros(7, 3), _cfg(max_steps=5))
    assert [r["lower_cap_hits"] for r in res.log] == [0, 1, 1, 2, 2]
    assert [r["cg_cap_hits"] for r in res.log] == [0, 0, 1, 1, 1]
    assert res.state.k == 5 and res.stop_reason == "max_steps"


@pytest.mark.parametrize("where", ["lower", "loss", "gradient"])
def test_a_non_finite_step_stops_and_leaves_the_state_unchanged(where):
    """A non-finite lower solve (NaN iterate, NaN ‖∇h‖), a non-finite batch loss or a non-finite
    hypergradient at step 3 stops the run with 'non_finite' and leaves θ, the warm starts, the step
    counter and the epoch order as they were after step 2 (the step is not committed).  The lower
    solve's iterations are still counted; the run before step 3 is the same as a 2-step run."""
    kw = {}
    P = _rec(lower_status=(lambda n: "non_finite" if n == 2 else "converged") if where == "lower" else None)
    if where == "loss":
        orig = P.subset

        def subset(idx, orig=orig):
            sub = orig(idx)
            if len(P.log["lower"]) == 2:
                sub.upper_loss = lambda x, theta: torch.tensor(math.inf)
            return sub
        P.subset = subset
    if where == "gradient":
        orig = P.subset

        def subset(idx, orig=orig):
            sub = orig(idx)
            if len(P.log["lower"]) == 2:
                sub.mixed_vjp = lambda x, theta, q: torch.full_like(theta, math.nan)
            return sub
        P.subset = subset
    res = isgd(P, torch.zeros(3), torch.zeros(7, 3), _cfg(max_steps=5, **kw))
    two = isgd(_rec(), torch.zeros(3), torch.zeros(7, 3), _cfg(max_steps=2))
    assert res.stop_reason == "non_finite" and res.state.k == 2 and len(res.log) == 2
    assert torch.equal(res.theta, two.theta) and torch.equal(res.state.x, two.state.x)
    assert torch.equal(res.state.q, two.state.q) and res.state.order == two.state.order
    extra = 5 if where == "lower" else 3 * len(P.log["lower"][2]["idx"])
    assert res.state.lower_iters == two.state.lower_iters + extra
    if where == "lower":                  # no adjoint solve after a failed lower solve: no CG work wasted
        assert len(P.log["adjoint"]) == 2 and res.state.cg_iters == two.state.cg_iters
    assert res.state.lower_cap_hits == 0


def test_projection_is_applied_after_every_step():
    """``problem.project`` (here the clamp onto [−0.05, 0.05]³) is applied to θ − α_k z_k after every
    step: the θ each solve sees is the projection of the previous unconstrained step (reference: the
    recursion by hand)."""
    proj = lambda th: th.clamp(-0.05, 0.05)          # noqa: E731
    P = _rec(project=proj)
    res = isgd(P, torch.zeros(3), torch.zeros(7, 3), _cfg(step0=2.0, q=0.0, max_steps=4))
    theta = torch.zeros(3)
    for lo in P.log["lower"]:
        torch.testing.assert_close(lo["theta"], theta, rtol=0, atol=0)
        idx = lo["idx"]
        theta = proj(theta - 2.0 * (theta + P.a[idx] - P.t[idx]).mean(0))
    torch.testing.assert_close(res.theta, theta, rtol=0, atol=0)
    assert res.theta.abs().max() == pytest.approx(0.05)   # the clamp is active


def test_stop_reasons_at_the_end_of_the_loop_and_callback():
    """Each step of a 7-sample run with batch 3 costs 3b + 2 computations (b = 3, 3, 1, 3): after 4
    steps 38.  max_steps = 4 with budget 38 stops with 'budget' (reached on the last step), with budget
    39 or 0 (no budget) with 'max_steps'; a callback that returns True at step 2 stops there with
    'callback', and one that returns None or False does not stop."""
    runs = {b: isgd(_rec(), torch.zeros(3), torch.zeros(7, 3), _cfg(max_steps=4, budget=b)) for b in (38, 39, 0)}
    assert runs[38].state.computations == 38
    assert [runs[b].stop_reason for b in (38, 39, 0)] == ["budget", "max_steps", "max_steps"]
    assert all(r.state.k == 4 for r in runs.values())
    for budget in (12, 22):             # 22: reached exactly after step 2 ("reach the budget" is ≥)
        early = isgd(_rec(), torch.zeros(3), torch.zeros(7, 3), _cfg(max_steps=4, budget=budget))
        assert early.stop_reason == "budget" and early.state.k == 2 and early.state.computations == 22
    res = isgd(_rec(), torch.zeros(3), torch.zeros(7, 3), _cfg(max_steps=4), callback=lambda r, s: r["iter"] == 2)
    assert res.stop_reason == "callback" and res.state.k == 2
    seen = []

    def watch(r, s):                      # the callback sees the live state after the step
        seen.append((r["iter"], s.k, s.theta.clone(), s.computations == r["computations"]))
    res = isgd(_rec(), torch.zeros(3), torch.zeros(7, 3), _cfg(max_steps=3), callback=watch)
    assert res.stop_reason == "max_steps" and res.state.k == 3
    assert [(i, k, same) for i, k, _, same in seen] == [(1, 1, True), (2, 2, True), (3, 3, True)]
    torch.testing.assert_close(seen[-1][2], res.theta, rtol=0, atol=0)


def test_callback_time_is_not_counted():
    """``elapsed`` (and the record's ``time``) counts the steps, not the callback: a callback that
    sleeps 0.25 s after each of 2 steps leaves elapsed below 0.25 s (a step of the shift problem
    takes milliseconds; 0.25 s leaves room for a loaded machine)."""
    res = isgd(_rec(), torch.zeros(3), torch.zeros(7, 3), _cfg(max_steps=2), callback=lambda r, s: time.sleep(0.25))
    assert 0 < res.state.elapsed < 0.25 and res.log[-1]["time"] == res.state.elapsed


def test_the_seed_draws_the_batches():
    """Batches are a seeded permutation: the same seed gives the same batches, another seed other
    batches (7 samples: 5040 orders)."""
    def batches(seed):
        P = _rec()
        isgd(P, torch.zeros(3), torch.zeros(7, 3), _cfg(max_steps=3, seed=seed))
        return [c["idx"] for c in P.log["lower"]]
    assert batches(0) == batches(0) and batches(0) != batches(1)


def test_default_config_fixed_step_fixed_accuracy_delta_equals_eps():
    """``isgd(..., config=None)`` uses ``ISGDConfig()``: q = p = 0 (constant α₀ and ε₀), δ₀ = ε₀
    (``delta0=None``), no budget, and the iteration caps handed to the solvers."""
    P = _rec(n=16)
    cfg = ISGDConfig()
    res = isgd(P, torch.zeros(3), torch.zeros(16, 3), None, callback=lambda r, s: r["iter"] == 3)
    assert res.stop_reason == "callback"
    for k, (lo, ad) in enumerate(zip(P.log["lower"], P.log["adjoint"])):
        b = len(lo["idx"])
        assert b == cfg.batch_size and res.log[k]["step"] == cfg.step0 and res.log[k]["eps"] == cfg.eps0
        assert lo["eps"] == pytest.approx(cfg.eps0 * math.sqrt(b), rel=1e-15)
        assert ad["delta"] == pytest.approx(cfg.eps0 / math.sqrt(b), rel=1e-15)
        assert (lo["max_iter"], ad["max_iter"]) == (cfg.lower_max_iter, cfg.cg_max_iter)
    assert (cfg.p, cfg.q, cfg.delta0, cfg.budget) == (0.0, 0.0, None, 0)


def test_a_state_or_a_start_is_required():
    with pytest.raises(ValueError, match=r"^give either \(theta0, x0\) or a state to resume from$"):
        isgd(_rec(), torch.zeros(3), None, _cfg())
    with pytest.raises(ValueError, match="give either"):
        isgd(_rec(), None, torch.zeros(7, 3), _cfg())
    s = ISGDState(theta=torch.zeros(3), x=torch.zeros(7, 3), q=torch.zeros(7, 3))
    assert isgd(_rec(), config=_cfg(max_steps=1), state=s).state.k == 1


_BAD = [("step0", 0.0, "be a positive finite number"), ("step0", math.inf, "be a positive finite number"),
        ("eps0", -1e-3, "be a positive finite number"), ("eps0", math.nan, "be a positive finite number"),
        ("delta0", 0.0, "be a positive finite number"), ("delta0", math.inf, "be a positive finite number"),
        ("p", -0.1, "be a non-negative finite number"), ("q", math.inf, "be a non-negative finite number"),
        ("p", math.nan, "be a non-negative finite number"),
        ("batch_size", 0, "be a positive integer"), ("max_steps", 0, "be a positive integer"),
        ("lower_max_iter", 0, "be a positive integer"), ("cg_max_iter", 0, "be a positive integer"),
        ("budget", -1, "be ≥ 0")]


@pytest.mark.parametrize("name,value,what", _BAD)
def test_validation_refuses_each_bad_value_with_one_clear_line(name, value, what):
    """Each bad setting raises ValueError '<name> must <what>, got <value>' (the caller's name for it
    when ``names`` maps it, as train.py's option names), also through :func:`isgd`."""
    cfg = ISGDConfig(**{name: value})
    with pytest.raises(ValueError) as e:
        cfg.validate()
    assert str(e.value) == f"{name} must {what}, got {value!r}"
    with pytest.raises(ValueError) as e:
        cfg.validate({name: "--" + name})
    assert str(e.value) == f"--{name} must {what}, got {value!r}"
    with pytest.raises(ValueError):
        isgd(_rec(), torch.zeros(3), torch.zeros(7, 3), cfg)


def test_validation_accepts_the_boundary_values():
    """p = q = 0, budget = 0, delta0 = None, caps and batch of 1, and tiny positive steps are valid."""
    ISGDConfig(step0=1e-300, eps0=1e-300, delta0=1e-300, p=0.0, q=0.0, batch_size=1, max_steps=1, budget=0,
               lower_max_iter=1, cg_max_iter=1).validate()
    ISGDConfig(delta0=None, p=1.0, q=1.0).validate()
