"""No cluster is reachable here: check the manifests parse and carry what a deployment needs."""
from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "deploy" / "cluster"


def test_ray_up_cluster_yaml():
    doc = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "head_start_ray_commands",
                "worker_start_ray_commands"):
        assert key in doc, key
    assert doc["head_node_type"] in doc["available_node_types"]
    assert any("--head" in c for c in doc["head_start_ray_commands"])


def test_kuberay_raycluster():
    doc = yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    head = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"] for e in head["env"]}
    assert {"SLIMRAY_DB_URL", "SLIMRAY_HOME"} <= env
    assert all("value" not in e for e in head["env"] if e["name"] == "SLIMRAY_DB_URL")  # from a secret, never inline
    assert doc["spec"]["workerGroupSpecs"][0]["replicas"] >= 1


def test_kuberay_rayservice_points_at_the_serve_app():
    doc = yaml.safe_load((CLUSTER / "kuberay-rayservice.yaml").read_text())
    assert doc["kind"] == "RayService"
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    app = serve_cfg["applications"][0]
    module, _, attr = app["import_path"].partition(":")
    import importlib

    assert hasattr(importlib.import_module(module), attr)
    assert "SLIMRAY_ARTIFACT" in app["runtime_env"]["env_vars"]


def test_container_recipe_installs_the_project():
    text = (CLUSTER / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM rayproject/ray:2.60.0" in text
    for pkg in ("orchestrator", "workers", "search", "db", "deploy"):
        assert f"COPY {pkg} {pkg}" in text
    assert "torch==2.13.0" in text and ".[postgres]" in text
