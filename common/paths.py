"""Where slimray keeps its state on this machine, and the one way to open the store."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["home", "open_store"]


def home() -> Path:
    """``SLIMRAY_HOME``, else ``~/.slimray``: the default store, job folders, teacher cache and local Ray head."""
    return Path(os.environ.get("SLIMRAY_HOME", Path.home() / ".slimray")).expanduser()


def open_store(db_url: str | None = None):
    """The SQL store at ``db_url``, else ``SLIMRAY_DB_URL``, else SQLite under :func:`home`."""
    from db import Store

    return Store(db_url or None)
