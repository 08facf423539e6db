"""The one exception root of slimray and its typed children.

A user sees ``str(err)``: one line naming what was wrong and how to fix it.
This module imports nothing heavy so every package (including ``db`` and
``search``) can raise these.
"""

__all__ = ["SlimrayError", "ConfigError", "SpecError", "DataError", "TrialError", "StoreError", "DeployError"]


class SlimrayError(Exception):
    """Root of every error slimray raises on purpose."""


class ConfigError(SlimrayError, ValueError):
    """A config value is out of its allowed range; the message names the field."""


class SpecError(ConfigError):
    """A job spec has problems; ``problems`` holds one line per problem."""

    def __init__(self, problems):
        problems = list(problems) if not isinstance(problems, str) else [problems]
        # one line each, whatever a user put in a key or value
        self.problems = [str(p).replace("\r", "\\r").replace("\n", "\\n") for p in problems]
        super().__init__("; ".join(self.problems) if len(self.problems) == 1 else
                         f"{len(self.problems)} problems in the job spec:\n  " + "\n  ".join(self.problems))


class DataError(SlimrayError):
    """A dataset file, column or label is missing or wrong."""


class TrialError(SlimrayError):
    """A trial failed; the traceback is recorded with the trial."""


class StoreError(SlimrayError):
    """The SQL store could not be reached or refused a write."""


class DeployError(SlimrayError):
    """Promotion or serving failed."""
