"""One quantization run as named steps (`quantize_and_measure`), from a RunConfig and the
loaded checkpoint to its metrics and its runs.csv row; run.py gives it the command line and
the W&B run.

    d       = load_step(...)                             threads, device, data splits, ids
    plan    = plan_step(...)                             bits per layer (quant/plan.py):
                                                         uniform, adaptive, or sensitivity
                                                         (mixed.sensitivity's table) under a
                                                         BitOps or size budget
    baseline_accuracy(...)                               FP32 test accuracy, cached per sweep;
                                                         val_score for the held-out choices
    quantize_step(...)                                   quant/recipe.py's post-training
                                                         steps (equalize, calibrate, GPTQ,
                                                         clip search, bias correction), the
                                                         plan against its uniform rival, QAT
    convert(qmodel)                                      freeze
    attach_output_grids(...)                             at 8-bit inputs, the residual adds'
                                                         and last conv's 8-bit grids the
                                                         integer engine needs
    bitops_report(...)                                   the plan's MACs and BitOps
    evaluate_step(...)                                   quant_acc (torch engine)
    export_step(...)                                     the safetensors file, its sizes
    onnx_step(...)                                       ONNX file in ONNX Runtime: onnx_*
                                                         (quant_acc with --engine onnxruntime)
    log_step(...)                                        W&B summary/artifact, runs.csv row
"""

import dataclasses
import json
import os
import time
import uuid

from filelock import FileLock

from . import threads
from .quant import fp32_stats
from .config import RunConfig
from .deploy import onnx_export, onnx_runtime
from .deploy.export import export_quantized, load_quantized
from .deploy.size import MIB, compression_metrics, size_model
from .errors import UserError
from .evaluation import (
    EVAL_BATCH_SIZE,
    accuracy,
    agreement,
    eval_loader,
    evaluate,
    largest_difference,
    predict,
)
from .files import atomic_write
from .processes import process_age_s
from .sources import export_metadata, load_data, load_model, source_digest
from .mixed.sensitivity import run_table
from .quant.bitops import bitops_report
from .quant.convert import convert
from .quant.equalize import equalize_depthwise_inputs
from .quant.output_grids import attach_output_grids
from .quant.plan import keep_plan_or_uniform, plan_bits, plan_budgets, run_plan
from .quant.prepare import precision_plan
from .quant.qat import train_qat
from .quant.recipe import post_training_quantize
from .sweep import results
from .tracking import log_run

# With --engine onnxruntime, PyTorch's fake-quantized model is still run on this many test
# images, to check the engine against it (onnx_agreement).
AGREEMENT_IMAGES = 1000
# --bias_correction auto compares the model with and without it on this many validation
# images (the split train.py held out): paired on the same images, a difference of a point
# is well above the noise, and the A4 cells where the choice matters differ by 1 to 9.
AUTO_BC_IMAGES = 2000


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
    metadata: dict  # what the exported files record of the model's source
    threads: int

    @property
    def out_dir(self):
        return str(results.sweep_dir(self.results_dir, self.sweep_id))


def quantize_and_measure(config, run, loaded, progress):
    """One run as named steps: load -> plan -> baseline -> quantize (quant/recipe.py, and QAT)
    -> convert -> evaluate -> export and measure -> ONNX -> log. Returns (metrics, a function
    that writes the runs.csv row)."""
    d = load_step(config, run, loaded, progress)
    progress.start("plan")
    plan, planning = plan_step(d)
    progress.start("baseline")
    key = f"{d.checkpoint_sha256[:16]}:{len(d.test)}:{d.device.type}"
    baseline_acc = baseline_accuracy(d.fp32, d.test, d.info, d.out_dir, key)
    progress.done["baseline_acc"] = baseline_acc
    # Both held-out choices (the searched clips, the bias correction) score on the validation
    # images train.py kept out of training; the first one's score is the second's "without".
    val_loader = eval_loader(d.val, d.info, EVAL_BATCH_SIZE)

    def val_score(model):
        return evaluate(model, val_loader, fold=True)

    qmodel, chosen, layer_calibration, qat, calib_loader = quantize_step(d, plan, planning,
                                                                         val_score)
    convert(qmodel)
    attach_output_grids(qmodel, calib_loader, config.calib_batches)
    layer_bits = precision_plan(qmodel)
    rows, totals = bitops_report(d.fp32, d.info.input_size, layer_bits)
    progress.start("eval")
    torch_logits, quant_acc, eval_s, data = evaluate_step(d, qmodel)
    progress.start("export")
    model_path, roundtrip, size = export_step(d, qmodel, planning, rows, layer_bits)
    onnx = onnx_step(d, qmodel, model_path, torch_logits)
    if onnx:
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
        **data,
        "roundtrip_max_abs_diff": roundtrip,
        **progress.times,
        "run_seconds": progress.total(),
    }
    metrics["time/total_s"] = metrics["run_seconds"]  # runs.csv: to the end of W&B's finish
    return log_step(d, metrics, chosen, rows, layer_calibration, model_path)


def load_inputs(config):
    """The model and its images, as (ckpt, FP32 model, (info, train, val, test)): every way
    the source or the data is wrong is a UserError here, before anything is written."""
    ckpt, fp32 = load_model(config.checkpoint, config.source_options())
    return ckpt, fp32, load_data(ckpt, config.data_dir, config.workers)


def load_step(config, run, loaded, progress):
    """The run's threads, device, data splits and identity (sweep, run id, checkpoint hash)."""
    n_threads = threads.set_threads(config.threads)  # torch's, and ONNX Runtime's below
    ckpt, fp32, data = loaded
    device = threads.resolve_device(config.device)
    progress.start("load")
    digest = source_digest(ckpt, config.data_dir)
    info, train, val, test = run_splits(config, data, device)
    fp32.to(device)
    return RunData(
        config=config, run=run, progress=progress, ckpt=ckpt, fp32=fp32, device=device,
        info=info, train=train, val=val, test=test,
        results_dir=config.results_dir or results.default_results_dir(),
        sweep_id=os.environ.get("WANDB_SWEEP_ID") or None,
        run_id=run.id if run is not None and run.id else uuid.uuid4().hex[:8],
        checkpoint_sha256=digest, metadata=export_metadata(ckpt, digest), threads=n_threads)


def run_splits(config, data, device):
    """(info, train split for calibration and QAT, validation split, test split), on `device`.
    The splits are train.py's own: the validation images were held out of training, and only
    the validation choices (`--bias_correction auto`, QAT's checks) read them."""
    info, train, val, test = data
    # A quick run (--max_eval_samples N) also chooses on at most N validation images.
    val_images = min(AUTO_BC_IMAGES, config.max_eval_samples or AUTO_BC_IMAGES)
    return (info, train.to(device), val.head(val_images).to(device),
            test.head(config.max_eval_samples).to(device))


def plan_step(d):
    """The run's precision plan and its planning (quant/plan.py): a budget no plan meets
    fails first, before the sensitivities are measured and before anything is written."""
    config = d.config
    fixed = None
    if config.plan == "sensitivity" and config.size_budget_mb:
        fixed = size_model(d.metadata, d.fp32, d.train, d.info, config.bias_correction,
                           config.equalize)
    budgets = plan_budgets(config, d.fp32, d.info, fixed)
    table = run_table(config) if config.plan == "sensitivity" else None
    return run_plan(config, d.fp32, d.info, budgets, table)


def baseline_accuracy(model, test, info, cache_dir, key):
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
                cache[key] = evaluate(model, eval_loader(test, info), fold=True)
                atomic_write(path, lambda f: f.write(json.dumps(cache, indent=1).encode()))
    except OSError as e:
        raise UserError(f"cannot write to the results directory {cache_dir} ({e.strerror}); "
                        f"pass --results_dir a directory you can write to.") from None
    return cache[key]


def quantize_step(d, plan, planning, val_score):
    """The quantized model the run measures: the post-training recipe on the (equalized) FP32
    network, the plan against its uniform rival, then QAT if asked; the held-out choices
    score with `val_score` (model -> validation accuracy). Returns (qmodel, the
    held-out choices made, {layer: its calibration}, QAT's metrics, the calibration loader)."""
    config, progress = d.config, d.progress
    progress.start("calibrate")
    calib = d.train.head(config.calib_batches * config.calib_batch_size)
    calib_loader = calib.loader(d.info, config.calib_batch_size, channels_last=True)
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
    """(logits, quant_acc, seconds, data pipeline metrics) of the converted model in PyTorch.
    The torch engine measures quant_acc on every test image; with onnxruntime the engine
    does, and PyTorch only checks it on the first AGREEMENT_IMAGES. Images streamed from a
    folder add `data_wait_s`, the seconds the network waited for decoded images."""
    torch_test = d.test if d.config.engine == "torch" else d.test.head(AGREEMENT_IMAGES)
    print(f"evaluating on {len(d.test)} test images ({d.config.engine})", flush=True)
    t_eval = time.perf_counter()
    loader = eval_loader(torch_test, d.info, EVAL_BATCH_SIZE)
    torch_logits, labels = predict(qmodel, loader)
    eval_s = time.perf_counter() - t_eval
    quant_acc = accuracy(torch_logits, labels)
    d.progress.done["quant_acc"] = quant_acc
    data = {"data_wait_s": loader.wait_s} if hasattr(loader, "wait_s") else {}
    return torch_logits, quant_acc, eval_s, data


def export_step(d, qmodel, planning, rows, layer_bits):
    """The real file and the size metrics (`layer_bits`: the model's precision plan, `rows`
    its BitOps rows). Returns (file path, the largest logit difference between the model
    and its file loaded back on 256 test images: 0.0 when the file holds exactly the model,
    size metrics)."""
    config, info = d.config, d.info
    model_path = os.path.join(d.out_dir, "models", f"{d.run_id}-{run_label(config)}-"
                                                   f"{config.method}.safetensors")
    os.makedirs(os.path.dirname(model_path), exist_ok=True)
    export_quantized(qmodel, model_path, {**d.metadata, "method": config.method})
    size = compression_metrics(qmodel, d.ckpt["model"], model_path, rows, layer_bits)
    size_limit = planning["size"] and planning["size"][1]
    if size_limit is not None and os.path.getsize(model_path) > size_limit:
        raise RuntimeError(f"the plan's file is {os.path.getsize(model_path)} bytes, over the "
                           f"size budget of {int(size_limit)}: the size prediction is wrong")
    reloaded = load_quantized(model_path).to(d.device)
    return model_path, largest_difference(qmodel, reloaded, d.test.head(256), info), size


def onnx_step(d, qmodel, model_path, torch_logits):
    """The ONNX file beside the safetensors one, run in ONNX Runtime: its onnx_* metrics, its
    agreement with PyTorch's logits, and its size (onnx_mb); {} when the model has no ONNX
    form (a layer the integer operators cannot hold) or ONNX Runtime is not installed."""
    if not (onnx_export.onnx_exportable(qmodel) and onnx_runtime.available()):
        return {}
    d.progress.start("onnx")
    info = d.info
    onnx_path = model_path.removesuffix(".safetensors") + ".onnx"
    onnx, onnx_logits = onnx_runtime.measure_onnx(
        qmodel, d.fp32, onnx_path, eval_loader(d.test, d.info),
        (info.in_channels, info.input_size, info.input_size), d.threads,
        {**d.metadata, "method": d.config.method})
    onnx["onnx_agreement"] = agreement(torch_logits, onnx_logits[:len(torch_logits)])
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
        layers = [{**r, "calibration": layer_calibration.get(r["name"], "fp32")} for r in rows]
        log_run(d.run, metrics, layers, model_path, d.ckpt, config, results.FINISHED)
    row = {"run_id": d.run_id, **metrics, "checkpoint": config.checkpoint,
           "dataset": d.ckpt["dataset"], "width_multiplier": d.ckpt["width_multiplier"]}
    return metrics, lambda extra: results.append_run(d.results_dir, d.sweep_id,
                                                     {**row, **extra})


def run_label(config):
    return (f"w{config.weight_bits}a{config.activation_bits}" if config.plan == "uniform"
            else config.plan)


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
