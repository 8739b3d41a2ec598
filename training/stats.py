"""How sure is a number: seeded percentile bootstrap over records, paired when two models saw the same records.

A metric's per-record values are either one number per record (accuracy 0/1, exact match, F1,
ROUGE-L: the metric is their mean) or a `[summed token loss, tokens]` pair per record (perplexity:
exp of the total loss over the total tokens, so long records weigh by their tokens, as in the point
estimate). Resampling records keeps each record's tokens together. Two models scored on the same
records are resampled with the same indices (paired), so the interval of their difference is about
the models, not about which records happened to be drawn.
"""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 2000
LEVEL = 0.90  # the default confidence of intervals and of the gate's decisions


def _as_array(values: list) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def value(values: list) -> float:
    """The metric itself from its per-record values."""
    a = _as_array(values)
    if a.ndim == 2:
        return math.exp(min(a[:, 0].sum() / max(a[:, 1].sum(), 1.0), 50.0))
    return float(a.mean())


def _resampled(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The metric on each resample (rows of `idx`)."""
    if a.ndim == 2:
        return np.exp(np.minimum(a[idx, 0].sum(1) / np.maximum(a[idx, 1].sum(1), 1.0), 50.0))
    return a[idx].mean(1)


def _indices(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(RESAMPLES, n))


def _bounds(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def interval(values: list, level: float = LEVEL, seed: int = 0) -> tuple[float, float]:
    """Two-sided `level` percentile-bootstrap interval of the metric."""
    a = _as_array(values)
    if len(a) < 2:
        return (value(values), value(values)) if len(a) else (math.nan, math.nan)
    return _bounds(_resampled(a, _indices(len(a), seed)), level)


def paired(candidate: list, reference: list, ratio: bool, scale: float = 1.0, level: float = LEVEL,
           seed: int = 0) -> tuple[float, float, float]:
    """(point, low, high) of candidate − scale·reference, or with `ratio` of candidate / (scale·reference) − 1,
    over the same records resampled together. `scale` puts a relative target's factor inside the
    comparison (e.g. 1.2 for "20% above the base")."""
    a, b = _as_array(candidate), _as_array(reference)
    if len(a) != len(b):
        raise ValueError(f"paired: {len(a)} and {len(b)} records; a paired comparison needs the same records")

    def quantity(x, y):
        return x / (scale * y) - 1 if ratio else x - scale * y

    point = quantity(value(candidate), value(reference))
    if len(a) < 2:
        return point, point, point
    idx = _indices(len(a), seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = quantity(_resampled(a, idx), _resampled(b, idx))
    low, high = _bounds(samples, level)
    return float(point), low, high


def records_to_settle(n: int, low: float, high: float, margin: float) -> int | None:
    """Test records that would shrink the interval (width ~ 1/sqrt(n)) to within `margin` of its centre,
    i.e. decide a threshold that far from the estimate; None when the estimate sits on it."""
    half = (high - low) / 2
    if margin <= 0 or not math.isfinite(half):
        return None
    return max(n + 1, math.ceil(n * (half / margin) ** 2))


def half_width_for(n: int, p: float, level: float = LEVEL) -> float:
    """Normal-approximation half-width of a proportion's interval at `n` records (for planning, before any
    model is scored)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    return z * math.sqrt(max(p * (1 - p), 1e-9) / max(n, 1))
