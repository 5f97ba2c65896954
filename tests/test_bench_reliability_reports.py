"""What `tandem bench chaos` and `tandem bench soak` report, from their own figures: the soak's memory slope is a
least-squares fit after warm-up, and the tables say which promise held. (The clusters they drive are tested in
tests/cluster/test_chaos.py and by running the benches.)"""

import pytest

from cluster.bench import chaos, soak


def test_the_soak_slope_is_a_least_squares_fit_after_warm_up():
    assert soak.slope_per_min([(0, 100.0), (1, 102.0), (2, 104.0)]) == pytest.approx(2.0)
    assert soak.slope_per_min([(0, 5.0)]) == 0.0
    samples = [soak.Sample(t, {"decode rank 0": 500.0 + (100 if t < 2 else 0) + 0.5 * t}, {"decode": 10}, 40.0)
               for t in range(6)]
    report = soak.summarize(soak.Soak(samples, requests=12, total_blocks={"decode": 10},
                                      idle_free_blocks={"decode": 10}), warmup_min=2)
    process = report["processes"]["decode rank 0"]
    assert process["slope_mb_per_min"] == pytest.approx(0.5)  # the warm-up's drop is not counted
    assert (process["rss_start_mb"], process["rss_end_mb"]) == (600.0, 502.5)
    text = soak.table(report)
    assert "| decode rank 0 | 600 | 502 | 0.50 | yes |" in text
    assert "| decode free blocks idle after the run / total | 10 / 10 |" in text


def test_the_chaos_table_counts_every_phase_and_each_kill():
    rounds = [dict(round=0, streams=4, wrong=0, leaks=[], cancelled={"queued": 1, "decoding": 1}),
              dict(round=1, streams=4, wrong=1, leaks=["decode: pinned=1"], cancelled={"queued": 2, "decoding": 0})]
    kills = [dict(pool="decode", rank=1, fault="killed", in_flight=16, completed=3, unavailable=13, other=[],
                  slowest_end_s=2.5, within_s=20.0, killed_after_s=1.2, unfaulted_end_s=1.8, recovered_s=1.5,
                  replaced_s=31.0)]
    text = chaos.table(rounds, kills)
    assert "| rounds x streams | 2 x 4 |" in text
    assert "| cancelled: queued | 3 |" in text
    assert "| finished streams with wrong tokens | 1 |" in text
    assert "| rounds leaving anything held | 1 |" in text
    assert "| decode rank 1 killed | 16 | 3 | 13 | 0 | 2.5 s (limit 20 s) | 1.8 s | 1.5 s | 31.0 s |" in text
