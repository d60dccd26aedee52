"""ADP.py: the importable ``run``, its outputs, bad input refused before anything is written,
and the command line (presets, one-line errors, Ctrl-C + resume).

Bad inputs are checked in-process (``ADP.run`` raises ``ConfigError`` with the message and the
results folder is untouched); a few subprocess tests cover what only the command line does.
"""
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
import torch

import ADP
from config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# small enough to be quick, and set so that the kernel moves (steps are accepted; the test asserts ≥ 2)
SMALL = dict(size_x=48, size_y=40, upper_iter=4, device="cpu", step=30.0, eps0=1e-4, threshold=1e-6, progress=False,
             upper_operator="learned")
FILES = ["comparison.png", "kernels.png", "convergence.png", "iterations.png", "log.csv", "config.json",
         "kernel.pt", "checkpoint.pt", "summary.json"]


def cli(args, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "ADP.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, **kw)


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.csv")) as f:
        return list(csv.DictReader(f))


def strip_time(log):
    return [{k: v for k, v in r.items() if k != "time"} for r in log]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    return out, ADP.run(SMALL, results_dir=str(out))


# ------------------------------------------------------------------------------------------
# importing and configuring
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_import_has_no_side_effects(tmp_path):
    """Importing ADP (and ADP_1D) in a fresh interpreter prints nothing, leaves SIGINT's handler
    as it was (ignored here) and creates nothing in the working directory."""
    code = ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); import sys; sys.path.insert(0, %r); "
            "import ADP, ADP_1D; assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN; "
            "print(sorted(ADP.DEFAULTS)[:2])" % ROOT)
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(sorted(ADP.DEFAULTS)[:2]) and p.stderr == ""
    assert os.listdir(tmp_path) == []


def test_defaults_are_the_constants_and_old_names_are_refused():
    """DEFAULTS holds the constants of the file (one name per meaning: tv_weight for α of the
    regulariser, step for MAID's α₀); the renamed alpha / nu_alpha give a one-line hint."""
    assert ADP.DEFAULTS["tv_weight"] == 0.005 and ADP.DEFAULTS["step"] == 1.0 and ADP.DEFAULTS["nu_step"] == 10 / 9
    assert ADP.DEFAULTS["regulariser"] == "tv" and "alpha" not in ADP.DEFAULTS and "nu_alpha" not in ADP.DEFAULTS
    for old, new in (("alpha", "step"), ("nu_alpha", "nu_step")):
        with pytest.raises(ConfigError, match=f"'{old}' was renamed to '{new}'"):
            ADP.run(**{old: 1.0})


def test_maid_config_maps_the_driver_names():
    """maid_config carries every driver setting to the MAIDConfig field of the same meaning
    (distinct values, so a swapped pair would show)."""
    cfg = dict(ADP.DEFAULTS, eps0=0.3, delta0=0.03, step=7.0, rho=0.4, tau=0.6, nu=1.2, nu_step=1.3, eta=0.02,
               backtracks=3, threshold=1e-5, upper_iter=9, lower_iter=11, cg_iter=13, descent_check=True)
    m = ADP.maid_config(cfg)
    assert (m.eps0, m.delta0, m.step0, m.rho, m.tau, m.nu, m.nu_step, m.eta) == (0.3, 0.03, 7.0, 0.4, 0.6, 1.2, 1.3, 0.02)
    assert (m.max_backtracks, m.eps_min, m.max_iter, m.lower_max_iter, m.cg_max_iter, m.descent_check) == \
        (3, 1e-5, 9, 11, 13, True)


# ------------------------------------------------------------------------------------------
# bad input: ConfigError with the message, nothing written (in-process)
# ------------------------------------------------------------------------------------------
def _not_an_image(tmp):
    p = tmp / "notes.png"
    p.write_text("this is not an image")
    return str(p)


BAD = [
    (lambda t: dict(image="/nonexistent/picture.png"), "not found"),
    (lambda t: dict(image=_not_an_image(t)), "not a readable image"),
    (lambda t: dict(setting="zoom"), "unknown setting 'zoom'"),
    (lambda t: dict(kernel_size=4), "odd"),
    (lambda t: dict(kernel_size=-3), "odd"),
    (lambda t: dict(kernel_size=51, size_x=32, size_y=32), "larger than the image"),
    (lambda t: dict(noise_level=-0.1), "noise_level"),
    (lambda t: dict(noise_level=math.nan), "noise_level"),
    (lambda t: dict(noise_level=math.inf), "noise_level"),
    (lambda t: dict(tv_weight=0.0), "tv_weight"),
    (lambda t: dict(step=-1.0), "step must be"),
    (lambda t: dict(step=math.inf), "step must be"),
    (lambda t: dict(beta=-1.0), "beta"),
    (lambda t: dict(mu0=0.0), "mu0 must be a positive"),
    (lambda t: dict(tv_smoothing=0.0), "tv_smoothing"),
    (lambda t: dict(eps0=0.0), "eps0"),
    (lambda t: dict(rho=1.5), "rho"),
    (lambda t: dict(rho=math.nan), "rho"),
    (lambda t: dict(tau=0.0), "tau"),
    (lambda t: dict(nu=0.9), "nu must be"),
    (lambda t: dict(nu=math.inf), "nu must be a finite"),
    (lambda t: dict(nu_step=math.inf), "nu_step must be a finite"),
    (lambda t: dict(eta=math.inf), "eta"),
    (lambda t: dict(threshold=10.0), "must be smaller than eps0"),
    (lambda t: dict(threshold=1e-2), "must be smaller than eps0"),     # = eps0: no iteration either
    (lambda t: dict(tv_weight=1e-300), "tv_weight = 1e-300 is outside the range"),
    (lambda t: dict(tv_weight=1e-20, dtype="float32"), "tv_weight = 1e-20 is outside the range"),
    (lambda t: dict(tv_weight=1e200), "tv_weight = 1e+200 is outside the range"),
    (lambda t: dict(tv_smoothing=1e-320), "tv_smoothing = 1e-320 is outside the range"),
    (lambda t: dict(tv_weight=1e10, tv_smoothing=1e-73), "(α/γ²)"),    # each fine, the ratio overflows
    (lambda t: dict(mu0=1e-30, dtype="float32"), "mu0 = 1e-30 is outside the range"),
    (lambda t: dict(noise_level=1e-25, dtype="float32"), "noise_level"),
    (lambda t: dict(beta=1e30, dtype="float32"), "beta = 1e+30"),
    (lambda t: dict(size_x=0), "image size"),
    (lambda t: dict(size_x=8, size_y=8, kernel_size=3), "SSIM window"),
    (lambda t: dict(seed=-1), "seed"),
    (lambda t: dict(seed=10**23), "seed"),
    (lambda t: dict(device="cuda:7"), "not available"),
    (lambda t: dict(learning_rate=3), "unknown setting 'learning_rate'"),
    (lambda t: dict(upper_iter="many"), "expected a value of type int"),
    (lambda t: dict(upper_operator="oracle"), "upper_operator"),
    (lambda t: dict(regulariser="tv_huber"), "unknown regulariser"),
    (lambda t: dict(lower_solver="newton"), "lower_solver"),
    (lambda t: dict(resume=str(t / "missing.pt")), "no checkpoint"),
    (lambda t: dict(kernel_constraint="box"), "unknown kernel_constraint 'box'"),
    (lambda t: dict(kernel_penalty="l1"), "unknown kernel_penalty 'l1'"),
    (lambda t: dict(learned_kernel_size=6), "learned_kernel_size must be 0"),
    (lambda t: dict(learned_kernel_size=3), "learned_kernel_size must be 0"),
    (lambda t: dict(learned_kernel_size=-1), "learned_kernel_size must be 0"),
    (lambda t: dict(learned_kernel_size=41, size_x=32, size_y=32), "no larger than the image"),
]


@pytest.mark.parametrize("make_args,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, make_args, message):
    """Each bad setting raises ConfigError naming it, before the results folder is touched (an
    earlier run's files in it are unchanged and nothing is added)."""
    results = tmp_path / "results"
    earlier = results / "earlier_run"
    earlier.mkdir(parents=True)
    (earlier / "log.csv").write_text("iter\n1\n")
    with pytest.raises(ConfigError) as e:
        ADP.run(make_args(tmp_path), results_dir=str(results), progress=False)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert sorted(os.listdir(results)) == ["earlier_run"] and os.listdir(earlier) == ["log.csv"]
    assert (earlier / "log.csv").read_text() == "iter\n1\n"


def test_smallest_accepted_weight_gives_a_finite_baseline():
    """The range rule is not vacuous at its edge: float32 with tv_weight = 1.1·√tiny (just inside
    [√tiny, √max]) gives a finite TV baseline on a small image (the weight 1e-20 just outside
    raised a RuntimeError before the rule)."""
    fi = torch.finfo(torch.float32)
    cfg = dict(ADP.DEFAULTS, dtype="float32", tv_weight=1.1 * math.sqrt(fi.tiny), size_x=16, size_y=16,
               device="cpu")
    ADP.validate(cfg)
    from imaging import make_data
    x_true, b0, y = make_data(cfg, ADP._IMAGES, torch.device("cpu"), torch.float32)
    base = ADP.solve_baseline(ADP.build_problem(cfg, y, b0), dict(cfg, lower_iter=20), b0, y)
    assert base.status != "non_finite" and torch.isfinite(base.x).all()


def test_unwritable_results_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write to results_dir"):
        ADP.run(size_x=16, size_y=16, upper_iter=1, lower_iter=5, device="cpu", progress=False,
                results_dir=f"{blocker}/sub")


@pytest.mark.parametrize("payload", [{"config": 3, "state": {}}, {"config": {}}, [1, 2]], ids=["config", "state", "list"])
def test_resume_from_a_malformed_checkpoint(tmp_path, payload):
    ckpt = tmp_path / "checkpoint.pt"
    torch.save(payload, ckpt)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="not a readable ADP.py checkpoint"):
        ADP.run(resume=str(ckpt), results_dir=str(out))
    assert not out.exists()


def test_non_finite_baseline_is_an_error_and_leaves_no_folder(tmp_path, monkeypatch):
    """A TV baseline that meets NaN/Inf (simulated: no input check lets one through) raises
    NumericalError before any folder exists."""
    from maid import LowerSolve

    def nan_solve(problem, cfg, b0, y, step=None):
        return LowerSolve(torch.full_like(y, math.nan), 3, math.nan, False)

    monkeypatch.setattr(ADP, "solve_baseline", nan_solve)
    with pytest.raises(ADP.NumericalError, match="TV baseline met NaN/Inf after 3 iterations"):
        ADP.run(size_x=16, size_y=16, device="cpu", progress=False, results_dir=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------
# end-to-end runs (in-process)
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_end_to_end_writes_every_promised_file(small_run):
    out, s = small_run
    run_dir = s["run_dir"]
    assert os.path.isdir(run_dir) and os.path.dirname(run_dir) == str(out)
    for f in FILES:
        assert os.path.getsize(os.path.join(run_dir, f)) > 0, f
        if f.endswith(".png"):
            with open(os.path.join(run_dir, f), "rb") as fh:
                assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    assert cfg["size_x"] == 48 and cfg["setting"] == "motion" and cfg["step"] == 30.0
    kernel = torch.load(os.path.join(run_dir, "kernel.pt"))
    assert kernel["b_star"].shape == (3, 1, 5, 5) and torch.isfinite(kernel["b_star"]).all()
    assert (kernel["b_star"] - kernel["b0"]).abs().max() > 1e-6      # MAID moved the kernel
    on_disk = json.load(open(os.path.join(run_dir, "summary.json")))
    assert on_disk == {k: v for k, v in s.items() if k not in ("run_dir", "interrupted", "config")}
    assert s["adp_result"] == "kernel learned" and s["accepted"] >= 2 and not s["interrupted"]
    rel = (torch.linalg.vector_norm(kernel["b_star"] - kernel["b0"]) / torch.linalg.vector_norm(kernel["b0"])).item()
    assert s["kernel_change"] == pytest.approx(rel, rel=1e-12)


@pytest.mark.slow
def test_log_is_consistent(small_run):
    out, s = small_run
    log = read_log(s["run_dir"])
    assert [int(r["iter"]) for r in log] == list(range(1, len(log) + 1)) and len(log) == 4
    for col in ("lower_iters", "cg_iters", "time"):
        v = [float(r[col]) for r in log]
        assert all(b >= a for a, b in zip(v, v[1:])), col
    for col in ("upper_loss", "eps", "delta", "step", "psnr", "ssim", "grad_norm"):
        assert all(math.isfinite(float(r[col])) for r in log), col
    accepted = [r["accepted"] == "True" for r in log]
    loss = [float(r["upper_loss"]) for r in log]
    assert sum(accepted) == s["accepted"] >= 2, "the small run should move the kernel"
    # after an accepted step the lower solution is reused, so an accepted step that passed the
    # sufficient-decrease test logs a strictly smaller inexact loss than the step before it
    for a0, a1, l0, l1 in zip(accepted, accepted[1:], loss, loss[1:]):
        if a0 and a1:
            assert l1 < l0
    assert s["lower_iterations"] == int(log[-1]["lower_iters"]) and s["upper_iterations"] == 4


@pytest.mark.slow
def test_no_accepted_step_is_labelled_unchanged(tmp_path, capsys):
    """With η so large that no step can pass the sufficient-decrease test, the run says so in one
    line and labels the ADP-β-MAID result 'unchanged (no step accepted)'; the kernel is b₀."""
    s = ADP.run(size_x=16, size_y=16, upper_iter=2, backtracks=1, eta=1e6, device="cpu", progress=False,
                results_dir=str(tmp_path))
    assert s["accepted"] == 0 and s["adp_result"] == ADP.NO_STEP_LABEL
    assert json.load(open(os.path.join(s["run_dir"], "summary.json")))["adp_result"] == ADP.NO_STEP_LABEL
    k = torch.load(os.path.join(s["run_dir"], "kernel.pt"))
    assert torch.equal(k["b_star"], k["b0"])
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "accepted no step" in ln]
    assert len(notes) == 1 and ADP.NO_STEP_LABEL in notes[0]


# ------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_preset_then_override(tmp_path):
    """``python ADP.py preset.py --name=value``: the preset's constants apply, then the overrides
    (the preset sets upper_iter=9 and size 16×16, the command line upper_iter=1); the run's
    config.json and log show both, and the last line printed is the new run folder."""
    preset = tmp_path / "tiny.py"
    preset.write_text("size_x = 16\nsize_y = 16\nupper_iter = 9\ndevice = 'cpu'\nprogress = False\n")
    p = cli([str(preset), "--upper_iter=1", f"--results_dir={tmp_path / 'out'}"])
    assert p.returncode == 0, p.stderr
    run_dir = p.stdout.strip().splitlines()[-1]
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    assert (cfg["size_x"], cfg["size_y"], cfg["upper_iter"], cfg["progress"]) == (16, 16, 1, False)
    assert len(read_log(run_dir)) == 1


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [(["--threshold=10"], "must be smaller than eps0"),
                                          (["--alpha=3"], "'alpha' was renamed to 'step'")])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, message):
    p = cli(args + [f"--results_dir={tmp_path}"])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("ADP.py: error:"), p.stderr
    assert message in lines[0] and p.stdout == "" and os.listdir(tmp_path) == []


def _interrupt_after_iterations(args, n, sig=signal.SIGINT):
    """Start ADP.py, send ``sig`` (Ctrl-C's SIGINT by default) once tqdm shows ≥ n finished upper
    iterations."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ADP.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = []

    def reader():
        buf = b""
        while True:
            ch = proc.stderr.read(1)
            if not ch:
                break
            buf += ch
            m = re.findall(rb"MAID:.*?\|\s*(\d+)/\d+", buf[-200:])
            if m and int(m[-1]) >= n and not seen:
                seen.append(True)
                proc.send_signal(sig)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    out = proc.stdout.read()            # stderr belongs to the reader thread alone
    proc.wait(timeout=600)
    t.join(5)
    return proc.returncode, out.decode(), bool(seen)


@pytest.mark.slow
def test_ctrl_c_leaves_outputs_and_resume_matches_uninterrupted_run(small_run, tmp_path):
    """Ctrl-C after 2 of the small run's 4 iterations leaves every output and a checkpoint (exit
    130); resuming it into a new folder gives the log and kernel of the uninterrupted in-process
    run exactly (a run that accepts steps, so the kernel and warm starts must carry over); a
    resume that changes a saved setting is refused."""
    out, full = small_run
    code, stdout, sent = _interrupt_after_iterations([f"--{k}={v}" for k, v in SMALL.items() if k != "progress"] +
                                                     [f"--results_dir={tmp_path / 'cut'}"], 2)
    assert sent, "the run finished before it could be interrupted"
    assert code == 130, stdout
    cut_dir = stdout.strip().splitlines()[-1]
    assert "--resume=" in stdout
    for f in FILES:
        assert os.path.isfile(os.path.join(cut_dir, f)), f
    n_cut = len(read_log(cut_dir))
    assert 2 <= n_cut < 4

    with pytest.raises(ConfigError, match="--resume continues a run.*--beta"):
        ADP.run(resume=cut_dir, beta=5.0, results_dir=str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()

    res = ADP.run(resume=f"{cut_dir}/checkpoint.pt", results_dir=str(tmp_path / "resumed"), progress=False)
    assert res["run_dir"] != cut_dir and len(read_log(cut_dir)) == n_cut       # the interrupted run is untouched
    assert strip_time(read_log(res["run_dir"])) == strip_time(read_log(full["run_dir"]))
    k_full = torch.load(os.path.join(full["run_dir"], "kernel.pt"))["b_star"]
    k_res = torch.load(os.path.join(res["run_dir"], "kernel.pt"))["b_star"]
    assert torch.equal(k_full, k_res) and res["accepted"] == full["accepted"] >= 2


@pytest.mark.slow
def test_outputs_get_the_usual_file_permissions(small_run):
    out, s = small_run
    umask = os.umask(0)
    os.umask(umask)
    for f in FILES:
        assert os.stat(os.path.join(s["run_dir"], f)).st_mode & 0o777 == 0o666 & ~umask, f


@pytest.mark.slow
def test_sigterm_is_a_clean_interrupt_with_a_checkpoint(small_run, tmp_path):
    """SIGTERM (kill, a batch system's time limit) takes Ctrl-C's path: exit 130, every output and a
    checkpoint from which the run resumes to the uninterrupted run's kernel."""
    out, full = small_run
    code, stdout, sent = _interrupt_after_iterations([f"--{k}={v}" for k, v in SMALL.items() if k != "progress"] +
                                                     [f"--results_dir={tmp_path / 'cut'}"], 2, signal.SIGTERM)
    assert sent and code == 130, stdout
    cut_dir = stdout.strip().splitlines()[-1]
    assert "--resume=" in stdout and all(os.path.isfile(os.path.join(cut_dir, f)) for f in FILES)
    assert 2 <= len(read_log(cut_dir)) < 4
    res = ADP.run(resume=cut_dir, results_dir=str(tmp_path / "resumed"), progress=False)
    k_full = torch.load(os.path.join(full["run_dir"], "kernel.pt"))["b_star"]
    assert torch.equal(torch.load(os.path.join(res["run_dir"], "kernel.pt"))["b_star"], k_full)


def test_resume_keeps_the_saved_upper_iter_unless_given(tmp_path):
    """--resume takes upper_iter from the checkpoint (not today's default) unless it is given; the
    run-local settings come from the command; any other changed setting is refused."""
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"config": dict(ADP.DEFAULTS, upper_iter=7, beta=0.3, results_dir="elsewhere"), "state": {}}, ckpt)
    cfg, _ = ADP.resolve_config({"resume": str(ckpt)})
    assert (cfg["upper_iter"], cfg["beta"], cfg["results_dir"]) == (7, 0.3, ADP.DEFAULTS["results_dir"])
    cfg, _ = ADP.resolve_config({"resume": str(ckpt), "upper_iter": 12})
    assert cfg["upper_iter"] == 12 and cfg["beta"] == 0.3
    with pytest.raises(ConfigError, match="--kernel_constraint"):
        ADP.resolve_config({"resume": str(ckpt), "kernel_constraint": "simplex"})
