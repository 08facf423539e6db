import numpy as np

from workers.evaluate import latency_ms, nonzero_params, task_metrics


def test_metrics_hand_computed():
    logits = np.array([[0, 1], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
    labels = np.array([1, 0, 0, 1])
    m = task_metrics(logits, labels, "accuracy_f1")
    assert m["accuracy"] == 75.0 and abs(m["f1"] - 100 * 2 * 2 / (2 * 2 + 1)) < 1e-9 and m["metric"] == 75.0
    assert task_metrics(logits, labels, "f1")["metric"] == m["f1"]


def test_nonzero_params_and_latency(tiny_bert):
    n = nonzero_params(tiny_bert)
    assert n == sum(int((p != 0).sum()) for p in tiny_bert.parameters())
    tiny_bert.bert.encoder.layer[0].intermediate.dense.weight.data.zero_()
    assert nonzero_params(tiny_bert) == n - 128 * 64
    ms1 = latency_ms(tiny_bert, batch=1, seq_len=16, runs=5, warmup=1)
    ms32 = latency_ms(tiny_bert, batch=32, seq_len=64, runs=5, warmup=1)
    assert 0 < ms1 < ms32
