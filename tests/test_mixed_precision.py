"""Mixed precision (issue 15): float32 iterations, float64 iterates where float32 cannot be certified.

* :func:`lower_level.solve_lower` with a float32 ``h`` and a float64 ``x0`` certifies ε below the
  float32 grid distance (no float32 point can be that close to ``x̂``; checked here), returns its
  float64 iterate, and its true error against a float64 reference solved to 1e-11 is ≤ ε.
* :class:`mixed_precision.MixedPrecisionProblem` dispatches every method on the iterate's dtype:
  at a float64 iterate its values are the float64 problem's at θ cast to float64 (bit for bit for
  x-shaped results; θ-shaped ones rounded once to float32), so the hypergradient of the promoted
  path is the float64 hypergradient rounded to float32.
* A whole MAID run in float32 with a threshold below the grid distance certifies every solve, and
  every returned iterate is within its ε of a float64 reference.
"""
import math

import pytest
import torch

import lower_level
import maid
from adp_problem import ADPBetaProblem
from lower_level import LowerLevel, solve_lower
from mixed_precision import MixedPrecisionProblem
from regularisers import AnisotropicTV, SmoothedTV
from test_float32_default import blocks_data


def _data(n=32, seed=0):
    """The default run's regime (μ ≈ 0.01, SmoothedTV(0.005, 0.01), a motion kernel of mass 0.99,
    flat blocks): :func:`test_float32_default.blocks_data`, float32."""
    return blocks_data(n, seed)


def _grid_distance(x64: torch.Tensor) -> float:
    """``‖fl₃₂(x) − x‖``: the distance from ``x`` to the nearest float32 point (round to nearest)."""
    return torch.linalg.vector_norm(x64.float().double() - x64).item()


def _dist(a, b) -> float:
    return torch.linalg.vector_norm(a.double() - b.double()).item()


@pytest.fixture(scope="module")
def lower():
    b, y = _data()
    h32 = LowerLevel(b, y, SmoothedTV(0.005, 0.01), 1e-2)
    h64 = LowerLevel(b.double(), y.double(), SmoothedTV(0.005, 0.01), 1e-2)
    x_hat = solve_lower(h64, y.double(), 1e-11, 200000)
    assert x_hat.converged
    return h32, h64, y, x_hat.x


# --------------------------------------------------------------------------------------------
# the mixed solve of lower_level
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [5e-7, 1e-7])
def test_mixed_solve_certifies_eps_below_the_float32_grid_distance(lower, eps):
    """ε below ``‖fl₃₂(x̂) − x̂‖`` (≈ 9e-7 here): the float32-only solve cannot certify it (no float32
    point is within ε), the mixed solve does, returns a float64 iterate within ε of the reference,
    and ran float32 iterations before its float64 finish (the float32 work is not skipped)."""
    h32, h64, y, x_hat = lower
    assert _grid_distance(x_hat) > eps
    only32 = solve_lower(h32, y.clone(), eps, 20000)
    assert not only32.converged and only32.status == "max_iter" and only32.x.dtype == torch.float32
    before = dict(lower_level.LOW_PRECISION_STATS)
    res = solve_lower(h32, y.double(), eps, 20000)
    stats = {k: lower_level.LOW_PRECISION_STATS[k] - before[k] for k in before}
    assert res.converged and res.x.dtype == torch.float64
    assert _dist(res.x, x_hat) <= eps
    assert res.grad_norm == pytest.approx(torch.linalg.vector_norm(h64.grad(res.x)).item(), rel=1e-12)
    assert stats["float64_returns"] == 1 and stats["unreachable"] == 0
    assert 0 < stats["float64_iterations"] < res.iters


@pytest.mark.parametrize("make_R", [lambda: AnisotropicTV(0.005, 0.01), lambda: SmoothedTV(0.02, 0.002)],
                         ids=["tv_aniso", "tv_sharper"])
def test_mixed_solve_with_other_regularisers(make_R):
    """The float64 phase's linearised steps use only ``h.hvp`` (``R.curvature``), so another
    regulariser works too: anisotropic TV, and a sharper TV (α/γ 20× the default's, so a larger
    third derivative for the linearisation) certify ε = 1e-7 with a float64 iterate, error ≤ ε
    against the float64 twin's reference."""
    b, y = blocks_data(24, seed=2)
    h32 = LowerLevel(b, y, make_R(), 1e-2)
    h64 = h32.float64_twin()
    x_hat = solve_lower(h64, y.double(), 1e-11, 400000)
    assert x_hat.converged
    res = solve_lower(h32, y.double(), 1e-7, 400000)
    assert res.converged and res.x.dtype == torch.float64 and _dist(res.x, x_hat.x) <= 1e-7


def test_mixed_solve_stays_float32_where_a_float32_point_is_certified(lower):
    """ε = 1e-3 is within float32's reach: the mixed solve returns a float32 iterate (certified, no
    float64 iteration), within ε of the reference."""
    h32, _, y, x_hat = lower
    before = dict(lower_level.LOW_PRECISION_STATS)
    res = solve_lower(h32, y.double(), 1e-3, 5000)
    assert res.converged and res.x.dtype == torch.float32 and _dist(res.x, x_hat) <= 1e-3
    assert lower_level.LOW_PRECISION_STATS["float64_iterations"] == before["float64_iterations"]


def test_mixed_solve_from_an_accurate_float64_start_skips_the_float32_phase(lower):
    """A float64 start already certified below float32's reach: rounding it to float32 would undo its
    accuracy, so the solve goes straight to float64 (every iteration is float64) and certifies the
    tighter ε; a start certified at ε itself returns at once (0 iterations, the same tensor values)."""
    h32, h64, y, x_hat = lower
    start = solve_lower(h64, y.double(), 1e-6, 20000).x
    before = dict(lower_level.LOW_PRECISION_STATS)
    res = solve_lower(h32, start, 2e-7, 20000)
    assert res.converged and res.x.dtype == torch.float64 and _dist(res.x, x_hat) <= 2e-7
    assert lower_level.LOW_PRECISION_STATS["float64_iterations"] - before["float64_iterations"] == res.iters
    same = solve_lower(h32, res.x, 2e-7, 20000)
    assert same.converged and same.iters == 0 and torch.equal(same.x, res.x)


def test_hand_over_is_learned_so_that_later_solves_do_not_stall(lower):
    """Below the reach the float32 phase hands over once its bound is within 2× the reach.  From a
    cold start (the reach predicted at ``y``, where the TV curvature is lower than near ``x̂``) the
    first solve may stall at most once, which raises the cached reach to half the stalled bound; the
    same solve again then hands over with no stall, runs fewer float64 iterations than float64
    alone needs, and certifies ε (error ≤ ε against the reference)."""
    h32, h64, y, x_hat = lower
    lower_level._REACH_HINTS.clear()
    before = dict(lower_level.LOW_PRECISION_STATS)
    first = solve_lower(h32, y.double(), 1e-7, 20000)
    assert first.converged and lower_level.LOW_PRECISION_STATS["stalls"] - before["stalls"] <= 1
    before = dict(lower_level.LOW_PRECISION_STATS)
    again = solve_lower(h32, y.double(), 1e-7, 20000)
    f64 = lower_level.LOW_PRECISION_STATS["float64_iterations"] - before["float64_iterations"]
    assert again.converged and lower_level.LOW_PRECISION_STATS["stalls"] == before["stalls"]
    assert 0 < f64 < solve_lower(h64, y.double(), 1e-7, 20000).iters
    assert _dist(again.x, x_hat) <= 1e-7


def test_rounding_reach_is_the_certificate_of_a_sub_spacing_perturbation(lower):
    """The reach is the energy bound of ``∇h(x + u) − ∇h(x)`` for a sub-spacing ``u`` (recomputed
    here with the same seed), it is far above the perturbation's own size (the certificate's
    amplification of rounding that makes float32 points uncertifiable below it), and it is cached."""
    h32, h64, y, _ = lower
    lower_level._REACH_HINTS.clear()
    cert = lower_level._Certificate(h64, 1e-6, "energy")
    x = y.clone()
    reach = lower_level._rounding_reach(h32, cert, x)
    spacing = (torch.nextafter(x.abs(), torch.tensor(math.inf, dtype=torch.float32)) - x.abs()).double()
    u = (torch.rand(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5) * spacing
    dg = h64.grad(x.double() + u) - h64.grad(x.double())
    assert reach == pytest.approx(min(h64.energy_bound(dg), torch.linalg.vector_norm(dg).item() / h64.mu), rel=1e-12)
    assert reach > 10 * torch.linalg.vector_norm(u).item()
    assert len(lower_level._REACH_HINTS) == 1
    assert lower_level._rounding_reach(h32, cert, x + 0.25) == reach


# --------------------------------------------------------------------------------------------
# the wrapper
# --------------------------------------------------------------------------------------------
def _problems(learned=True):
    b, y = _data(n=24, seed=1)
    kw = dict(mu0=1e-2, upper_operator="learned" if learned else "known")
    low = ADPBetaProblem(y, b, SmoothedTV(0.005, 0.01), 0.1, **kw)
    high = ADPBetaProblem(y.double(), b.double(), SmoothedTV(0.005, 0.01), 0.1, **kw)
    theta = b + 0.01 * torch.rand(b.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    return low, high, theta, y


@pytest.mark.parametrize("learned", [True, False], ids=["learned", "known"])
def test_wrapper_at_a_float64_iterate_is_the_float64_problem(learned):
    """A promoted solve returns a float64 iterate; there every method equals the float64 problem's at
    θ cast to float64: x-shaped results bit for bit (float64), θ-shaped ones rounded once to float32,
    and the loss, L_g and metrics as the float64 problem's."""
    low, high, theta, y = _problems(learned)
    mp = MixedPrecisionProblem(low, high)
    res = mp.solve_lower(theta, y, 1e-7, 20000)
    x, t64 = res.x, theta.double()
    assert res.converged and x.dtype == torch.float64 and mp.stats == {"solves": 1, "promoted": 1, "uncertified": 0}
    v = torch.rand(y.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float32)
    assert torch.equal(mp.hessian_vp(x, theta, v), high.hessian_vp(x, t64, v.double()))
    assert torch.equal(mp.upper_grad_x(x, theta), high.upper_grad_x(x, t64))
    mv = mp.mixed_vjp(x, theta, v)
    assert mv.dtype == torch.float32 and torch.equal(mv, high.mixed_vjp(x, t64, v.double()).float())
    gt = mp.upper_grad_theta(x, theta)
    assert gt.dtype == torch.float32 and torch.equal(gt, high.upper_grad_theta(x, t64).float())
    assert mp.upper_loss(x, theta).item() == high.upper_loss(x, t64).item()
    assert mp.upper_lipschitz(x, theta) == high.upper_lipschitz(x, t64)
    assert mp.error_constants(x, theta) == high.error_constants(x, t64)


def test_wrapper_at_a_float32_iterate_is_the_float32_problem():
    """At a float32 iterate every product is the float32 problem's, unchanged (bit for bit)."""
    low, high, theta, y = _problems()
    mp = MixedPrecisionProblem(low, high)
    res = mp.solve_lower(theta, y, 1e-2, 5000)
    x = res.x
    assert res.converged and x.dtype == torch.float32 and mp.stats["promoted"] == 0
    v = torch.rand(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    assert torch.equal(mp.hessian_vp(x, theta, v), low.hessian_vp(x, theta, v))
    assert torch.equal(mp.mixed_vjp(x, theta, v), low.mixed_vjp(x, theta, v))
    assert torch.equal(mp.upper_grad_theta(x, theta), low.upper_grad_theta(x, theta))
    assert mp.upper_loss(x, theta).dtype == torch.float32


def test_promoted_hypergradient_matches_the_float64_hypergradient():
    """``maid.hypergradient`` through the wrapper at a float64 iterate (CG in float64, warm start given
    in float32) equals the float64 problem's hypergradient at the same point to float32 rounding of
    its two terms, and its CG solution is the float64 one bit for bit."""
    low, high, theta, y = _problems()
    mp = MixedPrecisionProblem(low, high)
    x = mp.solve_lower(theta, y, 1e-7, 20000).x
    q0 = torch.zeros_like(y)
    z, q, it, ok = maid.hypergradient(mp, x, theta, q0, 1e-12, 500)
    z64, q64, it64, ok64 = maid.hypergradient(high, x, theta.double(), q0.double(), 1e-12, 500)
    assert ok and ok64 and it == it64 and q.dtype == torch.float64 and torch.equal(q, q64)
    scale = (torch.linalg.vector_norm(high.upper_grad_theta(x, theta.double()))
             + torch.linalg.vector_norm(high.mixed_vjp(x, theta.double(), q64))).item()
    assert z.dtype == torch.float32 and _dist(z, z64) <= 2 * torch.finfo(torch.float32).eps * scale


def test_theta_cast_is_cached_by_identity_and_version():
    """The float64 θ is the same tensor for the same θ (so the float64 problem's per-θ lower level is
    reused) and a fresh one after θ is modified in place."""
    low, high, theta, _ = _problems()
    mp = MixedPrecisionProblem(low, high)
    first = mp._high_theta(theta)
    assert mp._high_theta(theta) is first and torch.equal(first, theta.double())
    theta.mul_(1.5)
    again = mp._high_theta(theta)
    assert again is not first and torch.equal(again, theta.double())


def test_without_mixed_lower_an_uncertifiable_solve_is_finished_in_float64_and_learned():
    """``mixed_lower=False``: the float32 solve at an ε below the grid stops uncertified early, the
    wrapper finishes it in float64 (certified, float64 iterate, iterations of both counted, within
    the cap) and promotes later solves at that accuracy at once (no further float32 solve)."""
    low, high, theta, y = _problems()
    mp = MixedPrecisionProblem(low, high, mixed_lower=False)
    res = mp.solve_lower(theta, y, 1e-7, 20000)
    assert res.converged and res.x.dtype == torch.float64 and mp.promote_below == 1e-7 and res.iters <= 20000
    ref = high.solve_lower(theta.double(), y.double(), 1e-11, 200000).x
    assert _dist(res.x, ref) <= 1e-7
    n32 = lower_level.LOW_PRECISION_STATS["solves"]
    again = mp.solve_lower(theta, res.x, 5e-8, 20000)
    assert again.converged and again.x.dtype == torch.float64 and lower_level.LOW_PRECISION_STATS["solves"] == n32
    assert mp.stats == {"solves": 2, "promoted": 2, "uncertified": 0}


def test_low_dtype_must_be_less_precise():
    low, high, _, _ = _problems()
    with pytest.raises(ValueError, match="low_dtype must be less precise than high_dtype"):
        MixedPrecisionProblem(high, low, low_dtype=torch.float64, high_dtype=torch.float32)


def test_maid_run_in_float32_certifies_every_solve_below_the_grid_distance():
    """MAID in float32 through the wrapper down to ε_min = 1e-7 (below the float32 grid distance of
    ~6e-7 here): no uncertified solve, solves below the grid distance return float64, and every solve's
    iterate is within its ε of ``x̂(θ)`` solved in float64 to 1e-11.  The final kernel agrees with a
    float64 run's to 1e-4 relative."""
    low, high, _, y = _problems()
    b0 = low.b0
    mp = MixedPrecisionProblem(low, high)
    seen = []
    solve = mp.solve_lower

    def recorded(theta, x0, eps, max_iter):
        res = solve(theta, x0, eps, max_iter)
        seen.append((theta.clone(), eps, res.x.clone()))
        return res

    mp.solve_lower = recorded
    cfg = maid.MAIDConfig(eps0=1e-5, delta0=1e-9, step0=30.0, eps_min=1e-7, max_iter=25, lower_max_iter=20000)
    res = maid.maid(mp, b0.clone(), y.clone(), cfg)
    assert res.state.lower_cap_hits == 0 and mp.stats["uncertified"] == 0 and res.stop_reason == "eps_min"
    below_grid = 0
    for theta, eps, x in seen:
        ref = high.solve_lower(theta.double(), x.double(), 1e-11, 200000)
        assert ref.converged and _dist(x, ref.x) <= eps, (eps, _dist(x, ref.x))
        if eps < _grid_distance(ref.x):             # no float32 point is within ε of x̂(θ)
            below_grid += 1
            assert x.dtype == torch.float64
    assert below_grid >= 5
    ref64 = maid.maid(high, b0.double(), y.double(), cfg)
    assert _dist(res.theta, ref64.theta) <= 1e-4 * torch.linalg.vector_norm(ref64.theta).item()


@pytest.mark.parametrize("solver", ["fista", "agd"])
def test_float64_phase_follows_the_float64_recurrence(lower, solver):
    """The float64 phase steps with the linearised gradient ``∇h(a) + ∇²h(a)d`` (float32 HVP at a
    float64 anchor): from an accurate float64 start (so every iteration is in that phase) its 40th
    iterate equals the float64 recurrence's (``fista``, or the Nesterov scheme) from the same start
    to 1e-5 of the distance travelled (the model's error is second order in the displacement and the
    float32 rounding acts on ``∇²h d``); the point returned at the cap carries its exact float64
    ``‖∇h‖`` and is not certified at ε = 1e-12."""
    h32, h64, y, _ = lower
    start = solve_lower(h64, y.double(), 1e-5, 20000).x
    ref = (lower_level.fista(h64.grad, start, h64.L, h64.mu, 0.0, 40) if solver == "fista"
           else solve_lower(h64, start, 0.0, 40, solver))
    before = dict(lower_level.LOW_PRECISION_STATS)
    res = solve_lower(h32, start, 1e-12, 40, solver)
    assert lower_level.LOW_PRECISION_STATS["float64_iterations"] - before["float64_iterations"] == res.iters == 40
    assert res.x.dtype == torch.float64 and not res.converged
    assert _dist(res.x, ref.x) <= 1e-5 * _dist(ref.x, start)
    assert res.grad_norm == pytest.approx(torch.linalg.vector_norm(h64.grad(res.x)).item(), rel=1e-12)


# --------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------
def test_driver_float32_certifies_every_solve_and_matches_float64(tmp_path):
    """``ADP.run(dtype='float32')`` on 3×40×48, ε from 1e-4 down to ~1e-6: no uncertified solve, some
    solves returned float64 (counted in the summary and in log.csv's ``promoted_solves``,
    non-decreasing), the PSNR within 0.02 dB of the float64 run's
    (issue 15's target); a resumed run continues the count and finishes certified."""
    import csv
    import os

    import ADP
    small = dict(size_x=48, size_y=40, upper_iter=12, device="cpu", step=30.0, eps0=1e-4, threshold=1e-7,
                 progress=False, upper_operator="learned")
    s32 = ADP.run(small, dtype="float32", results_dir=str(tmp_path / "f32"))
    s64 = ADP.run(small, dtype="float64", results_dir=str(tmp_path / "f64"))
    assert s32["uncertified_solves"] == 0 and s64["uncertified_solves"] == 0 and s64["promoted_solves"] == 0
    assert s32["promoted_solves"] > 0 and s32["accepted"] >= 2
    assert abs(s32["scores"]["ADP-β-MAID"]["psnr"] - s64["scores"]["ADP-β-MAID"]["psnr"]) <= 0.02
    with open(os.path.join(s32["run_dir"], "log.csv")) as f:
        counts = [int(r["promoted_solves"]) for r in csv.DictReader(f)]
    assert counts == sorted(counts) and counts[-1] == s32["promoted_solves"]
    more = ADP.run(resume=os.path.join(s32["run_dir"], "checkpoint.pt"), upper_iter=15,
                   results_dir=str(tmp_path / "resumed"), progress=False)
    assert more["uncertified_solves"] == 0 and more["promoted_solves"] >= s32["promoted_solves"]


def test_initial_x_comes_from_the_low_problem_or_is_asked_for():
    """``maid`` without ``x0`` takes the low problem's ``initial_x`` (in the low dtype); a low problem
    without one gives maid's own one-line request for ``x0``."""
    low, high, theta, y = _problems()
    low.initial_x = lambda t: y.clone()
    assert torch.equal(MixedPrecisionProblem(low, high).initial_x(theta), y)
    del low.initial_x
    with pytest.raises(ValueError, match="give x0"):
        maid.maid(MixedPrecisionProblem(low, high), theta.clone(), None, maid.MAIDConfig(max_iter=1))


def test_rounding_reach_is_not_evaluated_at_or_above_twice_its_cap(lower):
    """Where ε ≥ 2·cap with ``cap = L‖s‖/(2μ)`` (every bound of ``∇h(x + u) − ∇h(x)`` is ≤ L‖u‖/μ ≤
    cap), the reach cannot move the hand-over below ε: ``cap`` itself is returned and nothing is
    cached; just below 2·cap the reach is evaluated (and is ≤ cap, the bound it must obey)."""
    h32, h64, y, _ = lower
    lower_level._REACH_HINTS.clear()
    cert = lower_level._Certificate(h64, 1e-6, "energy")
    x = y.clone()
    spacing = (torch.nextafter(x.abs(), torch.tensor(math.inf, dtype=torch.float32)) - x.abs()).double()
    cap = h32.L * torch.linalg.vector_norm(spacing).item() / (2 * h32.mu)
    assert lower_level._rounding_reach(h32, cert, x, eps=2.0001 * cap) == pytest.approx(cap, rel=1e-12)
    assert len(lower_level._REACH_HINTS) == 0
    reach = lower_level._rounding_reach(h32, cert, x, eps=1.9999 * cap)
    assert len(lower_level._REACH_HINTS) == 1 and reach <= cap


class _Stub:
    """A problem of one precision that reports what it was called with (dtypes and values)."""

    def __init__(self, name):
        self.name = name

    def metrics(self, x, t):
        return {"side": self.name, "x": x.dtype, "theta": t.dtype, "theta_sum": t.sum().item()}

    def a_posteriori_error(self, x, t, q, target):
        return target, {"float32": 32, "float64": 64}[str(q.dtype).split(".")[1]] + (0 if t.dtype == x.dtype else 1)

    def initial_x(self, theta):
        return theta + 1


def test_wrapper_dispatches_metrics_a_posteriori_error_and_initial_x():
    """``metrics`` and ``a_posteriori_error`` go to the side of the iterate's precision with θ (and q)
    cast to it, ``target`` passed through (0 when not given); ``initial_x`` is the low problem's;
    a side without ``metrics``/``a_posteriori_error`` gives ``{}``/``(inf, 0)``; without
    ``initial_x`` one ValueError names the remedy."""
    mp = MixedPrecisionProblem(_Stub("low"), _Stub("high"))
    theta = torch.tensor([0.25, 0.5], dtype=torch.float32)
    x32, x64 = torch.zeros(3, dtype=torch.float32), torch.zeros(3, dtype=torch.float64)
    q32 = torch.ones(3, dtype=torch.float32)
    assert mp.metrics(x64, theta) == {"side": "high", "x": torch.float64, "theta": torch.float64, "theta_sum": 0.75}
    assert mp.metrics(x32, theta) == {"side": "low", "x": torch.float32, "theta": torch.float32, "theta_sum": 0.75}
    assert mp.a_posteriori_error(x64, theta, q32, 0.5) == (0.5, 64)      # q cast up, θ on x's side
    assert mp.a_posteriori_error(x32, theta, q32, 0.25) == (0.25, 32)
    assert mp.a_posteriori_error(x64, theta, q32) == (0.0, 64)            # default target 0: "as tight as you can"
    assert torch.equal(mp.initial_x(theta), theta + 1)
    bare = MixedPrecisionProblem(object(), object())
    assert bare.metrics(x64, theta) == {} and bare.metrics(x32, theta) == {}
    assert bare.a_posteriori_error(x64, theta, q32, 1.0) == (math.inf, 0)
    with pytest.raises(ValueError, match=r"^maid: give x0 \(the lower level's starting point\) or a low problem "
                                         r"with initial_x\(theta\)$"):
        bare.initial_x(theta)


def test_wrapper_a_posteriori_error_is_the_float64_problems_at_a_promoted_iterate():
    """At a promoted (float64) iterate the wrapper's a-posteriori ω is the float64 ADP problem's at θ
    and q cast to float64, for a strict target (refined bound, CG iterations > 0) and a loose one."""
    low, high, theta, y = _problems()
    mp = MixedPrecisionProblem(low, high)
    x = mp.solve_lower(theta, y, 1e-7, 20000).x
    q = torch.rand(y.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float32)
    strict = mp.a_posteriori_error(x, theta, q, 0.0)
    assert strict == high.a_posteriori_error(x, theta.double(), q.double(), 0.0) and strict[1] > 0
    assert mp.a_posteriori_error(x, theta, q, math.inf) == (high.hypergradient_error_bound(x, theta.double(), q.double()), 0)


def test_wrapper_solve_adjoint_works_in_the_iterates_precision_and_keeps_the_warm_start():
    """At a float64 iterate ``solve_adjoint`` casts a float32 right-hand side and warm start to
    float64 (the solution is float64 and equals the float64 problem's CG), and a warm start that
    already solves the system to δ costs 0 iterations."""
    low, high, theta, y = _problems()
    mp = MixedPrecisionProblem(low, high)
    x = mp.solve_lower(theta, y, 1e-7, 20000).x
    rhs32 = high.upper_grad_x(x, theta.double()).float()
    q, it, ok = mp.solve_adjoint(x, theta, rhs32, None, 1e-10, 2000)
    q_ref, it_ref, ok_ref = maid.conjugate_gradient(lambda v: high.hessian_vp(x, theta.double(), v), rhs32.double(),
                                                    None, 1e-10, 2000)
    assert ok and ok_ref and q.dtype == torch.float64 and it == it_ref and torch.equal(q, q_ref)
    delta = 1e-2 * torch.linalg.vector_norm(rhs32).item()         # q = 0 does not meet it; q does
    _, it_warm, ok_warm = mp.solve_adjoint(x, theta, rhs32, q.float(), delta, 2000)
    _, it_cold, _ = mp.solve_adjoint(x, theta, rhs32, None, delta, 2000)
    assert ok_warm and it_warm == 0 < it_cold


class _QuadStub:
    """``h(x) = ½xᵀHx − bᵀx`` with a fixed SPD H in one precision: ``hessian_vp`` only (no
    ``solve_adjoint``, no ``upper_lipschitz``), ``error_constants().L_g = 2``; ``solve_lower`` returns a
    scripted result and records the x₀ dtypes it was given."""

    def __init__(self, dtype, script=None):
        g = torch.Generator().manual_seed(11)
        M = torch.rand(4, 4, generator=g, dtype=torch.float64)
        self.H = (M @ M.T + 0.5 * torch.eye(4, dtype=torch.float64)).to(dtype)
        self.script, self.x0_dtypes = list(script or []), []

    def hessian_vp(self, x, t, v):
        return self.H @ v

    def error_constants(self, x, t):
        return maid.ErrorConstants(mu=1.0, L_g=2.0, J_norm=1.0, L_J=1.0, L_Hinv=1.0)

    def solve_lower(self, t, x0, eps, max_iter):
        self.x0_dtypes.append(x0.dtype)
        iters, converged = self.script.pop(0)
        return maid.LowerSolve(x0 + 1, iters, 0.5, converged)


def test_wrapper_fallbacks_for_problems_without_solve_adjoint_or_upper_lipschitz():
    """A side without ``solve_adjoint`` is solved by CG on its ``hessian_vp`` (the same result as
    ``maid.conjugate_gradient`` on H, to δ); a side with its own ``solve_adjoint`` is used as is;
    ``upper_lipschitz`` falls back to ``error_constants().L_g`` and uses a side's own when given;
    equal precisions are refused."""
    mp = MixedPrecisionProblem(_QuadStub(torch.float32), _QuadStub(torch.float64))
    x64, theta = torch.zeros(4, dtype=torch.float64), torch.zeros(2, dtype=torch.float32)
    rhs = torch.arange(1.0, 5.0, dtype=torch.float64)
    q, it, ok = mp.solve_adjoint(x64, theta, rhs, None, 1e-12, 100)
    q_ref, it_ref, _ = maid.conjugate_gradient(lambda v: mp.high.H @ v, rhs, None, 1e-12, 100)
    assert ok and it == it_ref and torch.equal(q, q_ref)
    torch.testing.assert_close(mp.high.H @ q, rhs, rtol=0, atol=1e-11)
    assert mp.upper_lipschitz(x64, theta) == 2.0
    mp.high.upper_lipschitz = lambda x, t: 7.0
    mp.high.solve_adjoint = lambda x, t, r, q0, d, m: ("own", d, m)
    assert mp.upper_lipschitz(x64, theta) == 7.0
    assert mp.solve_adjoint(x64, theta, rhs, None, 1e-3, 9) == ("own", 1e-3, 9)
    with pytest.raises(ValueError, match="low_dtype must be less precise"):
        MixedPrecisionProblem(mp.low, mp.high, torch.float64, torch.float64)


def test_wrapper_solve_lower_without_the_mixed_solver_promotes_and_counts():
    """``mixed_lower=False``: below ``promote_below`` the high side solves from x₀ cast up; above, a
    low solve that stops before its cap uncertified is finished by the high side (iterations
    added, ``promote_below`` raised to that ε); ``stats`` counts solves, promoted and uncertified."""
    low = _QuadStub(torch.float32, script=[(5, False)])
    high = _QuadStub(torch.float64, script=[(7, True), (3, False)])
    mp = MixedPrecisionProblem(low, high, mixed_lower=False, promote_below=1e-4)
    theta, x0 = torch.zeros(2, dtype=torch.float32), torch.zeros(4, dtype=torch.float32)
    r1 = mp.solve_lower(theta, x0, 1e-5, 100)                   # below promote_below: high, x₀ cast up
    assert high.x0_dtypes == [torch.float64] and r1.iters == 7 and r1.x.dtype == torch.float64
    r2 = mp.solve_lower(theta, x0, 1e-3, 100)                   # low stops at 5 < 100 uncertified: high finishes
    assert low.x0_dtypes == [torch.float32] and r2.iters == 5 + 3 and not r2.converged
    assert mp.promote_below == 1e-3
    assert mp.stats == {"solves": 2, "promoted": 2, "uncertified": 1}
