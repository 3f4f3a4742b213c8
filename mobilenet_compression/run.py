"""One quantization run: what `python sweep.py --checkpoint ... --weight_bits 4
--activation_bits 8` does, and what `wandb agent` launches for every run of a sweep.

Load the checkpoint (dataset, width and classes come from its metadata), quantize with the
run's parameters, calibrate on training images, evaluate on the test set, export the
bit-packed file, count BitOps, and log it all: W&B summary keys as in DESIGN.md, the
per-layer BitOps table, the compressed file as an artifact, and one row of runs.csv.

Inside a sweep the parameters come from `wandb.config` (the agent's config file named by
WANDB_SWEEP_PARAM_PATH), so a sweep whose `command` passes no arguments works the same as
one that passes `${args}` or `${args_no_equals}`.
"""

import hashlib
import json
import os
import time
import uuid

from filelock import FileLock

from . import bitops, results
from .checkpoint import load_checkpoint, model_from_checkpoint
from .data import BatchLoader, load_dataset
from .errors import ArgumentParser, UserError, cli
from .evaluation import EVAL_BATCH_SIZE, eval_loader, evaluate, predict
from .export import compression_metrics, export_quantized, load_quantized
from .quantization import (
    CALIBRATION_METHODS,
    WEIGHT_GRANULARITIES,
    WEIGHT_METHODS,
    calibrate,
    check_bits,
    quantize_model,
)
from .tracking import WANDB_MODES, init_run, resolve_mode
from .train import resolve_device

def get_args_parser():
    p = ArgumentParser(
        prog="sweep.py",
        description="Quantize a trained MobileNetV2 checkpoint, measure it, log it to W&B. "
                    "Also: `sweep.py --sweep YAML` (offline local sweep) and "
                    "`sweep.py --report DIR` (tables and plots).",
    )
    p.add_argument("--checkpoint", default="checkpoints/best.pt",
                   help="FP32 checkpoint written by train.py (default: %(default)s)")
    p.add_argument("--weight_bits", type=int, default=8,
                   help="weight bits, 2..8 (16/32: FP32) (default: %(default)s)")
    p.add_argument("--activation_bits", type=int, default=8,
                   help="activation bits, 2..8 (16/32: FP32) (default: %(default)s)")
    p.add_argument("--calibration", default="minmax", choices=CALIBRATION_METHODS,
                   help="activation range calibration (default: %(default)s)")
    p.add_argument("--calib_batches", type=int, default=8,
                   help="calibration batches of training images (default: %(default)s)")
    p.add_argument("--calib_batch_size", type=int, default=128,
                   help="images per calibration batch (default: %(default)s)")
    p.add_argument("--weight_method", default="minmax", choices=WEIGHT_METHODS,
                   help="per-channel weight scale: absmax, or the clip with the least "
                        "squared error (default: %(default)s)")
    p.add_argument("--weight_granularity", default="per_channel",
                   choices=WEIGHT_GRANULARITIES,
                   help="weight scales per output channel, or one per tensor as in the "
                        "earlier projects (default: %(default)s)")
    p.add_argument("--max_eval_samples", type=int, default=None,
                   help="evaluate on only the first N test images (default: all)")
    p.add_argument("--data_dir", default=None,
                   help="dataset folder (default: the one the checkpoint was trained from)")
    p.add_argument("--results_dir", default=None,
                   help="runs.csv and exported models go to RESULTS_DIR/<sweep id or runs>/ "
                        "(default: $MOBILENET_COMPRESSION_RESULTS_DIR, else results)")
    p.add_argument("--seed", type=int, default=42,
                   help="seed of the calibration sampling (default: %(default)s)")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--wandb_mode", default=None, choices=WANDB_MODES,
                   help="W&B mode (default: $WANDB_MODE, else online; offline by itself "
                        "without credentials)")
    return p


def check_args(args):
    args.weight_bits = check_bits(args.weight_bits, "--weight_bits")
    args.activation_bits = check_bits(args.activation_bits, "--activation_bits")
    for name in ("calib_batches", "calib_batch_size", "max_eval_samples"):
        value = getattr(args, name)
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise UserError(f"--{name} must be a positive integer, got {value}.")
    for name, choices in (("calibration", CALIBRATION_METHODS),
                          ("weight_method", WEIGHT_METHODS),
                          ("weight_granularity", WEIGHT_GRANULARITIES)):
        if getattr(args, name) not in choices:
            raise UserError(f"--{name} must be one of {', '.join(choices)}, got "
                            f"{getattr(args, name)!r}.")


def apply_sweep_config(args, config, parser):
    """Take the run's parameters from wandb.config (the agent's values win over flags);
    a parameter sweep.py does not know is one clear error."""
    known = {a.dest for a in parser._actions}
    for key, value in dict(config).items():
        if key not in known:
            raise UserError(f"the sweep sets parameter {key!r}, which sweep.py does not know; "
                            f"remove it from the sweep yaml (see sweep.py --help).")
        setattr(args, key, value)


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def baseline_accuracy(model, loader, cache_dir, key):
    """FP32 test accuracy of the checkpoint, measured once per (checkpoint, test set) and
    cached beside runs.csv: every run of a sweep compares against the same measured number
    instead of re-evaluating the FP32 model 25 times."""
    path = os.path.join(cache_dir, "baseline_acc.json")
    os.makedirs(cache_dir, exist_ok=True)
    with FileLock(os.path.join(cache_dir, ".baseline_acc.json.lock"), timeout=600):
        cache = json.load(open(path)) if os.path.exists(path) else {}
        if key not in cache:
            cache[key] = evaluate(model, loader)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(cache, f, indent=1)
            os.replace(tmp, path)
    return cache[key]


def main(argv=None):
    """Command-line entry: exit status 0, or 2 for bad input (one line on stderr)."""
    run_quantization(argv)
    return 0


@cli
def run_quantization(argv=None):
    """Parse `argv`, run, and return the metrics dict (also what tests call)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    in_sweep = bool(os.environ.get("WANDB_SWEEP_PARAM_PATH"))
    loaded = None
    if not in_sweep:  # outside a sweep, bad flags fail before anything is written
        check_args(args)
        loaded = load_model(args.checkpoint)
    mode = resolve_mode(args.wandb_mode)
    run = None
    if mode != "disabled":
        run = init_run(mode, "quantize", vars(args))
    try:
        if run is not None:
            apply_sweep_config(args, run.config, parser)
        check_args(args)
        metrics = quantize_and_measure(args, run, loaded or load_model(args.checkpoint))
    except BaseException as e:
        if run is not None:
            run.finish(exit_code=2 if isinstance(e, UserError) else 1)
        raise
    if run is not None:
        run.finish()
    return metrics


def load_model(path):
    """(checkpoint dict, FP32 model): every way the checkpoint can be wrong is a UserError."""
    ckpt = load_checkpoint(path)
    return ckpt, model_from_checkpoint(ckpt, path)


def quantize_and_measure(args, run, loaded):
    t_start = time.perf_counter()
    ckpt, fp32 = loaded
    device = resolve_device(args.device)
    data_dir = args.data_dir or ckpt.get("args", {}).get("data_dir") or "./data"
    info, train, _, test = load_dataset(ckpt["dataset"], data_dir,
                                        ckpt.get("args", {}).get("val_size"))
    test = test.head(args.max_eval_samples).to(device)
    calib = train.head(args.calib_batches * args.calib_batch_size).to(device)
    test_loader = eval_loader(test, info, EVAL_BATCH_SIZE)
    fp32.to(device)

    sweep_id = os.environ.get("WANDB_SWEEP_ID") or None
    results_dir = args.results_dir or results.default_results_dir()
    out_dir = str(results.sweep_dir(results_dir, sweep_id))
    run_id = run.id if run is not None and run.id else uuid.uuid4().hex[:8]
    key = f"{file_digest(args.checkpoint)[:16]}:{len(test)}:{device.type}"
    try:
        baseline_acc = baseline_accuracy(fp32, test_loader, out_dir, key)
    except OSError as e:
        raise UserError(f"cannot write to the results directory {out_dir} ({e.strerror}); "
                        f"pass --results_dir a directory you can write to.") from None

    # Quantize: weights once here, activations calibrated on training images only.
    qmodel = quantize_model(fp32, (args.weight_bits, args.activation_bits),
                            weight_granularity=args.weight_granularity,
                            weight_method=args.weight_method)
    calib_loader = BatchLoader(calib, info, args.calib_batch_size, channels_last=True)
    calibrate(qmodel, calib_loader, method=args.calibration, num_batches=args.calib_batches,
              seed=args.seed)
    t_eval = time.perf_counter()
    quant_acc = evaluate(qmodel, test_loader)
    eval_s = time.perf_counter() - t_eval

    # Export the real file, and check that loading it back gives the same logits.
    model_path = os.path.join(out_dir, "models",
                              f"{run_id}-w{args.weight_bits}a{args.activation_bits}.mbq")
    os.makedirs(os.path.dirname(model_path), exist_ok=True)
    export_quantized(qmodel, model_path, {k: ckpt[k] for k in (
        "arch", "dataset", "num_classes", "in_channels", "input_size", "width_multiplier")})
    probe = BatchLoader(test.head(256), info, 256, channels_last=True)
    reloaded = load_quantized(model_path).to(device)
    roundtrip_diff = float((predict(qmodel, probe)[0] - predict(reloaded, probe)[0]).abs().max())

    rows, totals = bitops.bitops_report(fp32, info.input_size,
                                        bitops.uniform_plan(fp32, args.weight_bits,
                                                            args.activation_bits))
    size = compression_metrics(qmodel, ckpt["model"], model_path, info.input_size,
                               info.in_channels)
    metrics = {
        "weight_bits": args.weight_bits,
        "activation_bits": args.activation_bits,
        "baseline_acc": baseline_acc,
        "quant_acc": quant_acc,
        "acc_drop": baseline_acc - quant_acc,
        **size,
        **totals,
        "calibration": args.calibration,
        "weight_method": args.weight_method,
        "weight_granularity": args.weight_granularity,
        "eval_images": len(test),
        "eval_seconds": eval_s,
        "eval_images_per_s": len(test) / eval_s,
        "roundtrip_max_abs_diff": roundtrip_diff,
        "run_seconds": time.perf_counter() - t_start,
    }
    print(f"W{args.weight_bits}A{args.activation_bits} ({args.calibration}, "
          f"{args.weight_granularity}): quant_acc {quant_acc:.2f} (FP32 {baseline_acc:.2f}, "
          f"drop {metrics['acc_drop']:.2f}), {size['compressed_mb']:.3f} MB "
          f"(x{size['compression_ratio']:.2f}), {totals['bitops'] / 1e9:.3f} GBitOps "
          f"-> {model_path}")

    if run is not None:
        import wandb

        run.summary.update(metrics)
        columns = ["name", "type", "in_channels", "out_channels", "kernel", "stride",
                   "input_hw", "output_hw", "macs", "weight_bits", "activation_bits", "bitops",
                   "weight_bitops"]
        table = wandb.Table(columns=columns, data=[
            ["x".join(map(str, r[c])) if isinstance(r[c], tuple) else r[c] for c in columns]
            for r in rows])
        run.log({"bitops_per_layer": table})
        artifact = wandb.Artifact(
            f"mobilenetv2-{ckpt['dataset']}-w{ckpt['width_multiplier']:g}-"
            f"w{args.weight_bits}a{args.activation_bits}",
            type="quantized-model", metadata=metrics)
        artifact.add_file(model_path)
        run.log_artifact(artifact)
        if run.settings.mode == "online":
            try:  # lineage: the baseline model artifact logged by train.py, if it is there
                run.use_artifact(f"mobilenetv2-{ckpt['dataset']}-"
                                 f"w{ckpt['width_multiplier']:g}:latest")
            except Exception as e:  # a checkpoint trained with W&B disabled has none
                print(f"W&B: no baseline model artifact to link ({type(e).__name__}).")

    results.append_run(results_dir, sweep_id, {
        "run_id": run_id, **metrics, "checkpoint": args.checkpoint,
        "dataset": ckpt["dataset"], "width_multiplier": ckpt["width_multiplier"],
    })
    return metrics
