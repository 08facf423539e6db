"""Alembic environment for the slimray store.

``db.migrate`` hands us an open connection (runtime) or, for a developer's
``db.migrate.new_revision``, a URL to connect to. There is no alembic.ini.
"""

from alembic import context
from sqlalchemy import create_engine

from db.models import Base

config = context.config


def _migrate(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        compare_type=True,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if config.attributes.get("connection") is not None:
    _migrate(config.attributes["connection"])
else:
    with create_engine(config.get_main_option("sqlalchemy.url")).begin() as connection:
        _migrate(connection)
