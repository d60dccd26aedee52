"""Every blur setting and both upper operators through the 2D driver (ADP.run), with the reported
table checked number by number against what the run saved.

For each run (32×32 crop of the bundled image, 2 upper iterations) the test rebuilds the data
with imaging.make_data from the run's configuration and checks:

* "blurry": PSNR/SSIM of y against x_true, by scikit-image (the reference metrics);
* "ADP-β-MAID": PSNR/SSIM of the reconstruction saved in checkpoint.pt, by scikit-image, and the
  same as the driver's last log record (its metrics are taken at the final x);
* "TV (b₀)": PSNR/SSIM of the TV baseline solved here (same regulariser, μ₀, solver, start y and
  tolerance: the same deterministic iterates), by scikit-image;
* the kernels: kernel.pt holds b₀ (the setting's kernel; the motion kernel for semiblind) and b*
  (= the checkpoint's θ), and summary["kernel_change"] = ‖b* − b₀‖/‖b₀‖;
* the upper operator: the last logged upper loss equals g(x, b*) = ‖A_up x − y‖²/n + β‖b* − b₀‖²_{H¹}
  with A_up = B_{b*} (learned) or B_{b₀} (known), recomputed from the saved x and b*.

Tolerances: 1e-9 (float64 metrics of identical arrays; scikit-image's PSNR vs deepinv's differs by
deepinv's 1e-8 added to the MSE, ≤ 4.4e-8/MSE dB, see test_references).
"""
import math
import os

import pytest
import torch

from imaging import make_data, true_kernel
from lower_level import LowerLevel, solve_lower
from operators import Blur, h1_penalty, make_kernel
from regularisers import make_regulariser

ADP = pytest.importorskip("ADP")
IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "images")


def _sk_scores(x, ref):
    """(PSNR, SSIM) of clip(x, 0, 1) against ref by scikit-image (data range 1, Gaussian window)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a = x.detach().clamp(0, 1).double().cpu().numpy().transpose(1, 2, 0)
    b = ref.detach().double().cpu().numpy().transpose(1, 2, 0)
    p = peak_signal_noise_ratio(b, a, data_range=1.0)
    s = structural_similarity(a, b, data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False)
    return p, s


def _close_scores(reported: dict, ref: tuple, what: str):
    p, s = ref
    mse = 10 ** (-p / 10)
    assert math.isclose(reported["psnr"], p, abs_tol=4.4e-8 / mse + 1e-9), (what, reported["psnr"], p)
    assert math.isclose(reported["ssim"], s, abs_tol=1e-9), (what, reported["ssim"], s)


@pytest.mark.slow
@pytest.mark.parametrize("setting,upper_operator", [("motion", "learned"), ("gaussian", "learned"),
                                                    ("disc", "learned"), ("semiblind", "learned"),
                                                    ("motion", "known"), ("semiblind", "known")])
def test_driver_table_matches_saved_outputs(tmp_path, setting, upper_operator):
    """One short run per setting/operator; the reported table, kernels and upper loss are recomputed
    from the saved files and the rebuilt data (see the module docstring)."""
    summary = ADP.run(image="astronaut", size_x=32, size_y=32, setting=setting, upper_operator=upper_operator,
                      upper_iter=2, results_dir=str(tmp_path), progress=False, device="cpu")
    cfg, run_dir = summary["config"], summary["run_dir"]
    assert cfg["setting"] == setting and cfg["upper_operator"] == upper_operator
    x_true, b0, y = make_data(cfg, IMAGES, torch.device("cpu"), torch.float64)
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    kernels = torch.load(os.path.join(run_dir, "kernel.pt"), weights_only=False)
    x_adp, b_star = ckpt["state"]["x"], ckpt["state"]["theta"]
    log = ckpt["state"]["log"]
    assert len(log) == summary["upper_iterations"] == 2

    # the table
    scores = summary["scores"]
    _close_scores(scores["blurry"], _sk_scores(y, x_true), "blurry")
    _close_scores(scores["ADP-β-MAID"], _sk_scores(x_adp, x_true), "ADP")
    assert math.isclose(log[-1]["psnr"], scores["ADP-β-MAID"]["psnr"], abs_tol=1e-12)
    reg = make_regulariser(cfg["regulariser"], cfg["tv_weight"], cfg["tv_smoothing"])
    h = LowerLevel(b0, y, reg, cfg["mu0"])
    base = solve_lower(h, y.clone(), cfg["baseline_eps"], 10 * cfg["lower_iter"], cfg["lower_solver"])
    assert base.converged
    _close_scores(scores["TV (b₀)"], _sk_scores(base.x, x_true), "TV")

    # the kernels
    kind = "motion" if setting == "semiblind" else setting
    assert torch.equal(kernels["b0"], make_kernel(kind, cfg["kernel_size"], cfg["channels"], sigma=cfg["blur_sigma"],
                                                  dtype=torch.float64))
    assert torch.equal(kernels["b_star"], b_star)
    change = (torch.linalg.vector_norm(b_star - b0) / torch.linalg.vector_norm(b0)).item()
    assert math.isclose(summary["kernel_change"], change, rel_tol=1e-12, abs_tol=1e-15)
    assert (change > 0) == (summary["accepted"] > 0)
    b_true = true_kernel(cfg)
    assert torch.equal(kernels["b_true"], b_true)
    if setting == "semiblind":            # ‖b* − b_true‖/‖b₀ − b_true‖ with b₀, b* padded to b_true's 9×9
        p = (b_true.shape[-1] - b0.shape[-1]) // 2
        pad = lambda t: torch.nn.functional.pad(t, (p, p, p, p))  # noqa: E731
        ratio = (torch.linalg.vector_norm(pad(b_star) - b_true) / torch.linalg.vector_norm(pad(b0) - b_true)).item()
        assert math.isclose(summary["kernel_error_ratio"], ratio, rel_tol=1e-12)
    else:
        assert torch.equal(b_true, b0) and summary["kernel_error_ratio"] is None

    # the upper operator: the last logged loss is g at the saved (x, b*)
    A_up = Blur(b_star if upper_operator == "learned" else b0, y.shape[-2:])
    r = A_up.A(x_adp) - y
    g = (r * r).sum().item() / y.numel() + cfg["beta"] * h1_penalty(b_star, b0).item()
    assert math.isclose(log[-1]["upper_loss"], g, rel_tol=1e-10), (log[-1]["upper_loss"], g)
