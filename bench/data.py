"""bench-data: what students learn from, each part a side-by-side comparison in one run.

(a) length-grouped vs random batches: MiniLM fine-tuned on SST-2 for the same number of steps, each way, 3 seeds.
    Measured: optimizer steps per second, real and padded tokens per second, final dev accuracy. Target: ≥ 1.6×
    steps per second with the mean final dev accuracy within 0.5 points.
(b) the full-data teacher: MiniLM fine-tuned on every SST-2 training row (and every MRPC pair, one run per seed,
    the best on held-out training rows kept), from scratch in this run. Measured: dev metrics and the
    fine-tune's wall time. Targets: SST-2 ≥ 88.0 dev accuracy within 45 minutes; MRPC ≥ 82.0 accuracy, ≥ 87.0 F1.
(c) teacher-labelled augmentation: a 3-layer student of (b)'s teacher with and without 4 augmented copies of
    every training row, the same epochs over the original rows, SST-2 (8,000 student rows) and MRPC. Measured:
    dev metrics and wall time of both. Target: on MRPC, augmentation gains ≥ 1.5 points of accuracy.
(d) vocabulary pruning: a 4-layer INT8 student (dynamic int8 Linears, int8 word embeddings) of the fine-tuned
    MiniLM SST-2 teacher, trained by the trial recipe (workers.trial.run) with and without ``vocab.prune``, the
    same seed and steps. Measured: artifact bytes (model.safetensors + config.json), dev accuracy of the saved
    artifact on the dev text tokenised by its own tokenizer, and the share of dev rows whose tokenisation
    changed. Target: ≥ 1.5× fewer bytes, dev accuracy within 0.5 points.

    make bench-data                        # every part this file has (~1.5 h on 2 cores)
    make bench-data PART=b                 # one part
    python -m bench.data --part d --quick  # an end-to-end check on a few rows, ~1 min

Writes bench/results/data.json (data-quick.json with --quick); a part run alone replaces only its own rows and
targets there.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time

from bench.common import (CACHE, RESULTS, TEACHER_TASK, TEACHER_TRAIN, print_table, print_targets, setup_env, target,
                          write)


def _student_rows_teacher(args):
    """(the students' rows, the benchmarks' cached teacher): the teacher fine-tunes on the usual 8,000 SST-2 rows,
    the students train on ``args.train_size`` rows (default: all 67k, whose tokens make up the pruned vocabulary)."""
    from common.trial_config import TrainConfig
    from workers.data import TaskConfig, load
    from workers.teacher import prepare

    teacher_rows = load(TaskConfig(**TEACHER_TASK)).train
    data = load(TaskConfig(**{**TEACHER_TASK, "train_size": args.train_size, "eval_size": args.eval_size}))

    def show(step, total, loss):
        if step % 50 == 0 or step == total:
            print(f"  teacher fine-tuning: step {step}/{total}, loss {loss:.3f}", flush=True)

    return data, prepare("minilm", data, TrainConfig(**TEACHER_TRAIN), CACHE, teacher_rows=teacher_rows,
                         progress=show, on_stage=lambda what: print(f"  teacher: {what}", flush=True))


# (b): the full-data teachers, on every training row (no selection split: nothing is chosen on dev here);
# (c) distils from them. MRPC picks between 2 seeds (its fine-tune varies by seed;
# a third would cost ~10 more minutes on 2 cores).
FULL_TEACHERS = {
    "sst2": (dict(dataset="glue/sst2", max_length=64, seed=0, selection={"share": 0}),
             dict(lr=5e-5, epochs=2.0, batch_size=32, seeds=(0,))),
    "mrpc": (dict(dataset="glue/mrpc", max_length=128, seed=0, selection={"share": 0}),
             dict(lr=5e-5, epochs=5.0, batch_size=32, seeds=(0, 1))),
}
TEACHER_BUDGET_S = 45 * 60


def _full_teacher(task: str, args, student_rows: int | None = None, augment: dict | None = None):
    """(task data, teacher) for (b) and (c): the teacher trains on every row; the students get ``student_rows``."""
    from common.trial_config import TeacherTrainConfig
    from workers.data import TaskConfig, load
    from workers.teacher import prepare

    task_kw, train_kw = FULL_TEACHERS[task]
    if args.teacher_epochs and task == "sst2":
        train_kw = {**train_kw, "epochs": args.teacher_epochs}
    full = load(TaskConfig(**task_kw, eval_size=args.eval_size, train_size=args.train_size))
    data = load(TaskConfig(**task_kw, eval_size=args.eval_size, train_size=student_rows or args.train_size,
                           augment=augment or {}))

    def show(step, total, loss):
        if step % 20 == 0 or step == total:
            print(f"  {task} teacher fine-tuning: step {step}/{total}, loss {loss:.3f}", flush=True)

    t0 = time.perf_counter()
    t = prepare("minilm", data, TeacherTrainConfig(**train_kw), CACHE / "full-teachers", teacher_rows=full.train,
                progress=show, on_stage=lambda what: print(f"  {task} teacher: {what}", flush=True))
    return data, t, time.perf_counter() - t0


def part_a(args) -> tuple[list[dict], list[dict], dict]:
    """Length-grouped vs random batches: the same fine-tune, the same steps, 3 seeds each."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from common.trial_config import DistillConfig, TrainConfig
    from workers.batching import epoch_batches
    from workers.data import TaskConfig, encode, load
    from workers.distill import distill
    from workers.evaluate import predict_logits, task_metrics
    from workers.teacher import resolve_model

    torch.set_num_threads(2)
    path = resolve_model("minilm")
    data = load(TaskConfig(dataset="glue/sst2", max_length=64, seed=0, selection={"share": 0},
                           train_size=args.train_size, eval_size=args.eval_size))
    tok = AutoTokenizer.from_pretrained(path)
    train, dev = encode(data.train, tok, 64), encode(data.eval, tok, 64)
    steps = args.grouping_steps
    rows = []
    for seed in args.seeds:
        for grouped in (True, False):
            cfg = TrainConfig(lr=5e-5, epochs=1.0, max_steps=steps, batch_size=32, seed=seed, group_by_length=grouped)
            batches = epoch_batches(train.lengths, 32, 1, seed, 0, group_by_length=grouped)[:steps]
            real = int(sum(train.lengths[b].sum() for b in batches))
            padded = int(sum(train.lengths[b].max() * len(b) for b in batches))
            torch.manual_seed(seed)
            net = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
            print(f"(a) seed {seed}, {'grouped' if grouped else 'random'} batches ...", flush=True)
            r = distill(net, train, DistillConfig(alpha=0.0), cfg)
            acc = task_metrics(predict_logits(net, dev), dev.labels, "accuracy")["accuracy"]
            row = {"name": f"{'grouped' if grouped else 'random'} s{seed}", "batching": "grouped" if grouped
                   else "random", "seed": seed, "steps": r.steps, "seconds": r.seconds,
                   "steps_per_s": r.steps / r.seconds, "tokens_per_s": real / r.seconds,
                   "padded_tokens_per_s": padded / r.seconds, "padding_share": 1 - real / padded, "accuracy": acc}
            rows.append(row)
            print(f"  {json.dumps(row, default=float)}", flush=True)
    mean = {m: {k: float(np.mean([r[k] for r in rows if r["batching"] == m])) for k in
                ("steps_per_s", "tokens_per_s", "accuracy", "padding_share")} for m in ("grouped", "random")}
    speed = mean["grouped"]["steps_per_s"] / mean["random"]["steps_per_s"]
    gap = mean["random"]["accuracy"] - mean["grouped"]["accuracy"]
    for m in ("grouped", "random"):
        rows.append({"name": f"{m} (mean of {len(args.seeds)} seeds)", "batching": m, "steps": steps, **mean[m]})
    targets = [target("(a) length grouping: steps per second vs random batches", "≥ 1.6×", round(speed, 3),
                      speed >= 1.6),
               target("(a) length grouping: mean dev accuracy below random batches'", "≤ 0.5 points",
                      round(gap, 2), gap <= 0.5)]
    return rows, targets, {"steps": steps, "seeds": list(args.seeds), "lr": 5e-5, "batch_size": 32,
                           "train_rows": len(train), "dev_rows": len(dev), "max_length": 64, "speedup": speed}


def part_b(args) -> tuple[list[dict], list[dict], dict]:
    """The full-data teachers for SST-2 and MRPC, fine-tuned from scratch in this run."""
    import shutil as _shutil

    if not args.keep_teachers:  # the wall time is the fine-tune's own: never a cached teacher's
        _shutil.rmtree(CACHE / "full-teachers", ignore_errors=True)
    rows, targets, setting = [], [], {}
    for task in args.tasks:
        data, t, wall = _full_teacher(task, args)
        from workers.artifacts import read_meta

        meta = read_meta(t.uri)
        m = t.metrics
        row = {"name": f"{task} teacher", "task": task, "train_rows": meta["train_rows"],
               "epochs": meta["teacher_train"]["epochs"], "lr": meta["teacher_train"]["lr"],
               "seeds": meta["teacher_train"]["seeds"], "picked_seed": meta["seed"],
               "held_out_by_seed": meta.get("seed_metrics"), "accuracy": m["accuracy"], "f1": m.get("f1"),
               "fine_tune_s": meta.get("fine_tune_seconds"), "prepare_s": wall, "dev_rows": len(t.eval),
               "uri": t.uri}
        rows.append(row)
        print(f"  {json.dumps(row, default=float)}", flush=True)
        minutes = (row["fine_tune_s"] or wall) / 60
        if task == "sst2":
            targets += [target("(b) SST-2 full-data teacher: dev accuracy", "≥ 88.0", round(m["accuracy"], 2),
                               m["accuracy"] >= 88.0),
                        target("(b) SST-2 full-data teacher: fine-tune wall time (2 cores)", "≤ 45 min",
                               round(minutes, 1), minutes * 60 <= TEACHER_BUDGET_S)]
        else:
            targets += [target("(b) MRPC full-data teacher: dev accuracy", "≥ 82.0", round(m["accuracy"], 2),
                               m["accuracy"] >= 82.0),
                        target("(b) MRPC full-data teacher: dev F1", "≥ 87.0", round(m["f1"], 2), m["f1"] >= 87.0)]
        setting[task] = {"task": FULL_TEACHERS[task][0], "teacher_train": meta["teacher_train"]}
    return rows, targets, setting


def part_c(args) -> tuple[list[dict], list[dict], dict]:
    """A 3-layer student with and without 4 teacher-labelled copies of each row, the same epochs over the
    original rows; the teachers are (b)'s (cached)."""
    from common.trial_config import TrialConfig
    from workers.trial import TrialContext, run

    plan = {"sst2": dict(student_rows=args.student_rows, epochs=2.0), "mrpc": dict(student_rows=None, epochs=2.0)}
    rows, targets, setting = [], [], {}
    for task in args.tasks:
        by = {}
        for copies in (0, 4):
            augment = {"copies": copies, "seed": 0} if copies else None
            data, t, wall = _full_teacher(task, args, plan[task]["student_rows"], augment)
            cfg = TrialConfig.model_validate({
                "student": {"layers": 3}, "distill": {"temperature": 2.0, "alpha": 0.9},
                "train": {"lr": 2e-4, "epochs": plan[task]["epochs"], "batch_size": 32, "seed": 0,
                          **({"max_steps": args.steps} if args.quick else {})}})
            out = CACHE / "data-c" / f"{task}-{copies}"
            shutil.rmtree(out, ignore_errors=True)
            ctx = TrialContext(teacher_uri=t.uri, teacher_metrics=t.metrics, train=t.train, eval=t.eval,
                               teacher_logits=t.train_logits, metric=data.config.metric, out_dir=str(out),
                               seq_len=FULL_TEACHERS[task][0]["max_length"], latency_runs=args.runs)
            name = f"{task} 3L student" + (f", +{copies} augmented copies" if copies else "")
            print(f"(c) {name}: {len(t.train)} rows ({t.augmented} augmented) ...", flush=True)
            t0 = time.perf_counter()
            r = run(cfg, ctx)
            row = {"name": name, "task": task, "copies": copies, "rows": len(t.train), "augmented_rows": t.augmented,
                   "epochs": plan[task]["epochs"], "steps": r["train_steps"], "accuracy": r["accuracy"],
                   "f1": r.get("f1"), "teacher_accuracy": t.metrics["accuracy"], "teacher_f1": t.metrics.get("f1"),
                   "prepare_s": wall, "seconds": time.perf_counter() - t0, "size_bytes": r["size_bytes"]}
            rows.append(row)
            by[copies] = row
            print(f"  {json.dumps(row, default=float)}", flush=True)
        gain = by[4]["accuracy"] - by[0]["accuracy"]
        by[4]["accuracy_gain"] = gain
        if task == "mrpc":
            targets.append(target("(c) MRPC: augmentation's dev accuracy gain, 3-layer student", "≥ 1.5 points",
                                  round(gain, 2), gain >= 1.5))
        setting[task] = {**plan[task], "gain": gain}
    return rows, targets, setting


def part_d(args) -> tuple[list[dict], list[dict], dict]:
    """Vocabulary pruning of a 4-layer INT8 student with int8 embeddings, with and without it."""
    from workers import artifacts
    from common.trial_config import TrialConfig
    from workers.trial import TrialContext, run
    from workers.vocab import changed_rows, retokenise

    data, t = _student_rows_teacher(args)
    print(f"teacher {t.uri}: dev accuracy {t.metrics['accuracy']:.2f}; {len(t.train)} student rows, "
          f"{len(t.eval)} dev rows", flush=True)
    out = CACHE / "data-d"
    shutil.rmtree(out, ignore_errors=True)
    rows = []
    for prune in (False, True):
        name = "4L int8, int8 emb" + (", vocab pruned" if prune else "")
        cfg = TrialConfig.model_validate({
            "student": {"layers": 4}, "quant": {"mode": "dynamic", "embeddings": True, "embedding_bits": 8},
            "vocab": {"prune": prune}, "distill": {"temperature": 2.0, "alpha": 0.9},
            "train": {"lr": args.lr, "max_steps": args.steps, "epochs": 1000.0, "batch_size": 32, "seed": 0}})
        ctx = TrialContext(teacher_uri=t.uri, teacher_metrics=t.metrics, train=t.train, eval=t.eval,
                           teacher_logits=t.train_logits, metric="accuracy", out_dir=str(out / str(prune).lower()),
                           seq_len=args.seq_len, latency_runs=args.runs)
        print(f"{name} ...", flush=True)
        t0 = time.perf_counter()
        r = run(cfg, ctx)
        _, tok, _ = artifacts.load(r["artifact_uri"])
        row = {"part": "d", "name": name, "vocab_prune": prune, "steps": r["train_steps"], "accuracy": r["accuracy"],
               "size_bytes": r["size_bytes"], "artifact_bytes": r["artifact_bytes"], "vocab_size": len(tok),
               "latency_ms_b1": r["latency_ms_b1"], "latency_ms_b32": r["latency_ms_b32"],
               "seconds": time.perf_counter() - t0}
        if prune:
            from transformers import AutoTokenizer

            from workers.vocab import prune_vocab

            kept = prune_vocab(AutoTokenizer.from_pretrained(f"{t.uri}/tokenizer"), t.train).kept
            row["dev_rows_retokenised"] = changed_rows(t.eval, retokenise(t.eval, tok), kept)
        rows.append(row)
        print(f"  {json.dumps(row, default=float)}", flush=True)
    plain, pruned = rows
    ratio = plain["size_bytes"] / pruned["size_bytes"]
    drop = plain["accuracy"] - pruned["accuracy"]
    pruned["size_x"], pruned["accuracy_drop"] = ratio, drop
    targets = [
        target("(d) vocabulary pruning: bytes smaller", "≥ 1.5×", round(ratio, 3), ratio >= 1.5),
        target("(d) vocabulary pruning: dev accuracy drop", "≤ 0.5 points", round(drop, 2), drop <= 0.5),
    ]
    for tg in targets:
        tg["part"] = "d"
    setting = {"teacher": t.uri, "teacher_accuracy": t.metrics["accuracy"], "teacher_train_rows": TEACHER_TASK[
        "train_size"], "student_train_rows": len(t.train), "eval_rows": len(t.eval), "steps": args.steps,
        "lr": args.lr, "batch_size": 32, "max_length": TEACHER_TASK["max_length"], "seq_len_latency": args.seq_len,
        "latency_runs": args.runs, "dev_rows_retokenised": pruned["dev_rows_retokenised"]}
    return rows, targets, setting


PARTS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d}


COLUMNS = {
    "a": ("name", "steps", "steps_per_s", "tokens_per_s", "padding_share", "accuracy"),
    "b": ("name", "train_rows", "epochs", "picked_seed", "accuracy", "f1", "fine_tune_s"),
    "c": ("name", "rows", "steps", "accuracy", "f1", "teacher_accuracy", "seconds"),
    "d": ("name", "steps", "accuracy", "size_bytes", "size_x", "vocab_size", "dev_rows_retokenised", "latency_ms_b1"),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=sorted(PARTS), action="append", help="run only this part (repeatable)")
    ap.add_argument("--train-size", type=int, help="SST-2 rows the students train on (default: all)")
    ap.add_argument("--eval-size", type=int, help="dev rows to score (default: all 872)")
    ap.add_argument("--steps", type=int, default=1000, help="distillation steps (batch 32) of each student")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--tasks", nargs="+", default=["sst2", "mrpc"], choices=sorted(FULL_TEACHERS),
                    help="(b), (c): which tasks")
    ap.add_argument("--teacher-epochs", type=float, help="(b): the SST-2 teacher's epochs (default: FULL_TEACHERS)")
    ap.add_argument("--keep-teachers", action="store_true", help="(b): reuse cached full-data teachers (their "
                                                                 "recorded fine-tune time still counts)")
    ap.add_argument("--grouping-steps", type=int, default=300, help="(a): fine-tuning steps per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="(a): seeds")
    ap.add_argument("--student-rows", type=int, default=8000, help="(c): SST-2 rows the students train on")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per row for latency")
    ap.add_argument("--runs", type=int, default=10, help="timed forward passes per latency (median)")
    ap.add_argument("--quick", action="store_true", help="an end-to-end check, not a measurement: 256 train rows, "
                                                         "64 dev rows, 3 steps, 2 latency runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.train_size, args.eval_size = args.train_size or 256, args.eval_size or 64
        args.steps, args.runs = min(args.steps, 3), min(args.runs, 2)
        args.grouping_steps, args.seeds, args.student_rows = 3, [0], 128
        args.keep_teachers, args.teacher_epochs = True, 0.02
    setup_env()
    import transformers

    transformers.logging.set_verbosity_error()
    name = "data-quick" if args.quick else "data"
    previous = RESULTS / f"{name}.json"
    doc = json.loads(previous.read_text()) if previous.is_file() else {}
    rows, targets, settings = doc.get("rows", []), doc.get("targets", []), doc.get("settings", {})
    for part in args.part or sorted(PARTS):
        new_rows, new_targets, setting = PARTS[part](args)
        rows = [r for r in rows if r.get("part") != part] + new_rows
        targets = [t for t in targets if t.get("part") != part] + new_targets
        settings[part] = setting
        print()
        print_table(new_rows, [c for c in COLUMNS[part]])
        print()
        print_targets(new_targets)
    path = write(name, rows, targets, extra={"settings": settings})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
