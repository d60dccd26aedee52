"""Command-line overrides for the drivers' constants, nanoGPT style, and one-line user errors.

The driver pattern (``ADP.py``, ``ADP_1D.py``, ``DIP.py``, ``train.py``)::

    # ---- constants (the defaults) ----
    image = "astronaut"
    ...
    DEFAULTS = config.defaults(globals())          # snapshot of the constants above
    RENAMED = {"alpha": "step0"}                   # old name -> new name (one-line hint)

    def run(cfg=None, **overrides) -> dict:        # importable, no side effects on import
        cfg = config.resolve(DEFAULTS, {**(cfg or {}), **overrides}, RENAMED)
        ...                                        # raises ConfigError on bad input
        return summary

    if __name__ == "__main__":
        cfg, _ = config.parse_argv(DEFAULTS, sys.argv[1:], RENAMED)   # presets, then --name=value
        ...

``python DRIVER.py presets/x.py --name=value``: positional ``*.py`` arguments are presets, small
files of constants applied in order (nanoGPT's ``config/*.py``); ``--name=value`` overrides are
applied after all presets.

A driver defines its configuration as plain constants at the top of the file, then calls
``apply_overrides(globals(), sys.argv[1:])``: each ``--name=value`` replaces the constant ``name``
with ``value`` parsed to the constant's type (``bool``: true/false/1/0/yes/no; ``int``;
``float``: also simple fractions such as ``5/255``; ``str``: taken as written).  An unknown name,
a malformed argument or a value of the wrong type raises :class:`ConfigError`; the drivers turn
any ``ConfigError`` into one line on stderr and exit status 2 (:func:`fail`).
"""
from __future__ import annotations

import ast
import math
import os
import sys

__all__ = ["ConfigError", "apply_overrides", "parse_value", "fail", "check", "finite_positive", "valid_seed",
           "check_writable", "make_run_dir",
           "setting_names", "defaults", "load_preset", "resolve", "parse_argv", "load_checkpoint", "resume_config", "validate_data"]


class ConfigError(ValueError):
    """Bad user input: the message says what is wrong and how to fix it."""


def _parse_float(text: str) -> float:
    if "/" in text:
        num, _, den = text.partition("/")
        return float(num) / float(den)
    return float(text)


def parse_value(name: str, text: str, default):
    """Parse ``text`` to the type of ``default``; raise :class:`ConfigError` if it does not fit."""
    kind = type(default)
    try:
        if kind is bool:
            low = text.strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return _parse_float(text)
        if kind is str:
            return text
        if kind in (list, tuple):
            value = ast.literal_eval(text)
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return kind(value)
    except (ValueError, ZeroDivisionError, SyntaxError):
        pass
    else:
        raise ConfigError(f"--{name}: cannot override a setting of type {kind.__name__}")
    raise ConfigError(f"--{name}={text}: expected a value of type {kind.__name__} "
                      f"(default {default!r})")


def setting_names(namespace: dict) -> list[str]:
    """A driver's settings: every name in ``namespace`` of type bool, int, float or str that does
    not start with ``_`` (in definition order)."""
    return [k for k, v in namespace.items() if not k.startswith("_") and type(v) in (bool, int, float, str)]


def apply_overrides(namespace: dict, argv: list[str], allowed: list[str] | None = None) -> dict:
    """Apply ``--name=value`` arguments to ``namespace`` (a driver's ``globals()``).

    ``allowed`` lists the overridable names (default: :func:`setting_names`).  Returns the dict
    of names that were overridden.
    """
    if allowed is None:
        allowed = setting_names(namespace)
    changed = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print("settings (override with --name=value):")
            for k in allowed:
                print(f"  --{k}={namespace[k]!r}  ({type(namespace[k]).__name__})")
            sys.exit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form --name=value "
                              f"(e.g. --setting=semiblind)")
        name, _, text = arg[2:].partition("=")
        if name not in allowed:
            close = [a for a in allowed if a.lower().startswith(name.lower()[:3])]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown setting --{name}{hint} (valid: {', '.join(sorted(allowed))})")
        namespace[name] = parse_value(name, text, namespace[name])
        changed[name] = namespace[name]
    return changed


def check(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def finite_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    check(ok, f"{name} must be a {'non-negative' if allow_zero else 'positive'} finite number, got {value!r}")


def valid_seed(value: int) -> None:
    """torch's generators take seeds in [0, 2⁶³)."""
    check(0 <= value < 2**63, f"seed must be an integer in [0, 2**63), got {value}")


def fail(prog: str, error: Exception, code: int = 2):
    """Print one line ``prog: error: message`` to stderr and exit with ``code``."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    sys.exit(code)


def check_writable(root: str) -> None:
    """Raise :class:`ConfigError` unless ``root`` is, or could be created as, a writable folder:
    its nearest existing ancestor must be a folder we may write into.  Creates nothing (drivers
    call it with the other checks, before any computation)."""
    path = os.path.abspath(root)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    ok = os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)
    check(ok, f"cannot write to results_dir {root!r} ({path!r} is not a writable folder); choose another with "
              f"--results_dir=PATH")


def make_run_dir(root: str, name: str) -> str:
    """Create a new, empty folder ``root/name`` (suffix _2, _3, … if taken) and return its path.

    Never reuses an existing folder, so earlier results are never overwritten; an unwritable
    ``root`` raises :class:`ConfigError`.
    """
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, ".write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"cannot write to results_dir {root!r} ({e.strerror}); choose another with "
                          f"--results_dir=PATH")
    for i in range(1, 10000):
        path = os.path.join(root, name if i == 1 else f"{name}_{i}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"too many runs named {name!r} in {root!r}")


# --------------------------------------------------------------------------------------------
# importable drivers: defaults, presets, programmatic overrides
# --------------------------------------------------------------------------------------------
def defaults(namespace: dict) -> dict:
    """A snapshot ``{name: value}`` of a driver's constants (see :func:`setting_names`)."""
    return {k: namespace[k] for k in setting_names(namespace)}


def _renamed_error(name: str, renamed: dict | None) -> None:
    if renamed and name in renamed:
        raise ConfigError(f"setting {name!r} was renamed to {renamed[name]!r} (one name, one meaning); "
                          f"use --{renamed[name]}=...")


def _coerce(name: str, value, default):
    """``value`` as the type of ``default`` (an int is accepted for a float); ConfigError otherwise."""
    kind = type(default)
    if kind is float and type(value) is int:
        return float(value)
    if type(value) is not kind:
        raise ConfigError(f"{name}={value!r}: expected a value of type {kind.__name__} (default {default!r})")
    return value


def resolve(defaults_: dict, overrides: dict | None = None, renamed: dict | None = None) -> dict:
    """The full configuration: ``defaults_`` updated with ``overrides`` (unknown or renamed names and
    wrong types raise :class:`ConfigError`)."""
    cfg = dict(defaults_)
    for name, value in (overrides or {}).items():
        _renamed_error(name, renamed)
        if name not in defaults_:
            raise ConfigError(f"unknown setting {name!r} (valid: {', '.join(sorted(defaults_))})")
        cfg[name] = _coerce(name, value, defaults_[name])
    return cfg


def load_preset(path: str, defaults_: dict, renamed: dict | None = None) -> dict:
    """The constants a preset file sets (names without a leading ``_``; modules and functions are
    ignored), checked against ``defaults_``.  A missing file or an unknown name raises ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"preset {path!r} not found; give the path of a file of constants, e.g. presets/paper.py")
    ns: dict = {}
    try:
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), ns)
    except Exception as e:  # noqa: BLE001  (any error in the user's file is one line)
        raise ConfigError(f"preset {path!r} could not be read ({type(e).__name__}: {e})")
    values = {k: v for k, v in ns.items() if not k.startswith("_") and type(v) in (bool, int, float, str)}
    for name in values:
        _renamed_error(name, renamed)
        if name not in defaults_:
            raise ConfigError(f"preset {path!r} sets unknown setting {name!r} (valid: {', '.join(sorted(defaults_))})")
    return {k: _coerce(k, v, defaults_[k]) for k, v in values.items()}


def parse_argv(defaults_: dict, argv: list[str], renamed: dict | None = None) -> tuple[dict, dict]:
    """``(cfg, explicit)`` from a command line: positional ``*.py`` presets in order, then
    ``--name=value`` overrides.  ``explicit`` holds what presets and overrides set."""
    ns = dict(defaults_)
    explicit: dict = {}
    flags = []
    for arg in argv:
        if not arg.startswith("-") and arg.endswith(".py"):
            explicit.update(load_preset(arg, defaults_, renamed))
        else:
            flags.append(arg)
    ns.update(explicit)
    for arg in flags:
        if arg.startswith("--") and "=" in arg:
            _renamed_error(arg[2:].partition("=")[0], renamed)
    explicit.update(apply_overrides(ns, flags, list(defaults_)))
    return ns, explicit


def validate_data(cfg: dict, settings: tuple, min_size: int = 11) -> None:
    """Check the data settings that ``imaging.make_data`` reads (the drivers share their names and
    meanings): ``setting`` one of ``settings``, an odd ``kernel_size`` no larger than the image,
    an image of at least ``min_size`` pixels a side (SSIM's 11×11 window), 1 or 3 ``channels``, a
    valid ``seed``, ``noise_level`` ≥ 0 and positive ``blur_sigma``/``semiblind_sigma``."""
    check(cfg["setting"] in settings, f"unknown setting {cfg['setting']!r}; use one of {', '.join(settings)}")
    check(cfg["kernel_size"] > 0 and cfg["kernel_size"] % 2 == 1,
          f"kernel_size must be a positive odd integer, got {cfg['kernel_size']} (try --kernel_size=5)")
    check(cfg["size_x"] >= min_size and cfg["size_y"] >= min_size,
          f"image size must be at least {min_size}×{min_size} (the SSIM window), got size_x={cfg['size_x']}, "
          f"size_y={cfg['size_y']}")
    check(cfg["kernel_size"] <= min(cfg["size_x"], cfg["size_y"]),
          f"kernel_size={cfg['kernel_size']} is larger than the image ({cfg['size_y']}×{cfg['size_x']}); "
          f"use a smaller kernel or a larger image")
    check(cfg["channels"] in (1, 3), f"channels must be 1 (grey) or 3 (colour), got {cfg['channels']}")
    valid_seed(cfg["seed"])
    finite_positive("noise_level", cfg["noise_level"], allow_zero=True)
    for name in ("blur_sigma", "semiblind_sigma"):
        finite_positive(name, cfg[name])


# --------------------------------------------------------------------------------------------
# resuming a run from its checkpoint (shared by the drivers)
# --------------------------------------------------------------------------------------------
def load_checkpoint(path: str, prog: str, state_keys: tuple = ()) -> dict:
    """The checkpoint a driver wrote: ``path`` is its ``checkpoint.pt`` or the run folder holding
    it.  It must be a dict with a ``config`` dict and a ``state`` dict holding ``state_keys``;
    anything else (missing file, not a torch file, another shape) raises :class:`ConfigError`
    naming ``prog``.  Loaded on the CPU with ``weights_only=False`` (the drivers' own files hold
    plain Python objects next to tensors)."""
    import torch

    file = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    check(os.path.isfile(file), f"no checkpoint at {path!r}; give the checkpoint.pt of an interrupted run")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=False)
        if not (isinstance(ckpt["config"], dict) and isinstance(ckpt.get("state"), dict)
                and all(k in ckpt["state"] for k in state_keys)):
            raise TypeError("no config/state dictionaries")
    except Exception as e:  # noqa: BLE001  (any unreadable file)
        raise ConfigError(f"{file!r} is not a readable {prog} checkpoint ({type(e).__name__}); give the "
                          f"checkpoint.pt that {prog} wrote") from None
    return ckpt


def resume_config(defaults_: dict, given: dict, saved: dict, run_local: tuple, overridable: tuple,
                  renamed: dict | None = None) -> dict:
    """The configuration of a resumed run.

    ``saved`` (a checkpoint's config; old names translated by ``renamed``, names no longer in
    ``defaults_`` and the ``run_local`` ones dropped) gives every setting, except: the
    ``run_local`` settings (where to write, device, threads, progress, …) come from ``given`` or
    the defaults, never from the checkpoint; the ``overridable`` ones (``run_local`` plus e.g. the
    iteration budget) come from ``given`` where given.  Any other setting given with a value that
    differs from the saved one raises :class:`ConfigError` naming it (a resumed run continues the
    same computation; a new one must be started to change it); given with the saved value, it is
    accepted.
    """
    cfg = resolve(defaults_, given, renamed)
    saved = {(renamed or {}).get(k, k): v for k, v in saved.items()}
    saved = resolve(defaults_, {k: v for k, v in saved.items() if k in defaults_ and k not in run_local})
    changed = sorted(k for k in given if k not in overridable and cfg[k] != saved[k])
    check(not changed, f"--resume continues a run with its saved settings; only "
                       f"{', '.join('--' + k for k in overridable)} may be given with it, not "
                       f"{', '.join('--' + k for k in changed)} (start a new run to change them)")
    return saved | {k: cfg[k] for k in run_local} | {k: cfg[k] for k in overridable if k in given}
