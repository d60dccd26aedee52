"""The paper protocol (SPEC §4.2 "For reference" and §5): the 2D setting of the paper's code.

    python ADP.py presets/paper.py                       # the paper's settings
    python ADP.py presets/paper.py --image=coffee        # any constant can still be overridden

Mapping of the paper code's normalisations onto ours:

* lower level: the paper writes ½‖B_b x − y‖² + 100·e⁻⁶·Σ_d (sqrt(d² + 10⁻⁴) − 10⁻⁸) but its
  FISTA steps along the gradient without the ×100, so the objective it minimises has the weight
  e⁻⁶ ≈ 0.00248 (``tv_weight``) on the anisotropic smoothed TV (``regulariser = "tv_aniso"``,
  each difference in its own square root) with γ² = 10⁻⁴ (``tv_smoothing = 0.01``).  The
  constant −10⁻⁸ per difference changes no derivative and is left out.
* TV baseline: 100 iterations from x = y (``baseline_iters = 100``) with the step 1/L̃, L̃ from
  10 power iterations on the Hessian of h at y with the regulariser weighted ×100
  (``baseline_lipschitz_factor = 100``): the step is about 70× smaller than 1/L of the objective
  it descends, as in the paper's code; the run prints the ratio.  Not converged.
* upper level: ‖B_b x − y‖²/3 + 100‖b − b₀‖_{H¹}: the learned operator (``upper_operator``), the
  data term divided by the 3 channels (``upper_normalisation = "channels"``; ours divides by n,
  the number of entries of y), β = 100 on the unsquared H¹ norm (``kernel_penalty = "h1"``).  ADP.py
  handles this norm exactly, as the non-smooth part of proximal MAID (``ADP.build_composite``:
  β‖b − b₀‖_{H¹} leaves g and enters through its prox, :class:`prox.H1NormPenalty`), so b₀ is
  a stationary point whenever the data term's slope is below β in the dual norm; until issue 17
  the driver used the subgradient 0 at b₀ instead (the paper's code differentiates through it).
* MAID: ε₀ = 1 (δ₀ = ε₀), stop when ε < 10⁻⁶, at most 41 upper iterations, initial step
  α₀ = 10⁻⁶ on the paper's g (the driver runs MAID on our n-normalised g = g_paper/c, c = n/3,
  with the step c·α₀, δ₀/c and β/c: the same iterates, see ``ADP.upper_scale``),
  sufficient-decrease constant η² = 10⁻⁸ of the paper's code (our ``eta`` is the constant
  itself), ρ = τ = 0.5, ν = 1.05, ν_α = 10/9 (ADP.py's defaults).

Which of the paper code's defects this preset reproduces (SPEC §5):

* reproduced: the under-converged TV baseline (fixed 100 iterations, too-small step); the
  data term over 3 instead of n; the unsquared, non-differentiable H¹ penalty (here by its exact
  prox, not the paper's gradient step through it); the paper's small η.
* not reproduced: the line-search step never reaching the optimiser (SPEC §3: our accepted
  steps move the kernel); b₀ sharing storage with b (our penalty is active from the start, and
  failed line searches do not move the kernel); the too-small step inside MAID's lower solves
  (ours use 1/L and stop on the certified test ‖∇h‖ ≤ μ ε); replicate padding of the blur
  (ours is circular; the regulariser's Neumann differences equal replicate padding); no
  Tikhonov term (ours needs μ₀ > 0 for the certificate: ADP.py's μ₀ = 10⁻² is kept).
* image size: 400×300 (height × width) as in the paper; the paper's three photos are not
  bundled, so the image is ADP.py's default sample (override with --image=PATH).
"""
import math as _math

# data: the paper's size and noise
size_y = 400               # height
size_x = 300               # width
noise_level = 5 / 255
# lower level: anisotropic smoothed TV with the effective weight e⁻⁶, γ = 0.01
regulariser = "tv_aniso"
tv_weight = _math.exp(-6)  # ≈ 0.00248
tv_smoothing = 0.01
# TV baseline: 100 iterations from y with the paper's step (L̃ with the regulariser ×100)
baseline_iters = 100
baseline_lipschitz_factor = 100.0
# upper level: learned operator, data term over the channels, β = 100 on the unsquared H¹ norm
upper_operator = "learned"
upper_normalisation = "channels"
kernel_penalty = "h1"
beta = 100.0
# MAID
eps0 = 1.0
delta0 = 1.0
threshold = 1e-6
upper_iter = 41
step = 1e-6
eta = 1e-8
