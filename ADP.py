"""ADP-β solved with MAID: blind / semi-blind colour deblurring (SPEC §4.2).

    python ADP.py                              # defaults below
    python ADP.py --setting=semiblind --image=coffee
    python ADP.py --resume=Results/<run>/checkpoint.pt

Every constant below can be overridden with --name=value.  The script then reads top to
bottom: check the configuration, make the data, solve the TV baseline with the known kernel
b₀, run MAID on the kernel, write figures and logs into a new folder under results_dir.
"""
import math
import os
import shutil
import signal
import sys
import time

# ------------------------------------------------------------------------------------------
# configuration (override any of these with --name=value)
# ------------------------------------------------------------------------------------------
# data
image = "astronaut"        # bundled sample in images/ (astronaut, coffee, chelsea, rocket) or a PNG/JPEG path
size_x = 256               # image width after resizing (pixels)
size_y = 256               # image height after resizing (pixels)
channels = 3               # 3: colour, 1: grey
setting = "motion"         # motion | gaussian | disc | semiblind
kernel_size = 5            # odd kernel size k
blur_sigma = 1.0           # σ of the 'gaussian' setting
semiblind_sigma = 0.5      # σ of the unknown extra Gaussian in the 'semiblind' setting
noise_level = 5 / 255      # standard deviation of the Gaussian noise
seed = 0                   # seed of the noise
# lower level  h(x, b) = ½‖B_b x − y‖² + tv_weight R_γ(x) + (mu0/2)‖x‖²
tv_weight = 0.005          # α, weight of the smoothed TV (grid search, see README)
tv_smoothing = 0.01        # γ in R_γ(x) = Σ sqrt(|∇x|² + γ²) (grid search)
mu0 = 1e-2                 # μ₀, Tikhonov term making h strongly convex for every kernel
lower_solver = "fista"     # fista | agd
lower_iter = 3000          # cap on lower-level iterations per solve (hits are counted and reported)
# upper level  g(x, b) = ‖A_up x − y‖²/n + beta ‖b − b₀‖²_{H¹}
beta = 0.1                 # β, weight of the H¹ kernel penalty (grid search, see README)
upper_operator = "learned"  # learned: A_up = B_b (the paper's 2D choice) | known: A_up = B_{b₀}
# MAID
upper_iter = 40            # maximum number of upper iterations
alpha = 1.0                # initial upper-level step size α₀
eps0 = 1e-2                # initial lower-level accuracy ε₀ (‖x̃ − x̂‖ ≤ ε, Euclidean norm over all pixels)
delta0 = 1e-6              # initial CG accuracy δ₀ (absolute residual norm; ‖∇ₓg‖ ≈ 1e-4 here); scaled with ε afterwards
threshold = 1e-3           # MAID stops when ε < threshold
rho = 0.5                  # backtracking factor ρ
tau = 0.5                  # accuracy decrease τ after a failed line search
nu = 1.05                  # accuracy increase ν after a success
nu_alpha = 10 / 9          # step increase ν_α after a success
eta = 1e-4                 # sufficient-decrease constant η
backtracks = 5             # at most this many step sizes per line search
cg_iter = 200              # cap on CG iterations per linear solve
descent_check = False      # tighten ε until ω ≤ (1−η)‖z‖ (worst-case ω is far above ‖z‖ here; see README)
baseline_eps = 1e-2        # accuracy of the TV baseline with b₀ ("solved to convergence")
# output and machine
results_dir = "Results"    # a new folder is made inside for every run
device = "auto"            # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
dtype = "float64"          # float64 | float32 (float32: ‖∇h‖ stalls near 1e-5, solves hit lower_iter; see README)
resume = ""                # path to a checkpoint.pt (or its run folder) to continue an interrupted run
# ------------------------------------------------------------------------------------------
_PROG = "ADP.py"
_IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "images")
_MIN_SIZE = 11             # SSIM's Gaussian window (σ = 1.5) is 11×11
_RUN_LOCAL = ("results_dir", "device", "resume")        # never taken from a checkpoint's saved config
_RESUME_OVERRIDES = _RUN_LOCAL + ("upper_iter",)        # what a resumed run may change

from config import (ConfigError, apply_overrides, check, fail, finite_positive, make_run_dir,  # noqa: E402
                    setting_names, valid_seed)

_CONFIG_NAMES = setting_names(globals())   # the constants above, in order

try:
    _overrides = apply_overrides(globals(), sys.argv[1:], _CONFIG_NAMES)
except ConfigError as e:
    fail(_PROG, e)

# Ctrl-C must raise KeyboardInterrupt even if the parent started us with SIGINT ignored
# (as a non-interactive shell does for background jobs): the MAID loop turns it into a checkpoint.
signal.signal(signal.SIGINT, signal.default_int_handler)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import figures  # noqa: E402
from adp_problem import UPPER_OPERATORS, ADPBetaProblem  # noqa: E402
from lower_level import SOLVERS, solve_lower  # noqa: E402
from maid import MAIDConfig, MAIDState, maid  # noqa: E402
from imaging import make_data, psnr_ssim, resolve_device  # noqa: E402

SETTINGS = ("motion", "gaussian", "disc", "semiblind")


def current_config() -> dict:
    return {k: globals()[k] for k in _CONFIG_NAMES}


def validate(cfg: dict) -> None:
    """Check every setting before anything is computed or written (one clear message each)."""
    check(cfg["setting"] in SETTINGS, f"unknown setting {cfg['setting']!r}; use one of {', '.join(SETTINGS)}")
    check(cfg["kernel_size"] > 0 and cfg["kernel_size"] % 2 == 1,
          f"kernel_size must be a positive odd integer, got {cfg['kernel_size']} (try --kernel_size=5)")
    check(cfg["size_x"] >= _MIN_SIZE and cfg["size_y"] >= _MIN_SIZE,
          f"image size must be at least {_MIN_SIZE}×{_MIN_SIZE} (the SSIM window), got size_x={cfg['size_x']}, "
          f"size_y={cfg['size_y']}")
    valid_seed(cfg["seed"])
    check(cfg["kernel_size"] <= min(cfg["size_x"], cfg["size_y"]),
          f"kernel_size={cfg['kernel_size']} is larger than the image ({cfg['size_y']}×{cfg['size_x']}); "
          f"use a smaller kernel or a larger image")
    check(cfg["channels"] in (1, 3), f"channels must be 1 (grey) or 3 (colour), got {cfg['channels']}")
    finite_positive("noise_level", cfg["noise_level"], allow_zero=True)
    for name in ("tv_weight", "tv_smoothing", "beta", "eps0", "delta0", "alpha", "threshold", "eta",
                 "baseline_eps", "blur_sigma", "semiblind_sigma"):
        finite_positive(name, cfg[name])
    check(math.isfinite(cfg["mu0"]) and cfg["mu0"] > 0,
          f"mu0 must be a positive finite number, got {cfg['mu0']!r}: h is μ₀-strongly convex only through it "
          f"(the kernel's spectrum can vanish, e.g. the 5×5 motion kernel's at 320×240); try --mu0=1e-2")
    for name in ("rho", "tau"):
        check(0 < cfg[name] < 1, f"{name} must lie strictly between 0 and 1, got {cfg[name]}")
    for name in ("nu", "nu_alpha"):
        check(cfg[name] >= 1, f"{name} must be ≥ 1, got {cfg[name]}")
    for name in ("upper_iter", "lower_iter", "cg_iter", "backtracks"):
        check(cfg[name] >= 1, f"{name} must be a positive integer, got {cfg[name]}")
    check(cfg["upper_operator"] in UPPER_OPERATORS,
          f"unknown upper_operator {cfg['upper_operator']!r}; use one of {', '.join(UPPER_OPERATORS)}")
    check(cfg["lower_solver"] in SOLVERS, f"unknown lower_solver {cfg['lower_solver']!r}; use one of {', '.join(SOLVERS)}")
    check(cfg["dtype"] in ("float32", "float64"), f"dtype must be float32 or float64, got {cfg['dtype']!r}")


# ------------------------------------------------------------------------------------------
# 1. configuration, checkpoint, data
# ------------------------------------------------------------------------------------------
try:
    _t_start = time.perf_counter()
    _checkpoint = None
    if resume:
        _path = os.path.join(resume, "checkpoint.pt") if os.path.isdir(resume) else resume
        check(os.path.isfile(_path), f"no checkpoint at {resume!r}; give the checkpoint.pt of an interrupted run")
        try:
            _checkpoint = torch.load(_path, map_location="cpu", weights_only=False)
            _saved = _checkpoint["config"]
            if not (isinstance(_saved, dict) and isinstance(_checkpoint.get("state"), dict)):
                raise TypeError("no config/state dictionaries")
        except Exception as e:  # noqa: BLE001  (any unreadable file)
            raise ConfigError(f"{_path!r} is not a readable ADP.py checkpoint ({type(e).__name__}); give the "
                              f"checkpoint.pt that ADP.py wrote")
        _other = sorted(set(_overrides) - set(_RESUME_OVERRIDES))
        check(not _other, f"--resume continues a run with its saved settings; only "
                          f"{', '.join('--' + k for k in _RESUME_OVERRIDES)} may be given with it, not "
                          f"{', '.join('--' + k for k in _other)} (start a new run to change them)")
        globals().update({k: v for k, v in _saved.items() if k not in _RUN_LOCAL and k not in _overrides})
    cfg = current_config()
    validate(cfg)
    dev = resolve_device(device, dtype)
    dt = getattr(torch, dtype)
    try:
        x_true, b0, y = make_data(cfg, _IMAGES, dev, dt)
    except ValueError as e:                       # e.g. a kernel that is not finite in this dtype
        raise ConfigError(f"cannot build the data: {e}") from None
    run_dir = make_run_dir(results_dir, time.strftime("%Y%m%d-%H%M%S") + f"_{setting}_{os.path.splitext(os.path.basename(image))[0]}")
except ConfigError as e:
    fail(_PROG, e)

print(f"ADP-β-MAID: {setting} blur, {os.path.basename(image)} {channels}×{size_y}×{size_x}, σ = {noise_level:.4g}, "
      f"device {dev}, {dtype}, {torch.get_num_threads()} threads")
figures.save_json(os.path.join(run_dir, "config.json"),
                  dict(cfg, device_resolved=str(dev), resumed_from=resume or None, torch=torch.__version__))


def metrics(x):
    p, s = psnr_ssim(x, x_true)
    return {"psnr": p, "ssim": s}


# ------------------------------------------------------------------------------------------
# 2. the fair baseline: TV with the known kernel b₀, solved to convergence
# ------------------------------------------------------------------------------------------
problem = ADPBetaProblem(y, b0, tv_weight, tv_smoothing, beta, mu0, upper_operator, solver=lower_solver,
                         metrics_fn=metrics)
_t0 = time.perf_counter()
try:
    base = solve_lower(problem.lower(b0), y.clone(), baseline_eps, 10 * lower_iter, lower_solver)
except KeyboardInterrupt:
    print(f"interrupted during the TV baseline, before MAID started: nothing to resume ({run_dir} holds "
          f"only config.json)", file=sys.stderr)
    sys.exit(130)
_t_base = time.perf_counter() - _t0
if base.status == "non_finite":   # nothing worth keeping: remove the run folder made above (config.json only)
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"ADP.py: error: the TV baseline met NaN/Inf after {base.iters} iterations; check tv_weight, tv_smoothing "
          f"and mu0 (and the image)", file=sys.stderr)
    sys.exit(1)
if not base.converged:
    print(f"warning: TV baseline hit its iteration cap ({base.iters}) with ‖∇h‖ = {base.grad_norm:.3g} "
          f"> μ ε = {problem.lower(b0).mu * baseline_eps:.3g}", file=sys.stderr)
x_tv = base.x

# ------------------------------------------------------------------------------------------
# 3. ADP-β-MAID on the kernel b
# ------------------------------------------------------------------------------------------
maid_cfg = MAIDConfig(eps0=eps0, delta0=delta0, step0=alpha, rho=rho, tau=tau, nu=nu, nu_step=nu_alpha, eta=eta,
                      max_backtracks=backtracks, eps_min=threshold, max_iter=upper_iter, lower_max_iter=lower_iter,
                      cg_max_iter=cg_iter, descent_check=descent_check)
state = None
if _checkpoint is not None:
    s = _checkpoint["state"]
    state = MAIDState(**{k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in s.items()})
last_good = {}


def checkpoint_payload(st: MAIDState) -> dict:
    return {"config": cfg, "state": {k: (v.detach().cpu() if torch.is_tensor(v) else v)
                                     for k, v in vars(st).items()}}


bar = tqdm(total=upper_iter, initial=0 if state is None else state.k, desc="MAID", unit="it", dynamic_ncols=True)


def on_iteration(rec, st):
    """Progress bar, and a copy of the state after each completed iteration (for Ctrl-C)."""
    last_good["payload"] = checkpoint_payload(st)
    bar.update(1)
    bar.set_postfix(loss=f"{rec['upper_loss']:.4g}", psnr=f"{rec['psnr']:.2f}", eps=f"{rec['eps']:.2g}",
                    step=f"{rec['step']:.2g}", acc="y" if rec["accepted"] else "n")


interrupted = False
try:
    result = maid(problem, b0.clone(), y.clone(), maid_cfg, state=state, callback=on_iteration)
    log, b_star, x_adp, stop_reason = result.log, result.theta, result.x, result.stop_reason
    final_payload = checkpoint_payload(result.state)
except KeyboardInterrupt:
    interrupted = True
    final_payload = last_good.get("payload") or checkpoint_payload(
        state or MAIDState(b0.clone(), y.clone(), None, eps0, delta0, alpha))
    s = final_payload["state"]
    log, b_star, x_adp, stop_reason = s["log"], s["theta"].to(dev), s["x"].to(dev), "interrupted"
bar.close()
if stop_reason == "non_finite":
    print("warning: MAID met a NaN/Inf (iterate, loss or hypergradient) and stopped; the outputs hold the "
          "last finite kernel and reconstruction", file=sys.stderr)

# ------------------------------------------------------------------------------------------
# 4. outputs
# ------------------------------------------------------------------------------------------
scores = {"blurry": psnr_ssim(y, x_true), "TV (b₀)": psnr_ssim(x_tv, x_true), "ADP-β-MAID": psnr_ssim(x_adp, x_true)}
figures.save_csv(os.path.join(run_dir, "log.csv"), log)
figures.save_torch(os.path.join(run_dir, "kernel.pt"), {"b_star": b_star.cpu(), "b0": b0.cpu()})
figures.save_torch(os.path.join(run_dir, "checkpoint.pt"), final_payload)
figures.comparison_figure([("ground truth", x_true)] + [(f"{k}\nPSNR {p:.2f} dB, SSIM {s:.3f}", x)
                          for (k, (p, s)), x in zip(scores.items(), (y, x_tv, x_adp))],
                          os.path.join(run_dir, "comparison.png"))
figures.kernel_figure(b0, b_star, os.path.join(run_dir, "kernels.png"))
if log:
    figures.convergence_figure(log, os.path.join(run_dir, "convergence.png"))
    figures.iterations_figure(log, os.path.join(run_dir, "iterations.png"), baseline_psnr=scores["TV (b₀)"][0])
_total = time.perf_counter() - _t_start
summary = {"scores": {k: {"psnr": p, "ssim": s} for k, (p, s) in scores.items()}, "stop_reason": stop_reason,
           "upper_iterations": len(log), "accepted": sum(r["accepted"] for r in log),
           "lower_iterations": log[-1]["lower_iters"] if log else 0, "cg_iterations": log[-1]["cg_iters"] if log else 0,
           "lower_cap_hits": log[-1]["lower_cap_hits"] if log else 0,
           "cg_cap_hits": log[-1]["cg_cap_hits"] if log else 0, "baseline_iterations": base.iters,
           "baseline_seconds": _t_base, "maid_seconds": log[-1]["time"] if log else 0.0, "total_seconds": _total}
figures.save_json(os.path.join(run_dir, "summary.json"), summary)

print(f"\n{'':12s} {'PSNR [dB]':>10s} {'SSIM':>7s}")
for k, (p, s) in scores.items():
    print(f"{k:12s} {p:10.2f} {s:7.4f}")
print(f"MAID: {len(log)} upper iterations ({summary['accepted']} accepted), stop: {stop_reason}, "
      f"{summary['lower_iterations']} lower + {summary['cg_iterations']} CG iterations, {summary['maid_seconds']:.1f} s; "
      f"TV baseline {base.iters} iterations, {_t_base:.1f} s; total {_total:.1f} s")
if summary["lower_cap_hits"]:
    print(f"warning: {summary['lower_cap_hits']} lower-level solves hit lower_iter={lower_iter}; their accuracy "
          f"ε is not certified (raise --lower_iter)", file=sys.stderr)
if summary["cg_cap_hits"]:
    print(f"warning: {summary['cg_cap_hits']} conjugate-gradient solves hit cg_iter={cg_iter} before the residual "
          f"δ; their hypergradients are less accurate than ω assumes (raise --cg_iter)", file=sys.stderr)
if interrupted:
    print(f"interrupted: continue with  python ADP.py --resume={os.path.join(run_dir, 'checkpoint.pt')}")
print(run_dir)
sys.exit(130 if interrupted else 0)
