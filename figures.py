"""Figures and result files of the 2D driver (PNG via matplotlib's Agg backend; atomic writes)."""
from __future__ import annotations

import csv
import json
import os
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from imaging import pad_kernel  # noqa: E402


# --------------------------------------------------------------------------------------------
# atomic writes: a crash at any moment leaves either the old file or the new one, never half
# --------------------------------------------------------------------------------------------
_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: str, write) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)     # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_json(path: str, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=_jsonable)
    _atomic(path, w)


def _jsonable(v):
    if torch.is_tensor(v):
        return v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return str(v)


def save_csv(path: str, rows: list[dict]) -> None:
    def w(tmp):
        with open(tmp, "w", newline="") as f:
            if rows:
                cols = list(rows[0].keys())
                for r in rows[1:]:
                    cols += [c for c in r if c not in cols]
                wr = csv.DictWriter(f, fieldnames=cols)
                wr.writeheader()
                wr.writerows(rows)
    _atomic(path, w)


def save_torch(path: str, obj) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def save_figure(fig, path: str) -> None:
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------
def _img(x: torch.Tensor) -> np.ndarray:
    a = x.detach().float().clamp(0, 1).cpu().numpy()
    return a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))


def comparison_figure(panels: list[tuple[str, torch.Tensor]], path: str) -> None:
    """One row of images with titles (ground truth, blurry, TV, ADP-β-MAID; the driver labels the
    last 'unchanged (no step accepted)' when MAID accepted no step)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.3))
    for ax, (title, x) in zip(axes, panels):
        ax.imshow(_img(x), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


def kernel_figure(b0: torch.Tensor, b: torch.Tensor, path: str, names=("R", "G", "B"),
                  b_true: torch.Tensor | None = None) -> None:
    """Per channel: ``b₀``, ``b*`` and (when given) the true kernel ``b_true`` on a shared colour
    scale, zero-padded centrally to a common size, then ``|b* − b₀|``."""
    kernels = [("b₀", b0), ("b*", b)] + ([] if b_true is None else [("b_true", b_true)])
    size = max(t.shape[-1] for _, t in kernels)
    kernels = [(t, pad_kernel(k.detach().double().cpu(), size)) for t, k in kernels]
    lo = min(k.min().item() for _, k in kernels)
    hi = max(k.max().item() for _, k in kernels)
    panels = [(t, k, dict(vmin=lo, vmax=hi, cmap="viridis")) for t, k in kernels]
    panels.append(("|b* − b₀|", (kernels[1][1] - kernels[0][1]).abs(), dict(cmap="magma")))
    C = b.shape[0]
    fig, axes = plt.subplots(C, len(panels), figsize=(3 * len(panels), 2.9 * C), squeeze=False)
    for c in range(C):
        ch = names[c] if C == 3 else f"channel {c}"
        for j, (title, k, kw) in enumerate(panels):
            im = axes[c, j].imshow(k[c, 0].numpy(), interpolation="nearest", **kw)
            axes[c, j].set_title(f"{title} ({ch})", fontsize=10)
            axes[c, j].set_xticks([])
            axes[c, j].set_yticks([])
            fig.colorbar(im, ax=axes[c, j], fraction=0.046, pad=0.04)
    fig.tight_layout()
    save_figure(fig, path)


def convergence_figure(log: list[dict], path: str) -> None:
    """Upper loss against wall time and against cumulative lower-level iterations (log scale),
    accepted iterations as dots, rejected ones as crosses."""
    t = [r["time"] for r in log]
    it = [r["lower_iters"] for r in log]
    f = [r["upper_loss"] for r in log]
    acc = np.array([r["accepted"] for r in log], dtype=bool)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, xs, label in [(axes[0], t, "wall time [s]"), (axes[1], it, "cumulative lower-level iterations")]:
        xs = np.asarray(xs)
        ax.plot(xs, f, "-", color="C0", lw=1)
        ax.plot(xs[acc], np.asarray(f)[acc], "o", color="C0", ms=3, label="accepted")
        if (~acc).any():
            ax.plot(xs[~acc], np.asarray(f)[~acc], "x", color="C3", ms=5, label="rejected (ε ← τε)")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("upper loss g(x̃, b)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("ADP-β-MAID: upper loss")
    fig.tight_layout()
    save_figure(fig, path)


def iterations_figure(log: list[dict], path: str, baseline_psnr: float | None = None) -> None:
    """PSNR, ε and the upper step (``step``, α_k) against the upper iteration."""
    k = [r["iter"] for r in log]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    if "psnr" in log[0]:
        axes[0].plot(k, [r["psnr"] for r in log], "-o", ms=3, label="ADP-β-MAID")
        if baseline_psnr is not None:
            axes[0].axhline(baseline_psnr, color="C2", ls="--", label="TV with b₀")
        axes[0].legend(fontsize=8)
    axes[0].set_ylabel("PSNR [dB]")
    axes[1].semilogy(k, [r["eps"] for r in log], "-o", ms=3, label="ε")
    axes[1].semilogy(k, [r["delta"] for r in log], "--", label="δ")
    axes[1].legend(fontsize=8)
    axes[1].set_ylabel("accuracy")
    axes[2].semilogy(k, [r["step"] for r in log], "-o", ms=3)
    axes[2].set_ylabel("upper step α_k (MAID)")
    for ax in axes:
        ax.set_xlabel("upper iteration")
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, path)
