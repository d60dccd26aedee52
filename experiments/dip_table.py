"""The DIP comparison table (issue 14.6): TV, ADP-β-MAID and DIP on the bundled images.

    python experiments/dip_table.py                 # 4 images × {motion, semiblind}, DIP's CPU default size
    python experiments/dip_table.py --quick         # astronaut only, 64×64, short runs (a smoke test)
    python experiments/dip_table.py --images=coffee --settings=motion --threads=2
    python experiments/dip_table.py --reuse_dip=Results/dip_table/<date-time>   # new TV/ADP rows, the DIP runs of an earlier table

For every image and setting the data are made once per method by :func:`imaging.make_data` from
the same values (image, size, setting, kernel size, σ's, noise level, seed: DIP.py's defaults at
run time, passed explicitly to both drivers, and checked equal in the summaries):

* **TV (b₀)** and **ADP-β-MAID**: one ``ADP.run(...)`` with ADP.py's defaults (whatever they are
  when this runs; they are recorded in ``summary.json`` under ``adp_defaults``), only the data
  settings (and ``upper_iter`` with ``--adp_upper_iter``) given;
* **DIP**: one ``DIP.run(...)`` per (image, setting): for ``motion`` DIP with the known kernel b₀,
  for ``semiblind`` the semi-blind DIP of ``presets/dip_semiblind.py`` (kernel learned on the
  simplex with the H¹ penalty).  One run gives four rows: the ES-WMV selection, the ES-EMV
  selection, the PSNR-best iterate in hindsight (the oracle, needs the ground truth) and the last
  iterate; the detection gap (oracle − ES-WMV, dB and iterations) is reported with the ES rows.

``--reuse_dip=FOLDER`` takes the DIP rows from the runs of an earlier table (``FOLDER/dip/…``)
instead of running DIP again, e.g. after ADP.py's defaults changed (DIP is the expensive part);
each reused run's configuration must equal the one this table would run (else: refused, one
line), so the data and the DIP settings are the same; its ``seconds`` are the original run's.

DIP runs all its ``iterations`` (``stop_early`` off), so that the oracle and the last iterate are
known; ``patience ran out`` says whether ES-WMV would have stopped the run by itself (with DIP.py's
defaults W = 100, P = 1000 and 1000 iterations it cannot: the selection is then the variance
minimum over the run, the iterate ES-WMV holds at the end).  ``seconds`` is the time of the run
that produced the row: for TV the baseline solve, for ADP-β-MAID the MAID loop (after the TV
baseline it starts from), for DIP the whole loop (all iterations; the rows share it).

Writes ``table.md``, ``table.csv`` and ``summary.json`` (per-row numbers, the configurations,
the ADP defaults) into a new folder ``results_dir/<date-time>/`` (the single runs in ``adp/`` and
``dip/`` inside it).  Last line::

    dip_table es_gap_max=<dB> es_gap_mean=<dB> es_within_1db=<k>/<n> oracle_minus_adp_mean=<dB> ...
"""
from __future__ import annotations

import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import config  # noqa: E402
from config import ConfigError, check  # noqa: E402

# ------------------------------------------------------------------------------------------
# configuration (override with --name=value; --quick alone means --quick=true)
# ------------------------------------------------------------------------------------------
images = "astronaut,coffee,chelsea,rocket"   # comma-separated bundled images (or PNG/JPEG paths)
settings = "motion,semiblind"   # motion: known kernel DIP; semiblind: semi-blind DIP (presets/dip_semiblind.py)
size = 0                   # image side in pixels (0: DIP.py's default size_x × size_y)
dip_iterations = 0         # DIP's Adam iterations (0: DIP.py's default)
adp_upper_iter = 0         # cap on MAID's upper iterations (0: ADP.py's default)
reuse_dip = ""             # an earlier table's folder: take the DIP runs from it (same configurations) instead of rerunning
threads = 1                # torch threads for every run (1 is fastest on an overloaded machine)
quick = False              # smoke test: astronaut, 64×64, 200 DIP iterations, 5 upper iterations
results_dir = "Results/dip_table"
DEFAULTS = config.defaults(globals())
_PROG = "experiments/dip_table.py"
_QUICK = dict(images="astronaut", size=64, dip_iterations=200, adp_upper_iter=5)
SEMIBLIND_PRESET = os.path.join(_ROOT, "presets", "dip_semiblind.py")
# the data settings both drivers share: passed to both, so both make the same (x, b₀, y)
DATA_KEYS = ("image", "size_x", "size_y", "channels", "setting", "kernel_size", "blur_sigma", "semiblind_sigma",
             "noise_level", "seed")
DIP_ROWS = (("DIP, ES-WMV stop", "es", "stop_iter"), ("DIP, ES-EMV stop", "emv", "stop_iter_emv"),
            ("DIP, oracle stop", "best", "best_iter"), ("DIP, last iterate", "last", "iterations_done"))

import torch  # noqa: E402

import ADP  # noqa: E402
import DIP  # noqa: E402
import figures  # noqa: E402
import json  # noqa: E402
from imaging import image_path  # noqa: E402


def effective(cfg: dict, given: dict) -> dict:
    """``cfg`` with the ``quick`` values for the options not ``given`` explicitly."""
    if not cfg["quick"]:
        return dict(cfg)
    return dict(cfg, **{k: v for k, v in _QUICK.items() if k not in given})


def plan(cfg: dict) -> list[dict]:
    """One case per (image, setting): ``{"image", "setting", "dip": DIP overrides, "adp": ADP
    overrides}``, every configuration checked by the drivers' own validation (nothing written)."""
    imgs = [s.strip() for s in cfg["images"].split(",") if s.strip()]
    sets = [s.strip() for s in cfg["settings"].split(",") if s.strip()]
    check(imgs, "images is empty; give e.g. --images=astronaut,coffee")
    bad = [s for s in sets if s not in ("motion", "semiblind")]
    check(sets and not bad, f"settings must be a comma-separated subset of motion,semiblind, got {cfg['settings']!r}")
    check(cfg["size"] >= 0 and cfg["dip_iterations"] >= 0 and cfg["adp_upper_iter"] >= 0,
          "size, dip_iterations and adp_upper_iter must be ≥ 0 (0: the drivers' defaults)")
    check(cfg["threads"] >= 1, f"threads must be ≥ 1, got {cfg['threads']}")
    semiblind = config.load_preset(SEMIBLIND_PRESET, DIP.DEFAULTS)
    cases = []
    for image in imgs:
        image_path(image, DIP._IMAGES)                     # ConfigError naming the samples if missing
        for setting in sets:
            dip = {"image": image, "setting": setting, "threads": cfg["threads"], "progress": False}
            if setting == "semiblind":
                dip.update(semiblind)
            if cfg["size"]:
                dip.update(size_x=cfg["size"], size_y=cfg["size"])
            if cfg["dip_iterations"]:
                dip["iterations"] = cfg["dip_iterations"]
            dip_cfg = DIP.effective_config(DIP.resolve_config(dip)[0], dip)
            DIP.validate(dip_cfg)
            adp = {k: dip_cfg[k] for k in DATA_KEYS} | {"progress": False}
            if cfg["adp_upper_iter"]:
                adp["upper_iter"] = cfg["adp_upper_iter"]
            adp_cfg, _ = ADP.resolve_config(adp)
            ADP.validate(adp_cfg)
            cases.append({"image": image, "setting": setting, "dip": dip, "adp": adp,
                          "data": {k: dip_cfg[k] for k in DATA_KEYS}, "dip_iterations": dip_cfg["iterations"]})
            if cfg["reuse_dip"]:
                cases[-1]["reused"] = reused_dip_run(cfg["reuse_dip"], image, setting, dip_cfg)
    return cases


def reused_dip_run(folder: str, image: str, setting: str, dip_cfg: dict) -> dict:
    """The DIP summary of (image, setting) from the earlier table in ``folder`` (as ``DIP.run``
    returns it), after checking that its run used ``dip_cfg`` (all but the run-local settings)."""
    try:
        with open(os.path.join(folder, "summary.json")) as f:
            rows = json.load(f)["rows"]
        name = os.path.splitext(os.path.basename(image))[0]
        run = next(r["run"] for r in rows if (r["image"], r["setting"]) == (name, setting)
                   and r["method"].endswith("DIP, ES-WMV stop"))
        run_dir = os.path.join(folder, run)
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(run_dir, "config.json")) as f:
            saved = json.load(f)["effective"]
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as e:
        raise ConfigError(f"--reuse_dip={folder!r} holds no readable DIP run of {image} {setting} "
                          f"({type(e).__name__}); give the folder of an earlier dip_table run") from None
    diff = sorted(k for k in dip_cfg if k not in DIP._RUN_LOCAL and saved.get(k) != dip_cfg[k])
    check(not diff, f"--reuse_dip: the DIP run of {image} {setting} in {folder!r} used other settings "
                    f"({', '.join(f'{k}: {saved.get(k)!r} there, {dip_cfg[k]!r} here' for k in diff)}); rerun DIP "
                    f"without --reuse_dip")
    return dict(summary, run_dir=run_dir, config=saved)


def _same_data(dip_cfg: dict, adp_cfg: dict) -> None:
    diff = [k for k in DATA_KEYS if dip_cfg[k] != adp_cfg[k]]
    if diff:
        raise RuntimeError(f"DIP and ADP ran on different data settings: {diff}")


def run_case(case: dict, run_dir: str) -> list[dict]:
    """The rows of one (image, setting): TV, ADP-β-MAID and the four DIP rows."""
    tag = {"image": os.path.splitext(os.path.basename(case["image"]))[0], "setting": case["setting"]}
    adp = ADP.run(case["adp"], results_dir=os.path.join(run_dir, "adp"))
    dip = case.get("reused") or DIP.run(case["dip"], results_dir=os.path.join(run_dir, "dip"))
    _same_data(dip["config"], adp["config"])
    sc = adp["scores"]
    rows = [dict(tag, method="TV (b₀)", psnr=sc["TV (b₀)"]["psnr"], ssim=sc["TV (b₀)"]["ssim"],
                 iteration=adp["baseline_iterations"], seconds=adp["baseline_seconds"],
                 run=os.path.relpath(adp["run_dir"], run_dir)),
            dict(tag, method="ADP-β-MAID", psnr=sc["ADP-β-MAID"]["psnr"], ssim=sc["ADP-β-MAID"]["ssim"],
                 iteration=adp["upper_iterations"], seconds=adp["maid_seconds"],
                 note=f"{adp['accepted']} accepted, stop {adp['stop_reason']}",
                 run=os.path.relpath(adp["run_dir"], run_dir))]
    prefix = "semi-blind " if case["setting"] == "semiblind" else ""
    for label, key, it in DIP_ROWS:
        row = dict(tag, method=prefix + label, psnr=dip["psnr_" + key], ssim=dip["ssim_" + key], iteration=dip[it],
                   seconds=dip["seconds"], run=os.path.relpath(dip["run_dir"], run_dir))
        if key == "es":
            row.update(gap_db=dip["gap_db"], gap_iters=dip["gap_iters"], patience_ran_out=dip["es_triggered"])
        if key == "emv":
            row.update(gap_db=dip["psnr_best"] - dip["psnr_emv"], gap_iters=dip["best_iter"] - dip["stop_iter_emv"],
                       patience_ran_out=dip["emv_triggered"])
        rows.append(row)
    return rows


COLUMNS = ("image", "setting", "method", "psnr", "ssim", "iteration", "gap_db", "gap_iters", "patience_ran_out",
           "seconds", "note")


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def markdown(rows: list[dict], header: str) -> str:
    names = ["image", "setting", "method", "PSNR [dB]", "SSIM", "iteration", "gap [dB]", "gap [it.]",
             "patience ran out", "seconds", "note"]
    lines = [header, "", "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for r in rows:
        cells = [_cell(r.get(c)) for c in COLUMNS]
        cells[4] = f"{r['ssim']:.4f}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def aggregate(rows: list[dict]) -> dict:
    """Gaps and margins over the cases: ES-WMV's detection gap and the oracle/ES PSNR against ADP."""
    es = [r for r in rows if r["method"].endswith("DIP, ES-WMV stop")]
    by_case = {}
    for r in rows:
        by_case.setdefault((r["image"], r["setting"]), {})[r["method"].replace("semi-blind ", "")] = r
    gaps = [r["gap_db"] for r in es]
    diff = [c["DIP, ES-WMV stop"]["psnr"] - c["ADP-β-MAID"]["psnr"] for c in by_case.values()]
    odiff = [c["DIP, oracle stop"]["psnr"] - c["ADP-β-MAID"]["psnr"] for c in by_case.values()]
    motion = [r["gap_db"] for r in es if r["setting"] == "motion"]
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    return {"es_gap_max": max(gaps), "es_gap_mean": mean(gaps), "es_within_1db": sum(g <= 1 for g in gaps),
            "cases": len(gaps), "motion_es_gap_max": max(motion) if motion else None,
            "es_minus_adp_mean": mean(diff), "oracle_minus_adp_mean": mean(odiff),
            "es_beats_adp": sum(d > 0 for d in diff)}


def run(given: dict) -> dict:
    cfg = effective(config.resolve(DEFAULTS, given), given)
    cases = plan(cfg)                                      # every check before anything is written
    config.check_writable(cfg["results_dir"])
    run_dir = config.make_run_dir(cfg["results_dir"], time.strftime("%Y%m%d-%H%M%S"))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])                  # ADP.run has no threads setting
    rows, t0 = [], time.perf_counter()
    try:
        for i, case in enumerate(cases, 1):
            t = time.perf_counter()
            new = run_case(case, run_dir)
            rows += new
            es = next(r for r in new if r["method"].endswith("ES-WMV stop"))
            print(f"[{i}/{len(cases)}] {case['image']} {case['setting']}: "
                  + ", ".join(f"{r['method']} {r['psnr']:.2f}" for r in new)
                  + f"; ES gap {es['gap_db']:.2f} dB ({time.perf_counter() - t:.0f} s)", flush=True)
            figures.save_csv(os.path.join(run_dir, "table.csv"), rows)    # partial results survive a crash
    finally:
        torch.set_num_threads(threads_before)
    agg = aggregate(rows)
    d = cases[0]["data"]
    header = (f"DIP comparison: {', '.join(dict.fromkeys(r['image'] for r in rows))}; {d['size_y']}×{d['size_x']}, "
              f"noise σ = {d['noise_level'] * 255:.3g}/255, seed {d['seed']}, semiblind σ = {d['semiblind_sigma']}; "
              f"DIP {cases[0]['dip_iterations']} iterations; {cfg['threads']} thread(s)"
              + (f"; DIP runs reused from {cfg['reuse_dip']}" if cfg["reuse_dip"] else ""))
    with open(os.path.join(run_dir, "table.md"), "w") as f:
        f.write(markdown(rows, header))
    cases = [{k: v for k, v in c.items() if k != "reused"} | {"reused_dip": c["reused"]["run_dir"]} if "reused" in c
             else c for c in cases]
    out = {"options": cfg, "aggregate": agg, "rows": rows, "cases": cases, "adp_defaults": ADP.DEFAULTS,
           "dip_defaults": DIP.DEFAULTS, "torch": torch.__version__, "seconds": time.perf_counter() - t0}
    figures.save_json(os.path.join(run_dir, "summary.json"), out)
    print(markdown(rows, header))
    print(run_dir)
    print(f"dip_table es_gap_max={agg['es_gap_max']:.2f} es_gap_mean={agg['es_gap_mean']:.2f} "
          f"es_within_1db={agg['es_within_1db']}/{agg['cases']} es_minus_adp_mean={agg['es_minus_adp_mean']:.2f} "
          f"oracle_minus_adp_mean={agg['oracle_minus_adp_mean']:.2f} seconds={out['seconds']:.0f}")
    return dict(out, run_dir=run_dir)


def main(argv: list[str]) -> int:
    argv = ["--quick=true" if a == "--quick" else a for a in argv]
    try:
        _, explicit = config.parse_argv(DEFAULTS, argv)
        run(explicit)
    except ConfigError as e:
        config.fail(_PROG, e)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
