"""ONNX Runtime sessions for exported slimray models: one place that opens a session and feeds it rows."""
from __future__ import annotations

import os

import numpy as np

__all__ = ["session", "run_logits", "feed"]


def session(path: str | os.PathLike, *, threads: int = 1):
    """An InferenceSession on the CPU with all of ONNX Runtime's graph optimizations and ``threads`` intra-op
    threads (1: the serving default, one request per core as the torch backend is measured)."""
    from workers.export import require_onnx

    _, ort = require_onnx()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # warnings about unused initializers etc. are noise to a user
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def feed(sess, batch: dict) -> dict:
    """The session's inputs from a batch of torch tensors or arrays (int64), skipping what the graph lacks."""
    wanted = {i.name for i in sess.get_inputs()}
    return {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v, dtype=np.int64)
            for k, v in batch.items() if k in wanted}


def run_logits(sess, rows, batch_size: int = 64) -> np.ndarray:
    """Logits [N, labels] for a workers.data.Encoded, batched by length like workers.evaluate.predict_logits."""
    order = np.argsort(rows.lengths, kind="stable")
    out = None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        logits = sess.run(["logits"], feed(sess, rows.batch(idx)))[0]
        if out is None:
            out = np.zeros((len(rows), logits.shape[-1]), dtype=np.float32)
        out[idx] = logits
    return out
