"""The super-student: one BERT whose every sub-model (fewer layers, fewer heads, narrower FFN) shares its weights.

Design (DynaBERT, Hou et al. 2020):
  * **Prefix order.** ``build_super`` starts from the teacher-initialised student at the space's largest depth
    (``workers.student.build``), ranks each layer's heads and FFN neurons by gradient importance
    (``workers.prune.gradient_importance``) and permutes them, most important first: Q/K/V output rows and the
    attention output projection's input columns per head, the up-projection's rows and the down-projection's
    columns per neuron. A permutation changes no output. Every narrower width is then a prefix: a sub-model keeps
    the first ``heads`` heads and the first ``ffn`` neurons of each layer, so slicing needs no ranking at all.
    Widths beyond the space's largest are cut off once, here.
  * **Running at a sub-configuration.** The six Linears of every layer become :class:`ElasticLinear`, which can use
    a prefix of their rows (outputs) or columns (inputs). ``at(model, sub)`` sets those prefixes and runs only the
    layers the depth keeps (``workers.student.pick_layers`` over the super-student's layers, with the layer choice
    recorded in its config), so a small sub-model also costs less to train. Heads and neurons beyond the prefix
    take no part: the same arithmetic as the sliced model. ``at`` and ``slice`` briefly change the super-student's
    layer list: one thread at a time per super-student (a sub-model trial loads its own).
  * **Slicing.** ``slice(model, sub)`` returns a plain BERT with real smaller shapes (``workers.shapes.keep_heads``
    / ``keep_ffn`` on prefixes, layers dropped), which ``workers.artifacts.save`` stores and ``load`` rebuilds like
    any head/FFN-pruned student. Import the module (``supernet.slice``): the name shadows the builtin.
  * **Storage.** The super-student saves as an ordinary artifact (its Linears' parameters keep their names);
    ``config.slimray_elastic`` records the layer choice and the space. ``load_super`` reads it back elastic.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.elastic_config import ElasticConfig, SubConfig, SubSpace
from common.errors import ConfigError
from common.trial_config import StudentConfig
from workers.shapes import keep_ffn, keep_heads, layers_of

__all__ = ["ElasticLinear", "build_super", "reorder", "make_elastic", "at", "slice", "load_super", "space_of"]

_KEY = "slimray_elastic"  # the config attribute marking a super-student


class ElasticLinear(nn.Linear):
    """An ``nn.Linear`` that computes with the first ``rows`` outputs and the first ``cols`` inputs of its weight
    (``None``: all of them); its parameters keep their names, so state dicts and checkpoints are a plain Linear's."""

    rows: int | None = None
    cols: int | None = None

    @classmethod
    def wrap(cls, linear: nn.Linear) -> "ElasticLinear":
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        out.weight, out.bias = linear.weight, linear.bias  # the same Parameters: nothing is copied
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if self.rows is not None:
            w, b = w[:self.rows], (b[:self.rows] if b is not None else None)
        if self.cols is not None:
            w = w[:, :self.cols]
        return F.linear(x, w, b)

    def plain(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        out.weight, out.bias = self.weight, self.bias
        return out


# --------------------------------------------------------------------------- building

def build_super(teacher: nn.Module, space: SubSpace, cfg: ElasticConfig, data,
                teacher_logits: np.ndarray | None = None) -> nn.Module:
    """The super-student of ``space``: the teacher-initialised student at the largest depth, heads and neurons
    reordered by gradient importance on ``data`` (a workers.data.Encoded; KD against ``teacher_logits`` when
    given), cut to the space's largest widths, with elastic Linears. In training mode, like ``student.build``."""
    from workers.prune import gradient_importance
    from workers.student import build

    _check_space(teacher, space)
    student = build(teacher, StudentConfig(layers=space.depths[-1], layer_choice=cfg.layer_choice))
    heads, neurons = gradient_importance(student, data, teacher_logits, samples=cfg.importance_samples)
    reorder(student, heads, neurons)
    for layer in layers_of(student):
        if space.heads[-1] < layer.attention.self.num_attention_heads:
            keep_heads(layer, list(range(space.heads[-1])))
        if space.ffn[-1] < layer.intermediate.dense.out_features:
            keep_ffn(layer, list(range(space.ffn[-1])))
    setattr(student.config, _KEY, {"layer_choice": cfg.layer_choice, "space": space.model_dump(mode="json")})
    return make_elastic(student)


def _check_space(teacher: nn.Module, space: SubSpace) -> None:
    layers = layers_of(teacher)
    n, h, f = len(layers), layers[0].attention.self.num_attention_heads, layers[0].intermediate.dense.out_features
    for name, values, most, what in (("depths", space.depths, n, "layers"),
                                     ("heads", space.heads, h, "heads per layer"),
                                     ("ffn", space.ffn, f, "FFN neurons per layer")):
        if values[-1] > most:
            raise ConfigError(f"search.student.{name}: must be ≤ the teacher's {most} {what}, got {values[-1]}")


def reorder(model: nn.Module, head_scores: list[torch.Tensor], neuron_scores: list[torch.Tensor]) -> nn.Module:
    """Permute every layer's heads and FFN neurons in place, highest score first (ties keep their order); the
    model computes the same function afterwards."""
    with torch.no_grad():
        for layer, hs, ns in zip(layers_of(model), head_scores, neuron_scores):
            att = layer.attention.self
            d = att.attention_head_size
            heads = torch.argsort(hs.detach(), descending=True, stable=True)
            idx = (heads[:, None] * d + torch.arange(d)).flatten()
            for lin in (att.query, att.key, att.value):
                _permute(lin, rows=idx)
            _permute(layer.attention.output.dense, cols=idx)
            neurons = torch.argsort(ns.detach(), descending=True, stable=True)
            _permute(layer.intermediate.dense, rows=neurons)
            _permute(layer.output.dense, cols=neurons)
    return model


def _permute(lin: nn.Linear, rows=None, cols=None) -> None:
    if rows is not None:
        lin.weight.copy_(lin.weight[rows])
        if lin.bias is not None:
            lin.bias.copy_(lin.bias[rows])
    if cols is not None:
        lin.weight.copy_(lin.weight[:, cols])


def _linears(layer) -> dict[str, nn.Module]:
    """The six Linears of a BERT layer whose widths are elastic, by their path inside the layer."""
    att = layer.attention
    return {"attention.self.query": att.self.query, "attention.self.key": att.self.key,
            "attention.self.value": att.self.value, "attention.output.dense": att.output.dense,
            "intermediate.dense": layer.intermediate.dense, "output.dense": layer.output.dense}


def make_elastic(model: nn.Module) -> nn.Module:
    """Swap each layer's six Linears for :class:`ElasticLinear` over the same parameters (in place)."""
    for layer in layers_of(model):
        for path, lin in _linears(layer).items():
            if type(lin) is nn.Linear:
                parent, _, name = path.rpartition(".")
                setattr(layer.get_submodule(parent), name, ElasticLinear.wrap(lin))
    return model


def load_super(uri) -> tuple[nn.Module, object, dict]:
    """``(super-student, tokenizer, meta)`` from the artifact ``build_super``'s model was saved as."""
    from workers import artifacts

    model, tokenizer, meta = artifacts.load(uri)
    if not getattr(model.config, _KEY, None):
        raise ConfigError(f"{uri}: not a super-student artifact (its config has no {_KEY})")
    return make_elastic(model), tokenizer, meta


def space_of(model: nn.Module) -> SubSpace:
    """The space the super-student was built for."""
    return SubSpace.model_validate(_elastic(model)["space"])


def _elastic(model: nn.Module) -> dict:
    recorded = getattr(model.config, _KEY, None)
    if not recorded:
        raise ConfigError(f"not a super-student: the model's config has no {_KEY} (build it with build_super)")
    return recorded


# --------------------------------------------------------------------------- sub-configurations

def _kept(model: nn.Module, sub: SubConfig) -> list[int]:
    """Indices of the super-student's layers that ``sub`` keeps; checks its widths against the layers'."""
    from workers.student import pick_layers

    layers = layers_of(model)
    if sub.depth > len(layers):
        raise ConfigError(f"sub.depth: must be ≤ the super-student's {len(layers)} layers, got {sub.depth}")
    keep = pick_layers(len(layers), sub.depth, _elastic(model)["layer_choice"])
    for i in keep:
        heads, ffn = layers[i].attention.self.num_attention_heads, layers[i].intermediate.dense.out_features
        if sub.heads > heads:
            raise ConfigError(f"sub.heads: must be ≤ the super-student's {heads} heads per layer, got {sub.heads}")
        if sub.ffn > ffn:
            raise ConfigError(f"sub.ffn: must be ≤ the super-student's {ffn} FFN neurons per layer, got {sub.ffn}")
    return keep


@contextmanager
def at(model: nn.Module, sub: SubConfig):
    """Within the block the super-student ``model`` computes as its sub-model ``sub``: only the layers the depth
    keeps run, each on its first ``sub.heads`` heads and ``sub.ffn`` neurons. Graphs built inside stay valid
    after the block (backward may run later)."""
    base = getattr(model, model.base_model_prefix, model)
    every = base.encoder.layer
    keep = _kept(model, sub)
    elastic = [lin for layer in every for lin in _linears(layer).values()]
    if not all(isinstance(lin, ElasticLinear) for lin in elastic):
        raise ConfigError("not a super-student: its Linears are not elastic (build it with build_super or load it "
                          "with load_super)")
    try:
        base.encoder.layer = nn.ModuleList([every[i] for i in keep])
        for layer in base.encoder.layer:
            lins = _linears(layer)
            width = sub.heads * layer.attention.self.attention_head_size
            for path in ("attention.self.query", "attention.self.key", "attention.self.value"):
                lins[path].rows = width
            lins["attention.output.dense"].cols = width
            lins["intermediate.dense"].rows = sub.ffn
            lins["output.dense"].cols = sub.ffn
        yield model
    finally:
        base.encoder.layer = every
        for lin in elastic:
            lin.rows = lin.cols = None


def slice(model: nn.Module, sub: SubConfig) -> nn.Module:  # noqa: A001 - the verb; callers use supernet.slice
    """A new plain BERT holding exactly the sub-model ``sub`` of the super-student ``model``: the kept layers,
    each with its first heads and FFN neurons removed from nothing but the shapes. In eval mode."""
    keep = _kept(model, sub)
    base = getattr(model, model.base_model_prefix, model)
    every = base.encoder.layer
    try:  # only the kept layers are copied
        base.encoder.layer = nn.ModuleList([every[i] for i in keep])
        out = copy.deepcopy(model)
    finally:
        base.encoder.layer = every
    base = getattr(out, out.base_model_prefix, out)
    out.config.num_hidden_layers = len(keep)
    delattr(out.config, _KEY)
    for layer in base.encoder.layer:
        for path, lin in _linears(layer).items():
            if isinstance(lin, ElasticLinear):
                parent, _, name = path.rpartition(".")
                setattr(layer.get_submodule(parent), name, lin.plain())
        if sub.heads < layer.attention.self.num_attention_heads:
            keep_heads(layer, list(range(sub.heads)))
        if sub.ffn < layer.intermediate.dense.out_features:
            keep_ffn(layer, list(range(sub.ffn)))
    return out.eval()
