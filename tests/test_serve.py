"""The endpoint over real HTTP on 127.0.0.1: one local Ray + Serve for the whole module.

The tests run in file order on one Serve application ("slimray"): first its answers for artifact A, then
a swap to artifact B under load, then a promotion from the store, then the CLI stops it.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections import Counter

import pytest

from conftest import promotion_store, record_fault, tiny_artifact

import schemathesis  # in the dev extra: the endpoint is fuzzed from its OpenAPI schema
from common.client import EndpointClient
from common.ports import free_port


def call(url: str, body=None, *, raw: bytes | None = None, headers: dict | None = None, timeout: float = 30):
    """(status, parsed JSON body) of one request to ``url``; POST when a body is given. No token is sent
    unless ``headers`` carry one."""
    parts = urllib.parse.urlsplit(url)
    with EndpointClient(f"{parts.scheme}://{parts.netloc}", token="", timeout=timeout) as client:
        return client.request("POST" if body is not None or raw is not None else "GET", parts.path, body,
                              raw=raw, headers=headers)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import ray

    from common.raylink import connect
    from deploy import control

    root = tmp_path_factory.mktemp("serve")
    arts = {"a": tiny_artifact(root / "a", meta={"job_id": "job-a", "trial_id": "t_a"}).uri,
            "b": tiny_artifact(root / "b", layers=1, seed=1, labels=("neg", "pos")).uri}
    started = not ray.is_initialized()
    connect(num_cpus=2)
    port = free_port()
    url = control.deploy(arts["a"], port=port, info={"job": "job-a", "trial": "t_a", "who": "tester"})
    yield {"url": url, "port": port, "arts": arts, "root": root}
    control.stop(None)
    if started:
        ray.shutdown()


def _direct(uri: str, items: list) -> list[tuple[str, float]]:
    """The artifact run by hand, one input at a time (no padding, no batching)."""
    import torch

    from deploy.classifier import max_length
    from workers import artifacts

    model, tok, meta = artifacts.load(uri)
    out = []
    for x in items:
        enc = tok(*((x,) if isinstance(x, str) else tuple(x)), truncation=True,
                  max_length=max_length(model, tok, meta), return_tensors="pt")
        with torch.no_grad():
            probs = model(**enc).logits.softmax(-1)[0]
        i = int(probs.argmax())
        out.append((model.config.id2label[i], float(probs[i])))
    return out


def test_deploy_refuses_bad_arguments_before_touching_ray(tmp_path):
    from common.errors import ConfigError, DeployError
    from deploy import control

    art = tiny_artifact(tmp_path / "a").uri
    with pytest.raises(DeployError, match="is not a slimray artifact"):
        control.deploy(tmp_path / "missing")
    with pytest.raises(ConfigError) as err:
        control.deploy(art, route_prefix="sst2/", max_batch_size=0, port=70000, batch_wait_timeout_s=-1)
    assert sorted(line.split(":")[0] for line in err.value.problems) == \
        ["batch_wait_timeout_s", "max_batch_size", "port", "route_prefix"]
    assert "route_prefix: must start with '/' and not end with one" in str(err.value)
    with pytest.raises(ConfigError, match="ptq: must be one of torch-dynamic-int8, got 'fp8'"):
        control.deploy(art, ptq="fp8")
    with pytest.raises(ConfigError, match="unknown key"):
        control.deploy(art, max_batch=4)


_DEPLOY_ON_A_TAKEN_PORT = """
import socket, sys
from common.errors import DeployError
from common.raylink import connect
from deploy import control
with socket.socket() as held:
    held.bind(("127.0.0.1", 0))
    held.listen()
    connect(None, num_cpus=1)
    try:
        control.deploy(sys.argv[1], port=held.getsockname()[1])
    except DeployError as err:
        print("refused:", err)
"""


@pytest.mark.slow
def test_deploy_refuses_a_port_another_process_holds(tmp_path):
    # in a fresh process: this session's Ray may already run Serve, which takes its own port and skips the check
    import os
    import subprocess
    import sys

    art = tiny_artifact(tmp_path / "a").uri
    out = subprocess.run([sys.executable, "-c", _DEPLOY_ON_A_TAKEN_PORT, str(art)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert "refused:" in out.stdout, out.stderr[-2000:]
    assert "is already taken by another process" in out.stdout and "--port" in out.stdout


def test_ptq_on_load_quantizes_every_linear_and_keeps_the_answers(tmp_path):
    import torch

    from deploy.classifier import Classifier

    art = tiny_artifact(tmp_path / "a").uri
    plain, ptq = Classifier.load(art), Classifier.load(art, ptq="torch-dynamic-int8")
    quantized = [m for m in ptq.model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(quantized) == sum(isinstance(m, torch.nn.Linear) for m in plain.model.modules()) > 0
    assert not any(type(m) is torch.nn.Linear for m in ptq.model.modules())
    assert ptq.meta["serving_ptq"] == "torch-dynamic-int8" and "serving_ptq" not in plain.meta
    texts = ["a gripping, funny film", "the plot is a mess", "good"]
    assert torch.allclose(ptq.logits(texts), plain.logits(texts), atol=0.05)


TEXTS = ["a gripping, funny film", "the plot is a mess and the actors are dull", "good",
         "really " * 400 + "bad",  # far past the model's 128 positions: truncated, not an error
         "ünïcödé ✓ 🎬 text", "a\x00b"]
PAIRS = [["a man is eating", "someone eats"], ["the movie was great", "it was awful " * 200]]


def test_predictions_match_the_model_run_directly(served):
    status, body = call(served["url"] + "/v1/predict", {"inputs": TEXTS})
    assert status == 200, body
    assert body["model"] == {"job": "job-a", "trial": "t_a"}
    got = [(p["label"], p["score"]) for p in body["predictions"]]
    want = _direct(served["arts"]["a"], TEXTS)
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=1e-4)
    assert {g[0] for g in got} <= {"negative", "positive"}


def test_sentence_pairs_and_mixed_inputs(served):
    status, body = call(served["url"] + "/v1/predict", {"inputs": PAIRS + ["good"]})
    assert status == 200, body
    got = [(p["label"], p["score"]) for p in body["predictions"]]
    want = _direct(served["arts"]["a"], PAIRS + ["good"])
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=1e-4)


def test_concurrent_requests_are_batched_and_all_answered(served):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: call(served["url"] + "/v1/predict", {"inputs": [f"text {i}"] * (i % 3 + 1)}),
                                range(48)))
    assert all(s == 200 for s, _ in answers)
    assert [len(b["predictions"]) for _, b in answers] == [i % 3 + 1 for i in range(48)]


BAD = [
    ("too many inputs", {"inputs": ["a"] * 65}, 413, "at most 64"),
    ("empty list", {"inputs": []}, 422, "inputs: List should have at least 1 item"),
    ("empty text", {"inputs": [""]}, 422, "inputs[0]: String should have at least 1 character"),
    ("blank text", {"inputs": ["ok", "   "]}, 422, "inputs[1]"),
    ("number", {"inputs": [5]}, 422, "inputs[0]: Input should be a valid string"),
    ("null", {"inputs": [None]}, 422, "inputs[0]"),
    ("object", {"inputs": [{"text": "a"}]}, 422, "inputs[0]"),
    ("pair of one", {"inputs": [["a"]]}, 422, "inputs[0]: List should have at least 2 items"),
    ("pair of three", {"inputs": [["a", "b", "c"]]}, 422, "inputs[0]: List should have at most 2 items"),
    ("pair with a number", {"inputs": [["a", 1]]}, 422, "inputs[0][1]"),
    ("nested pair", {"inputs": [[["a", "b"], "c"]]}, 422, "inputs[0][0]"),
    ("inputs not a list", {"inputs": "a text"}, 422, "inputs: Input should be a valid list"),
    ("no inputs", {"text": ["a"]}, 422, "inputs: Field required"),
    ("body a list", ["a"], 422, "body"),
]


@pytest.mark.parametrize("body,status,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_get_4xx_with_a_json_error(served, body, status, message):
    got, answer = call(served["url"] + "/v1/predict", body)
    assert got == status, answer
    assert message in answer["error"] and "\n" not in answer["error"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b'{"inputs": ["a",]}', "\u00e9".encode("latin-1"),
                                 b'{"inputs": ["\\ud800"]}'], ids=["broken", "empty", "trailing-comma", "latin-1",
                                                                  "lone-surrogate"])
def test_malformed_json_is_422(served, raw):
    got, answer = call(served["url"] + "/v1/predict", raw=raw)
    assert got == 422, answer
    assert isinstance(answer["error"], str) and "\n" not in answer["error"]


def test_wrong_route_and_method_are_json_4xx(served):
    assert call(served["url"] + "/v1/nothing")[0] == 404
    status, answer = call(served["url"] + "/v1/predict")  # GET
    assert status == 405 and "error" in answer


def test_health_model_info_and_openapi(served):
    assert call(served["url"] + "/healthz") == (200, {"status": "ok"})
    status, info = call(served["url"] + "/v1/model")
    assert status == 200
    assert (info["job"], info["trial"], info["promoted_by"]) == ("job-a", "t_a", "tester")
    assert info["labels"] == ["negative", "positive"] and info["max_length"] == 128
    assert info["size_bytes"] > 0 and info["artifact"] == served["arts"]["a"]
    assert info["serving"] == {"max_batch_size": 32, "batch_wait_timeout_s": 0.01, "max_inputs": 64, "auth": False,
                               "torch_threads": info["serving"]["torch_threads"], "ptq": None, "runtime": "torch"}
    status, spec = call(served["url"] + "/openapi.json")
    assert status == 200 and {"/v1/predict", "/v1/model", "/healthz"} <= set(spec["paths"])
    status, page = call(served["url"] + "/docs")
    assert status == 200 and "swagger" in page.lower()


def test_labels_and_input_kind_come_from_the_artifact(tmp_path):
    from deploy.classifier import Classifier

    old = Classifier.load(tiny_artifact(tmp_path / "old", labels=("0", "1")).uri)  # records no task, no names
    assert old.labels == ["0", "1"] and old.pairs is None
    assert old.first_mismatch(["a", ("b", "c")]) is None
    assert {p["label"] for p in old(["a good film", ("a", "b")])} <= {"0", "1"}
    named = Classifier.load(tiny_artifact(tmp_path / "sst2", labels=("0", "1"), meta={
        "task": {"dataset": "glue/sst2", "text_columns": ["sentence"]}, "label_names": ["negative", "positive"]}).uri)
    assert named.labels == ["negative", "positive"] and named.pairs is False
    assert named.first_mismatch(["a", "b", ("c", "d")]) == 2
    pairs = Classifier.load(tiny_artifact(tmp_path / "mrpc", labels=("0", "1"), meta={"task": {"dataset": "glue/mrpc"}}).uri)
    assert pairs.pairs is True and pairs.labels == ["0", "1"]  # names only where the artifact records them
    assert pairs.first_mismatch([("a", "b"), "c"]) == 1


def test_label_names_of_the_data():
    from workers.data import label_names

    assert label_names("glue/sst2", ("0", "1")) == ("negative", "positive")
    assert label_names("GLUE/MRPC", ["0", "1"]) == ("not_equivalent", "equivalent")
    assert label_names("/data/reviews", ("neg", "pos")) == ("neg", "pos")  # a local file's own values


def test_endpoint_answers_with_label_names_and_refuses_the_wrong_input_kind(served, tmp_path, monkeypatch):
    from ray import serve
    from typer.testing import CliRunner

    from deploy import control
    from orchestrator.cli import app

    single = tiny_artifact(tmp_path / "sst2", labels=("0", "1"), meta={
        "job_id": "job-s", "trial_id": "t_s", "task": {"dataset": "glue/sst2", "text_columns": ["sentence"]},
        "label_names": ["negative", "positive"]}).uri
    pair = tiny_artifact(tmp_path / "mrpc", labels=("0", "1"), seed=2, meta={
        "job_id": "job-p", "trial_id": "t_p", "task": {"dataset": "glue/mrpc",
                                                        "text_columns": ["#1 String", "#2 String"]},
        "label_names": ["not_equivalent", "equivalent"]}).uri
    monkeypatch.setenv("SLIMRAY_HOME", str(tmp_path))
    monkeypatch.delenv("SLIMRAY_API_TOKEN", raising=False)
    runner = CliRunner()
    url = control.deploy(single, name="kinds", route_prefix="/kinds", port=served["port"])
    try:
        status, body = call(url + "/v1/predict", {"inputs": TEXTS})
        assert status == 200, body
        assert {p["label"] for p in body["predictions"]} <= {"negative", "positive"}
        info = call(url + "/v1/model")[1]
        assert info["labels"] == ["negative", "positive"] and info["pairs"] is False
        status, body = call(url + "/v1/predict", {"inputs": ["good", ["a man eats", "someone eats"]]})
        assert status == 422 and body["error"] == \
            "inputs[1]: this model classifies single texts; send a text, not a [first, second] pair"
        res = runner.invoke(app, ["predict", "a good film", "--url", url])
        assert res.exit_code == 0 and res.output.split()[0] in ("negative", "positive"), res.output
        res = runner.invoke(app, ["predict", "a man eats", "--pair", "someone eats", "--url", url])
        assert res.exit_code == 2, res.output
        assert "answered 422: inputs[0]: this model classifies single texts; send a text, not a [first, second] " \
               "pair" in " ".join(res.output.split())

        serve.delete("kinds")  # two replicas of this test's at once would need a third CPU
        url = control.deploy(pair, name="kinds", route_prefix="/kinds", port=served["port"])
        status, body = call(url + "/v1/predict", {"inputs": PAIRS})
        assert status == 200, body
        assert {p["label"] for p in body["predictions"]} <= {"not_equivalent", "equivalent"}
        status, body = call(url + "/v1/predict", {"inputs": [["a", "b"], "a single text"]})
        assert status == 422 and body["error"] == \
            "inputs[1]: this model classifies sentence pairs; send [first, second], not a single text"
        res = runner.invoke(app, ["predict", "a man eats", "--pair", "someone eats", "--url", url])
        assert res.exit_code == 0 and res.output.split()[0] in ("not_equivalent", "equivalent"), res.output
    finally:
        serve.delete("kinds")


def test_openapi_fuzz_never_5xx(served):
    """schemathesis generates bodies from the OpenAPI document (valid ones, whose answers must match the
    documented schema, and invalid ones for /v1/predict): never a 5xx."""
    import requests
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    session = requests.Session()
    session.trust_env = False  # loopback only, never through a proxy from the environment
    schema = schemathesis.openapi.from_url(served["url"] + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {(o.method.upper(), o.path) for o in operations} == {("POST", "/v1/predict"), ("GET", "/v1/model"),
                                                                 ("GET", "/healthz")}
    seen = Counter()
    for op in operations:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.method.upper() == "POST" else [])
        for mode in modes:
            @settings(max_examples=40 if op.method.upper() == "POST" else 3, deadline=None, database=None,
                      derandomize=True, suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                response = case.call(session=session, timeout=30)
                seen[response.status_code] += 1
                assert response.status_code < 500, (case.body, response.text)
                if mode is GenerationMode.POSITIVE:
                    case.validate_response(response)  # codes, content types and bodies as documented

            run()
    record_fault("endpoint fuzzed from its OpenAPI schema (schemathesis)", injected=1, requests=sum(seen.values()),
                 failed_requests=0, http_5xx=sum(n for code, n in seen.items() if code >= 500))
    assert seen[200] and seen[422], seen


def test_bearer_token(served, monkeypatch, tmp_path):
    from ray import serve
    from typer.testing import CliRunner

    from deploy import control
    from orchestrator.cli import app

    monkeypatch.setenv("SLIMRAY_API_TOKEN", "s3cret-token")
    url = control.deploy(served["arts"]["a"], name="secured", route_prefix="/secured", port=served["port"])
    try:
        assert url == f"http://127.0.0.1:{served['port']}/secured"
        ok = {"inputs": ["good"]}
        status, answer = call(url + "/v1/predict", ok)
        assert status == 401 and "Bearer" in answer["error"]
        assert call(url + "/v1/predict", ok, headers={"Authorization": "Bearer wrong"})[0] == 401
        assert call(url + "/v1/predict", ok, headers={"Authorization": "s3cret-token"})[0] == 401
        assert call(url + "/v1/predict", raw=b"{", headers={})[0] == 401  # before the body is even parsed
        assert call(url + "/v1/model")[0] == 401
        assert call(url + "/v1/predict", ok, headers={"Authorization": "Bearer s3cret-token"})[0] == 200
        assert call(url + "/v1/model", headers={"Authorization": "bearer s3cret-token"})[1]["serving"]["auth"]
        assert call(url + "/healthz")[0] == 200
        monkeypatch.setenv("SLIMRAY_HOME", str(tmp_path))
        runner = CliRunner()
        res = runner.invoke(app, ["predict", "a good film", "--url", url])
        assert res.exit_code == 0 and "(job job-a, trial t_a)" in res.output, res.output
        monkeypatch.delenv("SLIMRAY_API_TOKEN")
        res = runner.invoke(app, ["predict", "a good film", "--url", url])
        assert res.exit_code == 2 and "answered 401" in res.output, res.output
        assert call(served["url"] + "/v1/predict", ok)[0] == 200  # the other application has no token
    finally:
        serve.delete("secured")


def test_swap_under_load_drops_no_request(served):
    from deploy import control

    url = served["url"] + "/v1/predict"
    results, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                status, body = call(url, {"inputs": ["a good film", ["a", "b"]]}, timeout=60)
                results.append((status, body["model"]["trial"] if status == 200 else body,
                                time.perf_counter() - t0))
            except Exception as err:  # a reset connection is a dropped request too
                results.append(("error", repr(err), time.perf_counter() - t0))

    clients = [threading.Thread(target=client) for _ in range(2)]
    for t in clients:
        t.start()
    def wait_for(what, ok):
        deadline = time.monotonic() + 60
        while not ok():
            assert time.monotonic() < deadline, f"no {what} within 60 s: {Counter(r[1] for r in list(results))}"
            time.sleep(0.05)

    try:
        wait_for("answer from the old model", lambda: any(r[1] == "t_a" for r in list(results)))
        control.deploy(served["arts"]["b"], port=served["port"], info={"job": "job-a", "trial": "t_b"})
        # a few answers from the new model, so the last one is surely from it
        wait_for("answers from the new model", lambda: sum(r[1] == "t_b" for r in list(results)) >= 3)
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=60)
    failures = [r for r in results if r[0] != 200]
    record_fault("model swapped (rolling update) under continuous requests", injected=1, requests=len(results),
                 failed_requests=len(failures), http_5xx=sum(isinstance(r[0], int) and r[0] >= 500 for r in results))
    assert not failures, failures[:5]
    trials = [r[1] for r in results]
    assert trials[0] == "t_a" and trials[-1] == "t_b", Counter(trials)
    # The old replica kept answering while the new one started: without the surge, Serve stops it first and
    # requests queue for the whole replica start (~6 s here); with it, none waits more than a few batches.
    slowest = max(r[2] for r in results)
    assert slowest < 2.5, f"a request waited {slowest:.1f} s during the swap"
    status, info = call(served["url"] + "/v1/model")
    assert info["trial"] == "t_b" and info["labels"] == ["neg", "pos"]


def test_promote_serves_the_pick_records_it_and_the_cli_reads_it(served, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from deploy import control
    from orchestrator.cli import app
    from orchestrator.promote import promote

    arts = served["arts"]
    store = promotion_store(f"sqlite:///{tmp_path}/slimray.db", "job-live", [
        {"trial_id": "t_good", "metric": 89.5, "metric_drop": 0.5, "size_bytes": 600_000, "latency_ms_b1": 1.0,
         "artifact_uri": arts["a"]},
        {"trial_id": "t_lossy", "metric": 80.0, "metric_drop": 10.0, "size_bytes": 300_000, "latency_ms_b1": 0.5,
         "artifact_uri": arts["b"]},
    ])
    out = promote("job-live", store=store, port=served["port"], who="tester")
    assert out["trial_id"] == "t_good" and out["endpoint"] == served["url"]
    status, info = call(served["url"] + "/v1/model")
    assert (info["job"], info["trial"], info["promoted_by"]) == ("job-live", "t_good", "tester")
    assert info["deploy_info"]["constraints"]["max_metric_drop"] == 1.0
    assert info["deploy_info"]["latency_ms_b1"] == out["latency_ms_b1"]
    assert store.live_deployment()["trial_id"] == "t_good"

    monkeypatch.setenv("SLIMRAY_DB_URL", store.url)
    monkeypatch.setenv("SLIMRAY_HOME", str(tmp_path))
    monkeypatch.delenv("SLIMRAY_API_TOKEN", raising=False)
    runner = CliRunner()
    res = runner.invoke(app, ["predict", "a good film"])  # the URL comes from the live deployment
    assert res.exit_code == 0 and "(job job-live, trial t_good)" in res.output, res.output
    res = runner.invoke(app, ["predict", "a man eats", "--pair", "someone is eating", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["model"]["trial"] == "t_good", res.output
    res = runner.invoke(app, ["serve", "status", "--json"])
    assert res.exit_code == 0, res.output
    state = json.loads(res.output)
    assert state["serve"]["applications"]["slimray"]["status"] == "RUNNING"
    assert state["live_deployment"]["trial_id"] == "t_good"
    res = runner.invoke(app, ["serve", "stop"])
    assert res.exit_code == 0, res.output
    assert store.live_deployment() is None and store.deployments("job-live")[0]["status"] == "stopped"
    assert "slimray" not in control.status()["applications"]
    res = runner.invoke(app, ["predict", "a good film", "--url", served["url"]])
    assert res.exit_code == 2, res.output
