"""ISGD (fixed and decreasing steps) against MAID and IFT on the same data and budget (SPEC §6).

    python experiments/isgd_vs_maid.py                  # train.py's defaults for the shared settings
    python experiments/isgd_vs_maid.py --quick          # CI-sized (seconds to a few minutes on 2 cores)
    python experiments/isgd_vs_maid.py --img_size=64 --budget=50000 --threads=1

Every train.py setting can be overridden with ``--name=value`` and applies to all four runs
(data, split, noise, regulariser, initial θ, budget are shared).  The methods:

* ``isgd`` — ISGD with fixed steps (``q = 0``, ``p = 0``);
* ``isgd_decreasing`` — ISGD with ``α_k = α₀ (k+1)^−q_dec``, ``ε_k = ε₀ (k+1)^−p_dec``
  (``q_dec = 0.6 ∈ (½, 1)``, ``p_dec = 0.5``);
* ``maid`` — MAID on the full training set (maid.py), initial ``ε₀``, ``α₀``;
* ``ift`` — inexact GD on the full training set with fixed accuracy ``ift_eps`` and step ``α₀``.

Output: a new folder under ``results_dir`` with the four run folders (train.py's outputs),
``curves.png`` (training loss and test PSNR of all methods against computations and wall time),
``comparison.json``; a table of test PSNR at 25 %, 50 % and 100 % of the budget (the first
evaluation at or after that many computations; ``eval_points`` is a multiple of 4 so these are
evaluation points).  Last line:
``test_psnr isgd=<dB> isgd_decreasing=<dB> maid=<dB> ift=<dB> initial=<dB>``.
"""
from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import config  # noqa: E402
import train  # noqa: E402

_PROG = "isgd_vs_maid.py"
Q_DECREASING = 0.6
P_DECREASING = 0.5
METHODS = {
    "isgd": dict(method="isgd", q=0.0, p=0.0),
    "isgd_decreasing": dict(method="isgd", q=Q_DECREASING, p=P_DECREASING),
    "maid": dict(method="maid"),
    "ift": dict(method="ift"),
}
QUICK = dict(train_size=8, test_size=4, batch_size=4, img_size=32, foe_filters=4, foe_size=5, budget=4000,
             eval_points=8)
FRACTIONS = (0.25, 0.5, 1.0)


def psnr_at(evals: list[dict], budget: int, fraction: float) -> float:
    """Test PSNR of the first evaluation with at least ``fraction · budget`` computations (the last
    one if the run stopped earlier)."""
    for e in evals:
        if e["computations"] >= fraction * budget:
            return e["test_psnr"]
    return evals[-1]["test_psnr"]


def first_reaching(evals: list[dict], target: float):
    """Computations at the first evaluation whose test PSNR is ≥ ``target`` (None if never)."""
    return next((e["computations"] for e in evals if e["test_psnr"] >= target), None)


def run(cfg: dict | None = None, quick: bool = False, progress: bool = True, **overrides) -> dict:
    """Run the four methods with the shared settings; returns the comparison dict."""
    import figures

    base = config.resolve(train.DEFAULTS, {**(QUICK if quick else {}), **(cfg or {}), **overrides}, train.RENAMED)
    config.check(not base["resume"], "--resume is not supported here; resume the single run with train.py")
    config.check(base["eval_points"] % 4 == 0, f"eval_points must be a multiple of 4 (25 % steps), got "
                                              f"{base['eval_points']}")
    train.validate(base)
    out = config.make_run_dir(base["results_dir"], time.strftime("%Y%m%d-%H%M%S") + "_isgd_vs_maid")
    runs = {}
    for name, setting in METHODS.items():
        if progress:
            print(f"== {name}", file=sys.stderr)
        runs[name] = train.run({**base, **setting, "results_dir": out, "name": name}, progress=progress)
    budget = base["budget"]
    evals = {k: s["evals"] for k, s in runs.items()}
    noisy = runs["isgd"]["scores"][next(iter(runs["isgd"]["scores"]))]["psnr"]
    train.curves_figure(evals, os.path.join(out, "curves.png"), noisy)
    table = {k: {f"{int(100 * f)}%": psnr_at(ev, budget, f) for f in FRACTIONS} for k, ev in evals.items()}
    maid_final = evals["maid"][-1]["test_psnr"]
    result = {"settings": base, "table": table, "initial": runs["isgd"]["test_psnr_initial"], "noisy": noisy,
              "train_seconds": {k: s["train_seconds"] for k, s in runs.items()},
              "computations_to_maid_final": {k: first_reaching(ev, maid_final) for k, ev in evals.items()},
              "run_dirs": {k: s["run_dir"] for k, s in runs.items()}, "out": out}
    figures.save_json(os.path.join(out, "comparison.json"), result)
    return result


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    argv = [a for a in argv if a != "--quick"]
    try:
        cfg, _ = config.parse_argv(train.DEFAULTS, argv, train.RENAMED)
        explicit = {k: v for k, v in cfg.items() if v != train.DEFAULTS[k]}
        r = run(explicit, quick=quick)
    except config.ConfigError as e:
        config.fail(_PROG, e)
    s = r["settings"]
    print(f"\n{s['problem']}, σ = {s['noise_level']:.4g}, {s['train_size']} train / {s['test_size']} test crops "
          f"{s['img_size']}×{s['img_size']}, {s['regulariser']}, budget {s['budget']} computations")
    print(f"{'method':16s} " + " ".join(f"{k:>8s}" for k in r["table"]["isgd"]) + f" {'train s':>8s} "
          f"{'comp. to MAID final':>20s}")
    for k, row in r["table"].items():
        reach = r["computations_to_maid_final"][k]
        print(f"{k:16s} " + " ".join(f"{v:8.2f}" for v in row.values()) + f" {r['train_seconds'][k]:8.1f} "
              f"{'never' if reach is None else reach:>20}")
    print(f"initial regulariser {r['initial']:.2f} dB, noisy {r['noisy']:.2f} dB; results in {r['out']}")
    final = {k: row["100%"] for k, row in r["table"].items()}
    print("test_psnr " + " ".join(f"{k}={v:.2f}" for k, v in final.items()) + f" initial={r['initial']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
