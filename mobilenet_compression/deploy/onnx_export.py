"""The quantized model as an ONNX file in QDQ form, and its inference in ONNX Runtime.

`export_onnx(model, path, input_shape)` writes the graph node by node from the module tree
(MobileNetV2 as torchvision builds it: `features`, global average pooling, `classifier`), so
every scale in the file is one this package computed; nothing is re-calibrated by the engine:

- BatchNorm is folded into the conv before it. With per-output-channel weight scales this is
  exact on the integer grid: W * g/sigma = codes * (scale * g/sigma), so the codes stay and
  only the scale changes (a channel whose g/sigma is negative stores -codes and |scale|).
  A per-tensor weight scale becomes a per-channel one the same way.
- A quantized layer reads `DequantizeLinear(QuantizeLinear(x))` with the layer's activation
  scale and `DequantizeLinear(int8 codes, per-channel scales, axis 0)` weights; its bias is
  int32 at scale input_scale x weight_scale: the form ONNX Runtime fuses into QLinearConv.
  The b-bit weight codes are stored as they are (a 4-bit weight is -7..7) at their own
  scale. The PyTorch model's bias is already on the int32 grid (input scale x weight scale,
  `quantization.round_bias_to_int32_grid`, part of `convert`), so the engine's integer bias
  is the model's own, not a rounding of it.
  Activation codes are uint8 throughout (one type in and out is what the engine fuses):
  unsigned codes with zero point 0, signed b-bit codes shifted by 2^(b-1) (zero point
  2^(b-1)), the same grid; a b-bit code is stored in 0..2^b-1.
- The same integers on every CPU: ONNX Runtime's u8 x s8 kernels on x86 without VNNI add
  pairs of products in int16 and saturate past 32,767 (`precision.weight_range`). Every
  integer layer's stored inputs (<= 2^b - 1) and weight codes keep each pair sum within
  int16: 8-bit weights on 8-bit inputs are on [-64, 64] in the PyTorch model too, every
  other combination fits as it is. `check_int16_pairs` proves it from the file's own
  constants for every integer conv and Gemm before a file is written.
- Below 8 activation bits the engine has no narrower integer type for convolutions, so the
  codes travel in uint8: `QuantizeLinear` then a uint8 `Clip` to the b-bit codes, so the
  engine computes exactly the b-bit grid and still fuses each conv into `QLinearConv` (its
  output goes straight into the next `QuantizeLinear`). A ReLU6 right before an unsigned
  quantizer whose grid ends at or under 6 is left out: the codes saturate at 0 and qmax
  anyway, and a float Clip there would stop the fusion. Below 8 bits the model runs on the
  int8 kernels: as fast as 8 bits, not faster (README).
- An integer engine needs every tensor between integer kernels on a grid, and the quantized
  layers round only their inputs. Where the layer inputs are 8-bit, the converted model
  carries the missing grids (quant/output_grids.py, from the calibration images): each
  residual add reads its block input on that input's 8-bit grid and its projection conv's
  output on a new 8-bit grid (QLinearAdd), and the last conv's output gets one before the
  pooling. The PyTorch model rounds at the same places, so the file computes what it does.
- Layers the plan leaves FP32 (the stem conv, the classifier, bits 16/32) are plain float
  Conv / Gemm nodes.
- The pooling: ONNX Runtime runs its integer convs in NHWC layout and puts a Transpose back
  to NCHW before a GlobalAveragePool. Where the last conv is an integer kernel (its output
  on an 8-bit grid), the export pools with a Transpose to NHWC and a ReduceMean over H, W
  instead: the engine cancels the two transposes and takes the same mean in place (README:
  what the profiler shows). The FP32 model, whose convs the engine runs in its own blocked
  layout, keeps GlobalAveragePool.

The same builder given the FP32 model writes the FP32 reference (BatchNorm folded too), which
`onnx_speedup` divides by. ONNX QuantizeLinear divides by the scale where torch multiplies
by its reciprocal, so a value exactly on a rounding boundary may land one code apart: the
ONNX model agrees with the PyTorch one on nearly every image, not bit for bit
(`onnx_agreement`).
"""

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..files import atomic_write
from ..quant.convert import batchnorm_factors
from ..quant.output_grids import GridResidual, OutputGrid
from ..quant.precision import INT16_MAX
from ..quant.prepare import QUANT_LAYERS, quant_layers

OPSET = 17
INPUT, OUTPUT = "input", "logits"


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        raise UserError("the onnx package is not installed; pip install -r requirements.txt "
                        "(or use --engine torch).") from None
    return onnx, helper, numpy_helper


def onnx_exportable(qmodel):
    """True when every quantized layer has weights and activations of at most 8 bits (what
    the issue's contract asks to export; a layer at 16/32 bits keeps the run torch-only)."""
    layers = quant_layers(qmodel)
    return bool(layers) and all(m.weight_quant.enabled and m.input_quant.enabled
                                for _, m in layers)


class _Graph:
    def __init__(self):
        self.onnx, self.helper, self.numpy_helper = _onnx()
        self.nodes, self.inits, self.names = [], [], {}
        self.q_outputs = []  # (name of a QuantizeLinear output, qmin, qmax)
        self.dq_of = {}  # float tensor -> DequantizeLinear output of its 8-bit grid
        self.requantized = set()  # outputs of requantize(): what an integer kernel wrote
        self.relu6_input = {}  # a ReLU6's (or clamp's) output -> (its input, its max)

    def name(self, stem):
        n = self.names.get(stem, 0)
        self.names[stem] = n + 1
        return f"{stem}_{n}" if n else stem

    def const(self, stem, array):
        name = self.name(stem)
        self.inits.append(self.numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def prune(self):
        """Drop nodes whose outputs nothing reads (a ReLU6 a quantizer made redundant), and
        the initializers nothing reads then."""
        while True:
            read = {i for n in self.nodes for i in n.input} | {OUTPUT}
            kept = [n for n in self.nodes if any(o in read for o in n.output)]
            if len(kept) == len(self.nodes):
                self.inits = [t for t in self.inits if t.name in read]  # their constants too
                return
            self.nodes = kept

    def shared(self, name, value):
        """One float32 scalar initializer used by many nodes (ReLU6's bounds)."""
        if name not in self.names:
            self.const(name, np.float32(value))
        return name

    def node(self, op, inputs, stem, **attrs):
        out = self.name(stem)
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out + "_" + op,
                                                **attrs))
        return out

    # -------------------------------------------------------------------- layers

    def quantize_input(self, x, quant, stem):
        """x -> QuantizeLinear -> [Clip to the b-bit codes] -> DequantizeLinear.

        A ReLU6 (or quant/equalize.py's clamp to [0, max]) right before an unsigned quantizer whose
        grid ends at or under 6 (the max) is skipped:
        the codes saturate at 0 and at qmax anyway, so the conv before it stays fusable."""
        s = float(quant.scale)
        qmin, qmax = quant.qmin, quant.qmax
        zp = -qmin  # uint8 codes = our codes + zp: 0..2^b-1 (128 for signed 8-bit codes)
        lo, hi = qmin + zp, qmax + zp
        source = x
        if x in self.relu6_input and not quant.signed:
            x_in, top = self.relu6_input[x]
            if qmax * s <= top * (1 + 1e-6):  # an ulp over still puts the max on code qmax
                x = x_in
        scale = self.const(stem + ".act_scale", np.float32(s))
        zero = self.const(stem + ".act_zero", np.uint8(zp))
        q = self.node("QuantizeLinear", [x, scale, zero], stem + ".act_q")
        if (lo, hi) != (0, 255):
            q = self.node("Clip", [q, self.const(stem + ".code_lo", np.uint8(lo)),
                                   self.const(stem + ".code_hi", np.uint8(hi))],
                          stem + ".act_clip")
        self.q_outputs.append((q, lo, hi))
        dq = self.node("DequantizeLinear", [q, scale, zero], stem + ".act_dq")
        if (lo, hi) == (0, 255):
            self.dq_of[source] = dq  # an 8-bit grid a residual add may read too
        return dq, s

    def conv_or_linear(self, x, layer, bn, stem):
        """One Conv2d / Linear (quantized or FP32), with the BatchNorm after it folded."""
        quantized = isinstance(layer, QUANT_LAYERS)
        weight = layer.weight.detach().double()
        out_ch = weight.shape[0]
        factor, bias = batchnorm_factors(layer.bias, bn, out_ch)
        in_scale = None
        if quantized and layer.input_quant.enabled:
            x, in_scale = self.quantize_input(x, layer.input_quant, stem)
        if quantized and layer.weight_quant.enabled:
            wq = layer.weight_quant
            codes = wq.integers(layer.weight).to(torch.int64)
            scale = wq.scale.detach().double().reshape(-1).expand(out_ch) * factor
            sign = torch.where(scale < 0, -1, 1)
            codes = codes * sign.reshape([-1] + [1] * (codes.dim() - 1))
            scale = scale.abs().clamp_min(1e-30)
            w_scale = self.const(stem + ".w_scale", scale.float().numpy())
            w = self.node("DequantizeLinear", [
                self.const(stem + ".w_codes", codes.to(torch.int8).numpy()), w_scale,
                self.const(stem + ".w_zero", np.zeros(out_ch, np.int8))],
                stem + ".w_dq", axis=0)
            if in_scale is None:  # a float input: no integer kernel, a float bias
                b = self.const(stem + ".bias", bias.float().numpy())
            else:  # int32 at input scale x weight scale: what QLinearConv takes
                b_scale = (scale * in_scale).float()
                b_int = torch.round(bias / b_scale.double()).clamp(-2**31, 2**31 - 1)
                b = self.node("DequantizeLinear", [
                    self.const(stem + ".b_int32", b_int.to(torch.int32).numpy()),
                    self.const(stem + ".b_scale", b_scale.numpy()),
                    self.const(stem + ".b_zero", np.zeros(out_ch, np.int32))],
                    stem + ".b_dq", axis=0)
        else:
            shape = [-1] + [1] * (weight.dim() - 1)
            w = self.const(stem + ".weight", (weight * factor.reshape(shape)).float().numpy())
            b = self.const(stem + ".bias", bias.float().numpy())
        inputs = [x, w, b]
        if isinstance(layer, nn.Conv2d):
            if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                raise ValueError(f"{stem}: only explicit zero padding is exported")
            ph, pw = layer.padding
            y = self.node("Conv", inputs, stem, kernel_shape=list(layer.kernel_size),
                          strides=list(layer.stride), pads=[ph, pw, ph, pw],
                          dilations=list(layer.dilation), group=layer.groups)
        else:
            y = self.node("Gemm", inputs, stem, transB=1)
        return y

    def residual_add(self, x, y, block, stem):
        """x + y. In a GridResidual (quant/output_grids.py) y already ends on its 8-bit grid
        and x is read on the grid its first conv reads it on, so ONNX Runtime runs the
        projection conv and the add as integer kernels (QLinearConv, QLinearAdd), computing
        what the PyTorch model does; otherwise the add is float, as in the model."""
        if not isinstance(block, GridResidual):
            return self.node("Add", [x, y], stem + ".add")
        if x not in self.dq_of or y not in self.requantized:
            raise ValueError(f"{stem}: its residual add has no 8-bit grid for a summand")
        return self.node("Add", [self.dq_of[x], y], stem + ".add")

    def requantize(self, x, grid, stem):
        """x through an OutputGrid (quant/output_grids.py): uint8 codes, zero point 128 for a
        signed grid."""
        s = self.const(stem + ".scale", np.float32(grid.scale))
        zero = self.const(stem + ".zero", np.uint8(128 if grid.signed else 0))
        q = self.node("QuantizeLinear", [x, s, zero], stem + ".q")
        dq = self.node("DequantizeLinear", [q, s, zero], stem + ".dq")
        self.requantized.add(dq)
        return dq

    def sequence(self, x, modules, prefix):
        """Emit a Sequential's leaves in order, pairing each conv with a BatchNorm after it."""
        from torchvision.models.mobilenetv2 import InvertedResidual
        from torchvision.ops.misc import Conv2dNormActivation

        items = list(modules.named_children())
        i = 0
        while i < len(items):
            name, m = items[i]
            stem = f"{prefix}.{name}" if prefix else name
            nxt = items[i + 1][1] if i + 1 < len(items) else None
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                bn = nxt if isinstance(nxt, nn.BatchNorm2d) else None
                x = self.conv_or_linear(x, m, bn, stem)
                i += 2 if bn is not None else 1
                continue
            if isinstance(m, InvertedResidual):
                y = self.sequence(x, m.conv, stem + ".conv")
                x = self.residual_add(x, y, m, stem) if m.use_res_connect else y
            elif isinstance(m, (nn.Sequential, Conv2dNormActivation)):
                x = self.sequence(x, m, stem)
            elif isinstance(m, OutputGrid):
                x = self.requantize(x, m, stem)
            elif isinstance(m, nn.Hardtanh) and m.min_val == 0.0:
                # ReLU6, or the clamp to [0, max] quant/equalize.py puts before a depthwise conv
                top = float(m.max_val)
                high = (self.shared("six", 6.0) if top == 6.0
                        else self.const(stem + ".max", np.float32(top)))
                x_in, x = x, self.node("Clip", [x, self.shared("zero", 0.0), high], stem)
                self.relu6_input[x] = (x_in, top)
            elif isinstance(m, nn.ReLU):
                x = self.node("Relu", [x], stem)
            elif isinstance(m, (nn.Dropout, nn.Identity)):
                pass
            else:
                raise ValueError(f"cannot export {stem} ({type(m).__name__}) to ONNX")
            i += 1
        return x


def build_onnx(model, input_shape):
    """The ONNX ModelProto of `model` (FP32 or quantized MobileNetV2) for NCHW inputs of
    `input_shape` (C, H, W), batch dimension dynamic.
    Returns (model proto, the names of its QuantizeLinear outputs with their code ranges)."""
    from torchvision.models import MobileNetV2

    if not isinstance(model, MobileNetV2):
        raise ValueError("export_onnx exports torchvision's MobileNetV2 (this package's model)")
    g = _Graph()
    h = g.helper
    x = g.sequence(INPUT, model.features, "features")
    if x in g.requantized:  # the last conv is an integer kernel, NHWC in the engine
        x = g.node("Transpose", [x], "pool.nhwc", perm=[0, 2, 3, 1])
        x = g.node("ReduceMean", [x], "pool", axes=[1, 2], keepdims=0)
    else:
        x = g.node("GlobalAveragePool", [x], "pool")
        x = g.node("Flatten", [x], "flatten", axis=1)
    x = g.sequence(x, model.classifier, "classifier")
    g.nodes.append(h.make_node("Identity", [x], [OUTPUT], name="output"))
    g.prune()
    graph = h.make_graph(
        g.nodes, "mobilenetv2",
        [h.make_tensor_value_info(INPUT, g.onnx.TensorProto.FLOAT, ["batch", *input_shape])],
        [h.make_tensor_value_info(OUTPUT, g.onnx.TensorProto.FLOAT, ["batch", None])],
        g.inits)
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)],
                         producer_name="mobilenet-compression")
    proto.ir_version = 8  # ONNX Runtime 1.32 reads up to 11; 8 is what opset 17 needs
    g.onnx.checker.check_model(proto, full_check=True)
    check_int16_pairs(proto)
    return proto, g.q_outputs


def int16_pair_bounds(proto):
    """{integer conv or Gemm node: the largest |a1 w1 + a2 w2| a u8 x s8 kernel can form from
    its stored inputs and weight codes}, read from the file's own constants: a node whose
    input is DequantizeLinear(uint8 codes) and whose weight is DequantizeLinear(int8
    initializer). The stored inputs' largest value is the upper bound of the uint8 Clip that
    produced them, else 255 (a QuantizeLinear to uint8). A static bound on the codes: it
    holds for any input image."""
    _, _, numpy_helper = _onnx()
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    bounds = {}
    for n in proto.graph.node:
        if n.op_type not in ("Conv", "Gemm"):
            continue
        x_dq, w_dq = producer.get(n.input[0]), producer.get(n.input[1])
        if not (x_dq is not None and w_dq is not None
                and x_dq.op_type == w_dq.op_type == "DequantizeLinear"
                and w_dq.input[0] in inits):
            continue  # a float layer: no integer kernel
        codes = inits[w_dq.input[0]]
        source = producer.get(x_dq.input[0])
        if source is not None and source.op_type == "Clip":
            top = int(inits[source.input[2]])
        elif source is not None and source.op_type == "QuantizeLinear":
            top = int(np.iinfo(inits[source.input[2]].dtype).max)
        else:
            raise ValueError(f"{n.name}: its integer input comes from an unexpected node")
        bounds[n.name] = 2 * top * int(np.abs(codes.astype(np.int64)).max())
    return bounds


def check_int16_pairs(proto):
    """Raise ValueError unless every integer layer's pair sums fit int16
    (`int16_pair_bounds`): then each of ONNX Runtime's int8 kernels (x86 with AVX2,
    AVX-512, VNNI or AMX, ARM) computes the same integers, the PyTorch model's."""
    over = {k: v for k, v in int16_pair_bounds(proto).items() if v > INT16_MAX}
    if over:
        raise ValueError(f"integer layers whose u8 x s8 pair sums can pass {INT16_MAX} "
                         f"(the result would depend on the CPU): {over}")


def export_onnx(model, path, input_shape, metadata=None):
    """Write `model` as ONNX (QDQ where quantized) to `path` atomically, with `metadata` (the
    run and its model's source, as the safetensors file has them) in the model's
    metadata_props; returns the proto."""
    proto, _ = build_onnx(model, input_shape)
    if metadata:
        import onnx

        onnx.helper.set_model_props(proto, {k: str(v) for k, v in sorted(metadata.items())})
    data = proto.SerializeToString()
    atomic_write(path, lambda f: f.write(data))
    return proto


# ---------------------------------------------------------------------------- ONNX Runtime


