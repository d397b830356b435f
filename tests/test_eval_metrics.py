"""Metric maths on hand-computed cases: Wilson, bootstrap, RTP toxicity protocol, kappa."""

from __future__ import annotations

import math

import numpy as np
import pytest

from safeft.eval.metrics import (agreement, bootstrap, bootstrap_ratio, cohen_kappa, expected_max_toxicity,
                                 mean_toxicity, proportion, toxicity_probability, wilson)


def test_wilson_hand_computed():
    # 8/10, z = 1.96: centre = (0.8 + 0.19208) / 1.38416 = 0.71680; half = 1.96*sqrt(0.016 + 0.009604)/1.38416
    s = wilson(8, 10)
    z = 1.959963984540054
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / (1 + z * z / 10)
    assert s == {"value": 0.8, "lo": pytest.approx(centre - half), "hi": pytest.approx(centre + half), "n": 10}
    assert s["lo"] == pytest.approx(0.4902, abs=1e-4) and s["hi"] == pytest.approx(0.9433, abs=1e-4)
    zero = wilson(0, 10)
    assert zero["value"] == 0.0 and zero["lo"] == 0.0 and zero["hi"] == pytest.approx(0.2775, abs=1e-4)
    full = wilson(10, 10)
    assert full["hi"] == 1.0 and full["lo"] == pytest.approx(0.7225, abs=1e-4)
    assert wilson(0, 0) == {"value": None, "lo": None, "hi": None, "n": 0}


def test_proportion_leaves_undecided_out():
    s = proportion([True, False, None, True, None])
    assert s["value"] == pytest.approx(2 / 3) and s["n"] == 3


def test_bootstrap_matches_a_hand_resample_and_is_seeded():
    values = [0.1, 0.5, 0.2, 0.9, 0.4]
    s = bootstrap(values, seed=3, n_boot=500)
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 5, size=(500, 5))
    boots = np.asarray(values)[idx].mean(axis=1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    assert s["value"] == pytest.approx(0.42) and s["n"] == 5
    assert s["lo"] == pytest.approx(lo) and s["hi"] == pytest.approx(hi)
    assert bootstrap(values, seed=3, n_boot=500) == s
    assert bootstrap([0.7] * 4)["lo"] == pytest.approx(0.7) and bootstrap([0.7] * 4)["hi"] == pytest.approx(0.7)
    assert bootstrap([])["value"] is None


def test_bootstrap_ratio_is_token_weighted():
    # two documents: NLL 10 over 5 tokens, 2 over 5 tokens -> mean NLL 1.2, ppl e^1.2
    s = bootstrap_ratio([10.0, 2.0], [5, 5], transform=np.exp)
    assert s["value"] == pytest.approx(math.exp(1.2))
    assert math.exp(0.4) - 1e-9 <= s["lo"] <= s["value"] <= s["hi"] <= math.exp(2.0) + 1e-9


def test_rtp_protocol_hand_computed():
    scores = [[0.1, 0.9, 0.2], [0.2, 0.3, 0.1], [0.6, 0.0, 0.0], [0.05, 0.05, 0.05]]
    emt = expected_max_toxicity(scores)
    assert emt["value"] == pytest.approx((0.9 + 0.3 + 0.6 + 0.05) / 4) and emt["n"] == 4
    tp = toxicity_probability(scores)
    assert tp["value"] == pytest.approx(0.5) and tp["n"] == 4  # prompts 1 and 3 reach 0.5
    assert tp == wilson(2, 4)
    mt = mean_toxicity(scores)
    assert mt["value"] == pytest.approx(sum(map(sum, scores)) / 12) and mt["n"] == 12
    assert mt["lo"] <= mt["value"] <= mt["hi"]
    # threshold is inclusive
    assert toxicity_probability([[0.5]])["value"] == 1.0


def test_cohen_kappa_and_agreement_hand_computed():
    a = [True, True, False, False]
    b = [True, False, False, False]
    # p_o = 0.75, p_e = 0.5*0.25 + 0.5*0.75 = 0.5 -> kappa = 0.5
    assert cohen_kappa(a, b) == pytest.approx(0.5)
    assert cohen_kappa([True, True], [True, True]) is None  # chance agreement is total
    assert cohen_kappa([True, False], [False, True]) == pytest.approx(-1.0)
    g = agreement(a + [None], b + [True])
    assert g == {"agreement": 0.75, "cohen_kappa": pytest.approx(0.5), "n": 4}
