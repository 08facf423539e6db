"""promote(): the constrained pick over a re-measured front, explicit trials, refusals, deployment rows.

No Ray here: ``deploy.control.deploy`` is replaced by a recorder (tests/test_serve.py deploys for real). The
store is filled by hand, but every trial points to a real tiny artifact, so the latencies are re-measured
for real: 1 layer × 32 wide (fast), 2 × 128 (mid, ~2× slower), 4 × 256 (slow, ~10× slower).
"""
from __future__ import annotations

import json

import pytest

from conftest import promotion_store, tiny_artifact
from common.errors import ConfigError, DeployError

JOB = "job-promote"


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    root = tmp_path_factory.mktemp("promote-artifacts")
    return {"fast": tiny_artifact(root / "fast", layers=1, hidden=32, heads=2, ffn=64).uri,
            "mid": tiny_artifact(root / "mid", layers=2, hidden=128, heads=4, ffn=512).uri,
            "slow": tiny_artifact(root / "slow", layers=4, hidden=256, heads=4, ffn=1024).uri}


def _trials(arts):
    # Reported latencies are deliberately wrong (the search measured them on busy cores): promotion must
    # rank by its own measurements, which put fast < mid < slow.
    return [
        {"trial_id": "t_fast", "metric": 87.5, "metric_drop": 2.5, "size_bytes": 1_000_000, "latency_ms_b1": 9.0,
         "artifact_uri": arts["fast"]},
        {"trial_id": "t_mid", "metric": 89.2, "metric_drop": 0.8, "size_bytes": 5_000_000, "latency_ms_b1": 9.0,
         "artifact_uri": arts["mid"]},
        {"trial_id": "t_slow", "metric": 89.9, "metric_drop": 0.1, "size_bytes": 3_000_000, "latency_ms_b1": 0.01,
         "artifact_uri": arts["slow"]},
        {"trial_id": "t_off", "metric": 80.0, "metric_drop": 10.0, "size_bytes": 9_000_000, "latency_ms_b1": 1.0,
         "artifact_uri": arts["mid"], "on_front": False},
    ]


@pytest.fixture
def store(tmp_path, arts):
    s = promotion_store(f"sqlite:///{tmp_path}/slimray.db", JOB, _trials(arts))
    yield s
    s.close()


@pytest.fixture
def deployed(monkeypatch):
    """Replaces the real deploy: records each call and answers like it."""
    from deploy import control

    calls = []

    def fake_deploy(artifact_uri, **kw):
        calls.append({"artifact_uri": artifact_uri, **kw})
        return control.endpoint_url(kw.get("port", 8000), kw.get("route_prefix", "/"))

    monkeypatch.setattr(control, "deploy", fake_deploy)
    return calls


def test_default_picks_lowest_remeasured_latency_within_one_point(store, deployed, arts):
    from orchestrator.promote import promote

    out = promote(JOB, store=store, who="alice", port=8123)
    assert out["trial_id"] == "t_mid"  # t_fast is faster but drops 2.5 points; t_slow is slower
    assert deployed[0]["artifact_uri"] == arts["mid"]
    assert deployed[0]["info"]["job"] == JOB and deployed[0]["info"]["trial"] == "t_mid"
    assert deployed[0]["info"]["constraints"] == {"max_metric_drop": 1.0, "max_size_mb": None, "max_latency_ms": None}
    rows = {t["trial_id"]: t for t in store.trials(JOB)}
    measured = {k: rows[k]["remeasured_latency_ms_b1"] for k in ("t_fast", "t_mid", "t_slow")}
    assert all(v is not None and v > 0 for v in measured.values())
    assert measured["t_fast"] < measured["t_mid"] < measured["t_slow"]
    assert rows["t_off"]["remeasured_latency_ms_b1"] is None  # not on the front, not asked for
    assert out["latency_ms_b1"] == measured["t_mid"]
    live = store.live_deployment()
    assert live["trial_id"] == "t_mid" and live["who"] == "alice"
    assert live["endpoint"] == out["endpoint"] == "http://127.0.0.1:8123"
    assert live["id"] == out["deployment_id"]
    json.dumps(out)  # the CLI prints it


def test_looser_drop_takes_the_fastest(store, deployed):
    from orchestrator.promote import promote
    from orchestrator.spec import Constraints

    assert promote(JOB, Constraints(max_metric_drop=3.0), store=store)["trial_id"] == "t_fast"


def test_size_cap_excludes_the_bigger_one(store, deployed):
    from orchestrator.promote import promote
    from orchestrator.spec import Constraints

    out = promote(JOB, Constraints(max_metric_drop=1.0, max_size_mb=4.0), store=store)
    assert out["trial_id"] == "t_slow"  # t_mid is 5 MB


def test_latency_cap_uses_remeasured_latency(store, deployed):
    from orchestrator.promote import promote
    from orchestrator.spec import Constraints

    # t_slow reported 0.01 ms but measures ~4 ms: under a 1.5 ms cap with drop ≤ 0.5 nothing qualifies.
    with pytest.raises(DeployError) as err:
        promote(JOB, Constraints(max_metric_drop=0.5, max_latency_ms=1.5), store=store)
    assert "t_slow" in str(err.value) and not deployed


def test_job_spec_constraints_are_the_default(tmp_path, arts, deployed):
    from orchestrator.promote import promote

    spec = {"name": "tiny", "task": {"max_length": 32}, "latency": {"seq_len": 16},
            "constraints": {"max_metric_drop": 3.0}}
    s = promotion_store(f"sqlite:///{tmp_path}/spec.db", JOB, _trials(arts), spec=spec)
    assert promote(JOB, store=s)["trial_id"] == "t_fast"


def test_explicit_trial_bypasses_constraints(store, deployed, arts):
    from orchestrator.promote import promote

    out = promote(JOB, trial="t_off", store=store)
    assert out["trial_id"] == "t_off" and out["constraints"] is None
    assert deployed[0]["artifact_uri"] == arts["mid"]
    assert store.trials(JOB)[3]["remeasured_latency_ms_b1"] is not None
    with pytest.raises(DeployError, match="no trial 'nope'"):
        promote(JOB, trial="nope", store=store)


def test_refusal_names_the_closest_in_one_line(store, deployed):
    from orchestrator.promote import promote
    from orchestrator.spec import Constraints

    with pytest.raises(DeployError) as err:
        promote(JOB, Constraints(max_metric_drop=0.05, max_size_mb=2.0), store=store)
    msg = str(err.value)
    assert "\n" not in msg
    assert "metric drop ≤ 0.05, size ≤ 2 MB" in msg
    # closest first, by the summed relative overshoot: t_slow 1.0 + 0.5, t_mid 15 + 1.5, t_fast 49
    assert msg.index("t_slow") < msg.index("t_mid") < msg.index("t_fast")
    assert "drop 0.10, 3.00 MB" in msg and " ms)" in msg and "--trial" in msg
    assert not deployed and store.live_deployment() is None and store.deployments(JOB) == []


def test_rows_replaced_then_failed_deploy_keeps_the_old_one_live(store, deployed, monkeypatch):
    from deploy import control
    from orchestrator.promote import promote
    from orchestrator.spec import Constraints

    first = promote(JOB, store=store)
    second = promote(JOB, Constraints(max_metric_drop=3.0), store=store)
    rows = {d["id"]: d for d in store.deployments(JOB)}
    assert rows[first["deployment_id"]]["status"] == "replaced"
    assert rows[second["deployment_id"]]["status"] == "live"

    def broken(artifact_uri, **kw):
        raise RuntimeError("replica constructor failed\nlong traceback")

    monkeypatch.setattr(control, "deploy", broken)
    with pytest.raises(DeployError, match="promoting trial t_slow of job .* failed: replica constructor failed$"):
        promote(JOB, trial="t_slow", store=store)
    rows = store.deployments(JOB)
    assert [d["status"] for d in rows] == ["failed", "live", "replaced"]  # newest first
    assert store.live_deployment()["id"] == second["deployment_id"]


def test_unloadable_front_member_is_skipped(tmp_path, arts, deployed):
    from orchestrator.promote import promote

    trials = _trials(arts)
    trials[1]["artifact_uri"] = str(tmp_path / "gone")  # t_mid's artifact was deleted
    s = promotion_store(f"sqlite:///{tmp_path}/gone.db", JOB, trials)
    assert promote(JOB, store=s)["trial_id"] == "t_slow"
    with pytest.raises(DeployError, match="t_mid .*artifact does not load"):
        promote(JOB, trial="t_mid", store=s)


def test_no_front_is_refused(tmp_path, arts, deployed):
    from orchestrator.promote import promote

    trials = [{**t, "on_front": False} for t in _trials(arts)]
    s = promotion_store(f"sqlite:///{tmp_path}/nofront.db", JOB, trials)
    with pytest.raises(DeployError, match="has no Pareto front"):
        promote(JOB, store=s)


def test_constraints_validate_and_merge_with_the_spec():
    from orchestrator.spec import Constraints, from_stored

    assert Constraints() == Constraints(max_metric_drop=1.0, max_size_mb=None, max_latency_ms=None)
    for bad in ({"max_metric_drop": -1}, {"max_size_mb": 0}, {"max_latency_ms": "fast"},
                {"max_size_mb": float("nan")}, {"max_latency_ms": True}):
        with pytest.raises(ConfigError, match="constraints." + next(iter(bad))):
            Constraints(**bad)
    spec = from_stored({"name": "j", "constraints": {"max_metric_drop": 0.5, "max_size_mb": 20}})
    c = spec.constraints.override(max_metric_drop=None, max_latency_ms=3.0)
    assert c == Constraints(max_metric_drop=0.5, max_size_mb=20, max_latency_ms=3.0)
    assert c.limits() == {"max_metric_drop": 0.5, "max_size_bytes": 20e6, "max_latency_ms": 3.0}
    with pytest.raises(ConfigError, match="constraints.max_size_mb: must be > 0"):
        c.override(max_size_mb=-2)
    # promotion times models as the job timed its trials
    assert from_stored({"name": "j", "task": {"max_length": 64}}).seq_len == 64
    assert from_stored({"name": "j", "task": {"max_length": 64}, "latency": {"seq_len": 16}}).seq_len == 16


def test_cli_promote_prints_the_front_or_one_line_refusal(store, deployed, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import orchestrator.promote as promote_mod
    from orchestrator.cli import app

    monkeypatch.setenv("SLIMRAY_DB_URL", store.url)
    monkeypatch.setenv("SLIMRAY_HOME", str(tmp_path))  # the CLI logs tracebacks there
    joined = []
    monkeypatch.setattr(promote_mod, "serving_ray", lambda address=None: joined.append(address))
    runner = CliRunner()
    res = runner.invoke(app, ["promote", JOB, "--max-drop", "0.01", "--max-size-mb", "1"])
    assert res.exit_code == 2, res.output
    assert "no trial on the Pareto front" in res.output and "t_fast" in res.output
    assert not joined and not deployed  # refused before Ray is touched
    res = runner.invoke(app, ["promote", JOB, "--port", "8124"])
    assert res.exit_code == 0, res.output
    assert "serving trial t_mid" in res.output and "http://127.0.0.1:8124" in res.output
    assert joined == [None] and deployed[0]["port"] == 8124
    res = runner.invoke(app, ["promote", JOB, "--trial", "t_slow", "--route-prefix", "/sst2"])
    assert res.exit_code == 0, res.output
    assert store.live_deployment()["endpoint"] == "http://127.0.0.1:8000/sst2"
