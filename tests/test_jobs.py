"""End-to-end search jobs on a local Ray: spec → Tune (TPE + ASHA) → DeepSpeed trials → SQL store → CLI."""
import json

import pytest
from typer.testing import CliRunner

from conftest import record_fault, submit_with_fault, tiny_job
from db import Store
from orchestrator.cli import app
from orchestrator.jobs import submit
from orchestrator.spec import parse

pytestmark = pytest.mark.slow


def test_search_records_every_trial_once_and_cli_reads_them(tiny_teacher_dir, tmp_path, ray_local, monkeypatch):
    raw = tiny_job(tiny_teacher_dir, tmp_path)
    job_id = submit(parse(raw))
    store = Store(raw["storage"]["db_url"])
    job = store.get_job(job_id)
    trials = store.trials(job_id)
    assert job["status"] == "finished" and job["baseline"]["metric"] > 0
    assert len(trials) == 4 and len({t["trial_id"] for t in trials}) == 4
    assert all(t["config"]["student"]["layers"] in (1, 2) for t in trials)
    done = [t for t in trials if t["status"] == "terminated"]
    assert done and all(t["size_bytes"] > 0 and t["latency_ms_b1"] > 0 and t["artifact_uri"] for t in done)
    assert all(t["status"] in ("terminated", "stopped_early") for t in trials)
    assert any(t["on_front"] for t in done)
    assert store.metric_history(job_id, done[0]["trial_id"])  # per-step history was recorded
    # sizes are real: a 1-layer student's artifact is smaller than a 2-layer one's
    by_layers = {t["config"]["student"]["layers"]: t["size_bytes"] for t in done if t["config"].get("prune",
                 {}).get("kind", "none") == "none" and t["config"].get("quant", {}).get("mode", "none") == "none"}
    if len(by_layers) == 2:
        assert by_layers[1] < by_layers[2]

    monkeypatch.setenv("SLIMRAY_DB_URL", raw["storage"]["db_url"])
    runner = CliRunner()
    out = runner.invoke(app, ["results", job_id, "--format", "json"])
    assert out.exit_code == 0, out.output
    assert len(json.loads(out.output)["trials"]) == 4
    out = runner.invoke(app, ["results", job_id, "--format", "csv", "--pareto"])
    assert out.exit_code == 0 and out.output.count("\n") == 1 + sum(t["on_front"] for t in trials)  # header + rows
    plot = tmp_path / "front.png"
    out = runner.invoke(app, ["pareto", job_id, "--plot", str(plot)])
    assert out.exit_code == 0, out.output
    assert plot.stat().st_size > 10_000 and "hypervolume" in out.output
    out = runner.invoke(app, ["jobs"])
    assert job_id[:10] in out.output
    out = runner.invoke(app, ["status"])  # no job: the recent ones
    assert out.exit_code == 0 and job_id[:10] in out.output
    out = runner.invoke(app, ["results", "no-such-job"])
    assert out.exit_code == 2 and "no job 'no-such-job'" in out.output


def test_failing_trial_is_recorded_with_traceback(tiny_teacher_dir, tmp_path, ray_local):
    # the teacher has 2 layers: a 5-layer student is impossible and fails inside the trial
    raw = tiny_job(tiny_teacher_dir, tmp_path, search={"student": {"layers": [5]}, "prune": {"kind": "none"},
                                                       "quant": {"mode": "none"}},
                   budget={"num_trials": 2, "max_concurrent": 1, "max_failures": 0},
                   algorithm={"name": "random", "asha": False})
    job_id = submit(parse(raw))
    store = Store(raw["storage"]["db_url"])
    trials = store.trials(job_id)
    assert store.get_job(job_id)["status"] == "finished"
    assert len(trials) == 2 and all(t["status"] == "error" for t in trials)
    assert all(t["error"].startswith("common.errors.ConfigError: student.layers") for t in trials)
    assert all("pick_layers" in t["traceback"] and "\x1b[" not in t["traceback"] for t in trials)


def test_driver_killed_mid_search_is_resumed_without_loss(tiny_teacher_dir, tmp_path, ray_local):
    """SIGKILL the driver (and its embedded Ray) after the first trial lands; `resume` completes the job."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from orchestrator.jobs import resume

    raw = tiny_job(tiny_teacher_dir, tmp_path, algorithm={"name": "random", "asha": False},
                   budget={"num_trials": 4, "max_concurrent": 1},
                   task={"train_size": 2000, "eval_size": 100, "max_length": 32},
                   train={"epochs": 2, "batch_size": 16, "eval_every": 25})  # trials long enough to kill one
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(raw))
    job_id = "tiny-killed"
    code = ("import json, sys; from orchestrator.jobs import submit; from orchestrator.spec import parse; "
            f"submit(parse(json.load(open({str(spec_file)!r}))), job_id={job_id!r})")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded Ray, not the test's
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=log, stderr=log,
                            env={**env, "PYTHONPATH": os.getcwd()})
    store = Store(raw["storage"]["db_url"])
    tune_dir = tmp_path / "jobs" / job_id / "tune"

    def tune_saved_a_finished_trial() -> bool:
        # Tune snapshots its state every few seconds (TUNE_GLOBAL_CHECKPOINT_S); resume restores the newest one
        for path in tune_dir.glob("experiment_state-*.json"):
            try:
                states = [json.loads(state) for state, _ in json.loads(path.read_text())["trial_data"]]
            except (OSError, ValueError, KeyError):
                continue  # still being written
            if any(state.get("status") == "TERMINATED" for state in states):
                return True
        return False

    def first_trial_recorded_and_saved() -> bool:
        try:
            recorded = any(t["status"] == "terminated" for t in store.trials(job_id))
        except Exception:  # the job row may not exist yet
            return False
        return recorded and tune_saved_a_finished_trial()

    deadline = time.time() + 300
    try:
        while not first_trial_recorded_and_saved():
            assert time.time() < deadline, "no Tune snapshot recorded a finished trial within 300 s"
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-2000:]
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {t["trial_id"]: t["status"] for t in store.trials(job_id)}
    assert 1 <= sum(s == "terminated" for s in before.values()) < 4

    resume(job_id, store=store)
    trials = store.trials(job_id)
    record_fault("driver SIGKILLed mid-search, then `slimray resume`", injected=1, trials=4, recorded=len(trials),
                 duplicates=len(trials) - len({t["trial_id"] for t in trials}),
                 lost=4 - sum(t["status"] == "terminated" for t in trials),
                 retried=sum(t["attempts"] > 1 for t in trials))
    assert store.get_job(job_id)["status"] == "finished"
    assert len(trials) == 4 and len({t["trial_id"] for t in trials}) == 4  # nothing duplicated
    assert all(t["status"] == "terminated" for t in trials)  # nothing lost
    # the trial running at the kill ran again; one that finished just before the kill may also run again if
    # Tune's last state snapshot predates it: either way it is one row, its attempts counted
    assert sum(t["attempts"] for t in trials) >= 5
    assert all(t["artifact_uri"] and t["size_bytes"] > 0 for t in trials)


def test_multi_worker_trials_run_on_ray_train(tiny_teacher_dir, tmp_path, ray_local):
    """resources.workers > 1 launches the recipe on a TorchTrainer: two DeepSpeed ranks, same metrics out."""
    raw = tiny_job(tiny_teacher_dir, tmp_path, search={"student": {"layers": [1]}, "prune": {"kind": "none"},
                                                       "quant": {"mode": "none"}},
                   algorithm={"name": "random", "asha": False}, budget={"num_trials": 1, "max_concurrent": 1},
                   resources={"workers": 2, "cpus": 0.5})
    job_id = submit(parse(raw))
    store = Store(raw["storage"]["db_url"])
    [trial] = store.trials(job_id)
    assert trial["status"] == "terminated", trial["error"]
    assert trial["result"]["train_workers"] == 2 and trial["size_bytes"] > 0 and trial["latency_ms_b1"] > 0


def test_killed_trial_process_resumes_from_its_checkpoint(tiny_teacher_dir, tmp_path, ray_local):
    """SIGKILL the process running a trial after its first checkpoint: Tune retries it (FailureConfig) and
    the recipe continues from the DeepSpeed checkpoint instead of step 0."""
    import os
    import signal

    import psutil

    raw = tiny_job(tiny_teacher_dir, tmp_path, algorithm={"name": "random", "asha": False},
                   search={"student": {"layers": [2]}, "prune": {"kind": "none"}, "quant": {"mode": "none"}},
                   budget={"num_trials": 1, "max_concurrent": 1, "max_failures": 2},
                   task={"train_size": 400, "eval_size": 100, "max_length": 32},
                   train={"epochs": 2, "batch_size": 16, "eval_every": 10})
    killed = {}

    def kill_trial_processes():
        # only this test's Ray (started by this process): other Ray sessions on the machine keep their trials
        for proc in psutil.Process().children(recursive=True):
            try:
                cmdline = proc.cmdline()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if any("ImplicitFunc" in part for part in cmdline):
                os.kill(proc.pid, signal.SIGKILL)
                killed["pid"] = proc.pid
        if not killed:
            raise RuntimeError("no trial process yet")  # the watcher tries again

    job_id, _ = submit_with_fault(
        raw, lambda store, trials: bool(trials) and bool(store.metric_history(trials[0]["job_id"],
                                                                              trials[0]["trial_id"])),
        kill_trial_processes, poll_s=0.2)
    store = Store(raw["storage"]["db_url"])
    trials = store.trials(job_id)
    record_fault("trial process SIGKILLed after its first checkpoint", injected=int(bool(killed)), trials=1,
                 recorded=len(trials), duplicates=0, lost=1 - sum(t["status"] == "terminated" for t in trials),
                 retried=sum(t["attempts"] > 1 for t in trials),
                 resumed_from_step=trials[0]["result"].get("resumed_from_step") if trials else None)
    [trial] = trials
    assert killed, "the trial finished before it could be killed"
    assert trial["status"] == "terminated" and trial["attempts"] == 2
    assert trial["result"]["resumed_from_step"] >= 10  # continued from the checkpoint, not from scratch
    assert trial["result"]["train_steps"] == 50
