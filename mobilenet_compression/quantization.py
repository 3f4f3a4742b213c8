"""Post-training quantization by swapping layers (the Brevitas idea, without its machinery).

A quantized model is the FP32 model with every Conv2d and Linear except the stem conv
(`features.0.0`) and the classifier (`classifier.1`) replaced by a `QuantConv2d` /
`QuantLinear`. Those subclass the torch layers, so the state dict keeps its names and its
FP32 weights, and BatchNorm stays a separate, unfolded FP32 layer. Each carries two small
quantizer modules:

- `input_quant` (`ActQuantizer`) fake-quantizes the layer's INPUT activation, per tensor,
  with zero point 0: unsigned codes [0, 2^b-1] when calibration saw no negative value (the
  input after ReLU6: depthwise and projection convs), signed codes [-2^(b-1), 2^(b-1)-1]
  otherwise (MobileNetV2's projection conv has no activation, so block inputs, i.e. the
  expansion convs' inputs and the last 1x1 conv's input, are signed). The clip value c is
  found by calibration on training images (`calibrate`); scale = c / (2^b-1) unsigned,
  c / (2^(b-1)-1) signed, so +c is exactly representable (Brevitas' convention).
- `weight_quant` (`WeightQuantizer`) fake-quantizes the weight: symmetric, per output
  channel (or per tensor, to reproduce the seeds), NARROW range: integers in
  [-(2^(b-1)-1), 2^(b-1)-1], i.e. 2^b-1 levels per channel (ternary at 2 bits). Narrow is
  chosen because it is symmetric (the full range's extra level -2^(b-1) would bias every
  channel towards the negative side and, with scale = absmax / 2^(b-1), clip its largest
  positive weights) and is what int8 engines (TensorRT, ONNX Runtime, XNNPACK) expect of
  weights; on the Fashion-MNIST test model the full range gave 20% at W3A8, narrow 69%.
  The scale is absmax / (2^(b-1)-1) (`minmax`, the default) or (r*absmax) / (2^(b-1)-1)
  with r in 0.01..1 minimising the channel's squared weight error (`mse`). MSE clipping
  cuts the weight error but shrinks each channel's output, which the frozen FP32 BatchNorm
  after it no longer renormalises; on the test model it lost to minmax at 3-4 bits.

Bits are integers in 2..8; 16 and 32 mean "leave this tensor FP32" (rules in precision.py).
Both quantizers go through one function, `fake_quantize`: torch's fake-quantize ops when a
gradient is needed (straight-through), else a pure-tensor round/clamp path that gives the
same numbers bit for bit (tested) and is faster at inference. For quantization-aware
training the scales become learnable (LSQ, Esser et al. 2020): torch's
`_fake_quantize_learnable_per_{channel,tensor}_affine` ops, with LSQ's gradient scale.

The flow, each step a function here (run.py calls them in this order):
  prepare          `quantize_model`: swap the layers, set weight scales;
  calibrate        `calibrate`: activation ranges from training images;
  round            rounding.gptq (optional, `--weight_rounding gptq`): each weight's grid
                   point chosen to cut its layer's output error (GPTQ);
  bias_correct     `bias_correct` (optional): empirical bias correction;
  (train)          qat.train_qat (optional): fine-tune weights and scales;
  convert          `convert`: freeze: scales fixed, each weight replaced by its quantized
                   value (codes x scale), so the model is exactly what the exported file holds.

There is no cache of fake-quantized weights: a cache keyed on storage pointers could go
stale when memory was reused, and re-quantizing the weights costs little next to the convs
(benchmarks/quantized_eval.py). Where a torch.fx trace shows a layer is the only reader of a
freshly computed input (the ReLU6 outputs feeding depthwise and projection convs), the
activation is fake-quantized in place at inference instead of into a new tensor.
"""

import copy
import itertools
import math
import operator

import torch
from torch import nn

from .errors import UserError
from .precision import (  # noqa: F401  (check_bits and uniform_plan are re-exported)
    check_bits,
    check_plan,
    is_fp32,
    quantized_layer_names,
    signed_range,
    uniform_plan,
    unsigned_range,
    weight_range,
)

WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
WEIGHT_METHODS = ("minmax", "mse")
CALIBRATION_METHODS = ("minmax", "percentile", "mse", "loss")
PERCENTILE = 99.99
# Candidate clipping ratios for the MSE searches: 1% steps of the observed absmax.
MSE_RATIOS = torch.linspace(0.01, 1.0, 100)
# Activation values kept per calibration run and layer for the percentile and MSE searches:
# a uniform random sample (seeded), since whole activation tensors do not fit in memory.
ACT_SAMPLE_SIZE = 1 << 18
MIN_SCALE = 1e-12  # an all-zero channel or tensor still gets a finite, positive scale


# ---------------------------------------------------------------------------- validation

def check_choice(value, choices, flag):
    if value not in choices:
        raise UserError(f"{flag} must be one of {', '.join(choices)}, got {value!r}.")
    return value


# ------------------------------------------------------------------------- fake quantize

def fake_quantize(x, scale, qmin, qmax, axis=None, zero_point=None, impl="auto",
                  inplace=False):
    """Round `x` to the grid scale * ({qmin..qmax} - zero_point) and return it as float.

    `axis=None`: per tensor (scale has one element); else per channel along `axis`.
    impl="torch": torch.fake_quantize_per_{tensor,channel}_affine, whose gradient is the
    straight-through estimator (zero outside [qmin, qmax]). impl="tensor": the same
    arithmetic with round/clamp, x * (1/scale) rounded half to even, clamped, minus the zero
    point, times scale; 1/scale is taken in float32 and multiplied, as torch's kernels do,
    so the two agree bit for bit (tested). It carries the same straight-through gradient.
    impl="auto" (the default) takes torch's op when a gradient is needed and the
    tensor path otherwise: torch's op always also writes a mask for the backward pass,
    which makes it about twice as slow at inference. `inplace` (tensor path only) overwrites
    x, saving an allocation and a memory pass.
    """
    needs_grad = x.requires_grad and torch.is_grad_enabled()
    if impl == "auto":
        impl = "torch" if needs_grad else "tensor"
    if impl == "torch":
        zp = zero_point
        if zp is None:
            zp = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
        if axis is None:
            return torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
        return torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax)
    if impl != "tensor":
        raise ValueError(f"unknown fake_quantize impl {impl!r}")
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    s = scale.reshape(shape).to(x.dtype)
    with torch.no_grad():
        inv = torch.reciprocal(s)
        q = (x.mul_(inv) if inplace and not needs_grad else torch.mul(x, inv)).round_()
        if zero_point is not None:
            q.add_(zero_point.reshape(shape).to(x.dtype))
        if needs_grad:
            inside = (q >= qmin) & (q <= qmax)
        q.clamp_(qmin, qmax)
        if zero_point is not None:
            q.sub_(zero_point.reshape(shape).to(x.dtype))
        y = q.mul_(s)
    if needs_grad:  # straight-through, like torch's op
        y = y + (x - x.detach()) * inside
    return y


def quantize_to_int(weight, scale, qmin, qmax, axis=0):
    """The integer codes behind fake_quantize(weight, ...) (per channel along `axis`, or per
    tensor when scale has one element), as int16: what export.py packs."""
    shape = [1] * weight.dim()
    if scale.numel() > 1:
        shape[axis] = -1
    inv = torch.reciprocal(scale.reshape(shape))
    return torch.round(weight * inv).clamp_(qmin, qmax).to(torch.int16)


# ---------------------------------------------------------------------------- quantizers

def _mse_clip(x, absmax, quant, ratios=MSE_RATIOS, chunk=8):
    """Per row of x (rows, n): the clip r*absmax (r in `ratios`) whose fake-quantization
    `quant(x, clip)` has the smallest squared error. absmax: (rows,)."""
    best_err = torch.full_like(absmax, math.inf)
    best = absmax.clone()
    for i in range(0, len(ratios), chunk):
        r = ratios[i:i + chunk].to(x)
        clips = absmax[None, :] * r[:, None]  # (k, rows)
        err = torch.stack([((quant(x, c) - x) ** 2).sum(1) for c in clips])
        e, k = err.min(0)
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best = torch.where(better, clips[k, torch.arange(len(k))], best)
    return best


class _LearnableScale:
    """Shared by both quantizers: `scale` is a buffer, or, while learning (QAT), a Parameter
    of the same name (so the state dict does not change). LSQ's gradient scale
    1/sqrt(N * qmax) (N: values sharing one scale) keeps the step sizes' updates in
    proportion to the weights' (Esser et al. 2020, section 2.2)."""

    def learn_scale(self, learn=True):
        value = self.scale.detach().clone()
        del self.scale  # a buffer or a Parameter alike
        if learn:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)

    @property
    def learning(self):
        return isinstance(self.scale, nn.Parameter)

    @torch.no_grad()
    def clamp_scale(self):
        """Keep learned step sizes positive (an optimizer step may push one through 0)."""
        self.scale.clamp_(min=MIN_SCALE)

    def _lsq(self, x, axis, per_scale):
        zero_point = torch.zeros_like(self.scale)
        grad_factor = 1.0 / math.sqrt(per_scale * self.qmax)
        if axis is None:
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, self.scale, zero_point, self.qmin, self.qmax, grad_factor)
        return torch._fake_quantize_learnable_per_channel_affine(
            x, self.scale, zero_point, axis, self.qmin, self.qmax, grad_factor)


class WeightQuantizer(_LearnableScale, nn.Module):
    """Symmetric narrow-range weight quantizer. scale: (out_channels,) per channel, (1,) per
    tensor; set from the weight by `init_scale` (weights need no calibration data)."""

    def __init__(self, bits, granularity="per_channel", method="minmax", input_bits=None):
        super().__init__()
        self.bits = bits
        self.granularity = granularity
        self.method = method
        self.enabled = not is_fp32(bits)
        # the codes an integer engine computes exactly on every CPU (precision.weight_range):
        # 8-bit weights on 8-bit inputs are cut to [-64, 64]
        self.qmin, self.qmax = weight_range(bits, input_bits) if self.enabled else (0, 0)
        self.register_buffer("scale", torch.ones(1))

    @property
    def axis(self):
        return 0 if self.granularity == "per_channel" else None

    @torch.no_grad()
    def init_scale(self, weight):
        if not self.enabled:
            return
        w = weight.detach().float()
        rows = w.reshape(w.shape[0], -1) if self.granularity == "per_channel" else w.reshape(1, -1)
        absmax = rows.abs().amax(1)
        if self.method == "mse":
            def quant(x, clip):
                scale = (clip / self.qmax).clamp_min(MIN_SCALE)
                return fake_quantize(x, scale, self.qmin, self.qmax, axis=0)

            absmax = _mse_clip(rows, absmax, quant)
        scale = (absmax / self.qmax).clamp_min(MIN_SCALE)
        self.scale = scale.to(weight.device)

    def forward(self, weight, impl="auto"):
        if not self.enabled:
            return weight
        if self.learning and torch.is_grad_enabled():
            per_scale = weight.numel() // self.scale.numel()
            return self._lsq(weight, self.axis, per_scale)
        return fake_quantize(weight, self.scale.detach(), self.qmin, self.qmax, self.axis,
                             impl=impl)

    def integers(self, weight):
        """Integer codes in [qmin, qmax] (int16) with weight_hat = codes * scale."""
        return quantize_to_int(weight.detach(), self.scale, self.qmin, self.qmax, axis=0)

    def extra_repr(self):
        if not self.enabled:
            return "fp32"
        return (f"bits={self.bits}, {self.granularity}, {self.method}, "
                f"range=[{self.qmin}, {self.qmax}]")


class ActQuantizer(_LearnableScale, nn.Module):
    """Per-tensor input-activation quantizer with zero point 0.

    Modes: "observe" (calibration: record statistics, pass x through unchanged), "quantize"
    (after calibration), "off" (pass through; also what FP32 bits mean).
    """

    def __init__(self, bits):
        super().__init__()
        self.bits = bits
        self.enabled = not is_fp32(bits)
        # Set by quantize_model where a torch.fx trace shows this layer is the only consumer
        # of a freshly computed input: eval without autograd then quantizes it in place.
        self.inplace = False
        self.mode = "quantize"
        self.calibrated = False
        self.signed = True
        self.register_buffer("scale", torch.ones(1))
        self.absmax = math.inf  # the largest |x| calibration saw (bounds clip_search's clips)
        self._reset_stats()

    @property
    def qmin(self):
        return signed_range(self.bits)[0] if self.signed else 0

    @property
    def qmax(self):
        return signed_range(self.bits)[1] if self.signed else unsigned_range(self.bits)[1]

    def _reset_stats(self):
        self.min_val = math.inf
        self.max_val = -math.inf
        self._samples = []
        self._sample_per_batch = 0
        self._generator = None

    def start_observing(self, sample_per_batch=0, seed=0):
        self._reset_stats()
        self._sample_per_batch = sample_per_batch
        if sample_per_batch:
            self._generator = torch.Generator().manual_seed(seed)
        self.mode = "observe"

    @torch.no_grad()
    def _observe(self, x):
        lo, hi = torch.aminmax(x.detach())  # one pass over x, not two
        self.min_val = min(self.min_val, float(lo))
        self.max_val = max(self.max_val, float(hi))
        if self._sample_per_batch:
            flat = x.detach().reshape(-1)
            idx = torch.randint(0, flat.numel(), (self._sample_per_batch,),
                                generator=self._generator).to(flat.device)
            self._samples.append(flat[idx].float().cpu())

    def set_qparams(self, clip=None, signed=None, scale=None):
        """Fix the grid from a clip value (or a scale) and the signedness."""
        self.signed = bool(signed)
        if scale is None:
            scale = max(float(clip), 0.0) / self.qmax
        self.scale = torch.tensor([max(float(scale), MIN_SCALE)], device=self.scale.device)
        self.calibrated = True
        self.mode = "quantize"

    @torch.no_grad()
    def finish_observing(self, method):
        if not math.isfinite(self.min_val):
            raise RuntimeError("an activation quantizer saw no data during calibration")
        signed = self.min_val < 0
        absmax = max(abs(self.min_val), abs(self.max_val))
        self.absmax = absmax
        clip = absmax
        if method != "minmax" and self._samples:
            sample = torch.cat(self._samples)
            if method == "percentile":
                # torch.quantile refuses inputs over 2^24 elements; the sample is smaller.
                clip = min(absmax, float(torch.quantile(sample.abs(), PERCENTILE / 100)))
            else:
                self.signed = signed
                qmin, qmax = self.qmin, self.qmax

                def quant(x, c):
                    scale = (c / qmax).clamp_min(MIN_SCALE)
                    return fake_quantize(x, scale, qmin, qmax, axis=0)

                clip = float(_mse_clip(sample[None], torch.tensor([absmax]), quant)[0])
        self._reset_stats()
        self.set_qparams(clip=clip, signed=signed)

    def forward(self, x, impl="auto"):
        if not self.enabled or self.mode == "off":
            return x
        if self.mode == "observe":
            self._observe(x)
            return x
        if not self.calibrated:
            raise RuntimeError(
                "activation quantizers are not calibrated; call calibrate(qmodel, loader) first"
            )
        if self.learning and torch.is_grad_enabled():
            return self._lsq(x, None, x[0].numel())
        inplace = self.inplace and impl != "torch" and not torch.is_grad_enabled()
        return fake_quantize(x, self.scale.detach(), self.qmin, self.qmax, None, impl=impl,
                             inplace=inplace)

    def extra_repr(self):
        if not self.enabled:
            return "fp32"
        if not self.calibrated:
            return f"bits={self.bits}, uncalibrated"
        kind = "signed" if self.signed else "unsigned"
        return f"bits={self.bits}, {kind}, scale={float(self.scale):.4g}"


# ---------------------------------------------------------------------------- layers

class _QuantLayer:
    """Shared by QuantConv2d and QuantLinear: input_quant and weight_quant."""

    def _setup_quant(self, weight_bits, activation_bits, granularity, method):
        self.weight_bits = weight_bits
        self.activation_bits = activation_bits
        self.input_quant = ActQuantizer(activation_bits)
        self.weight_quant = WeightQuantizer(weight_bits, granularity, method, activation_bits)
        self.weight_quant.init_scale(self.weight)

    def quantized_weight(self):
        """The fake-quantized weight (straight-through gradients when autograd is on)."""
        return self.weight_quant(self.weight)

    def add_bias(self):
        """Give the layer a zero bias (bias correction adds to it); returns the bias.
        `bias_added` marks it: QAT holds such biases fixed (qat.py says why)."""
        if self.bias is None:
            out = self.weight.shape[0]
            self.bias = nn.Parameter(torch.zeros(out, device=self.weight.device,
                                                 dtype=self.weight.dtype))
            self.bias_added = True
        return self.bias


class QuantConv2d(_QuantLayer, nn.Conv2d):
    @classmethod
    def from_float(cls, conv, weight_bits, activation_bits, granularity="per_channel",
                   method="minmax"):
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        q.weight = conv.weight
        q.bias = conv.bias
        q.train(conv.training)
        q._setup_quant(weight_bits, activation_bits, granularity, method)
        return q

    def forward(self, x):
        return self._conv_forward(self.input_quant(x), self.quantized_weight(), self.bias)


class QuantLinear(_QuantLayer, nn.Linear):
    @classmethod
    def from_float(cls, linear, weight_bits, activation_bits, granularity="per_channel",
                   method="minmax"):
        q = cls(linear.in_features, linear.out_features, linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype)
        q.weight = linear.weight
        q.bias = linear.bias
        q.train(linear.training)
        q._setup_quant(weight_bits, activation_bits, granularity, method)
        return q

    def forward(self, x):
        return nn.functional.linear(self.input_quant(x), self.quantized_weight(), self.bias)


QUANT_LAYERS = (QuantConv2d, QuantLinear)


# ---------------------------------------------------------------------------- model level

def quant_layers(qmodel):
    """(name, layer) of every QuantConv2d / QuantLinear in a quantized model."""
    return [(n, m) for n, m in qmodel.named_modules() if isinstance(m, QUANT_LAYERS)]


# Modules whose output is a new tensor (never a view of their input), so a single consumer
# may overwrite it.
_FRESH_OUTPUT = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardtanh,
                 nn.Hardswish, nn.SiLU)


def exclusive_input_layers(model, names):
    """The layers in `names` whose input is a fresh module output that nothing else reads
    (found on a torch.fx trace; empty if the model does not trace). Their activation
    quantizers may work in place at inference. In MobileNetV2 these are the depthwise and
    projection convs (inputs after ReLU6) and the convs reading a block output that no
    residual add reads again."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # any model torch.fx cannot trace just keeps the out-of-place path
        return set()
    modules = dict(model.named_modules())

    def exclusive(src):
        while isinstance(src, torch.fx.Node) and len(src.users) == 1:
            if src.op == "call_function":  # the residual sum x + f(x) is a new tensor
                return src.target in (operator.add, torch.add)
            if src.op != "call_module":
                return False
            producer = modules.get(src.target)
            if not isinstance(producer, _FRESH_OUTPUT):
                return False
            if not getattr(producer, "inplace", False):
                return True
            # ReLU6(inplace=True) (torchvision's choice) returns its input: that tensor must
            # be exclusive too.
            src = src.args[0] if src.args else None
        return False

    return {node.target for node in graph.nodes
            if node.op == "call_module" and node.target in names and node.args
            and exclusive(node.args[0])}


def _normalise_plan(model, plan):
    if isinstance(plan, (tuple, list)) and len(plan) == 2:
        plan = uniform_plan(model, *plan)
    if not isinstance(plan, dict):
        raise TypeError("plan must be a dict layer name -> (weight_bits, activation_bits) "
                        "or one (weight_bits, activation_bits) pair")
    return check_plan(model, plan)


def _swap(model, name, new):
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def quantize_model(model, plan, weight_granularity="per_channel", weight_method="minmax"):
    """Return a quantized deep copy of `model` (the FP32 model is untouched).

    plan: dict layer name -> (weight_bits, activation_bits), or one (weight_bits,
    activation_bits) pair for every quantized layer; layers the dict leaves out stay FP32
    (but are still wrapped). Weight scales are set here; activation scales need
    `calibrate` before the model can run (unless all activation bits are FP32). A torch.fx
    trace of `model` marks the layers whose input may be fake-quantized in place.
    """
    check_choice(weight_granularity, WEIGHT_GRANULARITIES, "--weight_granularity")
    check_choice(weight_method, WEIGHT_METHODS, "--weight_method")
    plan = _normalise_plan(model, plan)
    names = quantized_layer_names(model)
    exclusive = exclusive_input_layers(model, set(names))
    qmodel = copy.deepcopy(model)
    for name in names:
        layer = qmodel.get_submodule(name)
        wb, ab = plan.get(name, (32, 32))
        cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        qlayer = cls.from_float(layer, wb, ab, weight_granularity, weight_method)
        qlayer.input_quant.inplace = name in exclusive
        _swap(qmodel, name, qlayer)
    return qmodel


def precision_plan(qmodel):
    """The plan a quantized model was built with: layer name -> (weight_bits, activation_bits)."""
    return {n: (m.weight_bits, m.activation_bits) for n, m in quant_layers(qmodel)}


def act_quantizers(qmodel):
    return [m.input_quant for _, m in quant_layers(qmodel) if m.input_quant.enabled]


class activations_fp32:
    """Context manager: run a quantized model with its activation quantizers off (weights
    stay quantized), e.g. to count activation elements before calibration."""

    def __init__(self, qmodel):
        self.quantizers = act_quantizers(qmodel)

    def __enter__(self):
        self.modes = [q.mode for q in self.quantizers]
        for q in self.quantizers:
            q.mode = "off"

    def __exit__(self, *exc):
        for q, mode in zip(self.quantizers, self.modes):
            q.mode = mode


def training_batches(loader, num_batches, what):
    """How many batches of `loader` to read, after checking it reads TRAINING images: test
    or validation images must never shape a quantized model."""
    split = getattr(loader, "split", None)
    split_name = getattr(split, "name", None)
    if split_name != "train":
        raise UserError(
            f"{what} must read training images, got the {split_name!r} split; pass a "
            f"BatchLoader over the train split."
        )
    if num_batches is not None and (isinstance(num_batches, bool) or num_batches < 1):
        raise UserError(f"--calib_batches must be at least 1, got {num_batches}.")
    total = len(loader) if num_batches is None else min(num_batches, len(loader))
    if total < 1:
        raise UserError(f"the {what} split holds no images; use a non-empty train split.")
    return total


def calibrate(qmodel, loader, method="minmax", num_batches=None, seed=0):
    """Set every activation quantizer's scale and signedness from training images.

    loader: a data.BatchLoader over the TRAIN split (anything with `.split.name == "train"`
    that yields (images, labels)); other splits raise a UserError, so test images can never
    leak into calibration. Runs `num_batches` batches (all when None) through the model in
    eval mode with activations unquantized and weights quantized, recording each quantized
    layer's input: its min/max (minmax; also decides signedness), and a seeded random sample
    of its values for `percentile` (the 99.99th percentile of |x|) and `mse` (the clip r*absmax
    with the smallest squared error on the sample). `loss` is not a per-input method: calibrate
    with `mse`, round the weights, then `clip_search.search_clips_if_better` (run.py's order).
    Returns qmodel.
    """
    check_choice(method, CALIBRATION_METHODS, "--calibration")
    if method == "loss":
        raise ValueError("calibrate(method='loss'): calibrate with 'mse', then move the clips "
                         "with clip_search.search_clips_if_better (as run.py does)")
    total = training_batches(loader, num_batches, "calibration")
    quantizers = act_quantizers(qmodel)
    per_batch = 0 if method == "minmax" else max(1024, ACT_SAMPLE_SIZE // total)
    for i, q in enumerate(quantizers):
        q.start_observing(per_batch, seed=seed * 1_000_003 + i)
    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.inference_mode():
            seen = 0
            for x, _ in loader:
                qmodel(x)
                seen += 1
                if seen >= total:
                    break
        for q in quantizers:
            q.finish_observing(method)
    except BaseException:
        for q in quantizers:
            q._reset_stats()
            q.mode = "quantize"
        raise
    finally:
        qmodel.train(was_training)
    return qmodel


def _channel_mean(outputs):
    """Per-channel (dim 1) mean over every other dimension of a list of tensors. Each
    tensor is summed in its own dtype (torch's cascaded sum: within 1e-9 of a float64 sum on
    the activations here, and 20 times faster than converting them to float64 first); the
    per-tensor sums are added in float64."""
    total, count = 0.0, 0
    for y in outputs:
        dims = [d for d in range(y.dim()) if d != 1]
        total = total + y.sum(dims).double()
        count += y.numel() // y.shape[1]
    return (total / count).float()


def calibration_batch(loader, num_batches, what):
    total = training_batches(loader, num_batches, what)
    return torch.cat([x for x, _ in itertools.islice(iter(loader), total)])


@torch.no_grad()
def fp32_channel_means(fp32_model, loader, num_batches=None):
    """{layer name: per-output-channel mean of its output} for every conv and linear layer
    in `fp32_model.features`, over the calibration images as one batch: the targets
    `bias_correct` moves the quantized layers' outputs to. They depend on nothing but the
    FP32 model and those images, so a sweep's runs can share them (fp32_stats)."""
    return _fp32_channel_means(fp32_model, calibration_batch(loader, num_batches,
                                                              "bias correction"))


def _fp32_channel_means(fp32_model, x):
    means, handles = {}, []
    for i, block in enumerate(fp32_model.features):
        for name, m in block.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                handles.append(m.register_forward_hook(
                    lambda m, a, out, key=f"{i}.{name}": means.__setitem__(
                        key, _channel_mean([out]))))
    was_training = fp32_model.training
    fp32_model.eval()
    try:
        xf = x.clone()
        for block in fp32_model.features:
            xf = block(xf)
    finally:
        for h in handles:
            h.remove()
        fp32_model.train(was_training)
    return means


@torch.no_grad()
def bias_correct(qmodel, fp32_model, loader, num_batches=None, fp32_means=None):
    """Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight
    Equalization and Bias Correction", section 4.2, the variant with data).

    For each quantized layer in network order, the per-output-channel mean of (quantized
    output - FP32 output) over the calibration images is subtracted through a bias on that
    layer (added if it has none; export.py stores it). "Quantized output" is the layer's
    output inside the quantized network with every earlier layer already corrected; "FP32
    output" the same layer's output in the FP32 network (`fp32_channel_means`, or
    `fp32_means` it returned before for the same model and images). To stay in network order
    without L full passes, the images are carried block by block (the model's `features`)
    as one batch: each block runs once, and a forward hook on each quantized layer
    measures its output's channel means, moves its bias and corrects the output it passes
    on, so the next layer in the block already reads the corrected one. Reads the same
    TRAINING batches as calibration; call after `calibrate`. Returns qmodel.
    """
    x = calibration_batch(loader, num_batches, "bias correction")
    want = fp32_means if fp32_means is not None else _fp32_channel_means(fp32_model, x)
    was_training = qmodel.training
    qmodel.eval()
    handles = []

    def correct(layer, args, out, key):
        delta = (_channel_mean([out]) - want[key]).to(out.dtype)
        layer.add_bias().sub_(delta.to(layer.weight.dtype))
        return out.sub_(delta.view(1, -1, *[1] * (out.dim() - 2)))

    try:
        xq = x
        for i, bq in enumerate(qmodel.features):
            for name, layer in bq.named_modules():
                if isinstance(layer, QUANT_LAYERS):
                    handles.append(layer.register_forward_hook(
                        lambda m, a, out, key=f"{i}.{name}": correct(m, a, out, key)))
            xq = bq(xq)
            for h in handles:
                h.remove()
            handles.clear()
    finally:
        for h in handles:
            h.remove()
        qmodel.train(was_training)
    return qmodel


def bias_correct_if_better(qmodel, fp32_model, loader, score, num_batches=None,
                           fp32_means=None, score_without=None):
    """`--bias_correction auto`: bias-correct a copy of `qmodel` (`bias_correct`, on the same
    TRAINING batches) and keep whichever of the two `score(model)` rates higher; a tie keeps
    the uncorrected one (its file has no added biases). At 4-bit activations the correction
    moved the same cell by -9 to +12 points from one checkpoint to the next (README), so the
    choice is measured per run. `score` must read held-out images (run.py: the validation
    split train.py kept out of training), never the calibration images or the test set.
    `score_without`: `score(qmodel)` when the caller already has it (run.py, after the clip
    search's own held-out choice). Returns (model, used, score_without, score_with).
    """
    corrected = bias_correct(copy.deepcopy(qmodel), fp32_model, loader, num_batches,
                             fp32_means)
    without = score(qmodel) if score_without is None else score_without
    with_ = score(corrected)
    if with_ > without:
        return corrected, True, without, with_
    return qmodel, False, without, with_


def batchnorm_factors(bias, bn, out_channels):
    """(per-output-channel factor g/sigma, folded bias), float64, of a layer followed by
    `bn` (a BatchNorm in eval mode, or None: factor 1, the bias itself)."""
    b = (bias.detach().double() if bias is not None
         else torch.zeros(out_channels, dtype=torch.float64))
    if bn is None:
        return torch.ones(out_channels, dtype=torch.float64), b
    factor = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return factor, (b - bn.running_mean.double()) * factor + bn.bias.detach().double()


def integer_layer(layer):
    """Whether an integer engine runs `layer` on integer inputs and weights (both <= 8 bits)."""
    return (layer.weight_quant.enabled and layer.input_quant.enabled
            and layer.weight_quant.bits <= 8 and layer.input_quant.bits <= 8)


def layers_with_batchnorm(model):
    """(name, quantized layer, the BatchNorm2d right after it in its container or None)."""
    out = []
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for i, (name, layer) in enumerate(children):
            if isinstance(layer, QUANT_LAYERS):
                nxt = children[i + 1][1] if i + 1 < len(children) else None
                bn = nxt if isinstance(nxt, nn.BatchNorm2d) else None
                out.append((f"{parent_name}.{name}" if parent_name else name, layer, bn))
    return out


def int32_bias_step(layer, factor):
    """The step of the int32 bias an integer engine adds to `layer`'s accumulator, per output
    channel, after BatchNorm folding: input scale x |weight scale x factor| (the file stores
    the weight codes themselves, onnx_export)."""
    out_ch = factor.shape[0]
    w_scale = layer.weight_quant.scale.detach().double().reshape(-1).expand(out_ch)
    step = float(layer.input_quant.scale) * (w_scale * factor).abs()
    return step.clamp_min(1e-30)


@torch.no_grad()
def round_bias_to_int32_grid(qmodel):
    """Put each integer layer's bias (after BatchNorm folding) on the int32 grid an integer
    engine adds it on (`int32_bias_step`), and write it back unfolded: the model then computes
    what ONNX Runtime's QLinearConv does. Without this the engine's rounded bias moved a
    4-bit activation code now and then: 96% top-1 agreement at W4A4 instead of 99.9%.
    Channels whose BatchNorm scale is 0 (their output is the BatchNorm's own bias) keep
    theirs. Returns qmodel."""
    for _, layer, bn in layers_with_batchnorm(qmodel):
        if not integer_layer(layer):
            continue
        factor, folded = batchnorm_factors(layer.bias, bn, layer.weight.shape[0])
        step = int32_bias_step(layer, factor)
        codes = torch.round(folded / step)
        bias = layer.add_bias()
        new = codes * step
        if bn is not None:
            new = (new - bn.bias.double()) / factor + bn.running_mean.double()
        # a bias already on the grid stays as it is (a second call changes nothing)
        keep = ((folded / step - codes).abs() < 1e-3) | (factor == 0)
        bias.copy_(torch.where(keep, bias.double(), new).to(bias.dtype))
    return qmodel


@torch.no_grad()
def convert(qmodel):
    """Freeze a prepared (and calibrated, perhaps trained) model: learned scales become
    fixed buffers, each quantized weight is replaced by its quantized value (integer codes
    x scale) and each integer layer's bias is put on the engine's int32 grid
    (`round_bias_to_int32_grid`). Quantizing it again gives it back unchanged, so the model
    computes exactly what the exported files hold. Returns qmodel in eval mode."""
    for _, layer in quant_layers(qmodel):
        for q in (layer.input_quant, layer.weight_quant):
            if q.learning:
                q.clamp_scale()
                q.learn_scale(False)
        if layer.weight_quant.enabled:
            layer.weight.copy_(layer.weight_quant(layer.weight.detach(), impl="tensor"))
    return round_bias_to_int32_grid(qmodel).eval()
