"""The elastic strategy's stages on the driver (issue 14); the model side is ``workers.elastic`` and
``workers.supernet``.

    teacher (as for trials) → super-student: one Ray task, resumable, recorded as the trial "super-student"
    → sub-model search: Tune trials through the trials strategy's searcher, scheduler, Recorder and store, each
      slicing the super-student, compressing without training and scoring the result (``run_sub_trial``)
    → front: the sub-models on it saved as artifacts (the search only counted their bytes)
    → finalists: a short distillation of the best front members from their sliced weights → the front again

Lineage: every sub-model trial's ``parent`` is the super-student's row, every finalist's is its sub-model's.

The sub-model space is the spec's own search section (``orchestrator.spec.ELASTIC_DIMS``): a trial's
``student.layers`` / ``heads`` / ``ffn`` are its depth and widths (the super-student's largest where not
searched), its ``quant`` and ``vocab`` are applied training-free. ``sub_space`` turns the same section into the
super-student's ``SubSpace``, so both read one definition.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

from common.elastic_config import SubConfig, SubSpace
from common.trial_config import TrialConfig
from search.space import Choice, Fixed, Range, SearchSpace

__all__ = ["SUPER_TRIAL", "sub_space", "sub_config", "super_stage", "run_sub_trial", "pick_finalists",
           "after_search"]

log = logging.getLogger(__name__)

SUPER_TRIAL = "super-student"  # the super-student's row in the trials table: every sub-model's parent


# --------------------------------------------------------------------------- the space (pure)

def _sizes(dim, full: int) -> tuple[int, ...]:
    if dim is None:
        return (full,)
    if isinstance(dim, Fixed):
        return (dim.value,)
    if isinstance(dim, Choice):
        return tuple(dim.values)
    assert isinstance(dim, Range) and dim.step is not None  # the spec refuses an unstepped range
    return tuple(range(int(dim.low), int(dim.high) + 1, int(dim.step)))


def sub_space(search: SearchSpace, layers: int, heads: int, ffn: int) -> SubSpace:
    """The super-student's sub-configurations: ``search.student.layers`` / ``heads`` / ``ffn`` as sets of sizes,
    the teacher's ``layers`` / ``heads`` / ``ffn`` where one is not searched."""
    return SubSpace(depths=_sizes(search.get("student.layers"), layers),
                    heads=_sizes(search.get("student.heads"), heads),
                    ffn=_sizes(search.get("student.ffn"), ffn))


def sub_config(cfg: TrialConfig, space: SubSpace) -> SubConfig:
    """The slice a sub-model trial's config names; the super-student's largest size where it names none."""
    top = space.largest
    s = cfg.student
    return SubConfig(depth=s.layers or top.depth, heads=s.heads or top.heads, ffn=s.ffn or top.ffn)


def pick_finalists(front: list[dict], limits: dict, k: int) -> list[dict]:
    """The ``k`` front members that get a short distillation: those meeting the job's constraints first (as
    promotion would rank them: fastest first), then the nearest misses (``search.pareto.closest``)."""
    from search.pareto import closest

    return closest(front, **limits, n=k) if front and k else []


# --------------------------------------------------------------------------- the super-student

def _shape(model) -> tuple[int, int, int]:
    from workers.shapes import layers_of

    layers = layers_of(model)
    return len(layers), layers[0].attention.self.num_attention_heads, layers[0].intermediate.dense.out_features


def _needs_teacher_model(spec) -> bool:
    return spec.distill.hidden_weight > 0 or spec.distill.attention_weight > 0


def _train_super(spec, bundle: dict, out_dir: str, provenance: dict, report=None) -> dict:
    """Runs as a Ray task: build the super-student from the teacher and train it, resuming from the checkpoint
    under ``out_dir`` when a killed run left one (``workers.elastic.train_super``)."""
    from workers import artifacts, supernet
    from workers.elastic import train_super

    teacher, tokenizer, _ = artifacts.load(
        bundle["teacher_uri"], attn_implementation="eager" if _needs_teacher_model(spec) else "sdpa")
    space = sub_space(spec.search, *_shape(teacher))
    if report:
        report.stage("ranking heads and neurons")
    sup = supernet.build_super(teacher, space, spec.elastic, bundle["train"], bundle["logits"])
    if report:
        report.stage("training the super-student")
    res = train_super(sup, bundle["train"], spec.elastic, spec.distill, spec.train, out_dir,
                      teacher_logits=bundle["logits"], teacher=teacher if _needs_teacher_model(spec) else None,
                      progress=report.step if report else None, tokenizer=tokenizer,
                      meta={**provenance, "trial_id": SUPER_TRIAL, "teacher": bundle["teacher_uri"]})
    return {**dataclasses.asdict(res), "space": space.model_dump(mode="json")}


def super_stage(spec, job_id: str, store, bundle_ref, root: Path, provenance: dict) -> str:
    """Train (or finish training) the job's super-student as one Ray task and record it as the trial
    ``SUPER_TRIAL``; returns its artifact's URI. Its checkpoints live in ``<root>/super/checkpoints``, so
    running the stage again after a kill continues from the last one; a super-student already recorded
    (a job resumed after this stage) is not trained again."""
    import ray

    from orchestrator.jobs import TeacherProgress

    done = store.trials(job_id, status="terminated")
    stored = next((t for t in done if t["trial_id"] == SUPER_TRIAL and t["artifact_uri"]), None)
    if stored is not None and Path(stored["artifact_uri"]).is_dir():
        return stored["artifact_uri"]
    store.set_job_stage(job_id, "super_student", {"what": "starting"})
    store.trial_started(job_id, SUPER_TRIAL, {"elastic": spec.elastic.model_dump(mode="json"),
                                              "train": spec.train.model_dump(mode="json"),
                                              "distill": spec.distill.model_dump(mode="json")})
    task = ray.remote(num_cpus=spec.resources.cpus, num_gpus=spec.resources.gpus)(_train_super)
    progress = TeacherProgress(store.url, job_id, stage="super_student")
    try:
        res = ray.get(task.remote(spec, bundle_ref, str(root / "super"), provenance, progress))
    except Exception as err:
        import traceback

        store.trial_failed(job_id, SUPER_TRIAL, (str(err).splitlines() or [type(err).__name__])[0],
                           "".join(traceback.format_exception(err)))
        raise
    store.trial_finished(job_id, SUPER_TRIAL, "terminated", {
        "role": "super-student", "artifact_uri": res["uri"], "train_steps": res["steps"],
        "train_seconds": res["seconds"], "train_loss": res["loss"], "resumed_from_step": res["resumed_from"],
        "train_workers": res["world_size"], "size_bytes": res["size_bytes"], "sub_space": res["space"]})
    store.add_artifact(job_id, SUPER_TRIAL, res["uri"], res["size_bytes"], "")
    return res["uri"]


# --------------------------------------------------------------------------- sub-model trials

def _sub_eval(bundle: dict, spec):
    from workers.elastic import SubEval

    # the search scores on the selection split (the dev split when the bundle has none); dev is for the front
    split = bundle["eval"] if bundle.get("select") is None else bundle["select"]
    return SubEval(split=split, metric=spec.task.metric, calibration=bundle["train"],
                   teacher_metric=bundle["teacher_metrics"]["metric"], seq_len=spec.seq_len,
                   latency_threads=spec.latency.threads, latency_runs=spec.latency.runs)


class _Loaded:
    """What a worker process keeps between sub-model trials of one job: the super-student (loaded once per
    URI), the job's data and the evaluation inputs, the vocabulary-pruned ones built on first use."""

    def __init__(self, super_uri: str, bundle: dict, spec):
        from workers import supernet

        self.key = super_uri
        self.model, self.tokenizer, _ = supernet.load_super(super_uri)
        self.model.eval()
        self.space = supernet.space_of(self.model)
        self.bundle, self.spec = bundle, spec
        self.ev, self._pruned = _sub_eval(bundle, spec), None

    def evaluation(self, prune_vocab: bool):
        if not prune_vocab:
            return self.ev
        if self._pruned is None:
            from workers.elastic import with_pruned_vocab

            self._pruned = with_pruned_vocab(self.ev, self.tokenizer, self.bundle["train"])
        return self._pruned


_LOADED: dict[str, _Loaded] = {}  # by super-student URI; one entry per process (a reused Tune actor keeps it)


def _loaded(shared: dict, spec) -> _Loaded:
    import ray

    uri = shared["super_uri"]
    if uri not in _LOADED:
        _LOADED.clear()
        _LOADED[uri] = _Loaded(uri, ray.get(shared["ref"]), spec)
    return _LOADED[uri]


def _measure_lock(job_id: str):
    """Sub-model trials of a job time their latency one at a time on a node (timings taken side by side
    would slow each other down): an exclusive lock on a file in the node's temp directory."""
    import fcntl
    import tempfile
    from contextlib import contextmanager

    @contextmanager
    def held():
        with open(Path(tempfile.gettempdir()) / f"slimray-measure-{job_id}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    return held()


def run_sub_trial(config: dict, shared: dict, settings) -> None:
    """Tune function trainable of the elastic strategy: slice the sub-model the sampled point names out of the
    super-student, compress it training-free, score it and report once (with its parent)."""
    from ray import tune

    from orchestrator.trainable import _final
    from search.adapters import trial_config
    from workers.elastic import evaluate_sub

    cfg = trial_config(config, settings.base)
    loaded = _loaded(shared, settings.spec)
    with _measure_lock(settings.job_id):
        result = evaluate_sub(loaded.model, sub_config(cfg, loaded.space), cfg.quant,
                              loaded.evaluation(cfg.vocab.prune))
    tune.report(_final({**result, "parent": SUPER_TRIAL}))


# --------------------------------------------------------------------------- after the search

def _save_front(spec, bundle: dict, super_uri: str, members: list[tuple[str, dict]], out_root: str,
                provenance: dict) -> dict:
    """Runs as a Ray task: slice, compress and save each front sub-model ``(trial id, config)`` as its
    trial would have, and measure the saved artifact as the trials strategy does its own: the dev split's
    metrics (``dev_*``, through the artifact's tokenizer) and batch-32 latency; returns ``{trial id: keys}``."""
    from workers import artifacts
    from workers.elastic import evaluate_sub
    from workers.evaluate import latency_ms, predict_logits, task_metrics
    from workers.trial import _label_names
    from workers.vocab import retokenise

    loaded = _Loaded(super_uri, bundle, spec)
    out = {}
    for trial_id, config in members:
        cfg = TrialConfig.model_validate(config)
        model_meta = {**provenance, "trial_id": trial_id, "parent": SUPER_TRIAL, "teacher": bundle["teacher_uri"],
                      "label_names": _label_names(loaded.model, provenance)}
        r = evaluate_sub(loaded.model, sub_config(cfg, loaded.space), cfg.quant, loaded.evaluation(cfg.vocab.prune),
                         save_to=Path(out_root) / trial_id, tokenizer=loaded.tokenizer, meta=model_meta)
        saved, own_tokenizer, _ = artifacts.load(r["artifact_uri"])
        dev = retokenise(bundle["eval"], own_tokenizer) if cfg.vocab.prune else bundle["eval"]
        m = task_metrics(predict_logits(saved, dev), dev.labels, spec.task.metric)
        bar = bundle["teacher_metrics"]
        out[trial_id] = {"artifact_uri": r["artifact_uri"], "artifact_bytes": r["artifact_bytes"],
                         "sha256": r["sha256"],
                         "latency_ms_b32": latency_ms(saved, batch=32, seq_len=spec.seq_len, runs=spec.latency.runs,
                                                      threads=spec.latency.threads),
                         **{f"dev_{k}": v for k, v in m.items() if k in ("metric", "accuracy", "f1")},
                         "dev_metric_drop": bar.get("dev_metric", bar["metric"]) - m["metric"]}
    return out


def _finalist_config(config: dict, spec, rows: int) -> TrialConfig:
    """A front sub-model's config trained for ``elastic.finalist_steps`` steps: the epochs are set so that the
    steps they imply are exactly those (``workers.distill`` counts ceil(epochs × batches / grad_accum)).

    A static INT8 sub-model trains as QAT: its activation ranges are then learnt with the weights instead of
    calibrated once after them, and it converts to the same int8 model. Dynamic INT8 and INT4 quantize weights
    only, so they train in float and quantize after, as in the search."""
    from common.trial_config import QatInt8, StaticInt8

    cfg = TrialConfig.model_validate(config)
    train = cfg.train
    batches = math.ceil(rows / train.batch_size)
    epochs = spec.elastic.finalist_steps * train.grad_accum / batches
    update = {"train": train.model_copy(update={"epochs": epochs, "max_steps": spec.elastic.finalist_steps})}
    if isinstance(cfg.quant, StaticInt8):
        update["quant"] = QatInt8(embeddings=cfg.quant.embeddings, embedding_bits=cfg.quant.embedding_bits)
    return cfg.model_copy(update=update)


def _finalist(spec, bundle: dict, super_uri: str, config: dict, out_dir: str, provenance: dict) -> dict:
    """Runs as a Ray task: the trials strategy's recipe (``workers.trial.run``) on the sub-model sliced from the
    super-student instead of a fresh teacher-initialised student."""
    from workers import supernet
    from workers.trial import TrialContext, run

    cfg = TrialConfig.model_validate(config)
    sup, _, _ = supernet.load_super(super_uri)
    start = supernet.slice(sup, sub_config(cfg, supernet.space_of(sup)))
    ctx = TrialContext(teacher_uri=bundle["teacher_uri"], teacher_metrics=bundle["teacher_metrics"],
                       train=bundle["train"], eval=bundle["eval"], teacher_logits=bundle["logits"],
                       metric=spec.task.metric, out_dir=out_dir, seq_len=spec.seq_len,
                       latency_threads=spec.latency.threads, latency_runs=spec.latency.runs,
                       provenance=provenance, select=bundle.get("select"), initial_model=start)
    return run(cfg, ctx)


def after_search(spec, job_id: str, store, shared: dict, settings) -> None:
    """Save the front's sub-models, distil the finalists among them and compute the front again over every
    trial of the job. Each step skips what an earlier run of the job already stored."""
    import ray

    from orchestrator.jobs import compute_front

    remote = ray.remote(num_cpus=spec.resources.cpus, num_gpus=spec.resources.gpus)
    front = [t for t in store.trials(job_id) if t["on_front"]]
    unsaved = [(t["trial_id"], t["config"]) for t in front if t.get("parent") == SUPER_TRIAL and not t["artifact_uri"]]
    if unsaved:
        store.set_job_stage(job_id, "front", {"what": f"saving {len(unsaved)} front sub-models"})
        saved = ray.get(remote(_save_front).remote(spec, shared["ref"], shared["super_uri"], unsaved,
                                                   settings.out_root, settings.provenance))
        rows = {t["trial_id"]: t for t in front}
        for trial_id, keys in saved.items():
            store.trial_finished(job_id, trial_id, "terminated", {**(rows[trial_id]["result"] or {}), **keys})
            store.add_artifact(job_id, trial_id, keys["artifact_uri"], rows[trial_id]["size_bytes"] or 0,
                               keys["sha256"])

    trials = store.trials(job_id)
    done = {t["trial_id"] for t in trials if t["status"] == "terminated"}
    subs = [t for t in trials if t["on_front"] and t.get("parent") == SUPER_TRIAL]
    chosen = pick_finalists(subs, spec.constraints.limits(), spec.elastic.finalists)
    rows = len(ray.get(shared["ref"])["train"].labels)
    for i, sub in enumerate(chosen):
        store.set_job_stage(job_id, "finalists", {"done": i, "total": len(chosen), "unit": "finalists"})
        trial_id = f"{sub['trial_id']}-finalist"
        if trial_id in done:
            continue
        cfg = _finalist_config(sub["config"], spec, rows)
        store.trial_started(job_id, trial_id, cfg.model_dump(mode="json", exclude_none=True), parent=sub["trial_id"])
        try:
            result = ray.get(remote(_finalist).remote(
                spec, shared["ref"], shared["super_uri"], cfg.model_dump(mode="json"),
                str(Path(settings.out_root) / trial_id), {**settings.provenance, "trial_id": trial_id}))
        except Exception as err:  # recorded with its traceback; the other finalists still run
            import traceback

            log.warning("finalist %s failed: %s", trial_id, err)
            store.trial_failed(job_id, trial_id, (str(err).splitlines() or [type(err).__name__])[0],
                               "".join(traceback.format_exception(err)))
            continue
        store.trial_finished(job_id, trial_id, "terminated", {**result, "parent": sub["trial_id"]})
        store.add_artifact(job_id, trial_id, result["artifact_uri"], result["size_bytes"], result["sha256"])
    if chosen:
        store.set_job_stage(job_id, "finalists", {"done": len(chosen), "total": len(chosen), "unit": "finalists"})
    store.set_job_stage(job_id, "front")
    compute_front(store, job_id, spec)
