"""Grid search for the defaults of ADP.py: ``tv_weight`` (α), ``tv_smoothing`` (γ) and ``beta`` (β),
plus the initial MAID step ``step`` (α₀).

Run from anywhere (CPU, one thread by default; about 3 minutes, more on a loaded machine)::

    python benchmarks/grid_search.py            # full grid
    python benchmarks/grid_search.py --quick    # smaller grid (smoke test), ~30 seconds

Data.  Exactly ADP.py's data: ``imaging.make_data``, the function ADP.py calls, fed ADP.py's own
constants (``ADP.DEFAULTS``; importing the driver has no side effects), with only the image size set to
128×128 and ``image``/``setting`` varied.  So: RGB, σ = 5/255, seed 0, 5×5 diagonal motion
kernel b₀, and for 'semiblind' an extra unknown 5×5 Gaussian (σ = 0.5) after the motion blur.

Precision.  Everything runs on the CPU in **float64** (``--dtype``; ADP.py's default too).  Reason: the lower-level stopping test is
``‖∇h‖ ≤ μ ε`` with μ ≈ μ₀ = 0.01 (the 5×5 motion kernel's spectrum has zeros), and in float32
‖∇h‖ stalls at a rounding floor (measured at 3×128²: ~3e-5 for α = 0.005, γ = 0.01, up to
~6e-4 for α = 0.08, γ = 0.003, a point of an earlier, wider grid), so ε below ~3e-3 … 6e-2 cannot be certified: (a)'s TV solves
with large α/γ run to their cap, and MAID, whose ε falls towards ``threshold`` = 1e-3, spends
``lower_iter`` = 3000 iterations on every lower solve near the end (measured: 2–4× the run time
of the same MAID run in float64).  In float64 all these solves converge.  A float32 run of the same
grid (stopped after 34 of the 60 MAID runs for time) printed the same PSNRs to within 0.01 dB
at all 54 points it shared with float64, so the choice does not depend on the precision.

(a) α and γ.  For every (α, γ) on a log grid, the TV lower level
``½‖B_{b₀}x − y‖² + α R_γ(x) + (μ₀/2)‖x‖²`` with the *known* kernel b₀ (``ADP.build_problem(...)
.lower(b₀)``, ADP.py's μ₀ and solver) is solved from x = y to ADP.py's ``baseline_eps``, for all
four bundled images in the 'motion' and 'semiblind' settings.  The (α, γ) with the best mean
PSNR over these 8 cases is chosen.  Solves that hit ``--cap`` are counted in the column
"capped" (none do in float64).

(b) β and α₀.  With the chosen (α, γ) fixed, MAID (``maid.maid``) is run on the kernel with the
``MAIDConfig`` that ADP.py builds from its constants (``ADP.maid_config``) — only ``max_iter`` (upper_iter) is
shortened to ``--upper-iter`` — for every β on a log grid and every α₀ in a small set, in the
'semiblind' and 'motion' settings on two images.  Reported per run: final PSNR/SSIM of
ADP-β-MAID (MAID's returned reconstruction x̃, as ADP.py reports it) and of the TV baseline with
b₀ (the (a) solve at the chosen (α, γ)), their difference, the relative kernel change
‖b* − b₀‖/‖b₀‖, the upper loss f before/after, accepted steps, the final ε, lower-level
iterations and iteration-cap hits.  For 'semiblind' the table also gives the TV reconstruction
with the *true* 9×9 kernel (motion ∗ Gaussian, an oracle no 5×5 kernel can reach exactly), i.e.
how much a better kernel could gain at most.  The (β, α₀) with the best mean ADP PSNR over the
runs is chosen among those in which MAID accepts at least one step (where none is accepted,
ADP.py would return b₀ and its main job would show nothing).  A run counts as beating the baseline only if its PSNR exceeds the baseline's by
more than ``--margin`` dB (0.05 dB: differences below that are at the level of the
lower-level accuracy ε); the script says plainly when no run does.

The last line printed is ``chosen tv_weight=<a> tv_smoothing=<g> beta=<b> step=<a0>``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import ADP  # noqa: E402  (importing the driver has no side effects)
from imaging import make_data, psnr_ssim, setting_kernels  # noqa: E402
from maid import maid  # noqa: E402
from operators import Blur  # noqa: E402

IMAGES_DIR = os.path.join(ROOT, "images")
IMAGES = ("astronaut", "coffee", "chelsea", "rocket")
SETTINGS_A = ("motion", "semiblind")
SIZE = 128

FULL = dict(tv_weight=(0.0025, 0.005, 0.01, 0.02, 0.04), tv_smoothing=(0.003, 0.01, 0.03, 0.1),
            beta=(1e-4, 1e-3, 1e-2, 1e-1, 1.0), step=(1.0, 10.0, 100.0),
            images_b=("astronaut", "coffee"), settings_b=("semiblind", "motion"))
QUICK = dict(tv_weight=(0.005, 0.01, 0.02), tv_smoothing=(0.01, 0.03),
             beta=(1e-3, 1e-1), step=(1.0, 100.0),
             images_b=("astronaut",), settings_b=("semiblind", "motion"))


def true_kernel(cfg, b0, dt):
    """The kernel that made the data: b₀ for 'motion'; for 'semiblind' the full (2k−1)×(2k−1)
    convolution of the Gaussian with b₀ (as in make_data), computed with the same circular blur on
    a (2k−1)² grid, which is exact because the full convolution fits that grid."""
    blurs = setting_kernels(cfg, dt)[1]
    if len(blurs) == 1:
        return b0
    g = blurs[1]
    k, kg = cfg["kernel_size"], g.shape[-1]
    n = k + kg - 1
    pad = torch.zeros(b0.shape[0], n, n, dtype=dt)
    o = (n - k) // 2
    pad[:, o:o + k, o:o + k] = b0[:, 0]
    return Blur(g, (n, n)).A(pad).unsqueeze(1)


# --------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------
def fmt(v):
    return f"{v:g}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller grid (~30 seconds)")
    ap.add_argument("--upper-iter", type=int, default=15, help="MAID upper iterations per run in (b) (ADP.py: 40)")
    ap.add_argument("--cap", type=int, default=3000, help="iteration cap of the TV solves in (a)")
    ap.add_argument("--dtype", default="float64", choices=("float64", "float32"),
                    help="precision (default float64: see the module docstring)")
    ap.add_argument("--margin", type=float, default=0.05, help="dB by which ADP must exceed TV to count as better")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    grid = QUICK if args.quick else FULL
    t_start = time.perf_counter()

    adp = dict(ADP.DEFAULTS)
    dt, dev = getattr(torch, args.dtype), torch.device("cpu")
    mu0, solver, eps_base = adp["mu0"], adp["lower_solver"], adp["baseline_eps"]

    def problem(y, b0, tv_weight, tv_smoothing, beta=adp["beta"]):
        """ADP.py's problem (its regulariser, μ₀, upper operator, solver) at these weights."""
        return ADP.build_problem(dict(adp, tv_weight=tv_weight, tv_smoothing=tv_smoothing, beta=beta), y, b0)

    cases = {}

    def data(image, setting):
        if (image, setting) not in cases:
            cfg = dict(adp, image=image, setting=setting, size_x=SIZE, size_y=SIZE)
            x_true, b0, y = make_data(cfg, IMAGES_DIR, dev, dt)
            cases[(image, setting)] = (cfg, x_true, b0, y)
        return cases[(image, setting)]

    print(f"grid search for ADP.py defaults: {SIZE}×{SIZE} RGB, σ = {adp['noise_level']:.4g}, seed {adp['seed']}, "
          f"{args.dtype} (ADP.py: {adp['dtype']}), μ₀ = {fmt(mu0)}, solver {solver}, upper_operator {adp['upper_operator']}, "
          f"{torch.get_num_threads()} thread(s){', QUICK grid' if args.quick else ''}")
    print(f"ADP.py defaults now: tv_weight={fmt(adp['tv_weight'])} tv_smoothing={fmt(adp['tv_smoothing'])} "
          f"beta={fmt(adp['beta'])} step={fmt(adp['step'])}")

    # ---------------------------------------------------------------------------------------
    # (a) α, γ: TV with the known kernel b₀, solved to baseline_eps from y
    # ---------------------------------------------------------------------------------------
    cols = [(s, im) for s in SETTINGS_A for im in IMAGES]
    print(f"\n(a) TV with the known kernel b0, solved from y to eps={fmt(eps_base)} (cap {args.cap} iterations): "
          f"PSNR [dB] per case; means over the {len(cols)} cases")
    head = " ".join(f"{s[:4]}:{im[:5]:>5s}" for s, im in cols)
    print(f"{'tv_weight':>9s} {'tv_smooth':>9s} | {head} | {'meanPSNR':>8s} {'meanSSIM':>8s} {'capped':>6s} {'iters':>6s} {'sec':>5s}")
    res_a = {}
    tv_solutions = {}
    for a in grid["tv_weight"]:
        for g in grid["tv_smoothing"]:
            t0 = time.perf_counter()
            ps, ss, capped, iters = [], [], 0, 0
            for s, im in cols:
                cfg, x_true, b0, y = data(im, s)
                prob = problem(y, b0, a, g)
                r = prob.solve_lower(b0, y.clone(), eps_base, args.cap)
                p, q = psnr_ssim(r.x, x_true)
                ps.append(p)
                ss.append(q)
                capped += int(not r.converged)
                iters += r.iters
                tv_solutions[(a, g, im, s)] = (r.x, p, q, r.converged)
            mp, ms = sum(ps) / len(ps), sum(ss) / len(ss)
            res_a[(a, g)] = (mp, ms)
            row = " ".join(f"{p:10.2f}" for p in ps)
            print(f"{fmt(a):>9s} {fmt(g):>9s} | {row} | {mp:8.3f} {ms:8.4f} {capped:>3d}/{len(cols):<2d} "
                  f"{iters:6d} {time.perf_counter() - t0:5.1f}", flush=True)
    alpha_tv, gamma_tv = max(res_a, key=lambda k: res_a[k][0])
    best = res_a[(alpha_tv, gamma_tv)]
    print(f"(a) best mean PSNR: tv_weight={fmt(alpha_tv)} tv_smoothing={fmt(gamma_tv)} "
          f"({best[0]:.3f} dB, SSIM {best[1]:.4f})")
    cur = (adp["tv_weight"], adp["tv_smoothing"])
    if cur in res_a:
        print(f"    ADP.py's current (tv_weight={fmt(cur[0])}, tv_smoothing={fmt(cur[1])}): {res_a[cur][0]:.3f} dB, "
              f"SSIM {res_a[cur][1]:.4f}")
    t_a = time.perf_counter() - t_start

    # ---------------------------------------------------------------------------------------
    # (b) β, α₀: MAID with the (a) choice, against the TV baseline with b₀
    # ---------------------------------------------------------------------------------------
    cases_b = [(s, im) for s in grid["settings_b"] for im in grid["images_b"]]
    print(f"\n(b) ADP-β-MAID with tv_weight={fmt(alpha_tv)}, tv_smoothing={fmt(gamma_tv)}: ADP.py's MAIDConfig "
          f"(eps0={fmt(adp['eps0'])}, delta0={fmt(adp['delta0'])}, lower_iter={adp['lower_iter']}, "
          f"descent_check={adp['descent_check']}) with upper_iter={args.upper_iter}")
    baseline, oracle, f_start = {}, {}, {}
    for s, im in cases_b:
        cfg, x_true, b0, y = data(im, s)
        x_tv, p, q, conv = tv_solutions.get((alpha_tv, gamma_tv, im, s), (None,) * 4)
        if x_tv is None:   # (quick grid: the case was not in (a))
            prob = problem(y, b0, alpha_tv, gamma_tv)
            r = prob.solve_lower(b0, y.clone(), eps_base, args.cap)
            p, q = psnr_ssim(r.x, x_true)
        baseline[(s, im)] = (p, q)
        bt = true_kernel(cfg, b0, dt)
        if bt is b0:
            oracle[(s, im)] = (p, q)
        else:
            if s == "semiblind":   # check that the oracle kernel really is the one that made the data
                clean = make_data(dict(cfg, noise_level=0.0), IMAGES_DIR, dev, dt)[2]
                err = (Blur(bt, (SIZE, SIZE)).A(x_true) - clean).abs().max().item()
                assert err < 1e-5, f"oracle kernel does not reproduce the data (max error {err:.2e})"
            prob = problem(y, bt, alpha_tv, gamma_tv)
            r = prob.solve_lower(bt, y.clone(), eps_base, args.cap)
            oracle[(s, im)] = psnr_ssim(r.x, x_true)
        # upper loss at b₀ (the H¹ term is 0 there, so f(b₀) does not depend on β), with x̃ solved
        # to eps0 from y exactly like MAID's first lower solve
        prob = problem(y, b0, alpha_tv, gamma_tv)
        x0 = prob.solve_lower(b0, y.clone(), adp["eps0"], adp["lower_iter"]).x
        f_start[(s, im)] = prob.upper_loss(x0, b0).item()
        print(f"    {s:9s} {im:9s}: TV(b0) {baseline[(s, im)][0]:.2f} dB / {baseline[(s, im)][1]:.4f}   "
              f"TV(true kernel, oracle) {oracle[(s, im)][0]:.2f} dB / {oracle[(s, im)][1]:.4f}")

    print(f"\n{'beta':>7s} {'step0':>6s} {'setting':9s} {'image':9s} | {'ADP PSNR':>8s} {'SSIM':>6s} | "
          f"{'TV PSNR':>7s} {'SSIM':>6s} | {'dPSNR':>6s} {'dSSIM':>7s} | {'|db|/|b0|':>9s} {'f0':>9s} {'f_end':>9s} "
          f"{'acc':>5s} {'eps_end':>8s} {'lower':>6s} {'caps':>4s} {'sec':>5s}")
    runs = {}
    for beta in grid["beta"]:
        for a0 in grid["step"]:
            for s, im in cases_b:
                cfg, x_true, b0, y = data(im, s)
                prob = problem(y, b0, alpha_tv, gamma_tv, beta)
                mcfg = ADP.maid_config(dict(adp, step=a0, upper_iter=args.upper_iter))
                t0 = time.perf_counter()
                out = maid(prob, b0.clone(), y.clone(), mcfg)
                sec = time.perf_counter() - t0
                p, q = psnr_ssim(out.x, x_true)
                tp, tq = baseline[(s, im)]
                log = out.log
                f0 = f_start[(s, im)]
                f_end = log[-1]["upper_loss"] if log else float("nan")
                dk = (torch.linalg.vector_norm(out.theta - b0) / torch.linalg.vector_norm(b0)).item()
                acc = sum(r["accepted"] for r in log)
                caps = log[-1]["lower_cap_hits"] if log else 0
                lower = log[-1]["lower_iters"] if log else 0
                eps_end = log[-1]["eps"] if log else adp["eps0"]
                runs[(beta, a0, s, im)] = dict(p=p, q=q, dp=p - tp, dq=q - tq, dk=dk, acc=acc, its=len(log))
                print(f"{fmt(beta):>7s} {fmt(a0):>6s} {s:9s} {im:9s} | {p:8.2f} {q:6.4f} | {tp:7.2f} {tq:6.4f} | "
                      f"{p - tp:+6.2f} {q - tq:+7.4f} | {dk:9.3g} {f0:9.4g} {f_end:9.4g} {acc:>2d}/{len(log):<2d} "
                      f"{eps_end:8.2g} {lower:6d} {caps:4d} {sec:5.1f}", flush=True)

    print(f"\n(b) summary over {len(cases_b)} runs per (beta, step0) ({', '.join(f'{s}/{im}' for s, im in cases_b)})")
    print(f"{'beta':>7s} {'step0':>6s} | {'meanADP':>7s} {'meanTV':>7s} {'mean dPSNR':>10s} {'max dPSNR':>9s} "
          f"{'mean dSSIM':>10s} {'mean |db|/|b0|':>14s} {'wins':>5s}")
    mean_tv = sum(baseline[c][0] for c in cases_b) / len(cases_b)
    summary = {}
    for beta in grid["beta"]:
        for a0 in grid["step"]:
            rs = [runs[(beta, a0, s, im)] for s, im in cases_b]
            mp = sum(r["p"] for r in rs) / len(rs)
            wins = sum(r["dp"] > args.margin for r in rs)
            summary[(beta, a0)] = mp
            print(f"{fmt(beta):>7s} {fmt(a0):>6s} | {mp:7.3f} {mean_tv:7.3f} {mp - mean_tv:+10.3f} "
                  f"{max(r['dp'] for r in rs):+9.3f} {sum(r['dq'] for r in rs) / len(rs):+10.4f} "
                  f"{sum(r['dk'] for r in rs) / len(rs):14.3g} {wins:>2d}/{len(rs):<2d}")
    # only settings in which the kernel moves (MAID accepted a step in some run): otherwise ADP.py's
    # main job would return b₀ and show nothing; ties go to the smaller β, then the larger α₀
    moving = [k for k in summary if any(runs[(k[0], k[1], s, im)]["acc"] for s, im in cases_b)] or list(summary)
    beta_best, a0_best = max(moving, key=lambda k: (round(summary[k], 6), -k[0], k[1]))
    total_wins = sum(r["dp"] > args.margin for r in runs.values())
    print(f"(b) best mean ADP PSNR where the kernel moves: beta={fmt(beta_best)} step={fmt(a0_best)} ({summary[(beta_best, a0_best)]:.3f} dB "
          f"vs TV baseline {mean_tv:.3f} dB, {summary[(beta_best, a0_best)] - mean_tv:+.3f} dB)")
    rs = [runs[(beta_best, a0_best, s, im)] for s, im in cases_b]
    print(f"    at the chosen (beta, step0) MAID accepted {sum(r['acc'] for r in rs)} of {sum(r['its'] for r in rs)} "
          f"upper steps; mean |b*-b0|/|b0| = {sum(r['dk'] for r in rs) / len(rs):.3g}")
    if total_wins == 0:
        print(f"FINDING: ADP-β-MAID does NOT beat the TV baseline with b0 (by more than {args.margin} dB PSNR) in any "
              f"of the {len(runs)} runs.")
    else:
        print(f"ADP-β-MAID beats the TV baseline by more than {args.margin} dB PSNR in {total_wins} of {len(runs)} runs.")
    print(f"wall time: (a) {t_a:.0f} s, (b) {time.perf_counter() - t_start - t_a:.0f} s, "
          f"total {time.perf_counter() - t_start:.0f} s")
    print(f"chosen tv_weight={fmt(alpha_tv)} tv_smoothing={fmt(gamma_tv)} beta={fmt(beta_best)} step={fmt(a0_best)}")


if __name__ == "__main__":
    main()
