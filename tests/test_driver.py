"""ADP.py end to end: promised files, consistent log, determinism, Ctrl-C + resume, bad input."""
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# small enough to be quick, and set so that the kernel moves (steps are accepted; the test asserts ≥ 2)
SMALL = ["--size_x=48", "--size_y=40", "--upper_iter=4", "--device=cpu", "--alpha=30", "--eps0=1e-4",
         "--threshold=1e-6"]
FILES = ["comparison.png", "kernels.png", "convergence.png", "iterations.png", "log.csv", "config.json",
         "kernel.pt", "checkpoint.pt", "summary.json"]


def run(args, cwd=ROOT, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "ADP.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, **kw)


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.csv")) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    p = run(SMALL + [f"--results_dir={out}"])
    assert p.returncode == 0, p.stderr
    return out, p


def test_end_to_end_writes_every_promised_file(small_run):
    out, p = small_run
    run_dir = p.stdout.strip().splitlines()[-1]          # the last line printed is the run folder
    assert os.path.isdir(run_dir) and os.path.dirname(run_dir) == str(out)
    for f in FILES:
        assert os.path.getsize(os.path.join(run_dir, f)) > 0, f
    for f in FILES:
        if f.endswith(".png"):
            with open(os.path.join(run_dir, f), "rb") as fh:
                assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    for name in ("blurry", "TV (b₀)", "ADP-β-MAID"):
        assert re.search(rf"^{re.escape(name)}\s+\d+\.\d+\s+0\.\d+", p.stdout, re.M), name
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    assert cfg["size_x"] == 48 and cfg["setting"] == "motion"
    kernel = torch.load(os.path.join(run_dir, "kernel.pt"))
    assert kernel["b_star"].shape == (3, 1, 5, 5) and torch.isfinite(kernel["b_star"]).all()
    assert (kernel["b_star"] - kernel["b0"]).abs().max() > 1e-6      # MAID moved the kernel


def test_log_is_consistent(small_run):
    out, p = small_run
    log = read_log(p.stdout.strip().splitlines()[-1])
    assert [int(r["iter"]) for r in log] == list(range(1, len(log) + 1)) and len(log) == 4
    for col in ("lower_iters", "cg_iters", "time"):
        v = [float(r[col]) for r in log]
        assert all(b >= a for a, b in zip(v, v[1:])), col
    for col in ("upper_loss", "eps", "delta", "step", "psnr", "ssim", "grad_norm"):
        assert all(math.isfinite(float(r[col])) for r in log), col
    accepted = [r["accepted"] == "True" for r in log]
    loss = [float(r["upper_loss"]) for r in log]
    assert sum(accepted) >= 2, "the small run should move the kernel"
    # after an accepted step the lower solution is reused, so an accepted step that passed the
    # sufficient-decrease test logs a strictly smaller inexact loss than the step before it
    for a0, a1, l0, l1 in zip(accepted, accepted[1:], loss, loss[1:]):
        if a0 and a1:
            assert l1 < l0


def test_second_run_gets_a_new_folder_and_identical_log(small_run):
    out, p = small_run
    first = p.stdout.strip().splitlines()[-1]
    q = run(SMALL + [f"--results_dir={out}"])
    assert q.returncode == 0, q.stderr
    second = q.stdout.strip().splitlines()[-1]
    assert second != first and os.path.isfile(os.path.join(first, "log.csv"))
    strip = lambda log: [{k: v for k, v in r.items() if k != "time"} for r in log]  # noqa: E731
    assert strip(read_log(first)) == strip(read_log(second))


def _interrupt_after_iterations(args, n):
    """Start ADP.py, send SIGINT once tqdm shows ≥ n finished upper iterations."""
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
                proc.send_signal(signal.SIGINT)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    out = proc.stdout.read()            # stderr belongs to the reader thread alone
    proc.wait(timeout=600)
    t.join(5)
    return proc.returncode, out.decode(), bool(seen)


def test_ctrl_c_leaves_outputs_and_resume_matches_uninterrupted_run(tmp_path):
    args = ["--size_x=40", "--size_y=40", "--upper_iter=12", "--device=cpu", "--alpha=300"]
    full = run(args + [f"--results_dir={tmp_path / 'full'}"])
    assert full.returncode == 0, full.stderr
    full_dir = full.stdout.strip().splitlines()[-1]

    code, out, sent = _interrupt_after_iterations(args + [f"--results_dir={tmp_path / 'cut'}"], 3)
    assert sent, "the run finished before it could be interrupted"
    assert code == 130, out
    cut_dir = out.strip().splitlines()[-1]
    assert "--resume=" in out
    for f in FILES:
        assert os.path.isfile(os.path.join(cut_dir, f)), f
    n_cut = len(read_log(cut_dir))
    assert 3 <= n_cut < 12

    res = run([f"--resume={cut_dir}/checkpoint.pt", f"--results_dir={tmp_path / 'resumed'}"])
    assert res.returncode == 0, res.stderr
    res_dir = res.stdout.strip().splitlines()[-1]
    assert res_dir != cut_dir and len(read_log(cut_dir)) == n_cut       # the interrupted run is untouched
    strip = lambda log: [{k: v for k, v in r.items() if k != "time"} for r in log]  # noqa: E731
    assert strip(read_log(res_dir)) == strip(read_log(full_dir))
    k_full = torch.load(os.path.join(full_dir, "kernel.pt"))["b_star"]
    k_res = torch.load(os.path.join(res_dir, "kernel.pt"))["b_star"]
    assert torch.equal(k_full, k_res)


# ------------------------------------------------------------------------------------------
# bad input: one clear line, exit status 2, no traceback, nothing written
# ------------------------------------------------------------------------------------------
def _not_an_image(tmp):
    p = tmp / "notes.png"
    p.write_text("this is not an image")
    return str(p)


BAD = [
    (lambda t: ["--image=/nonexistent/picture.png"], "not found"),
    (lambda t: [f"--image={_not_an_image(t)}"], "not a readable image"),
    (lambda t: ["--setting=zoom"], "unknown setting 'zoom'"),
    (lambda t: ["--kernel_size=4"], "odd"),
    (lambda t: ["--kernel_size=-3"], "odd"),
    (lambda t: ["--kernel_size=51", "--size_x=32", "--size_y=32"], "larger than the image"),
    (lambda t: ["--noise_level=-0.1"], "noise_level"),
    (lambda t: ["--noise_level=nan"], "noise_level"),
    (lambda t: ["--noise_level=inf"], "noise_level"),
    (lambda t: ["--tv_weight=0"], "tv_weight"),
    (lambda t: ["--alpha=-1"], "alpha"),
    (lambda t: ["--beta=-1"], "beta"),
    (lambda t: ["--mu0=0"], "mu0 must be a positive"),
    (lambda t: ["--tv_smoothing=0"], "tv_smoothing"),
    (lambda t: ["--eps0=0"], "eps0"),
    (lambda t: ["--rho=1.5"], "rho"),
    (lambda t: ["--tau=0"], "tau"),
    (lambda t: ["--nu=0.9"], "nu"),
    (lambda t: ["--size_x=0"], "image size"),
    (lambda t: ["--size_x=8", "--size_y=8", "--kernel_size=3"], "SSIM window"),
    (lambda t: ["--seed=-1"], "seed"),
    (lambda t: ["--seed=99999999999999999999999"], "seed"),
    (lambda t: ["--device=cuda:7"], "not available"),
    (lambda t: ["--learning_rate=3"], "unknown setting --learning_rate"),
    (lambda t: ["--upper_iter=many"], "expected a value of type int"),
    (lambda t: ["upper_iter=3"], "--name=value"),
    (lambda t: ["--upper_operator=oracle"], "upper_operator"),
]


@pytest.mark.parametrize("make_args,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_one_line_no_traceback_nothing_written(tmp_path, make_args, message):
    results = tmp_path / "results"
    earlier = results / "earlier_run"
    earlier.mkdir(parents=True)
    (earlier / "log.csv").write_text("iter\n1\n")
    p = run(make_args(tmp_path) + [f"--results_dir={results}"])
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ADP.py: error:"), p.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in p.stderr and p.stdout == ""
    assert sorted(os.listdir(results)) == ["earlier_run"]
    assert (earlier / "log.csv").read_text() == "iter\n1\n"


def test_unwritable_results_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = run(SMALL + [f"--results_dir={blocker}/sub"])
    assert p.returncode == 2 and "cannot write to results_dir" in p.stderr and "Traceback" not in p.stderr


def test_resume_refuses_changed_settings(small_run, tmp_path):
    """A resumed run continues with its saved settings; changing one (here β) is refused."""
    out, p = small_run
    ckpt = os.path.join(p.stdout.strip().splitlines()[-1], "checkpoint.pt")
    q = run([f"--resume={ckpt}", "--beta=5", f"--results_dir={tmp_path}"])
    assert q.returncode == 2 and "--resume continues a run" in q.stderr and "--beta" in q.stderr
    assert "Traceback" not in q.stderr and os.listdir(tmp_path) == []


@pytest.mark.parametrize("payload", [{"config": 3, "state": {}}, {"config": {}}, [1, 2]], ids=["config", "state", "list"])
def test_resume_from_a_malformed_checkpoint_is_one_line(tmp_path, payload):
    ckpt = tmp_path / "checkpoint.pt"
    torch.save(payload, ckpt)
    out = tmp_path / "out"
    p = run([f"--resume={ckpt}", f"--results_dir={out}"])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "not a readable ADP.py checkpoint" in lines[0], p.stderr
    assert not out.exists()


def test_non_finite_tv_baseline_is_an_error_and_leaves_no_folder(tmp_path):
    """γ = 1e-320 (subnormal) makes 1/w overflow: the TV baseline meets Inf at once."""
    p = run(SMALL + ["--tv_smoothing=1e-320", f"--results_dir={tmp_path}"])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and len(lines) == 1 and "TV baseline met NaN/Inf" in lines[0], p.stderr
    assert os.listdir(tmp_path) == []


def test_outputs_get_the_usual_file_permissions(small_run):
    out, p = small_run
    umask = os.umask(0)
    os.umask(umask)
    run_dir = p.stdout.strip().splitlines()[-1]
    for f in FILES:
        assert os.stat(os.path.join(run_dir, f)).st_mode & 0o777 == 0o666 & ~umask, f
