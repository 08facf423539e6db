"""The endpoint on the ONNX Runtime backend over real HTTP: same answers as torch, and a swap from torch to
onnxruntime under traffic drops no request. One local Ray + Serve for the module."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from conftest import tiny_artifact  # noqa: E402
from common.ports import free_port  # noqa: E402
from test_serve import call  # noqa: E402

TEXTS = ["a good movie", "the worst film", "very dull and boring plot", "love it", "great fun actors",
         "bad bad bad", "an actor was in this story"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import ray

    from common.raylink import connect
    from deploy import control
    from workers.export import export

    root = tmp_path_factory.mktemp("ort-serve")
    art = tiny_artifact(root / "a", seed=3, meta={"job_id": "job-o", "trial_id": "t_o"}).uri
    export(art, root / "a-onnx")
    started = not ray.is_initialized()
    connect(num_cpus=2)
    port = free_port()
    url = control.deploy(art, port=port, name="ort-test", info={"job": "job-o", "trial": "t_o"})
    yield {"url": url, "port": port, "art": art}
    control.stop(None)
    if started:
        ray.shutdown()


def test_swap_to_onnxruntime_under_load_keeps_answers_and_drops_nothing(served):
    from deploy import control

    url = served["url"] + "/v1/predict"
    status, torch_body = call(url, {"inputs": TEXTS})
    assert status == 200, torch_body
    status, info = call(served["url"] + "/v1/model")
    assert info["serving"]["runtime"] == "torch"
    from workers.artifacts import info as artifact_info

    torch_bytes = artifact_info(served["art"]).size_bytes
    onnx_bytes = (Path(served["art"]).with_name("a-onnx") / "model.onnx").stat().st_size
    assert info["size_bytes"] == torch_bytes != onnx_bytes

    results, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                status, body = call(url, {"inputs": TEXTS[:2]}, timeout=60)
                results.append(status if status == 200 else (status, body))
            except Exception as err:  # a reset connection is a dropped request too
                results.append(repr(err))

    clients = [threading.Thread(target=client) for _ in range(2)]
    for t in clients:
        t.start()
    try:
        control.deploy(served["art"], port=served["port"], name="ort-test", runtime="onnxruntime",
                       info={"job": "job-o", "trial": "t_o"})
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=60)
    assert results and all(r == 200 for r in results), [r for r in results if r != 200][:5]

    status, info = call(served["url"] + "/v1/model")
    assert info["serving"]["runtime"] == "onnxruntime"
    assert info["size_bytes"] == onnx_bytes  # the file ONNX Runtime runs, not the PyTorch artifact
    status, ort_body = call(url, {"inputs": TEXTS})
    assert status == 200, ort_body
    assert [p["label"] for p in ort_body["predictions"]] == [p["label"] for p in torch_body["predictions"]]
    assert [p["score"] for p in ort_body["predictions"]] == pytest.approx(
        [p["score"] for p in torch_body["predictions"]], abs=1e-4)


def test_onnxruntime_without_an_export_is_refused_before_ray(tmp_path):
    from common.errors import DeployError
    from deploy import control

    art = tiny_artifact(tmp_path / "b").uri
    with pytest.raises(DeployError, match="has no ONNX export"):
        control.deploy(art, runtime="onnxruntime")
    with pytest.raises(DeployError, match="ptq"):
        control.deploy(art, runtime="onnxruntime", ptq="torch-dynamic-int8")
