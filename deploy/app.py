"""The slimray endpoint: one Ray Serve deployment with a FastAPI ingress that serves one artifact.

    POST /v1/predict  {"inputs": ["text", ...]} or {"inputs": [["first", "second"], ...]}
                      → {"predictions": [{"label": ..., "score": ...}], "model": {"job": ..., "trial": ...}}
    GET  /v1/model    what is served: trial config, metrics, teacher, size, when and by whom it was promoted
    GET  /healthz     liveness (never needs the token)
    GET  /docs, /openapi.json

Labels are the dataset's names when the artifact records them (negative/positive), else its class values.
A model trained on single sentences refuses sentence pairs with a 422, and a pair model single texts.

This module is what runs inside the cluster; :mod:`deploy.control` deploys it from a driver.
Inputs from concurrent requests are batched per *input* with ``@serve.batch``: a request with 3 texts adds
3 items to the replica's queue, and a forward pass takes up to ``max_batch_size`` items from any requests.
"""
# No `from __future__ import annotations`: FastAPI must see the real types of the route parameters, and
# Serve's class-based view resolves them outside this module's namespace.
import asyncio
import hashlib
import hmac
import logging
import os
from typing import Optional

import common.raylink  # noqa: F401  (sets Ray's loopback environment before Ray is imported)
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.client import TOKEN_ENV
from common.errors import DeployError
from deploy.schema import ErrorBody, Health, ModelInfo, PredictRequest, PredictResponse

__all__ = ["SlimrayModel", "app", "app_from_env", "DEPLOYMENT", "OPEN_PATHS"]

log = logging.getLogger(__name__)

DEPLOYMENT = "model"  # one fixed deployment name: a redeploy updates it in place instead of adding another
OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})

_ERRORS = {401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
           413: {"model": ErrorBody, "description": "more inputs than the deployment's max_inputs"},
           422: {"model": ErrorBody, "description": "malformed JSON or inputs, or inputs of the wrong kind for "
                                                    "the model (a sentence pair for a single-text model, or the "
                                                    "reverse: see `pairs` in /v1/model)"}}

app = FastAPI(title="slimray", version="1",
              description="A compressed transformer classifier chosen by slimray's search. Send texts or "
                          "sentence pairs to /v1/predict; when the deployment has an API token, send it as "
                          "`Authorization: Bearer <token>`.")


# --------------------------------------------------------------------------- errors: JSON, one line, never a 500

def _loc(loc) -> list:
    """The location without FastAPI's leading "body" and pydantic's names of union branches (text or pair),
    which are noise to a client: ``["inputs", 0]``."""
    out = []
    for i, part in enumerate(loc):
        if i == 0 and part == "body" and len(loc) > 1:
            continue
        if i and isinstance(loc[i - 1], int) and isinstance(part, str) and (part == "str" or "[" in part):
            continue
        out.append(part)
    return out


def _where(loc) -> str:
    out = ""
    for part in _loc(loc):
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _first_problem(errors: list) -> str:
    if not errors:
        return "invalid request"
    # For an input that is neither a text nor a pair, both branches complain; the error of the branch the
    # client evidently meant (not a mere type mismatch, else the deepest one) says more.
    best = min(errors, key=lambda e: (e.get("type") in ("string_type", "list_type"), -len(_loc(e.get("loc", ())))))
    if best.get("type") == "json_invalid":
        return f"body is not valid JSON ({best.get('ctx', {}).get('error', 'parse error')})"
    return f"{_where(best.get('loc', ()))}: {best.get('msg', 'invalid')}"


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    # not "input": a client's (possibly huge) body is not echoed back
    detail = [{"type": e.get("type"), "loc": _loc(e.get("loc", ())), "msg": e.get("msg")} for e in errors]
    return JSONResponse(status_code=422, content={
        "error": f"{_first_problem(errors)}; send {{\"inputs\": [\"text\", ...]}} or "
                 f"{{\"inputs\": [[\"first\", \"second\"], ...]}} (see /docs)",
        "detail": jsonable_encoder(detail)})


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400:
        # FastAPI's only 400 is a body it cannot even decode (not UTF-8); to a client that is malformed JSON
        # like any other, so it gets the same 422
        return JSONResponse(status_code=422, content={"error": f"body is not valid JSON ({exc.detail}); send "
                                                               f"UTF-8 JSON (see /docs)"})
    return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)},
                        headers=getattr(exc, "headers", None))


@app.exception_handler(Exception)
async def _crash(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed")
    return JSONResponse(status_code=500, content={"error": f"the model server failed: {type(exc).__name__}; "
                                                           f"see the replica's log"})


class BearerAuth:
    """401 for requests without ``Authorization: Bearer <token>`` when the replica was deployed with a token.

    An ASGI middleware, not a FastAPI dependency: it answers before the body is parsed, so an unauthenticated
    client learns nothing about the schema from 422s (and a plain ASGI class costs less per request than
    Starlette's BaseHTTPMiddleware)."""

    def __init__(self, asgi_app):
        self.app = asgi_app

    async def __call__(self, scope, receive, send):
        expected = _expected_token() if scope["type"] == "http" else None
        if expected and _route(scope) not in OPEN_PATHS:
            header = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1")
            scheme, _, given = header.partition(" ")
            digest = hashlib.sha256(given.strip().encode("utf-8", "surrogateescape")).hexdigest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(digest, expected):
                denied = JSONResponse(status_code=401, headers={"WWW-Authenticate": "Bearer"}, content={
                    "error": f"missing or wrong API token; send 'Authorization: Bearer <token>' with the token the "
                             f"endpoint was deployed with ({TOKEN_ENV})"})
                await denied(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _expected_token() -> Optional[str]:
    try:
        return getattr(serve.get_replica_context().servable_object, "token_sha256", None)
    except Exception:  # not inside a Serve replica (the app mounted on its own): no token configured
        return None


def _route(scope) -> str:
    """The path below the application's route prefix (Serve passes the prefix as the ASGI root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


app.add_middleware(BearerAuth)


# --------------------------------------------------------------------------- the deployment

@serve.deployment(
    name=DEPLOYMENT,
    # surge: the new replica starts beside the old one, which drains only once the new one is up
    max_surge_percent=100,
    ray_actor_options={"num_cpus": 1},
    graceful_shutdown_wait_loop_s=0.5,
    graceful_shutdown_timeout_s=20,
    # a bad artifact fails the deploy in seconds instead of retrying the constructor 20 times
    max_constructor_retry_count=2,
)
@serve.ingress(app)
class SlimrayModel:
    """One replica: the artifact loaded in the constructor, batches of inputs run through it."""

    def __init__(self, artifact_uri: str, *, info: Optional[dict] = None, max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.01, max_inputs: int = 64, token_sha256: Optional[str] = None,
                 ptq: Optional[str] = None, runtime: str = "torch"):
        import torch

        from deploy.classifier import Classifier
        from workers.artifacts import info as artifact_info

        if runtime == "onnxruntime":
            from deploy import ort_backend

            self.classifier = ort_backend.load(artifact_uri)
        else:
            self.classifier = Classifier.load(artifact_uri, ptq=ptq)
        self.classifier(["warm up"])  # the first forward allocates; pay for it before taking traffic
        self.classify.set_max_batch_size(max_batch_size)
        self.classify.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.info = dict(info or {})
        self.max_inputs = max_inputs
        self.token_sha256 = token_sha256
        meta = self.classifier.meta
        self.ref = {"job": self.info.get("job") or meta.get("job_id"),
                    "trial": self.info.get("trial") or meta.get("trial_id")}
        self.model_info = ModelInfo(
            **self.ref, artifact=self.classifier.uri, labels=self.classifier.labels, pairs=self.classifier.pairs,
            max_length=self.classifier.max_length,
            size_bytes=self.classifier.model.size_bytes if runtime == "onnxruntime" else
            artifact_info(artifact_uri).size_bytes,
            teacher=meta.get("teacher"), trial_config=meta.get("trial_config"), metrics=meta.get("metrics"),
            promoted_at=self.info.get("promoted_at"), promoted_by=self.info.get("who"),
            serving={"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s,
                     "max_inputs": max_inputs, "auth": bool(token_sha256), "torch_threads": torch.get_num_threads(),
                     "ptq": ptq, "runtime": runtime},
            deploy_info={k: v for k, v in self.info.items() if k not in ("job", "trial", "promoted_at", "who")},
            provenance=meta).model_dump(mode="json")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def classify(self, items: list) -> list:
        # in a worker thread: the event loop keeps accepting requests (and filling the next batch) meanwhile
        return await asyncio.to_thread(self.classifier, items)

    @app.post("/v1/predict", response_model=PredictResponse, responses=_ERRORS)
    async def predict(self, body: PredictRequest) -> dict:
        if len(body.inputs) > self.max_inputs:
            raise HTTPException(413, f"{len(body.inputs)} inputs in one request; send at most {self.max_inputs} "
                                     f"(split the list over several requests)")
        items = [x if isinstance(x, str) else (x[0], x[1]) for x in body.inputs]
        wrong = self.classifier.first_mismatch(items)
        if wrong is not None:
            want = "sentence pairs; send [first, second], not a single text" if self.classifier.pairs else \
                "single texts; send a text, not a [first, second] pair"
            raise HTTPException(422, f"inputs[{wrong}]: this model classifies {want}")
        predictions = await asyncio.gather(*(self.classify(x) for x in items))
        return {"predictions": predictions, "model": self.ref}

    @app.get("/v1/model", response_model=ModelInfo, responses={401: _ERRORS[401]})
    async def model(self) -> dict:
        return self.model_info

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> dict:
        return {"status": "ok"}


def app_from_env(args: Optional[dict] = None):
    """An application builder for `serve run` / KubeRay's RayService (`import_path: deploy.app:app_from_env`):
    serves ``SLIMRAY_ARTIFACT`` with ``SLIMRAY_MAX_BATCH_SIZE`` (default 32); changing the artifact and
    re-applying the RayService is Serve's rolling update."""
    args = args or {}
    artifact = args.get("artifact") or os.environ.get("SLIMRAY_ARTIFACT")
    if not artifact:
        raise DeployError("set SLIMRAY_ARTIFACT (or the app argument `artifact`) to the artifact directory to serve")
    batch = int(args.get("max_batch_size") or os.environ.get("SLIMRAY_MAX_BATCH_SIZE", 32))
    token = os.environ.get(TOKEN_ENV) or None
    return SlimrayModel.options(max_ongoing_requests=max(64, 2 * batch)).bind(
        str(artifact), info=None, max_batch_size=batch, batch_wait_timeout_s=0.01, max_inputs=64,
        token_sha256=hashlib.sha256(token.encode()).hexdigest() if token else None)
