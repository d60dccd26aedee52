"""ISGD (fixed and decreasing steps) against MAID and IFT on the same data and budget (SPEC §6).

    python experiments/isgd_vs_maid.py                  # train.py's defaults for the shared settings
    python experiments/isgd_vs_maid.py --quick          # CI-sized (seconds to a few minutes on 2 cores)
    python experiments/isgd_vs_maid.py --img_size=64 --budget=50000 --threads=1

Every train.py setting can be overridden with ``--name=value`` and applies to all four runs
(data, split, noise, regulariser, initial θ, budget are shared).  The methods:

* ``isgd`` — ISGD with fixed steps (``q = 0``, ``p = 0``);
* ``isgd_decreasing`` — ISGD with ``α_k = step0_dec (k+1)^−q_dec``, ``ε_k = ε₀ (k+1)^−p_dec``,
  ``DECREASING``: ``step0_dec = 1000``, ``q_dec = 0.6 ∈ (½, 1)``, ``p_dec = 0`` (override with
  ``--step0_dec=``, ``--q_dec=``, ``--p_dec=``; ``--step0`` does not reach this run).  Chosen by
  ``experiments/isgd_schedule_selection.py`` (``Results/isgd_schedule_selection_96_2e4``): the
  lowest final full *training* loss (no test image read) at budget 2·10⁴ among step0 ∈ {300, 1000,
  3000} × p ∈ {0, ½} at q = 0.6 on the target setting's data (the two step0 = 3000 runs collapsed
  to the regulariser-off loss σ² and were interrupted).  The first schedule, ``DECREASING_FIRST``
  (step0 = 300 shared with the other methods, q = 0.6, p = 0.5, picked by hand), is
  ``--step0_dec=300 --q_dec=0.6 --p_dec=0.5``;
* ``maid`` — MAID on the full training set (maid.py), initial ``ε₀``, ``α₀``;
* ``ift`` — inexact GD on the full training set with fixed accuracy ``ift_eps`` and step ``α₀``.

Splitting the work (e.g. two processes on two cores)::

    python experiments/isgd_vs_maid.py --out=Results/cmp --methods=maid,isgd_decreasing
    python experiments/isgd_vs_maid.py --out=Results/cmp --methods=isgd,ift
    python experiments/isgd_vs_maid.py --out=Results/cmp            # reuses all four, writes the table

``--out=FOLDER`` names the comparison folder (created if missing) instead of a new time-stamped
one; a method whose run folder there holds a ``summary.json`` with the same settings is read
back, not rerun (different settings: one clear line, nothing run).  ``--methods`` runs a subset;
the table and the last line then cover the methods present.

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
# ISGD with decreasing steps, α_k = step0 (k+1)^−q, ε_k = eps0 (k+1)^−p: chosen by
# experiments/isgd_schedule_selection.py (lowest final full training loss at budget 2·10⁴, no test data:
# 0.002206 against 0.002261 (step0 300, p 0), 0.002295 (1000, ½), 0.002489 (300, ½)).
DECREASING = dict(step0=1000.0, q=0.6, p=0.0)
# The first schedule (step0 shared with the other methods, q and p picked by hand): at the target
# setting (Results/train_isgd_vs_maid_96_2e5) it never reached MAID's final test PSNR.
DECREASING_FIRST = dict(step0=300.0, q=0.6, p=0.5)
METHODS = {
    "isgd": dict(method="isgd", q=0.0, p=0.0),
    "isgd_decreasing": dict(method="isgd", **DECREASING),
    "maid": dict(method="maid"),
    "ift": dict(method="ift"),
}
QUICK = dict(train_size=8, test_size=4, batch_size=4, img_size=32, foe_filters=4, foe_size=5, budget=4000,
             eval_points=8, threads=1)
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


def _reusable(run_dir: str, setting: dict) -> dict | None:
    """The summary of a finished run in ``run_dir`` made with ``setting`` (None if there is none;
    ConfigError if there is one with other settings)."""
    import json

    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    differ = sorted(k for k in train.DEFAULTS if k not in train._RUN_LOCAL and saved.get(k) != setting[k])
    config.check(not differ, f"{run_dir} was run with other settings ({', '.join(differ)}); choose another --out")
    with open(path) as f:
        return json.load(f)


def run(cfg: dict | None = None, quick: bool = False, progress: bool = True, out: str = "",
        methods: tuple[str, ...] = tuple(METHODS), decreasing: dict | None = None, **overrides) -> dict:
    """Run ``methods`` with the shared settings (reusing finished runs in ``out``); returns the
    comparison dict.  ``decreasing`` overrides ``step0``, ``q``, ``p`` of ``isgd_decreasing``."""
    import figures

    base = config.resolve(train.DEFAULTS, {**(QUICK if quick else {}), **(cfg or {}), **overrides}, train.RENAMED)
    schedules = {**METHODS, "isgd_decreasing": {**METHODS["isgd_decreasing"], **(decreasing or {})}}
    dec = schedules["isgd_decreasing"]
    config.check(0.5 < dec["q"] < 1, f"q_dec must lie in (1/2, 1) (decreasing steps, SPEC §6), got {dec['q']}")
    config.check(not base["resume"], "--resume is not supported here; resume the single run with train.py")
    config.check(base["eval_points"] % 4 == 0, f"eval_points must be a multiple of 4 (25 % steps), got "
                                              f"{base['eval_points']}")
    unknown = [m for m in methods if m not in METHODS]
    config.check(methods and not unknown, f"unknown methods {unknown or '(none)'}; use some of {', '.join(METHODS)}")
    for name in methods:
        train.validate({**base, **schedules[name]})
    if out:
        config.check(not os.path.isfile(out), f"--out={out!r} is a file; give a folder")
        os.makedirs(out, exist_ok=True)
    else:
        out = config.make_run_dir(base["results_dir"], time.strftime("%Y%m%d-%H%M%S") + "_isgd_vs_maid")
    runs = {}
    for name in METHODS:
        run_dir = os.path.join(out, name)
        setting = {**base, **schedules[name], "results_dir": out, "name": name}
        done = _reusable(run_dir, setting) if os.path.isdir(run_dir) else None
        if done is not None:
            runs[name] = done
        elif name in methods:
            config.check(not os.path.exists(run_dir), f"{run_dir} exists without a finished run; remove it first")
            if progress:
                print(f"== {name}", file=sys.stderr)
            runs[name] = train.run(setting, progress=progress)
    budget = base["budget"]
    evals = {k: s["evals"] for k, s in runs.items()}
    first = next(iter(runs.values()))
    noisy = first["scores"][next(iter(first["scores"]))]["psnr"]
    train.curves_figure(evals, os.path.join(out, "curves.png"), noisy)
    table = {k: {f"{int(100 * f)}%": psnr_at(ev, budget, f) for f in FRACTIONS} for k, ev in evals.items()}
    maid_final = evals["maid"][-1]["test_psnr"] if "maid" in evals else None
    result = {"settings": base, "schedules": {k: schedules[k] for k in runs}, "table": table, "initial": first["test_psnr_initial"], "noisy": noisy,
              "train_seconds": {k: s["train_seconds"] for k, s in runs.items()},
              "computations": {k: s["computations"] for k, s in runs.items()},
              "maid_final": maid_final,
              "computations_to_maid_final": {k: None if maid_final is None else first_reaching(ev, maid_final)
                                             for k, ev in evals.items()},
              "run_dirs": {k: s["run_dir"] for k, s in runs.items()}, "out": out}
    figures.save_json(os.path.join(out, "comparison.json"), result)
    return result


def split_own(argv: list[str], valued: tuple[str, ...], switches: tuple[str, ...] = ("quick",)):
    """A script's own options out of ``argv``: ``(values, present, rest)`` with ``values`` the
    ``--name=value`` options named in ``valued``, ``present`` the ``--switch`` flags given and
    ``rest`` what goes on to train.py's parser."""
    values, present, rest = {}, set(), []
    for a in argv:
        key, eq, value = a[2:].partition("=") if a.startswith("--") else ("", "", "")
        if eq and key in valued:
            values[key] = value
        elif not eq and key in switches:
            present.add(a)
        else:
            rest.append(a)
    return values, present, rest


def _decreasing(values: dict) -> dict:
    """The ``--step0_dec/--q_dec/--p_dec`` overrides of ``DECREASING`` (ConfigError outside the family)."""
    dec = {}
    for k in ("step0", "q", "p"):
        if k + "_dec" in values:
            try:
                dec[k] = float(values[k + "_dec"])
            except ValueError:
                raise config.ConfigError(f"--{k}_dec takes a number, got {values[k + '_dec']!r}") from None
    return dec


def main(argv: list[str]) -> int:
    try:
        own, switches, rest = split_own(argv, ("out", "methods", "step0_dec", "q_dec", "p_dec"))
        _, explicit = config.parse_argv(train.DEFAULTS, rest, train.RENAMED)
        methods = tuple(m for m in own.get("methods", ",".join(METHODS)).split(",") if m)
        r = run(explicit, quick="--quick" in switches, out=own.get("out", ""), methods=methods,
                decreasing=_decreasing(own))
    except config.ConfigError as e:
        config.fail(_PROG, e)
    s = r["settings"]
    print(f"\n{s['problem']}, σ = {s['noise_level']:.4g}, {s['train_size']} train / {s['test_size']} test crops "
          f"{s['img_size']}×{s['img_size']}, {s['regulariser']}, budget {s['budget']} computations")
    print(f"{'method':16s} " + " ".join(f"{int(100 * f)}%".rjust(8) for f in FRACTIONS) + f" {'train s':>8s} "
          f"{'comp. to MAID final':>20s}")
    for k, row in r["table"].items():
        reach = r["computations_to_maid_final"][k]
        reach = "n/a" if r["maid_final"] is None else "never" if reach is None else reach
        print(f"{k:16s} " + " ".join(f"{v:8.2f}" for v in row.values()) + f" {r['train_seconds'][k]:8.1f} "
              f"{reach:>20}")
    if r["maid_final"] is not None:
        print(f"MAID's final test PSNR {r['maid_final']:.2f} dB after {r['computations']['maid']} computations")
    print(f"initial regulariser {r['initial']:.2f} dB, noisy {r['noisy']:.2f} dB; results in {r['out']}")
    final = {k: row["100%"] for k, row in r["table"].items()}
    print("test_psnr " + " ".join(f"{k}={v:.2f}" for k, v in final.items()) + f" initial={r['initial']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
