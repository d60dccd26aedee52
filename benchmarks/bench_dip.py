"""DIP speed: time per DIP iteration and the cost of early stopping relative to it.

Run from the repository root (device auto, DIP.py's default configuration at run time: 3×128×128,
UNet widths 16…128 over 4 scales, float32; the header line names what was measured)::

    python benchmarks/bench_dip.py [--size 128] [--threads 2] [--repeats 7] [--block 10] [--device auto]

In each of ``--repeats`` rounds, interleaved so that the load of a shared machine hits all of
them alike, it times ``--block`` consecutive

* DIP iterations (:func:`DIP.dip_step`: forward pass, loss, backward, Adam step);
* ES-WMV updates (:meth:`early_stopping.WindowedVariance.update`, W = 100, fed the iterates of
  those same DIP steps, so the window is full and the minimum tracking runs as in a real run);
* ES-EMV updates (:meth:`early_stopping.ExponentialVariance.update`);
* the direct O(W·N) ES-WMV variance (SPEC §7's formula recomputed over the stored window), for
  comparison with the O(N) running update.

The ratios are taken within each round and their median is reported (the ES-WMV paper's claim
is an overhead below the cost of one DIP step; this project's target is < 10 %).  Last line:
``dip ms_per_iter=<t> wmv_overhead=<ratio> emv_overhead=<ratio> direct_wmv_overhead=<ratio>``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import DIP  # noqa: E402
from early_stopping import ExponentialVariance, WindowedVariance  # noqa: E402
from imaging import make_data, resolve_device  # noqa: E402


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(dev, fn) -> float:
    _sync(dev)
    t = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t


def direct_variance(window: torch.Tensor) -> float:
    """SPEC §7's VAR over a stored (W, …) window, recomputed from scratch (O(W·N))."""
    w = window.double()
    return float(((w - w.mean(0)) ** 2).sum()) / w.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device, "float32")
    cfg = DIP.effective_config(dict(DIP.DEFAULTS, size_x=args.size, size_y=args.size))
    _, b0, y = make_data(cfg, DIP._IMAGES, dev, DIP.DTYPE)
    st = DIP.DIPState(cfg, b0, dev)
    wmv, emv = WindowedVariance(cfg["es_window"], 10**9), ExponentialVariance(cfg["es_alpha"], 10**9)
    xs = [DIP.dip_step(st, cfg, y, b0)[0] for _ in range(cfg["es_window"])]   # warm-up, fills the windows
    for x in xs:
        wmv.update(x)
        emv.update(x)
    window = torch.stack(xs)

    rows = []
    for _ in range(args.repeats):
        block: list[torch.Tensor] = []
        t_dip = _timed(dev, lambda: block.extend(DIP.dip_step(st, cfg, y, b0)[0] for _ in range(args.block)))
        t_wmv = _timed(dev, lambda: [wmv.update(x) for x in block])
        t_emv = _timed(dev, lambda: [emv.update(x) for x in block])
        t_direct = _timed(dev, lambda: [direct_variance(window) for _ in block])
        rows.append((t_dip / args.block, t_wmv / t_dip, t_emv / t_dip, t_direct / t_dip))

    ms = 1000 * statistics.median(r[0] for r in rows)
    ratio = [statistics.median(r[i] for r in rows) for i in (1, 2, 3)]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"DIP {cfg['generator']} width {cfg['width']} depth {cfg['depth']}, 3×{args.size}×{args.size}, device {dev}, "
          f"{torch.get_num_threads()} threads, load average {load:.1f}; median of {args.repeats} rounds of "
          f"{args.block} iterations")
    print(f"{'DIP iteration':28s} {ms:9.2f} ms")
    for name, r in zip(("ES-WMV update (O(N))", "ES-EMV update", "ES-WMV direct (O(W·N))"), ratio):
        print(f"{name:28s} {r * ms:9.3f} ms  = {100 * r:6.2f} % of a DIP iteration")
    print(f"dip ms_per_iter={ms:.2f} wmv_overhead={ratio[0]:.4f} emv_overhead={ratio[1]:.4f} "
          f"direct_wmv_overhead={ratio[2]:.4f}")


if __name__ == "__main__":
    main()
