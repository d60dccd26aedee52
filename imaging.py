"""Image input, quality metrics and device choice for the 2D driver.

* :func:`load_image` — a bundled sample by name (``images/``) or any PNG/JPEG path, converted to
  grey or RGB in [0, 1], resized with anti-aliasing (scikit-image) to ``height × width``.
* :func:`psnr_ssim` — PSNR from deepinv's metric and SSIM from scikit-image
  (``data_range = 1``, Gaussian-weighted, colour axis last), both on the estimate clipped to [0, 1].
* :func:`setting_kernels`, :func:`make_data` — the blur settings of SPEC §4.2 and the data
  ``y = (true blur) x + noise`` (used by ``ADP.py`` and ``benchmarks/grid_search.py``).
"""
from __future__ import annotations

import os

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


def load_image(name: str, height: int, width: int, channels: int, images_dir: str) -> torch.Tensor:
    """Load, convert to ``channels`` (1 grey, 3 RGB) and resize; returns float64 (C, H, W) in [0, 1]."""
    from skimage.transform import resize

    path = image_path(name, images_dir)
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            a = np.asarray(im, dtype=np.float64) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"{path!r} is not a readable image ({type(e).__name__}); give a PNG or JPEG file")
    if a.ndim == 2:
        a = a[..., None]
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
