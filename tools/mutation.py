"""Mutation testing of the mathematical modules (development tool; not run by .ci/run).

    .venv/bin/python tools/mutation.py                        # every module of setup.cfg [mutmut]
    .venv/bin/python tools/mutation.py --changed              # modules changed since HEAD (and untracked)
    .venv/bin/python tools/mutation.py --changed=origin/main  # ... since another revision
    .venv/bin/python tools/mutation.py --modules operators.py elastic_net.py
    .venv/bin/python tools/mutation.py --modules maid.py --sample 150 --seed 0   # a uniform random sample
    .venv/bin/python tools/mutation.py --modules maid.py --mutants 'maid.x_error_bound__*'  # some mutants only
    .venv/bin/python tools/mutation.py --report               # the table of the last run again

Needs mutmut (``pip install -r requirements-dev.txt``) in the interpreter that runs this script.

What it does.  The modules to mutate, the modules and data the tests need, and the test files
come from ``setup.cfg``'s ``[mutmut]`` section.  The working tree (tracked and untracked files that
git does not ignore) is copied into ``--workdir`` (default ``mutants/``, git-ignored), so edits made during a
long run do not mix into it; there ``mutmut run`` first runs the selected tests once to learn
which test calls which function, then, for every mutant (one small change to one function: an
operator, a constant, a dropped call, ...), runs only the tests that call the mutated function
and records whether one failed (killed), none failed (survived), or the tests ran past
10 × their clean CPU time (setup.cfg timeout_multiplier; timeout: counted as killed, the mutant made a solver loop).  Threads: one
per worker (``OMP_NUM_THREADS=1``), workers ``--jobs`` (default 1), at ``nice`` 19.

Score per module = killed / (killed + survived), where mutants that no selected test reaches
("no tests") count as survived.  ``--sample N`` tests a uniform random sample of N mutants of the
chosen modules (seeded by ``--seed``; the untested ones are "not checked" and left out of the
score, so the score is an estimate of the full one, with the binomial standard error printed);
``--mutants PATTERN...`` tests the mutants whose names match (fnmatch, e.g. ``'maid.x_error_bound__*'``).
A full run of ``maid.py`` (~1900 mutants, ~30 s of tests each for the survivors) takes hours on
two cores: sample it.  The table, the score and the list of surviving mutants are
printed and written to ``<workdir>/mutation_report.json``; ``mutmut show NAME`` (run inside
``<workdir>``) prints a survivor's diff (``--show`` prints them all).
"""
from __future__ import annotations

import argparse
import configparser
import fnmatch
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KILLED = {"killed", "timeout", "segfault", "caught by type check"}
SURVIVED = {"survived", "no tests"}


def _lines(cfg: configparser.ConfigParser, key: str) -> list[str]:
    return [v.strip() for v in cfg.get("mutmut", key, fallback="").splitlines() if v.strip()]


def read_config(root: Path) -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    if not cfg.read(root / "setup.cfg") or not cfg.has_section("mutmut"):
        sys.exit("tools/mutation.py: error: setup.cfg has no [mutmut] section")
    return cfg


def _git(*args: str) -> list[str]:
    out = subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return [line for line in out.split("\0" if "-z" in args else "\n") if line]


def changed_files(rev: str) -> set[str]:
    """Paths changed between ``rev`` and the working tree, plus untracked files."""
    return set(_git("diff", "--name-only", rev)) | set(_git("ls-files", "--others", "--exclude-standard"))


def select_modules(cfg, changed: str | None, modules: list[str] | None) -> list[str]:
    mods = [m for m in _lines(cfg, "source_paths") if (ROOT / m).is_file()]
    if modules:
        unknown = sorted(set(modules) - set(mods))
        if unknown:
            sys.exit(f"tools/mutation.py: error: {', '.join(unknown)} not among the mutated modules of setup.cfg "
                     f"({', '.join(mods)})")
        mods = [m for m in mods if m in modules]
    if changed is not None:
        touched = changed_files(changed)
        mods = [m for m in mods if m in touched]
    return mods


def snapshot(workdir: Path) -> None:
    """Copy the tracked and non-ignored untracked files of the working tree into ``workdir``."""
    if workdir.exists():
        shutil.rmtree(workdir)
    rel = workdir.resolve().relative_to(ROOT) if workdir.resolve().is_relative_to(ROOT) else None
    for name in _git("ls-files", "-z", "--cached", "--others", "--exclude-standard"):
        p = Path(name)
        if rel is not None and (p == rel or rel in p.parents) or p.parts[0] == "mutants":
            continue
        src = ROOT / p
        if src.is_file():
            dst = workdir / p
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def write_run_config(cfg, workdir: Path, modules: list[str], skip_tests=()) -> list[str]:
    """setup.cfg of the run: the chosen modules mutated, every other top-level module copied, and
    only the listed test files that exist (glob patterns expanded, less ``skip_tests``).  Returns the
    test files."""
    tests = [str(f.relative_to(workdir)) for t in _lines(cfg, "pytest_add_cli_args_test_selection")
             for f in sorted(workdir.glob(t)) if f.is_file() and str(f.relative_to(workdir)) not in skip_tests]
    others = sorted(p.name for p in workdir.glob("*.py") if p.name not in modules)
    also = others + [a for a in _lines(cfg, "also_copy") if not a.endswith(".py") and (workdir / a).exists()]
    run_cfg = configparser.ConfigParser()
    run_cfg["mutmut"] = {k: v for k, v in cfg["mutmut"].items()}
    run_cfg["mutmut"]["source_paths"] = "\n" + "\n".join(modules)
    run_cfg["mutmut"]["also_copy"] = "\n" + "\n".join(also)
    run_cfg["mutmut"]["pytest_add_cli_args_test_selection"] = "\n" + "\n".join(tests)
    with open(workdir / "setup.cfg", "w") as f:
        run_cfg.write(f)
    return tests


def run_mutmut(workdir: Path, jobs: int, nice: int, names=(), quiet: bool = False) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *names]
    out = subprocess.DEVNULL if quiet else None
    return subprocess.run(cmd, cwd=workdir, env=env, preexec_fn=lambda: os.nice(nice), stdout=out,
                          stderr=out).returncode


NO_MUTANT = "no-such-mutant"


def all_mutant_names(workdir: Path, jobs: int, nice: int) -> list[str]:
    """Generate the mutants (and the test statistics, which mutmut caches for the next call) without
    testing any: ``mutmut run`` with a pattern that matches none stops right after generating."""
    run_mutmut(workdir, jobs, nice, [NO_MUTANT], quiet=True)
    names = [k for meta in sorted((workdir / "mutants").glob("*.py.meta"))
             for k in json.loads(meta.read_text())["exit_code_by_key"]]
    if not names:
        sys.exit(f"tools/mutation.py: error: mutmut generated no mutants in {workdir} (run it there by hand to see why)")
    return sorted(names)


def collect(workdir: Path) -> dict:
    """Per module: counts by status and the surviving mutants' names, from mutmut's .meta files."""
    from mutmut.stats import status_by_exit_code

    report = {}
    for meta in sorted((workdir / "mutants").glob("*.py.meta")):
        module = meta.name[:-len(".meta")]
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        counts, survivors = {}, []
        for name, code in sorted(codes.items()):
            status = status_by_exit_code[code]
            counts[status] = counts.get(status, 0) + 1
            if status in SURVIVED:
                survivors.append(f"{name} ({status})")
        killed = sum(counts.get(s, 0) for s in KILLED)
        survived = sum(counts.get(s, 0) for s in SURVIVED)
        report[module] = dict(counts=counts, killed=killed, survived=survived, total=len(codes),
                              score=killed / (killed + survived) if killed + survived else None,
                              survivors=survivors)
    return report


def print_report(report: dict) -> None:
    print(f"\n{'module':20s} {'mutants':>8s} {'killed':>7s} {'survived':>9s} {'score':>7s}   other")
    tk = ts = 0
    for module, r in report.items():
        other = {k: v for k, v in r["counts"].items() if k not in KILLED | SURVIVED}
        score = "—" if r["score"] is None else f"{100 * r['score']:.1f}%"
        tested = r["killed"] + r["survived"]
        se = "" if not tested or tested == r["total"] else \
            f" ± {100 * math.sqrt(r['score'] * (1 - r['score']) / tested):.1f} (sample of {tested})"
        print(f"{module:20s} {sum(r['counts'].values()):8d} {r['killed']:7d} {r['survived']:9d} {score:>7s}   "
              f"{other or ''}{se}")
        tk, ts = tk + r["killed"], ts + r["survived"]
    if tk + ts:
        print(f"{'all':20s} {'':8s} {tk:7d} {ts:9d} {100 * tk / (tk + ts):6.1f}%")
    for module, r in report.items():
        if r["survivors"]:
            print(f"\nsurvivors in {module}:")
            for s in r["survivors"]:
                print("  " + s)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/mutation.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--changed", nargs="?", const="HEAD", default=None, metavar="REV",
                    help="mutate only the modules changed since REV (default HEAD) or untracked")
    ap.add_argument("--modules", nargs="+", metavar="FILE", help="mutate only these modules (e.g. maid.py)")
    ap.add_argument("--workdir", default=str(ROOT / "mutants"),
                    help="where the snapshot and its mutants live (default mutants/, git-ignored)")
    ap.add_argument("--jobs", type=int, default=1, help="parallel mutant workers (default 1)")
    ap.add_argument("--nice", type=int, default=19, help="niceness of the run (default 19)")
    ap.add_argument("--skip-tests", nargs="+", default=[], metavar="FILE",
                    help="leave these test files out (mutmut needs every selected test to pass unmutated)")
    ap.add_argument("--sample", type=int, metavar="N",
                    help="test a uniform random sample of N mutants (score = estimate, with its standard error)")
    ap.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    ap.add_argument("--mutants", nargs="+", default=[], metavar="PATTERN",
                    help="test only the mutants matching these fnmatch patterns (e.g. 'maid.x_error_bound__*')")
    ap.add_argument("--report", action="store_true", help="print the last run's table and exit")
    ap.add_argument("--show", action="store_true", help="also print the diff of every surviving mutant")
    args = ap.parse_args(argv)
    if args.sample is not None and args.sample < 1:
        ap.error("--sample must be a positive integer")
    workdir = Path(args.workdir).resolve()
    if not args.report:
        try:
            import mutmut  # noqa: F401
        except ImportError:
            sys.exit("tools/mutation.py: error: mutmut is not installed; pip install -r requirements-dev.txt")
        cfg = read_config(ROOT)
        modules = select_modules(cfg, args.changed, args.modules)
        if not modules:
            print("no mathematical module to mutate" + (f" changed since {args.changed}" if args.changed else ""))
            return 0
        print(f"mutating {', '.join(modules)} in {workdir}")
        snapshot(workdir)
        tests = write_run_config(cfg, workdir, modules, args.skip_tests)
        print(f"tests: {' '.join(tests)}")
        names = list(args.mutants)
        if args.sample is not None:
            pool = all_mutant_names(workdir, args.jobs, args.nice)
            if names:
                pool = [n for n in pool if any(fnmatch.fnmatch(n, pat) for pat in names)]
            names = sorted(random.Random(args.seed).sample(pool, min(args.sample, len(pool))))
            print(f"sample: {len(names)} of {len(pool)} mutants (seed {args.seed})")
        rc = run_mutmut(workdir, args.jobs, args.nice, names)
        if rc != 0:
            print(f"mutmut exited with status {rc}", file=sys.stderr)
    if not (workdir / "mutants").is_dir():
        sys.exit(f"tools/mutation.py: error: no results in {workdir}; run without --report first")
    report = collect(workdir)
    with open(workdir / "mutation_report.json", "w") as f:
        json.dump(report, f, indent=1)
    print_report(report)
    if args.show:
        for r in report.values():
            for s in r["survivors"]:
                subprocess.run([sys.executable, "-m", "mutmut", "show", s.split(" ")[0]], cwd=workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
