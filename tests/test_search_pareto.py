"""search.pareto on hand-computed cases, plus properties that hold for any set of points."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from search.pareto import closest, front, hypervolume, nondominated_sort, pick, violation
from common.errors import ConfigError

# --------------------------------------------------------------------------- fronts

MIXED = [  # (metric: max, size: min)
    [0.90, 100],  # 0 front
    [0.80, 50],   # 1 front
    [0.85, 120],  # 2 dominated by 0
    [0.90, 100],  # 3 front: equal to 0, so neither dominates the other
    [0.70, 40],   # 4 front
    [0.60, 60],   # 5 dominated by 4
    [0.50, 130],  # 6 dominated by 2 and 5: third front
]

THREE = [  # (metric: max, size: min, latency: min)
    [0.90, 100, 10],  # 0 front
    [0.90, 100, 12],  # 1 dominated by 0 (slower)
    [0.80, 50, 20],   # 2 front
    [0.95, 200, 30],  # 3 front (best metric)
    [0.80, 60, 20],   # 4 dominated by 2 (bigger)
    [0.70, 40, 25],   # 5 front (smallest)
]


def test_front_two_objectives_min_min_with_duplicates():
    values = [[1, 5], [2, 2], [3, 3], [2, 2], [4, 1], [5, 5]]
    assert front(values, ["min", "min"]) == [0, 1, 3, 4]
    # the same points maximised: the worst corner wins
    assert front(values, ["max", "max"]) == [5]


def test_front_mixed_directions():
    assert front(MIXED, ["max", "min"]) == [0, 1, 3, 4]
    assert front(np.array(MIXED), ("max", "min")) == [0, 1, 3, 4]  # arrays and tuples too


def test_front_three_objectives():
    assert front(THREE, ["max", "min", "min"]) == [0, 2, 3, 5]


def test_nondominated_sort_hand_cases():
    assert nondominated_sort(MIXED, ["max", "min"]) == [[0, 1, 3, 4], [2, 5], [6]]
    assert nondominated_sort(THREE, ["max", "min", "min"]) == [[0, 2, 3, 5], [1, 4]]
    assert nondominated_sort([], ["min", "min"]) == []
    assert front([], ["min", "min"]) == []


@pytest.mark.parametrize("values, directions, match", [
    ([[1, 2]], ["min", "smallest"], "directions"),
    ([[1, 2]], [], "directions"),
    ([[1, 2, 3]], ["min", "min"], "rows of 2 numbers"),
    ([[1, float("nan")]], ["min", "min"], "row 0 has a NaN"),
    ([["a", 1]], ["min", "min"], "rows of numbers"),
])
def test_front_rejects_bad_input(values, directions, match):
    with pytest.raises(ConfigError, match=match):
        front(values, directions)


# --------------------------------------------------------------------------- hypervolume

def test_hypervolume_two_objectives_by_hand():
    # boxes [1,4]x[3,4] (3) and [2,4]x[1,4] (6) overlap in [2,4]x[3,4] (2): 3 + 6 - 2
    assert hypervolume([[1, 3], [2, 1]], ["min", "min"], [4, 4]) == pytest.approx(7.0)
    # metric max / size min, reference (metric 0, size 4): 0.9*2 + 0.5*3 - 0.5*2
    assert hypervolume([[0.9, 2], [0.5, 1]], ["max", "min"], [0, 4]) == pytest.approx(2.3)


def test_points_not_beating_the_reference_add_nothing():
    base = hypervolume([[0.9, 2], [0.5, 1]], ["max", "min"], [0, 4])
    extra = [[0.5, 5], [-0.1, 1], [0.0, 1], [0.95, 4]]  # too big, worse metric, on the reference, on it again
    assert hypervolume([[0.9, 2], [0.5, 1], *extra], ["max", "min"], [0, 4]) == pytest.approx(base)
    assert hypervolume(extra, ["max", "min"], [0, 4]) == 0.0
    assert hypervolume([], ["min", "min"], [1, 1]) == 0.0


def test_hypervolume_three_objectives_by_hand():
    assert hypervolume([[1, 1, 1]], ["min"] * 3, [3, 3, 3]) == pytest.approx(8.0)
    # [0,2]^2x[1,2] (4) and [1,2]^2x[0,2] (2) overlap in [1,2]^3 (1)
    two = [[0, 0, 1], [1, 1, 0]]
    assert hypervolume(two, ["min"] * 3, [2, 2, 2]) == pytest.approx(5.0)
    # the third box [0,2]x[1,2]x[0,2] (4) swallows the second; it meets the first in 2
    assert hypervolume(two + [[0, 1, 0]], ["min"] * 3, [2, 2, 2]) == pytest.approx(6.0)
    # the first objective maximised: mirror it
    assert hypervolume([[0, 0, 1], [-1, 1, 0]], ["max", "min", "min"], [-2, 2, 2]) == pytest.approx(5.0)


@pytest.mark.parametrize("directions, reference", [(["min"], [1]), (["min"] * 4, [1] * 4)])
def test_hypervolume_other_dimensions_are_config_errors(directions, reference):
    with pytest.raises(ConfigError, match="exact only for 2 or 3 objectives"):
        hypervolume([[0] * len(directions)], directions, reference)


def test_hypervolume_reference_checks_and_infinity():
    with pytest.raises(ConfigError, match="reference: must be 2 numbers"):
        hypervolume([[0, 0]], ["min", "min"], [1, 1, 1])
    with pytest.raises(ConfigError, match="reference"):
        hypervolume([[0, 0]], ["min", "min"], [1, float("nan")])
    inf = float("inf")
    assert hypervolume([[0, 0]], ["min", "min"], [1, inf]) == inf
    assert hypervolume([[0.9, 0]], ["max", "min"], [-inf, 1]) == inf
    assert hypervolume([[0, 0]], ["min", "min"], [1, -inf]) == 0.0  # nothing beats it
    assert hypervolume([[0, 2, 0]], ["min"] * 3, [1, 1, inf]) == 0.0  # 2 does not beat 1


def _inclusion_exclusion(points, directions, reference) -> float:
    """Brute force: the union of boxes [p, ref] by inclusion-exclusion (exponential, fine for ≤ 6 points)."""
    sign = np.where(np.array(directions) == "max", -1.0, 1.0)
    ref = np.array(reference, float) * sign
    boxes = [np.array(p, float) * sign for p in points]
    boxes = [b for b in boxes if (b < ref).all()]
    total = 0.0
    for k in range(1, len(boxes) + 1):
        for subset in itertools.combinations(boxes, k):
            corner = np.max(subset, axis=0)
            total += (-1) ** (k + 1) * np.prod(ref - corner)
    return total


_COORD = st.integers(0, 6)  # small integers: ties, duplicates and points on the reference are common


def _points(m: int, max_size: int):
    return st.lists(st.lists(_COORD, min_size=m, max_size=m), max_size=max_size)


_DIRS = st.integers(2, 3).flatmap(lambda m: st.tuples(st.lists(st.sampled_from(["max", "min"]), min_size=m,
                                                                max_size=m), st.just(m)))


@settings(max_examples=150, deadline=None)
@given(_DIRS.flatmap(lambda dm: st.tuples(st.just(dm[0]), _points(dm[1], 6), st.lists(_COORD, min_size=dm[1],
                                                                                     max_size=dm[1]))))
def test_hypervolume_matches_inclusion_exclusion(case):
    directions, points, reference = case
    assert hypervolume(points, directions, reference) == pytest.approx(
        _inclusion_exclusion(points, directions, reference), abs=1e-9)


@settings(max_examples=150, deadline=None)
@given(_DIRS.flatmap(lambda dm: st.tuples(st.just(dm[0]), _points(dm[1], 12),
                                          st.lists(_COORD, min_size=dm[1], max_size=dm[1]),
                                          st.lists(_COORD, min_size=dm[1], max_size=dm[1]))))
def test_hypervolume_never_shrinks_when_a_point_is_added(case):
    directions, points, new, reference = case
    before = hypervolume(points, directions, reference)
    after = hypervolume(points + [new], directions, reference)
    assert after >= before - 1e-9
    # and only the front matters
    assert hypervolume([points[i] for i in front(points, directions)], directions, reference) == \
        pytest.approx(before)


def _dominates(a, b, directions) -> bool:
    better = [(x > y) if d == "max" else (x < y) for x, y, d in zip(a, b, directions)]
    worse = [(x < y) if d == "max" else (x > y) for x, y, d in zip(a, b, directions)]
    return any(better) and not any(worse)


@settings(max_examples=150, deadline=None)
@given(_DIRS.flatmap(lambda dm: st.tuples(st.just(dm[0]), _points(dm[1], 15))))
def test_front_is_exactly_the_undominated_points(case):
    directions, points = case
    on_front = front(points, directions)
    for i, p in enumerate(points):
        dominated = any(_dominates(q, p, directions) for q in points)
        assert (i in on_front) == (not dominated)
    fronts = nondominated_sort(points, directions)
    assert sorted(i for f in fronts for i in f) == list(range(len(points)))
    assert (fronts[0] if fronts else []) == on_front
    for earlier, later in zip(fronts, fronts[1:]):  # each later point is dominated by an earlier one
        assert all(any(_dominates(points[i], points[j], directions) for i in earlier) for j in later)


# --------------------------------------------------------------------------- constrained pick

ROWS = [
    {"name": "a", "metric": 0.90, "metric_drop": 0.01, "size_bytes": 100, "latency_ms_b1": 5.0},
    {"name": "b", "metric": 0.88, "metric_drop": 0.03, "size_bytes": 60, "latency_ms_b1": 3.0},
    {"name": "c", "metric": 0.91, "metric_drop": 0.00, "size_bytes": 200, "latency_ms_b1": 5.0},
    {"name": "d", "metric": 0.91, "metric_drop": 0.00, "size_bytes": 150, "latency_ms_b1": 5.0},
    {"name": "e", "metric": 0.80, "metric_drop": 0.11, "size_bytes": 30, "latency_ms_b1": 1.0},
    {"name": "f", "metric": 0.95, "metric_drop": 0.00, "size_bytes": 10},  # latency never measured
]


def _names(rows) -> list[str]:
    return [r["name"] for r in rows]


def test_pick_lowest_latency_within_limits():
    assert pick(ROWS)["name"] == "e"  # default: any drop up to 1.0
    assert pick(ROWS, max_metric_drop=0.05, max_size_bytes=100)["name"] == "b"
    assert pick(ROWS, max_metric_drop=0.05, max_latency_ms=2) is None
    assert pick([], max_metric_drop=0.05) is None


def test_pick_breaks_ties_by_metric_then_size():
    # a, c and d all take 5 ms; c and d have the better metric; d is smaller
    assert pick(ROWS, max_metric_drop=0.02)["name"] == "d"
    assert pick(ROWS, max_metric_drop=0.02, minimize="size_bytes")["name"] == "f"
    assert pick(ROWS[:5], max_metric_drop=0.02, minimize="size_bytes")["name"] == "a"


def test_violation_is_relative_overshoot():
    limits = dict(max_metric_drop=0.05, max_latency_ms=2)
    assert violation(ROWS[1], **limits) == pytest.approx(0.5)  # 3 ms against 2
    assert violation(ROWS[4], **limits) == pytest.approx(1.2)  # drop 0.11 against 0.05
    assert violation(ROWS[5], **limits) == math.inf
    assert violation(ROWS[1], max_metric_drop=0.05) == 0.0
    assert violation(ROWS[0], max_metric_drop=0.0) == pytest.approx(0.01)  # a zero limit counts absolutely
    assert violation({"metric_drop": float("nan")}, max_metric_drop=0.1) == math.inf


def test_closest_orders_by_violation_then_like_pick():
    limits = dict(max_metric_drop=0.05, max_latency_ms=2)
    # b 0.5, e 1.2, then a/c/d at 1.5 (d before c by size, a last by metric), f last (no latency)
    assert _names(closest(ROWS, **limits)) == ["b", "e", "d"]
    assert _names(closest(ROWS, **limits, n=10)) == ["b", "e", "d", "c", "a", "f"]
    assert closest([], **limits) == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(minimize="latency"), "minimize: must be one of"),
    (dict(max_size_bytes="1MB"), "limit on size_bytes"),
])
def test_pick_and_closest_reject_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        pick(ROWS, **kwargs)
    with pytest.raises(ConfigError, match=match):
        closest(ROWS, **kwargs)
    with pytest.raises(ConfigError, match="n: must be an integer"):
        closest(ROWS, n=0)
