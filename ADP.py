"""ADP-β solved with MAID: blind / semi-blind colour deblurring (SPEC §4.2).

    python ADP.py                              # defaults below
    python ADP.py --setting=semiblind --image=coffee
    python ADP.py presets/paper.py             # a preset (file of constants), then --name=value overrides
    python ADP.py presets/semiblind_strong.py  # semiblind σ = 1.5, proximal MAID on a 9×9 kernel
    python ADP.py --resume=Results/<run>/checkpoint.pt   # also after Ctrl-C or SIGTERM

    import ADP; summary = ADP.run(setting="semiblind", upper_iter=10)     # importable, no side effects

Every constant below can be overridden with --name=value (or as a keyword of :func:`run`).  A run
reads top to bottom: check the configuration, make the data, solve the TV baseline with the
known kernel b₀, run MAID on the kernel, write figures and logs into a new folder under
results_dir.  Nothing is written before every check has passed.

The kernel's upper level is ``min_b f(b) + r(b)``, solved by (proximal) MAID (maid.py, issue 17):
``f`` is ``g(x̂(b), b)`` with the smooth part of the penalty, ``r`` the non-smooth part given by its
prox (:func:`build_prox`): ``kernel_penalty = "h1"`` puts ``β‖b − b₀‖_{H¹}`` in ``r`` (exact, also
at ``b = b₀``), ``kernel_constraint = "simplex"`` adds the indicator of ``{b ≥ 0, Σb = 1}`` per
channel.  ``learned_kernel_size = K`` learns a K×K kernel from ``b₀`` zero-padded centrally (same
blur; the H¹ penalty and the error constants are then those of K×K kernels).  In the synthetic
settings the true kernel is known (semiblind: motion∘Gaussian, 9×9): ``kernel.pt`` holds it,
``kernels.png`` shows ``b₀``, ``b*`` and ``b_true``, and ``summary.json`` reports
``kernel_error_ratio = ‖b* − b_true‖/‖b₀ − b_true‖`` (``null`` when ``b₀`` is the truth).

Names (one name, one meaning): ``tv_weight`` is the regulariser weight α of the lower level,
``step`` the upper-level (MAID) step α₀ and ``nu_step`` its increase ν_α; the old names
``alpha`` and ``nu_alpha`` are refused with a hint (``RENAMED``).
"""
import math
import os
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
regulariser = "tv"         # tv: isotropic smoothed TV | tv_aniso: each difference in its own square root
tv_weight = 0.005          # α, weight of the regulariser (grid search, see README)
tv_smoothing = 0.01        # γ in R_γ(x) = Σ sqrt(|∇x|² + γ²) (grid search)
mu0 = 1e-2                 # μ₀, Tikhonov term making h strongly convex for every kernel
lower_solver = "fista"     # fista | agd
lower_iter = 3000          # cap on lower-level iterations per solve (hits are counted and reported)
# upper level  g(x, b) = ‖A_up x − y‖²/n + beta ‖b − b₀‖²_{H¹}
beta = 0.1                 # β, weight of the H¹ kernel penalty (grid search, see README)
upper_operator = "known"    # known: A_up = B_{b₀} (default: +0.11 dB over TV on the default data, README) | learned: A_up = B_b (the paper's 2D choice)
kernel_penalty = "h1_squared"  # h1_squared: β‖b − b₀‖²_{H¹} in g (smooth) | h1: β‖b − b₀‖_{H¹} (the paper's), exactly by its prox
kernel_constraint = "none"  # none | simplex: each channel of b ≥ 0 and Σb = 1, by projection (proximal MAID)
learned_kernel_size = 0    # 0: kernel_size | odd K ≥ kernel_size: b₀ zero-padded centrally to K×K, b learned on K×K
upper_normalisation = "n"  # n: data term over n = entries of y | channels: over the C channels (the paper's /3)
# MAID
upper_iter = 40            # maximum number of upper iterations
step = 1.0                 # initial upper-level step size α₀
eps0 = 1e-2                # initial lower-level accuracy ε₀ (‖x̃ − x̂‖ ≤ ε, Euclidean norm over all pixels)
delta0 = 1e-6              # initial CG accuracy δ₀ (absolute residual norm; ‖∇ₓg‖ ≈ 1e-4 here); scaled with ε afterwards
threshold = 1e-6           # MAID stops when ε < threshold (must be < eps0; 1e-3 stopped the default run after 6 iterations)
rho = 0.5                  # backtracking factor ρ
tau = 0.5                  # accuracy decrease τ after a failed line search
nu = 1.05                  # accuracy increase ν after a success
nu_step = 10 / 9           # step increase ν_α after a success
eta = 1e-4                 # sufficient-decrease constant η
backtracks = 5             # at most this many step sizes per line search
cg_iter = 200              # cap on CG iterations per linear solve
descent_check = True       # tighten ε until ω ≤ (1−η)‖z‖, ω the refined a-posteriori bound (README "Accuracy control")
baseline_eps = 1e-2        # accuracy of the TV baseline with b₀ ("solved to convergence")
baseline_iters = 0         # 0: baseline solved to ‖∇h‖ ≤ μ·baseline_eps (fair) | N: exactly N iterations from y (paper: 100)
baseline_lipschitz_factor = 1.0  # N > 0 only: step 1/L̃, L̃ = 10 power iterations on ∇²h(y) with the regulariser × this (paper: 100)
# output and machine
results_dir = "Results"    # a new folder is made inside for every run
device = "auto"            # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
dtype = "float64"          # float64 | float32: float32 steps, FFTs and CG; a solve whose ε no float32 point can certify (below ~3e-4 by default) ends with a float64 iterate (float32 steps, float64 certificate) and its hypergradient runs in float64 (mixed_precision.py): every solve certified (on mps, no float64: ε below ~1.7e-8·√n stays uncertified)
resume = ""                # path to a checkpoint.pt (or its run folder) to continue an interrupted run
progress = True            # tqdm progress bar and the printed summary table
# ------------------------------------------------------------------------------------------
import config  # noqa: E402
from config import ConfigError, check, finite_positive  # noqa: E402

DEFAULTS = config.defaults(globals())      # the constants above, in order
RENAMED = {"alpha": "step", "nu_alpha": "nu_step"}

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import figures  # noqa: E402
from adp_problem import UPPER_OPERATORS, ADPBetaProblem  # noqa: E402
from imaging import kernel_error_ratio, make_data, pad_kernel, psnr_ssim, resolve_device, true_kernel  # noqa: E402
from lower_level import SOLVERS, LowerLevel, hessian_norm_estimate, solve_lower, solve_lower_fixed  # noqa: E402
from maid import MAIDConfig, MAIDState, maid  # noqa: E402
from mixed_precision import MixedPrecisionProblem  # noqa: E402
from prox import H1NormPenalty, SimplexConstraint, SimplexH1Penalty  # noqa: E402
from regularisers import REGULARISERS, make_regulariser  # noqa: E402

PROG = "ADP.py"
SETTINGS = ("motion", "gaussian", "disc", "semiblind")
NO_STEP_LABEL = "unchanged (no step accepted)"
KERNEL_PENALTIES = ("h1_squared", "h1")
KERNEL_CONSTRAINTS = ("none", "simplex")
NORMALISATIONS = ("n", "channels")
POWER_ITERS = 10           # power iterations of the fixed-iteration baseline's L̃ (the paper's code)
_IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "images")
_MIN_SIZE = 11             # SSIM's Gaussian window (σ = 1.5) is 11×11
_RUN_LOCAL = ("results_dir", "device", "resume", "progress")   # never taken from a checkpoint's saved config
_RESUME_OVERRIDES = _RUN_LOCAL + ("upper_iter",)               # what a resumed run may change


class NumericalError(RuntimeError):
    """The computation met NaN/Inf in a way no input check foresaw (exit status 1, one line)."""


# ------------------------------------------------------------------------------------------
# checks (before anything is computed or written)
# ------------------------------------------------------------------------------------------
def _range_checks(cfg: dict) -> None:
    """Weights whose squares or reciprocal squares the solvers form must be representable in the
    dtype: each quantity q below must satisfy √tiny ≤ q ≤ √max (float64: 1.5e-154 … 1.3e154;
    float32: 1.1e-19 … 1.8e19), so that q², 1/q² and the products of two such factors neither
    underflow to 0 nor overflow to Inf.  The derived ones are the TV curvature constants
    (γ², α/γ in the smoothness bound L, α/γ² in L_H) and 1/μ₀ (the strong-convexity constant)."""
    fi = torch.finfo(getattr(torch, cfg["dtype"]))
    lo, hi = math.sqrt(fi.tiny), math.sqrt(fi.max)
    a, g = cfg["tv_weight"], cfg["tv_smoothing"]
    quantities = [(k, cfg[k]) for k in ("tv_weight", "tv_smoothing", "beta", "mu0", "step", "eps0", "delta0",
                                        "threshold", "eta", "baseline_eps", "baseline_lipschitz_factor")]
    quantities += [("noise_level", cfg["noise_level"])] if cfg["noise_level"] > 0 else []
    quantities += [("tv_smoothing² (γ²)", g * g), ("tv_weight/tv_smoothing (α/γ)", a / g),
                   ("tv_weight/tv_smoothing² (α/γ²)", a / g / g), ("1/mu0", 1 / cfg["mu0"])]
    for name, q in quantities:
        check(lo <= q <= hi, f"{name} = {q:.3g} is outside the range the solvers can use in {cfg['dtype']} "
                             f"[{lo:.2g}, {hi:.2g}] (its square would under- or overflow); choose a value in that "
                             f"range" + (" or --dtype=float64" if cfg["dtype"] == "float32" else ""))


def validate(cfg: dict) -> None:
    """Check every setting (one clear message each); raises :class:`config.ConfigError`."""
    config.validate_data(cfg, SETTINGS, _MIN_SIZE)
    check(cfg["dtype"] in ("float32", "float64"), f"dtype must be float32 or float64, got {cfg['dtype']!r}")
    check(cfg["regulariser"] in REGULARISERS,
          f"unknown regulariser {cfg['regulariser']!r}; use one of {', '.join(REGULARISERS)}")
    for name in ("tv_weight", "tv_smoothing", "beta", "eps0", "delta0", "step", "threshold", "eta",
                 "baseline_eps", "baseline_lipschitz_factor"):
        finite_positive(name, cfg[name])
    check(math.isfinite(cfg["mu0"]) and cfg["mu0"] > 0,
          f"mu0 must be a positive finite number, got {cfg['mu0']!r}: h is μ₀-strongly convex only through it "
          f"(the kernel's spectrum can vanish, e.g. the 5×5 motion kernel's at 320×240); try --mu0=1e-2")
    for name in ("rho", "tau"):
        check(0 < cfg[name] < 1, f"{name} must lie strictly between 0 and 1, got {cfg[name]}")
    for name in ("nu", "nu_step"):
        check(math.isfinite(cfg[name]) and cfg[name] >= 1, f"{name} must be a finite number ≥ 1, got {cfg[name]}")
    check(cfg["threshold"] < cfg["eps0"],
          f"threshold={cfg['threshold']:g} must be smaller than eps0={cfg['eps0']:g}: MAID stops as soon as ε < "
          f"threshold, so it would run no iteration (e.g. --threshold={cfg['eps0'] / 10:g})")
    for name in ("upper_iter", "lower_iter", "cg_iter", "backtracks"):
        check(cfg[name] >= 1, f"{name} must be a positive integer, got {cfg[name]}")
    check(cfg["upper_operator"] in UPPER_OPERATORS,
          f"unknown upper_operator {cfg['upper_operator']!r}; use one of {', '.join(UPPER_OPERATORS)}")
    check(cfg["baseline_iters"] >= 0, f"baseline_iters must be ≥ 0 (0: solve to convergence), got {cfg['baseline_iters']}")
    check(cfg["kernel_penalty"] in KERNEL_PENALTIES,
          f"unknown kernel_penalty {cfg['kernel_penalty']!r}; use one of {', '.join(KERNEL_PENALTIES)}")
    check(cfg["kernel_constraint"] in KERNEL_CONSTRAINTS,
          f"unknown kernel_constraint {cfg['kernel_constraint']!r}; use one of {', '.join(KERNEL_CONSTRAINTS)}")
    K = cfg["learned_kernel_size"]
    check(K == 0 or (K >= cfg["kernel_size"] and K % 2 == 1 and K <= min(cfg["size_x"], cfg["size_y"])),
          f"learned_kernel_size must be 0 (= kernel_size) or an odd size ≥ kernel_size={cfg['kernel_size']} and no "
          f"larger than the image, got {K} (e.g. --learned_kernel_size={cfg['kernel_size'] + 4})")
    check(cfg["upper_normalisation"] in NORMALISATIONS,
          f"unknown upper_normalisation {cfg['upper_normalisation']!r}; use one of {', '.join(NORMALISATIONS)}")
    check(cfg["lower_solver"] in SOLVERS, f"unknown lower_solver {cfg['lower_solver']!r}; use one of {', '.join(SOLVERS)}")
    _range_checks(cfg)


# ------------------------------------------------------------------------------------------
# the pieces shared with benchmarks/grid_search.py
# ------------------------------------------------------------------------------------------
def upper_scale(cfg: dict, y: torch.Tensor) -> float:
    """``c`` with ``g_cfg = c·g``: the configured upper level over our n-normalised one.

    ``upper_normalisation = "channels"`` asks for ``‖A_up x − y‖²/C + β_C·P(b)`` (the paper's /3);
    that is ``c·[‖A_up x − y‖²/n + (β_C/c)·P(b)]`` with ``c = n/C``.  MAID on ``c·g`` is MAID on ``g``
    with the step ``c·α``, the CG tolerance ``δ/c`` and the penalty weight ``β/c`` (both sides of
    the sufficient-decrease test and ω scale with ``c``; ε, an accuracy of ``x``, does not), so
    the driver keeps ``ADPBetaProblem``'s n-normalisation and maps the three settings
    (:func:`build_problem`, :func:`maid_config`); the logged upper loss is ``g = g_cfg/c``."""
    return y.numel() / y.shape[0] if cfg["upper_normalisation"] == "channels" else 1.0


def build_problem(cfg: dict, y: torch.Tensor, b0: torch.Tensor, metrics_fn=None, smooth_penalty: bool = True
                  ) -> ADPBetaProblem:
    """ADP-β (SPEC §1) for the data ``(y, b₀)`` with ``cfg``'s regulariser, β (over
    :func:`upper_scale`), kernel penalty, μ₀, upper operator and lower solver: the whole ``g``,
    the unsquared penalty included with its subgradient 0 at ``b₀`` (``adp_problem``).  With
    ``smooth_penalty=False`` and ``kernel_penalty = "h1"`` the penalty is left out (β = 0): the
    smooth part ``f`` of the composite objective that :func:`build_composite` pairs with its prox."""
    reg = make_regulariser(cfg["regulariser"], cfg["tv_weight"], cfg["tv_smoothing"])
    beta = 0.0 if cfg["kernel_penalty"] == "h1" and not smooth_penalty else cfg["beta"] / upper_scale(cfg, y)
    return ADPBetaProblem(y, b0, reg, beta, mu0=cfg["mu0"], upper_operator=cfg["upper_operator"],
                          solver=cfg["lower_solver"], metrics_fn=metrics_fn, kernel_penalty=cfg["kernel_penalty"])


def build_prox(cfg: dict, y: torch.Tensor, b0: torch.Tensor):
    """The non-smooth part ``r`` of the kernel's upper level (``None`` when there is none), for
    :func:`maid.maid`'s ``prox=``: ``kernel_penalty = "h1"`` → ``β‖b − b₀‖_{H¹}`` (β over
    :func:`upper_scale`; exact prox, :class:`prox.H1NormPenalty`), ``kernel_constraint = "simplex"``
    → the indicator of ``{b ≥ 0, Σb = 1}`` per channel (:class:`prox.SimplexConstraint`), both →
    :class:`prox.SimplexH1Penalty` (dual solve certified to ‖b − prox‖ ≤ 1e-10)."""
    h1 = cfg["kernel_penalty"] == "h1"
    beta = cfg["beta"] / upper_scale(cfg, y)
    if cfg["kernel_constraint"] == "simplex":
        return SimplexH1Penalty(beta, b0) if h1 else SimplexConstraint()
    return H1NormPenalty(beta, b0) if h1 else None


def build_composite(cfg: dict, y: torch.Tensor, b0: torch.Tensor, metrics_fn=None):
    """``(problem, prox)``: what MAID runs on, ``min_b f(b) + r(b)`` (:func:`build_problem` without
    the unsquared penalty, and :func:`build_prox`)."""
    return build_problem(cfg, y, b0, metrics_fn, smooth_penalty=False), build_prox(cfg, y, b0)


def mixed_precision(cfg: dict, problem: ADPBetaProblem, y: torch.Tensor, b0: torch.Tensor, metrics_fn=None):
    """What MAID runs on: ``problem`` itself in float64 (and on MPS, which has no float64); in
    float32 a :class:`mixed_precision.MixedPrecisionProblem` of ``problem`` and its float64 twin
    (the same settings on the exact float64 casts of ``y`` and ``b₀``), so that a lower solve whose
    ε float32 points cannot certify finishes in float64 and returns its float64 iterate, and the
    hypergradient at that iterate runs in float64 (θ stays float32)."""
    if y.dtype == torch.float64 or y.device.type == "mps":
        return problem
    high = build_composite(cfg, y.double(), b0.double(), metrics_fn)[0]
    return MixedPrecisionProblem(problem, high, low_dtype=y.dtype)


def learned_b0(cfg: dict, b0: torch.Tensor) -> torch.Tensor:
    """``b₀`` zero-padded centrally to ``learned_kernel_size`` (unchanged when it is 0 or the same):
    the blur is the same, the kernel MAID learns (and its H¹ penalty and error constants) is K×K."""
    K = cfg["learned_kernel_size"]
    return b0 if K in (0, b0.shape[-1]) else pad_kernel(b0, K)


def maid_config(cfg: dict, scale: float = 1.0) -> MAIDConfig:
    """MAID's parameters (SPEC §3) from the driver's names; ``scale`` = :func:`upper_scale` maps the
    configured step and CG tolerance onto the n-normalised upper level."""
    return MAIDConfig(eps0=cfg["eps0"], delta0=cfg["delta0"] / scale, step0=cfg["step"] * scale, rho=cfg["rho"],
                      tau=cfg["tau"], nu=cfg["nu"], nu_step=cfg["nu_step"], eta=cfg["eta"],
                      max_backtracks=cfg["backtracks"], eps_min=cfg["threshold"], max_iter=cfg["upper_iter"],
                      lower_max_iter=cfg["lower_iter"], cg_max_iter=cfg["cg_iter"], descent_check=cfg["descent_check"])


def baseline_step(cfg: dict, b0: torch.Tensor, y: torch.Tensor) -> float:
    """The fixed-iteration baseline's step ``1/L̃``: ``L̃`` = :data:`POWER_ITERS` power iterations on
    the Hessian of ``h`` at ``x = y`` with the regulariser weight × ``baseline_lipschitz_factor``
    (the paper's code: ×100, while its iterations descend the objective without the ×100)."""
    reg = make_regulariser(cfg["regulariser"], cfg["tv_weight"] * cfg["baseline_lipschitz_factor"], cfg["tv_smoothing"])
    return 1.0 / hessian_norm_estimate(LowerLevel(b0, y, reg, cfg["mu0"]), y, POWER_ITERS)


def solve_baseline(problem: ADPBetaProblem, cfg: dict, b0: torch.Tensor, y: torch.Tensor, step: float | None = None):
    """TV with the known kernel b₀ from ``y``: solved until ‖∇h‖ ≤ μ·baseline_eps (the fair
    baseline, ``baseline_iters = 0``), or exactly ``baseline_iters`` iterations with the step
    ``step`` (default :func:`baseline_step`; the paper protocol's, not converged)."""
    h = problem.lower(b0)
    if cfg["baseline_iters"] == 0:
        return solve_lower(h, y.clone(), cfg["baseline_eps"], 10 * cfg["lower_iter"], cfg["lower_solver"])
    step = baseline_step(cfg, b0, y) if step is None else step
    return solve_lower_fixed(h, y.clone(), cfg["baseline_iters"], step, cfg["lower_solver"])


# ------------------------------------------------------------------------------------------
# configuration and checkpoint
# ------------------------------------------------------------------------------------------
def resolve_config(given: dict) -> tuple[dict, dict | None]:
    """``(cfg, checkpoint)``: the defaults updated with ``given``; with ``resume``, the checkpoint's
    saved settings instead (old names translated), of which only ``_RESUME_OVERRIDES`` may differ
    (:func:`config.resume_config`)."""
    cfg = config.resolve(DEFAULTS, given, RENAMED)
    if not cfg["resume"]:
        return cfg, None
    ckpt = config.load_checkpoint(cfg["resume"], PROG)
    return config.resume_config(DEFAULTS, given, ckpt["config"], _RUN_LOCAL, _RESUME_OVERRIDES, RENAMED), ckpt


def _state_from(ckpt: dict, dev) -> MAIDState:
    return MAIDState(**{k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in ckpt["state"].items()})


def _payload(cfg: dict, st: MAIDState) -> dict:
    return {"config": cfg, "state": {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in vars(st).items()}}


def _say(cfg: dict, *args, **kw) -> None:
    if cfg["progress"]:
        print(*args, **kw)


# ------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------
def run(cfg: dict | None = None, **overrides) -> dict:
    """One ADP-β-MAID run; returns the summary (also written to ``summary.json``).

    ``cfg`` and ``overrides`` name settings to change from :data:`DEFAULTS` (pass only those:
    with ``resume``, any other setting that differs from the checkpoint's is refused).  Raises
    :class:`config.ConfigError` on bad input before anything is written, :class:`NumericalError`
    if the TV baseline meets NaN/Inf (before any folder exists), and ``KeyboardInterrupt``
    during the TV baseline (nothing to resume).  A Ctrl-C during MAID is not raised: the outputs
    and a resumable checkpoint are written and the summary has ``interrupted = True``.
    """
    t_start = time.perf_counter()
    given = {**(cfg or {}), **overrides}
    cfg, ckpt = resolve_config(given)
    validate(cfg)
    try:
        maid_config(cfg).validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    config.check_writable(cfg["results_dir"])
    dev = resolve_device(cfg["device"], cfg["dtype"])
    try:
        x_true, b0, y = make_data(cfg, _IMAGES, dev, getattr(torch, cfg["dtype"]))
        b_true = true_kernel(cfg, getattr(torch, cfg["dtype"]), dev)
    except ValueError as e:                       # e.g. a kernel that is not finite in this dtype
        raise ConfigError(f"cannot build the data: {e}") from None
    b0 = learned_b0(cfg, b0)
    state = None if ckpt is None else _state_from(ckpt, dev)

    def metrics(x):
        p, s = psnr_ssim(x, x_true)
        return {"psnr": p, "ssim": s}

    _say(cfg, f"ADP-β-MAID: {cfg['setting']} blur, {os.path.basename(cfg['image'])} "
              f"{cfg['channels']}×{cfg['size_y']}×{cfg['size_x']}, σ = {cfg['noise_level']:.4g}, device {dev}, "
              f"{cfg['dtype']}, {torch.get_num_threads()} threads")

    # -- the fair baseline: TV with the known kernel b₀ (before any folder exists) -------------
    problem, prox = build_composite(cfg, y, b0, metrics)
    mcfg = maid_config(cfg, upper_scale(cfg, y))
    t0 = time.perf_counter()
    try:
        b_step = baseline_step(cfg, b0, y) if cfg["baseline_iters"] else None
        base = solve_baseline(problem, cfg, b0, y, b_step)
    except KeyboardInterrupt:
        print("interrupted during the TV baseline, before MAID started: nothing written, nothing to resume",
              file=sys.stderr)
        raise
    t_base = time.perf_counter() - t0
    if base.status == "non_finite":
        raise NumericalError(f"the TV baseline met NaN/Inf after {base.iters} iterations; check tv_weight, "
                             f"tv_smoothing and mu0 (and the image)")
    L = problem.lower(b0).L
    if b_step is not None:
        _say(cfg, f"TV baseline: {base.iters} fixed iterations from y with the step 1/L̃ = {b_step:.3g} "
                  f"(= {b_step * L:.3g}/L of the objective it descends), ‖∇h‖ = {base.grad_norm:.3g}: not converged")
    elif not base.converged:
        print(f"warning: TV baseline hit its iteration cap ({base.iters}) with ‖∇h‖ = {base.grad_norm:.3g} "
              f"> μ ε = {problem.lower(b0).mu * cfg['baseline_eps']:.3g}", file=sys.stderr)
    baseline = {"baseline_iterations": base.iters, "baseline_seconds": t_base, "baseline_converged": base.converged,
                "baseline_step": b_step, "baseline_step_times_L": None if b_step is None else b_step * L}

    name = time.strftime("%Y%m%d-%H%M%S") + f"_{cfg['setting']}_{os.path.splitext(os.path.basename(cfg['image']))[0]}"
    run_dir = config.make_run_dir(cfg["results_dir"], name)
    figures.save_json(os.path.join(run_dir, "config.json"),
                      dict(cfg, device_resolved=str(dev), resumed_from=cfg["resume"] or None, torch=torch.__version__))

    # -- ADP-β-MAID on the kernel b ---------------------------------------------------------
    last_good = {}
    bar = tqdm(total=cfg["upper_iter"], initial=0 if state is None else state.k, desc="MAID", unit="it",
               dynamic_ncols=True, disable=not cfg["progress"])

    runner = mixed_precision(cfg, problem, y, b0, metrics)
    if runner is not problem and state is not None and state.log:     # counts continue over a resume
        runner.stats["promoted"] = state.log[-1].get("promoted_solves", 0)

    def on_iteration(rec, st):
        """Progress bar, and a copy of the state after each completed iteration (for Ctrl-C)."""
        if runner is not problem:
            rec["promoted_solves"] = runner.stats["promoted"]
        last_good["payload"] = _payload(cfg, st)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['upper_loss']:.4g}", psnr=f"{rec['psnr']:.2f}", eps=f"{rec['eps']:.2g}",
                        step=f"{rec['step']:.2g}", acc="y" if rec["accepted"] else "n")

    interrupted = False
    try:
        result = maid(runner, b0.clone(), y.clone(), mcfg, state=state, callback=on_iteration, prox=prox)
        log, b_star, x_adp, stop_reason = result.log, result.theta, result.x, result.stop_reason
        payload = _payload(cfg, result.state)
    except KeyboardInterrupt:
        interrupted = True
        payload = last_good.get("payload") or _payload(
            cfg, state or MAIDState(b0.clone(), y.clone(), None, mcfg.eps0, mcfg.delta0, mcfg.step0))
        s = payload["state"]
        log, b_star, x_adp, stop_reason = s["log"], s["theta"].to(dev), s["x"].to(dev), "interrupted"
    bar.close()
    if stop_reason == "non_finite":
        print("warning: MAID met a NaN/Inf (iterate, loss or hypergradient) and stopped; the outputs hold the "
              "last finite kernel and reconstruction", file=sys.stderr)
    return _outputs(cfg, run_dir, x_true, y, (b0, b_true), base.x, baseline, log, b_star, x_adp, stop_reason,
                    payload, interrupted, t_start)


def _outputs(cfg, run_dir, x_true, y, kernels, x_tv, baseline, log, b_star, x_adp, stop_reason, payload, interrupted,
             t_start) -> dict:
    """Write log, kernels, checkpoint, figures and summary into ``run_dir``; return the summary."""
    b0, b_true = kernels
    accepted = sum(bool(r["accepted"]) for r in log)
    adp_label = "ADP-β-MAID" if accepted else f"ADP-β-MAID: {NO_STEP_LABEL}"
    scores = {"blurry": psnr_ssim(y, x_true), "TV (b₀)": psnr_ssim(x_tv, x_true),
              "ADP-β-MAID": psnr_ssim(x_adp, x_true)}
    figures.save_csv(os.path.join(run_dir, "log.csv"), log)
    figures.save_torch(os.path.join(run_dir, "kernel.pt"), {"b_star": b_star.cpu(), "b0": b0.cpu(),
                                                           "b_true": b_true.cpu()})
    figures.save_torch(os.path.join(run_dir, "checkpoint.pt"), payload)
    titles = ("blurry", "TV (b₀)", adp_label)
    figures.comparison_figure([("ground truth", x_true)] + [(f"{t}\nPSNR {p:.2f} dB, SSIM {s:.3f}", x) for t, (p, s), x
                              in zip(titles, scores.values(), (y, x_tv, x_adp))],
                              os.path.join(run_dir, "comparison.png"))
    figures.kernel_figure(b0, b_star, os.path.join(run_dir, "kernels.png"), b_true=b_true)
    if log:
        figures.convergence_figure(log, os.path.join(run_dir, "convergence.png"))
        figures.iterations_figure(log, os.path.join(run_dir, "iterations.png"), baseline_psnr=scores["TV (b₀)"][0])
    last = log[-1] if log else {}
    total = time.perf_counter() - t_start
    summary = {"scores": {k: {"psnr": p, "ssim": s} for k, (p, s) in scores.items()},
               "adp_result": "kernel learned" if accepted else NO_STEP_LABEL, "stop_reason": stop_reason,
               "upper_iterations": len(log), "accepted": accepted,
               "lower_iterations": last.get("lower_iters", 0), "cg_iterations": last.get("cg_iters", 0),
               "lower_cap_hits": last.get("lower_cap_hits", 0), "cg_cap_hits": last.get("cg_cap_hits", 0),
               "uncertified_solves": last.get("lower_cap_hits", 0)        # MAID's, plus a TV baseline meant to converge
               + int(cfg["baseline_iters"] == 0 and not baseline["baseline_converged"]),
               "promoted_solves": last.get("promoted_solves", 0),
               "kernel_change": (torch.linalg.vector_norm(b_star - b0) / torch.linalg.vector_norm(b0)).item(),
               "kernel_error_ratio": kernel_error_ratio(b_star, b0, b_true),
               "kernel_sums": b_star.sum(dim=(-2, -1)).flatten().tolist(),
               **baseline, "upper_scale": upper_scale(cfg, y),
               "maid_seconds": last.get("time", 0.0), "total_seconds": total}
    figures.save_json(os.path.join(run_dir, "summary.json"), summary)
    _report(cfg, run_dir, summary, scores, interrupted)
    return dict(summary, run_dir=run_dir, interrupted=interrupted, config=cfg)


def _report(cfg, run_dir, summary, scores, interrupted) -> None:
    """The printed table and the one-line warnings (warnings always; the table with ``progress``)."""
    _say(cfg, f"\n{'':12s} {'PSNR [dB]':>10s} {'SSIM':>7s}")
    for k, (p, s) in scores.items():
        note = f"  {NO_STEP_LABEL}" if k == "ADP-β-MAID" and not summary["accepted"] else ""
        _say(cfg, f"{k:12s} {p:10.2f} {s:7.4f}{note}")
    if summary["kernel_error_ratio"] is not None:
        _say(cfg, f"kernel error ‖b* − b_true‖/‖b₀ − b_true‖ = {summary['kernel_error_ratio']:.4f}")
    _say(cfg, f"MAID: {summary['upper_iterations']} upper iterations ({summary['accepted']} accepted), stop: "
              f"{summary['stop_reason']}, {summary['lower_iterations']} lower + {summary['cg_iterations']} CG "
              f"iterations ({summary['uncertified_solves']} solves uncertified"
              + (f", {summary['promoted_solves']} returned float64" if cfg["dtype"] == "float32" else "") +
              f"), {summary['maid_seconds']:.1f} s; TV baseline {summary['baseline_iterations']} iterations, "
              f"{summary['baseline_seconds']:.1f} s; total {summary['total_seconds']:.1f} s")
    if not summary["accepted"]:
        print(f"note: MAID accepted no step in {summary['upper_iterations']} upper iterations: b* = b₀, so the "
              f"ADP-β-MAID result is {NO_STEP_LABEL} (stop: {summary['stop_reason']}"
              + ("; b₀ is already stationary, e.g. β ≥ the data term's slope for kernel_penalty=h1"
                 if summary["stop_reason"] == "converged" else "") + ")", file=sys.stderr)
    if summary["lower_cap_hits"]:
        why = f"hit lower_iter={cfg['lower_iter']} (raise --lower_iter)" + (
            "; or, on MPS (no float64 iterates), met an ε below what float32 can certify (the float32 grid is "
            "~1.7e-8·√n from x̂): there use a threshold above that distance" if cfg["dtype"] == "float32" else "")
        print(f"warning: {summary['lower_cap_hits']} lower-level solves ended uncertified: they {why}",
              file=sys.stderr)
    if summary["cg_cap_hits"]:
        print(f"warning: {summary['cg_cap_hits']} conjugate-gradient solves hit cg_iter={cfg['cg_iter']} before the "
              f"residual δ; their hypergradients are less accurate than ω assumes (raise --cg_iter)", file=sys.stderr)
    if interrupted:
        print(f"interrupted: continue with  python ADP.py --resume={os.path.join(run_dir, 'checkpoint.pt')}")
    print(run_dir)


def main(argv: list[str]) -> int:
    """The command line: presets and ``--name=value`` overrides, one-line errors (exit 2)."""
    try:
        _, explicit = config.parse_argv(DEFAULTS, argv, RENAMED)
        summary = run(explicit)
    except ConfigError as e:
        config.fail(PROG, e)
    except NumericalError as e:
        config.fail(PROG, e, code=1)
    except KeyboardInterrupt:
        return 130
    return 130 if summary["interrupted"] else 0


if __name__ == "__main__":
    import signal
    # Ctrl-C must raise KeyboardInterrupt even if the parent started us with SIGINT ignored
    # (as a non-interactive shell does for background jobs): the MAID loop turns it into a checkpoint.
    # SIGTERM (kill, a batch system's time limit) takes the same path: outputs and checkpoint, exit 130.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main(sys.argv[1:]))
