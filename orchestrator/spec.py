"""The job spec: YAML in, frozen dataclasses out, every problem reported at once (one line each)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from workers.configs import DistillConfig, TrainConfig
from workers.data import TaskConfig
from common.errors import ConfigError, SpecError

__all__ = ["JobSpec", "Objective", "Constraints", "Budget", "Resources", "LatencySettings", "Storage",
           "load", "parse", "KNOWN_OBJECTIVES"]

KNOWN_OBJECTIVES = ("metric", "metric_drop", "size_bytes", "params", "latency_ms_b1", "latency_ms_b32",
                    "train_seconds")


@dataclass(frozen=True)
class Objective:
    name: str
    mode: str  # max | min


@dataclass(frozen=True)
class Constraints:
    """What promotion requires of a model (and what the search's 'best' means)."""

    max_metric_drop: float = 1.0
    max_size_mb: float | None = None
    max_latency_ms: float | None = None

    def __post_init__(self):
        if not isinstance(self.max_metric_drop, (int, float)) or self.max_metric_drop < 0:
            raise ConfigError(f"constraints.max_metric_drop: must be a number ≥ 0, got {self.max_metric_drop!r}")
        for name in ("max_size_mb", "max_latency_ms"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or v <= 0):
                raise ConfigError(f"constraints.{name}: must be a number > 0 or null, got {v!r}")


@dataclass(frozen=True)
class Budget:
    num_trials: int = 8
    max_concurrent: int = 1
    time_budget_s: float | None = None
    max_failures: int = 1  # retries of a crashed trial (from its last checkpoint)

    def __post_init__(self):
        for name in ("num_trials", "max_concurrent"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"budget.{name}: must be an integer ≥ 1, got {v!r}")
        if self.time_budget_s is not None and (not isinstance(self.time_budget_s, (int, float))
                                               or self.time_budget_s <= 0):
            raise ConfigError(f"budget.time_budget_s: must be a number > 0 or null, got {self.time_budget_s!r}")
        if not isinstance(self.max_failures, int) or self.max_failures < 0:
            raise ConfigError(f"budget.max_failures: must be an integer ≥ 0, got {self.max_failures!r}")


@dataclass(frozen=True)
class Resources:
    """Per trial. workers > 1 or gpus > 0 runs the trial on a Ray Train TorchTrainer; else in-process."""

    cpus: float = 1
    gpus: float = 0
    workers: int = 1

    def __post_init__(self):
        if not isinstance(self.cpus, (int, float)) or self.cpus <= 0:
            raise ConfigError(f"resources.cpus: must be a number > 0, got {self.cpus!r}")
        if not isinstance(self.gpus, (int, float)) or self.gpus < 0:
            raise ConfigError(f"resources.gpus: must be a number ≥ 0, got {self.gpus!r}")
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 1:
            raise ConfigError(f"resources.workers: must be an integer ≥ 1, got {self.workers!r}")

    @property
    def distributed(self) -> bool:
        return self.workers > 1 or self.gpus > 0


@dataclass(frozen=True)
class LatencySettings:
    threads: int = 1
    runs: int = 20
    seq_len: int | None = None  # default: task.max_length

    def __post_init__(self):
        for name in ("threads", "runs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"latency.{name}: must be an integer ≥ 1, got {v!r}")
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or not 1 <= self.seq_len <= 512):
            raise ConfigError(f"latency.seq_len: must be an integer in [1, 512], got {self.seq_len!r}")


@dataclass(frozen=True)
class Storage:
    db_url: str | None = None  # default: SLIMRAY_DB_URL, else SQLite under SLIMRAY_HOME
    artifact_dir: str | None = None  # default: <SLIMRAY_HOME>/jobs; shared storage on a cluster


@dataclass(frozen=True)
class JobSpec:
    name: str
    teacher: str
    task: TaskConfig
    search: object  # search.space.SearchSpace
    algorithm: object  # search.algorithms.SearchSettings (objectives included)
    objectives: tuple[Objective, ...]
    constraints: Constraints = field(default_factory=Constraints)
    budget: Budget = field(default_factory=Budget)
    resources: Resources = field(default_factory=Resources)
    train: TrainConfig = field(default_factory=TrainConfig)  # trial defaults; the search space overrides
    distill: DistillConfig = field(default_factory=DistillConfig)
    teacher_train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-5, epochs=1.0))
    latency: LatencySettings = field(default_factory=LatencySettings)
    storage: Storage = field(default_factory=Storage)
    ray_address: str | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # the YAML as given, for the DB

    @property
    def seq_len(self) -> int:
        return self.latency.seq_len or self.task.max_length

    def to_dict(self) -> dict:
        """The spec as stored with the job: secrets (DB passwords) masked."""
        from db import display_url

        d = dict(self.raw)
        if isinstance(d.get("storage"), dict) and d["storage"].get("db_url"):
            d["storage"] = {**d["storage"], "db_url": display_url(d["storage"]["db_url"])}
        return d


_SECTIONS = {"name", "teacher", "task", "search", "algorithm", "objectives", "constraints", "budget", "resources",
             "train", "distill", "teacher_train", "latency", "storage", "ray_address"}


def _section(typ, value, path: str, problems: list, defaults: dict | None = None):
    """Build dataclass ``typ`` from ``value``, collecting one problem per bad field instead of stopping."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        problems.append(f"{path}: must be a mapping, got {type(value).__name__}")
        return None
    names = {f.name for f in dataclasses.fields(typ)}
    value = {**(defaults or {}), **value}
    bad = False
    for key in sorted(set(value) - names, key=str):
        problems.append(f"{path}.{key}: unknown key; allowed: {', '.join(sorted(names))}")
        bad = True
    good = {k: v for k, v in value.items() if k in names}
    for key, v in good.items():  # each field alone, so every bad field gets its own line
        try:
            typ(**{**_required(typ, good), key: v})
        except (ConfigError, TypeError, ValueError) as err:
            problems.append(_prefixed(err, f"{path}.{key}"))
            bad = True
    if bad:
        return None
    try:
        return typ(**good)
    except (ConfigError, TypeError, ValueError) as err:
        problems.append(_prefixed(err, path, keep_own_path=True))
        return None


def _required(typ, given: dict) -> dict:
    """Values for fields without defaults so a single field can be checked alone."""
    out = {}
    for f in dataclasses.fields(typ):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            out[f.name] = given.get(f.name)
    return out


def _prefixed(err: Exception, path: str, *, keep_own_path: bool = False) -> str:
    """``path: what is wrong``; a config's own field path is replaced (teacher_train reuses TrainConfig)."""
    msg = str(err)
    head, sep, rest = msg.partition(": ")
    if sep and " " not in head:
        return msg if keep_own_path else f"{path}: {rest}"
    return f"{path}: {msg}"


def _objectives(value, problems: list) -> tuple[Objective, ...]:
    if value is None:
        value = ["metric:max", "size_bytes:min", "latency_ms_b1:min"]
    if not isinstance(value, list) or not value:
        problems.append("objectives: must be a non-empty list like [metric:max, size_bytes:min]")
        return ()
    out = []
    for i, item in enumerate(value):
        if isinstance(item, dict) and len(item) == 1:
            item = "{}:{}".format(*next(iter(item.items())))
        if not isinstance(item, str) or item.count(":") != 1:
            problems.append(f"objectives[{i}]: must be 'name:max' or 'name:min', got {item!r}")
            continue
        name, mode = (s.strip() for s in item.split(":"))
        if name not in KNOWN_OBJECTIVES:
            problems.append(f"objectives[{i}]: no trial reports {name!r}; use one of {', '.join(KNOWN_OBJECTIVES)}")
        elif mode not in ("max", "min"):
            problems.append(f"objectives[{i}]: mode must be max or min, got {mode!r}")
        else:
            out.append(Objective(name, mode))
    if len({o.name for o in out}) != len(out):
        problems.append("objectives: each objective may appear once")
    if out and not 2 <= len(out) <= 3:
        problems.append(f"objectives: give 2 or 3 objectives (a Pareto front needs ≥ 2), got {len(out)}")
    return tuple(out)


def _teacher(value, problems: list) -> str | None:
    from workers.teacher import DEFAULT_TEACHER

    if value is None:
        return DEFAULT_TEACHER
    if not isinstance(value, str) or not value.strip():
        problems.append(f"teacher: must be a hub id, a local model directory or 'minilm', got {value!r}")
        return None
    looks_local = value.startswith(("/", "./", "../", "~")) or value.count("/") > 1
    if looks_local and not Path(value).expanduser().exists():
        problems.append(f"teacher: local path {value} does not exist")
        return None
    return value


def parse(raw) -> JobSpec:
    """Validate a job spec given as a dict; raises SpecError listing every problem."""
    from search.algorithms import SearchSettings
    from search.space import SearchSpace

    if not isinstance(raw, dict):
        raise SpecError([f"job spec: must be a YAML mapping, got {type(raw).__name__}"])
    problems: list[str] = []
    for key in sorted(set(raw) - _SECTIONS, key=str):
        problems.append(f"{key}: unknown key; allowed: {', '.join(sorted(_SECTIONS))}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or not all(c.isalnum() or c in "-_." for c in name):
        problems.append(f"name: must be a non-empty string of letters, digits, '-', '_' or '.', got {name!r}")
    teacher = _teacher(raw.get("teacher"), problems)
    task = _section(TaskConfig, raw.get("task"), "task", problems)
    search = None
    try:
        search = SearchSpace.from_dict(raw.get("search") or {})
    except SpecError as err:
        problems.extend(err.problems)
    except ConfigError as err:
        problems.append(str(err))
    objectives = _objectives(raw.get("objectives"), problems)
    algorithm = None
    algo_raw = raw.get("algorithm") or {}
    if isinstance(algo_raw, dict) and "name" in algo_raw:  # `algorithm: {name: tpe}` reads better in YAML
        algo_raw = {("algorithm" if k == "name" else k): v for k, v in algo_raw.items()}
    if not isinstance(algo_raw, dict):
        problems.append("algorithm: must be a mapping")
    elif objectives:
        try:
            algorithm = SearchSettings.from_dict({**algo_raw, "objectives": [(o.name, o.mode) for o in objectives]})
        except SpecError as err:
            problems.extend(p if p.startswith("algorithm") else f"algorithm.{p}" for p in err.problems)
        except ConfigError as err:
            problems.append(_prefixed(err, "algorithm"))
    sections = {
        "constraints": _section(Constraints, raw.get("constraints"), "constraints", problems),
        "budget": _section(Budget, raw.get("budget"), "budget", problems),
        "resources": _section(Resources, raw.get("resources"), "resources", problems),
        "train": _section(TrainConfig, raw.get("train"), "train", problems),
        "distill": _section(DistillConfig, raw.get("distill"), "distill", problems),
        "teacher_train": _section(TrainConfig, raw.get("teacher_train"), "teacher_train", problems,
                                  defaults={"lr": 5e-5}),
        "latency": _section(LatencySettings, raw.get("latency"), "latency", problems),
        "storage": _section(Storage, raw.get("storage"), "storage", problems),
    }
    address = raw.get("ray_address")
    if address is not None and not isinstance(address, str):
        problems.append(f"ray_address: must be a string like ray://host:10001 or auto, got {address!r}")
    if problems:
        raise SpecError(problems)
    return JobSpec(name=name, teacher=teacher, task=task, search=search, algorithm=algorithm,
                   objectives=objectives, ray_address=address, raw=raw, **sections)


def load(path: str | os.PathLike) -> JobSpec:
    """Read and validate a YAML job spec."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SpecError([f"job spec file not found: {p}"])
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise SpecError([f"{p}: not valid YAML{where}: {getattr(err, 'problem', err)}"]) from None
    return parse(raw)
