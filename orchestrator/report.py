"""Reading a finished job back: its front, hypervolume and a Pareto plot, all from the store.

A job whose search chose on a selection split (``task.selection``) is reported on the dev split, which the
search never saw: every task number here is a trial's (and the teacher's) ``dev_*`` value; the selection
split's is shown beside it."""
from __future__ import annotations

from pathlib import Path

__all__ = ["objectives_of", "chose_on_selection", "on_dev", "normalised", "front_summary", "plot_front",
           "search_stats", "describe_config", "markdown"]

_TASK_NUMBERS = ("metric", "metric_drop", "accuracy", "f1")


def objectives_of(job: dict) -> list[tuple[str, str]]:
    from orchestrator.spec import from_stored

    return [(o.name, o.mode) for o in from_stored(job["spec"]).objectives]


def chose_on_selection(job: dict) -> bool:
    """Whether the job's search scored its trials on a selection split (then their ``metric`` is not dev's)."""
    from orchestrator.spec import from_stored

    return from_stored(job["spec"]).task.selection.share > 0


def on_dev(row: dict, name: str, selection: bool):
    """``name`` (metric, metric_drop, accuracy or f1) of a trial row from the store or of the teacher's baseline,
    on the dev split: its ``dev_<name>`` (a trial keeps it in its result) when the search chose on a selection
    split, None if it was never measured there; else ``name`` itself, which was measured on dev."""
    if not selection or name not in _TASK_NUMBERS:
        return row.get(name)
    for source in (row, row.get("result") or {}):
        if source.get(f"dev_{name}") is not None:
            return source[f"dev_{name}"]
    return None


def normalised(trial: dict, objectives, baseline: dict, selection: bool = False) -> list[float]:
    """Size and latency as fractions of the teacher's, so hypervolumes compare across jobs and machines; the
    task metric on the dev split."""
    out = []
    for name, _ in objectives:
        v = float(on_dev(trial, name, selection))
        if name in ("size_bytes", "latency_ms_b1", "latency_ms_b32", "params") and baseline.get(name):
            v /= float(baseline[name])
        out.append(v)
    return out


def reference(objectives, baseline: dict, selection: bool = False) -> list[float]:
    """The hypervolume's reference point: 10 points below the teacher's (dev) metric, the teacher's size and
    latency."""
    ref = []
    for name, mode in objectives:
        if name == "metric":
            bar = on_dev(baseline, "metric", selection)
            ref.append(float(60.0 if bar is None else bar) - 10)
        elif name == "metric_drop":
            ref.append(10.0)
        elif name in ("size_bytes", "latency_ms_b1", "latency_ms_b32", "params") and baseline.get(name):
            ref.append(1.0)
        else:
            ref.append(float("inf") if mode == "min" else float("-inf"))
    return ref


def front_summary(store, job_id: str) -> dict:
    from search.pareto import hypervolume

    job = store.get_job(job_id)
    objectives = objectives_of(job)
    baseline = job.get("baseline") or {}
    selection = chose_on_selection(job)
    front = [t for t in store.trials(job_id) if t["on_front"]]
    hv = 0.0
    # on the dev split: a front member never measured there (no dev_metric) has no point to add
    scored = [t for t in front if all(on_dev(t, n, selection) is not None for n, _ in objectives)]
    if scored and objectives and baseline:
        pts = [normalised(t, objectives, baseline, selection) for t in scored]
        hv = hypervolume(pts, [m for _, m in objectives], reference(objectives, baseline, selection))
    return {"job": job, "front": front, "hypervolume": hv, "objectives": objectives}


def plot_front(store, job_id: str, out: str | Path, marks: list[dict] | None = None) -> Path:
    """Metric against size and against batch-1 latency: every trial, the front and the teacher; ``marks`` adds
    labelled points ``{"label", "metric", "size_bytes", "latency_ms_b1"}`` (baselines, the promoted model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    job = store.get_job(job_id)
    selection = chose_on_selection(job)
    base = job.get("baseline") or {}
    base = {**base, "metric": on_dev(base, "metric", selection)}
    trials = [{**t, "metric": on_dev(t, "metric", selection)} for t in store.trials(job_id)]
    trials = [t for t in trials if t["metric"] is not None and t.get("size_bytes")]
    for t in trials:  # promotion's serial re-measurement, where there is one, over the one taken beside training
        t["latency_ms_b1"] = t.get("remeasured_latency_ms_b1") or t.get("latency_ms_b1")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, key, label in ((axes[0], "size_bytes", "model size (MB)"), (axes[1], "latency_ms_b1",
                                                                        "latency, batch 1 (ms)")):
        scale = 1e6 if key == "size_bytes" else 1.0
        rest = [t for t in trials if not t["on_front"] and t.get(key) is not None]
        # points, not a line: a front in three objectives is not a curve in any two of them
        front = [t for t in trials if t["on_front"] and t.get(key) is not None]
        ax.scatter([t[key] / scale for t in rest], [t["metric"] for t in rest], c="0.6", s=25, label="trials")
        ax.scatter([t[key] / scale for t in front], [t["metric"] for t in front], c="tab:red", s=40,
                   label="Pareto front")
        if base.get(key) is not None and base.get("metric") is not None:
            ax.scatter([base[key] / scale], [base["metric"]], marker="*", s=200, c="tab:blue", label="teacher")
        for i, m in enumerate(marks or []):
            if m.get(key) is not None and m.get("metric") is not None:
                ax.scatter([m[key] / scale], [m["metric"]], marker="DsP^v"[i % 5], s=70, edgecolors="k",
                           label=m["label"], zorder=3)
        ax.set_xlabel(label)
        ax.set_ylabel("metric (dev)" if selection else "metric")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))  # 20, not 2×10¹
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(f"{job_id}: {len(trials)} trials with a model")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _seconds(start: str | None, end: str | None) -> float | None:
    from datetime import datetime

    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def search_stats(store, job_id: str) -> dict:
    """What the search cost: wall time, trials by outcome and the training steps they ran (from the store)."""
    job = store.get_job(job_id)
    trials = store.trials(job_id)
    counts = {s: sum(t["status"] == s for t in trials) for s in ("terminated", "stopped_early", "error")}
    steps = 0
    for t in trials:
        history = store.metric_history(job_id, t["trial_id"])
        steps += max((int(h.get("step") or 0) for h in history), default=0)
    return {"job_id": job_id, "status": job["status"], "wall_s": _seconds(job["started_at"], job["finished_at"]),
            "trials": len(trials), "completed": counts["terminated"], "stopped_early": counts["stopped_early"],
            "failed": counts["error"], "training_steps": steps, "retried": sum((t["attempts"] or 1) > 1 for t in trials)}


def describe_config(config: dict | None) -> str:
    """A trial config in one short line: ``3L top · heads+FFN 45% · int8 dyn, emb 4-bit · T 2.1 · lr 1.2e-04``
    (an elastic sub-model: ``2L uniform 4h FFN 512 · int8 dyn``)."""
    c = config or {}
    parts = []
    st = c.get("student") or {}
    if st:
        parts.append(" ".join(str(x) for x in (f"{st['layers']}L" if "layers" in st else None,
                                               st.get("layer_choice"), f"{st['heads']}h" if st.get("heads") else None,
                                               f"FFN {st['ffn']}" if st.get("ffn") else None) if x))
    pr = c.get("prune") or {}
    if pr.get("kind") not in (None, "none"):
        kind = {"structured": "heads+FFN", "heads": "heads", "ffn": "FFN"}.get(pr["kind"], pr["kind"])
        parts.append(f"{kind} {100 * float(pr.get('sparsity', 0)):.0f}%")
    lr = c.get("lowrank") or {}
    if lr.get("ratio"):
        parts.append(f"low-rank {lr['ratio']:g}")
    q = c.get("quant") or {}
    if q.get("mode") not in (None, "none"):
        mode = {"dynamic": "int8 dyn", "static": "int8 static", "qat": "int8 QAT", "int4": "int4",
                "mixed": "mixed 4/8"}.get(q["mode"], q["mode"])
        parts.append(mode + (f", emb {q['embedding_bits']}-bit" if q.get("embedding_bits") else ""))
    d = c.get("distill") or {}
    if d.get("temperature") is not None:
        parts.append(f"T {float(d['temperature']):.1f}")
    if d.get("hidden_weight"):
        parts.append(f"hidden {float(d['hidden_weight']):g}")
    tr = c.get("train") or {}
    if tr.get("lr") is not None:
        parts.append(f"lr {float(tr['lr']):.1e}")
    return " · ".join(p for p in parts if p) or "teacher copy"


def markdown(store, job_id: str, *, promoted: str | None = None) -> str:
    """The search section of a report: what ran, the Pareto front (re-measured latency where promotion timed
    it) and its hypervolume. Every number comes from the store."""
    summary = front_summary(store, job_id)
    stats = search_stats(store, job_id)
    base = summary["job"].get("baseline") or {}
    selection = chose_on_selection(summary["job"])
    wall = f"{stats['wall_s'] / 60:.1f} min" if stats["wall_s"] is not None else "?"
    lines = [f"### Search: job `{job_id}` ({stats['status']})", "",
             f"- wall time {wall}; {stats['trials']} trials: {stats['completed']} ran to the end, "
             f"{stats['stopped_early']} stopped early by ASHA, {stats['failed']} failed, {stats['retried']} retried; "
             f"{stats['training_steps']:,} training steps in all",
             f"- objectives: {', '.join(f'{n} {m}' for n, m in summary['objectives'])}; hypervolume of the front "
             f"(size and latency as fractions of the teacher's, reference: teacher − 10 points, 1.0, 1.0): "
             f"**{summary['hypervolume']:.4f}**", "",
             "| trial | config | metric | drop | selection metric | MB | size × | b1 ms | speed × | promoted |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base_metric = on_dev(base, "metric", selection)

    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    for t in sorted(summary["front"], key=lambda t: t["size_bytes"] or 0):
        ms = t.get("remeasured_latency_ms_b1") or t.get("latency_ms_b1")
        metric = on_dev(t, "metric", selection)
        drop = None if metric is None or base_metric is None else base_metric - metric
        size_x = base["size_bytes"] / t["size_bytes"] if base.get("size_bytes") and t.get("size_bytes") else None
        speed_x = base["latency_ms_b1"] / ms if base.get("latency_ms_b1") and ms else None
        lines.append(f"| {t['trial_id']} | {describe_config(t['config'])} | {f(metric, '.2f')} | "
                     f"{f(drop, '.2f')} | {f(t.get('metric') if selection else None, '.2f')} | "
                     f"{f((t.get('size_bytes') or 0) / 1e6, '.2f')} | {f(size_x, '.2f')} | "
                     f"{f(ms, '.2f')} | {f(speed_x, '.2f')} | {'**yes**' if t['trial_id'] == promoted else ''} |")
    lines += ["", "Size and speed ratios here are against the teacher as measured when the job started; "
              "latency is the one promotion re-measured serially where it did (the trials' own ran beside training)."]
    if selection:
        lines.append(f"Metric and drop are on the dev split, which the search never saw (teacher "
                     f"{f(base_metric, '.2f')}); the search chose on the selection split (teacher "
                     f"{f(base.get('metric'), '.2f')}), carved from the training data.")
    return "\n".join(lines) + "\n"
