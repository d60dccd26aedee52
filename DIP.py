"""Deep image prior for (semi-)blind deblurring, with no-reference early stopping (SPEC §7).

    python DIP.py                                  # defaults below (CPU-sized: 128×128, 1000 iterations)
    python DIP.py --setting=semiblind --learn_kernel=true --beta=0.1
    python DIP.py --quick=true                     # 64×64, ≤ 3 minutes on 2 cores
    python DIP.py presets/dip_gpu.py               # full size on a GPU
    python DIP.py --resume=Results/<run>/checkpoint.pt

    import DIP; summary = DIP.run(image="coffee", iterations=500)      # importable, no side effects

The data are exactly those of ``ADP.py`` (same names and meanings of ``image`` … ``seed``, made by
:func:`imaging.make_data`).  The reconstruction is ``x_k = G_{θ_k}(z)`` with a generator ``G``,
a fixed random input ``z`` and weights ``θ`` fitted by Adam to

    L(θ, b) = ‖B_b G_θ(z) − y‖² / n  (+ β ‖b − b₀‖²_{H¹} when the kernel is learned),

``n`` the number of entries of ``y`` (the normalisation of ADP-β's upper level), ``B_b`` the
package's circular blur (:class:`operators.Blur`; ``tests/test_dip.py`` checks it against deepinv's
``BlurFFT``).  With ``learn_kernel`` (semi-blind DIP) ``b`` is learned jointly on the simplex, see
:class:`SimplexKernel`.

**Generator.**  deepinv 0.5.0 offers ``DeepImagePrior`` (a reconstructor that runs a fixed number
of Adam steps on ``MCLoss`` and returns only the last output: no per-iteration hook for early
stopping, no input-noise perturbation, no joint kernel, so the loop is written here) and two
usable generators: ``ConvDecoder`` (Darestani & Heckel: upsample + 3×3 conv + ReLU + BatchNorm
layers from a small ``in_size`` grid; deepinv's recommended DIP network) and ``UNet`` (an
encoder–decoder with skips, closest to Ulyanov et al.'s skip network).  Both are options
(``generator``); the default is ``unet`` (widths 16, 32, 64, 128 over 4 scales) on the
measurements in the README (DIP section): on astronaut, motion, 1000 iterations at 128×128 it
reached 26.45 dB against ConvDecoder's 25.30 (width 64, depth 6, deepinv's recommended DIP
network), and at 64×64 it peaked higher too (25.40 against 24.73 dB) and then overfitted, which
is what the stopping rule is for.  The output goes through a
sigmoid (as in Ulyanov et al.) so ``x ∈ (0, 1)``; no pretrained weights exist or are loaded.

**Early stopping.**  Every iterate is fed to ES-WMV and ES-EMV (:mod:`early_stopping`); the run
reports PSNR/SSIM at the ES-WMV selection (``es``), at the PSNR-best iterate in hindsight
(``best``, the oracle that needs the ground truth) and at the last iterate, and the detection gap
(best − es, in dB and iterations).  With ``stop_early`` the loop ends when ES-WMV's patience runs
out; by default it runs all ``iterations`` so that the oracle and the last iterate are known.
``x_k`` is the output of the forward pass of iteration k (the input perturbed when ``input_noise``
> 0), computed before that iteration's Adam step, so it costs nothing extra.

Ctrl-C ends the loop after the current iteration (a second Ctrl-C aborts at once): the outputs
are written from the best-so-far iterates together with a resumable ``checkpoint.pt``.
"""
import math
import os
import signal
import sys
import threading
import time

# ------------------------------------------------------------------------------------------
# configuration (override any of these with --name=value)
# ------------------------------------------------------------------------------------------
# data (as in ADP.py)
image = "astronaut"        # bundled sample in images/ (astronaut, coffee, chelsea, rocket) or a PNG/JPEG path
size_x = 128               # image width after resizing (pixels); ADP.py's 256 for full size (GPU, see README)
size_y = 128               # image height after resizing (pixels)
channels = 3               # 3: colour, 1: grey
setting = "motion"         # motion | gaussian | disc | semiblind
kernel_size = 5            # odd kernel size k
blur_sigma = 1.0           # σ of the 'gaussian' setting
semiblind_sigma = 0.5      # σ of the unknown extra Gaussian in the 'semiblind' setting
noise_level = 5 / 255      # standard deviation of the Gaussian noise
seed = 0                   # seed of the noise
# generator x = sigmoid(G_θ(z))
generator = "unet"         # unet (deepinv UNet, skip connections) | convdecoder (deepinv ConvDecoder; try width=64, depth=6)
width = 16                 # channels at the first scale, doubled per scale (unet) / channels per layer (convdecoder)
depth = 4                  # scales (unet; sizes must be divisible by 2^(depth−1)) / layers (convdecoder)
net_seed = 0               # seed of the weights and of z
input_noise = 0.0          # σ of the fresh perturbation of z at every iteration (Ulyanov et al.'s reg_noise_std; 0: off)
# optimisation
iterations = 1000          # Adam iterations (PSNR still rises slowly at 1000 with the defaults; see README)
lr = 0.01                  # Adam learning rate of θ
# semi-blind DIP: learn b on the simplex, b = softmax(φ), φ₀ = log(b₀ + kernel_floor)
learn_kernel = False       # learn the kernel jointly with θ (use with setting=semiblind)
kernel_lr = 0.01           # Adam learning rate of φ
kernel_floor = 1e-3        # added to b₀ before the log (b₀ has exact zeros); see SimplexKernel
beta = 0.0                 # β, weight of the H¹ penalty ‖b − b₀‖²_{H¹} (as in ADP-β); 0: off
# early stopping (SPEC §7)
es_window = 100            # W of ES-WMV
es_patience = 1000         # P: stop when the variance minimum is P iterations old
es_alpha = 0.1             # a of ES-EMV
stop_early = False         # end the loop when ES-WMV's patience runs out (False: run all iterations, report the oracle too)
# output and machine
quick = False              # small check: 64×64, 500 iterations (settings given explicitly win)
results_dir = "Results"    # a new folder is made inside for every run
device = "auto"            # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps (float32 throughout)
threads = 0                # CPU threads for torch (0: torch's default); 1 is much faster on an overloaded machine
resume = ""                # path to a checkpoint.pt (or its run folder) to continue an interrupted run
progress = True            # tqdm progress bar and the printed table
# ------------------------------------------------------------------------------------------
import config  # noqa: E402
from config import ConfigError, check, finite_positive, valid_seed  # noqa: E402

DEFAULTS = config.defaults(globals())      # the constants above, in order

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import figures  # noqa: E402
from early_stopping import ExponentialVariance, WindowedVariance  # noqa: E402
from imaging import make_data, psnr_ssim, resolve_device  # noqa: E402
from operators import Blur, h1_penalty  # noqa: E402

PROG = "DIP.py"
_IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "images")
_MIN_SIZE = 11                       # SSIM's Gaussian window (σ = 1.5) is 11×11
_QUICK = {"size_x": 64, "size_y": 64, "iterations": 500}
_RUN_LOCAL = ("results_dir", "device", "threads", "resume", "progress")
_RESUME_OVERRIDES = _RUN_LOCAL + ("iterations", "stop_early")
SETTINGS = ("motion", "gaussian", "disc", "semiblind")
GENERATORS = ("convdecoder", "unet")
DTYPE = torch.float32


def effective_config(cfg: dict, given: dict | None = None) -> dict:
    """``cfg`` with the ``quick`` sizes applied to the settings not ``given`` explicitly (what the
    run actually uses)."""
    if not cfg["quick"]:
        return dict(cfg)
    return dict(cfg, **{k: v for k, v in _QUICK.items() if k not in (given or {})})


def validate(cfg: dict) -> None:
    """Check every setting before anything is computed or written (one clear message each)."""
    config.validate_data(cfg, SETTINGS, _MIN_SIZE)
    check(cfg["generator"] in GENERATORS, f"unknown generator {cfg['generator']!r}; use one of {', '.join(GENERATORS)}")
    if cfg["generator"] == "unet":
        f = 2 ** (cfg["depth"] - 1)
        check(cfg["size_x"] % f == 0 and cfg["size_y"] % f == 0,
              f"the unet generator with depth={cfg['depth']} needs sizes divisible by {f}, got "
              f"{cfg['size_y']}×{cfg['size_x']}; change --size_x/--size_y or lower --depth")
    valid_seed(cfg["net_seed"])
    finite_positive("input_noise", cfg["input_noise"], allow_zero=True)
    finite_positive("beta", cfg["beta"], allow_zero=True)
    for name in ("lr", "kernel_lr", "kernel_floor"):
        finite_positive(name, cfg[name])
    check(cfg["threads"] >= 0, f"threads must be ≥ 0 (0: torch's default), got {cfg['threads']}")
    for name in ("iterations", "width", "depth", "es_patience"):
        check(cfg[name] >= 1, f"{name} must be a positive integer, got {cfg[name]}")
    check(cfg["depth"] >= 2, f"depth must be at least 2, got {cfg['depth']}")
    check(cfg["es_window"] >= 2, f"es_window must be an integer ≥ 2, got {cfg['es_window']}")
    check(0 < cfg["es_alpha"] < 1, f"es_alpha must lie strictly between 0 and 1, got {cfg['es_alpha']}")


# ------------------------------------------------------------------------------------------
# the model: generator, input, kernel
# ------------------------------------------------------------------------------------------
def make_generator(cfg: dict, dev) -> tuple[torch.nn.Module, torch.Tensor]:
    """``(G, z)``: a freshly initialised deepinv generator and its fixed input, both from ``net_seed``.

    ``convdecoder``: ``ConvDecoder(img_size=(C, H, W), in_size=(H/32, W/32) (≥ 2), layers=depth,
    channels=width)`` with ``z ~ N(0, I)`` of shape ``(1, width, *in_size)``.  ``unet``:
    ``UNet(32 → C, scales=depth, widths width·2^s, no residual)`` with ``z ~ U(0, 0.1)`` of shape
    ``(1, 32, H, W)`` (Ulyanov et al.'s input).
    """
    from deepinv.models import ConvDecoder, UNet

    C, H, W = cfg["channels"], cfg["size_y"], cfg["size_x"]
    gen = torch.Generator().manual_seed(cfg["net_seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["net_seed"])
        if cfg["generator"] == "convdecoder":
            in_size = (max(2, H // 32), max(2, W // 32))
            net = ConvDecoder(img_size=(C, H, W), in_size=in_size, layers=cfg["depth"], channels=cfg["width"])
            z = torch.randn((1, cfg["width"]) + in_size, generator=gen)
        else:
            widths = [cfg["width"] * 2 ** s for s in range(cfg["depth"])]
            net = UNet(in_channels=32, out_channels=C, residual=False, scales=cfg["depth"], channels_per_scale=widths)
            z = 0.1 * torch.rand((1, 32, H, W), generator=gen)
    return net.to(dev, DTYPE), z.to(dev, DTYPE)


class SimplexKernel(torch.nn.Module):
    """A learned kernel on the simplex: ``b_c = softmax(φ_c)`` over the k×k entries of each channel,
    so ``b ≥ 0`` and ``Σ b_c = 1`` exactly, whatever ``φ``.

    Initialisation ``φ₀ = log(b₀ + f)`` (``f = kernel_floor``): ``b₀`` has exact zeros (the motion
    kernel is 5 entries of 0.2 among 25), whose logits would be −∞.  Then
    ``b(φ₀) = (b₀ + f) / (1 + k²f)``: the start is ``b₀`` mixed with the uniform kernel, with weight
    ``k²f/(1 + k²f)`` on the uniform part (2.4 % for k = 5, f = 1e-3).  ``f`` also sets how fast
    entries that ``b₀`` has at zero can grow: ``∂b_j/∂φ_j = b_j(1 − b_j) ≈ f`` there, and with Adam
    (step ≈ ``kernel_lr`` in φ whatever the gradient's size) an entry needs about
    ``log(target/f)/kernel_lr`` iterations to reach ``target`` (≈ 400 for 0.05 with the defaults).
    """

    def __init__(self, b0: torch.Tensor, floor: float):
        super().__init__()
        self.shape = b0.shape
        self.logits = torch.nn.Parameter(torch.log(b0 + floor).reshape(b0.shape[0], -1))

    def forward(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=1).reshape(self.shape)


def data_fit(x: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``‖B_b x − y‖² / n``, ``n`` = number of entries of ``y``."""
    r = Blur(b, y.shape[-2:]).A(x) - y
    return (r * r).sum() / y.numel()


# ------------------------------------------------------------------------------------------
# the iteration state (everything a checkpoint holds)
# ------------------------------------------------------------------------------------------
class Oracle:
    """The PSNR-best iterate in hindsight (needs the ground truth; for reporting only)."""

    def __init__(self):
        self.psnr, self.iter, self.x = -math.inf, None, None

    def update(self, x: torch.Tensor, psnr: float, k: int) -> None:
        if psnr > self.psnr:
            self.psnr, self.iter, self.x = psnr, k, x.detach().clone()


class DIPState:
    """Generator, input, optional kernel, Adam, detectors, oracle, history and the iteration count."""

    def __init__(self, cfg: dict, b0: torch.Tensor, dev):
        self.net, self.z = make_generator(cfg, dev)
        self.kernel = SimplexKernel(b0, cfg["kernel_floor"]).to(dev) if cfg["learn_kernel"] else None
        groups = [{"params": self.net.parameters(), "lr": cfg["lr"]}]
        if self.kernel is not None:
            groups.append({"params": self.kernel.parameters(), "lr": cfg["kernel_lr"]})
        self.opt = torch.optim.Adam(groups)
        self.wmv = WindowedVariance(cfg["es_window"], cfg["es_patience"])
        self.emv = ExponentialVariance(cfg["es_alpha"], cfg["es_patience"])
        self.oracle = Oracle()
        self.noise = torch.Generator().manual_seed((cfg["net_seed"] + 1) % 2**63)   # not z's stream
        self.history: list[dict] = []
        self.k = 0
        self.last_x: torch.Tensor | None = None
        self.seconds = 0.0

    _MODULES = ("net", "kernel", "opt")

    def payload(self, cfg: dict) -> dict:
        """Everything needed to continue exactly (module weights as state dicts)."""
        out = {k: v for k, v in vars(self).items() if k not in self._MODULES and k != "noise"}
        out.update({k: getattr(self, k).state_dict() for k in self._MODULES if getattr(self, k) is not None})
        out["noise"] = self.noise.get_state()
        return {"config": cfg, "state": out}

    def load(self, state: dict, dev) -> None:
        for k in self._MODULES:
            if getattr(self, k) is not None:
                getattr(self, k).load_state_dict(state[k])
        self.noise.set_state(state["noise"])
        for k, v in state.items():
            if k not in self._MODULES and k != "noise":
                setattr(self, k, v.to(dev) if torch.is_tensor(v) else v)
        self.wmv.to(dev)
        self.emv.to(dev)
        if self.oracle.x is not None:
            self.oracle.x = self.oracle.x.to(dev)

    def kernel_now(self, b0: torch.Tensor) -> torch.Tensor:
        return b0 if self.kernel is None else self.kernel()


class _DeferredInterrupt:
    """During the loop a first Ctrl-C only sets ``hit`` (the loop ends after the current iteration,
    so the checkpoint is consistent); a second one raises ``KeyboardInterrupt`` at once.  Only the
    main thread can install signal handlers; elsewhere Ctrl-C is not intercepted."""

    def __enter__(self):
        self.hit = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def dip_step(st: DIPState, cfg: dict, y: torch.Tensor, b0: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One Adam step on ``L(θ, b)``; returns ``(x_k, L)`` with ``x_k`` the forward pass's output."""
    z = st.z
    if cfg["input_noise"] > 0:
        z = z + cfg["input_noise"] * torch.randn(z.shape, generator=st.noise).to(z.device, z.dtype)
    x = torch.sigmoid(st.net(z))[0]
    b = st.kernel_now(b0)
    loss = data_fit(x, b, y)
    if st.kernel is not None and cfg["beta"] > 0:
        loss = loss + cfg["beta"] * h1_penalty(b, b0)
    st.opt.zero_grad(set_to_none=True)
    loss.backward()
    st.opt.step()
    return x.detach(), loss.item()


def iterate(st: DIPState, cfg: dict, y, b0, x_true, bar) -> str:
    """Run DIP until ``iterations`` (or ES-WMV's stop with ``stop_early``, or Ctrl-C); returns the
    reason: ``'iterations'``, ``'early_stop'``, ``'interrupted'`` or ``'non_finite'``."""
    from deepinv.loss.metric import PSNR
    psnr = PSNR(max_pixel=1.0)
    t0 = time.perf_counter() - st.seconds
    with _DeferredInterrupt() as ctrl_c:
        while st.k < cfg["iterations"]:
            x, loss = dip_step(st, cfg, y, b0)
            if not math.isfinite(loss):
                return "non_finite"
            st.k += 1
            st.last_x = x
            p = psnr(x.clamp(0, 1)[None], x_true[None]).item()
            st.oracle.update(x, p, st.k)
            stop = st.wmv.update(x)
            st.emv.update(x)
            st.history.append({"iter": st.k, "loss": loss, "psnr": p, "var_wmv": st.wmv.value, "var_emv": st.emv.value})
            st.seconds = time.perf_counter() - t0
            bar.update(1)
            if st.k % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3g}", psnr=f"{p:.2f}", best=st.oracle.iter, es=st.wmv.best_iter)
            if ctrl_c.hit:
                return "interrupted"
            if stop and cfg["stop_early"]:
                return "early_stop"
    return "iterations"


# ------------------------------------------------------------------------------------------
# configuration and checkpoint
# ------------------------------------------------------------------------------------------
def resolve_config(given: dict) -> tuple[dict, dict | None]:
    """``(cfg, checkpoint)``: the defaults updated with ``given``; with ``resume``, the checkpoint's
    saved settings instead, of which only ``_RESUME_OVERRIDES`` may differ
    (:func:`config.resume_config`)."""
    cfg = config.resolve(DEFAULTS, given)
    if not cfg["resume"]:
        return cfg, None
    ckpt = config.load_checkpoint(cfg["resume"], PROG, state_keys=("net",))
    return config.resume_config(DEFAULTS, given, ckpt["config"], _RUN_LOCAL, _RESUME_OVERRIDES), ckpt


def _say(cfg: dict, *args, **kw) -> None:
    if cfg["progress"]:
        print(*args, **kw)


# ------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------
def run(cfg: dict | None = None, **overrides) -> dict:
    """One DIP run; returns the summary (also written to ``summary.json``): ``psnr_es``,
    ``ssim_es``, ``psnr_best``, ``ssim_best``, ``psnr_last``, ``ssim_last``, ``stop_iter`` (the
    ES-WMV selection), ``best_iter``, ``gap_db``, ``gap_iters``, the ES-EMV counterparts, ``seconds``
    (loop time) and more.  Raises :class:`config.ConfigError` on bad input before anything is
    written.  A Ctrl-C during the loop is not raised: outputs and a checkpoint are written and the
    summary has ``interrupted = True``.
    """
    t_start = time.perf_counter()
    given = {**(cfg or {}), **overrides}
    cfg, ckpt = resolve_config(given)
    run_cfg = effective_config(cfg, given)
    validate(run_cfg)
    dev = resolve_device(run_cfg["device"], "float32")
    threads_before = torch.get_num_threads()
    try:
        torch.set_num_threads(run_cfg["threads"] or threads_before)
        return _run(cfg, run_cfg, ckpt, dev, t_start)
    finally:                                   # an importing caller keeps its own thread count
        torch.set_num_threads(threads_before)


def _run(cfg: dict, run_cfg: dict, ckpt: dict | None, dev, t_start: float) -> dict:
    """The run proper, after the checks: data, model (restored from ``ckpt``), loop, outputs."""
    try:
        x_true, b0, y = make_data(run_cfg, _IMAGES, dev, DTYPE)
    except ValueError as e:
        raise ConfigError(f"cannot build the data: {e}") from None
    st = DIPState(run_cfg, b0, dev)
    if ckpt is not None:
        st.load(ckpt["state"], dev)

    name = time.strftime("%Y%m%d-%H%M%S") + f"_dip_{run_cfg['setting']}_{os.path.splitext(os.path.basename(run_cfg['image']))[0]}"
    run_dir = config.make_run_dir(run_cfg["results_dir"], name)
    figures.save_json(os.path.join(run_dir, "config.json"),
                      dict(cfg, effective=run_cfg, device_resolved=str(dev), resumed_from=cfg["resume"] or None,
                           torch=torch.__version__, threads=torch.get_num_threads()))
    _say(cfg, f"DIP ({run_cfg['generator']}, {sum(p.numel() for p in st.net.parameters())} weights"
              f"{', kernel learned' if run_cfg['learn_kernel'] else ''}): {run_cfg['setting']} blur, "
              f"{os.path.basename(run_cfg['image'])} {run_cfg['channels']}×{run_cfg['size_y']}×{run_cfg['size_x']}, "
              f"σ = {run_cfg['noise_level']:.4g}, device {dev}, float32, {torch.get_num_threads()} threads")
    bar = tqdm(total=run_cfg["iterations"], initial=st.k, desc="DIP", unit="it", dynamic_ncols=True,
               disable=not cfg["progress"])
    reason = iterate(st, run_cfg, y, b0, x_true, bar)
    bar.close()
    return _outputs(cfg, run_cfg, run_dir, st, x_true, y, b0, reason, t_start)


def _scores(x, x_true) -> dict:
    p, s = psnr_ssim(x, x_true)
    return {"psnr": p, "ssim": s}


def _outputs(cfg, run_cfg, run_dir, st: DIPState, x_true, y, b0, reason, t_start) -> dict:
    """Write log, reconstructions, checkpoint, figures and summary into ``run_dir``; return the summary."""
    x_es, k_es = st.wmv.best()
    x_emv, k_emv = st.emv.best()
    if x_es is None:                  # fewer than W iterations: ES-WMV has not selected anything
        x_es, k_es = st.last_x if st.last_x is not None else y, st.k
    if x_emv is None:
        x_emv, k_emv = x_es, k_es
    x_last = st.last_x if st.last_x is not None else y
    x_best = st.oracle.x if st.oracle.x is not None else x_last
    sc = {"blurry": _scores(y, x_true), "es": _scores(x_es, x_true), "best": _scores(x_best, x_true),
          "last": _scores(x_last, x_true), "emv": _scores(x_emv, x_true)}
    b = st.kernel_now(b0).detach()
    summary = {"psnr_es": sc["es"]["psnr"], "ssim_es": sc["es"]["ssim"], "psnr_best": sc["best"]["psnr"],
               "ssim_best": sc["best"]["ssim"], "psnr_last": sc["last"]["psnr"], "ssim_last": sc["last"]["ssim"],
               "psnr_blurry": sc["blurry"]["psnr"], "ssim_blurry": sc["blurry"]["ssim"],
               "stop_iter": k_es, "best_iter": st.oracle.iter or st.k, "es_triggered": st.wmv.stop,
               "gap_db": sc["best"]["psnr"] - sc["es"]["psnr"], "gap_iters": (st.oracle.iter or st.k) - k_es,
               "psnr_emv": sc["emv"]["psnr"], "ssim_emv": sc["emv"]["ssim"], "stop_iter_emv": k_emv,
               "emv_triggered": st.emv.stop, "iterations_done": st.k, "stop_reason": reason,
               "kernel_change": (torch.linalg.vector_norm(b - b0) / torch.linalg.vector_norm(b0)).item(),
               "seconds": st.seconds, "seconds_per_iter": st.seconds / max(st.k, 1),
               "total_seconds": time.perf_counter() - t_start}
    figures.save_csv(os.path.join(run_dir, "log.csv"), st.history)
    figures.save_torch(os.path.join(run_dir, "reconstructions.pt"),
                       {"x_es": x_es.cpu(), "x_best": x_best.cpu(), "x_last": x_last.cpu(), "x_emv": x_emv.cpu(),
                        "kernel": b.cpu(), "b0": b0.cpu()})
    # the checkpoint keeps the sizes actually used (quick already applied), so a resume reproduces them
    figures.save_torch(os.path.join(run_dir, "checkpoint.pt"), st.payload(dict(run_cfg, quick=False)))
    panels = [("ground truth", x_true, None), ("blurry", y, sc["blurry"]),
              (f"DIP, ES-WMV stop (it. {k_es})", x_es, sc["es"]),
              (f"DIP, oracle stop (it. {summary['best_iter']})", x_best, sc["best"])]
    figures.comparison_figure([(t if s is None else f"{t}\nPSNR {s['psnr']:.2f} dB, SSIM {s['ssim']:.3f}", x)
                               for t, x, s in panels], os.path.join(run_dir, "comparison.png"))
    if st.history:
        es_curve_figure(st.history, summary, os.path.join(run_dir, "psnr_es.png"))
    if st.kernel is not None:
        figures.kernel_figure(b0, b, os.path.join(run_dir, "kernels.png"))
    figures.save_json(os.path.join(run_dir, "summary.json"), summary)
    _report(cfg, run_dir, summary, reason)
    return dict(summary, run_dir=run_dir, interrupted=reason == "interrupted", config=run_cfg)


def es_curve_figure(history: list[dict], summary: dict, path: str) -> None:
    """PSNR against iteration (left axis) with the ES-WMV variance (log scale, right axis), the
    ES-WMV selection and the PSNR-best iterate marked."""
    import matplotlib.pyplot as plt

    k = [r["iter"] for r in history]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(k, [r["psnr"] for r in history], color="C0", lw=1, label="PSNR")
    ax.axvline(summary["stop_iter"], color="C3", ls="--",
               label=f"ES-WMV selection (it. {summary['stop_iter']}, {summary['psnr_es']:.2f} dB)")
    ax.axvline(summary["best_iter"], color="C2", ls=":",
               label=f"PSNR-best (it. {summary['best_iter']}, {summary['psnr_best']:.2f} dB)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("PSNR [dB]")
    ax.grid(alpha=0.3)
    var = [(r["iter"], r["var_wmv"]) for r in history if r["var_wmv"] is not None and r["var_wmv"] > 0]
    if var:
        ax2 = ax.twinx()
        ax2.semilogy(*zip(*var), color="C1", lw=1, label="ES-WMV variance")
        ax2.set_ylabel("windowed variance VAR_k")
        ax2.legend(loc="lower right", fontsize=8)
    ax.legend(loc="lower center", fontsize=8)
    ax.set_title(f"DIP: PSNR and ES-WMV variance (gap {summary['gap_db']:.2f} dB, {summary['gap_iters']} iterations)")
    fig.tight_layout()
    figures.save_figure(fig, path)


def _report(cfg, run_dir, s, reason) -> None:
    """The printed table (with ``progress``), warnings, the run folder and the last line."""
    _say(cfg, f"\n{'':24s} {'PSNR [dB]':>10s} {'SSIM':>7s} {'iteration':>10s}")
    for label, key, it in [("blurry", "blurry", ""), ("DIP, ES-WMV selection", "es", s["stop_iter"]),
                           ("DIP, ES-EMV selection", "emv", s["stop_iter_emv"]),
                           ("DIP, PSNR-best (oracle)", "best", s["best_iter"]),
                           ("DIP, last iterate", "last", s["iterations_done"])]:
        _say(cfg, f"{label:24s} {s['psnr_' + key]:10.2f} {s['ssim_' + key]:7.4f} {it!s:>10s}")
    _say(cfg, f"detection gap (best − ES-WMV): {s['gap_db']:.2f} dB, {s['gap_iters']} iterations; ES-WMV patience "
              f"{'ran out' if s['es_triggered'] else 'not exhausted'}; {s['iterations_done']} iterations in "
              f"{s['seconds']:.1f} s ({1000 * s['seconds_per_iter']:.1f} ms/it), stop: {reason}")
    if reason == "non_finite":
        print("warning: the DIP loss became NaN/Inf; the outputs hold the iterates before it (try a smaller --lr)",
              file=sys.stderr)
    if reason == "interrupted":
        print(f"interrupted: continue with  python DIP.py --resume={os.path.join(run_dir, 'checkpoint.pt')}")
    print(run_dir)
    print(f"dip psnr_es={s['psnr_es']:.2f} psnr_best={s['psnr_best']:.2f} psnr_last={s['psnr_last']:.2f} "
          f"stop_iter={s['stop_iter']} best_iter={s['best_iter']}")


def main(argv: list[str]) -> int:
    """The command line: presets and ``--name=value`` overrides, one-line errors (exit 2)."""
    try:
        _, explicit = config.parse_argv(DEFAULTS, argv)
        summary = run(explicit)
    except ConfigError as e:
        config.fail(PROG, e)
    except KeyboardInterrupt:
        return 130
    return 130 if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
