"""Training data (datasets.py): offline sources, a split by source image, recorded crops, seeded noise."""
import pytest
import torch

from config import ConfigError
from datasets import SOURCES, available_sources, load_source, make_dataset, split_sources


@pytest.fixture(scope="module")
def grey():
    return make_dataset(12, 6, 32, 1, 0.1, seed=3)


def test_every_listed_source_loads_offline_in_range():
    """Each skimage sample in SOURCES loads from the wheel (no pooch download) as (C, H, W) in [0, 1];
    the RGB ones have 3 channels in colour mode."""
    for name, (_, rgb) in SOURCES.items():
        a = load_source(name, 1)
        assert a.shape[0] == 1 and a.min() >= 0 and a.max() <= 1 and min(a.shape[1:]) >= 96
        if rgb:
            assert load_source(name, 3).shape[0] == 3
    assert set(available_sources(3)) < set(available_sources(1))


def test_split_is_disjoint_and_covers_every_source(grey):
    assert not set(grey.train_sources) & set(grey.test_sources)
    assert sorted(grey.train_sources + grey.test_sources) == available_sources(1)
    assert {c["source"] for c in grey.crops if c["split"] == "train"} <= set(grey.train_sources)
    assert {c["source"] for c in grey.crops if c["split"] == "test"} <= set(grey.test_sources)


def test_split_depends_on_seed_and_refuses_empty_sides():
    names = available_sources(1)
    assert split_sources(names, 3, 0) != split_sources(names, 3, 1)
    with pytest.raises(ConfigError):
        split_sources(names, 0, 0)
    with pytest.raises(ConfigError):
        split_sources(names, len(names), 0)


def test_recorded_crops_are_the_pixels_used(grey):
    """Reference: cutting each recorded (source, top, left) out of the source again."""
    xs = torch.cat([grey.x_train, grey.x_test])
    for x, c in zip(xs, grey.crops):
        a = torch.from_numpy(load_source(c["source"], 1))[:, c["top"]:c["top"] + 32, c["left"]:c["left"] + 32]
        assert torch.equal(x, a)


def test_noise_is_seeded_with_the_stated_level(grey):
    """Same seed, same data; the residual y − x has std σ = 0.1 within 3 % (12·32² samples: the
    standard error of a sample std is σ/√(2n) ≈ 0.6 %)."""
    again = make_dataset(12, 6, 32, 1, 0.1, seed=3)
    assert torch.equal(again.y_train, grey.y_train) and torch.equal(again.y_test, grey.y_test)
    assert abs((grey.y_train - grey.x_train).std().item() - 0.1) < 3e-3
    other = make_dataset(12, 6, 32, 1, 0.1, seed=4)
    assert not torch.equal(other.x_train, grey.x_train)
