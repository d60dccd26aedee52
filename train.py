"""Dataset-level bilevel learning of a regulariser (SPEC §6): ISGD against MAID and IFT.

    python train.py                                  # FoE denoising with ISGD, defaults below (5·10⁴ computations)
    python train.py presets/train_full.py            # the issue's target setting: 2·10⁵ computations
    python train.py presets/train_tv.py --method=maid
    python train.py --resume=Results/<run>/checkpoint.pt

    min_θ (1/N) Σ_i ‖x̂_i(θ) − x_i‖²/n,   x̂_i(θ) = argmin_x ½‖A x − y_i‖² + R_θ(x) + (μ₀/2)‖x‖²

Data: random crops of the scikit-image samples (``datasets.py``), train and test split by source
image.  The methods share the batched problem (``dataset_problem.py``):

* ``isgd`` — ``isgd.isgd``: mini-batches of ``batch_size``, ``α_k = step0 (k+1)^−q``,
  ``ε_k = eps0 (k+1)^−p`` per image (``q = 0``: fixed steps);
* ``maid`` — ``maid.maid`` on the full training set (deterministic, adaptive ε and step), starting
  at ``eps0`` per image and ``step0``;
* ``ift`` — ``maid.inexact_gradient_descent`` on the full training set, fixed accuracy ``ift_eps``
  per image and fixed step ``step0``.

Accuracies are per image everywhere: ``‖x̃_i − x̂_i‖ ≤ ε`` and CG residual ``δ`` on image i's own
adjoint system; for MAID/IFT the stacked problem over N images is given ``ε √N`` and ``δ/√N``
(``dataset_problem``: per image ``ε_stack/√N`` and ``δ_stack/√N`` on the stacked system, whose
right side carries 1/N), as ISGD does for its batches.  Every run stops at ``budget``
total computations (lower-level + CG iterations summed over images, the ISGD paper's axis) or
after ``epochs`` passes over the training set (MAID/IFT: one iteration = one pass), whichever
comes first.  Test PSNR and the full training loss are evaluated at ``eval_points`` evenly spaced
budgets (evaluation is not counted in computations or wall time).

Outputs in a new folder under ``results_dir``: ``config.json``, ``split.json`` (sources and crop
positions), ``log.csv`` (per step), ``evals.csv``/``evals.json``, ``curves.png`` (loss and test
PSNR against computations and wall time), ``filters.png`` (FoE), ``reconstructions.png`` (test
images: noisy, initial and learned regulariser, PSNR/SSIM), ``theta.pt``, ``checkpoint.pt``,
``summary.json``.  Ctrl-C keeps a resumable checkpoint.
"""
import math
import os
import signal
import sys
import time

import config

# ------------------------------------------------------------------------------------------
# configuration (override any of these with --name=value, or a preset file presets/train_*.py)
# ------------------------------------------------------------------------------------------
# data
problem = "denoising"      # denoising | deblurring (Gaussian blur_size², σ = blur_sigma) | semiblind (learned kernel)
img_size = 96              # crops of img_size × img_size pixels
channels = 1               # 1: grey, 3: colour (RGB sources only)
noise_level = 25 / 255     # σ of the Gaussian noise
blur_size = 5              # odd kernel size of the deblurring / semi-blind blur
blur_sigma = 1.0           # σ of the true Gaussian blur
kernel0_sigma = 0.6        # σ of the semi-blind initial kernel (the blur is learned from it)
train_size = 64            # training crops
test_size = 16             # test crops (from other source images)
batch_size = 8             # ISGD mini-batch
# lower level  h_i(x) = ½‖A x − y_i‖² + R_θ(x) + (mu0/2)‖x‖²
regulariser = "foe"        # foe: Fields of Experts | tv: smoothed TV, per-channel weight and smoothing
foe_filters = 10           # K filters
foe_size = 7               # of foe_size × foe_size over all channels
foe_scale = 0.01           # initial e^c
foe_smoothing = 1e-2       # initial e^s
tv_weight = 0.05           # initial TV weight
tv_smoothing = 0.01        # initial TV smoothing
mu0 = 1e-3                 # μ₀ (strong convexity for the blurs; negligible for denoising)
lower_iter = 200           # FISTA iterations per image and solve, at most (cap hits are counted)
cg_iter = 200              # CG iterations per image and solve, at most
# upper level
method = "isgd"            # isgd | maid | ift
step0 = 300.0              # α₀ (ISGD: α_k = α₀ (k+1)^−q; MAID: initial step; IFT: the fixed step)
eps0 = 1e-1                # ε₀ per image (ISGD: ε_k = ε₀ (k+1)^−p; MAID: initial accuracy)
delta0 = 1e-5              # δ₀: CG residual per image on its own adjoint system (‖∇g_i‖ ≈ 5e-4 at 96×96); δ = δ₀ ε/ε₀
p = 0.0                    # ε schedule exponent
q = 0.0                    # step schedule exponent (0: fixed steps; ½ < q ≤ 1: decreasing)
ift_eps = 1e-3             # IFT's fixed accuracy per image
epochs = 1000              # passes over the training set, at most
budget = 50000             # total computations (lower + CG iterations), at most (presets/train_full.py: 2e5)
eval_points = 8            # test evaluations spread over the budget (plus one at the start)
eval_eps = 1e-2            # accuracy of the evaluation solves, per image (moves a ~28 dB test PSNR by ≤ 0.03 dB at 96×96)
seed = 0                   # crops, split, noise, filters and batches
threads = 0                # torch CPU threads (0: torch's default; 1 on a shared machine)
# output and machine
results_dir = "Results"
name = ""                  # run folder name (empty: <time>_train_<problem>_<regulariser>_<method>)
device = "auto"            # auto | cpu | cuda | cuda:N
dtype = "float64"          # float64 | float32
resume = ""                # checkpoint.pt (or its run folder) of an interrupted run
# ------------------------------------------------------------------------------------------
DEFAULTS = config.defaults(globals())
RENAMED = {"alpha": "step0"}
_PROG = "train.py"
PROBLEMS = ("denoising", "deblurring", "semiblind")
METHODS = ("isgd", "maid", "ift")
_RUN_LOCAL = ("results_dir", "name", "device", "resume")
_RESUME_OVERRIDES = _RUN_LOCAL + ("budget", "epochs")


def validate(cfg: dict) -> None:
    """Every setting checked before anything is computed or written (one clear line each)."""
    check = config.check
    check(cfg["problem"] in PROBLEMS, f"unknown problem {cfg['problem']!r}; use one of {', '.join(PROBLEMS)}")
    check(cfg["method"] in METHODS, f"unknown method {cfg['method']!r}; use one of {', '.join(METHODS)}")
    check(cfg["regulariser"] in ("foe", "tv"), f"unknown regulariser {cfg['regulariser']!r}; use foe or tv")
    check(cfg["channels"] in (1, 3), f"channels must be 1 (grey) or 3 (colour), got {cfg['channels']}")
    check(cfg["img_size"] >= 16, f"img_size must be at least 16 pixels, got {cfg['img_size']}")
    for name in ("blur_size", "foe_size"):
        check(cfg[name] > 0 and cfg[name] % 2 == 1, f"{name} must be a positive odd integer, got {cfg[name]}")
    check(cfg["foe_size"] < cfg["img_size"] and cfg["blur_size"] < cfg["img_size"],
          f"filters and kernels must be smaller than img_size={cfg['img_size']}")
    config.finite_positive("noise_level", cfg["noise_level"], allow_zero=True)
    config.finite_positive("mu0", cfg["mu0"], allow_zero=cfg["problem"] == "denoising")
    for name in ("blur_sigma", "kernel0_sigma", "foe_scale", "foe_smoothing", "tv_weight", "tv_smoothing", "step0",
                 "eps0", "delta0", "ift_eps", "eval_eps"):
        config.finite_positive(name, cfg[name])
    for name in ("p", "q"):
        config.finite_positive(name, cfg[name], allow_zero=True)
    for name in ("train_size", "test_size", "batch_size", "foe_filters", "lower_iter", "cg_iter", "epochs", "budget",
                 "eval_points"):
        check(cfg[name] >= 1, f"{name} must be a positive integer, got {cfg[name]}")
    check(cfg["batch_size"] <= cfg["train_size"],
          f"batch_size={cfg['batch_size']} exceeds train_size={cfg['train_size']}")
    check(cfg["dtype"] in ("float32", "float64"), f"dtype must be float32 or float64, got {cfg['dtype']!r}")
    config.valid_seed(cfg["seed"])
    check(cfg["name"] == "" or (os.sep not in cfg["name"] and cfg["name"] not in (".", "..")),
          f"name must be a plain folder name, got {cfg['name']!r}")
    check(cfg["threads"] >= 0, f"threads must be ≥ 0 (0: torch's default), got {cfg['threads']}")


# ------------------------------------------------------------------------------------------
# pieces of a run
# ------------------------------------------------------------------------------------------
def make_data(cfg: dict, dev, dt):
    """``(dataset, true kernel or None, initial kernel or None)`` for ``cfg['problem']``."""
    import torch
    from datasets import make_dataset
    from operators import Blur, gaussian_kernel

    kernel = kernel0 = None
    if cfg["problem"] != "denoising":
        kernel = gaussian_kernel(cfg["blur_size"], cfg["blur_sigma"], cfg["channels"], dtype=torch.float64)
        if cfg["problem"] == "semiblind":
            kernel0 = gaussian_kernel(cfg["blur_size"], cfg["kernel0_sigma"], cfg["channels"], dtype=dt).to(dev)
    forward = None if kernel is None else (lambda x: Blur(kernel.to(x.device, x.dtype), x.shape[-2:]).A(x))
    data = make_dataset(cfg["train_size"], cfg["test_size"], cfg["img_size"], cfg["channels"], cfg["noise_level"],
                        cfg["seed"], forward=forward, dtype=dt, device=dev)
    known = None if cfg["problem"] != "deblurring" else kernel.to(dev, dt)
    return data, known, kernel0


def make_problems(cfg: dict, data, known, kernel0, dt):
    """``(train problem, test problem, parametrisation)``, sharing θ's layout."""
    from dataset_problem import DatasetProblem, make_parametrisation

    par = make_parametrisation(cfg["regulariser"], cfg["channels"], tv_weight=cfg["tv_weight"],
                               tv_smoothing=cfg["tv_smoothing"], foe_filters=cfg["foe_filters"],
                               foe_size=cfg["foe_size"], foe_scale=cfg["foe_scale"],
                               foe_smoothing=cfg["foe_smoothing"], seed=cfg["seed"], kernel0=kernel0, dtype=dt)
    train = DatasetProblem(data.x_train, data.y_train, par, kernel=known, mu0=cfg["mu0"])
    test = DatasetProblem(data.x_test, data.y_test, par, kernel=known, mu0=cfg["mu0"])
    return train, test, par.initial().to(data.y_train.device), par


class Evaluator:
    """Test PSNR and the full training loss at θ, solved to ``eval_eps`` per image with warm starts
    kept between evaluations (not counted in the method's computations or time)."""

    def __init__(self, train, test, eps: float, max_iter: int):
        self.train, self.test, self.eps, self.max_iter = train, test, eps, max_iter
        self.x_train, self.x_test = train.y.clone(), test.y.clone()

    def _solve(self, P, x0, theta):
        low = P.solve_lower(theta, x0, self.eps * math.sqrt(x0.shape[0]), self.max_iter)
        return low.x

    def __call__(self, theta) -> dict:
        from dataset_problem import psnr_per_image

        t0 = time.perf_counter()
        self.x_train = self._solve(self.train, self.x_train, theta)
        self.x_test = self._solve(self.test, self.x_test, theta)
        return {"train_loss": self.train.upper_loss(self.x_train, theta).item(),
                "test_psnr": psnr_per_image(self.x_test, self.test.x_true).mean().item(),
                "eval_seconds": time.perf_counter() - t0}


def _eval_due(computations: int, done: int, cfg: dict) -> bool:
    """True once ``computations`` has passed the next of the ``eval_points`` evenly spaced budgets."""
    return computations >= (done + 1) * cfg["budget"] / cfg["eval_points"]


def _points_passed(computations: int, done: int, cfg: dict) -> int:
    """How many of the ``eval_points`` budgets ``computations`` has passed, counting on from ``done``
    (a long step, such as a MAID iteration, may pass several: they share one evaluation)."""
    while done < cfg["eval_points"] and _eval_due(computations, done, cfg):
        done += 1
    return done


def run_method(cfg: dict, train, theta0, evaluate, state=None, on_step=None):
    """Run ``cfg['method']`` until the budget or the epoch limit; returns ``(θ, log, stop_reason, state)``.

    ``evaluate(θ, record)`` is called whenever an evaluation is due; ``on_step(record, state)``
    after every step (progress bar, checkpoint snapshot)."""
    import maid
    from isgd import ISGDConfig, isgd

    N = train.n_samples
    evals_done = [0]

    def callback(rec, st):
        comp = rec["lower_iters"] + rec["cg_iters"]
        rec["computations"] = comp
        theta = st.theta
        passed = _points_passed(comp, evals_done[0], cfg)
        if passed > evals_done[0]:
            evals_done[0] = passed
            evaluate(theta, rec)
        if on_step is not None:
            on_step(rec, st)
        return comp >= cfg["budget"]

    if state is not None:
        evaluated = [r["computations"] for r in state.log if "test_psnr" in r]
        evals_done[0] = _points_passed(evaluated[-1], 0, cfg) if evaluated else 0
    x0 = train.y.clone()
    if cfg["method"] == "isgd":
        steps = cfg["epochs"] * math.ceil(N / cfg["batch_size"])
        icfg = ISGDConfig(step0=cfg["step0"], eps0=cfg["eps0"], p=cfg["p"], q=cfg["q"], batch_size=cfg["batch_size"],
                          delta0=cfg["delta0"], max_steps=steps, budget=cfg["budget"], lower_max_iter=cfg["lower_iter"],
                          cg_max_iter=cfg["cg_iter"], seed=cfg["seed"])
        res = isgd(train, theta0, x0, icfg, state=state, callback=callback)
    else:
        root = math.sqrt(N)
        ift_delta = cfg["delta0"] * cfg["ift_eps"] / cfg["eps0"] / root
        if cfg["method"] == "maid":
            mcfg = maid.MAIDConfig(eps0=cfg["eps0"] * root, delta0=cfg["delta0"] / root, step0=cfg["step0"],
                                   max_iter=cfg["epochs"],
                                   eps_min=1e-12, lower_max_iter=cfg["lower_iter"], cg_max_iter=cfg["cg_iter"],
                                   descent_check=False)
            res = maid.maid(train, theta0, x0, mcfg, state=state, callback=callback)
        elif state is None:
            res = maid.inexact_gradient_descent(train, theta0, x0, cfg["ift_eps"] * root, cfg["step0"], cfg["epochs"],
                                                delta=ift_delta, lower_max_iter=cfg["lower_iter"], cg_max_iter=cfg["cg_iter"],
                                                callback=callback)
        else:
            mcfg = maid.MAIDConfig(eps0=cfg["ift_eps"] * root, delta0=ift_delta, step0=cfg["step0"],
                                   max_iter=cfg["epochs"],
                                   eps_min=0.5 * cfg["ift_eps"] * root, lower_max_iter=cfg["lower_iter"],
                                   cg_max_iter=cfg["cg_iter"], descent_check=False)
            res = maid.maid(train, None, None, mcfg, state=state, callback=callback, fixed_step=True)
    stop = "budget" if res.stop_reason == "callback" else res.stop_reason
    return res.theta, res.log, stop, res.state


def _state_payload(cfg: dict, st) -> dict:
    import torch
    return {"config": cfg, "state": {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in vars(st).items()}}


def _load_checkpoint(path: str):
    import torch
    path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    config.check(os.path.isfile(path), f"no checkpoint at {path!r}; give the checkpoint.pt of an interrupted run")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        if not (isinstance(ck.get("config"), dict) and isinstance(ck.get("state"), dict)):
            raise TypeError("no config/state")
    except Exception as e:  # noqa: BLE001  (any unreadable file is one line)
        raise config.ConfigError(f"{path!r} is not a readable train.py checkpoint ({type(e).__name__})")
    return ck


def _restore_state(method: str, saved: dict, dev, dt):
    import torch
    from isgd import ISGDState
    from maid import MAIDState
    s = {k: (v.to(dev, dt) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in saved.items()}
    return ISGDState(**s) if method == "isgd" else MAIDState(**s)


# ------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------
def curves_figure(runs: dict, path: str, noisy_psnr: float | None = None) -> None:
    """Training loss and test PSNR against total computations and wall time, one line per run
    (``runs``: name -> list of evaluation records with computations, time, train_loss, test_psnr)."""
    import figures
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for name, ev in runs.items():
        for col, key in enumerate(("computations", "time")):
            xs = [r[key] for r in ev]
            axes[0, col].plot(xs, [r["train_loss"] for r in ev], "-o", ms=3, label=name)
            axes[1, col].plot(xs, [r["test_psnr"] for r in ev], "-o", ms=3, label=name)
    for col, label in enumerate(("total computations (lower + CG iterations)", "wall time [s]")):
        axes[0, col].set_yscale("log")
        axes[0, col].set_ylabel("training loss (1/N) Σ ‖x̂_i − x_i‖²/n")
        axes[1, col].set_ylabel("test PSNR [dB]")
        if noisy_psnr is not None:
            axes[1, col].axhline(noisy_psnr, color="grey", ls=":", label="noisy input")
        for row in range(2):
            axes[row, col].set_xlabel(label)
            axes[row, col].grid(alpha=0.3, which="both")
            axes[row, col].legend(fontsize=8)
    fig.tight_layout()
    figures.save_figure(fig, path)


def filters_figure(R, path: str, title: str) -> None:
    """The FoE filters ``K_j`` (each on its own symmetric colour scale), titled with ``e^c w_j``."""
    import figures
    import matplotlib.pyplot as plt

    f = R.filters.detach().double().cpu()
    coef = (R.log_scale.exp() * R.weights).detach().double().cpu()
    K = f.shape[0]
    cols = min(K, 5)
    rows = math.ceil(K / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for j, ax in enumerate(axes.flat):
        ax.axis("off")
        if j < K:
            img = f[j].mean(0) if f.shape[1] == 1 else f[j].permute(1, 2, 0)
            if f.shape[1] == 1:
                m = img.abs().max().item() or 1.0
                ax.imshow(img.numpy(), cmap="RdBu_r", vmin=-m, vmax=m, interpolation="nearest")
            else:
                m = img.abs().max().item() or 1.0
                ax.imshow((0.5 + 0.5 * img / m).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_title(f"e^c w = {coef[j]:.3g}", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    figures.save_figure(fig, path)


def reconstructions(cfg, test, theta0, theta, eps, n_show=3):
    """``(panels per row, scores)``: for ``n_show`` test images the truth, the data, the initial and
    the learned regulariser's reconstructions with PSNR/SSIM; scores averaged over the test set."""
    from imaging import psnr_ssim

    root = math.sqrt(test.n_samples)
    x_init = test.solve_lower(theta0, test.y.clone(), eps * root, 20 * cfg["lower_iter"]).x
    x_learned = test.solve_lower(theta, x_init.clone(), eps * root, 20 * cfg["lower_iter"]).x
    data_name = "noisy" if cfg["problem"] == "denoising" else "measured"
    stacks = {data_name: test.y, "initial regulariser": x_init, "learned regulariser": x_learned}
    scores = {k: [psnr_ssim(v[i], test.x_true[i]) for i in range(test.n_samples)] for k, v in stacks.items()}
    mean = {k: {"psnr": sum(p for p, _ in s) / len(s), "ssim": sum(q for _, q in s) / len(s)} for k, s in scores.items()}
    rows = []
    for i in range(min(n_show, test.n_samples)):
        row = [("ground truth", test.x_true[i])]
        row += [(f"{k}\nPSNR {scores[k][i][0]:.2f} dB, SSIM {scores[k][i][1]:.3f}", v[i]) for k, v in stacks.items()]
        rows.append(row)
    return rows, mean


def reconstructions_figure(rows, path: str) -> None:
    import figures
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), len(rows[0]), figsize=(3.2 * len(rows[0]), 3.4 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, (title, x) in enumerate(row):
            a = x.detach().double().clamp(0, 1).cpu()
            axes[r, c].imshow(a[0].numpy() if a.shape[0] == 1 else a.permute(1, 2, 0).numpy(), cmap="gray",
                              vmin=0, vmax=1, interpolation="nearest")
            axes[r, c].set_title(title, fontsize=9)
            axes[r, c].axis("off")
    fig.tight_layout()
    figures.save_figure(fig, path)


# ------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------
def run(cfg: dict | None = None, progress: bool = True, **overrides) -> dict:
    """Train with ``cfg`` (defaults updated with ``overrides``); returns the summary dict (also
    written to ``summary.json``; ``run_dir`` names the folder).  Raises ConfigError on bad input;
    ``KeyboardInterrupt`` during training writes a resumable checkpoint and returns with
    ``stop_reason = 'interrupted'``."""
    import torch
    from tqdm import tqdm

    import figures
    from dataset_problem import psnr_per_image
    from imaging import resolve_device

    given = {**(cfg or {}), **overrides}
    cfg = config.resolve(DEFAULTS, given, RENAMED)
    checkpoint = None
    if cfg["resume"]:
        checkpoint = _load_checkpoint(cfg["resume"])
        changed = sorted(k for k in given if k not in _RESUME_OVERRIDES and given[k] != DEFAULTS[k])
        config.check(not changed, f"--resume continues a run with its saved settings; only "
                                  f"{', '.join('--' + k for k in _RESUME_OVERRIDES)} may be given with it, not "
                                  f"{', '.join('--' + k for k in changed)}")
        saved = {k: v for k, v in checkpoint["config"].items() if k in DEFAULTS and k not in _RUN_LOCAL}
        cfg = {**cfg, **saved, **{k: given[k] for k in _RESUME_OVERRIDES if k in given}}
    validate(cfg)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    dev = resolve_device(cfg["device"], cfg["dtype"])
    dt = getattr(torch, cfg["dtype"])
    data, known, kernel0 = make_data(cfg, dev, dt)
    train, test, theta0, par = make_problems(cfg, data, known, kernel0, dt)
    tag = f"{cfg['problem']}_{cfg['regulariser']}_{cfg['method']}"
    run_dir = config.make_run_dir(cfg["results_dir"], cfg["name"] or time.strftime("%Y%m%d-%H%M%S") + "_train_" + tag)
    figures.save_json(os.path.join(run_dir, "config.json"), dict(cfg, device_resolved=str(dev), torch=torch.__version__))
    figures.save_json(os.path.join(run_dir, "split.json"), {"train_sources": data.train_sources,
                                                             "test_sources": data.test_sources, "crops": data.crops})
    evaluator = Evaluator(train, test, cfg["eval_eps"], 20 * cfg["lower_iter"])
    evals = []

    def evaluate(theta, rec):
        e = evaluator(theta)
        rec.update(test_psnr=e["test_psnr"], train_loss=e["train_loss"])
        evals.append({"step": rec.get("iter", 0), "computations": rec.get("computations", 0),
                      "time": rec.get("time", 0.0), **e})

    state = None
    if checkpoint is not None:
        state = _restore_state(cfg["method"], checkpoint["state"], dev, dt)
        evals.extend(checkpoint.get("evals", []))
    else:
        evaluate(theta0, {})
    bar = tqdm(total=cfg["budget"], desc=cfg["method"], unit="comp", dynamic_ncols=True, disable=not progress,
               initial=0 if state is None else state.lower_iters + state.cg_iters)
    last = {}

    def on_step(rec, st):
        bar.update(rec["computations"] - bar.n)
        post = {"loss": f"{rec.get('batch_loss', rec.get('upper_loss')):.4g}", "step": f"{rec['step']:.2g}"}
        if evals:
            post["psnr"] = f"{evals[-1]['test_psnr']:.2f}"
        bar.set_postfix(post, refresh=False)
        last["snapshot"] = st

    interrupted = False
    try:
        theta, log, stop, final_state = run_method(cfg, train, theta0, evaluate, state=state, on_step=on_step)
    except KeyboardInterrupt:
        interrupted, stop = True, "interrupted"
        final_state = last.get("snapshot") or state
        theta = theta0 if final_state is None else final_state.theta
        log = [] if final_state is None else final_state.log
    bar.close()
    payload = None if final_state is None else dict(_state_payload(cfg, final_state), method=cfg["method"], evals=evals)
    if payload is not None:
        figures.save_torch(os.path.join(run_dir, "checkpoint.pt"), payload)
    if interrupted:
        print(f"interrupted: continue with  python train.py --resume={os.path.join(run_dir, 'checkpoint.pt')}",
              file=sys.stderr)
        return {"run_dir": run_dir, "stop_reason": stop}
    if not evals or evals[-1]["computations"] != (log[-1]["computations"] if log else 0):
        rec = dict(log[-1]) if log else {}
        evaluate(theta, rec)
    figures.save_csv(os.path.join(run_dir, "log.csv"), log)
    figures.save_csv(os.path.join(run_dir, "evals.csv"), evals)
    figures.save_json(os.path.join(run_dir, "evals.json"), evals)
    figures.save_torch(os.path.join(run_dir, "theta.pt"), {"theta": theta.detach().cpu(), "theta0": theta0.cpu(),
                                                            "names": par.names, "shapes": par.shapes})
    noisy = psnr_per_image(test.y, test.x_true).mean().item()
    curves_figure({cfg["method"]: evals}, os.path.join(run_dir, "curves.png"), noisy)
    if cfg["regulariser"] == "foe":
        filters_figure(par.regulariser(theta), os.path.join(run_dir, "filters.png"), "learned FoE filters")
        filters_figure(par.regulariser(theta0), os.path.join(run_dir, "filters_initial.png"), "initial FoE filters")
    rows, scores = reconstructions(cfg, test, theta0, theta, cfg["eval_eps"])
    reconstructions_figure(rows, os.path.join(run_dir, "reconstructions.png"))
    last_rec = log[-1] if log else {}
    summary = {"run_dir": run_dir, "method": cfg["method"], "stop_reason": stop, "steps": len(log),
               "computations": last_rec.get("computations", 0), "lower_iterations": last_rec.get("lower_iters", 0),
               "cg_iterations": last_rec.get("cg_iters", 0), "lower_cap_hits": last_rec.get("lower_cap_hits", 0),
               "cg_cap_hits": last_rec.get("cg_cap_hits", 0), "train_seconds": last_rec.get("time", 0.0),
               "test_psnr_initial": evals[0]["test_psnr"], "test_psnr_final": evals[-1]["test_psnr"],
               "scores": scores, "evals": evals}
    figures.save_json(os.path.join(run_dir, "summary.json"), summary)
    return summary


def main(argv: list[str]) -> int:
    try:
        cfg, _ = config.parse_argv(DEFAULTS, argv, RENAMED)
        # Ctrl-C must raise KeyboardInterrupt even when SIGINT was inherited as ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
        s = run(cfg)
    except config.ConfigError as e:
        config.fail(_PROG, e)
    if s["stop_reason"] == "interrupted":
        return 130
    sc = s["scores"]
    print(f"\n{'test set (mean)':22s} {'PSNR [dB]':>10s} {'SSIM':>7s}")
    for k, v in sc.items():
        print(f"{k:22s} {v['psnr']:10.2f} {v['ssim']:7.4f}")
    print(f"{s['method']}: {s['steps']} steps, stop: {s['stop_reason']}, {s['lower_iterations']} lower + "
          f"{s['cg_iterations']} CG iterations, {s['train_seconds']:.1f} s training")
    if s["lower_cap_hits"] or s["cg_cap_hits"]:
        print(f"warning: {s['lower_cap_hits']} lower-level and {s['cg_cap_hits']} CG solves hit their caps "
              f"(lower_iter, cg_iter)", file=sys.stderr)
    print(s["run_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
