"""Tests of ``experiments/isgd_schedule_selection.py`` (choosing ISGD's decreasing-step schedule by
the final full training loss) and of the schedule overrides of ``experiments/isgd_vs_maid.py``."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest

from config import ConfigError

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_ROOT, "experiments", "isgd_schedule_selection.py")
sys.path.insert(0, os.path.join(_ROOT, "experiments"))

import isgd_schedule_selection as S  # noqa: E402
import isgd_vs_maid  # noqa: E402


def _script(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, _SCRIPT, *args], capture_output=True, text=True, env=env, cwd=_ROOT)


@pytest.mark.slow
def test_quick_selection_picks_the_lowest_final_training_loss_of_the_grid(tmp_path):
    """The quick grid (2 step0 × 2 p at q = 0.6): the saved table has exactly one row per grid point;
    each row's final loss is the last ``train_loss`` of its own run folder's ``evals.json`` and its
    last ``α``/``ε`` are the ones train.py logged for the last step (so the grid's schedule reached
    ISGD and the row is read from the right folder); the chosen schedule is the row of minimum final
    loss, and it lowered the full training loss by at least 20 % (the quick runs reach ~40–60 %; a
    step that did not move θ leaves the loss at its initial value).  A second call into the same
    folder (the command line) reads every run back without rerunning and prints the same choice."""
    out = str(tmp_path / "sel")
    res = S.run(quick=True, out=out, progress=False)
    with open(os.path.join(out, "selection.csv")) as f:
        rows = list(csv.DictReader(f))
    grid = {(s, q, p) for s in S.QUICK_GRID["step0s"] for q in S.QUICK_GRID["qs"] for p in S.QUICK_GRID["ps"]}
    assert len(rows) == len(grid) == 4
    assert {(float(r["step0"]), float(r["q"]), float(r["p"])) for r in rows} == grid
    for r in rows:
        run_dir = os.path.join(out, r["run"])
        with open(os.path.join(run_dir, "evals.json")) as f:
            assert float(r["train_loss_final"]) == json.load(f)[-1]["train_loss"]
        with open(os.path.join(run_dir, "config.json")) as f:
            cfg = json.load(f)
        assert (cfg["method"], cfg["step0"], cfg["q"], cfg["p"]) == ("isgd", float(r["step0"]), float(r["q"]),
                                                                      float(r["p"]))
        with open(os.path.join(run_dir, "log.csv")) as f:
            last = list(csv.DictReader(f))[-1]
        assert math.isclose(float(last["step"]), float(r["step_last"]), rel_tol=1e-12)
        assert math.isclose(float(last["eps"]), float(r["eps_last"]), rel_tol=1e-12)
    best = min(rows, key=lambda r: float(r["train_loss_final"]))
    chosen = res["chosen"]
    assert (chosen["step0"], chosen["q"], chosen["p"]) == (float(best["step0"]), float(best["q"]), float(best["p"]))
    assert chosen["train_loss_final"] < 0.8 * float(best["train_loss_initial"])
    assert sum("**(chosen)**" in line for line in open(os.path.join(out, "selection.md"))) == 1

    stamps = {r["run"]: os.path.getmtime(os.path.join(out, r["run"], "summary.json")) for r in rows}
    again = _script("--quick", f"--out={out}")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == (
        f"chosen step0={chosen['step0']:g} q={chosen['q']:g} p={chosen['p']:g} "
        f"train_loss={chosen['train_loss_final']:.6g}")
    assert stamps == {r: os.path.getmtime(os.path.join(out, r, "summary.json")) for r in stamps}


@pytest.mark.parametrize("args", [("--qs=0.5",), ("--qs=1",), ("--ps=-1",), ("--step0s=0",), ("--step0s=a,b",),
                                  ("--step0s=",), ("--step0=100",), ("--method=maid",), ("--jobs=0",)])
def test_bad_grid_or_schedule_override_is_refused_before_anything_is_written(tmp_path, capsys, args):
    """Outside the SPEC's family (q ∈ (½, 1), p ≥ 0, step0 > 0), unparsable lists, an empty list, or a
    schedule setting that the grid owns: one line on stderr, exit status 2, no folder made."""
    out = tmp_path / "sel"
    with pytest.raises(SystemExit) as exc:
        S.main(["--quick", f"--out={out}", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("isgd_schedule_selection.py: error:")
    assert not out.exists()


def test_comparison_decreasing_schedule_overrides_reach_the_run_and_are_checked(tmp_path):
    """``isgd_vs_maid.run``: ``decreasing`` outside q ∈ (½, 1) or with p < 0 is refused before any
    folder is made; ``split_own`` takes the schedule options out of the command line and leaves the
    train.py settings (a wrong split would hand ``--q_dec`` to train.py's parser, which refuses it)."""
    for bad in (dict(q=0.5), dict(q=1.0), dict(p=-0.5), dict(step0=0.0)):
        with pytest.raises(ConfigError):
            isgd_vs_maid.run(quick=True, out=str(tmp_path / "cmp"), progress=False, methods=("isgd_decreasing",),
                             decreasing=bad)
    assert not (tmp_path / "cmp").exists()
    values, present, rest = isgd_vs_maid.split_own(
        ["--quick", "--q_dec=0.75", "--out=x", "--budget=10", "--step0=5", "presets/train_full.py"],
        ("out", "q_dec", "p_dec", "step0_dec"))
    assert values == {"q_dec": "0.75", "out": "x"} and present == {"--quick"}
    assert rest == ["--budget=10", "--step0=5", "presets/train_full.py"]
    assert isgd_vs_maid._decreasing(values) == {"q": 0.75}
    assert isgd_vs_maid.METHODS["isgd_decreasing"] == dict(method="isgd", **isgd_vs_maid.DECREASING)
