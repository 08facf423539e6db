"""Classification tasks: load (local TSV/CSV/JSONL or a hub id), subset with a fixed seed, tokenise once.

``dataset: glue/sst2`` resolves to ``$SLIMRAY_DATA_DIR/glue/SST-2/{train,dev}.tsv`` when that exists
(the test machines have no hub), else to ``datasets.load_dataset("glue", "sst2")`` for users with internet.
Tokenised splits are plain numpy arrays so they travel through Ray's object store without copies.
"""
from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional
from pathlib import Path

import numpy as np

from pydantic import Field, model_validator

from common.config import Float, Frozen, Int, Str
from workers.augment import AugmentConfig
from common.errors import DataError

__all__ = ["TaskConfig", "SelectionConfig", "Split", "TaskData", "Encoded", "load", "encode", "known_layout",
           "label_names"]

# Local layouts of the GLUE tasks as GLUE ships them (docs/operations.md shows where they go).
_GLUE = {
    "glue/sst2": {"dir": "glue/SST-2", "text_columns": ("sentence",), "label_column": "label", "metric": "accuracy",
                  "eval_split": "dev", "hub": ("glue", "sst2"), "hub_eval": "validation",
                  "label_names": {"0": "negative", "1": "positive"}},
    "glue/mrpc": {"dir": "glue/MRPC", "text_columns": ("#1 String", "#2 String"), "label_column": "Quality",
                  "metric": "accuracy_f1", "eval_split": "dev", "hub": ("glue", "mrpc"), "hub_eval": "validation",
                  "hub_columns": ("sentence1", "sentence2"), "hub_label": "label",
                  "label_names": {"0": "not_equivalent", "1": "equivalent"}},
}


def known_layout(dataset: str) -> dict | None:
    return _GLUE.get(dataset.lower())


def label_names(dataset: str, labels) -> tuple[str, ...]:
    """What predictions call each class, in class-index order: the dataset's names for its label values where
    it has them (glue/sst2 labels 0 and 1 are negative and positive), else the label values themselves."""
    names = (known_layout(dataset) or {}).get("label_names", {})
    return tuple(names.get(str(x), str(x)) for x in labels)


class SelectionConfig(Frozen):
    """The selection split: training rows that the search scores every configuration on and that nothing (teacher
    or student) trains on. Picking the best of many configurations on the split one reports inflates the
    reported number, so promotion and the reports use the dev split, which the search never sees."""

    _prefix: ClassVar[str] = "task.selection"

    share: Float = Field(0.1, ge=0, le=0.5, description="share of the training split held out for choosing; 0 turns "
                                                        "it off (the search then scores on the dev split)")
    min_rows: Int = Field(500, ge=1, description="at least this many rows, but never more than half the training "
                                                 "split")

    def rows(self, n: int) -> int:
        """How many of ``n`` training rows the split takes (0: off)."""
        if not self.share:
            return 0
        return max(round(self.share * n), min(self.min_rows, n // 2))


class TaskConfig(Frozen):
    """Where the data is and how to read it. Columns and metric default from known GLUE layouts."""

    _prefix: ClassVar[str] = "task"

    dataset: Str = Field("glue/sst2", min_length=1, description="a hub id, a known name like glue/sst2, or a "
                                                               "local directory/file")
    text_columns: tuple[Str, ...] = Field(None, min_length=1, max_length=2, description="one column (single "
                                          "sentence) or two (sentence pair); default: the known layout's, else text")
    label_column: Str = Field(None, description="default: the known layout's, else label")
    labels: Optional[tuple[Str, ...]] = Field(None, min_length=2, description="the label set, in class-index "
                                                                             "order; default: sorted train labels")
    metric: Literal["accuracy", "f1", "accuracy_f1"] = Field(
        None, description="the objective `metric` is accuracy, or F1 for f1; default: the known layout's, else "
                          "accuracy")
    max_length: Int = Field(128, ge=1, le=512, description="tokens per row")
    train_size: Optional[Int] = Field(None, ge=1, description="a seeded random subset of the rows the selection "
                                                              "split leaves; None = all")
    eval_size: Optional[Int] = Field(None, ge=1, description="a seeded random subset; None = all")
    train_split: Str = "train"
    eval_split: Str = Field(None, description="default: the known layout's, else validation")
    seed: Int = 0
    augment: AugmentConfig = Field(AugmentConfig(), description="teacher-labelled copies of the training rows: "
                                   "copies, replace_prob, mask_prob, neighbours, seed")
    selection: SelectionConfig = Field(SelectionConfig(), description="the split the search chooses on, carved from "
                                       "the training split before any subset: share, min_rows")

    @model_validator(mode="before")
    @classmethod
    def _layout_defaults(cls, data):
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if v is not None or k in ("labels", "train_size", "eval_size")}
        dataset = data.get("dataset", "glue/sst2")
        layout = (known_layout(dataset) if isinstance(dataset, str) else None) or {}
        if isinstance(data.get("text_columns"), str):
            data["text_columns"] = (data["text_columns"],)
        if isinstance(data.get("labels"), (list, tuple)):  # label names may be written as numbers in YAML
            data["labels"] = tuple(str(x) for x in data["labels"])
        defaults = {"text_columns": layout.get("text_columns", ("text",)),
                    "label_column": layout.get("label_column", "label"),
                    "metric": layout.get("metric", "accuracy"),
                    "eval_split": layout.get("eval_split", "validation")}
        return {**defaults, **data}


@dataclass
class Split:
    texts: list  # str, or (str, str) for pairs
    labels: np.ndarray  # int64 class indices

    def __len__(self):
        return len(self.labels)


@dataclass
class TaskData:
    config: TaskConfig
    train: Split
    eval: Split
    label_names: tuple[str, ...]
    source: str  # where it was read from, for provenance
    select: Optional[Split] = None  # the selection split (task.selection); None when it is off

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass
class Encoded:
    """A tokenised split: right-padded ``input_ids``/``token_type_ids`` [N, L], true ``lengths`` [N], ``labels``."""

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    extra: dict = field(default_factory=dict)
    # what was tokenised, and at what length: a model with its own (pruned) vocabulary re-tokenises the text
    texts: Optional[list] = None
    max_length: Optional[int] = None

    def __len__(self):
        return len(self.labels)

    def batch(self, idx, *, pad_to: int | None = None) -> dict:
        """Torch tensors for rows ``idx``, trimmed to the longest row (or padded to ``pad_to``)."""
        import torch

        idx = np.asarray(idx)
        width = pad_to or int(self.lengths[idx].max())
        ids = torch.from_numpy(np.ascontiguousarray(self.input_ids[idx, :width])).long()
        tt = torch.from_numpy(np.ascontiguousarray(self.token_type_ids[idx, :width])).long()
        mask = (torch.arange(width)[None, :] < torch.from_numpy(self.lengths[idx])[:, None]).long()
        return {"input_ids": ids, "token_type_ids": tt, "attention_mask": mask,
                "labels": torch.from_numpy(self.labels[idx]).long()}


# --------------------------------------------------------------------------- reading files

def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{n}: not valid JSON ({err.msg})") from None
        return rows
    if suffix not in (".tsv", ".csv"):
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .tsv, .csv or .jsonl")
    # GLUE's TSVs contain bare quotes: quoting must be off for them; MRPC starts with a BOM.
    with open(path, encoding="utf-8-sig", newline="") as fh:
        if suffix == ".tsv":
            reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.DictReader(fh)
        return list(reader)


def _find_split_file(directory: Path, split: str) -> Path:
    for ext in (".tsv", ".csv", ".jsonl"):
        p = directory / f"{split}{ext}"
        if p.exists():
            return p
    raise DataError(f"no {split}.tsv, {split}.csv or {split}.jsonl in {directory}")


def _local_dir(cfg: TaskConfig) -> Path | None:
    layout = known_layout(cfg.dataset)
    data_dir = os.environ.get("SLIMRAY_DATA_DIR")
    if layout and data_dir and (Path(data_dir) / layout["dir"]).is_dir():
        return Path(data_dir) / layout["dir"]
    p = Path(cfg.dataset).expanduser()
    if p.is_dir():
        return p
    if data_dir and (Path(data_dir) / cfg.dataset).is_dir():
        return Path(data_dir) / cfg.dataset
    return None


def _rows_to_split(rows: list[dict], cfg: TaskConfig, where: str) -> tuple[list, list[str]]:
    if not rows:
        raise DataError(f"{where}: no rows")
    cols = set(rows[0])
    for c in (*cfg.text_columns, cfg.label_column):
        if c not in cols:
            raise DataError(f"{where}: no column {c!r}; columns are {', '.join(sorted(map(str, cols)))}")
    texts, labels = [], []
    for r in rows:
        t = tuple("" if r[c] is None else str(r[c]) for c in cfg.text_columns)
        texts.append(t[0] if len(t) == 1 else t)
        labels.append(str(r[cfg.label_column]).strip())
    return texts, labels


def _hub_rows(cfg: TaskConfig) -> tuple[list[dict], list[dict], str, TaskConfig]:
    import datasets

    layout = known_layout(cfg.dataset)
    try:
        if layout:
            ds = datasets.load_dataset(*layout["hub"])
            eval_split = layout["hub_eval"]
            cfg = TaskConfig(**{**cfg.model_dump(), "text_columns": layout.get("hub_columns", cfg.text_columns),
                                "label_column": layout.get("hub_label", cfg.label_column), "eval_split": eval_split})
        else:
            name, _, subset = cfg.dataset.partition(":")
            ds = datasets.load_dataset(name, subset or None)
    except Exception as err:  # the hub raises many types; the user needs one line
        raise DataError(f"cannot load dataset {cfg.dataset!r} (not a local path under SLIMRAY_DATA_DIR and the hub "
                        f"said: {str(err).splitlines()[0] if str(err) else type(err).__name__})") from err
    for split in (cfg.train_split, cfg.eval_split):
        if split not in ds:
            raise DataError(f"dataset {cfg.dataset!r} has no split {split!r}; splits: {', '.join(ds)}")
    return list(ds[cfg.train_split]), list(ds[cfg.eval_split]), f"hub:{cfg.dataset}", cfg


def _subset(texts: list, labels: np.ndarray, size: int | None, seed: int) -> Split:
    if size is None or size >= len(labels):
        return Split(texts, labels)
    idx = sorted(random.Random(seed).sample(range(len(labels)), size))
    return Split([texts[i] for i in idx], labels[idx])


def _carve(texts: list, labels: np.ndarray, cfg: TaskConfig, where: str) -> tuple[Split, Split | None]:
    """(the training rows left, the selection split): drawn from the whole training split with its own seeded
    generator, before ``train_size`` subsets what is left, so that a teacher and students loaded with different
    ``train_size`` hold out the very same rows."""
    k = cfg.selection.rows(len(labels))
    if not k:
        if cfg.selection.share:
            raise DataError(f"task.selection: {where} has {len(labels)} row(s), too few to hold any out; set "
                            f"task.selection.share: 0")
        return Split(texts, labels), None
    held = set(random.Random(f"selection:{cfg.seed}").sample(range(len(labels)), k))
    keep, take = [i for i in range(len(labels)) if i not in held], sorted(held)
    return Split([texts[i] for i in keep], labels[keep]), Split([texts[i] for i in take], labels[take])


def load(cfg: TaskConfig) -> TaskData:
    """Read the train and eval splits, map labels to class indices, carve the selection split out of the training
    rows, take seeded subsets."""
    local = _local_dir(cfg)
    if local is not None:
        train_path = _find_split_file(local, cfg.train_split)
        eval_path = _find_split_file(local, cfg.eval_split)
        train_rows, eval_rows = _read_rows(train_path), _read_rows(eval_path)
        source, read_cfg = str(local), cfg
        where_train, where_eval = str(train_path), str(eval_path)
    elif Path(cfg.dataset).suffix.lower() in (".tsv", ".csv", ".jsonl"):
        raise DataError(f"task.dataset: {cfg.dataset} is a file; give the directory holding "
                        f"{cfg.train_split}.* and {cfg.eval_split}.*")
    else:
        train_rows, eval_rows, source, read_cfg = _hub_rows(cfg)
        where_train, where_eval = f"{cfg.dataset}[{read_cfg.train_split}]", f"{cfg.dataset}[{read_cfg.eval_split}]"

    train_texts, train_labels = _rows_to_split(train_rows, read_cfg, where_train)
    eval_texts, eval_labels = _rows_to_split(eval_rows, read_cfg, where_eval)
    names = cfg.labels or tuple(sorted(set(train_labels), key=lambda s: (len(s), s)))
    index = {name: i for i, name in enumerate(names)}
    for where, labels in ((where_train, train_labels), (where_eval, eval_labels)):
        for row, lab in enumerate(labels, 1):
            if lab not in index:
                raise DataError(f"{where}: row {row} has label {lab!r}, not in the label set "
                                f"{list(names)}; set task.labels to include it or fix the row")
    rest, select = _carve(train_texts, np.array([index[x] for x in train_labels], dtype=np.int64), cfg, where_train)
    train = _subset(rest.texts, rest.labels, cfg.train_size, cfg.seed)
    eval_ = _subset(eval_texts, np.array([index[x] for x in eval_labels], dtype=np.int64), cfg.eval_size, cfg.seed + 1)
    return TaskData(cfg, train, eval_, tuple(names), source, select)


def encode(split: Split, tokenizer, max_length: int) -> Encoded:
    """Tokenise once; rows are right-padded to the longest row (≤ max_length)."""
    if not len(split):
        raise DataError("cannot encode an empty split")
    pairs = isinstance(split.texts[0], tuple)
    if pairs:
        firsts, seconds = [t[0] for t in split.texts], [t[1] for t in split.texts]
        enc = tokenizer(firsts, seconds, truncation=True, max_length=max_length)
    else:
        enc = tokenizer(list(split.texts), truncation=True, max_length=max_length)
    lengths = np.array([len(x) for x in enc["input_ids"]], dtype=np.int64)
    width = int(lengths.max())
    ids = np.full((len(lengths), width), tokenizer.pad_token_id or 0, dtype=np.int32)
    tt = np.zeros((len(lengths), width), dtype=np.int8)
    for i, row in enumerate(enc["input_ids"]):
        ids[i, : len(row)] = row
        if "token_type_ids" in enc:
            tt[i, : len(row)] = enc["token_type_ids"][i]
    return Encoded(ids, tt, lengths, split.labels.copy(), texts=list(split.texts), max_length=max_length)

