"""Which of the paper code's 1D differences (SPEC §5) make its figure say "MAID ≈ ½ LISTA"?

    python experiments/paper_defects_1d.py                 # the five runs below, full budgets
    python experiments/paper_defects_1d.py --quick         # CI-sized budgets (same table, not the numbers)

SPEC §4.1 reports, from the paper's Fig. 3, "MAID at about half of LISTA's time and a quarter of
IFT's, reaching a lower loss than LISTA".  The paper's code differs from §4.1 in three ways,
each a switch of ``ADP_1D.py``:

* ``lista_paper_loss`` — LISTA's logged loss is ``‖Ax − y‖²`` (no ½): its curve is 2× too high
  (training unchanged);
* ``paper_adjoint`` — IFT's (and MAID's) adjoint solve with ``(I − DM)`` instead of its transpose;
* ``maid_paper_stop`` — MAID's lower-level test without ``Bᵀ`` (not a certificate: every solve
  runs to its cap).

This script runs ADP_1D.py's three methods (``ADP_1D.METHODS``, the driver's own code) with the
defaults, with each switch alone and with all three; a method is computed once per setting of
the switches it depends on (LISTA once, IFT twice, MAID four times) and evaluated as
``ADP_1D.run`` does.  It writes ``table.md``, ``table.csv``, ``summary.json`` and
``loss_vs_time.png`` (default against all three) into a new folder ``Results/1d/<date-time>/``.
Columns, per run (times: each method's own clock, computation only):

* ``t MAID / t LISTA`` and ``t MAID / t IFT`` — total wall times at the paper's budgets;
* ``MAID → LISTA final`` — MAID's time to its first logged loss ≤ LISTA's final logged loss,
  over LISTA's total time: the figure's "MAID reaches LISTA's loss in ½ of LISTA's time" read
  off the logged curves (< 1: MAID gets there first; ``never``: MAID does not reach it);
* ``MAID / LISTA to LISTA's plateau`` — the time each needs to come within ``PLATEAU_REL`` (1 %)
  of LISTA's final logged loss, MAID's over LISTA's (the figure's "MAID at about half of LISTA's time";
  ``never``: MAID does not get there);
* ``MAID → IFT target`` / ``LISTA → IFT target`` — the driver's time to IFT's final loss ×
  (1 + ``target_rel``) (``ADP_1D.ift_target``; 1 % by default);
* ``g MAID / g LISTA (logged)`` — final logged losses (what the figure shows);
* ``f MAID / f LISTA (accurate)`` — the same with the lower level solved to 1e-10 (what the
  methods achieved).

The last line printed is ``paper_defects_1d <run>=<MAID / LISTA to LISTA's plateau> ...``.
"""
from __future__ import annotations

import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_ROOT, _HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import config  # noqa: E402
from config import ConfigError  # noqa: E402

# ------------------------------------------------------------------------------------------
runs = "all"               # comma-separated names of VARIANTS, or all
quick = False              # small budgets (IFT 300, LISTA 200, MAID 60 iterations)
threads = 1
results_dir = "Results/1d"
DEFAULTS = config.defaults(globals())
_PROG = "experiments/paper_defects_1d.py"
PLATEAU_REL = 0.01         # "LISTA's plateau": within 1 % of LISTA's final logged loss
_QUICK = dict(ift_steps=300, lista_steps=200, maid_iters=60)

# run name -> ADP_1D overrides
VARIANTS = {
    "default": {},
    "lista_paper_loss": {"lista_paper_loss": True},
    "paper_adjoint": {"paper_adjoint": True},
    "maid_paper_stop": {"maid_paper_stop": True},
    "all three": {"lista_paper_loss": True, "paper_adjoint": True, "maid_paper_stop": True},
}


def first_time_at_or_below(log, level):
    """The ``time`` of the first record whose ``upper_loss`` ≤ ``level`` (None if none)."""
    return next((r["time"] for r in log if r["upper_loss"] <= level), None)


def _ratio(a, b):
    return None if a is None or b is None or not b else a / b


def summarise(name: str, runs: dict) -> dict:
    """One table line from the evaluated runs of one variant (``ADP_1D.evaluate``)."""
    t = {k: runs[k]["time"] for k in runs}
    lista_final = runs["LISTA"]["final_loss"]
    t_maid_to_lista = first_time_at_or_below(runs["MAID"]["log"], lista_final)
    level = lista_final * (1 + PLATEAU_REL)        # LISTA's plateau
    t_lista_plateau = first_time_at_or_below(runs["LISTA"]["log"], level)
    t_maid_plateau = first_time_at_or_below(runs["MAID"]["log"], level)
    m = runs                                       # short name for the table's many columns
    return {
        "run": name,
        "t_IFT": t["IFT"], "t_LISTA": t["LISTA"], "t_MAID": t["MAID"],
        "t_MAID/t_LISTA": _ratio(t["MAID"], t["LISTA"]), "t_MAID/t_IFT": _ratio(t["MAID"], t["IFT"]),
        "MAID_to_LISTA_final/t_LISTA": _ratio(t_maid_to_lista, t["LISTA"]),
        "t_LISTA_plateau": t_lista_plateau, "t_MAID_to_LISTA_plateau": t_maid_plateau,
        "MAID/LISTA_to_plateau": _ratio(t_maid_plateau, t_lista_plateau),
        "MAID_stop": runs["MAID"]["stop"],
        "MAID_to_IFT_target": m["MAID"]["time_to_target"], "LISTA_to_IFT_target": m["LISTA"]["time_to_target"],
        "IFT_to_IFT_target": m["IFT"]["time_to_target"],
        "g_MAID/g_LISTA": _ratio(m["MAID"]["final_loss"], m["LISTA"]["final_loss"]),
        "f_MAID/f_LISTA": _ratio(m["MAID"]["f_accurate"], m["LISTA"]["f_accurate"]),
        "g_MAID": m["MAID"]["final_loss"], "g_LISTA": m["LISTA"]["final_loss"], "g_IFT": m["IFT"]["final_loss"],
        "f_MAID": m["MAID"]["f_accurate"], "f_LISTA": m["LISTA"]["f_accurate"], "f_IFT": m["IFT"]["f_accurate"],
        "MAID_iters": m["MAID"]["upper_iters"], "MAID_lower_iters": m["MAID"]["lower_iters"],
        "MAID_uncertified": f"{m['MAID']['uncertified']}/{m['MAID']['solves']}",
    }


# which switches each method's computation depends on (runs with equal keys are computed once)
_DEPENDS = {"IFT": ("paper_adjoint",), "LISTA": (), "MAID": ("paper_adjoint", "maid_paper_stop")}


def run_variants(names, base: dict) -> dict:
    """``{variant: evaluated runs}``: each method is computed once per distinct setting of the
    switches it depends on (:data:`_DEPENDS`; ``lista_paper_loss`` only rewrites LISTA's log,
    ``ADP_1D.paper_lista_log``), then evaluated as ``ADP_1D.run`` does (target:
    ``ADP_1D.ift_target``, IFT's final logged loss × (1 + ``target_rel``))."""
    import ADP_1D
    cache, out = {}, {}
    for n in names:
        cfg = config.resolve(ADP_1D.DEFAULTS, dict(base, **VARIANTS[n]))
        ADP_1D.validate(cfg)
        _, x_true, A, _, x0, make_problem = ADP_1D.setup(cfg)
        runs = {}
        for meth in ADP_1D.NAMES:
            key = (meth,) + tuple(cfg[k] for k in _DEPENDS[meth])
            if key not in cache:
                print(f"--- {n}: {meth} ({', '.join(f'{k}={cfg[k]}' for k in _DEPENDS[meth]) or 'no switch'})",
                      flush=True)
                cache[key] = ADP_1D.METHODS[meth](dict(cfg, lista_paper_loss=False), make_problem, A, x0)
            r = dict(cache[key])
            if meth == "LISTA" and cfg["lista_paper_loss"]:
                r["log"] = ADP_1D.paper_lista_log(r["log"])
            runs[meth] = r
        ADP_1D.evaluate(runs, make_problem(), x_true, ADP_1D.ift_target(runs, cfg), cfg["eval_eps"])
        out[n] = runs
    return out


def loss_figure(variants: dict, path: str) -> None:
    """Logged upper loss against wall time of LISTA and MAID (and IFT), default against the
    paper's three differences together: the paper's Fig. 3 as this package and as the paper's code draw it."""
    import figures
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [n for n in ("default", "all three") if n in variants]
    fig, axes = plt.subplots(1, len(shown), figsize=(6.5 * len(shown), 4.2), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], shown):
        for meth, col in (("IFT", "tab:blue"), ("LISTA", "tab:orange"), ("MAID", "tab:green")):
            log = variants[n][meth]["log"]
            ax.plot([r["time"] for r in log], [r["upper_loss"] for r in log], color=col, lw=1.3, label=meth)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("wall time [s] (log)")
        ax.set_title(n + (" (SPEC §4.1)" if n == "default" else " (the paper's code)"))
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    axes[0, 0].set_ylabel("logged upper loss (log)")
    fig.tight_layout()
    figures.save_figure(fig, path)


def _f(v, spec):
    return "never" if v is None else format(v, spec)


def markdown(lines: list[dict], header_note: str) -> str:
    out = [header_note, "",
           "| run | t MAID / t LISTA | t MAID / t IFT | MAID → LISTA final / t LISTA | MAID / LISTA to LISTA's plateau | "
           "MAID → IFT target [s] | "
           "LISTA → IFT target [s] | g MAID / g LISTA (logged) | f MAID / f LISTA (accurate) | MAID it (lower it), stop | "
           "MAID uncert./solves |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in lines:
        out.append(f"| {r['run']} | {_f(r['t_MAID/t_LISTA'], '.3f')} | {_f(r['t_MAID/t_IFT'], '.3f')} | "
                   f"{_f(r['MAID_to_LISTA_final/t_LISTA'], '.3f')} | {_f(r['MAID/LISTA_to_plateau'], '.3f')} | "
                   f"{_f(r['MAID_to_IFT_target'], '.2f')} | "
                   f"{_f(r['LISTA_to_IFT_target'], '.2f')} | {_f(r['g_MAID/g_LISTA'], '.3f')} | "
                   f"{_f(r['f_MAID/f_LISTA'], '.3f')} | {r['MAID_iters']} ({r['MAID_lower_iters']}), {r['MAID_stop']} | "
                   f"{r['MAID_uncertified']} |")
    out += ["", "| run | t IFT [s] | t LISTA [s] | t MAID [s] | g IFT | g LISTA | g MAID | f IFT | f LISTA | f MAID |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in lines:
        out.append(f"| {r['run']} | {r['t_IFT']:.2f} | {r['t_LISTA']:.2f} | {r['t_MAID']:.2f} | {r['g_IFT']:.5g} | "
                   f"{r['g_LISTA']:.5g} | {r['g_MAID']:.5g} | {r['f_IFT']:.5g} | {r['f_LISTA']:.5g} | "
                   f"{r['f_MAID']:.5g} |")
    return "\n".join(out) + "\n"


def run(cfg: dict | None = None, **overrides) -> dict:
    opts = config.resolve(DEFAULTS, {**(cfg or {}), **overrides})
    names = list(VARIANTS) if opts["runs"] == "all" else [s.strip() for s in opts["runs"].split(",") if s.strip()]
    for n in names:
        config.check(n in VARIANTS, f"unknown run {n!r}; use one of {', '.join(VARIANTS)}")
    config.check(names, "give at least one run with --runs=default,...")
    config.check(opts["threads"] >= 1, f"threads must be a positive integer, got {opts['threads']}")
    config.check_writable(opts["results_dir"])
    import torch
    import figures
    run_dir = config.make_run_dir(opts["results_dir"], time.strftime("%Y%m%d-%H%M%S") + ("_quick" if opts["quick"] else ""))
    base = dict(progress=False, threads=opts["threads"], **(_QUICK if opts["quick"] else {}))
    saved = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(opts["threads"])
    torch.set_default_dtype(torch.float64)
    try:
        variants = run_variants(names, base)
    finally:
        torch.set_num_threads(saved[0])
        torch.set_default_dtype(saved[1])
    lines = [summarise(n, variants[n]) for n in names]
    note = (f"ADP_1D.py at its defaults{' (quick budgets: ' + str(_QUICK) + ')' if opts['quick'] else ''}, one "
            f"thread, on a shared machine (wall times carry the load; ratios compare runs of one process). "
            f"Each method is computed once per setting of the switches it depends on.")
    md = markdown(lines, note)
    figures._atomic(os.path.join(run_dir, "table.md"), lambda tmp: open(tmp, "w").write(md))
    figures.save_csv(os.path.join(run_dir, "table.csv"), lines)
    figures.save_json(os.path.join(run_dir, "summary.json"), {"options": opts, "runs": lines})
    loss_figure(variants, os.path.join(run_dir, "loss_vs_time.png"))
    return {"run_dir": run_dir, "lines": lines, "markdown": md}


def main(argv):
    argv = ["--quick=true" if a == "--quick" else a for a in argv]
    try:
        cfg, _ = config.parse_argv(DEFAULTS, argv)
        out = run(cfg)
    except ConfigError as e:
        config.fail(_PROG, e)
    print(out["markdown"])
    print(out["run_dir"])
    print("paper_defects_1d " + " ".join(f"{r['run'].replace(' ', '_')}={_f(r['MAID/LISTA_to_plateau'], '.3f')}"
                                         for r in out["lines"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
