"""The one way slimray reaches Ray: its environment, the Ray a search runs on, and the Ray an endpoint lives on.

    connect(address)          a search: join ``address`` / RAY_ADDRESS, else start an embedded Ray on loopback
    serving_ray(address)      an endpoint: join ``address`` / RAY_ADDRESS, else the local slimray head (started
                              once with `ray start --head`, so the endpoint outlives the command that promoted it)
    find_serving_ray(address) `serve status` / `serve stop`: join that same Ray if it runs; start nothing

The local slimray head
  * listens on 127.0.0.1 only and keeps its own temp dir, one per SLIMRAY_HOME: Ray's default one (/tmp/ray)
    holds the "latest cluster" file that every plain ``ray.init()`` on this machine would join, and nobody
    else's driver must land on the head that serves;
  * runs with Ray's token authentication; a driver that joins a cluster by address sends the token only in
    token mode, which :func:`_token_mode` switches on for this process before it joins.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from common.errors import DeployError, SlimrayError
from common.ports import free_port

__all__ = ["loopback_env", "connect", "disconnect", "serving_ray", "find_serving_ray", "local_head_address",
           "head_dir"]

log = logging.getLogger(__name__)

HEAD_START_S = 180


def loopback_env() -> None:
    """Keep every Ray node and driver of this process on 127.0.0.1 and Ray's usage report off. Ray reads these
    when it is first imported, so this runs before any import of Ray; values already set win."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


loopback_env()  # whoever imports this module is about to use Ray


def _log_level() -> int:
    # the CLI sets SLIMRAY_QUIET unless --verbose: then even Ray's start-up warnings (token auth) stay out
    return logging.ERROR if os.environ.get("SLIMRAY_QUIET") else logging.WARNING


def connect(address: str | None = None, *, dashboard: bool = False, num_cpus: int | None = None) -> None:
    """Join ``address`` (or RAY_ADDRESS) when given, else start an embedded Ray on loopback that ends with this
    process. A process already connected stays with its Ray."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _join(address)
    else:
        # "local" always starts a new Ray: a bare ray.init() would join whatever cluster last ran `ray start` or
        # a simulated Cluster on this machine, and refuse num_cpus there
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 log_to_driver=False, configure_logging=True, logging_level=_log_level())


def disconnect() -> None:
    """Leave the connected Ray (an embedded one stops); a later :func:`serving_ray` joins the serving head."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def serving_ray(address: str | None = None) -> str | None:
    """Connect to the Ray that serves the endpoint and return its address: ``address`` (or RAY_ADDRESS) when
    given; else the local slimray head, started on 127.0.0.1 the first time. A process already connected to Ray
    stays with it (and gets None)."""
    import ray

    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        address = _recorded_head() or _start_head(head_dir())
        _token_mode()
    _join(address)
    return address


def find_serving_ray(address: str | None = None) -> str | None:
    """Join the Ray an endpoint would live on (``address``, RAY_ADDRESS, else a running local slimray head) and
    return its address; None when no address is given and no local head runs. Starts nothing."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().gcs_address
    explicit = address or os.environ.get("RAY_ADDRESS")
    target = explicit or _recorded_head()
    if not target:
        return None
    if not explicit:
        _token_mode()
    _join(target)
    return target


def local_head_address() -> str | None:
    """RAY_ADDRESS, else the address of a running local slimray head, else None; starts nothing, imports no Ray."""
    return os.environ.get("RAY_ADDRESS") or _recorded_head()


def head_dir() -> Path:
    """The local head's temp dir. Short, since Ray puts Unix sockets under it (≤ 107 characters)."""
    from common.paths import home

    key = hashlib.sha1(str(home().resolve()).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / f"slimray-ray-{key}"


# --------------------------------------------------------------------------- internals

def _join(address: str) -> None:
    import ray

    # Ray retries an address where nothing listens for minutes; a plain host:port is checked first
    if address not in ("auto", "local") and "://" not in address and not _listening(address):
        raise SlimrayError(f"cannot join the Ray cluster at {address}: nothing listens there; is it running? "
                           f"give another with --address or RAY_ADDRESS")
    try:
        ray.init(address=address, log_to_driver=False, logging_level=_log_level())
    except (ConnectionError, RuntimeError) as err:  # Ray's own message spans a screen
        why = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise SlimrayError(f"cannot join the Ray cluster at {address} ({why}); is it running? give another with "
                          f"--address or RAY_ADDRESS") from err


def _token_mode() -> None:
    """Send Ray's auth token when joining by address, as the slimray head expects, unless RAY_AUTH_MODE says
    otherwise. Ray caches the mode when it is imported; its own `ray.init()` refreshes the cache the same way
    when it turns token mode on for a new local cluster."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return
    already = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray" in sys.modules and not already:
        from ray._raylet import Config

        Config.initialize("")


def _recorded_head() -> str | None:
    """The address `ray start` wrote into the head's temp dir, if that head still listens (no Ray import)."""
    try:
        address = (head_dir() / "ray_current_cluster").read_text().strip()
    except OSError:
        return None
    return address if address and _listening(address) else None


def _listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def _start_head(temp_dir: Path) -> str:
    port = free_port()
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    temp_dir.mkdir(parents=True, exist_ok=True)
    log_file = temp_dir / "ray-start.log"
    if env.get("RAY_AUTH_MODE", "token").lower() == "token":
        # creates ~/.ray/auth_token only if it does not exist (the token is never printed)
        subprocess.run(ray_cli + ["get-auth-token", "--generate"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, timeout=60, check=False)
        env["RAY_AUTH_MODE"] = "token"
    cmd = ray_cli + ["start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
                     "--disable-usage-stats", "--port", str(port), "--temp-dir", str(temp_dir),
                     # not the defaults (8265, 52365): another Ray on this machine (a running search) may hold them
                     "--dashboard-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port())]
    log.info("starting a local Ray head: %s", " ".join(cmd))
    # Output to a file, not a pipe: the daemons `ray start` leaves behind inherit its stdout, and reading a pipe
    # they hold open would wait for them to exit.
    with open(log_file, "w") as out:
        try:
            code = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=HEAD_START_S).returncode
        except subprocess.TimeoutExpired:
            raise DeployError(f"`ray start --head` did not finish in {HEAD_START_S} s (log: {log_file}); give a "
                              f"running cluster with --address") from None
    if code != 0:
        lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
        raise DeployError(f"could not start a local Ray head ({(lines or ['no output'])[-1][:200]}; log: "
                          f"{log_file}); give a running cluster with --address or RAY_ADDRESS")
    return f"127.0.0.1:{port}"
