"""DIP.py (SPEC §7): the blur convention against deepinv, the simplex kernel parametrisation and its
gradients, a tiny DIP run that must beat the blurry input, Ctrl-C + resume reproducing an
uninterrupted run, and bad input refused in one line with nothing written."""
import math
import os
import signal

import pytest
import torch

from conftest import fd_directional, rand
import DIP
from config import ConfigError
from operators import Blur, kernel_correlation, make_kernel

TINY = dict(generator="convdecoder", size_x=32, size_y=32, width=16, depth=4, iterations=120, es_window=10, es_patience=30, progress=False,
            threads=1)


def test_blur_agrees_with_deepinv_blurfft_on_a_non_symmetric_kernel():
    """DIP's forward operator is operators.Blur; deepinv's BlurFFT (one filter per channel, given
    as (1, C, k, k)) must compute the same circular convolution and adjoint on a non-square image
    with a random, non-symmetric kernel that differs per channel — a flipped kernel, a transposed
    image or a one-pixel shift would differ by O(1).  Tolerance 1e-12: both are float64 FFTs of
    16×20 images (rounding ~1e-16 per entry)."""
    import deepinv

    b = rand(3, 1, 5, 5, seed=11).abs()
    b = b / b.sum((2, 3), keepdim=True)
    x, y = rand(3, 16, 20, seed=12), rand(3, 16, 20, seed=13)
    ours = Blur(b, (16, 20))
    theirs = deepinv.physics.BlurFFT(img_size=(3, 16, 20), filter=b.transpose(0, 1).contiguous())
    torch.testing.assert_close(theirs.A(x[None])[0], ours.A(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(theirs.A_adjoint(y[None])[0], ours.A_adjoint(y), rtol=0, atol=1e-12)


def test_simplex_kernel_initialisation_and_adam_steps_stay_on_the_simplex():
    """b(φ₀) = (b₀ + f)/(1 + k²f) exactly (the documented start), and after 200 Adam steps on a
    loss that pulls b towards an infeasible target (negative entries, sum 3) every channel is still
    ≥ 0 with sum 1 to 1e-12 (float64 softmax rounding), while b has moved (the test is not
    vacuous).  b₀ is the motion kernel, with 20 exact zeros among 25 entries."""
    b0 = make_kernel("motion", 5, 3, dtype=torch.float64)
    f = 1e-3
    ker = DIP.SimplexKernel(b0, f)
    torch.testing.assert_close(ker(), (b0 + f) / (1 + 25 * f), rtol=1e-14, atol=0)
    target = 3 * rand(3, 1, 5, 5, seed=14)
    opt = torch.optim.Adam(ker.parameters(), lr=0.05)
    for _ in range(200):
        loss = ((ker() - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    b = ker().detach()
    assert (b >= 0).all()
    torch.testing.assert_close(b.sum((1, 2, 3)), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (b - b0).abs().max() > 0.1


def test_kernel_gradient_through_blur_and_softmax():
    """The semi-blind loss reaches φ: (i) ∂/∂b of ‖B_b x − y‖²/n by autograd through Blur equals the
    closed form (2/n)·kernel_correlation(B_b x − y, x, k) (operators.py, an independent derivation)
    to 1e-10 relative; (ii) the directional derivative in φ (through the softmax and the H¹ penalty)
    matches a central finite difference to 1e-6 relative (float64, h = 1e-6: truncation O(h²)),
    and it is non-zero in the direction of an entry where b₀ = 0 (the floor lets those grow)."""
    b0 = make_kernel("motion", 5, 3, dtype=torch.float64)
    x, y = rand(3, 12, 14, seed=15), rand(3, 12, 14, seed=16)
    b = (b0 + 0.01 * rand(3, 1, 5, 5, seed=17).abs()).requires_grad_(True)
    DIP.data_fit(x, b, y).backward()
    closed = (2 / y.numel()) * kernel_correlation(Blur(b.detach(), (12, 14)).A(x) - y, x, 5)
    torch.testing.assert_close(b.grad, closed, rtol=1e-10, atol=1e-14)

    ker = DIP.SimplexKernel(b0, 1e-3)
    phi0 = ker.logits.detach().clone()

    def loss_at(phi):
        b_ = torch.softmax(phi, dim=1).reshape(b0.shape)
        return DIP.data_fit(x, b_, y) + 0.3 * DIP.h1_penalty(b_, b0)

    phi = phi0.clone().requires_grad_(True)
    loss_at(phi).backward()
    zero_entry = torch.zeros_like(phi0)
    zero_entry[1, 1] = 1.0          # b₀[1, 0, 0, 1] = 0 (off the diagonal)
    assert b0.reshape(3, -1)[1, 1] == 0
    for d in (rand(*phi0.shape, seed=18), zero_entry):
        fd = fd_directional(loss_at, phi0, d)
        assert float((phi.grad * d).sum()) == pytest.approx(fd, rel=1e-6)
    assert abs(float(phi.grad[1, 1])) > 0


@pytest.mark.slow
def test_tiny_dip_beats_the_blurry_input_and_resume_after_ctrl_c_reproduces_the_run(tmp_path, monkeypatch, capsys):
    """A 32×32 DIP run (120 iterations) must improve on the blurry data: PSNR-best ≥ PSNR(y) + 1 dB
    and the ES-WMV selection ≥ PSNR(y) + 0.5 dB (a generator not fitted to y, a wrong blur or a
    broken sigmoid stays near or below y; the margins are ~half of what this run gains).  The
    last printed line has the documented form.  Then the same run interrupted by SIGINT at
    iteration 50 stops there with a checkpoint, and resuming it to 120 reproduces the
    uninterrupted run: same PSNR at every iteration and same last iterate (to 1e-6: identical
    float32 operations on the CPU; a lost Adam state, RNG or detector window would differ)."""
    threads_before = torch.get_num_threads()
    full = DIP.run(TINY, results_dir=str(tmp_path / "a"), input_noise=0.003)
    assert full["psnr_best"] >= full["psnr_blurry"] + 1.0
    assert full["psnr_es"] >= full["psnr_blurry"] + 0.5
    assert full["iterations_done"] == 120 and not full["interrupted"]
    assert torch.get_num_threads() == threads_before          # run() restores the caller's thread count
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (f"dip psnr_es={full['psnr_es']:.2f} psnr_best={full['psnr_best']:.2f} "
                    f"psnr_last={full['psnr_last']:.2f} stop_iter={full['stop_iter']} best_iter={full['best_iter']}")
    for f in ("summary.json", "log.csv", "checkpoint.pt", "reconstructions.pt", "comparison.png", "psnr_es.png"):
        assert os.path.isfile(os.path.join(full["run_dir"], f))

    step = DIP.dip_step

    def step_then_ctrl_c(st, *args):
        out = step(st, *args)
        if st.k == 49:                     # the 50th iteration (k is incremented after the step)
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(DIP, "dip_step", step_then_ctrl_c)
    part = DIP.run(TINY, results_dir=str(tmp_path / "b"), input_noise=0.003)
    monkeypatch.setattr(DIP, "dip_step", step)
    assert part["interrupted"] and part["iterations_done"] == 50
    resumed = DIP.run(resume=part["run_dir"], results_dir=str(tmp_path / "c"), progress=False, threads=1)
    assert resumed["iterations_done"] == 120
    ref = torch.load(os.path.join(full["run_dir"], "reconstructions.pt"))
    got = torch.load(os.path.join(resumed["run_dir"], "reconstructions.pt"))
    torch.testing.assert_close(got["x_last"], ref["x_last"], rtol=0, atol=1e-6)
    for key in ("psnr_best", "psnr_es", "stop_iter", "best_iter", "stop_iter_emv"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-4)


@pytest.mark.parametrize("overrides, match", [
    (dict(setting="blurry"), "unknown setting 'blurry'"),
    (dict(kernel_size=4), "kernel_size must be a positive odd integer"),
    (dict(noise_level=-0.1), "noise_level must be a non-negative"),
    (dict(lr=math.nan), "lr must be a positive finite number"),
    (dict(image="no_such_image"), "image 'no_such_image' not found"),
    (dict(generator="gan"), "unknown generator"),
    (dict(depth=4, size_x=30), "divisible by 8"),
    (dict(es_window=1), "es_window must be an integer ≥ 2"),
    (dict(threads=-1), "threads must be ≥ 0"),
    (dict(widht=8), "unknown setting 'widht'"),
    (dict(resume="nowhere/checkpoint.pt"), "no checkpoint at"),
])
def test_bad_input_refused_in_one_line_and_nothing_written(tmp_path, overrides, match):
    """Each bad setting raises ConfigError with a one-line message naming the problem, before any
    folder is made: results_dir stays absent."""
    out = tmp_path / "results"
    with pytest.raises(ConfigError, match=match) as err:
        DIP.run(overrides, results_dir=str(out), progress=False)
    assert "\n" not in str(err.value)
    assert not out.exists()


def test_resume_refuses_another_drivers_checkpoint_and_a_changed_setting(tmp_path):
    """Through config.load_checkpoint/resume_config: a checkpoint without DIP weights (e.g.
    ADP.py's) is not a DIP.py checkpoint; a resume may not change a saved setting (only the
    iteration budget and run-local ones); both refused before anything is written."""
    out = tmp_path / "results"
    adp_like = tmp_path / "adp.pt"
    torch.save({"config": dict(DIP.DEFAULTS), "state": {"theta": torch.zeros(3)}}, adp_like)
    with pytest.raises(ConfigError, match="not a readable DIP.py checkpoint"):
        DIP.run(resume=str(adp_like), results_dir=str(out), progress=False)
    dip_like = tmp_path / "dip.pt"
    torch.save({"config": dict(DIP.DEFAULTS, lr=0.02), "state": {"net": {}}}, dip_like)
    with pytest.raises(ConfigError, match=r"only --results_dir.*--iterations, --stop_early.*not --lr"):
        DIP.run(resume=str(dip_like), lr=0.01, results_dir=str(out), progress=False)
    cfg, _ = DIP.resolve_config({"resume": str(dip_like), "iterations": 7, "results_dir": str(out)})
    assert (cfg["lr"], cfg["iterations"], cfg["results_dir"]) == (0.02, 7, str(out))
    assert not out.exists()
