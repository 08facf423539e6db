"""Search: the space, the searcher/scheduler factory, and Pareto decisions (pure, no torch, no DB).

Submodules load on first use, so ``import search`` pulls in neither Ray nor Optuna nor NumPy.
"""
import importlib

__all__ = [
    "SearchSpace", "Fixed", "Choice", "Range", "build", "optuna_space", "to_trial_config", "trial_config",
    "SearchSettings", "make", "param_space_for", "OBJECTIVES", "Objective", "Objectives",
    "front", "nondominated_sort", "front_index", "dominated_by", "crowding_distance", "ranks", "hypervolume",
    "violation", "pick", "closest",
]

_HOME = {
    **dict.fromkeys(["SearchSpace", "Fixed", "Choice", "Range"], "search.space"),
    **dict.fromkeys(["build", "optuna_space", "to_trial_config", "trial_config"], "search.adapters"),
    **dict.fromkeys(["SearchSettings", "make", "param_space_for"], "search.algorithms"),
    **dict.fromkeys(["OBJECTIVES", "Objective", "Objectives"], "search.objectives"),
    **dict.fromkeys(["front", "nondominated_sort", "front_index", "dominated_by", "crowding_distance", "ranks",
                     "hypervolume", "violation", "pick", "closest"], "search.pareto"),
}


def __getattr__(name):
    if name not in _HOME:
        raise AttributeError(f"module 'search' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)


def __dir__():
    return sorted(set(globals()) | set(__all__))
