"""Reproduction table of the paper's 2D deblurring: paper protocol against fair protocol (SPEC §5).

    python experiments/reproduce_2d.py                 # full table: 4 images × 3 settings, 256×256
    python experiments/reproduce_2d.py --quick         # CI-sized: astronaut, 64×64, few iterations
    python experiments/reproduce_2d.py --images=astronaut --settings=semiblind_1.5
    python experiments/reproduce_2d.py --jobs=2        # two worker processes (one case at a time each)
    python experiments/reproduce_2d.py --resume=Results/reproduction/<run>   # reuse finished rows, run the rest
    python experiments/reproduce_2d.py --resume=<run A>,<run B>              # merge two partial runs

For every image (``images/``) and setting (``motion``, ``semiblind_0.5``, ``semiblind_1.5``; the
data of ``imaging.make_data``, see ``experiments/protocols.py``) the rows of :data:`ROWS` run on
the same data:

===========================  ================================================================
row                          what it is
===========================  ================================================================
blurry                       the data ``y``
TV paper 100 it              the paper's TV baseline: anisotropic TV, weight e⁻⁶, γ = 0.01, 100
                             FISTA iterations from ``y`` with the paper's step 1/L₁₀₀
TV paper 300 it / 1000 it    the same solver, longer, with the fixed ``b₀``: the control that
                             separates learning the kernel from extra iterations
TV paper reg. converged      the paper's regulariser solved to convergence with ``b₀``
ADP paper protocol           ADP-β-MAID as the paper runs it (learned operator, β = 100 on the
                             unsquared H¹ norm, data term / 3, mapped to our normalisation)
TV fair                      isotropic TV, α = 0.005 (chosen once for TV), converged
ADP fair learned / known     ADP-β-MAID at the fair α with ``A_up = B_b`` / ``A_up = B_{b₀}``
TV fair, b₀ mass s(μ₀)       control: fair TV with b₀ scaled to the mass s = (1 + √(1 − 4μ₀))/2
                             at which μ₀ no longer shrinks the mean intensity (no learning)
oracle TV                    fair TV with the true kernel (9×9 motion∘Gaussian for semiblind)
ADP prox simplex 9×9 …       semiblind only (issue 17, ADP.py's options): proximal MAID with the
                             kernel on the simplex, b₀ zero-padded to 9×9, fair β on the squared
                             H¹ norm, learned / known operator; "simplex+H¹ … paper β": the
                             unsquared H¹ norm by its prox at the paper's β (3β_p/n)
ADP preset semiblind_strong  semiblind only: presets/semiblind_strong.py's settings, from x = y
DIP ES-WMV / best iterate    ``--with_dip``: ``DIP.run`` on the same data (known kernel for
                             motion, simplex-learned kernel for semiblind), at ES-WMV's
                             selection and at the PSNR-best iterate (an oracle)
===========================  ================================================================

Further rows are one decorated function each: ``@row(name, group, available, settings)`` with
``available()`` returning why the row cannot run yet (shown by ``--list_rows`` and in ``table.md``)
and ``settings`` the settings it is for (empty: all).

Columns: PSNR, SSIM, MAID upper iterations (accepted), lower-level and CG iterations, seconds,
stop reason, ``‖b* − b₀‖/‖b₀‖`` and, for the semiblind settings, ``‖b* − b_true‖/‖b₀ − b_true‖``;
for the paper protocol also ``stationarity`` = ‖∇f_data(b₀)‖_{H¹,*}/β (≤ 1: b₀ is a stationary
point of the paper's upper problem, so no correct descent method moves the kernel).

Options ``fair_beta``, ``fair_threshold``, ``fair_step0`` and ``mu0`` are for sensitivity runs;
the table's protocols use none of them.
The rows that warm-start from the fair TV solution (fair ADP, oracle) do not count its
iterations (the TV fair row does).

Output, in a new folder ``Results/reproduction/<date-time>/``: ``table.md`` (per case and the
means), ``table.csv`` (one line per case and row), ``cases/`` (one JSON per case, for
``--resume``), ``grid_<image>.png`` (crops of the reconstructions), ``kernels.png`` (channel 0
of the learned kernels in the semiblind settings), ``gains.png``, ``summary.json``.  The last
line printed is ``adp_gain_db fair_known=<mean> fair_learned=<mean> paper_protocol=<mean>
oracle=<mean>``: mean PSNR gains of ADP fair known/learned over TV fair, of ADP paper protocol
over TV paper 100 it, and of the oracle over TV fair.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_ROOT, _HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import config  # noqa: E402
from config import ConfigError, check  # noqa: E402

# ------------------------------------------------------------------------------------------
# configuration (override with --name=value; --quick and --with_dip alone mean =true)
# ------------------------------------------------------------------------------------------
images = "astronaut,coffee,chelsea,rocket"      # comma-separated bundled images
settings = "motion,semiblind_0.5,semiblind_1.5"  # comma-separated settings (protocols.SETTINGS)
size = 256                 # image side (pixels)
rows = "all"               # comma-separated row names (see --list_rows), or all
quick = False              # CI-sized run: astronaut, 64×64, few upper iterations
with_dip = False           # add the DIP rows (needs DIP.run)
upper_iter = 0             # cap on MAID upper iterations of every ADP row (0: the protocols' own)
jobs = 1                   # worker processes (each runs whole cases)
threads = 1                # torch threads per process
results_dir = "Results/reproduction"
resume = ""                # previous run folder(s), comma-separated: their finished rows are reused (merged)
list_rows = False          # print the row names and exit
dip_iterations = 0         # DIP rows: Adam iterations (0: DIP.py's default)
# sensitivity runs only (0: the fair protocol's value, protocols.FAIR); the table uses none of them
fair_beta = 0.0            # β of the fair ADP rows
fair_threshold = 0.0       # MAID's ε_min in the fair ADP rows
fair_step0 = 0.0           # MAID's initial step in the fair ADP rows
mu0 = 0.0                  # μ₀ of every lower level (0: protocols.MU0_DEFAULT = 1e-2)
DEFAULTS = config.defaults(globals())
_PROG = "experiments/reproduce_2d.py"
_QUICK = dict(images="astronaut", size=64, upper_iter=6, dip_iterations=60)
_FLAGS = ("quick", "with_dip", "list_rows")

import torch  # noqa: E402

import protocols as P  # noqa: E402
from imaging import psnr_ssim  # noqa: E402


# ------------------------------------------------------------------------------------------
# rows: a registry of functions  row(ctx) -> dict
# ------------------------------------------------------------------------------------------
@dataclass
class Context:
    """One case and what its rows share (the fair TV solution, the paper's step, outputs)."""

    case: P.Case
    opts: dict
    shared: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)     # row -> reconstruction (for the figure grid)
    kernels: dict = field(default_factory=dict)    # row -> learned kernel

    def once(self, key, make):
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]


@dataclass
class Row:
    name: str
    fn: object
    group: str                 # paper | fair | oracle | prox | dip | data
    available: object = None   # () -> str | None: why the row cannot run now (None: it can)
    settings: tuple = ()       # the settings the row is for (empty: all)


ROWS: dict[str, Row] = {}


def row(name: str, group: str, available=None, settings: tuple = ()):
    def deco(fn):
        ROWS[name] = Row(name, fn, group, available, tuple(settings))
        return fn
    return deco


def _upper_iter(ctx, default: int) -> int:
    return ctx.opts["upper_iter"] or default


def _scores(ctx, name, x, **extra) -> dict:
    p, s = psnr_ssim(x, ctx.case.x_true)
    ctx.images[name] = x.detach()
    return dict(psnr=p, ssim=s, **extra)


def _maid_columns(ctx, name, res, seconds) -> dict:
    log = res.log
    last = log[-1] if log else {}
    ctx.kernels[name] = res.theta.detach()
    return _scores(ctx, name, res.x, maid_iters=len(log), accepted=sum(r["accepted"] for r in log),
                   lower_iters=last.get("lower_iters", 0), cg_iters=last.get("cg_iters", 0),
                   lower_cap_hits=last.get("lower_cap_hits", 0), time_s=seconds, stop=res.stop_reason,
                   kernel_move=P.kernel_move(res.theta, ctx.case.b0),
                   kernel_err_ratio=P.kernel_error_ratio(res.theta, ctx.case.b0, ctx.case.b_true))


def _timed(f):
    t0 = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t0


@row("blurry", "data")
def _blurry(ctx):
    return _scores(ctx, "blurry", ctx.case.y)


def _tv_paper(iters):
    def fn(ctx):
        step = ctx.once("paper_step", lambda: P.paper_tv_step(ctx.case))
        x, sec = _timed(lambda: P.fixed_iterations(P.paper_lower(ctx.case), ctx.case.y.clone(), iters, step))
        return _scores(ctx, f"TV paper {iters} it", x, lower_iters=iters, time_s=sec, step=step)
    return fn


for _it in (100, 300, 1000):
    row(f"TV paper {_it} it", "paper")(_tv_paper(_it))


@row("TV paper reg. converged", "paper")
def _tv_paper_converged(ctx):
    from lower_level import solve_lower
    r, sec = _timed(lambda: solve_lower(P.paper_lower(ctx.case), ctx.case.y.clone(), P.FAIR["tv_eps"],
                                        10 * P.LOWER_ITER))
    return _scores(ctx, "TV paper reg. converged", r.x, lower_iters=r.iters, time_s=sec,
                   stop="converged" if r.converged else "max_iter")


@row("ADP paper protocol", "paper")
def _adp_paper(ctx):
    from maid import maid
    case = ctx.case
    m = P.paper_upper_mapping(case.n)
    problem = P.adp_problem_for(case, P.PAPER["tv_kind"], P.PAPER["tv_weight"], P.PAPER["tv_smoothing"], m["beta"],
                                "learned", kernel_penalty="h1")
    cfg = P.paper_maid_config(case.n, _upper_iter(ctx, P.PAPER["upper_iter"]))
    res, sec = _timed(lambda: maid(problem, case.b0.clone(), case.y.clone(), cfg))
    out = _maid_columns(ctx, "ADP paper protocol", res, sec)
    data_only = P.adp_problem_for(case, P.PAPER["tv_kind"], P.PAPER["tv_weight"], P.PAPER["tv_smoothing"], 0.0,
                                  "learned")
    return dict(out, stationarity=_b0_stationarity(data_only, case, m["beta"]))


def _b0_stationarity(inner, case, beta) -> float:
    """``‖∇f_data(b₀)‖_{H¹,*}/β`` (``protocols.h1_dual_norm``; uncounted diagnostic): ≤ 1 means
    ``b₀`` is a stationary point of the paper's upper problem, so a correct descent method cannot
    move the kernel; ``∇f_data`` by a lower solve to 10⁻⁴ and CG to ``10⁻⁶‖∇ₓg‖``."""
    from maid import hypergradient
    x = inner.solve_lower(case.b0, case.y.clone(), 1e-4, 10 * P.LOWER_ITER).x
    delta = 1e-6 * torch.linalg.vector_norm(inner.upper_grad_x(x, case.b0)).item()
    z = hypergradient(inner, x, case.b0, None, delta, 10 * P.CG_ITER)[0]
    return P.h1_dual_norm(z) / beta


def _tv_fair_solve(ctx, b):
    from lower_level import solve_lower
    h = P.lower_objective(b, ctx.case.y, P.FAIR["tv_kind"], P.FAIR["tv_weight"], P.FAIR["tv_smoothing"])
    x0 = ctx.shared.get("x_tv_fair", ctx.case.y).clone()
    return _timed(lambda: solve_lower(h, x0, P.FAIR["tv_eps"], 10 * P.LOWER_ITER))


@row("TV fair", "fair")
def _tv_fair(ctx):
    r, sec = _tv_fair_solve(ctx, ctx.case.b0)
    ctx.shared["x_tv_fair"] = r.x
    return _scores(ctx, "TV fair", r.x, lower_iters=r.iters, time_s=sec,
                   stop="converged" if r.converged else "max_iter")


def _x_tv_fair(ctx):
    if "x_tv_fair" not in ctx.shared:
        _tv_fair(ctx)
    return ctx.shared["x_tv_fair"]


def _adp_fair(operator):
    name = f"ADP fair {operator}"

    def fn(ctx):
        from maid import maid
        case = ctx.case
        x0 = _x_tv_fair(ctx)
        problem = P.adp_problem_for(case, P.FAIR["tv_kind"], P.FAIR["tv_weight"], P.FAIR["tv_smoothing"],
                                    ctx.opts["fair_beta"] or P.FAIR["beta"], operator)
        cfg = P.fair_maid_config(_upper_iter(ctx, P.FAIR["upper_iter"]),
                                 **{k: ctx.opts[o] for k, o in (("eps_min", "fair_threshold"), ("step0", "fair_step0"))
                                    if ctx.opts[o]})
        res, sec = _timed(lambda: maid(problem, case.b0.clone(), x0.clone(), cfg))
        return _maid_columns(ctx, name, res, sec)
    return fn


for _op in ("learned", "known"):
    row(f"ADP fair {_op}", "fair")(_adp_fair(_op))


def mu0_mass(mu0: float) -> float:
    """The kernel mass ``s`` at which the lower level's μ₀ term stops shrinking the mean: at
    frequency 0 a kernel of mass ``s`` gives ``x̂(0) = s·y(0)/(s² + μ₀)`` (TV does not act on the
    mean), which equals ``y(0)`` for ``s² − s + μ₀ = 0``, ``s = (1 + √(1 − 4μ₀))/2`` (0.98990 at μ₀ = 10⁻²)."""
    return (1 + math.sqrt(1 - 4 * mu0)) / 2


@row("TV fair, b₀ mass s(μ₀)", "fair")
def _tv_fair_mass(ctx):
    """Control: fair TV with ``b₀`` scaled to the mass :func:`mu0_mass` — no learning, only the
    correction of the μ₀ bias of the mean intensity (what ADP fair known's kernel sums, ≈ 0.990,
    amount to)."""
    r, sec = _tv_fair_solve(ctx, mu0_mass(P.MU0) * ctx.case.b0)
    return _scores(ctx, "TV fair, b₀ mass s(μ₀)", r.x, lower_iters=r.iters, time_s=sec,
                   stop="converged" if r.converged else "max_iter")


@row("oracle TV", "oracle")
def _oracle(ctx):
    if ctx.case.b_true.shape == ctx.case.b0.shape and torch.equal(ctx.case.b_true, ctx.case.b0):
        x = _x_tv_fair(ctx)          # motion: the true kernel is b₀, the oracle is TV fair
        return _scores(ctx, "oracle TV", x, lower_iters=0, time_s=0.0, stop="= TV fair")
    _x_tv_fair(ctx)
    r, sec = _tv_fair_solve(ctx, ctx.case.b_true)
    return _scores(ctx, "oracle TV", r.x, lower_iters=r.iters, time_s=sec,
                   stop="converged" if r.converged else "max_iter")


# ---- proximal MAID rows (issue 17): ADP.py's kernel_constraint / kernel_penalty / learned_kernel_size ----
SEMIBLIND = ("semiblind_0.5", "semiblind_1.5")
PROX_KERNEL_SIZE = 9       # learned_kernel_size: the true kernel (motion∘Gaussian) is 9×9
PRESET = os.path.join(_ROOT, "presets", "semiblind_strong.py")


def _adp_cfg(ctx, **settings) -> dict:
    """ADP.py's configuration for this case: its DEFAULTS, the fair protocol's lower level and
    β, this case's data, then ``settings``; checked by ``ADP.validate`` (a bad setting fails here,
    with ADP.py's one-line message, not inside the run)."""
    import ADP
    cfg = dict(ADP.DEFAULTS, regulariser=P.FAIR["tv_kind"], tv_weight=P.FAIR["tv_weight"],
               tv_smoothing=P.FAIR["tv_smoothing"], mu0=P.MU0, beta=P.FAIR["beta"], upper_normalisation="n",
               lower_solver="fista", upper_iter=P.FAIR["upper_iter"], threshold=P.FAIR["eps_min"])
    cfg.update({k: v for k, v in P.data_config(ctx.case.image, ctx.case.setting, ctx.opts["size"]).items()
                if k in ADP.DEFAULTS})
    cfg.update(settings)
    ADP.validate(cfg)
    return cfg


def _run_composite(ctx, name, cfg, x0, mcfg) -> dict:
    """Proximal MAID on ADP.py's composite problem (``ADP.build_composite``: the smooth ``f`` and
    the prox of ``r``) from ``ADP.learned_b0`` (b₀ zero-padded to ``learned_kernel_size``)."""
    import ADP
    from maid import maid
    case = ctx.case
    b0 = ADP.learned_b0(cfg, case.b0)
    problem, prox = ADP.build_composite(cfg, case.y, b0)
    res, sec = _timed(lambda: maid(problem, b0.clone(), x0.clone(), mcfg, prox=prox))
    out = _maid_columns(ctx, name, res, sec)
    sums = res.theta.sum(dim=(-1, -2)).flatten()
    return dict(out, kernel_sum_min=sums.min().item(), kernel_sum_max=sums.max().item(),
                kernel_min=res.theta.min().item())


def _prox_row(operator: str, penalty: str):
    """Kernel on the simplex, learned on 9×9 (b₀ zero-padded), fair α and MAID settings, warm start
    from TV fair (as the fair rows); ``penalty``: ``h1_squared`` at the fair β, or ``h1``
    (unsquared, by its prox) at the paper's β mapped to our normalisation (3β_p/n)."""
    def fn(ctx):
        beta = P.FAIR["beta"] if penalty == "h1_squared" else P.paper_upper_mapping(ctx.case.n)["beta"]
        cfg = _adp_cfg(ctx, upper_operator=operator, kernel_penalty=penalty, kernel_constraint="simplex",
                       learned_kernel_size=PROX_KERNEL_SIZE, beta=beta)
        mcfg = P.fair_maid_config(_upper_iter(ctx, P.FAIR["upper_iter"]))
        return dict(_run_composite(ctx, fn.row_name, cfg, _x_tv_fair(ctx), mcfg), beta=beta)
    return fn


for _name, _op, _pen in (("ADP prox simplex 9×9 learned", "learned", "h1_squared"),
                         ("ADP prox simplex 9×9 known", "known", "h1_squared"),
                         ("ADP prox simplex+H¹ 9×9 paper β", "learned", "h1")):
    _fn = _prox_row(_op, _pen)
    _fn.row_name = _name
    row(_name, "prox", None, SEMIBLIND)(_fn)


@row("ADP preset semiblind_strong", "prox", None, SEMIBLIND)
def _adp_preset(ctx):
    """``python ADP.py presets/semiblind_strong.py`` on this case's data: the preset's settings over
    ADP.py's DEFAULTS (its lower level and MAID settings included), the data settings this
    case's; MAID from ``x = y`` as ADP.run starts it."""
    import ADP
    import config as cfgmod
    preset = cfgmod.load_preset(PRESET, ADP.DEFAULTS, ADP.RENAMED)
    cfg = dict(ADP.DEFAULTS, **preset)
    cfg.update({k: v for k, v in P.data_config(ctx.case.image, ctx.case.setting, ctx.opts["size"]).items()
                if k in ADP.DEFAULTS})
    if ctx.opts["upper_iter"]:
        cfg["upper_iter"] = ctx.opts["upper_iter"]
    mcfg = ADP.maid_config(cfg, ADP.upper_scale(cfg, ctx.case.y))
    return dict(_run_composite(ctx, "ADP preset semiblind_strong", cfg, ctx.case.y, mcfg),
                preset=", ".join(f"{k}={v}" for k, v in preset.items()))


# ---- DIP rows (--with_dip): DIP.run(cfg) -> {psnr_es, ssim_es, psnr_best, ssim_best, ...} ----
def _dip_available():
    try:
        import DIP
    except Exception as e:  # noqa: BLE001  (a module being edited may fail to import)
        return f"DIP.py cannot be imported ({type(e).__name__})"
    return None if callable(getattr(DIP, "run", None)) else "DIP.run is not available"


def _dip_summary(ctx) -> dict:
    """One ``DIP.run`` on this case's data (same generator, same data configuration; float32):
    the known kernel for motion, the simplex-learned kernel for the semiblind settings; DIP's own
    defaults otherwise (``dip_iterations`` overrides the iteration count)."""
    def go():
        import DIP
        cfg = {k: v for k, v in P.data_config(ctx.case.image, ctx.case.setting, ctx.opts["size"]).items()
               if k in DIP.DEFAULTS}
        cfg.update(learn_kernel=ctx.case.setting != "motion", device="cpu", progress=False,
                   results_dir=os.path.join(ctx.opts["_run_dir"], "dip"))
        if ctx.opts["dip_iterations"]:
            cfg["iterations"] = ctx.opts["dip_iterations"]
        t0 = time.perf_counter()
        out = DIP.run(cfg)
        return dict(out, _seconds=time.perf_counter() - t0)
    return ctx.once("dip", go)


@row("DIP ES-WMV", "dip", _dip_available)
def _dip_es(ctx):
    s = _dip_summary(ctx)
    return dict(psnr=s["psnr_es"], ssim=s["ssim_es"], time_s=s["_seconds"], stop=f"ES it {s.get('stop_iter')}")


@row("DIP best iterate (oracle)", "dip", _dip_available)
def _dip_best(ctx):
    s = _dip_summary(ctx)
    return dict(psnr=s["psnr_best"], ssim=s["ssim_best"], time_s=0.0, stop=f"best it {s.get('best_iter')}")


# ------------------------------------------------------------------------------------------
# one case
# ------------------------------------------------------------------------------------------
def selected_rows(opts) -> list[Row]:
    names = list(ROWS) if opts["rows"] == "all" else [r.strip() for r in opts["rows"].split(",") if r.strip()]
    out = []
    for n in names:
        if n not in ROWS:
            raise ConfigError(f"unknown row {n!r}; the rows are: {', '.join(ROWS)}")
        r = ROWS[n]
        if r.group == "dip" and not opts["with_dip"]:
            continue
        out.append(r)
    return out


def run_case(image: str, setting: str, opts: dict, progress=None, only=None) -> dict:
    """All selected rows on one case (``only``: just these of them); returns ``{"case", "rows": [...],
    "skipped": {...}}`` and keeps crops of the reconstructions and the learned kernels (tensors)
    under ``"images"``/``"kernels"``.  A row that cannot run (``available()``) or is not for this
    setting (``Row.settings``) is listed under ``skipped`` with the reason."""
    torch.set_num_threads(opts["threads"])
    P.MU0 = opts["mu0"] or P.MU0_DEFAULT      # μ₀ of every row of this run (set in each worker process)
    case = P.make_case(image, setting, opts["size"])
    ctx = Context(case, opts)
    results, skipped = [], {}
    for r in selected_rows(opts):
        if only is not None and r.name not in only:
            continue
        why = r.available() if r.available else None
        if r.settings and setting not in r.settings:
            why = f"only for {', '.join(r.settings)}"
        if why:
            skipped[r.name] = why
        else:
            res = r.fn(ctx)
            results.append(dict(image=image, setting=setting, method=r.name, group=r.group, **res))
        if progress is not None:
            progress(r.name)
    done = {r["method"] for r in results}
    return {"case": case.name, "image": image, "setting": setting, "rows": results, "skipped": skipped,
            "images": {k: _thumb(v) for k, v in ctx.images.items() if k in _grid_rows(ROWS) and k in done},
            "kernels": {k: v.float().cpu() for k, v in ctx.kernels.items() if k in done},
            "x_true": _thumb(case.x_true), "b0": case.b0, "b_true": case.b_true}


THUMB = 44   # side of the stored centre crops (uint8): ~6 KB per image, cases/*.pt stay below 100 KB


def _crop(x, side=THUMB):
    H, W = x.shape[-2:]
    s = min(side, H, W)
    i, j = (H - s) // 2, (W - s) // 2
    x = x[..., i:i + s, j:j + s].detach().cpu()
    return x.float() / 255 if x.dtype == torch.uint8 else x.clamp(0, 1).float()


def _thumb(x):
    """The centre crop the grid shows, as uint8 (what ``cases/*.pt`` keeps of a reconstruction)."""
    return (_crop(x) * 255).round().to(torch.uint8)


def _grid_rows(rows) -> list[str]:
    """The rows shown in the figure grids (the data row 'blurry' and every method but the
    intermediate paper controls)."""
    return [n for n, r in rows.items() if n not in ("TV paper 300 it", "TV paper reg. converged")]


def _run_one(args):
    """Worker (one process per job): one case, all its rows (or the rows ``only``)."""
    image, setting, opts, only = args
    return run_case(image, setting, opts, only=only)


def merge_case(prev: dict, new: dict, order: list[str]) -> dict:
    """A resumed case: ``prev``'s rows and ``new``'s (rows that were missing), in ``order``; a row
    in ``new`` replaces a skip reason of ``prev``."""
    rows = {r["method"]: r for r in prev["rows"]}
    rows.update({r["method"]: r for r in new["rows"]})
    skipped = {k: v for k, v in prev["skipped"].items() if k not in rows}
    skipped.update(new["skipped"])
    out = dict(prev, rows=[rows[n] for n in order if n in rows] + [r for n, r in rows.items() if n not in order],
               skipped=skipped)
    out["images"] = {**prev["images"], **new["images"]}
    out["kernels"] = {**prev["kernels"], **new["kernels"]}
    return out


# ------------------------------------------------------------------------------------------
# tables and figures
# ------------------------------------------------------------------------------------------
_COLS = ("psnr", "ssim", "maid_iters", "accepted", "lower_iters", "cg_iters", "time_s", "stop", "kernel_move",
         "kernel_err_ratio", "stationarity", "kernel_sum_min", "kernel_sum_max", "beta")

GAINS = {  # name: (row, reference row)
    "fair_known": ("ADP fair known", "TV fair"),
    "fair_learned": ("ADP fair learned", "TV fair"),
    "paper_protocol": ("ADP paper protocol", "TV paper 100 it"),
    "oracle": ("oracle TV", "TV fair"),
}
EXTRA_GAINS = {  # also in table.md (not on the last line)
    "mu0_mass_control": ("TV fair, b₀ mass s(μ₀)", "TV fair"),
}


PROX_GAINS = {  # name: (row, reference row), per semiblind setting (prox_gain_db line)
    "simplex_learned": ("ADP prox simplex 9×9 learned", "TV fair"),
    "simplex_known": ("ADP prox simplex 9×9 known", "TV fair"),
    "simplex_h1_paper_beta": ("ADP prox simplex+H¹ 9×9 paper β", "TV fair"),
    "preset": ("ADP preset semiblind_strong", "TV fair"),
}


def _fmt(v, col):
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        if col == "psnr":
            return f"{v:.2f}"
        if col == "ssim":
            return f"{v:.4f}"
        if col == "time_s":
            return f"{v:.1f}"
        return f"{v:.3g}"
    return str(v)


def _psnr_of(case_res, method):
    for r in case_res["rows"]:
        if r["method"] == method:
            return r["psnr"]
    return math.nan


def gains(case_results, table=None) -> dict:
    """Per gain of ``table`` (default :data:`GAINS`): the list of per-case PSNR differences and
    their mean (NaN if a row is missing in every case)."""
    out = {}
    for g, (a, b) in (table or GAINS).items():
        d = [_psnr_of(c, a) - _psnr_of(c, b) for c in case_results]
        d = [v for v in d if not math.isnan(v)]
        out[g] = {"per_case": d, "mean": sum(d) / len(d) if d else math.nan}
    return out


def _mean(v):
    v = [x for x in v if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(v) / len(v) if v else math.nan


def setting_means(case_results, name, setting, col) -> float:
    """Mean of ``col`` of row ``name`` over the cases of ``setting`` (NaN if none)."""
    return _mean([r.get(col) for c in case_results if c["setting"] == setting for r in c["rows"] if r["method"] == name])


def prox_gains(case_results) -> dict:
    """``{gain: {setting: mean PSNR gain}}`` of :data:`PROX_GAINS` over the semiblind cases."""
    out = {}
    for g, (a, b) in PROX_GAINS.items():
        out[g] = {}
        for st in SEMIBLIND:
            d = [_psnr_of(c, a) - _psnr_of(c, b) for c in case_results if c["setting"] == st]
            out[g][st] = _mean(d)
    return out


def markdown_table(case_results, row_names) -> str:
    lines = []
    head = "| method | PSNR | SSIM | MAID it (acc.) | lower it | CG it | time [s] | stop | ‖b*−b₀‖/‖b₀‖ | ‖b*−b_true‖/‖b₀−b_true‖ |"
    sep = "|" + "---|" * 10
    for c in case_results:
        lines += [f"### {c['case']}", "", head, sep]
        for r in c["rows"]:
            it = f"{r['maid_iters']} ({r['accepted']})" if "maid_iters" in r else ""
            lines.append("| " + " | ".join([r["method"], _fmt(r.get("psnr"), "psnr"), _fmt(r.get("ssim"), "ssim"), it,
                                            _fmt(r.get("lower_iters"), ""), _fmt(r.get("cg_iters"), ""),
                                            _fmt(r.get("time_s"), "time_s"), _fmt(r.get("stop"), ""),
                                            _fmt(r.get("kernel_move"), ""), _fmt(r.get("kernel_err_ratio"), "")])
                         + " |")
        if c["skipped"]:
            lines.append("")
            lines += [f"* not run: {k} — {v}" for k, v in c["skipped"].items()]
        lines.append("")
    # means over cases
    lines += ["### mean over cases", "", "| method | cases | mean PSNR | mean SSIM | mean time [s] |", "|---|---|---|---|---|"]
    for name in row_names:
        rs = [r for c in case_results for r in c["rows"] if r["method"] == name]
        if rs:
            lines.append(f"| {name} | {len(rs)} | {sum(r['psnr'] for r in rs) / len(rs):.2f} | "
                         f"{sum(r['ssim'] for r in rs) / len(rs):.4f} | "
                         f"{sum(r.get('time_s', 0.0) for r in rs) / len(rs):.1f} |")
    sts = [st for st in dict.fromkeys(c["setting"] for c in case_results)]
    lines += ["", "### mean per setting: PSNR [dB] (‖b*−b_true‖/‖b₀−b_true‖ for the learned kernels)", "",
              "| method | " + " | ".join(sts) + " |", "|---|" + "---|" * len(sts)]
    for name in row_names:
        cells = []
        for st in sts:
            p = setting_means(case_results, name, st, "psnr")
            k = setting_means(case_results, name, st, "kernel_err_ratio")
            cells.append("" if math.isnan(p) else f"{p:.2f}" + ("" if math.isnan(k) else f" ({k:.3f})"))
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    g = gains(case_results)
    lines += ["", "| gain | rows | per case [dB] | mean [dB] |", "|---|---|---|---|"]
    for k, (a, b) in GAINS.items():
        lines.append(f"| {k} | {a} − {b} | {', '.join(f'{v:+.2f}' for v in g[k]['per_case'])} | {g[k]['mean']:+.3f} |")
    ge = gains(case_results, EXTRA_GAINS)
    for k, (a, b) in EXTRA_GAINS.items():
        lines.append(f"| {k} | {a} − {b} | {', '.join(f'{v:+.2f}' for v in ge[k]['per_case'])} | {ge[k]['mean']:+.3f} |")
    pg = prox_gains(case_results)
    for k, (a, b) in PROX_GAINS.items():
        for st, v in pg[k].items():
            if not math.isnan(v):
                lines.append(f"| {k} @ {st} | {a} − {b} | | {v:+.3f} |")
    return "\n".join(lines) + "\n"


def grid_figure(case_results, image, path, methods):
    import figures
    import matplotlib.pyplot as plt
    cs = [c for c in case_results if c["image"] == image]
    methods = [m for m in methods if any(m in c["images"] for c in cs)]
    cols = ["ground truth"] + methods
    # THUMB×THUMB centre crops shown at about their own resolution (0.8 in at 90 dpi): PNG < 300 KB
    fig, axes = plt.subplots(len(cs), len(cols), figsize=(0.8 * len(cols), 1.0 * len(cs)), squeeze=False)
    for i, c in enumerate(cs):
        for j, m in enumerate(cols):
            ax = axes[i, j]
            ax.axis("off")
            x = c["x_true"] if m == "ground truth" else c["images"].get(m)
            if x is None:
                continue
            x = _crop(x)
            ax.imshow(x.numpy().transpose(1, 2, 0) if x.shape[0] == 3 else x[0].numpy(), cmap="gray",
                      vmin=0, vmax=1, interpolation="nearest")
            p = _psnr_of(c, m)
            t = (m if i == 0 else "") + ("" if m == "ground truth" else f"\n{p:.2f} dB")
            ax.set_title(t, fontsize=4)
        axes[i, 0].text(-0.08, 0.5, c["setting"], transform=axes[i, 0].transAxes, rotation=90, va="center",
                        ha="right", fontsize=6)
    fig.tight_layout(pad=0.2)
    _save_small(fig, path, figures)


def _save_small(fig, path, figures, dpi=90):
    """Atomic PNG at a low resolution (the grids are photos: PNGs stay below ~300 KB)."""
    figures._atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))
    import matplotlib.pyplot as plt
    plt.close(fig)


def kernels_figure(case_results, path):
    """Channel 0 of ``b₀``, ``b_true`` and each learned ``b*`` (9×9, shared scale per row), then
    ``b* − b₀`` of each learned kernel on its own symmetric scale (the moves are ~0.5 %)."""
    import figures
    import matplotlib.pyplot as plt
    cs = [c for c in case_results if c["kernels"] and c["setting"] != "motion"]
    if not cs:
        return
    names = sorted({k for c in cs for k in c["kernels"]})
    cols = ["b₀", "b_true"] + names + [f"{n} − b₀" for n in names]
    fig, axes = plt.subplots(len(cs), len(cols), figsize=(1.1 * len(cols), 1.2 * len(cs)), squeeze=False)
    for i, c in enumerate(cs):
        k = c["b_true"].shape[-1]
        b0 = P.pad_kernel(c["b0"], k)
        ks = {"b₀": b0, "b_true": c["b_true"]}
        ks.update({n: P.pad_kernel(b, k) for n, b in c["kernels"].items()})
        ks.update({f"{n} − b₀": P.pad_kernel(b, k) - b0 for n, b in c["kernels"].items()})
        hi = max(v.max().item() for n, v in ks.items() if "−" not in n)
        for j, n in enumerate(cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if n in ks:
                a = ks[n][0, 0].double().numpy()
                if "−" in n:
                    m = max(abs(a).max(), 1e-12)
                    im = ax.imshow(a, cmap="RdBu_r", vmin=-m, vmax=m, interpolation="nearest")
                    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=3)
                else:
                    ax.imshow(a, cmap="viridis", vmin=0, vmax=hi, interpolation="nearest")
            if i == 0:
                ax.set_title(n, fontsize=4)
        axes[i, 0].set_ylabel(c["case"], fontsize=4)
    fig.tight_layout(pad=0.2)
    _save_small(fig, path, figures)


def gains_figure(case_results, path):
    import figures
    import matplotlib.pyplot as plt
    g = gains(case_results)
    fig, ax = plt.subplots(figsize=(7, 3))
    names = [c["case"] for c in case_results]
    w = 0.8 / len(GAINS)
    for k, key in enumerate(GAINS):
        vals = [_psnr_of(c, GAINS[key][0]) - _psnr_of(c, GAINS[key][1]) for c in case_results]
        ax.bar([i + k * w for i in range(len(names))], vals, w, label=f"{key} (mean {g[key]['mean']:+.2f})")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(names))])
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=6)
    ax.set_ylabel("PSNR gain [dB]")
    ax.legend(fontsize=6)
    fig.tight_layout()
    _save_small(fig, path, figures)


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------
def resolve(cfg: dict | None = None, **overrides) -> dict:
    opts = config.resolve(DEFAULTS, {**(cfg or {}), **overrides})
    if opts["quick"]:
        for k, v in _QUICK.items():
            if opts[k] == DEFAULTS[k]:
                opts[k] = v
    ims = [s.strip() for s in opts["images"].split(",") if s.strip()]
    sts = [s.strip() for s in opts["settings"].split(",") if s.strip()]
    check(ims, "give at least one image with --images=astronaut,...")
    for im in ims:
        check(im in P.IMAGES, f"unknown image {im!r}; use one of {', '.join(P.IMAGES)}")
    for s in sts:
        check(s in P.SETTINGS, f"unknown setting {s!r}; use one of {', '.join(P.SETTINGS)}")
    check(sts, "give at least one setting with --settings=motion,...")
    check(opts["size"] >= 16, f"size must be at least 16 (kernels up to 9×9 and the SSIM window), got {opts['size']}")
    check(opts["jobs"] >= 1 and opts["threads"] >= 1, "jobs and threads must be positive integers")
    check(opts["upper_iter"] >= 0, f"upper_iter must be ≥ 0, got {opts['upper_iter']}")
    for k in ("fair_beta", "fair_threshold", "fair_step0", "mu0"):
        check(opts[k] >= 0 and math.isfinite(opts[k]), f"{k} must be ≥ 0 (0: the fair protocol's value), got {opts[k]}")
    opts["_resume"] = [d.strip() for d in opts["resume"].split(",") if d.strip()]
    for d in opts["_resume"]:
        check(os.path.isdir(os.path.join(d, "cases")), f"--resume={d!r} is not a reproduce_2d run folder (no cases/ inside)")
    selected_rows(opts)   # unknown row names raise here
    opts["_images"], opts["_settings"] = ims, sts
    return opts


def _case_file(run_dir, image, setting):
    return os.path.join(run_dir, "cases", f"{image}_{setting}")


def _save_case(run_dir, res):
    import figures
    base = _case_file(run_dir, res["image"], res["setting"])
    figures.save_json(base + ".json", {k: res[k] for k in ("case", "image", "setting", "rows", "skipped")})
    figures.save_torch(base + ".pt", {k: res[k] for k in ("images", "kernels", "x_true", "b0", "b_true")})


def _load_case(run_dir, image, setting):
    base = _case_file(run_dir, image, setting)
    if not (os.path.isfile(base + ".json") and os.path.isfile(base + ".pt")):
        return None
    with open(base + ".json") as f:
        res = json.load(f)
    res.update(torch.load(base + ".pt", weights_only=False))
    res["images"] = {k: _thumb(v) for k, v in res["images"].items()}   # older runs kept larger crops
    res["x_true"] = _thumb(res["x_true"])
    return res


def run(cfg: dict | None = None, **overrides) -> dict:
    """Run the table; returns ``{"run_dir", "cases", "gains"}`` (raises ConfigError on bad input)."""
    opts = resolve(cfg, **overrides)
    from tqdm import tqdm
    import figures
    torch.set_num_threads(opts["threads"])
    run_dir = config.make_run_dir(opts["results_dir"], time.strftime("%Y%m%d-%H%M%S") + ("_quick" if opts["quick"] else ""))
    os.makedirs(os.path.join(run_dir, "cases"))
    opts["_run_dir"] = run_dir
    figures.save_json(os.path.join(run_dir, "config.json"), {k: v for k, v in opts.items() if not k.startswith("_")})
    names = [r.name for r in selected_rows(opts)]
    todo, done, prevs = [], {}, {}
    for im in opts["_images"]:
        for s in opts["_settings"]:
            prev = None
            for d in opts["_resume"]:             # later folders add the rows earlier ones lack
                c = _load_case(d, im, s)
                if c is not None:
                    prev = c if prev is None else merge_case(prev, c, names)
            missing = None
            if prev is not None:
                have = {r["method"] for r in prev["rows"]}
                missing = [n for n in names if n not in have]
                if not missing:
                    done[(im, s)] = prev
                    _save_case(run_dir, prev)
                    continue
                prevs[(im, s)] = prev
            todo.append((im, s, missing))

    def finish(res):
        key = (res["image"], res["setting"])
        if key in prevs:
            res = merge_case(prevs[key], res, names)
        done[key] = res
        _save_case(run_dir, res)

    bar = tqdm(total=sum(len(m) if m else len(names) for *_, m in todo), desc="reproduce_2d", unit="row",
               dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        if opts["jobs"] == 1:
            for im, s, only in todo:
                bar.set_postfix_str(f"{im}/{s}")
                finish(run_case(im, s, opts, progress=lambda name: bar.update(1), only=only))
        else:
            from concurrent.futures import ProcessPoolExecutor, as_completed
            import multiprocessing as mp
            with ProcessPoolExecutor(opts["jobs"], mp_context=mp.get_context("spawn")) as ex:
                futs = {ex.submit(_run_one, (im, s, opts, only)): len(only) if only else len(names)
                        for im, s, only in todo}
                for fu in as_completed(futs):        # each case is saved as soon as it is done
                    finish(fu.result())
                    bar.update(futs[fu])
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted: {len(done)} finished cases are in {run_dir}/cases; continue with "
              f"python {_PROG} --resume={run_dir} (and the same options)", file=sys.stderr)
        raise
    bar.close()
    case_results = [done[(im, s)] for im in opts["_images"] for s in opts["_settings"]]
    rows_flat = [{c: r.get(c, "") for c in ("image", "setting", "method", "group") + _COLS} for cr in case_results
                 for r in cr["rows"]]
    figures.save_csv(os.path.join(run_dir, "table.csv"), rows_flat)
    md = markdown_table(case_results, names)
    figures._atomic(os.path.join(run_dir, "table.md"), lambda tmp: open(tmp, "w").write(md))
    grid_methods = [n for n in _grid_rows(ROWS) if n in names]
    for im in opts["_images"]:
        grid_figure(case_results, im, os.path.join(run_dir, f"grid_{im}.png"), grid_methods)
    kernels_figure(case_results, os.path.join(run_dir, "kernels.png"))
    gains_figure(case_results, os.path.join(run_dir, "gains.png"))
    g = gains(case_results)
    skipped = {k: v for c in case_results for k, v in c["skipped"].items()}
    summary = {"gains": g, "extra_gains": gains(case_results, EXTRA_GAINS), "prox_gains": prox_gains(case_results), "skipped_rows": skipped, "seconds": time.perf_counter() - t0,
               "cases": [c["case"] for c in case_results], "paper_mapping_n": case_results[0]["rows"] and
               P.paper_upper_mapping(3 * opts["size"] ** 2)}
    figures.save_json(os.path.join(run_dir, "summary.json"), summary)
    return {"run_dir": run_dir, "cases": case_results, "gains": g, "markdown": md, "skipped": skipped}


def main(argv):
    argv = [f"{a}=true" if a in tuple("--" + f for f in _FLAGS) else a for a in argv]
    try:
        cfg, _ = config.parse_argv(DEFAULTS, argv)
        if cfg["list_rows"]:
            for r in ROWS.values():
                why = r.available() if r.available else None
                print(f"{r.name:28s} {r.group:7s} {'' if why is None else 'unavailable: ' + why}")
            return 0
        out = run(cfg)
    except ConfigError as e:
        config.fail(_PROG, e)
    except KeyboardInterrupt:
        return 130
    print(out["markdown"])
    for k, v in out["skipped"].items():
        print(f"not run: {k} ({v})")
    print(out["run_dir"])
    pg = prox_gains(out["cases"])
    print("prox_gain_db " + " ".join(f"{k}@{st}={v:.3f}" for k, d in pg.items() for st, v in d.items()
                                     if not math.isnan(v)))
    g = out["gains"]
    print("adp_gain_db " + " ".join(f"{k}={g[k]['mean']:.3f}" for k in GAINS))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
