"""Ratings from pairwise votes: online Elo, Bradley-Terry maximum likelihood, bootstrap intervals, ranks.

A vote is (model a, model b, outcome) with outcome 1 (a wins), 0 (b wins) or 0.5 (tie).

Online Elo (Elo 1978, "The Rating of Chessplayers"): every model starts at `init`; votes are taken in
order and each moves both ratings by

    E_a = 1 / (1 + 10^((R_b - R_a) / scale)),   R_a += K (S_a - E_a),   R_b -= K (S_a - E_a)

with scale 400. The result depends on the order of the votes.

Bradley-Terry (Bradley & Terry 1952), fitted as Chatbot Arena does (Chiang et al. 2024, "Chatbot
Arena", sec. 5): P(a beats b) = 1 / (1 + 10^((R_b - R_a) / 400)), i.e. a logistic model in
beta = R ln(10) / 400, fitted by maximum likelihood with a tie counted as half a win for each side.
We maximise

    L(beta) = sum_{i != j} w_ij log sigmoid(beta_i - beta_j) - (l2 / 2) ||beta||^2

(w_ij = wins of i over j plus half their ties) by Newton's method, then report
R = anchor_rating + (400 / ln 10) (beta - beta_anchor). The small ridge `l2` keeps ratings finite when a
model won (or lost) every vote, where the unpenalised maximum is at infinity; with `l2 = 0` this is
plain logistic regression without intercept, as Chatbot Arena's `compute_mle_elo`.

Intervals (Chatbot Arena's bootstrap): resample the votes with replacement B times (for online Elo in
a fresh random order each time), refit, and take the 2.5 and 97.5 percentiles. Rank (Chatbot Arena's
"rank (UB)"): 1 + the number of models whose lower bound exceeds this model's upper bound, so models
whose intervals overlap share a rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SCALE = 400.0
INIT = 1000.0
LN10 = math.log(10.0)


@dataclass(frozen=True)
class VoteArrays:
    """Votes as index arrays over `models`: a [N], b [N] (model indices), s [N] (1, 0.5 or 0 for a)."""

    models: tuple[str, ...]
    a: np.ndarray
    b: np.ndarray
    s: np.ndarray

    @classmethod
    def build(cls, models: Sequence[str], triples: Sequence[tuple[str, str, float]]) -> VoteArrays:
        index = {m: i for i, m in enumerate(models)}
        a = np.array([index[t[0]] for t in triples], dtype=np.int64)
        b = np.array([index[t[1]] for t in triples], dtype=np.int64)
        s = np.array([float(t[2]) for t in triples], dtype=np.float64)
        return cls(tuple(models), a, b, s)

    def __len__(self) -> int:
        return int(self.a.shape[0])


def expected_score(r_a: float | np.ndarray, r_b: float | np.ndarray, scale: float = SCALE) -> np.ndarray:
    """Elo's expected score of a against b: 1 / (1 + 10^((R_b - R_a) / scale))."""
    return 1.0 / (1.0 + np.power(10.0, (np.asarray(r_b) - np.asarray(r_a)) / scale))


def elo_gap(win_rate: float, scale: float = SCALE) -> float:
    """Rating gap that predicts `win_rate`: scale log10(p / (1 - p)); 0.61 -> +77.7."""
    return scale * math.log10(win_rate / (1.0 - win_rate))


def online_elo(
    votes: VoteArrays, k: float = 16.0, scale: float = SCALE, init: float = INIT, order: np.ndarray | None = None
) -> np.ndarray:
    """Online Elo ratings [M] after the votes in `order` (default: as given). See the module docstring."""
    r = np.full(len(votes.models), init)
    idx = np.arange(len(votes)) if order is None else order
    for i in idx:
        a, b = votes.a[i], votes.b[i]
        delta = k * (votes.s[i] - 1.0 / (1.0 + 10.0 ** ((r[b] - r[a]) / scale)))
        r[a] += delta
        r[b] -= delta
    return r


def online_elo_batch(
    votes: VoteArrays, orders: np.ndarray, k: float = 16.0, scale: float = SCALE, init: float = INIT
) -> np.ndarray:
    """Online Elo for R vote sequences at once: `orders` [R, N] (vote indices) -> ratings [R, M].

    One pass over the N positions, vectorised over the R sequences (each bootstrap resample is one),
    so a 1,000-resample bootstrap costs N numpy steps, not 1,000 N Python ones.
    """
    n_runs = orders.shape[0]
    r = np.full((n_runs, len(votes.models)), init)  # [R, M]
    rows = np.arange(n_runs)
    for pos in range(orders.shape[1]):
        v = orders[:, pos]  # [R]
        a, b, s = votes.a[v], votes.b[v], votes.s[v]  # [R] each
        delta = k * (s - 1.0 / (1.0 + 10.0 ** ((r[rows, b] - r[rows, a]) / scale)))  # [R]
        r[rows, a] += delta  # a != b within a vote, so the two scatters never collide
        r[rows, b] -= delta
    return r


def win_counts(votes: VoteArrays, weights: np.ndarray | None = None) -> np.ndarray:
    """W [M, M]: W[i, j] = (weighted) wins of i over j, a tie counting 1/2 to each side."""
    m = len(votes.models)
    w = np.ones(len(votes)) if weights is None else weights  # [N]
    out = np.zeros((m, m))
    np.add.at(out, (votes.a, votes.b), w * votes.s)
    np.add.at(out, (votes.b, votes.a), w * (1.0 - votes.s))
    return out


def bt_fit(wins: np.ndarray, l2: float = 1e-3, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    """Bradley-Terry log-strengths beta [M] (natural units) maximising the penalised likelihood.

    `wins` [M, M] from `win_counts`. Newton's method on the concave objective of the module docstring:
    gradient g_i = sum_j (W_ij - n_ij p_ij) - l2 beta_i, Hessian H = -L(n p (1 - p)) - l2 I, with
    n_ij = W_ij + W_ji and p_ij = sigmoid(beta_i - beta_j). With `l2 = 0` the likelihood is flat
    along beta + c, and the pseudo-inverse keeps the minimum-norm (sum-zero) solution.
    """
    m = wins.shape[0]
    n = wins + wins.T  # [M, M]
    beta = np.zeros(m)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(beta[:, None] - beta[None, :])))  # [M, M]
        g = (wins - n * p).sum(1) - l2 * beta  # [M]
        c = n * p * (1.0 - p)  # [M, M]: curvature of each pair
        h = c - np.diag(c.sum(1)) - l2 * np.eye(m)  # [M, M], negative semi-definite
        step = np.linalg.lstsq(h, g, rcond=None)[0] if l2 == 0 else np.linalg.solve(h, g)
        beta = beta - step
        if np.abs(step).max() < tol:
            break
    return beta


def bt_ratings(
    wins: np.ndarray, anchor: int = 0, anchor_rating: float = INIT, scale: float = SCALE, l2: float = 1e-3
) -> np.ndarray:
    """Bradley-Terry ratings [M] on the Elo scale, model `anchor` fixed at `anchor_rating`."""
    beta = bt_fit(wins, l2=l2)
    return anchor_rating + scale / LN10 * (beta - beta[anchor])


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(low [M], high [M]) percentile interval of bootstrap samples [B, M]."""
    alpha = (1.0 - level) / 2.0
    return np.percentile(samples, 100 * alpha, axis=0), np.percentile(samples, 100 * (1 - alpha), axis=0)


def ranks_from_intervals(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Chatbot Arena rank [M]: 1 + the number of models statistically better (low_j > high_i)."""
    return 1 + (low[None, :] > high[:, None]).sum(1)


def win_rate_matrix(votes: VoteArrays) -> tuple[np.ndarray, np.ndarray]:
    """(win rate [M, M] of row over column with ties as 1/2, NaN where no vote; vote counts [M, M])."""
    wins = win_counts(votes)
    n = wins + wins.T
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(n > 0, wins / n, np.nan)
    return rate, n


@dataclass(frozen=True)
class Ratings:
    """Point ratings, 95% intervals and ranks for both methods, plus the win-rate table."""

    models: tuple[str, ...]
    elo: np.ndarray
    elo_low: np.ndarray
    elo_high: np.ndarray
    bt: np.ndarray
    bt_low: np.ndarray
    bt_high: np.ndarray
    rank: np.ndarray  # from the Bradley-Terry intervals
    win_rate: np.ndarray
    n_votes: np.ndarray

    def as_dict(self) -> dict:
        """JSON-ready: one row per model (sorted by Bradley-Terry rating) and the matrices."""
        rows = []
        for i in np.argsort(-self.bt, kind="stable"):
            rows.append({
                "model": self.models[i],
                "rank": int(self.rank[i]),
                "bt": round(float(self.bt[i]), 1),
                "bt_ci": [round(float(self.bt_low[i]), 1), round(float(self.bt_high[i]), 1)],
                "elo": round(float(self.elo[i]), 1),
                "elo_ci": [round(float(self.elo_low[i]), 1), round(float(self.elo_high[i]), 1)],
                "votes": int(self.n_votes[i].sum()),
            })

        def table(x: np.ndarray, digits: int) -> list[list[float | None]]:
            return [[None if math.isnan(v) else round(float(v), digits) for v in row] for row in x]

        return {
            "order": list(self.models),  # the row / column order of the matrices
            "ratings": rows,
            "win_rate": table(self.win_rate, 4),
            "votes_matrix": table(self.n_votes, 1),
        }


def compute_ratings(
    votes: VoteArrays,
    anchor: int = 0,
    anchor_rating: float = INIT,
    k: float = 16.0,
    n_boot: int = 1000,
    seed: int = 0,
    l2: float = 1e-3,
    level: float = 0.95,
) -> Ratings:
    """Elo (votes in stored order) and Bradley-Terry ratings with bootstrap intervals and ranks.

    Both are shifted so that model `anchor` has `anchor_rating` (Elo too, so the two read alike).
    Every resample draws N votes with replacement (rng.integers over the N votes), reshuffled, for
    online Elo; Bradley-Terry needs only the resample's multiplicities.
    """
    if len(votes) == 0:
        raise ValueError("no votes to rate")
    m = len(votes.models)
    elo = online_elo(votes, k=k)
    elo = elo - elo[anchor] + anchor_rating
    bt = bt_ratings(win_counts(votes), anchor, anchor_rating, l2=l2)
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        orders = rng.integers(0, len(votes), size=(n_boot, len(votes)))  # [B, N]: resampled, random order
        elo_b = online_elo_batch(votes, orders, k=k)  # [B, M]
        elo_b = elo_b - elo_b[:, [anchor]] + anchor_rating
        bt_b = np.empty((n_boot, m))
        for r in range(n_boot):
            mult = np.bincount(orders[r], minlength=len(votes)).astype(np.float64)  # [N]
            bt_b[r] = bt_ratings(win_counts(votes, mult), anchor, anchor_rating, l2=l2)
        elo_lo, elo_hi = percentile_interval(elo_b, level)
        bt_lo, bt_hi = percentile_interval(bt_b, level)
    else:
        elo_lo, elo_hi, bt_lo, bt_hi = elo, elo, bt, bt
    rate, n = win_rate_matrix(votes)
    return Ratings(votes.models, elo, elo_lo, elo_hi, bt, bt_lo, bt_hi, ranks_from_intervals(bt_lo, bt_hi), rate, n)
