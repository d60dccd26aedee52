"""Regularisers ``R(x)`` of the lower level (SPEC §1, §5, §6): closed forms as the fast path,
autograd as the fallback.

A regulariser is an object; its weight is part of it (``SmoothedTV(weight=α, smoothing=γ)`` is
``α R_γ``).  ``R(x)`` is summed over every entry of ``x``, which is ``(C, H, W)`` or batched
``(N, C, H, W)``.  The interface (:class:`Regulariser`):

* ``value(x)`` (0-dim), ``grad(x) = ∇R(x)``, ``hvp(x, v) = ∇²R(x) v``;
* ``lipschitz()``: ``L_R ≥ sup_x ‖∇²R(x)‖`` (``math.inf`` if unknown) — enters ``L`` of the lower
  level (:class:`lower_level.LowerLevel`);
* ``hessian_lipschitz()``: a Lipschitz constant of ``x ↦ ∇²R(x)`` (``math.inf`` if unknown) — the
  ``L_H`` of MAID's error bound (:meth:`adp_problem.ADPBetaProblem.error_constants`);
* ``parameters()``: the learnable tensors by name (may be empty);
* ``to(dtype, device)``: a copy whose parameters are in ``dtype`` on ``device`` (used by the
  lower level's mixed-precision certificate, which evaluates ``∇R`` in float64);

and, used by the lower level's inner loops (defaults built on the four above):

* ``hessian_lower_bound()``: ``λ ≤ inf_x λ_min(∇²R(x))`` (0 for a convex ``R``; the base class
  assumes convexity), added to the lower level's strong-convexity constant ``μ``;
* ``add_grad_(out, x)``: ``out += ∇R(x)`` in place;
* ``curvature(x)``: an object whose ``add_hvp_(out, v)`` does ``out += ∇²R(x) v``, built once per
  ``x`` and reused by conjugate gradient.

The base class gets ``grad`` and ``hvp`` from ``value`` by autograd (double backward with
``create_graph`` for the HVP), so a regulariser that gives only its value works.  Subclasses
override them with closed forms; ``tests/test_regularisers.py`` checks every closed form against
this fallback in float64.  Closed forms built from plain tensor operations stay differentiable
in the parameters (mixed products ``∂_θ⟨∇ₓR_θ(x), q⟩`` by autograd through ``grad``).

Implementations (all with forward differences / filters on the last two axes, channels not
coupled unless said):

* :class:`SmoothedTV` — isotropic ``α Σ sqrt(|∇x|² + γ²)`` per channel (SPEC §1);
* :class:`AnisotropicTV` — ``α Σ [sqrt(d_h² + γ²) + sqrt(d_v² + γ²)]`` (the paper's code, SPEC §5);
* :class:`FieldsOfExperts` — ``e^c Σ_j w_j Σ (sqrt((K_j x)² + e^s) − e^s)`` (SPEC §6);
* :func:`make_regulariser` — the TVs by name (``'tv'``, ``'tv_aniso'``).

Shared scalar potential: ``φ_ε(t) = sqrt(t² + ε)`` has ``φ' = t/φ``, ``0 < φ'' = ε/φ³ ≤ ε^{-1/2}``
and ``|φ'''| = 3ε|t|/φ⁵ ≤ (3/2)(4/5)^{5/2} ε^{-1}`` (maximum at ``t² = ε/4``); see
:func:`potential_third_derivative_bound`.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from operators import FiniteDifference, _records_graph

__all__ = ["Regulariser", "SmoothedTV", "AnisotropicTV", "FieldsOfExperts", "make_regulariser", "REGULARISERS",
           "tv_value", "tv_grad", "tv_hvp", "potential_third_derivative_bound"]


def potential_third_derivative_bound(eps: float) -> float:
    """``sup_t |φ_ε'''(t)| = (3/2)(4/5)^{5/2}/ε`` for ``φ_ε(t) = sqrt(t² + ε)``.

    ``φ''' = −3εt (t² + ε)^{−5/2}``; ``d/dt [t (t²+ε)^{−5/2}] = 0`` at ``t² = ε/4``, where
    ``|φ'''| = 3ε (√ε/2) (5ε/4)^{−5/2}``."""
    return 1.5 * 0.8 ** 2.5 / eps


# --------------------------------------------------------------------------------------------
# the interface
# --------------------------------------------------------------------------------------------
class Regulariser:
    """``R(x)``, summed over all entries; ``x`` is ``(C, H, W)`` or batched ``(N, C, H, W)``.

    Subclasses give at least :meth:`value`; ``grad`` and ``hvp`` then come from autograd.  The
    constants default to ``math.inf`` (unknown), which keeps every bound that uses them valid.
    """

    def value(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        """``∇R(x)`` by reverse mode on :meth:`value`; differentiable (``create_graph``) when ``x``
        or a parameter is recorded by autograd."""
        return _autograd_grad(self, x, _records_graph(x, *self.parameters().values()))

    def hvp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``∇²R(x) v`` by double backward (the gradient graph built with ``create_graph``)."""
        return _autograd_hvp(_autograd_grad(self, x, True, keep_input=True), x, v,
                             _records_graph(x, v, *self.parameters().values()))

    def lipschitz(self) -> float:
        """``L_R ≥ sup_x ‖∇²R(x)‖``; ``math.inf`` when unknown."""
        return math.inf

    def hessian_lipschitz(self) -> float:
        """Lipschitz constant of ``x ↦ ∇²R(x)``; ``math.inf`` when unknown."""
        return math.inf

    def hessian_lower_bound(self) -> float:
        """A lower bound on ``λ_min(∇²R(x))`` over all ``x``; 0 (convex) unless overridden."""
        return 0.0

    def parameters(self) -> dict[str, torch.Tensor]:
        """Learnable tensors by name (empty by default)."""
        return {}

    def to(self, dtype=None, device=None) -> "Regulariser":
        """A shallow copy whose :meth:`parameters` are detached copies in ``dtype`` on ``device``
        (``self`` when there are none).  The names of :meth:`parameters` must be the attributes
        that hold the tensors, as in every class here; override otherwise."""
        params = self.parameters()
        if not params:
            return self
        new = copy.copy(self)
        for name, t in params.items():
            setattr(new, name, t.detach().to(dtype=dtype, device=device))
        return new

    # -- in-place forms for the lower level's inner loops ------------------------------------
    def add_grad_(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out += ∇R(x)`` in place; returns ``out``."""
        return out.add_(self.grad(x))

    def curvature(self, x: torch.Tensor):
        """What ``v ↦ ∇²R(x) v`` needs from ``x``, built once (here: the gradient graph, reused by
        every product with ``retain_graph``)."""
        return _GraphCurvature(self, x)


def _autograd_grad(R: Regulariser, x: torch.Tensor, create_graph: bool, keep_input: bool = False):
    """``∇R(x)`` by autograd on ``R.value`` (grad mode switched on even inside ``no_grad``).  With
    ``keep_input`` returns ``(g, x_leaf)`` for a following double backward."""
    with torch.enable_grad():
        xr = x if x.requires_grad else x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(R.value(xr), xr, create_graph=create_graph)
    return (g, xr) if keep_input else g


def _autograd_hvp(g_and_x, x_orig, v, create_graph: bool, retain_graph: bool = False):
    """``∂ₓ⟨g(x), v⟩`` for a gradient ``g`` built with ``create_graph``; 0 where ``g`` does not
    depend on ``x`` (a linear ``R``)."""
    g, xr = g_and_x
    with torch.enable_grad():
        if not g.requires_grad:
            return torch.zeros_like(x_orig)
        (hv,) = torch.autograd.grad(g, xr, grad_outputs=v, create_graph=create_graph,
                                    retain_graph=retain_graph or create_graph, allow_unused=True)
    return torch.zeros_like(x_orig) if hv is None else hv


class _GraphCurvature:
    """The autograd fallback's curvature: the graph of ``∇R(x)`` built once, reused per product."""

    def __init__(self, R: Regulariser, x: torch.Tensor):
        self.x = x
        self.g_and_x = _autograd_grad(R, x, True, keep_input=True)

    def add_hvp_(self, out: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return out.add_(_autograd_hvp(self.g_and_x, self.x, v, False, retain_graph=True))


class _HVPAt:
    """Curvature object of a closed-form ``hvp`` with nothing worth caching: ``R.hvp(x, ·)``."""

    def __init__(self, R: Regulariser, x: torch.Tensor):
        self.R, self.x = R, x

    def add_hvp_(self, out: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return out.add_(self.R.hvp(self.x, v))


def _channel_coef(p, x: torch.Tensor):
    """A float, or a per-channel tensor ``(C,)`` shaped ``(C, 1, 1)`` to broadcast over ``x``'s
    channels (``x`` is ``(C, H, W)`` or ``(N, C, H, W)``)."""
    if not torch.is_tensor(p):
        return p
    if p.shape != (x.shape[-3],):
        raise ValueError(f"a per-channel parameter must have shape ({x.shape[-3]},) for images with "
                         f"{x.shape[-3]} channels, got {tuple(p.shape)}")
    return p.reshape(-1, 1, 1)


def _max_ratio(num, den, power: int = 1) -> float:
    """``max_c |num_c| / den_c^power`` for floats or per-channel tensors (detached)."""
    n = num.detach().abs() if torch.is_tensor(num) else abs(num)
    d = den.detach() if torch.is_tensor(den) else den
    r = n / d ** power
    return r.max().item() if torch.is_tensor(r) else r


def _check_param(name: str, p, positive: bool):
    if torch.is_tensor(p):
        if p.ndim != 1:
            raise ValueError(f"{name} must be a float or a 1-D per-channel tensor of shape (C,), "
                             f"got shape {tuple(p.shape)}")
        bad = not torch.isfinite(p).all() or (positive and (p <= 0).any()) or (not positive and (p < 0).any())
    else:
        p = float(p)
        bad = not math.isfinite(p) or (positive and p <= 0) or (not positive and p < 0)
    if bad:
        raise ValueError(f"{name} must be {'positive' if positive else 'non-negative'} and finite, got {p!r}")
    return p


# --------------------------------------------------------------------------------------------
# isotropic smoothed TV: stencils (plain, differentiable) and fused in-place fast paths
# --------------------------------------------------------------------------------------------
def _tv_weight(dh, dv, smoothing):
    """``w = sqrt(|∇x|² + γ²)`` per pixel and channel."""
    return torch.sqrt(dh * dh + dv * dv + smoothing * smoothing)


def _inv_weight(dh, dv, smoothing, scale=1.0):
    """``scale / w = scale / sqrt(|∇x|² + γ²)`` in three passes, one allocation (no autograd)."""
    c = 1.0 / (scale * scale)
    t = torch.addcmul(torch.tensor(smoothing * smoothing * c, dtype=dh.dtype, device=dh.device), dh, dh, value=c)
    return t.addcmul_(dv, dv, value=c).rsqrt_()


def _sub_div_(out, ph, pv):
    """``out += Dᵀ(ph, pv)`` in place, for fields whose last column (``ph``) / last row (``pv``)
    is zero, as every field built from :meth:`FiniteDifference.A` here is:
    ``Dᵀ(ph, pv) = −ph − pv + ph[·, j−1] + pv[i−1, ·]``."""
    out.sub_(ph).sub_(pv)
    out[..., :, 1:] += ph[..., :, :-1]
    out[..., 1:, :] += pv[..., :-1, :]
    return out


def _sub_div_scaled_(out, dh, dv, a):
    """``out += Dᵀ(a·dh, a·dv)`` in place (same zero last column/row as :func:`_sub_div_`),
    with the products fused into the four updates instead of materialised."""
    out.addcmul_(dh, a, value=-1).addcmul_(dv, a, value=-1)
    out[..., :, 1:].addcmul_(dh[..., :, :-1], a[..., :, :-1])
    out[..., 1:, :].addcmul_(dv[..., :-1, :], a[..., :-1, :])
    return out


def _tv_grad_plain(x, smoothing):
    """``Dᵀ(∇x / w)`` with differentiable operations (``smoothing`` a float or broadcastable)."""
    dh, dv = FiniteDifference.A(x)
    w = _tv_weight(dh, dv, smoothing)
    return FiniteDifference.A_adjoint(dh / w, dv / w)


def _tv_hvp_plain(x, v, smoothing):
    """``Dᵀ[ Dv/w − ∇x (∇x·Dv)/w³ ]`` with differentiable operations."""
    dh, dv = FiniteDifference.A(x)
    w = _tv_weight(dh, dv, smoothing)
    eh, ev = FiniteDifference.A(v)
    s = (dh * eh + dv * ev) / (w * w)
    return FiniteDifference.A_adjoint((eh - dh * s) / w, (ev - dv * s) / w)


def tv_value(x: torch.Tensor, smoothing: float) -> torch.Tensor:
    """``R_γ(x) = Σ sqrt(|∇x|² + γ²)`` (unit weight; ``γ`` = ``smoothing``)."""
    dh, dv = FiniteDifference.A(x)
    return _tv_weight(dh, dv, smoothing).sum()


def tv_grad(x: torch.Tensor, smoothing: float) -> torch.Tensor:
    """``∇R_γ(x) = Dᵀ(∇x / w)`` (unit weight)."""
    if _records_graph(x):
        return _tv_grad_plain(x, smoothing)
    return _add_tv_grad_(torch.zeros_like(x), x, smoothing)


def _add_tv_grad_(out, x, smoothing, scale=1.0):
    """``out += scale·∇R_γ(x) = scale·Dᵀ(∇x/w)`` in place (no autograd)."""
    dh, dv = FiniteDifference.A(x)
    return _sub_div_scaled_(out, dh, dv, _inv_weight(dh, dv, smoothing, scale))


def tv_hvp(x: torch.Tensor, v: torch.Tensor, smoothing: float) -> torch.Tensor:
    """``∇²R_γ(x) v = Dᵀ[ Dv/w − ∇x (∇x·Dv)/w³ ]`` (unit weight)."""
    if _records_graph(x, v):
        return _tv_hvp_plain(x, v, smoothing)
    return _TVCurvature(x, smoothing).add_hvp_(torch.zeros_like(v), v)


class _TVCurvature:
    """What ``∇²R_γ(x)`` needs from ``x``, built once per ``x`` and reused for every product
    (conjugate gradient applies the Hessian many times at a fixed ``x``).

    With ``d = ∇x`` and ``w² = |d|² + γ²``, ``∇²R_γ(x) v = Dᵀ[M e]``, ``e = Dv``, where per pixel
    ``M = (I − ddᵀ/w²)/w = [[d_v² + γ², −d_h d_v], [−d_h d_v, d_h² + γ²]] / w³`` (symmetric 2×2,
    written without the cancellation of ``1 − n²``); stored scaled by ``scale`` as
    ``m11, m12, m22``."""

    def __init__(self, x, smoothing, scale=1.0):
        dh, dv = FiniteDifference.A(x)
        r3 = _inv_weight(dh, dv, smoothing)
        r3.mul_(r3.square()).mul_(scale)                                     # scale / w³
        g2 = torch.tensor(smoothing * smoothing, dtype=x.dtype, device=x.device)
        self.m11 = torch.addcmul(g2, dv, dv).mul_(r3)
        self.m22 = torch.addcmul(g2, dh, dh).mul_(r3)
        self.m12 = dh.mul_(dv).mul_(r3).neg_()

    def add_hvp_(self, out, v):
        """``out += scale·∇²R_γ(x) v`` in place."""
        eh, ev = FiniteDifference.A(v)
        ph = torch.mul(eh, self.m11).addcmul_(ev, self.m12)
        pv = ev.mul_(self.m22).addcmul_(eh, self.m12)
        return _sub_div_(out, ph, pv)


class SmoothedTV(Regulariser):
    """Isotropic smoothed total variation ``R(x) = α Σ_{c,p} sqrt(|∇x_c[p]|² + γ²)`` (SPEC §1).

    ``∇x = Dx`` are forward differences with Neumann boundary (:class:`operators.FiniteDifference`),
    isotropic in the two spatial differences of each channel, **channels not coupled**.
    ``weight`` α and ``smoothing`` γ are floats, or per-channel tensors of shape ``(C,)`` (learnable
    TV: then ``α_c``, ``γ_c`` apply to channel ``c`` and the plain differentiable formulas run).

    Closed forms, with ``w = sqrt(|∇x|² + γ²)``:
    ``∇R = α Dᵀ(∇x/w)``, ``∇²R v = α Dᵀ[Dv/w − ∇x(∇x·Dv)/w³]``.  With float parameters and
    autograd not recording, they run as fused in-place stencils (``_add_tv_grad_``,
    ``_TVCurvature``: the 2×2 curvature per pixel cached for conjugate gradient).

    Constants (floats; for per-channel tensors the maximum over channels):

    * ``L_R = 8α/γ``: per pixel ``ψ(d) = sqrt(|d|² + γ²)`` has ``∇²ψ = (I − ddᵀ/w²)/w ⪯ I/γ``, so
      ``∇²R = α Dᵀ diag(∇²ψ) D ⪯ (α/γ) DᵀD`` and ``‖D‖² ≤ 8`` (``‖D_h‖², ‖D_v‖² ≤ 4``: each
      difference ``|a − b|² ≤ 2a² + 2b²`` and each pixel enters two differences per axis).  Sharp:
      at ``x = 0``, ``∇²R = (α/γ) DᵀD`` whose norm tends to 8α/γ on large grids.
    * ``hessian_lipschitz = 48√8 α/γ²``: ``‖∇³ψ‖ ≤ 6/γ²`` (a loose bound on the third derivative
      of ``ψ``), so ``‖∇²R(x) − ∇²R(x')‖ ≤ α ‖D‖² (6/γ²) max_p |D(x − x')_p| ≤ α·8·(6/γ²)·√8 ‖x − x'‖``.
    """

    def __init__(self, weight=1.0, smoothing=0.01):
        self.weight = _check_param("TV weight", weight, positive=False)
        self.smoothing = _check_param("TV smoothing", smoothing, positive=True)
        self._fused = not (torch.is_tensor(self.weight) or torch.is_tensor(self.smoothing))

    def _fast(self, *tensors) -> bool:
        """Fused in-place path: float parameters and autograd not recording through the inputs."""
        return self._fused and not _records_graph(*tensors)

    def value(self, x):
        if self._fused:
            return self.weight * tv_value(x, self.smoothing)
        dh, dv = FiniteDifference.A(x)
        return (_channel_coef(self.weight, x) * _tv_weight(dh, dv, _channel_coef(self.smoothing, x))).sum()

    def grad(self, x):
        if self._fast(x):
            return self.add_grad_(torch.zeros_like(x), x)
        return _channel_coef(self.weight, x) * _tv_grad_plain(x, _channel_coef(self.smoothing, x))

    def hvp(self, x, v):
        if self._fast(x, v):
            return self.curvature(x).add_hvp_(torch.zeros_like(v), v)
        return _channel_coef(self.weight, x) * _tv_hvp_plain(x, v, _channel_coef(self.smoothing, x))

    def add_grad_(self, out, x):
        if not self._fast(x):
            return out.add_(self.grad(x))
        return out if self.weight == 0 else _add_tv_grad_(out, x, self.smoothing, self.weight)

    def curvature(self, x):
        if not self._fast(x):
            return _HVPAt(self, x)
        return _TVCurvature(x, self.smoothing, self.weight)

    def lipschitz(self):
        if self._fused:     # this order of operations gives the pre-seam constant bit for bit
            return FiniteDifference.NORM_SQ_BOUND * self.weight / self.smoothing
        return FiniteDifference.NORM_SQ_BOUND * _max_ratio(self.weight, self.smoothing)

    def hessian_lipschitz(self):
        if self._fused:
            return 48 * math.sqrt(8) * self.weight / self.smoothing**2
        return 48 * math.sqrt(8) * _max_ratio(self.weight, self.smoothing, 2)

    def parameters(self):
        return {k: v for k, v in (("weight", self.weight), ("smoothing", self.smoothing)) if torch.is_tensor(v)}

    def __repr__(self):
        return f"SmoothedTV(weight={self.weight!r}, smoothing={self.smoothing!r})"


# --------------------------------------------------------------------------------------------
# anisotropic smoothed TV
# --------------------------------------------------------------------------------------------
class _DiagonalCurvature:
    """``v ↦ Σ_d A_dᵀ[m_d ⊙ A_d v]`` for linear maps ``A_d`` given by ``apply``/``adjoint`` and
    per-entry curvatures ``m_d`` computed once per ``x`` (both TVs below and FoE have this form)."""

    def __init__(self, apply, adjoint, m):
        self.apply, self.adjoint, self.m = apply, adjoint, m

    def hvp(self, v):
        """``Σ_d A_dᵀ[m_d ⊙ A_d v]`` (differentiable)."""
        return self.adjoint(*(m * e for m, e in zip(self.m, self.apply(v))))

    def add_hvp_(self, out, v):
        return out.add_(self.hvp(v))


class AnisotropicTV(Regulariser):
    """Anisotropic smoothed TV ``R(x) = α Σ_{c,p} [φ(d_h) + φ(d_v)]``, ``φ(t) = sqrt(t² + γ²)``,
    ``(d_h, d_v) = Dx`` forward differences with Neumann boundary (= replicate padding), each
    difference in its own square root: what the paper's code uses (SPEC §5; its constant offset
    ``−10⁻⁸`` per difference changes no derivative and is left out).  ``weight``/``smoothing`` are
    floats or per-channel ``(C,)`` tensors, as for :class:`SmoothedTV`.

    ``∇R = α [D_hᵀφ'(d_h) + D_vᵀφ'(d_v)]``, ``∇²R v = α [D_hᵀ(φ''(d_h) D_h v) + D_vᵀ(φ''(d_v) D_v v)]``
    with ``φ'(t) = t/φ(t)``, ``φ''(t) = γ²/φ(t)³ ∈ (0, 1/γ]``.

    Constants:

    * ``L_R = 8α/γ``: ``∇²R ⪯ (α/γ)(D_hᵀD_h + D_vᵀD_v) = (α/γ)DᵀD`` and ``‖D‖² ≤ 8``; equality
      in the limit at ``x = 0`` (all ``φ'' = 1/γ``) on large grids.
    * ``hessian_lipschitz = 8√2 c₃ α/γ²``, ``c₃ = (3/2)(4/5)^{5/2}`` (:func:`potential_third_derivative_bound`
      with ``ε = γ²``): ``∇²R(x) − ∇²R(x') = α Σ_d D_dᵀ diag(φ''(D_d x) − φ''(D_d x')) D_d``; each
      diagonal is at most ``(c₃/γ²) ‖D_d e‖_∞`` (``e = x − x'``) and ``|e_p − e_q| ≤ √2 ‖e‖``, and
      ``‖D_d‖² ≤ 4``: ``α (4 + 4) √2 c₃/γ²``.
    """

    def __init__(self, weight=1.0, smoothing=0.01):
        self.weight = _check_param("TV weight", weight, positive=False)
        self.smoothing = _check_param("TV smoothing", smoothing, positive=True)

    def _coefs(self, x):
        return _channel_coef(self.weight, x), _channel_coef(self.smoothing, x)

    def value(self, x):
        a, g = self._coefs(x)
        dh, dv = FiniteDifference.A(x)
        return (a * (torch.sqrt(dh * dh + g * g) + torch.sqrt(dv * dv + g * g))).sum()

    def grad(self, x):
        a, g = self._coefs(x)
        dh, dv = FiniteDifference.A(x)
        return a * FiniteDifference.A_adjoint(dh * torch.rsqrt(dh * dh + g * g), dv * torch.rsqrt(dv * dv + g * g))

    def curvature(self, x):
        a, g = self._coefs(x)
        return _DiagonalCurvature(FiniteDifference.A, FiniteDifference.A_adjoint,
                                  [a * g * g * torch.rsqrt(d * d + g * g) ** 3 for d in FiniteDifference.A(x)])

    def hvp(self, x, v):
        return self.curvature(x).hvp(v)

    def lipschitz(self):
        return FiniteDifference.NORM_SQ_BOUND * _max_ratio(self.weight, self.smoothing)

    def hessian_lipschitz(self):
        return 8 * math.sqrt(2) * potential_third_derivative_bound(1.0) * _max_ratio(self.weight, self.smoothing, 2)

    def parameters(self):
        return {k: v for k, v in (("weight", self.weight), ("smoothing", self.smoothing)) if torch.is_tensor(v)}

    def __repr__(self):
        return f"AnisotropicTV(weight={self.weight!r}, smoothing={self.smoothing!r})"


# --------------------------------------------------------------------------------------------
# Fields of Experts
# --------------------------------------------------------------------------------------------
FOE_PADDINGS = ("valid", "zero")


class FieldsOfExperts(Regulariser):
    """Fields of Experts (SPEC §6): ``R(x) = e^c Σ_j w_j Σ_p (φ((K_j x)_p) − e^s)``,
    ``φ(t) = sqrt(t² + e^s)``, with ``K`` filters ``K_j`` of ``k×k`` over all input channels.

    Parameters (``parameters()``; pass ``requires_grad=True`` or set it on them to learn):
    ``filters`` ``(K, C, k, k)``, ``weights`` ``w`` ``(K,)``, ``log_smoothing`` ``s`` and
    ``log_scale`` ``c`` (0-dim).  :meth:`project_` keeps each filter zero-mean (the mean over its
    ``C·k·k`` entries subtracted; call it after each optimiser step).

    **Boundary.** ``K_j x = conv2d(x, f_j)`` (a correlation, over all channels), with
    ``padding='valid'`` (default) evaluated only where the filter lies inside the image, output
    ``(H − k + 1) × (W − k + 1)``, or ``padding='zero'`` (zero padding ``k//2``, output ``H × W``).
    ``Kᵀ`` is the input-gradient of that convolution (``torch.nn.grad.conv2d_input``) with the
    same padding: the exact adjoint of the same map (tested).  'valid' is the default because zero padding creates artificial edges between the
    image (values ≈ 0.5) and the zeros around it, to which zero-mean filters respond, so the
    learned prior would pull the border towards 0.

    Closed forms (``z_j = K_j x``, ``ε = e^s``):
    ``∇R = e^c Σ_j w_j K_jᵀ φ'(z_j)``, ``∇²R v = e^c Σ_j w_j K_jᵀ[φ''(z_j) ⊙ K_j v]``,
    ``φ'(t) = t/φ(t)``, ``φ''(t) = ε/φ(t)³ ∈ (0, ε^{-1/2}]``; plain tensor operations, so
    differentiable in the parameters.  :meth:`curvature` caches ``e^c w_j φ''(z_j)`` per ``x``.

    Constants, with ``‖K_j‖ ≤ n_j = sqrt(Σ_c ‖f_{j,c}‖₁²)`` (Young per channel, ``‖f * u‖ ≤ ‖f‖₁‖u‖``
    for the full convolution, of which both boundary choices are restrictions; then Cauchy–Schwarz
    over channels):

    * ``L_R = e^c e^{−s/2} P̄`` (``|φ''| ≤ ε^{−1/2}``) with ``P̄ ≥ ‖Σ_j |w_j| K_jᵀK_j‖``, the
      **joint frequency bound** (:meth:`filter_bank_norm_bound`): ``Σ_j |w_j| K_jᵀK_j`` for the
      full convolution is, per frequency ω, the C×C matrix ``Σ_j |w_j| f̂_j(ω)^* f̂_j(ω)ᵀ``, whose
      norm is at most its trace ``P(ω) = Σ_j |w_j| ‖f̂_j(ω)‖²``, a non-negative trigonometric
      polynomial of degree ``d = k − 1`` in each variable.  On an M×M grid every ω is within
      ``π/M`` of a node per coordinate, and Bernstein's inequality ``‖∂_i P‖_∞ ≤ d ‖P‖_∞`` gives
      ``‖P‖_∞ ≤ max_grid P / (1 − 2πd/M)``.  Both boundary choices are restrictions of the full
      convolution, so the bound holds for them.  For 10 random unit-norm 7×7 filters it is about
      16× smaller than the per-filter ℓ₁ bound ``Σ_j |w_j| n_j²`` (which it replaced), and the
      lower-level step ``1/L`` grows accordingly;
    * ``hessian_lipschitz = e^c Σ_j |w_j| n_j³ c₃ e^{−s}``, ``c₃ = (3/2)(4/5)^{5/2}``:
      ``‖diag(φ''(K_j x) − φ''(K_j x'))‖ ≤ (c₃/ε) ‖K_j(x − x')‖_∞ ≤ (c₃/ε) n_j ‖x − x'‖``;
    * ``hessian_lower_bound = −e^c Σ_{w_j<0} |w_j| n_j² e^{−s/2}``: each term with ``w_j ≥ 0`` is
      positive semidefinite, so ``R`` is convex when all weights are non-negative.

    Inputs ``(C, H, W)`` or ``(N, C, H, W)``; the value is summed over the batch.
    """

    def __init__(self, channels: int = 3, n_filters: int = 10, size: int = 7, *, filters=None, weights=None,
                 smoothing: float = 1e-4, scale: float = 1.0, padding: str = "valid", seed: int = 0,
                 requires_grad: bool = False, dtype=None, device=None):
        if padding not in FOE_PADDINGS:
            raise ValueError(f"unknown FoE padding {padding!r}; use one of {', '.join(FOE_PADDINGS)}")
        if not (smoothing > 0 and scale > 0 and math.isfinite(smoothing) and math.isfinite(scale)):
            raise ValueError(f"FoE smoothing and scale must be positive and finite, got {smoothing!r}, {scale!r}")
        dtype = dtype or torch.get_default_dtype()
        if filters is None:
            if size % 2 == 0 or size < 1:
                raise ValueError(f"FoE filter size must be a positive odd integer, got {size!r}")
            g = torch.Generator().manual_seed(seed)
            filters = torch.randn(n_filters, channels, size, size, generator=g, dtype=torch.float64)
            filters = filters - filters.mean(dim=(1, 2, 3), keepdim=True)
            filters = filters / torch.linalg.vector_norm(filters, dim=(1, 2, 3), keepdim=True)
        if filters.ndim != 4 or filters.shape[-1] != filters.shape[-2] or filters.shape[-1] % 2 == 0:
            raise ValueError(f"FoE filters must have shape (K, C, k, k) with k odd, got {tuple(filters.shape)}")
        if weights is None:
            weights = torch.ones(filters.shape[0], dtype=torch.float64)
        if weights.shape != filters.shape[:1]:
            raise ValueError(f"FoE weights must have shape ({filters.shape[0]},), got {tuple(weights.shape)}")
        def leaf(t):
            return torch.as_tensor(t).detach().to(dtype=dtype, device=device).clone().requires_grad_(requires_grad)
        self.filters, self.weights = leaf(filters), leaf(weights)
        self.log_smoothing, self.log_scale = leaf(math.log(smoothing)), leaf(math.log(scale))
        self.padding = padding
        self._pad = 0 if padding == "valid" else self.filters.shape[-1] // 2

    # -- the filter bank K and its adjoint --------------------------------------------------
    def apply_filters(self, x: torch.Tensor) -> torch.Tensor:
        """``K x``: ``(N, C, H, W)`` (or ``(C, H, W)``) to ``(N, K, H', W')`` (or ``(K, H', W')``)."""
        if x.ndim not in (3, 4) or x.shape[-3] != self.filters.shape[1]:
            raise ValueError(f"FoE expects images (C, H, W) or (N, C, H, W) with C = {self.filters.shape[1]}, "
                             f"got {tuple(x.shape)}")
        z = F.conv2d(x if x.ndim == 4 else x.unsqueeze(0), self.filters, padding=self._pad)
        return z if x.ndim == 4 else z.squeeze(0)

    def apply_filters_adjoint(self, z: torch.Tensor) -> torch.Tensor:
        """``Kᵀ z``, back to the image shape: the input gradient of the same ``conv2d``
        (``torch.nn.grad.conv2d_input``, the kernel autograd's backward uses; the same numbers as
        ``conv_transpose2d`` with that padding, which on the CPU in float64 measured 2–6× slower
        for 96×96 images and 10 filters 7×7).  ``H' + k − 1 − 2·pad`` gives the image size."""
        zb = z if z.ndim == 4 else z.unsqueeze(0)
        k = self.filters.shape[-1]
        size = (zb.shape[0], self.filters.shape[1], zb.shape[-2] + k - 1 - 2 * self._pad,
                zb.shape[-1] + k - 1 - 2 * self._pad)
        x = torch.nn.grad.conv2d_input(size, self.filters, zb, padding=self._pad)
        return x if z.ndim == 4 else x.squeeze(0)

    def _expert_coef(self) -> torch.Tensor:
        """``e^c w_j`` shaped ``(K, 1, 1)`` to broadcast over filter responses ``(…, K, H', W')``."""
        return (self.log_scale.exp() * self.weights).reshape(-1, 1, 1)

    # -- R and its derivatives --------------------------------------------------------------
    def value(self, x):
        z = self.apply_filters(x)
        eps = self.log_smoothing.exp()
        return (self._expert_coef() * (torch.sqrt(z * z + eps) - eps)).sum()

    def grad(self, x):
        z = self.apply_filters(x)
        return self.apply_filters_adjoint(self._expert_coef() * z * torch.rsqrt(z * z + self.log_smoothing.exp()))

    def curvature(self, x):
        z = self.apply_filters(x)
        eps = self.log_smoothing.exp()
        m = self._expert_coef() * eps * torch.rsqrt(z * z + eps) ** 3
        return _DiagonalCurvature(lambda v: (self.apply_filters(v),), self.apply_filters_adjoint, [m])

    def hvp(self, x, v):
        return self.curvature(x).hvp(v)

    def project_(self) -> "FieldsOfExperts":
        """Make each filter zero-mean in place (``f_j ← f_j − mean(f_j)``), outside autograd."""
        with torch.no_grad():
            self.filters -= self.filters.mean(dim=(1, 2, 3), keepdim=True)
        return self

    # -- constants ----------------------------------------------------------------------------
    def filter_norm_bounds(self) -> torch.Tensor:
        """``n_j = sqrt(Σ_c ‖f_{j,c}‖₁²) ≥ ‖K_j‖`` (see the class docstring), shape ``(K,)``."""
        f = self.filters.detach()
        return torch.linalg.vector_norm(f.abs().sum(dim=(2, 3)), dim=1)

    def filter_bank_norm_bound(self, grid_factor: float = 0.15) -> float:
        """``P̄ ≥ ‖Σ_j |w_j| K_jᵀK_j‖`` by the frequency grid and Bernstein's inequality (class
        docstring): ``max_grid P / (1 − 2πd/M)`` with M the smallest power of two ≥ 64 for which
        ``2πd/M ≤ grid_factor``."""
        if not 0 < grid_factor < 1:
            raise ValueError(f"grid_factor must lie strictly between 0 and 1 (2πd/M ≤ grid_factor keeps "
                             f"1 − 2πd/M > 0), got {grid_factor!r}")
        f = self.filters.detach().double()
        d = f.shape[-1] - 1
        if d == 0:  # 1×1 filters: P is constant
            return float((self.weights.detach().double().abs() * (f ** 2).sum(dim=(1, 2, 3))).sum())
        M = 64
        while 2 * math.pi * d / M > grid_factor:
            M *= 2
        spec = torch.fft.rfft2(f, s=(M, M)).abs().pow(2).sum(1)          # (K, M, M/2+1): ‖f̂_j(ω)‖²
        P = torch.tensordot(self.weights.detach().double().abs(), spec, dims=1)  # real f: P(−ω) = P(ω)
        return P.max().item() / (1 - 2 * math.pi * d / M)

    def _sum_weighted_norms(self, power: int, only_negative: bool = False) -> float:
        w = self.weights.detach()
        w = w.clamp(max=0) if only_negative else w
        return (self.log_scale.detach().exp() * (w.abs() * self.filter_norm_bounds() ** power).sum()).item()

    def lipschitz(self):
        return self.log_scale.detach().exp().item() * self.filter_bank_norm_bound() * math.exp(
            -self.log_smoothing.item() / 2)

    def hessian_lipschitz(self):
        return self._sum_weighted_norms(3) * potential_third_derivative_bound(math.exp(self.log_smoothing.item()))

    def hessian_lower_bound(self):
        return -self._sum_weighted_norms(2, only_negative=True) * math.exp(-self.log_smoothing.item() / 2)

    def parameters(self):
        return {"filters": self.filters, "weights": self.weights, "log_smoothing": self.log_smoothing,
                "log_scale": self.log_scale}

    def __repr__(self):
        K, C, k, _ = self.filters.shape
        return f"FieldsOfExperts({K} filters {C}×{k}×{k}, padding={self.padding!r})"


# --------------------------------------------------------------------------------------------
# by name
# --------------------------------------------------------------------------------------------
REGULARISERS = {"tv": SmoothedTV, "tv_aniso": AnisotropicTV}


def make_regulariser(kind: str, weight: float, smoothing: float) -> Regulariser:
    """The regulariser ``kind`` (``'tv'``: :class:`SmoothedTV`, ``'tv_aniso'``: :class:`AnisotropicTV`)
    with weight α and smoothing γ.  Fields of Experts is built directly (:class:`FieldsOfExperts`)."""
    if kind not in REGULARISERS:
        raise ValueError(f"unknown regulariser {kind!r}; use one of {', '.join(REGULARISERS)}")
    return REGULARISERS[kind](weight, smoothing)
