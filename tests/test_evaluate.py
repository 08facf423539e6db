import math
from types import SimpleNamespace

import numpy as np
import torch

from workers import evaluate
from workers.evaluate import latency_ms, nonzero_params, task_metrics


def test_metrics_hand_computed():
    logits = np.array([[0, 1], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
    labels = np.array([1, 0, 0, 1])
    m = task_metrics(logits, labels, "accuracy_f1")
    assert m["accuracy"] == 75.0 and abs(m["f1"] - 100 * 2 * 2 / (2 * 2 + 1)) < 1e-9 and m["metric"] == 75.0
    assert task_metrics(logits, labels, "f1")["metric"] == m["f1"]


def test_nonzero_params(tiny_bert):
    n = nonzero_params(tiny_bert)
    assert n == sum(int((p != 0).sum()) for p in tiny_bert.parameters())
    tiny_bert.bert.encoder.layer[0].intermediate.dense.weight.data.zero_()
    assert nonzero_params(tiny_bert) == n - 128 * 64


def test_latency_is_the_median_of_the_timed_runs_at_the_asked_shape_and_threads(tiny_bert, monkeypatch):
    # A fake clock that each forward pass advances by a scripted amount makes the arithmetic exact; comparing
    # two real timings would only be a benchmark, and a flaky one on a busy machine.
    durations_s = [9.0, 9.0, 0.004, 0.001, 0.010, 0.002, 0.003]  # 2 warmup passes, then 5 timed ones
    clock = SimpleNamespace(now=0.0)
    calls = []

    def advance(module, args, kwargs):
        calls.append((tuple(kwargs["input_ids"].shape), torch.get_num_threads()))
        clock.now += durations_s[len(calls) - 1]

    monkeypatch.setattr(evaluate, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    tiny_bert.register_forward_pre_hook(advance, with_kwargs=True)
    threads_before = torch.get_num_threads()
    ms = latency_ms(tiny_bert, batch=3, seq_len=16, runs=5, warmup=2, threads=1)
    assert math.isclose(ms, 3.0)  # median of 4, 1, 10, 2, 3 ms: the 9 s warmup passes are not timed
    assert calls == [((3, 16), 1)] * 7  # warmup + runs passes, each batch × seq_len, on the asked threads
    assert torch.get_num_threads() == threads_before


def test_latency_on_the_real_clock_is_a_positive_finite_number(tiny_bert):
    ms = latency_ms(tiny_bert, batch=1, seq_len=16, runs=3, warmup=1)
    assert math.isfinite(ms) and ms > 0
