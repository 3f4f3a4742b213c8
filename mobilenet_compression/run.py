"""One quantization run: what `python sweep.py --checkpoint ... --weight_bits 4
--activation_bits 8` does, and what `wandb agent` launches for every run of a sweep.

This module is the command line (`get_args_parser`), the W&B run's lifecycle and the record
of a run that stops; the run itself, as named steps, is pipeline.py's `quantize_and_measure`.

Inside a sweep the parameters come from `wandb.config` (the agent's config file named by
WANDB_SWEEP_PARAM_PATH), so a sweep whose `command` passes no arguments works the same as
one that passes `${args}` or `${args_no_equals}`.

A run stopped by SIGTERM or Ctrl-C (an agent stopping it, a scheduler) ends like a run that
failed cleanly: its W&B run finishes with a non-zero exit code and a summary saying
`status: killed` and how far it got, runs.csv gets a `killed` row (the offline agent retries
it), and the process exits with 128 + the signal number. Files are written atomically, so
nothing half-written is left.
"""

import dataclasses
import os
import sys
import uuid

from . import threads
from . import sources
from .config import CALIBRATIONS, ENGINES, METHODS, PLANS, RunConfig
from .errors import ArgumentParser, UserError, cli
from .pipeline import (
    AGREEMENT_IMAGES,
    AUTO_BC_IMAGES,
    Progress,
    load_inputs,
    quantize_and_measure,
)
from .quant.choices import ROUNDINGS, WEIGHT_GRANULARITIES, WEIGHT_METHODS
from .signals import StopFlag, Stopped
from .sweep import results
from .tracking import WANDB_MODES, init_run, resolve_mode

KILLED = "killed"


def get_args_parser():
    d = RunConfig()
    p = ArgumentParser(
        prog="sweep.py",
        description="Quantize a trained MobileNetV2 checkpoint (post-training, or with "
                    "quantization-aware training), measure it, log it to W&B. "
                    "Also: `sweep.py --sweep YAML` (offline local sweep) and "
                    "`sweep.py --report DIR` (tables and plots).",
    )
    _model_flags(p.add_argument_group("model and bits"), d)
    _ptq_flags(p.add_argument_group("post-training quantization"), d)
    _qat_flags(p.add_argument_group("quantization-aware training (--method qat)"), d)
    _engine_flags(p.add_argument_group("engine"), d)
    _mixed_flags(p.add_argument_group("mixed precision (--plan)"), d)
    _io_flags(p.add_argument_group("data, results and tracking"), d)
    sources.add_arguments(p.add_argument_group(
        "a state dict's or torchvision:NAME's data (a checkpoint of train.py knows its own)"))
    return p


def _model_flags(g, d):
    """The model and bits flags; defaults from RunConfig `d`."""
    g.add_argument("--checkpoint", default=d.checkpoint,
                   help="the FP32 model: a checkpoint written by train.py, a MobileNetV2 "
                        "state dict file, or torchvision:IMAGENET1K_V1 / _V2 (default: "
                        "%(default)s)")
    g.add_argument("--weight_bits", type=int, default=d.weight_bits,
                   help="weight bits, 2..8 (16/32: FP32) (default: %(default)s)")
    g.add_argument("--activation_bits", type=int, default=d.activation_bits,
                   help="activation bits, 2..8 (16/32: FP32) (default: %(default)s)")
    g.add_argument("--method", default=d.method, choices=METHODS,
                   help="ptq: post-training quantization; qat: then fine-tune weights and "
                        "learned step sizes (LSQ) (default: %(default)s)")


def _ptq_flags(g, d):
    """The post-training quantization flags; defaults from RunConfig `d`."""
    g.add_argument("--calibration", default="auto", choices=CALIBRATIONS,
                   help="activation range calibration: absmax, 99.99th percentile, least "
                        "squared error per input, or mse then each clip moved to where the "
                        "network's output is closest to FP32's (quant/clip_search.py), kept only "
                        "if it scores higher on the validation images; auto: loss for "
                        "activations of 3 bits or fewer, else mse, layer by layer in a "
                        "mixed plan (default: %(default)s)")
    g.add_argument("--calib_batches", type=int, default=d.calib_batches,
                   help="calibration batches of training images (default: %(default)s)")
    g.add_argument("--calib_batch_size", type=int, default=d.calib_batch_size,
                   help="images per calibration batch (default: %(default)s)")
    g.add_argument("--weight_method", default=d.weight_method, choices=WEIGHT_METHODS,
                   help="per-channel weight scale: absmax, or the clip with the least "
                        "squared error (default: %(default)s)")
    g.add_argument("--weight_rounding", default=d.weight_rounding, choices=ROUNDINGS,
                   help="which grid point each weight takes: the nearest, or GPTQ's choice "
                        "that minimises each layer's output error on 128 calibration images "
                        "(layers with 8-bit weights keep the nearest) (default: gptq with "
                        "--method ptq, nearest with qat)")
    g.add_argument("--weight_granularity", default=d.weight_granularity,
                   choices=WEIGHT_GRANULARITIES,
                   help="weight scales per output channel, or one per tensor as in the "
                        "earlier projects (default: %(default)s)")
    g.add_argument("--bias_correction", default=str(d.bias_correction).lower(),
                   metavar="{true,false,auto}",
                   help="empirical bias correction after calibration, on the calibration "
                        f"images; auto: keep it only if it raises accuracy on {AUTO_BC_IMAGES} "
                        "validation images (at most --max_eval_samples), the ones train.py "
                        "held out (default: %(default)s)")
    g.add_argument("--equalize", default=str(d.equalize).lower(), metavar="{true,false}",
                   help="before calibration, scale each depthwise conv's input channels to "
                        "one range and its filters inversely (free for per-channel weights; "
                        "quant/equalize.py) (default: %(default)s)")


def _qat_flags(g, d):
    """The quantization-aware training (--method qat) flags; defaults from RunConfig `d`."""
    g.add_argument("--qat_epochs", type=float, default=d.qat_epochs,
                   help="QAT: epochs over the training images, fractions allowed "
                        "(default: %(default)s)")
    g.add_argument("--qat_lr", type=float, default=d.qat_lr,
                   help="QAT: initial learning rate, cosine to 0 (default: %(default)s)")
    g.add_argument("--qat_batch_size", type=int, default=d.qat_batch_size,
                   help="QAT: training batch size (default: %(default)s)")
    g.add_argument("--qat_freeze_bn", type=float, default=d.qat_freeze_bn,
                   help="QAT: fraction of the steps after which BatchNorm statistics are "
                        "frozen (default: %(default)s)")
    g.add_argument("--qat_checks", type=int, default=d.qat_checks,
                   help="QAT: times, evenly spaced, the model is scored on the validation "
                        "images train.py held out; the best one, the PTQ start included, is "
                        "kept (0: keep the last, unscored) (default: %(default)s)")
    g.add_argument("--distill", default=str(d.distill).lower(), metavar="{true,false}",
                   help="QAT: learn from the FP32 model's outputs (KL) instead of the labels "
                        "(default: %(default)s)")


def _engine_flags(g, d):
    """The engine flags; defaults from RunConfig `d`."""
    g.add_argument("--engine", default=d.engine, choices=ENGINES,
                   help="who measures quant_acc: PyTorch's fake-quantized model, or ONNX "
                        "Runtime running the exported int8 ONNX model (PyTorch then checks "
                        f"it on {AGREEMENT_IMAGES} images) (default: %(default)s)")


def _mixed_flags(g, d):
    """The mixed precision (--plan) flags; defaults from RunConfig `d`."""
    g.add_argument("--plan", default=d.plan, choices=PLANS,
                   help="bits per layer: uniform (the two flags above everywhere), adaptive "
                        "(weights 2/4/8 by block MACs, the costliest blocks fewest, activations "
                        "at --activation_bits), sensitivity (the best plan under --bitops_budget "
                        "from measured per-layer sensitivities) (default: %(default)s)")
    g.add_argument("--bitops_budget", default=None,
                   help="with --plan sensitivity: BitOps per image, in GBitOps (e.g. 0.9), "
                        "as a fraction of the W8A8 model's (e.g. 0.5x), as a uniform plan's "
                        "(e.g. w4a4), or as the adaptive plan's at --activation_bits (adaptive, "
                        "which --plan adaptive also accepts, so that one sweep compares the two)")
    g.add_argument("--size_budget_mb", default=None,
                   help="with --plan sensitivity, instead of --bitops_budget: the exported "
                        "file's size in MB (MiB, as compressed_mb counts it)")
    g.add_argument("--sensitivity_images", type=int, default=d.sensitivity_images,
                   help="with --plan sensitivity: training images the per-layer sensitivities "
                        "are measured on (cached per checkpoint) (default: %(default)s)")


def _io_flags(g, d):
    """The data, results and tracking flags; defaults from RunConfig `d`."""
    g.add_argument("--max_eval_samples", type=int, default=None,
                   help="evaluate on only the first N test images, and make the "
                        "--bias_correction auto choice on at most N validation images "
                        "(default: all test images, 2000 validation images)")
    g.add_argument("--data_dir", default=None,
                   help="dataset folder (default: the one the checkpoint was trained from)")
    g.add_argument("--results_dir", default=None,
                   help="runs.csv and exported models go to RESULTS_DIR/<sweep id or runs>/ "
                        "(default: $MOBILENET_COMPRESSION_RESULTS_DIR, else results)")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the calibration sampling and of QAT (default: %(default)s)")
    g.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu)")
    threads.add_argument(g)
    g.add_argument("--wandb_mode", default=None, choices=WANDB_MODES,
                   help="W&B mode (default: $WANDB_MODE, else online; offline by itself "
                        "without credentials)")


def main(argv=None):
    """Command-line entry: exit status 0, 2 for bad input (one line on stderr), 128 + the
    signal number for a run stopped by SIGTERM/SIGINT."""
    run_quantization(argv)
    return 0


@cli
def run_quantization(argv=None):
    """Parse `argv`, run, and return the metrics dict (also what tests call)."""
    progress = Progress()  # time/startup_s: process start to here
    progress.start("load")  # outside a sweep, the checkpoint is read before W&B starts
    parser = get_args_parser()
    flags = vars(parser.parse_args(argv))
    in_sweep = bool(os.environ.get("WANDB_SWEEP_PARAM_PATH"))
    config = loaded = None
    if not in_sweep:  # outside a sweep, bad flags fail before anything is written
        config = RunConfig.from_dict(flags)
        loaded = load_inputs(config)
    mode = resolve_mode(flags["wandb_mode"])
    run = None
    with StopFlag(defer=False):
        try:
            progress.start("wandb_init")
            if mode != "disabled":
                run = init_run(mode, "quantize", flags)
            if run is not None:
                config = RunConfig.from_dict({**flags, **dict(run.config)})
                run.config.update(dataclasses.asdict(config), allow_val_change=True)
            elif config is None:  # a sweep's run with W&B disabled: the flags are all
                config = RunConfig.from_dict(flags)
            loaded = loaded or load_inputs(config)
            metrics, record = quantize_and_measure(config, run, loaded, progress)
        except Stopped as stop:
            record_stopped(config, run, progress, stop.signum)
            sys.exit(128 + stop.signum)
        except BaseException as e:
            if run is not None:
                run.finish(exit_code=2 if isinstance(e, UserError) else 1)
            raise
        # W&B cannot record its own finish: that time and the final total are in runs.csv.
        progress.start("wandb_finish")
        if run is not None:
            run.finish()
        progress.start(None)
        extra = {**progress.times, "time/total_s": progress.total()}
        record(extra)
    return {**metrics, **extra}


def record_stopped(config, run, progress, signum):
    """A stopped run's record: W&B summary (status killed, the stage it reached, what it had
    measured) and exit code, and a `killed` row in runs.csv."""
    import signal

    done = {"status": KILLED, "exit_code": 128 + signum,
            "stopped_by": signal.Signals(signum).name,
            "stopped_in": progress.stage, **progress.done}
    print(f"stopped by {done['stopped_by']} in stage {progress.stage}; recorded as killed",
          file=sys.stderr)
    if config is not None:
        results.append_run(config.results_dir or results.default_results_dir(),
                           os.environ.get("WANDB_SWEEP_ID") or None, {
                               "run_id": run.id if run is not None else uuid.uuid4().hex[:8],
                               **config.run_parameters(), **done,
                               "checkpoint": config.checkpoint})
    if run is not None:
        run.summary.update(done)
        run.finish(exit_code=128 + signum)


