"""experiments/dip_table.py: refusals before anything is written, and the aggregate numbers."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import dip_table  # noqa: E402
from config import ConfigError  # noqa: E402


@pytest.mark.parametrize("given, match", [
    (dict(images="no_such_image"), "image 'no_such_image' not found"),
    (dict(settings="motion,gaussian"), "settings must be a comma-separated subset"),
    (dict(size=12), "divisible by 8"),
    (dict(threads=0), "threads must be ≥ 1"),
    (dict(reuse_dip="nowhere"), "holds no readable DIP run of astronaut motion"),
])
def test_bad_options_refused_and_nothing_written(tmp_path, given, match):
    out = tmp_path / "table"
    with pytest.raises(ConfigError, match=match):
        dip_table.run(dict(given, results_dir=str(out), images=given.get("images", "astronaut")))
    assert not out.exists()


def _rows(case, tv, adp, es, best, gap):
    image, setting = case
    return [dict(image=image, setting=setting, method="TV (b₀)", psnr=tv),
            dict(image=image, setting=setting, method="ADP-β-MAID", psnr=adp),
            dict(image=image, setting=setting, method="DIP, ES-WMV stop", psnr=es, gap_db=gap),
            dict(image=image, setting=setting, method="DIP, oracle stop", psnr=best)]


def test_aggregate_gaps_and_margins():
    rows = (_rows(("a", "motion"), 25.0, 26.0, 25.5, 26.75, 1.25)
            + [dict(r, method="semi-blind " + r["method"]) if "DIP" in r["method"] else r
               for r in _rows(("a", "semiblind"), 24.0, 24.5, 25.0, 25.25, 0.25)])
    agg = dip_table.aggregate(rows)
    assert agg["es_gap_max"] == 1.25 and agg["es_gap_mean"] == 0.75 and agg["motion_es_gap_max"] == 1.25
    assert (agg["es_within_1db"], agg["cases"], agg["es_beats_adp"]) == (1, 2, 1)
    assert agg["es_minus_adp_mean"] == pytest.approx((-0.5 + 0.5) / 2)
    assert agg["oracle_minus_adp_mean"] == pytest.approx((0.75 + 0.75) / 2)
