"""The Store: every query the orchestrator and the CLI make, over one session helper.

Writes are idempotent so that a re-sent Tune event or a resumed driver
updates rows instead of duplicating them. The one deliberate exception is
``trial_started``: starting a trial again *is* the news (one more attempt).
Everything returned is a plain dict; see ``db.rows``.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional, Sequence

from sqlalchemy import func, select
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from common.errors import StoreError

from .engine import default_url, display_url, make_engine
from .migrate import upgrade
from .models import (DEPLOYMENT_STATUSES, JOB_STAGES, JOB_STATUSES, TRIAL_STATUSES, Artifact, Deployment, Job, Metric, Trial,
                     utcnow)
from .rows import RESULT_COLUMNS, deployment_dict, iso, job_dict, number, plain_json, trial_dict
from .transaction import one_line, retrying, store_error

__all__ = ["Store"]

JOB_ENDED = ("finished", "failed", "cancelled", "interrupted")
TRIAL_ENDED = ("terminated", "stopped_early", "error")


class Store:
    """The slimray SQL store at ``url`` (default: ``db.default_url()``), migrated to head on open."""

    def __init__(self, url: str | URL | None = None):
        url = url or default_url()
        # the real URL (password included) for processes that open their own Store; never print it
        self.url = url if isinstance(url, str) else url.render_as_string(hide_password=False)
        self.url_for_display = display_url(url)
        try:
            self.engine = make_engine(url)
        except ImportError as err:
            raise StoreError(f"cannot open store {self.url_for_display}: {err}; install its driver "
                             f"(PostgreSQL: pip install 'psycopg[binary]')") from err
        except SQLAlchemyError as err:
            raise store_error(err, self.url_for_display) from err
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._batch = threading.local()  # this thread's write_batch session, while one runs
        self._migrate()

    def __repr__(self) -> str:
        return f"Store({self.url_for_display!r})"

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @retrying
    def _migrate(self) -> None:
        try:
            upgrade(self.engine)
        except SQLAlchemyError as err:
            raise store_error(err, self.url_for_display) from err

    @contextmanager
    def _session(self) -> Iterator[Session]:
        """The one way to the database: commits, or rolls back and raises StoreError."""
        batch = getattr(self._batch, "session", None)
        if batch is not None:  # inside write_batch, whose one transaction commits or rolls back the lot
            yield batch
            return
        session = self._sessions()
        try:
            yield session
            session.commit()
        except SQLAlchemyError as err:
            _rollback(session)
            raise store_error(err, self.url_for_display) from err
        except BaseException:
            _rollback(session)
            raise
        finally:
            session.close()

    @retrying
    def write_batch(self, writes: Sequence[tuple[str, tuple]]) -> None:
        """Run ``(method name, args)`` writes in order in one transaction, all or none: the recorder's burst of
        Tune events commits once instead of once each. A transient failure re-runs the whole batch."""
        with self._session() as s:
            self._batch.session = s
            try:
                for name, args in writes:
                    method = getattr(type(self), name, None)
                    if name.startswith("_") or not hasattr(method, "__wrapped__"):
                        raise StoreError(f"write_batch: Store has no method '{name}'")
                    method.__wrapped__(self, *args)  # not retrying on its own: its failure is the batch's
            finally:
                self._batch.session = None

    # -- jobs ---------------------------------------------------------------

    @retrying
    def create_job(self, job_id: str, name: str, spec: dict, teacher: str, dataset: str,
                   code_version: Optional[str] = None) -> dict[str, Any]:
        """Record a pending job; the same call again returns the existing job."""
        spec = plain_json(spec)
        with self._session() as s:
            job = s.get(Job, job_id)
            if job is None:
                job = Job(id=job_id, name=name, status="pending", spec=spec, teacher=teacher, dataset=dataset,
                          code_version=code_version)
                s.add(job)
                s.flush()
            elif job.spec != spec:
                raise StoreError(f"job '{job_id}' already exists with a different spec; use another job id")
            return job_dict(job, _trial_counts(s, [job_id]).get(job_id, {}))

    @retrying
    def set_job_status(self, job_id: str, status: str, error: Optional[str] = None) -> None:
        """Move a job to ``status``; ``error`` says why it failed, was cancelled or interrupted."""
        _check(status, JOB_STATUSES, "job")
        with self._session() as s:
            job = _job(s, job_id)
            job.status = status
            job.error = error
            if status == "running":
                # A resumed job keeps its first start time and is no longer finished.
                job.started_at = job.started_at or utcnow()
                job.finished_at = None
            elif status in JOB_ENDED:
                job.finished_at = job.finished_at or utcnow()

    @retrying
    def set_job_baseline(self, job_id: str, baseline: dict) -> None:
        """Store the teacher's metrics, the bar every trial is measured against."""
        with self._session() as s:
            _job(s, job_id).baseline = plain_json(baseline)

    @retrying
    def set_job_stage(self, job_id: str, stage: str, progress: Optional[dict] = None) -> None:
        """What the job is doing now (teacher, search, finalists, promotion) and how far along it is, e.g.
        ``{"done": 3, "total": 10, "unit": "trials"}``; shown by ``slimray status``."""
        _check(stage, JOB_STAGES, "job stage")
        with self._session() as s:
            job = _job(s, job_id)
            job.stage = stage
            job.progress = plain_json(progress) if progress is not None else None

    @retrying
    def set_job_tune_path(self, job_id: str, path: str) -> None:
        """Where Tune keeps this job's state, for ``slimray resume``."""
        with self._session() as s:
            _job(s, job_id).tune_path = str(path)

    @retrying
    def set_job_warm_sources(self, job_id: str, sources: Iterable[str]) -> None:
        """The earlier jobs whose finished trials seeded this job's searcher (``search.warm_start``)."""
        with self._session() as s:
            _job(s, job_id).warm_sources = [str(j) for j in sources]

    @retrying
    def get_job(self, job_id: str) -> dict[str, Any]:
        with self._session() as s:
            return job_dict(_job(s, job_id), _trial_counts(s, [job_id]).get(job_id, {}))

    @retrying
    def list_jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        """Newest first, each with ``trial_counts`` by trial status."""
        with self._session() as s:
            jobs = s.scalars(select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)).all()
            counts = _trial_counts(s, [job.id for job in jobs])
            return [job_dict(job, counts.get(job.id, {})) for job in jobs]

    # -- trials -------------------------------------------------------------

    @retrying
    def trial_started(self, job_id: str, trial_id: str, config: dict, parent: Optional[str] = None) -> int:
        """Record a trial start and return its attempt number (1, then 2 on Tune's first retry, ...);
        ``parent`` is the trial it derives from (lineage), when there is one."""
        with self._session() as s:
            _job(s, job_id)
            trial = _find_trial(s, job_id, trial_id)
            if trial is None:
                s.add(Trial(job_id=job_id, trial_id=trial_id, config=plain_json(config), status="running",
                            attempts=1, started_at=utcnow(), on_front=False, parent=parent))
                return 1
            # The config is the trial's point in the search space and does not
            # change on retry; error/traceback stay to explain the retry.
            trial.attempts += 1
            trial.status = "running"
            trial.started_at = utcnow()
            trial.finished_at = None
            return trial.attempts

    @retrying
    def trial_reported(self, job_id: str, trial_id: str, step: int, values: dict,
                       attempt: Optional[int] = None) -> None:
        """Record one intermediate report; ``attempt`` defaults to the trial's current one."""
        with self._session() as s:
            trial = _trial(s, job_id, trial_id)
            attempt = trial.attempts if attempt is None else attempt
            row = {"trial_pk": trial.id, "attempt": attempt, "step": int(step), "values": plain_json(values),
                   "at": utcnow()}
            s.execute(_upsert(s, Metric, row, keys=("trial_pk", "attempt", "step"), update=("values",)))

    @retrying
    def trial_finished(self, job_id: str, trial_id: str, status: str, result: dict) -> None:
        """Record the final result; its well-known keys (``RESULT_COLUMNS``) also get their own columns, and its
        ``parent`` (the trial it derives from, reported by a Tune trial that knows it) the lineage column."""
        _check(status, TRIAL_ENDED, "finished trial")
        result = plain_json(result)
        with self._session() as s:
            trial = _trial(s, job_id, trial_id)
            trial.status = status
            trial.result = result
            for column, kind in RESULT_COLUMNS.items():
                setattr(trial, column, number(result.get(column), kind))
            if isinstance(result.get("parent"), str):
                trial.parent = result["parent"]
            trial.finished_at = trial.finished_at or utcnow()

    @retrying
    def trial_failed(self, job_id: str, trial_id: str, error: str, traceback: Optional[str]) -> None:
        """Record a crash: ``error`` is kept to its first line, ``traceback`` whole."""
        with self._session() as s:
            trial = _trial(s, job_id, trial_id)
            trial.status = "error"
            trial.error = one_line(error) or "unknown error"
            trial.traceback = traceback
            trial.finished_at = trial.finished_at or utcnow()

    @retrying
    def add_artifact(self, job_id: str, trial_id: str, uri: str, bytes: int, sha256: str) -> None:
        """Record (or replace) the trial's saved model."""
        with self._session() as s:
            trial = _trial(s, job_id, trial_id)
            row = {"trial_pk": trial.id, "uri": str(uri), "bytes": int(bytes), "sha256": sha256,
                   "created_at": utcnow()}
            s.execute(_upsert(s, Artifact, row, keys=("trial_pk",), update=("uri", "bytes", "sha256")))
            trial.artifact_deleted = False  # written again (a rerun trial): its files exist once more

    @retrying
    def trials(self, job_id: str, status: Optional[str] = None) -> list[dict[str, Any]]:
        """The job's trials in start order, optionally only those with ``status``."""
        if status is not None:
            _check(status, TRIAL_STATUSES, "trial")
        with self._session() as s:
            _job(s, job_id)
            query = select(Trial).where(Trial.job_id == job_id).options(selectinload(Trial.artifact))
            if status is not None:
                query = query.where(Trial.status == status)
            return [trial_dict(trial) for trial in s.scalars(query.order_by(Trial.id))]

    @retrying
    def metric_history(self, job_id: str, trial_id: str) -> list[dict[str, Any]]:
        """Every report of the trial, by attempt then step."""
        with self._session() as s:
            trial = _trial(s, job_id, trial_id)
            rows = s.scalars(select(Metric).where(Metric.trial_pk == trial.id)
                             .order_by(Metric.attempt, Metric.step))
            return [{"step": m.step, "attempt": m.attempt, "values": m.values, "at": iso(m.at)} for m in rows]

    @retrying
    def set_front(self, job_id: str, trial_ids: Iterable[str]) -> None:
        """Flag exactly ``trial_ids`` as the job's Pareto front."""
        wanted = set(trial_ids)
        with self._session() as s:
            _job(s, job_id)
            trials = s.scalars(select(Trial).where(Trial.job_id == job_id)).all()
            missing = wanted - {trial.trial_id for trial in trials}
            if missing:
                raise StoreError(f"job '{job_id}' has no trial {', '.join(map(repr, sorted(missing)))}")
            for trial in trials:
                trial.on_front = trial.trial_id in wanted

    @retrying
    def set_remeasured_latency(self, job_id: str, trial_id: str, ms: float) -> None:
        with self._session() as s:
            _trial(s, job_id, trial_id).remeasured_latency_ms_b1 = number(ms, float)

    @retrying
    def set_artifacts_deleted(self, job_id: str, trial_ids: Iterable[str]) -> None:
        """Mark the artifacts of ``trial_ids`` as deleted by `slimray gc`; their rows and metrics stay."""
        wanted = set(trial_ids)
        if not wanted:
            return
        with self._session() as s:
            _job(s, job_id)
            trials = s.scalars(select(Trial).where(Trial.job_id == job_id, Trial.trial_id.in_(wanted))).all()
            missing = wanted - {trial.trial_id for trial in trials}
            if missing:
                raise StoreError(f"job '{job_id}' has no trial {', '.join(map(repr, sorted(missing)))}")
            for trial in trials:
                trial.artifact_deleted = True

    # -- deployments --------------------------------------------------------

    @retrying
    def record_deployment(self, job_id: str, trial_id: str, endpoint: str, who: str) -> int:
        """Record a new live deployment, replacing the live one; returns its id.

        Recording what is already live returns the existing id.
        """
        with self._session() as s:
            trial = _trial(s, job_id, trial_id)
            live = s.scalars(select(Deployment).where(Deployment.status == "live")).all()
            same = next((d for d in live if d.trial_pk == trial.id and d.endpoint == endpoint), None)
            _replace(live, keep=same)
            if same is not None:
                return same.id
            deployment = Deployment(job_id=job_id, trial_pk=trial.id, endpoint=endpoint, status="live", who=who)
            s.add(deployment)
            s.flush()
            return deployment.id

    @retrying
    def set_deployment_status(self, dep_id: int, status: str) -> None:
        _check(status, DEPLOYMENT_STATUSES, "deployment")
        with self._session() as s:
            deployment = s.get(Deployment, dep_id)
            if deployment is None:
                raise StoreError(f"no deployment {dep_id}; list them with Store.deployments()")
            if status == "live":
                # Rolling back to an older deployment: at most one is live.
                _replace(s.scalars(select(Deployment).where(Deployment.status == "live")).all(), keep=deployment)
                deployment.ended_at = None
            else:
                deployment.ended_at = deployment.ended_at or utcnow()
            deployment.status = status

    @retrying
    def live_deployment(self) -> Optional[dict[str, Any]]:
        with self._session() as s:
            deployment = s.scalars(select(Deployment).where(Deployment.status == "live")
                                   .order_by(Deployment.id.desc()).limit(1)).first()
            return deployment_dict(deployment) if deployment else None

    @retrying
    def deployments(self, job_id: Optional[str] = None) -> list[dict[str, Any]]:
        """Newest first, of one job or of all."""
        with self._session() as s:
            query = select(Deployment).order_by(Deployment.id.desc())
            if job_id is not None:
                query = query.where(Deployment.job_id == job_id)
            return [deployment_dict(d) for d in s.scalars(query)]


def _rollback(session: Session) -> None:
    try:
        session.rollback()
    except SQLAlchemyError:
        pass  # the connection is gone; the error that got us here is the one to report


def _check(status: str, allowed: tuple[str, ...], what: str) -> None:
    if status not in allowed:
        raise StoreError(f"unknown {what} status '{status}'; use one of: {', '.join(allowed)}")


def _job(s: Session, job_id: str) -> Job:
    job = s.get(Job, job_id)
    if job is None:
        raise StoreError(f"no job '{job_id}'; see `slimray jobs`")
    return job


def _find_trial(s: Session, job_id: str, trial_id: str) -> Optional[Trial]:
    return s.scalars(select(Trial).where(Trial.job_id == job_id, Trial.trial_id == trial_id)).first()


def _trial(s: Session, job_id: str, trial_id: str) -> Trial:
    trial = _find_trial(s, job_id, trial_id)
    if trial is None:
        _job(s, job_id)  # a wrong job id is the likelier mistake; say so
        raise StoreError(f"no trial '{trial_id}' in job '{job_id}'")
    return trial


def _trial_counts(s: Session, job_ids: list[str]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    if job_ids:
        query = (select(Trial.job_id, Trial.status, func.count())
                 .where(Trial.job_id.in_(job_ids)).group_by(Trial.job_id, Trial.status))
        for job_id, status, n in s.execute(query):
            counts.setdefault(job_id, {})[status] = n
    return counts


def _replace(live: list[Deployment], keep: Optional[Deployment]) -> None:
    now = utcnow()
    for deployment in live:
        if deployment is not keep:
            deployment.status = "replaced"
            deployment.ended_at = now


def _upsert(s: Session, model: type, row: dict[str, Any], keys: tuple[str, ...], update: tuple[str, ...]):
    """INSERT ... ON CONFLICT DO UPDATE: one statement, so two writers cannot both insert."""
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise StoreError(f"slimray's store supports sqlite and postgresql, not {dialect}")
    statement = insert(model).values(row)
    # excluded[...] by name: excluded.values would be ColumnCollection.values().
    return statement.on_conflict_do_update(index_elements=list(keys),
                                           set_={column: statement.excluded[column] for column in update})
