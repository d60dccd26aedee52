"""The paper's 1D comparison (SPEC §4.1): ADP IFT vs ADP LISTA vs ADP-MAID on one data set.

    x̂(B) = argmin_x ½‖Bx − y‖² + α₁‖x‖₁ + (α₂/2)‖x‖²     (elastic net, proximal gradient, step 0.1)
    min_B  g(x̂(B)) = upper_scale · ½‖A x̂(B) − y‖²          (B initialised at A, x at 0, β = 0)

All three methods share the lower level and its hypergradient (``elastic_net.py``):

* ADP IFT — ``maid.inexact_gradient_descent``: per upper step ONE warm-started proximal-gradient
  solve (certificate ε = ``ift_eps``, at most ``ift_lower_max_iter`` iterations, which with
  step 0.1 is what actually stops it), implicit hypergradient on the support, fixed step.
* ADP LISTA — ``lista_layers`` unrolled proximal-gradient steps differentiated by autograd, SGD
  with a fixed step, the output fed back as the next input.
* ADP-MAID — ``maid.maid`` with the SPEC's parameters (``maid_descent_check`` discussed below).

Run ``python ADP_1D.py`` (from the repository root); any constant below can be overridden with
``--name=value``, e.g. ``python ADP_1D.py --ift_steps=2000 --upper_scale=0.01``, or called as
``ADP_1D.run(ift_steps=2000)`` (importing the module has no side effects).  Writes a new
folder ``Results/1d_<timestamp>`` (figures, per-method JSON + CSV logs, ``summary.json``) and
prints a table; the last line printed is ``time_to_IFT_loss MAID=<s> IFT=<s> LISTA=<s|never>``,
the wall time (computation only: progress bars and logging excluded) each method needs to reach
IFT's final logged loss × (1 + ``target_rel``).

Choices (measured on this machine, 1 thread; see the README section):

* ``upper_scale = 1`` (default) is the ``½‖Ax − y‖²`` written in SPEC §4.1 for this experiment.
  With it a fixed step 0.1 is unstable for IFT (the loss jumps from 0.78 to 5–9 within a few
  steps even with accurate lower-level solves) while LISTA's truncated gradient is smaller and
  converges.  ``upper_scale = 0.01 = 2/n`` is SPEC §1's general normalisation ``‖Ax − y‖²/n``
  (the 2D driver's); it is the same as dividing the fixed steps of IFT and LISTA by 100, which
  makes them stable but slow.  Both tables are in the README.
* ``maid_descent_check = False``: with the honest constants (μ = α₂, ‖J‖ ≤ ‖Bx − y‖ + ‖B‖‖x‖) the
  bound ω exceeds ‖z‖ once ‖z‖ is small, and the check then halves ε up to 10 times per
  iteration; the run hits ε_min early and ends at a higher loss (both scales, see README).
* ``lista_paper_loss``, ``paper_adjoint``, ``maid_paper_stop`` (all off): the paper code's three
  differences from SPEC §4.1 (SPEC §5), to reproduce its figure; see :class:`PaperDefects` and
  the README for what each does to the time ratios.
* ``ift_eps = 1e-6``: high accuracy; with step 0.1 the 500-iteration cap is reached first in
  (nearly) every solve, so IFT is "500 warm-started proximal-gradient steps per upper step".
"""
import math
import os
import sys
import time

# ------------------------------------------------------------------ configuration (--name=value)
# data (SPEC §4.1)
n = 200                    # grid points t_i = −1 + h/2 + i h
h = 0.01                   # grid spacing
noise = 0.005              # standard deviation of the Gaussian noise in y = A x + noise·N(0, I)
seed = 0                   # seed of the noise
# lower level: elastic net, proximal gradient
alpha1 = 0.108             # ℓ₁ weight α₁
alpha2 = 0.027             # ℓ₂ weight α₂ (= strong-convexity constant μ)
lower_step = 0.1           # proximal-gradient step t (also LISTA's layer step)
# upper level
upper_scale = 1.0          # g = upper_scale·½‖Ax − y‖²; 1: SPEC §4.1's ½‖·‖² (default), 0.01 = 2/n: §1's ‖Ax − y‖²/n
step = 0.1                 # upper-level step: IFT's and LISTA's fixed step, MAID's initial step α₀
# ADP IFT
ift_steps = 7500           # upper steps (paper's budget)
ift_eps = 1e-6             # lower-level accuracy ε (certificate) and CG residual δ
ift_lower_max_iter = 500   # lower-level iterations per upper step, at most
# ADP LISTA
lista_steps = 4000         # SGD steps (paper's budget)
lista_layers = 50          # unrolled proximal-gradient layers per step
lista_paper_loss = False   # log LISTA's loss doubled, as the paper's code does (‖Ax − y‖², no ½); training unchanged
# the paper code's other 1D differences (SPEC §5), off by default
paper_adjoint = False      # IFT's and MAID's adjoint with (I − DM) instead of its transpose (the paper's grad_B_func)
maid_paper_stop = False    # MAID's lower solves stop on ‖Bx − y + α₁sign(x) + α₂x‖ ≤ ε (no Bᵀ; not a certificate)
# ADP-MAID
maid_iters = 300           # upper iterations, at most
maid_eps0 = 1e-3           # initial accuracy ε₀ (δ₀ = ε₀)
maid_rho = 0.5             # backtracking factor ρ
maid_tau = 0.5             # accuracy decrease τ
maid_nu = 1.05             # accuracy increase ν
maid_nu_step = 10 / 9      # step increase ν_α
maid_eta = 1e-4            # sufficient-decrease constant η
maid_max_backtracks = 5    # backtracks per iteration, at most
maid_eps_min = 1e-6        # stop when ε < ε_min
maid_lower_max_iter = 500  # lower-level iterations per solve, at most
maid_descent_check = False # tighten ε until ω ≤ (1 − η)‖z‖ (measured to hurt here, see docstring)
# evaluation and output
target_rel = 0.01          # target loss = IFT's final loss × (1 + target_rel)
eval_eps = 1e-10           # accuracy of the (uncounted) accurate evaluation of f(B) at the end
threads = 1                # torch CPU threads (small matrices: 1 is fastest and fair)
progress = True            # tqdm progress bars
results_dir = "Results"    # a new sub-folder 1d_<timestamp> is created here
save_operators = True      # write operators.pt (the learned 200×200 B of each method, ~1.3 MB)
# ------------------------------------------------------------------
import config  # noqa: E402
from config import ConfigError, check, finite_positive, valid_seed  # noqa: E402

DEFAULTS = config.defaults(globals())      # the constants above, in order
RENAMED = {"upper_step": "step"}

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import figures  # noqa: E402
import maid  # noqa: E402
from elastic_net import ElasticNetBilevel, make_data, prox_grad_step, run_lista  # noqa: E402
from maid import LowerSolve  # noqa: E402

PROG = "ADP_1D.py"
NAMES = ("IFT", "LISTA", "MAID")
LABELS = {"IFT": "ADP IFT", "LISTA": "ADP LISTA", "MAID": "ADP-MAID"}
COLORS = {"IFT": "tab:blue", "LISTA": "tab:orange", "MAID": "tab:green"}
_MAID_NAMES = dict(eps0="maid_eps0", step0="step", rho="maid_rho", tau="maid_tau", nu="maid_nu",
                   nu_step="maid_nu_step", eta="maid_eta", max_backtracks="maid_max_backtracks",
                   eps_min="maid_eps_min", max_iter="maid_iters", lower_max_iter="maid_lower_max_iter")


def maid_config(cfg: dict) -> maid.MAIDConfig:
    """MAID's parameters (SPEC §3) from the driver's names (``_MAID_NAMES``)."""
    return maid.MAIDConfig(**{f: cfg[k] for f, k in _MAID_NAMES.items()}, descent_check=cfg["maid_descent_check"])


def validate(cfg: dict) -> None:
    """Check every setting (one clear message each) before anything is computed or written."""
    for k in ("n", "ift_steps", "ift_lower_max_iter", "lista_steps", "lista_layers", "maid_iters",
              "maid_max_backtracks", "maid_lower_max_iter", "threads"):
        check(cfg[k] >= 1, f"{k} must be a positive integer, got {cfg[k]}")
    for k in ("h", "noise", "alpha2", "lower_step", "upper_scale", "step", "ift_eps", "maid_eps0",
              "maid_eta", "maid_eps_min", "eval_eps"):
        finite_positive(k, cfg[k], allow_zero=k == "noise")
    finite_positive("alpha1", cfg["alpha1"], allow_zero=True)
    finite_positive("target_rel", cfg["target_rel"], allow_zero=True)
    check(math.isfinite(cfg["h"] * cfg["n"]), f"the grid n·h = {cfg['n']}·{cfg['h']:g} overflows; use a smaller h "
                                              f"(SPEC: 0.01)")
    check(cfg["threads"] <= (os.cpu_count() or 1),
          f"threads must be at most the {os.cpu_count()} CPUs here, got {cfg['threads']}")
    check(math.isfinite(cfg["maid_nu_step"]) and math.isfinite(cfg["maid_nu"]),
          f"maid_nu and maid_nu_step must be finite, got {cfg['maid_nu']}, {cfg['maid_nu_step']}")
    valid_seed(cfg["seed"])
    config.check_writable(cfg["results_dir"])
    try:  # MAID's own checks, in the driver's names
        maid_config(cfg).validate(names=_MAID_NAMES)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# ------------------------------------------------------------------ the paper code's defects (SPEC §5)
class PaperDefects(ElasticNetBilevel):
    """:class:`elastic_net.ElasticNetBilevel` with the paper code's 1D defects as switches.

    ``paper_adjoint``: the paper solves ``(I − DM) v = ∇ₓg`` (``M = I − H``, ``H = BᵀB + α₂I``, ``D``
    the support projection; ``v`` is then zeroed off the support ``S``) where implicit
    differentiation of ``x = S(Mx + c)`` needs ``(I − DM)ᵀ = I − MD``.  Off ``S`` the rows of
    ``I − DM`` are the identity, so ``v_N = (∇ₓg)_N`` and on ``S``
    ``H_SS v_S = (∇ₓg)_S + M_SN (∇ₓg)_N = (∇ₓg)_S − (BᵀB)_SN (∇ₓg)_N``, while the transpose gives
    ``H_SS v_S = (∇ₓg)_S``: the defect is the extra right-hand side ``−P_S BᵀB P_N ∇ₓg``.

    ``paper_stop``: the lower solve stops when ``‖Bx − y + α₁ sign(x) + α₂x‖ ≤ ε``, the paper's
    MAID test without ``Bᵀ`` (the optimality condition is ``Bᵀ(Bx − y) + α₁ξ + α₂x = 0``): its
    left side does not vanish at ``x̂`` (``‖Bx̂ − y‖`` is about the noise level, 0.005·√n ≈ 0.07
    here), so with MAID's ε ≤ 10⁻³ every solve runs to the iteration cap."""

    def __init__(self, *args, paper_adjoint=False, paper_stop=False, **kw):
        super().__init__(*args, **kw)
        self.paper_adjoint, self.paper_stop = paper_adjoint, paper_stop

    def solve_adjoint(self, x, theta, rhs, q0, delta, max_iter):
        if self.paper_adjoint:
            m = self.support(x)
            rhs = rhs - m * (theta.T @ (theta @ ((1 - m) * rhs)))
        return super().solve_adjoint(x, theta, rhs, q0, delta, max_iter)

    def solve_lower(self, theta, x0, eps, max_iter):
        if not self.paper_stop:
            return super().solve_lower(theta, x0, eps, max_iter)
        M, c, lam, _, _ = self.lower_operators(theta)
        x, k, res, ok = x0, 0, math.inf, False
        while k < max_iter and not ok:
            x = prox_grad_step(x, M, c, lam)
            k += 1
            res = torch.linalg.vector_norm(theta @ x - self.y + self.alpha1 * torch.sign(x) + self.alpha2 * x).item()
            ok = res <= eps
        self.solves += 1
        self.uncertified += int(not ok)
        return LowerSolve(x, k, res, ok)


# ------------------------------------------------------------------ the three methods
def _progress(cfg, total, desc):
    bar = tqdm(total=total, desc=desc, disable=not cfg["progress"], mininterval=0.5, dynamic_ncols=True)

    def cb(record, state):
        bar.update(1)
        if record["iter"] % 25 == 0:
            bar.set_postfix(loss=f"{record['upper_loss']:.4g}", refresh=False)

    return bar, cb


def run_ift(cfg: dict, make_problem, A, x0) -> dict:
    """ADP IFT from ``(B, x) = (A, x0)`` (``paper_adjoint`` switches on :class:`PaperDefects`' adjoint)."""
    problem = make_problem(paper_adjoint=cfg["paper_adjoint"])
    bar, cb = _progress(cfg, cfg["ift_steps"], "ADP IFT")
    res = maid.inexact_gradient_descent(problem, A.clone(), x0, eps=cfg["ift_eps"], step=cfg["step"],
                                        max_iter=cfg["ift_steps"], lower_max_iter=cfg["ift_lower_max_iter"],
                                        callback=cb)
    bar.close()
    return dict(B=res.theta, x=res.x, log=res.log, stop=res.stop_reason, solves=problem.solves,
                uncertified=problem.uncertified)


def run_lista_method(cfg: dict, make_problem, A, x0) -> dict:
    """ADP LISTA from ``(B, x) = (A, x0)``; with ``lista_paper_loss`` its logged ``upper_loss`` is
    ``2g`` (the paper's code logs ``‖Ax − y‖²`` for LISTA, ``½‖Ax − y‖²`` for the others; its
    training is unchanged)."""
    bar, cb = _progress(cfg, cfg["lista_steps"], "ADP LISTA")
    B, x, log, stop = run_lista(make_problem(), A.clone(), x0, cfg["lista_steps"], cfg["lista_layers"], cfg["step"],
                                callback=cb)
    bar.close()
    return dict(B=B, x=x, log=paper_lista_log(log) if cfg["lista_paper_loss"] else log, stop=stop, solves=0,
                uncertified=0)


def paper_lista_log(log: list[dict]) -> list[dict]:
    """LISTA's log as the paper's code writes it: ``upper_loss`` = ``‖Ax − y‖²`` = 2g (no ½)."""
    return [dict(r, upper_loss=2 * r["upper_loss"]) for r in log]


def run_maid_method(cfg: dict, make_problem, A, x0) -> dict:
    """ADP-MAID from ``(B, x) = (A, x0)`` (``paper_adjoint`` / ``maid_paper_stop``: :class:`PaperDefects`)."""
    bar, cb = _progress(cfg, cfg["maid_iters"], "ADP-MAID")
    problem = make_problem(paper_adjoint=cfg["paper_adjoint"], paper_stop=cfg["maid_paper_stop"])
    res = maid.maid(problem, A.clone(), x0, maid_config(cfg), callback=cb)
    bar.close()
    return dict(B=res.theta, x=res.x, log=res.log, stop=res.stop_reason, solves=problem.solves,
                uncertified=problem.uncertified)


METHODS = {"IFT": run_ift, "LISTA": run_lista_method, "MAID": run_maid_method}


def run_methods(cfg: dict, make_problem, A, x0) -> dict:
    """``{name: dict(B, x, log, stop, solves, uncertified)}`` for ADP IFT, ADP LISTA and ADP-MAID
    (:data:`METHODS`), each from ``(B, x) = (A, x0)``; ``make_problem(**defects)`` builds
    :class:`PaperDefects` with the switches each method uses."""
    return {name: METHODS[name](cfg, make_problem, A, x0) for name in NAMES}


def ift_target(runs: dict, cfg: dict) -> float:
    """The target loss of the time-to-target columns: IFT's final logged loss × (1 + ``target_rel``)
    (NaN when IFT logged nothing)."""
    ift_final = runs["IFT"]["log"][-1]["upper_loss"] if runs["IFT"]["log"] else math.nan
    return ift_final * (1 + cfg["target_rel"])


def evaluate(runs: dict, problem, x_true, target: float, eval_eps: float) -> None:
    """Add to each run: final loss, totals, reconstruction errors (logged and accurate), and the
    time / lower-level iterations at the first logged loss ≤ ``target``."""
    for r in runs.values():
        log = r["log"]
        last = log[-1] if log else {}
        r["final_loss"] = last.get("upper_loss", math.nan)
        r["time"] = last.get("time", 0.0)
        r["upper_iters"] = len(log)
        r["lower_iters"] = last.get("lower_iters", 0)
        r["cg_iters"] = last.get("cg_iters", 0)
        r["recon_err"] = torch.linalg.vector_norm(r["x"] - x_true).item()
        r["f_accurate"], sol = problem.accurate_upper(r["B"], x0=r["x"], eps=eval_eps)
        r["recon_err_accurate"] = torch.linalg.vector_norm(sol.x - x_true).item()
        hit = next((rec for rec in log if rec["upper_loss"] <= target), None) if math.isfinite(target) else None
        r["time_to_target"] = None if hit is None else hit["time"]
        r["lower_iters_to_target"] = None if hit is None else hit["lower_iters"]
        r["us_per_lower_iter"] = 1e6 * r["time"] / r["lower_iters"] if r["lower_iters"] else math.nan


def _fmt(v, spec=""):
    return "never" if v is None else format(v, spec)


def print_table(cfg, runs, target, f_init) -> None:
    rel = format(cfg["target_rel"], ".0%")
    header = (f"{'method':<10} {'upper it':>8} {'stop':>9} {'final g':>10} {'f(B) acc.':>10} {'‖x−x_true‖':>10} "
              f"{'time [s]':>9} {'lower it':>9} {'µs/lower it':>11} {'uncert./solves':>14} {'CG it':>7} "
              f"{'t→IFT+' + rel:>9} {'it→IFT+' + rel:>10}")
    print()
    print(f"upper loss g = {cfg['upper_scale']:g}·½‖Ax − y‖²; target = IFT's final g × {1 + cfg['target_rel']:g} = "
          f"{target:.6g}; at B = A: f = {f_init:.6g}"
          + ("; LISTA's logged loss is doubled (lista_paper_loss)" if cfg["lista_paper_loss"] else "")
          + ("; paper adjoint (I − DM)" if cfg["paper_adjoint"] else "")
          + ("; MAID's lower test without Bᵀ" if cfg["maid_paper_stop"] else ""))
    print(header)
    print("-" * len(header))
    for name in NAMES:
        r = runs[name]
        print(f"{LABELS[name]:<10} {r['upper_iters']:>8} {r['stop']:>9} {r['final_loss']:>10.5g} {r['f_accurate']:>10.5g} "
              f"{r['recon_err']:>10.4f} {r['time']:>9.2f} {r['lower_iters']:>9} {r['us_per_lower_iter']:>11.1f} "
              f"{str(r['uncertified']) + '/' + str(r['solves']):>14} {r['cg_iters']:>7} "
              f"{_fmt(r['time_to_target'], '.2f'):>9} {_fmt(r['lower_iters_to_target']):>10}")
    print("(final g: last logged loss, inexact lower level; f(B) acc.: lower level solved to "
          f"{cfg['eval_eps']:g}; uncert./solves: lower solves stopped by the iteration cap before the certificate / "
          f"solves run; LISTA: {cfg['lista_layers']} layers per step, each differentiated, so µs/lower it includes the "
          "backward pass; it→IFT+: cumulative lower-level iterations when the target is first reached)")


# ------------------------------------------------------------------ figures
def _signed_heat_map(fig, ax, m, title):
    """``m`` as a heat map with its own symmetric colour scale."""
    v = m.abs().max().item() or 1.0
    im = ax.imshow(m.numpy(), cmap="RdBu_r", vmin=-v, vmax=v)
    ax.set_title(title)
    ax.set_xlabel("column j")
    ax.set_ylabel("row i")
    fig.colorbar(im, ax=ax, shrink=0.8)


def reconstructions_figure(out_dir, t_grid, x_true, y, x_init, err_init, runs):
    tt = t_grid.numpy()
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True)
    ax = axes[0, 0]
    ax.plot(tt, x_true.numpy(), "k", lw=2, label="truth $x$")
    ax.plot(tt, y.numpy(), ".", color="gray", ms=3, label="data $y$")
    ax.plot(tt, x_init.numpy(), "--", color="tab:red", lw=1.2, label=f"elastic net, $B=A$ (error {err_init:.3f})")
    ax.set_title("truth, noisy data and the elastic net with $B = A$")
    ax.legend(fontsize=8)
    for ax, name in zip(axes.flat[1:], NAMES):
        r = runs[name]
        ax.plot(tt, x_true.numpy(), "k", lw=1.5, label="truth")
        ax.plot(tt, r["x"].numpy(), color=COLORS[name], lw=1.5, label=LABELS[name])
        ax.set_title(f"{LABELS[name]}: $\\|x - x_{{true}}\\| = {r['recon_err']:.3f}$")
        ax.legend(fontsize=8)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("t")
    fig.suptitle("1D ADP: reconstructions")
    fig.tight_layout()
    figures.save_figure(fig, os.path.join(out_dir, "reconstructions.png"))


def operators_figure(out_dir, A, runs):
    mats = [("A (known)", A)] + [(f"B, {LABELS[k]}", runs[k]["B"]) for k in NAMES]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8.5), layout="constrained")
    for ax, (title, m) in zip(axes[0], mats):
        _signed_heat_map(fig, ax, m, title)
    ax = axes[1, 0]
    mid = A.shape[0] // 2
    ax.plot(A[mid].numpy(), "k", lw=2, label="A")
    for k in NAMES:
        ax.plot(runs[k]["B"][mid].numpy(), color=COLORS[k], lw=1, label=LABELS[k])
    ax.set_title(f"row {mid} of A and of each B")
    ax.set_xlabel("column j")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for ax, k in zip(axes[1, 1:], NAMES):
        d = runs[k]["B"] - A
        _signed_heat_map(fig, ax, d, f"B − A, {LABELS[k]} (‖B − A‖_F = {torch.linalg.matrix_norm(d).item():.3g})")
    fig.suptitle("forward operator A and the learned operators B (top), B − A (bottom); own colour scale per panel")
    figures.save_figure(fig, os.path.join(out_dir, "operators.png"))


def loss_figures(out_dir, cfg, runs, target):
    ylabel = f"upper loss $g = {cfg['upper_scale']:g}\\cdot\\frac{{1}}{{2}}\\|Ax - y\\|^2$ (log)"
    for xkey, xlabel, fname in (("time", "wall time [s] (log)", "loss_vs_time.png"),
                                ("lower_iters", "cumulative lower-level iterations (log)", "loss_vs_lower_iters.png")):
        fig, ax = plt.subplots(figsize=(8, 5))
        for k in NAMES:
            log = runs[k]["log"]
            label = f"{LABELS[k]} ({len(log)} upper it.)"
            if k == "LISTA" and cfg["lista_paper_loss"]:
                label += ", logged ×2 (paper)"
            ax.plot([rec[xkey] for rec in log], [rec["upper_loss"] for rec in log], color=COLORS[k], lw=1.3,
                    label=label)
        if math.isfinite(target):
            ax.axhline(target, color="gray", ls="--", lw=1, label=f"IFT final loss + {cfg['target_rel']:.0%}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title("upper loss against " + ("wall time" if xkey == "time" else "lower-level iterations"))
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        figures.save_figure(fig, os.path.join(out_dir, fname))


# ------------------------------------------------------------------ the run
def run(cfg: dict | None = None, **overrides) -> dict:
    """The 1D comparison; returns the summary (also written to ``summary.json``) with
    ``out_dir`` added.  Raises :class:`config.ConfigError` on bad input before anything is written.
    Sets torch's thread count and default dtype (float64) for the run and restores them after."""
    cfg = config.resolve(DEFAULTS, {**(cfg or {}), **overrides}, RENAMED)
    validate(cfg)
    out_dir = config.make_run_dir(cfg["results_dir"], "1d_" + time.strftime("%Y%m%d-%H%M%S"))
    saved_threads, saved_dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(cfg["threads"])
    torch.set_default_dtype(torch.float64)
    try:
        return _run(cfg, out_dir)
    finally:
        torch.set_num_threads(saved_threads)
        torch.set_default_dtype(saved_dtype)


def setup(cfg: dict):
    """``(t_grid, x_true, A, y, x0, make_problem)``: the data of SPEC §4.1 and a constructor of the
    shared lower level (``make_problem(paper_adjoint=…, paper_stop=…)`` → :class:`PaperDefects`)."""
    t_grid, x_true, A, y = make_data(cfg["n"], cfg["h"], cfg["noise"], cfg["seed"])

    def make_problem(**defects):
        return PaperDefects(A, y, cfg["alpha1"], cfg["alpha2"], cfg["lower_step"], x_true=x_true,
                            scale=cfg["upper_scale"], **defects)

    return t_grid, x_true, A, y, torch.zeros(cfg["n"]), make_problem


def _run(cfg: dict, out_dir: str) -> dict:
    t_grid, x_true, A, y, x0, make_problem = setup(cfg)
    for k, v in cfg.items():
        if v != DEFAULTS[k]:
            print(f"override: {k} = {v!r}")
    problem = make_problem()
    f_init, sol_init = problem.accurate_upper(A, eps=cfg["eval_eps"])
    err_init = torch.linalg.vector_norm(sol_init.x - x_true).item()   # ‖x̂(A) − x_true‖
    print(f"data: n={cfg['n']}, noise={cfg['noise']}, seed={cfg['seed']}; g = {cfg['upper_scale']:g}·½‖Ax − y‖²; "
          f"f(A) = {f_init:.6g}, ‖x̂(A) − x_true‖ = {err_init:.4f}")
    print(f"results: {out_dir}")

    runs = run_methods(cfg, make_problem, A, x0)
    target = ift_target(runs, cfg)
    evaluate(runs, problem, x_true, target, cfg["eval_eps"])
    print_table(cfg, runs, target, f_init)

    for name in NAMES:  # written to a temporary name and renamed (figures.save_*): never half-written
        figures.save_json(os.path.join(out_dir, f"log_{name}.json"), runs[name]["log"])
        if runs[name]["log"]:
            figures.save_csv(os.path.join(out_dir, f"log_{name}.csv"), runs[name]["log"])
    overrides = {k: v for k, v in cfg.items() if v != DEFAULTS[k]}
    summary = dict(config=cfg, overrides=overrides, f_init=f_init, target=target,
                   maid_config=maid.config_dict(maid_config(cfg)),
                   methods={k: {kk: vv for kk, vv in runs[k].items() if kk not in ("B", "x", "log")} for k in NAMES})
    figures.save_json(os.path.join(out_dir, "summary.json"), summary)
    if cfg["save_operators"]:
        figures.save_torch(os.path.join(out_dir, "operators.pt"),
                           {k: dict(B=runs[k]["B"], x=runs[k]["x"]) for k in NAMES} | dict(A=A, y=y, x_true=x_true))
    reconstructions_figure(out_dir, t_grid, x_true, y, sol_init.x, err_init, runs)
    operators_figure(out_dir, A, runs)
    loss_figures(out_dir, cfg, runs, target)
    print(f"wrote {out_dir}: reconstructions.png, operators.png, loss_vs_time.png, loss_vs_lower_iters.png, "
          "log_*.json/csv, summary.json" + (", operators.pt" if cfg["save_operators"] else ""))
    print("time_to_IFT_loss " + " ".join(f"{k}={_fmt(runs[k]['time_to_target'], '.2f')}"
                                         for k in ("MAID", "IFT", "LISTA")))
    return dict(summary, out_dir=out_dir)


def main(argv: list[str]) -> int:
    try:
        _, explicit = config.parse_argv(DEFAULTS, argv, RENAMED)
        run(explicit)
    except ConfigError as e:
        config.fail(PROG, e)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
