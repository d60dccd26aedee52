"""Choose ISGD's decreasing-step schedule by the final full training loss (SPEC §6), no test data.

    python experiments/isgd_schedule_selection.py                 # the grid below at budget 2·10⁴
    python experiments/isgd_schedule_selection.py --quick         # CI-sized (a minute or two on 2 cores)
    python experiments/isgd_schedule_selection.py --step0s=300,1000,3000 --qs=0.6,0.75 --ps=0,0.5 --jobs=2

The family is the SPEC's: ``α_k = step0 (k+1)^−q`` with ``q ∈ (½, 1)`` and ``ε_k = eps0 (k+1)^−p``
with ``p ≥ 0``.  Every grid point (``--step0s`` × ``--qs`` × ``--ps``) is one ``train.run`` with
``method = isgd`` and the shared settings (train.py's defaults, i.e. the issue's target setting of
``presets/train_full.py`` except the budget: 2·10⁴ computations here, a tenth of the target's, and 4
evaluation points; any train.py setting can be overridden with ``--name=value``).

The criterion is the **final full training loss** ``(1/N) Σ_i ‖x̂_i(θ) − x_i‖²/n`` over all N
training images, which train.py evaluates at the end of every run (``evals.json``, ``train_loss``,
lower level solved to ``eval_eps`` per image).  Test images and test PSNR are not read: train.py
still evaluates them in each run folder, but this script never opens them, and the table has no
test column.

``--out=FOLDER`` names the selection folder (created if missing); a grid point whose run folder there
holds a ``summary.json`` with the same settings is read back, not rerun (other settings: one clear
line, nothing run).  ``--jobs=N`` trains N grid points at a time in separate processes.

Output in the folder: one run folder per grid point (``step<step0>_q<q>_p<p>``, train.py's outputs),
``selection.csv`` / ``selection.md`` / ``selection.json`` (one row per grid point: the schedule, the
initial and final training loss, the last step's ``α`` and ``ε``).  Last line:
``chosen step0=<α₀> q=<q> p=<p> train_loss=<loss>``.
"""
from __future__ import annotations

import itertools
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import config  # noqa: E402
import isgd_vs_maid  # noqa: E402
import train  # noqa: E402

_PROG = "isgd_schedule_selection.py"
GRID = {"step0s": (300.0, 1000.0, 3000.0), "qs": (0.6,), "ps": (0.0, 0.5)}
SELECTION = dict(budget=20000, eval_points=4, threads=1)
QUICK = dict(isgd_vs_maid.QUICK, budget=1500, eval_points=2)
QUICK_GRID = {"step0s": (30.0, 300.0), "qs": (0.6,), "ps": (0.0, 0.5)}
_SCHEDULE = ("step0", "q", "p", "method")


def point_name(step0: float, q: float, p: float) -> str:
    return f"step{step0:g}_q{q:g}_p{p:g}"


def check_grid(grid: dict) -> list[tuple[float, float, float]]:
    """The grid points ``(step0, q, p)`` in order, each once; ConfigError outside the SPEC's family."""
    for key in GRID:
        config.check(len(grid.get(key, ())) > 0, f"--{key} needs at least one value")
    for s in grid["step0s"]:
        config.check(math.isfinite(s) and s > 0, f"step0 values must be finite and > 0, got {s}")
    for q in grid["qs"]:
        config.check(0.5 < q < 1, f"q values must lie in (1/2, 1) (decreasing steps, SPEC §6), got {q}")
    for p in grid["ps"]:
        config.check(math.isfinite(p) and p >= 0, f"p values must be finite and ≥ 0, got {p}")
    return list(dict.fromkeys(itertools.product(grid["step0s"], grid["qs"], grid["ps"])))


def _row(step0: float, q: float, p: float, summary: dict, eps0: float) -> dict:
    """The table row of one finished grid point: training losses only (no test quantity)."""
    k = max(summary["steps"] - 1, 0)
    return {"step0": step0, "q": q, "p": p, "train_loss_initial": summary["evals"][0]["train_loss"],
            "train_loss_final": summary["evals"][-1]["train_loss"], "computations": summary["computations"],
            "steps": summary["steps"], "step_last": step0 * (k + 1) ** -q, "eps_last": eps0 * (k + 1) ** -p,
            "run": os.path.basename(summary["run_dir"])}


def run(cfg: dict | None = None, quick: bool = False, out: str = "", grid: dict | None = None, jobs: int = 1,
        progress: bool = True) -> dict:
    """Train every grid point (reusing finished ones in ``out``) and choose the schedule with the
    lowest final full training loss; returns the selection dict (also written to ``selection.json``)."""
    import figures

    given = cfg or {}
    fixed = sorted(k for k in _SCHEDULE if k in given)
    config.check(not fixed, f"{', '.join('--' + k for k in fixed)} is set by the grid here; use --step0s, --qs, --ps")
    config.check(jobs >= 1, f"--jobs must be ≥ 1, got {jobs}")
    grid = {**(QUICK_GRID if quick else GRID), **(grid or {})}
    points = check_grid(grid)
    base = config.resolve(train.DEFAULTS, {**(QUICK if quick else SELECTION), **given}, train.RENAMED)
    config.check(not base["resume"], "--resume is not supported here; resume the single run with train.py")
    if out:
        config.check(not os.path.isfile(out), f"--out={out!r} is a file; give a folder")
    else:
        out = os.path.join(base["results_dir"], time.strftime("%Y%m%d-%H%M%S") + "_isgd_schedule_selection")
    settings, done = {}, {}
    for step0, q, p in points:
        name = point_name(step0, q, p)
        setting = {**base, "method": "isgd", "step0": step0, "q": q, "p": p, "results_dir": out, "name": name}
        train.validate(setting)
        run_dir = os.path.join(out, name)
        found = isgd_vs_maid._reusable(run_dir, setting) if os.path.isdir(run_dir) else None
        config.check(found is not None or not os.path.exists(run_dir),
                     f"{run_dir} exists without a finished run; remove it first")
        settings[name] = setting
        if found is not None:
            done[name] = found
    todo = [n for n in settings if n not in done]
    os.makedirs(out, exist_ok=True)
    if jobs == 1 or len(todo) <= 1:
        for name in todo:
            if progress:
                print(f"== {name}", file=sys.stderr)
            done[name] = train.run(settings[name], progress=progress)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {name: pool.submit(train.run, settings[name], progress=False) for name in todo}
            for name, fut in futures.items():
                done[name] = fut.result()
                if progress:
                    print(f"== {name} done", file=sys.stderr)
    rows = [_row(s, q, p, done[point_name(s, q, p)], base["eps0"]) for s, q, p in points]
    best = min(rows, key=lambda r: r["train_loss_final"])
    result = {"settings": {k: v for k, v in base.items() if k not in _SCHEDULE}, "grid": grid,
              "criterion": "final full training loss (train_loss of the last evaluation)", "rows": rows,
              "chosen": {k: best[k] for k in ("step0", "q", "p", "train_loss_final", "run")}, "out": out}
    figures.save_csv(os.path.join(out, "selection.csv"), rows)
    figures.save_json(os.path.join(out, "selection.json"), result)
    with open(os.path.join(out, "selection.md"), "w") as f:
        f.write(markdown_table(rows, best))
    return result


def markdown_table(rows: list[dict], best: dict) -> str:
    head = "| step0 | q | p | train loss initial | train loss final | computations | steps | α last | ε last |\n"
    lines = [head, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"]
    for r in rows:
        mark = " **(chosen)**" if r is best else ""
        lines.append(f"| {r['step0']:g} | {r['q']:g} | {r['p']:g} | {r['train_loss_initial']:.6f} | "
                     f"{r['train_loss_final']:.6f}{mark} | {r['computations']} | {r['steps']} | "
                     f"{r['step_last']:.4g} | {r['eps_last']:.3g} |\n")
    return "".join(lines)


def _floats(name: str, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise config.ConfigError(f"--{name} takes comma-separated numbers, got {text!r}") from None


def main(argv: list[str]) -> int:
    try:
        own, switches, rest = isgd_vs_maid.split_own(argv, ("out", "jobs", *GRID))
        grid = {k: _floats(k, own[k]) for k in GRID if k in own}
        try:
            jobs = int(own.get("jobs", "1"))
        except ValueError:
            raise config.ConfigError(f"--jobs takes an integer, got {own['jobs']!r}") from None
        _, explicit = config.parse_argv(train.DEFAULTS, rest, train.RENAMED)
        r = run(explicit, quick="--quick" in switches, out=own.get("out", ""), grid=grid, jobs=jobs)
    except config.ConfigError as e:
        config.fail(_PROG, e)
    s = r["settings"]
    print(f"\n{s['problem']}, σ = {s['noise_level']:.4g}, {s['train_size']} train crops {s['img_size']}×"
          f"{s['img_size']}, {s['regulariser']}, batch {s['batch_size']}, eps0 {s['eps0']:g}, budget {s['budget']} "
          f"computations; criterion: final full training loss")
    print(f"{'step0':>8s} {'q':>5s} {'p':>5s} {'loss initial':>13s} {'loss final':>12s} {'steps':>6s} "
          f"{'α last':>9s} {'ε last':>9s}")
    for row in r["rows"]:
        print(f"{row['step0']:8g} {row['q']:5g} {row['p']:5g} {row['train_loss_initial']:13.6g} "
              f"{row['train_loss_final']:12.6g} {row['steps']:6d} {row['step_last']:9.4g} {row['eps_last']:9.3g}")
    print(f"table in {os.path.join(r['out'], 'selection.md')}")
    c = r["chosen"]
    print(f"chosen step0={c['step0']:g} q={c['q']:g} p={c['p']:g} train_loss={c['train_loss_final']:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
