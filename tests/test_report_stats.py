"""Seeds, spread and significance of Table 1 against numbers worked out by hand.

The paired t-test with 3 seeds has 2 degrees of freedom, where Student's t has a closed form:
CDF F(t) = 1/2 + t / (2 sqrt(t^2 + 2)), so the two-sided p-value is p = 1 - |t| / sqrt(t^2 + 2) and the
97.5% quantile solves t / sqrt(t^2 + 2) = 0.95: t^2 = 2 * 0.9025 / 0.0975.
"""

from __future__ import annotations

import math

import pytest

from harness.report import ReportSettings, build_table, legend, render_markdown
from harness.reporting.stats import best_of_group, holm, mean_std, median_interval, paired_test
from tests.test_report import make_store


def p_df2(t: float) -> float:
    return 1.0 - abs(t) / math.sqrt(t * t + 2.0)


T975_DF2 = math.sqrt(2 * 0.9025 / 0.0975)  # 4.3027


def test_mean_std_by_hand():
    mean, std, n = mean_std([62.0, 65.0, 63.0])
    assert (mean, n) == (pytest.approx(190.0 / 3), 3)
    # deviations from 63.333: (-4/3, 5/3, -1/3); squares sum (16 + 25 + 1) / 9 = 14/3; / (n - 1) = 7/3
    assert std == pytest.approx(math.sqrt(7.0 / 3.0))
    m1, s1, n1 = mean_std([0.5])
    assert m1 == 0.5 and math.isnan(s1) and n1 == 1


def test_paired_t_significant_case():
    # d = method - scratch per seed = (2, 3, 2): mean 7/3, sd = sqrt((1/9 + 4/9 + 1/9) / 2) = sqrt(1/3),
    # t = (7/3) / (sqrt(1/3) / sqrt(3)) = (7/3) / (1/3) = 7, p = 1 - 7 / sqrt(51) = 0.0198
    scratch = {0: 60.0, 1: 62.0, 2: 61.0}
    method = {0: 62.0, 1: 65.0, 2: 63.0}
    r = paired_test(method, scratch, alpha=0.05)
    assert r.n == 3
    assert r.mean == pytest.approx(7.0 / 3.0)
    assert r.sd == pytest.approx(math.sqrt(1.0 / 3.0))
    assert r.t == pytest.approx(7.0)
    assert r.p == pytest.approx(1.0 - 7.0 / math.sqrt(51.0))  # 0.01980
    assert r.significant(0.05) and not r.significant(0.01)
    half = T975_DF2 * math.sqrt(1.0 / 3.0) / math.sqrt(3.0)  # 1.4342
    assert (r.ci_low, r.ci_high) == (pytest.approx(7 / 3 - half), pytest.approx(7 / 3 + half))
    assert r.ci_low > 0  # the interval excludes 0 exactly when p < alpha


def test_paired_t_not_significant_and_pairing_by_seed():
    # d = (1, -1, 3): mean 1, sd = sqrt((0 + 4 + 4) / 2) = 2, t = 1 / (2 / sqrt 3) = 0.866, p = 0.478
    scratch = {0: 60.0, 1: 62.0, 2: 61.0, 7: 50.0}  # seed 7 has no partner: not used
    method = {0: 61.0, 1: 61.0, 2: 64.0}
    r = paired_test(method, scratch)
    assert r.n == 3 and r.mean == pytest.approx(1.0)
    assert r.t == pytest.approx(math.sqrt(3.0) / 2.0)
    assert r.p == pytest.approx(p_df2(math.sqrt(3.0) / 2.0))
    assert not r.significant(0.05) and r.ci_low < 0 < r.ci_high
    # the same values unpaired (shuffled seeds) give another test: pairing is by seed value
    shuffled = paired_test({0: 64.0, 1: 61.0, 2: 61.0}, scratch)
    assert shuffled.mean == pytest.approx(1.0) and shuffled.t != pytest.approx(r.t)


def test_no_test_with_one_seed_and_degenerate_spread():
    one = paired_test({0: 66.0}, {0: 65.0})
    assert one.n == 1 and one.mean == pytest.approx(1.0) and math.isnan(one.p) and not one.tested
    assert not one.significant(0.05)
    none = paired_test({0: 66.0}, {1: 65.0})
    assert none.n == 0 and math.isnan(none.mean)
    same = paired_test({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert same.p == 1.0 and not same.significant(0.05)
    shift = paired_test({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})
    assert shift.p == 0.0 and shift.significant(0.05)


def test_holm_by_hand():
    # m = 3, sorted 0.01, 0.03, 0.04 -> 3 * 0.01 = 0.03, max(0.03, 2 * 0.03) = 0.06, max(0.06, 1 * 0.04) = 0.06
    adj = holm([0.01, 0.04, math.nan, 0.03])
    assert adj[0] == pytest.approx(0.03) and adj[1] == pytest.approx(0.06) and adj[3] == pytest.approx(0.06)
    assert math.isnan(adj[2])
    assert holm([0.5, 0.9]) == [pytest.approx(1.0), pytest.approx(1.0)]


def test_best_of_group_ties_within_noise():
    # csc - pointcontrast per seed = (1, -1, 1): mean 1/3, sd = sqrt((4/9 + 16/9 + 4/9) / 2) = sqrt(4/3),
    # t = (1/3) / (sqrt(4/3) / sqrt(3)) = 0.5, p = 1 - 0.5 / 1.5 = 2/3: tied, nobody bold
    tied = {"pointcontrast": {0: 63.0, 1: 67.0, 2: 64.0}, "csc": {0: 64.0, 1: 66.0, 2: 65.0}}
    assert paired_test(tied["csc"], tied["pointcontrast"]).p == pytest.approx(2.0 / 3.0)
    assert best_of_group(tied, 0.05) == {"pointcontrast": False, "csc": False}
    # d = (2, 3, 2) as above, p = 0.0198: separated, the leader is bold
    apart = {"pointcontrast": {0: 60.0, 1: 62.0, 2: 61.0}, "csc": {0: 62.0, 1: 65.0, 2: 63.0}}
    assert best_of_group(apart, 0.05) == {"pointcontrast": False, "csc": True}
    assert best_of_group(apart, 0.01) == {"pointcontrast": False, "csc": False}
    # one seed: untestable, the paper's rule (highest value) decides; a tie is bold for nobody, as
    # in the paper's KITTI column (DepthContrast 42.0, Ours 42.0: neither bold)
    assert best_of_group({"a": {0: 1.0}, "b": {0: 2.0}}, 0.05) == {"a": False, "b": True}
    assert best_of_group({"a": {0: 42.0}, "b": {0: 42.0}, "c": {}}, 0.05) == {"a": False, "b": False, "c": False}
    # several seeds: two members with equal means are not separated, whatever the third does
    same = {"a": {0: 1.0, 1: 2.0, 2: 3.0}, "b": {0: 1.0, 1: 2.0, 2: 3.0}, "c": {0: -9.0, 1: -9.5, 2: -9.2}}
    assert best_of_group(same, 0.05) == {"a": False, "b": False, "c": False}


def _three_seed_store(tmp_path):
    values = {
        # s3dis-semseg: csc vs scratch d = (2, 3, 2) -> p = 0.0198; csc - pointcontrast = (2, 3, 2) too, so csc
        # is bold; depthcontrast vs scratch d = (1, -1, 3) -> p = 0.478
        ("scratch", "s3dis-semseg"): [0.60, 0.62, 0.61],
        ("pointcontrast", "s3dis-semseg"): [0.60, 0.62, 0.61],
        ("csc", "s3dis-semseg"): [0.62, 0.65, 0.63],
        ("depthcontrast", "s3dis-semseg"): [0.61, 0.61, 0.64],
        ("image_guided", "s3dis-semseg"): [0.59, 0.60, 0.61],
        # scannet-semseg: csc and pointcontrast tied within noise (p = 2/3): no bold in Multi-scan
        ("scratch", "scannet-semseg"): [0.60, 0.60, 0.60],
        ("pointcontrast", "scannet-semseg"): [0.63, 0.67, 0.64],
        ("csc", "scannet-semseg"): [0.64, 0.66, 0.65],
    }
    return make_store(tmp_path, values, seeds=(0, 1, 2))


def test_table_significance_and_bold_over_three_seeds(tmp_path):
    t = build_table(_three_seed_store(tmp_path).root)
    assert t.n.loc["csc", "s3dis-semseg"] == 3 and t.n_pairs.loc["csc", "s3dis-semseg"] == 3
    assert t.mean.loc["csc", "s3dis-semseg"] == pytest.approx(190.0 / 3)
    assert t.std.loc["csc", "s3dis-semseg"] == pytest.approx(math.sqrt(7.0 / 3.0))
    assert t.delta.loc["csc", "s3dis-semseg"] == pytest.approx(7.0 / 3.0)
    assert t.t.loc["csc", "s3dis-semseg"] == pytest.approx(7.0)
    assert t.p.loc["csc", "s3dis-semseg"] == pytest.approx(1.0 - 7.0 / math.sqrt(51.0))
    assert t.significant.loc["csc", "s3dis-semseg"]
    assert t.p.loc["depthcontrast", "s3dis-semseg"] == pytest.approx(p_df2(math.sqrt(3.0) / 2.0))
    assert not t.significant.loc["depthcontrast", "s3dis-semseg"]
    # pointcontrast equals scratch on every seed: p = 1
    assert t.p.loc["pointcontrast", "s3dis-semseg"] == 1.0
    # bold: csc separated from pointcontrast on S3DIS; tied on ScanNet
    assert t.best.loc["csc", "s3dis-semseg"] and not t.best.loc["pointcontrast", "s3dis-semseg"]
    assert not t.best.loc["csc", "scannet-semseg"] and not t.best.loc["pointcontrast", "scannet-semseg"]
    # depthcontrast (62.0) vs image_guided (60.0): d = (2, 1, 3), mean 2, sd 1, t = 2 sqrt 3 = 3.464,
    # p = 1 - 3.464 / sqrt(14) = 0.0742 > 0.05: tied, not bold
    assert not t.best.loc["depthcontrast", "s3dis-semseg"]
    md = render_markdown(t)
    assert "**63.3 ± 1.5 (+2.3\\*)**" in md  # csc, S3DIS: bold, std, significant delta
    assert "| 62.0 ± 1.7 (+1.0) |" in md  # depthcontrast: not significant, not bold
    notes = " ".join(legend(t))
    assert "significant at α=0.05" in notes and "2 of 6 deltas" in notes


def test_alpha_and_holm_move_the_decision(tmp_path):
    root = _three_seed_store(tmp_path).root
    loose = build_table(root, settings=ReportSettings(alpha=0.1))
    assert loose.best.loc["depthcontrast", "s3dis-semseg"]  # p = 0.0742 < 0.1: separated
    # Six tests. Raw p: csc ScanNet d = (4, 6, 5), t = 5 sqrt 3 -> 1 - 5 sqrt 3 / sqrt 77 = 0.0131; csc S3DIS 0.0198;
    # pointcontrast ScanNet d = (3, 7, 4) -> 0.060; image_guided S3DIS d = (-1, -2, 0), t = -sqrt 3 -> 0.225;
    # depthcontrast 0.478; pointcontrast S3DIS 1. Holm: 6 x 0.0131 = 0.0786, then max(0.0786, 5 x 0.0198) = 0.0990.
    p_scannet = 1.0 - 5.0 * math.sqrt(3.0) / math.sqrt(77.0)
    p_s3dis = 1.0 - 7.0 / math.sqrt(51.0)
    plain = build_table(root)
    assert plain.p.loc["csc", "scannet-semseg"] == pytest.approx(p_scannet)
    assert plain.significant.loc["csc", "scannet-semseg"] and plain.significant.loc["csc", "s3dis-semseg"]
    holm_t = build_table(root, settings=ReportSettings(alpha=0.05, correction="holm"))
    assert holm_t.p.loc["csc", "scannet-semseg"] == pytest.approx(6 * p_scannet)
    assert holm_t.p.loc["csc", "s3dis-semseg"] == pytest.approx(5 * p_s3dis)
    assert not holm_t.significant.values.any()
    assert "Holm-corrected over 6 tests" in " ".join(legend(holm_t))


def test_one_seed_says_no_test(tmp_path):
    store = make_store(tmp_path, {("scratch", "s3dis-semseg"): [0.60], ("csc", "s3dis-semseg"): [0.65]})
    t = build_table(store.root)
    assert math.isnan(t.p.loc["csc", "s3dis-semseg"]) and not t.significant.values.any()
    assert t.best.loc["csc", "s3dis-semseg"]  # paper's rule with one seed
    notes = " ".join(legend(t))
    assert "n=1: no test" in notes and "untested with one seed" in notes


@pytest.mark.parametrize("n, low, high, coverage", [
    (11, 2, 10, 1 - 2 * 12 / 2048),  # P(B <= 1) = (1 + 11) / 2^11; k = 3 would cover 1 - 2 * 67 / 2048 = 0.935
    (9, 2, 8, 1 - 2 * 10 / 512),  # 0.961; k = 3: 1 - 2 * 46 / 512 = 0.82
    (8, 1, 8, 1 - 2 / 256),  # k = 2 would cover 1 - 2 * 9 / 256 = 0.930
    (6, 1, 6, 1 - 2 / 64),  # 0.969
    (5, 1, 5, 1 - 2 / 32),  # 0.9375: too few values for 95%, the full range
    (1, 1, 1, 0.0),
])
def test_median_interval_takes_the_order_statistics_of_the_binomial_rule(n, low, high, coverage):
    values = [float(v) for v in range(n, 0, -1)]  # any order
    lo, hi, cov = median_interval(values)
    assert (lo, hi) == (low, high)
    assert cov == pytest.approx(coverage, abs=1e-12)


def test_median_interval_of_35_values_covers_95_percent_and_no_narrower_one_does():
    lo, hi, cov = median_interval(range(1, 36))
    # by hand from the binomial table for n = 35: P(B <= 11) = 0.0205, P(B <= 12) = 0.0448
    assert (lo, hi) == (12, 24) and cov == pytest.approx(1 - 2 * 0.0205, abs=5e-4)
    with pytest.raises(ValueError):
        median_interval([])
    # many values (no float overflow in 2^n): the normal approximation, median +- 1.96 sqrt(n) / 2
    lo, hi, cov = median_interval(range(2001))
    assert abs(lo - (1000 - 1.96 * 2001 ** 0.5 / 2)) < 2 and abs(hi - (1000 + 1.96 * 2001 ** 0.5 / 2)) < 2
    assert 0.95 <= cov < 0.96


def test_a_delta_over_other_seeds_than_scratchs_is_not_tested_and_the_report_is_written(tmp_path):
    """Scratch has seeds 0-2, PointContrast 0-1 (seed 2 lost): the printed delta compares means
    over different seeds (62.55 - 63.67 = -1.1) while a test over seeds 0-1 would find +2.05
    (p = 0.016); no star may stand on the -1.1. The plots are drawn and every file written."""
    from harness.report import write_report
    from tests.test_report import make_store

    values = {("scratch", "s3dis-semseg"): [0.600, 0.610, 0.700],
              ("pointcontrast", "s3dis-semseg"): [0.620, 0.631, 0.5],
              # a constant shift over every seed: a zero-width interval, rounding must not break the bars
              ("scratch", "scannet-semseg"): [0.440, 0.654, 0.629],
              ("csc", "scannet-semseg"): [0.425, 0.639, 0.614]}
    store = make_store(tmp_path, values, seeds=(0, 1, 2))
    (store.root / "cells" / "pointcontrast__s3dis-semseg__s2" / "result.json").unlink()
    t = build_table(store.root)
    assert t.delta.loc["pointcontrast", "s3dis-semseg"] == pytest.approx(62.55 - 63.6666667)
    assert not t.significant.loc["pointcontrast", "s3dis-semseg"] and math.isnan(t.p.loc["pointcontrast", "s3dis-semseg"])
    assert t.significant.loc["csc", "scannet-semseg"]  # -1.5 on every seed
    paths = write_report(t, tmp_path / "rep", ["md", "png"])
    assert {"md", "deltas.png"} <= set(paths), paths
