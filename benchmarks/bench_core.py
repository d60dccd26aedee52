"""Core speed benchmark: closed-form lower level vs autograd, and blur implementations.

Run from the repository root (CPU, float32, 3×256×256 by default)::

    python benchmarks/bench_core.py [--size 256] [--threads N] [--repeats R] [--dtype float64]

Section 1 times, on the same data and in the same run,

* one lower-level iteration — the marginal cost of one iteration of the real solver,
  ``(T(n) − T(0)) / n`` where ``T(n)`` is the time of ``lower_level.fista`` run for ``n``
  iterations with tolerance 0 (it never stops early): per iteration the gradient of ``h``, its
  norm (the stopping test, one host sync) and the update ``x⁺ = y − ∇h(y)/L``,
  ``y⁺ = x⁺ + β(x⁺ − x)``;
* one Hessian-vector product ``∇²ₓₓh(x) v``,

for our closed form (``LowerLevel.grad`` / ``LowerLevel.hvp``) and for plain autograd on the
*same* objective ``h(x) = ½‖B_b x − y‖² + R(x) + (μ₀/2)‖x‖²``, ``R = SmoothedTV(α, γ)`` (the fused
fast path), written with the same forward operators (``LowerLevel.value``: our FFT blur, our
finite differences):

* autograd gradient: ``torch.autograd.grad(h(x), x)``;
* autograd HVP by double backward, in the two situations that occur: (a) a product at a new
  ``x`` — the gradient graph is built for it (our closed form recomputes its TV curvature);
  (b) repeated products at a fixed ``x``, as in conjugate gradient — the graph of ``∇h(x)`` is
  built once (``create_graph=True``) and reused (``retain_graph=True``), and our closed form
  reuses its cached curvature.  The reported HVP ratio is the *smaller* of the two ratios, so
  autograd is not handicapped.

Section 2 times the circular blur ``B_b`` (forward, and ``B_bᵀB_b`` which the inner loops use)
through deepinv's physics (``BlurFFT`` with a per-channel filter, ``Blur(padding='circular')``),
a direct ``conv2d`` on a circularly padded image, and our ``operators.Blur``, after checking that
all four compute the same centred circular convolution (deepinv and we both use the convolution
convention — no flip needed for deepinv; the direct ``F.conv2d`` is a correlation, so its
kernel is flipped).

Every time is the median over ``--repeats`` rounds in which the implementations are
interleaved (the machine is shared, absolute numbers are noisy; ratios taken within a round
are the meaningful output).  The last line is ``speedup iteration=<r> hvp=<r>``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lower_level import LowerLevel, fista  # noqa: E402
from operators import Blur, motion_kernel  # noqa: E402
from regularisers import SmoothedTV  # noqa: E402

# lower-level parameters of every benchmark: ADP.py's defaults when this was written (TV weight α,
# TV smoothing γ, μ₀); the timings hardly depend on them
TV_WEIGHT, TV_SMOOTHING, MU0 = 0.005, 0.01, 1e-2
# one timed sample of the lower-level iteration = this many solver iterations (time divided by it)
ITERS_PER_SAMPLE = 5


# --------------------------------------------------------------------------------------------
# timing helper
# --------------------------------------------------------------------------------------------
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict, repeats: int = 7, number: int = 5, warmup: int = 2, device="cpu") -> dict:
    """Median seconds per call of each function in ``fns`` (name → zero-argument callable).

    Each of ``repeats`` rounds runs every function ``number`` times in turn (order rotated per
    round), so slow phases of a shared machine hit all implementations alike.  Returns
    ``{name: median seconds per call}``.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    _sync(device)
    samples = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = fns[name]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / number)
    return {n: statistics.median(s) for n, s in samples.items()}


def ms(t: float) -> str:
    return f"{1e3 * t:9.3f}"


# --------------------------------------------------------------------------------------------
# the benchmark problem
# --------------------------------------------------------------------------------------------
def make_problem(size: int = 256, channels: int = 3, dtype=torch.float32, device="cpu", seed: int = 0,
                 kernel_size: int = 5) -> SimpleNamespace:
    """A deblurring lower level ``h`` at ``channels×size×size``: a smooth random image blurred by
    the 5×5 diagonal motion kernel plus noise; a point ``x`` (= ``y``) and a direction ``v`` for
    the Hessian-vector product."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, channels, max(size // 16, 2), max(size // 16, 2), generator=g, dtype=torch.float64)
    x_true = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]
    x_true = (x_true + 0.05 * torch.rand(channels, size, size, generator=g, dtype=torch.float64)).clamp(0, 1)
    noise = torch.randn(channels, size, size, generator=g, dtype=torch.float64)
    v = torch.randn(channels, size, size, generator=g, dtype=torch.float64)
    b = motion_kernel(kernel_size, channels=channels, dtype=dtype, device=device)
    x_true = x_true.to(dtype=dtype, device=device)
    y = Blur(b, (size, size)).A(x_true) + 0.02 * noise.to(dtype=dtype, device=device)
    h = LowerLevel(b, y, SmoothedTV(TV_WEIGHT, TV_SMOOTHING), MU0)
    return SimpleNamespace(h=h, b=b, y=y, x=y.clone(), v=v.to(dtype=dtype, device=device))


# --------------------------------------------------------------------------------------------
# one FISTA step and one HVP: closed form vs autograd
# --------------------------------------------------------------------------------------------
def fista_iterations(grad_fn, h: LowerLevel, x0: torch.Tensor, n: int):
    """``n`` iterations of the real solver loop (``lower_level.fista``: gradient, its norm for the
    stopping test, the momentum update), never stopping early (tolerance 0)."""
    return fista(grad_fn, x0, h.L, h.mu, 0.0, n)


def autograd_grad(h: LowerLevel, x: torch.Tensor) -> torch.Tensor:
    """``∇ₓh`` by reverse mode on ``h.value`` (the same forward operators as the closed form)."""
    xr = x.detach().requires_grad_(True)
    return torch.autograd.grad(h.value(xr), xr)[0]


def autograd_hvp(h: LowerLevel, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``∇²ₓₓh(x) v`` by double backward, building the gradient graph for this product."""
    xr = x.detach().requires_grad_(True)
    g = torch.autograd.grad(h.value(xr), xr, create_graph=True)[0]
    return torch.autograd.grad(g, xr, grad_outputs=v)[0]


class AutogradHVPOperator:
    """``v ↦ ∇²ₓₓh(x) v`` by double backward with the graph of ``∇ₓh(x)`` built once for a fixed
    ``x`` and reused (``retain_graph=True``) — the natural autograd operator for CG."""

    def __init__(self, h: LowerLevel, x: torch.Tensor):
        self.xr = x.detach().requires_grad_(True)
        self.g = torch.autograd.grad(h.value(self.xr), self.xr, create_graph=True)[0]

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(self.g, self.xr, grad_outputs=v, retain_graph=True)[0]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30)).item()


def bench_lower_level(size: int = 256, channels: int = 3, dtype=torch.float32, device="cpu",
                      repeats: int = 7, number: int = 5) -> dict:
    """Times (s) of one lower-level iteration and one HVP, closed form vs autograd, plus
    agreement checks.

    HVPs are timed in the two situations that occur: a product at a new ``x`` (closed form
    recomputes its TV curvature; autograd builds the gradient graph: ``hvp_closed_fresh`` vs
    ``hvp_autograd_rebuild``), and repeated products at a fixed ``x`` as in conjugate gradient
    (closed form reuses its cached curvature; autograd reuses the retained graph: ``hvp_closed``
    vs ``hvp_autograd_reuse``).  ``hvp_speedup`` is the smaller of the two ratios.

    ``fft_pair`` is the time of one ``rfft2`` + ``irfft2`` pair alone: the floor of both closed-form
    operations, which need exactly one such pair each.

    Returns a dict with those keys and ``iter_closed``, ``iter_autograd``,
    ``iteration_speedup``, ``hvp_speedup_fresh``, ``hvp_speedup_fixed``, ``hvp_speedup``,
    ``grad_rel_err``, ``hvp_rel_err``.
    """
    P = make_problem(size, channels, dtype, device)
    h, x, v = P.h, P.x, P.v
    op = AutogradHVPOperator(h, x)
    xs, turn = [x, x.clone()], [0]

    def hvp_fresh():                    # alternate between two tensors: the cache never hits
        turn[0] ^= 1
        return h.hvp(xs[turn[0]], v)

    checks = dict(grad_rel_err=_rel_err(h.grad(x), autograd_grad(h, x)),
                  hvp_rel_err=max(_rel_err(h.hvp(x, v), autograd_hvp(h, x, v)), _rel_err(h.hvp(x, v), op(v))))
    n = ITERS_PER_SAMPLE
    ag = lambda z: autograd_grad(h, z)  # noqa: E731
    t = time_interleaved({
        "iter_closed": lambda: fista_iterations(h.grad, h, x, n),
        "iter_closed_0": lambda: fista_iterations(h.grad, h, x, 0),
        "iter_autograd": lambda: fista_iterations(ag, h, x, n),
        "iter_autograd_0": lambda: fista_iterations(ag, h, x, 0),
        "hvp_closed": lambda: h.hvp(x, v),
        "hvp_closed_fresh": hvp_fresh,
        "hvp_autograd_rebuild": lambda: autograd_hvp(h, x, v),
        "hvp_autograd_reuse": lambda: op(v),
        "fft_pair": lambda: torch.fft.irfft2(torch.fft.rfft2(x), s=x.shape[-2:]),
    }, repeats=repeats, number=number, device=device)
    t["iter_closed"] = (t["iter_closed"] - t.pop("iter_closed_0")) / n
    t["iter_autograd"] = (t["iter_autograd"] - t.pop("iter_autograd_0")) / n
    t["iteration_speedup"] = t["iter_autograd"] / t["iter_closed"]
    t["hvp_speedup_fresh"] = t["hvp_autograd_rebuild"] / t["hvp_closed_fresh"]
    t["hvp_speedup_fixed"] = t["hvp_autograd_reuse"] / t["hvp_closed"]
    t["hvp_speedup"] = min(t["hvp_speedup_fresh"], t["hvp_speedup_fixed"])
    t.update(checks)
    t["dtype"] = dtype
    return t


def print_lower_level(t: dict, size: int, channels: int, device, label_device: bool = False) -> None:
    dev = f"{str(device):>6} " if label_device else ""
    hdr = f"{'device':>6} " if label_device else ""
    dt = str(t.get("dtype", "")).replace("torch.", "")
    print(f"{hdr}{f'operation ({channels}x{size}x{size}, {dt})':<44}{'closed ms':>10}{'autograd ms':>12}{'speedup':>9}")
    print(f"{dev}{'lower-level iteration (one FISTA iteration)':<44}{ms(t['iter_closed']):>10}"
          f"{ms(t['iter_autograd']):>12}{t['iteration_speedup']:8.2f}x")
    print(f"{dev}{'HVP at a new x (graph rebuilt)':<44}{ms(t['hvp_closed_fresh']):>10}"
          f"{ms(t['hvp_autograd_rebuild']):>12}{t['hvp_speedup_fresh']:8.2f}x")
    print(f"{dev}{'HVP at a fixed x, as in CG (graph reused)':<44}{ms(t['hvp_closed']):>10}"
          f"{ms(t['hvp_autograd_reuse']):>12}{t['hvp_speedup_fixed']:8.2f}x")
    print(f"{dev}agreement with autograd: gradient rel. err {t['grad_rel_err']:.1e}, "
          f"HVP rel. err {t['hvp_rel_err']:.1e}")
    print(f"{dev}floor of the closed form: one rfft2+irfft2 pair = {1e3 * t['fft_pair']:.3f} ms; if the TV "
          f"stencil and the update were free the ratios would be at most "
          f"{t['iter_autograd'] / t['fft_pair']:.2f}x (iteration), "
          f"{t['hvp_autograd_reuse'] / t['fft_pair']:.2f}x (HVP at a fixed x)")


# --------------------------------------------------------------------------------------------
# blur implementations
# --------------------------------------------------------------------------------------------
class DirectCircularBlur:
    """``B_b`` by ``F.conv2d`` on a circularly padded image (depthwise, ``groups=C``).

    ``F.conv2d`` computes a correlation, so the kernel is flipped to get the convolution
    ``Σ_j b[j] x[p − j + κ]``; the adjoint is the correlation with the unflipped kernel."""

    def __init__(self, b: torch.Tensor):
        self.C, self.k = b.shape[0], b.shape[-1]
        self.w_conv = b.flip(-2, -1).contiguous()
        self.w_corr = b.contiguous()

    def _apply(self, x, w):
        p = self.k // 2
        return F.conv2d(F.pad(x, (p, p, p, p), mode="circular"), w, groups=self.C)

    def A(self, x):
        return self._apply(x, self.w_conv)

    def A_adjoint(self, y):
        return self._apply(y, self.w_corr)

    def A_adjoint_A(self, x):
        return self.A_adjoint(self.A(x))


def blur_implementations(b: torch.Tensor, shape, device="cpu") -> dict:
    """name → object with ``A``, ``A_adjoint`` and ``A_adjoint_A`` acting on (1, C, H, W) images."""
    import deepinv  # imported here: only the blur comparison needs it

    C = b.shape[0]
    filt = b.transpose(0, 1).contiguous()                  # (1, C, k, k): one filter per channel
    return {
        OURS: Blur(b, shape),
        "deepinv BlurFFT": deepinv.physics.BlurFFT(img_size=(C, *shape), filter=filt, device=device),
        "deepinv Blur(circular, conv)": deepinv.physics.Blur(filter=filt, padding="circular", device=device),
        "direct F.conv2d (circular pad)": DirectCircularBlur(b),
    }


OURS = "ours: operators.Blur (FFT)"


def bench_blur(size: int = 256, channels: int = 3, dtype=torch.float32, device="cpu", repeats: int = 7,
               number: int = 5) -> dict:
    """Times (s), per implementation, of ``B_b x``, ``B_bᵀB_b x`` and of what the lower-level
    gradient needs from the blur, the quadratic part ``B_bᵀ(B_b x − y) + μ₀x`` (with ``B_bᵀy``
    precomputed; ours is ``LowerLevel.quadratic_grad``, one FFT pair with ``μ₀`` and ``B_bᵀy``
    folded into the spectrum), plus the relative deviation of each result from ours.

    The kernel is a random, non-symmetric 5×5 kernel (so that a flipped convention would show:
    ``flip_err`` is the deviation of the direct convolution *without* the flip).
    Returns ``{name: dict(A=s, AtA=s, quad=s, err=…)}`` and ``{"flip_err": …}``."""
    P = make_problem(size, channels, dtype, device)
    g = torch.Generator().manual_seed(1)
    b = torch.rand(channels, 1, 5, 5, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    b = b / b.sum(dim=(-2, -1), keepdim=True)
    h = LowerLevel(b, P.y, SmoothedTV(TV_WEIGHT, TV_SMOOTHING), MU0)
    x, y = P.x.unsqueeze(0).contiguous(), P.y.unsqueeze(0).contiguous()
    impls = blur_implementations(b, (size, size), device)
    Bty = {name: op.A_adjoint(y) for name, op in impls.items()}
    quad = {name: (lambda op=op, name=name: op.A_adjoint_A(x) - Bty[name] + MU0 * x) for name, op in impls.items()}
    quad[OURS] = lambda: h.quadratic_grad(x)
    ref = impls[OURS]
    refs = (ref.A(x), ref.A_adjoint_A(x), h.quadratic_grad(x))
    out = {}
    for name, op in impls.items():
        out[name] = dict(err=max(_rel_err(op.A(x), refs[0]), _rel_err(op.A_adjoint_A(x), refs[1])),
                         err_quad=_rel_err(quad[name](), refs[2]))
    unflipped = DirectCircularBlur(b)
    unflipped.w_conv = b.contiguous()
    fns = {}
    for name, op in impls.items():
        fns[(name, "A")] = (lambda op=op: op.A(x))
        fns[(name, "AtA")] = (lambda op=op: op.A_adjoint_A(x))
        fns[(name, "quad")] = quad[name]
    t = time_interleaved(fns, repeats=repeats, number=number, device=device)
    for (name, which), s in t.items():
        out[name][which] = s
    return out, {"flip_err": _rel_err(unflipped.A(x), refs[0])}


def print_blur(res, size: int, channels: int, device, label_device: bool = False) -> None:
    res, extra = res
    hdr = f"{'device':>6} " if label_device else ""
    dev = f"{str(device):>6} " if label_device else ""
    ours = res[OURS]
    print(f"{hdr}{f'blur ({channels}x{size}x{size}, 5x5 kernel), ms':<34}{'B x':>8}{'BtB x':>8}"
          f"{'BtBx-Bty+mu0x':>14}{'vs ours':>9}{'rel.err':>9}")
    for name, r in res.items():
        print(f"{dev}{name:<34}{1e3 * r['A']:8.3f}{1e3 * r['AtA']:8.3f}{1e3 * r['quad']:14.3f}"
              f"{r['quad'] / ours['quad']:8.2f}x{r['err']:9.1e}")
    print(f"{dev}convention check: rel.err = max over B x and BtB x of the deviation from ours; without "
          f"the kernel flip the direct conv2d would deviate by {extra['flip_err']:.1e}; the quadratic "
          f"gradients agree to {max(r['err_quad'] for r in res.values()):.1e} (float32 cancellation)")


# --------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch.get_num_threads())")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, device {args.device}, {args.dtype}, threads {torch.get_num_threads()}, "
          f"median of {args.repeats} interleaved rounds")
    t = bench_lower_level(args.size, args.channels, dtype, args.device, repeats=args.repeats)
    print_lower_level(t, args.size, args.channels, args.device)
    print()
    print_blur(bench_blur(args.size, args.channels, dtype, args.device, repeats=args.repeats),
               args.size, args.channels, args.device)
    print()
    print(f"speedup iteration={t['iteration_speedup']:.2f} hvp={t['hvp_speedup']:.2f}")


if __name__ == "__main__":
    main()
