"""MACs and BitOps of a MobileNetV2 under a precision plan, per layer and in total: pure
functions of (model, input size, plan). The command line that prints them is
mobilenet_compression/bitops.py.

Definitions (docs/metrics.md):
  MACs          per image at the given input size, measured by torch.utils.flop_counter
                (MACs = FLOPs / 2), so a depthwise conv counts with its groups and every
                stride, padding and the stem's downsampling are whatever the model really does.
  bitops        sum of MACs x b_w x b_a; layers kept in FP32 count at 32 x 32
                (the convention of HAWQ-V3, AIMET and Bayesian Bits).
  bitops_fp32   the same model all in FP32: MACs x 32 x 32.
  weight_bitops sum of MACs x b_w, FP32 layers at 32 (the seeds' definition).

A precision plan is a dict: layer name -> (weight_bits, activation_bits). A Conv2d or Linear
that is not in the plan stays FP32. Bit widths are 2..8 (integer quantization) or 16 / 32
(floating point, counted at their width; 32 is the same as leaving the layer out).

No data, no W&B, no GPU: one batch-1 forward of a copy of the model on the meta device
measures every layer, so it costs the same for a 224x224 ImageNet network as for the CIFAR
one.
"""

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import UserError
from .precision import FP32, check_bits, quantized_layer_names, uniform_plan, weight_layers

TOTAL_KEYS = ("macs", "bitops", "bitops_fp32", "weight_bitops")


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def layer_type(module):
    if isinstance(module, nn.Linear):
        return "linear"
    if module.groups == 1:
        return "pointwise" if module.kernel_size == (1, 1) else "standard"
    if module.groups == module.in_channels:
        return "depthwise"
    return "grouped"  # never in MobileNetV2; named so a grouped conv is not mislabeled


def layer_stats(model, input_size):
    """One dict per Conv2d and Linear, in forward order: name, type, in_channels,
    out_channels, kernel, stride, groups, input_hw, output_hw, macs. kernel, stride and the
    sizes are (h, w) tuples, None for a Linear. MACs are per image of size input_size
    (an int or (h, w)), the model's input channels taken from its first conv."""
    h, w = _pair(input_size)
    layers = weight_layers(model)
    if not layers:
        raise ValueError("the model has no Conv2d or Linear layer")
    in_channels = next(m.in_channels for _, m in layers if isinstance(m, nn.Conv2d))

    # A meta copy runs the real forward (so the shapes are the model's own) without memory or
    # compute, and leaves the caller's model, its device and its train/eval mode untouched.
    meta = copy.deepcopy(model).to("meta").eval()
    shapes = {}

    def hook(name):
        def record(module, inputs, output):
            shapes[name] = (tuple(inputs[0].shape), tuple(output.shape))
        return record

    meta_layers = dict(weight_layers(meta))
    handles = [meta_layers[n].register_forward_hook(hook(n)) for n, _ in layers]
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            meta(torch.zeros(1, in_channels, h, w, device="meta"))
    finally:
        for hd in handles:
            hd.remove()

    # FlopCounterMode keys modules by "<RootClass>.<name>" and counts the ops each one ran.
    root = type(meta).__name__
    flops = counter.get_flop_counts()
    modules = dict(layers)
    rows = []
    for name, (in_shape, out_shape) in shapes.items():  # forward order; unused layers cost 0
        m = modules[name]
        if f"{root}.{name}" not in flops:  # a silent 0 would understate BitOps
            raise RuntimeError(f"torch's flop counter did not report layer {name}")
        f = sum(flops[f"{root}.{name}"].values())
        is_conv = isinstance(m, nn.Conv2d)
        rows.append({
            "name": name,
            "type": layer_type(m),
            "in_channels": m.in_channels if is_conv else m.in_features,
            "out_channels": m.out_channels if is_conv else m.out_features,
            "kernel": tuple(m.kernel_size) if is_conv else None,
            "stride": tuple(m.stride) if is_conv else None,
            "groups": m.groups if is_conv else 1,
            "input_hw": in_shape[-2:] if is_conv else None,
            "output_hw": out_shape[-2:] if is_conv else None,
            "macs": f // 2,
        })
    return rows


def block_of(name):
    """The stage a layer belongs to: 'features.N' for MobileNetV2's features, else the
    top-level child ('classifier')."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "features" else parts[0]


def adaptive_plan(model, input_size, activation_bits=None, tiers=(2, 4, 8), quantize_all=False):
    """Seed 000's adaptive precision: the blocks that cost the most MACs get the fewest bits.

    The quantized layers are grouped by block (features.N: the 17 inverted-residual blocks and
    the last 1x1 conv; features.0 and the classifier too with quantize_all) and the blocks are
    ranked by their MACs at input_size: the costliest third gets tiers[0] weight bits, the next
    third tiers[1], the cheapest third tiers[2]; ties keep the network's order. Activations:
    activation_bits=None gives each layer the same bits as its weights; an int fixes them for
    every layer (the CLI passes --activation_bits, so one activation precision is compared
    across weight plans)."""
    for b in tiers:
        check_bits(b, "adaptive tier bits")
    if activation_bits is not None:
        check_bits(activation_bits, "--activation_bits")
    names = set(quantized_layer_names(model, quantize_all))
    block_macs = {}
    for r in layer_stats(model, input_size):
        if r["name"] in names:
            block = block_of(r["name"])
            block_macs[block] = block_macs.get(block, 0) + r["macs"]
    ranked = sorted(block_macs, key=lambda b: -block_macs[b])  # sorted() is stable
    block_bits = {b: tiers[i * len(tiers) // len(ranked)] for i, b in enumerate(ranked)}
    plan = {}
    for n in quantized_layer_names(model, quantize_all):
        wb = block_bits.get(block_of(n), tiers[-1])  # a layer the forward never ran
        plan[n] = (wb, wb if activation_bits is None else activation_bits)
    return plan


def bitops_report(model, input_size, plan):
    """(rows, totals): rows are layer_stats plus weight_bits, activation_bits, bitops and
    weight_bitops; totals has exactly macs, bitops, bitops_fp32, weight_bitops. Layers not in
    plan are FP32 (32 x 32). A plan naming anything but a Conv2d/Linear of the model is an
    error, since a typo would otherwise silently leave a layer in FP32."""
    known = {n for n, _ in weight_layers(model)}
    unknown = sorted(set(plan) - known)
    if unknown:
        raise UserError(f"the plan names layers the model does not have: {', '.join(unknown)}.")
    return plan_bitops(layer_stats(model, input_size), plan)


def plan_bitops(stats, plan):
    """bitops_report over rows that layer_stats already measured (left as they are): pricing
    many plans of one model (the planner's budgets and uniform rivals) then costs one forward
    instead of one per plan."""
    for name, (wb, ab) in plan.items():
        check_bits(wb, f"the weight bits of {name}")
        check_bits(ab, f"the activation bits of {name}")
    rows, totals = [], dict.fromkeys(TOTAL_KEYS, 0)
    for r in stats:
        wb, ab = plan.get(r["name"], (FP32, FP32))
        rows.append({**r, "weight_bits": wb, "activation_bits": ab,
                     "bitops": r["macs"] * wb * ab, "weight_bitops": r["macs"] * wb})
        totals["macs"] += r["macs"]
        totals["bitops"] += r["macs"] * wb * ab
        totals["bitops_fp32"] += r["macs"] * FP32 * FP32
        totals["weight_bitops"] += r["macs"] * wb
    return rows, totals


def compare_plans(model, input_size, activation_bits=8, quantize_all=False):
    """The fixed-against-adaptive comparison: totals of fixed 2-, 4-, 8-bit weights and the adaptive plan, all
    at the same activation bits, plus the FP32 model as the reference. {label: totals}."""
    plans = {f"fixed W{b}A{activation_bits}": uniform_plan(model, b, activation_bits, quantize_all)
             for b in (2, 4, 8)}
    plans[f"adaptive W2/4/8 A{activation_bits}"] = adaptive_plan(
        model, input_size, activation_bits, quantize_all=quantize_all)
    plans["FP32"] = {}
    return {label: bitops_report(model, input_size, p)[1] for label, p in plans.items()}


# ----------------------------------------------------------------------------- presentation
