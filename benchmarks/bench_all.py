"""All speed numbers of the project in one run (issue 6).

    python benchmarks/bench_all.py [--threads N] [--skip-default-run] [--repeats R]

Sections (each on the CPU, float32, with the stated thread count; and, where CUDA is
available, the same rows again on the GPU, labelled by the device column):

1. one lower-level iteration and one Hessian-vector product, closed form vs autograd, at
   3×256×256 (``bench_core.bench_lower_level``: definitions there), in float32 and also in
   float64 (ADP.py's default dtype);
2. the circular blur via deepinv's physics, a direct ``conv2d`` and our FFT operator
   (``bench_core.bench_blur``);
3. one full hypergradient at fixed accuracies with the project's own code
   (``adp_problem.ADPBetaProblem`` + ``maid.hypergradient``): a lower-level solve to
   ``ε = 1e-2`` cold-started from ``y``, CG to residual ``δ = 1e-6`` cold-started from 0, and the
   mixed term; 3×256×256, kernel ``b = b₀`` (5×5 diagonal motion), ADP.py's default α, γ, μ₀, β
   (read from ``ADP.DEFAULTS``, built by ``ADP.build_problem``);
4. the default ``ADP.py`` run end to end, as a subprocess ``python ADP.py --results_dir=<tmp>``
   (skipped with ``--skip-default-run``; ``nan`` if ADP.py is missing or fails);
5. the cost of one upper iteration, defined as a fixed amount of work so that sizes compare:
   ``UPPER_LOWER_ITERS`` warm-started lower-level iterations (``problem.solve_lower`` with
   ``ε = 0``, so it runs exactly that many) + ``maid.hypergradient`` with exactly
   ``UPPER_CG_ITERS`` CG iterations (``δ = 0``) and the mixed term, at 128², 256², 512² and 1024²
   RGB; the growth exponent ``p`` in ``time ∝ pixels^p`` is the least-squares slope of
   log time against log pixel count.

The last line is ``iteration_speedup=<r> hvp_speedup=<r> default_run_s=<s> scaling_exponent=<e>``
(CPU values; the speedups are those of section 1 in float32, the HVP one being the smaller of
its two ratios).  Sections 2, 3 and 5 run in float32.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

from bench_core import (bench_blur, bench_lower_level, make_problem,  # noqa: E402
                        _sync, print_blur, print_lower_level, time_interleaved)
import ADP  # noqa: E402  (importing the driver has no side effects)
from maid import hypergradient  # noqa: E402

HG_EPS, HG_DELTA = 1e-2, 1e-6    # section 3: fixed accuracies
HG_MAX_ITER = 5000               # caps (reported if hit)
UPPER_LOWER_ITERS, UPPER_CG_ITERS = 50, 10   # section 5: the fixed work of one upper iteration
SCALING_SIZES = (128, 256, 512, 1024)


def _adp_problem(P):
    """ADP.py's problem with its current defaults (regulariser, α, γ, μ₀, β, upper operator) on
    ``P``'s data."""
    return ADP.build_problem(ADP.DEFAULTS, P.y, P.b)


def _problem(size: int, device, dtype=torch.float32):
    P = make_problem(size, 3, dtype, device)
    return P, _adp_problem(P), P.b


# --------------------------------------------------------------------------------------------
# 3. one full hypergradient at fixed accuracies
# --------------------------------------------------------------------------------------------
def bench_hypergradient(device="cpu", size: int = 256, repeats: int = 3) -> dict:
    """Median times (s) of the three parts of one hypergradient and the iteration counts."""
    P, _, b = _problem(size, device)
    runs = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        prob = _adp_problem(P)   # fresh: h(·, b) is built in the solve
        low = prob.solve_lower(b, P.y, HG_EPS, HG_MAX_ITER)
        _sync(device)
        t1 = time.perf_counter()
        rhs = prob.upper_grad_x(low.x, b)
        q, cg_it, cg_ok = prob.solve_adjoint(low.x, b, rhs, None, HG_DELTA, HG_MAX_ITER)
        _sync(device)
        t2 = time.perf_counter()
        z = prob.upper_grad_theta(low.x, b) - prob.mixed_vjp(low.x, b, q)
        _sync(device)
        t3 = time.perf_counter()
        runs.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
    # the same computation through maid.hypergradient, checked equal (the timed parts above
    # are its body, split to attribute the time)
    z_ref, _, it_ref, _ = hypergradient(prob, low.x, b, None, HG_DELTA, HG_MAX_ITER)
    assert it_ref == cg_it and torch.allclose(z, z_ref), "split hypergradient differs from maid.hypergradient"
    med = [statistics.median(r[i] for r in runs) for i in range(4)]
    return dict(lower_s=med[0], cg_s=med[1], mixed_s=med[2], total_s=med[3], lower_iters=low.iters,
                lower_ok=low.converged, cg_iters=cg_it, cg_ok=cg_ok, z_norm=torch.linalg.vector_norm(z).item())


def print_hypergradient(r: dict, device, size: int = 256) -> None:
    flag = lambda ok: "" if ok else " (cap hit)"  # noqa: E731
    print(f"{str(device):>6} 3x{size}x{size} eps={HG_EPS:g} delta={HG_DELTA:g}: total {r['total_s']:.3f} s = "
          f"lower {r['lower_s']:.3f} s ({r['lower_iters']} it{flag(r['lower_ok'])}, "
          f"{1e3 * r['lower_s'] / max(r['lower_iters'], 1):.2f} ms/it) + CG {r['cg_s']:.3f} s "
          f"({r['cg_iters']} it{flag(r['cg_ok'])}) + mixed term/upper grads {1e3 * r['mixed_s']:.1f} ms;"
          f" |z| = {r['z_norm']:.3e}")


# --------------------------------------------------------------------------------------------
# 4. the default ADP.py run
# --------------------------------------------------------------------------------------------
def default_run(skip: bool, threads: int | None = None) -> tuple[float, str]:
    """Wall time (s) of ``python ADP.py --results_dir=<tmp>`` and a note.  With ``threads`` the
    subprocess gets ``OMP_NUM_THREADS=threads`` (torch's CPU thread count); otherwise torch's
    default there."""
    script = os.path.join(ROOT, "ADP.py")
    if skip:
        return math.nan, "skipped: --skip-default-run"
    if not os.path.exists(script):
        return math.nan, "ADP.py missing"
    with tempfile.TemporaryDirectory(prefix="bench_adp_") as tmp:
        t0 = time.perf_counter()
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        proc = subprocess.run([sys.executable, script, f"--results_dir={tmp}"], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return math.nan, f"ADP.py failed with exit status {proc.returncode}: {' | '.join(tail)}"
    used = f"OMP_NUM_THREADS={threads}" if threads else f"torch's default threads, {os.cpu_count()} cores here"
    return wall, f"python ADP.py --results_dir=<tmp>: exit status 0, device 'auto', {used}"


# --------------------------------------------------------------------------------------------
# 5. cost of one upper iteration against the image size
# --------------------------------------------------------------------------------------------
def upper_iteration(prob, b, x0):
    """The fixed work of one upper iteration (see the module docstring)."""
    low = prob.solve_lower(b, x0, 0.0, UPPER_LOWER_ITERS)
    z, q, it, _ = hypergradient(prob, low.x, b, None, 0.0, UPPER_CG_ITERS)
    assert low.iters == UPPER_LOWER_ITERS and it == UPPER_CG_ITERS
    return z


def bench_scaling(device="cpu", sizes=SCALING_SIZES, repeats: int = 3) -> dict:
    """``{size: median seconds of one upper iteration}`` and the fitted exponent."""
    out = {}
    for s in sizes:
        P, prob, b = _problem(s, device)
        x0 = prob.solve_lower(b, P.y, 0.0, 5).x     # a nearby point: warm start
        out[s] = time_interleaved({s: lambda: upper_iteration(prob, b, x0)}, repeats=repeats, number=1,
                                  warmup=1, device=device)[s]
    lx = [math.log(s * s) for s in sizes]
    ly = [math.log(out[s]) for s in sizes]
    slope = statistics.linear_regression(lx, ly).slope
    last = (ly[-1] - ly[-2]) / (lx[-1] - lx[-2]) if len(sizes) > 1 else math.nan
    return dict(times=out, exponent=slope, exponent_last=last)


def print_scaling(r: dict, device) -> None:
    print(f"{'device':>6} {'image':>12} {'pixels':>9} {'upper iter s':>13} {'ns/pixel':>9}")
    for s, t in r["times"].items():
        print(f"{str(device):>6} {f'3x{s}x{s}':>12} {s * s:>9d} {t:13.4f} {1e9 * t / (s * s):9.1f}")
    s = list(r["times"])
    print(f"{str(device):>6} growth exponent (least squares, log time vs log pixels): {r['exponent']:.3f}; "
          f"between the two largest sizes ({s[-2]}² to {s[-1]}²): {r['exponent_last']:.3f}")


# --------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch.get_num_threads())")
    ap.add_argument("--repeats", type=int, default=9, help="interleaved rounds of sections 1-2")
    ap.add_argument("--skip-default-run", action="store_true", help="do not run ADP.py (section 4)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    t_start = time.perf_counter()
    print(f"torch {torch.__version__}; devices: {', '.join(devices)}; float32 unless stated; CPU threads "
          f"{torch.get_num_threads()}; times are medians of interleaved repeats")

    print("\n== 1. lower level: closed form vs autograd (3x256x256) ==")
    core = {}
    for dev in devices:
        for dtype in (torch.float32, torch.float64):
            t = bench_lower_level(256, 3, dtype, dev, repeats=args.repeats)
            print_lower_level(t, 256, 3, dev, label_device=True)
            core.setdefault(dev, t)             # the float32 numbers go to the last line

    print("\n== 2. blur B_b: deepinv physics vs direct conv2d vs our FFT operator ==")
    for dev in devices:
        print_blur(bench_blur(256, 3, torch.float32, dev, repeats=args.repeats), 256, 3, dev, label_device=True)

    print("\n== 3. one full hypergradient (lower solve + CG + mixed term), fixed accuracies ==")
    for dev in devices:
        print_hypergradient(bench_hypergradient(dev), dev)

    print("\n== 4. default ADP.py run ==")
    t_default = time.perf_counter()
    run_s, note = default_run(args.skip_default_run, args.threads)
    t_default = time.perf_counter() - t_default
    print(f"default_run_s={run_s:.1f} ({note})" if math.isfinite(run_s) else f"default_run_s=nan ({note})")

    scaling = {}
    print(f"\n== 5. one upper iteration = {UPPER_LOWER_ITERS} lower iterations + {UPPER_CG_ITERS} CG "
          f"iterations + mixed term, against image size (RGB) ==")
    for dev in devices:
        scaling[dev] = bench_scaling(dev)
        print_scaling(scaling[dev], dev)
    print(f"\n(benchmark time without the default run: {time.perf_counter() - t_start - t_default:.0f} s)")

    print()
    print(f"iteration_speedup={core['cpu']['iteration_speedup']:.2f} hvp_speedup={core['cpu']['hvp_speedup']:.2f} "
          f"default_run_s={run_s:.1f} scaling_exponent={scaling['cpu']['exponent']:.3f}")


if __name__ == "__main__":
    main()
