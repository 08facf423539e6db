"""The five tables of the slimray store.

Only portable column types are used so one schema serves SQLite (the
embedded default) and PostgreSQL (a cluster). Statuses are plain strings
checked by the Store rather than SQL enums: adding a status then needs no
migration on either backend.

A schema change here needs a new revision in ``db/migrations/versions``;
``tests/test_db_store.py`` fails while the two disagree.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, MetaData, String, Text, \
    UniqueConstraint, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = ["Base", "Job", "Trial", "Metric", "Artifact", "Deployment",
           "JOB_STATUSES", "JOB_STAGES", "TRIAL_STATUSES", "DEPLOYMENT_STATUSES"]

JOB_STATUSES = ("pending", "running", "finished", "failed", "cancelled", "interrupted")
# What a running job is doing; the order is the order of a job's life.
JOB_STAGES = ("teacher", "augment", "super_student", "search", "finalists", "front", "promotion", "done")
TRIAL_STATUSES = ("pending", "running", "terminated", "stopped_early", "error")
DEPLOYMENT_STATUSES = ("live", "replaced", "stopped", "failed")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# Named constraints make later migrations deterministic, and SQLite's batch
# mode (table rebuilds) can only drop a constraint it can name.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Stamp = DateTime(timezone=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)  # chosen by the caller
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # already scrubbed of secrets by the caller
    teacher: Mapped[str] = mapped_column(String(500))
    dataset: Mapped[str] = mapped_column(String(500))
    baseline: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON)
    tune_path: Mapped[Optional[str]] = mapped_column(Text)  # a URI: Tune state may live on S3/NFS
    code_version: Mapped[Optional[str]] = mapped_column(String(64))
    error: Mapped[Optional[str]] = mapped_column(Text)
    # What the job is doing now (teacher, search, finalists, promotion) and how far along, for `slimray status`.
    stage: Mapped[Optional[str]] = mapped_column(String(32))
    progress: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON)
    # Earlier jobs whose finished trials seeded this job's searcher (warm start).
    warm_sources: Mapped[Optional[list[str]]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(Stamp, default=utcnow)
    started_at: Mapped[Optional[datetime]] = mapped_column(Stamp)
    finished_at: Mapped[Optional[datetime]] = mapped_column(Stamp)
    updated_at: Mapped[datetime] = mapped_column(Stamp, default=utcnow, onupdate=utcnow)

    trials: Mapped[list[Trial]] = relationship(back_populates="job", passive_deletes=True)


class Trial(Base):
    __tablename__ = "trials"
    __table_args__ = (UniqueConstraint("job_id", "trial_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    trial_id: Mapped[str] = mapped_column(String(128))  # Tune's id, unique only within a job
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="running")
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    error: Mapped[Optional[str]] = mapped_column(Text)  # one line, of the latest failed attempt
    traceback: Mapped[Optional[str]] = mapped_column(Text)
    started_at: Mapped[Optional[datetime]] = mapped_column(Stamp)
    finished_at: Mapped[Optional[datetime]] = mapped_column(Stamp)
    result: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON)  # everything the trial reported last
    # First-class copies of the result keys that the CLI sorts, filters and
    # plots by, so those queries need no JSON functions (which differ by backend).
    metric: Mapped[Optional[float]] = mapped_column(Float)
    metric_drop: Mapped[Optional[float]] = mapped_column(Float)
    size_bytes: Mapped[Optional[int]] = mapped_column(BigInteger)
    params: Mapped[Optional[int]] = mapped_column(BigInteger)
    latency_ms_b1: Mapped[Optional[float]] = mapped_column(Float)
    latency_ms_b32: Mapped[Optional[float]] = mapped_column(Float)
    train_seconds: Mapped[Optional[float]] = mapped_column(Float)
    on_front: Mapped[bool] = mapped_column(Boolean, default=False)
    # Measured serially on a quiet machine after the search; trusted over latency_ms_b1.
    remeasured_latency_ms_b1: Mapped[Optional[float]] = mapped_column(Float)
    # The trial this one was derived from (a sub-model's super-student, a finalist's sub-model), for lineage.
    parent: Mapped[Optional[str]] = mapped_column(String(128))
    # `slimray gc` removed the artifact's files; the row and its metrics stay.
    artifact_deleted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    job: Mapped[Job] = relationship(back_populates="trials")
    artifact: Mapped[Optional[Artifact]] = relationship(back_populates="trial", passive_deletes=True)


class Metric(Base):
    __tablename__ = "metrics"
    # A report re-sent after a driver restart lands on the same row.
    __table_args__ = (UniqueConstraint("trial_pk", "attempt", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    trial_pk: Mapped[int] = mapped_column(ForeignKey("trials.id", ondelete="CASCADE"))  # trials.id, not Tune's id
    step: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    values: Mapped[dict[str, Any]] = mapped_column(JSON)
    at: Mapped[datetime] = mapped_column(Stamp, default=utcnow)


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    trial_pk: Mapped[int] = mapped_column(ForeignKey("trials.id", ondelete="CASCADE"), unique=True)
    uri: Mapped[str] = mapped_column(Text)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(Stamp, default=utcnow)

    trial: Mapped[Trial] = relationship(back_populates="artifact")


class Deployment(Base):
    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    trial_pk: Mapped[int] = mapped_column(ForeignKey("trials.id", ondelete="CASCADE"))
    endpoint: Mapped[str] = mapped_column(String(500))
    status: Mapped[str] = mapped_column(String(16), default="live")
    who: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(Stamp, default=utcnow)
    ended_at: Mapped[Optional[datetime]] = mapped_column(Stamp)

    trial: Mapped[Trial] = relationship()
