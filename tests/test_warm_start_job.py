"""search.warm_start end to end: a second tiny job learns from the first one's trials without rerunning them."""
import pytest

from conftest import tiny_job
from db import Store
from orchestrator.jobs import submit
from orchestrator.spec import parse

OBJECTIVES = ("metric", "size_bytes", "latency_ms_b1")


@pytest.mark.slow
def test_second_job_is_seeded_with_the_first_ones_trials_and_records_its_source(tiny_teacher_dir, tmp_path,
                                                                                 ray_local, monkeypatch):
    from ray.tune.search.optuna import OptunaSearch
    from typer.testing import CliRunner

    from orchestrator.cli import app

    first = submit(parse(tiny_job(tiny_teacher_dir, tmp_path)))
    raw = tiny_job(tiny_teacher_dir, tmp_path, search={"warm_start": "auto"},
                   budget={"num_trials": 2, "max_concurrent": 1})
    second = submit(parse(raw))
    store = Store(raw["storage"]["db_url"])
    earlier = [t for t in store.trials(first) if t["status"] in ("terminated", "stopped_early")
               and all(t[o] is not None for o in OBJECTIVES)]
    assert earlier

    job = store.get_job(second)
    assert job["status"] == "finished" and job["warm_sources"] == [first]
    # the searcher's saved study starts with every measured trial of the first job, then the second's own
    searcher = OptunaSearch()
    searcher.restore_from_dir(job["tune_path"])
    seeded = [t for t in searcher._ot_study.trials if t.user_attrs.get("warm_start")]
    assert len(seeded) == len(earlier)
    assert sorted(t.values[0] for t in seeded) == sorted(t["metric"] for t in earlier)
    assert len(searcher._ot_study.trials) == len(earlier) + 2
    # none of the seeded configs ran again: the second job's trials are its own two points
    own = store.trials(second)
    assert len(own) == 2
    assert not [t for t in own if t["config"] in [e["config"] for e in earlier]]
    monkeypatch.setenv("SLIMRAY_DB_URL", raw["storage"]["db_url"])
    out = CliRunner().invoke(app, ["status", second])
    assert out.exit_code == 0 and f"warm start: learned from {first}" in out.output, out.output


def test_an_unknown_warm_start_job_is_refused_in_one_line_before_anything_runs(tiny_teacher_dir, tmp_path):
    from common.errors import SpecError

    raw = tiny_job(tiny_teacher_dir, tmp_path, search={"warm_start": ["no-such-job"]})
    with pytest.raises(SpecError) as err:
        submit(parse(raw))
    assert str(err.value).count("\n") == 0 and "search.warm_start: no job 'no-such-job'" in str(err.value)
    assert Store(raw["storage"]["db_url"]).list_jobs() == []
