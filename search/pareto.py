"""Pareto fronts, hypervolume and the constrained pick: pure functions of plain lists / NumPy arrays.

``values`` is one row per trial and one column per objective; ``directions`` says per column
whether bigger ("max") or smaller ("min") is better. Internally every column is turned into a
minimisation by negating the "max" ones.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from search.objectives import DIRECTIONS, OBJECTIVES
from common.errors import ConfigError

__all__ = ["front", "nondominated_sort", "front_index", "dominated_by", "crowding_distance", "ranks", "hypervolume",
           "violation", "pick", "closest"]


def _as_min(values, directions) -> np.ndarray:
    """``values`` as an ``(n, m)`` float array to minimise; ConfigError on a shape or direction problem."""
    directions = list(directions)
    bad = [d for d in directions if d not in DIRECTIONS]
    if not directions or bad:
        raise ConfigError(f"directions: must be a non-empty list of max|min, got {directions!r}")
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise ConfigError("values: must be a list of rows of numbers, one number per objective") from None
    if arr.size == 0:
        return arr.reshape(0, len(directions))
    if arr.ndim != 2 or arr.shape[1] != len(directions):
        raise ConfigError(f"values: must be rows of {len(directions)} numbers (one per direction), "
                          f"got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ConfigError(f"values: row {int(np.isnan(arr).any(1).argmax())} has a NaN; drop failed trials first")
    return arr * np.where(np.array(directions) == "max", -1.0, 1.0)


def _dominates(a: np.ndarray) -> np.ndarray:
    """``D[i, j]``: row i dominates row j (no worse anywhere, better somewhere). O(n²) memory: one column at a
    time, which is ten times faster than an (n, n, m) comparison at a thousand rows."""
    n = len(a)
    no_worse, better = np.ones((n, n), dtype=bool), np.zeros((n, n), dtype=bool)
    for col in a.T:
        no_worse &= col[:, None] <= col[None, :]
        better |= col[:, None] < col[None, :]
    return no_worse & better


def front(values, directions) -> list[int]:
    """Indices (ascending) of the rows no other row dominates; equal rows are all kept.

    >>> front([[1, 5], [2, 2], [3, 3], [2, 2]], ["min", "min"])
    [0, 1, 3]
    """
    a = _as_min(values, directions)
    if not len(a):
        return []
    return np.flatnonzero(~_dominates(a).any(0)).tolist()


def nondominated_sort(values, directions) -> list[list[int]]:
    """Successive fronts: the Pareto front, then the front of what is left, and so on (Deb et al. 2002)."""
    a = _as_min(values, directions)
    dom = _dominates(a)
    dominators = dom.sum(0)
    done = np.zeros(len(a), dtype=bool)
    fronts = []
    while not done.all():
        current = np.flatnonzero((dominators == 0) & ~done)
        fronts.append(current.tolist())
        done[current] = True
        dominators = dominators - dom[current].sum(0)
    return fronts


def front_index(values, directions) -> list[int]:
    """Per row, which front of :func:`nondominated_sort` it sits on (0: the Pareto front).

    >>> front_index([[1, 5], [2, 2], [3, 3]], ["min", "min"])
    [0, 0, 1]
    """
    out = [0] * len(_as_min(values, directions))
    for k, members in enumerate(nondominated_sort(values, directions)):
        for i in members:
            out[i] = k
    return out


def dominated_by(values, directions, i: int) -> int:
    """How many rows dominate row ``i``: 0 exactly when it is on the Pareto front. O(n m), no sort.

    >>> dominated_by([[1, 5], [2, 2], [3, 3]], ["min", "min"], 2)
    1
    """
    a = _as_min(values, directions)
    x = a[i]
    return int(((a <= x).all(1) & (a < x).any(1)).sum())


def crowding_distance(values, directions) -> list[float]:
    """NSGA-II crowding distance of each row within the given rows (Deb et al. 2002): per objective, the gap
    between its neighbours over that objective's range, summed; a row at either end of an objective gets inf.

    Neighbours are the next *distinct* values, so tied rows get equal distances and the result depends only on
    the set of rows, never on their order (the usual sort-based version hands the end slot to whichever tied
    row sorts first). An objective on which every row is equal is skipped. Values must be finite.

    >>> crowding_distance([[1, 4], [2, 2], [4, 1]], ["min", "min"])
    [inf, 2.0, inf]
    """
    a = _as_min(values, directions)
    if not np.isfinite(a).all():
        raise ConfigError("values: crowding distance needs finite numbers; drop rows with inf first")
    dist = np.zeros(len(a))
    for col in a.T:
        levels = np.unique(col)  # sorted, distinct
        if len(levels) < 2:
            continue
        pos = np.searchsorted(levels, col)
        ends = (pos == 0) | (pos == len(levels) - 1)
        inner = ~ends
        dist[inner] += (levels[pos[inner] + 1] - levels[pos[inner] - 1]) / (levels[-1] - levels[0])
        dist[ends] = math.inf
    return dist.tolist()


def ranks(values, directions) -> list[int]:
    """Each row's own rank among ``values`` (0 is best): fronts first, then larger crowding distance within a
    front. A row's rank is the number of rows strictly ahead of it, so tied rows share a rank and the ranks do
    not depend on the order of the rows.

    >>> ranks([[3, 3], [1, 4], [2, 2], [4, 1]], ["min", "min"])
    [3, 0, 2, 0]
    """
    f = np.asarray(front_index(values, directions), dtype=int)
    a = _as_min(values, directions)
    crowd = np.zeros(len(a))
    for k in np.unique(f):
        members = np.flatnonzero(f == k)
        crowd[members] = crowding_distance(a[members], ["min"] * a.shape[1])
    ahead = (f[None, :] < f[:, None]) | ((f[None, :] == f[:, None]) & (crowd[None, :] > crowd[:, None]))
    return ahead.sum(1).tolist()


def _hv2(a: np.ndarray, ref: np.ndarray) -> float:
    """Area dominated by 2-D minimisation points that all beat ``ref``: sweep by x, add each new step."""
    area, best_y = 0.0, ref[1]
    for x, y in a[np.lexsort((a[:, 1], a[:, 0]))]:
        if y < best_y:
            area += (ref[0] - x) * (best_y - y)
            best_y = y
    return area


def hypervolume(points, directions, reference) -> float:
    """Volume of objective space dominated by ``points`` and bounded by ``reference``, exact for 2 and 3
    objectives (3-D: a 2-D sweep per slab between successive z values). Points that do not strictly
    beat the reference in every objective add nothing; an infinite reference that some point beats gives inf.

    >>> hypervolume([[1, 3], [2, 1]], ["min", "min"], [4, 4])
    7.0
    """
    directions = list(directions)
    m = len(directions)
    if m not in (2, 3):
        raise ConfigError(f"hypervolume: exact only for 2 or 3 objectives, got {m}")
    try:
        ref = np.asarray(reference, dtype=float)
    except (TypeError, ValueError):
        ref = np.array([np.nan])
    if ref.shape != (m,) or np.isnan(ref).any():
        raise ConfigError(f"reference: must be {m} numbers (one per direction), got {reference!r}")
    ref = _as_min([ref], directions)[0]
    a = _as_min(points, directions)
    a = a[(a < ref).all(1)]
    if not len(a):
        return 0.0
    if np.isinf(ref).any():  # a point beating an unbounded reference dominates an unbounded volume
        return math.inf
    if m == 2:
        return float(_hv2(a, ref))
    zs = np.unique(a[:, 2])
    tops = np.append(zs[1:], ref[2])
    return float(sum(_hv2(a[a[:, 2] <= z][:, :2], ref[:2]) * (top - z) for z, top in zip(zs, tops)))


# --------------------------------------------------------------------------- constrained pick

def _number(value) -> float | None:
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value):
        return float(value)
    return None


def _limits(max_metric_drop, max_size_bytes, max_latency_ms) -> list:
    limits = [("metric_drop", max_metric_drop), ("size_bytes", max_size_bytes), ("latency_ms_b1", max_latency_ms)]
    for key, limit in limits:
        if limit is not None and _number(limit) is None:
            raise ConfigError(f"limit on {key}: must be a number or None, got {limit!r}")
    return [(key, float(limit)) for key, limit in limits if limit is not None]


def violation(row: dict, *, max_metric_drop=1.0, max_size_bytes=None, max_latency_ms=None) -> float:
    """How far ``row`` misses the limits: the sum of each overshoot relative to its limit (0 when it
    meets them all; ``inf`` when a limited value is missing). ``max_latency_ms`` limits ``latency_ms_b1``."""
    total = 0.0
    for key, limit in _limits(max_metric_drop, max_size_bytes, max_latency_ms):
        value = _number(row.get(key))
        if value is None:
            return math.inf
        # relative, so 10% over on size weighs like 10% over on latency; a zero limit counts absolutely
        total += max(0.0, value - limit) / (abs(limit) or 1.0)
    return total


def _rank(row: dict, minimize: str) -> tuple:
    """Sort key: lowest ``minimize``, then highest metric, then smallest size; missing values last."""
    target, metric, size = (_number(row.get(k)) for k in (minimize, "metric", "size_bytes"))
    return (math.inf if target is None else target, math.inf if metric is None else -metric,
            math.inf if size is None else size)


def _check_minimize(minimize) -> None:
    if minimize not in OBJECTIVES:
        raise ConfigError(f"minimize: must be one of {', '.join(OBJECTIVES)}, got {minimize!r}")


def pick(rows, *, max_metric_drop=1.0, max_size_bytes=None, max_latency_ms=None, minimize="latency_ms_b1"):
    """The row meeting every limit with the lowest ``minimize`` (ties: higher metric, then smaller size),
    or ``None`` when no row qualifies (then :func:`closest` says which came nearest)."""
    _check_minimize(minimize)
    limits = dict(max_metric_drop=max_metric_drop, max_size_bytes=max_size_bytes, max_latency_ms=max_latency_ms)
    feasible = [r for r in rows if violation(r, **limits) == 0 and _number(r.get(minimize)) is not None]
    return min(feasible, key=lambda r: _rank(r, minimize), default=None)


def closest(rows, *, max_metric_drop=1.0, max_size_bytes=None, max_latency_ms=None, minimize="latency_ms_b1",
            n: int = 3) -> list:
    """The ``n`` rows with the smallest :func:`violation` (feasible ones first, at 0), ties as in :func:`pick`."""
    _check_minimize(minimize)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"n: must be an integer ≥ 1, got {n!r}")
    limits = dict(max_metric_drop=max_metric_drop, max_size_bytes=max_size_bytes, max_latency_ms=max_latency_ms)
    return sorted(rows, key=lambda r: (violation(r, **limits), _rank(r, minimize)))[:n]
