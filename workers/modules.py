"""Compressed building blocks that replace ``nn.Linear`` / ``nn.Embedding`` inside a model.

Each class stores its low-bit or factored form as ordinary parameters/buffers (so it lands in
``model.safetensors`` as is) and describes its own shape with ``structure()``; ``from_structure`` builds an
empty one of that shape for loading. ``BUILDERS`` maps the ``type`` tag written in an artifact's
``config.json`` to the class; it is the only place a tag is turned into code, at load time.

Low-bit storage formats (the bytes in ``model.safetensors``):

* int8 rows: ``qweight`` int8 [rows, cols] in [-127, 127] and ``scale`` fp32 [rows]; w = q * scale (symmetric,
  one scale per output channel / embedding row).
* int4 groups: ``packed`` uint8 [rows, ceil(cols / 2)], two values per byte (column 2j in the low nibble,
  2j+1 in the high one), each stored as q + 8 with q in [-8, 7] (so a zero weight is nibble 8), and ``scales``
  fp16 [rows, ceil(cols / group_size)]; w = q * scale of its group. fp16 scales halve the overhead
  (at group 64 they add 0.25 bit per weight) and are exact in the fp32 arithmetic that uses them.

Whatever a kernel needs beyond that (fbgemm's packed weights, a dequantized fp32 matrix) is built by
``after_load()`` into plain attributes, never into ``state_dict``, so the file holds only the low-bit form.
The quantize verb calls ``after_load()`` itself, so a model before saving and after loading runs the same
code on the same numbers and gives bit-identical logits.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LowRankLinear", "QLinear", "QEmbedding", "FakeQuantLinear", "FakeQuantEmbedding", "BUILDERS",
           "compressed_modules", "replace_module", "quantize_rows_int8", "quantize_groups_int4",
           "dequantize_groups_int4", "activation_qparams", "ACT_QMAX"]

# Activations are quantized to uint8 with a scale chosen for the 7-bit range [0, 127], as PyTorch's own fbgemm
# configs do ("reduce_range"): CPUs without VNNI multiply u8 x s8 pairs into saturating int16, and
# 2 * 127 * 127 still fits where 2 * 255 * 127 does not. Values beyond the observed range keep headroom
# up to 255 instead of being clipped.
ACT_QMAX = 127
_ENGINE = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else None


class LowRankLinear(nn.Module):
    """``W ≈ U @ V``: a Linear(in, rank) followed by a Linear(rank, out) with the original bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x):
        return self.second(self.first(x))

    def structure(self) -> dict:
        return {"type": "lowrank", "in": self.in_features, "out": self.out_features, "rank": self.rank,
                "bias": self.second.bias is not None}

    @classmethod
    def from_structure(cls, s: dict) -> "LowRankLinear":
        return cls(s["in"], s["out"], s["rank"], s["bias"])


# --------------------------------------------------------------------------- low-bit formats (pure functions)

def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 [rows, cols] in [-127, 127], scale fp32 [rows])."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale is exact
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def _group_scales(w: torch.Tensor, group_size: int) -> torch.Tensor:
    rows, cols = w.shape
    groups = math.ceil(cols / group_size)
    padded = F.pad(w, (0, groups * group_size - cols)).reshape(rows, groups, group_size)
    scales = (padded.abs().amax(dim=2) / 7).clamp(max=65504).to(torch.float16)  # 65504: the largest fp16
    # the scale is rounded to fp16 before q is computed, so q * scale is exactly what dequantization gives
    return torch.where(scales > 0, scales, torch.ones_like(scales))  # also catches fp16 underflow


def _int4_values(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q in [-8, 7] as fp32, its fp32 per-column scale, the fp16 group scales)."""
    w = w.detach().float()
    scales = _group_scales(w, group_size)
    s = scales.float().repeat_interleave(group_size, dim=1)[:, :w.shape[1]]
    return torch.clamp(torch.round(w / s), -8, 7), s, scales


def quantize_groups_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 with one fp16 scale per ``group_size`` columns: (packed uint8, scales fp16)."""
    q, _, scales = _int4_values(w, group_size)
    cols = q.shape[1]
    q = q.to(torch.int16) + 8
    if cols % 2:
        q = F.pad(q, (0, 1), value=8)  # the padding nibble is a stored zero
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    return packed, scales


def _unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    lo = (packed & 0x0F).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).flatten(-2)[..., :cols]


def dequantize_groups_int4(packed: torch.Tensor, scales: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    s = scales.float().repeat_interleave(group_size, dim=-1)[..., :cols]
    return _unpack_int4(packed, cols).float() * s


def activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero_point) of a uint8 activation whose observed range [lo, hi] maps onto [0, ACT_QMAX]."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)  # zero must be exact (padding, ReLU/GELU zeros)
    # rounded through fp32 because that is how a QLinear stores it: QAT and the converted model use one scale
    scale = float(torch.tensor((hi - lo) / ACT_QMAX, dtype=torch.float32))
    if not scale > 1e-12:  # an input that was always zero
        return 1.0, 0
    return scale, int(min(ACT_QMAX, max(0, round(-lo / scale))))


def _count_int4(packed: torch.Tensor) -> int:
    return int(((packed & 0x0F) != 8).sum() + ((packed >> 4) != 8).sum())


@contextlib.contextmanager
def _engine(name: str):
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


# --------------------------------------------------------------------------- real low-bit modules

def _lowbit_buffers(module: nn.Module, rows: int, cols: int, bits: int, group_size: int | None) -> None:
    """The stored form of a low-bit matrix: int8 values + one scale per row, or int4 packed two per byte
    (0x88 = two zeros around the offset 8) + one fp16 scale per group of ``group_size`` columns."""
    if bits == 8:
        module.register_buffer("qweight", torch.zeros(rows, cols, dtype=torch.int8))
        module.register_buffer("scale", torch.ones(rows))
    else:
        module.register_buffer("packed", torch.full((rows, math.ceil(cols / 2)), 0x88, dtype=torch.uint8))
        module.register_buffer("scales", torch.ones(rows, math.ceil(cols / group_size), dtype=torch.float16))


class QLinear(nn.Module):
    """A Linear whose weight is stored as int8 rows or int4 groups (see the module docstring), bias fp32.

    ``act`` is how the input meets the weight:
      * ``dynamic``: int8 GEMM, the input quantized per call from its own range (fbgemm ``linear_dynamic``);
      * ``static``: int8 GEMM, the input quantized with the fixed ``input_scale``/``input_zero_point`` found by
        calibration or QAT (fbgemm, fp32 output);
      * ``none``: weight-only: the int4/int8 weight is dequantized once in ``after_load`` and the matmul is fp32.
    An int4 weight with an int8 ``act`` is re-quantized per row to int8 in ``after_load`` for the int8 kernel
    (the stored int4 values sit on a grid the int8 one resolves to within half an int8 step).
    """

    def __init__(self, in_features: int, out_features: int, *, bits: int = 8, group_size: int | None = None,
                 bias: bool = True, act: str = "dynamic"):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"QLinear: bits must be 4 or 8, got {bits}")
        if act not in ("dynamic", "static", "none"):
            raise ValueError(f"QLinear: act must be dynamic|static|none, got {act!r}")
        if bits == 4 and not group_size:
            raise ValueError("QLinear: int4 needs a group_size")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.act = bits, (group_size if bits == 4 else None), act
        _lowbit_buffers(self, out_features, in_features, bits, group_size)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        if act == "static":
            self.register_buffer("input_scale", torch.ones(()))
            self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32))
        self._packed = None  # fbgemm's packed weight (int8 acts), built by after_load
        self._weight = None  # dequantized fp32 weight (weight-only, or no fbgemm on this CPU)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, bits: int = 8, group_size: int | None = None, act: str = "dynamic",
                    input_range: tuple[float, float] | None = None) -> "QLinear":
        w = linear.weight.detach()
        m = cls(w.shape[1], w.shape[0], bits=bits, group_size=group_size, bias=linear.bias is not None, act=act)
        if bits == 8:
            m.qweight, m.scale = quantize_rows_int8(w)
        else:
            m.packed, m.scales = quantize_groups_int4(w, group_size)
        if linear.bias is not None:
            m.bias = linear.bias.detach().float().clone()
        if act == "static":
            if input_range is None:
                raise ValueError("QLinear.from_linear: act='static' needs the calibrated input_range")
            scale, zp = activation_qparams(*input_range)
            m.input_scale = torch.tensor(scale, dtype=torch.float32)
            m.input_zero_point = torch.tensor(zp, dtype=torch.int32)
        m.after_load()
        return m

    def dequantized_weight(self) -> torch.Tensor:
        if self.bits == 8:
            return self.qweight.float() * self.scale[:, None]
        return dequantize_groups_int4(self.packed, self.scales, self.in_features, self.group_size)

    def after_load(self) -> None:
        self._packed = self._weight = None
        if self.act == "none" or _ENGINE is None:
            self._weight = self.dequantized_weight()
            return
        q, scale = (self.qweight, self.scale) if self.bits == 8 else quantize_rows_int8(self.dequantized_weight())
        with warnings.catch_warnings(), _engine(_ENGINE):
            warnings.simplefilter("ignore")  # torch.ao's quantized-tensor constructors are deprecated, not gone
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(),
                                                          torch.zeros(len(scale), dtype=torch.long), 0)
            self._packed = torch.ops.quantized.linear_prepack(qw, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None and self._weight is None:
            raise RuntimeError("QLinear: call after_load() once its tensors are in place")
        if self._weight is not None:
            if self.act == "static":  # no fbgemm: the same arithmetic, without the int8 kernel
                x = torch.fake_quantize_per_tensor_affine(x, float(self.input_scale), int(self.input_zero_point),
                                                          0, 255)
            return F.linear(x, self._weight, self.bias)
        x = x.float().contiguous()
        if self.act == "dynamic":
            # reduce_range: 7-bit activations, as torch.ao's own dynamic Linear does (see ACT_QMAX)
            return torch.ops.quantized.linear_dynamic(x, self._packed, True)
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x, float(self.input_scale), int(self.input_zero_point), self._packed)

    def nonzero(self) -> int:
        """Non-zero stored weights and biases (scales are metadata)."""
        n = int((self.qweight != 0).sum()) if self.bits == 8 else _count_int4(self.packed)
        return n + (int((self.bias != 0).sum()) if self.bias is not None else 0)

    def structure(self) -> dict:
        return {"type": "qlinear", "in": self.in_features, "out": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "bias": self.bias is not None, "act": self.act}

    @classmethod
    def from_structure(cls, s: dict) -> "QLinear":
        return cls(s["in"], s["out"], bits=s["bits"], group_size=s.get("group_size"), bias=s["bias"], act=s["act"])

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}{g}, act={self.act}"


class QEmbedding(nn.Module):
    """An embedding table stored as int8 rows or int4 groups; rows are dequantized after the lookup, so only
    the looked-up rows ever exist in fp32."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, bits: int = 8, group_size: int | None = None,
                 padding_idx: int | None = None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"QEmbedding: bits must be 4 or 8, got {bits}")
        if bits == 4 and not group_size:
            raise ValueError("QEmbedding: int4 needs a group_size")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.bits, self.group_size = bits, (group_size if bits == 4 else None)
        _lowbit_buffers(self, num_embeddings, embedding_dim, bits, group_size)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, *, bits: int = 8, group_size: int | None = None) -> "QEmbedding":
        w = emb.weight.detach()
        m = cls(w.shape[0], w.shape[1], bits=bits, group_size=group_size, padding_idx=emb.padding_idx)
        if bits == 8:
            m.qweight, m.scale = quantize_rows_int8(w)
        else:
            m.packed, m.scales = quantize_groups_int4(w, group_size)
        return m

    def dequantized_weight(self) -> torch.Tensor:
        if self.bits == 8:
            return self.qweight.float() * self.scale[:, None]
        return dequantize_groups_int4(self.packed, self.scales, self.embedding_dim, self.group_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return self.qweight[ids].float() * self.scale[ids].unsqueeze(-1)
        return dequantize_groups_int4(self.packed[ids], self.scales[ids], self.embedding_dim, self.group_size)

    def nonzero(self) -> int:
        return int((self.qweight != 0).sum()) if self.bits == 8 else _count_int4(self.packed)

    def structure(self) -> dict:
        return {"type": "qembedding", "num": self.num_embeddings, "dim": self.embedding_dim, "bits": self.bits,
                "group_size": self.group_size, "padding_idx": self.padding_idx}

    @classmethod
    def from_structure(cls, s: dict) -> "QEmbedding":
        return cls(s["num"], s["dim"], bits=s["bits"], group_size=s.get("group_size"), padding_idx=s.get("padding_idx"))

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}{g}"


# --------------------------------------------------------------------------- fake quant for QAT (never saved)

def _fake_quant_weight(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """The weight exactly as the converted module will store it, with a straight-through gradient."""
    with torch.no_grad():
        if bits == 8:
            q, scale = quantize_rows_int8(w)
            wq = q.float() * scale[:, None]
        else:
            q, s, _ = _int4_values(w, group_size)
            wq = q * s
    return w + (wq.to(w.dtype) - w).detach()  # bf16 training keeps its dtype; the rounding is done in fp32


class FakeQuantLinear(nn.Linear):
    """QAT stand-in for an encoder ``nn.Linear`` (subclassed like torchao's FakeQuantizedLinear so that the
    optimizer, pruning masks and checkpoints see the same ``weight``/``bias``): symmetric per-channel int8
    weights and a per-tensor uint8 input whose range is a moving average of the batch min/max, both rounded
    in the forward pass with straight-through gradients. ``quantize`` converts it to a static ``QLinear``
    with the same numbers; it has no ``structure()`` and must be converted before saving."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, momentum: float = 0.01):
        super().__init__(in_features, out_features, bias=bias)
        self.momentum = momentum
        self.register_buffer("act_range", torch.zeros(2))  # moving-average (min, max) of the input
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))

    @classmethod
    def from_linear(cls, linear: nn.Linear, momentum: float = 0.01) -> "FakeQuantLinear":
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, momentum=momentum)
        m.weight, m.bias = linear.weight, linear.bias  # the same Parameters: nothing to copy, nothing to re-register
        return m

    def observe(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            cur = torch.stack([x.min(), x.max()]).float()
            if bool(self.observed):
                self.act_range.lerp_(cur, self.momentum)
            else:
                self.act_range.copy_(cur)
                self.observed.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.observe(x)
        if bool(self.observed):
            scale, zp = activation_qparams(*self.act_range.tolist())
            # straight-through inside the range, zero gradient outside; fp32 like the int8 kernel's input
            x = torch.fake_quantize_per_tensor_affine(x.float(), scale, zp, 0, 255).to(x.dtype)
        return F.linear(x, _fake_quant_weight(self.weight, 8, None), self.bias)


class FakeQuantEmbedding(nn.Embedding):
    """QAT stand-in for the word embeddings: rows rounded to int8 (or int4 groups) with straight-through grads."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, bits: int = 8,
                 group_size: int | None = None):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.bits, self.group_size = bits, group_size

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int = 8, group_size: int | None = None) -> "FakeQuantEmbedding":
        m = cls(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx, bits=bits, group_size=group_size)
        m.weight = emb.weight
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # the whole table is rounded each step: cheap next to the encoder for a 30k x 384 table
        return F.embedding(ids, _fake_quant_weight(self.weight, self.bits, self.group_size), self.padding_idx)


BUILDERS: dict[str, type] = {"lowrank": LowRankLinear, "qlinear": QLinear, "qembedding": QEmbedding}


def compressed_modules(model: nn.Module):
    """(name, module) for every module that describes its own structure, outermost first."""
    for name, mod in model.named_modules():
        if hasattr(mod, "structure") and hasattr(type(mod), "from_structure"):
            yield name, mod


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
