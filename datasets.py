"""Training and test images for dataset-level bilevel learning (SPEC §6): random crops of the
sample images that ship inside scikit-image's wheel (nothing is downloaded), split by source.

* :data:`SOURCES` — the scikit-image samples that load offline (``skimage.data`` functions whose
  files are in the wheel; the ones that need ``pooch`` downloads are left out) and are natural
  photographs or micrographs; synthetic images (checkerboard, blobs, phantom, logo), the
  motion-blurred ``clock`` and the mostly-black ``retina``/``hubble_deep_field`` are left out.
  Licences in ``images/SOURCES_TRAIN.md``.  Any further PNG/JPEG in ``images/`` whose name is
  not already a source is added as ``images/<name>``.
* :func:`split_sources` — **train and test are split by source image**: a seeded permutation of
  the sources, the first ``n_test`` to the test set, so no source (hence no pixel) appears in both.
* :func:`random_crops` — ``count`` crops of ``size × size`` spread round-robin over the sources of
  one split, positions uniform from a seeded generator; each crop is recorded as
  ``{split, source, top, left}`` so the run folder can say exactly which pixels were used.
* :func:`make_dataset` — crops, then the measurements ``y = A x + σ n`` with ``n`` drawn from the
  seed (float64 on the CPU, so the data agree across devices).

Images are in [0, 1]; grey (``channels = 1``) converts RGB with scikit-image's ``rgb2gray``;
colour (``channels = 3``) uses only the RGB sources.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from config import ConfigError

__all__ = ["SOURCES", "available_sources", "load_source", "split_sources", "random_crops", "Dataset",
           "make_dataset"]

_IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "images")
_SUFFIXES = (".png", ".jpg", ".jpeg")

# name -> (skimage.data function, is RGB)
SOURCES = {
    "astronaut": ("astronaut", True),
    "brick": ("brick", False),
    "camera": ("camera", False),
    "cell": ("cell", False),
    "chelsea": ("chelsea", True),
    "coffee": ("coffee", True),
    "coins": ("coins", False),
    "grass": ("grass", False),
    "gravel": ("gravel", False),
    "immunohistochemistry": ("immunohistochemistry", True),
    "moon": ("moon", False),
    "motorcycle": ("stereo_motorcycle", True),
    "page": ("page", False),
    "rocket": ("rocket", True),
    "text": ("text", False),
}


def _extra_images(images_dir: str) -> list[str]:
    if not os.path.isdir(images_dir):
        return []
    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(images_dir) if f.lower().endswith(_SUFFIXES))
    return [f"images/{s}" for s in stems if s not in SOURCES]


def available_sources(channels: int, images_dir: str = _IMAGES) -> list[str]:
    """Source names usable for ``channels`` (1: all, 3: the RGB ones), sorted."""
    names = [n for n, (_, rgb) in SOURCES.items() if channels == 1 or rgb]
    return sorted(names + _extra_images(images_dir))


def load_source(name: str, channels: int, images_dir: str = _IMAGES) -> np.ndarray:
    """The source image as float64 (C, H, W) in [0, 1]."""
    from skimage import color, data

    if name.startswith("images/"):
        from PIL import Image
        stem = name.split("/", 1)[1]
        path = next(os.path.join(images_dir, stem + s) for s in _SUFFIXES
                    if os.path.isfile(os.path.join(images_dir, stem + s)))
        with Image.open(path) as im:
            a = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float64) / 255.0
    else:
        a = getattr(data, SOURCES[name][0])()
        if isinstance(a, tuple):              # stereo_motorcycle: (left, right, disparity)
            a = a[0]
        a = np.asarray(a, dtype=np.float64) / (255.0 if a.dtype == np.uint8 else 1.0)
        if channels == 1 and a.ndim == 3:
            a = color.rgb2gray(a[..., :3])
    if a.ndim == 2:
        a = a[..., None]
    return np.ascontiguousarray(np.clip(a, 0, 1).transpose(2, 0, 1))


def split_sources(names: list[str], n_test: int, seed: int) -> tuple[list[str], list[str]]:
    """``(train, test)``: a seeded permutation of ``names``, the first ``n_test`` to test (disjoint)."""
    if not 1 <= n_test < len(names):
        raise ConfigError(f"cannot put {n_test} of {len(names)} source images into the test set; need "
                          f"1 ≤ test sources < {len(names)}")
    perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    test = sorted(names[i] for i in perm[:n_test])
    return sorted(n for n in names if n not in test), test


def random_crops(images: dict[str, np.ndarray], count: int, size: int, gen: torch.Generator,
                 split: str) -> tuple[torch.Tensor, list[dict]]:
    """``count`` crops of ``size × size`` taken round-robin over ``images`` (sorted by name), each at
    a uniform random position; returns ``(crops (count, C, size, size), records)``."""
    names = sorted(images)
    crops, records = [], []
    for i in range(count):
        name = names[i % len(names)]
        a = images[name]
        H, W = a.shape[-2:]
        top = int(torch.randint(H - size + 1, (1,), generator=gen))
        left = int(torch.randint(W - size + 1, (1,), generator=gen))
        crops.append(torch.from_numpy(a[:, top:top + size, left:left + size].copy()))
        records.append({"split": split, "source": name, "top": top, "left": left})
    return torch.stack(crops), records


@dataclass
class Dataset:
    """Ground truths and measurements of both splits, and the record of where each crop came from."""

    x_train: torch.Tensor      # (N, C, H, W)
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    crops: list                # [{split, source, top, left}]
    train_sources: list
    test_sources: list


def make_dataset(train_size: int, test_size: int, size: int, channels: int, noise_level: float, seed: int,
                 forward=None, test_fraction: float | None = None, images_dir: str = _IMAGES,
                 dtype=torch.float64, device="cpu") -> Dataset:
    """Crops of both splits and ``y = forward(x) + noise_level · n`` (``forward`` defaults to the
    identity; ``n`` standard normal from ``seed``).  The number of test sources is proportional to
    ``test_size / (train_size + test_size)`` (at least one), unless ``test_fraction`` is given."""
    names = available_sources(channels, images_dir)
    images = {n: load_source(n, channels, images_dir) for n in names}
    small = [n for n, a in images.items() if min(a.shape[-2:]) < size]
    names = [n for n in names if n not in small]
    if len(names) < 2:
        raise ConfigError(f"img_size={size} leaves fewer than two source images large enough; use a smaller img_size")
    frac = test_size / (train_size + test_size) if test_fraction is None else test_fraction
    n_test = min(len(names) - 1, max(1, round(frac * len(names))))
    train_names, test_names = split_sources(names, n_test, seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, rec_tr = random_crops({n: images[n] for n in train_names}, train_size, size, gen, "train")
    x_te, rec_te = random_crops({n: images[n] for n in test_names}, test_size, size, gen, "test")
    noise_gen = torch.Generator().manual_seed(seed + 1)

    def measure(x):
        n = torch.randn(x.shape, generator=noise_gen, dtype=torch.float64)
        x = x.to(device, dtype)
        return x, (x if forward is None else forward(x)) + noise_level * n.to(device, dtype)

    x_tr, y_tr = measure(x_tr)
    x_te, y_te = measure(x_te)
    return Dataset(x_tr, y_tr, x_te, y_te, rec_tr + rec_te, train_names, test_names)
