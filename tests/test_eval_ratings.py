"""Arena ratings against hand-computed cases and an independent logistic regression (IRLS in numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qirl.eval.ratings import (
    VoteArrays,
    bt_ratings,
    compute_ratings,
    elo_gap,
    expected_score,
    online_elo,
    online_elo_batch,
    ranks_from_intervals,
    win_counts,
    win_rate_matrix,
)
from qirl.eval.stats import cluster_bootstrap


def _votes(models, triples):
    return VoteArrays.build(models, triples)


def _simulate(ratings: dict[str, float], n: int, seed: int, tie_rate: float = 0.0) -> list[tuple[str, str, float]]:
    """n votes between random pairs, outcomes drawn from the Elo / Bradley-Terry model itself."""
    rng = np.random.default_rng(seed)
    names = list(ratings)
    out = []
    for _ in range(n):
        a, b = rng.choice(len(names), 2, replace=False)
        p = float(expected_score(ratings[names[a]], ratings[names[b]]))
        u = rng.random()
        s = 0.5 if u < tie_rate else (1.0 if rng.random() < p else 0.0)
        out.append((names[a], names[b], s))
    return out


# ------------------------------------------------------------------------------------- hand cases


def test_61_percent_wins_is_about_78_elo():
    assert elo_gap(0.61) == pytest.approx(77.7, abs=0.05)  # 400 log10(0.61 / 0.39)
    triples = [("a", "b", 1.0)] * 61 + [("a", "b", 0.0)] * 39
    r = bt_ratings(win_counts(_votes(["a", "b"], triples)), l2=0.0)
    assert r[0] == 1000.0
    assert r[0] - r[1] == pytest.approx(400 * math.log10(61 / 39), abs=1e-6)


def test_ties_count_half_to_each_side():
    # 50 wins, 20 ties, 30 losses = 60 : 40, the same fit as 60 wins and 40 losses.
    tied = [("a", "b", 1.0)] * 50 + [("a", "b", 0.5)] * 20 + [("a", "b", 0.0)] * 30
    plain = [("a", "b", 1.0)] * 60 + [("a", "b", 0.0)] * 40
    r1 = bt_ratings(win_counts(_votes(["a", "b"], tied)), l2=0.0)
    r2 = bt_ratings(win_counts(_votes(["a", "b"], plain)), l2=0.0)
    np.testing.assert_allclose(r1, r2, atol=1e-8)
    assert r1[0] - r1[1] == pytest.approx(elo_gap(0.6), abs=1e-6)


def test_online_elo_by_hand():
    # Equal ratings, K = 32: the winner gains K / 2 = 16. Then a at 1016 vs b at 984:
    # E_a = 1 / (1 + 10^(-32/400)) = 0.54592; a loses: a -= 32 * 0.54592.
    v = _votes(["a", "b"], [("a", "b", 1.0), ("a", "b", 0.0)])
    r1 = online_elo(v, k=32, order=np.array([0]))
    np.testing.assert_allclose(r1, [1016.0, 984.0])
    e = 1 / (1 + 10 ** (-32 / 400))
    r2 = online_elo(v, k=32)
    np.testing.assert_allclose(r2, [1016 - 32 * e, 984 + 32 * e])
    # A tie between equals changes nothing.
    np.testing.assert_allclose(online_elo(_votes(["a", "b"], [("a", "b", 0.5)]), k=32), [1000.0, 1000.0])


def test_online_elo_batch_matches_the_loop():
    v = _votes(["a", "b", "c"], _simulate({"a": 1000, "b": 1100, "c": 900}, 60, seed=1, tie_rate=0.1))
    orders = np.random.default_rng(0).integers(0, len(v), size=(5, len(v)))
    batch = online_elo_batch(v, orders, k=20)
    for r in range(5):
        np.testing.assert_allclose(batch[r], online_elo(v, k=20, order=orders[r]), atol=1e-9)


def test_win_rate_matrix_and_counts():
    v = _votes(["a", "b", "c"], [("a", "b", 1.0), ("b", "a", 0.5), ("a", "b", 0.0), ("c", "a", 1.0)])
    rate, n = win_rate_matrix(v)
    assert n[0, 1] == n[1, 0] == 3 and n[0, 2] == 1 and n[1, 2] == 0
    assert rate[0, 1] == pytest.approx(1.5 / 3) and rate[1, 0] == pytest.approx(1.5 / 3)
    assert rate[2, 0] == 1.0 and rate[0, 2] == 0.0
    assert math.isnan(rate[1, 2]) and math.isnan(rate[0, 0])


def test_ranks_share_overlapping_intervals():
    low, high = np.array([1090.0, 1050.0, 900.0]), np.array([1110.0, 1095.0, 1000.0])
    np.testing.assert_array_equal(ranks_from_intervals(low, high), [1, 1, 3])


# ------------------------------------------------------------- against an independent implementation


def _irls_bradley_terry(models, triples, anchor=0, iters=50):
    """Logistic regression without intercept on a per-vote design (Chatbot Arena's formulation):
    row x = e_a - e_b, y = 1 if a won; a tie is two rows of weight 1/2 (y = 1 and y = 0). Fitted by
    iteratively reweighted least squares, with the anchor's column dropped (its beta = 0)."""
    idx = {m: i for i, m in enumerate(models)}
    xs, ys, ws = [], [], []
    for a, b, s in triples:
        x = np.zeros(len(models))
        x[idx[a]], x[idx[b]] = 1.0, -1.0
        for y, w in ((1.0, s), (0.0, 1.0 - s)):
            if w > 0:
                xs.append(x), ys.append(y), ws.append(w)
    x = np.delete(np.array(xs), anchor, axis=1)
    y, w = np.array(ys), np.array(ws)
    beta = np.zeros(x.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-x @ beta))
        weights = w * p * (1 - p)
        z = x @ beta + (y - p) / (p * (1 - p))
        beta = np.linalg.solve(x.T @ (weights[:, None] * x), x.T @ (weights * z))
    full = np.insert(beta, anchor, 0.0)
    return 1000 + 400 / math.log(10) * full


@pytest.mark.parametrize("anchor", [0, 2])
def test_bradley_terry_matches_irls_logistic_regression(anchor):
    models = ["a", "b", "c", "d"]
    triples = _simulate({"a": 1000, "b": 1080, "c": 950, "d": 1020}, 400, seed=3, tie_rate=0.15)
    ours = bt_ratings(win_counts(_votes(models, triples)), anchor=anchor, l2=0.0)
    ref = _irls_bradley_terry(models, triples, anchor=anchor)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_default_ridge_is_negligible_and_keeps_unbeaten_models_finite():
    models = ["a", "b", "c"]
    triples = _simulate({"a": 1000, "b": 1100, "c": 900}, 300, seed=4)
    wins = win_counts(_votes(models, triples))
    np.testing.assert_allclose(bt_ratings(wins), bt_ratings(wins, l2=0.0), atol=0.5)
    unbeaten = bt_ratings(win_counts(_votes(["a", "b"], [("a", "b", 1.0)] * 10)))
    assert np.isfinite(unbeaten).all() and unbeaten[0] - unbeaten[1] > 400


# ------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_intervals_contain_the_truth():
    truth = {"a": 1000.0, "b": 1100.0, "c": 950.0}
    v = _votes(list(truth), _simulate(truth, 1500, seed=7, tie_rate=0.1))
    r = compute_ratings(v, anchor=0, k=4, n_boot=300, seed=0)
    for i, name in enumerate(truth):
        assert r.bt_low[i] <= truth[name] <= r.bt_high[i], (name, r.bt_low[i], r.bt_high[i])
        assert r.bt_low[i] <= r.bt[i] <= r.bt_high[i]
    assert r.bt_low[0] == r.bt_high[0] == 1000.0  # the anchor is fixed
    assert abs(r.bt[1] - 1100) < 40 and abs(r.bt[2] - 950) < 40
    np.testing.assert_array_equal(r.rank, [2, 1, 3])  # 150-point gaps are resolved by 1,500 votes
    d = r.as_dict()
    assert [row["model"] for row in d["ratings"]] == ["b", "a", "c"] and d["order"] == ["a", "b", "c"]


def test_bootstrap_is_seeded():
    v = _votes(["a", "b"], _simulate({"a": 1000, "b": 1050}, 80, seed=2))
    r1, r2 = (compute_ratings(v, n_boot=50, seed=5) for _ in range(2))
    np.testing.assert_array_equal(r1.elo_low, r2.elo_low)
    np.testing.assert_array_equal(r1.bt_high, r2.bt_high)


def test_cluster_bootstrap_of_means():
    values = np.array([[10.0, 20.0], [30.0, np.nan], [np.nan, np.nan]])
    mean, lo, hi = cluster_bootstrap(values, n_boot=200)
    assert mean == pytest.approx(20.0)  # N/A left out: (10 + 20 + 30) / 3
    assert 10.0 <= lo <= mean <= hi <= 30.0
    assert cluster_bootstrap(np.full((2, 2), np.nan)) == (None, None, None)
    assert cluster_bootstrap(np.array([[5.0, 7.0]]), n_boot=100) == (6.0, 6.0, 6.0)
