"""`slimray submit --detach`: the driver goes to a real Ray head through its Jobs API, and the client returns at once.

The head is a separate `ray start --head` with its dashboard on 127.0.0.1 (its own temp dir and ports, token
authentication on as Ray 2.60 defaults to); everything in this test talks to it from other processes only.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_job
from common.ports import free_port

pytestmark = pytest.mark.slow



def _stop_head(temp_dir: Path) -> None:
    """Stop only this head's processes (`ray stop` would stop every Ray on the machine)."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(temp_dir) in " ".join(p.info["cmdline"] or []):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


@pytest.fixture
def head():
    temp_dir = Path(tempfile.mkdtemp(prefix="srd-", dir="/tmp"))  # short: Ray's Unix sockets live below it
    dashboard = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # the cluster's nodes find slimray on their PATH, as in deploy/cluster/Dockerfile
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    subprocess.run(ray_cli + ["get-auth-token", "--generate"], env=env, capture_output=True, timeout=60)
    started = subprocess.run(ray_cli + ["start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
                                        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                                        # the agent's default port (52365) belongs to any other Ray on the machine
                                        "--dashboard-agent-listen-port", str(free_port()),
                                        "--num-cpus", "2", "--temp-dir", str(temp_dir), "--disable-usage-stats"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                             timeout=180, text=True)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        yield {"dashboard": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_detached_submit_returns_at_once_and_the_cluster_runs_the_job(head, tiny_teacher_dir, tmp_path):
    from db import Store

    raw = tiny_job(tiny_teacher_dir, tmp_path, budget={"num_trials": 2, "max_concurrent": 1})
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(raw))
    env = {**head["env"], "SLIMRAY_HOME": str(tmp_path / "home")}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", str(spec), "--detach", "--address",
                          head["dashboard"], "--job-id", "detached-1"], env=env, capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parents[1])
    returned_after = time.monotonic() - t0
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "submitted detached-1 to the cluster" in out.stdout
    store = Store(raw["storage"]["db_url"])
    # the client is back while the driver is still at work on the cluster
    assert store.get_job("detached-1")["status"] in ("pending", "running"), returned_after
    deadline = time.monotonic() + 600
    while store.get_job("detached-1")["status"] in ("pending", "running") and time.monotonic() < deadline:
        ray_status = _ray_job_status(head)
        assert "failed" not in ray_status and "stopped" not in ray_status, _ray_job_logs(head)
        time.sleep(5)
    job = store.get_job("detached-1")
    assert job["status"] == "finished", (job.get("error"), _ray_job_logs(head))
    trials = store.trials("detached-1")
    assert len(trials) == 2 and all(t["status"] in ("terminated", "stopped_early") for t in trials)
    assert any(t["on_front"] for t in trials)
    for _ in range(30):  # the driver may still be exiting after its last store write
        if "succeeded" in _ray_job_status(head):
            break
        time.sleep(2)
    assert "succeeded" in _ray_job_status(head)


def _ray_job(head, what: str) -> str:
    out = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "job", what, "slimray-detached-1",
                          "--address", head["dashboard"]], env=head["env"], capture_output=True, text=True, timeout=120)
    return out.stdout + out.stderr


def _ray_job_status(head) -> str:
    """`ray job status` in lower case: "... 'slimray-detached-1' succeeded" (or running, failed, stopped)."""
    return _ray_job(head, "status").lower()


def _ray_job_logs(head) -> str:
    return _ray_job(head, "logs")[-3000:]
