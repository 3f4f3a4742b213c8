"""Fake quantization: the one rounding function every quantizer goes through, and the integer codes
of a weight."""


import torch

PERCENTILE = 99.99
# Candidate clipping ratios for the MSE searches: 1% steps of the observed absmax.
MSE_RATIOS = torch.linspace(0.01, 1.0, 100)
# Activation values kept per calibration run and layer for the percentile and MSE searches:
# a uniform random sample (seeded), since whole activation tensors do not fit in memory.
ACT_SAMPLE_SIZE = 1 << 18
MIN_SCALE = 1e-12  # an all-zero channel or tensor still gets a finite, positive scale


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
