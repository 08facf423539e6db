"""The Ray Serve application that serves a promoted artifact, and cluster manifests (deploy/cluster/)."""

import os as _os

# Ray reads these when it is imported: slimray keeps Ray on loopback and quiet unless the user says otherwise.
_os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
_os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

__all__ = ["serve"]
