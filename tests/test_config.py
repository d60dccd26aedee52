"""config.py: typed ``--name=value`` parsing, presets, programmatic overrides, renamed settings and
the results-folder helpers.  Pure Python, in-process, no driver runs."""
import math
import os

import pytest

import config
from config import ConfigError

DEFAULTS = {"size": 256, "weight": 0.005, "name": "astronaut", "flag": False}
RENAMED = {"alpha": "weight"}


@pytest.mark.parametrize("text,default,expected", [
    ("7", 3, 7), ("-2", 3, -2), ("0.25", 1.0, 0.25), ("5/255", 1.0, 5 / 255), ("1e-3", 1.0, 1e-3),
    ("inf", 1.0, math.inf), ("yes", False, True), ("0", True, False), ("Off", True, False),
    ("coffee", "x", "coffee"), ("[1, 2]", [0], [1, 2])])
def test_parse_value_gives_the_default_type(text, default, expected):
    """Each value is parsed to the type of the default (fractions evaluated exactly as the
    division of two floats)."""
    v = config.parse_value("k", text, default)
    assert type(v) is type(default) and v == expected


@pytest.mark.parametrize("text,default", [("2.5", 3), ("many", 3), ("maybe", True), ("1/0", 1.0), ("x", 1.0)])
def test_parse_value_refuses_the_wrong_type(text, default):
    with pytest.raises(ConfigError, match=f"--k={text}: expected a value of type {type(default).__name__}"):
        config.parse_value("k", text, default)


def test_parse_argv_applies_presets_in_order_then_overrides(tmp_path):
    """Later presets win over earlier ones and ``--name=value`` wins over all presets, whatever
    the order on the command line; ``explicit`` holds exactly what was set."""
    p1, p2 = tmp_path / "a.py", tmp_path / "b.py"
    p1.write_text("import math\nsize = 64\nweight = 0.1\n_private = 3\ndef helper():\n    return 1\n")
    p2.write_text("weight = 0.2\n")
    cfg, explicit = config.parse_argv(DEFAULTS, ["--size=32", str(p1), str(p2)], RENAMED)
    assert cfg == {"size": 32, "weight": 0.2, "name": "astronaut", "flag": False}
    assert explicit == {"size": 32, "weight": 0.2}


def test_preset_int_for_float_is_accepted_and_types_are_checked(tmp_path):
    p = tmp_path / "p.py"
    p.write_text("weight = 1\n")
    assert config.load_preset(str(p), DEFAULTS) == {"weight": 1.0}
    assert type(config.load_preset(str(p), DEFAULTS)["weight"]) is float
    p.write_text("size = 'big'\n")
    with pytest.raises(ConfigError, match="size='big': expected a value of type int"):
        config.load_preset(str(p), DEFAULTS)


@pytest.mark.parametrize("text,message", [
    ("colour = 3\n", "sets unknown setting 'colour'"),
    ("alpha = 0.1\n", "'alpha' was renamed to 'weight'"),
    ("size = = 3\n", "could not be read (SyntaxError"),
    ("size = 1 / 0\n", "could not be read (ZeroDivisionError"),
])
def test_bad_presets_are_one_line(tmp_path, text, message):
    p = tmp_path / "p.py"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load_preset(str(p), DEFAULTS, RENAMED)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_preset(tmp_path):
    with pytest.raises(ConfigError, match="preset .* not found"):
        config.parse_argv(DEFAULTS, [str(tmp_path / "nope.py")], RENAMED)


@pytest.mark.parametrize("argv,message", [
    (["--alpha=1"], "'alpha' was renamed to 'weight'"),
    (["--colour=1"], "unknown setting --colour"),
    (["size=3"], "not of the form --name=value"),
    (["--size=3.5"], "expected a value of type int"),
])
def test_parse_argv_refuses_bad_arguments(argv, message):
    with pytest.raises(ConfigError, match=message):
        config.parse_argv(DEFAULTS, argv, RENAMED)


def test_resolve_coerces_and_refuses():
    """resolve: defaults updated by the overrides; an int for a float becomes a float; renamed,
    unknown and mistyped names are refused; the defaults themselves are not modified."""
    before = dict(DEFAULTS)
    cfg = config.resolve(DEFAULTS, {"weight": 2, "flag": True}, RENAMED)
    assert cfg == dict(DEFAULTS, weight=2.0, flag=True) and type(cfg["weight"]) is float
    assert DEFAULTS == before
    for bad, message in (({"alpha": 1.0}, "renamed to 'weight'"), ({"colour": 1}, "unknown setting 'colour'"),
                         ({"flag": 1}, "expected a value of type bool"), ({"size": 2.0}, "type int")):
        with pytest.raises(ConfigError, match=message):
            config.resolve(DEFAULTS, bad, RENAMED)


def test_defaults_takes_plain_settings_only():
    ns = {"a": 1, "b": 0.5, "c": "x", "d": True, "_e": 2, "f": (1, 2), "g": None, "config": config}
    assert config.defaults(ns) == {"a": 1, "b": 0.5, "c": "x", "d": True}


def test_make_run_dir_never_reuses_a_folder(tmp_path):
    a = config.make_run_dir(str(tmp_path / "r"), "run")
    b = config.make_run_dir(str(tmp_path / "r"), "run")
    assert a != b and os.path.isdir(a) and os.path.isdir(b) and b.endswith("run_2")


def test_check_writable_creates_nothing(tmp_path):
    """A not-yet-existing folder under a writable one passes and is not created; a path under a
    file is refused."""
    config.check_writable(str(tmp_path / "new" / "deeper"))
    assert os.listdir(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot write to results_dir"):
        config.check_writable(str(tmp_path / "file" / "sub"))
