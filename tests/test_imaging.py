"""Device choice (imaging.resolve_device): MPS has no float64, so ``auto`` must not pick it for
float64 and an explicit ``mps`` with float64 is refused with a ConfigError (no GPU needed: the
availability checks are patched)."""
import pytest
import torch

import imaging
from config import ConfigError


@pytest.fixture
def mps_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(imaging, "_mps_available", lambda: True)


def test_auto_skips_mps_for_float64(mps_present):
    assert imaging.resolve_device("auto", "float64").type == "cpu"
    assert imaging.resolve_device("auto", "float32").type == "mps"


def test_explicit_mps_with_float64_is_refused(mps_present):
    with pytest.raises(ConfigError, match="no float64"):
        imaging.resolve_device("mps", "float64")
    assert imaging.resolve_device("mps", "float32").type == "mps"


def test_unavailable_or_unknown_devices_are_refused(monkeypatch):
    monkeypatch.setattr(imaging, "_mps_available", lambda: False)
    with pytest.raises(ConfigError, match="not available"):
        imaging.resolve_device("mps", "float32")
    with pytest.raises(ConfigError, match="unknown device"):
        imaging.resolve_device("gpu0", "float32")
