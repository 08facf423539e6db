"""bench-serve: the Ray Serve endpoint under closed-loop load on 127.0.0.1.

Throughput and p50/p99 latency at 1, 8 and 32 concurrent clients (one text per request, SST-2-like
sentences) for (a) dynamic batching (max_batch_size 32) vs batch-1 serving and (b) a compressed student vs
its FP32 teacher. One replica (1 CPU, torch on 1 thread); the load generator, the HTTP proxy and the replica
share this machine's cores, as they would on a small serving node.

    make bench-serve                  # ~5 min on 2 cores
    python -m bench.serve --quick     # ~2 min: 2 s per cell

Models: --teacher DIR and --student DIR are slimray artifacts. By default the teacher is the benchmarks'
fine-tuned MiniLM when bench/.cache/teacher-* holds one (else a 4-layer, 256-wide random BERT), and the student
is a 2-layer copy of it with dynamic int8 weights, cached under bench/.cache/serve-student-*.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.common import CACHE, print_table, print_targets, setup_env, target, write
from common.client import EndpointClient
from common.ports import free_port

MAX_CLIENTS = 64  # a closed-loop client is a thread here; more would measure the load generator
SENTENCES = [
    "a gripping , funny and surprisingly tender film",
    "the plot is a mess and the actors look bored",
    "one of the best movies of the year",
    "it never quite finds its footing , but the score is lovely",
    "a dull , plodding exercise in style over substance",
    "smart , sweet and very funny",
    "the story drags badly in the second half",
    "an awful , stupid mess of a movie that wastes a great cast on a script nobody should have filmed",
    "great performances lift a familiar story",
    "boring",
    "i loved every minute of it",
    "more of a sketch than a story , yet oddly affecting",
    "the director seems to have confused loud with exciting",
    "a quietly devastating portrait of a family coming apart",
    "not funny , not smart , not worth your time",
    "visually stunning but emotionally hollow",
]


# --------------------------------------------------------------------------- models

def _cached_teacher() -> Path | None:
    found = sorted((p for p in CACHE.glob("teacher-*") if (p / "slimray.json").is_file() and p.is_dir()
                    and not p.name.endswith(".tmp")), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _tiny_teacher(out: Path) -> Path:
    """A random 4-layer, 256-wide BERT classifier with a WordPiece vocabulary of the benchmark's words."""
    if (out / "slimray.json").is_file():
        return out
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from workers import artifacts

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += sorted({w for s in SENTENCES for w in s.split()}) + list("abcdefghijklmnopqrstuvwxyz,.'!?")
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab += [f"w{i}" for i in range(2000 - len(vocab))]
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, max_position_embeddings=128, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model = BertForSequenceClassification(config).eval()
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tok = BertTokenizerFast(vocab_file=str(Path(d) / "vocab.txt"), do_lower_case=True)
        artifacts.save(model, tok, out, meta={"role": "teacher", "bench": "serve", "task": {"max_length": 64}})
    return out


def _student(teacher: Path) -> Path:
    """2 of the teacher's layers, with dynamic int8 weights where workers.quantize is available."""
    from workers import artifacts

    key = hashlib.sha256((teacher / "model.safetensors").read_bytes()).hexdigest()[:12]
    out = CACHE / f"serve-student-{key}"
    if (out / "slimray.json").is_file():
        return out
    from common.trial_config import StudentConfig
    from workers.student import build

    model, tok, meta = artifacts.load(teacher)
    student = build(model, StudentConfig(layers=2)).eval()
    quant = None
    try:
        from common.trial_config import DynamicInt8
        from workers.quantize import quantize

        student, quant = quantize(student, DynamicInt8()), {"mode": "dynamic", "bits": 8}
    except (ImportError, TypeError, ValueError) as err:  # a 2-layer fp32 copy still compresses ~3×
        print(f"  (int8 unavailable: {err}; the student stays fp32)")
    artifacts.save(student, tok, out, meta={"role": "student", "bench": "serve", "task": meta.get("task"),
                                            "trial_config": {"student": {"layers": 2}, "quant": quant},
                                            "teacher": str(teacher)})
    return out


def _describe(uri: Path) -> dict:
    from workers import artifacts

    config = json.loads((uri / "config.json").read_text())
    return {"uri": str(uri), "size_bytes": artifacts.info(uri).size_bytes, "layers": config["num_hidden_layers"],
            "hidden": config["hidden_size"], "compressed_modules": len(config.get("slimray_structure") or {})}


# --------------------------------------------------------------------------- load

def _client(port: int, path: str, until: float, window: tuple[float, float], out: list, seed: int,
            inputs: list) -> None:
    """One closed-loop client on a keep-alive connection: send, wait for the answer, send again.
    POST one of ``inputs`` (a text or a [first, second] pair) to /v1/predict; GET anything else."""
    rng = random.Random(seed)
    post = path.endswith("/v1/predict")
    with EndpointClient(f"http://127.0.0.1:{port}", timeout=30) as client:
        while time.perf_counter() < until:
            body = {"inputs": [rng.choice(inputs)]} if post else None
            t0 = time.perf_counter()
            try:
                ok = client.request("POST" if post else "GET", path, body)[0] == 200
            except (OSError, http.client.HTTPException):  # the client reconnects for the next request
                ok = False
            t1 = time.perf_counter()
            if window[0] <= t1 <= window[1]:
                out.append((t1 - t0, ok))


def load(port: int, path: str, clients: int, duration: float, warmup: float, inputs: list | None = None) -> dict:
    """Closed-loop load from ``clients`` threads, one input per request drawn from ``inputs`` (default:
    SENTENCES); counts the answers that arrive within ``duration`` s after ``warmup`` s."""
    clients = max(1, min(clients, MAX_CLIENTS))
    start = time.perf_counter()
    window = (start + warmup, start + warmup + duration)
    results: list = []
    inputs = [list(x) if isinstance(x, tuple) else x for x in (inputs or SENTENCES)]
    threads = [threading.Thread(target=_client, args=(port, path, window[1], window, results, i, inputs), daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=warmup + duration + 60)
    lat = sorted(r[0] * 1000 for r in results if r[1])
    errors = sum(1 for r in results if not r[1])

    def pct(q):
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    return {"requests": len(lat), "errors": errors, "throughput_rps": len(lat) / duration,
            "p50_ms": statistics.median(lat) if lat else float("nan"), "p99_ms": pct(0.99)}



# --------------------------------------------------------------------------- main

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, help="FP32 teacher artifact directory")
    ap.add_argument("--student", type=Path, help="compressed student artifact directory")
    ap.add_argument("--quick", action="store_true", help="2 s per cell instead of 10 (a check that it works)")
    ap.add_argument("--duration", type=float, help="seconds measured per cell (default 10, --quick 2)")
    ap.add_argument("--clients", default="1,8,32", help="concurrency levels (≤ 64)")
    ap.add_argument("--max-batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    duration = args.duration or (2.0 if args.quick else 10.0)
    warmup = 0.5 if args.quick else 2.0
    levels = [min(MAX_CLIENTS, int(c)) for c in args.clients.split(",")]
    setup_env()
    CACHE.mkdir(parents=True, exist_ok=True)

    teacher = args.teacher or _cached_teacher() or _tiny_teacher(CACHE / "serve-tiny-teacher")
    student = args.student or _student(Path(teacher))
    models = {"student": Path(student), "teacher": Path(teacher)}
    print(f"teacher {teacher}\nstudent {student}", flush=True)

    from common.raylink import connect, disconnect
    from deploy import control

    connect(num_cpus=max(2, os.cpu_count() or 2))
    port = free_port()
    rows = []
    try:
        for name, uri in models.items():
            for batch in (args.max_batch_size, 1):
                t0 = time.perf_counter()
                control.deploy(str(uri), name="bench", port=port, max_batch_size=batch,
                               batch_wait_timeout_s=0.01 if batch > 1 else 0.0)
                print(f"{name}, max_batch_size {batch}: deployed in {time.perf_counter() - t0:.0f} s", flush=True)
                load(port, "/v1/predict", 4, 1.0, 0.0)  # warm the proxy and the replica
                if not rows:  # what the HTTP path alone allows here: no model, no batching
                    r = load(port, "/healthz", max(levels), duration, warmup)
                    rows.append({"model": "none (GET /healthz)", "batching": "-", "max_batch_size": 0,
                                 "clients": max(levels), **r})
                    print(f"  HTTP path alone (GET /healthz), {max(levels)} clients: {r['throughput_rps']:.1f} req/s",
                          flush=True)
                for c in levels:
                    r = load(port, "/v1/predict", c, duration, warmup)
                    rows.append({"model": name, "batching": f"max {batch}" if batch > 1 else "off (1)",
                                 "max_batch_size": batch, "clients": c, **r})
                    print(f"  {c:>2} clients: {r['throughput_rps']:.1f} req/s, p50 {r['p50_ms']:.1f} ms, "
                          f"p99 {r['p99_ms']:.1f} ms, {r['errors']} errors", flush=True)
    finally:
        control.stop(None)
        disconnect()

    def cell(model, batch, clients):
        return next((r for r in rows if r["model"] == model and r["max_batch_size"] == batch
                     and r["clients"] == clients), None)

    top = max(levels)
    targets = []
    for name in models:
        b, one = cell(name, args.max_batch_size, top), cell(name, 1, top)
        ratio = b["throughput_rps"] / max(one["throughput_rps"], 1e-9)
        targets.append(target(f"batching vs batch-1 throughput, {name}, {top} clients",
                              f"≥ 3× at p99 ≤ 100 ms", f"{ratio:.2f}× (p99 {b['p99_ms']:.0f} ms)",
                              ratio >= 3 and b["p99_ms"] <= 100))
    s, t = cell("student", args.max_batch_size, top), cell("teacher", args.max_batch_size, top)
    ratio = s["throughput_rps"] / max(t["throughput_rps"], 1e-9)
    targets.append(target(f"compressed vs teacher throughput, batching, {top} clients", "≥ 3×", f"{ratio:.2f}×",
                          ratio >= 3))
    print_table(rows, ["model", "batching", "clients", "throughput_rps", "p50_ms", "p99_ms", "requests", "errors"])
    print_targets(targets)
    out = write("serve", rows, targets, extra={
        "models": {k: _describe(v) for k, v in models.items()},
        "settings": {"duration_s": duration, "warmup_s": warmup, "quick": args.quick, "inputs_per_request": 1,
                     "replicas": 1, "replica_cpus": 1, "batch_wait_timeout_s": 0.01}})
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
