"""Image input, quality metrics and device choice for the 2D driver.

* :func:`load_image` — a bundled sample by name (``images/``) or any PNG/JPEG path, converted to
  grey or RGB in [0, 1], resized with anti-aliasing (scikit-image) to ``height × width``.
  16-bit (and 32-bit integer / float) grey images are scaled by their range, not clipped;
  images with transparency are composited on white, with a one-line note on stderr.
* :func:`psnr_ssim` — PSNR from deepinv's metric and SSIM from scikit-image
  (``data_range = 1``, Gaussian-weighted, colour axis last), both on the estimate clipped to [0, 1].
* :func:`setting_kernels`, :func:`make_data` — the blur settings of SPEC §4.2 and the data
  ``y = (true blur) x + noise`` (used by ``ADP.py`` and ``benchmarks/grid_search.py``).
* :func:`true_kernel`, :func:`pad_kernel`, :func:`kernel_error_ratio` — the single kernel that
  made the data (semiblind: motion∘Gaussian, 9×9 for two 5×5 blurs), centred zero-padding of a
  kernel to a larger odd size, and ``‖b − b_true‖/‖b₀ − b_true‖``.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from config import ConfigError
from operators import Blur, make_kernel

_SUFFIXES = (".png", ".jpg", ".jpeg")


def image_path(name: str, images_dir: str) -> str:
    """Resolve a bundled sample name (``astronaut``) or a file path; raise ConfigError if missing."""
    if os.path.isfile(name):
        return name
    for suf in ("",) + _SUFFIXES:
        cand = os.path.join(images_dir, name + suf)
        if os.path.isfile(cand):
            return cand
    samples = sorted(os.path.splitext(f)[0] for f in os.listdir(images_dir) if f.lower().endswith(_SUFFIXES))
    raise ConfigError(f"image {name!r} not found: give a path to a PNG/JPEG file or one of the bundled "
                      f"samples ({', '.join(samples)})")


_LUMA = np.array([0.299, 0.587, 0.114])   # ITU-R 601-2, the weights of PIL's convert("L")


def _high_depth_pixels(im: Image.Image, path: str) -> np.ndarray:
    """Grey pixels of a 16-bit, 32-bit integer or float image as float64 (H, W) in [0, 1].

    ``I;16*`` (16-bit, e.g. a 16-bit grey PNG) is divided by 65535.  ``I`` (32-bit signed integers,
    how PIL opens some 16-bit TIFF/PGM files) is divided by 65535 when its values fit in 16 bits,
    else by 2³¹ − 1.  ``F`` (32-bit float) is taken as is and must lie in [0, 1].  PIL's
    ``convert("L")`` would clip all of these to 255, i.e. white."""
    a = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            raise ConfigError(f"{path!r} is a floating-point image with values outside [0, 1] "
                              f"(min {np.nanmin(a):.3g}, max {np.nanmax(a):.3g}); rescale it to [0, 1] or save it as PNG")
        return a
    if a.min() < 0:
        raise ConfigError(f"{path!r} has negative pixel values (mode {im.mode}); save it as an 8- or 16-bit PNG")
    full = 65535.0 if im.mode.startswith("I;16") or a.max() <= 65535 else float(2**31 - 1)
    return a / full


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info)


def _composited_on_white(im: Image.Image, path: str) -> np.ndarray:
    """RGB float64 (H, W, 3) in [0, 1] of an image with an alpha channel, composited on white:
    ``c·a + 1·(1 − a)``.  A one-line note on stderr says so when some pixel is not opaque."""
    rgba = np.asarray(im.convert("RGBA"), dtype=np.float64) / 255.0
    a = rgba[..., 3:]
    if (a < 1).any():
        print(f"note: {path} has transparent pixels; composited on white", file=sys.stderr)
    return rgba[..., :3] * a + (1 - a)


def image_array(path: str, channels: int) -> np.ndarray:
    """The pixels of ``path`` as float64 (H, W, ``channels``) in [0, 1].

    8-bit images: PIL's ``convert("L")`` (grey) or ``convert("RGB")`` divided by 255.  16-bit,
    32-bit integer and float grey images: scaled by their range (:func:`_high_depth_pixels`), the
    grey value repeated for colour.  Images with an alpha channel (RGBA, LA, transparent palette):
    composited on white (:func:`_composited_on_white`), grey by the ITU-R 601 luma weights."""
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I") or im.mode == "F":
                grey = _high_depth_pixels(im, path)
                return np.repeat(grey[..., None], channels, axis=2)
            if _has_alpha(im):
                rgb = _composited_on_white(im, path)
                return rgb if channels == 3 else (rgb @ _LUMA)[..., None]
            a = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float64) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"{path!r} is not a readable image ({type(e).__name__}); give a PNG or JPEG file")
    return a[..., None] if a.ndim == 2 else a


def load_image(name: str, height: int, width: int, channels: int, images_dir: str) -> torch.Tensor:
    """Load (:func:`image_array`), convert to ``channels`` (1 grey, 3 RGB) and resize; returns
    float64 (C, H, W) in [0, 1]."""
    from skimage.transform import resize

    a = image_array(image_path(name, images_dir), channels)
    a = resize(a, (height, width, a.shape[2]), anti_aliasing=True, mode="reflect")
    return torch.from_numpy(np.ascontiguousarray(np.clip(a, 0, 1).transpose(2, 0, 1)))


def setting_kernels(cfg: dict, dtype=torch.float64, device=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(b₀, blurs)`` for ``cfg["setting"]``: the known kernel ``b₀`` and the kernels that make the
    data, applied in order.  ``motion``/``gaussian``/``disc``: ``[b₀]``; ``semiblind``: ``b₀`` is the
    motion kernel and the data get an unknown Gaussian (σ = ``semiblind_sigma``, size
    ``min(5, kernel_size)``) after it."""
    kind = "motion" if cfg["setting"] == "semiblind" else cfg["setting"]
    b0 = make_kernel(kind, cfg["kernel_size"], cfg["channels"], sigma=cfg["blur_sigma"], dtype=dtype, device=device)
    if cfg["setting"] != "semiblind":
        return b0, [b0]
    g = make_kernel("gaussian", min(5, cfg["kernel_size"]), cfg["channels"], sigma=cfg["semiblind_sigma"],
                    dtype=dtype, device=device)
    return b0, [b0, g]


def make_data(cfg: dict, images_dir: str, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_true, b₀, y)``: the image, the known kernel and ``y = (true blur) x_true + σ·N(0, I)``
    (noise drawn on the CPU in float64 from ``cfg["seed"]``, so data agree across devices)."""
    x_true = load_image(cfg["image"], cfg["size_y"], cfg["size_x"], cfg["channels"], images_dir).to(device, dtype)
    b0, blurs = setting_kernels(cfg, dtype, device)
    y = x_true
    for b in blurs:
        y = Blur(b, x_true.shape[-2:]).A(y)
    gen = torch.Generator().manual_seed(cfg["seed"])
    noise = torch.randn(x_true.shape, generator=gen, dtype=torch.float64).to(device, dtype)
    return x_true, b0, y + cfg["noise_level"] * noise


def pad_kernel(b: torch.Tensor, size: int) -> torch.Tensor:
    """``b`` (C, 1, k, k) zero-padded centrally to ``size × size`` (``size ≥ k``, same parity).

    The circular blur of the padded kernel is the blur of ``b`` exactly (the extra entries are
    zero and the centre stays at the origin); raises ``ValueError`` for a smaller or even size."""
    k = b.shape[-1]
    if size < k or (size - k) % 2:
        raise ValueError(f"cannot zero-pad a {k}×{k} kernel centrally to {size}×{size} (need an odd size ≥ {k})")
    m = (size - k) // 2
    return torch.nn.functional.pad(b, (m, m, m, m))


def true_kernel(cfg: dict, dtype=torch.float64, device=None) -> torch.Tensor:
    """The one kernel whose circular blur is the composition of the blurs that make the data
    (:func:`setting_kernels`): ``b₀`` itself (exactly) except for ``semiblind``, where it is motion∘Gaussian,
    ``Σ kᵢ − (m − 1)`` wide.  Computed as the impulse response of the composed :class:`Blur`
    operators on a K×K grid (no wrap-around: the composed support is exactly K wide), rolled so
    that its centre is the middle entry; exact for any image of at least K×K pixels."""
    _, blurs = setting_kernels(cfg, dtype, device)
    if len(blurs) == 1:
        return blurs[0]
    K = sum(b.shape[-1] for b in blurs) - (len(blurs) - 1)
    u = torch.zeros(blurs[0].shape[0], K, K, dtype=dtype, device=device)
    u[:, 0, 0] = 1                         # the impulse at the origin, where Blur centres the kernel
    for b in blurs:
        u = Blur(b, (K, K)).A(u)
    return torch.roll(u, (K // 2, K // 2), dims=(-2, -1)).unsqueeze(1)


def kernel_error_ratio(b: torch.Tensor, b0: torch.Tensor, b_true: torch.Tensor) -> float | None:
    """``‖b − b_true‖/‖b₀ − b_true‖`` with all three zero-padded to the largest size; ``None`` when
    ``b₀ = b_true`` (nothing to recover: motion, gaussian and disc settings)."""
    size = max(t.shape[-1] for t in (b, b0, b_true))
    b, b0, b_true = (pad_kernel(t, size) for t in (b, b0, b_true))
    den = torch.linalg.vector_norm(b0 - b_true).item()
    return None if den == 0 else torch.linalg.vector_norm(b - b_true).item() / den


_PSNR = None


def psnr_ssim(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(PSNR [dB], SSIM)`` of ``clip(x, 0, 1)`` against ``ref`` (both (C, H, W) in [0, 1])."""
    global _PSNR
    from skimage.metrics import structural_similarity

    if _PSNR is None:
        from deepinv.loss.metric import PSNR
        _PSNR = PSNR(max_pixel=1.0)
    xc = x.detach().clamp(0, 1)
    p = _PSNR(xc[None].double(), ref[None].double()).item()
    a = xc.double().cpu().numpy().transpose(1, 2, 0)
    b = ref.detach().double().cpu().numpy().transpose(1, 2, 0)
    s = structural_similarity(a, b, data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False)
    return p, float(s)


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str, dtype: str = "float32") -> torch.device:
    """``auto`` → cuda, else mps (float32 only: MPS has no float64), else cpu; an explicit device
    must be available and support ``dtype``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available() and dtype != "float64":
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device {name!r} is not available on this machine; use --device=cpu or --device=auto")
    if dev.type == "mps" and not _mps_available():
        raise ConfigError(f"device {name!r} is not available on this machine; use --device=cpu or --device=auto")
    if dev.type == "mps" and dtype == "float64":
        raise ConfigError("the MPS device has no float64; use --dtype=float32 with --device=mps, or --device=cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return dev
