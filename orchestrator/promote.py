"""Promotion: a job's Pareto front → latency re-measured serially here → the constrained pick → a live endpoint.

    promote(job_id)                       lowest batch-1 latency with metric drop ≤ the job's max_metric_drop
    promote(job_id, Constraints(max_metric_drop=0.5, max_size_mb=20))
    promote(job_id, trial="trial_0003")   that trial, whatever the constraints

The latencies the trials reported were measured while other trials trained on the same cores; promotion
times every front member again, one after another in this process, and trusts only those numbers. Likewise the
metric limit is held against the dev split, which a search that chose on a selection split never saw.
The old model keeps serving until the new replica is up (deploy.control's rolling update), and the store gets
one Deployment row per promotion: ``live`` (the previous one becomes ``replaced``), or ``failed``.
"""
from __future__ import annotations

import getpass
import os
from datetime import datetime, timezone

from common.errors import ConfigError, DeployError, SlimrayError
from orchestrator.report import chose_on_selection, on_dev
from orchestrator.spec import Constraints, from_stored
from common.raylink import serving_ray

__all__ = ["promote", "remeasure"]

MIN_RUNS = 20  # a median of fewer timed runs moves by more than the gaps between front members


def remeasure(store, job_id: str, trials: list[dict], *, seq_len: int, runs: int = MIN_RUNS) -> tuple[dict, dict]:
    """Batch-1 latency (median of ``runs``, 1 thread) of each trial's artifact, one after another, each stored
    with ``set_remeasured_latency``. Returns ``({trial_id: ms}, {trial_id: why it could not be measured})``."""
    from workers.artifacts import load
    from workers.evaluate import latency_ms

    measured, unusable = {}, {}
    for t in trials:
        tid = t["trial_id"]
        if not t.get("artifact_uri"):
            unusable[tid] = "no artifact recorded"
            continue
        if t.get("artifact_deleted"):
            unusable[tid] = "its artifact was removed by `slimray gc`"
            continue
        try:
            model, _, _ = load(t["artifact_uri"], with_tokenizer=False)
        except (SlimrayError, OSError) as err:
            unusable[tid] = f"artifact does not load ({str(err).splitlines()[0][:120]})"
            continue
        positions = getattr(model.config, "max_position_embeddings", None) or seq_len
        ms = latency_ms(model, batch=1, seq_len=min(seq_len, positions), runs=runs, threads=1)
        del model  # one model in memory at a time: the next one is timed in a quiet process
        store.set_remeasured_latency(job_id, tid, ms)
        measured[tid] = ms
    return measured, unusable


def _drop(t: dict, baseline: dict, selection: bool) -> float | None:
    """Points below the teacher on the dev split (None: never measured there)."""
    drop = on_dev(t, "metric_drop", selection)
    if drop is not None:
        return float(drop)
    metric, bar = on_dev(t, "metric", selection), on_dev(baseline, "metric", selection)
    if metric is not None and bar is not None:
        return float(bar) - float(metric)
    return None


def _brief(r: dict) -> str:
    def num(v, fmt):
        return "?" if v is None else format(v, fmt)

    size = None if r.get("size_bytes") is None else r["size_bytes"] / 1e6
    return (f"{r['trial_id']} (drop {num(r.get('metric_drop'), '.2f')}, {num(size, '.2f')} MB, "
            f"{num(r.get('latency_ms_b1'), '.2f')} ms)")


def _choose(job_id: str, rows: list[dict], constraints: Constraints, unusable: dict) -> dict:
    from search.pareto import closest, pick

    chosen = pick(rows, **constraints.limits(), minimize="latency_ms_b1")
    if chosen is not None:
        return chosen
    near = closest(rows, **constraints.limits(), minimize="latency_ms_b1", n=3) if rows else []
    skipped = f"; {len(unusable)} front trial(s) without a loadable artifact" if unusable else ""
    raise DeployError(f"no trial on the Pareto front of job {job_id} meets {constraints.describe()}; closest: "
                      f"{', '.join(map(_brief, near)) or 'none'}{skipped}; relax a limit (--max-drop, "
                      f"--max-size-mb, --max-latency-ms) or pick one with --trial ID")


def promote(job_id: str, constraints: Constraints | None = None, *, trial: str | None = None, store=None,
            who: str | None = None, route_prefix: str = "/", port: int = 8000, name: str = "slimray",
            address: str | None = None, detached: bool = False, runtime: str = "torch") -> dict:
    """Serve the best model of ``job_id`` (or ``trial``) and record the deployment; returns what was done.

    ``runtime``: torch, onnxruntime (the trial's ONNX export, made when missing) or auto (ONNX Runtime only
    when it is faster at batch 1 by more than the measurement's spread).

    ``constraints`` default to the job spec's ``constraints`` section (metric drop ≤ 1.0 point when it has
    none). Ray: the connected one; else ``address``/RAY_ADDRESS; else, with ``detached``, the local slimray
    head that outlives this process (the CLI's choice); else an embedded Ray that ends with this process.
    """
    from common.paths import open_store
    from orchestrator.exporting import RUNTIME_CHOICES, prepare_runtime

    if runtime not in RUNTIME_CHOICES:
        raise ConfigError(f"runtime: must be one of {', '.join(RUNTIME_CHOICES)}, got {runtime!r}")
    store = store or open_store()
    job = store.get_job(job_id)
    spec, baseline = from_stored(job["spec"]), job.get("baseline") or {}
    selection = chose_on_selection(job)
    if constraints is None:
        constraints = spec.constraints
    elif not isinstance(constraints, Constraints):
        raise ConfigError(f"constraints: must be a Constraints, got {type(constraints).__name__}")
    trials = store.trials(job_id)
    front = [t for t in trials if t["on_front"]]
    if trial is not None:
        explicit = next((t for t in trials if t["trial_id"] == trial), None)
        if explicit is None:
            raise DeployError(f"job {job_id} has no trial {trial!r}; see `slimray results {job_id}`")
        if explicit.get("artifact_deleted"):
            raise DeployError(f"trial {trial} of job {job_id} cannot be promoted: its artifact was removed by "
                              f"`slimray gc`; pick a kept trial (see `slimray results {job_id}`)")
        if explicit["status"] == "error" or not explicit.get("artifact_uri"):
            raise DeployError(f"trial {trial} of job {job_id} has no model to serve (status {explicit['status']}, "
                              f"artifact {explicit.get('artifact_uri') or 'none'}); pick another with --trial")
        if not explicit["on_front"]:
            front.append(explicit)  # measured with the front, so its row is comparable
    if not front:
        raise DeployError(f"job {job_id} has no Pareto front yet (status {job['status']}); wait for it to finish "
                          f"or pick a trial with --trial ID (see `slimray results {job_id}`)")

    # timed as the job timed its trials, with enough runs to rank the front
    measured, unusable = remeasure(store, job_id, front, seq_len=spec.seq_len, runs=max(MIN_RUNS, spec.latency.runs))
    # the dev split's metric and drop; the selection split's, where the search chose on one, kept beside them
    rows = [{**t, "latency_ms_b1": measured[t["trial_id"]], "reported_latency_ms_b1": t.get("latency_ms_b1"),
             "metric": on_dev(t, "metric", selection), "metric_drop": _drop(t, baseline, selection),
             "selection_metric": t.get("metric") if selection else None} for t in front if t["trial_id"] in measured]
    if trial is not None:
        if trial in unusable:
            raise DeployError(f"trial {trial} of job {job_id}: {unusable[trial]}; pick another with --trial")
        chosen = next(r for r in rows if r["trial_id"] == trial)
    else:
        chosen = _choose(job_id, rows, constraints, unusable)
    served = prepare_runtime(job_id, chosen, runtime, seq_len=spec.seq_len,
                             runs=max(MIN_RUNS, spec.latency.runs), store=store)
    return _deploy(store, job_id, chosen, {**baseline, "metric": on_dev(baseline, "metric", selection)},
                   None if trial is not None else constraints,
                   who=who or _user(), route_prefix=route_prefix, port=port, name=name, address=address,
                   detached=detached, front=rows, served=served)


def _deploy(store, job_id: str, chosen: dict, baseline: dict, constraints: Constraints | None, *, who: str,
            route_prefix: str, port: int, name: str, address: str | None, detached: bool, front: list[dict],
            served: dict | None = None) -> dict:
    from deploy import control

    tid = chosen["trial_id"]
    info = {"job": job_id, "trial": tid, "who": who, "promoted_at": datetime.now(timezone.utc).isoformat(),
            "metric": chosen.get("metric"), "metric_drop": chosen.get("metric_drop"),
            "selection_metric": chosen.get("selection_metric"),
            "size_bytes": chosen.get("size_bytes"), "latency_ms_b1": chosen["latency_ms_b1"],
            "teacher": {k: baseline.get(k) for k in ("metric", "size_bytes", "latency_ms_b1", "uri")},
            "constraints": constraints.model_dump() if constraints else None}
    served = served or {"runtime": "torch"}
    info["runtime"] = served["runtime"]
    if served.get("timing"):
        info["runtime_timing"] = served["timing"]  # auto: both medians and spreads, as measured here
    endpoint = control.endpoint_url(port, route_prefix)
    previous = store.live_deployment()
    dep_id = store.record_deployment(job_id, tid, endpoint, who)
    try:
        if address or detached:
            serving_ray(address)
        control.deploy(chosen["artifact_uri"], name=name, route_prefix=route_prefix, port=port, info=info,
                       runtime=served["runtime"])
    except Exception as err:
        if previous is None or previous["id"] != dep_id:
            store.set_deployment_status(dep_id, "failed")
            if previous is not None:
                store.set_deployment_status(previous["id"], "live")  # it never stopped serving
        if isinstance(err, SlimrayError):
            raise
        raise DeployError(f"promoting trial {tid} of job {job_id} failed: {str(err).splitlines()[0][:300]}") \
            from err
    return {"job_id": job_id, "trial_id": tid, "endpoint": endpoint, "deployment_id": dep_id,
            "artifact_uri": chosen["artifact_uri"], "metric": chosen.get("metric"),
            "metric_drop": chosen.get("metric_drop"), "size_bytes": chosen.get("size_bytes"),
            "latency_ms_b1": chosen["latency_ms_b1"], "constraints": info["constraints"],
            "runtime": served["runtime"], "runtime_timing": served.get("timing"),
            "front": [{k: r.get(k) for k in ("trial_id", "metric", "metric_drop", "selection_metric", "size_bytes",
                                             "latency_ms_b1", "reported_latency_ms_b1")} for r in front]}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return os.environ.get("USER") or "unknown"
