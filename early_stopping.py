"""No-reference early stopping for any iterative reconstruction (SPEC §7): ES-WMV and ES-EMV.

Feed the iterates ``x_1, x_2, …`` one at a time; ``update(x)`` returns whether to stop, and
``best()`` gives the selected iterate ``x*`` and its iteration number.  Both detectors track the
minimum of a running variance of the iterates (Wang et al., "Early Stopping for Deep Image
Prior"): while a method still learns structure the iterates move a lot; once it settles they move
little; when it starts fitting the noise they move more again.  The variance minimum marks the
transition.

* **ES-WMV** (:class:`WindowedVariance`): over the last ``W`` iterates,

      VAR_k = (1/W) Σ_{i=k−W+1..k} ‖x_i − x̄_k‖² / N,   x̄_k = (1/W) Σ_{i=k−W+1..k} x_i,

  defined from ``k = W`` on (``N`` the number of entries of ``x``).
* **ES-EMV** (:class:`ExponentialVariance`): ``EMA_1 = x_1``, ``EMV_1 = 0`` and for ``k ≥ 1``

      EMA_{k+1} = (1−a) EMA_k + a x_{k+1},
      EMV_{k+1} = (1−a) EMV_k + a(1−a) ‖x_{k+1} − EMA_k‖² / N.

  ``/N`` (not in SPEC's formula) puts EMV on the per-entry scale of VAR; it does not move the
  minimum.  Because ``EMV_1 = 0`` the recursion is biased towards 0 at the start — with constant
  increments ``a(1−a)c`` it gives ``EMV_k = (1−a)c (1 − (1−a)^{k−1})`` instead of its steady state
  ``(1−a)c`` — so the tracked quantity is the bias-corrected ``EMV_k / (1 − (1−a)^{k−1})`` (as
  Adam corrects its moments), defined from
  ``k = 2`` on; otherwise the trivial ``EMV_1 = 0`` would be the minimum forever.

**Selection and patience** (shared, :class:`_MinimumTracker`): with ``V_k`` the tracked
variance, ``x*`` is the iterate ``x_k`` at which ``V_k`` reached its smallest value so far (the
newest iterate of that window, as in the paper's Algorithm 1), ties keeping the earlier one;
``update`` returns ``True`` once the minimum has not decreased for ``P`` consecutive iterations,
i.e. from ``k = k* + P`` on.  From then on the selection is final: a caller that keeps iterating
(to see what happens after the stop) still gets ``V_k`` in ``value``, but ``best()`` no longer
changes, so it is what the detector returned when it stopped.

**Cost** (ES-WMV): ``O(N)`` per iteration, not ``O(WN)``.  The window's mean ``m`` and
``M₂ = Σ_i ‖x_i − m‖²`` are updated when ``x_new`` replaces ``x_old`` (sliding-window Welford):

      d = x_new − x_old,   m' = m + d/W,   M₂' = M₂ + ⟨d, (x_new − m') + (x_old − m)⟩,

and ``VAR_k = M₂ / (W N)``.  Unlike the raw-moment form ``(Σ‖x_i‖² − W‖x̄‖²)/(WN)``, which in
float32 cancels catastrophically when the variance is ~1e-5 of ``‖x‖²/N`` (late DIP iterates),
this update only ever adds differences of nearby quantities.  ``m`` and ``M₂`` are kept in
float64 (float32 on MPS, which has no float64), and recomputed exactly from the stored window
every ``W`` replacements, so rounding cannot drift over thousands of iterations (amortised cost
still ``O(N)``).  The window itself is stored in the iterates' dtype (``W·N`` entries).
"""
from __future__ import annotations

import math

import torch

__all__ = ["WindowedVariance", "ExponentialVariance", "make_detector", "DETECTORS"]


def _accumulator_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "mps" else torch.float64


class _MinimumTracker:
    """Minimum of a scalar sequence ``V_k``, the iterate where it occurred, and the patience rule."""

    def __init__(self, patience: int):
        if not (isinstance(patience, int) and patience >= 1):
            raise ValueError(f"patience must be a positive integer, got {patience!r}")
        self.patience = patience
        self.k = 0                       # iterates seen so far
        self.value: float | None = None  # V_k of the latest iterate (None while undefined)
        self.min_value = math.inf
        self.best_iter: int | None = None
        self._best_x: torch.Tensor | None = None

    def _track(self, value: float | None, x: torch.Tensor) -> bool:
        self.value = value
        if self.stop:                     # the selection is final once patience has run out
            return True
        if value is not None and value < self.min_value:
            self.min_value, self.best_iter = value, self.k
            self._best_x = x.detach().clone()
        return self.stop

    @property
    def stop(self) -> bool:
        """True once ``V`` has not reached a new minimum for ``patience`` iterations."""
        return self.best_iter is not None and self.k - self.best_iter >= self.patience

    def to(self, device) -> "_MinimumTracker":
        """Move the stored tensors (window, accumulators, x*) to ``device``, e.g. after loading a
        checkpoint on another machine."""
        for name, v in vars(self).items():
            if torch.is_tensor(v):
                setattr(self, name, v.to(device))
        return self

    def best(self) -> tuple[torch.Tensor | None, int | None]:
        """``(x*, k*)``: the selected iterate and its iteration number (1-based); ``(None, None)``
        before the variance is defined."""
        return self._best_x, self.best_iter


class WindowedVariance(_MinimumTracker):
    """ES-WMV: ``VAR_k`` over the last ``window`` iterates (see the module docstring), O(N) per update."""

    name = "wmv"

    def __init__(self, window: int = 100, patience: int = 1000):
        super().__init__(patience)
        if not (isinstance(window, int) and window >= 2):
            raise ValueError(f"window must be an integer ≥ 2, got {window!r}")
        self.window = window
        self._buf: torch.Tensor | None = None     # (W, *x.shape) ring buffer
        self._mean: torch.Tensor | None = None    # m, accumulator dtype
        self._m2 = 0.0                            # M₂ = Σ ‖x_i − m‖²

    def _refresh(self) -> None:
        """Exact ``m`` and ``M₂`` from the stored window (cancels accumulated rounding)."""
        w = self._buf.to(self._mean.dtype)
        self._mean = w.mean(0)
        self._m2 = float(((w - self._mean) ** 2).sum())

    def _add(self, x: torch.Tensor) -> None:
        """Welford's update while the window fills (n = k iterates so far)."""
        delta = x - self._mean
        self._mean += delta / self.k
        self._m2 += float((delta * (x - self._mean)).sum())

    def _replace(self, x: torch.Tensor, old: torch.Tensor) -> None:
        d = x - old
        new_mean = self._mean + d / self.window
        self._m2 += float((d * ((x - new_mean) + (old - self._mean))).sum())
        self._mean = new_mean

    def update(self, x: torch.Tensor) -> bool:
        """Feed ``x_k``; return whether to stop (patience exhausted)."""
        x = x.detach()
        if self._buf is None:
            self._buf = x.new_empty((self.window,) + tuple(x.shape))
            self._mean = torch.zeros(x.shape, dtype=_accumulator_dtype(x), device=x.device)
        self.k += 1
        slot = (self.k - 1) % self.window
        xa = x.to(self._mean.dtype)
        if self.k <= self.window:
            self._add(xa)
        else:
            self._replace(xa, self._buf[slot].to(self._mean.dtype))
        self._buf[slot] = x
        if self.k > self.window and slot == self.window - 1:
            self._refresh()
        value = max(self._m2, 0.0) / (self.window * x.numel()) if self.k >= self.window else None
        return self._track(value, x)


class ExponentialVariance(_MinimumTracker):
    """ES-EMV: the bias-corrected exponential moving variance (see the module docstring)."""

    name = "emv"

    def __init__(self, alpha: float = 0.1, patience: int = 1000):
        super().__init__(patience)
        if not (isinstance(alpha, float) and 0 < alpha < 1):
            raise ValueError(f"the EMV weight a must lie strictly between 0 and 1, got {alpha!r}")
        self.alpha = alpha
        self.ema: torch.Tensor | None = None
        self.emv = 0.0

    def update(self, x: torch.Tensor) -> bool:
        """Feed ``x_k``; return whether to stop (patience exhausted)."""
        x = x.detach()
        a = self.alpha
        self.k += 1
        if self.ema is None:
            self.ema = x.to(_accumulator_dtype(x)).clone()
            return self._track(None, x)
        diff = x.to(self.ema.dtype) - self.ema
        self.emv = (1 - a) * self.emv + a * (1 - a) * float((diff * diff).sum()) / x.numel()
        self.ema += a * diff
        return self._track(self.emv / (1 - (1 - a) ** (self.k - 1)), x)


DETECTORS = ("wmv", "emv")


def make_detector(kind: str, window: int = 100, patience: int = 1000, alpha: float = 0.1) -> _MinimumTracker:
    """ES-WMV (``kind='wmv'``, uses ``window``) or ES-EMV (``'emv'``, uses ``alpha``)."""
    if kind == "wmv":
        return WindowedVariance(window, patience)
    if kind == "emv":
        return ExponentialVariance(alpha, patience)
    raise ValueError(f"unknown early-stopping rule {kind!r}; use one of {', '.join(DETECTORS)}")
