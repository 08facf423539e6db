"""What the CLI prints: tables that fit the terminal, and third-party chatter kept out of the way.

A rich table squeezed below its natural width truncates every header to "tria…", "stat…"; these tables
instead drop their least important columns until the rest fit, and use a short header before that.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

__all__ = ["Column", "fit_table", "quiet_third_parties"]

# a column's frame: one space of padding either side plus its share of the vertical rules
_FRAME = 3


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    short: str | None = None  # used when the full header would not fit
    priority: int = 0  # higher is kept longer; 0 goes first
    right: bool = False


def _width(header: str, cells: list[str]) -> int:
    return max([len(header)] + [len(c) for c in cells]) + _FRAME


def _layout(columns: list[Column], cells: dict[str, list[str]], width: int) -> list[tuple[Column, str]]:
    """The columns to show with the header each gets: short headers first, then the least important
    columns dropped (ties: the rightmost first), until the table fits ``width``."""
    shown = [(c, c.header) for c in columns]

    def total(items):
        return 1 + sum(_width(h, cells[c.key]) for c, h in items)

    if total(shown) > width:
        shown = [(c, c.short or c.header) for c in columns]
    while total(shown) > width and len(shown) > 1:
        drop = min(range(len(shown)), key=lambda i: (shown[i][0].priority, -i))
        shown.pop(drop)
    return shown


def fit_table(title: str | None, columns: list[Column], rows: list[dict[str, str]], width: int | None = None):
    """A rich ``Table`` of ``rows`` (already formatted strings, keyed by column key) no wider than ``width``
    (default: the terminal's). Headers are never cut: columns are abbreviated or dropped instead."""
    from rich.console import Console
    from rich.table import Table

    width = width or Console().width
    cells = {c.key: [r.get(c.key, "") for r in rows] for c in columns}
    shown = _layout(columns, cells, width)
    table = Table(title=title, title_justify="left", width=None)
    for c, header in shown:
        table.add_column(header, justify="right" if c.right else "left", no_wrap=True, overflow="fold")
    for r in rows:
        table.add_row(*[r.get(c.key, "") for c, _ in shown])
    return table


def quiet_third_parties(verbose: bool) -> None:
    """Unless ``verbose``: no Tune configuration banner or TensorBoard hint, no Optuna warnings about
    intermediate reports, and Ray/DeepSpeed logs at ERROR. Called once, before Ray is imported."""
    if verbose:
        os.environ.pop("SLIMRAY_QUIET", None)
        return
    os.environ["SLIMRAY_QUIET"] = "1"  # read by trials, which run in other processes
    # Tune's console reporter prints its banner and hints at verbose > 0 of its *new* output engine; the
    # legacy engine honours RunConfig(verbose=0) and prints nothing.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    for name in ("ray", "ray.tune", "ray.train", "ray.serve", "optuna", "DeepSpeed", "deepspeed", "datasets",
                 "transformers", "filelock", "urllib3", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
    except ImportError:  # pragma: no cover - optuna is a dependency; keep the CLI usable without it
        pass
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
