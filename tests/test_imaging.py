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


# --------------------------------------------------------------------------------------------
# image loading: bit depths and transparency (imaging.image_array / load_image)
# --------------------------------------------------------------------------------------------
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def _ramp(h=12, w=10, top=65535):
    """A grey ramp over the whole 16-bit range (0 … top), so a clip to 8 bits would show."""
    return np.round(np.linspace(0, top, h * w)).reshape(h, w)


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    """A 16-bit grey PNG written by PIL loads as array/65535 (to float64 rounding) in grey and,
    repeated, in colour; PIL's convert('L') would have made every pixel above 255 white."""
    a = _ramp().astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(a).save(path)
    assert Image.open(path).mode.startswith("I")
    ref = a / 65535.0
    grey = imaging.image_array(str(path), 1)
    np.testing.assert_allclose(grey[..., 0], ref, rtol=0, atol=1e-15)
    colour = imaging.image_array(str(path), 3)
    assert colour.shape == (12, 10, 3) and all(np.array_equal(colour[..., c], grey[..., 0]) for c in range(3))
    x = imaging.load_image(str(path), 12, 10, 1, str(tmp_path))     # same size: resize is the identity
    np.testing.assert_allclose(x[0].numpy(), ref, rtol=0, atol=1e-12)
    assert 0.4 < x.mean().item() < 0.6                               # not all white


def test_32_bit_integer_and_float_images(tmp_path):
    """Mode I (32-bit integers, values within 16 bits) is scaled by 65535; mode F is taken as is
    in [0, 1] and refused outside it (one line naming the range)."""
    a = _ramp(top=40000).astype(np.int32)
    Image.fromarray(a).save(tmp_path / "i32.tif")
    np.testing.assert_allclose(imaging.image_array(str(tmp_path / "i32.tif"), 1)[..., 0], a / 65535.0, atol=1e-15)
    f = (_ramp() / 65535.0).astype(np.float32)
    Image.fromarray(f).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(imaging.image_array(str(tmp_path / "f.tif"), 1)[..., 0], f.astype(np.float64))
    Image.fromarray(2 * f).save(tmp_path / "f2.tif")
    with pytest.raises(ConfigError, match=r"values outside \[0, 1\]"):
        imaging.image_array(str(tmp_path / "f2.tif"), 1)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_on_white_with_a_note(tmp_path, capsys, mode):
    """Colour c with alpha a becomes c·a + (1 − a) (on white), with one note line on stderr; an
    opaque image gives no note and the plain pixels."""
    rng = np.random.default_rng(0)
    C = 4 if mode == "RGBA" else 2
    px = rng.integers(0, 256, size=(6, 7, C), dtype=np.uint8)
    Image.fromarray(px, mode).save(tmp_path / "t.png")
    colour = px[..., :-1].astype(np.float64) / 255
    alpha = px[..., -1:].astype(np.float64) / 255
    expect = colour * alpha + (1 - alpha)
    if mode == "LA":
        expect = np.repeat(expect, 3, axis=2)
    got = imaging.image_array(str(tmp_path / "t.png"), 3)
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-15)
    grey = imaging.image_array(str(tmp_path / "t.png"), 1)
    np.testing.assert_allclose(grey[..., 0], expect @ np.array([0.299, 0.587, 0.114]), rtol=0, atol=1e-15)
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln]
    assert len(notes) == 2 and all("composited on white" in ln for ln in notes)

    px[..., -1] = 255
    Image.fromarray(px, mode).save(tmp_path / "opaque.png")
    np.testing.assert_allclose(imaging.image_array(str(tmp_path / "opaque.png"), 3)[..., 0],
                               px[..., 0] / 255, rtol=0, atol=1e-15)
    assert capsys.readouterr().err == ""


def test_8_bit_images_load_as_before(tmp_path):
    """8-bit RGB and grey keep PIL's convert('RGB') / convert('L') divided by 255 (the default
    run's data depend on it)."""
    rng = np.random.default_rng(1)
    px = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    Image.fromarray(px, "RGB").save(tmp_path / "c.png")
    np.testing.assert_array_equal(imaging.image_array(str(tmp_path / "c.png"), 3), px / 255.0)
    L = np.asarray(Image.fromarray(px, "RGB").convert("L"), dtype=np.float64) / 255.0
    np.testing.assert_array_equal(imaging.image_array(str(tmp_path / "c.png"), 1)[..., 0], L)
