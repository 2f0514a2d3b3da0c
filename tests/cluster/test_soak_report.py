"""`specdec soak`'s memory report: growth over the run and over its second half, per process."""

from __future__ import annotations

from cluster.cli.soak import rss_growth


def test_a_cache_that_fills_then_levels_off_shows_no_second_half_growth_and_a_leak_does():
    procs = {1: "cache", 2: "leak", 3: "restarted"}
    samples = [
        (30.0, {1: 100.0, 2: 100.0, 3: 100.0}),
        (60.0, {1: 108.0, 2: 104.0, 3: 100.0}),
        (90.0, {1: 110.0, 2: 108.0}),  # 3 is gone: not comparable
        (120.0, {1: 110.0, 2: 112.0, 3: 50.0}),
    ]
    growth = rss_growth(procs, samples)
    assert set(growth) == {1, 2}
    assert growth[1]["growth_pct"] == 10.0 and growth[1]["second_half_pct"] < 2.0
    assert growth[2]["growth_pct"] == 12.0 and growth[2]["second_half_pct"] > 3.0
    assert growth[1]["samples_mb"] == [100.0, 108.0, 110.0, 110.0]
    assert rss_growth(procs, []) == {}
