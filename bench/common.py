"""What every benchmark shares: the SST-2 teacher setting, machine facts, the results file format."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(os.environ.get("SLIMRAY_BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))

# One fine-tuned teacher for all benchmarks (prepared once, cached by fingerprint under bench/.cache):
# 8,000 SST-2 training rows fit the 30-minute budget of bench-distill on 2 cores.
# No selection split: these benchmarks measure on dev, with nothing chosen on it (task.selection is the search's).
TEACHER_TASK = dict(dataset="glue/sst2", train_size=8000, max_length=64, seed=0, selection={"share": 0})
TEACHER_TRAIN = dict(lr=5e-5, epochs=1.0, batch_size=32, seed=0)


def machine() -> dict:
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    for mod in ("ray", "transformers", "deepspeed"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # a benchmark must still write its results without one of them
            info[mod] = None
    return info


def target(name: str, goal: str, value, met: bool) -> dict:
    return {"name": name, "target": goal, "value": value, "met": bool(met)}


def write(name: str, rows: list[dict], targets: list[dict], extra: dict | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    doc = {"name": name, "machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows,
           "targets": targets, **(extra or {})}
    out.write_text(json.dumps(doc, indent=2, default=float))
    return out


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.2f}"
        return str(v)

    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-|-".join("-" * widths[c] for c in columns))
    for r in rows:
        print(" | ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in columns))


def print_targets(targets: list[dict]) -> None:
    for t in targets:
        print(f"[{'met' if t['met'] else 'MISSED'}] {t['name']}: target {t['target']}, got {t['value']}")


def setup_env() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not os.environ.get("SLIMRAY_DATA_DIR"):
        shared = Path(__file__).resolve().parents[2] / "shared" / "assets"
        if shared.is_dir():
            os.environ["SLIMRAY_DATA_DIR"] = str(shared)


def teacher(progress: bool = True):
    """The benchmarks' fine-tuned MiniLM teacher and the full SST-2 dev set (prepared once, then cached)."""
    from common.trial_config import TrainConfig
    from workers.data import TaskConfig, load
    from workers.teacher import prepare

    setup_env()
    data = load(TaskConfig(**TEACHER_TASK))

    def show(step, total, loss):
        if progress and (step % 25 == 0 or step == total):
            print(f"  teacher fine-tuning: step {step}/{total}, loss {loss:.3f}", flush=True)

    return data, prepare("minilm", data, TrainConfig(**TEACHER_TRAIN), CACHE, progress=show)


def write_part(name: str, part: str, rows: list[dict], targets: list[dict], extra: dict | None = None) -> Path:
    """Write one part of a benchmark into results/<name>.json and keep the file's other parts: every row and
    target carries its ``part``, and ``extra`` is stored under the part's name. What a file holds without a part
    (written before parts were tagged) is dropped."""
    try:
        old = json.loads((RESULTS / f"{name}.json").read_text())
    except (OSError, ValueError):
        old = {}
    rows_ = [r for r in old.get("rows", []) if r.get("part") not in (None, part)]
    targets_ = [t for t in old.get("targets", []) if t.get("part") not in (None, part)]
    parts = {r["part"] for r in rows_ + targets_}
    kept = {k: v for k, v in old.items() if k in parts}
    return write(name, rows_ + [{"part": part, **r} for r in rows], targets_ + [{**t, "part": part} for t in targets],
                 {**kept, **({part: extra} if extra else {})})
