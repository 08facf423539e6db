"""Put slimray's stored low-bit weights into an exported fp32 ONNX graph, scales and all.

The model is exported with every ``QLinear`` standing in as a plain Linear whose weight is the dequantized
matrix, so each becomes a ``MatMul(x, Wᵀ)`` with ``Wᵀ`` as an initializer. ``carry(graph, layers)`` finds that
MatMul by the initializer's exact values (names are the exporter's to choose; the numbers are not) and
swaps it for the ONNX form of the stored weights:

    ===============================  ==========================================================================
    stored as                        ONNX
    ===============================  ==========================================================================
    int8 rows, dynamic activations   the input quantized onto [0, 127] from its own range, as fbgemm does
                                     (ReduceMin/Max → QuantizeLinear), then MatMulInteger → Cast →
                                     Mul(x scale · row scales)
    int8 rows, static activations    QuantizeLinear/DequantizeLinear of the input with the stored scale and
    (static PTQ, QAT)                zero point, DequantizeLinear of the int8 weight per column, MatMul (QDQ)
    int8 rows, fp32 activations      DequantizeLinear of the int8 weight, fp32 MatMul
    int4 groups                      com.microsoft MatMulNBits: the packed nibbles and scales as stored
                                     (accuracy_level 4, int8 activations, when the layer ran int8 activations)
    ===============================  ==========================================================================

Only numpy and onnx here: no torch, so the rewriting is tested on its own.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from common.errors import SlimrayError

__all__ = ["LowBitLinear", "carry", "pin_heads", "MS_DOMAIN"]

MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True, eq=False)
class LowBitLinear:
    """One stored low-bit Linear: ``weight`` is its dequantized fp32 matrix [out, in], exactly as exported.

    bits 8: ``qweight`` int8 [out, in] and ``scale`` fp32 [out]. bits 4: ``packed`` uint8 [out, ceil(in/2)]
    (low nibble first, value + 8) and ``scales`` fp16 [out, ceil(in/group_size)]. ``act``: dynamic | static |
    none; static carries ``input_scale``/``input_zero_point``."""

    name: str
    weight: np.ndarray
    bits: int
    act: str
    qweight: np.ndarray | None = None
    scale: np.ndarray | None = None
    packed: np.ndarray | None = None
    scales: np.ndarray | None = None
    group_size: int | None = None
    input_scale: float | None = None
    input_zero_point: int | None = None

    def onnx_form(self) -> str:
        if self.bits == 8:
            return {"dynamic": "MatMulInteger (dynamic int8)", "static": "QDQ (static int8)",
                    "none": "DequantizeLinear + MatMul (int8 weight-only)"}[self.act]
        return "MatMulNBits (int4" + (", int8 activations)" if self.act == "dynamic" else ")")


def _key(a: np.ndarray) -> tuple:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return a.shape, hashlib.sha256(a.tobytes()).hexdigest()


def carry(model, layers: list[LowBitLinear]) -> list[dict]:
    """Rewrite ``model`` (an onnx ModelProto, in place) so each of ``layers`` runs from its stored low-bit
    weights; returns one record per layer (its name, the ONNX form, what was carried)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}

    def source(name):
        while name in alias:
            name = alias[name]
        return name

    by_value: dict[tuple, list] = {}
    for i, node in enumerate(graph.node):
        if node.op_type == "MatMul" and source(node.input[1]) in inits:
            t = inits[source(node.input[1])]
            if len(t.dims) == 2 and t.data_type == 1:  # FLOAT
                by_value.setdefault(_key(numpy_helper.to_array(t)), []).append(i)

    replacement: dict[int, list] = {}
    new_inits, records = [], []
    for layer in layers:
        hits = [i for i in by_value.get(_key(layer.weight.T), []) if i not in replacement]
        if not hits:
            raise SlimrayError(f"ONNX export: layer {layer.name} is not a MatMul on its weight in the exported "
                               "graph; this model's structure is not supported by the exporter")
        i = hits[0]
        node = graph.node[i]
        nodes, tensors = _lowbit_nodes(layer, node.input[0], node.output[0], helper, numpy_helper)
        replacement[i] = nodes
        new_inits += tensors
        records.append({"layer": layer.name, "onnx": layer.onnx_form(), "bits": layer.bits,
                        "scales": "carried from the artifact"})

    kept = []
    for i, node in enumerate(graph.node):
        kept.extend(replacement.get(i, [node]))
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(new_inits)
    used = {name for n in graph.node for name in n.input}
    live = [t for t in graph.initializer if t.name in used or t.name in {o.name for o in graph.output}]
    del graph.initializer[:]
    graph.initializer.extend(live)
    if any(layer.bits == 4 for layer in layers) and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return records


def _lowbit_nodes(layer: LowBitLinear, x: str, out: str, helper, numpy_helper) -> tuple[list, list]:
    from onnx import TensorProto

    p = layer.name

    def init(suffix, array):
        return numpy_helper.from_array(np.ascontiguousarray(array), name=f"{p}.{suffix}")

    def node(op, inputs, outputs, **attrs):
        domain = attrs.pop("domain", "")
        # node names must be unique; outputs are (SSA), so each node is named after its first one
        return helper.make_node(op, inputs, outputs, name=f"{outputs[0]}/{op}", domain=domain or None, **attrs)

    if layer.bits == 4:
        rows, cols = layer.weight.shape
        gs = layer.group_size
        blocks = math.ceil(cols / gs)
        packed = np.full((rows, blocks * gs // 2), 0x88, dtype=np.uint8)  # 0x88: two stored zeros
        packed[:, :layer.packed.shape[1]] = layer.packed
        tensors = [init("packed", packed.reshape(rows, blocks, gs // 2)),
                   init("scales", layer.scales.astype(np.float32).reshape(-1))]  # fp16 → fp32 is exact
        # no zero_points input: MatMulNBits then takes 8, the offset slimray's nibbles are stored with
        nodes = [node("MatMulNBits", [x, tensors[0].name, tensors[1].name], [out], domain=MS_DOMAIN, K=cols,
                      N=rows, bits=4, block_size=gs, accuracy_level=4 if layer.act == "dynamic" else 0)]
        return nodes, tensors

    w = init("qweight", layer.qweight.T)  # [in, out]: MatMul's B
    s = init("scale", layer.scale.astype(np.float32))
    if layer.act == "dynamic":
        nodes, tensors = _dynamic_7bit(x, p, node, numpy_helper)
        return nodes + [node("MatMulInteger", [f"{p}.x_q", w.name, f"{p}.x_zero_point"], [f"{p}.acc"]),
                        node("Cast", [f"{p}.acc"], [f"{p}.acc_f"], to=TensorProto.FLOAT),
                        node("Mul", [f"{p}.x_scale", s.name], [f"{p}.out_scale"]),
                        node("Mul", [f"{p}.acc_f", f"{p}.out_scale"], [out])], tensors + [w, s]
    zero = init("zero_point", np.zeros(layer.scale.shape, dtype=np.int8))
    nodes = [node("DequantizeLinear", [w.name, s.name, zero.name], [f"{p}.w"], axis=1)]
    tensors = [w, s, zero]
    if layer.act == "static":
        xs = init("input_scale", np.array(layer.input_scale, dtype=np.float32))
        xz = init("input_zero_point", np.array(layer.input_zero_point, dtype=np.uint8))
        tensors += [xs, xz]
        nodes += [node("QuantizeLinear", [x, xs.name, xz.name], [f"{p}.x_q"]),
                  node("DequantizeLinear", [f"{p}.x_q", xs.name, xz.name], [f"{p}.x_dq"])]
        x = f"{p}.x_dq"
    nodes.append(node("MatMul", [x, f"{p}.w"], [out]))
    return nodes, tensors


def _dynamic_7bit(x: str, p: str, node, numpy_helper) -> tuple[list, list]:
    """The input quantized per call from its own range onto [0, 127], as PyTorch's fbgemm dynamic Linear does
    (reduce_range; see workers.modules.ACT_QMAX), instead of DynamicQuantizeLinear's [0, 255]: the trial was
    trained and measured with these numbers, and with the full range the logits move enough to flip about 1%
    of a real student's predictions. Outputs ``{p}.x_q`` (uint8), ``{p}.x_scale`` and ``{p}.x_zero_point``."""
    def const(suffix, value, dtype=np.float32):
        return numpy_helper.from_array(np.array(value, dtype=dtype), name=f"{p}.{suffix}")

    c = [const("zero", 0.0), const("qmax", 127.0), const("eps", np.finfo(np.float32).eps)]
    zero, qmax, eps = (t.name for t in c)
    nodes = [node("ReduceMin", [x], [f"{p}.x_min"], keepdims=0),
             node("ReduceMax", [x], [f"{p}.x_max"], keepdims=0),
             node("Min", [f"{p}.x_min", zero], [f"{p}.lo"]),  # zero stays exact (padding, GELU zeros)
             node("Max", [f"{p}.x_max", zero], [f"{p}.hi"]),
             node("Sub", [f"{p}.hi", f"{p}.lo"], [f"{p}.range"]),
             node("Div", [f"{p}.range", qmax], [f"{p}.raw_scale"]),
             node("Max", [f"{p}.raw_scale", eps], [f"{p}.x_scale"]),
             node("Div", [f"{p}.lo", f"{p}.x_scale"], [f"{p}.lo_q"]),
             node("Sub", [zero, f"{p}.lo_q"], [f"{p}.zp_f"]),
             node("Round", [f"{p}.zp_f"], [f"{p}.zp_r"]),
             node("Clip", [f"{p}.zp_r", zero, qmax], [f"{p}.zp_c"]),
             node("Cast", [f"{p}.zp_c"], [f"{p}.x_zero_point"], to=2),  # UINT8
             node("QuantizeLinear", [x, f"{p}.x_scale", f"{p}.x_zero_point"], [f"{p}.x_q"])]
    return nodes, c


def pin_heads(model) -> list[int]:
    """Write each attention layer's real head count into its reshapes (``model``, an onnx ModelProto, in place);
    returns the head counts found, one per reshape pinned.

    The exported attention splits Q, K and V with ``Reshape(x, [batch, seq, -1, head_size])``. ONNX Runtime's
    attention fusion reads the head count from that shape; with -1 it either gives up (no fusion) or, told a
    model-wide count, writes that count into every fused layer, which is wrong for a layer whose heads were
    pruned. The width of ``x`` (from shape inference) over ``head_size`` is the layer's own count."""
    from onnx import numpy_helper, shape_inference

    widths = {}
    for vi in shape_inference.infer_shapes(model).graph.value_info:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value"):
            widths[vi.name] = dims[-1].dim_value
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant" and len(n.attribute) == 1
                 and n.attribute[0].name == "value"}
    producer = {o: n for n in model.graph.node for o in n.output}
    pinned = []
    for node in model.graph.node:
        shape = producer.get(node.input[1]) if node.op_type == "Reshape" else None
        if shape is None or shape.op_type != "Concat" or len(shape.input) != 4:
            continue
        heads, size = (constants.get(name) for name in shape.input[2:])
        width = widths.get(node.input[0])
        if heads is None or size is None or width is None:
            continue
        h, d = (numpy_helper.to_array(c.attribute[0].t) for c in (heads, size))
        if h.size != 1 or d.size != 1 or int(h.ravel()[0]) != -1:
            continue
        head_size = int(d.ravel()[0])
        if head_size <= 0 or width % head_size:
            continue
        count = width // head_size
        # a Constant may feed several Concats: give this one its own tensor rather than edit a shared one
        name = f"{node.name or node.output[0]}/heads"
        model.graph.initializer.append(numpy_helper.from_array(np.full(h.shape, count, dtype=h.dtype), name=name))
        shape.input[2] = name
        pinned.append(count)
    return pinned
