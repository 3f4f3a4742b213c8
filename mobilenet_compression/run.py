"""One quantization run: what `python sweep.py --checkpoint ... --weight_bits 4
--activation_bits 8` does, and what `wandb agent` launches for every run of a sweep.

The flow, each step a named function a reader can find (`quantize_and_measure`):

    config  = RunConfig.from_dict(flags, or flags overridden by wandb.config)
    loaded  = load_model(checkpoint)                     FP32 model + its metadata
    d       = load_step(...)                             threads, device, data splits, ids
    plan    = run_plan(...)                              bits per layer (mixed/planner.py)
    baseline_accuracy(...)                               FP32 test accuracy, cached per sweep
    quantize_step(...)                                   quant/recipe.py's post-training
                                                         steps (equalize, calibrate, GPTQ,
                                                         clip search, bias correction), the
                                                         plan against its uniform rival, QAT
    convert(qmodel)                                      freeze
    attach_output_grids(...)                             at 8-bit inputs, the residual adds'
                                                         and last conv's 8-bit grids the
                                                         integer engine needs
    evaluate_step(...)                                   quant_acc (torch engine)
    export_step(...)                                     the safetensors file, sizes, BitOps
    onnx_step(...)                                       ONNX file in ONNX Runtime: onnx_*
                                                         (quant_acc with --engine onnxruntime)
    log_step(...)                                        W&B summary/artifact, runs.csv row

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
import json
import os
import sys
import time
import uuid

from filelock import FileLock

from . import bitops, fp32_stats, threads
from .deploy import onnx_export
from .checkpoint import file_digest, load_model
from .config import (
    CALIBRATIONS,
    ENGINES,
    METHODS,
    PLANS,
    WEIGHT_GRANULARITIES,
    WEIGHT_METHODS,
    RunConfig,
)
from .data import BatchLoader, load_dataset
from .errors import ArgumentParser, UserError, cli
from .evaluation import EVAL_BATCH_SIZE, eval_loader, evaluate, predict
from .deploy.export import MIB, compression_metrics, export_quantized, load_quantized
from .files import atomic_write
from .processes import process_age_s
from .quant.convert import convert
from .quant.equalize import equalize_depthwise_inputs
from .quant.output_grids import attach_output_grids
from .quant.precision import mean_bits
from .quant.prepare import precision_plan
from .quant.qat import train_qat
from .quant.recipe import post_training_quantize
from .quant.rounding import ROUNDINGS
from .signals import StopFlag, Stopped
from .sweep import results
from .tracking import WANDB_MODES, init_run, resolve_mode
from .train import resolve_device

KILLED = "killed"
# With --engine onnxruntime, PyTorch's fake-quantized model is still run on this many test
# images, to check the engine against it (onnx_agreement).
AGREEMENT_IMAGES = 1000
# --bias_correction auto compares the model with and without it on this many validation
# images (the split train.py held out): paired on the same images, a difference of a point
# is well above the noise, and the A4 cells where the choice matters differ by 1 to 9.
AUTO_BC_IMAGES = 2000


def get_args_parser():
    d = RunConfig()
    p = ArgumentParser(
        prog="sweep.py",
        description="Quantize a trained MobileNetV2 checkpoint (post-training, or with "
                    "quantization-aware training), measure it, log it to W&B. "
                    "Also: `sweep.py --sweep YAML` (offline local sweep) and "
                    "`sweep.py --report DIR` (tables and plots).",
    )
    g = p.add_argument_group("model and bits")
    g.add_argument("--checkpoint", default=d.checkpoint,
                   help="FP32 checkpoint written by train.py (default: %(default)s)")
    g.add_argument("--weight_bits", type=int, default=d.weight_bits,
                   help="weight bits, 2..8 (16/32: FP32) (default: %(default)s)")
    g.add_argument("--activation_bits", type=int, default=d.activation_bits,
                   help="activation bits, 2..8 (16/32: FP32) (default: %(default)s)")
    g.add_argument("--method", default=d.method, choices=METHODS,
                   help="ptq: post-training quantization; qat: then fine-tune weights and "
                        "learned step sizes (LSQ) (default: %(default)s)")
    g = p.add_argument_group("post-training quantization")
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
    g = p.add_argument_group("quantization-aware training (--method qat)")
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
    g = p.add_argument_group("engine")
    g.add_argument("--engine", default=d.engine, choices=ENGINES,
                   help="who measures quant_acc: PyTorch's fake-quantized model, or ONNX "
                        "Runtime running the exported int8 ONNX model (PyTorch then checks "
                        f"it on {AGREEMENT_IMAGES} images) (default: %(default)s)")
    g = p.add_argument_group("mixed precision (--plan)")
    g.add_argument("--plan", default=d.plan, choices=PLANS,
                   help="bits per layer: uniform (the two flags above everywhere), adaptive "
                        "(weights 2/4/8 by block MACs, the costliest blocks fewest, activations "
                        "at --activation_bits), sensitivity (the best plan under --bitops_budget "
                        "from measured per-layer sensitivities) (default: %(default)s)")
    g.add_argument("--bitops_budget", default=None,
                   help="with --plan sensitivity: BitOps per image, in GBitOps (e.g. 0.9), "
                        "as a fraction of the W8A8 model's (e.g. 0.5x), or as a uniform plan's "
                        "(e.g. w4a4)")
    g.add_argument("--size_budget_mb", default=None,
                   help="with --plan sensitivity, instead of --bitops_budget: the exported "
                        "file's size in MB (MiB, as compressed_mb counts it)")
    g.add_argument("--sensitivity_images", type=int, default=d.sensitivity_images,
                   help="with --plan sensitivity: training images the per-layer sensitivities "
                        "are measured on (cached per checkpoint) (default: %(default)s)")
    g = p.add_argument_group("data, results and tracking")
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
    return p


def baseline_accuracy(model, loader, cache_dir, key):
    """FP32 test accuracy of the checkpoint, measured once per (checkpoint, test set) and
    cached beside runs.csv: every run of a sweep compares against the same measured number
    instead of re-evaluating the FP32 model 25 times."""
    path = os.path.join(cache_dir, "baseline_acc.json")
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with FileLock(os.path.join(cache_dir, ".baseline_acc.json.lock"), timeout=600):
            cache = {}
            if os.path.exists(path):
                try:
                    cache = json.loads(open(path).read())
                except ValueError:  # a cache, not a result: measure again and rewrite it
                    print(f"{path} is not valid JSON; measuring the baseline again.")
            if key not in cache:
                cache[key] = evaluate(model, loader, fold=True)
                atomic_write(path, lambda f: f.write(json.dumps(cache, indent=1).encode()))
    except OSError as e:
        raise UserError(f"cannot write to the results directory {cache_dir} ({e.strerror}); "
                        f"pass --results_dir a directory you can write to.") from None
    return cache[key]


def main(argv=None):
    """Command-line entry: exit status 0, 2 for bad input (one line on stderr), 128 + the
    signal number for a run stopped by SIGTERM/SIGINT."""
    run_quantization(argv)
    return 0


class Progress:
    """What a run has done so far, for the record a stopped run leaves."""

    def __init__(self):
        self.stage = None
        self.done = {}
        self.t0 = self._t = time.perf_counter()
        startup = process_age_s()
        self.times = {} if startup is None else {"time/startup_s": startup}

    def start(self, stage):
        """Begin `stage` (None: the end); the one before it is timed as time/<stage>_s
        (added up, when a stage comes back)."""
        now = time.perf_counter()
        if self.stage is not None:
            key = f"time/{self.stage}_s"
            self.times[key] = self.times.get(key, 0.0) + now - self._t
        self.stage, self._t = stage, now

    def total(self):
        """Seconds since the process started (since this object was made, plus startup)."""
        return time.perf_counter() - self.t0 + self.times.get("time/startup_s", 0.0)


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
        loaded = load_model(config.checkpoint)
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
            loaded = loaded or load_model(config.checkpoint)
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


def load_run_data(config, ckpt, device):
    """(info, train split for calibration and QAT, validation split, test split), on `device`.
    The splits are train.py's own: the validation images were held out of training, and only
    `--bias_correction auto` reads them, to choose."""
    data_dir = config.data_dir or ckpt.get("args", {}).get("data_dir") or "./data"
    info, train, val, test = load_dataset(ckpt["dataset"], data_dir,
                                          ckpt.get("args", {}).get("val_size"))
    # A quick run (--max_eval_samples N) also chooses on at most N validation images.
    val_images = min(AUTO_BC_IMAGES, config.max_eval_samples or AUTO_BC_IMAGES)
    return (info, train.to(device), val.head(val_images).to(device),
            test.head(config.max_eval_samples).to(device))


@dataclasses.dataclass
class RunData:
    """What the steps of one run share: the checkpoint, its data, where the run writes."""
    config: RunConfig
    run: object  # the W&B run, or None
    progress: Progress
    ckpt: dict
    fp32: object
    device: object
    info: object
    train: object
    val: object
    test: object
    results_dir: str
    sweep_id: str
    run_id: str
    checkpoint_sha256: str
    threads: int

    @property
    def out_dir(self):
        return str(results.sweep_dir(self.results_dir, self.sweep_id))


def quantize_and_measure(config, run, loaded, progress):
    """One run as named steps: load -> plan -> baseline -> quantize (quant/recipe.py, and QAT)
    -> convert -> evaluate -> export and measure -> ONNX -> log. Returns (metrics, a function
    that writes the runs.csv row)."""
    d = load_step(config, run, loaded, progress)
    progress.start("plan")  # a budget no plan meets fails here, before anything is written
    plan, planning = run_plan(config, d.ckpt, d.fp32, d.info, d.train)
    progress.start("baseline")
    test_loader = eval_loader(d.test, d.info, EVAL_BATCH_SIZE)
    key = f"{d.checkpoint_sha256[:16]}:{len(d.test)}:{d.device.type}"
    baseline_acc = baseline_accuracy(d.fp32, test_loader, d.out_dir, key)
    progress.done["baseline_acc"] = baseline_acc
    qmodel, chosen, layer_calibration, qat, calib_loader = quantize_step(d, plan, planning)
    convert(qmodel)
    attach_output_grids(qmodel, calib_loader, config.calib_batches)
    progress.start("eval")
    torch_logits, quant_acc, eval_s = evaluate_step(d, qmodel)
    progress.start("export")
    model_path, roundtrip, rows, totals, size = export_step(d, qmodel, planning)
    onnx = {}
    if onnx_export.onnx_exportable(qmodel) and onnx_export.available():
        progress.start("onnx")
        onnx = onnx_step(d, qmodel, model_path, test_loader, torch_logits)
        size["onnx_mb"] = onnx.pop("onnx_mb")
        if config.engine == "onnxruntime":
            quant_acc, eval_s = onnx["onnx_acc"], onnx["onnx_eval_s"]
        progress.start("log")
    metrics = {
        **config.run_parameters(),
        **plan_bits(rows),
        **({"bitops_budget": planning["budget"]} if planning["budget"] is not None else {}),
        "baseline_acc": baseline_acc,
        "quant_acc": quant_acc,
        "acc_drop": baseline_acc - quant_acc,
        **size,
        **totals,
        **chosen,
        **qat,
        **onnx,
        "engine": config.engine,
        "eval_images": len(d.test),
        "eval_seconds": eval_s,
        "eval_images_per_s": len(d.test) / eval_s,
        "roundtrip_max_abs_diff": roundtrip,
        **progress.times,
        "run_seconds": progress.total(),
    }
    metrics["time/total_s"] = metrics["run_seconds"]  # runs.csv: to the end of W&B's finish
    return log_step(d, metrics, chosen, rows, layer_calibration, model_path)


def load_step(config, run, loaded, progress):
    """The run's threads, device, data splits and identity (sweep, run id, checkpoint hash)."""
    n_threads = threads.set_threads(config.threads)  # torch's, and ONNX Runtime's below
    ckpt, fp32 = loaded
    device = resolve_device(config.device)
    progress.start("load")
    info, train, val, test = load_run_data(config, ckpt, device)
    fp32.to(device)
    return RunData(
        config=config, run=run, progress=progress, ckpt=ckpt, fp32=fp32, device=device,
        info=info, train=train, val=val, test=test,
        results_dir=config.results_dir or results.default_results_dir(),
        sweep_id=os.environ.get("WANDB_SWEEP_ID") or None,
        run_id=run.id if run is not None and run.id else uuid.uuid4().hex[:8],
        checkpoint_sha256=file_digest(config.checkpoint), threads=n_threads)


def quantize_step(d, plan, planning):
    """The quantized model the run measures: the post-training recipe on the (equalized) FP32
    network, the plan against its uniform rival, then QAT if asked. Returns (qmodel, the
    held-out choices made, {layer: its calibration}, QAT's metrics, the calibration loader)."""
    config, progress = d.config, d.progress
    progress.start("calibrate")
    calib = d.train.head(config.calib_batches * config.calib_batch_size)
    calib_loader = BatchLoader(calib, d.info, config.calib_batch_size, channels_last=True)
    # The FP32 network the quantized one is made from: with --equalize, the same function
    # with each depthwise conv's input channels on one range (quant/equalize.py). The
    # baseline, and QAT's teacher, stay the checkpoint's own network.
    # What the FP32 network does on these images is the same in every run of a sweep:
    # measured once per checkpoint and read back by the others (fp32_stats).
    stats_key = (d.checkpoint_sha256, config.calib_batches, config.calib_batch_size,
                 d.device.type)
    source = d.fp32
    if config.equalize:
        maxes = fp32_stats.depthwise_maxes(d.fp32, calib_loader, config.calib_batches,
                                           stats_key)
        source, _ = equalize_depthwise_inputs(d.fp32, calib_loader, config.calib_batches,
                                              maxes)
    means = None
    if config.bias_correction:  # True or "auto"
        means = fp32_stats.channel_means(source, calib_loader, config.calib_batches,
                                         stats_key, config.equalize)
    # Both held-out choices (the searched clips, the bias correction) score on the validation
    # images train.py kept out of training; the first one's score is the second's "without".
    val_loader = eval_loader(d.val, d.info, EVAL_BATCH_SIZE)

    def val_score(model):
        return evaluate(model, val_loader, fold=True)

    qmodel, chosen, score_now, layer_calibration = post_training_quantize(
        config, plan, source, calib_loader, means, val_score, progress, len(d.val))
    if config.plan == "sensitivity":
        qmodel, chosen, score_now, layer_calibration = keep_plan_or_uniform(
            config, (qmodel, chosen, score_now, layer_calibration), planning, d.fp32, d.info,
            source, calib_loader, means, val_score, progress, len(d.val))
    qat = {}
    if config.method == "qat":
        progress.start("qat")
        run = d.run
        qat = train_qat(qmodel, d.train, d.info, config,
                        weight_decay=d.ckpt.get("args", {}).get("weight_decay", 4e-5),
                        teacher=d.fp32 if config.distill else None,
                        log=(lambda row, step: run.log(row, step=step)) if run else None,
                        score=val_score, score_start=score_now)
        progress.done.update(qat)
    return qmodel, chosen, layer_calibration, qat, calib_loader


def evaluate_step(d, qmodel):
    """(logits, quant_acc, seconds) of the converted model in PyTorch. The torch engine
    measures quant_acc on every test image; with onnxruntime the engine does, and PyTorch
    only checks it on the first AGREEMENT_IMAGES."""
    torch_test = d.test if d.config.engine == "torch" else d.test.head(AGREEMENT_IMAGES)
    print(f"evaluating on {len(d.test)} test images ({d.config.engine})", flush=True)
    t_eval = time.perf_counter()
    torch_logits, labels = predict(qmodel, eval_loader(torch_test, d.info, EVAL_BATCH_SIZE))
    eval_s = time.perf_counter() - t_eval
    quant_acc = onnx_export.accuracy(torch_logits, labels)
    d.progress.done["quant_acc"] = quant_acc
    return torch_logits, quant_acc, eval_s


def run_label(config):
    return (f"w{config.weight_bits}a{config.activation_bits}" if config.plan == "uniform"
            else config.plan)


def export_step(d, qmodel, planning):
    """The real file (reloaded and checked), the BitOps table and the size metrics. Returns
    (file path, round-trip logit difference, BitOps rows, BitOps totals, size metrics)."""
    config, info = d.config, d.info
    model_path = os.path.join(d.out_dir, "models", f"{d.run_id}-{run_label(config)}-"
                                                   f"{config.method}.safetensors")
    roundtrip = export_and_check(qmodel, d.ckpt, model_path, d.test, info, d.device,
                                 {"method": config.method,
                                  "checkpoint_sha256": d.checkpoint_sha256})
    rows, totals = bitops.bitops_report(d.fp32, info.input_size, precision_plan(qmodel))
    size = compression_metrics(qmodel, d.ckpt["model"], model_path, info.input_size,
                               info.in_channels)
    size_limit = planning["size"] and planning["size"][1]
    if size_limit is not None and os.path.getsize(model_path) > size_limit:
        raise RuntimeError(f"the plan's file is {os.path.getsize(model_path)} bytes, over the "
                           f"size budget of {int(size_limit)}: the size prediction is wrong")
    return model_path, roundtrip, rows, totals, size


def onnx_step(d, qmodel, model_path, test_loader, torch_logits):
    """The ONNX file beside the safetensors one, run in ONNX Runtime: its onnx_* metrics, its
    agreement with PyTorch's logits, and its size (onnx_mb)."""
    info = d.info
    onnx_path = model_path.removesuffix(".safetensors") + ".onnx"
    onnx, onnx_logits = onnx_export.measure_onnx(
        qmodel, d.fp32, onnx_path, test_loader,
        (info.in_channels, info.input_size, info.input_size), d.threads)
    onnx["onnx_agreement"] = onnx_export.agreement(torch_logits,
                                                   onnx_logits[:len(torch_logits)])
    onnx["onnx_agreement_images"] = len(torch_logits)
    onnx["onnx_mb"] = os.path.getsize(onnx_path) / MIB
    return onnx


def log_step(d, metrics, chosen, rows, layer_calibration, model_path):
    """The result line, the W&B summary and artifact; returns (metrics, the runs.csv writer)."""
    config = d.config
    print(f"{run_label(config).upper()} {config.method} "
          f"({config.calibration}, {config.weight_granularity}"
          f"{choice_words(config, chosen)}): quant_acc "
          f"{metrics['quant_acc']:.2f} (FP32 {metrics['baseline_acc']:.2f}, drop "
          f"{metrics['acc_drop']:.2f}), {metrics['compressed_mb']:.3f} MB "
          f"(x{metrics['compression_ratio']:.2f}), {metrics['bitops'] / 1e9:.3f} GBitOps -> "
          f"{model_path}")
    if d.run is not None:
        log_run(d.run, metrics, [{**r, "calibration": layer_calibration.get(r["name"], "fp32")}
                                 for r in rows], model_path, d.ckpt, config)
    row = {"run_id": d.run_id, **metrics, "checkpoint": config.checkpoint,
           "dataset": d.ckpt["dataset"], "width_multiplier": d.ckpt["width_multiplier"]}
    return metrics, lambda extra: results.append_run(d.results_dir, d.sweep_id,
                                                     {**row, **extra})


def keep_plan_or_uniform(config, planned, planning, fp32, info, source, calib_loader, means,
                         val_score, progress, val_images=None):
    """A sensitivity plan against the best uniform configuration within the same budget
    (planner.best_uniform: the least summed sensitivity among the uniform plans whose BitOps,
    or predicted file size, fit), each quantized as the run quantizes, scored on the
    validation images; the better one is kept (a tie keeps the plan). Returns the kept
    model's (qmodel, chosen, score, layer calibration), its choices with `plan_kept`,
    `plan_val_acc`, `uniform_val_acc` and `uniform_rival` added."""
    from .mixed import planner

    qmodel, chosen, score, layer_calibration = planned
    rival = planner.best_uniform(fp32, info.input_size, planning["table"],
                                 planning["budget"], size=planning["size"])
    plan = precision_plan(qmodel)
    if rival is None or set(plan.values()) == {rival}:
        return qmodel, {**chosen, "plan_kept": "plan"}, score, layer_calibration
    print(f"the plan against uniform W{rival[0]}A{rival[1]}, the best uniform configuration "
          f"within the same budget:", flush=True)
    uniform = post_training_quantize(config, rival, source, calib_loader, means, val_score,
                                     progress, val_images)
    scores = [score if score is not None else val_score(qmodel),
              uniform[2] if uniform[2] is not None else val_score(uniform[0])]
    keep_plan = scores[0] >= scores[1]
    kept = planned if keep_plan else uniform
    print(f"kept the {'plan' if keep_plan else 'uniform configuration'} ({scores[0]:.2f}% "
          f"plan, {scores[1]:.2f}% uniform W{rival[0]}A{rival[1]}, on "
          f"{val_images or 'the'} validation images)", flush=True)
    return kept[0], {**kept[1], "plan_kept": "plan" if keep_plan else "uniform",
                     "plan_val_acc": scores[0], "uniform_val_acc": scores[1],
                     "uniform_rival": f"w{rival[0]}a{rival[1]}"}, \
        scores[0] if keep_plan else scores[1], kept[3]


def choice_words(config, chosen):
    words = ""
    if "plan_kept" in chosen and chosen["plan_kept"] == "uniform":
        words = f", uniform {chosen['uniform_rival'].upper()} kept over the plan"
    if "clip_search_used" in chosen:
        words += f", clips {'searched' if chosen['clip_search_used'] else 'from mse'}"
    if config.bias_correction == "auto":
        return words + (f", bias correction auto: "
                        f"{'on' if chosen['bias_correction_used'] else 'off'}")
    return words + (", bias correction" if config.bias_correction else "")


def run_plan(config, ckpt, fp32, info, train):
    """(the precision plan quantize_model takes, {"budget": BitOps or None, "size": (fixed
    bytes, byte budget) or None, "table": the sensitivity table or None})."""
    none = {"budget": None, "size": None, "table": None}
    if config.plan == "uniform":
        return (config.weight_bits, config.activation_bits), none
    if config.plan == "adaptive":
        return bitops.adaptive_plan(fp32, info.input_size, config.activation_bits), none
    from .mixed import planner, sensitivity

    budget = size = None
    if config.bitops_budget:
        budget = planner.parse_budget(config.bitops_budget, fp32, info.input_size)
    else:
        fixed = planner.size_model(config.checkpoint, ckpt, fp32, train, info,
                                   config.bias_correction, config.equalize)
        size = (fixed, planner.parse_size_budget(config.size_budget_mb, fixed, fp32))
    n = config.sensitivity_images  # 256 (the default) is the CLI's 2 x 128: the same cache
    batches, batch_size = (n // 128, 128) if n % 128 == 0 else (1, n)
    # Each layer priced with the calibration it will get: its clip searched at the bits
    # where --calibration auto searches it (`loss` searches every layer, but at 4 bits and
    # more it ties with mse), else the run's own method.
    table, _ = sensitivity.sensitivity(
        config.checkpoint, config.data_dir, batches, batch_size,
        calibration="auto" if config.calibration in ("auto", "loss") else config.calibration,
        rounding=config.weight_rounding, equalize=config.equalize)
    plan = planner.sensitivity_plan(fp32, info.input_size, table, budget, size=size)
    return plan, {"budget": budget, "size": size, "table": table}


def plan_bits(rows):
    """weight_bits / activation_bits of the run, from the quantized model's own plan: the
    bits themselves when every quantized layer has the same, else the MAC-weighted means."""
    plan = {r["name"]: (r["weight_bits"], r["activation_bits"]) for r in rows
            if (r["weight_bits"], r["activation_bits"]) != (32, 32)}
    if len(set(plan.values())) == 1:
        wb, ab = next(iter(plan.values()))
    else:
        wb, ab = mean_bits(plan, {r["name"]: r["macs"] for r in rows})
    return {"weight_bits": wb, "activation_bits": ab}


def export_and_check(qmodel, ckpt, model_path, test, info, device, run_metadata):
    """Write the real file (with the checkpoint's metadata and `run_metadata`), load it back
    and return the largest logit difference on 256 test images (0.0 when the file holds
    exactly the model)."""
    os.makedirs(os.path.dirname(model_path), exist_ok=True)
    export_quantized(qmodel, model_path, {**{k: ckpt[k] for k in (
        "arch", "dataset", "num_classes", "in_channels", "input_size", "width_multiplier")},
        **run_metadata})
    probe = BatchLoader(test.head(256), info, 256, channels_last=True)
    reloaded = load_quantized(model_path).to(device)
    return float((predict(qmodel, probe)[0] - predict(reloaded, probe)[0]).abs().max())


def log_run(run, metrics, rows, model_path, ckpt, config):
    """W&B: summary metrics, the per-layer BitOps table, the exported file as an artifact."""
    import wandb

    run.summary.update({**metrics, "status": results.FINISHED})
    columns = ["name", "type", "in_channels", "out_channels", "kernel", "stride",
               "input_hw", "output_hw", "macs", "weight_bits", "activation_bits", "calibration",
               "bitops", "bitops_share", "weight_bitops"]
    total = sum(r["bitops"] for r in rows)
    table = wandb.Table(columns=columns, data=[
        ["x".join(map(str, r[c])) if isinstance(r[c], tuple) else r[c] for c in columns]
        for r in ({**r, "bitops_share": r["bitops"] / total} for r in rows)])
    # The plan, layer by layer (a mixed plan's bits differ from layer to layer): the table and
    # one bar chart per kind of bits, in the order of the network.
    run.log({"bitops_per_layer": table,
             "bits_per_layer/weight": wandb.plot.bar(table, "name", "weight_bits",
                                                title="weight bits per layer"),
             "bits_per_layer/activation": wandb.plot.bar(table, "name", "activation_bits",
                                                    title="activation bits per layer")})
    label = (f"w{config.weight_bits}a{config.activation_bits}" if config.plan == "uniform"
             else f"{config.plan}-{config.bitops_budget or ''}"
                  f"{config.size_budget_mb and f'{config.size_budget_mb:g}mb' or ''}".rstrip("-"))
    artifact = wandb.Artifact(
        f"mobilenetv2-{ckpt['dataset']}-w{ckpt['width_multiplier']:g}-{label}-{config.method}",
        type="quantized-model", metadata=metrics)
    artifact.add_file(model_path)
    onnx_path = model_path.removesuffix(".safetensors") + ".onnx"
    if os.path.exists(onnx_path):  # the ONNX QDQ file (onnx_export.py), beside it
        artifact.add_file(onnx_path)
    run.log_artifact(artifact)
    if run.settings.mode == "online":
        try:  # lineage: the baseline model artifact logged by train.py, if it is there
            run.use_artifact(f"mobilenetv2-{ckpt['dataset']}-"
                             f"w{ckpt['width_multiplier']:g}:latest")
        except Exception as e:  # a checkpoint trained with W&B disabled has none
            print(f"W&B: no baseline model artifact to link ({type(e).__name__}).")
