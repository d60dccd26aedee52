"""The batched bilevel problem of SPEC §6: per-sample solvers and the hypergradient against
central finite differences of F(θ) (float64, lower level solved to ‖x̃ − x̂‖ ≤ 1e-11)."""
import math

import pytest
import torch
from conftest import rand

from dataset_problem import DatasetProblem, batched_cg, batched_fista, make_parametrisation, per_sample_norm
from maid import hypergradient
from operators import gaussian_kernel


def _problem(kind="tv", semiblind=False, blur=False, n=3, C=1, size=10, seed=0):
    x = torch.rand(n, C, size, size, generator=torch.Generator().manual_seed(seed))
    y = x + 0.1 * rand(n, C, size, size, seed=seed + 1)
    k0 = gaussian_kernel(3, 0.7, C, dtype=torch.float64)
    par = make_parametrisation(kind, C, tv_weight=0.05, tv_smoothing=0.05, foe_filters=3, foe_size=3, foe_scale=0.05,
                               foe_smoothing=1e-2, kernel0=k0 if semiblind else None)
    return DatasetProblem(x, y, par, kernel=k0 if blur else None, mu0=0.5 if (semiblind or blur) else 0.0), y


def _exact_F(P, y):
    def F(theta):
        low = P.solve_lower(theta, y.clone(), 1e-11, 20000)
        assert low.converged
        return P.upper_loss(low.x, theta)
    return F


def _fd_check(P, y, theta, n_dirs=3):
    """z from :func:`maid.hypergradient` at (ε, δ) = (1e-11, 1e-12) against central differences
    (h = 1e-5) along random directions.  Tolerance 1e-6 relative to ‖z‖: the FD truncation error is
    O(h²)·|F'''| ≈ 1e-10 and the solve errors O(ε/h) ≈ 1e-6·|∇ₓg| ≪ that; a dropped term (data
    part of the mixed product, a factor 1/B) changes z by O(‖z‖)."""
    low = P.solve_lower(theta, y.clone(), 1e-11, 20000)
    z, _, _, ok = hypergradient(P, low.x, theta, None, 1e-12, 2000)
    assert ok
    F = _exact_F(P, y)
    for s in range(n_dirs):
        d = rand(theta.numel(), seed=10 + s)
        fd = (float(F(theta + 1e-5 * d)) - float(F(theta - 1e-5 * d))) / 2e-5
        assert abs(torch.dot(z, d).item() - fd) <= 1e-6 * torch.linalg.vector_norm(z).item() * d.norm().item()


def test_hypergradient_tv_denoising_matches_finite_differences():
    P, y = _problem("tv")
    _fd_check(P, y, P.param.initial() + 0.3 * rand(2, seed=3))


def test_hypergradient_tv_semiblind_kernel_matches_finite_differences():
    """θ = (TV weight, smoothing, 3×3 kernel); the kernel enters the data term of ∇ₓh."""
    P, y = _problem("tv", semiblind=True)
    _fd_check(P, y, P.param.initial())


def test_hypergradient_foe_colour_matches_finite_differences():
    """θ = (3 filters 3×3×3 over all channels, log weights, s, c) on colour images: filters,
    weights, smoothing and scale all enter through the closed-form FoE gradient."""
    P, y = _problem("foe", C=3, n=2, size=8)
    _fd_check(P, y, P.param.initial())


def test_foe_filters_stay_zero_mean_along_any_step():
    """The parametrisation makes the filters zero-mean whatever θ is (no projection needed)."""
    P, _ = _problem("foe", C=3)
    theta = P.param.initial() + rand(P.param.numel, seed=4)
    f = P.param.regulariser(theta).filters
    assert f.mean(dim=(1, 2, 3)).abs().max() < 1e-15


def test_hypergradient_of_batch_is_mean_of_per_sample_hypergradients():
    """Reference: each sample's problem alone; the batch's z must be their mean (not the sum)."""
    P, y = _problem("tv", n=3)
    theta = P.param.initial()
    low = P.solve_lower(theta, y.clone(), 1e-11, 20000)
    z, *_ = hypergradient(P, low.x, theta, None, 1e-12, 2000)
    zs = []
    for i in range(3):
        S = P.subset([i])
        li = S.solve_lower(theta, y[i:i + 1].clone(), 1e-11, 20000)
        zs.append(hypergradient(S, li.x, theta, None, 1e-12, 2000)[0])
    torch.testing.assert_close(z, torch.stack(zs).mean(0), rtol=1e-8, atol=1e-14)


def test_batched_fista_certifies_each_sample_and_sums_iterations():
    """Per-sample stopping: every sample meets ‖∇ₓh_i‖ ≤ μ ε/√B, and the result and the iteration
    count equal those of solving each sample alone (the same deterministic iteration)."""
    P, y = _problem("tv", blur=True, n=3)
    theta = P.param.initial()
    eps = 1e-4
    low = P.solve_lower(theta, y.clone(), eps, 5000)
    mu = P.strong_convexity(theta)
    g = P.lower_grad(low.x, theta, P.y)
    assert (per_sample_norm(g) <= mu * eps / math.sqrt(3)).all()
    total = 0
    for i in range(3):
        S = P.subset([i])
        li = S.solve_lower(theta, y[i:i + 1].clone(), eps / math.sqrt(3), 5000)
        torch.testing.assert_close(li.x[0], low.x[i], rtol=0, atol=1e-12)
        total += li.iters
    assert total == low.iters and low.converged


def test_batched_fista_reports_cap_hit():
    P, y = _problem("tv")
    low = P.solve_lower(P.param.initial(), y.clone(), 1e-12, 3)
    assert not low.converged and low.status == "max_iter" and low.iters == 3 * 3


def test_batched_cg_solves_each_block_to_its_residual():
    """Block-diagonal SPD system with very different blocks: each sample's residual ≤ tol and the
    solution matches a dense solve (reference: torch.linalg.solve)."""
    B, n = 3, 6
    Ms = []
    for i in range(B):
        G = rand(n, n, seed=i)
        Ms.append(G @ G.T + (0.1 + 10 * i) * torch.eye(n))
    M = torch.stack(Ms)
    rhs = rand(B, n, seed=9)

    def apply(v, idx):
        return torch.einsum("bij,bj->bi", M[idx], v)

    q, it, ok = batched_cg(apply, rhs, None, 1e-10, 100)
    assert ok and it <= B * n + B
    assert (per_sample_norm(rhs - apply(q, torch.arange(B))) <= 1e-10).all()
    torch.testing.assert_close(q, torch.linalg.solve(M, rhs), rtol=1e-8, atol=1e-10)
    q2, it2, _ = batched_cg(apply, rhs, q, 1e-10, 100)     # warm start at the solution: no iterations
    assert it2 == 0


_DP_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
torch.set_default_dtype(torch.float64); torch.set_num_threads(1)
import torch.distributed as dist
from test_dataset_problem import _problem
from dataset_problem import DataParallelProblem
from isgd import ISGDConfig, isgd
rank, world = int(sys.argv[1]), int(sys.argv[2])
if world > 1:
    dist.init_process_group("gloo", init_method="file://{store}", rank=rank, world_size=world)
P, y = _problem("foe", n=6, size=10)
P = DataParallelProblem(P) if world > 1 else P
res = isgd(P, P.param.initial() if world == 1 else P.p.param.initial(), y.clone(),
           ISGDConfig(step0=50.0, eps0=1e-3, delta0=1e-7, batch_size=5, max_steps=3))
if rank == 0:
    torch.save({{"theta": res.theta, "lower": res.state.lower_iters, "cg": res.state.cg_iters}}, {out!r})
"""


@pytest.mark.slow
def test_data_parallel_over_two_gloo_processes_matches_one_process(tmp_path):
    """Two CPU processes (gloo), batch 5 split 3 + 2: same θ after 3 ISGD steps as one process
    (up to the order of the final sum in the mixed product: rtol 1e-10) and the same summed
    lower-level and CG iteration counts (the per-sample stopping tests are unchanged)."""
    import os
    import subprocess
    import sys
    tests = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(tests)

    def launch(world, out):
        code = _DP_SCRIPT.format(root=root, tests=tests, store=str(tmp_path / f"store{world}"), out=str(out))
        procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(world)]) for r in range(world)]
        assert all(p.wait(timeout=300) == 0 for p in procs)
        return torch.load(out)

    one = launch(1, tmp_path / "one.pt")
    two = launch(2, tmp_path / "two.pt")
    torch.testing.assert_close(two["theta"], one["theta"], rtol=1e-10, atol=1e-14)
    assert (two["lower"], two["cg"]) == (one["lower"], one["cg"]) and one["cg"] > 0


@pytest.mark.parametrize("kind, semiblind, blur", [("foe", False, False), ("foe", True, False), ("tv", False, True)])
def test_per_sample_chunks_give_the_whole_stack_result(kind, semiblind, blur):
    """``lower_grad`` and the HVP evaluated one sample at a time (the default ``chunk = 1``, for the
    cache) equal one call on the whole stack (``chunk = B``) to rounding (1e-14 relative), for FoE,
    a learned kernel and a fixed blur with μ₀ > 0."""
    P, y = _problem(kind, semiblind=semiblind, blur=blur, n=5, C=1, size=12)
    theta = P.param.initial() + 0.1 * rand(P.param.numel, seed=6)
    x, v = rand(5, 1, 12, 12, seed=7), rand(5, 1, 12, 12, seed=8)
    assert P.chunk == 1
    parts = P.lower_grad(x, theta, y), P.hessian_vp(x, theta, v)
    P.chunk = 5
    whole = P.lower_grad(x, theta, y), P.hessian_vp(x, theta, v)
    for a, b in zip(parts, whole):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14 * b.abs().max().item())


def test_subset_keeps_the_chunk_size_and_the_data():
    """``subset`` selects the samples in the given order and keeps the per-sample chunk size (a
    subset made for ISGD's mini-batch evaluates with the same chunking as its parent)."""
    P, _ = _problem("foe", semiblind=False, blur=False, n=5, C=1, size=12)
    P.chunk = 3
    sub = P.subset([4, 1])
    assert sub.chunk == 3
    torch.testing.assert_close(sub.y, P.y[[4, 1]], rtol=0, atol=0)
    torch.testing.assert_close(sub.x_true, P.x_true[[4, 1]], rtol=0, atol=0)
