"""The Ray Serve application that serves a promoted artifact, and cluster manifests (deploy/cluster/)."""

__all__ = ["serve"]
