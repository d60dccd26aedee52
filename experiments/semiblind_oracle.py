"""Semiblind deblurring with a strong unknown Gaussian: where does learning the kernel stop?
(issue 17, item 5 and its "if out of reach" clause).

    python experiments/semiblind_oracle.py --images=coffee,rocket --size=128 --variants=sq,simplex_sq
    python experiments/semiblind_oracle.py --images=astronaut --variants=all --out=/tmp/table

For each image (``imaging.make_data`` with ``setting = "semiblind"``, ``semiblind_sigma = 1.5``,
the other data settings ADP.py's) it reports, on the same data:

* ``TV (b₀)`` — the TV baseline of ADP.py (known motion kernel, solved to convergence);
* ``oracle TV`` — the same lower level with the true kernel motion∘Gaussian (9×9): the best
  any learned kernel can give at this regulariser weight;
* ADP-β-MAID **variants** (:data:`VARIANTS`, ADP.py settings over the run's base): the kernel
  learned by (proximal) MAID with the learned-operator criterion ``‖B_b x − y‖²/n``, the
  known-operator criterion ``‖B_{b₀}x − y‖²/n``, or the **oracle criterion** ``‖x − x_true‖²/n``
  (:class:`OracleUpper`: an upper level that sees the ground truth, the ceiling of any
  upper-level criterion for this lower level and parametrisation).

Columns: PSNR, SSIM, ``‖b* − b_true‖/‖b₀ − b_true‖`` (kernels zero-padded to 9×9), per-channel
kernel sums, MAID iterations (accepted), lower and CG iterations (load-independent cost) and
MAID seconds.  Output: a Markdown table on stdout and ``<out>.csv`` / ``<out>.md`` when
``--out`` is given.  Everything is the library's (ADP.build_composite, maid.maid, prox.py).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ADP  # noqa: E402
import config  # noqa: E402
from adp_problem import ADPBetaProblem  # noqa: E402
from imaging import kernel_error_ratio, make_data, psnr_ssim, true_kernel  # noqa: E402
from maid import maid  # noqa: E402

BASE = dict(setting="semiblind", semiblind_sigma=1.5, device="cpu", progress=False, threshold=1e-6, upper_iter=40)

# name -> ADP.py settings (over BASE); "criterion": learned | known | oracle
VARIANTS = {
    "sq": dict(criterion="learned"),                                            # today's ADP-β (σ = 1.5 row of issue 17)
    "sq_known": dict(criterion="known"),
    "sq9": dict(criterion="learned", learned_kernel_size=9),
    "simplex_sq9": dict(criterion="learned", learned_kernel_size=9, kernel_constraint="simplex"),
    "simplex_sq9_b001": dict(criterion="learned", learned_kernel_size=9, kernel_constraint="simplex", beta=0.01),
    "simplex_sq9_b0": dict(criterion="learned", learned_kernel_size=9, kernel_constraint="simplex", beta=1e-6),
    "simplex_h1_9": dict(criterion="learned", learned_kernel_size=9, kernel_constraint="simplex",
                         kernel_penalty="h1", beta=1e-6),
    "simplex_h1_5": dict(criterion="learned", kernel_constraint="simplex", kernel_penalty="h1", beta=1e-6),
    "simplex_h1_9_b1e5": dict(criterion="learned", learned_kernel_size=9, kernel_constraint="simplex",
                              kernel_penalty="h1", beta=1e-5),
    "known_h1_9": dict(criterion="known", learned_kernel_size=9, kernel_penalty="h1", beta=1e-6),
    "known_h1_9_b1e5": dict(criterion="known", learned_kernel_size=9, kernel_penalty="h1", beta=1e-5),
    "known_simplex_sq9": dict(criterion="known", learned_kernel_size=9, kernel_constraint="simplex"),
    "oracle_simplex_sq9": dict(criterion="oracle", learned_kernel_size=9, kernel_constraint="simplex", beta=1e-6),
    "oracle_sq9": dict(criterion="oracle", learned_kernel_size=9, beta=1e-6),
}


class OracleUpper(ADPBetaProblem):
    """ADP-β with the upper data term ``‖x − x_true‖²/n`` (the ground truth seen by the upper
    level) and the configured kernel penalty: ``∇ₓg = 2(x − x_true)/n``, ``L_g = 2/n``, and no
    direct dependence of the data term on b (``∂_b g`` is the penalty's gradient alone; built on
    the known-operator problem, whose direct-partial constants are 0)."""

    def __init__(self, x_true, *args, **kw):
        super().__init__(*args, **dict(kw, upper_operator="known"))
        self.x_true = x_true

    def upper_loss(self, x, b):
        d = x - self.x_true
        return (d * d).sum() / self.n + self.beta * self._penalty(b, self.b0)

    def upper_grad_x(self, x, b):
        return (2 / self.n) * (x - self.x_true)

    def upper_lipschitz(self, x, b):
        return 2 / self.n

    def error_constants(self, x, b):
        return dataclasses.replace(super().error_constants(x, b), L_g=2 / self.n)


def _scores(x, x_true) -> dict:
    p, s = psnr_ssim(x, x_true)
    return {"psnr": p, "ssim": s}


def run_image(image: str, size: int, variants: list[str], overrides: dict) -> list[dict]:
    """The rows of one image: TV (b₀), oracle TV and each variant (module docstring)."""
    cfg = config.resolve(ADP.DEFAULTS, dict(BASE, image=image, size_x=size, size_y=size, **overrides))
    ADP.validate(cfg)
    dev, dt = torch.device("cpu"), torch.float64
    x_true, b0, y = make_data(cfg, ADP._IMAGES, dev, dt)
    b_true = true_kernel(cfg, dt, dev)
    problem = ADP.build_problem(cfg, y, b0)
    rows = []
    for name, kernel in (("TV (b₀)", b0), ("oracle TV", b_true)):
        t0 = time.perf_counter()
        base = ADP.solve_baseline(problem, cfg, kernel, y)
        rows.append(dict(image=image, row=name, **_scores(base.x, x_true), kernel_error_ratio=kernel_error_ratio(
            kernel, b0, b_true), lower_iters=base.iters, seconds=time.perf_counter() - t0))
    for name in variants:
        spec = dict(VARIANTS[name])
        criterion = spec.pop("criterion")
        vcfg = dict(cfg, **spec, upper_operator="known" if criterion == "known" else "learned")
        ADP.validate(vcfg)
        b0v = ADP.learned_b0(vcfg, b0)
        P, R = ADP.build_composite(vcfg, y, b0v)
        if criterion == "oracle":
            P = OracleUpper(x_true, y, b0v, P.regulariser, P.beta, mu0=P.mu0, solver=P.solver,
                            kernel_penalty=P.kernel_penalty)
        res = maid(P, b0v.clone(), y.clone(), ADP.maid_config(vcfg, ADP.upper_scale(vcfg, y)), prox=R)
        last = res.log[-1] if res.log else {}
        rows.append(dict(image=image, row=name, **_scores(res.x, x_true),
                         kernel_error_ratio=kernel_error_ratio(res.theta, b0, b_true),
                         kernel_sums=" ".join(f"{v:.4f}" for v in res.theta.sum(dim=(-2, -1)).flatten().tolist()),
                         upper_iters=len(res.log), accepted=sum(bool(r["accepted"]) for r in res.log),
                         lower_iters=last.get("lower_iters", 0), cg_iters=last.get("cg_iters", 0),
                         seconds=last.get("time", 0.0), stop=res.stop_reason))
        print(_line(rows[-1], rows[0]["psnr"]), flush=True)
    return rows


COLUMNS = ["image", "row", "psnr", "gain", "ssim", "kernel_error_ratio", "kernel_sums", "upper_iters", "accepted",
           "lower_iters", "cg_iters", "seconds", "stop"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return "" if v is None else str(v)


def _line(row: dict, tv: float) -> str:
    row["gain"] = row["psnr"] - tv
    return "| " + " | ".join(_fmt(row.get(c)) for c in COLUMNS) + " |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default="coffee,rocket")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--variants", default="sq,simplex_sq9", help=f"comma list or 'all' ({', '.join(VARIANTS)})")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="an ADP.py setting for every row (e.g. --set threshold=1e-7)")
    ap.add_argument("--out", default="", help="write <out>.csv and <out>.md")
    a = ap.parse_args(argv)
    variants = list(VARIANTS) if a.variants == "all" else a.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; use {', '.join(VARIANTS)}")
    overrides = {}
    for item in a.set:
        k, _, v = item.partition("=")
        if k not in ADP.DEFAULTS:
            ap.error(f"--set {item}: {k!r} is not an ADP.py setting")
        overrides[k] = config.parse_value(k, v, ADP.DEFAULTS[k])
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS), flush=True)
    rows = []
    for image in a.images.split(","):
        r = run_image(image, a.size, variants, overrides)
        for row in r[:2]:
            print(_line(row, r[0]["psnr"]), flush=True)
        rows += r
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out + ".csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        with open(a.out + ".md", "w") as f:
            f.write("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n")
            f.writelines(_line(r, next(x["psnr"] for x in rows if x["image"] == r["image"])) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
