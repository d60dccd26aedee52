"""Term-by-term decomposition of the a-posteriori bound ω (issue 15, ``ADPBetaProblem.hypergradient_error_terms``).

    python benchmarks/bench_omega.py                     # default run's iterates + 4 random 3×24×24 problems
    python benchmarks/bench_omega.py --random 8 --skip-default
    python benchmarks/bench_omega.py --cache /tmp/omega_default.pt   # reuse the default run's iterates/references

The default run is ``ADP.py``'s defaults (astronaut 3×256×256, motion, known upper operator,
threshold 1e-6, descent check off), built with ``ADP.build_composite`` and ``ADP.maid_config``.
At every upper iterate ``(x̃_k, b_k)`` and the CG iterate ``q̃_k`` MAID used there (warm-started),
the references ``x̂`` (lower level to ‖x̂ − x̂_true‖ ≤ 1e-10) and ``q̂`` (CG to residual 1e-14·‖∇ₓg‖) give the
actual value of every quantity a term of ω bounds:

* ``kappa`` against ``‖e‖_Q`` (``e = x̃ − x̂``), ``E`` against ``‖e‖``;
* ``upper_change`` against ``‖v₁‖_{Q⁻¹}``, ``hessian_change`` against ``‖(Ĥ − H̃)q̃‖_{Q⁻¹}``,
  ``hessian_change_2`` against ``‖(Ĥ − H̃)u‖_{Q⁻¹}`` (``u = H̃⁻¹(r − v₁)``);
* ``adjoint`` against ``‖J̃ᵀ(q̃ − q̂)‖``, ``mixed`` against ``‖(J̃ − Ĵ)ᵀq̂‖``, ``direct`` against
  ``‖∂_b g(x̃) − ∂_b g(x̂)‖`` and ``omega`` against ``‖z − ∇f‖``.

* ``omega_refined`` (item 8, ``refined_error_terms`` at its default tolerances) against ``‖z − ∇f‖``.

Printed per term: median, min and max of bound/actual over the iterates; then ω/‖z − ∇f‖ and ω/‖z‖
for the local and the refined bound, and the refined bound's CG iterations.  Every row asserts
that both bounds hold.  Last line (default run, refined bound):
``omega_over_true_error_median=<m> max=<M> omega_over_z_median=<r>``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from maid import conjugate_gradient  # noqa: E402

TERMS = [("kappa", "e_Q"), ("E", "e"), ("upper_change", "v1_Qinv"), ("hessian_change", "dHq_Qinv"),
         ("hessian_change_2", "dHu_Qinv"), ("adjoint", "adjoint"), ("mixed", "mixed"), ("direct", "direct"),
         ("omega", "total"), ("omega_refined", "omega_refined")]


def _nrm(t) -> float:
    return torch.linalg.vector_norm(t).item()


def reference(p, b, x0):
    """``(x̂, q̂)`` solved tightly in float64."""
    h = p.lower(b)
    x_hat = p.solve_lower(b, x0, 1e-10, 100000).x
    g = p.upper_grad_x(x_hat, b)
    q_hat, _, _ = conjugate_gradient(lambda v: h.hvp(x_hat, v), g, None, 1e-14 * _nrm(g), 20000)
    return x_hat, q_hat


def actuals(p, x, b, q, x_hat, q_hat) -> dict:
    """The actual values of the quantities the terms of ω bound (module docstring)."""
    h = p.lower(b)
    e = x - x_hat
    e_Q = (_nrm(h.blur.A(e)) ** 2 + (h.Q_spectrum.min().item() - h.blur.power.min().item()) * _nrm(e) ** 2) ** 0.5
    v1 = p.upper_grad_x(x, b) - p.upper_grad_x(x_hat, b)
    r = p.upper_grad_x(x, b) - h.hvp(x, q)
    dHq = h.hvp(x_hat, q) - h.hvp(x, q)
    u, _, _ = conjugate_gradient(lambda v: h.hvp(x, v), r - v1, None, 1e-14 * max(_nrm(r - v1), 1e-300), 20000)
    dHu = h.hvp(x_hat, u) - h.hvp(x, u)
    z = p.upper_grad_theta(x, b) - p.mixed_vjp(x, b, q)
    grad_f = p.upper_grad_theta(x_hat, b) - p.mixed_vjp(x_hat, b, q_hat)
    return {"e_Q": e_Q, "e": _nrm(e), "v1_Qinv": h.q_inverse_norm(v1), "dHq_Qinv": h.q_inverse_norm(dHq),
            "dHu_Qinv": h.q_inverse_norm(dHu), "adjoint": _nrm(p.mixed_vjp(x, b, q - q_hat)),
            "mixed": _nrm(p.mixed_vjp(x, b, q_hat) - p.mixed_vjp(x_hat, b, q_hat)),
            "direct": _nrm(p.upper_grad_theta(x, b) - p.upper_grad_theta(x_hat, b)),
            "total": _nrm(z - grad_f), "z": _nrm(z)}


def row(p, x, b, q, x_hat, q_hat) -> dict:
    terms = p.hypergradient_error_terms(x, b, q)
    ref = p.refined_error_terms(x, b, q)
    terms.update(omega_refined=ref["omega"], shift=ref["shift"], omega_reference=ref["omega_reference"],
                 cg_refined=ref["newton_iterations"] + ref["adjoint_iterations"])
    act = actuals(p, x, b, q, x_hat, q_hat)
    act["omega_refined"] = act["total"]
    assert terms["omega"] >= act["total"], (terms["omega"], act["total"])
    assert ref["omega"] >= act["total"], (ref["omega"], act["total"])
    return {"terms": terms, "act": act}


def summarise(name: str, rows: list) -> dict:
    print(f"\n{name}: {len(rows)} iterates")
    print(f"  {'term':18s} {'actual it bounds':18s} {'median bound':>13s} {'median actual':>13s} "
          f"{'ratio med':>10s} {'min':>9s} {'max':>9s}")
    for t, a in TERMS:
        pairs = [(r["terms"].get(t, 0.0), r["act"][a]) for r in rows]
        ratios = sorted(bd / ac for bd, ac in pairs if ac > 0)
        med = lambda v: statistics.median(v) if v else float("nan")  # noqa: E731
        print(f"  {t:18s} {a:18s} {med([bd for bd, _ in pairs]):13.3e} {med([ac for _, ac in pairs]):13.3e} "
              f"{med(ratios):10.3g} {ratios[0] if ratios else float('nan'):9.3g} "
              f"{ratios[-1] if ratios else float('nan'):9.3g}")
    out = {}
    for key, label in (("omega", "local omega (items 1-7)"), ("omega_refined", "refined omega (item 8)")):
        err = sorted(r["terms"][key] / r["act"]["total"] for r in rows)
        oz = sorted(r["terms"][key] / r["act"]["z"] for r in rows)
        print(f"  {label}: omega/|z - grad f| median {statistics.median(err):.3g} min {err[0]:.3g} max {err[-1]:.3g}; "
              f"omega/|z| median {statistics.median(oz):.3g} min {oz[0]:.3g} max {oz[-1]:.3g}")
        out[key] = {"err_median": statistics.median(err), "err_max": err[-1], "z_median": statistics.median(oz)}
    cg = [r["terms"]["cg_refined"] for r in rows]
    print(f"  refined bound's extra CG iterations (Newton step + q'): median {statistics.median(cg)} "
          f"max {max(cg)} total {sum(cg)}")
    return out["omega_refined"]


def default_iterates(cache: str | None):
    """``(problem, [(x̃_k, b_k, q̃_k, x̂_k, q̂_k)])`` of the default run (descent check off), cached."""
    import ADP
    from imaging import make_data
    cfg, _ = ADP.resolve_config({})
    _, b0, y = make_data(cfg, ADP._IMAGES, torch.device("cpu"), torch.float64)
    p, prox = ADP.build_composite(cfg, y, b0)
    if cache and os.path.exists(cache):
        return p, torch.load(cache)
    from maid import maid
    seen, last_q = [], {}
    mixed, consts = p.mixed_vjp, p.error_constants

    def record_q(x, b, q):                  # the CG iterate that z is computed from
        last_q["q"] = q
        return mixed(x, b, q)

    def capture(x, b):                      # called once per hypergradient, after it
        seen.append((x.clone(), b.clone(), last_q["q"].clone()))
        return consts(x, b)

    p.mixed_vjp, p.error_constants = record_q, capture
    mc = dataclasses.replace(ADP.maid_config(cfg, ADP.upper_scale(cfg, y)), descent_check=False)
    res = maid(p, b0.clone(), y.clone(), mc, prox=prox)
    p.mixed_vjp, p.error_constants = mixed, consts
    print(f"default run: {len(res.log)} iterations, stop {res.stop_reason}, {len(seen)} hypergradients", flush=True)
    data = []
    for i, (x, b, q) in enumerate(seen):
        data.append((x, b, q) + reference(p, b, x))
        print(f"  reference {i + 1}/{len(seen)}", flush=True)
    if cache:
        torch.save(data, cache)
    return p, data


def random_problem(seed: int):
    """A random 3×24×24 problem (alternating learned/known operator and α), with a perturbed kernel."""
    from adp_problem import ADPBetaProblem
    from operators import Blur, gaussian_kernel, motion_kernel
    from regularisers import SmoothedTV
    g = torch.Generator().manual_seed(seed)
    x_true = torch.rand(3, 24, 24, generator=g, dtype=torch.float64)
    a = gaussian_kernel(5, 0.8, channels=3, dtype=torch.float64)
    y = Blur(a, (24, 24)).A(x_true) + 0.02 * torch.randn(3, 24, 24, generator=g, dtype=torch.float64)
    b0 = motion_kernel(5, channels=3, dtype=torch.float64)
    p = ADPBetaProblem(y, b0, SmoothedTV(0.005 * (1 + seed % 2), 0.01), 0.1, mu0=1e-2,
                       upper_operator="learned" if seed % 2 == 0 else "known", known_kernel=a)
    return p, y, b0 + 0.02 * torch.randn(b0.shape, generator=g, dtype=torch.float64)


def random_rows(n: int) -> list:
    from maid import hypergradient
    rows = []
    for seed in range(n):
        p, y, b = random_problem(seed)
        x_hat, q_hat = reference(p, b, y)
        for eps in (1e-2, 1e-3, 1e-4):
            x = p.solve_lower(b, y, eps, 100000).x
            for delta in (1e-5, 1e-7, 1e-9):
                _, q, _, _ = hypergradient(p, x, b, None, delta, 10000)
                rows.append(row(p, x, b, q, x_hat, q_hat))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--random", type=int, default=4, help="number of random 3×24×24 problems (0: none)")
    ap.add_argument("--skip-default", action="store_true")
    ap.add_argument("--cache", default="", help="file for the default run's iterates and references")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.random < 0:
        ap.error(f"--random must be ≥ 0, got {args.random}")
    torch.set_num_threads(args.threads)
    res = None
    if not args.skip_default:
        p, data = default_iterates(args.cache or None)
        res = summarise("default run (ADP.py defaults)", [row(p, *d) for d in data])
    if args.random:
        summarise(f"random 3x24x24 ({args.random} problems x eps 1e-2..1e-4 x delta 1e-5..1e-9)",
                  random_rows(args.random))
    if res:
        print(f"omega_over_true_error_median={res['err_median']:.4g} max={res['err_max']:.4g} "
              f"omega_over_z_median={res['z_median']:.4g}")


if __name__ == "__main__":
    main()
