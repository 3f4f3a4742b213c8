"""Equalize the channel ranges of every depthwise conv's input before quantizing it.

A depthwise conv's input is quantized per tensor (one scale: what an integer engine takes),
but its channels span very different ranges: in the seed-43 30-epoch checkpoint two stem
channels saturate at 6 (a third of their values) while others never pass 0.5, so a 4-bit
grid of step 0.4 gives those channels one or two levels. Each channel c of such an input is
scaled by a_c = R / m_c (m_c: the channel's largest value on the calibration images, R: the
largest m_c) where it is produced, and its depthwise filter by 1 / a_c where it is read:

    BatchNorm -> ReLU6 -> [quantize] -> depthwise conv
    becomes  BatchNorm x a -> clamp(0, R) -> [quantize] -> depthwise conv / a

The FP32 network computes the same function on the calibration images (the clamp at R binds
only beyond what they reach: there it cuts channel c at its calibration max m_c, in its own
units, where ReLU6 cut at 6; the quantizer after it cuts at or under R anyway, so the
quantized network is exactly the original one with a per-channel input grid), every channel
now fills the input grid, and the depthwise
conv pays nothing: its weights are quantized per output channel, which for a depthwise conv
is per input channel, so the filter divided by a_c has the same integer codes, its scale
divided by a_c (nearest rounding and GPTQ alike: GPTQ's per-channel Hessian scales by a_c^2).
This is SmoothQuant's migration of activation ranges into the next layer's weights (Xiao et
al. 2023) at the one place where it is free, the activation-range half of cross-layer
equalization (Nagel et al. 2019) without its ReLU6 -> ReLU change. The producer's BatchNorm
is FP32 (the stem's) or folded into the expansion conv's per-channel weight scale at export,
so nothing else in the network changes. On by default (`--equalize true`) since the equalize sweeps on three checkpoints (README).
The new clamp's bound R is stored in the exported
file (export.py) and is a Clip in the ONNX graph (onnx_export.py), left out, as ReLU6 is,
where the quantizer after it saturates first.
"""

import copy

import torch
from torch import nn

from .calibrate import training_batches

# The largest factor a channel is scaled by: a channel that the calibration images barely
# wake (m_c under R / 1000) is left with a 1000 times finer range rather than a huge one.
MAX_FACTOR = 1000.0


def depthwise_inputs(model):
    """[(BatchNorm, parent module, activation's child name, depthwise conv), ...]: every
    depthwise conv of a torchvision MobileNetV2 whose input is a Conv -> BatchNorm -> ReLU6
    output that nothing else reads (the stem's for the first block, the expansion conv's in
    the others)."""
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.ops.misc import Conv2dNormActivation

    def conv_bn_act(m):
        kids = list(m.children()) if isinstance(m, Conv2dNormActivation) else []
        return (len(kids) == 3 and isinstance(kids[1], nn.BatchNorm2d)
                and type(kids[2]) in (nn.ReLU6, nn.Hardtanh))

    found, previous = [], None
    for block in model.features:
        if isinstance(block, InvertedResidual):
            stages = list(block.conv)
            for j, stage in enumerate(stages):
                conv = stage[0] if isinstance(stage, Conv2dNormActivation) else None
                if not (isinstance(conv, nn.Conv2d) and conv.groups > 1
                        and conv.groups == conv.in_channels == conv.out_channels):
                    continue
                # without an expansion conv the block's input is the depthwise conv's, and
                # a residual block reads it again for its sum: not this conv's alone
                producer = stages[j - 1] if j > 0 else (
                    None if block.use_res_connect else previous)
                if producer is not None and conv_bn_act(producer):
                    found.append((producer[1], producer, "2", conv))
        previous = block
    return found


@torch.no_grad()
def depthwise_input_maxes(model, loader, num_batches):
    """[per-channel max, ...] of every depthwise conv's input (`depthwise_inputs` order) over
    `num_batches` batches of `loader` (training images: the calibration images). Depends on
    nothing but the FP32 model and those images, so a sweep's runs can share it (fp32_stats)."""
    total = training_batches(loader, num_batches, "equalization")
    sites = depthwise_inputs(model)
    maxes, hooks = [None] * len(sites), []
    for i, (_, parent, child, _) in enumerate(sites):
        def hook(module, args, out, i=i):
            m = out.detach().amax(dim=(0, 2, 3))
            maxes[i] = m if maxes[i] is None else torch.maximum(maxes[i], m)
        hooks.append(parent.get_submodule(child).register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for seen, (x, _) in enumerate(loader, 1):
            model(x)
            if seen >= total:
                break
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return maxes


@torch.no_grad()
def equalize_depthwise_inputs(model, loader, num_batches, maxes=None):
    """A copy of the FP32 `model` with every depthwise conv's input channels equalized (the
    module docstring says how), from `num_batches` batches of `loader` (training images: the
    calibration images), or from `maxes` measured on them before (`depthwise_input_maxes`).
    Returns (model, [(activation module name, R, factors), ...])."""
    if maxes is None:
        maxes = depthwise_input_maxes(model, loader, num_batches)
    model = copy.deepcopy(model)
    sites = depthwise_inputs(model)
    if len(maxes) != len(sites):
        raise ValueError(f"{len(maxes)} channel maxima for {len(sites)} depthwise inputs")
    names = {id(m): n for n, m in model.named_modules()}
    done = []
    for (bn, parent, child, dw), m in zip(sites, maxes):
        r = float(m.max())
        if not r > 0:  # a dead input: nothing to equalize
            continue
        a = (r / m.clamp_min(r / MAX_FACTOR)).to(bn.weight.dtype)
        bn.weight.mul_(a)
        bn.bias.mul_(a)
        dw.weight.div_(a.view(-1, 1, 1, 1).to(dw.weight.dtype))
        # in place, as torchvision's ReLU6 is: the same values, and on channels_last tensors
        # an out-of-place Hardtanh is about 16 times slower (2 against 33 ms a call here)
        setattr(parent, child, nn.Hardtanh(0.0, r, inplace=True))
        done.append((f"{names[id(parent)]}.{child}", r, a))
    return model, done


def clamp_table(model):
    """[[name, max], ...] of the clamps equalization put in `model` (nn.Hardtanh that is not a
    ReLU6), for the exported file."""
    return [[n, float(m.max_val)] for n, m in model.named_modules()
            if type(m) is nn.Hardtanh]


def restore_clamps(model, table):
    """Put the clamps of `clamp_table` back into a freshly built `model` (reloading a file)."""
    for name, upper in table:
        parent, _, child = name.rpartition(".")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the network has no module {name}") from None
        if not isinstance(old, nn.Hardtanh):
            raise ValueError(f"{name} is a {type(old).__name__}, not an activation")
        setattr(model.get_submodule(parent), child, nn.Hardtanh(0.0, float(upper), inplace=True))
    return model
