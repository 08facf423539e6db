"""The slimray endpoint.

    deploy.app          the Ray Serve application that serves one artifact over HTTP (runs in the cluster)
    deploy.control      deploy / status / stop from a driver, and the store's live deployment checked
    deploy.classifier   the model behind it: an artifact loaded once, batches of texts or pairs through it
    deploy.schema       the HTTP schema
    deploy/cluster/     cluster manifests (Ray cluster launcher, KubeRay)

``deploy.deploy``, ``deploy.status`` and ``deploy.stop`` are deploy.control's; importing this package starts
nothing and imports no Ray.
"""
from __future__ import annotations

import common.raylink  # noqa: F401  (Ray's loopback environment, before anything imports Ray)

__all__ = ["deploy", "status", "stop", "ServeOptions", "endpoint_url"]


def __getattr__(name):
    if name in __all__:
        from deploy import control

        return getattr(control, name)
    raise AttributeError(f"module 'deploy' has no attribute {name!r}")
