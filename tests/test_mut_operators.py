"""operators.py: properties that mutation testing found unchecked (tools/mutation_survivors.md).

Reference: the documented signature — every kernel builder creates its kernel on the ``device``
and in the ``dtype`` it is given.  The 'meta' device (shapes only, no data) stands in for a second
device, which the test machine lacks; a kernel built elsewhere and moved would be on the CPU."""
import math

import pytest
import torch

from operators import KERNEL_TYPES, check_kernel, disc_kernel, gaussian_kernel, make_kernel, motion_kernel


@pytest.mark.parametrize("kind", KERNEL_TYPES)
def test_make_kernel_builds_on_the_requested_device(kind):
    """``make_kernel(kind, …, device=d)`` returns a (C, 1, k, k) kernel on ``d`` in the given dtype."""
    b = make_kernel(kind, 5, 2, sigma=1.5, dtype=torch.float64, device="meta")
    assert b.device.type == "meta" and b.dtype == torch.float64 and tuple(b.shape) == (2, 1, 5, 5)


@pytest.mark.parametrize("build", [lambda **kw: motion_kernel(5, "vertical", 3, **kw),
                                   lambda **kw: gaussian_kernel(5, 0.8, 3, **kw),
                                   lambda **kw: disc_kernel(5, 1.5, 3, **kw)])
def test_kernel_builders_use_the_requested_device(build):
    """The three builders themselves (not only through ``make_kernel``) honour ``device``."""
    b = build(dtype=torch.float32, device="meta")
    assert b.device.type == "meta" and b.dtype == torch.float32 and tuple(b.shape) == (3, 1, 5, 5)


def test_unknown_motion_direction_names_the_choices():
    """Bad input: one line naming the value and the valid directions."""
    with pytest.raises(ValueError, match="unknown motion direction 'spiral'; use diagonal, vertical or horizontal"):
        motion_kernel(5, "spiral")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_kernel_refused_with_its_reason(bad):
    """A kernel with a NaN or Inf entry is refused in one line that says so."""
    b = motion_kernel(3, channels=1, dtype=torch.float64)
    b[0, 0, 1, 1] = bad
    with pytest.raises(ValueError, match="^kernel contains NaN or Inf$"):
        check_kernel(b)
