"""The slimray orchestrator: job specs, submit/resume/cancel, the Tune driver, the store recorder, promotion, CLI.

    import orchestrator
    job_id = orchestrator.submit(orchestrator.load_spec("examples/tiny.yaml"))
    orchestrator.promote(job_id)

Importing this package starts nothing: Ray, torch and DeepSpeed load inside the functions that need them.
"""
from __future__ import annotations

import common.raylink  # noqa: F401  (Ray's loopback environment, set before anything imports Ray)

__all__ = ["submit", "resume", "cancel", "promote", "load_spec", "parse_spec", "JobSpec"]

_LAZY = {
    "submit": ("orchestrator.jobs", "submit"),
    "resume": ("orchestrator.jobs", "resume"),
    "cancel": ("orchestrator.jobs", "cancel"),
    "promote": ("orchestrator.promote", "promote"),
    "load_spec": ("orchestrator.spec", "load"),
    "parse_spec": ("orchestrator.spec", "parse"),
    "JobSpec": ("orchestrator.spec", "JobSpec"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
