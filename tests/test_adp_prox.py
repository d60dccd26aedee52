"""ADP.py's composite upper level (issue 17 items 3–4): the learned kernel's larger support
(``learned_kernel_size``), the true kernel of the synthetic settings, and proximal MAID on the
kernel with ``kernel_constraint = "simplex"`` and ``kernel_penalty = "h1"``.

In-process, float64, 32×32 semiblind data (σ = 1.5, the true kernel motion∘Gaussian is 9×9),
a few MAID iterations each; no driver run (the driver's own tests are in test_driver*.py)."""
import math

import pytest
import torch
from conftest import rand

import ADP
import config
import maid
from imaging import kernel_error_ratio, make_data, pad_kernel, setting_kernels, true_kernel
from operators import Blur, h1_penalty, motion_kernel
from prox import H1NormPenalty, SimplexConstraint, SimplexH1Penalty

CPU = torch.device("cpu")


def case(**overrides):
    """``(cfg, x_true, b₀ padded to learned_kernel_size, y)`` on 32×32 astronaut, semiblind σ = 1.5,
    learned upper operator (the one whose kernel drifts without a constraint)."""
    cfg = config.resolve(ADP.DEFAULTS, dict(dict(size_x=32, size_y=32, setting="semiblind", semiblind_sigma=1.5,
                                                 device="cpu", learned_kernel_size=9, upper_operator="learned"), **overrides))
    ADP.validate(cfg)
    x_true, b0, y = make_data(cfg, ADP._IMAGES, CPU, torch.float64)
    return cfg, x_true, ADP.learned_b0(cfg, b0), y


def exact_f(problem, b, y):
    """``f(b) = g(x̂(b), b)`` with the lower level solved to 1e-10 (certified)."""
    low = problem.solve_lower(b, y.clone(), 1e-10, 100000)
    assert low.converged
    return problem.upper_loss(low.x, b).item()


# ------------------------------------------------------------------------------------------
# padding and the true kernel
# ------------------------------------------------------------------------------------------
def test_padded_kernel_gives_the_same_blur_and_the_same_problem():
    """B_{pad(b)} x = B_b x (to rounding) for a random 5×5 kernel padded to 9×9 and 11×11; the
    ADP-β problem built on the padded b₀ has the same lower solution, the same upper loss and, on
    the central 5×5 entries, the same hypergradient as the unpadded one (its outer entries are the
    new degrees of freedom).  Even and smaller sizes are refused."""
    b = rand(3, 1, 5, 5, seed=1)
    x = rand(3, 20, 23, seed=2)
    for K in (9, 11):
        bp = pad_kernel(b, K)
        assert bp.shape == (3, 1, K, K) and torch.equal(bp[..., (K - 5) // 2:(K + 5) // 2, (K - 5) // 2:(K + 5) // 2], b)
        assert torch.allclose(Blur(bp, (20, 23)).A(x), Blur(b, (20, 23)).A(x), rtol=0, atol=1e-13)
    for bad in (4, 6, 3):
        with pytest.raises(ValueError, match="odd size"):
            pad_kernel(b, bad)

    cfg, _, b0p, y = case()
    b0 = motion_kernel(5, channels=3, dtype=torch.float64)
    P5 = ADP.build_problem(dict(cfg, learned_kernel_size=0), y, b0)
    P9 = ADP.build_problem(cfg, y, b0p)
    x5 = P5.solve_lower(b0, y.clone(), 1e-10, 100000).x
    x9 = P9.solve_lower(b0p, y.clone(), 1e-10, 100000).x
    assert torch.allclose(x5, x9, rtol=0, atol=1e-12)
    assert P5.upper_loss(x5, b0).item() == pytest.approx(P9.upper_loss(x9, b0p).item(), rel=1e-12)
    z5 = maid.hypergradient(P5, x5, b0, None, 1e-12, 1000)[0]
    z9 = maid.hypergradient(P9, x9, b0p, None, 1e-12, 1000)[0]
    assert torch.allclose(z9[..., 2:7, 2:7], z5, rtol=1e-8, atol=1e-15)
    assert z9.abs().max() > 0 and (z9[..., 0, :].abs().max() > 1e-3 * z5.abs().max())   # the new entries move too


def test_true_kernel_makes_the_data_and_the_error_ratio():
    """The semiblind true kernel (9×9, per channel sum 1) blurs x_true into exactly the noise-free
    data of make_data; for the other settings it is b₀.  kernel_error_ratio is 1 at b₀, 0 at the
    truth, and ‖b − b_true‖/‖b₀ − b_true‖ at a third kernel (compared at the common size)."""
    cfg, x_true, b0p, _ = case(noise_level=0.0)
    bt = true_kernel(cfg)
    assert bt.shape == (3, 1, 9, 9)
    assert torch.allclose(bt.sum(dim=(-2, -1)), torch.ones(3, 1), atol=1e-14)
    clean = make_data(cfg, ADP._IMAGES, CPU, torch.float64)[2]
    assert torch.allclose(Blur(bt, clean.shape[-2:]).A(x_true), clean, rtol=0, atol=1e-13)
    b0 = setting_kernels(cfg)[0]
    assert kernel_error_ratio(b0, b0, bt) == pytest.approx(1.0, rel=1e-14)
    assert kernel_error_ratio(bt, b0p, bt) == 0.0
    mid = 0.5 * (b0p + bt)
    assert kernel_error_ratio(mid, b0, bt) == pytest.approx(0.5, rel=1e-12)
    motion = dict(cfg, setting="motion")
    assert torch.equal(true_kernel(motion), setting_kernels(motion)[0])
    assert kernel_error_ratio(b0, b0, true_kernel(motion)) is None


# ------------------------------------------------------------------------------------------
# the composite objective: which prox, and what MAID does with it
# ------------------------------------------------------------------------------------------
def test_build_composite_pairs_the_penalty_with_the_right_prox():
    """h1_squared keeps β in g (no prox, or the simplex projection); h1 moves β (over upper_scale)
    into the prox, so g has no kernel penalty and g + r(b) is the h1_squared problem's data term
    plus β‖b − b₀‖_{H¹} at any b."""
    cfg, x_true, b0, y = case(beta=0.03)
    b = b0 + 1e-3 * rand(*b0.shape, seed=4)
    for penalty, constraint, kind in [("h1_squared", "none", type(None)), ("h1_squared", "simplex", SimplexConstraint),
                                      ("h1", "none", H1NormPenalty), ("h1", "simplex", SimplexH1Penalty)]:
        P, R = ADP.build_composite(dict(cfg, kernel_penalty=penalty, kernel_constraint=constraint), y, b0)
        assert isinstance(R, kind), (penalty, constraint)
        assert P.beta == (0.03 if penalty == "h1_squared" else 0.0)
    P, R = ADP.build_composite(dict(cfg, kernel_penalty="h1"), y, b0)
    Q = ADP.build_problem(dict(cfg, kernel_penalty="h1_squared"), y, b0)
    data = Q.upper_loss(x_true, b).item() - 0.03 * h1_penalty(b, b0).item()
    assert P.upper_loss(x_true, b).item() + R.value(b) == pytest.approx(data + 0.03 * math.sqrt(h1_penalty(b, b0)),
                                                                        rel=1e-12)
    # channels normalisation: the prox's weight is β/c, as the smooth penalty's
    c = ADP.upper_scale(dict(cfg, upper_normalisation="channels"), y)
    assert ADP.build_prox(dict(cfg, kernel_penalty="h1", upper_normalisation="channels"), y, b0).beta == \
        pytest.approx(0.03 / c, rel=1e-15)


def _run(cfg, b0, y, **maid_overrides):
    P, R = ADP.build_composite(cfg, y, b0)
    m = ADP.maid_config(dict(cfg, **maid_overrides))
    return P, R, maid.maid(P, b0.clone(), y.clone(), m, prox=R)


def test_simplex_constraint_holds_for_the_learned_kernel():
    """Squared H¹ + simplex: after a short run that accepts steps and moves the kernel, every
    channel of b* is ≥ 0 and sums to 1 (to 1e-12); without the constraint the same run's kernel
    gains mass (the learned operator's drift the constraint is there to stop)."""
    cfg, _, b0, y = case(kernel_constraint="simplex", beta=1e-3)
    _, _, res = _run(cfg, b0, y, eps0=1e-7, threshold=1e-11, upper_iter=6, step=10.0)
    b = res.theta
    assert sum(r["accepted"] for r in res.log) >= 4 and (b - b0).abs().max() > 1e-4
    assert b.min().item() >= 0
    assert torch.allclose(b.sum(dim=(-2, -1)), torch.ones(3, 1), rtol=0, atol=1e-12)
    _, _, free = _run(dict(cfg, kernel_constraint="none", kernel_penalty="h1", beta=1e-5), b0, y, eps0=1e-5,
                      threshold=1e-9, upper_iter=4, step=1000.0)
    assert free.theta.sum(dim=(-2, -1)).max().item() > 1.01


@pytest.mark.parametrize("constraint", ["none", "simplex"])
def test_unsquared_h1_by_prox_decreases_the_exact_composite_objective(constraint):
    """kernel_penalty = "h1": every accepted step decreases the exact F(b) = f(b) + β‖b − b₀‖_{H¹}
    (f with a lower level solved to 1e-10) by at least ηα‖G‖² minus the inexactness the test
    allows, strictly here; the run leaves b₀ (where the penalty is not differentiable) on the
    first step, and the logged objective is g + r at the iterate.  With β above the data term's
    dual-norm slope, b₀ is stationary and MAID stops at once ('converged', nothing moved)."""
    beta = 1e-5 if constraint == "none" else 1e-6
    cfg, _, b0, y = case(kernel_penalty="h1", kernel_constraint=constraint, beta=beta)
    P, R = ADP.build_composite(cfg, y, b0)
    m = ADP.maid_config(dict(cfg, eps0=1e-5, threshold=1e-9, upper_iter=5, step=1000.0))
    seen = []
    res = maid.maid(P, b0.clone(), y.clone(), m, prox=R, callback=lambda rec, st: seen.append((rec, st.theta.clone())))
    assert res.log[0]["accepted"] and not torch.equal(seen[0][1], b0)
    F = [exact_f(P, b0, y) + R.value(b0)]
    for rec, theta in seen:
        if rec["accepted"]:
            F.append(exact_f(P, theta, y) + R.value(theta))
            assert rec["objective"] == pytest.approx(rec["upper_loss"] + R.value(theta), rel=1e-12)
    assert len(F) >= 4
    assert all(b < a for a, b in zip(F, F[1:])), F
    if constraint == "simplex":
        assert torch.allclose(res.theta.sum(dim=(-2, -1)), torch.ones(3, 1), rtol=0, atol=1e-12)
    big = dict(cfg, beta=1.0)
    _, _, still = _run(big, b0, y, eps0=1e-5, threshold=1e-9, upper_iter=3, step=1000.0)
    assert still.stop_reason == "converged" and torch.equal(still.theta, b0)


def test_simplex_projection_is_feasible_in_float32():
    """A float32 projection onto the simplex counts as feasible (r = 0, not ∞: its channel sums are
    off by ~1e-7, above float64's 1e-9), so float32 runs with kernel_constraint = "simplex" can
    accept steps; a kernel off by 1e-3 is still infeasible."""
    v = 0.1 * torch.rand(3, 1, 9, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    b = SimplexConstraint().prox(v, 1.0)
    assert SimplexConstraint().value(b) == 0.0
    assert SimplexConstraint().value(b * 1.001) == math.inf
