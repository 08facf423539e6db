"""bench-e2e: the product doing its job. A real search on the MiniLM teacher, its best model promoted to a
Ray Serve endpoint, and that model measured side by side with the baselines a user would otherwise reach for:

  * the fine-tuned teacher (fp32);
  * PyTorch's dynamic INT8 post-training quantization of the teacher (torch.ao quantize_dynamic: every
    nn.Linear int8, embeddings fp32); its size is its state_dict as torch.save writes it;
  * a DistilBERT-style student: every other teacher layer, distilled with logits KD only, for as many steps
    as one full trial of the search;
  * slimray's promoted model (the job's constraints, plus the 8x-smaller bar when something on the front
    meets both; relaxed step by step, and reported, when nothing does).

Each is measured here, in this run: dev-set metric, artifact bytes, latency at batch 1 and 32 (one thread, the
job's sequence length; the four models take turns, three rounds, so a slow spell hits all), and serving throughput through the same Serve endpoint code
(16 closed-loop clients sending real dev-set inputs, dynamic batching up to 32).

    make bench-e2e                   # both tasks, ~1 h each on 2 cores
    make bench-e2e TASK=sst2         # one task
    python -m bench.e2e --task sst2 --fresh       # a new search even if a finished one matches the spec
    python -m bench.e2e --spec examples/tiny.yaml --quick   # a check of the whole path in minutes

A finished job of the same spec in the store (SLIMRAY_HOME: .slimray under make) is reused and an
interrupted one resumed, so a second run only re-measures and re-reports. Writes bench/results/e2e-<task>.json,
e2e-<task>.md and e2e-<task>-pareto.png, every number read from the store or measured in this run.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

from bench.common import CACHE, RESULTS, machine, print_table, print_targets, setup_env, target, write

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"sst2": ROOT / "examples" / "sst2-minilm.yaml", "mrpc": ROOT / "examples" / "mrpc-minilm.yaml"}
SIZE_X, SPEED_X, MAX_DROP, PTQ_X = 8.0, 5.0, 1.0, 2.0  # the issue's bar for the promoted model


# --------------------------------------------------------------------------- the job

def find_or_run(spec_path: Path, store, fresh: bool) -> tuple[str, str]:
    """The newest job of this exact spec: reused when finished, resumed when it did not end; else a new one.
    Returns (job id, how: reused | resumed | submitted)."""
    from common.errors import SpecError
    from orchestrator.jobs import new_job_id, resume, submit
    from orchestrator.spec import from_stored, load

    spec = load(spec_path)
    wanted = from_stored(spec.stored())  # as a job stores it: the database password masked
    if not fresh:
        for job in store.list_jobs(500):
            try:
                same = job["name"] == spec.name and from_stored(job["spec"]) == wanted
            except SpecError:  # a job of an older spec format that no longer parses
                same = False
            if not same:
                continue
            if job["status"] == "finished":
                print(f"reusing finished job {job['id']} (same spec; --fresh runs a new search)", flush=True)
                return job["id"], "reused"
            if job["status"] in ("running", "interrupted", "failed"):
                print(f"resuming job {job['id']} ({job['status']})", flush=True)
                return resume(job["id"], store=store), "resumed"
            break
    job_id = new_job_id(spec.name)
    print(f"submitting {spec_path.name} as job {job_id}; follow it with "
          f"`SLIMRAY_HOME={os.environ['SLIMRAY_HOME']} slimray status {job_id}`", flush=True)
    return submit(spec, job_id=job_id, store=store), "submitted"


# --------------------------------------------------------------------------- measuring one model

def quality(model, enc, metric: str) -> dict:
    from workers.evaluate import predict_logits, task_metrics

    return task_metrics(predict_logits(model, enc), enc.labels, metric)


def interleaved_latency(models: dict, seq_len: int, runs: int, rounds: int = 3) -> dict:
    """{name: {latency_ms_b1, latency_ms_b32}}: the models take turns, ``rounds`` times ``runs // rounds`` timed
    runs each, and each keeps the median of its rounds, so a slow spell of this shared machine hits all of them."""
    import statistics

    from workers.evaluate import latency_ms

    per = max(3, runs // rounds)
    times = {name: {1: [], 32: []} for name in models}
    for _ in range(rounds):
        for batch in (1, 32):
            for name, model in models.items():
                positions = getattr(model.config, "max_position_embeddings", None) or seq_len
                times[name][batch].append(latency_ms(model, batch=batch, seq_len=min(seq_len, positions), runs=per,
                                                     threads=1))
    return {name: {f"latency_ms_b{b}": statistics.median(t[b]) for b in (1, 32)} for name, t in times.items()}


def torch_state_bytes(model) -> int:
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def half_depth_student(teacher, spec, steps: int, lr: float, out: Path) -> Path:
    """DistilBERT's recipe on this task: every other teacher layer, logits KD (T 2, α 0.9) from the cached
    teacher logits, ``steps`` steps; saved as a slimray artifact (reused when already there)."""
    from workers import artifacts
    from common.trial_config import DistillConfig, StudentConfig, TrainConfig
    from workers.distill import distill
    from workers.student import build

    if (out / "slimray.json").is_file():
        return out
    model, tok, meta = artifacts.load(teacher.uri)
    layers = max(1, model.config.num_hidden_layers // 2)
    student = build(model, StudentConfig(layers=layers, layer_choice="uniform"))
    t0 = time.perf_counter()

    def show(step, total, loss):
        if step % 100 == 0 or step == total:
            print(f"  half-depth KD: step {step}/{total}, loss {loss:.3f}", flush=True)

    distill(student, teacher.train, DistillConfig(temperature=2.0, alpha=0.9),
            TrainConfig(lr=lr, epochs=1000, max_steps=steps, batch_size=spec.train.batch_size, seed=0),
            teacher_logits=teacher.train_logits, progress=show)
    tmp = out.with_name(out.name + ".tmp")
    artifacts.save(student.eval(), tok, tmp, meta={
        "role": "baseline", "recipe": "DistilBERT-style half depth, logits KD", "task": meta.get("task"),
        "teacher": teacher.uri, "trial_config": {"student": {"layers": layers, "layer_choice": "uniform"},
                                                "distill": {"temperature": 2.0, "alpha": 0.9},
                                                "train": {"lr": lr, "max_steps": steps}},
        "train_seconds": time.perf_counter() - t0})
    tmp.rename(out)
    return out


# --------------------------------------------------------------------------- promotion

def promote_best(job_id: str, store, teacher_bytes: int, port: int):
    """The job's own constraints with the size bar on top; each rung relaxes one thing and is reported."""
    from orchestrator.promote import promote
    from orchestrator.spec import Constraints, from_stored
    from common.errors import DeployError

    base = from_stored(store.get_job(job_id)["spec"]).constraints
    size_mb = teacher_bytes / SIZE_X / 1e6
    drops = [base.max_metric_drop] + [d for d in (2.0, 3.0, 5.0) if base.max_metric_drop is None or
                                      d > base.max_metric_drop] + [None]
    ladder = [Constraints(max_metric_drop=base.max_metric_drop, max_size_mb=size_mb),
              Constraints(max_metric_drop=base.max_metric_drop)]
    ladder += [Constraints(max_metric_drop=d, max_size_mb=size_mb) for d in drops[1:]]
    ladder.append(Constraints(max_metric_drop=None))  # the front's fastest model, whatever it costs
    refused = []
    for c in ladder:
        try:
            done = promote(job_id, c, store=store, port=port, name="slimray")
            return done, c, refused
        except DeployError as err:
            if "meets" not in str(err):
                raise
            refused.append({"constraints": c.describe(), "why": str(err)})
            print(f"  nothing on the front meets {c.describe()}", flush=True)
    raise DeployError(f"job {job_id}: nothing to promote on its front")


# --------------------------------------------------------------------------- serving throughput

def serving_throughput(port: int, models: dict, inputs: list, clients: int, duration: float, warmup: float) -> dict:
    """req/s and p50/p99 for each model behind the same endpoint code: the promoted one at its live route,
    the others deployed one at a time as the application ``baseline`` under /baseline."""
    from ray import serve

    from bench.serve import load
    from deploy import control

    def remove_baseline():
        if "baseline" in serve.status().applications:
            serve.delete("baseline")

    out = {}
    for name, (uri, ptq, live) in models.items():
        path = "/v1/predict"
        if not live:
            # one baseline replica at a time: a rolling update would need a CPU for the old and the new one
            remove_baseline()
            control.deploy(uri, name="baseline", route_prefix="/baseline", port=port, ptq=ptq)
            path = "/baseline/v1/predict"
        load(port, path, 4, 1.0, 0.0, inputs)  # warm the proxy and the replica
        r = load(port, path, clients, duration, warmup, inputs)
        out[name] = r
        print(f"  serving {name}: {r['throughput_rps']:.1f} req/s, p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms,"
              f" {r['errors']} errors", flush=True)
    remove_baseline()
    return out


def ask(endpoint: str, items: list) -> list:
    from common.client import predict

    return predict(endpoint, items, timeout=60)["predictions"]


# --------------------------------------------------------------------------- report

def _md_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> list[str]:
    out = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("–" if v is None else (format(v, fmt) if fmt else str(v)))
        out.append("| " + " | ".join(cells) + " |")
    return out


def report_md(task: str, doc: dict, search_md: str, plot: Path) -> str:
    m, job, promo = doc["machine"], doc["job"], doc["promotion"]
    metric_cols = [("accuracy", "accuracy", ".2f")] + ([("f1", "F1", ".2f")] if doc["metric"] != "accuracy"
                                                       or any("f1" in r for r in doc["rows"]) else [])
    lines = [f"# slimray end to end: {task}", "",
             f"Generated by `{doc['command']}` (bench/e2e.py) on {doc['when']} from the store "
             f"`{doc['store']}` and measurements taken in that run. Machine: {m['cpu']}, {m['cores']} cores, "
             f"torch {m['torch']}, Ray {m['ray']}, transformers {m['transformers']}, DeepSpeed {m['deepspeed']}.", "",
             f"Task `{doc['dataset']}` ({doc['eval_rows']} dev rows), teacher `{doc['teacher_source']}` fine-tuned by "
             f"slimray on {doc['train_rows']} training rows. Latency: one thread, sequence length "
             f"{doc['settings']['seq_len']}, the four models taking turns for 3 rounds of "
             f"{max(3, doc['settings']['latency_runs'] // 3)} timed runs each (the median of the round medians). Serving: one replica, "
             f"{doc['settings']['clients']} closed-loop clients for {doc['settings']['serve_seconds']:g} s each, "
             f"one dev input per request, batching up to 32 — the load generator shares the cores.", "",
             "## Side by side", ""]
    lines += _md_table(doc["rows"], [("model", "model", "")] + metric_cols + [
        ("size_mb", "MB on disk", ".2f"), ("size_x", "size ×", ".2f"), ("latency_ms_b1", "b1 ms", ".2f"),
        ("speed_x_b1", "b1 ×", ".2f"), ("latency_ms_b32", "b32 ms", ".1f"), ("speed_x_b32", "b32 ×", ".2f"),
        ("serve_rps", "serving req/s", ".1f"), ("serve_p99_ms", "p99 ms", ".0f")])
    lines += ["", "## Targets", ""]
    lines += [f"- **{'met' if t['met'] else 'MISSED'}**: {t['name']}: target {t['target']}, got {t['value']}"
              for t in doc["targets"]]
    lines += ["", "## Promotion", "",
              f"Promoted trial `{promo['trial_id']}` ({promo['config']}) under {promo['constraints']}."]
    for r in promo["refused"]:
        lines.append(f"- refused first: {r['constraints']}: {r['why']}")
    lines += [f"- a request to the live endpoint {promo['endpoint'].rstrip('/')}/v1/predict:"]
    for item, p in zip(promo["asked"], promo["answers"]):
        lines.append(f"  - `{json.dumps(item)[:100]}` → {p['label']} ({p['score']:.3f})")
    lines += ["", "## The search", "", search_md, f"![Pareto front]({plot.name})", ""]
    if doc.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- one task

def run_task(task: str, spec_path: Path, args) -> dict:
    from common.paths import open_store
    from orchestrator.report import describe_config, front_summary, markdown, plot_front, search_stats
    from orchestrator.spec import load as load_spec
    from workers import artifacts
    from workers.data import load as load_data
    from workers.teacher import prepare

    spec = load_spec(spec_path)
    store = open_store(spec.storage.db_url)
    t_start = time.perf_counter()
    job_id, how = find_or_run(spec_path, store, args.fresh)
    job = store.get_job(job_id)
    if job["status"] != "finished":
        raise SystemExit(f"job {job_id} ended {job['status']}: {job.get('error')}")
    search_wall = time.perf_counter() - t_start
    teacher_uri = Path(job["baseline"]["uri"])
    data = load_data(spec.task)
    teacher = prepare(spec.teacher, data, spec.teacher_train, teacher_uri.parent)  # the job's, from its cache
    metric, seq_len, runs = spec.task.metric, spec.seq_len, args.runs
    enc = teacher.eval

    rows, models = {}, {}
    print("measuring the teacher", flush=True)
    models["teacher"], _, _ = artifacts.load(teacher.uri)
    rows["teacher"] = {"size_bytes": artifacts.info(teacher.uri).size_bytes, **quality(models["teacher"], enc, metric)}
    print("measuring PyTorch dynamic INT8 PTQ of the teacher", flush=True)
    from deploy.classifier import post_training_quantize

    models["ptq"] = post_training_quantize(models["teacher"], "torch-dynamic-int8")
    rows["ptq"] = {"size_bytes": torch_state_bytes(models["ptq"]), **quality(models["ptq"], enc, metric)}

    steps_per_epoch = -(-len(teacher.train.labels) // spec.train.batch_size)
    kd_steps = args.kd_steps or int(round(float(spec.train.epochs) * steps_per_epoch))
    key = f"{teacher_uri.name}-{kd_steps}-{args.kd_lr:g}"
    half = half_depth_student(teacher, spec, kd_steps, args.kd_lr, CACHE / "e2e" / "baselines" / f"half-depth-{key}")
    print("measuring the DistilBERT-style half-depth student", flush=True)
    models["half"], _, _ = artifacts.load(half)
    rows["half"] = {"size_bytes": artifacts.info(half).size_bytes, **quality(models["half"], enc, metric),
                    "kd_steps": kd_steps}

    from common.ports import free_port
    from common.raylink import connect

    connect(num_cpus=max(2, os.cpu_count() or 2))

    port = free_port()
    print("promoting the job's best model", flush=True)
    done, used, refused = promote_best(job_id, store, rows["teacher"]["size_bytes"], port)
    print(f"measuring the promoted model ({done['trial_id']})", flush=True)
    models["promoted"], _, _ = artifacts.load(done["artifact_uri"])
    rows["promoted"] = {"size_bytes": artifacts.info(done["artifact_uri"]).size_bytes,
                        **quality(models["promoted"], enc, metric)}
    print("timing all four, taking turns", flush=True)
    for name, lat in interleaved_latency(models, seq_len, runs).items():
        rows[name].update(lat)
    del models
    asked = [list(x) if isinstance(x, tuple) else x for x in data.eval.texts[:2]]
    answers = ask(done["endpoint"], asked)

    inputs = list(data.eval.texts)
    served = serving_throughput(port, {"teacher": (teacher.uri, None, False),
                                       "ptq": (teacher.uri, "torch-dynamic-int8", False),
                                       "half": (str(half), None, False),
                                       "promoted": (done["artifact_uri"], None, True)},
                                inputs, args.clients, args.serve_seconds, 2.0 if not args.quick else 0.5)

    names = {"teacher": f"teacher ({spec.teacher}, fp32)", "ptq": "teacher + PyTorch dynamic INT8 PTQ",
             "half": f"DistilBERT-style {rows['half'].get('kd_steps')}-step logits KD, half depth",
             "promoted": f"slimray promoted ({done['trial_id']})"}
    t = rows["teacher"]
    table = []
    for k in ("teacher", "ptq", "half", "promoted"):
        r = rows[k]
        table.append({"model": names[k], "key": k, "metric": r["metric"], "accuracy": r["accuracy"],
                      **({"f1": r["f1"]} if "f1" in r else {}), "size_bytes": r["size_bytes"],
                      "size_mb": r["size_bytes"] / 1e6, "size_x": t["size_bytes"] / r["size_bytes"],
                      "latency_ms_b1": r["latency_ms_b1"], "speed_x_b1": t["latency_ms_b1"] / r["latency_ms_b1"],
                      "latency_ms_b32": r["latency_ms_b32"], "speed_x_b32": t["latency_ms_b32"] / r["latency_ms_b32"],
                      "metric_drop": t["metric"] - r["metric"], "serve_rps": served[k]["throughput_rps"],
                      "serve_p50_ms": served[k]["p50_ms"], "serve_p99_ms": served[k]["p99_ms"],
                      "serve_errors": served[k]["errors"]})
    p, q = table[3], table[1]
    metric_name = {"accuracy": "accuracy", "f1": "F1", "accuracy_f1": "accuracy"}[metric]
    targets = [
        target("promoted: size vs teacher (bytes on disk)", f"≥ {SIZE_X:g}×", f"{p['size_x']:.2f}×",
               p["size_x"] >= SIZE_X),
        target("promoted: batch-1 speed vs teacher", f"≥ {SPEED_X:g}×", f"{p['speed_x_b1']:.2f}×",
               p["speed_x_b1"] >= SPEED_X),
        target(f"promoted: dev {metric_name} within {MAX_DROP:g} point of the teacher", f"drop ≤ {MAX_DROP:g}",
               f"{p['metric_drop']:.2f} ({p['metric']:.2f} vs {table[0]['metric']:.2f})", p["metric_drop"] <= MAX_DROP),
        target("promoted: batch-1 speed vs PyTorch INT8 PTQ, at equal or better metric", f"≥ {PTQ_X:g}× and "
               f"metric ≥ PTQ's", f"{q['latency_ms_b1'] / p['latency_ms_b1']:.2f}× ({p['metric']:.2f} vs "
               f"{q['metric']:.2f})", q["latency_ms_b1"] / p["latency_ms_b1"] >= PTQ_X and p["metric"] >= q["metric"]),
    ]
    promoted_trial = next(tr for tr in store.trials(job_id) if tr["trial_id"] == done["trial_id"])
    summary = front_summary(store, job_id)
    stats = search_stats(store, job_id)
    name = f"e2e-{task}" + ("-quick" if args.quick else "")
    plot = plot_front(store, job_id, RESULTS / f"{name}-pareto.png", marks=[
        {"label": "PyTorch INT8 PTQ", **rows["ptq"]}, {"label": "half-depth KD", **rows["half"]},
        {"label": "promoted (re-measured)", **rows["promoted"]}])
    doc_extra = {
        "command": "python -m bench.e2e " + " ".join(args.argv), "task": task, "spec": str(spec_path.relative_to(ROOT)) if spec_path.is_relative_to(ROOT) else str(spec_path),
        "store": store.url_for_display, "dataset": spec.task.dataset, "metric": metric,
        "train_rows": len(teacher.train.labels), "eval_rows": len(enc.labels),
        "teacher_source": spec.teacher, "job": {**stats, "driver_wall_s_this_run": search_wall},
        "hypervolume": summary["hypervolume"],
        "front": [{k: tr.get(k) for k in ("trial_id", "metric", "size_bytes", "latency_ms_b1",
                                          "remeasured_latency_ms_b1", "status")} | {"config": describe_config(tr["config"])}
                  for tr in summary["front"]],
        "promotion": {"trial_id": done["trial_id"], "config": describe_config(promoted_trial["config"]),
                      "constraints": used.describe(), "refused": refused, "endpoint": done["endpoint"],
                      "artifact_uri": done["artifact_uri"], "asked": asked, "answers": answers},
        "settings": {"seq_len": seq_len, "latency_runs": runs, "clients": args.clients,
                     "serve_seconds": args.serve_seconds, "max_batch_size": 32, "kd_steps": kd_steps,
                     "kd_lr": args.kd_lr},
        "notes": [] if how == "submitted" else [
            f"The search ({job_id}, started {job['started_at']}) was {how} from this command's store rather "
            f"than run again; everything in the side-by-side table and the targets was measured in this run."],
    }
    print_table(table, ["model", "metric", "size_mb", "size_x", "latency_ms_b1", "speed_x_b1", "latency_ms_b32",
                        "serve_rps"])
    print_targets(targets)
    out = write(name, table, targets, extra=doc_extra)
    doc = json.loads(out.read_text())
    md = RESULTS / f"{name}.md"
    md.write_text(report_md(task, doc, markdown(store, job_id, promoted=done["trial_id"]), plot))
    print(f"report: {md}\nresults: {out}\nPareto plot: {plot}", flush=True)
    return doc


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="all", help="sst2 | mrpc | all")
    ap.add_argument("--spec", type=Path, help="run this job spec instead (reported as its name)")
    ap.add_argument("--fresh", action="store_true", help="run a new search even if a finished job matches")
    ap.add_argument("--quick", action="store_true", help="fewer latency runs and serving seconds; -quick results")
    ap.add_argument("--runs", type=int, help="timed runs per latency (default 30, --quick 10)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--serve-seconds", type=float, help="per model (default 10, --quick 2)")
    ap.add_argument("--kd-steps", type=int, help="half-depth baseline steps (default: one full trial's)")
    ap.add_argument("--kd-lr", type=float, default=1e-4)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.runs = args.runs or (10 if args.quick else 30)
    args.serve_seconds = args.serve_seconds or (2.0 if args.quick else 10.0)
    setup_env()
    os.environ.setdefault("SLIMRAY_HOME", str(ROOT / ".slimray"))  # make's, so `slimray jobs` lists these jobs
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.spec:
        from orchestrator.spec import load

        jobs = {load(args.spec).name: args.spec.resolve()}
    elif args.task == "all":
        jobs = TASKS
    elif args.task in TASKS:
        jobs = {args.task: TASKS[args.task]}
    else:
        raise SystemExit(f"--task: one of {', '.join(TASKS)} or all, got {args.task!r}")
    print(f"machine: {machine()['cpu']}, {machine()['cores']} cores; store under {os.environ['SLIMRAY_HOME']}",
          flush=True)
    for task, spec_path in jobs.items():
        run_task(task, Path(spec_path), args)
        import ray
        from ray import serve

        if ray.is_initialized():  # the next task gets a fresh Ray and an empty Serve
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
