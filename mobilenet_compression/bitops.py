"""The BitOps table: `python -m mobilenet_compression.bitops` prints the MACs and BitOps of a
MobileNetV2 under a precision plan, per layer and in total, and can write them as CSV and
draw fixed against adaptive precision. The numbers are quant/bitops.py's (definitions there
and in docs/metrics.md).

    python -m mobilenet_compression.bitops --arch imagenet --input_size 224 --quantize_all \
        --weight_bits 8 --activation_bits 8
"""

import argparse
import csv
import math
import os

import torch

from . import sources
from .errors import ArgumentParser, UserError, cli
from .model import build_model
from .quant.bitops import TOTAL_KEYS, adaptive_plan, bitops_report, compare_plans
from .quant.precision import check_bits, uniform_plan


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
