"""bench-distill: the real MiniLM teacher fine-tuned on SST-2, then 6/4/3/2-layer students distilled with
logits KD on the DeepSpeed engine; accuracy on the full dev set, artifact bytes, latency b1/b32; and the time a
trial takes with cached teacher logits vs running the teacher every step (target: cached ≤ 0.6×).

    make bench-distill            # ~25 min on 2 cores
    python -m bench.distill --steps 20 --timing-steps 5   # a quick check
"""
from __future__ import annotations

import argparse
import tempfile
import time

from bench.common import print_table, print_targets, setup_env, target, teacher, write


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=250, help="distillation steps per student (batch 32)")
    ap.add_argument("--timing-steps", type=int, default=30, help="steps for the cached-vs-live teacher timing")
    ap.add_argument("--layers", default="6,4,3,2")
    args = ap.parse_args(argv)
    setup_env()

    from workers import artifacts
    from common.trial_config import DistillConfig, StudentConfig, TrainConfig
    from workers.distill import distill
    from workers.evaluate import measure
    from workers.student import build

    t0 = time.perf_counter()
    data, t = teacher()
    print(f"teacher ready in {time.perf_counter() - t0:.0f} s: {t.uri}")
    seq = data.config.max_length
    model, tok, _ = artifacts.load(t.uri)
    tm = measure(model, t.eval, "accuracy", seq_len=seq)  # re-measured here, side by side with the students
    rows = [{"model": "teacher (MiniLM-L6, fp32)", "layers": 6, "accuracy": tm["accuracy"],
             "size_bytes": t.metrics["size_bytes"], "latency_ms_b1": tm["latency_ms_b1"],
             "latency_ms_b32": tm["latency_ms_b32"], "train_s": None}]
    train = TrainConfig(lr=1e-4, epochs=100, max_steps=args.steps, batch_size=32)
    kd = DistillConfig(temperature=2.0, alpha=0.9)
    for k in (int(x) for x in args.layers.split(",")):
        student = build(model, StudentConfig(layers=k))
        res = distill(student, t.train, kd, train, teacher_logits=t.train_logits)
        with tempfile.TemporaryDirectory() as d:
            info = artifacts.save(student, tok, d, meta={"bench": "distill", "layers": k})
            loaded, _, _ = artifacts.load(info.uri)
            m = measure(loaded, t.eval, "accuracy", seq_len=seq)
        rows.append({"model": f"student {k}L (logits KD)", "layers": k, "accuracy": m["accuracy"],
                     "size_bytes": info.size_bytes, "latency_ms_b1": m["latency_ms_b1"],
                     "latency_ms_b32": m["latency_ms_b32"], "train_s": res.seconds})
        print(f"  {k} layers: acc {m['accuracy']:.2f}, {res.steps} steps in {res.seconds:.0f} s", flush=True)
    base = rows[0]
    for r in rows:
        r["size_x"] = base["size_bytes"] / r["size_bytes"]
        r["speed_b1_x"] = base["latency_ms_b1"] / r["latency_ms_b1"]

    # A trial's training with cached logits vs the teacher run on every batch, same student and steps.
    timing = TrainConfig(lr=1e-4, epochs=100, max_steps=args.timing_steps, batch_size=32)
    cached = distill(build(model, StudentConfig(layers=3)), t.train, kd, timing, teacher_logits=t.train_logits)
    live = distill(build(model, StudentConfig(layers=3)), t.train, kd, timing, teacher=model)
    ratio = cached.seconds / live.seconds
    timing_rows = [{"mode": "cached teacher logits", "steps": cached.steps, "seconds": cached.seconds},
                   {"mode": "teacher every step", "steps": live.steps, "seconds": live.seconds}]

    cols = ["model", "accuracy", "size_bytes", "size_x", "latency_ms_b1", "speed_b1_x", "latency_ms_b32", "train_s"]
    print()
    print_table(rows, cols)
    print()
    print_table(timing_rows, ["mode", "steps", "seconds"])
    targets = [target("cached-logits trial time vs teacher every step", "≤ 0.6×", round(ratio, 3), ratio <= 0.6)]
    print_targets(targets)
    path = write("distill", rows, targets, extra={
        "timing": timing_rows,
        "setting": {"teacher_train_rows": len(data.train), "eval_rows": len(data.eval), "steps": args.steps,
                    "batch_size": 32, "seq_len_latency": seq, "threads": 1}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
