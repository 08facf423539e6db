"""bench-data: what students learn from, each part a side-by-side comparison in one run.

(d) vocabulary pruning: a 4-layer INT8 student (dynamic int8 Linears, int8 word embeddings) of the fine-tuned
    MiniLM SST-2 teacher, trained by the trial recipe (workers.trial.run) with and without ``vocab.prune``, the
    same seed and steps. Measured: artifact bytes (model.safetensors + config.json), dev accuracy of the saved
    artifact on the dev text tokenised by its own tokenizer, and the share of dev rows whose tokenisation
    changed. Target: ≥ 1.5× fewer bytes, dev accuracy within 0.5 points.

    make bench-data                        # every part this file has
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


PARTS = {"d": part_d}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=sorted(PARTS), action="append", help="run only this part (repeatable)")
    ap.add_argument("--train-size", type=int, help="SST-2 rows the students train on (default: all)")
    ap.add_argument("--eval-size", type=int, help="dev rows to score (default: all 872)")
    ap.add_argument("--steps", type=int, default=1000, help="distillation steps (batch 32) of each student")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per row for latency")
    ap.add_argument("--runs", type=int, default=10, help="timed forward passes per latency (median)")
    ap.add_argument("--quick", action="store_true", help="an end-to-end check, not a measurement: 256 train rows, "
                                                         "64 dev rows, 3 steps, 2 latency runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.train_size, args.eval_size = args.train_size or 256, args.eval_size or 64
        args.steps, args.runs = min(args.steps, 3), min(args.runs, 2)
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
        print_table(new_rows, [c for c in ("name", "steps", "accuracy", "size_bytes", "size_x", "vocab_size",
                                           "dev_rows_retokenised", "latency_ms_b1")])
        print()
        print_targets(new_targets)
    path = write(name, rows, targets, extra={"settings": settings})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
