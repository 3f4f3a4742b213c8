"""One frozen configuration per quantization run, built once from the command line or from
`wandb.config` (a run launched by a sweep agent) and validated once: the library code after
it trusts every field. The field names are the run parameters of shared/DESIGN.md, spelled
the same in flags, sweep yamls, W&B config, runs.csv and the docs.
"""

import dataclasses
import math
import numbers
from dataclasses import dataclass

from .errors import UserError
from .quant.choices import (
    ADAPTIVE_BUDGET,
    CALIBRATION_METHODS,
    ROUNDINGS,
    WEIGHT_GRANULARITIES,
    WEIGHT_METHODS,
    budget_text,
    check_choice,
    default_calibration,
)
from .quant.precision import check_bits, is_fp32
from .source_options import ARCHS, DATASETS, options_from, parse_floats

METHODS = ("ptq", "qat")
# Who measures quant_acc: PyTorch's fake-quantized model, or ONNX Runtime running the
# exported int8 QDQ model (onnx_export.py). torch stays the default: README, "ONNX Runtime".
ENGINES = ("torch", "onnxruntime")
# Where each layer's bits come from: --weight_bits/--activation_bits everywhere, the
# MACs tiers (weights 2/4/8 by block cost), or the integer program of planner.py over the
# measured sensitivities under --bitops_budget.
PLANS = ("uniform", "adaptive", "sensitivity")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_bool(value, flag):
    """True/False from a bool or one of true/false/1/0/yes/no/on/off (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise UserError(f"{flag} must be true or false, got {value!r}.")


def _positive_int(value, flag, allow_none=False, minimum=1):
    if value is None and allow_none:
        return None
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
          and float(value).is_integer() and value >= minimum)
    if not ok:
        kind = "a positive integer" if minimum == 1 else f"a whole number >= {minimum}"
        raise UserError(f"{flag} must be {kind}, got {value}.")
    return int(value)


def _positive_float(value, flag):
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag} must be a positive number, got {value!r}.") from None
    if isinstance(value, bool) or not (number > 0 and math.isfinite(number)):
        raise UserError(f"{flag} must be a positive number, got {value!r}.")
    return number


def default_rounding(method):
    """--weight_rounding when not given: GPTQ for post-training quantization, where it won or
    tied every cell at 4 to 8-bit activations on four checkpoints, and nearest for QAT, where
    nothing shows GPTQ helping (W4A4 QAT from GPTQ-rounded weights ended 0.13 point lower, one
    run each, README)."""
    return "nearest" if method == "qat" else "gptq"


# The run's choices: the quantizers' own, and `auto`, each layer's default by its own bits.
CALIBRATIONS = CALIBRATION_METHODS + ("auto",)


def _check_source_fields(v):
    """The flags of a state dict source (sources.add_arguments), checked in place in `v`."""
    for name in ("num_classes", "input_size", "resize_size"):
        v[name] = _positive_int(v[name], f"--{name}", allow_none=True)
    v["workers"] = _positive_int(v["workers"], "--workers", allow_none=True, minimum=0)
    for name in ("mean", "std"):
        v[name] = parse_floats(v[name], f"--{name}")
    for name, choices in (("dataset", DATASETS), ("arch", ARCHS)):
        given = v[name] not in (None, "")
        v[name] = check_choice(v[name], choices, f"--{name}") if given else None


@dataclass(frozen=True)
class RunConfig:
    checkpoint: str = "checkpoints/best.pt"
    weight_bits: int = 8
    activation_bits: int = 8
    method: str = "ptq"
    # None or "auto": default_calibration(activation_bits) in a uniform run (the method
    # itself is recorded); in a mixed plan, "auto": each layer's by its own activation bits
    calibration: str | None = None
    calib_batches: int = 8
    calib_batch_size: int = 128
    weight_method: str = "minmax"
    weight_granularity: str = "per_channel"
    # None: gptq for PTQ (the rounding sweeps), nearest for QAT (GPTQ did not help it);
    # default_rounding
    weight_rounding: str | None = None
    bias_correction: bool | str = "auto"  # on/off per run, by validation accuracy (README)
    # the depthwise convs' input channels equalized before calibration (quant/equalize.py); on since
    # the equalize sweeps on three checkpoints (README, "--equalize")
    equalize: bool = True
    qat_epochs: float = 1.0
    qat_lr: float = 0.01
    qat_batch_size: int = 128
    qat_freeze_bn: float = 0.5
    # validation checks during QAT; the best-scoring model, the PTQ start included, is kept
    # (quant/qat.py). 0: the last model, unchecked
    qat_checks: int = 4
    # on since the 18-epoch checkpoint agreed with the 30-epoch one (README, QAT bullet)
    distill: bool = True
    engine: str = "torch"
    plan: str = "uniform"
    bitops_budget: str | None = None
    size_budget_mb: float | None = None
    sensitivity_images: int = 256
    max_eval_samples: int | None = None
    data_dir: str | None = None
    # a state dict source's flags (sources.SourceOptions); None: its defaults
    dataset: str | None = None
    arch: str | None = None
    num_classes: int | None = None
    input_size: int | None = None
    resize_size: int | None = None
    mean: tuple | None = None
    std: tuple | None = None
    workers: int | None = None  # image folders: decoding processes (None: one per core)
    results_dir: str | None = None
    seed: int = 42
    device: str | None = None
    threads: int | None = None
    wandb_mode: str | None = None

    @classmethod
    def from_dict(cls, values):
        """Validate `values` (flags, or flags overridden by wandb.config) into a RunConfig.
        Every problem is one UserError sentence naming the flag."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"unknown run parameter {unknown[0]!r}; see sweep.py --help.")
        v = {**{f.name: f.default for f in dataclasses.fields(cls)}, **values}
        v["weight_bits"] = check_bits(v["weight_bits"], "--weight_bits")
        v["activation_bits"] = check_bits(v["activation_bits"], "--activation_bits")
        v["method"] = check_choice(v["method"], METHODS, "--method")
        v["plan"] = check_choice(v["plan"], PLANS, "--plan")
        if v["calibration"] in (None, ""):
            v["calibration"] = "auto"
        v["calibration"] = check_choice(v["calibration"], CALIBRATIONS, "--calibration")
        if v["calibration"] == "auto" and v["plan"] == "uniform":
            v["calibration"] = default_calibration(v["activation_bits"])
        v["weight_method"] = check_choice(v["weight_method"], WEIGHT_METHODS, "--weight_method")
        if v["weight_rounding"] in (None, ""):
            v["weight_rounding"] = default_rounding(v["method"])
        v["weight_rounding"] = check_choice(v["weight_rounding"], ROUNDINGS, "--weight_rounding")
        v["weight_granularity"] = check_choice(v["weight_granularity"], WEIGHT_GRANULARITIES,
                                          "--weight_granularity")
        if isinstance(v["seed"], bool) or not isinstance(v["seed"], numbers.Integral):
            raise UserError(f"--seed must be an integer, got {v['seed']!r}.")
        for name in ("calib_batches", "calib_batch_size", "qat_batch_size", "sensitivity_images"):
            v[name] = _positive_int(v[name], f"--{name}")
        v["qat_checks"] = _positive_int(v["qat_checks"], "--qat_checks", minimum=0)
        for name in ("max_eval_samples", "threads"):
            v[name] = _positive_int(v[name], f"--{name}", allow_none=True)
        _check_source_fields(v)
        if str(v["bias_correction"]).strip().lower() == "auto":
            v["bias_correction"] = "auto"
        else:
            try:
                v["bias_correction"] = parse_bool(v["bias_correction"], "--bias_correction")
            except UserError:
                raise UserError("--bias_correction must be true, false or auto, got "
                                f"{v['bias_correction']!r}.") from None
        v["distill"] = parse_bool(v["distill"], "--distill")
        v["equalize"] = parse_bool(v["equalize"], "--equalize")
        v["engine"] = check_choice(v["engine"], ENGINES, "--engine")
        given = [f for f in ("bitops_budget", "size_budget_mb") if v[f] not in (None, "")]
        if v["plan"] == "sensitivity":
            if not given:
                raise UserError("--plan sensitivity needs --bitops_budget (GBitOps, a fraction "
                                "of the W8A8 BitOps such as 0.5x, or w4a4) or --size_budget_mb.")
            if len(given) == 2:
                raise UserError("give one budget, --bitops_budget or --size_budget_mb, not "
                                "both.")
        elif given and not (v["plan"] == "adaptive" and given == ["bitops_budget"]
                            and str(v["bitops_budget"]).strip().lower() == ADAPTIVE_BUDGET):
            raise UserError(f"--{given[0]} applies to --plan sensitivity only (and "
                            f"--bitops_budget adaptive to --plan adaptive).")
        v["bitops_budget"] = (budget_text(v["bitops_budget"])
                              if "bitops_budget" in given else None)
        v["size_budget_mb"] = (_positive_float(v["size_budget_mb"], "--size_budget_mb")
                               if "size_budget_mb" in given else None)
        if v["engine"] == "onnxruntime":
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                raise UserError("--engine onnxruntime needs ONNX Runtime, which is not "
                                "installed; pip install -r requirements.txt, or pass "
                                "--engine torch.") from None
            if is_fp32(v["weight_bits"]) or is_fp32(v["activation_bits"]):
                raise UserError("--engine onnxruntime runs integer models only; give "
                                "--weight_bits and --activation_bits 2..8, or pass "
                                "--engine torch.")
        v["qat_epochs"] = _positive_float(v["qat_epochs"], "--qat_epochs")
        v["qat_lr"] = _positive_float(v["qat_lr"], "--qat_lr")
        freeze = v["qat_freeze_bn"]
        if isinstance(freeze, bool) or not isinstance(freeze, numbers.Real) or not 0 <= freeze <= 1:
            raise UserError(f"--qat_freeze_bn must be a fraction in [0, 1], got {freeze!r}.")
        if v["method"] == "qat" and is_fp32(v["weight_bits"]) and is_fp32(v["activation_bits"]):
            raise UserError("--method qat has nothing to train when both --weight_bits and "
                            "--activation_bits are FP32; give one of them 2..8 bits.")
        return cls(**v)

    def source_options(self):
        """What the model source needs beside --checkpoint (sources.SourceOptions)."""
        return options_from(dataclasses.asdict(self))

    def run_parameters(self):
        """The parameters logged with a run (W&B config and runs.csv columns)."""
        keys = ["weight_bits", "activation_bits", "method", "calibration", "calib_batches",
                "weight_method", "weight_granularity", "weight_rounding", "bias_correction",
                "equalize", "engine", "seed"]
        if self.plan != "uniform":
            keys += ["plan"] + (["bitops_budget"] if self.bitops_budget else []) + (
                ["size_budget_mb"] if self.size_budget_mb else [])
            if self.plan == "sensitivity":
                keys.append("sensitivity_images")
        if self.method == "qat":
            keys += ["qat_epochs", "qat_lr", "qat_batch_size", "qat_freeze_bn", "qat_checks",
                     "distill"]
        return {k: getattr(self, k) for k in keys}
