"""The `slimray` command line: submit and follow search jobs, query the store, plot the front."""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.live import Live
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

COLUMNS = ("trial_id", "status", "metric", "metric_drop", "size_bytes", "latency_ms_b1", "latency_ms_b32",
           "params", "attempts", "on_front")


def _fail(err: BaseException) -> None:
    """One line for the user; the traceback goes to the log file."""
    from common.paths import home

    log_dir = home() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "slimray.log", "a") as fh:
        fh.write("".join(traceback.format_exception(err)))
    err_console.print(f"[red]error:[/red] {err}", highlight=False)
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
            Column("size_bytes", "size", "size", 7, True), Column("latency_ms_b1", "latency_ms_b1", "b1 ms", 7, True),
            Column("latency_ms_b32", "latency_ms_b32", "b32 ms", 2, True), Column("params", "params", "params", 1, True),
            Column("attempts", "attempts", "try", 0, True), Column("on_front", "on_front", "front", 5)]


def _trial_table(trials: list[dict], title: str, width: int | None = None):
    from orchestrator.display import fit_table

    return fit_table(title, _trial_columns(), [{c: _fmt(t.get(c), c) for c in COLUMNS} for t in trials],
                     width=width or console.width)


def _stage_line(job: dict) -> str:
    """``stage: teacher (120/500 steps)``; empty before the driver has said anything."""
    stage, progress = job.get("stage"), dict(job.get("progress") or {})
    if not stage:
        return ""
    if stage == "search" and progress.get("unit") == "trials":  # the recorder's rows are the live count
        counts = job.get("trial_counts", {})
        progress["done"] = sum(counts.get(k, 0) for k in ("terminated", "stopped_early", "error"))
    done, total, unit = progress.get("done"), progress.get("total"), progress.get("unit", "")
    if done is not None and total:
        return f"stage: {stage} ({done}/{total} {unit}, {100 * done / total:.0f}%)".replace(" ,", ",")
    if done is not None:
        return f"stage: {stage} ({done} {unit})".rstrip()
    return f"stage: {stage}"


def _progress_table(store, job_id: str):
    from orchestrator.display import Column, fit_table

    job = store.get_job(job_id)
    trials = store.trials(job_id)
    counts = job.get("trial_counts", {})
    best = [t for t in trials if t.get("metric") is not None and t["status"] == "terminated"]
    best.sort(key=lambda t: (-(t["metric"] or 0), t.get("size_bytes") or 0))
    stage = _stage_line(job)
    title = (f"{job_id}: {job['status']}" + (f" · {stage}" if stage else "") +
             f"\ntrials: done {counts.get('terminated', 0)} · running {counts.get('running', 0)} · "
             f"stopped early {counts.get('stopped_early', 0)} · failed {counts.get('error', 0)}")
    columns = [Column("trial_id", "trial_id", "trial", 9), Column("metric", "metric", "metric", 8, True),
               Column("metric_drop", "metric_drop", "drop", 7, True), Column("size_bytes", "size", "size", 6, True),
               Column("latency_ms_b1", "latency_ms_b1", "b1 ms", 5, True)]
    rows = [{c.key: _fmt(t.get(c.key), c.key) for c in columns} for t in best[:5]]
    return fit_table(title, columns, rows, width=console.width)


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
        do_submit(spec, address=address, job_id=jid, store=store)
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

        jid = do_submit(spec, address=address, job_id=job_id, detach=True)
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
    trials = [t for t in store.trials(job) if t["on_front"] or not pareto]
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
                                           f"{_fmt(base.get('metric'))}, size {_fmt(base.get('size_bytes'), 'size_bytes')}"))


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


@app.command()
@_guard
def demo(spec: Path = typer.Option(Path("examples/demo-sst2.yaml"), help="the demo job spec"),
         max_drop: Optional[float] = typer.Option(None, help="promotion's metric-drop cap (default: the spec's)")):
    """The whole loop on the embedded defaults: teacher → search → store → promote → a real request."""
    import urllib.request

    from common.paths import home, open_store
    from orchestrator.promote import PromoteConstraints, promote as do_promote
    from orchestrator.report import describe_config, markdown, plot_front

    logging.getLogger("ray").setLevel(logging.WARNING)
    jid = _submit_and_follow(spec, None, None, False)
    store = open_store()
    plot = plot_front(store, jid, home() / "reports" / f"{jid}-pareto.png")
    job = store.get_job(jid)
    constraints = PromoteConstraints.from_spec(job["spec"], **({"max_metric_drop": max_drop} if max_drop else {}))
    try:
        done = do_promote(jid, constraints, store=store)
    except SlimrayError as err:  # nothing met the bar: serve the front's most accurate model, and say so
        console.print(f"[yellow]{err}[/yellow]")
        best = max((t for t in store.trials(jid) if t["on_front"]), key=lambda t: t["metric"] or 0)
        done = do_promote(jid, trial=best["trial_id"], store=store)
    promoted_cfg = next(t["config"] for t in store.trials(jid) if t["trial_id"] == done["trial_id"])
    console.print(f"promoted trial {done['trial_id']} (metric {done['metric']:.2f}, drop {done['metric_drop']:.2f}, "
                  f"{done['size_bytes'] / 1e6:.2f} MB, {done['latency_ms_b1']:.2f} ms) at {done['endpoint']}")
    texts = ["a gorgeous, witty, seductive movie.", "the plot is a dull, lifeless mess."]
    req = urllib.request.Request(done["endpoint"].rstrip("/") + "/v1/predict",
                                 data=json.dumps({"inputs": texts}).encode(),
                                 headers={"Content-Type": "application/json", **(
                                     {"Authorization": f"Bearer {os.environ['SLIMRAY_API_TOKEN']}"}
                                     if os.environ.get("SLIMRAY_API_TOKEN") else {})})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=60) as resp:
        answer = json.loads(resp.read())
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
                  f"store: {store.url_for_display}")


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
                                                             "local Ray head that outlives this command)")):
    """Serve the Pareto-best model of JOB under the constraints (front latencies re-measured first).

    Without --address/RAY_ADDRESS the endpoint runs on a local Ray head started for slimray (kept running after
    this command; `slimray serve stop` removes the app)."""
    from common.paths import open_store
    from orchestrator.promote import PromoteConstraints, promote as do_promote

    store = open_store()
    constraints = None
    if trial is None:
        constraints = PromoteConstraints.from_spec(store.get_job(job).get("spec"), max_metric_drop=max_drop,
                                                   max_size_mb=max_size_mb, max_latency_ms=max_latency_ms)
    done = do_promote(job, constraints, trial=trial, store=store, port=port, route_prefix=route_prefix, name=name,
                      address=address, detached=True)
    table = Table(title=f"{job}: Pareto front, batch-1 latency re-measured")
    for c in ("trial_id", "metric", "metric_drop", "size", "latency_ms_b1", "reported_latency_ms_b1"):
        table.add_column(c)
    for r in done["front"]:
        table.add_row(("* " if r["trial_id"] == done["trial_id"] else "") + r["trial_id"], _fmt(r["metric"]),
                      _fmt(r["metric_drop"]), _fmt(r["size_bytes"], "size_bytes"), _fmt(r["latency_ms_b1"]),
                      _fmt(r["reported_latency_ms_b1"]))
    console.print(table)
    console.print(f"serving trial {done['trial_id']} of {job} at {done['endpoint']} "
                  f"(deployment {done['deployment_id']}); try `slimray predict \"some text\"`")


serve_app = typer.Typer(help="the Ray Serve endpoint", no_args_is_help=True)
app.add_typer(serve_app, name="serve")


def _join_serving_ray(address: Optional[str]) -> bool:
    """Join the Ray that serves (given, RAY_ADDRESS, or slimray's local head); False when there is none."""
    import ray

    from orchestrator.promote import local_head_address, loopback_env

    if ray.is_initialized():
        return True
    target = address or os.environ.get("RAY_ADDRESS") or local_head_address()
    if not target:
        return False
    loopback_env(local_head=not (address or os.environ.get("RAY_ADDRESS")))
    ray.init(address=target, log_to_driver=False, logging_level=logging.WARNING)
    return True


@serve_app.command("status")
@_guard
def serve_status(as_json: bool = typer.Option(False, "--json"), address: Optional[str] = typer.Option(None)):
    """The Serve applications and the live deployment recorded in the store."""
    from deploy import serve as serving
    from common.paths import open_store

    state = serving.status() if _join_serving_ray(address) else {"port": None, "applications": {}}
    live = open_store().live_deployment()
    if as_json:
        typer.echo(json.dumps({"serve": state, "live_deployment": live}, indent=2, default=str))
        return
    if not state["applications"]:
        console.print("no Serve application is running")
    for app_name, a in state["applications"].items():
        console.print(f"{app_name}: {a.get('status')} at route {a.get('route_prefix')} {a.get('message') or ''}")
    if live:
        console.print(f"live: job {live['job_id']}, trial {live['trial_id']} at {live['endpoint']} "
                      f"(since {live['created_at']}, by {live['who']})")


@serve_app.command("stop")
@_guard
def serve_stop(name: str = typer.Option("slimray", help="the application to remove"),
               all_apps: bool = typer.Option(False, "--all", help="shut Serve down altogether"),
               address: Optional[str] = typer.Option(None)):
    """Remove the endpoint (the local Ray head keeps running)."""
    from deploy import serve as serving
    from common.paths import open_store

    if _join_serving_ray(address):
        serving.stop(None if all_apps else name)
    store = open_store()
    live = store.live_deployment()
    if live:
        store.set_deployment_status(live["id"], "stopped")
    console.print("stopped" + (f" ({live['job_id']} / {live['trial_id']})" if live else ""))


def _predict_url(url: Optional[str]) -> str:
    if url is None:
        from common.paths import open_store

        live = open_store().live_deployment()
        url = live["endpoint"] if live else "http://127.0.0.1:8000"
    return url.rstrip("/") + "/v1/predict"


@app.command()
@_guard
def predict(text: str = typer.Argument(..., help="the text to classify"),
            pair: Optional[str] = typer.Option(None, "--pair", help="second sentence, for sentence-pair tasks"),
            url: Optional[str] = typer.Option(None, help="endpoint (default: the live deployment's, else "
                                                         "http://127.0.0.1:8000)"),
            timeout: float = typer.Option(30.0, help="seconds"),
            as_json: bool = typer.Option(False, "--json", help="print the JSON answer")):
    """Send one text (or pair) to the endpoint; honours SLIMRAY_API_TOKEN."""
    import urllib.error
    import urllib.parse
    import urllib.request

    target = _predict_url(url)
    body = json.dumps({"inputs": [[text, pair] if pair is not None else text]}).encode()
    headers = {"Content-Type": "application/json"}
    if os.environ.get("SLIMRAY_API_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['SLIMRAY_API_TOKEN']}"
    request = urllib.request.Request(target, data=body, headers=headers, method="POST")
    # a local endpoint is reached directly, whatever proxy the environment names for the outside world
    loopback = urllib.parse.urlsplit(target).hostname in ("127.0.0.1", "localhost", "::1")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if loopback else \
        urllib.request.build_opener()
    try:
        with opener.open(request, timeout=timeout) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        try:
            reason = json.loads(err.read()).get("error") or err.reason
        except (ValueError, AttributeError):
            reason = err.reason
        raise SlimrayError(f"{target} answered {err.code}: {reason}") from None
    except (urllib.error.URLError, OSError) as err:
        raise SlimrayError(f"cannot reach {target} ({getattr(err, 'reason', err)}); is it up? "
                           f"see `slimray serve status`") from None
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
        return
    p, model = answer["predictions"][0], answer.get("model", {})
    typer.echo(f"label {p['label']} (score {p['score']:.3f})  (job {model.get('job')}, trial {model.get('trial')})")


def main():  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":
    main()
