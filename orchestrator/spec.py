"""The job spec: YAML in, one frozen pydantic model out, every problem reported at once (one line each).

The CLI parses a spec once (:func:`load`) and the same :class:`JobSpec` object travels to the trials and to
promotion. A spec stored with a job (:meth:`JobSpec.stored`) loads back with :func:`from_stored`, also when an
earlier version of slimray wrote it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Literal, Optional

from pydantic import Field, ValidationInfo, field_validator, model_validator

from common.config import Float, Frozen, Int, Problems, Str
from common.elastic_config import ElasticConfig
from common.errors import SpecError
from search.algorithms import SearchSettings
from search.objectives import DEFAULT_OBJECTIVES, OBJECTIVES, Objectives
from search.space import SearchSpace
from common.trial_config import DistillConfig, TeacherTrainConfig, TrainConfig, VocabConfig
from workers.data import TaskConfig
from workers.teacher import DEFAULT_TEACHER

__all__ = ["JobSpec", "Constraints", "Budget", "Resources", "LatencySettings", "Storage", "load", "parse",
           "from_stored"]


class Constraints(Frozen):
    """What promotion requires of a model (and what the search's 'best' means). ``None`` lifts a limit; sizes
    are in MB (10⁶ bytes)."""

    _prefix: ClassVar[str] = "constraints"

    max_metric_drop: Optional[Float] = Field(1.0, ge=0, description="task-metric points below the teacher")
    max_size_mb: Optional[Float] = Field(None, gt=0, description="model size cap")
    max_latency_ms: Optional[Float] = Field(None, gt=0, description="batch-1 latency cap (re-measured at "
                                                                    "promotion)")

    def override(self, **limits) -> Constraints:
        """These constraints with the ``limits`` that are not None on top (validated)."""
        return Constraints(**{**self.model_dump(), **{k: v for k, v in limits.items() if v is not None}})

    def limits(self) -> dict:
        """Keyword arguments of search.pareto.pick / closest."""
        return {"max_metric_drop": self.max_metric_drop,
                "max_size_bytes": None if self.max_size_mb is None else self.max_size_mb * 1e6,
                "max_latency_ms": self.max_latency_ms}

    def describe(self) -> str:
        parts = [f"metric drop ≤ {self.max_metric_drop:g}" if self.max_metric_drop is not None else None,
                 f"size ≤ {self.max_size_mb:g} MB" if self.max_size_mb is not None else None,
                 f"batch-1 latency ≤ {self.max_latency_ms:g} ms" if self.max_latency_ms is not None else None]
        return ", ".join(p for p in parts if p) or "no limits"


class Budget(Frozen):
    """How much searching."""

    _prefix: ClassVar[str] = "budget"

    num_trials: Int = Field(8, ge=1, description="trials sampled")
    max_concurrent: Int = Field(1, ge=1, description="trials running at once")
    time_budget_s: Optional[Float] = Field(None, gt=0, description="the search stops after this many seconds")
    max_failures: Int = Field(1, ge=0, description="retries of a crashed trial (from its last checkpoint)")


class Resources(Frozen):
    """Per trial. workers > 1 or gpus > 0 runs the trial on a Ray Train TorchTrainer; else in-process."""

    _prefix: ClassVar[str] = "resources"

    cpus: Float = Field(1, gt=0, description="CPUs per trial (per worker when distributed)")
    gpus: Float = Field(0, ge=0, description="GPUs per trial (per worker when distributed)")
    workers: Int = Field(1, ge=1, description="data-parallel workers per trial")

    @property
    def distributed(self) -> bool:
        return self.workers > 1 or self.gpus > 0


class LatencySettings(Frozen):
    """How trials (and promotion) time a model."""

    _prefix: ClassVar[str] = "latency"

    threads: Int = Field(1, ge=1, description="torch threads while timing")
    runs: Int = Field(20, ge=1, description="timed runs; the median is reported")
    seq_len: Optional[Int] = Field(None, ge=1, le=512, description="tokens per timed row; default: task.max_length")


class Storage(Frozen):
    """Where results go."""

    _prefix: ClassVar[str] = "storage"

    db_url: Optional[Str] = Field(None, description="SQLAlchemy URL; default: SLIMRAY_DB_URL, else SQLite under "
                                                    "SLIMRAY_HOME")
    artifact_dir: Optional[Str] = Field(None, description="default: <SLIMRAY_HOME>/jobs; shared storage on a cluster")


class JobSpec(Frozen):
    """A search job: which teacher, which task, what to search, towards which objectives, under what limits."""

    _error: ClassVar[type] = SpecError

    name: Str = Field(description="letters, digits, '-', '_' or '.'; job ids start with it")
    teacher: Str = Field(DEFAULT_TEACHER, min_length=1, description="a hub id, a local model directory or minilm")
    task: TaskConfig = Field(default_factory=TaskConfig)
    strategy: Literal["trials", "elastic"] = Field(
        "trials", description="trials: every trial distils its own student; elastic: one weight-sharing "
                              "super-student is trained, sub-models sliced from it are scored without training "
                              "and the best few get a short distillation (docs/architecture.md)")
    elastic: ElasticConfig = Field(default_factory=ElasticConfig, description="The super-student and its "
                                   "finalists (strategy: elastic). Its sub-models take the depths of "
                                   "search.student.layers and the heads and FFN widths of search.student.heads and "
                                   "search.student.ffn (the teacher's where not searched), crossed with search.quant "
                                   "and search.vocab.")
    search: SearchSpace = Field(default_factory=SearchSpace)
    algorithm: SearchSettings = Field(default_factory=SearchSettings)
    objectives: Objectives = Field(DEFAULT_OBJECTIVES, description="2 or 3 of " + ", ".join(OBJECTIVES) +
                                   ", each name:max or name:min")
    constraints: Constraints = Field(default_factory=Constraints)
    budget: Budget = Field(default_factory=Budget)
    resources: Resources = Field(default_factory=Resources)
    train: TrainConfig = Field(default_factory=TrainConfig, description="Trial defaults, run on the DeepSpeed "
                                                                        "engine; the search space overrides them.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Trial defaults; the search space "
                                                                              "overrides them.")
    vocab: VocabConfig = Field(default_factory=VocabConfig, description="Trial default; the search space "
                                                                        "overrides it.")
    teacher_train: TeacherTrainConfig = Field(default_factory=TeacherTrainConfig)
    latency: LatencySettings = Field(default_factory=LatencySettings)
    storage: Storage = Field(default_factory=Storage)
    ray_address: Optional[Str] = Field(None, description="a running cluster, like ray://host:10001 or auto; "
                                                         "default: RAY_ADDRESS, else a local Ray")

    @model_validator(mode="before")
    @classmethod
    def _default_scheduler(cls, data):
        # multi-objective ASHA unless the search has a single objective (then ASHA on that metric)
        if not isinstance(data, dict) or not isinstance(data.get("algorithm", {}), dict):
            return data
        algorithm = data.get("algorithm") or {}
        if "asha" not in algorithm:
            objectives = data.get("objectives", DEFAULT_OBJECTIVES)
            many = isinstance(objectives, (list, tuple)) and len(objectives) > 1
            data = {**data, "algorithm": {**algorithm, "asha": "mo" if many else "metric"}}
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip() or not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError(f"must be a non-empty string of letters, digits, '-', '_' or '.', got {value!r}")
        return value

    @field_validator("teacher")
    @classmethod
    def _teacher_exists(cls, value: str, info: ValidationInfo) -> str:
        # a stored spec loads even after its teacher directory is gone: results and promotion do not need it
        if (info.context or {}).get("stored"):
            return value
        looks_local = value.startswith(("/", "./", "../", "~")) or value.count("/") > 1
        if looks_local and not Path(value).expanduser().exists():
            raise ValueError(f"local path {value} does not exist")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        problems = []
        algo = self.algorithm
        if algo.asha == "metric":
            for o in self.objectives:
                if o.name == algo.asha_metric and o.mode != algo.asha_mode:
                    problems.append(("algorithm.asha_mode", f"{algo.asha_mode} contradicts objective {o}; use the "
                                                            "same direction"))
        from workers.augment import job_problems

        problems += job_problems(self.task.augment, self.distill.alpha, self.search.get("distill.alpha") is not None)
        if self.strategy == "elastic":
            problems += _elastic_problems(self)
        elif self.elastic != ElasticConfig():  # the defaults, as every stored spec carries them, are no error
            problems.append(("elastic", "only read when strategy is elastic; set strategy: elastic or drop it"))
        if problems:
            raise Problems(*problems)
        return self

    @property
    def seq_len(self) -> int:
        """The sequence length trials and promotion time models at."""
        return self.latency.seq_len or self.task.max_length

    def stored(self) -> dict:
        """The spec as stored with the job (JSON-ready): secrets (DB passwords) masked, and without
        ``ray_address``: where a run connects is not part of the job (a detached driver joins its cluster with
        auto, `resume --address` picks again), so every submission of one spec stores the same thing."""
        from db import display_url

        d = self.model_dump(mode="json", exclude={"ray_address"})
        if d["storage"].get("db_url"):
            d["storage"]["db_url"] = display_url(d["storage"]["db_url"])
        return d


# What an elastic sub-model trial can vary: its slice of the super-student, then training-free compression.
ELASTIC_DIMS = ("student.layers", "student.heads", "student.ffn", "quant.mode", "quant.group_size",
                "quant.embedding_bits", "vocab.prune")
# What a sub-model trial reports (workers.elastic.evaluate_sub): no batch-32 latency, no training time.
ELASTIC_OBJECTIVES = ("metric", "metric_drop", "size_bytes", "params", "latency_ms_b1")


def _elastic_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """Why ``spec`` cannot run the elastic strategy, one ``(path, message)`` each."""
    from search.space import Range

    why = {"student.hidden": "the super-student keeps the teacher's hidden width; drop it and search "
                             "search.student.heads / ffn",
           "student.layer_choice": "the super-student fixes which layers a depth keeps; set elastic.layer_choice "
                                   "instead",
           "prune": "the elastic strategy narrows heads and FFN through search.student.heads and "
                    "search.student.ffn; drop search.prune",
           "lowrank": "low rank needs training, which elastic sub-models do not get; drop it",
           "distill": "elastic sub-models are not trained, so nothing would read it; set the job's distill "
                      "section instead",
           "train": "elastic sub-models are not trained, so nothing would read it; set the job's train section "
                    "instead"}
    problems, said = [], set()
    for name, dim in spec.search.dims:
        section = name.split(".")[0]
        if name in ELASTIC_DIMS:
            if name.startswith("student.") and isinstance(dim, Range) and dim.step is None:
                problems.append((f"search.{name}", "the super-student is trained for a fixed set of sizes; give a "
                                                   "list, or a range with a step"))
            continue
        key = name if name in why else section
        if key not in said:
            said.add(key)
            problems.append((f"search.{key}", why[key]))
    if "qat" in spec.search.options("quant.mode"):
        problems.append(("search.quant.mode", "qat needs training and elastic sub-models are training-free; use "
                                              "none, dynamic, static, int4 or mixed"))
    if not any(spec.search.get(f"student.{k}") for k in ("layers", "heads", "ffn")):
        problems.append(("search.student", "the elastic strategy needs at least one of layers, heads or ffn to "
                                           "slice sub-models by"))
    if spec.search.warm_start is not None:
        problems.append(("search.warm_start", "earlier jobs' trials are not sub-models of this job's "
                                              "super-student; drop it"))
    for o in spec.objectives:
        if o.name not in ELASTIC_OBJECTIVES:
            problems.append(("objectives", f"elastic sub-models do not report {o.name}; use "
                                           f"{', '.join(ELASTIC_OBJECTIVES)}"))
    if spec.resources.workers > 1:
        problems.append(("resources.workers", f"the elastic strategy trains its super-student on one worker; "
                                              f"set 1, got {spec.resources.workers}"))
    return problems


def parse(raw) -> JobSpec:
    """Validate a job spec given as a dict; raises SpecError listing every problem."""
    if not isinstance(raw, dict):
        raise SpecError([f"job spec: must be a YAML mapping, got {type(raw).__name__}"])
    return JobSpec.model_validate(raw)


def from_stored(d: dict) -> JobSpec:
    """A spec as a job stored it (this version's :meth:`JobSpec.stored` or an earlier version's YAML)."""
    if not isinstance(d, dict):
        raise SpecError([f"stored job spec: must be a mapping, got {type(d).__name__}"])
    task = d.get("task", {})
    if isinstance(task, dict) and "selection" not in task:  # stored before task.selection: it chose on dev
        d = {**d, "task": {**task, "selection": {"share": 0}}}
    return JobSpec.model_validate(d, context={"stored": True})


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
