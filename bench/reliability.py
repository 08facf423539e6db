"""bench-reliability: run the fault-injection tests and tabulate what they saw.

Faults: a worker node removed mid-search, a trial process SIGKILLed, the driver SIGKILLed and resumed, the
PostgreSQL store stopped during reports, a model swapped under load, the endpoint fuzzed from its OpenAPI
schema. Each test records its counts (trials lost, duplicated, retried; requests failed; 5xx seen) and asserts
them itself; this collects them into bench/results/reliability.json.

    make bench-reliability     # ~4 min on 2 cores
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import print_table, print_targets, target, write

TESTS = [
    "tests/test_cluster.py::test_trials_spread_over_nodes_and_survive_a_node_loss",
    "tests/test_jobs.py::test_killed_trial_process_resumes_from_its_checkpoint",
    "tests/test_jobs.py::test_driver_killed_mid_search_is_resumed_without_loss",
    "tests/test_recorder.py::test_writes_queue_while_postgres_is_down_and_replay_in_order",
    "tests/test_serve.py::test_swap_under_load_drops_no_request",
    "tests/test_serve.py::test_openapi_fuzz_never_5xx",
]


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    out = Path(tempfile.mkdtemp(prefix="slimray-reliability-")) / "faults.jsonl"
    env = {**os.environ, "SLIMRAY_RELIABILITY_OUT": str(out)}
    if not env.get("SLIMRAY_TEST_PG_URL"):
        pg = subprocess.run(["bash", ".ci/postgres.sh"], cwd=root, capture_output=True, text=True).stdout.strip()
        env["SLIMRAY_TEST_PG_URL"] = pg
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=root, env=env)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    for r in rows:
        for k in ("trials", "recorded", "duplicates", "lost", "retried", "requests", "failed_requests", "http_5xx"):
            r.setdefault(k, "-")
    print_table(rows, ["fault", "injected", "trials", "recorded", "lost", "duplicates", "retried", "requests",
                       "failed_requests", "http_5xx"])
    num = lambda key: sum(r[key] for r in rows if isinstance(r.get(key), int))  # noqa: E731
    targets = [
        target("fault scenarios run and recorded", f"{len(TESTS)} (PostgreSQL one needs a server)", len(rows),
               len(rows) == len(TESTS)),
        target("trials lost", "0", num("lost"), num("lost") == 0),
        target("trials duplicated", "0", num("duplicates"), num("duplicates") == 0),
        target("requests failed during the swap / fuzzing", "0", num("failed_requests"), num("failed_requests") == 0),
        target("HTTP 5xx seen", "0", num("http_5xx"), num("http_5xx") == 0),
        target("fault tests passed", "pytest exit 0", run.returncode, run.returncode == 0),
    ]
    print_targets(targets)
    print(f"wrote {write('reliability', rows, targets)}")


if __name__ == "__main__":
    main()
