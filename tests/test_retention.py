"""`slimray gc`: the front, the top k by metric and the serving trial keep their artifacts; the rest go, their
rows stay marked; promotion refuses a gc'ed trial with one line."""
from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import DeployError, SlimrayError
from conftest import tiny_artifact, tiny_job

# (metric, size_bytes, latency_ms_b1): a, b, c form the front; d, e, f are each dominated by one of them
TRIALS = {"a": (90.0, 3_000_000, 3.0), "b": (85.0, 2_000_000, 2.0), "c": (80.0, 1_000_000, 1.0),
          "d": (88.0, 3_500_000, 3.5), "e": (79.0, 2_500_000, 2.5), "f": (70.0, 1_500_000, 1.5)}


@pytest.fixture
def job(tiny_teacher_dir, tmp_path):
    from db import Store

    store = Store(f"sqlite:///{tmp_path}/slimray.db")
    store.create_job("j", "tiny", tiny_job(tiny_teacher_dir, tmp_path), teacher="t", dataset="d")
    for tid, (metric, size, latency) in TRIALS.items():
        info = tiny_artifact(tmp_path / "jobs" / "j" / "trials" / tid, layers=1)
        store.trial_started("j", tid, {"student": {"layers": 1}})
        store.trial_finished("j", tid, "terminated", {"metric": metric, "size_bytes": size, "latency_ms_b1": latency})
        store.add_artifact("j", tid, info.uri, info.size_bytes, info.sha256)
    store.set_job_status("j", "finished")
    return store


def _on_disk(store) -> dict:
    return {t["trial_id"]: Path(t["artifact_uri"]).is_dir() for t in store.trials("j")}


def test_gc_keeps_the_front_and_the_best_and_removes_the_rest(job):
    from orchestrator.retention import gc

    done = gc("j", keep_top=1, store=job)
    assert set(done.kept) == {"a", "b", "c"}  # the front; the best by metric (a) is on it
    assert set(done.deleted) == {"d", "e", "f"} and done.freed_bytes > 0
    assert _on_disk(job) == {"a": True, "b": True, "c": True, "d": False, "e": False, "f": False}
    rows = {t["trial_id"]: t for t in job.trials("j")}
    assert [tid for tid, t in rows.items() if t["artifact_deleted"]] == ["d", "e", "f"]
    assert rows["d"]["metric"] == 88.0 and rows["d"]["artifact_uri"]  # the row and its numbers stay
    assert gc("j", keep_top=1, store=job).deleted == ()  # nothing left to do


def test_gc_keeps_the_top_k_by_metric_and_the_serving_trial(job):
    from orchestrator.retention import gc

    job.record_deployment("j", "f", "http://127.0.0.1:8000/", "tester")
    done = gc("j", keep_top=3, store=job)  # top 3 by metric: a, d, b
    assert set(done.kept) == {"a", "b", "c", "d", "f"} and done.deleted == ("e",)
    assert _on_disk(job)["f"] and _on_disk(job)["d"] and not _on_disk(job)["e"]


def test_dry_run_removes_nothing(job):
    from orchestrator.retention import gc

    done = gc("j", keep_top=0, store=job, dry_run=True)
    assert set(done.deleted) == {"d", "e", "f"}
    assert all(_on_disk(job).values()) and not any(t["artifact_deleted"] for t in job.trials("j"))


def test_promotion_refuses_a_gced_trial_with_one_line(job):
    from orchestrator.promote import promote
    from orchestrator.retention import gc

    gc("j", keep_top=1, store=job)
    with pytest.raises(DeployError) as info:
        promote("j", trial="d", store=job)
    message = str(info.value)
    assert "\n" not in message and "removed by `slimray gc`" in message and "trial d" in message


def test_gc_refuses_a_running_job_and_a_directory_that_is_not_an_artifact(job, tmp_path):
    from orchestrator.retention import gc

    job.set_job_status("j", "running")
    with pytest.raises(SlimrayError, match="is running"):
        gc("j", store=job)
    job.set_job_status("j", "finished")
    stranger = tmp_path / "not-an-artifact"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    job.add_artifact("j", "e", str(stranger), 1, "0" * 64)
    with pytest.raises(SlimrayError, match="does not look like a slimray artifact"):
        gc("j", keep_top=0, store=job)
    assert (stranger / "notes.txt").is_file() and not any(t["artifact_deleted"] for t in job.trials("j"))


def test_cli_gc_prints_what_it_removed(job, monkeypatch):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    monkeypatch.setenv("SLIMRAY_DB_URL", job.url)
    out = CliRunner().invoke(app, ["gc", "j", "--keep-top", "1"])
    assert out.exit_code == 0, out.output
    assert "removed 3 artifact(s)" in out.output and not any(_on_disk(job)[t] for t in "def")
