"""MACs and BitOps of a MobileNetV2 under a precision plan, per layer and in total.

Definitions (shared/DESIGN.md, "Definitions"):
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

Everything here is a function of (model, input size, plan): no data, no W&B, no GPU. One
batch-1 forward of a copy of the model on the meta device measures every layer, so it costs
the same for a 224x224 ImageNet network as for the CIFAR one.

    python -m mobilenet_compression.bitops --arch imagenet --input_size 224 --quantize_all \
        --weight_bits 8 --activation_bits 8
"""

import argparse
import copy
import csv
import math
import os

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import sources
from .errors import ArgumentParser, UserError, cli
from .model import build_model
from .quant.precision import FP32, check_bits, quantized_layer_names, uniform_plan, weight_layers

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
    rows = layer_stats(model, input_size)
    known = {n for n, _ in weight_layers(model)}
    unknown = sorted(set(plan) - known)
    if unknown:
        raise UserError(f"the plan names layers the model does not have: {', '.join(unknown)}.")
    for name, (wb, ab) in plan.items():
        check_bits(wb, f"the weight bits of {name}")
        check_bits(ab, f"the activation bits of {name}")
    totals = dict.fromkeys(TOTAL_KEYS, 0)
    for r in rows:
        wb, ab = plan.get(r["name"], (FP32, FP32))
        r.update(weight_bits=wb, activation_bits=ab,
                 bitops=r["macs"] * wb * ab, weight_bitops=r["macs"] * wb)
        totals["macs"] += r["macs"]
        totals["bitops"] += r["bitops"]
        totals["bitops_fp32"] += r["macs"] * FP32 * FP32
        totals["weight_bitops"] += r["weight_bitops"]
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

def _hw(t):
    return "-" if t is None else f"{t[0]}x{t[1]}"


def _si(x):
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}"


def format_table(rows, totals):
    cols = [("layer", "name", "<"), ("type", "type", "<"), ("in", "in_channels", ">"),
            ("out", "out_channels", ">"), ("kernel", "kernel", ">"), ("stride", "stride", ">"),
            ("input", "input_hw", ">"), ("output", "output_hw", ">"), ("MACs", "macs", ">"),
            ("W bits", "weight_bits", ">"), ("A bits", "activation_bits", ">"),
            ("BitOps", "bitops", ">")]

    def cell(r, key):
        v = r[key]
        if key in ("kernel", "stride", "input_hw", "output_hw"):
            return _hw(v)
        return f"{v:,}" if isinstance(v, int) else str(v)

    body = [[cell(r, key) for _, key, _ in cols] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, (h, _, _) in enumerate(cols)]
    fmt = lambda cells: "  ".join(f"{c:{a}{wd}}" for c, (_, _, a), wd in zip(cells, cols, widths))
    lines = [fmt([h for h, _, _ in cols]), "  ".join("-" * wd for wd in widths)]
    lines += [fmt(line) for line in body]
    lines.append("")
    summary = [(k, f"{totals[k]:,}") for k in TOTAL_KEYS]
    summary.append(("bitops_fp32 / bitops", f"{totals['bitops_fp32'] / totals['bitops']:.2f}x"))
    label, value = max(len(k) for k, _ in summary), max(len(v) for _, v in summary)
    lines += [f"{k:<{label}}  {v:>{value}}" for k, v in summary]
    return "\n".join(lines)


def write_csv(rows, path):
    keys = ["name", "type", "in_channels", "out_channels", "kernel", "stride", "groups",
            "input_hw", "output_hw", "macs", "weight_bits", "activation_bits", "bitops",
            "weight_bitops"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _hw(r[k]) if k in ("kernel", "stride", "input_hw", "output_hw")
                             else r[k] for k in keys})


def plot_comparison(results, path, title):
    """Seed 000's bar chart of total BitOps per plan, on a log axis (FP32 is 16x W8A8 and 256x
    W2A2, so a linear axis would flatten the plans being compared), each bar labelled."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    labels = list(results)
    values = [results[k]["bitops"] for k in labels]
    fp32 = results["FP32"]["bitops"] if "FP32" in results else max(values)
    colors = ["#9ecae1", "#4292c6", "#08519c", "#e6550d", "#969696"][: len(labels)]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    bars = ax.bar(labels, values, color=colors)
    ax.set_yscale("log")
    ax.set_ylim(min(values) / 2, max(values) * 4)  # room for the labels above the bars
    for bar, v in zip(bars, values):
        ax.annotate(f"{_si(v)}BitOps\n{fp32 / v:.1f}x fewer than FP32" if v != fp32
                    else f"{_si(v)}BitOps", (bar.get_x() + bar.get_width() / 2, v),
                    xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylabel("total BitOps per image (log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", which="major", alpha=0.3)
    plt.setp(ax.get_xticklabels(), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line

def _bits(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bit widths are whole numbers (2..8, or 16/32 for float), got {text!r}") from None


def get_args_parser(add_help=True):
    p = ArgumentParser(
        prog="python -m mobilenet_compression.bitops",
        description="Per-layer MACs and BitOps (MACs x weight bits x activation bits) of "
                    "MobileNetV2 under a precision plan. Layers kept in FP32 count at 32x32.",
        add_help=add_help,
    )
    p.add_argument("--checkpoint", default=None,
                   help="a checkpoint from train.py (the model and input size come from its "
                        "metadata), a MobileNetV2 state dict file or torchvision:IMAGENET1K_V1 "
                        "(width and classes from its tensors; --arch imagenet and --input_size "
                        "224 unless given) (default: none, describe the model with the flags "
                        "below)")
    p.add_argument("--arch", default=None, choices=["cifar", "imagenet"],
                   help="MobileNetV2 variant: 'cifar' (stem stride 1) or torchvision's "
                        "'imagenet' (default: cifar)")
    p.add_argument("--input_size", type=int, default=None,
                   help="input height = width in pixels (default: 32 for cifar, 224 for imagenet)")
    p.add_argument("--width_multiplier", type=float, default=None,
                   help="MobileNetV2 width multiplier (default: 1.0)")
    p.add_argument("--num_classes", type=int, default=None,
                   help="classifier outputs (default: 10 for cifar, 1000 for imagenet)")
    p.add_argument("--in_channels", type=int, default=None,
                   help="input image channels (default: 3)")
    p.add_argument("--weight_bits", type=_bits, default=8,
                   help="weight bits of every quantized layer, 2..8, or 16/32 for float; "
                        "the adaptive plan chooses its own weight bits (default: 8)")
    p.add_argument("--activation_bits", type=_bits, default=8,
                   help="activation bits of every quantized layer, 2..8, or 16/32 for float "
                        "(default: 8)")
    p.add_argument("--quantize_all", action="store_true",
                   help="quantize the first conv and the classifier too, as most published "
                        "ImageNet BitOps tables do (default: off, they stay FP32)")
    # the same words as sweep.py's --plan; "fixed" is what this flag once called "uniform"
    p.add_argument("--plan", default="uniform", type=lambda s: {"fixed": "uniform"}.get(s, s),
                   choices=["uniform", "adaptive"],
                   help="'uniform': --weight_bits everywhere; 'adaptive': blocks ranked by "
                        "MACs get 2/4/8 weight bits, costliest third fewest (default: uniform)")
    p.add_argument("--compare", default=None, metavar="PNG",
                   help="also draw total BitOps of fixed 2/4/8-bit and adaptive weights (at "
                        "--activation_bits) and FP32 as a bar chart into this PNG (default: none)")
    p.add_argument("--csv", default=None, metavar="PATH",
                   help="also write the per-layer table to this CSV file (default: none)")
    return p


def _check_output(path, flag):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: the folder {folder} does not exist; create it first.")


def resolve_model(args):
    """(model, input_size, description) from --checkpoint or from the architecture flags."""
    if args.checkpoint is not None:
        given = [f"--{k}" for k in ("width_multiplier", "in_channels")
                 if getattr(args, k) is not None]
        if given:
            raise UserError(f"--checkpoint describes the model itself; drop {', '.join(given)}.")
        ckpt, model = sources.load_model(args.checkpoint, sources.SourceOptions(
            arch=args.arch, num_classes=args.num_classes, input_size=args.input_size))
        arch, size, width = ckpt["arch"], ckpt["input_size"], ckpt["width_multiplier"]
        classes, channels = ckpt["num_classes"], ckpt["in_channels"]
        source = f"{args.checkpoint}: "
    else:
        arch = args.arch or "cifar"
        size = args.input_size if args.input_size is not None else {"cifar": 32, "imagenet": 224}[arch]
        width = args.width_multiplier if args.width_multiplier is not None else 1.0
        classes = args.num_classes if args.num_classes is not None else {"cifar": 10, "imagenet": 1000}[arch]
        channels = args.in_channels if args.in_channels is not None else 3
        if size < 8:
            raise UserError(f"--input_size must be at least 8 pixels, got {size}.")
        if not (width > 0 and math.isfinite(width)):
            raise UserError(f"--width_multiplier must be a positive number, got {width}.")
        if classes < 1:
            raise UserError(f"--num_classes must be at least 1, got {classes}.")
        if channels < 1:
            raise UserError(f"--in_channels must be at least 1, got {channels}.")
        try:
            # MACs need shapes, not weights: a meta model costs nothing at any width.
            with torch.device("meta"):
                model = build_model(arch, classes, width, channels)
        except ValueError as e:
            raise UserError(f"cannot build that model: {e}.") from None
        source = ""
    desc = (f"{source}MobileNetV2 {arch}, width {width:g}, {classes} classes, "
            f"input {channels}x{size}x{size}")
    return model, size, desc


@cli
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    for flag in ("weight_bits", "activation_bits"):
        check_bits(getattr(args, flag), f"--{flag}")
    for path, flag in ((args.compare, "--compare"), (args.csv, "--csv")):
        if path is not None:
            _check_output(path, flag)
    model, size, desc = resolve_model(args)

    wa, ab = args.weight_bits, args.activation_bits
    if args.plan == "adaptive":
        plan = adaptive_plan(model, size, ab, quantize_all=args.quantize_all)
        plan_desc = f"adaptive weights 2/4/8 bits by block MACs, activations {ab} bits"
    else:
        plan = uniform_plan(model, wa, ab, args.quantize_all)
        plan_desc = f"uniform W{wa}A{ab}"
    scope = "every layer quantized" if args.quantize_all else "first conv and classifier FP32"
    rows, totals = bitops_report(model, size, plan)
    print(f"{desc}; plan: {plan_desc}; {scope}")
    print(format_table(rows, totals))

    if args.csv is not None:
        write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    if args.compare is not None:
        results = compare_plans(model, size, ab, args.quantize_all)
        plot_comparison(results, args.compare, f"Total BitOps per image: {desc}\n({scope})")
        print(f"wrote {args.compare}")
    return totals


if __name__ == "__main__":
    main()
