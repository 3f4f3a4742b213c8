"""The weight and activation quantizers (small modules a quantized layer carries), with their
learnable scales for QAT."""

import math

import torch
from torch import nn

from .fake_quant import MIN_SCALE, MSE_RATIOS, PERCENTILE, fake_quantize, quantize_to_int
from .precision import is_fp32, signed_range, unsigned_range, weight_range


def _mse_clip(x, absmax, qmin, qmax, ratios=MSE_RATIOS, chunk=8):
    """Per row of x (rows, n): the clip r*absmax (r in `ratios`) whose symmetric
    fake-quantization to [qmin, qmax] (`fake_quantize` with scale clip/qmax per row) has the
    smallest squared error. absmax: (rows,).

    Each candidate is `fake_quantize`'s tensor arithmetic, op for op, written into one
    reused buffer (x * (1/scale), rounded, clamped, times scale, minus x, squared): the same
    errors to the bit, without three fresh tensors per candidate."""
    best_err = torch.full_like(absmax, math.inf)
    best = absmax.clone()
    buf = torch.empty_like(x)
    for i in range(0, len(ratios), chunk):
        r = ratios[i:i + chunk].to(x)
        clips = absmax[None, :] * r[:, None]  # (k, rows)
        errs = []
        for c in clips:
            scale = (c / qmax).clamp_min(MIN_SCALE).reshape(-1, 1).to(x.dtype)
            torch.mul(x, torch.reciprocal(scale), out=buf).round_().clamp_(qmin, qmax)
            errs.append(buf.mul_(scale).sub_(x).square_().sum(1))
        e, k = torch.stack(errs).min(0)
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
            absmax = _mse_clip(rows, absmax, self.qmin, self.qmax)
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
        self.reset_stats()

    @property
    def qmin(self):
        return signed_range(self.bits)[0] if self.signed else 0

    @property
    def qmax(self):
        return signed_range(self.bits)[1] if self.signed else unsigned_range(self.bits)[1]

    def reset_stats(self):
        """Forget the observed range and samples: a new calibration starts."""
        self.min_val = math.inf
        self.max_val = -math.inf
        self._samples = []
        self._sample_per_batch = 0
        self._generator = None

    def start_observing(self, sample_per_batch=0, seed=0):
        self.reset_stats()
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
                clip = float(_mse_clip(sample[None], torch.tensor([absmax]), self.qmin,
                                       self.qmax)[0])
        self.reset_stats()
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
