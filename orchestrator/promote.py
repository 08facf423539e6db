"""Promotion: a job's Pareto front → latency re-measured serially here → the constrained pick → a live endpoint.

    promote(job_id)                       lowest batch-1 latency with metric drop ≤ the job's max_metric_drop
    promote(job_id, Constraints(max_metric_drop=0.5, max_size_mb=20))
    promote(job_id, trial="trial_0003")   that trial, whatever the constraints

The latencies the trials reported were measured while other trials trained on the same cores; promotion
times every front member again, one after another in this process, and trusts only those numbers.
The old model keeps serving until the new replica is up (deploy.serve's rolling update), and the store gets
one Deployment row per promotion: ``live`` (the previous one becomes ``replaced``), or ``failed``.
"""
from __future__ import annotations

import getpass
import hashlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from common.errors import ConfigError, DeployError, SlimrayError
from orchestrator.spec import Constraints, from_stored
from common.ports import free_port

__all__ = ["promote", "remeasure", "serving_ray", "local_head_address", "loopback_env"]

log = logging.getLogger(__name__)

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


def _drop(t: dict, baseline: dict) -> float | None:
    if t.get("metric_drop") is not None:
        return float(t["metric_drop"])
    if t.get("metric") is not None and baseline.get("metric") is not None:
        return float(baseline["metric"]) - float(t["metric"])
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
            address: str | None = None, detached: bool = False) -> dict:
    """Serve the best model of ``job_id`` (or ``trial``) and record the deployment; returns what was done.

    ``constraints`` default to the job spec's ``constraints`` section (metric drop ≤ 1.0 point when it has
    none). Ray: the connected one; else ``address``/RAY_ADDRESS; else, with ``detached``, a local head that
    outlives this process (the CLI's choice); else an embedded Ray that ends with this process.
    """
    from common.paths import open_store

    # before deploy.serve imports Ray; the CLI (detached) joins the local slimray head unless given an address
    loopback_env(local_head=detached and not (address or os.environ.get("RAY_ADDRESS")))
    store = store or open_store()
    job = store.get_job(job_id)
    spec, baseline = from_stored(job["spec"]), job.get("baseline") or {}
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
    rows = [{**t, "latency_ms_b1": measured[t["trial_id"]], "reported_latency_ms_b1": t.get("latency_ms_b1"),
             "metric_drop": _drop(t, baseline)} for t in front if t["trial_id"] in measured]
    if trial is not None:
        if trial in unusable:
            raise DeployError(f"trial {trial} of job {job_id}: {unusable[trial]}; pick another with --trial")
        chosen = next(r for r in rows if r["trial_id"] == trial)
    else:
        chosen = _choose(job_id, rows, constraints, unusable)
    return _deploy(store, job_id, chosen, baseline, None if trial is not None else constraints,
                   who=who or _user(), route_prefix=route_prefix, port=port, name=name, address=address,
                   detached=detached, front=rows)


def _deploy(store, job_id: str, chosen: dict, baseline: dict, constraints: Constraints | None, *, who: str,
            route_prefix: str, port: int, name: str, address: str | None, detached: bool, front: list[dict]) -> dict:
    from deploy import serve as serving

    tid = chosen["trial_id"]
    info = {"job": job_id, "trial": tid, "who": who, "promoted_at": datetime.now(timezone.utc).isoformat(),
            "metric": chosen.get("metric"), "metric_drop": chosen.get("metric_drop"),
            "size_bytes": chosen.get("size_bytes"), "latency_ms_b1": chosen["latency_ms_b1"],
            "teacher": {k: baseline.get(k) for k in ("metric", "size_bytes", "latency_ms_b1", "uri")},
            "constraints": constraints.model_dump() if constraints else None}
    endpoint = serving.endpoint_url(port, route_prefix)
    previous = store.live_deployment()
    dep_id = store.record_deployment(job_id, tid, endpoint, who)
    try:
        if address or detached:
            serving_ray(address)
        serving.deploy(chosen["artifact_uri"], name=name, route_prefix=route_prefix, port=port, info=info)
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
            "front": [{k: r.get(k) for k in ("trial_id", "metric", "metric_drop", "size_bytes", "latency_ms_b1",
                                             "reported_latency_ms_b1")} for r in front]}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return os.environ.get("USER") or "unknown"


# --------------------------------------------------------------------------- the Ray the endpoint lives on
#
# `slimray promote` must leave an endpoint that outlives it, so without --address / RAY_ADDRESS it starts (once)
# a local Ray head with `ray start --head` and every later command joins that head by its address:
#   * on 127.0.0.1 only, with its own temp dir: Ray's default one (/tmp/ray) holds the "latest cluster" file
#     that every plain ray.init() on this machine would join, and other people's tests must not land on ours;
#   * with Ray's token authentication on (the head would enable it anyway when ~/.ray/auth_token exists); a
#     driver given an explicit address sends the token only with RAY_AUTH_MODE=token.
# Ray reads these environment variables once, when it is first imported, hence `loopback_env` before any import.

def loopback_env(*, local_head: bool = False) -> None:
    """Set Ray's environment for this process before Ray is imported: every node and driver on 127.0.0.1
    (STACK.md); with ``local_head``, token auth for joining the slimray head. Values already set win."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if local_head and "ray" not in sys.modules:
        # once Ray is imported its driver keeps the mode it read, while processes it starts would read this:
        # set it only while both agree
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def _head_dir() -> Path:
    from common.paths import home

    # Short: Ray puts Unix sockets under it (≤ 107 characters); one per SLIMRAY_HOME.
    key = hashlib.sha1(str(home().resolve()).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / f"slimray-ray-{key}"


def _recorded_head() -> str | None:
    """The address `ray start` wrote into the head's temp dir, if that head still listens (no Ray import)."""
    try:
        address = (_head_dir() / "ray_current_cluster").read_text().strip()
    except OSError:
        return None
    return address if address and _listening(address) else None


def _listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False



def _start_head(temp_dir: Path) -> str:
    port = free_port()
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    temp_dir.mkdir(parents=True, exist_ok=True)
    log_file = temp_dir / "ray-start.log"
    if env.get("RAY_AUTH_MODE", "token").lower() == "token":
        # the head then runs with token auth; creates ~/.ray/auth_token only if it does not exist (never printed)
        subprocess.run(ray_cli + ["get-auth-token", "--generate"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, timeout=60, check=False)
        env["RAY_AUTH_MODE"] = "token"
    cmd = ray_cli + ["start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
                     "--disable-usage-stats", "--port", str(port), "--temp-dir", str(temp_dir),
                     # not the default 52365: another Ray on this machine (a running search) may hold it
                     "--dashboard-agent-listen-port", str(free_port())]
    log.info("starting a local Ray head: %s", " ".join(cmd))
    # Output to a file, not a pipe: the daemons `ray start` leaves behind inherit its stdout, and reading a pipe
    # they hold open would wait for them to exit.
    with open(log_file, "w") as out:
        try:
            code = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=180).returncode
        except subprocess.TimeoutExpired:
            raise DeployError(f"`ray start --head` did not finish in 180 s (log: {log_file}); give a running "
                              f"cluster with --address") from None
    if code != 0:
        lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
        raise DeployError(f"could not start a local Ray head ({(lines or ['no output'])[-1][:200]}; log: "
                          f"{log_file}); give a running cluster with --address or RAY_ADDRESS")
    return f"127.0.0.1:{port}"


def serving_ray(address: str | None = None) -> str | None:
    """Connect to the Ray that serves the endpoint and return its address: ``address`` (or RAY_ADDRESS) when
    given; else the local slimray head, started on 127.0.0.1 the first time, so that the endpoint outlives
    this process. A process already connected to Ray stays with it (and gets None)."""
    address = address or os.environ.get("RAY_ADDRESS")
    loopback_env(local_head=not address)
    import ray

    if ray.is_initialized():
        return None
    if not address:
        if "RAY_AUTH_MODE" not in os.environ:  # Ray was imported first: its driver would not send the token
            raise DeployError("this process loaded Ray before slimray could set RAY_AUTH_MODE=token for its local "
                              "head; run `slimray promote` in a fresh process, or give --address / RAY_ADDRESS")
        address = _recorded_head() or _start_head(_head_dir())
    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    return address


def local_head_address() -> str | None:
    """RAY_ADDRESS, else the address of a running local slimray head, else None; starts nothing, imports no Ray
    (call it before Ray is imported, then ``loopback_env(local_head=...)``)."""
    return os.environ.get("RAY_ADDRESS") or _recorded_head()
