"""The binomial statistics (results/stats.py) are scipy's: each checked against the hand-written formula it
replaced, computed here independently, so a wrong argument (a one-sided test, another interval) fails."""
import math

import pytest
from scipy.stats import binomtest

from distributed_ebm.results.stats import sign_test_p, wilson_interval


def _wilson_formula(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _sign_test_exact(a: int, b: int) -> float:
    n, k = a + b, min(a, b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


@pytest.mark.parametrize("k, n", [(0, 10), (10, 10), (1, 40), (2, 200), (50, 100), (144, 200), (29, 40), (1, 1)])
def test_the_wilson_interval_is_the_score_formula(k, n):
    lo, hi = wilson_interval(k, n)
    want = _wilson_formula(k, n)
    assert lo == pytest.approx(want[0], abs=1e-12) and hi == pytest.approx(want[1], abs=1e-12)
    assert (lo, hi) == tuple(binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson"))
    assert lo <= k / n <= hi


def test_an_empty_sample_has_no_interval():
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


@pytest.mark.parametrize("a, b", [(0, 0), (1, 0), (5, 0), (3, 7), (7, 3), (8, 7), (10, 5), (4, 0), (2400, 2601),
                                  (120, 30)])
def test_the_sign_test_is_two_sided_and_exact(a, b):
    p = sign_test_p(a, b)
    assert p == pytest.approx(_sign_test_exact(a, b), rel=1e-9, abs=1e-300)
    assert p == sign_test_p(b, a)  # two-sided: symmetric in the two counts
    if a + b:
        assert p == pytest.approx(binomtest(a, a + b, 0.5, alternative="two-sided").pvalue, rel=1e-12)
        assert p >= binomtest(max(a, b), a + b, 0.5, alternative="greater").pvalue  # never the one-sided p


def test_the_worst_case_over_every_judgement_never_exceeds_robust_and_old_summaries_read_honestly():
    """An image broken by the protocol whose final adversarial image is then judged right R times counts in the
    re-judgements' figure but not in the worst case over every judgement; a summary written with the old
    `worst_case_accuracy` (the re-judgements alone) is read as that, with no worst case over every judgement."""
    from distributed_ebm.results.records import summarize
    from distributed_ebm.results.report import format_table, upgrade_summary

    broken_at = [3, 5, -1, -1, 0]
    reeval = [[True, True], [True, True], [True, False], [True, True], [True, True]]
    s = summarize([True] * 4 + [False], [True] * 5, broken_at, 12, reeval)
    assert s["robust_accuracy"] == 2 / 5 and s["reeval_all_right_accuracy"] == 4 / 5  # above robust, as committed
    assert s["worst_of_all_judgements_accuracy"] == 1 / 5 <= s["robust_accuracy"]
    assert "worst_case_accuracy" not in s
    old = {"worst_case_accuracy": 0.035, "worst_case_ci95": [0.017, 0.07], "reevaluations": 2}
    assert upgrade_summary(old) and old == {"reeval_all_right_accuracy": 0.035, "reeval_all_right_ci95": [0.017, 0.07],
                                            "reevaluations": 2}
    import json

    from .conftest import REPO
    committed = json.loads((REPO / "results" / "defended_bpda_eot.json").read_text())
    assert "worst_case_accuracy" in committed  # written before the two figures
    line = format_table([committed]).splitlines()[2]
    assert " 3.5 [" in line and line.count(" - ") >= 1  # its re-judgements' figure, and no worst case invented
