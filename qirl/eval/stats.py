"""Bootstrap confidence intervals for benchmark means.

The bench scores S seeds of each of P prompts. Images of one prompt are not independent (the prompt's
difficulty is shared), so the interval resamples prompts, not images: a cluster (case) bootstrap
(Efron & Tibshirani 1993, ch. 6; Field & Welsh 2007 for clustered data). Each of B resamples draws P
prompts with replacement and takes the mean over all their valid images; the 95% interval is the
2.5 and 97.5 percentiles of those B means (the percentile interval). N/A entries (NaN) are left out of
both the mean and its resamples, as Qwen-Image-Bench leaves N/A items out.
"""

from __future__ import annotations

import numpy as np


def cluster_bootstrap(
    values: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high) of `values` [P, S] (rows are clusters, NaN = N/A); all None when no value.

    With `n_boot = 0` or a single cluster the interval is (mean, mean): there is nothing to resample.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]  # [P, 1]
    valid = ~np.isnan(values)  # [P, S]
    if not valid.any():
        return None, None, None
    sums = np.where(valid, values, 0.0).sum(1)  # [P]
    counts = valid.sum(1).astype(np.float64)  # [P]
    mean = float(sums.sum() / counts.sum())
    p = values.shape[0]
    if n_boot <= 0 or p < 2:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    # Multinomial draw counts: how often each prompt appears in each resample, [B, P].
    weights = rng.multinomial(p, np.full(p, 1.0 / p), size=n_boot).astype(np.float64)
    num, den = weights @ sums, weights @ counts  # [B], [B]
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = num / den  # [B]; NaN where a resample drew only N/A prompts
    alpha = (1.0 - level) / 2.0
    lo, hi = np.nanpercentile(boot, [100 * alpha, 100 * (1 - alpha)])
    return mean, float(lo), float(hi)
