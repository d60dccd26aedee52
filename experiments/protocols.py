"""Shared definitions of the 2D reproduction study (SPEC §4.2, §5): data cases, the paper's
protocol mapped onto this package's normalisation, the fair protocol, and the small pieces the
experiment scripts share (kernel composition, the H¹ dual norm, the paper's step rule).

Used by ``experiments/reproduce_2d.py`` (the table) and ``experiments/maid_vs_ift_2d.py`` (the
cost comparison).  Everything is built from the library (``imaging.make_data``, the
regularisers, ``ADPBetaProblem``, ``lower_level``, ``maid``); nothing here downloads anything.

**Data.**  ``imaging.make_data`` for every row: RGB, σ = 5/255, seed 0, the 5×5 diagonal motion
kernel ``b₀``; ``semiblind_0.5`` / ``semiblind_1.5`` blur the data with the motion kernel and then
an unknown 5×5 Gaussian of σ = 0.5 / 1.5 (``setting_kernels`` makes it ``min(5, k)`` wide), so the
true kernel is the 9×9 composition ``imaging.true_kernel``, the oracle's kernel (kernels are
compared with ``imaging.pad_kernel`` / ``imaging.kernel_error_ratio``).

**The paper's protocol in our normalisation.**  The paper's code minimises, over the kernel,

    g_paper(x, b) = ‖B_b x − y‖²/3 + β_p ‖b − b₀‖_{H¹}                (β_p = 100, H¹ unsquared)

and this package's upper level is ``g(x, b) = ‖B_b x − y‖²/n + β ‖b − b₀‖_{H¹}``.  With
``n`` = number of entries of ``y``:

    g_paper = (n/3) · [ ‖B_b x − y‖²/n + (3β_p/n) ‖b − b₀‖_{H¹} ] = (n/3) · g   with   β = 3β_p/n.

Since ``g_paper = c·g`` with ``c = n/3`` a constant, every quantity MAID uses maps exactly:
``∇g_paper = c∇g`` (so the step ``b ← b − s_p ∇g_paper`` is ``b ← b − (c s_p)∇g``: ``step = s_p·n/3``);
the CG system ``∇²ₓₓh q = ∇ₓg`` has a right-hand side scaled by ``c`` (so its absolute residual
tolerance maps as ``δ = δ_p/c = 3δ_p/n``); the sufficient-decrease test, both sides of which are
linear in ``g`` (``g``, ``‖∇ₓg‖ε``, ``L_g ε²``, and ``η s‖z‖²`` with ``s ∝ 1/c``, ``‖z‖ ∝ c``),
is unchanged; ε (an accuracy of ``x``) does not depend on the scaling.  :func:`paper_upper_mapping`
computes these numbers; ``tests/test_experiments.py`` checks ``g_paper = (n/3) g`` and the equal
steps numerically.

What the paper protocol keeps of the paper's code, and what it does not (SPEC §5):

* kept: anisotropic smoothed TV, effective weight ``e⁻⁶`` (the ×100 of the written weight only
  enters the step size), γ = 0.01; the TV baseline = 100 FISTA iterations from ``x = y`` with the
  step ``1/L₁₀₀``, ``L₁₀₀`` from 10 power iterations on the Hessian **with** the ×100
  (:func:`paper_tv_step`) — 50–100× smaller than ``1/L`` of the objective it descends;
  the learned upper operator, β = 100 on the **unsquared** H¹ norm, data term / 3;
  MAID with ε₀ = 1 (δ₀ = ε₀ in the paper's scale), step₀ = 1e-6, η = 1e-8 (the code's η²), at most
  41 upper iterations, stop at ε < 1e-6, the lower level started from ``y`` and warm-started;
* not kept: replicate boundary (ours is circular); ``b₀`` sharing storage with ``b`` (here ``b₀``
  is a fixed copy, so the H¹ penalty acts from the first step); the line-search step that never
  reaches the optimiser (here the accepted step is the one taken); the paper's tiny fixed step
  inside MAID's lower solves (ours are certified FISTA solves, ``‖∇h‖ ≤ μ ε``, with μ₀ = 10⁻² as
  everywhere in the package, so the paper's lower level is strongly convex for every kernel).
* the unsquared H¹ norm is non-differentiable at ``b = b₀``: the paper row uses
  ``ADPBetaProblem(kernel_penalty='h1')`` (:func:`operators.h1_norm`, its gradient away from ``b₀``
  and the subgradient 0 at ``b₀``), as the paper's code descends it with plain (sub)gradient steps; the
  proximal rows of ``reproduce_2d.py`` handle the norm exactly with proximal MAID.

**The fair protocol.**  Isotropic smoothed TV with the package's grid-searched weight
α = 0.005, γ = 0.01 (chosen once, for TV, on 128×128 data; never tuned per row or image),
μ₀ = 10⁻², solved to ``‖x̃ − x̂‖ ≤ 10⁻³`` (certified by ``‖∇h‖ ≤ μ·10⁻³``); ADP-β-MAID at that α
with β = 0.1 (squared H¹, the package's default), ε₀ = 10⁻², δ₀ = 10⁻⁶, step₀ = 1, stop at
ε < 10⁻⁶ or 40 upper iterations, the lower level warm-started from the fair TV solution.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import adp_problem
import lower_level
import maid as maid_mod
from imaging import kernel_error_ratio, make_data, pad_kernel, true_kernel  # noqa: F401 (re-exported)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES_DIR = os.path.join(ROOT, "images")
IMAGES = ("astronaut", "coffee", "chelsea", "rocket")

# setting key -> overrides of the data configuration (imaging.make_data)
SETTINGS = {
    "motion": {"setting": "motion"},
    "semiblind_0.5": {"setting": "semiblind", "semiblind_sigma": 0.5},
    "semiblind_1.5": {"setting": "semiblind", "semiblind_sigma": 1.5},
}

DATA = dict(size_x=256, size_y=256, channels=3, kernel_size=5, blur_sigma=1.0, semiblind_sigma=0.5,
            noise_level=5 / 255, seed=0)

MU0_DEFAULT = 1e-2         # μ₀ of every lower level here (the package's default)
MU0 = MU0_DEFAULT          # the value in use (reproduce_2d --mu0 sets it for a run)
LOWER_ITER = 3000          # cap on lower iterations per solve (hits are counted)
CG_ITER = 200              # cap on CG iterations per solve

# ---- the paper's protocol (SPEC §4.2, §5), in the paper's own units ------------------------
PAPER = dict(
    tv_kind="tv_aniso", tv_weight=math.exp(-6), tv_written_factor=100.0, tv_smoothing=0.01,
    tv_iters=100, power_iters=10,
    beta=100.0, data_divisor=3.0, step0=1e-6, eps0=1.0, eps_min=1e-6, upper_iter=41, eta=1e-8,
    rho=0.5, tau=0.5, nu=1.05, nu_step=10 / 9, backtracks=5,
)

# ---- the fair protocol ---------------------------------------------------------------------
FAIR = dict(
    tv_kind="tv", tv_weight=0.005, tv_smoothing=0.01, tv_eps=1e-3,
    beta=0.1, eps0=1e-2, delta0=1e-6, step0=1.0, eps_min=1e-6, upper_iter=40, eta=1e-4,
    rho=0.5, tau=0.5, nu=1.05, nu_step=10 / 9, backtracks=5,
)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One image × setting: ground truth, data, known kernel ``b₀`` and the true kernel."""

    image: str
    setting: str
    x_true: torch.Tensor
    y: torch.Tensor
    b0: torch.Tensor
    b_true: torch.Tensor

    @property
    def n(self) -> int:
        return self.y.numel()

    @property
    def name(self) -> str:
        return f"{self.image}/{self.setting}"


def data_config(image: str, setting: str, size: int) -> dict:
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; use one of {', '.join(SETTINGS)}")
    return dict(DATA, image=image, size_x=size, size_y=size, **SETTINGS[setting])


def make_case(image: str, setting: str, size: int = 256, dtype=torch.float64) -> Case:
    """The data of one case, from ``imaging.make_data`` (the generator every row shares)."""
    cfg = data_config(image, setting, size)
    dev = torch.device("cpu")
    x_true, b0, y = make_data(cfg, IMAGES_DIR, dev, dtype)
    return Case(image, setting, x_true, y, b0, true_kernel(cfg, dtype, dev))


def kernel_move(b: torch.Tensor, b0: torch.Tensor) -> float:
    """``‖b − b₀‖/‖b₀‖`` (zero-padded to a common size)."""
    k = max(b.shape[-1], b0.shape[-1])
    b, b0 = pad_kernel(b, k), pad_kernel(b0, k)
    return (torch.linalg.vector_norm(b - b0) / torch.linalg.vector_norm(b0)).item()


# --------------------------------------------------------------------------------------------
# lower and upper levels (adapter over the library's constructors)
# --------------------------------------------------------------------------------------------
def make_reg(kind: str, weight: float, smoothing: float):
    from regularisers import make_regulariser
    return make_regulariser(kind, weight, smoothing)


def lower_objective(b, y, kind: str, weight: float, smoothing: float, mu0: float | None = None):
    """``h(·, b) = ½‖B_b x − y‖² + weight·R_smoothing(x) + (μ₀/2)‖x‖²`` (``kind``: 'tv' | 'tv_aniso';
    ``mu0`` defaults to :data:`MU0`, read at call time)."""
    return lower_level.LowerLevel(b, y, make_reg(kind, weight, smoothing), MU0 if mu0 is None else mu0)


def adp_problem_for(case: Case, kind: str, weight: float, smoothing: float, beta: float,
                    upper_operator: str = "learned", b0=None, known_kernel=None, metrics_fn=None,
                    kernel_penalty: str = "h1_squared"):
    """ADP-β on ``case`` (``b0`` defaults to the case's known kernel; ``known_kernel`` is ``A``'s
    kernel for ``upper_operator='known'``, default ``b₀``).  ``kernel_penalty``: ``h1_squared``
    (β‖b − b₀‖²_{H¹}) or ``h1`` (the unsquared β‖b − b₀‖_{H¹}, :func:`operators.h1_norm`, in ``g``
    with its subgradient 0 at ``b₀``: what a gradient method such as the paper's descends)."""
    return adp_problem.ADPBetaProblem(case.y, case.b0 if b0 is None else b0, make_reg(kind, weight, smoothing), beta,
                                      mu0=MU0, upper_operator=upper_operator, known_kernel=known_kernel,
                                      metrics_fn=metrics_fn, kernel_penalty=kernel_penalty)


def h1_dual_norm(z: torch.Tensor) -> float:
    """``max_d ⟨z, d⟩/‖d‖_{H¹} = sqrt(Σ_c z_cᵀ M⁻¹ z_c)`` with ``M`` = :func:`prox.h1_matrix` (the Gram
    matrix of the library's H¹ norm, :func:`operators.h1_norm`), attained at ``d = M⁻¹z``.

    ``b₀`` is a stationary point of ``f_data(b) + β‖b − b₀‖_{H¹}`` exactly when
    ``‖∇f_data(b₀)‖_{H¹,*} ≤ β`` (``−∇f_data(b₀)`` lies in the subdifferential ``β·{Mu : uᵀMu ≤ 1}``
    of the penalty at ``b₀``): then no step, of any length, leaves ``b₀`` downhill to first order."""
    from prox import h1_matrix
    k = z.shape[-1]
    zz = z.reshape(z.shape[0], k * k).to(torch.float64).T
    return math.sqrt(torch.sum(zz * torch.linalg.solve(h1_matrix(k), zz)).item())


# --------------------------------------------------------------------------------------------
# the paper's step rule and fixed-iteration TV
# --------------------------------------------------------------------------------------------
def paper_tv_step(case: Case, b=None, seed: int = 0) -> float:
    """The paper's TV step ``1/L₁₀₀``: ``L₁₀₀`` from ``PAPER['power_iters']`` power iterations
    (``lower_level.hessian_norm_estimate``, seeded) on ``∇²ₓₓ[½‖B_b x − y‖² + 100·e⁻⁶ R(x)]`` at
    ``x = y`` (the written ×100 weight)."""
    b = case.b0 if b is None else b
    h = lower_objective(b, case.y, PAPER["tv_kind"], PAPER["tv_written_factor"] * PAPER["tv_weight"],
                        PAPER["tv_smoothing"])
    return 1.0 / lower_level.hessian_norm_estimate(h, case.y, PAPER["power_iters"], seed)


def paper_lower(case: Case, b=None):
    """The paper's lower level as it is descended: anisotropic TV, effective weight ``e⁻⁶``."""
    return lower_objective(case.b0 if b is None else b, case.y, PAPER["tv_kind"], PAPER["tv_weight"],
                           PAPER["tv_smoothing"])


def fixed_iterations(h, x0: torch.Tensor, iters: int, step: float) -> torch.Tensor:
    """``iters`` FISTA iterations with the fixed ``step`` on ``h`` from ``x0`` (the paper's TV
    baseline; ``lower_level.solve_lower_fixed``, FISTA momentum with ``L = 1/step``)."""
    return lower_level.solve_lower_fixed(h, x0, iters, step).x


def paper_upper_mapping(n: int) -> dict:
    """The paper's upper-level constants in this package's normalisation (module docstring):
    ``β = 3β_p/n``, ``step₀ = s_p·n/3``, ``δ₀ = 3δ_p/n`` with ``δ_p = ε₀``."""
    c = n / PAPER["data_divisor"]
    return {"scale": c, "beta": PAPER["beta"] / c, "step0": PAPER["step0"] * c, "delta0": PAPER["eps0"] / c}


def maid_config(**kw) -> "maid_mod.MAIDConfig":
    """``MAIDConfig`` from the options that this version of ``maid`` knows (others dropped)."""
    names = {f.name for f in dataclasses.fields(maid_mod.MAIDConfig)}
    return maid_mod.MAIDConfig(**{k: v for k, v in kw.items() if k in names})


def paper_maid_config(n: int, max_iter: int | None = None):
    m = paper_upper_mapping(n)
    return maid_config(eps0=PAPER["eps0"], delta0=m["delta0"], step0=m["step0"], rho=PAPER["rho"],
                       tau=PAPER["tau"], nu=PAPER["nu"], nu_step=PAPER["nu_step"], eta=PAPER["eta"],
                       max_backtracks=PAPER["backtracks"], eps_min=PAPER["eps_min"],
                       max_iter=max_iter or PAPER["upper_iter"], lower_max_iter=LOWER_ITER, cg_max_iter=CG_ITER,
                       descent_check=False, patience=10_000, grad_tol=0.0)


def fair_maid_config(max_iter: int | None = None, **changes):
    kw = dict(eps0=FAIR["eps0"], delta0=FAIR["delta0"], step0=FAIR["step0"], rho=FAIR["rho"], tau=FAIR["tau"],
              nu=FAIR["nu"], nu_step=FAIR["nu_step"], eta=FAIR["eta"], max_backtracks=FAIR["backtracks"],
              eps_min=FAIR["eps_min"], max_iter=max_iter or FAIR["upper_iter"], lower_max_iter=LOWER_ITER,
              cg_max_iter=CG_ITER, descent_check=False, patience=10_000, grad_tol=0.0)
    kw.update(changes)
    return maid_config(**kw)
