"""A simulated multi-node cluster (ray.cluster_utils.Cluster: head + 3 one-CPU workers, all on 127.0.0.1)."""

import pytest

from conftest import record_fault, submit_with_fault, tiny_job
from db import Store
from common.raylink import connect

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(ray_local):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the session's single-node Ray makes way for the cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # trials run on the worker nodes only
    workers = [c.add_node(num_cpus=1) for _ in range(3)]
    connect(c.address)
    yield c, workers
    ray.shutdown()
    c.shutdown()
    connect(None, num_cpus=2)  # back to the session's Ray


def test_trials_spread_over_nodes_and_survive_a_node_loss(cluster, tiny_teacher_dir, tmp_path):
    c, workers = cluster
    raw = tiny_job(tiny_teacher_dir, tmp_path, algorithm={"name": "random", "asha": False},
                   search={"student": {"layers": [1, 2]}, "prune": {"kind": "none"}, "quant": {"mode": "none"}},
                   budget={"num_trials": 6, "max_concurrent": 3, "max_failures": 2},
                   train={"epochs": 1, "batch_size": 16, "eval_every": 2},
                   task={"train_size": 400, "eval_size": 100, "max_length": 32})
    store_url = raw["storage"]["db_url"]

    def every_node_busy(store, trials):
        return sum(t["status"] == "running" for t in trials) >= 3

    # every node runs one trial: one running trial dies with the node
    job_id, removed = submit_with_fault(raw, every_node_busy, lambda: c.remove_node(workers[0]))
    store = Store(store_url)
    trials = store.trials(job_id)
    record_fault("worker node removed mid-search (simulated 4-node cluster)", injected=int(bool(removed)),
                 trials=6, recorded=len(trials), duplicates=len(trials) - len({t["trial_id"] for t in trials}),
                 lost=6 - sum(t["status"] == "terminated" for t in trials),
                 retried=sum(t["attempts"] > 1 for t in trials))
    assert removed, "the search ended before a node could be removed"
    assert store.get_job(job_id)["status"] == "finished"
    assert len(trials) == 6 and len({t["trial_id"] for t in trials}) == 6  # each trial exactly once
    assert all(t["status"] == "terminated" for t in trials), [(t["trial_id"], t["error"]) for t in trials]
    assert any(t["attempts"] >= 2 for t in trials)  # the trial on the lost node was retried elsewhere
    nodes = {t["result"]["node_id"] for t in trials}
    assert len(nodes) >= 2  # trials really spread over the worker nodes
    # the teacher's logits went through the object store once; every artifact sits under the shared root
    assert all(t["artifact_uri"].startswith(str(tmp_path / "jobs")) for t in trials)
