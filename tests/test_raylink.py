"""common.raylink and the serve commands that use it: which Ray they find, and what they say when there is none.

The cheap tests start no Ray. The slow one runs slimray as a user would, in separate processes: the demo's
promotion (after a search on an embedded Ray) starts the local slimray head and leaves the endpoint on it, then
`promote`, `predict`, `serve status` and `serve stop` (each a fresh process) find that head, and the head is
stopped at the end (its own processes only).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import promotion_store, tiny_artifact

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A SLIMRAY_HOME and store of this test's own, with no cluster named anywhere."""
    monkeypatch.setenv("SLIMRAY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SLIMRAY_DB_URL", f"sqlite:///{tmp_path}/slimray.db")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("SLIMRAY_API_TOKEN", raising=False)
    return tmp_path


def test_local_head_is_found_only_while_it_listens(home, monkeypatch):
    from common import raylink

    head = raylink.head_dir()
    assert head.name.startswith("slimray-ray-") and len(str(head)) < 40  # Ray's sockets live below it
    assert raylink.local_head_address() is None
    head.mkdir(parents=True, exist_ok=True)
    try:
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            address = f"127.0.0.1:{server.getsockname()[1]}"
            (head / "ray_current_cluster").write_text(address)
            assert raylink.local_head_address() == address
        assert raylink.local_head_address() is None  # recorded, but nothing listens any more
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
        assert raylink.local_head_address() == "10.0.0.9:6379"
    finally:
        shutil.rmtree(head)


def _cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """`slimray ARGS` in a fresh process (no Ray imported, none connected), as a user runs it."""
    # wide: an error line is one line however long, as it would be in a wide terminal
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**(env or os.environ), "COLUMNS": "400"})


def test_serve_commands_without_a_cluster_say_so_in_one_line(home):
    status = _cli("serve", "status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.strip().splitlines() == [
        "no Serve is running: no local slimray Ray head, and no --address or RAY_ADDRESS"]
    assert "Traceback" not in status.stdout + status.stderr
    stop = _cli("serve", "stop")
    assert stop.returncode == 1, stop.stdout + stop.stderr
    assert len(stop.stdout.strip().splitlines()) == 1 and "nothing to stop" in stop.stdout
    assert "Traceback" not in stop.stdout + stop.stderr
    state = json.loads(_cli("serve", "status", "--json").stdout)
    assert state["ray"] is None and state["serve"]["applications"] == {} and state["live_deployment"] is None


def test_an_unreachable_address_is_one_line_not_a_traceback(home):
    from common.ports import free_port

    out = _cli("serve", "status", "--address", f"127.0.0.1:{free_port()}", timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot join the Ray cluster at 127.0.0.1:"), lines
    assert "nothing listens there" in lines[0]


def test_status_marks_a_live_deployment_that_nothing_serves_stopped(home):
    from common.ports import free_port

    store = promotion_store(os.environ["SLIMRAY_DB_URL"], "job-gone", [
        {"trial_id": "t1", "metric": 89.0, "metric_drop": 1.0, "size_bytes": 1_000_000, "latency_ms_b1": 1.0,
         "artifact_uri": str(home / "nowhere")}])
    dead = f"http://127.0.0.1:{free_port()}"
    store.record_deployment("job-gone", "t1", dead, "tester")
    out = _cli("serve", "status")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[1].startswith(f"the store listed job job-gone, trial t1 as live at {dead}, but nothing answers")
    assert lines[1].endswith("marked it stopped")
    assert store.live_deployment() is None and store.deployments("job-gone")[0]["status"] == "stopped"
    again = _cli("serve", "status", "--json")
    assert json.loads(again.stdout)["live_deployment"] is None  # nothing left to reconcile


def test_connect_starts_once_and_is_reused(ray_local):
    import ray

    from common.raylink import connect, find_serving_ray

    node = ray.get_runtime_context().get_node_id()
    connect()
    connect("127.0.0.1:1")  # a process already connected stays with its Ray, whatever it is asked
    assert ray.get_runtime_context().get_node_id() == node
    assert find_serving_ray() == ray.get_runtime_context().gcs_address


def _stop_head(temp_dir: Path) -> None:
    """Stop only this head's processes (`ray stop` would stop every Ray on the machine)."""
    import psutil

    procs = set()
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(temp_dir) in " ".join(p.info["cmdline"] or []):
                procs |= {p, *p.children(recursive=True)}  # its workers name no temp dir
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(procs), timeout=30)


# What `slimray demo` does after its search: leave the search's embedded Ray, then promote to the local head.
DEMO_PROMOTION = """
import sys
from common.paths import open_store
from common.raylink import connect, disconnect
from orchestrator.promote import promote

connect(num_cpus=1)
disconnect()
print(promote(sys.argv[1], store=open_store(), detached=True, port=int(sys.argv[2]))["endpoint"])
"""


@pytest.mark.slow
def test_promote_leaves_a_head_that_predict_status_and_stop_find(home):
    from common import raylink
    from common.ports import free_port

    art = tiny_artifact(home / "art", labels=("0", "1"), meta={
        "task": {"dataset": "glue/sst2", "text_columns": ["sentence"]}, "label_names": ["negative", "positive"]})
    store = promotion_store(os.environ["SLIMRAY_DB_URL"], "job-head", [
        {"trial_id": "t1", "metric": 89.0, "metric_drop": 1.0, "size_bytes": 1_000_000, "latency_ms_b1": 1.0,
         "artifact_uri": art.uri}])
    port = free_port()
    head = raylink.head_dir()
    try:
        demo = subprocess.run([sys.executable, "-c", DEMO_PROMOTION, "job-head", str(port)], capture_output=True,
                              text=True, timeout=600, cwd=REPO)
        assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
        assert demo.stdout.split()[-1] == f"http://127.0.0.1:{port}"
        assert raylink.local_head_address()  # the head outlives the process that started it
        out = _cli("promote", "job-head", "--port", str(port), timeout=600)  # a second promotion joins that head
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert f"serving trial t1 of job-head at http://127.0.0.1:{port}" in " ".join(out.stdout.split())

        answer = _cli("predict", "a good film")
        assert answer.returncode == 0, answer.stdout + answer.stderr
        assert answer.stdout.split()[0] in ("negative", "positive"), answer.stdout
        status = _cli("serve", "status")
        assert status.returncode == 0 and "Traceback" not in status.stdout + status.stderr, status.stderr
        assert f"slimray: RUNNING at http://127.0.0.1:{port}" in status.stdout, status.stdout
        assert "live: job job-head, trial t1" in status.stdout

        stop = _cli("serve", "stop")
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert stop.stdout.startswith("stopped slimray on the Ray at 127.0.0.1:")
        assert store.live_deployment() is None and store.deployments("job-head")[0]["status"] == "stopped"
        state = json.loads(_cli("serve", "status", "--json").stdout)
        assert state["ray"] == raylink.local_head_address() and "slimray" not in state["serve"]["applications"]
        assert _cli("serve", "stop").returncode == 1  # nothing left to stop
    finally:
        _stop_head(head)
        shutil.rmtree(head, ignore_errors=True)
