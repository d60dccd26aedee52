"""config.load_checkpoint and config.resume_config: the drivers' shared resume logic."""
import os

import pytest
import torch

import config
from config import ConfigError

DEFAULTS = {"image": "astronaut", "beta": 0.1, "iterations": 100, "results_dir": "Results", "progress": True,
            "resume": ""}
RUN_LOCAL = ("results_dir", "progress", "resume")
OVERRIDABLE = RUN_LOCAL + ("iterations",)


def _save(path, payload):
    torch.save(payload, path)
    return str(path)


def test_load_checkpoint_from_the_file_or_its_folder(tmp_path):
    payload = {"config": {"beta": 0.5}, "state": {"net": {"w": torch.arange(3.0)}, "k": 7}}
    _save(tmp_path / "checkpoint.pt", payload)
    for where in (tmp_path, tmp_path / "checkpoint.pt"):
        got = config.load_checkpoint(str(where), "X.py", state_keys=("net",))
        assert got["config"] == {"beta": 0.5} and got["state"]["k"] == 7
        assert torch.equal(got["state"]["net"]["w"], torch.arange(3.0))


@pytest.mark.parametrize("payload", [{"config": 3, "state": {}}, {"config": {}}, [1, 2],
                                     {"config": {}, "state": {"other": 1}}],
                         ids=["config", "state", "list", "state_key"])
def test_load_checkpoint_refuses_other_shapes_naming_the_program(tmp_path, payload):
    path = _save(tmp_path / "checkpoint.pt", payload)
    with pytest.raises(ConfigError, match=r"not a readable X\.py checkpoint .*that X\.py wrote"):
        config.load_checkpoint(path, "X.py", state_keys=("net",))


def test_load_checkpoint_refuses_missing_and_non_torch_files(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint at"):
        config.load_checkpoint(str(tmp_path / "missing.pt"), "X.py")
    with pytest.raises(ConfigError, match="no checkpoint at"):          # a folder without checkpoint.pt
        config.load_checkpoint(str(tmp_path), "X.py")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(64))
    with pytest.raises(ConfigError, match="not a readable X.py checkpoint"):
        config.load_checkpoint(str(junk), "X.py")


def _resume(given, saved, renamed=None):
    return config.resume_config(DEFAULTS, given, saved, RUN_LOCAL, OVERRIDABLE, renamed)


def test_saved_settings_win_and_run_local_ones_come_from_the_caller():
    saved = {"image": "coffee", "beta": 0.5, "iterations": 40, "results_dir": "old/place", "progress": False,
             "resume": "old.pt"}
    got = _resume({"resume": "new.pt"}, saved)
    assert got == {"image": "coffee", "beta": 0.5, "iterations": 40,          # saved
                   "results_dir": "Results", "progress": True, "resume": "new.pt"}   # caller/defaults
    assert _resume({"resume": "new.pt", "iterations": 300, "results_dir": "R2"}, saved)["iterations"] == 300
    assert _resume({"resume": "new.pt", "results_dir": "R2"}, saved)["results_dir"] == "R2"


def test_changing_a_saved_setting_is_refused_naming_it_but_the_same_value_is_accepted():
    saved = {"image": "coffee", "beta": 0.5}
    with pytest.raises(ConfigError, match=r"--resume continues a run.*not --beta, --image \(start a new run"):
        _resume({"resume": "c.pt", "beta": 0.25, "image": "rocket"}, saved)
    assert _resume({"resume": "c.pt", "beta": 0.5}, saved)["beta"] == 0.5
    assert _resume({"resume": "c.pt", "beta": 1}, {"beta": 1.0})["beta"] == 1.0      # int given for a float


def test_old_names_are_translated_and_unknown_saved_names_dropped():
    saved = {"old_beta": 0.7, "gone_setting": 3, "image": "rocket"}
    got = _resume({"resume": "c.pt"}, saved, renamed={"old_beta": "beta"})
    assert got["beta"] == 0.7 and got["image"] == "rocket" and "gone_setting" not in got
    with pytest.raises(ConfigError, match="renamed to 'beta'"):                        # the caller must use the new name
        _resume({"resume": "c.pt", "old_beta": 0.7}, saved, renamed={"old_beta": "beta"})


def test_a_saved_value_of_the_wrong_type_is_refused():
    with pytest.raises(ConfigError, match="expected a value of type float"):
        _resume({"resume": "c.pt"}, {"beta": "large"})


DATA = {"setting": "motion", "kernel_size": 5, "size_x": 32, "size_y": 24, "channels": 3, "seed": 0,
        "noise_level": 0.0, "blur_sigma": 1.0, "semiblind_sigma": 0.5}


@pytest.mark.parametrize("change, match", [
    (dict(setting="blurry"), "unknown setting 'blurry'; use one of motion, semiblind"),
    (dict(kernel_size=4), "kernel_size must be a positive odd integer"),
    (dict(kernel_size=-1), "kernel_size must be a positive odd integer"),
    (dict(size_y=10), r"image size must be at least 11×11"),
    (dict(kernel_size=25), r"kernel_size=25 is larger than the image \(24×32\)"),
    (dict(channels=2), "channels must be 1 .* or 3"),
    (dict(seed=-1), "seed must be an integer"),
    (dict(noise_level=float("nan")), "noise_level must be a non-negative finite"),
    (dict(semiblind_sigma=0.0), "semiblind_sigma must be a positive finite"),
])
def test_validate_data_refuses_each_bad_data_setting_in_one_line(change, match):
    with pytest.raises(ConfigError, match=match) as err:
        config.validate_data(dict(DATA, **change), ("motion", "semiblind"))
    assert "\n" not in str(err.value)


def test_validate_data_accepts_the_edges():
    config.validate_data(dict(DATA, size_x=11, size_y=11, kernel_size=11, channels=1), ("motion",))
