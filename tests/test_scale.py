"""slimray's own driver (Tune loop, TPE, MO-ASHA, Recorder, stopper) under many trials on a simulated cluster:
the stand-in trials of bench/scale.py sleep instead of training, so only the orchestration is exercised."""
import pytest
from common.raylink import connect

pytestmark = pytest.mark.slow


@pytest.fixture
def own_ray():
    """The cluster run by the test replaces the session's Ray; it comes back afterwards if it was up."""
    import ray

    was_up = ray.is_initialized()
    ray.shutdown()
    yield
    if was_up and not ray.is_initialized():
        connect(None, num_cpus=2)


def test_hundred_one_second_trials_on_four_nodes_are_each_recorded_once(tmp_path, own_ray):
    from bench.scale import run
    from db import Store

    url = f"sqlite:///{tmp_path}/slimray.db"
    row = run(url, trials=100, nodes=4, cpus_per_node=2, seconds=(1.0, 1.0), label="smoke", log=lambda m: None)
    assert row["job_status"] == "finished"
    # every trial in the store exactly once, each ended (run to the end or stopped by MO-ASHA)
    assert row["trials_recorded"] == row["trials_unique"] == row["trials_ended"] == 100
    assert row["trials_full"] >= 1 and row["trials_full"] < 100  # MO-ASHA stopped some, kept some
    assert row["reports"] >= 100  # every trial reported before it ended
    # no recorder backlog at the end: nothing queued, no report in flight, none lost
    assert row["recorder_found"] and row["recorder_pending_end"] == 0 and row["backlog_over_time"][-1][1] == 0
    assert row["reports_lost"] == 0
    [job] = Store(url).list_jobs()
    assert job["trial_counts"].get("running", 0) == 0
