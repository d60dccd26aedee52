"""float32 lower-level solves in the default run's regime (issue 15): μ ≈ 0.01, SmoothedTV(0.005, 0.01),
a motion kernel that has lost mass (sum 0.99), a piecewise-constant image (flat regions, where the TV
curvature α/γ is largest), and ε down to 1e-5.

There, the float32 iterates reach ‖x̃ − x̂‖ ≈ 1e-6, but the certificate evaluated at a float32 point
cannot show it (measured on 3×32×32: the refined float32 solve without the float64 switch stopped
uncertified at ε = 3e-5 and 1e-5 with a true error of 8.6e-7; on the default 3×256×256 run it failed
for every ε below ~2e-4).  :func:`lower_level.solve_lower` now switches the remaining iterations to
float64 and certifies the returned float32 point by the triangle inequality.  Checked here against a
float64 reference solved to 1e-11, independently of the solver's own certificate."""
import pytest
import torch

import lower_level
from lower_level import LowerLevel, solve_lower
from operators import Blur, motion_kernel
from regularisers import SmoothedTV


def blocks_data(n=32, seed=0):
    """3×n×n: six random constant blocks on 0.3, blurred by 0.99 × a 5×5 motion kernel, noise 0.02,
    as float32 ``(b, y)`` (exact float64 copies are the references)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((3, n, n), 0.3, dtype=torch.float64)
    for _ in range(6):
        i, j, w = torch.randint(0, n, (3,), generator=g).tolist()
        x[:, i:i + w // 2 + 4, j:j + w // 2 + 4] += 0.4 * torch.rand(3, 1, 1, generator=g, dtype=torch.float64)
    b = 0.99 * motion_kernel(5, channels=3, dtype=torch.float64)
    y = Blur(b, (n, n)).A(x) + 0.02 * torch.randn(3, n, n, generator=g, dtype=torch.float64)
    return b.float(), y.float()


def _blocks_problem(n=32, seed=0):
    """:func:`blocks_data`'s float32 ``h``, its exact float64 copy and the reference ``x̂`` of the latter."""
    b, y = blocks_data(n, seed)
    h32 = LowerLevel(b, y, SmoothedTV(0.005, 0.01), 1e-2)
    h64 = LowerLevel(b.double(), y.double(), SmoothedTV(0.005, 0.01), 1e-2)
    x_hat = solve_lower(h64, y.double(), 1e-11, 200000).x
    return h32, h64, y, x_hat


@pytest.fixture(scope="module")
def problem():
    return _blocks_problem()


@pytest.mark.parametrize("eps", [3e-5, 1e-5])
def test_float32_solve_is_certified_below_the_float32_certificate_floor(problem, eps):
    """μ ≈ 0.0104; the solve certifies ε (within the 3000-iteration cap), returns a float32 iterate
    whose distance to ``x̂`` is ≤ ε, runs its last iterations in float64 (counted), and reports the
    float64 ``‖∇h‖`` of the returned point (recomputed here, 1e-9 relative)."""
    h32, h64, y, x_hat = problem
    assert 0.0100 < h32.mu < 0.0110
    before = dict(lower_level.LOW_PRECISION_STATS)
    res = solve_lower(h32, y.float(), eps, 3000)
    assert res.converged and res.status == "converged" and res.x.dtype == torch.float32
    assert torch.linalg.vector_norm(res.x.double() - x_hat).item() <= eps
    assert res.grad_norm == pytest.approx(torch.linalg.vector_norm(h64.grad(res.x.double())).item(), rel=1e-9)
    after = lower_level.LOW_PRECISION_STATS
    assert after["solves"] == before["solves"] + 1
    assert after["float64_fallbacks"] == before["float64_fallbacks"] + 1
    assert after["float64_iterations"] > before["float64_iterations"]
    assert after["unreachable"] == before["unreachable"]


def test_unreachable_eps_stops_early_and_no_float32_point_is_that_close(problem):
    """ε = 1e-7: the float32 grid around ``x̂`` is farther than ε (checked here: ``‖fl(x̂) − x̂‖``, the
    distance from ``x̂`` to the nearest float32 point, exceeds ε), so no float32 solve may certify
    it.  The solve says ``converged=False`` with a finite float64 ``grad_norm`` ('max_iter'), stops
    well before the cap, is counted as unreachable, and its iterate is within 1e-5 of ``x̂``."""
    h32, _, y, x_hat = problem
    assert torch.linalg.vector_norm(x_hat.float().double() - x_hat).item() > 1e-7
    before = lower_level.LOW_PRECISION_STATS["unreachable"]
    res = solve_lower(h32, y.float(), 1e-7, 20000)
    assert not res.converged and res.status == "max_iter" and res.iters < 5000
    assert lower_level.LOW_PRECISION_STATS["unreachable"] == before + 1
    assert torch.linalg.vector_norm(res.x.double() - x_hat).item() <= 1e-5


@pytest.mark.parametrize("certificate", ["gradient", "energy"])
def test_eps_above_the_floor_stays_in_float32(problem, certificate):
    """ε = 1e-3 is reachable in float32: certified, no float64 switch, error ≤ ε."""
    h32, _, y, x_hat = problem
    before = lower_level.LOW_PRECISION_STATS["float64_fallbacks"]
    res = solve_lower(h32, y.float(), 1e-3, 3000, certificate=certificate)
    assert res.converged and lower_level.LOW_PRECISION_STATS["float64_fallbacks"] == before
    assert torch.linalg.vector_norm(res.x.double() - x_hat).item() <= 1e-3


@pytest.mark.parametrize("dtype, certificate", [(torch.float32, "auto"), (torch.float64, "energy"),
                                                (torch.float64, "gradient")])
def test_no_strong_convexity_means_no_certificate_not_a_crash(dtype, certificate):
    """With μ = 0 (zero kernel, μ₀ = 0, convex TV) no bound ‖x̃ − x̂‖ ≤ ε exists: the solve runs to
    its cap and reports itself uncertified (it raised ZeroDivisionError in the certificate)."""
    y = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    h = LowerLevel(torch.zeros(1, 1, 3, 3, dtype=dtype), y, SmoothedTV(0.1, 0.1), 0.0)
    assert h.mu == 0
    out = solve_lower(h, y.clone(), 1e-3, 10, certificate=certificate)
    assert out.status == "max_iter" and not out.converged and out.iters == 10
