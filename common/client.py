"""The endpoint's HTTP client: `slimray predict`, `serve status`, the demo, the serving benchmark and the tests.

    with EndpointClient("http://127.0.0.1:8000") as c:
        c.predict(["a gripping film", ["a man eats", "someone is eating"]])   # {"predictions": [...], "model": ...}
        c.request("GET", "/v1/model")                                          # (200, {...})

One keep-alive HTTP/1.1 connection per client, so a load generator measures the endpoint rather than TCP
set-up. A loopback endpoint is reached directly, whatever proxy the environment names for the outside world;
other hosts go through the environment's proxy, as a browser would. The bearer token is SLIMRAY_API_TOKEN
unless one is given.
"""
from __future__ import annotations

import http.client
import json
import os
import urllib.parse
import urllib.request
from typing import Any

from common.errors import DeployError

__all__ = ["EndpointClient", "predict", "TOKEN_ENV"]

TOKEN_ENV = "SLIMRAY_API_TOKEN"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class EndpointClient:
    """Requests to one endpoint (``http://HOST:PORT[/prefix]``) over one reused connection."""

    def __init__(self, endpoint: str, *, token: str | None = None, timeout: float = 30.0):
        parts = urllib.parse.urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DeployError(f"endpoint: expected http://HOST:PORT[/prefix], got {endpoint!r}")
        self.endpoint = endpoint.rstrip("/")
        self.prefix = parts.path.rstrip("/")
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self.timeout = timeout
        self._parts = parts
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                headers: dict | None = None) -> tuple[int, Any]:
        """``(status, answer)``: the answer parsed as JSON, its text when it is not JSON, None when empty.
        ``body`` is sent as JSON, ``raw`` as it is. A connection failure raises OSError or
        http.client.HTTPException; the next request opens a new connection."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        sent = {"Content-Type": "application/json"} if data is not None else {}
        if self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        sent.update(headers or {})
        try:
            conn = self._conn = self._conn or self._connect()
            conn.request(method, self.prefix + path, data, sent)
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if resp.will_close:
            self.close()
        text = payload.decode("utf-8", "replace")
        try:
            return resp.status, json.loads(text) if text else None
        except ValueError:
            return resp.status, text

    def predict(self, inputs: list) -> dict:
        """The endpoint's answer for ``inputs`` (texts, or [first, second] pairs); any failure is one line."""
        url = f"{self.endpoint}/v1/predict"
        try:
            status, answer = self.request("POST", "/v1/predict", {"inputs": inputs})
        except (OSError, http.client.HTTPException) as err:
            raise DeployError(f"cannot reach {url} ({err}); is it up? see `slimray serve status`") from None
        if status != 200:
            reason = answer.get("error") if isinstance(answer, dict) else None
            raise DeployError(f"{url} answered {status}: {reason or str(answer)[:200]}")
        return answer

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> EndpointClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _connect(self) -> http.client.HTTPConnection:
        p = self._parts
        cls = http.client.HTTPSConnection if p.scheme == "https" else http.client.HTTPConnection
        port = p.port or (443 if p.scheme == "https" else 80)
        proxy = None if p.hostname in LOOPBACK or urllib.request.proxy_bypass(p.hostname) else \
            urllib.request.getproxies().get(p.scheme)
        if not proxy:
            return cls(p.hostname, port, timeout=self.timeout)
        via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        conn = cls(via.hostname, via.port or 8080, timeout=self.timeout)
        conn.set_tunnel(p.hostname, port)
        return conn


def predict(endpoint: str, inputs: list, *, token: str | None = None, timeout: float = 30.0) -> dict:
    """One request to ``endpoint``'s /v1/predict; see :meth:`EndpointClient.predict`."""
    with EndpointClient(endpoint, token=token, timeout=timeout) as client:
        return client.predict(inputs)
