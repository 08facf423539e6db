"""Low-rank factorization: replace chosen encoder Linears by two thin ones from a truncated SVD.

W [out, in] ≈ (U_r √Σ_r) (√Σ_r V_rᵀ): ``first`` = Linear(in, r) holds √Σ_r V_rᵀ, ``second`` = Linear(r, out) holds
U_r √Σ_r and the original bias. Splitting √Σ evenly keeps both factors on the same scale, which helps the
distillation that follows and any int8/int4 rounding of the factors later.

A factored layer has r·(in + out) weights instead of in·out, so it only pays below the break-even rank
in·out / (in + out) (between min/2 and min of the two sizes). Layers whose rank would reach it are left dense,
with no error: ``ratio`` 1 therefore changes nothing. A target that matches no Linear at all is a config
error (most likely a typo).
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from common.trial_config import LowRankConfig
from common.errors import ConfigError
from workers.modules import LowRankLinear, replace_module
from workers.shapes import layers_of

__all__ = ["factorize", "choose_rank", "break_even_rank", "svd_factors"]

log = logging.getLogger(__name__)


def break_even_rank(in_features: int, out_features: int) -> float:
    """Ranks at or above this store at least as many weights as the dense matrix."""
    return in_features * out_features / (in_features + out_features)


def choose_rank(singular_values: torch.Tensor, cfg: LowRankConfig) -> int:
    """ceil(ratio · min(in, out)), or the smallest rank whose Σσ² share reaches ``energy``."""
    n = len(singular_values)
    if cfg.ratio is not None:
        return max(1, min(n, math.ceil(cfg.ratio * n)))
    energy = singular_values.double() ** 2
    share = torch.cumsum(energy, 0) / energy.sum().clamp_min(1e-30)
    return max(1, min(n, int(torch.searchsorted(share, torch.tensor(cfg.energy, dtype=share.dtype) - 1e-12)) + 1))


def svd_factors(weight: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first [r, in], second [out, r], all singular values) with second @ first the best rank-r approximation."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    r = len(s) if rank is None else rank
    root = s[:r].sqrt()
    return (root[:, None] * vh[:r]).to(weight.dtype), (u[:, :r] * root).to(weight.dtype), s


def _matches(path_in_layer: str, targets: tuple[str, ...]) -> bool:
    # Targets are paths inside a layer: "output.dense" is the FFN down-projection and must not also catch
    # "attention.output.dense"; a one-word target ("query") matches that last name in any block.
    last = path_in_layer.rpartition(".")[2]
    return any(path_in_layer == t or ("." not in t and last == t) for t in targets)


def factorize(model: nn.Module, cfg: LowRankConfig) -> nn.Module:
    """Replace the encoder Linears named by ``cfg.targets`` by :class:`LowRankLinear` (in place; returns it)."""
    chosen = []
    for i, layer in enumerate(layers_of(model)):
        for path, mod in layer.named_modules():
            if type(mod) is nn.Linear and _matches(path, cfg.targets):
                chosen.append((i, path, mod))
    if not chosen:
        raise ConfigError(f"lowrank.targets: no encoder Linear matches {list(cfg.targets)}; use paths inside a "
                          f"layer such as intermediate.dense, output.dense, attention.self.query")
    prefix = _layers_prefix(model)
    done = 0
    for i, path, lin in chosen:
        first, second, s = svd_factors(lin.weight)
        rank = choose_rank(s, cfg)
        if rank >= break_even_rank(lin.in_features, lin.out_features):
            log.info("lowrank: layer %d %s kept dense (rank %d ≥ break-even %.0f)", i, path, rank,
                     break_even_rank(lin.in_features, lin.out_features))
            continue
        new = LowRankLinear(lin.in_features, lin.out_features, rank, bias=lin.bias is not None)
        with torch.no_grad():
            new.first.weight.copy_(first[:rank])
            new.second.weight.copy_(second[:, :rank])
            if lin.bias is not None:
                new.second.bias.copy_(lin.bias)
        new.to(lin.weight.dtype).train(lin.training)
        replace_module(model, f"{prefix}.{i}.{path}", new)
        done += 1
    log.info("lowrank: factorized %d of %d matching Linears", done, len(chosen))
    return model


def _layers_prefix(model: nn.Module) -> str:
    layers = layers_of(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    raise ValueError("factorize: the model's encoder layers are not among its modules")
