"""How fast could ADP-MAID reach the 1D target at best?  (issue: MAID ≤ ½ of LISTA's time)

``python ADP_1D.py`` reports, per method, the cumulative lower-level iterations it needed to
reach IFT's final loss + 1 % (column ``it→IFT+1%``; default run: MAID 33000, LISTA 3800 =
76 steps × 50 layers).  This script times, in one run and on the SPEC §4.1 data (n = 200, float64,
1 thread like ADP_1D.py):

* ``N`` bare proximal-gradient steps ``x ↦ S_λ(Mx + c)`` (``elastic_net.prox_grad_step``, the
  operators precomputed, no stopping test, no MAID bookkeeping): a lower bound on what MAID's
  lower solves cost, whatever the rest of MAID does;
* the same ``N`` steps as a NumPy loop (another BLAS, smaller per-call overhead);
* ``K`` ADP LISTA steps (``elastic_net.lista_step``, 50 layers, autograd) from ``B = A``.

and prints the ratio (floor of MAID) / (LISTA) against the target 0.5.

    python benchmarks/bench_1d_floor.py [--maid_lower_iters 33000] [--lista_steps 76] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from elastic_net import ElasticNetBilevel, lista_step, make_data, prox_grad_step  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--maid_lower_iters", type=int, default=33000,
                    help="MAID's lower-level iterations to the target (ADP_1D.py's it→IFT+1%% column)")
    ap.add_argument("--lista_steps", type=int, default=76,
                    help="LISTA steps to the target (its it→IFT+1%% / 50 layers)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t, x_true, A, y = make_data()
    problem = ElasticNetBilevel(A, y, 0.108, 0.027, step=0.1, x_true=x_true)
    M, c, lam, _, _ = problem.lower_operators(A)
    x0 = torch.zeros_like(y)
    Mn, cn = M.numpy(), c.numpy()

    def torch_steps():
        x = x0
        for _ in range(args.maid_lower_iters):
            x = prox_grad_step(x, M, c, lam)
        return x

    def numpy_steps():
        x = x0.numpy()
        for _ in range(args.maid_lower_iters):
            z = Mn @ x
            z += cn
            x = np.sign(z) * np.maximum(np.abs(z) - lam, 0.0)
        return x

    def lista():
        B, x = A.clone(), x0
        for _ in range(args.lista_steps):
            B, x, _ = lista_step(problem, B, x, 50, 0.1)
        return x

    fns = {"torch": torch_steps, "numpy": numpy_steps, "lista": lista}
    assert np.allclose(torch_steps().numpy(), numpy_steps(), atol=1e-12)
    samples = {k: [] for k in fns}
    for r in range(args.repeats):                       # interleaved: noise hits all alike
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            samples[k].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
    n = args.maid_lower_iters
    print(f"torch {torch.__version__}, {args.threads} thread(s), float64, n = 200, median of {args.repeats} interleaved rounds")
    print(f"{n} bare proximal-gradient steps, torch : {med['torch']:.3f} s ({1e6 * med['torch'] / n:.1f} µs/step)")
    print(f"{n} bare proximal-gradient steps, numpy : {med['numpy']:.3f} s ({1e6 * med['numpy'] / n:.1f} µs/step)")
    print(f"{args.lista_steps} LISTA steps (50 layers, autograd)  : {med['lista']:.3f} s")
    best = min(med["torch"], med["numpy"])
    print(f"floor_ratio MAID/LISTA={best / med['lista']:.2f} (target <= 0.5; MAID's own run adds CG, line search and "
          f"stopping tests on top of this floor)")


if __name__ == "__main__":
    main()
