"""Schema migrations, run from code: no alembic.ini at runtime.

Alembic is imported inside the functions because it is only needed when a
store opens, and ``import db`` stays cheap.
"""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import Engine

__all__ = ["upgrade", "schema_diffs", "new_revision", "SCRIPT_DIR"]

# Found next to this file so the migrations work from an installed wheel too.
SCRIPT_DIR = Path(__file__).parent / "migrations"
# Alembic runs env.py through module-level globals (alembic.context): two threads opening a Store at once
# would trample each other's, so migrations in one process take turns.
_LOCK = threading.Lock()


def _config(connection):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(SCRIPT_DIR))
    config.attributes["connection"] = connection  # env.py migrates over it
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision``; a no-op when it is already there."""
    from alembic import command

    with _LOCK, engine.begin() as connection:
        command.upgrade(_config(connection), revision)


def schema_diffs(engine: Engine) -> list:
    """What autogenerate would change to make the database match ``db.models``; empty when in sync."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from .models import Base

    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def new_revision(message: str, url: str) -> None:
    """For developers after editing ``db.models``: write the next revision file.

    ``url`` names a scratch database; it is first upgraded to head so the
    revision holds only the new change. Review the file before committing it.
    """
    from alembic import command

    from .engine import make_engine

    upgrade(make_engine(url))
    config = _config(None)
    config.set_main_option("sqlalchemy.url", url)
    # Numbered files (0002_add_x.py) read in order in a listing.
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    number = len(list((SCRIPT_DIR / "versions").glob("[0-9]*.py"))) + 1
    command.revision(config, message=message, autogenerate=True, rev_id=f"{number:04d}")
