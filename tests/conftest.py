"""Shared test set-up: the repository root on ``sys.path``, float64 by default, seeded random
tensors, one finite-difference helper, and the ``slow`` marker (subprocess launches and runs of a
driver; deselect with ``-m "not slow"`` while developing, CI runs everything)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Derivative checks (finite differences, autograd references) need float64: in float32 a central
# difference with step 1e-6 carries relative rounding errors of ~1e-2.
torch.set_default_dtype(torch.float64)
# The tests' tensors are tiny: one thread avoids the thread-pool overhead that dominates them (a small
# conv2d took 48 ms with 2 threads on a loaded 2-core machine, 0.004 ms with 1).
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: launches a subprocess or runs a driver end to end")


def rand(*shape, seed=0, dtype=torch.float64):
    """A standard-normal tensor of ``shape`` drawn from its own generator (tests stay independent)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture
def rng():
    """A seeded CPU generator (seed 0) for tests that draw several tensors."""
    return torch.Generator().manual_seed(0)


def fd_directional(f, theta, direction, h=1e-6):
    """Central difference ``(f(θ + h d) − f(θ − h d)) / 2h`` of a scalar function ``f``; its error
    is O(h²)·|f'''| plus rounding O(ε_mach·|f|/h) ≈ 1e-10·|f| in float64 with h = 1e-6."""
    return (float(f(theta + h * direction)) - float(f(theta - h * direction))) / (2 * h)
