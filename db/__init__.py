"""slimray's SQL store: jobs, trials, per-step metrics, artifacts and deployments.

    from db import Store
    store = Store()  # $SLIMRAY_DB_URL, else sqlite:///~/.slimray/slimray.db
    store.create_job("sst2-tiny-1a2b3c", "sst2-tiny", spec, teacher="...", dataset="glue/sst2")

The Store migrates the schema on open (Alembic, shipped in ``db/migrations``)
and returns plain dicts. Importing this package imports SQLAlchemy only:
no Ray, no torch, and Alembic not until a Store opens.
"""

from common.errors import StoreError

from .engine import default_url, display_url
from .models import DEPLOYMENT_STATUSES, JOB_STAGES, JOB_STATUSES, TRIAL_STATUSES
from .rows import RESULT_COLUMNS
from .store import Store

__all__ = ["Store", "StoreError", "default_url", "display_url",
           "JOB_STATUSES", "JOB_STAGES", "TRIAL_STATUSES", "DEPLOYMENT_STATUSES", "RESULT_COLUMNS"]
