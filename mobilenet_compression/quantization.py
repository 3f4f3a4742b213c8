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

Bits are integers in 2..8; 16 and 32 mean "leave this tensor FP32". Both quantizers go
through one function, `fake_quantize`: torch's fake-quantize ops when a gradient is needed
(straight-through, so the same modules serve QAT), else a pure-tensor round/clamp path
that gives the same numbers bit for bit (tested) and is faster at inference.

Eval speed: without autograd, the fake-quantized weight is computed once and cached, keyed
on the weight's and scale's storage and version counters (an optimizer step, .to() or
load_state_dict invalidate it; writing through `weight.data` bypasses the version counter
and does not). And where a torch.fx trace shows a layer is the only reader of a freshly
computed input (the ReLU6 outputs feeding depthwise and projection convs), the activation
is fake-quantized in place instead of into a new tensor.
"""

import copy
import math
import numbers
import operator

import torch
from torch import nn

from .errors import UserError
from .model import classifier_name, first_conv_name

FP32_BITS = (16, 32)
WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
WEIGHT_METHODS = ("minmax", "mse")
CALIBRATION_METHODS = ("minmax", "percentile", "mse")
PERCENTILE = 99.99
# Candidate clipping ratios for the MSE searches: 1% steps of the observed absmax.
MSE_RATIOS = torch.linspace(0.01, 1.0, 100)
# Activation values kept per calibration run and layer for the percentile and MSE searches:
# a uniform random sample (seeded), since whole activation tensors do not fit in memory.
ACT_SAMPLE_SIZE = 1 << 18
MIN_SCALE = 1e-12  # an all-zero channel or tensor still gets a finite, positive scale


# ---------------------------------------------------------------------------- validation

def check_bits(bits, flag="--weight_bits"):
    """Return `bits` as an int, or raise the UserError a user of `flag` should read."""
    ok = (
        not isinstance(bits, bool)
        and isinstance(bits, numbers.Real)
        and float(bits).is_integer()
        and (2 <= bits <= 8 or bits in FP32_BITS)
    )
    if not ok:
        raise UserError(f"{flag} must be an integer in 2..8, or 16/32 for FP32, got {bits}.")
    return int(bits)


def is_fp32(bits):
    return bits in FP32_BITS


def _check_choice(value, choices, flag):
    if value not in choices:
        raise UserError(f"{flag} must be one of {', '.join(choices)}, got {value!r}.")
    return value


def signed_range(bits, narrow=False):
    """(qmin, qmax) of b-bit two's-complement integers; narrow drops -2^(b-1)."""
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if narrow else -qmax - 1), qmax


def unsigned_range(bits):
    return 0, 2**bits - 1


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


class WeightQuantizer(nn.Module):
    """Symmetric narrow-range weight quantizer. scale: (out_channels,) per channel, (1,) per
    tensor; set from the weight by `init_scale` (weights need no calibration data)."""

    def __init__(self, bits, granularity="per_channel", method="minmax"):
        super().__init__()
        self.bits = bits
        self.granularity = granularity
        self.method = method
        self.enabled = not is_fp32(bits)
        self.qmin, self.qmax = signed_range(bits, narrow=True) if self.enabled else (0, 0)
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
        return fake_quantize(weight, self.scale, self.qmin, self.qmax, self.axis, impl=impl)

    def integers(self, weight):
        """Integer codes in [qmin, qmax] (int16) with weight_hat = codes * scale."""
        return quantize_to_int(weight.detach(), self.scale, self.qmin, self.qmax, axis=0)

    def extra_repr(self):
        if not self.enabled:
            return "fp32"
        return (f"bits={self.bits}, {self.granularity}, {self.method}, "
                f"range=[{self.qmin}, {self.qmax}]")


class ActQuantizer(nn.Module):
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
        self.min_val = min(self.min_val, float(x.min()))
        self.max_val = max(self.max_val, float(x.max()))
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
        inplace = self.inplace and impl != "torch" and not torch.is_grad_enabled()
        return fake_quantize(x, self.scale, self.qmin, self.qmax, None, impl=impl,
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
    """Shared by QuantConv2d and QuantLinear: input_quant, weight_quant and a cache of the
    fake-quantized weight for eval without autograd."""

    def _setup_quant(self, weight_bits, activation_bits, granularity, method):
        self.weight_bits = weight_bits
        self.activation_bits = activation_bits
        self.input_quant = ActQuantizer(activation_bits)
        self.weight_quant = WeightQuantizer(weight_bits, granularity, method)
        self.weight_quant.init_scale(self.weight)
        self._wq_cache = None
        self._wq_key = None

    def quantized_weight(self):
        wq = self.weight_quant
        if not wq.enabled:
            return self.weight
        if self.training or torch.is_grad_enabled():
            return wq(self.weight)  # QAT / gradients: straight-through, never cached
        w, s = self.weight, wq.scale
        key = (w.data_ptr(), w._version, w.dtype, w.device, w.is_contiguous(),
               s.data_ptr(), s._version)
        if key != self._wq_key:
            # Built outside inference mode so the cache is an ordinary tensor, usable by a
            # later no_grad forward too.
            with torch.inference_mode(False), torch.no_grad():
                cached = wq(w)
                if cached.stride() != w.stride():  # keep the weight's memory format
                    cached = torch.empty_like(w).copy_(cached)
            self._wq_cache, self._wq_key = cached, key
        return self._wq_cache

    def __getstate__(self):
        # The cache is derived state: deepcopy and pickle drop it (it is rebuilt on use).
        state = self.__dict__.copy()
        state["_wq_cache"] = state["_wq_key"] = None
        return state


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

def quantized_layer_names(model):
    """Names of the layers that get quantized: every Conv2d and Linear except the stem conv
    and the classifier (DESIGN.md, Definitions)."""
    keep = {first_conv_name(model), classifier_name(model)}
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in keep]


def quant_layers(qmodel):
    """(name, layer) of every QuantConv2d / QuantLinear in a quantized model."""
    return [(n, m) for n, m in qmodel.named_modules() if isinstance(m, QUANT_LAYERS)]


def uniform_plan(model, weight_bits, activation_bits):
    """A precision plan (layer name -> (weight_bits, activation_bits)) with the same bits on
    every quantized layer."""
    return {n: (weight_bits, activation_bits) for n in quantized_layer_names(model)}


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
    names = quantized_layer_names(model)
    if isinstance(plan, (tuple, list)) and len(plan) == 2:
        plan = uniform_plan(model, *plan)
    if not isinstance(plan, dict):
        raise TypeError("plan must be a dict layer name -> (weight_bits, activation_bits) "
                        "or one (weight_bits, activation_bits) pair")
    fp32_layers = {first_conv_name(model), classifier_name(model)}
    out = {}
    for name, bits in plan.items():
        wb, ab = bits
        wb = check_bits(wb, "--weight_bits")
        ab = check_bits(ab, "--activation_bits")
        if name in fp32_layers:
            if not (is_fp32(wb) and is_fp32(ab)):
                raise UserError(f"layer {name} (stem conv or classifier) stays FP32; its plan "
                                f"entry must be 16 or 32 bits, got W{wb}A{ab}.")
            continue
        if name not in names:
            raise UserError(f"the precision plan names {name!r}, which is not a quantizable "
                            f"Conv2d/Linear of this model.")
        out[name] = (wb, ab)
    return out


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
    _check_choice(weight_granularity, WEIGHT_GRANULARITIES, "--weight_granularity")
    _check_choice(weight_method, WEIGHT_METHODS, "--weight_method")
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


def _act_quantizers(qmodel):
    return [m.input_quant for _, m in quant_layers(qmodel) if m.input_quant.enabled]


class activations_fp32:
    """Context manager: run a quantized model with its activation quantizers off (weights
    stay quantized), e.g. to count activation elements before calibration."""

    def __init__(self, qmodel):
        self.quantizers = _act_quantizers(qmodel)

    def __enter__(self):
        self.modes = [q.mode for q in self.quantizers]
        for q in self.quantizers:
            q.mode = "off"

    def __exit__(self, *exc):
        for q, mode in zip(self.quantizers, self.modes):
            q.mode = mode


def calibrate(qmodel, loader, method="minmax", num_batches=None, seed=0):
    """Set every activation quantizer's scale and signedness from training images.

    loader: a data.BatchLoader over the TRAIN split (anything with `.split.name == "train"`
    that yields (images, labels)); other splits raise a UserError, so test images can never
    leak into calibration. Runs `num_batches` batches (all when None) through the model in
    eval mode with activations unquantized and weights quantized, recording each quantized
    layer's input: its min/max (minmax; also decides signedness), and a seeded random sample
    of its values for `percentile` (the 99.99th percentile of |x|) and `mse` (the clip r*absmax
    with the smallest squared error on the sample). Returns qmodel.
    """
    _check_choice(method, CALIBRATION_METHODS, "--calibration")
    split = getattr(loader, "split", None)
    split_name = getattr(split, "name", None)
    if split_name != "train":
        raise UserError(
            f"calibration must read training images, got the {split_name!r} split; pass a "
            f"BatchLoader over the train split."
        )
    if num_batches is not None and (isinstance(num_batches, bool) or num_batches < 1):
        raise UserError(f"--calib_batches must be at least 1, got {num_batches}.")
    total = len(loader) if num_batches is None else min(num_batches, len(loader))
    if total < 1:
        raise UserError("the calibration split holds no images; calibrate on a non-empty "
                        "train split.")
    quantizers = _act_quantizers(qmodel)
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
