"""Per-layer sensitivity: what quantizing ONE layer alone does to the network's outputs.

    python -m mobilenet_compression.mixed.sensitivity --checkpoint CKPT [--heatmap PNG]

For each quantized layer (every Conv2d/Linear but the stem and the classifier) and each bit
width b in 2..8: the layer's weights at b bits (everything else FP32), and separately its
input activation at b bits, calibrated on the same images as the runs calibrate it (`mse`,
and at 3 bits or fewer, where a run searches its clip by the network's output, the clip
with the least KL among the clip search's candidates). The weights are
rounded as the runs round them (`rounding`): to the nearest grid point, or by GPTQ
(quant/rounding.py, the default for post-training runs) on that layer's own FP32 inputs over the
first GPTQ_IMAGES of the images, at every width GPTQ rounds (2..GPTQ_MAX_BITS). GPTQ makes
low weight bits much cheaper than nearest rounding does (W3A8 91.65% against 89.24%, W2A8
41.60% against 12.52% on the 93.65% checkpoint), so a table measured with nearest rounding
would price the weight bits of a GPTQ run wrongly, and the plan with them. The damage is the mean
KL divergence KL(p_fp32 || p_quantized) of the softmax outputs over a fixed subset of
TRAINING images (the first `batches` x `batch_size` of the train split; validation and test
images are refused). KL rather than the loss increase: it needs no labels, it is never
negative (a quantized layer that happens to lower the training loss of a few images is
still a change), and it is what the quantized network loses against the FP32 one, which is
the quantity a bit allocation trades off (HAWQ-V3 and AIMET's AMP use the same kind of
output-distance proxy).

Results are cached as JSON under the cache folder (default
~/.cache/mobilenet-compression/sensitivity/), keyed by the checkpoint's SHA-256, the image
subset and the bit widths, so the runs of a sweep measure them once; a different checkpoint
gets a different key.
"""

import hashlib
import json
import os
import sys
import time

import torch

from .. import threads
from ..config import parse_bool
from ..environment import cache_folder
from ..errors import ArgumentParser, UserError, cli
from ..files import atomic_write
from ..quant.bitops import layer_stats
from ..quant.calibrate import calibrate, training_batches
from ..quant.choices import ROUNDINGS, default_calibration
from ..quant.divergence import best_clip, head, kl
from ..quant.equalize import equalize_depthwise_inputs
from ..quant.precision import quantized_layer_names
from ..quant.prepare import quant_layers, quantize_model
from ..quant.rounding import GPTQ_IMAGES, GPTQ_MAX_BITS, add_hessian, gptq_weight
from ..source_options import options_from
from ..sources import add_arguments, load_data, load_model, source_digest

BITS = (2, 3, 4, 5, 6, 7, 8)
VERSION = 2  # part of the cache key: bump when the measurement changes


def default_cache_dir():
    return cache_folder("sensitivity")


def _forward(model, images):
    with torch.inference_mode():
        return torch.cat([model(x) for x in images])


class _Suffix:
    """Forward passes that start at the block of the one quantized layer.

    With one layer quantized and everything else FP32, every block before that layer's block
    computes what the FP32 model computes, so its output is taken from one FP32 pass (kept
    per block; the same pass gives the FP32 logits, `fp32_logits`) and only the rest of the
    network runs: the whole table 2.3 times faster at width 1.0 (README), the same values
    bit for bit. Only for torchvision's MobileNetV2 layout (`features` blocks, average pool,
    `classifier`); any other model, or a layer outside `features`, runs whole."""
    def __init__(self, fp32, images):
        self.images = images
        self.inputs = None
        features = getattr(fp32, "features", None)
        if isinstance(features, torch.nn.Sequential) and hasattr(fp32, "classifier") \
                and len(images) == 1:
            with torch.inference_mode():
                h, self.inputs = images[0], []
                for block in features:
                    self.inputs.append(h)
                    h = block(h)
                self.fp32_logits = head(fp32, h)
        else:
            self.fp32_logits = _forward(fp32, images)

    def __call__(self, model, name):
        parts = name.split(".")
        if self.inputs is None or parts[0] != "features":
            return _forward(model, self.images)
        k = int(parts[1])
        with torch.inference_mode():
            h = self.inputs[k].clone()  # a layer may quantize its exclusive input in place
            for block in model.features[k:]:
                h = block(h)
            return head(model, h)


def _fp32_hessians(fp32, images, names):
    """{layer name: H of its FP32 inputs} (rounding.add_hessian) over `images`, one pass."""
    modules = dict(fp32.named_modules())
    hs, handles = {}, []
    for name in names:
        layer = modules[name]

        def hook(module, args, name=name):
            hs[name] = add_hessian(hs.get(name), module, args[0])
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        _forward(fp32, [images])
    finally:
        for h in handles:
            h.remove()
    return hs


def measure(fp32, loader, batches, bits=BITS, calibration="auto", progress=None,
            rounding="nearest"):
    """{"layers": [...], "weight": {layer: {"bits": kl}}, "activation": {layer: {...}}}
    for `fp32` on the first `batches` batches of `loader` (a BatchLoader over the TRAIN
    split; anything else is a UserError). `rounding`: "nearest" or "gptq" (each layer's
    weights GPTQ-rounded on its own FP32 inputs, where the runs' GPTQ rounds them).
    `calibration`: how each input is calibrated, as the runs calibrate it: "auto" (the
    runs' default) is `mse`, then at the bits where a run searches the clip
    (default_calibration gives `loss`) the layer's clip moved to the candidate with
    the least KL (divergence.best_clip, as the run's clip search moves it); any other
    method is used as it is."""
    if rounding not in ROUNDINGS:
        raise UserError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}.")

    total = training_batches(loader, batches, "sensitivity")
    images = []
    for x, _ in loader:
        images.append(x)
        if len(images) >= total:
            break
    images = [torch.cat(images)]  # one forward per measurement: fewer per-call overheads
    fp32.eval()
    suffix = _Suffix(fp32, images)
    ref = torch.log_softmax(suffix.fp32_logits.float(), 1)
    out = {"layers": None, "weight": {}, "activation": {}}
    hessians = None
    if rounding == "gptq" and any(b <= GPTQ_MAX_BITS for b in bits):
        names = list(quantized_layer_names(fp32))
        hessians = _fp32_hessians(fp32, images[0][:GPTQ_IMAGES], names)
    for b in bits:
        wq = quantize_model(fp32, (b, 32)).eval()  # every layer's weights at b bits...
        layers = quant_layers(wq)
        out["layers"] = [n for n, _ in layers]
        for name, layer in layers:  # ...switched on one at a time
            for _, other in layers:
                other.weight_quant.enabled = other is layer
            original = None
            if hessians is not None and b <= GPTQ_MAX_BITS:
                q = layer.weight_quant
                original = layer.weight.detach().clone()
                with torch.no_grad():  # on its grid: the quantizer leaves it as it is
                    layer.weight.copy_(q(gptq_weight(layer.weight, q.scale, q.qmin, q.qmax,
                                                     hessians[name]), impl="tensor"))
            out["weight"].setdefault(name, {})[str(b)] = kl(ref, suffix(wq, name))
            if original is not None:
                with torch.no_grad():
                    layer.weight.copy_(original)
            if progress:
                progress()
        aq = quantize_model(fp32, (32, b)).eval()
        search = calibration == "auto" and default_calibration(b) == "loss"
        calibrate(aq, loader, "mse" if calibration == "auto" else calibration,
                  total)  # observes FP32 inputs: every layer alone
        layers = quant_layers(aq)
        for name, layer in layers:
            for _, other in layers:
                other.input_quant.mode = "quantize" if other is layer else "off"
            if search:
                *_, best = best_clip(layer.input_quant, lambda: kl(ref, suffix(aq, name)))
                out["activation"].setdefault(name, {})[str(b)] = best
            else:
                out["activation"].setdefault(name, {})[str(b)] = kl(ref, suffix(aq, name))
            if progress:
                progress()
    return out


def cache_key(checkpoint_sha256, batches, batch_size, bits, calibration, rounding="gptq",
              equalize=False):
    text = json.dumps([VERSION, checkpoint_sha256, batches, batch_size, list(bits),
                       calibration, rounding] + (["equalize"] if equalize else []))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def sensitivity(checkpoint, data_dir=None, batches=2, batch_size=128, bits=BITS,
                calibration="auto", cache_dir=None, verbose=True, rounding="gptq",
                equalize=True, options=None, workers=None):
    """The sensitivity table of a checkpoint, from the cache when it holds it; `rounding`
    is the weight rounding of the runs it prices ("gptq", the post-training default, or
    "nearest"); with `equalize`, of the network quant/equalize.py makes from it on the table's own
    images, as runs with --equalize true quantize it. Returns (table, cached: bool)."""
    from filelock import FileLock

    # every way the checkpoint is wrong is a UserError
    ckpt, fp32 = load_model(checkpoint, options)
    digest = source_digest(ckpt, data_dir)
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, f"{cache_key(digest, batches, batch_size, bits, calibration, rounding, equalize)}"
                                   ".json")
    try:
        os.makedirs(cache_dir, exist_ok=True)
        lock = FileLock(path + ".lock", timeout=3600)
        lock.acquire()
    except OSError as e:
        raise UserError(f"cannot write the sensitivity cache {cache_dir} ({e.strerror}); set "
                        f"MOBILENET_COMPRESSION_CACHE to a folder you can write to.") from None
    try:
        if os.path.exists(path):
            try:
                table = json.loads(open(path).read())
                if table.get("checkpoint_sha256") == digest:
                    return table, True
            except ValueError:  # a cache, not a result: measure again
                pass
        info, train, _, _ = load_data(ckpt, data_dir, workers)
        loader = train.head(batches * batch_size).loader(info, batch_size, channels_last=True)
        steps = [0]
        count = 2 * len(bits) * sum(1 for _ in quantized_layer_names(fp32))
        t0 = time.perf_counter()

        def tick():
            steps[0] += 1
            if verbose and (steps[0] % 25 == 0 or steps[0] == count):
                print(f"sensitivity: {steps[0]}/{count} layer x bits measured "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

        if equalize:
            fp32, _ = equalize_depthwise_inputs(fp32, loader, batches)
        table = measure(fp32, loader, batches, bits, calibration, tick, rounding)
        table.update(checkpoint=checkpoint, checkpoint_sha256=digest, images=batches *
                     batch_size, calibration=calibration, weight_rounding=rounding,
                     equalize=equalize,
                     metric="mean KL(fp32 || quantized)",
                     seconds=time.perf_counter() - t0, macs=_macs(fp32, info.input_size))
        atomic_write(path, lambda f: f.write(json.dumps(table, indent=1).encode()))
        return table, False
    finally:
        lock.release()


def run_table(config):
    """The sensitivity table a `--plan sensitivity` run plans with (a RunConfig): each layer
    priced with the calibration it will get, its clip searched at the bits where
    --calibration auto searches it (`loss` searches every layer, but at 4 bits and more it
    ties with mse), else the run's own method; rounded and equalized as the run does."""
    n = config.sensitivity_images  # 256 (the default) is the CLI's 2 x 128: the same cache
    batches, batch_size = (n // 128, 128) if n % 128 == 0 else (1, n)
    table, _ = sensitivity(
        config.checkpoint, config.data_dir, batches, batch_size,
        calibration="auto" if config.calibration in ("auto", "loss") else config.calibration,
        rounding=config.weight_rounding, equalize=config.equalize,
        options=config.source_options(), workers=config.workers)
    return table


def _macs(model, input_size):
    return {r["name"]: r["macs"] for r in layer_stats(model, input_size)}


def format_table(table):
    bits = sorted(int(b) for b in next(iter(table["weight"].values())))
    head = ["layer", "MACs"] + [f"w{b}" for b in bits] + [f"a{b}" for b in bits]
    lines = ["  ".join(f"{h:>9s}" if i else f"{h:24s}" for i, h in enumerate(head))]
    for name in table["layers"]:
        w, a = table["weight"][name], table["activation"][name]
        cells = [f"{table['macs'].get(name, 0):9d}"]
        cells += [f"{w[str(b)]:9.2e}" for b in bits] + [f"{a[str(b)]:9.2e}" for b in bits]
        lines.append(f"{name:24s}  " + "  ".join(cells))
    return "\n".join(lines)


def heatmap(table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = table["layers"]
    bits = sorted(int(b) for b in next(iter(table["weight"].values())))

    def grid(kind):
        return np.array([[table[kind][n][str(b)] for b in bits] for n in names], dtype=float)

    fig, axes = plt.subplots(1, 2, figsize=(10, max(6, 0.18 * len(names))), sharey=True)
    for ax, kind in zip(axes, ("weight", "activation")):
        g = np.log10(np.maximum(grid(kind), 1e-6))
        im = ax.imshow(g, aspect="auto", cmap="magma_r", vmin=-6, vmax=1)
        ax.set_xticks(range(len(bits)), [str(b) for b in bits])
        ax.set_xlabel(f"{kind} bits (that layer alone)")
        ax.set_title(f"{kind}: log10 KL(fp32 || quantized)")
    axes[0].set_yticks(range(len(names)), names, fontsize=6)
    fig.colorbar(im, ax=axes, shrink=0.6)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


@cli
def main(argv=None):
    p = ArgumentParser(prog="python -m mobilenet_compression.mixed.sensitivity",
                       description="Per-layer sensitivity of a checkpoint to weight and "
                                   "activation bits (each layer alone), on training images.")
    p.add_argument("--checkpoint", required=True,
                   help="FP32 model: a checkpoint of train.py, a MobileNetV2 state dict file, "
                        "or torchvision:IMAGENET1K_V1 / torchvision:IMAGENET1K_V2")
    p.add_argument("--data_dir", default=None,
                   help="dataset folder (default: the one the checkpoint was trained from)")
    add_arguments(p.add_argument_group("a state dict's or torchvision:NAME's data"))
    p.add_argument("--batches", type=int, default=2, help="training batches (default: 2)")
    p.add_argument("--batch_size", type=int, default=128, help="images per batch (default: "
                   "128)")
    p.add_argument("--weight_rounding", default="gptq", choices=("gptq", "nearest"),
                   help="how the weights are rounded, as in the runs the table prices: "
                        "gptq (the post-training default) or nearest (QAT's default) "
                        "(default: gptq)")
    p.add_argument("--equalize", default="true", metavar="{true,false}",
                   help="true: price the equalized network that runs with --equalize true "
                        "(the runs' default) quantize (quant/equalize.py); false: price the "
                        "checkpoint's own network (default: true)")
    p.add_argument("--calibration", default="auto",
                   choices=("auto", "mse", "minmax", "percentile"),
                   help="how each input is calibrated, as the runs it prices calibrate it: "
                        "auto (the runs' default: mse, and at 3 bits or fewer each clip then "
                        "moved to where the outputs are closest to FP32's), or one method "
                        "(default: %(default)s)")
    p.add_argument("--heatmap", default=None, help="write the layer x bits heat map here (PNG)")
    p.add_argument("--cache_dir", default=None, help="cache folder (default: "
                   "$MOBILENET_COMPRESSION_CACHE/sensitivity or ~/.cache/...)")
    threads.add_argument(p)
    args = p.parse_args(argv)
    if args.batches < 1 or args.batch_size < 1:
        raise UserError("--batches and --batch_size must be positive integers.")

    equalize = parse_bool(args.equalize, "--equalize")
    threads.set_threads(args.threads)
    table, cached = sensitivity(args.checkpoint, args.data_dir, args.batches, args.batch_size,
                                calibration=args.calibration, cache_dir=args.cache_dir,
                                rounding=args.weight_rounding, equalize=equalize,
                                options=options_from(vars(args)), workers=args.workers)
    print(format_table(table))
    print(f"{len(table['layers'])} layers x {len(BITS)} bit widths x weights/activations on "
          f"{table['images']} training images, {args.weight_rounding} weight rounding, "
          f"{args.calibration} calibration"
          f"{', equalized' if equalize else ''}: "
          + ("from the cache" if cached else f"measured in {table['seconds']:.0f} s"))
    if args.heatmap:
        heatmap(table, args.heatmap)
        print(f"heat map -> {args.heatmap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
