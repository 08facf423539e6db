"""How a failed SQL statement becomes a StoreError, and which failures are worth retrying."""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable, TypeVar

from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError

from common.errors import StoreError

__all__ = ["TransientStoreError", "store_error", "one_line", "retrying", "RETRY_DELAYS_S"]

log = logging.getLogger(__name__)

# Seconds to wait before each retry. SQLite has already waited busy_timeout
# before saying "locked", so a few short retries are enough to outlast a
# long CLI read or a PostgreSQL failover's dropped connections.
RETRY_DELAYS_S = (0.05, 0.25, 1.0)

# Lower-case fragments of driver messages for conditions that go away by themselves.
_TRANSIENT = (
    "database is locked", "database is busy", "deadlock", "could not serialize",
    "server closed the connection", "terminating connection", "connection refused",
    "connection reset", "connection timed out", "could not connect", "ssl syscall",
)


class TransientStoreError(StoreError):
    """A StoreError that the same call may not hit if tried again."""


def one_line(text: object) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def store_error(err: SQLAlchemyError, where: str) -> StoreError:
    """``err`` as one line naming the store (password masked in ``where``)."""
    reason = one_line(getattr(err, "orig", None) or err) or type(err).__name__
    if isinstance(err, IntegrityError):
        return StoreError(f"store {where} refused a write: {reason}")
    if _is_transient(err):
        return TransientStoreError(f"store {where} is unavailable: {reason}")
    return StoreError(f"store {where} failed: {reason}")


def _is_transient(err: SQLAlchemyError) -> bool:
    if isinstance(err, DBAPIError) and err.connection_invalidated:
        return True
    if not isinstance(err, OperationalError):
        return False
    reason = str(err.orig or err).lower()
    return any(fragment in reason for fragment in _TRANSIENT)


T = TypeVar("T")


def retrying(method: Callable[..., T]) -> Callable[..., T]:
    """Re-run a whole Store method when it fails transiently.

    The whole method, not one statement, because a transaction that hit
    "database is locked" half-way was rolled back and must start over. A
    dropped connection during COMMIT leaves it unknown whether the commit
    landed; idempotent writes make running them again harmless.
    """
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        for delay in RETRY_DELAYS_S:
            try:
                return method(*args, **kwargs)
            except TransientStoreError as err:
                log.warning("%s; retrying in %.2fs", err, delay)
                time.sleep(delay)
        return method(*args, **kwargs)

    return wrapper
