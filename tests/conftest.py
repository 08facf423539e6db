"""Shared fixtures: tiny random BERTs built from a config, a small made-up task, a temp store, a local Ray.

Tests marked ``glue`` read the real GLUE files under ``$SLIMRAY_DATA_DIR`` (docs/operations.md); without them
those tests are deselected, and everything else runs on data written here.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest
from common.raylink import connect

# Ray must stay on loopback and quiet in every test (docs/architecture.md, "Stack facts").
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GLUE_FILES = ("glue/SST-2/train.tsv", "glue/SST-2/dev.tsv", "glue/MRPC/train.tsv", "glue/MRPC/dev.tsv")
_GLUE_DESELECTED = pytest.StashKey[int]()


def glue_data_dir() -> Path | None:
    """``$SLIMRAY_DATA_DIR`` when it holds every GLUE file the ``glue`` tests read, else None."""
    root = os.environ.get("SLIMRAY_DATA_DIR")
    if root and all((Path(root) / f).is_file() for f in GLUE_FILES):
        return Path(root)
    return None


def pytest_collection_modifyitems(config, items):
    # Deselected rather than skipped: a run without the data must not look as if those tests passed.
    if glue_data_dir() is not None:
        return
    need = [item for item in items if item.get_closest_marker("glue")]
    if need:
        items[:] = [item for item in items if not item.get_closest_marker("glue")]
        config.hook.pytest_deselected(items=need)
        config.stash[_GLUE_DESELECTED] = len(need)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = config.stash.get(_GLUE_DESELECTED, 0)
    if n:
        need = "1 test needs" if n == 1 else f"{n} tests need"
        terminalreporter.write_line(f"{need} the GLUE data in SLIMRAY_DATA_DIR ({', '.join(GLUE_FILES)}; "
                                    "see docs/operations.md): deselected")


# Cue words of each class and neutral filler, all whole words of the tiny tokenizers' vocabulary.
_POSITIVE = "good great love best fun funny sweet smart".split()
_NEGATIVE = "bad awful hate worst boring dull mess stupid".split()
_FILLER = ("the a an and or but very movie film story plot actor actors is was it this that of to in on with for "
           "as by one two more less really quite").split()


def write_tiny_sentiment(directory, *, train: int = 2000, eval: int = 200, seed: int = 0) -> Path:
    """A made-up binary sentiment task in the layout slimray reads from a local directory: ``train.tsv`` and
    ``validation.tsv`` with columns ``text`` and ``label`` (0/1), sentences of 6-14 words like SST-2's. Each
    sentence holds one or two cue words of its class among filler, and one in five also a cue of the other
    class, so a 2-layer model learns it but not instantly. Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for name, rows in (("train.tsv", train), ("validation.tsv", eval)):
        lines = ["text\tlabel"]
        for _ in range(rows):
            label = rng.randrange(2)
            own, other = (_POSITIVE, _NEGATIVE) if label else (_NEGATIVE, _POSITIVE)
            words = rng.choices(_FILLER, k=rng.randint(5, 11)) + rng.sample(own, rng.randint(1, 2))
            if rng.random() < 0.2:
                words.append(rng.choice(other))
            rng.shuffle(words)
            lines.append(f"{' '.join(words)}\t{label}")
        (directory / name).write_text("\n".join(lines) + "\n")
    return directory


@pytest.fixture(scope="session")
def tiny_task_dir(tmp_path_factory) -> Path:
    """One made-up sentiment task for the session (``write_tiny_sentiment``): give it as ``task.dataset``."""
    return write_tiny_sentiment(tmp_path_factory.mktemp("tiny-task"))


def tiny_bert_config(layers: int = 2, hidden: int = 64, heads: int = 4, ffn: int = 128, vocab: int = 1000,
                     num_labels: int = 2):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=ffn, max_position_embeddings=128, num_labels=num_labels,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture
def tiny_bert():
    """A 2-layer, 64-wide random BERT classifier (seeded)."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    model.eval()
    return model


@pytest.fixture
def tiny_bert_4l():
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(layers=4))
    model.eval()
    return model


@pytest.fixture
def tiny_tokenizer(tmp_path_factory):
    """A real WordPiece tokenizer over a small vocabulary (no hub): the MiniLM vocab's first 1000 entries."""
    from transformers import BertTokenizerFast

    d = tmp_path_factory.mktemp("tok")
    vocab = [f"[unused{i}]" for i in range(100)]
    vocab[:5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = ("the a an and or but not no very good bad great awful movie film story plot actor actors fun boring "
             "love hate best worst is was it this that of to in on with for as by funny dull sweet mess smart "
             "stupid one two more less really quite").split()
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    vocab += words + letters + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab += [f"w{i}" for i in range(1000 - len(vocab))]
    (d / "vocab.txt").write_text("\n".join(vocab[:1000]) + "\n")
    return BertTokenizerFast(vocab=str(d / "vocab.txt"), do_lower_case=True)  # transformers 5 ignores vocab_file


@pytest.fixture
def random_batch():
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 1000, (4, 16), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A tiny BERT checkpoint + tokenizer on disk, standing in for a hub model (no task head trained yet)."""
    import torch
    from transformers import BertForSequenceClassification

    d = tmp_path_factory.mktemp("tiny-teacher")
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config(layers=2)).save_pretrained(d)
    _tokenizer(d).save_pretrained(d)
    return d


def _tokenizer(d):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"[unused{i}]" for i in range(95)]
    words = ("the a an and or but not no very good bad great awful movie film story plot actor actors fun boring "
             "love hate best worst is was it this that of to in on with for as by funny dull sweet mess smart "
             "stupid one two more less really quite").split()
    vocab += words + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab += [f"w{i}" for i in range(1000 - len(vocab))]
    (d / "vocab.txt").write_text("\n".join(vocab[:1000]) + "\n")
    return BertTokenizerFast(vocab=str(d / "vocab.txt"), do_lower_case=True)  # transformers 5 ignores vocab_file


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs, loopback) for the whole test session."""
    import ray

    if not ray.is_initialized():
        connect(None, num_cpus=2)
    yield ray
    ray.shutdown()


def tiny_job(teacher_dir, tmp_path, **over) -> dict:
    """A real job spec on the tiny teacher and 200 rows of a made-up sentiment task written under ``tmp_path``
    (2,000 rows there: override ``task.train_size`` up to that)."""
    data = write_tiny_sentiment(Path(tmp_path) / "task")
    spec = {
        "name": "tiny",
        "teacher": str(teacher_dir),
        "task": {"dataset": str(data), "train_size": 200, "eval_size": 100, "max_length": 32},
        # the full-data default would fine-tune on all 2,000 made-up rows: the tests need only a working teacher
        "teacher_train": {"epochs": 2, "lr": 1e-3, "batch_size": 16, "train_size": 200},
        "search": {"student": {"layers": [1, 2]}, "prune": {"kind": ["none", "heads"], "sparsity": 0.5,
                                                             "importance": "magnitude"},
                   "quant": {"mode": ["none", "dynamic"]}, "train": {"lr": {"low": 1e-4, "high": 1e-3, "log": True}}},
        "algorithm": {"name": "tpe", "asha": True, "grace_period": 4, "max_t": 13, "reduction_factor": 2},
        "objectives": ["metric:max", "size_bytes:min", "latency_ms_b1:min"],
        "budget": {"num_trials": 4, "max_concurrent": 1},
        "train": {"epochs": 1, "batch_size": 16, "eval_every": 4},
        "latency": {"runs": 3, "seq_len": 16},
        "storage": {"db_url": f"sqlite:///{tmp_path}/slimray.db", "artifact_dir": str(tmp_path / "jobs")},
    }
    for k, v in over.items():
        spec[k] = {**spec[k], **v} if isinstance(v, dict) and isinstance(spec.get(k), dict) else v
    return spec


def tiny_artifact(out_dir, *, layers: int = 2, hidden: int = 64, heads: int = 4, ffn: int = 128, seed: int = 0,
                  labels=("negative", "positive"), meta: dict | None = None):
    """A tiny BERT classifier saved as a slimray artifact (with ``config.id2label`` set); returns its ArtifactInfo."""
    import torch
    from transformers import BertForSequenceClassification

    from workers import artifacts

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = tiny_bert_config(layers=layers, hidden=hidden, heads=heads, ffn=ffn, num_labels=len(labels))
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    model = BertForSequenceClassification(config).eval()
    with tempfile.TemporaryDirectory() as vocab_dir:
        return artifacts.save(model, _tokenizer(Path(vocab_dir)), out_dir, meta=meta or {})


def promotion_store(url: str, job_id: str, trials: list[dict], *, spec: dict | None = None,
                    baseline: dict | None = None):
    """A Store holding one finished job whose trials are filled by hand: each dict has ``trial_id``, the
    result columns (metric, metric_drop, size_bytes, latency_ms_b1), ``artifact_uri`` and ``on_front``."""
    from db import Store

    store = Store(url)
    store.create_job(job_id, "tiny", spec or {"name": "tiny", "task": {"max_length": 32},
                                              "latency": {"seq_len": 16}},
                     teacher="tiny-teacher", dataset="glue/sst2")
    store.set_job_baseline(job_id, baseline or {"metric": 90.0, "size_bytes": 10_000_000, "latency_ms_b1": 5.0,
                                                "uri": "/nowhere/teacher"})
    for t in trials:
        store.trial_started(job_id, t["trial_id"], t.get("config", {"student": {"layers": 2}}))
        result = {k: t[k] for k in ("metric", "metric_drop", "size_bytes", "latency_ms_b1") if k in t}
        store.trial_finished(job_id, t["trial_id"], t.get("status", "terminated"), result)
        if t.get("artifact_uri"):
            store.add_artifact(job_id, t["trial_id"], t["artifact_uri"], 1, "0" * 64)
    store.set_front(job_id, [t["trial_id"] for t in trials if t.get("on_front", True)])
    store.set_job_status(job_id, "finished")
    return store


def record_fault(fault: str, **values) -> None:
    """Fault-injection tests report what they saw; `make bench-reliability` turns it into a table."""
    import json

    out = os.environ.get("SLIMRAY_RELIABILITY_OUT")
    if out:
        with open(out, "a") as fh:
            fh.write(json.dumps({"fault": fault, **values}) + "\n")


def submit_with_fault(raw: dict, when, inject, *, poll_s: float = 0.3, timeout_s: float = 240) -> tuple[str, bool]:
    """Submit the job ``raw`` while a thread watches its store; once ``when(store, trials)`` holds for the
    job's trials it calls ``inject()`` (once). Returns (job id, whether the fault was injected)."""
    import threading
    import time

    from db import Store
    from orchestrator.jobs import submit
    from orchestrator.spec import parse

    fired = threading.Event()

    def watch():
        store, deadline = None, time.time() + timeout_s
        while time.time() < deadline and not fired.is_set():
            try:
                store = store or Store(raw["storage"]["db_url"])
                jobs = store.list_jobs()
                if jobs and when(store, store.trials(jobs[0]["id"])):
                    inject()
                    fired.set()
            except Exception:  # the job row may not exist yet; a failed injection is retried
                pass
            time.sleep(poll_s)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    job_id = submit(parse(raw))
    watcher.join(timeout=5)
    return job_id, fired.is_set()
