"""The ONNX Runtime backend answers like the torch one: same labels, same scores within float noise."""
from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")

from conftest import tiny_artifact  # noqa: E402
from common.errors import DeployError  # noqa: E402
from deploy.ort_backend import RUNTIMES  # noqa: E402

TEXTS = ["a good movie", "the worst film", "very dull and boring plot", "love it", "bad", "great fun actors",
         "a really smart story with a long long long tail of words " * 6]


def test_same_answers_as_the_torch_classifier(tmp_path):
    from deploy import ort_backend
    from deploy.classifier import Classifier
    from workers.export import export

    art = tiny_artifact(tmp_path / "t1", labels=("neg", "pos")).uri
    torch_clf = Classifier.load(art)
    with pytest.raises(DeployError, match="has no ONNX export"):
        ort_backend.load(art)
    export(art, tmp_path / "t1-onnx")
    for uri in (art, tmp_path / "t1-onnx"):  # the artifact (export found beside it) or the export folder
        ort_clf = ort_backend.load(uri)
        assert ort_clf.labels == torch_clf.labels == ["neg", "pos"]
        assert ort_clf.max_length == torch_clf.max_length
        assert ort_clf.model.session.get_session_options().intra_op_num_threads == 1
        assert ort_clf.model.size_bytes == (tmp_path / "t1-onnx" / "model.onnx").stat().st_size
        got, want = ort_clf(TEXTS), torch_clf(TEXTS)
        assert [g["label"] for g in got] == [w["label"] for w in want]
        assert all(abs(g["score"] - w["score"]) < 1e-4 for g, w in zip(got, want))
        assert ort_clf([]) == []
    # an export of another model beside the artifact is not served in its place
    other = tiny_artifact(tmp_path / "t2", seed=1).uri
    export(art, tmp_path / "t2-onnx")
    with pytest.raises(DeployError, match="export of another model"):
        ort_backend.load(other)


def test_auto_picks_onnxruntime_only_beyond_the_spread():
    from orchestrator.exporting import choose_runtime

    torch_ms = [10.0, 10.2, 9.8, 10.1, 9.9, 10.0]
    assert choose_runtime(torch_ms, [6.0, 6.1, 5.9, 6.0, 6.2, 5.8])["runtime"] == "onnxruntime"
    noisy = choose_runtime(torch_ms, [9.0, 11.0, 8.0, 9.5, 9.6, 12.0])  # faster median, inside the noise
    assert noisy["runtime"] == "torch" and noisy["onnxruntime"]["median_ms"] < noisy["torch"]["median_ms"]
    assert choose_runtime(torch_ms, [12.0] * 6)["runtime"] == "torch"
    assert set(noisy["torch"]) == {"median_ms", "spread_ms", "runs"}


def test_promote_with_runtime_exports_then_deploys_on_it(tmp_path, tiny_task_dir, monkeypatch):
    from conftest import promotion_store
    from deploy import control
    from orchestrator.promote import promote

    calls = []
    monkeypatch.setattr(control, "deploy", lambda uri, **kw: calls.append({"uri": uri, **kw}) or "http://x")
    art = tiny_artifact(tmp_path / "jobs" / "t1").uri
    store = promotion_store(f"sqlite:///{tmp_path}/s.db", "j1", [{"trial_id": "t1", "metric": 80.0,
                                                                  "artifact_uri": art}],
                            spec={"name": "j", "task": {"dataset": str(tiny_task_dir), "eval_size": 40,
                                                        "max_length": 32}, "latency": {"seq_len": 16}})
    with pytest.raises(Exception, match="runtime: must be one of"):
        promote("j1", trial="t1", store=store, runtime="tensorrt")
    assert not calls

    done = promote("j1", trial="t1", store=store, runtime="onnxruntime")
    assert done["runtime"] == "onnxruntime" and calls[-1]["runtime"] == "onnxruntime"
    assert calls[-1]["info"]["runtime"] == "onnxruntime"
    export_report = (tmp_path / "jobs" / "t1-onnx" / "export.json")
    assert export_report.is_file()  # exported (and checked on the dev split) because it was missing
    made = export_report.stat().st_mtime_ns

    done = promote("j1", trial="t1", store=store, runtime="auto")
    timing = done["runtime_timing"]
    assert done["runtime"] == timing["runtime"] == calls[-1]["runtime"] and done["runtime"] in RUNTIMES
    assert timing["torch"]["runs"] >= 20 and timing["onnxruntime"]["median_ms"] > 0
    assert calls[-1]["info"]["runtime_timing"] == timing
    assert export_report.stat().st_mtime_ns == made  # the existing export was reused

    done = promote("j1", trial="t1", store=store)
    assert done["runtime"] == "torch" and calls[-1]["runtime"] == "torch"
