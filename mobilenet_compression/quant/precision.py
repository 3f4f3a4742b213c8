"""Precision rules and plans: which layers are quantized, which bit widths are allowed, and
the per-layer plan a quantized model is built from. One home for these rules, used by
quantization (which layers to swap), BitOps (what each layer costs) and export (how each
layer is packed).

A precision plan is a dict: layer name -> (weight_bits, activation_bits). Bit widths are
integers 2..8 (integer quantization) or 16 / 32 (floating point: the tensor stays FP32,
BitOps count it at its width). A quantized model carries its own plan
(`quantization.precision_plan(qmodel)`); a run's BitOps are counted from that, never from
its flags again.
"""

import numbers

from ..errors import UserError

QUANT_BITS = (2, 3, 4, 5, 6, 7, 8)
FP32_BITS = (16, 32)
FP32 = 32


def check_bits(bits, flag="--weight_bits"):
    """Return `bits` as an int (4.0 is 4), or raise the UserError a user of `flag` reads."""
    ok = (
        not isinstance(bits, bool)
        and isinstance(bits, numbers.Real)
        and float(bits).is_integer()
        and int(bits) in QUANT_BITS + FP32_BITS
    )
    if not ok:
        raise UserError(f"{flag} must be an integer in 2..8, or 16/32 for FP32, got {bits}.")
    return int(bits)


def is_fp32(bits):
    return bits in FP32_BITS


def signed_range(bits, narrow=False):
    """(qmin, qmax) of b-bit two's-complement integers; narrow drops -2^(b-1)."""
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if narrow else -qmax - 1), qmax


def unsigned_range(bits):
    return 0, 2**bits - 1


# What every int8 kernel of ONNX Runtime computes exactly, on any CPU. Its integer convs read
# activations as uint8 and weights as int8. Without VNNI (x86 with AVX2 or AVX-512BW only) the
# u8 x s8 kernels multiply and add pairs of neighbouring products in 16 bits (vpmaddubsw),
# which saturates past 32,767; VNNI, AMX and ARM's dot products add in 32 bits. A layer whose
# stored activations and weight codes keep every pair sum within int16 gets the same integer
# result on all of them.
INT16_MAX = 32767


def stored_activation_max(activation_bits):
    """The largest uint8 value a b-bit activation code is stored as: unsigned codes 0..2^b-1
    with zero point 0, signed codes -2^(b-1)..2^(b-1)-1 shifted by 2^(b-1) (onnx_export)."""
    return 2**activation_bits - 1


def pair_sum_bound(activation_bits, weight_qmax):
    """The largest |a1 w1 + a2 w2| a u8 x s8 kernel can form from a layer's stored inputs
    and weight codes (|w| <= weight_qmax)."""
    return 2 * stored_activation_max(activation_bits) * weight_qmax


def weight_range(weight_bits, activation_bits):
    """(qmin, qmax) of a quantized layer's weight codes: the narrow signed range of
    weight_bits, cut to the widest symmetric range whose pair sums fit int16 where the
    layer's inputs are integers too (`pair_sum_bound`). Only 8-bit weights on 8-bit inputs
    are cut: 2 x 255 x 127 overflows, so they get [-64, 64] (129 levels, still stored in 8
    bits; ONNX Runtime's `reduce_range` makes the same cut). Every other pair fits: 2-7 bit
    weights (|w| <= 63) on any input, 8-bit weights on inputs of up to 7 bits (<= 127)."""
    qmin, qmax = signed_range(weight_bits, narrow=True)
    if activation_bits in QUANT_BITS:
        limit = INT16_MAX // (2 * stored_activation_max(activation_bits))
        qmax = min(qmax, limit)
        qmin = -qmax
    return qmin, qmax


# The bit-width rules above are plain values, checked without torch (config.py); the layer
# rules below take a model, so torch is loaded by then and imported where they need it.


def weight_layers(model):
    """(name, module) of every Conv2d and Linear, in module order."""
    from torch import nn

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def fp32_layer_names(model):
    """The stem conv and the classifier: they stay FP32 (DESIGN.md, Definitions)."""
    from ..model import classifier_name, first_conv_name

    return {first_conv_name(model), classifier_name(model)}


def quantized_layer_names(model, quantize_all=False):
    """Every Conv2d and Linear except the stem conv and the classifier (unless quantize_all:
    the usual ImageNet BitOps setting quantizes them too)."""
    keep = set() if quantize_all else fp32_layer_names(model)
    return [n for n, _ in weight_layers(model) if n not in keep]


def uniform_plan(model, weight_bits, activation_bits, quantize_all=False):
    """The same bits on every quantized layer."""
    wb = check_bits(weight_bits, "--weight_bits")
    ab = check_bits(activation_bits, "--activation_bits")
    return {n: (wb, ab) for n in quantized_layer_names(model, quantize_all)}


def check_plan(model, plan, quantize_all=False):
    """Validate a plan against a model and return it with int bits. Naming a layer that is
    not a quantizable Conv2d/Linear is an error (a typo would silently leave it FP32);
    the stem and classifier may appear only at FP32 bits unless quantize_all."""
    names = set(quantized_layer_names(model, quantize_all))
    fixed = set() if quantize_all else fp32_layer_names(model)
    out = {}
    for name, (wb, ab) in plan.items():
        wb = check_bits(wb, f"the weight bits of {name}")
        ab = check_bits(ab, f"the activation bits of {name}")
        if name in fixed:
            if not (is_fp32(wb) and is_fp32(ab)):
                raise UserError(f"layer {name} (stem conv or classifier) stays FP32; its plan "
                                f"entry must be 16 or 32 bits, got W{wb}A{ab}.")
            continue
        if name not in names:
            raise UserError(f"the precision plan names {name!r}, which is not a quantizable "
                            f"Conv2d/Linear of this model.")
        out[name] = (wb, ab)
    return out


def mean_bits(plan, macs):
    """The plan's MAC-weighted mean (weight_bits, activation_bits) over its layers; `macs`:
    layer name -> MACs. A uniform plan gives its own bits back (as floats)."""
    total = sum(macs[n] for n in plan)
    if not total:
        return tuple(float(b) for b in next(iter(plan.values()), (FP32, FP32)))
    return tuple(sum(macs[n] * plan[n][i] for n in plan) / total for i in (0, 1))
