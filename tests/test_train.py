"""train.py end to end: learning improves the test PSNR, every method runs through its machinery,
outputs and checkpoints, one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train
from config import ConfigError

_TINY = dict(train_size=6, test_size=3, batch_size=3, img_size=24, foe_filters=4, foe_size=3, budget=1000,
             eval_points=2, threads=1)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_learning_improves_test_psnr_over_the_initial_regulariser(tmp_path):
    """FoE (4 filters 3×3) learned by ISGD on 6 grey 24×24 crops, tested on crops of other source
    images: the learned regulariser must beat the initial one (random zero-mean filters, e^c = 0.01)
    by ≥ 4 dB (measured +6.9 dB at budget 1000 computations: 22.1 → 29.0 dB; the initial filters barely
    denoise, 20.6 dB noisy).  A wrong sign or scale of the hypergradient leaves the PSNR near the
    initial value or lower.  Also checks the outputs."""
    s = train.run(_TINY, results_dir=str(tmp_path), progress=False)
    assert s["test_psnr_final"] >= s["test_psnr_initial"] + 4.0
    assert s["computations"] >= 1000 and s["stop_reason"] == "budget"
    names = set(os.listdir(s["run_dir"]))
    assert {"config.json", "split.json", "log.csv", "evals.csv", "curves.png", "filters.png", "reconstructions.png",
            "checkpoint.pt", "theta.pt", "summary.json"} <= names
    split = json.load(open(os.path.join(s["run_dir"], "split.json")))
    assert not set(split["train_sources"]) & set(split["test_sources"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["maid", "ift"])
def test_full_batch_methods_run_through_maid_and_lower_the_training_loss(tmp_path, method):
    """MAID and IFT on the full training set (maid.py): the training loss F at the end is below
    F at θ₀ (MAID accepts only steps whose inexact-decrease test holds)."""
    s = train.run(_TINY, method=method, budget=1200, step0=100.0, results_dir=str(tmp_path), progress=False)
    assert s["evals"][-1]["train_loss"] < s["evals"][0]["train_loss"]


def test_bad_settings_raise_config_error(tmp_path):
    for bad in (dict(method="adam"), dict(batch_size=10, train_size=4), dict(foe_size=4), dict(noise_level=-1.0),
                dict(problem="inpainting"), dict(problem="deblurring", mu0=0.0)):
        with pytest.raises(ConfigError):
            train.run(_TINY, results_dir=str(tmp_path), progress=False, **bad)
    assert os.listdir(tmp_path) == []          # nothing half-written


@pytest.mark.slow
def test_command_line_error_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--method=adam", f"--results_dir={tmp_path}"], cwd=_ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "method" in r.stderr


@pytest.mark.slow
def test_interrupt_keeps_a_checkpoint_and_resume_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    """Ctrl-C (a KeyboardInterrupt raised at the first evaluation during training) writes
    checkpoint.pt; resuming from it ends at exactly the θ of an uninterrupted run (same batches,
    warm starts, schedules): torch.equal, no tolerance."""
    cfg = dict(_TINY, budget=400)
    full = train.run(cfg, results_dir=str(tmp_path / "full"), progress=False)
    calls = {"n": 0}
    original = train.Evaluator.__call__

    def interrupting(self, theta):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, theta)

    monkeypatch.setattr(train.Evaluator, "__call__", interrupting)
    cut = train.run(cfg, results_dir=str(tmp_path / "cut"), progress=False)
    assert cut["stop_reason"] == "interrupted"
    ckpt = os.path.join(cut["run_dir"], "checkpoint.pt")
    monkeypatch.setattr(train.Evaluator, "__call__", original)
    resumed = train.run(resume=ckpt, results_dir=str(tmp_path / "resumed"), progress=False)
    load = lambda s: torch.load(os.path.join(s["run_dir"], "theta.pt"))["theta"]  # noqa: E731
    assert resumed["steps"] == full["steps"] and torch.equal(load(resumed), load(full))
    with pytest.raises(ConfigError):
        train.run(resume=ckpt, method="maid", results_dir=str(tmp_path / "x"), progress=False)


def test_train_presets_load_and_validate():
    """Every presets/train_*.py names only train.py settings, passes validate(), and the full preset
    is the issue's target setting (96×96 FoE 10×7×7, σ = 25/255, budget 2·10⁵) while the default
    run is a quarter of it."""
    import glob

    import config
    found = {}
    for path in sorted(glob.glob(os.path.join(_ROOT, "presets", "train_*.py"))):
        cfg = {**train.DEFAULTS, **config.load_preset(path, train.DEFAULTS, train.RENAMED)}
        train.validate(cfg)
        found[os.path.basename(path)] = cfg
    full = found["train_full.py"]
    assert (full["img_size"], full["foe_filters"], full["foe_size"], full["budget"]) == (96, 10, 7, 200000)
    assert full["noise_level"] == 25 / 255 and full["eval_points"] % 4 == 0
    assert train.DEFAULTS["budget"] * 4 == full["budget"]


def _load_comparison():
    import importlib.util
    spec = importlib.util.spec_from_file_location("isgd_vs_maid", os.path.join(_ROOT, "experiments", "isgd_vs_maid.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_comparison_refuses_unknown_methods_and_odd_eval_points(tmp_path):
    cmp = _load_comparison()
    for bad in (dict(methods=("maid", "adam")), dict(methods=()), dict(eval_points=6)):
        with pytest.raises(ConfigError):
            cmp.run(dict(_TINY, eval_points=4, results_dir=str(tmp_path)), progress=False,
                    **{k: v for k, v in bad.items() if k == "methods"},
                    **{k: v for k, v in bad.items() if k != "methods"})
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_comparison_split_over_calls_reuses_finished_runs(tmp_path):
    """``--methods`` subsets into one ``--out`` folder: the second call runs only the missing method
    and reads the first's run back (its summary file untouched), giving the same PSNR as a run of
    its own; a call with other settings into the same folder is refused."""
    cmp = _load_comparison()
    cfg = dict(_TINY, eval_points=4, budget=600)
    out = str(tmp_path / "cmp")
    first = cmp.run(cfg, progress=False, out=out, methods=("isgd",))
    stamp = os.path.getmtime(os.path.join(out, "isgd", "summary.json"))
    both = cmp.run(cfg, progress=False, out=out, methods=("maid",))
    assert set(both["table"]) == {"isgd", "maid"} and both["maid_final"] is not None
    assert both["table"]["isgd"] == first["table"]["isgd"]
    assert os.path.getmtime(os.path.join(out, "isgd", "summary.json")) == stamp
    assert sorted(os.listdir(out)) == ["comparison.json", "curves.png", "isgd", "maid"]
    with pytest.raises(ConfigError):
        cmp.run(dict(cfg, budget=700), progress=False, out=out, methods=("isgd",))


def test_a_step_past_several_evaluation_points_is_evaluated_once():
    """Budget 100, 10 points: a step from 0 to 35 computations passes three points and gets one
    evaluation; 35 → 36 none; 36 → 100 the remaining seven, one evaluation."""
    cfg = {"budget": 100, "eval_points": 10}
    assert train._points_passed(35, 0, cfg) == 3
    assert train._points_passed(36, 3, cfg) == 3
    assert train._points_passed(100, 3, cfg) == 10 and train._points_passed(10**6, 10, cfg) == 10
