"""Linear operators of ADP-β: blur kernels, the blur ``B_b``, finite differences, the H¹ penalties.

Conventions (SPEC §1, notation of ``../shared/SPEC.md``):

* images ``x`` are tensors ``(C, H, W)`` (a leading batch dimension is allowed where noted);
* a kernel ``b`` is a tensor ``(C, 1, k, k)`` with ``k`` odd, one kernel per channel
  (depthwise blur, channels are never mixed);
* **boundary condition: circular.**  ``B_b`` is the centred circular convolution

      (B_b x)_c[p] = Σ_j b_c[j] x_c[p − j + κ],   κ = (k − 1)/2  (indices mod H, W),

  computed with real FFTs.  Circular boundaries make ``B_b`` diagonal in Fourier space, so the
  spectrum ``b̂`` gives ``‖B_b‖ = max|b̂|`` and the strong-convexity constant
  ``μ = μ₀ + min|b̂|²`` of the lower level exactly (SPEC §1).

Why our own FFT operator and not deepinv's blur physics (project rule: deepinv unless ours is
clearly faster or more correct).  ``benchmarks/bench_core.py`` checks that deepinv's
``BlurFFT`` (per-channel filter), deepinv's ``Blur(padding='circular')`` and a direct
circularly padded ``conv2d`` (kernel flipped) compute this same convolution (deviation ≤ 2e-7
in float32, with a non-symmetric kernel; deepinv needs no flip) and times them on 3×256×256.
On the operation the lower-level gradient needs, ``B_bᵀ(B_b x − y) + μ₀x``, ours is one FFT pair
with ``μ₀`` and ``B_bᵀy`` folded into the spectrum (:meth:`lower_level.LowerLevel.quadratic_grad`),
which deepinv's ``A_adjoint_A`` cannot express: 1.2–1.5× faster than ``BlurFFT`` across runs,
and the convolution-based operators are slower still.  Ours also gives the exact ``min|b̂|²``
and ``max|b̂|`` (``μ`` and ``L``), takes (C, H, W) images, and shares its FFT helpers with the
kernel derivatives below.  Measured table and command: README, Performance.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "motion_kernel",
    "gaussian_kernel",
    "disc_kernel",
    "make_kernel",
    "check_kernel",
    "Blur",
    "FiniteDifference",
    "kernel_correlation",
    "conv_operator_norm",
    "h1_penalty",
    "h1_penalty_grad",
    "h1_norm",
    "h1_norm_grad",
]

KERNEL_TYPES = ("motion", "motion_vertical", "motion_horizontal", "gaussian", "disc")


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
def _check_size(size: int) -> None:
    if not isinstance(size, int) or size <= 0 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd integer, got {size!r}")


def _per_channel(k2d: torch.Tensor, channels: int) -> torch.Tensor:
    """Normalise a k×k kernel to unit sum and repeat it as a (C, 1, k, k) tensor."""
    k2d = k2d / k2d.sum()
    return k2d.expand(channels, 1, *k2d.shape).clone()


def motion_kernel(size: int = 5, direction: str = "diagonal", channels: int = 3,
                  dtype=torch.float32, device=None) -> torch.Tensor:
    """Linear motion blur: a normalised line of ``size`` pixels through the centre.

    ``direction`` is ``'diagonal'`` (top-left to bottom-right, the paper's 5×5 kernel),
    ``'vertical'`` or ``'horizontal'``.
    """
    _check_size(size)
    k = torch.zeros(size, size, dtype=dtype, device=device)
    c = size // 2
    if direction == "diagonal":
        k[torch.arange(size), torch.arange(size)] = 1.0
    elif direction == "vertical":
        k[:, c] = 1.0
    elif direction == "horizontal":
        k[c, :] = 1.0
    else:
        raise ValueError(f"unknown motion direction {direction!r}; use diagonal, vertical or horizontal")
    return _per_channel(k, channels)


def gaussian_kernel(size: int = 5, sigma: float = 1.0, channels: int = 3,
                    dtype=torch.float32, device=None) -> torch.Tensor:
    """Isotropic Gaussian ``exp(−(i² + j²)/(2σ²))`` on a size×size grid, normalised to unit sum."""
    _check_size(size)
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"gaussian sigma must be a positive finite number, got {sigma!r}")
    t = torch.arange(size, dtype=dtype, device=device) - size // 2
    r2 = t[:, None] ** 2 + t[None, :] ** 2
    # the centre is exp(0) = 1 exactly: for a σ so small that 2σ² underflows (0/0 there), the
    # kernel is then the σ → 0 limit, a unit impulse, instead of NaN
    g = torch.where(r2 == 0, torch.ones_like(r2), torch.exp(-r2 / (2 * sigma**2)))
    return _per_channel(g, channels)


def disc_kernel(size: int = 5, radius: float | None = None, channels: int = 3,
                dtype=torch.float32, device=None) -> torch.Tensor:
    """Uniform disc (out-of-focus blur): pixels with ``i² + j² ≤ r²``, ``r = size/2`` by default."""
    _check_size(size)
    r = size / 2 if radius is None else radius
    t = torch.arange(size, dtype=dtype, device=device) - size // 2
    d = ((t[:, None] ** 2 + t[None, :] ** 2) <= r**2).to(dtype)
    return _per_channel(d, channels)


def make_kernel(kind: str, size: int, channels: int, sigma: float = 1.0,
                dtype=torch.float32, device=None) -> torch.Tensor:
    """Kernel by name: one of ``KERNEL_TYPES``."""
    if kind == "motion":
        return motion_kernel(size, "diagonal", channels, dtype, device)
    if kind.startswith("motion_"):
        return motion_kernel(size, kind.split("_", 1)[1], channels, dtype, device)
    if kind == "gaussian":
        return gaussian_kernel(size, sigma, channels, dtype, device)
    if kind == "disc":
        return disc_kernel(size, None, channels, dtype, device)
    raise ValueError(f"unknown kernel type {kind!r}; use one of {', '.join(KERNEL_TYPES)}")


def check_kernel(b: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``b`` is a finite (C, 1, k, k) kernel with k odd."""
    if b.ndim != 4 or b.shape[1] != 1 or b.shape[2] != b.shape[3]:
        raise ValueError(f"kernel must have shape (C, 1, k, k), got {tuple(b.shape)}")
    if b.shape[2] % 2 == 0:
        raise ValueError(f"kernel size must be odd, got {b.shape[2]}")
    if not torch.isfinite(b).all():
        raise ValueError("kernel contains NaN or Inf")


# --------------------------------------------------------------------------------------------
# circular blur B_b
# --------------------------------------------------------------------------------------------
def _embed(b: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Zero-pad a (C,1,k,k) kernel to (C,H,W) with its centre at the origin (circularly)."""
    C, _, k, _ = b.shape
    H, W = shape
    if k > H or k > W:
        raise ValueError(f"kernel size {k} is larger than the image ({H}×{W}); use a smaller kernel")
    pad = b.new_zeros(C, H, W)
    pad[:, :k, :k] = b[:, 0]
    return torch.roll(pad, shifts=(-(k // 2), -(k // 2)), dims=(1, 2))


def _rfft(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.rfft2(x)


def _irfft(X: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return torch.fft.irfft2(X, s=shape)


class Blur:
    """Circular blur ``B_b`` for a fixed kernel ``b`` on images of a fixed size.

    ``B_b x = F⁻¹(b̂ ⊙ x̂)``, ``B_bᵀ y = F⁻¹(conj(b̂) ⊙ ŷ)``, ``B_bᵀB_b x = F⁻¹(|b̂|² ⊙ x̂)``,
    with ``b̂`` the 2D DFT of the centred, zero-padded kernel, computed once per kernel.
    Inputs are (C, H, W) or (N, C, H, W).  Build a new ``Blur`` when ``b`` changes (cheap:
    one FFT of the kernel).
    """

    def __init__(self, b: torch.Tensor, shape: tuple[int, int]):
        check_kernel(b)
        self.b = b
        self.shape = tuple(shape)
        self.bhat = _rfft(_embed(b, self.shape))      # (C, H, W//2+1)
        self.power = self.bhat.abs() ** 2              # |b̂|²

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """``B_b x``."""
        return _irfft(self.bhat * _rfft(x), self.shape)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``B_bᵀ y`` (circular correlation with ``b``)."""
        return _irfft(self.bhat.conj() * _rfft(y), self.shape)

    def A_adjoint_A(self, x: torch.Tensor) -> torch.Tensor:
        """``B_bᵀ B_b x`` with one forward and one inverse FFT."""
        return _irfft(self.power * _rfft(x), self.shape)

    def norm(self) -> float:
        """Operator norm ``‖B_b‖ = max|b̂|`` (exact for circular boundaries)."""
        return self.bhat.abs().max().item()

    def min_singular_sq(self) -> float:
        """``min|b̂|²`` over frequencies and channels: the smallest eigenvalue of ``B_bᵀB_b``."""
        return self.power.min().item()


def kernel_correlation(w: torch.Tensor, u: torch.Tensor, k: int) -> torch.Tensor:
    """Gradient of ``b ↦ ⟨B_b u, w⟩`` with respect to a k×k kernel: returns (C, 1, k, k).

    ``∂/∂b_c[j] ⟨B_b u, w⟩ = Σ_p w_c[p] u_c[p − j + κ]`` — the circular cross-correlation of
    ``w`` and ``u`` at lags ``j − κ ∈ [−κ, κ]²``, computed by FFT.  A leading batch dimension in
    ``u``/``w`` is summed over.  This is the adjoint of ``b ↦ B_b u`` restricted to the kernel
    support, and it is the building block of every derivative with respect to ``b``.
    """
    H, W = u.shape[-2:]
    corr = _irfft(_rfft(w) * _rfft(u).conj(), (H, W))
    if corr.ndim == 4:
        corr = corr.sum(0)
    c = k // 2
    corr = torch.roll(corr, shifts=(c, c), dims=(-2, -1))[..., :k, :k]
    return corr.unsqueeze(1)


def conv_operator_norm(u: torch.Tensor, k: int, weight: torch.Tensor | None = None) -> float:
    """``max_c ‖δ ↦ B_δ u_c‖`` over k×k kernels δ: the exact norm of convolution-with-``u``.

    Its Gram matrix is the k²×k² matrix of circular autocorrelations of ``u_c`` at lags in
    ``[−(k−1), k−1]²``; its largest eigenvalue is the squared norm.  Used for ``‖J‖`` in the
    MAID error bound (SPEC §3).

    With ``weight`` (a non-negative spectrum ``W(ω)`` on the real-FFT grid, broadcastable to
    ``(C, H, W//2+1)`` and even, ``W(ω) = W(−ω)``): the norm of ``δ ↦ F⁻¹(√W · F(B_δ u_c))``, e.g.
    ``W = 1/Q`` gives ``‖Q^{-1/2} C_u‖`` for a circulant ``Q``; the Gram matrix is then the
    autocorrelation computed from ``|û|²W``.
    """
    H, W = u.shape[-2:]
    spec = _rfft(u).abs() ** 2
    ac = _irfft(spec if weight is None else spec * weight, (H, W))     # autocorrelation, (C, H, W)
    idx = torch.arange(k, device=u.device)
    di = (idx[:, None, None, None] - idx[None, None, :, None]) % H   # (k,1,k,1)
    dj = (idx[None, :, None, None] - idx[None, None, None, :]) % W   # (1,k,1,k)
    G = ac[:, di, dj].reshape(u.shape[0], k * k, k * k)
    return torch.linalg.eigvalsh(G.double()).max().clamp_min(0).sqrt().item()


# --------------------------------------------------------------------------------------------
# finite differences and the H¹ kernel penalty
# --------------------------------------------------------------------------------------------
def _records_graph(*tensors: torch.Tensor) -> bool:
    """True when autograd is recording operations on any of ``tensors`` (then the fast paths,
    which write into preallocated buffers with ``out=``, are not used)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class FiniteDifference:
    """Forward differences with Neumann boundary on the last two axes.

    ``D x = (D_h x, D_v x)``, ``(D_h x)[i, j] = x[i, j+1] − x[i, j]`` for ``j < W−1`` and 0 on the
    last column (likewise ``D_v`` along rows).  ``Dᵀ`` is minus the matching divergence:
    ``(D_hᵀ p)[i, j] = p[i, j−1]·[j ≥ 1] − p[i, j]·[j ≤ W−2]`` (the last column of ``p`` is
    ignored), likewise along rows.  ``‖D‖² ≤ 8`` in 2D (used for the closed-form smoothness
    bound of the TV term).

    Implementation: without autograd the differences are written straight into preallocated
    outputs (``out=``, no temporaries); when a graph is being recorded a differentiable
    formulation with the same values is used (``torch.diff`` / in-place updates of zeros).
    """

    NORM_SQ_BOUND = 8.0

    @staticmethod
    def A(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if _records_graph(x):
            return (torch.diff(x, dim=-1, append=x[..., :, -1:]),
                    torch.diff(x, dim=-2, append=x[..., -1:, :]))
        dh = torch.empty_like(x)
        dv = torch.empty_like(x)
        torch.sub(x[..., :, 1:], x[..., :, :-1], out=dh[..., :, :-1])
        dh[..., :, -1].zero_()
        torch.sub(x[..., 1:, :], x[..., :-1, :], out=dv[..., :-1, :])
        dv[..., -1, :].zero_()
        return dh, dv

    @staticmethod
    def A_adjoint(dh: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
        if _records_graph(dh, dv):
            out = torch.zeros_like(dh)
            out[..., :, :-1] -= dh[..., :, :-1]
            out[..., :, 1:] += dh[..., :, :-1]
            out[..., :-1, :] -= dv[..., :-1, :]
            out[..., 1:, :] += dv[..., :-1, :]
            return out
        out = torch.empty_like(dh)
        if dh.shape[-1] == 1:
            out.zero_()
        else:   # D_hᵀ written column-wise in one pass: −p[0] | p[j−1] − p[j] | p[W−2]
            torch.neg(dh[..., :, :1], out=out[..., :, :1])
            torch.sub(dh[..., :, :-2], dh[..., :, 1:-1], out=out[..., :, 1:-1])
            out[..., :, -1:].copy_(dh[..., :, -2:-1])
        out[..., :-1, :] -= dv[..., :-1, :]
        out[..., 1:, :] += dv[..., :-1, :]
        return out


def h1_penalty(b: torch.Tensor, b0: torch.Tensor) -> torch.Tensor:
    """``‖b − b₀‖²_{H¹} = ‖d‖² + ‖D_h d‖² + ‖D_v d‖²``, ``d = b − b₀``, summed over channels.

    The differences are those of :class:`FiniteDifference` on each k×k kernel (Neumann).
    """
    d = b - b0
    dh, dv = FiniteDifference.A(d)
    return (d * d).sum() + (dh * dh).sum() + (dv * dv).sum()


def h1_penalty_grad(b: torch.Tensor, b0: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`h1_penalty`: ``2 (d + DᵀD d)``."""
    d = b - b0
    return 2 * (d + FiniteDifference.A_adjoint(*FiniteDifference.A(d)))


def _h1_scaled(b: torch.Tensor, b0: torch.Tensor):
    """``(s, d/s)`` with ``d = b − b₀`` and ``s = max|d|`` (``s = 0``: ``d/s`` is returned as ``d``).

    Both H¹ norm functions below work on ``d/s``, whose entries are at most 1 in magnitude, so the
    squares in :func:`h1_penalty` neither underflow (a ``d`` of 1e-25 in float32) nor overflow."""
    d = b - b0
    s = d.detach().abs().max()
    return s, (d if s.item() == 0 else d / s)


def h1_norm(b: torch.Tensor, b0: torch.Tensor) -> torch.Tensor:
    """``‖b − b₀‖_{H¹} = sqrt(‖d‖² + ‖D_h d‖² + ‖D_v d‖²)`` (unsquared; the paper's kernel penalty,
    SPEC §5), evaluated as ``s·sqrt(h1_penalty(d/s, 0))``, ``s = max|d|`` (no under/overflow)."""
    s, u = _h1_scaled(b, b0)
    return s * torch.sqrt(h1_penalty(u, torch.zeros_like(u)))


def h1_norm_grad(b: torch.Tensor, b0: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`h1_norm`: ``(d + DᵀD d)/‖d‖_{H¹}`` for ``d = b − b₀ ≠ 0`` (= ``∇‖d‖²_{H¹}/(2‖d‖_{H¹})``,
    scale-invariant, so evaluated on ``d/max|d|``).

    At ``b = b₀`` the norm is not differentiable; its subdifferential is ``{M u : uᵀM u ≤ 1}``
    (``M = I + DᵀD``) and this returns the subgradient 0 (the minimal-norm one).  A gradient method
    that starts at ``b₀`` therefore moves along the data term's gradient alone in its first step;
    staying at ``b₀`` when that is optimal (dual norm of the data gradient ≤ β) needs a proximal step
    (``maid.py``'s proximal MAID), not this subgradient."""
    s, u = _h1_scaled(b, b0)
    if s.item() == 0:
        return torch.zeros_like(b)
    g = 0.5 * h1_penalty_grad(u, torch.zeros_like(u))
    return g / torch.sqrt(h1_penalty(u, torch.zeros_like(u)))
