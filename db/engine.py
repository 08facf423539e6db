"""Where the store lives and how we connect to it."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

__all__ = ["default_url", "display_url", "make_engine"]

# Long enough to ride out a CLI read overlapping the recorder's commit; past
# this the Store's own retry takes over.
SQLITE_BUSY_TIMEOUT_MS = 10_000


def default_url() -> str:
    """``$SLIMRAY_DB_URL``, else a SQLite file under ``$SLIMRAY_HOME`` (default ``~/.slimray``)."""
    if os.environ.get("SLIMRAY_DB_URL"):
        return os.environ["SLIMRAY_DB_URL"]
    home = Path(os.environ.get("SLIMRAY_HOME") or Path.home() / ".slimray").expanduser()
    return f"sqlite:///{home / 'slimray.db'}"


def display_url(url: str | URL) -> str:
    """The URL with its password masked, safe for logs and error messages."""
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str | URL) -> Engine:
    url = make_url(url)
    if url.get_backend_name() != "sqlite":
        # pre_ping replaces connections a database restart or idle timeout dropped.
        return create_engine(url, pool_pre_ping=True)
    if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cursor = dbapi_conn.cursor()
    # WAL lets the CLI read while the driver's recorder writes.
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL is safe in WAL (a power cut can lose the last commits, never
    # corrupt the file) and makes the recorder's many small commits cheap.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    # SQLite ignores foreign keys unless asked, per connection.
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
