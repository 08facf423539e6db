"""Reading a finished job back: its front, hypervolume and a Pareto plot, all from the store."""
from __future__ import annotations

from pathlib import Path

__all__ = ["objectives_of", "normalised", "front_summary", "plot_front"]


def objectives_of(job: dict) -> list[tuple[str, str]]:
    from orchestrator.spec import _objectives

    problems: list[str] = []
    objs = _objectives((job.get("spec") or {}).get("objectives"), problems)
    return [(o.name, o.mode) for o in objs]


def normalised(trial: dict, objectives, baseline: dict) -> list[float]:
    """Size and latency as fractions of the teacher's, so hypervolumes compare across jobs and machines."""
    out = []
    for name, _ in objectives:
        v = float(trial[name])
        if name in ("size_bytes", "latency_ms_b1", "latency_ms_b32", "params") and baseline.get(name):
            v /= float(baseline[name])
        out.append(v)
    return out


def reference(objectives, baseline: dict) -> list[float]:
    """The hypervolume's reference point: 10 points below the teacher's metric, the teacher's size/latency."""
    ref = []
    for name, mode in objectives:
        if name == "metric":
            ref.append(float(baseline.get("metric", 60.0)) - 10)
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
    front = [t for t in store.trials(job_id) if t["on_front"]]
    hv = 0.0
    if front and objectives and baseline:
        pts = [normalised(t, objectives, baseline) for t in front]
        hv = hypervolume(pts, [m for _, m in objectives], reference(objectives, baseline))
    return {"job": job, "front": front, "hypervolume": hv, "objectives": objectives}


def plot_front(store, job_id: str, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    job = store.get_job(job_id)
    base = job.get("baseline") or {}
    trials = [t for t in store.trials(job_id) if t.get("metric") is not None and t.get("size_bytes")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "size_bytes", "model size (MB)"), (axes[1], "latency_ms_b1",
                                                                        "latency, batch 1 (ms)")):
        scale = 1e6 if key == "size_bytes" else 1.0
        rest = [t for t in trials if not t["on_front"]]
        front = sorted((t for t in trials if t["on_front"]), key=lambda t: t[key])
        ax.scatter([t[key] / scale for t in rest], [t["metric"] for t in rest], c="0.6", s=25, label="trials")
        ax.plot([t[key] / scale for t in front], [t["metric"] for t in front], "o-", c="tab:red", label="Pareto front")
        if base.get(key) is not None and base.get("metric") is not None:
            ax.scatter([base[key] / scale], [base["metric"]], marker="*", s=200, c="tab:blue", label="teacher")
        ax.set_xlabel(label)
        ax.set_ylabel("metric")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{job_id}: {len(trials)} trials")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
