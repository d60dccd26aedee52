"""Accuracy control in practice (issue 15): float32 against float64, and ω against the true error.

    python benchmarks/bench_accuracy.py                 # both parts, 1 thread
    python benchmarks/bench_accuracy.py --repeats 3     # interleaved repeats of the timed runs
    python benchmarks/bench_accuracy.py --skip-omega    # timings only

Part 1 runs the default 2D driver, ``ADP.run`` (astronaut 3×256×256, motion blur, float64
defaults), once per dtype and repeat, interleaved, into a temporary results folder, and reports
wall and CPU time, lower-level and CG iterations, solves that ended uncertified (``lower_cap_hits``
plus an uncertified TV baseline), solves that returned a float64 iterate (``promoted``) and the
final PSNR.  float32 runs MAID on ``mixed_precision.MixedPrecisionProblem`` (``ADP.py``): float32
iterations while float32 points can be certified, a float64 finish and a float64 iterate below
that; the float32 line is followed by ``lower_level.LOW_PRECISION_STATS``.

Part 2 replays a MAID run on the default data (the round-2 setting of this benchmark: learned
upper operator, ε_min = 1e-3, descent check off; ``benchmarks/bench_omega.py`` does the same on
``ADP.py``'s current defaults, term by term) and at each iterate ``(x̃_k, b_k)`` compares, with
the true hypergradient ``∇f(b_k)`` (lower level solved to 1e-10, CG to 1e-16): the worst-case ω
of ``error_constants`` (``maid.error_bound``), the local a-posteriori bound
``ADPBetaProblem.hypergradient_error_bound`` and the refined bound ``refined_error_bound``; then
the same on random 3×24×24 problems at several accuracies (``bench_omega.random_problem``).
Ratios printed: ω/‖z − ∇f‖ and ω/‖z‖ (medians and ranges).

Last line: ``float32_over_float64_time=<ratio of min CPU times> uncertified32=<n>
omega_over_true_error=<median of the refined ω / true error on the replayed iterates>``.  CPU
time (of this single-threaded process) is the figure that other processes' load does not inflate;
on a quiet machine it equals the wall time to within a few per cent; the wall ratio is printed on
the line before.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def timed_driver_run(dtype: str, results_dir: str) -> dict:
    import ADP
    import lower_level
    stats = lower_level.LOW_PRECISION_STATS
    for key in stats:
        stats[key] = 0
    t0, c0 = time.perf_counter(), time.process_time()
    s = ADP.run(dtype=dtype, results_dir=results_dir, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall": wall, "cpu": cpu, "summary": s, "low": dict(stats)}


def part1(repeats: int) -> tuple[float, int]:
    print("## float32 against float64: ADP.run() defaults (astronaut 3x256x256, motion), 1 thread")
    runs = {"float64": [], "float32": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for dt in ("float64", "float32"):
                runs[dt].append(timed_driver_run(dt, tmp))
    print(f"{'dtype':8s} {'wall s':>7s} {'cpu s':>6s} {'MAID s':>7s} {'TV s':>5s} {'lower it':>9s} {'CG it':>6s} "
          f"{'uncertified':>11s} {'promoted':>8s} {'PSNR dB':>8s}   (times: min over repeats)")
    out = {}
    for dt, rs in runs.items():
        s = rs[0]["summary"]
        caps = int(s["uncertified_solves"])
        psnr = s["scores"]["ADP-β-MAID"]["psnr"]
        wall, cpu = min(r["wall"] for r in rs), min(r["cpu"] for r in rs)
        t_maid = min(r["summary"]["maid_seconds"] for r in rs)
        t_tv = min(r["summary"]["baseline_seconds"] for r in rs)
        out[dt] = (wall, cpu, caps, psnr)
        print(f"{dt:8s} {wall:7.2f} {cpu:6.2f} {t_maid:7.2f} {t_tv:5.2f} {s['lower_iterations']:9d} "
              f"{s['cg_iterations']:6d} {caps:11d} {s['promoted_solves']:8d} {psnr:8.4f}")
    low = runs["float32"][0]["low"]
    print(f"float32 solves: {low['solves']}, of which {low['float64_fallbacks']} finished in float64 "
          f"({low['float64_iterations']} float64 iterations; {low['float64_returns']} returned their float64 "
          f"iterate) and {low['unreachable']} stopped uncertified because no float32 point is provably within ε")
    ratio = out["float32"][1] / out["float64"][1]
    print(f"float32/float64: wall {out['float32'][0] / out['float64'][0]:.2f}, cpu {ratio:.2f}; "
          f"PSNR difference {out['float32'][3] - out['float64'][3]:+.4f} dB")
    return ratio, out["float32"][2]


def _ratios(problem, x, b, eps, delta, grad_f, z, q):
    from maid import error_bound
    nrm = lambda t: torch.linalg.vector_norm(t).item()  # noqa: E731
    err = nrm(z - grad_f)
    old = error_bound(eps, delta, problem.error_constants(x, b), nrm(problem.upper_grad_x(x, b)))
    new = problem.hypergradient_error_bound(x, b, q)
    ref = problem.refined_error_bound(x, b, q)
    assert new >= err and ref >= err, (new, ref, err)
    return {"new_err": new / err, "old_err": old / err, "new_z": new / nrm(z), "old_z": old / nrm(z),
            "ref_err": ref / err, "ref_z": ref / nrm(z)}


def _reference(problem, b, x0):
    from maid import conjugate_gradient
    h = problem.lower(b)
    x_hat = problem.solve_lower(b, x0, 1e-10, 100000).x
    q_hat, _, _ = conjugate_gradient(lambda v: h.hvp(x_hat, v), problem.upper_grad_x(x_hat, b), None, 1e-16, 5000)
    return problem.upper_grad_theta(x_hat, b) - problem.mixed_vjp(x_hat, b, q_hat)


def _summary(name, rows):
    def rng(key):
        v = sorted(r[key] for r in rows)
        return f"{statistics.median(v):.2e} [{v[0]:.1e}, {v[-1]:.1e}]"
    print(f"{name}: {len(rows)} points")
    print(f"  omega/|z - grad f|   worst-case {rng('old_err')}   local {rng('new_err')}   refined {rng('ref_err')}")
    print(f"  omega/|z|            worst-case {rng('old_z')}   local {rng('new_z')}   refined {rng('ref_z')}")


def part2_default() -> float:
    import imaging
    import maid
    from adp_problem import ADPBetaProblem
    from maid import hypergradient
    from regularisers import SmoothedTV
    print("\n## omega on a replayed MAID run (default data, learned operator, eps_min 1e-3, float64, check off)")
    cfg = dict(image="astronaut", size_x=256, size_y=256, channels=3, setting="motion", kernel_size=5,
               blur_sigma=1.0, semiblind_sigma=0.5, noise_level=5 / 255, seed=0)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _, b0, y = imaging.make_data(cfg, os.path.join(here, "images"), torch.device("cpu"), torch.float64)
    p = ADPBetaProblem(y, b0, SmoothedTV(0.005, 0.01), 0.1, mu0=1e-2)
    seen = []
    consts = p.error_constants

    def capture(x, b):                      # called once per upper iteration, at (x̃_k, b_k)
        seen.append((x.clone(), b.clone()))
        return consts(x, b)

    p.error_constants = capture
    mc = maid.MAIDConfig(eps0=1e-2, delta0=1e-6, step0=1.0, rho=0.5, tau=0.5, nu=1.05, nu_step=10 / 9, eta=1e-4,
                         max_backtracks=5, eps_min=1e-3, max_iter=40, lower_max_iter=3000, cg_max_iter=200,
                         descent_check=False)
    res = maid.maid(p, b0.clone(), y.clone(), mc)
    p.error_constants = consts
    rows = []
    for (x, b), rec in zip(seen, res.log):
        delta = rec.get("delta", 1e-6)
        z, q, _, _ = hypergradient(p, x, b, None, delta, 200)
        rows.append(_ratios(p, x, b, rec["eps"], delta, _reference(p, b, x), z, q))
    _summary("default run", rows)
    return statistics.median(r["ref_err"] for r in rows)


def part2_random(n_problems: int = 4) -> None:
    from bench_omega import random_problem      # the same 3×24×24 problems as bench_omega.py
    from maid import hypergradient
    rows = []
    for seed in range(n_problems):
        p, y, b = random_problem(seed)
        grad_f = _reference(p, b, y)
        for eps in (1e-2, 1e-3, 1e-4):
            x = p.solve_lower(b, y, eps, 100000).x
            for delta in (1e-5, 1e-7, 1e-9):
                z, q, _, _ = hypergradient(p, x, b, None, delta, 10000)
                rows.append(_ratios(p, x, b, eps, delta, grad_f, z, q))
    _summary(f"random 3x24x24 ({n_problems} problems x eps in 1e-2..1e-4 x delta in 1e-5..1e-9)", rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-omega", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ratio, unc = part1(args.repeats)
    med = float("nan")
    if not args.skip_omega:
        med = part2_default()
        part2_random()
    print(f"float32_over_float64_time={ratio:.2f} uncertified32={unc} omega_over_true_error={med:.3g}")


if __name__ == "__main__":
    main()
