"""Training throughput of the dataset-level problem: closed-form regulariser derivatives against
autograd, for TV and FoE, across batch sizes.

    python benchmarks/bench_train.py [--size 96] [--batches 1,4,16] [--threads 1] [--repeats 3]

For each regulariser (``tv``: per-channel learnable smoothed TV; ``foe``: 10 filters 7×7) and
batch size B it measures, on the same data in the same run,

* **lower-level throughput**: ``dataset_problem.batched_fista`` run for a fixed number of
  iterations (tolerance 0, so no sample stops early) → lower-level iterations × images per second;
* **ISGD step**: one step's lower solve (25 iterations per image), CG (25 per image) and the mixed
  product → computations (lower + CG iterations summed over images) per second,

with the regulariser's closed forms (``regularisers.SmoothedTV``/``FieldsOfExperts``: ``grad``
and ``hvp`` written as stencils/convolutions) and with the base class's autograd fallback on the
same ``value`` (``Regulariser.grad``: reverse mode; ``Regulariser.hvp``: double backward).  It
prints the ratios closed form / autograd measured in this run.  Median of ``--repeats``, timed by
the process's CPU time (``--wall``: wall clock), so that with ``--threads 1`` a loaded machine
does not distort the ratios.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from dataset_problem import DatasetProblem, batched_fista, make_parametrisation  # noqa: E402
from maid import hypergradient  # noqa: E402
from regularisers import Regulariser  # noqa: E402


class AutogradOnly(Regulariser):
    """The same ``value`` as ``inner``; ``grad``/``hvp`` from the base class (autograd)."""

    def __init__(self, inner):
        self.inner = inner

    def value(self, x):
        return self.inner.value(x)

    def parameters(self):
        return self.inner.parameters()

    def lipschitz(self):
        return self.inner.lipschitz()


def _problem(kind: str, B: int, size: int, autograd: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, 1, size, size, generator=g, dtype=torch.float64)
    y = x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    par = make_parametrisation(kind, 1, foe_scale=0.05)
    if autograd:
        closed = par.regulariser
        par.regulariser = lambda theta: AutogradOnly(closed(theta))
    return DatasetProblem(x, y, par), y


def _timed(f, repeats: int, clock=time.process_time) -> float:
    """Median seconds of ``f()`` on ``clock``: process CPU time by default, which with one thread
    is the work done whatever else the machine runs (wall time on a shared machine is inflated by
    the other processes' load; ``--wall`` uses it anyway)."""
    f()                                            # warm-up
    ts = []
    for _ in range(repeats):
        t0 = clock()
        f()
        ts.append(clock() - t0)
    return statistics.median(ts)


def lower_throughput(kind, B, size, autograd, iters, repeats, clock=time.process_time) -> float:
    """Lower-level iterations × images per second."""
    P, y = _problem(kind, B, size, autograd)
    theta = P.param.initial()
    _, _, mu, L = P._parts(theta)
    t = _timed(lambda: batched_fista(lambda xs, idx: P.lower_grad(xs, theta, P.y[idx]), y.clone(), L, mu, 0.0,
                                     iters), repeats, clock)
    return iters * B / t


def step_throughput(kind, B, size, autograd, iters, repeats, clock=time.process_time) -> float:
    """Computations per second of one ISGD step (lower solve + CG + mixed product)."""
    P, y = _problem(kind, B, size, autograd)
    theta = P.param.initial()
    counts = {}

    def step():
        low = P.solve_lower(theta, y.clone(), 0.0, iters)
        _, _, it, _ = hypergradient(P, low.x, theta, None, 0.0, iters)
        counts["c"] = low.iters + it
    t = _timed(step, repeats, clock)
    return counts["c"] / t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--wall", action="store_true", help="time by the wall clock instead of process CPU time")
    a = ap.parse_args(argv)
    clock = time.perf_counter if a.wall else time.process_time
    torch.set_num_threads(a.threads)
    batches = [int(b) for b in a.batches.split(",")]
    print(f"{a.size}×{a.size} grey, float64, {a.threads} thread(s), {'wall' if a.wall else 'CPU'} time, median of {a.repeats}; "
          f"throughput in lower iterations × images / s and ISGD-step computations / s")
    print(f"{'reg':4s} {'B':>4s} {'lower closed':>13s} {'lower autograd':>15s} {'ratio':>6s} "
          f"{'step closed':>12s} {'step autograd':>14s} {'ratio':>6s}")
    for kind in ("tv", "foe"):
        for B in batches:
            lc = lower_throughput(kind, B, a.size, False, a.iters, a.repeats, clock)
            la = lower_throughput(kind, B, a.size, True, a.iters, a.repeats, clock)
            sc = step_throughput(kind, B, a.size, False, a.iters, a.repeats, clock)
            sa = step_throughput(kind, B, a.size, True, a.iters, a.repeats, clock)
            print(f"{kind:4s} {B:4d} {lc:13.0f} {la:15.0f} {lc / la:6.2f} {sc:12.0f} {sa:14.0f} {sc / sa:6.2f}")


if __name__ == "__main__":
    main()
