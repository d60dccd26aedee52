"""Learn the weight of total-variation denoising with MAID, stating only the objectives.

    θ = log α,   x̂(θ) = argmin_x h(x, θ) = ½‖x − y‖² + e^θ Σ_pixels sqrt(|∇x|² + γ²)
    min_θ f(θ) = g(x̂(θ)),   g(x) = ‖x − x_true‖² / n

on a crop of scikit-image's ``camera`` with Gaussian noise (fixed seed).  The user writes h and
g with torch operations; :class:`maid.AutodiffProblem` gets ∇ₓh, ∇²ₓₓh v, ∂_θ⟨∇ₓh, q⟩ and ∇ₓg by
autograd, its default lower solver certifies ‖x̃ − x̂‖ ≤ ε from ``mu = 1`` (h is 1-strongly convex
through the data term), and ``L_g = 2/n`` is estimated by power iteration.  MAID runs with the
default ``MAIDConfig()`` from α₀ = 1e-3 and α₀ = 1; a dense grid on log α with tightly solved
lower levels (grid, then golden section) gives the PSNR-maximising α for comparison (PSNR = −10 log₁₀ g for images in [0, 1],
so maximising PSNR is minimising g).

    python examples/learn_tv_weight.py            # 64×64 crop, σ = 0.1, γ = 0.05
    python examples/learn_tv_weight.py --size 32
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from maid import AutodiffProblem, MAIDConfig, maid  # noqa: E402


def forward_differences(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical forward differences with Neumann boundary (last column/row 0)."""
    dh = torch.zeros_like(x)
    dv = torch.zeros_like(x)
    dh[..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]
    dv[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
    return dh, dv


def smoothed_tv(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """``Σ sqrt(|∇x|² + γ²)``."""
    dh, dv = forward_differences(x)
    return torch.sqrt(dh * dh + dv * dv + gamma * gamma).sum()


def make_data(size: int = 64, sigma: float = 0.1, seed: int = 0):
    """``(x_true, y)``: the central ``size×size`` crop of ``skimage.data.camera()`` in [0, 1] and
    ``y = x_true + σ N(0, I)``."""
    from skimage import data
    img = torch.tensor(data.camera(), dtype=torch.float64) / 255.0
    r0, c0 = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    x_true = img[r0:r0 + size, c0:c0 + size].clone()
    noise = torch.randn(x_true.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x_true, x_true + sigma * noise


def tv_weight_problem(x_true: torch.Tensor, y: torch.Tensor, gamma: float = 0.05) -> AutodiffProblem:
    """The bilevel problem above as an :class:`AutodiffProblem` (θ has shape (1,))."""
    n = y.numel()

    def lower(x, theta):
        return 0.5 * ((x - y) ** 2).sum() + torch.exp(theta).sum() * smoothed_tv(x, gamma)

    def upper(x, theta):
        return ((x - x_true) ** 2).sum() / n

    return AutodiffProblem(lower, upper, x_init=y, mu=1.0)


def psnr(mse: float) -> float:
    return -10 * math.log10(mse)


def best_alpha_by_search(problem: AutodiffProblem, lo: float = -7.0, hi: float = 1.0, points: int = 33,
                         tol: float = 1e-4, eps: float = 1e-8) -> tuple[float, float]:
    """``(α*, f(α*))``: a dense grid of ``points`` on ``log α ∈ [lo, hi]``, then golden-section
    search on the bracket around the best grid point down to a width ``tol`` in log α (f is
    unimodal there); each lower level solved to ``‖x̃ − x̂‖ ≤ eps`` (warm-started from the last
    solve), so f is exact up to ``2‖∇ₓg‖eps + L_g eps²`` — far below its changes at ``tol``."""
    x = problem.x_init

    def f(log_a):
        nonlocal x
        theta = torch.tensor([log_a], dtype=torch.float64)
        res = problem.solve_lower(theta, x, eps, 100000)
        if not res.converged:
            raise RuntimeError("dense search: a lower level was not solved to its tolerance")
        x = res.x
        return problem.upper_loss(res.x, theta).item()

    grid = torch.linspace(lo, hi, points).tolist()
    vals = [f(t) for t in grid]
    i = min(range(points), key=vals.__getitem__)
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, points - 1)]
    r = (math.sqrt(5) - 1) / 2
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = f(d)
    t, ft = (c, fc) if fc <= fd else (d, fd)
    return math.exp(t), ft


def learn(problem: AutodiffProblem, alpha0: float, config: MAIDConfig | None = None):
    """MAID from ``θ₀ = log α₀``; returns the :class:`maid.MAIDResult`."""
    return maid(problem, torch.tensor([math.log(alpha0)], dtype=torch.float64), config=config)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--sigma", type=float, default=0.1)
    ap.add_argument("--gamma", type=float, default=0.05)
    args = ap.parse_args(argv)
    x_true, y = make_data(args.size, args.sigma)
    problem = tv_weight_problem(x_true, y, args.gamma)
    a_best, f_best = best_alpha_by_search(problem)
    print(f"dense search on log α (grid, then golden section to 1e-4): α* = {a_best:.5g} (PSNR {psnr(f_best):.3f} dB; noisy input "
          f"{psnr(((y - x_true) ** 2).mean().item()):.3f} dB)")
    out = {"alpha_best": a_best}
    for alpha0 in (1e-3, 1.0):
        res = learn(problem, alpha0)
        a = math.exp(res.theta.item())
        acc = sum(r["accepted"] for r in res.log)
        print(f"MAID from α₀ = {alpha0:g}: α = {a:.5g} ({100 * (a / a_best - 1):+.2f} % from α*), "
              f"{len(res.log)} iterations ({acc} accepted), stop: {res.stop_reason}, "
              f"{res.state.lower_iters} lower + {res.state.cg_iters} CG iterations")
        out[alpha0] = a
    return out


if __name__ == "__main__":
    main()
