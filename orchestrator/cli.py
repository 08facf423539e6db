"""The `slimray` command line: submit and follow search jobs, query the store, plot the front."""
from __future__ import annotations

import csv
import io
import json
import logging
import sys
import threading
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from common.errors import SlimrayError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="slimray: search, compress and serve transformer models.")
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", "-v",
                                          help="show Ray, Tune, Optuna and DeepSpeed banners and warnings")):
    from orchestrator.display import quiet_third_parties

    quiet_third_parties(verbose)

COLUMNS = ("trial_id", "status", "metric", "metric_drop", "dev_metric", "dev_metric_drop", "size_bytes",
           "latency_ms_b1", "latency_ms_b32",
           "params", "attempts", "on_front", "parent")


def _fail(err: BaseException) -> None:
    """One line for the user; the traceback goes to the log file."""
    from common.paths import home

    log_dir = home() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "slimray.log", "a") as fh:
        fh.write("".join(traceback.format_exception(err)))
    err_console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)  # "[first, second]" is no markup
    raise typer.Exit(2)


def _guard(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SlimrayError as err:
            _fail(err)

    return wrapper


def _fmt(v, key: str = "") -> str:
    if v is None:
        return "-"
    if key == "size_bytes":
        return f"{v / 1e6:.2f} MB"
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, bool):
        return "*" if v else ""
    return str(v)


def _trial_columns():
    from orchestrator.display import Column

    return [Column("trial_id", "trial_id", "trial", 9), Column("status", "status", "status", 6),
            Column("metric", "metric", "metric", 8, True), Column("metric_drop", "metric_drop", "drop", 7, True),
            Column("dev_metric", "dev metric", "dev", 9, True),
            Column("dev_metric_drop", "dev metric_drop", "dev drop", 7, True),
            Column("size_bytes", "size", "size", 7, True), Column("latency_ms_b1", "latency_ms_b1", "b1 ms", 7, True),
            Column("latency_ms_b32", "latency_ms_b32", "b32 ms", 2, True), Column("params", "params", "params", 1, True),
            Column("attempts", "attempts", "try", 0, True), Column("on_front", "on_front", "front", 5),
            Column("parent", "parent", "parent", 3)]


def _with_dev(trial: dict) -> dict:
    """A trial with its dev-split numbers as columns. They sit in its result; a job that chose on a selection
    split (task.selection) has the selection split's in ``metric`` / ``metric_drop``, and promotion uses these."""
    result = trial.get("result") or {}
    return {**trial, "dev_metric": result.get("dev_metric"), "dev_metric_drop": result.get("dev_metric_drop")}


def _trial_table(trials: list[dict], title: str, width: int | None = None):
    from orchestrator.display import fit_table

    rows = [{c: _fmt(t.get(c), c) for c in COLUMNS} for t in map(_with_dev, trials)]
    return fit_table(title, _trial_columns(), rows, width=width or console.width)


def _stage_line(job: dict) -> str:
    """``stage: teacher (120/500 steps)``; empty before the driver has said anything."""
    stage, progress = job.get("stage"), dict(job.get("progress") or {})
    if not stage:
        return ""
    if stage == "search" and progress.get("unit") in ("trials", "sub-models"):  # the recorder's rows: live count
        counts = job.get("trial_counts", {})
        ended = sum(counts.get(k, 0) for k in ("terminated", "stopped_early", "error"))
        progress["done"] = max(0, ended - progress.get("before", 0))  # rows from before the search (super-student)
    done, total, unit = progress.get("done"), progress.get("total"), progress.get("unit", "")
    head = f"stage: {stage}" + (f", {progress['what']}" if progress.get("what") else "")
    if done is not None and total:
        return f"{head} ({done}/{total} {unit}, {100 * done / total:.0f}%)".replace(" ,", ",")
    if done is not None:
        return f"{head} ({done} {unit})".replace(" )", ")")
    return head


def _progress_table(store, job_id: str):
    from orchestrator.display import Column, fit_table

    job = store.get_job(job_id)
    trials = store.trials(job_id)
    counts = job.get("trial_counts", {})
    best = [t for t in trials if t.get("metric") is not None and t["status"] == "terminated"]
    best.sort(key=lambda t: (-(t["metric"] or 0), t.get("size_bytes") or 0))
    from rich.console import Group
    from rich.text import Text

    stage = _stage_line(job)
    lines = [f"{job_id}: {job['status']}" + (f" · {stage}" if stage else ""),
             f"trials: done {counts.get('terminated', 0)} · running {counts.get('running', 0)} · "
             f"stopped early {counts.get('stopped_early', 0)} · failed {counts.get('error', 0)}"]
    if job.get("warm_sources") is not None:
        lines.append(f"warm start: learned from {', '.join(job['warm_sources']) or 'no earlier job'}")
    columns = [Column("trial_id", "trial_id", "trial", 9), Column("metric", "metric", "metric", 8, True),
               Column("metric_drop", "metric_drop", "drop", 7, True), Column("size_bytes", "size", "size", 6, True),
               Column("latency_ms_b1", "latency_ms_b1", "b1 ms", 5, True)]
    rows = [{c.key: _fmt(t.get(c.key), c.key) for c in columns} for t in best[:5]]
    parts = [Text(line) for line in lines]
    if rows:
        parts.append(fit_table("best so far", columns, rows, width=console.width))
    return Group(*parts)


def _follow(db_url: str, job_id: str, stop: threading.Event) -> None:
    """Live view of a running job, read from the store (the driver writes it)."""
    from db import Store

    store = Store(db_url)
    with Live(console=console, refresh_per_second=1, transient=False) as live:
        while not stop.wait(2.0):
            try:
                live.update(_progress_table(store, job_id))
            except SlimrayError:
                pass  # the job row may not exist for the first second
        try:
            live.update(_progress_table(store, job_id))
        except SlimrayError:
            pass


def _submit_and_follow(spec: Path, address: Optional[str], job_id: Optional[str], quiet: bool) -> str:
    from common.paths import open_store
    from orchestrator.jobs import new_job_id, submit as do_submit
    from orchestrator.spec import load

    parsed = load(spec)
    jid = job_id or new_job_id(parsed.name)
    store = open_store(parsed.storage.db_url)
    stop = threading.Event()
    watcher = None
    if not quiet and sys.stdout.isatty():
        watcher = threading.Thread(target=_follow, args=(store.url, jid, stop), daemon=True)
        watcher.start()
    try:
        do_submit(parsed, address=address, job_id=jid, store=store)
    finally:
        stop.set()
        if watcher:
            watcher.join(timeout=5)
    job = store.get_job(jid)
    trials = store.trials(jid)
    console.print(_trial_table([t for t in trials if t["on_front"]], f"{jid}: Pareto front"))
    console.print(f"job {jid} {job['status']}: {len(trials)} trials; "
                  f"`slimray results {jid}` for all, `slimray pareto {jid} --plot front.png` to plot")
    return jid


@app.command()
@_guard
def submit(spec: Path = typer.Argument(..., help="job spec YAML"),
           address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS, else local)"),
           detach: bool = typer.Option(False, help="run the driver on the cluster through the Ray Jobs API"),
           job_id: Optional[str] = typer.Option(None, "--job-id", help="use this job id (for resubmission)"),
           quiet: bool = typer.Option(False, help="no live progress display")):
    """Run a search job; shows trials done/running/failed and the best so far."""
    if detach:
        from orchestrator.jobs import submit as do_submit
        from orchestrator.spec import load

        jid = do_submit(load(spec), address=address, job_id=job_id, detach=True)
        console.print(f"submitted {jid} to the cluster; follow it with `slimray status {jid}`")
        return
    _submit_and_follow(spec, address, job_id, quiet)


@app.command()
@_guard
def status(job: Optional[str] = typer.Argument(None, help="job id (default: all recent jobs)")):
    """A job's state and trial counts (or the recent jobs)."""
    from common.paths import open_store

    store = open_store()
    if job is None:
        return jobs(limit=20)
    console.print(_progress_table(store, job))
    j = store.get_job(job)
    if j.get("error"):
        console.print(f"error: {j['error']}")


@app.command()
@_guard
def jobs(limit: int = typer.Option(20, help="how many")):
    """List jobs, newest first."""
    from common.paths import open_store

    from orchestrator.display import Column, fit_table

    columns = [Column("id", "id", "id", 9), Column("status", "status", "status", 8),
               Column("stage", "stage", "stage", 5), Column("trials", "trials", "trials", 6, True),
               Column("dataset", "dataset", "data", 3), Column("teacher", "teacher", "teacher", 2),
               Column("created", "created", "created", 1)]
    rows = [{"id": j["id"], "status": j["status"], "stage": j.get("stage") or "-", "teacher": str(j.get("teacher")),
             "dataset": str(j.get("dataset")), "trials": str(sum(j.get("trial_counts", {}).values())),
             "created": str(j.get("created_at", ""))[:16].replace("T", " ")}
            for j in open_store().list_jobs(limit=limit)]
    console.print(fit_table("jobs", columns, rows, width=console.width))


@app.command()
@_guard
def results(job: str, fmt: str = typer.Option("table", "--format", help="table | csv | json"),
            pareto: bool = typer.Option(False, "--pareto", help="only the Pareto front")):
    """Every trial of a job with its config and metrics."""
    from common.paths import open_store

    if fmt not in ("table", "csv", "json"):
        raise SlimrayError(f"--format must be table, csv or json, got {fmt!r}")
    store = open_store()
    trials = [_with_dev(t) for t in store.trials(job) if t["on_front"] or not pareto]
    if fmt == "json":
        typer.echo(json.dumps({"job": store.get_job(job), "trials": trials}, indent=2, default=str))
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(COLUMNS + ("config",))
        for t in trials:
            w.writerow([t.get(c) for c in COLUMNS] + [json.dumps(t.get("config"), sort_keys=True)])
        typer.echo(buf.getvalue().rstrip("\n"))
    else:
        base = store.get_job(job).get("baseline") or {}
        console.print(_trial_table(trials, f"{job} ({'front' if pareto else 'all trials'}); teacher metric "
                                           f"{_fmt(base.get('metric'))} (dev {_fmt(base.get('dev_metric'))}), size "
                                           f"{_fmt(base.get('size_bytes'), 'size_bytes')}"))


@app.command("pareto")
@_guard
def pareto_cmd(job: str, plot: Optional[Path] = typer.Option(None, help="write a PNG of the front here")):
    """The Pareto front of a job (and its hypervolume); --plot draws metric vs size and vs latency."""
    from common.paths import open_store
    from orchestrator.report import front_summary, plot_front

    store = open_store()
    summary = front_summary(store, job)
    console.print(_trial_table(summary["front"], f"{job}: Pareto front, hypervolume {summary['hypervolume']:.4g}"))
    if plot:
        plot_front(store, job, plot)
        console.print(f"plot written to {plot}")


@app.command()
@_guard
def resume(job: str, address: Optional[str] = typer.Option(None)):
    """Continue an interrupted job; finished trials are kept."""
    from orchestrator.jobs import resume as do_resume

    do_resume(job, address=address)
    console.print(f"job {job} resumed and finished; `slimray results {job}`")


@app.command()
@_guard
def cancel(job: str):
    """Stop a running job (its driver stops every trial within seconds)."""
    from orchestrator.jobs import cancel as do_cancel

    do_cancel(job)
    console.print(f"job {job} marked cancelled")


@app.command("gc")
@_guard
def gc_cmd(job: str, keep_top: int = typer.Option(3, "--keep-top", help="also keep the K best trials by metric"),
           dry_run: bool = typer.Option(False, "--dry-run", help="list what would be removed, remove nothing")):
    """Delete the artifacts of a job's trials that are neither on its Pareto front nor in its top K by metric
    (nor serving); their rows stay, marked artifact deleted."""
    from orchestrator.retention import gc

    done = gc(job, keep_top=keep_top, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    console.print(f"job {job}: {verb} {len(done.deleted)} artifact(s), {done.freed_bytes / 1e6:.1f} MB; kept "
                  f"{len(done.kept)} ({', '.join(done.kept) or 'none'})")


@app.command()
@_guard
def demo(spec: Path = typer.Option(Path("examples/demo-sst2.yaml"), help="the demo job spec"),
         max_drop: Optional[float] = typer.Option(None, help="promotion's metric-drop cap (default: the spec's)")):
    """The whole loop on the embedded defaults: teacher → search → store → promote → a real request.

    The search runs on an embedded Ray that ends with it; the endpoint runs on the local slimray Ray head,
    which outlives the demo (`slimray predict`, `slimray serve status`, `slimray serve stop`)."""
    from common.client import predict as ask
    from common.paths import home, open_store
    from common.raylink import disconnect
    from orchestrator.promote import promote as do_promote
    from orchestrator.report import describe_config, markdown, plot_front
    from orchestrator.spec import from_stored

    logging.getLogger("ray").setLevel(logging.WARNING)
    jid = _submit_and_follow(spec, None, None, False)
    store = open_store()
    plot = plot_front(store, jid, home() / "reports" / f"{jid}-pareto.png")
    job = store.get_job(jid)
    constraints = from_stored(job["spec"]).constraints.override(max_metric_drop=max_drop)
    disconnect()  # the search's Ray ends here; the endpoint goes to the local head, which outlives the demo
    try:
        done = do_promote(jid, constraints, store=store, detached=True)
    except SlimrayError as err:  # nothing met the bar: serve the front's most accurate model, and say so
        console.print(f"[yellow]{err}[/yellow]")
        best = max((t for t in store.trials(jid) if t["on_front"]), key=lambda t: t["metric"] or 0)
        done = do_promote(jid, trial=best["trial_id"], store=store, detached=True)
    promoted_cfg = next(t["config"] for t in store.trials(jid) if t["trial_id"] == done["trial_id"])
    console.print(f"promoted trial {done['trial_id']} (metric {done['metric']:.2f}, drop {done['metric_drop']:.2f}, "
                  f"{done['size_bytes'] / 1e6:.2f} MB, {done['latency_ms_b1']:.2f} ms) at {done['endpoint']}")
    texts = ["a gorgeous, witty, seductive movie.", "the plot is a dull, lifeless mess."]
    answer = ask(done["endpoint"], texts, timeout=60)
    lines = [f"# slimray demo: job {jid}", "",
             f"Promoted trial `{done['trial_id']}` ({describe_config(promoted_cfg)}): metric {done['metric']:.2f} "
             f"(drop {done['metric_drop']:.2f}), {done['size_bytes'] / 1e6:.2f} MB, {done['latency_ms_b1']:.2f} ms at "
             f"batch 1, serving at {done['endpoint']}", ""]
    for text, p in zip(texts, answer["predictions"]):
        console.print(f"  {text!r} → label {p['label']} (score {p['score']:.3f})")
        lines.append(f"- `{text}` → {p['label']} ({p['score']:.3f})")
    report = home() / "reports" / f"{jid}.md"
    report.write_text("\n".join(lines) + "\n\n" + markdown(store, jid, promoted=done["trial_id"]) +
                      f"\n![Pareto front]({plot.name})\n")
    console.print(f"report: {report}\nPareto plot: {plot}\nresults: `slimray results {jid}`; "
                  f"store: {store.url_for_display}\nthe endpoint keeps serving: `slimray predict \"some text\"`; "
                  f"`slimray serve stop` ends it")


@app.command()
@_guard
def promote(job: str,
            max_drop: Optional[float] = typer.Option(None, "--max-drop", help="metric drop vs the teacher, points "
                                                                             "(default: the spec's, else 1.0)"),
            max_size_mb: Optional[float] = typer.Option(None, "--max-size-mb", help="model size cap"),
            max_latency_ms: Optional[float] = typer.Option(None, "--max-latency-ms", help="batch-1 latency cap"),
            trial: Optional[str] = typer.Option(None, "--trial", help="serve this trial instead of picking"),
            port: int = typer.Option(8000, help="HTTP port of Ray Serve on 127.0.0.1"),
            route_prefix: str = typer.Option("/", "--route-prefix"),
            name: str = typer.Option("slimray", help="Serve application name (same name = rolling swap)"),
            address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS, else a "
                                                             "local Ray head that outlives this command)"),
            runtime: str = typer.Option("torch", "--runtime", help="torch | onnxruntime (the trial's ONNX export, "
                                                                   "made if missing) | auto (the faster one)")):
    """Serve the Pareto-best model of JOB under the constraints (front latencies re-measured first).

    Without --address/RAY_ADDRESS the endpoint runs on a local Ray head started for slimray (kept running after
    this command; `slimray serve stop` removes the app)."""
    from common.paths import open_store
    from orchestrator.promote import promote as do_promote
    from orchestrator.spec import from_stored

    store = open_store()
    constraints = None
    if trial is None:
        constraints = from_stored(store.get_job(job)["spec"]).constraints.override(
            max_metric_drop=max_drop, max_size_mb=max_size_mb, max_latency_ms=max_latency_ms)
    done = do_promote(job, constraints, trial=trial, store=store, port=port, route_prefix=route_prefix, name=name,
                      address=address, detached=True, runtime=runtime)
    table = Table(title=f"{job}: Pareto front, batch-1 latency re-measured")
    for c in ("trial_id", "metric", "metric_drop", "size", "latency_ms_b1", "reported_latency_ms_b1"):
        table.add_column(c)
    for r in done["front"]:
        table.add_row(("* " if r["trial_id"] == done["trial_id"] else "") + r["trial_id"], _fmt(r["metric"]),
                      _fmt(r["metric_drop"]), _fmt(r["size_bytes"], "size_bytes"), _fmt(r["latency_ms_b1"]),
                      _fmt(r["reported_latency_ms_b1"]))
    console.print(table)
    timing = done.get("runtime_timing")
    if timing:
        console.print(f"batch-1 latency: torch {timing['torch']['median_ms']:.2f} ms (spread "
                      f"{timing['torch']['spread_ms']:.2f}), onnxruntime {timing['onnxruntime']['median_ms']:.2f} ms "
                      f"(spread {timing['onnxruntime']['spread_ms']:.2f})", highlight=False)
    console.print(f"serving trial {done['trial_id']} of {job} at {done['endpoint']} on {done['runtime']} "
                  f"(deployment {done['deployment_id']}); try `slimray predict \"some text\"`")


@app.command("export")
@_guard
def export_cmd(job: str,
               trial: str = typer.Option(..., "--trial", help="the trial whose artifact to export"),
               fmt: str = typer.Option("onnx", "--format", help="onnx"),
               out: Optional[Path] = typer.Option(None, "--out", help="folder to write (default: beside the "
                                                                      "artifact, <artifact>-onnx)"),
               ptq: Optional[str] = typer.Option(None, "--ptq", help="ort-dynamic-int8: quantize an fp32 "
                                                                     "artifact with ONNX Runtime's quantizer"),
               min_agreement: float = typer.Option(0.995, "--min-agreement", help="share of dev predictions the "
                                                   "export must share with the artifact, or nothing is written")):
    """Export a trial's model to ONNX with its own quantization, checked against it on the job's dev split."""
    from orchestrator.exporting import export_trial

    report = export_trial(job, trial, fmt=fmt, out=out, ptq=ptq, min_agreement=min_agreement)
    v = report.verification
    console.print(f"exported trial {trial} of {job} to {report.out_dir} ({report.onnx['bytes'] / 1e6:.2f} MB, "
                  f"{report.quantization['summary']}); agrees on {v['argmax_agreement']:.2%} of {v['rows']} dev "
                  f"rows, max logit difference {v['max_abs_logit_diff']:.3g}", highlight=False)


serve_app = typer.Typer(help="the Ray Serve endpoint", no_args_is_help=True)
app.add_typer(serve_app, name="serve")


NO_RAY = "no Serve is running: no local slimray Ray head, and no --address or RAY_ADDRESS"


@serve_app.command("status")
@_guard
def serve_status(as_json: bool = typer.Option(False, "--json"),
                 address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS, "
                                                                  "else the local slimray head)")):
    """The Serve applications, and the live deployment recorded in the store, checked against its endpoint
    (one that no longer answers is marked stopped)."""
    from common.paths import open_store
    from common.raylink import find_serving_ray
    from deploy import control

    ray_address = find_serving_ray(address)
    state = control.status() if ray_address else {"port": None, "applications": {}, "proxies": {}}
    live, ended = control.reconcile(open_store())
    if as_json:
        typer.echo(json.dumps({"ray": ray_address, "serve": state, "live_deployment": None if ended else live,
                               "marked_stopped": {**live, "why": ended} if ended else None}, indent=2, default=str))
        return
    if not ray_address:
        typer.echo(NO_RAY)
    elif not state["applications"]:
        typer.echo(f"no Serve application is running on the Ray at {ray_address}")
    for app_name, a in state["applications"].items():
        typer.echo(f"{app_name}: {a.get('status')} at {a.get('endpoint') or a.get('route_prefix')} "
                   f"{a.get('message') or ''}".rstrip())
    if ended:
        typer.echo(f"the store listed job {live['job_id']}, trial {live['trial_id']} as live at "
                   f"{live['endpoint']}, but {ended}: marked it stopped")
    elif live:
        typer.echo(f"live: job {live['job_id']}, trial {live['trial_id']} at {live['endpoint']} "
                   f"(since {live['created_at']}, by {live['who']})")


@serve_app.command("stop")
@_guard
def serve_stop(name: str = typer.Option("slimray", help="the application to remove"),
               all_apps: bool = typer.Option(False, "--all", help="shut Serve down altogether"),
               address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS, "
                                                                "else the local slimray head)")):
    """Remove the endpoint (the local Ray head keeps running). Exits 1 when nothing was serving."""
    from common.paths import open_store
    from common.raylink import find_serving_ray
    from deploy import control

    ray_address = find_serving_ray(address)
    stopped = bool(ray_address) and control.stop(None if all_apps else name)
    live, ended = control.reconcile(open_store())  # the live row ends once its endpoint stops answering
    what = f"; the store's live deployment (job {live['job_id']}, trial {live['trial_id']}) is marked stopped" \
        if ended else ""
    if stopped:
        typer.echo(f"stopped {'Serve' if all_apps else name} on the Ray at {ray_address}{what}")
        return
    why = NO_RAY if not ray_address else f"no Serve application {name!r} on the Ray at {ray_address}"
    typer.echo(f"{why}; nothing to stop{what}")
    raise typer.Exit(1)


def _endpoint(url: Optional[str]) -> str:
    if url is not None:
        return url
    from common.paths import open_store

    live = open_store().live_deployment()
    return live["endpoint"] if live else "http://127.0.0.1:8000"


@app.command()
@_guard
def predict(text: str = typer.Argument(..., help="the text to classify"),
            pair: Optional[str] = typer.Option(None, "--pair", help="second sentence, for sentence-pair tasks"),
            url: Optional[str] = typer.Option(None, help="endpoint (default: the live deployment's, else "
                                                         "http://127.0.0.1:8000)"),
            timeout: float = typer.Option(30.0, help="seconds"),
            as_json: bool = typer.Option(False, "--json", help="print the JSON answer")):
    """Send one text (or pair) to the endpoint; honours SLIMRAY_API_TOKEN."""
    from common.client import predict as ask

    answer = ask(_endpoint(url), [[text, pair] if pair is not None else text], timeout=timeout)
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
        return
    p, model = answer["predictions"][0], answer.get("model", {})
    typer.echo(f"{p['label']} (score {p['score']:.3f})  (job {model.get('job')}, trial {model.get('trial')})")


spec_app = typer.Typer(help="the job spec", no_args_is_help=True)
app.add_typer(spec_app, name="spec")


@spec_app.command("schema")
@_guard
def spec_schema():
    """Print the JSON Schema of a job spec (docs/configuration.md is generated from it)."""
    from orchestrator.spec import JobSpec

    typer.echo(json.dumps(JobSpec.model_json_schema(), indent=2))


@spec_app.command("check")
@_guard
def spec_check(spec: Path = typer.Argument(..., help="job spec YAML")):
    """Validate a job spec without running it: every problem, one line each."""
    from orchestrator.spec import load

    parsed = load(spec)
    console.print(f"{spec}: valid job spec {parsed.name!r} ({len(parsed.search.dims)} searched knobs, "
                  f"{parsed.budget.num_trials} trials, objectives {', '.join(map(str, parsed.objectives))})")


teacher_app = typer.Typer(help="the job's teacher", no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")


@teacher_app.command("prepare")
@_guard
def teacher_prepare(spec: Path = typer.Argument(..., help="job spec YAML")):
    """Fine-tune the spec's teacher ahead of a search (or find it already prepared): prints where it is cached
    and its metric on the eval split. Jobs with the same teacher settings then reuse it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from orchestrator.jobs import prepare_teacher, teacher_cache_dir
    from orchestrator.spec import load

    parsed = load(spec)
    stages = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("teacher", total=None, loss="")

        def on_step(step, total, loss):
            bar.update(task, completed=step, total=total, loss=f"loss {loss:.3f}")

        def on_stage(what):
            stages.append(what)
            bar.update(task, description=what)

        teacher, data = prepare_teacher(parsed, teacher_cache_dir(parsed), progress=on_step, on_stage=on_stage)
    how = "prepared" if "measuring" in stages else "already prepared"
    scores = ", ".join(f"{k} {teacher.metrics[f'dev_{k}']:.2f}" for k in ("accuracy", "f1")
                       if f"dev_{k}" in teacher.metrics)
    if teacher.select is not None:
        scores += f"; selection split ({len(teacher.select)} rows): " + ", ".join(
            f"{k} {teacher.metrics[k]:.2f}" for k in ("accuracy", "f1") if k in teacher.metrics)
    console.print(f"teacher {how}: {teacher.uri}", highlight=False)
    extra = f" + {teacher.augmented} augmented" if teacher.augmented else ""
    console.print(f"{data.config.eval_split} ({len(data.eval)} rows): {scores}; students' rows: "
                  f"{len(data.train)}{extra}", highlight=False)


def main():  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":
    main()
