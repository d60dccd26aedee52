"""Inexact stochastic hypergradient descent (ISGD) for finite-sum bilevel problems (SPEC §6).

    min_θ F(θ) = (1/N) Σ_i g_i(x̂_i(θ)),   x̂_i(θ) = argmin_x h_i(x, θ)

Step k on a mini-batch S_k (drawn without replacement, reshuffled every epoch):

    x̃_i ≈ x̂_i(θ_k) to accuracy ε_k, warm-started from sample i's last x̃_i (i ∈ S_k)
    z_k = inexact hypergradient of (1/|S_k|) Σ_{i∈S_k} g_i  (adjoint by CG to residual δ_k per sample)
    θ_{k+1} = θ_k − α_k z_k

with the schedules (:func:`power_schedule`) ``α_k = α₀ (k+1)^{−q}`` and ``ε_k = ε₀ (k+1)^{−p}``,
``δ_k = (δ₀/ε₀) ε_k``.  ``q = 0`` gives fixed steps; ``q ∈ (½, 1]`` the decreasing steps of the
convergence theory; ``p ≥ 0``.

Like :mod:`maid`, this module knows nothing about images.  A problem provides

``n_samples``
    N, the number of training samples;
``subset(idx) -> BilevelProblem``
    the bilevel problem of the mean loss over the samples ``idx`` (a :class:`maid.BilevelProblem`
    whose lower-level variable stacks the samples along dimension 0), and optionally
``project(theta) -> theta``
    a projection applied after every step (identity if absent).

Accuracy over a batch: ISGD asks ``subset(idx).solve_lower`` for the Euclidean accuracy
``ε_k √|S_k|`` over the stacked batch; a problem that certifies it per sample (as
:class:`dataset_problem.DatasetProblem` does, each sample to ``ε/√|S|``) then meets ε_k for every
sample.  ``δ_k`` is the adjoint residual of each sample's own system (right side ``∇ₓg_i``): the
mean over |S_k| samples scales the stacked adjoint system by 1/|S_k|, so ISGD asks for the
stacked residual ``δ_k/√|S_k|``, which a per-sample certificate (each sample ``≤ δ_k/|S_k|`` on
the stacked system) meets.  The hypergradient is
:func:`maid.hypergradient` on the subset problem, so ISGD and MAID share every derivative.

Cost axis: total computations = lower-level iterations + CG iterations, summed over the samples
of each batch (the problem's solvers report sums).  Warm starts (``x̃_i`` and the adjoint ``q̃_i``)
are kept per sample across epochs.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from maid import hypergradient

__all__ = ["power_schedule", "ISGDConfig", "ISGDState", "ISGDResult", "isgd"]


def power_schedule(v0: float, power: float) -> Callable[[int], float]:
    """``k ↦ v0 (k+1)^{−power}`` (k = 0, 1, …)."""
    return lambda k: v0 * (k + 1) ** (-power)


@dataclass
class ISGDConfig:
    """ISGD settings.  ``budget``: stop once lower + CG iterations reach it (0: no budget)."""

    step0: float = 1.0
    eps0: float = 1e-2
    delta0: float | None = None     # None: δ_k = ε_k
    p: float = 0.0                  # ε_k = ε₀ (k+1)^−p
    q: float = 0.0                  # α_k = α₀ (k+1)^−q
    batch_size: int = 8
    max_steps: int = 1000
    budget: int = 0
    lower_max_iter: int = 200
    cg_max_iter: int = 200
    seed: int = 0

    def validate(self, names: dict | None = None) -> None:
        def bad(name, what, v):
            raise ValueError(f"{(names or {}).get(name, name)} must {what}, got {v!r}")

        for name in ("step0", "eps0"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                bad(name, "be a positive finite number", v)
        if self.delta0 is not None and not (math.isfinite(self.delta0) and self.delta0 > 0):
            bad("delta0", "be a positive finite number", self.delta0)
        for name in ("p", "q"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                bad(name, "be a non-negative finite number", v)
        for name in ("batch_size", "max_steps", "lower_max_iter", "cg_max_iter"):
            if int(getattr(self, name)) < 1:
                bad(name, "be a positive integer", getattr(self, name))
        if self.budget < 0:
            bad("budget", "be ≥ 0", self.budget)


@dataclass
class ISGDState:
    """Everything needed to continue a run exactly (``torch.save``-able)."""

    theta: torch.Tensor
    x: torch.Tensor                  # warm starts, one per sample (N, ...)
    q: torch.Tensor                  # adjoint warm starts (N, ...)
    k: int = 0
    epoch: int = 0
    order: list = field(default_factory=list)    # the rest of this epoch's permutation
    rng_state: torch.Tensor | None = None
    lower_iters: int = 0
    cg_iters: int = 0
    lower_cap_hits: int = 0
    cg_cap_hits: int = 0
    elapsed: float = 0.0
    log: list = field(default_factory=list)

    @property
    def computations(self) -> int:
        return self.lower_iters + self.cg_iters


@dataclass
class ISGDResult:
    theta: torch.Tensor
    log: list
    stop_reason: str
    state: ISGDState


def _next_batch(s: ISGDState, n: int, size: int, gen: torch.Generator) -> tuple[list[int], list[int], int]:
    """``(batch, rest of the epoch, epoch)``: the next ``size`` indices of this epoch's permutation
    (a new epoch reshuffles; the last batch of an epoch may be smaller).  ``s`` is not changed, so
    a step interrupted before its end leaves the state as it was."""
    order, epoch = s.order, s.epoch
    if not order:
        order, epoch = torch.randperm(n, generator=gen).tolist(), epoch + 1
    return order[:size], order[size:], epoch


def isgd(problem, theta0: torch.Tensor | None = None, x0: torch.Tensor | None = None,
         config: ISGDConfig | None = None, state: ISGDState | None = None,
         callback: Callable[[dict, ISGDState], bool | None] | None = None) -> ISGDResult:
    """Run ISGD from ``(theta0, x0)`` (``x0``: initial lower-level iterates of all N samples) or
    continue from ``state``.  ``callback(record, state)`` after every step; ``True`` stops the run
    (its time is not counted in ``elapsed``).  Stop reasons: ``'budget'``, ``'max_steps'``,
    ``'non_finite'``, ``'callback'``."""
    cfg = config or ISGDConfig()
    cfg.validate()
    if state is None:
        if theta0 is None or x0 is None:
            raise ValueError("give either (theta0, x0) or a state to resume from")
        state = ISGDState(theta=theta0.clone(), x=x0.clone(), q=torch.zeros_like(x0))
    s = state
    gen = torch.Generator().manual_seed(cfg.seed)
    step_at, eps_at = power_schedule(cfg.step0, cfg.q), power_schedule(cfg.eps0, cfg.p)
    delta_ratio = 1.0 if cfg.delta0 is None else cfg.delta0 / cfg.eps0
    project = getattr(problem, "project", None)
    stop = "max_steps"
    while s.k < cfg.max_steps:
        if cfg.budget and s.computations >= cfg.budget:
            stop = "budget"
            break
        t0 = time.perf_counter()
        if s.rng_state is not None:
            gen.set_state(s.rng_state)
        idx, rest, epoch = _next_batch(s, problem.n_samples, cfg.batch_size, gen)
        sub = problem.subset(idx)
        eps, step = eps_at(s.k), step_at(s.k)
        root = math.sqrt(len(idx))
        low = sub.solve_lower(s.theta, s.x[idx], eps * root, cfg.lower_max_iter)
        s.lower_iters += low.iters
        s.lower_cap_hits += int(low.status == "max_iter")
        if low.status == "non_finite":
            stop = "non_finite"
            break
        z, q, cg_it, cg_ok = hypergradient(sub, low.x, s.theta, s.q[idx], delta_ratio * eps / root, cfg.cg_max_iter)
        s.cg_iters += cg_it
        s.cg_cap_hits += int(not cg_ok)
        loss = sub.upper_loss(low.x, s.theta).item()
        if not (math.isfinite(loss) and bool(torch.isfinite(z).all())):
            stop = "non_finite"
            break
        theta = s.theta - step * z
        # commit the step (an interrupt before this point leaves the state as it was)
        s.x[idx], s.q[idx] = low.x, q
        s.theta = project(theta) if project is not None else theta
        s.order, s.epoch, s.rng_state = rest, epoch, gen.get_state()
        s.k += 1
        s.elapsed += time.perf_counter() - t0
        record = dict(iter=s.k, epoch=s.epoch, batch_loss=loss, step=step, eps=eps, grad_norm=torch.linalg.vector_norm(z).item(),
                      lower_iters=s.lower_iters, cg_iters=s.cg_iters, computations=s.computations,
                      lower_cap_hits=s.lower_cap_hits, cg_cap_hits=s.cg_cap_hits, time=s.elapsed)
        s.log.append(record)
        if callback is not None and callback(record, s):
            stop = "callback"
            break
    else:
        stop = "budget" if cfg.budget and s.computations >= cfg.budget else "max_steps"
    return ISGDResult(s.theta, s.log, stop, s)
