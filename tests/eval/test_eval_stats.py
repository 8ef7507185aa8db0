"""95% intervals of dms.eval.stats against hand-computed values, and in the table and JSON."""
from __future__ import annotations

import pytest

from dms.eval.report import summary, table
from dms.eval.runner import Row
from dms.eval.stats import mean_interval, wilson


def test_wilson_matches_hand_computed_intervals():
    # 8 of 10: center (0.8 + z^2/20) / (1 + z^2/10), the textbook 0.490 - 0.943
    assert wilson(0.8, 10) == pytest.approx((0.49016, 0.94332), abs=1e-5)
    # 0 of n: upper end z^2 / (n + z^2); n of n: lower end n / (n + z^2)
    assert wilson(0.0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson(1.0, 32) == pytest.approx((0.89282, 1.0), abs=1e-5)


def test_mean_interval_matches_hand_computed_value():
    # tasks at 1.0 and 0.5 over 32 samples each: n~ = 32 + z^2, p~ = (1.0 * 32 + z^2/2) / n~ = 0.9464
    # and 0.5; half width z * sqrt(sum p~(1 - p~) / n~) / 2 = 0.0898 around 0.75.
    assert mean_interval([(1.0, 32), (0.5, 32)]) == pytest.approx((0.66024, 0.83976), abs=1e-5)
    assert mean_interval([(1.0, 32)] * 7)[1] == 1.0  # clipped
    assert mean_interval([(1.0, 32)] * 7)[0] < 1.0  # a perfect score still has its uncertainty


@pytest.mark.parametrize("call, match", [
    (lambda: wilson(1.2, 10), "p .* must be in"),
    (lambda: wilson(0.5, 0), "n must be an int >= 1"),
    (lambda: mean_interval([]), "at least one"),
])
def test_bad_inputs_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _row(task: str, accuracy: float, samples: int = 10) -> Row:
    return Row("dms", 8.0, task, accuracy=accuracy, compression=8.0, kv_bytes=1024.0, kv_pool_bytes=2048.0,
               retained_per_head=4.0, budget=None, samples=samples, seconds=1.0)


def test_rows_table_and_summary_carry_the_intervals():
    rows = [_row("vt", 0.8), _row("cwe", 0.0)]
    assert (rows[0].ci_low, rows[0].ci_high) == pytest.approx(wilson(0.8, 10))
    (s,) = summary(rows)
    assert s["task_ci"]["vt"] == pytest.approx(list(wilson(0.8, 10)))
    assert (s["ci_low"], s["ci_high"]) == pytest.approx(mean_interval([(0.8, 10), (0.0, 10)]))
    text = table(rows)
    ci_line = next(line for line in text.splitlines() if line.startswith("  95% CI"))
    assert "0.49-0.94" in ci_line and "0.00-0.28" in ci_line
    assert f"{s['ci_low']:.2f}-{s['ci_high']:.2f}" in ci_line
