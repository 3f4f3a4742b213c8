"""The plan explorer: one self-contained HTML page where a person sets each block's weight and
activation bits and sees at once what that plan costs and what it is likely to lose.

    python -m mobilenet_compression.mixed.explorer --checkpoint CKPT [--data_dir DIR] \
        [--runs SWEEP_DIR ...] --out PAGE.html

For every change of a control the page shows, computed in the browser from numbers this
module embeds:
  BitOps per image  exactly as bitops.bitops_report counts them: each quantized layer's MACs
                    x weight bits x activation bits, the stem conv and classifier at 32 x 32;
  compressed MB     the size of the safetensors file export.py would write: a real export of
                    this checkpoint at W8A8 (to a temporary folder) gives the fixed bytes
                    (scales, BatchNorm, FP32 tensors, header); the plan adds each layer's
                    packed weights, ceil(parameters x bits / 8) bytes;
  predicted drop    the plan's summed sensitivity S (sensitivity.py: the one-layer KL
                    divergences of its weights and activations, the cost planner.py
                    minimises) mapped to accuracy points by a logistic curve in log S,
                    drop = D / (1 + (S0 / S)^k), fitted by least squares to the uniform PTQ
                    runs given with --runs. D = FP32 accuracy - chance is fixed: no plan does
                    worse than guessing, and the measured drops level off there. Mixed runs
                    cannot be fitted (runs.csv does not hold their per-layer plans); they are
                    drawn on the chart beside the uniform ones.
No script, font or style is fetched: the page works from file:// with no network.
"""

import html
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from .. import threads
from ..config import parse_bool
from ..deploy.size import orig_mb, reference_size
from ..errors import ArgumentParser, UserError, cli
from ..files import atomic_write
from ..quant.bitops import bitops_report, block_of
from ..quant.precision import quantized_layer_names, weight_layers
from ..source_options import options_from
from ..sources import add_arguments, export_metadata, load_data, load_model, source_digest
from ..sweep import results
from .sensitivity import BITS, sensitivity

MIB = 2**20
SIZE_TOLERANCE = 0.001  # the size prediction is stated (and tested) within 0.1% of the file
CLOSE = 10.0  # accuracy points: the fit's error is also reported on runs that lost less
TINY = 1e-12  # a summed KL of 0 (float rounding can give -1e-9) is clamped here for log S


# ----------------------------------------------------------------------------- the numbers

def layer_table(model, input_size, table):
    """(layers, fp32_bitops): one dict per quantized layer in network order (name, block,
    macs, params: the weight's element count, w / a: its weight / activation KL at bits
    2..8), and the BitOps of the layers that stay FP32 (stem conv, classifier)."""
    names = quantized_layer_names(model)
    missing = [n for n in names if n not in table["weight"] or n not in table["activation"]]
    if missing:
        raise UserError(f"the sensitivity table does not cover layer {missing[0]}; measure "
                        f"it for this checkpoint.")
    rows, _ = bitops_report(model, input_size, {})
    macs = {r["name"]: r["macs"] for r in rows}
    params = {n: m.weight.numel() for n, m in weight_layers(model)}
    layers = [{"name": n, "block": block_of(n), "macs": macs.get(n, 0), "params": params[n],
               "w": [table["weight"][n][str(b)] for b in BITS],
               "a": [table["activation"][n][str(b)] for b in BITS]} for n in names]
    fp32_bitops = sum(r["bitops"] for r in rows if r["name"] not in set(names))
    return layers, fp32_bitops


def summed_kl(layers, plan):
    """The plan's additive sensitivity: sum over layers of weight KL + activation KL.
    `plan`: layer name -> (weight_bits, activation_bits)."""
    return sum(l["w"][BITS.index(plan[l["name"]][0])] + l["a"][BITS.index(plan[l["name"]][1])]
               for l in layers)


def plan_bytes(layers, fixed_bytes, plan):
    """Predicted file size of `plan`: the fixed bytes plus every layer's packed weights."""
    return fixed_bytes + sum(math.ceil(l["params"] * plan[l["name"]][0] / 8) for l in layers)


def predict_drop(s, fit):
    """Accuracy points the fitted curve gives a summed KL `s`."""
    return fit["dmax"] / (1 + math.exp(fit["k"] * (math.log(fit["s0"]) - math.log(max(s, TINY)))))


def fit_drop(points, dmax):
    """{"k", "s0", "dmax"}: drop = dmax / (1 + (s0 / S)^k) fitted by least squares (in accuracy
    points) to `points`, a list of (S, measured drop). A grid over k and log s0, refined once
    around its best cell: two parameters need no optimiser."""
    log_s = np.log(np.maximum([p[0] for p in points], TINY))
    drop = np.array([p[1] for p in points], dtype=float)

    def best(ks, logs0):
        k, l0 = np.meshgrid(ks, logs0, indexing="ij")
        pred = dmax / (1 + np.exp(k[..., None] * (l0[..., None] - log_s)))
        err = ((pred - drop) ** 2).sum(-1)
        i, j = np.unravel_index(np.argmin(err), err.shape)
        return ks[i], logs0[j]

    ks = np.linspace(0.25, 8, 156)
    logs0 = np.linspace(log_s.min() - 3, log_s.max() + 3, 361)
    k, l0 = best(ks, logs0)
    dk, dl = ks[1] - ks[0], logs0[1] - logs0[0]
    k, l0 = best(np.linspace(k - dk, k + dk, 41), np.linspace(l0 - dl, l0 + dl, 41))
    return {"k": float(k), "s0": float(math.exp(l0)), "dmax": float(dmax)}


def fit_quality(points, dmax):
    """(mean absolute error of the fit on its own points, the same leaving each point out)."""
    fit = fit_drop(points, dmax)
    mae = float(np.mean([abs(predict_drop(s, fit) - d) for s, d in points]))
    if len(points) < 3:
        return mae, None
    loo = [abs(predict_drop(s, fit_drop(points[:i] + points[i + 1:], dmax)) - d)
           for i, (s, d) in enumerate(points)]
    return mae, float(np.mean(loo))


# ----------------------------------------------------------------------------- inputs

def read_runs(paths):
    """The finished runs of every runs.csv named (a sweep folder or the file), as dicts:
    label, uniform, method, weight_bits, activation_bits, quant_acc, baseline_acc, acc_drop,
    bitops, compressed_mb, bias_correction, weight_granularity (None where a column is
    missing)."""
    out = []
    for path in paths:
        df = results.read_runs(path)
        for row in df.to_dict("records"):
            if row.get("status") != results.FINISHED:
                continue
            get = lambda k: None if k not in row or _missing(row[k]) else row[k]
            if get("quant_acc") is None or get("bitops") is None:
                continue
            plan = get("plan") or "uniform"
            method = str(get("method") or "ptq")
            wb, ab = float(get("weight_bits")), float(get("activation_bits"))
            bits = (f"W{wb:g}A{ab:g}" if plan == "uniform"
                    else f"{plan} W{wb:.2f}A{ab:.2f}")
            label = f"{bits}{' ' + method.upper() if method != 'ptq' else ''}"
            bias = get("bias_correction")
            out.append({"label": label, "uniform": plan == "uniform", "method": method,
                        "weight_bits": wb, "activation_bits": ab,
                        "quant_acc": float(row["quant_acc"]),
                        "baseline_acc": _float(get("baseline_acc")),
                        "acc_drop": _float(get("acc_drop")),
                        "bitops": int(row["bitops"]),
                        "compressed_mb": _float(get("compressed_mb")),
                        "bias_correction": None if bias is None
                        else str(bias).strip().lower() in ("true", "1", "1.0"),
                        "weight_granularity": get("weight_granularity")})
    return out


def _missing(value):
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def _float(value):
    return None if value is None else float(value)


def fit_points(runs, layers):
    """(S, drop) of the uniform PTQ runs whose bits the sensitivity table has; each of those
    runs gets its S as r["kl"]."""
    points = []
    for r in runs:
        wb, ab = r["weight_bits"], r["activation_bits"]
        if (r["uniform"] and r["method"] == "ptq" and r["acc_drop"] is not None
                and wb in BITS and ab in BITS):
            r["kl"] = summed_kl(layers, {l["name"]: (int(wb), int(ab)) for l in layers})
            points.append((r["kl"], r["acc_drop"]))
    return points


def explorer_data(checkpoint, data_dir=None, runs_dirs=(), batches=2, batch_size=128,
                  bias_correction=True, verbose=True, options=None, workers=None):
    """Everything the page needs, as a JSON-ready dict (the page computes the rest)."""
    ckpt, fp32 = load_model(checkpoint, options)
    runs = read_runs(runs_dirs)  # bad --runs fail here, before minutes of measuring
    if runs_dirs and not runs:
        raise UserError(f"no finished run in {', '.join(map(str, runs_dirs))}; pass the "
                        f"folders of sweeps whose runs finished.")
    info, train, _, _ = load_data(ckpt, data_dir, workers)
    table, _ = sensitivity(checkpoint, data_dir, batches, batch_size, verbose=verbose,
                           options=options, workers=workers)
    layers, fp32_bitops = layer_table(fp32, info.input_size, table)

    w8 = {l["name"]: (8, 8) for l in layers}

    reference = reference_size(export_metadata(ckpt, source_digest(ckpt, data_dir)), fp32,
                               train, info, bias_correction)
    fixed = reference - plan_bytes(layers, 0, w8)
    checked = [r for r in runs if r["uniform"] and r["compressed_mb"] is not None
               and r["weight_bits"] in BITS and r["bias_correction"] in (None, bias_correction)
               and r["weight_granularity"] in (None, "per_channel")]  # as the reference
    errors = [abs(plan_bytes(layers, fixed, {l["name"]: (int(r["weight_bits"]), 8)
                                             for l in layers}) / (r["compressed_mb"] * MIB) - 1)
              for r in checked]

    baselines = [r["baseline_acc"] for r in runs if r["baseline_acc"] is not None]
    baseline = float(np.median(baselines)) if baselines else ckpt.get("test_acc")
    chance = 100.0 / ckpt["num_classes"]
    fit, points = None, fit_points(runs, layers)
    if baseline is not None and len({round(s, 12) for s, _ in points}) >= 2:
        dmax = max(baseline - chance, 1e-3)
        fit = fit_drop(points, dmax)
        fit["mae"], fit["loo_mae"] = fit_quality(points, dmax)
        fit["runs"] = len(points)
        close = [(s, d) for s, d in points if d < CLOSE]  # where a person looks for a plan
        fit["close_runs"] = len(close)
        fit["close_mae"] = (float(np.mean([abs(predict_drop(s, fit) - d) for s, d in close]))
                            if close else None)
    return {
        "checkpoint": str(checkpoint), "dataset": ckpt["dataset"],
        "width_multiplier": ckpt["width_multiplier"], "input_size": info.input_size,
        "bits": list(BITS), "layers": layers, "fp32_bitops": fp32_bitops,
        "bitops_fp32": sum(l["macs"] for l in layers) * 32 * 32 + fp32_bitops,
        "size": {"fixed_bytes": fixed, "reference_bytes": reference,
                 "orig_mb": orig_mb(ckpt["model"]), "bias_correction": bias_correction,
                 "runs_checked": len(errors),
                 "runs_max_error": max(errors) if errors else None},
        "sensitivity": {"images": table.get("images")},
        "baseline_acc": baseline, "chance": chance, "fit": fit, "runs_given": len(runs_dirs),
        "runs": [{**{k: r[k] for k in ("label", "uniform", "method", "bitops", "quant_acc")},
                  # where the fitted curve puts a run it was fitted to: the chart draws the gap
                  "predicted_acc": baseline - predict_drop(r["kl"], fit)
                  if fit and "kl" in r else None} for r in runs],
    }


# ----------------------------------------------------------------------------- the page

def notes(data):
    """What each number on the page is and how far to trust it, one sentence or two each."""
    size, fit = data["size"], data["fit"]
    quantized = len(data["layers"])
    blocks = len({l["block"] for l in data["layers"]})
    kl = (f"the plan's summed KL S (each layer's weight and activation KL divergence measured "
          f"alone on {data['sensitivity']['images']} training images, the cost the "
          f"sensitivity planner minimises)")
    out = [
        f"BitOps: per image, each quantized layer's MACs x weight bits x activation bits, the "
        f"stem conv and the classifier at 32 x 32, as bitops.py counts them ({quantized} "
        f"quantized layers in {blocks} blocks; the FP32 model: "
        f"{data['bitops_fp32'] / 1e9:.2f} G).",
        f"Compressed MB: the safetensors file export.py writes "
        f"({'with' if size['bias_correction'] else 'without'} bias correction): a real export "
        f"of this checkpoint at W8A8 ({size['reference_bytes']:,} bytes) gives the fixed part "
        f"(scales, BatchNorm, FP32 tensors, header: {size['fixed_bytes']:,} bytes) and each "
        f"layer adds ceil(parameters x weight bits / 8) bytes of packed weights; only the "
        f"digits of offsets in the header are not followed, so the prediction is within "
        f"{SIZE_TOLERANCE:.1%} of the real file"
        + (f" (against the {size['runs_checked']} uniform runs given: largest error "
           f"{size['runs_max_error']:.3%})." if size["runs_checked"] else "."),
    ]
    if fit:
        error = f"on those runs it is off by {fit['mae']:.2f} points on average"
        if fit["loo_mae"] is not None:
            error += f" ({fit['loo_mae']:.2f} when each run is left out of the fit"
            if fit["close_mae"] is not None:
                error += (f"; {fit['close_mae']:.2f} on the {fit['close_runs']} runs that "
                          f"lost under {CLOSE:g} points")
            error += ")"
        out.append(
            f"Predicted drop, an estimate: {kl} through the curve drop = {fit['dmax']:.2f} / "
            f"(1 + ({fit['s0']:.3g} / S)^{fit['k']:.2f}), fitted by least squares to the "
            f"{fit['runs']} uniform PTQ runs given ({fit['dmax']:.2f} = FP32 "
            f"{data['baseline_acc']:.2f}% minus chance {data['chance']:.2f}%); {error}; layers "
            f"that interact can make a mixed plan's real drop differ.")
    else:
        why = ("the runs given hold fewer than two uniform PTQ runs, too few"
               if data["runs_given"] else "no runs were given (--runs)")
        out.append(f"Predicted drop: {why} to calibrate a drop, so the page shows {kl} alone; "
                   f"a larger S means a larger drop.")
    return out


def render(data):
    """The page: the data as JSON in a script element, read by the inline script."""
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    title = (f"Plan explorer: MobileNetV2 w{data['width_multiplier']:g} on {data['dataset']} "
             f"({data['checkpoint']})")
    page = Path(__file__).with_name("explorer.html").read_text()
    return (page.replace("{{TITLE}}", html.escape(title))
            .replace("{{NOTES}}", "".join(f"<p>{html.escape(n)}</p>" for n in notes(data)))
            .replace("{{DATA}}", payload))


# ----------------------------------------------------------------------------- command line

def get_args_parser():
    p = ArgumentParser(
        prog="python -m mobilenet_compression.mixed.explorer",
        description="Write one self-contained HTML page to try per-block weight/activation "
                    "bits of a checkpoint and see its BitOps, compressed size and predicted "
                    "accuracy drop at once.")
    p.add_argument("--checkpoint", required=True,
                   help="FP32 model: a checkpoint of train.py, a MobileNetV2 state dict file, "
                        "or torchvision:IMAGENET1K_V1 / torchvision:IMAGENET1K_V2")
    p.add_argument("--data_dir", default=None,
                   help="dataset folder (default: the one the checkpoint was trained from)")
    add_arguments(p.add_argument_group("a state dict's or torchvision:NAME's data"))
    p.add_argument("--runs", nargs="+", default=[], metavar="DIR",
                   help="sweep folders (each holding a runs.csv) of this checkpoint: drawn on "
                        "the chart, and their uniform PTQ runs calibrate the predicted drop "
                        "(default: none, the page shows the summed KL alone)")
    p.add_argument("--out", required=True, help="the page to write (.html)")
    p.add_argument("--batches", type=int, default=2,
                   help="training batches the sensitivities are measured on (default: 2, "
                        "as in python -m mobilenet_compression.mixed.sensitivity, whose cache it "
                        "shares)")
    p.add_argument("--batch_size", type=int, default=128, help="images per batch (default: 128)")
    p.add_argument("--bias_correction", default="true",
                   help="whether the sized files have bias correction, as runs do by default "
                        "(default: true)")
    threads.add_argument(p)
    return p


def check_out(path):
    """--out must be a new or existing .html file in a folder that exists and is writable."""
    out = Path(path)
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--out must name an .html file, got {path}.")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"the folder of --out {path} does not exist; create it first.")
    if out.is_dir():
        raise UserError(f"--out {path} is a folder; name the .html file to write.")
    if not os.access(folder, os.W_OK):
        raise UserError(f"cannot write to {folder}; pass --out in a folder you can write to.")
    return out


@cli
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    out = check_out(args.out)
    if args.batches < 1 or args.batch_size < 1:
        raise UserError("--batches and --batch_size must be positive integers.")
    bias_correction = parse_bool(args.bias_correction, "--bias_correction")
    threads.set_threads(args.threads)
    data = explorer_data(args.checkpoint, args.data_dir, args.runs, args.batches,
                         args.batch_size, bias_correction, options=options_from(vars(args)),
                         workers=args.workers)
    page = render(data).encode()
    try:
        atomic_write(str(out), lambda f: f.write(page))
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e}); pass --out in a folder you "
                        f"can write to.") from None
    print(f"{out}: {len(page) / 1024:.0f} KiB, {len(data['layers'])} quantized layers, "
          f"{len(data['runs'])} runs")
    print(notes(data)[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
