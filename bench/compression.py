"""bench-compression: every slimray compression technique on the fine-tuned MiniLM SST-2 teacher, measured as
it is saved and served: accuracy on the SST-2 dev set, artifact bytes (model.safetensors + config.json),
latency at batch 1 and 32 (one thread, random tokens of --seq-len), and ratios against the fp32 teacher. Also
PyTorch's own ``torch.ao.quantization.quantize_dynamic`` INT8 of the teacher, which is what INC/Optimum users
get (Linears only, embeddings fp32; its size is its state_dict as torch.save writes it).

Rows: each technique alone (structural ones and QAT get --steps of logits distillation from cached teacher
logits to recover; post-training quantization gets none), then combinations distilled for --combo-steps.

    make bench-compression                       # full run: ~1 h on 2 cores (teacher shared with bench-distill)
    python -m bench.compression --quick          # end-to-end check on a few rows of data, ~3 min
    python -m bench.compression --teacher DIR --only "int8 dynamic,int4"

Writes bench/results/compression.json (compression-quick.json with --quick).
"""
from __future__ import annotations

import argparse
import io
import shutil
import time
import traceback
import warnings
from dataclasses import dataclass

from bench.common import (CACHE, TEACHER_TASK, TEACHER_TRAIN, print_table, print_targets, setup_env, target,
                          write)


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "alone" | "combination"
    student: object = None  # StudentConfig
    prune: object = None
    lowrank: object = None
    quant: object = None
    distill: bool = False  # brief logits distillation (structural changes and QAT need it to recover)


def variants(samples: int, calibration: int) -> list[Variant]:
    from common.trial_config import (DynamicInt8, FfnPrune, HeadPrune, Int4WeightOnly, LowRankConfig, MixedPrecision,
                                 QatInt8, StaticInt8, StructuredPrune, StudentConfig, UnstructuredPrune)

    s3 = StudentConfig(layers=3)
    s4 = StudentConfig(layers=4)
    structured = StructuredPrune(sparsity=0.5, samples=samples)
    return [
        Variant("unstructured 50%", "alone", prune=UnstructuredPrune(sparsity=0.5), distill=True),
        Variant("unstructured 80%", "alone", prune=UnstructuredPrune(sparsity=0.8), distill=True),
        Variant("heads 50%", "alone", prune=HeadPrune(sparsity=0.5, samples=samples), distill=True),
        Variant("FFN 50%", "alone", prune=FfnPrune(sparsity=0.5, samples=samples), distill=True),
        Variant("heads+FFN 50%", "alone", prune=structured, distill=True),
        Variant("low-rank 0.5", "alone", lowrank=LowRankConfig(ratio=0.5), distill=True),
        Variant("int8 dynamic", "alone", quant=DynamicInt8()),
        Variant("int8 static", "alone", quant=StaticInt8(calibration_samples=calibration)),
        Variant("int8 QAT", "alone", quant=QatInt8(), distill=True),
        Variant("int4 weight-only", "alone", quant=Int4WeightOnly()),
        Variant("mixed 4/8 bits (6 avg)", "alone", quant=MixedPrecision(calibration_samples=min(64, calibration))),
        Variant("3L + heads/FFN 50% + int8, int4 emb", "combination", student=s3, prune=structured,
                quant=DynamicInt8(embedding_bits=4), distill=True),
        Variant("3L + heads/FFN 50% + int4 (int8 GEMM)", "combination", student=s3, prune=structured,
                quant=Int4WeightOnly(activations="int8"), distill=True),
        Variant("3L + heads/FFN 50% + QAT, int4 emb", "combination", student=s3, prune=structured,
                quant=QatInt8(embedding_bits=4), distill=True),
        Variant("4L + heads/FFN 50% + int8, int4 emb", "combination", student=s4, prune=structured,
                quant=DynamicInt8(embedding_bits=4), distill=True),
    ]


def _latency(model, args) -> dict:
    from workers.evaluate import latency_ms

    return {f"latency_ms_b{b}": latency_ms(model, batch=b, seq_len=args.seq_len, runs=args.runs, warmup=args.warmup,
                                           threads=args.threads) for b in (1, 32)}


def _accuracy(model, data) -> float:
    from workers.evaluate import predict_logits, task_metrics

    return task_metrics(predict_logits(model, data), data.labels, "accuracy")["accuracy"]


def _avg_bits(model) -> float | None:
    from workers.modules import QLinear

    q = [m for m in model.modules() if isinstance(m, QLinear)]
    n = sum(m.in_features * m.out_features for m in q)
    return sum(m.bits * m.in_features * m.out_features for m in q) / n if n else None


def run_variant(v: Variant, teacher_model, tok, t, args) -> dict:
    """The trial recipe (workers.trial.run) without the DB: build → prune → low rank → QAT → distill →
    quantize → save → load → measure the loaded artifact."""
    from workers import artifacts
    from common.trial_config import DistillConfig, StudentConfig, TrainConfig
    from workers.distill import distill
    from workers.evaluate import nonzero_params
    from workers.lowrank import factorize
    from workers.prune import prune, schedule, sparsity_of
    from workers.quantize import prepare_qat, quantize
    from workers.student import build

    t0 = time.perf_counter()
    student = build(teacher_model, v.student or StudentConfig())
    if v.prune is not None:
        student = prune(student, v.prune, data=t.train, teacher_logits=t.train_logits)
    if v.lowrank is not None:
        student = factorize(student, v.lowrank)
    if v.quant is not None:
        student = prepare_qat(student, v.quant)
    steps = (args.combo_steps if v.kind == "combination" else args.steps) if v.distill else 0
    sparsity = None
    if steps:
        cb = schedule(student, v.prune)
        distill(student, t.train, DistillConfig(temperature=2.0, alpha=0.9),
                TrainConfig(lr=args.lr, epochs=1000, max_steps=steps, batch_size=32, seed=0),
                teacher_logits=t.train_logits, callbacks=[cb] if cb else [])
    elif v.prune is not None and type(v.prune).__name__ == "UnstructuredPrune":
        schedule(student, v.prune)(1, 1, student)  # no training: the final sparsity at once
    if v.prune is not None and type(v.prune).__name__ == "UnstructuredPrune":
        sparsity = sparsity_of(student)
    student.eval()
    if v.quant is not None:
        student = quantize(student, v.quant, calibration=t.train)
    out = CACHE / "compression-artifacts" / v.name.replace(" ", "_").replace("/", "-")
    if out.exists():
        shutil.rmtree(out)
    info = artifacts.save(student, tok, out, meta={"bench": "compression", "variant": v.name})
    build_s = time.perf_counter() - t0
    loaded, _, _ = artifacts.load(info.uri)
    row = {"name": v.name, "kind": v.kind, "kd_steps": steps, "accuracy": _accuracy(loaded, t.eval),
           "size_bytes": info.size_bytes, **_latency(loaded, args), "params": nonzero_params(loaded),
           "avg_bits": _avg_bits(loaded), "sparsity": sparsity, "build_s": build_s}
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def torch_ao_row(teacher_model, t, args) -> dict:
    import torch

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        import copy

        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(teacher_model), {torch.nn.Linear},
                                                   dtype=torch.qint8)
        buf = io.BytesIO()
        torch.save(q.state_dict(), buf)
    return {"name": "torch.ao quantize_dynamic int8", "kind": "baseline", "kd_steps": 0,
            "accuracy": _accuracy(q, t.eval), "size_bytes": buf.tell(), **_latency(q, args),
            "build_s": time.perf_counter() - t0}


def _prepare_teacher(args):
    from common.trial_config import TrainConfig
    from workers.data import TaskConfig, load
    from workers.teacher import prepare

    task = dict(TEACHER_TASK)
    train = dict(TEACHER_TRAIN)
    if args.train_size:
        task["train_size"] = args.train_size
    if args.eval_size:
        task["eval_size"] = args.eval_size
    if args.quick:
        train["max_steps"] = 4
    data = load(TaskConfig(**task))

    def show(step, total, loss):
        if step % 25 == 0 or step == total:
            print(f"  teacher fine-tuning: step {step}/{total}, loss {loss:.3f}", flush=True)

    return data, prepare(args.teacher or "minilm", data, TrainConfig(**train), CACHE, latency_runs=args.runs,
                         progress=show)


def _targets(rows: list[dict]) -> list[dict]:
    by = {r["name"]: r for r in rows if "error" not in r}

    def val(name, key):
        r = by.get(name)
        return None if r is None else round(r[key], 2)

    int8, int4, hf = val("int8 dynamic", "size_x"), val("int4 weight-only", "size_x"), val("heads+FFN 50%",
                                                                                            "speed_b1_x")
    combos = [r for r in by.values() if r["kind"] == "combination"]
    good = [r for r in combos if r["size_x"] >= 8 and r["speed_b1_x"] >= 5 and r["drop"] <= 1.0]
    best = max(good or combos, key=lambda r: (r in good, -r["drop"], r["speed_b1_x"]), default=None)
    best_val = None if best is None else {"row": best["name"], "size_x": round(best["size_x"], 2),
                                          "speed_b1_x": round(best["speed_b1_x"], 2),
                                          "speed_b32_x": round(best["speed_b32_x"], 2), "drop": round(best["drop"], 2)}
    return [
        target("INT8 artifact vs FP32 (embeddings included)", "≥ 3.5× smaller", int8, int8 is not None and int8 >= 3.5),
        target("INT4 artifact vs FP32", "≥ 6× smaller", int4, int4 is not None and int4 >= 6),
        target("50% heads + 50% FFN, batch-1 latency", "≥ 1.6× faster", hf, hf is not None and hf >= 1.6),
        target("a combination: size, batch-1 speed, accuracy", "≥ 8× smaller, ≥ 5× faster, ≤ 1.0 point drop",
               best_val, bool(good)),
    ]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", help="a fine-tuned teacher artifact directory (default: MiniLM fine-tuned on SST-2, "
                                      "prepared once and cached under bench/.cache)")
    ap.add_argument("--train-size", type=int, help=f"SST-2 training rows (default {TEACHER_TASK['train_size']})")
    ap.add_argument("--eval-size", type=int, help="dev rows to score (default: all 872)")
    ap.add_argument("--steps", type=int, default=200, help="distillation steps (batch 32) of single-technique rows")
    ap.add_argument("--combo-steps", type=int, default=500, help="distillation steps of the combinations")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per row for latency")
    ap.add_argument("--runs", type=int, default=20, help="timed forward passes per latency (median)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calibration", type=int, default=128, help="rows for static int8 / mixed-precision calibration")
    ap.add_argument("--samples", type=int, default=256, help="rows for gradient head/neuron importance")
    ap.add_argument("--only", help="comma-separated row names to run (the teacher row always runs)")
    ap.add_argument("--keep", action="store_true", help="keep the artifacts under bench/.cache/compression-artifacts")
    ap.add_argument("--quick", action="store_true",
                    help="an end-to-end check, not a measurement: 128 train rows, 64 dev rows, 2 KD steps, "
                         "seq-len 32, 3 latency runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.train_size = args.train_size or 128
        args.eval_size = args.eval_size or 64
        args.steps, args.combo_steps = min(args.steps, 2), min(args.combo_steps, 2)
        args.seq_len, args.runs, args.warmup = min(args.seq_len, 32), min(args.runs, 3), min(args.warmup, 1)
        args.calibration, args.samples = min(args.calibration, 32), min(args.samples, 32)
    setup_env()
    import transformers

    from workers import artifacts

    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    data, t = _prepare_teacher(args)
    print(f"teacher ready in {time.perf_counter() - t0:.0f} s: {t.uri} ({len(t.train)} train rows, "
          f"{len(t.eval)} dev rows)", flush=True)
    teacher_model, tok, _ = artifacts.load(t.uri)
    base = {"name": "teacher fp32 (MiniLM-L6)", "kind": "baseline", "kd_steps": 0,
            "accuracy": _accuracy(teacher_model, t.eval), "size_bytes": artifacts.info(t.uri).size_bytes,
            **_latency(teacher_model, args)}
    rows = [base]
    wanted = None if not args.only else {s.strip() for s in args.only.split(",")}
    if wanted is None or "torch.ao quantize_dynamic int8" in wanted:
        rows.append(torch_ao_row(teacher_model, t, args))
    for v in variants(args.samples, args.calibration):
        if wanted is not None and v.name not in wanted:
            continue
        print(f"{v.name} ...", flush=True)
        try:
            rows.append(run_variant(v, teacher_model, tok, t, args))
        except Exception as err:  # a failed row is recorded with its traceback, the rest still run
            traceback.print_exc()
            rows.append({"name": v.name, "kind": v.kind, "error": f"{type(err).__name__}: {err}"})
    for r in rows:
        if "error" in r:
            continue
        r["drop"] = base["accuracy"] - r["accuracy"]
        r["size_x"] = base["size_bytes"] / r["size_bytes"]
        r["speed_b1_x"] = base["latency_ms_b1"] / r["latency_ms_b1"]
        r["speed_b32_x"] = base["latency_ms_b32"] / r["latency_ms_b32"]
    targets = _targets(rows)
    print()
    print_table(rows, ["name", "kd_steps", "accuracy", "drop", "size_bytes", "size_x", "latency_ms_b1", "speed_b1_x",
                       "latency_ms_b32", "speed_b32_x"])
    print()
    print_targets(targets)
    setting = {"teacher": t.uri, "train_rows": len(t.train), "eval_rows": len(t.eval), "steps": args.steps,
               "combo_steps": args.combo_steps, "lr": args.lr, "batch_size": 32, "seq_len_latency": args.seq_len,
               "threads": args.threads, "latency_runs": args.runs, "quick": args.quick}
    path = write("compression-quick" if args.quick else "compression", rows, targets, extra={"setting": setting})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
