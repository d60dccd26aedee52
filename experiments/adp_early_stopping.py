"""No-reference early stopping for ADP-β-MAID (beyond the paper): does ES-WMV, fed ADP's
reconstruction at each upper iteration, pick an iterate close to the PSNR-best one?

    python experiments/adp_early_stopping.py [--image=astronaut] [--beta=1e-4] [--upper_iter=60] ...
    OMP_NUM_THREADS=1 python experiments/adp_early_stopping.py ...   # on an overloaded machine

Any of ADP.py's settings can be overridden with ``--name=value``; this script's own defaults
(below, ``OVERRIDES``) put ADP in a regime where it overfits: a small kernel penalty β (the kernel
is free to fit the noise), MAID run to a tight threshold (1e-6) for more upper iterations, the
learned upper operator ``A_up = B_b`` (the paper's 2D choice, set here explicitly: ADP.py's default
became ``known``), the CPU size 128×128.

The reconstruction ``x_j`` after each *accepted* upper iteration j is fed to ES-WMV (through
:func:`maid.maid`'s ``callback(record, state)``, ``state.x``); a rejected iteration leaves the
kernel unchanged, so its ``x`` is not a new iterate and would only lower the variance.

**W and P for a few dozen iterates.**  DIP's defaults (W = 100, P = 1000) assume thousands of
iterations.  Here a run has ~20–60 accepted iterates, so ``es_window = 5`` (the smallest window
whose variance is not dominated by a single step) and ``es_patience = 10`` (P = 2W: the run must
be able to end inside its budget).  Because the iterates are kept, the script also replays ES-WMV
on them for W ∈ {3, 5, 8} × P ∈ {5, 10, 20} and prints the selection of each (the sensitivity).

Prints one table row per setting and the last line
``adp_es psnr_es=<dB> psnr_best=<dB> psnr_last=<dB> stop_iter=<j> best_iter=<j>`` (j counts
accepted iterations); writes ``adp_es.json`` and ``adp_es.png`` (PSNR and VAR against the
iteration) into a new folder under ``results_dir``.
"""
from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import ADP  # noqa: E402
import config  # noqa: E402
import figures  # noqa: E402
from early_stopping import WindowedVariance  # noqa: E402
from imaging import make_data, psnr_ssim, resolve_device  # noqa: E402
from maid import maid  # noqa: E402

OVERRIDES = {"size_x": 128, "size_y": 128, "beta": 1e-4, "threshold": 1e-6, "upper_iter": 60, "upper_operator": "learned"}
ES_WINDOW, ES_PATIENCE = 5, 10
REPLAY = [(w, p) for w in (3, 5, 8) for p in (5, 10, 20)]


def select(xs: list[torch.Tensor], window: int, patience: int) -> tuple[int | None, int | None]:
    """ES-WMV on a stored sequence: ``(k*, k_stop)`` — the selected iterate and where patience ran
    out (None if it did not), both 1-based."""
    det = WindowedVariance(window, patience)
    for k, x in enumerate(xs, 1):
        if det.update(x):
            return det.best()[1], k
    return det.best()[1], None


def es_figure(psnrs, variances, k_es, k_best, path) -> None:
    import matplotlib.pyplot as plt

    k = range(1, len(psnrs) + 1)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.plot(k, psnrs, "-o", ms=3, label="PSNR")
    ax.axvline(k_es, color="C3", ls="--", label=f"ES-WMV selection ({k_es})")
    ax.axvline(k_best, color="C2", ls=":", label=f"PSNR-best ({k_best})")
    ax.set_xlabel("accepted upper iteration")
    ax.set_ylabel("PSNR [dB]")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower center", fontsize=8)
    ax2 = ax.twinx()
    pts = [(i, v) for i, v in zip(k, variances) if v is not None and v > 0]
    if pts:
        ax2.semilogy(*zip(*pts), color="C1", lw=1)
        ax2.set_ylabel("ES-WMV variance", color="C1")
    fig.tight_layout()
    figures.save_figure(fig, path)


def main(argv: list[str]) -> int:
    try:
        _, explicit = config.parse_argv(ADP.DEFAULTS, argv, ADP.RENAMED)
        cfg = config.resolve(ADP.DEFAULTS, {**OVERRIDES, **explicit}, ADP.RENAMED)
        ADP.validate(cfg)
        dev = resolve_device(cfg["device"], cfg["dtype"])
        x_true, b0, y = make_data(cfg, ADP._IMAGES, dev, getattr(torch, cfg["dtype"]))
    except config.ConfigError as e:
        config.fail("adp_early_stopping.py", e)

    def metrics(x):
        p, s = psnr_ssim(x, x_true)
        return {"psnr": p, "ssim": s}

    problem, prox = ADP.build_composite(cfg, y, b0, metrics)        # as ADP.run: smooth part and prox
    det = WindowedVariance(ES_WINDOW, ES_PATIENCE)
    xs, psnrs, variances, stop_at = [], [], [], []
    bar = tqdm(total=cfg["upper_iter"], desc="MAID", unit="it", dynamic_ncols=True)

    def on_iteration(rec, st):
        bar.update(1)
        if rec["accepted"]:
            xs.append(st.x.detach().clone())
            psnrs.append(rec["psnr"])
            if det.update(st.x) and not stop_at:
                stop_at.append(len(xs))
            variances.append(det.value)
            bar.set_postfix(psnr=f"{rec['psnr']:.2f}", es=det.best_iter)

    t0 = time.perf_counter()
    result = maid(problem, b0.clone(), y.clone(), ADP.maid_config(cfg, ADP.upper_scale(cfg, y)),
                  callback=on_iteration, prox=prox)
    bar.close()
    seconds = time.perf_counter() - t0
    if not xs:
        print("ADP accepted no step: nothing to stop early", file=sys.stderr)
        return 1

    k_best = max(range(len(psnrs)), key=psnrs.__getitem__) + 1
    k_es = det.best_iter or len(xs)
    first = psnr_ssim(xs[0], x_true)[0]
    out = {"config": cfg, "es_window": ES_WINDOW, "es_patience": ES_PATIENCE, "accepted": len(xs),
           "upper_iterations": len(result.log), "stop_reason": result.stop_reason, "seconds": seconds,
           "psnr_blurry": psnr_ssim(y, x_true)[0], "psnr_first": first, "psnrs": psnrs, "variances": variances,
           "psnr_es": psnrs[k_es - 1], "psnr_best": psnrs[k_best - 1], "psnr_last": psnrs[-1],
           "stop_iter": k_es, "best_iter": k_best, "patience_ran_out_at": stop_at[0] if stop_at else None,
           "replay": []}
    print(f"\nADP-β-MAID, {cfg['image']} {cfg['size_y']}×{cfg['size_x']}, β = {cfg['beta']:g}, threshold "
          f"{cfg['threshold']:g}: {len(result.log)} upper iterations ({len(xs)} accepted), stop {result.stop_reason}, "
          f"{seconds:.0f} s; PSNR blurry {out['psnr_blurry']:.2f}, first iterate {first:.2f}, best {out['psnr_best']:.2f} "
          f"(it. {k_best}), last {out['psnr_last']:.2f}")
    print(f"{'W':>3s} {'P':>3s} {'selected':>9s} {'PSNR':>7s} {'gap dB':>7s} {'gap it':>7s} {'stops at':>9s}")
    for w, p in REPLAY:
        k_sel, k_stop = select(xs, w, p)
        k_sel = k_sel or len(xs)
        row = {"window": w, "patience": p, "stop_iter": k_sel, "psnr": psnrs[k_sel - 1], "stops_at": k_stop}
        out["replay"].append(row)
        print(f"{w:3d} {p:3d} {k_sel:9d} {row['psnr']:7.2f} {out['psnr_best'] - row['psnr']:7.2f} "
              f"{k_best - k_sel:7d} {k_stop!s:>9s}")
    name = time.strftime("%Y%m%d-%H%M%S") + f"_adp_es_{os.path.splitext(os.path.basename(cfg['image']))[0]}"
    run_dir = config.make_run_dir(cfg["results_dir"], name)
    figures.save_json(os.path.join(run_dir, "adp_es.json"), out)
    es_figure(psnrs, variances, k_es, k_best, os.path.join(run_dir, "adp_es.png"))
    print(run_dir)
    print(f"adp_es psnr_es={out['psnr_es']:.2f} psnr_best={out['psnr_best']:.2f} psnr_last={out['psnr_last']:.2f} "
          f"stop_iter={k_es} best_iter={k_best}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
