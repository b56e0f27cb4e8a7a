"""The statistics behind every verdict of ``diffswarm eval`` (diffswarm/eval/stats.py): known inputs, p-values
checked against scipy and against closed forms, Holm's adjustment, and the verdict rules."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from diffswarm.eval.report import judge
from diffswarm.eval.report_common import claim
from diffswarm.eval.stats import (
    describe,
    holm,
    paired_test,
    result_text,
    seed_means,
    sign_flip_p,
    tost,
    verdict,
    word_of,
)


def _summary(values: dict[tuple[int, int], float], key: str = "fd") -> dict:
    return {"per_run": {f"s{ts}/r{s}": {key: v} for (ts, s), v in values.items()}}


def test_paired_t_matches_scipy_and_the_ci_covers_the_mean():
    d = [1.3, 0.4, 2.2, 0.9, 1.7]
    r = describe(d)
    ref = sps.ttest_1samp(d, 0.0)
    assert r["p"] == pytest.approx(ref.pvalue, rel=1e-12) and r["t"] == pytest.approx(ref.statistic, rel=1e-12)
    lo, hi = sps.t.interval(0.95, len(d) - 1, loc=np.mean(d), scale=sps.sem(d))
    assert r["ci"] == pytest.approx([lo, hi], rel=1e-12)
    assert r["dz"] == pytest.approx(np.mean(d) / np.std(d, ddof=1)) and r["df"] == 4


def test_sampling_seeds_are_averaged_within_a_training_seed_first():
    # 3 training seeds x 2 sampling seeds: the test has n = 3 (df 2), not 6
    a = _summary({(0, 0): 10.0, (0, 1): 12.0, (1, 0): 11.0, (1, 1): 11.0, (2, 0): 9.0, (2, 1): 13.0})
    b = _summary({(0, 0): 9.0, (0, 1): 9.0, (1, 0): 10.5, (1, 1): 9.5, (2, 0): 9.0, (2, 1): 10.0})
    assert seed_means(a["per_run"], "fd") == {0: 11.0, 1: 11.0, 2: 11.0}
    t = paired_test(a, b, "fd", claimed=+1)
    assert t["n"] == 3 and t["df"] == 2 and t["runs"] == 6 and t["diffs"] == pytest.approx([2.0, 1.0, 1.5])
    assert t["p"] == pytest.approx(sps.ttest_rel([11, 11, 11], [9, 10, 9.5]).pvalue, rel=1e-12)
    # a run only one side has is left out of both sides
    b2 = _summary({**{k: 9.0 for k in [(0, 0), (1, 0), (2, 0)]}})
    assert paired_test(a, b2, "fd")["runs"] == 3


def test_sign_flip_is_exact():
    assert sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(0.25)  # only the all-+ and all-- patterns are as extreme
    assert sign_flip_p([1.0, -1.0]) == pytest.approx(1.0)
    # |sum| >= 5.5 of 2, 1, 0.5, 3 with signs: the observed pattern, 0.5's flipped one, and their negations
    assert sign_flip_p([2.0, 1.0, -0.5, 3.0]) == pytest.approx(4 / 16)


def test_tost_against_two_one_sided_scipy_tests():
    d = np.array([0.1, -0.2, 0.05, 0.15, -0.05, 0.0])
    m = 0.5
    r = tost(d, m)
    p_lo = sps.ttest_1samp(d, -m, alternative="greater").pvalue
    p_hi = sps.ttest_1samp(d, m, alternative="less").pvalue
    assert r["p_equiv"] == pytest.approx(max(p_lo, p_hi), rel=1e-12)
    assert r["p"] == pytest.approx(min(1, 2 * min(r["p_equiv"], r["p_outside"])))
    far = tost(d + 3.0, m)  # every difference ~3 > margin: "different by more than the margin"
    assert far["p_outside"] < 0.01 and far["p_equiv"] > 0.99
    with pytest.raises(ValueError):
        tost(d, 0.0)


def test_holm_matches_the_step_down_rule():
    p = [0.01, 0.04, 0.03, 0.005, float("nan")]
    adj = holm(p)
    # sorted 0.005, 0.01, 0.03, 0.04 over m = 4: 0.02, 0.03, 0.06, 0.06 (monotone)
    assert adj[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and math.isnan(adj[4])
    assert holm([0.04, 0.01]) == pytest.approx([0.04, 0.02]) and holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def test_verdict_words_never_read_noise_as_agreement():
    a = _summary({(s, 0): 10.0 + s for s in range(4)})
    better = _summary({(s, 0): 8.0 + s + 0.01 * s * s for s in range(4)})
    same = _summary({(s, 0): 10.0 + s + (0.3 if s % 2 else -0.3) for s in range(4)})
    d = paired_test(better, a, "fd", claimed=-1)
    assert word_of(d) == "agrees" and word_of({**d, "claimed": +1}) == "disagrees"
    assert word_of(paired_test(same, a, "fd", claimed=-1)) == "no evidence either way"
    assert word_of(d, p_adj=0.2) == "no evidence either way"  # Holm can take significance away
    # +0.000 +- 0.000 is never a clear difference
    zero = paired_test(a, a, "fd", claimed=-1)
    assert zero["mean"] == 0 and zero["p"] == 1.0 and word_of(zero) == "no evidence either way"
    # one training seed: nothing to test
    one = paired_test(_summary({(0, 0): 1.0, (0, 1): 2.0}), _summary({(0, 0): 3.0, (0, 1): 3.0}), "fd", -1)
    assert one["n"] == 1 and word_of(one) == "not tested" and "no test" in result_text(one)
    assert word_of(None) == "not tested"
    # equivalence only through TOST
    eq = paired_test(same, a, "fd", claimed=0, margin=2.0)
    assert eq["kind"] == "equivalence" and word_of(eq) == "agrees"
    assert word_of(paired_test(same, a, "fd", claimed=0, margin=0.01)) == "no evidence either way"
    assert verdict(["agrees", "no evidence either way"]) == "agrees"
    assert verdict(["agrees", "disagrees"]) == "no evidence either way"
    assert verdict(["not tested", "not tested"]) == "not tested"


def test_the_report_adjusts_every_claim_together():
    a = _summary({(s, 0): 10.0 + s for s in range(3)})
    b = _summary({(s, 0): 9.0 + s + 0.1 * s for s in range(3)})  # b < a by ~0.9-1.0
    claims = [claim("b beats a", "x", [paired_test(b, a, "fd", -1, label="FD")]),
              claim("b beats a, again", "x", [paired_test(b, a, "fd", -1, label="FD")]),
              {"claim": "untested", "ours": "-", "verdict": "not tested"}]
    rows = judge(claims)
    p = claims[0]["tests"][0]["p"]
    assert claims[0]["tests"][0]["p_holm"] == pytest.approx(min(1, 2 * p))
    assert [r[-1] for r in rows][2] == "not tested" and "Holm p" in rows[0][2]
    assert all(c["verdict"] in ("agrees", "no evidence either way") for c in claims[:2])
