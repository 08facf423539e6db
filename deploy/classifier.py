"""The model side of the endpoint: an artifact loaded once, then ``classify(items)`` on a batch of texts.

No Ray and no HTTP here, so the HTTP answers can be checked against this class run directly.
An item is a text (``str``) or a sentence pair (``(first, second)``). Labels are the names the artifact
records (``label_names`` in slimray.json: the dataset's names), else its config's class values.
"""
from __future__ import annotations

from typing import Sequence, Union

from workers import artifacts
from common.errors import DeployError, SlimrayError

__all__ = ["Classifier", "Item", "max_length", "labels", "takes_pairs", "PTQ", "post_training_quantize"]

Item = Union[str, tuple[str, str]]
# Quantization applied when the model loads, for serving an artifact as the baselines users compare against:
# PyTorch's dynamic INT8 (every nn.Linear, embeddings stay fp32; what INC / Optimum give out of the box).
PTQ = ("torch-dynamic-int8",)


def post_training_quantize(model, ptq: str):
    """``model`` with ``ptq`` (one of PTQ) applied in memory; the artifact on disk is unchanged."""
    if ptq not in PTQ:
        raise DeployError(f"ptq: unknown post-training quantization {ptq!r}; use one of {', '.join(PTQ)}")
    import torch

    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def max_length(model, tokenizer, meta: dict) -> int:
    """Tokens per input: the length the model was trained and measured at when the artifact records it
    (serving latency then matches the measured one), never more than its position embeddings allow."""
    limit = int(getattr(model.config, "max_position_embeddings", 512) or 512)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < limit:
        limit = tok_limit
    trained = (meta.get("task") or {}).get("max_length") if isinstance(meta.get("task"), dict) else None
    if isinstance(trained, int) and 0 < trained < limit:
        limit = trained
    return limit


def labels(config, meta: dict) -> list[str]:
    """Class names in index order: the artifact's recorded ``label_names``, else ``config.id2label``."""
    n = config.num_labels
    names = meta.get("label_names")
    if isinstance(names, list) and len(names) == n and all(isinstance(x, str) and x for x in names):
        return list(names)
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]


def takes_pairs(meta: dict) -> bool | None:
    """Whether the model was trained on sentence pairs (two text columns), from the task its artifact records;
    None when it records none."""
    task = meta.get("task") if isinstance(meta.get("task"), dict) else {}
    columns = task.get("text_columns")
    if not columns and task.get("dataset"):
        from workers.data import known_layout

        columns = (known_layout(str(task["dataset"])) or {}).get("text_columns")
    if isinstance(columns, str):
        return False
    return len(columns) == 2 if isinstance(columns, (list, tuple)) and columns else None


class Classifier:
    """``Classifier.load(uri)(["a text", ("first", "second")])`` → ``[{"label": ..., "score": ...}, ...]``."""

    def __init__(self, model, tokenizer, meta: dict, uri: str):
        if tokenizer is None:
            raise DeployError(f"artifact {uri} has no tokenizer/ directory; it cannot serve raw text")
        try:
            artifacts.check_tokenizer(meta, tokenizer, uri)
        except SlimrayError as err:
            raise DeployError(str(err)) from None
        self.model, self.tokenizer, self.meta, self.uri = model, tokenizer, meta, uri
        self.labels = labels(model.config, meta)
        self.pairs = takes_pairs(meta)
        self.max_length = max_length(model, tokenizer, meta)
        # A token is at least one character, so this many characters always cover max_length tokens; cutting
        # before tokenising bounds the work an over-long text can cause.
        self.max_chars = self.max_length * 64

    @classmethod
    def load(cls, uri: str, *, ptq: str | None = None) -> Classifier:
        model, tokenizer, meta = artifacts.load(uri)
        if ptq is not None:
            model, meta = post_training_quantize(model, ptq), {**meta, "serving_ptq": ptq}
        return cls(model, tokenizer, meta, str(artifacts.resolve(uri)))

    def first_mismatch(self, items: Sequence[Item]) -> int | None:
        """The index of the first item of the wrong kind for the model (a pair for a single-text model, or a
        text for a pair model), else None; an artifact that does not record its task takes either."""
        if self.pairs is None:
            return None
        return next((i for i, x in enumerate(items) if isinstance(x, str) == self.pairs), None)

    def encode(self, items: Sequence[Item]) -> dict:
        """Token ids for ``items``, truncated to ``max_length`` and right-padded to the longest one."""
        import torch

        singles = [i for i, x in enumerate(items) if isinstance(x, str)]
        pairs = [i for i, x in enumerate(items) if not isinstance(x, str)]
        ids: list = [None] * len(items)
        types: list = [None] * len(items)
        cut = self.max_chars
        kw = dict(truncation=True, max_length=self.max_length, return_attention_mask=False)
        for group, enc in ((singles, lambda g: self.tokenizer([items[i][:cut] for i in g], **kw)),
                           (pairs, lambda g: self.tokenizer([items[i][0][:cut] for i in g],
                                                            [items[i][1][:cut] for i in g], **kw))):
            if group:
                out = enc(group)
                for i, row, tt in zip(group, out["input_ids"], out["token_type_ids"]):
                    ids[i], types[i] = row, tt
        width = max(len(r) for r in ids)
        batch = {"input_ids": torch.full((len(items), width), self.tokenizer.pad_token_id or 0, dtype=torch.long),
                 "attention_mask": torch.zeros((len(items), width), dtype=torch.long),
                 "token_type_ids": torch.zeros((len(items), width), dtype=torch.long)}
        for i, (row, tt) in enumerate(zip(ids, types)):
            batch["input_ids"][i, :len(row)] = torch.tensor(row)
            batch["attention_mask"][i, :len(row)] = 1
            batch["token_type_ids"][i, :len(tt)] = torch.tensor(tt)
        return batch

    def logits(self, items: Sequence[Item]):
        import torch

        batch = self.encode(items)
        with torch.inference_mode():
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              token_type_ids=batch["token_type_ids"]).logits.float()

    def __call__(self, items: Sequence[Item]) -> list[dict]:
        if not items:
            return []
        probs = self.logits(items).softmax(-1)
        scores, idx = probs.max(-1)
        return [{"label": self.labels[int(i)], "score": float(s)} for s, i in zip(scores.tolist(), idx.tolist())]
