"""The driver side of the endpoint: deploy an artifact, read Serve's state, stop it, and check the store's
live deployment against what really answers.

``deploy(artifact)`` runs :mod:`deploy.app` as the Serve application ``name``. Deploying again under the same
name with another artifact is a rolling update with surge: Serve starts the new replica next to the old one,
sends traffic to it once its constructor (model load + one warm-up forward) has returned, and only then
drains the old one; so a promotion never drops a request.
"""
from __future__ import annotations

import hashlib
import http.client
import os
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Optional

from pydantic import AfterValidator, Field

from common.client import TOKEN_ENV, EndpointClient
from common.config import Float, Frozen, Int, Str
from common.errors import DeployError
from deploy.classifier import PTQ
from deploy.ort_backend import RUNTIMES

__all__ = ["ServeOptions", "deploy", "status", "stop", "endpoint_url", "not_serving", "reconcile", "HOST"]

HOST = "127.0.0.1"


def _route_prefix(value: str) -> str:
    if not value.startswith("/") or (value != "/" and value.endswith("/")):
        raise ValueError(f"must start with '/' and not end with one (e.g. '/' or '/sst2'), got {value!r}")
    return value


class ServeOptions(Frozen):
    """How an artifact is served; every problem is reported at once."""

    _prefix: ClassVar[str] = ""

    name: Str = Field("slimray", min_length=1, description="the Serve application (same name = rolling swap)")
    route_prefix: Annotated[Str, AfterValidator(_route_prefix)] = Field(
        "/", description="where the application answers: '/' or '/name', no trailing '/'")
    port: Int = Field(8000, ge=1, le=65535, description="Serve's HTTP port on 127.0.0.1")
    max_batch_size: Int = Field(32, ge=1, description="inputs per forward pass")
    batch_wait_timeout_s: Float = Field(0.01, ge=0, le=10, description="how long a batch waits to fill")
    num_replicas: Int = Field(1, ge=1)
    max_inputs: Int = Field(64, ge=1, description="inputs per request; more is a 413")
    ptq: Optional[Literal[PTQ]] = Field(None, description="quantize the model as it loads; the artifact stays as it is")
    runtime: Literal[RUNTIMES] = Field("torch", description="torch, or onnxruntime: the artifact's ONNX export "
                                                            "(`slimray export`) in an ONNX Runtime session")


def endpoint_url(port: int = 8000, route_prefix: str = "/") -> str:
    return f"http://{HOST}:{port}{'' if route_prefix == '/' else route_prefix}"


def _client():
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False)


def _ensure_serve(port: int) -> None:
    from ray import serve

    client = _client()
    if client is not None:
        running = client.http_config.port
        if running != port:
            raise DeployError(f"Ray Serve already listens on {HOST}:{running}; deploy with port={running} "
                              f"(--port {running}) or stop it first (`slimray serve stop --all`)")
        return
    if _on_this_machine() and _taken(port):
        # Serve would start, its proxy would fail to bind, and requests would reach whatever holds the port
        raise DeployError(f"{HOST}:{port} is already taken by another process (another Ray's Serve, or any "
                          f"server); promote with --port N, or stop what holds it")
    serve.start(http_options={"host": HOST, "port": port})


def _on_this_machine() -> bool:
    import ray

    return ray.get_runtime_context().gcs_address.startswith(("127.0.0.1:", "localhost:"))


def _taken(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((HOST, port)) == 0


def deploy(artifact_uri, options: Optional[ServeOptions] = None, *, info: Optional[dict] = None, **fields) -> str:
    """Serve the artifact at ``artifact_uri`` with ``options`` (``fields`` of :class:`ServeOptions` on top);
    returns the endpoint URL. ``info`` is what /v1/model reports about the promotion.

    Joins the connected Ray (else RAY_ADDRESS, else starts an embedded one, which ends with this process).
    Replacing a running application of the same name is a zero-downtime rolling update. ``SLIMRAY_API_TOKEN``,
    when set here, is the bearer token every request but /healthz must carry.
    """
    from common.raylink import connect
    from workers.artifacts import resolve

    opts = ServeOptions(**{**(options.model_dump() if options else {}), **fields})
    path = resolve(artifact_uri)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise DeployError(f"{artifact_uri} is not a slimray artifact (config.json or model.safetensors missing); "
                          f"promote a trial that saved one")
    if opts.runtime == "onnxruntime":
        if opts.ptq is not None:
            raise DeployError(f"ptq {opts.ptq} quantizes the torch model; with runtime onnxruntime export the "
                              "quantized model instead (`slimray export`)")
        from deploy.ort_backend import exported_dir

        exported_dir(path)  # refused here, in one line, rather than by a failing replica
    token = os.environ.get(TOKEN_ENV) or None
    # the replica only ever holds the token's hash: deployment arguments are visible to the cluster
    token_sha256 = hashlib.sha256(token.encode()).hexdigest() if token else None
    connect()
    from ray import serve

    from deploy.app import SlimrayModel

    _ensure_serve(opts.port)
    model = SlimrayModel.options(
        num_replicas=opts.num_replicas,
        # every HTTP request is one ongoing request at the replica: with Serve's default of 5, batches never
        # grow past 5 requests; leave room for two full batches
        max_ongoing_requests=max(64, 2 * opts.max_batch_size),
    ).bind(str(Path(path).resolve()), info=info, max_batch_size=opts.max_batch_size,
           batch_wait_timeout_s=float(opts.batch_wait_timeout_s), max_inputs=opts.max_inputs,
           token_sha256=token_sha256, ptq=opts.ptq, runtime=opts.runtime)
    try:
        serve.run(model, name=opts.name, route_prefix=opts.route_prefix)
    except Exception as err:  # Serve raises its own exception types; the user needs one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[-1][:300]
        raise DeployError(f"deploying {path} as '{opts.name}' failed: {first}; the previous model (if any) keeps "
                          f"serving; see `slimray serve status`") from err
    return endpoint_url(opts.port, opts.route_prefix)


def status() -> dict:
    """``{"port": ..., "applications": {name: {"status", "message", "route_prefix", "endpoint", "deployments"}},
    "proxies": ...}``; no applications when Serve does not run on the connected Ray (or none is connected)."""
    import ray

    client = _client() if ray.is_initialized() else None  # never start a Ray just to look
    if client is None:
        return {"port": None, "applications": {}, "proxies": {}}
    from ray import serve

    st = serve.status()
    try:
        prefixes = {n: a.get("route_prefix") for n, a in client.get_serve_details().get("applications", {}).items()}
    except Exception:  # route prefixes are a nicety of the report
        prefixes = {}
    apps = {}
    for name, a in st.applications.items():
        apps[name] = {
            "status": str(getattr(a.status, "value", a.status)), "message": a.message,
            "route_prefix": prefixes.get(name),
            "endpoint": endpoint_url(client.http_config.port, prefixes[name]) if prefixes.get(name) else None,
            "deployments": {d: {"status": str(getattr(s.status, "value", s.status)), "message": s.message,
                                "replicas": {str(getattr(k, "value", k)): v for k, v in s.replica_states.items()}}
                            for d, s in a.deployments.items()}}
    return {"port": client.http_config.port, "applications": apps,
            "proxies": {n: str(getattr(p, "value", p)) for n, p in st.proxies.items()}}


def stop(name: Optional[str] = "slimray") -> bool:
    """Delete the application ``name``; ``name=None`` shuts Serve down altogether (proxies included).
    Returns whether there was anything to stop."""
    import ray

    if not ray.is_initialized() or _client() is None:
        return False
    from ray import serve

    if name is None:
        serve.shutdown()
        return True
    if name not in serve.status().applications:
        return False
    serve.delete(name)
    return True


def not_serving(endpoint: str, job: str | None, trial: str | None, *, timeout: float = 5.0) -> str | None:
    """Why ``endpoint`` is not serving ``trial`` of ``job`` (one phrase), or None when it is. An endpoint that
    wants a token this process lacks is taken at its word: something of slimray's answers there."""
    try:
        with EndpointClient(endpoint, timeout=timeout) as c:
            code, answer = c.request("GET", "/v1/model")
    except (OSError, http.client.HTTPException) as err:
        return f"nothing answers at {endpoint} ({err})"
    if code == 401:
        return None
    if code != 200 or not isinstance(answer, dict):
        return f"{endpoint}/v1/model answers {code}"
    if (answer.get("job"), answer.get("trial")) != (job, trial):
        return f"{endpoint} serves job {answer.get('job')}, trial {answer.get('trial')} instead"
    return None


def reconcile(store) -> tuple[Optional[dict], Optional[str]]:
    """The store's live deployment checked against its endpoint. One that is not really serving is marked
    stopped. Returns ``(the live row or None, why it was marked stopped or None)``."""
    live = store.live_deployment()
    if live is None:
        return None, None
    why = not_serving(live["endpoint"], live["job_id"], live["trial_id"])
    if why is None:
        return live, None
    store.set_deployment_status(live["id"], "stopped")
    return {**live, "status": "stopped"}, why
