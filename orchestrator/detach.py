"""`slimray submit --detach`: the driver runs on the cluster through the Ray Jobs API and outlives the client."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from common.errors import SlimrayError

__all__ = ["submit_detached", "dashboard_url"]

AGENT_WAIT_S = 90


def dashboard_url(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SlimrayError("--detach needs a running Ray cluster: pass --address http://HOST:8265 (its dashboard) or "
                           "set RAY_ADDRESS; locally: `ray start --head --dashboard-host 127.0.0.1`")
    if address.startswith(("http://", "https://")):
        return address
    host = address.removeprefix("ray://").split(":")[0]
    return f"http://{host or '127.0.0.1'}:8265"


def submit_detached(spec, job_id: str) -> str:
    import yaml
    from ray.job_submission import JobSubmissionClient

    from common.paths import open_store
    from workers.teacher import code_version

    store = open_store(spec.storage.db_url)
    # the row exists before the driver starts, so `slimray status` works at once; the driver's create is idempotent
    store.create_job(job_id, spec.name, spec.stored(), teacher=spec.teacher, dataset=spec.task.dataset,
                     code_version=code_version())
    work = Path(tempfile.mkdtemp(prefix=f"slimray-{job_id}-"))
    # the spec as parsed, not as stored: the driver needs the real database URL; inside the cluster it joins
    # Ray with address=auto
    (work / "job.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json", exclude={"ray_address"})))
    env = {k: v for k, v in os.environ.items() if k.startswith("SLIMRAY_")}
    env.setdefault("SLIMRAY_DB_URL", store.url)
    env["RAY_ADDRESS"] = "auto"
    url = dashboard_url(spec.ray_address)
    # A head that has just started answers "No available agent to submit job" until its job agent is up.
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            JobSubmissionClient(url).submit_job(
                entrypoint=f"slimray submit job.yaml --job-id {job_id} --quiet", submission_id=f"slimray-{job_id}",
                runtime_env={"working_dir": str(work), "env_vars": env})
            return job_id
        except (RuntimeError, ConnectionError, ValueError) as err:
            if "No available agent" in str(err) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            why = (str(err).strip().splitlines() or [type(err).__name__])[-1][:300]
            store.set_job_status(job_id, "failed", error=f"detached submission failed: {why}")
            raise SlimrayError(f"could not submit job {job_id} through the Ray Jobs API at {url}: {why}; is the "
                               f"cluster up and its dashboard reachable from here?") from err
