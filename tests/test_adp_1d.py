"""Tests of the 1D ADP experiment (SPEC §4.1): the elastic-net lower level, its certificate, the
support-restricted hypergradient, MAID on it, LISTA, and the driver's ``--name=value`` parser.

All on small float64 CPU instances (n = 30); the whole file runs in a few seconds.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import maid
from elastic_net import ElasticNetBilevel, gaussian_operator, lista_step, make_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DT = torch.float64


def small_problem(n=30, seed=1, step=0.1, alpha1=0.05, alpha2=0.027, perturb=0.02, **kw):
    """A small instance of the 1D problem: Gaussian ``A`` (SPEC formula), piecewise-constant truth,
    noisy data, and a generic (non-symmetric, non-Toeplitz) operator ``B = A + perturb·N(0, 1)``."""
    gen = torch.Generator().manual_seed(seed)
    A = gaussian_operator(n, DT)
    x_true = torch.zeros(n, dtype=DT)
    x_true[n // 6: n // 2] = 1.0
    x_true[2 * n // 3: 5 * n // 6] = -0.6
    y = A @ x_true + 0.005 * torch.randn(n, generator=gen, dtype=DT)
    B = A + perturb * torch.randn(n, n, generator=gen, dtype=DT)
    return ElasticNetBilevel(A, y, alpha1, alpha2, step=step, x_true=x_true, **kw), A, B


def accurate(problem, B, x0=None, eps=1e-13):
    """``x̂(B)`` to accuracy ``eps`` (asserted certified)."""
    res = problem.accurate_upper(B, x0=x0, eps=eps, max_iter=500_000)[1]
    assert res.converged
    return res.x


def support(x):
    return tuple((x != 0).nonzero().flatten().tolist())


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def test_data_matches_spec():
    t, x, A, y = make_data(200, 0.01, 0.005, seed=0)
    assert t[0].item() == pytest.approx(-0.995) and t[-1].item() == pytest.approx(0.995)
    assert A.shape == (200, 200) and A[3, 10].item() == pytest.approx(math.exp(-49 / 50) / (5 * math.sqrt(2 * math.pi)))
    # piecewise constant levels: 0, 1, 0.3, 0, 0.7, 0
    for ti, val in ((-0.8, 0.0), (-0.55, 1.0), (-0.2, 0.3), (0.1, 0.0), (0.3, 0.7), (0.8, 0.0)):
        i = int(torch.argmin((t - ti).abs()))
        assert x[i].item() == pytest.approx(val)
    noise = y - A @ x
    assert 0.004 < noise.std().item() < 0.006
    assert torch.equal(y, make_data(200, 0.01, 0.005, seed=0)[3])  # fixed seed


# --------------------------------------------------------------------------------------------
# (1) hypergradient against finite differences of f(B) = g(x̂(B))
# --------------------------------------------------------------------------------------------
def test_hypergradient_matches_finite_differences_on_fixed_support():
    P, A, B = small_problem(step=1.0)  # step clamped to 1/L: fast accurate solves
    x = accurate(P, B)
    S = support(x)
    assert 3 <= len(S) <= len(x) - 3, "the instance must exercise the support restriction"
    z, q, it, ok = maid.hypergradient(P, x, B, None, 1e-13, 1000)
    assert ok and it > 0
    # the SPEC's formula with a dense solve on S gives the same z
    torch.testing.assert_close(z, P.hypergradient_direct(x, B), rtol=1e-9, atol=1e-12)
    # a wrong variant (no restriction: full (BᵀB + α₂I)v = ∇ₓg) must be detected by the same check
    H = B.T @ B + P.alpha2 * torch.eye(len(x), dtype=DT)
    z_wrong = -P.mixed_vjp(x, B, torch.linalg.solve(H, P.upper_grad_x(x, B)))

    gen = torch.Generator().manual_seed(7)
    hstep = 1e-6
    wrong_detected = False
    for _ in range(3):
        E = torch.randn(B.shape, generator=gen, dtype=DT)
        E /= torch.linalg.matrix_norm(E)
        xp, xm = accurate(P, B + hstep * E, x), accurate(P, B - hstep * E, x)
        assert support(xp) == S and support(xm) == S, "support changed under the perturbation"
        fd = (P.upper_loss(xp, None).item() - P.upper_loss(xm, None).item()) / (2 * hstep)
        dz = torch.sum(z * E).item()
        assert abs(dz) > 1e-4  # a meaningful directional derivative
        assert abs(fd - dz) / abs(dz) < 1e-3, (fd, dz)
        wrong_detected |= abs(fd - torch.sum(z_wrong * E).item()) / abs(dz) > 1e-2
    assert wrong_detected


# --------------------------------------------------------------------------------------------
# (2) the lower solver's certificate
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("warm", [False, True])
def test_lower_certificate_bounds_the_error(warm):
    P, A, B = small_problem(step=0.1)  # the paper's step
    x_hat = accurate(P, B, eps=1e-14)
    gen = torch.Generator().manual_seed(3)
    x0 = x_hat + 0.3 * torch.randn(x_hat.shape, generator=gen, dtype=DT) if warm else torch.zeros_like(x_hat)
    ratios = []
    for eps in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        res = P.solve_lower(B, x0, eps, 200_000)
        assert res.converged and res.iters > 0
        err = torch.linalg.vector_norm(res.x - x_hat).item()
        assert err <= eps, (eps, err)
        ratios.append(err / eps)
        # the reported bound on dist(0, ∂h(x⁺)) divided by μ = α₂ is itself ≤ ε
        assert res.grad_norm / P.alpha2 <= eps
    # not vacuous: the certificate is at most ~3 orders of magnitude pessimistic here
    assert max(ratios) > 1e-3


def test_lower_solver_reports_the_cap():
    P, A, B = small_problem(step=0.1)
    x0 = torch.zeros(B.shape[1], dtype=DT)
    res = P.solve_lower(B, x0, 1e-10, 7)
    assert not res.converged and res.iters == 7 and P.uncertified == 1 and P.solves == 1
    again = P.solve_lower(B, res.x, 1e-10, 7)          # continuing an uncertified solve does work
    assert again.iters == 7 and not torch.equal(again.x, res.x)
    assert P.solve_lower(B, x0, 1e-3, 100_000).converged


# --------------------------------------------------------------------------------------------
# (3) MAID on the elastic net: the accurate upper loss decreases at accepted iterates
# --------------------------------------------------------------------------------------------
def test_maid_decreases_the_accurately_evaluated_upper_loss():
    P, A, _ = small_problem(step=1.0)
    x0 = torch.zeros(A.shape[1], dtype=DT)
    accepted = [A.clone()]

    def cb(record, state):
        if record["accepted"]:
            accepted.append(state.theta.clone())

    cfg = maid.MAIDConfig(eps0=1e-3, step0=0.1, max_iter=15, lower_max_iter=20_000, descent_check=False)
    res = maid.maid(P, A.clone(), x0, cfg, callback=cb)
    assert res.stop_reason in ("max_iter", "eps_min")
    assert P.uncertified == 0  # every solve certified: the decrease test is then rigorous
    assert len(accepted) >= 8
    f, xw = [], None
    for th in accepted:  # accurate f(θ), warm-started along the path
        fa, sol = P.accurate_upper(th, x0=xw, eps=1e-12, max_iter=500_000)
        assert sol.converged
        f.append(fa)
        xw = sol.x
    for a, b in zip(f, f[1:]):
        assert b < a, f
    assert f[-1] < 0.5 * f[0]
    # the logged (inexact) loss at accepted iterates is within the ε-bound of the accurate one
    logged = [r for r in res.log if r["accepted"]]
    for rec, fa in zip(logged, f[1:]):
        assert abs(rec["upper_loss"] - fa) <= 1e-2 * fa


# --------------------------------------------------------------------------------------------
# LISTA shares the lower level: its unrolled gradient tends to the implicit hypergradient
# --------------------------------------------------------------------------------------------
def test_lista_gradient_tends_to_the_implicit_hypergradient():
    P, A, B = small_problem(step=0.5)
    x = accurate(P, B, eps=1e-14)
    z = P.hypergradient_direct(x, B)
    grads = {}
    for layers in (20, 2000):
        B_new, x_out, loss = lista_step(P, B, x, layers, lr=1.0)
        grads[layers] = B - B_new
        torch.testing.assert_close(x_out, x, rtol=0, atol=1e-10)  # x̂ is a fixed point of the layer
    rel = lambda g: (torch.linalg.matrix_norm(g - z) / torch.linalg.matrix_norm(z)).item()  # noqa: E731
    assert rel(grads[2000]) < 1e-6
    assert rel(grads[20]) > 1e-2  # few layers: a truncated (different) gradient


# --------------------------------------------------------------------------------------------
# the driver: ADP_1D.run in-process, the command line in a few subprocesses
# --------------------------------------------------------------------------------------------
BAD_1D = [(dict(no_such_setting=1), "unknown setting"), (dict(ift_steps=2.5), "expected a value of type int"),
          (dict(progress="maybe"), "type bool"), (dict(ift_steps=0), "ift_steps"),
          (dict(noise=-0.1), "noise"), (dict(noise=math.nan), "noise"), (dict(alpha2=0.0), "alpha2"),
          (dict(step=-1.0), "step"), (dict(maid_eps0=0.0), "eps0"), (dict(maid_rho=1.5), "rho"),
          (dict(maid_tau=0.0), "tau"), (dict(maid_nu=0.9), "nu"), (dict(n=0), "n must be"),
          (dict(lower_step=math.inf), "lower_step"), (dict(target_rel=math.nan), "target_rel"),
          (dict(target_rel=-5.0), "target_rel"), (dict(h=1e308), "grid"), (dict(threads=100000), "threads"),
          (dict(maid_nu_step=0.5), "maid_nu_step"), (dict(maid_nu_step=math.inf), "must be finite"),
          (dict(upper_step=0.1), "'upper_step' was renamed to 'step'")]


@pytest.mark.parametrize("kw,message", BAD_1D, ids=[m for _, m in BAD_1D])
def test_driver_rejects_bad_input(tmp_path, kw, message):
    """ConfigError naming the setting, raised before the results folder is touched."""
    import ADP_1D
    from config import ConfigError
    results = tmp_path / "results"
    results.mkdir()
    (results / "earlier").mkdir()
    with pytest.raises(ConfigError) as e:
        ADP_1D.run(kw, results_dir=str(results))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert sorted(os.listdir(results)) == ["earlier"]


def test_driver_rejects_unwritable_results_dir(tmp_path):
    import ADP_1D
    from config import ConfigError
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write to results_dir"):
        ADP_1D.run(results_dir=f"{blocker}/sub")


@pytest.mark.slow
def test_driver_cli_help_and_one_line_error(tmp_path):
    """--help lists the typed settings (exit 0); a bad value is one line on stderr, exit 2."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "ADP_1D.py"), "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0
    assert "--ift_steps=7500  (int)" in p.stdout and "--alpha1=0.108  (float)" in p.stdout
    assert "--maid_descent_check=False  (bool)" in p.stdout and "--step=0.1  (float)" in p.stdout
    p = subprocess.run([sys.executable, os.path.join(ROOT, "ADP_1D.py"), "--maid_rho=1.5", f"--results_dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("ADP_1D.py: error:") and "rho" in lines[0]
    assert os.listdir(tmp_path) == []


SHORT = dict(n=60, ift_steps=30, lista_steps=30, maid_iters=8, progress=False)


@pytest.mark.slow
def test_driver_short_run_reports_consistent_targets(tmp_path, capsys):
    """A short end-to-end run (n = 60, so that the truth on the grid is not all zero): every output
    file is written, the last line has the required form, IFT reaches its own target (final loss + 1 %) by definition, and the
    reported time / lower iterations to the target are those of the first logged record at or
    below the target, never beyond a method's totals."""
    import json
    import ADP_1D
    s = ADP_1D.run(SHORT, results_dir=str(tmp_path))
    last = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert last[0] == "time_to_IFT_loss" and [w.split("=")[0] for w in last[1:]] == ["MAID", "IFT", "LISTA"]
    (run,) = os.listdir(tmp_path)
    out = tmp_path / run
    assert s["out_dir"] == str(out)
    for f in ("reconstructions.png", "operators.png", "loss_vs_time.png", "loss_vs_lower_iters.png", "summary.json",
              "operators.pt", "log_IFT.csv", "log_LISTA.csv", "log_MAID.csv"):
        assert (out / f).stat().st_size > 0, f
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["IFT"]["time_to_target"] is not None
    assert torch.get_default_dtype() == torch.float64 and torch.get_num_threads() >= 1   # restored
    for name, m in summary["methods"].items():
        log = json.loads((out / f"log_{name}.json").read_text())
        hit = next((r for r in log if r["upper_loss"] <= summary["target"]), None)
        if hit is None:
            assert m["time_to_target"] is None and m["lower_iters_to_target"] is None
            assert f"{name}=never" in last
        else:
            assert m["time_to_target"] == hit["time"] <= m["time"]
            assert m["lower_iters_to_target"] == hit["lower_iters"] <= m["lower_iters"]
            assert f"{name}={hit['time']:.2f}" in last


def test_lista_paper_loss_logs_the_unhalved_residual():
    """lista_paper_loss: LISTA's logged loss is doubled (the paper's code logs ‖A x − y‖² for LISTA
    and ½‖A x − y‖² for the others), exactly 2× the plain log of the same training run, and B is
    trained identically; at upper_scale = 1 the first logged value is ‖A x₁ − y‖²."""
    import ADP_1D
    t, x_true, A, y = make_data(30, 0.01, 0.005, seed=0)
    x0 = torch.zeros(30, dtype=DT)
    logs = {}
    for paper in (False, True):
        cfg = dict(ADP_1D.DEFAULTS, n=30, ift_steps=1, lista_steps=5, maid_iters=1, progress=False,
                   lista_paper_loss=paper)
        make = lambda **kw: ADP_1D.PaperDefects(A, y, cfg["alpha1"], cfg["alpha2"], cfg["lower_step"],  # noqa: E731
                                                x_true=x_true, **kw)
        logs[paper] = ADP_1D.run_methods(cfg, make, A, x0)["LISTA"]
    assert torch.equal(logs[False]["B"], logs[True]["B"])
    plain, paper = [r["upper_loss"] for r in logs[False]["log"]], [r["upper_loss"] for r in logs[True]["log"]]
    assert paper == [2 * v for v in plain]
    from elastic_net import lista_step
    _, x1, _ = lista_step(ElasticNetBilevel(A, y, 0.108, 0.027, 0.1), A, x0, 50, 0.1)
    assert paper[0] == pytest.approx(torch.sum((A @ x1 - y) ** 2).item(), rel=1e-12)


def test_paper_adjoint_is_the_untransposed_fixed_point_solve():
    """PaperDefects(paper_adjoint=True) gives the hypergradient of the paper's formula built
    densely: v = (I − DM)⁻¹∇ₓg with M = (1 − α₂)I − BᵀB and D the support projection, v zeroed
    off the support, z = −[(Bx − y)vᵀ + (Bv)xᵀ] (rel. 1e-8: CG to δ = 1e-13 against a dense solve);
    the correct (transposed) one differs from it by ~30 % at B = A on the SPEC data (SPEC §5)."""
    import ADP_1D
    t, x_true, A, y = make_data(200, 0.01, 0.005, seed=0)
    good = ADP_1D.PaperDefects(A, y, 0.108, 0.027, 0.1)
    bad = ADP_1D.PaperDefects(A, y, 0.108, 0.027, 0.1, paper_adjoint=True)
    x = good.accurate_upper(A, eps=1e-12)[1].x
    z_bad = maid.hypergradient(bad, x, A, None, 1e-13, 5000)[0]
    z_good = maid.hypergradient(good, x, A, None, 1e-13, 5000)[0]
    D = torch.diag((x != 0).to(DT))
    M = (1 - 0.027) * torch.eye(200, dtype=DT) - A.T @ A
    v = torch.linalg.solve(torch.eye(200, dtype=DT) - D @ M, good.upper_grad_x(x, A))
    v = D @ v
    z_ref = -(torch.outer(A @ x - y, v) + torch.outer(A @ v, x))
    torch.testing.assert_close(z_bad, z_ref, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(z_good, good.hypergradient_direct(x, A), rtol=1e-8, atol=1e-12)
    rel = (torch.linalg.matrix_norm(z_bad - z_good) / torch.linalg.matrix_norm(z_good)).item()
    assert 0.2 < rel < 0.4


def test_paper_stop_is_the_test_without_Bt():
    """PaperDefects(paper_stop=True): the solve stops at the first iterate with
    ‖Bx − y + α₁sign(x) + α₂x‖ ≤ ε, reports that residual; at MAID's ε = 1e-3 the residual
    cannot fall that low (‖Bx̂ − y‖ ≈ noise·√n) and every solve hits the cap."""
    import ADP_1D
    Q, A, B = small_problem()
    P = ADP_1D.PaperDefects(A, Q.y, Q.alpha1, Q.alpha2, Q.step, paper_stop=True)
    x0 = torch.zeros(B.shape[1], dtype=DT)
    capped = P.solve_lower(B, x0, 1e-3, 300)
    assert capped.iters == 300 and not capped.converged and P.uncertified == 1
    res = lambda x: torch.linalg.vector_norm(B @ x - P.y + P.alpha1 * torch.sign(x) + P.alpha2 * x).item()  # noqa: E731
    assert capped.grad_norm == pytest.approx(res(capped.x), rel=1e-12) and capped.grad_norm > 1e-3
    loose = P.solve_lower(B, x0, 1.5 * capped.grad_norm, 300)
    assert loose.converged and loose.iters < 300 and loose.grad_norm <= 1.5 * capped.grad_norm


def test_solver_reports_non_finite_when_the_bound_overflows():
    """B so large that L = ‖BᵀB‖_∞ + α₂ overflows: a non-finite solve (a failed trial for MAID), no
    division by the step t = 1/L = 0."""
    problem, A, _ = small_problem()
    res = problem.solve_lower(1e200 * A, torch.zeros(A.shape[0], dtype=DT), 1e-3, 50)
    assert res.status == "non_finite" and res.iters == 0


def test_upper_lipschitz_is_the_error_constants_L_g():
    problem, A, B = small_problem()
    x = problem.accurate_upper(B)[1].x
    assert problem.upper_lipschitz(x, B) == problem.error_constants(x, B).L_g > 0
