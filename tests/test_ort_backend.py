"""The ONNX Runtime backend answers like the torch one: same labels, same scores within float noise."""
from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")

from conftest import tiny_artifact  # noqa: E402
from common.errors import DeployError  # noqa: E402

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
        got, want = ort_clf(TEXTS), torch_clf(TEXTS)
        assert [g["label"] for g in got] == [w["label"] for w in want]
        assert all(abs(g["score"] - w["score"]) < 1e-4 for g, w in zip(got, want))
        assert ort_clf([]) == []
    # an export of another model beside the artifact is not served in its place
    other = tiny_artifact(tmp_path / "t2", seed=1).uri
    export(art, tmp_path / "t2-onnx")
    with pytest.raises(DeployError, match="export of another model"):
        ort_backend.load(other)
