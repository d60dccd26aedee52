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
``--name=value``, e.g. ``python ADP_1D.py --ift_steps=2000 --upper_scale=0.01``.  Writes a new
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
upper_step = 0.1           # IFT and LISTA step, MAID's initial step α₀
# ADP IFT
ift_steps = 7500           # upper steps (paper's budget)
ift_eps = 1e-6             # lower-level accuracy ε (certificate) and CG residual δ
ift_lower_max_iter = 500   # lower-level iterations per upper step, at most
# ADP LISTA
lista_steps = 4000         # SGD steps (paper's budget)
lista_layers = 50          # unrolled proximal-gradient layers per step
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
# ------------------------------------------------------------------


from config import (ConfigError, apply_overrides, check, fail, finite_positive, make_run_dir,  # noqa: E402
                    setting_names, valid_seed)

_CONFIG_NAMES = setting_names(globals())   # the constants above, in order
try:
    _overrides = apply_overrides(globals(), sys.argv[1:], _CONFIG_NAMES)
except ConfigError as _e:
    fail("ADP_1D.py", _e)
_config = {k: globals()[k] for k in _CONFIG_NAMES}
for _k, _v in _overrides.items():
    print(f"override: {_k} = {_v!r}")
try:
    for _k in ("n", "ift_steps", "ift_lower_max_iter", "lista_steps", "lista_layers", "maid_iters",
               "maid_max_backtracks", "maid_lower_max_iter", "threads"):
        check(_config[_k] >= 1, f"{_k} must be a positive integer, got {_config[_k]}")
    for _k in ("h", "noise", "alpha2", "lower_step", "upper_scale", "upper_step", "ift_eps", "maid_eps0",
               "maid_eta", "maid_eps_min", "eval_eps"):
        finite_positive(_k, _config[_k], allow_zero=_k == "noise")
    finite_positive("alpha1", alpha1, allow_zero=True)
    finite_positive("target_rel", target_rel, allow_zero=True)
    check(math.isfinite(h * n), f"the grid n·h = {n}·{h:g} overflows; use a smaller h (SPEC: 0.01)")
    check(threads <= (os.cpu_count() or 1), f"threads must be at most the {os.cpu_count()} CPUs here, got {threads}")
    valid_seed(seed)
except ConfigError as _e:
    fail("ADP_1D.py", _e)

# ------------------------------------------------------------------ setup
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import figures  # noqa: E402
import maid  # noqa: E402
from elastic_net import ElasticNetBilevel, make_data, run_lista  # noqa: E402

cfg = maid.MAIDConfig(eps0=maid_eps0, step0=upper_step, rho=maid_rho, tau=maid_tau, nu=maid_nu,
                      nu_step=maid_nu_step, eta=maid_eta, max_backtracks=maid_max_backtracks,
                      eps_min=maid_eps_min, max_iter=maid_iters, lower_max_iter=maid_lower_max_iter,
                      descent_check=maid_descent_check)
try:  # check MAID's settings before spending minutes on IFT and LISTA
    cfg.validate(names=dict(eps0="maid_eps0", step0="upper_step", rho="maid_rho", tau="maid_tau", nu="maid_nu",
                            nu_step="maid_nu_step", eta="maid_eta", max_backtracks="maid_max_backtracks",
                            eps_min="maid_eps_min", max_iter="maid_iters", lower_max_iter="maid_lower_max_iter"))
except ValueError as _e:
    fail("ADP_1D.py", _e)
torch.set_num_threads(threads)
torch.set_default_dtype(torch.float64)

try:  # a new folder, never an existing one
    out_dir = make_run_dir(results_dir, "1d_" + time.strftime("%Y%m%d-%H%M%S"))
except ConfigError as _e:
    fail("ADP_1D.py", _e)

t_grid, x_true, A, y = make_data(n, h, noise, seed)
x0 = torch.zeros(n)


def make_problem(**kw):
    return ElasticNetBilevel(A, y, alpha1, alpha2, lower_step, x_true=x_true, scale=upper_scale, **kw)


problem = make_problem()
f_init, sol_init = problem.accurate_upper(A, eps=eval_eps)
err_init = torch.linalg.vector_norm(sol_init.x - x_true).item()   # ‖x̂(A) − x_true‖
print(f"data: n={n}, noise={noise}, seed={seed}; g = {upper_scale:g}·½‖Ax − y‖²; "
      f"f(A) = {f_init:.6g}, ‖x̂(A) − x_true‖ = {err_init:.4f}")
print(f"results: {out_dir}")


def progress_callback(total, desc):
    bar = tqdm(total=total, desc=desc, disable=not progress, mininterval=0.5, dynamic_ncols=True)

    def cb(record, state):
        bar.update(1)
        if record["iter"] % 25 == 0:
            bar.set_postfix(loss=f"{record['upper_loss']:.4g}", refresh=False)

    return bar, cb


runs = {}  # name -> dict(B, x, log, stop)

# ------------------------------------------------------------------ ADP IFT
ift_problem = make_problem()
bar, cb = progress_callback(ift_steps, "ADP IFT")
res = maid.inexact_gradient_descent(ift_problem, A.clone(), x0, eps=ift_eps, step=upper_step, max_iter=ift_steps,
                                    lower_max_iter=ift_lower_max_iter, callback=cb)
bar.close()
runs["IFT"] = dict(B=res.theta, x=res.x, log=res.log, stop=res.stop_reason,
                  solves=ift_problem.solves, uncertified=ift_problem.uncertified)

# ------------------------------------------------------------------ ADP LISTA
bar, cb = progress_callback(lista_steps, "ADP LISTA")
B, x, log, stop = run_lista(problem, A.clone(), x0, lista_steps, lista_layers, upper_step, callback=cb)
bar.close()
runs["LISTA"] = dict(B=B, x=x, log=log, stop=stop, solves=0, uncertified=0)

# ------------------------------------------------------------------ ADP-MAID
bar, cb = progress_callback(maid_iters, "ADP-MAID")
maid_problem = make_problem()
res = maid.maid(maid_problem, A.clone(), x0, cfg, callback=cb)
bar.close()
runs["MAID"] = dict(B=res.theta, x=res.x, log=res.log, stop=res.stop_reason,
                   solves=maid_problem.solves, uncertified=maid_problem.uncertified)

# ------------------------------------------------------------------ evaluation
names = ["IFT", "LISTA", "MAID"]
labels = {"IFT": "ADP IFT", "LISTA": "ADP LISTA", "MAID": "ADP-MAID"}
colors = {"IFT": "tab:blue", "LISTA": "tab:orange", "MAID": "tab:green"}
ift_final = runs["IFT"]["log"][-1]["upper_loss"] if runs["IFT"]["log"] else math.nan
target = ift_final * (1 + target_rel)
for name in names:
    r = runs[name]
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


def fmt_time(t):
    return "never" if t is None else f"{t:.2f}"


def fmt_count(n):
    return "never" if n is None else str(n)


header = (f"{'method':<10} {'upper it':>8} {'stop':>9} {'final g':>10} {'f(B) acc.':>10} {'‖x−x_true‖':>10} "
          f"{'time [s]':>9} {'lower it':>9} {'µs/lower it':>11} {'uncert./solves':>14} {'CG it':>7} "
          f"{'t→IFT+' + format(target_rel, '.0%'):>9} {'it→IFT+' + format(target_rel, '.0%'):>10}")
print()
print(f"upper loss g = {upper_scale:g}·½‖Ax − y‖²; target = IFT's final g × {1 + target_rel:g} = {target:.6g}; "
      f"at B = A: f = {f_init:.6g}")
print(header)
print("-" * len(header))
for name in names:
    r = runs[name]
    print(f"{labels[name]:<10} {r['upper_iters']:>8} {r['stop']:>9} {r['final_loss']:>10.5g} {r['f_accurate']:>10.5g} "
          f"{r['recon_err']:>10.4f} {r['time']:>9.2f} {r['lower_iters']:>9} {r['us_per_lower_iter']:>11.1f} "
          f"{str(r['uncertified']) + '/' + str(r['solves']):>14} {r['cg_iters']:>7} {fmt_time(r['time_to_target']):>9} "
          f"{fmt_count(r['lower_iters_to_target']):>10}")
print("(final g: last logged loss, inexact lower level; f(B) acc.: lower level solved to "
      f"{eval_eps:g}; uncert./solves: lower solves stopped by the iteration cap before the certificate / solves run; LISTA: {lista_layers} layers per step, "
      "each differentiated, so µs/lower it includes the backward pass; it→IFT+: cumulative lower-level iterations when "
      "the target is first reached)")

# ------------------------------------------------------------------ logs
for name in names:  # written to a temporary name and renamed (figures.save_*): never half-written
    figures.save_json(os.path.join(out_dir, f"log_{name}.json"), runs[name]["log"])
    if runs[name]["log"]:
        figures.save_csv(os.path.join(out_dir, f"log_{name}.csv"), runs[name]["log"])
summary = dict(config=_config, overrides=_overrides, f_init=f_init, target=target, maid_config=maid.config_dict(cfg),
               methods={k: {kk: vv for kk, vv in runs[k].items() if kk not in ("B", "x", "log")} for k in names})
figures.save_json(os.path.join(out_dir, "summary.json"), summary)
figures.save_torch(os.path.join(out_dir, "operators.pt"),
                   {k: dict(B=runs[k]["B"], x=runs[k]["x"]) for k in names} | dict(A=A, y=y, x_true=x_true))

# ------------------------------------------------------------------ figures
tt = t_grid.numpy()
fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True)
ax = axes[0, 0]
ax.plot(tt, x_true.numpy(), "k", lw=2, label="truth $x$")
ax.plot(tt, y.numpy(), ".", color="gray", ms=3, label="data $y$")
ax.plot(tt, sol_init.x.numpy(), "--", color="tab:red", lw=1.2,
        label=f"elastic net, $B=A$ (error {err_init:.3f})")
ax.set_title("truth, noisy data and the elastic net with $B = A$")
ax.legend(fontsize=8)
for ax, name in zip(axes.flat[1:], names):
    r = runs[name]
    ax.plot(tt, x_true.numpy(), "k", lw=1.5, label="truth")
    ax.plot(tt, r["x"].numpy(), color=colors[name], lw=1.5, label=labels[name])
    ax.set_title(f"{labels[name]}: $\\|x - x_{{true}}\\| = {r['recon_err']:.3f}$")
    ax.legend(fontsize=8)
for ax in axes.flat:
    ax.grid(alpha=0.3)
for ax in axes[1]:
    ax.set_xlabel("t")
fig.suptitle("1D ADP: reconstructions")
fig.tight_layout()
figures.save_figure(fig, os.path.join(out_dir, "reconstructions.png"))



def signed_heat_map(fig, ax, m, title):
    """``m`` as a heat map with its own symmetric colour scale."""
    v = m.abs().max().item() or 1.0
    im = ax.imshow(m.numpy(), cmap="RdBu_r", vmin=-v, vmax=v)
    ax.set_title(title)
    ax.set_xlabel("column j")
    ax.set_ylabel("row i")
    fig.colorbar(im, ax=ax, shrink=0.8)


mats = [("A (known)", A)] + [(f"B, {labels[k]}", runs[k]["B"]) for k in names]
fig, axes = plt.subplots(2, 4, figsize=(18, 8.5), layout="constrained")
for ax, (title, m) in zip(axes[0], mats):
    signed_heat_map(fig, ax, m, title)
ax = axes[1, 0]
mid = n // 2
ax.plot(A[mid].numpy(), "k", lw=2, label="A")
for k in names:
    ax.plot(runs[k]["B"][mid].numpy(), color=colors[k], lw=1, label=labels[k])
ax.set_title(f"row {mid} of A and of each B")
ax.set_xlabel("column j")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
for ax, k in zip(axes[1, 1:], names):
    d = runs[k]["B"] - A
    signed_heat_map(fig, ax, d, f"B − A, {labels[k]} (‖B − A‖_F = {torch.linalg.matrix_norm(d).item():.3g})")
fig.suptitle("forward operator A and the learned operators B (top), B − A (bottom); own colour scale per panel")
figures.save_figure(fig, os.path.join(out_dir, "operators.png"))

for xkey, xlabel, fname in (("time", "wall time [s] (log)", "loss_vs_time.png"),
                            ("lower_iters", "cumulative lower-level iterations (log)", "loss_vs_lower_iters.png")):
    fig, ax = plt.subplots(figsize=(8, 5))
    for k in names:
        log = runs[k]["log"]
        xs = [rec[xkey] for rec in log]
        ys = [rec["upper_loss"] for rec in log]
        ax.plot(xs, ys, color=colors[k], lw=1.3, label=f"{labels[k]} ({len(log)} upper it.)")
    if math.isfinite(target):
        ax.axhline(target, color="gray", ls="--", lw=1, label=f"IFT final loss + {target_rel:.0%}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"upper loss $g = {upper_scale:g}\\cdot\\frac{{1}}{{2}}\\|Ax - y\\|^2$ (log)")
    ax.set_title("upper loss against " + ("wall time" if xkey == "time" else "lower-level iterations"))
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    figures.save_figure(fig, os.path.join(out_dir, fname))

print(f"wrote {out_dir}: reconstructions.png, operators.png, loss_vs_time.png, loss_vs_lower_iters.png, "
      "log_*.json/csv, summary.json, operators.pt")
print(f"time_to_IFT_loss MAID={fmt_time(runs['MAID']['time_to_target'])} IFT={fmt_time(runs['IFT']['time_to_target'])} "
      f"LISTA={fmt_time(runs['LISTA']['time_to_target'])}")
