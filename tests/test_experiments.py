"""Tests of the reproduction experiments (``experiments/protocols.py``, ``reproduce_2d.py``,
``maid_vs_ift_2d.py``): the pieces whose mistakes would silently change the table (the true
kernel, the paper-to-ours normalisation (with the driver's unsquared H¹ penalty), the H¹ dual norm, the paper's
step rule), and two ``--quick`` end-to-end runs."""
import csv
import math
import os
import sys

import pytest
import torch

from conftest import fd_directional, rand

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))

import protocols as P  # noqa: E402
from imaging import make_data  # noqa: E402
from operators import Blur  # noqa: E402


def test_true_kernel_reproduces_the_data():
    """The oracle's 9×9 kernel (motion ∘ Gaussian σ = 1.5, ``imaging.true_kernel`` via ``make_case``) blurs
    the ground truth into exactly the noise-free data of ``imaging.make_data`` (reference: the
    generator's two successive blurs).  Both are float64 FFT convolutions of the same sums, so
    they agree to rounding (1e-12); a wrong flip, offset or order gives errors of order 1e-2."""
    case = P.make_case("astronaut", "semiblind_1.5", size=32)
    clean = make_data(dict(P.data_config("astronaut", "semiblind_1.5", 32), noise_level=0.0), P.IMAGES_DIR,
                      torch.device("cpu"), torch.float64)[2]
    assert case.b_true.shape == (3, 1, 9, 9)
    err = (Blur(case.b_true, (32, 32)).A(case.x_true) - clean).abs().max().item()
    assert err < 1e-12
    assert abs(case.b_true.sum().item() - 3.0) < 1e-12      # unit mass per channel


def test_kernel_error_ratio_endpoints():
    """``‖b − b_true‖/‖b₀ − b_true‖`` is 1 at ``b = b₀`` and 0 at ``b = b_true`` (padding to a
    common size must keep the kernels centred; an off-centre pad gives neither)."""
    from imaging import kernel_error_ratio, pad_kernel
    case = P.make_case("astronaut", "semiblind_0.5", size=16)
    assert kernel_error_ratio(case.b0, case.b0, case.b_true) == pytest.approx(1.0, abs=1e-14)
    assert kernel_error_ratio(case.b_true, case.b0, case.b_true) == pytest.approx(0.0, abs=1e-14)
    assert P.kernel_move(pad_kernel(case.b0, 9), case.b0) == 0.0
    assert P.kernel_move(2 * case.b0, case.b0) == pytest.approx(1.0, rel=1e-14)


def test_prox_rows_keep_the_kernel_on_the_simplex_and_9x9():
    """The proximal rows of reproduce_2d pass ADP.py's options through: the learned kernel is
    9×9 (b₀ zero-padded), every channel sums to 1 (to 1e-9) with no negative entry, and the
    unsquared-H¹ row at the paper's β reports that β (3·100/n).  A row that dropped
    ``kernel_constraint`` would leave the 9×9 support's sums free (they drift by 1e-3–1e-2)."""
    import reproduce_2d as R
    opts = R.resolve(quick=True, size=24, upper_iter=3)
    names = ["ADP prox simplex 9×9 learned", "ADP prox simplex 9×9 known", "ADP prox simplex+H¹ 9×9 paper β"]
    res = R.run_case("coffee", "semiblind_1.5", opts, only=names)
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == set(names)
    for name, r in rows.items():
        assert res["kernels"][name].shape[-1] == 9
        assert abs(r["kernel_sum_min"] - 1) < 1e-9 and abs(r["kernel_sum_max"] - 1) < 1e-9 and r["kernel_min"] >= 0
        assert r["maid_iters"] <= 3
    assert rows["ADP prox simplex+H¹ 9×9 paper β"]["beta"] == pytest.approx(300 / (3 * 24 * 24))


def test_resume_merges_rows_in_order():
    """``merge_case``: a resumed case keeps its finished rows, adds the new ones in the table's order,
    and a row that ran replaces its earlier skip reason."""
    import reproduce_2d as R
    prev = {"rows": [{"method": "b", "psnr": 2.0}], "skipped": {"c": "not yet"}, "images": {"b": 1}, "kernels": {}}
    new = {"rows": [{"method": "c", "psnr": 3.0}, {"method": "a", "psnr": 1.0}], "skipped": {},
           "images": {"c": 2}, "kernels": {"c": 0}}
    m = R.merge_case(prev, new, ["a", "b", "c"])
    assert [r["method"] for r in m["rows"]] == ["a", "b", "c"] and m["skipped"] == {}
    assert m["images"] == {"b": 1, "c": 2} and m["kernels"] == {"c": 0}


def _paper_upper(x, b, y, b0):
    """The paper's upper level written directly: ``‖B_b x − y‖²/3 + 100 ‖b − b₀‖_{H¹}`` (unsquared)."""
    r = Blur(b, y.shape[-2:]).A(x) - y
    d = b - b0
    dh, dv = torch.diff(d, dim=-1), torch.diff(d, dim=-2)    # forward differences, Neumann (last one 0)
    h1 = torch.sqrt((d * d).sum() + (dh * dh).sum() + (dv * dv).sum())
    return (r * r).sum() / P.PAPER["data_divisor"] + P.PAPER["beta"] * h1


def test_paper_normalisation_maps_values_and_steps():
    """``g_paper = (n/3)·g`` with ``β = 3β_p/n`` (module docstring of protocols), and one gradient
    step of size ``s_p`` on ``g_paper`` (autograd of the formula written directly) lands where a step
    ``s_p·n/3`` on our ``g`` (closed-form ``∂_b g``) does.  Float64, relative 1e-10: the two
    sides are the same sums in another order; a wrong factor n or 3 is off by orders of magnitude."""
    case = P.make_case("coffee", "semiblind_0.5", size=24)
    m = P.paper_upper_mapping(case.n)
    ours = P.adp_problem_for(case, "tv_aniso", P.PAPER["tv_weight"], P.PAPER["tv_smoothing"], m["beta"], "learned",
                             kernel_penalty="h1")
    b = case.b0 + 1e-3 * rand(*case.b0.shape, seed=1)
    x = case.y + 0.01 * rand(*case.y.shape, seed=2)
    g_paper = _paper_upper(x, b, case.y, case.b0).item()
    assert g_paper == pytest.approx(m["scale"] * ours.upper_loss(x, b).item(), rel=1e-10)
    bb = b.clone().requires_grad_(True)
    (grad_paper,) = torch.autograd.grad(_paper_upper(x, bb, case.y, case.b0), bb)
    step_p = P.PAPER["step0"]
    paper_step = b - step_p * grad_paper
    our_step = b - m["step0"] * ours.upper_grad_theta(x, b)
    assert torch.allclose(paper_step, our_step, rtol=0, atol=1e-10 * b.abs().max().item())
    assert m["step0"] == pytest.approx(step_p * case.n / 3) and m["beta"] == pytest.approx(300 / case.n)


def test_h1_dual_norm_is_the_supremum():
    """``sqrt(zᵀM⁻¹z) = max_d ⟨z, d⟩/‖d‖_{H¹}``: attained at ``d = M⁻¹z`` (to 1e-12) and not
    exceeded by 200 random directions (reference: the library's ``operators.h1_norm``)."""
    from operators import h1_norm
    from prox import h1_matrix
    z = rand(3, 1, 5, 5, seed=6)
    dual = P.h1_dual_norm(z)
    M = h1_matrix(5)
    d_star = torch.linalg.solve(M, z.reshape(3, 25).T).T.reshape(3, 1, 5, 5)
    zero = torch.zeros_like(z)
    ratio = lambda d: torch.sum(z * d).item() / h1_norm(d, zero).item()  # noqa: E731
    assert ratio(d_star) == pytest.approx(dual, rel=1e-12)
    assert max(ratio(rand(3, 1, 5, 5, seed=100 + i)) for i in range(200)) <= dual * (1 + 1e-12)


def test_paper_step_is_the_power_iteration_step():
    """The paper's TV step ``1/L₁₀₀`` (10 power iterations at ``x = y`` with the ×100 weight) is at
    least ``1/L`` of that Hessian (a power-iteration estimate is below ``‖H‖ ≤ L``, the closed-form
    bound of ``LowerLevel``), and far below ``1/L`` of the objective it descends (SPEC §5: 50–100×
    smaller; asserted ≥ 10× so that a step computed without the ×100 fails)."""
    case = P.make_case("astronaut", "motion", size=32)
    step = P.paper_tv_step(case)
    h100 = P.lower_objective(case.b0, case.y, "tv_aniso", 100 * P.PAPER["tv_weight"], P.PAPER["tv_smoothing"])
    assert step >= 1 / h100.L * (1 - 1e-12)
    assert step * P.paper_lower(case).L < 0.1


def test_time_to_target_first_crossing():
    """The first logged time whose value is ≤ the target, ``None`` when never (the definition used
    for the last line of maid_vs_ift_2d.py)."""
    import maid_vs_ift_2d as M
    assert M.time_to_target([0.0, 1.0, 2.0, 3.0], [5.0, 3.0, 1.0, 0.5], 1.0) == 2.0
    assert M.time_to_target([0.0, 1.0], [5.0, 3.0], 1.0) is None


@pytest.mark.slow
def test_reproduce_quick_end_to_end(tmp_path):
    """``reproduce_2d.run(quick=True)`` on one setting: every selected row that can run gives a
    finite PSNR in the CSV; the printed gains are the means of the row differences read back from
    ``table.csv`` (an independent recomputation, to 1e-9 dB); the paper-protocol MAID stays within
    its iteration cap; the figures are below 300 KB."""
    import reproduce_2d as R
    out = R.run(quick=True, settings="semiblind_0.5", results_dir=str(tmp_path))
    with open(os.path.join(out["run_dir"], "table.csv")) as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert all(math.isfinite(float(r["psnr"])) for r in rows.values())
    for g, (a, b) in R.GAINS.items():
        if a in rows and b in rows:
            assert out["gains"][g]["mean"] == pytest.approx(float(rows[a]["psnr"]) - float(rows[b]["psnr"]), abs=1e-9)
    if "ADP paper protocol" in rows:
        assert int(rows["ADP paper protocol"]["maid_iters"]) <= R._QUICK["upper_iter"]
    for name in os.listdir(out["run_dir"]):
        if name.endswith(".png"):
            assert os.path.getsize(os.path.join(out["run_dir"], name)) < 300_000


@pytest.mark.slow
def test_maid_vs_ift_quick_end_to_end(tmp_path):
    """``maid_vs_ift_2d.run(quick=True)``: every run starts from the same ``f(b₀)`` (re-evaluated,
    identical to 1e-15 relative), the re-evaluated losses of accepted MAID steps never exceed
    ``f(b₀)`` (MAID's sufficient-decrease test bounds the exact ``f``; slack 1e-6 relative: the
    re-evaluation error ‖∇ₓg‖·eval_eps is about 1e-7 of f here), and the run with the best final loss reaches the target."""
    import maid_vs_ift_2d as M
    out = M.run(quick=True, upper_iter=4, ift_eps="1e-2,1e-4", results_dir=str(tmp_path))
    runs, s = out["runs"], out["summary"]
    f0 = runs["MAID"]["f"][0]
    assert all(r["f"][0] == pytest.approx(f0, rel=1e-15) for r in runs.values())
    assert max(runs["MAID"]["f"]) <= f0 * (1 + 1e-6)
    best = min(runs, key=lambda k: runs[k]["f"][-1])
    assert s["time_to_target"][best] is not None


def test_mu0_mass_removes_the_mean_bias():
    """``mu0_mass``: with ``b₀`` scaled to ``s(μ₀)`` the lower level's solution keeps the data's mean
    (TV does not act on the mean, so at frequency 0 ``x̂(0) = s·y(0)/(s² + μ₀)``).  Checked on a
    real lower-level solve: the mean of ``x̂`` equals the mean of ``y`` to the solve's accuracy,
    while with ``b₀`` itself it is ``1/(1 + μ₀)`` of it (1 % low at μ₀ = 10⁻²)."""
    import reproduce_2d as R
    from lower_level import solve_lower
    s = R.mu0_mass(1e-2)
    assert s / (s * s + 1e-2) == pytest.approx(1.0, rel=1e-14) and 0.98 < s < 1
    case = P.make_case("chelsea", "motion", size=24)
    for mass, ratio in ((s, 1.0), (1.0, 1 / 1.01)):
        h = P.lower_objective(mass * case.b0, case.y, "tv", P.FAIR["tv_weight"], P.FAIR["tv_smoothing"], mu0=1e-2)
        x = solve_lower(h, case.y.clone(), 1e-9, 20000).x
        assert (x.mean() / case.y.mean()).item() == pytest.approx(ratio, rel=1e-6)
