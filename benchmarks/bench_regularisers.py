"""Regularisers: closed-form gradient and HVP against the autograd fallback of the same value.

Run from the repository root (CPU by default)::

    python benchmarks/bench_regularisers.py [--size 96] [--batches 1 8 32] [--threads N]
                                            [--repeats R] [--dtype float32] [--device cpu]

For each regulariser (Fields of Experts with the SPEC §6 default of 10 filters 7×7 over 3
channels, anisotropic TV, smoothed TV) and each batch size N, on ``N×3×size×size`` images
(STL-10's 96×96 by default), times in the same run, interleaved (``bench_core.time_interleaved``):

* ``grad``: ``R.grad(x)`` against ``Regulariser.grad(R, x)`` (reverse mode on ``R.value``);
* ``hvp (new x)``: ``R.hvp(x, v)`` (closed form, its curvature built for this ``x``) against
  ``Regulariser.hvp(R, x, v)`` (double backward, the gradient graph built for this product);
* ``hvp (fixed x)``: products at a fixed ``x`` as conjugate gradient makes them:
  ``R.curvature(x).add_hvp_`` with the curvature built once, against autograd with the graph of
  ``∇R(x)`` built once and reused (``retain_graph``, the base class's own curvature object).

Each row prints both times (ms, median of interleaved rounds) and the ratio autograd / closed form
(> 1: the closed form is faster), after checking that both agree (max relative deviation printed).
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

from bench_core import _rel_err, ms, time_interleaved  # noqa: E402
from regularisers import AnisotropicTV, FieldsOfExperts, Regulariser, SmoothedTV, _GraphCurvature  # noqa: E402


def regularisers(channels: int, dtype, device) -> dict:
    """name → regulariser; weights and smoothings of the order the experiments use."""
    return {
        "FoE 10x7x7": FieldsOfExperts(channels, n_filters=10, size=7, smoothing=1e-4, scale=1e-2, dtype=dtype,
                                      device=device),
        "AnisotropicTV": AnisotropicTV(0.005, 0.01),
        "SmoothedTV": SmoothedTV(0.005, 0.01),
    }


def bench_one(R: Regulariser, x: torch.Tensor, v: torch.Tensor, repeats: int, device) -> dict:
    """Times (s) and agreement of closed form vs autograd for ``R`` at ``x`` (direction ``v``)."""
    closed_curv = R.curvature(x)
    graph_curv = _GraphCurvature(R, x)
    err = max(_rel_err(R.grad(x), Regulariser.grad(R, x)), _rel_err(R.hvp(x, v), Regulariser.hvp(R, x, v)),
              _rel_err(closed_curv.add_hvp_(torch.zeros_like(v), v), graph_curv.add_hvp_(torch.zeros_like(v), v)))
    t = time_interleaved({
        "grad_closed": lambda: R.grad(x),
        "grad_autograd": lambda: Regulariser.grad(R, x),
        "hvp_closed": lambda: R.hvp(x, v),
        "hvp_autograd": lambda: Regulariser.hvp(R, x, v),
        "cg_closed": lambda: closed_curv.add_hvp_(torch.zeros_like(v), v),
        "cg_autograd": lambda: graph_curv.add_hvp_(torch.zeros_like(v), v),
    }, repeats=repeats, number=3, device=device)
    t["err"] = err
    return t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch.get_num_threads())")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, device {args.device}, {args.dtype}, threads {torch.get_num_threads()}, "
          f"median of {args.repeats} interleaved rounds; ratio = autograd / closed form")
    print(f"{'regulariser':<14}{'N':>4}  {'grad ms':>17}{'ratio':>7}  {'hvp new x ms':>17}{'ratio':>7}  "
          f"{'hvp fixed x ms':>17}{'ratio':>7}{'rel.err':>9}")
    g = torch.Generator().manual_seed(0)
    for name, R in regularisers(args.channels, dtype, args.device).items():
        for n in args.batches:
            shape = (n, args.channels, args.size, args.size)
            x = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=args.device)
            v = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=args.device)
            t = bench_one(R, x, v, args.repeats, args.device)
            cols = []
            for which in ("grad", "hvp", "cg"):
                c, a = t[f"{which}_closed"], t[f"{which}_autograd"]
                cols.append(f"{ms(c).strip():>8}/{ms(a).strip():>8}{a / c:6.2f}x")
            print(f"{name:<14}{n:>4}  " + "  ".join(cols) + f"{t['err']:9.1e}")


if __name__ == "__main__":
    main()
